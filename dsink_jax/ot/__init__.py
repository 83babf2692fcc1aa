"""Optimal-transport solvers: arrays in, arrays out; they know nothing of training.

* :func:`sinkhorn_allocation`: D-SINK's entropic-OT surrogate label allocation (discrete).
* :func:`semidiscrete_potential`: OT-dynamic softmax's heights (semi-discrete, sphere -> classes).
"""

from dsink_jax.ot.semidiscrete import cell_masses, semidiscrete_potential
from dsink_jax.ot.sinkhorn import SinkhornInfo, sinkhorn_allocation

__all__ = ["SinkhornInfo", "cell_masses", "semidiscrete_potential", "sinkhorn_allocation"]
