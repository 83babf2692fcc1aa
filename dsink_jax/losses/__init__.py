"""Per-example classification losses (see `dsink_jax.losses.classification`)."""

from dsink_jax.losses.classification import (
    balanced_softmax_loss,
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

__all__ = [
    "balanced_softmax_loss",
    "cross_entropy",
    "drw_class_weights",
    "elr_loss",
    "elr_update_targets",
    "generalized_cross_entropy",
    "ldam_loss",
    "ldam_margins",
    "logit_adjusted_loss",
    "soft_cross_entropy",
    "symmetric_cross_entropy",
]
