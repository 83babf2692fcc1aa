"""dsink_jax: D-SINK and OT-dynamic softmax for long-tailed, label-noisy learning, in JAX.

Public API:

* `dsink_jax.losses`: every loss (per example): CE, logit adjustment, Balanced Softmax, LDAM,
  GCE, SCE, ELR, the D-SINK loss, the OT-dynamic softmax loss and SupCon;
* `dsink_jax.ot`: the solvers (Sinkhorn allocation, its closed form and online potential step,
  the semi-discrete potential and its warm-started update) with their typed outputs;
* the most used of both here at the top level;
* `data`, `models`, `train` (state, pure steps, optimizer, checkpoints, the loop) and
  `pipelines` (the experiment families) for whole experiments.
"""

from dsink_jax import losses, ot
from dsink_jax.losses import (DSinkAux, distillation_terms, dsink_loss, global_class_mass,
                              ot_dynamic_softmax_loss, supcon_loss)
from dsink_jax.ot import (PotentialOutput, SinkhornOutput, allocation_from_potential,
                          class_potential_step, semidiscrete_potential, sinkhorn_allocation,
                          update_potential)

__version__ = "0.1.0"

__all__ = ["DSinkAux", "PotentialOutput", "SinkhornOutput", "allocation_from_potential",
           "class_potential_step", "distillation_terms", "dsink_loss", "global_class_mass",
           "losses", "ot", "ot_dynamic_softmax_loss", "semidiscrete_potential",
           "sinkhorn_allocation", "supcon_loss", "update_potential"]
