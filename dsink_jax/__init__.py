"""dsink_jax: D-SINK and OT-dynamic softmax for long-tailed, label-noisy learning, in JAX.

Public API (the rest lives in the subpackages: `data`, `models`, `losses`, `ot`, `train`):

* :func:`sinkhorn_allocation`, :func:`dsink_loss`, :func:`global_class_mass` (D-SINK);
* :func:`semidiscrete_potential` (OT-dynamic softmax's solver).
"""

from dsink_jax.losses.dsink import dsink_loss, global_class_mass
from dsink_jax.ot import semidiscrete_potential, sinkhorn_allocation

__version__ = "0.1.0"

__all__ = ["dsink_loss", "global_class_mass", "semidiscrete_potential", "sinkhorn_allocation"]
