"""Training with the OT-dynamic softmax loss and supervised contrastive learning (METHOD.md §2).

The model is a backbone with a cosine classifier (weights W [D, C]) and a projection head. Each
step sees two augmented views of the batch and minimises

    mean CE(s * cos(W, z) + h, y) over both views  +  supcon_weight * mean SupCon(proj, y)

where h, the heights of the power diagram, is NOT learned: it is the semi-discrete OT potential
that gives each class cell the target mass nu (class frequencies of the given labels, or uniform)
under the uniform measure on the unit sphere. It lives in `state.extra["potential"]` and is
re-solved every `solve_every` steps with a few warm-started stochastic dual steps, after the
weights moved ("dynamic"). At inference the logits are the raw `s * cos` (`inference="raw"`) or
`s * cos + h_balanced` with h_balanced the potential for uniform masses (`"balanced"`, kept in
`state.extra["balanced_potential"]` and re-solved alongside).

Paper-stated: the power-diagram view, the dynamic OT softmax, SupCon for a uniform feature
distribution. Ours (options of `config.ot_softmax`): the cosine classifier and scale, mu =
uniform on the sphere, the solver (Adam on the convex dual, Monte-Carlo), how often and how long
to re-solve, the SupCon weight and temperature, the inference rule.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsink_jax.ot.semidiscrete import update_potential
from dsink_jax.losses import ot_dynamic_softmax_logits, ot_dynamic_softmax_loss, supcon_loss
from dsink_jax.train import step as step_lib
from dsink_jax.train.objectives import Objective
from dsink_jax.train.state import TrainState

INFERENCE_MODES = ("raw", "balanced")
TRAIN_TARGETS = ("prior", "uniform")


class OTSoftmaxNet(nn.Module):
    """A backbone with a cosine classifier, plus a projection head for SupCon.

    `__call__(x, train) -> (cosine logits [B, C], features [B, D])`, or with
    `with_projection=True` also the projections [B, projection_dim].
    """

    backbone: nn.Module  # built with head="cosine": params["backbone"]["head"]["kernel"] [D, C]
    projection_dim: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False, with_projection: bool = False):
        cosine, features = self.backbone(x, train=train)
        hidden = nn.relu(nn.Dense(features.shape[-1], name="proj_hidden")(features))
        projection = nn.Dense(self.projection_dim, name="proj_out")(hidden)
        if with_projection:
            return cosine, features, projection
        return cosine, features


def class_weights(params) -> jax.Array:
    """The cosine classifier's weights as [C, D]."""
    return params["backbone"]["head"]["kernel"].T


@dataclasses.dataclass(frozen=True)
class OTSoftmaxOptions:
    """Static options (from `config.ot_softmax`)."""

    scale: float
    supcon_weight: float
    temperature: float
    solve_every: int
    solve_steps: int
    num_samples: int
    solver_learning_rate: float
    entropic_epsilon: float  # 0 = hard cells
    inference: str
    target_mass: tuple[float, ...]  # nu during training, [C]

    @classmethod
    def from_config(cls, c, class_counts: np.ndarray) -> "OTSoftmaxOptions":
        counts = np.maximum(np.asarray(class_counts, np.float64), 1)
        if c.train_target == "prior":
            nu = counts / counts.sum()
        else:
            nu = np.full(len(counts), 1.0 / len(counts))
        return cls(scale=float(c.scale), supcon_weight=float(c.supcon_weight),
                   temperature=float(c.temperature), solve_every=int(c.solve_every),
                   solve_steps=int(c.solve_steps), num_samples=int(c.num_samples),
                   solver_learning_rate=float(c.solver_learning_rate),
                   entropic_epsilon=float(c.entropic_epsilon), inference=str(c.inference),
                   target_mass=tuple(float(v) for v in nu))


def potential_objective(num_classes: int) -> Objective:
    """Carries the two potentials in `TrainState.extra` (the loss itself lives in the step)."""

    def init_extra():
        return {"potential": np.zeros((num_classes,), np.float32),
                "balanced_potential": np.zeros((num_classes,), np.float32)}

    def unused(*args, **kwargs):
        raise NotImplementedError("the OT-softmax loss is computed in ot_softmax_step")
    return Objective("ot_softmax", unused, init_extra, head="cosine")


def _solve(weights, nu, init, rng, options: OTSoftmaxOptions):
    return update_potential(
        init, weights, nu, scale=options.scale, rng=rng, num_samples=options.num_samples,
        num_steps=options.solve_steps, learning_rate=options.solver_learning_rate,
        entropic_epsilon=options.entropic_epsilon)


def ot_softmax_step(state: TrainState, batch: dict[str, jax.Array], teacher_variables=(), *,
                    method: step_lib.Method, options: OTSoftmaxOptions
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step: two views, OT-dynamic softmax CE + SupCon, then the potential re-solve."""
    del teacher_variables
    rng = jax.random.fold_in(state.rng, state.step)
    view_rng, view2_rng, solve_rng = jax.random.split(rng, 3)
    views = jnp.concatenate([method.augment.train(view_rng, batch["images"]),
                             method.augment.train(view2_rng, batch["images"])])
    labels = batch["labels"]
    both_labels = jnp.concatenate([labels, labels])
    potential = jax.lax.stop_gradient(state.extra["potential"])

    def loss_fn(params):
        variables = {**state.variables, "params": params}
        (_, features, projection), updates = method.model.apply(
            variables, views, train=True, with_projection=True, mutable=["batch_stats"])
        ce = ot_dynamic_softmax_loss(features, class_weights(params), both_labels, potential,
                                     scale=options.scale)
        b = labels.shape[0]
        pairs = jnp.stack([projection[:b], projection[b:]], axis=1)  # [B, 2, p]
        contrast = supcon_loss(pairs, labels, temperature=options.temperature)
        loss = jnp.mean(ce) + options.supcon_weight * jnp.mean(contrast)
        logits = ot_dynamic_softmax_logits(features[:b], class_weights(params), potential,
                                           scale=options.scale)
        new_stats = updates.get("batch_stats", state.batch_stats)
        return loss, (new_stats, jnp.mean(ce), jnp.mean(contrast), logits)

    (loss, (new_stats, ce, contrast, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # "Dynamic": re-solve the heights for the moved weights, warm-started.
    nu = jnp.asarray(options.target_mass, jnp.float32)
    uniform = jnp.full_like(nu, 1.0 / nu.shape[0])
    weights = jax.lax.stop_gradient(class_weights(params))

    def resolve(extra):
        out = {**extra, "potential": _solve(weights, nu, extra["potential"], solve_rng, options)}
        if options.inference == "balanced":
            out["balanced_potential"] = _solve(weights, uniform, extra["balanced_potential"],
                                               jax.random.fold_in(solve_rng, 1), options)
        return out

    extra = jax.lax.cond(state.step % options.solve_every == 0, resolve, lambda e: e,
                         state.extra)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "ce": ce, "supcon": contrast,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "grad_norm": grad_norm,
               "potential_range": jnp.max(extra["potential"]) - jnp.min(extra["potential"]),
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state, extra=extra), metrics


def ot_softmax_predict(state: TrainState, images: jax.Array, *, method: step_lib.Method,
                       options: OTSoftmaxOptions) -> jax.Array:
    """Eval logits: `s * cos` (raw) or `s * cos + h_balanced` (balanced)."""
    _, features = method.model.apply(state.variables, method.augment.eval(images), train=False)
    heights = (state.extra["balanced_potential"] if options.inference == "balanced"
               else jnp.zeros_like(state.extra["potential"]))
    return ot_dynamic_softmax_logits(features, class_weights(state.params), heights,
                                     scale=options.scale)

