"""Pure training and evaluation steps.

`train_step(state, batch, teacher_variables, *, method)` is a pure function of explicit pytrees. It
is jitted where it is called, with the state donated:

    step = jax.jit(functools.partial(train_step, method=method), donate_argnums=0)

The batch holds raw uint8 images; augmentation (crop, flip, normalisation) runs inside the step
on device, keyed by `fold_in(state.rng, state.step)`, so a resumed run replays the same randomness.
Frozen teachers are arguments (`teacher_variables`), never part of the optimised state. A teacher
may also be a :class:`CachedTeacher`: its log-probabilities on the unaugmented training images,
computed once per stage, looked up by example index instead of a forward pass on every step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsink_jax.data import augment as augment_lib
from dsink_jax.train.objectives import Objective
from dsink_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation and normalisation constants (per-channel, in [0, 1] units)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True

    def train(self, rng: jax.Array, images: jax.Array) -> jax.Array:
        return augment_lib.augment_batch(rng, images, mean=np.asarray(self.mean, np.float32),
                                         std=np.asarray(self.std, np.float32),
                                         crop_padding=self.crop_padding, flip=self.flip)

    def eval(self, images: jax.Array) -> jax.Array:
        return augment_lib.normalize(images, mean=np.asarray(self.mean, np.float32),
                                     std=np.asarray(self.std, np.float32))


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything static a supervised step needs (models, optimizer, objective, augmentation).

    Attributes:
      model: the Flax module being trained; `model.apply(v, x, train=...) -> (logits, features)`.
      tx: the optax optimizer.
      objective: the bound loss (see `dsink_jax.train.objectives`).
      augment: augmentation constants.
      teacher_models: frozen Flax modules whose logits on the same augmented batch are handed to
        the objective (D-SINK's auxiliaries), or :class:`CachedTeacher` tables looked up by
        example index; their variables (or tables) come as a step argument.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    objective: Objective
    augment: Augment
    teacher_models: tuple[nn.Module, ...] = ()


def init_state(method: Method, rng: jax.Array, sample_images: np.ndarray) -> TrainState:
    """Initialises parameters, optimizer state and method memory.

    Args:
      method: the method.
      rng: the run's key, split once: parameters from the first half, steps use
        `fold_in(second, step)`.
      sample_images: uint8 [b, H, W, C], only its shape is used.

    Returns:
      A :class:`TrainState` at step 0.
    """
    x = jnp.zeros((1,) + tuple(sample_images.shape[1:]), jnp.float32)
    init_rng, step_rng = jax.random.split(rng)
    variables = method.model.init(init_rng, x, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    extra = jax.tree.map(jnp.asarray, method.objective.init_extra())
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=method.tx.init(params), rng=step_rng, extra=extra)


@dataclasses.dataclass(frozen=True)
class CachedTeacher:
    """A frozen teacher replaced by a table of its outputs, looked up by example index.

    A teacher's output is a function of its input alone; computed once per stage on the
    unaugmented training images (eval mode), it costs nothing per step. It then differs from
    a forward pass on the step's augmented view by the augmentation (crop and flip). Its step
    argument, in place of Flax variables, is the table of :func:`teacher_table`.

    Attributes:
      num_classes: C.
    """

    num_classes: int

    def lookup(self, table: dict[str, jax.Array], indices: jax.Array) -> jax.Array:
        """The teacher's log-probabilities [B, C] (float32) of examples `indices` [B].

        A top-k table gives its k classes their stored log-probabilities and every other class
        an equal share of the remaining mass (`table["rest"]`).
        """
        if "log_probs" in table:
            return table["log_probs"][indices]
        values, classes = table["values"][indices], table["classes"][indices]
        rows = jnp.broadcast_to(table["rest"][indices][:, None],
                                (indices.shape[0], self.num_classes))
        return rows.at[jnp.arange(indices.shape[0])[:, None], classes].set(values)


def teacher_table(logits: np.ndarray, *, topk: int = 0) -> dict[str, np.ndarray]:
    """The lookup table of a :class:`CachedTeacher` from its logits on every training example.

    Args:
      logits: float [N, C], the teacher's logits (already multiplied by its logit scale).
      topk: 0 keeps every log-probability (`{"log_probs": [N, C]}`, N C 4 bytes); k in [1, C)
        keeps the k largest per example (`{"values": [N, k], "classes": int32 [N, k],
        "rest": [N]}`, N (2k + 1) 4 bytes), each other class getting log((1 - sum of the k
        probabilities) / (C - k)).

    Returns:
      The table as float32 / int32 numpy arrays.
    """
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits has shape {logits.shape}; expected [N, C]")
    num_classes = logits.shape[1]
    if not 0 <= topk < num_classes:
        raise ValueError(f"topk={topk} must be in [0, C) = [0, {num_classes}) (0 = every class)")
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float32)
    if topk == 0:
        return {"log_probs": log_probs}
    classes = np.argpartition(-log_probs, topk - 1, axis=-1)[:, :topk].astype(np.int32)
    values = np.take_along_axis(log_probs, classes, axis=-1)
    others = log_probs.copy()
    np.put_along_axis(others, classes, -np.inf, axis=-1)
    # The mass of the other classes in log space (1 - sum of the k would cancel in float32).
    rest = np.asarray(jax.nn.logsumexp(jnp.asarray(others), axis=-1), np.float32)
    rest = (rest - np.log(num_classes - topk)).astype(np.float32)
    return {"values": values, "classes": classes, "rest": rest}


def teacher_table_bytes(num_examples: int, num_classes: int, topk: int = 0) -> int:
    """The bytes of a :func:`teacher_table` (float32 and int32 entries)."""
    return 4 * num_examples * (num_classes if topk == 0 else 2 * topk + 1)


def teacher_logits(model, variables, images: jax.Array, indices: jax.Array) -> jax.Array:
    """A frozen teacher's logits [B, C] on a batch: a forward pass in eval mode, or the rows
    of its table (a :class:`CachedTeacher`, whose log-probabilities serve as logits)."""
    if isinstance(model, CachedTeacher):
        return model.lookup(variables, indices)
    return model.apply(variables, images, train=False)[0]


class Prepared(NamedTuple):
    """A batch made ready for the update: what the members of a sweep share.

    Attributes:
      images: float32 [V * B, H, W, C], the V augmented views, view-major.
      teacher_logits: tuple of [B, C], the frozen teachers' logits on the first view.
      rng: the step's key for the objective's own randomness (`Objective.after_update`).
    """

    images: jax.Array
    teacher_logits: tuple
    rng: jax.Array


def step_keys(rng: jax.Array, step: jax.Array, num_views: int) -> tuple[list, jax.Array]:
    """The step's augmentation keys (one per view) and its objective key.

    One view uses `fold_in(rng, step)` itself; V views split it into V + 1 keys, the last for
    the objective. Both depend on (rng, step) alone, so a resumed run replays them.
    """
    key = jax.random.fold_in(rng, step)
    if num_views == 1:
        return [key], jax.random.fold_in(key, 1)
    keys = jax.random.split(key, num_views + 1)
    return list(keys[:num_views]), keys[num_views]


def prepare_batch(rng: jax.Array, step: jax.Array, batch: dict[str, jax.Array],
                  teacher_variables=(), *, method: Method) -> Prepared:
    """Augments the batch (`objective.num_views` views) and runs the frozen teachers on it.

    Split from the update so that a sweep runs it once for all members.
    """
    view_keys, objective_key = step_keys(rng, step, method.objective.num_views)
    source = batch["images"]
    if source.ndim == 5:  # [B, V, H, W, C]: views augmented on the host (a streaming feed)
        views = [method.augment.train(key, source[:, v]) for v, key in enumerate(view_keys)]
    else:
        views = [method.augment.train(key, source) for key in view_keys]
    teacher_outputs = tuple(
        jax.lax.stop_gradient(teacher_logits(model, variables, views[0], batch["indices"]))
        for model, variables in zip(method.teacher_models, teacher_variables))
    images = views[0] if len(views) == 1 else jnp.concatenate(views)
    return Prepared(images, teacher_outputs, objective_key)


def apply_update(state: TrainState, prepared: Prepared, batch: dict[str, jax.Array], *,
                 method: Method) -> tuple[TrainState, dict[str, jax.Array]]:
    """The gradient step on a prepared batch (see :func:`train_step`)."""
    objective = method.objective

    def loss_fn(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            outputs, updates = method.model.apply(variables, prepared.images, train=True,
                                                  mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            outputs = method.model.apply(variables, prepared.images, train=True)
            new_stats = state.batch_stats
        per_example, extra, aux = objective(
            outputs[0], batch["labels"], indices=batch["indices"], extra=state.extra,
            step=state.step, teacher_logits=prepared.teacher_logits, outputs=outputs,
            params=params)
        return jnp.mean(per_example), (outputs[0], new_stats, extra, aux)

    (loss, (logits, new_stats, extra, aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if objective.after_update is not None:
        extra = objective.after_update(extra, params, step=state.step, rng=prepared.rng)
    grad_norm = optax.tree.norm(grads)
    labels = batch["labels"]
    metrics = {
        "loss": loss,
        # Against the given labels on the first view; an objective may report its own.
        "accuracy": jnp.mean(jnp.argmax(logits[:labels.shape[0]], -1) == labels),
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        **{k: v for k, v in aux.items() if jnp.ndim(v) == 0},
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state, extra=extra)
    return new_state, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_variables=(), *,
               method: Method) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step: augment, run the frozen teachers, update the model.

    Args:
      state: the training state.
      batch: "images" uint8 [B, H, W, C], "labels" int32 [B] (the given, possibly noisy labels),
        "indices" int32 [B] (positions in the training set, for per-sample memory).
      teacher_variables: tuple of frozen Flax variables, one per `method.teacher_models`.
      method: static parts (bind with functools.partial before jitting).

    Returns:
      (new_state, metrics) with scalar metrics "loss", "accuracy" (against the given labels),
      "grad_norm", "finite" (True when the loss and gradients are finite) and the objective's
      own scalar diagnostics.
    """
    prepared = prepare_batch(state.rng, state.step, batch, teacher_variables, method=method)
    return apply_update(state, prepared, batch, method=method)


MEMBER_MODES = ("vmap", "unroll")


def members_step(states: TrainState, batch: dict[str, jax.Array], teacher_variables=(), *,
                 data_rng: jax.Array, method: Method, mode: str = "vmap"
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step of every member of a sweep: the batch prepared once, then M updates.

    All members share the data stream: the augmentation keys come from `data_rng` (a single
    run's `state.rng` for the same seed) and the members' common step count, so the teachers'
    forward and the augmentation run once for all.

    Args:
      states: stacked TrainState [M, ...] (all members at the same step).
      batch, teacher_variables: as in :func:`train_step`.
      data_rng: the shared augmentation key.
      method: static parts.
      mode: "vmap" batches the member updates (one program with [M, ...] operands: best on
        accelerators and for dense models); "unroll" writes the M updates out one after
        another in the same program, which avoids the grouped convolutions that vmap makes of
        conv nets (slow on XLA:CPU) at the price of M times the compile time.

    Returns:
      (states, metrics) with every metric of shape [M].
    """
    if mode not in MEMBER_MODES:
        raise ValueError(f"members mode={mode!r}; allowed: {', '.join(MEMBER_MODES)}")
    prepared = prepare_batch(data_rng, states.step[0], batch, teacher_variables, method=method)
    if mode == "unroll":
        outputs = [apply_update(jax.tree.map(lambda x, i=i: x[i], states), prepared, batch,
                                method=method) for i in range(states.step.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    update = functools.partial(apply_update, method=method)
    return jax.vmap(update, in_axes=(0, None, None))(states, prepared, batch)


def predict_logits(variables: dict, images: jax.Array, *, model: nn.Module,
                   augment: Augment) -> jax.Array:
    """A model's eval-mode logits [B, C] for uint8 images [B, H, W, C] (no augmentation)."""
    return model.apply(variables, augment.eval(images), train=False)[0].astype(jnp.float32)


def test_logits(state: TrainState, images: jax.Array, *, method: Method) -> jax.Array:
    """The method's test-time logits [B, C]: eval mode, then the objective's `test_logits`.

    The plain model logits unless the objective adds to them (OT heights, a post-hoc prior).
    """
    outputs = method.model.apply(state.variables, method.augment.eval(images), train=False)
    if method.objective.test_logits is None:
        return outputs[0].astype(jnp.float32)
    return method.objective.test_logits(outputs, state.params, state.extra).astype(jnp.float32)


def batched_predict(predict_fn, state, images: np.ndarray, batch_size: int, *,
                    put=None) -> np.ndarray:
    """Runs a jitted `predict_fn(state, images)` over a dataset in fixed-size batches.

    The last batch is padded to `batch_size` (and the padding dropped) so the function is traced
    once, whatever the dataset size. `put(chunk)` places a host chunk (e.g. as a batch-sharded
    global array); default: passed as is.

    Returns:
      float32 numpy [N, C] logits.
    """
    n = images.shape[0]
    outputs = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        if put is not None:
            chunk = put(chunk)
        outputs.append(np.asarray(predict_fn(state, chunk))[:batch_size - pad])
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def params_fingerprint(params: Any) -> str:
    """A SHA-256 of the parameters' bytes in tree order (same run => same hash, bit for bit)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]
