"""Optimal-transport solvers: arrays in, arrays out; they know nothing of training.

* :func:`sinkhorn_allocation`: D-SINK's entropic-OT surrogate label allocation (discrete), with
  its closed form :func:`allocation_from_potential` and the stochastic dual-ascent step
  :func:`class_potential_step` on the class potential;
* :func:`semidiscrete_potential`: OT-dynamic softmax's heights (semi-discrete, sphere -> classes),
  and :func:`update_potential`, its warm-started re-solve during training.
"""

from dsink_jax.ot.semidiscrete import (PotentialOutput, cell_masses, sample_unit_sphere,
                                       semidiscrete_potential, update_potential)
from dsink_jax.ot.sinkhorn import (SinkhornOutput, allocation_from_potential, class_potential_step,
                                   sinkhorn_allocation)

__all__ = ["PotentialOutput", "SinkhornOutput", "allocation_from_potential", "cell_masses",
           "class_potential_step", "sample_unit_sphere", "semidiscrete_potential",
           "sinkhorn_allocation", "update_potential"]
