"""Every loss of the library: per-example (unreduced), pure, jittable; reduce at the call site.

* `classification`: CE, logit adjustment, Balanced Softmax, LDAM(-DRW), GCE, SCE, ELR, the
  per-class thresholds of class-balanced small-loss selection;
* `dsink`: the D-SINK loss (base + alpha * soft CE to the Sinkhorn allocation);
* `ot_softmax`: the OT-dynamic softmax loss on a cosine classifier with OT heights;
* `supcon`: the supervised contrastive loss.
"""

from dsink_jax.losses.classification import (
    balanced_softmax_loss,
    class_quantile_thresholds,
    cross_entropy,
    drw_class_weights,
    elr_loss,
    elr_update_targets,
    generalized_cross_entropy,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    soft_cross_entropy,
    symmetric_cross_entropy,
)
from dsink_jax.losses.dsink import (BASE_LOSSES, DistillationTerms, DSinkAux, distillation_terms,
                                    dsink_loss, global_class_mass)
from dsink_jax.losses.ot_softmax import ot_dynamic_softmax_logits, ot_dynamic_softmax_loss
from dsink_jax.losses.supcon import supcon_loss

__all__ = [
    "BASE_LOSSES",
    "DSinkAux",
    "DistillationTerms",
    "balanced_softmax_loss",
    "class_quantile_thresholds",
    "cross_entropy",
    "distillation_terms",
    "drw_class_weights",
    "dsink_loss",
    "elr_loss",
    "elr_update_targets",
    "generalized_cross_entropy",
    "global_class_mass",
    "ldam_loss",
    "ldam_margins",
    "logit_adjusted_loss",
    "ot_dynamic_softmax_logits",
    "ot_dynamic_softmax_loss",
    "soft_cross_entropy",
    "supcon_loss",
    "symmetric_cross_entropy",
]
