"""A projection head on top of any model, for contrastive losses (SupCon), and head weights."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


class ProjectionNet(nn.Module):
    """A model plus a two-layer projection head of its features.

    `__call__(x, train) -> (logits [B, C], features [B, D], projection [B, projection_dim])`:
    the wrapped model's outputs and the projection (Dense-ReLU-Dense, BCL / SupCon style) of its
    features. The wrapped model's parameters live under "backbone".

    Attributes:
      backbone: any model of this package (returns `(logits, features)`).
      projection_dim: size of the projection.
    """

    backbone: nn.Module
    projection_dim: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        logits, features = self.backbone(x, train=train)
        hidden = nn.relu(nn.Dense(features.shape[-1], name="proj_hidden")(features))
        projection = nn.Dense(self.projection_dim, name="proj_out")(hidden)
        return logits, features, projection


def classifier_weights(params: Any) -> jax.Array:
    """The class weights [C, D] of the classifier head (named "head") of any model here.

    The head sits at the top of a model's parameters, or under "backbone" for a wrapper such as
    :class:`ProjectionNet`; its kernel is [D, C] for the linear and cosine heads.
    """
    node = params
    while "head" not in node:
        if "backbone" not in node:
            raise ValueError(f"no classifier head in parameters with keys {sorted(node)}")
        node = node["backbone"]
    return node["head"]["kernel"].T
