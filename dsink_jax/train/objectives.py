"""Training objectives: a loss name bound to the data it needs (class counts, schedule, memory).

An objective is what the pure train step minimises. It is a plain function

    objective(logits, labels, *, indices, extra, step, teacher_logits)
        -> (per_example_loss [B], new_extra, aux_metrics)

closed over constants (class prior, margins, DRW weights), so the step stays one jitted program.
`extra` is the method state carried in `TrainState.extra` (ELR's per-sample targets), and
`teacher_logits` the frozen teachers' logits on the same augmented batch (used by D-SINK).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsink_jax import losses, ot
from dsink_jax.models import classifier_weights
from dsink_jax.losses.dsink import distillation_terms, dsink_loss

LOSS_NAMES = ("ce", "la", "balanced_softmax", "ldam_drw", "gce", "sce", "elr", "gce_la", "sce_la",
              "select_la")
# What each loss is robust to; used by docs and result tables.
LOSS_KIND = {
    "ce": "none",
    "la": "imbalance",
    "balanced_softmax": "imbalance",
    "ldam_drw": "imbalance",
    "gce": "noise",
    "sce": "noise",
    "elr": "noise",
    # (ours) a noise-robust loss on logit-adjusted logits: GCE / SCE of (logits + tau log
    # prior), so that the robust loss also gives the tail its share (la_tau, given labels).
    "gce_la": "noise+imbalance",
    "sce_la": "noise+imbalance",
    # (ours, RoLT-style) class-balanced small-loss selection: the logit-adjusted CE on the
    # samples whose running loss is among the `select_keep` smallest of their given class.
    "select_la": "noise+imbalance",
}
# The model head each loss trains (LDAM's margins are on cosine logits).
LOSS_HEADS = {name: "cosine" if name == "ldam_drw" else "linear" for name in LOSS_NAMES}


def logit_scale(loss: str, options: Any) -> float:
    """The factor that makes a trained model's logits its loss's logits.

    LDAM's model outputs cosines in [-1, 1] and its loss scales them by `ldam_scale` (30):
    its probabilities, e.g. as a D-SINK teacher's, are softmax(30 cos). 1 for every other loss.
    """
    return float(options.ldam_scale) if loss == "ldam_drw" else 1.0


@dataclasses.dataclass(frozen=True)
class Objective:
    """A bound objective: what the one train step needs to know about a method.

    Attributes:
      name: the loss name.
      fn: `fn(logits, labels, *, indices, extra, step, teacher_logits, outputs, params)
        -> (per_example_loss, extra, aux)`: `logits` = `outputs[0]`, the model's first output on
        all views ([V * B, C], view-major), `outputs` the model's whole output tuple, `params`
        the parameters being differentiated; the loss is the mean of `per_example_loss`.
      init_extra: `init_extra() -> dict` of method state (numpy arrays) for `TrainState.extra`.
      head: the model head the loss expects ("linear", or "cosine" for LDAM and OT-softmax).
      num_views: augmented views of each image per step (2 for contrastive losses); the
        teachers see the first.
      projection_dim: > 0 adds a projection head of this size (models.ProjectionNet).
      after_update: optional `(extra, params, *, step, rng) -> extra`, run after the optimizer
        step with the new parameters (OT-softmax re-solves its heights there).
      test_logits: optional `(outputs, params, extra) -> logits [B, C]` used for evaluation
        (eval mode, no augmentation); default `outputs[0]`.
    """

    name: str
    fn: Callable[..., tuple[jax.Array, dict, dict]]
    init_extra: Callable[[], dict]
    head: str = "linear"
    num_views: int = 1
    projection_dim: int = 0
    after_update: Callable[..., dict] | None = None
    test_logits: Callable[..., jax.Array] | None = None

    def __call__(self, logits, labels, *, indices, extra, step, teacher_logits=(), outputs=(),
                 params=None):
        return self.fn(logits, labels, indices=indices, extra=extra, step=step,
                       teacher_logits=teacher_logits, outputs=outputs, params=params)


def _no_extra() -> dict:
    return {}


def count_prior(class_counts: np.ndarray) -> np.ndarray:
    """[C] float64 class prior of per-class counts, an empty class counted as 1 (so that its
    log stays finite): the given-label prior of the logit-adjusted losses and of D-SINK."""
    counts = np.maximum(np.asarray(class_counts, np.float64), 1)
    return counts / counts.sum()


def make_objective(name: str, options: Any, *, class_counts: np.ndarray, num_train: int,
                   steps_per_epoch: int, epochs: int) -> Objective:
    """Binds a single-robustness loss to the training set.

    Args:
      name: one of :data:`LOSS_NAMES`.
      options: `config.loss_options` (see `dsink_jax.configs.LOSS_DEFAULTS`).
      class_counts: int [C], training examples per class (given labels: the prior a practitioner
        can observe on noisy data).
      num_train: N, the number of training examples (ELR's memory size).
      steps_per_epoch: optimizer steps per epoch (DRW's start step).
      epochs: total epochs (DRW starts at `drw_start_fraction * epochs`).

    Returns:
      An :class:`Objective`.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")
    counts = np.asarray(class_counts, np.float64)
    num_classes = counts.shape[0]
    prior = jnp.asarray(count_prior(counts), jnp.float32)
    adjustment = float(options.la_tau) * jnp.log(prior)  # of the *_la robust losses

    def wrap(per_example):
        def fn(logits, labels, *, extra, **unused):
            del unused
            return per_example(logits, labels), extra, {}
        return fn

    if name == "ce":
        return Objective(name, wrap(losses.cross_entropy), _no_extra)
    if name == "la":
        tau = float(options.la_tau)
        return Objective(name, wrap(
            lambda lg, y: losses.logit_adjusted_loss(lg, y, class_prior=prior, tau=tau)), _no_extra)
    if name == "balanced_softmax":
        return Objective(name, wrap(
            lambda lg, y: losses.balanced_softmax_loss(lg, y, class_prior=prior)), _no_extra)
    if name in ("gce", "gce_la"):
        q = float(options.gce_q)
        shift = adjustment if name == "gce_la" else 0.0
        return Objective(name, wrap(
            lambda lg, y: losses.generalized_cross_entropy(lg + shift, y, q=q)), _no_extra)
    if name in ("sce", "sce_la"):
        a, b = float(options.sce_alpha), float(options.sce_beta)
        shift = adjustment if name == "sce_la" else 0.0
        return Objective(name, wrap(lambda lg, y: losses.symmetric_cross_entropy(
            lg + shift, y, alpha=a, beta=b)), _no_extra)
    if name == "ldam_drw":
        margins = losses.ldam_margins(counts, max_margin=float(options.ldam_max_margin))
        weights = losses.drw_class_weights(counts, beta=float(options.drw_beta))
        drw_start = int(round(float(options.drw_start_fraction) * epochs)) * steps_per_epoch
        scale = float(options.ldam_scale)

        def ldam(logits, labels, *, extra, step, **unused):
            del unused
            # Deferred re-weighting: plain LDAM first, class-balanced weights from drw_start on.
            w = jnp.where(step >= drw_start, jnp.asarray(weights, jnp.float32),
                          jnp.ones((num_classes,), jnp.float32))
            loss = losses.ldam_loss(logits, labels, margins=margins, scale=scale,
                                    class_weights=w)
            return loss, extra, {}
        return Objective(name, ldam, _no_extra, head=LOSS_HEADS[name])
    if name == "select_la":
        return _select_objective(options, prior, num_train=num_train,
                                 start_step=int(round(float(options.select_start_fraction)
                                                      * epochs)) * steps_per_epoch)
    # ELR: per-sample target memory carried in the training state.
    lam, beta = float(options.elr_lambda), float(options.elr_beta)

    def elr(logits, labels, *, indices, extra, **unused):
        del unused
        memory = extra["elr_targets"]
        targets = losses.elr_update_targets(memory[indices], logits, beta=beta)
        loss = losses.elr_loss(logits, labels, targets=targets, lam=lam)
        return loss, {**extra, "elr_targets": memory.at[indices].set(targets)}, {}

    def elr_init():
        return {"elr_targets": np.zeros((num_train, num_classes), np.float32)}
    return Objective(name, elr, elr_init)


def _select_objective(options: Any, prior: jax.Array, *, num_train: int,
                      start_step: int) -> Objective:
    """Class-balanced small-loss selection (`select_la`, ours after RoLT, Wei et al. 2021).

    Each training sample's logit-adjusted CE is kept as a running mean over the epochs
    (`select_beta`: weight of the old value; the first visit sets it) in `extra`, with its
    given label. From `start_step` on, a sample counts only when its running loss is at most
    the `select_keep`-quantile of its given class's running losses (:func:`class_quantile_
    thresholds`), the kept samples' losses rescaled to the batch mean; before it (the early-
    learning phase, when small loss is not yet a sign of a clean label) every sample counts.
    The per-class quantile keeps every class's share, where one global small-loss threshold
    (co-teaching) drops the tail classes, whose losses are the largest.
    """
    keep, beta, tau = (float(options.select_keep), float(options.select_beta),
                       float(options.la_tau))
    num_classes = int(prior.shape[0])

    def select(logits, labels, *, indices, extra, step, **unused):
        del unused
        loss = losses.logit_adjusted_loss(logits, labels, class_prior=prior, tau=tau)
        score = jax.lax.stop_gradient(loss)
        seen = extra["select_labels"][indices] >= 0
        running = jnp.where(seen, beta * extra["select_losses"][indices] + (1 - beta) * score,
                            score)
        memory = extra["select_losses"].at[indices].set(running)
        memory_labels = extra["select_labels"].at[indices].set(labels.astype(jnp.int32))
        thresholds = losses.class_quantile_thresholds(memory, memory_labels,
                                                      num_classes=num_classes, keep=keep)
        kept = jnp.where(step >= start_step, running <= thresholds[labels], True)
        kept = kept.astype(loss.dtype)
        weight = kept / jnp.maximum(jnp.mean(kept), 1.0 / kept.shape[0])
        return weight * loss, {**extra, "select_losses": memory,
                               "select_labels": memory_labels}, {"kept_fraction": jnp.mean(kept)}

    def init():
        return {"select_losses": np.zeros((num_train,), np.float32),
                "select_labels": np.full((num_train,), -1, np.int32)}
    return Objective("select_la", select, init)


CLASS_MASS_MODES = ("batch", "global")
# Which f_L probabilities make the class mass: its raw (balanced) posteriors, or those
# reweighted by the given-label prior (its estimate of the training posterior).
CLASS_MASS_PRIORS = ("none", "label_prior")


def class_mass_shift(class_mass_prior: str, class_counts: np.ndarray) -> np.ndarray | float:
    """What is added to f_L's logits before their softmax makes the class mass.

    "none": 0; "label_prior": log of the given-label prior (Bayes' rule from a balanced
    posterior to the training one: softmax(z_L + log pi) = p_bal(y|x) pi(y) / Z).
    """
    if class_mass_prior not in CLASS_MASS_PRIORS:
        raise ValueError(f"class_mass_prior={class_mass_prior!r}; allowed: "
                         f"{', '.join(CLASS_MASS_PRIORS)}")
    if class_mass_prior == "none":
        return 0.0
    return np.log(count_prior(class_counts)).astype(np.float32)
# Granularity of the D-SINK allocation (docs/method notes, "Granularity of Q"):
#   "batch":   Sinkhorn over each mini-batch, both teachers run on every step (class mass per
#              `class_mass`);
#   "dataset": Sinkhorn over all N training samples every `refresh_every_epochs` epochs
#              (teachers once, on unaugmented images; the student's logits from the epoch just
#              finished); each step looks its targets up by index;
#   "online":  the closed form softmax((z_N + z) / epsilon + g) with the class potential g (C
#              numbers) carried in the state and moved every step by stochastic dual ascent
#              towards the training-set class mass; f_N runs on every step, f_L never.
ALLOCATIONS = ("batch", "dataset", "online")
# Which teachers' logits the step hands the objective, per allocation mode.
ALLOCATION_TEACHERS = {"batch": ("noise", "imbalance"), "dataset": (), "online": ("noise",)}


def _student_prior(class_counts: np.ndarray | None,
                   student_prior: np.ndarray | None) -> np.ndarray | None:
    """The [C] prior of `student_logit_adjustment` and `base_loss="la"` (float64): the given
    `student_prior`, else the given-label prior of `class_counts` (empty classes count 1), else
    None."""
    if student_prior is not None:
        return np.asarray(student_prior, np.float64)
    return None if class_counts is None else count_prior(class_counts)


def make_dsink_objective(options: Any, *, clean_labels: np.ndarray, steps_per_epoch: int,
                         class_mass: np.ndarray | None = None,
                         class_counts: np.ndarray | None = None,
                         la_tau: float = 1.0,
                         test_prior: np.ndarray | None = None,
                         teacher_scales: tuple[float, ...] = (),
                         student_prior: np.ndarray | None = None) -> Objective:
    """The D-SINK student objective: base loss + alpha * soft CE to the allocation Q.

    The teachers' logits arrive as `teacher_logits`, in the order of
    `ALLOCATION_TEACHERS[options.allocation]`. alpha and epsilon are read from `extra["hparams"]`
    when present (a vmapped sweep stores one value per member there), else from `options`.

    Args:
      options: `config.dsink`: alpha, epsilon, num_iters, backend, sinkhorn_mode, base_loss,
        allocation, potential_learning_rate, alpha_warmup_epochs (alpha ramps linearly from 0
        over these epochs; 0 = off), student_logit_adjustment, class_mass_prior (for f_L's
        batch mass).
      clean_labels: int [N] true training labels, only for the diagnostics "allocation_accuracy"
        (argmax q_i equals the clean label) and "allocation_correction" (the same, among
        mislabelled samples); they never enter the loss.
      steps_per_epoch: for the alpha warm-up.
      class_mass: None for the "batch" mode with f_L's batch mean, else the [C] class mass over
        the training set (required by the "dataset" and "online" allocations).
      class_counts: int [C] given-label counts: the label prior of `base_loss="la"` and of
        `student_logit_adjustment` (tau, ours, 0 = off: the student's logits enter the loss,
        both terms and the allocation cost, as `logits + tau * log prior`).
      la_tau: temperature of the "la" base loss.
      test_prior: [C] an estimated class prior divided out of the test logits (post-hoc
        correction, `logits - log prior`), or None for the raw logits.
      teacher_scales: one factor per teacher of `teacher_logits` (see :func:`logit_scale`);
        default 1.
      student_prior: [C] the prior of `student_logit_adjustment` and of `base_loss="la"`
        (`dsink.student_prior`); None = the given-label prior of `class_counts`.
    """
    allocation = str(options.allocation)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if allocation != "batch" and class_mass is None:
        raise ValueError(f"allocation={allocation!r} needs the training-set class_mass")
    clean = jnp.asarray(clean_labels, jnp.int32)
    num_train = int(clean.shape[0])
    mass = None if class_mass is None else jnp.asarray(class_mass, jnp.float32)
    # f_L's logits shift before the batch class mass (class_mass_prior; the training-set mass
    # arrives already made with it).
    imbalance_shift = jnp.asarray(class_mass_shift(str(options.class_mass_prior), class_counts)
                                  if class_counts is not None else 0.0, jnp.float32)
    warmup_steps = float(options.alpha_warmup_epochs) * steps_per_epoch
    num_iters, backend, base = int(options.num_iters), str(options.backend), str(options.base_loss)
    sinkhorn_mode = str(options.sinkhorn_mode)
    tau = float(options.student_logit_adjustment)
    if (tau or base == "la") and class_counts is None and student_prior is None:
        raise ValueError("student_logit_adjustment and base_loss='la' need class_counts")
    prior = _student_prior(class_counts, student_prior)
    prior = None if prior is None else jnp.asarray(prior, jnp.float32)
    shift = tau * jnp.log(prior) if tau else 0.0
    potential_lr = float(options.potential_learning_rate)

    def fn(logits, labels, *, indices, extra, step, teacher_logits, **unused):
        del unused
        logits = logits + shift
        teacher_logits = tuple(t * s for t, s in zip(
            teacher_logits, tuple(teacher_scales) + (1.0,) * len(teacher_logits)))
        hp = extra.get("hparams", {})
        alpha = hp.get("alpha", float(options.alpha))
        epsilon = hp.get("epsilon", float(options.epsilon))
        if warmup_steps > 0:
            alpha = alpha * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
        diagnostics = {}
        if allocation == "batch":
            noise_logits, imbalance_logits = teacher_logits
            imbalance_logits = imbalance_logits + imbalance_shift
            _, aux = dsink_loss(logits, noise_logits, imbalance_logits, labels, alpha=alpha,
                                epsilon=epsilon, class_mass=mass, num_iters=num_iters,
                                backend=backend, base_loss=base, label_prior=prior,
                                la_tau=la_tau, sinkhorn_mode=sinkhorn_mode)
            diagnostics["marginal_error"] = aux.marginal_error
        else:
            if allocation == "online":
                (noise_logits,) = teacher_logits
                potential = extra["class_potential"]
                q = ot.allocation_from_potential(
                    jax.nn.log_softmax(noise_logits.astype(jnp.float32)),
                    jax.nn.log_softmax(logits.astype(jnp.float32)), potential, epsilon=epsilon)
                extra = {**extra, "class_potential": ot.class_potential_step(
                    potential, q, mass, learning_rate=potential_lr)}
                diagnostics["potential_range"] = jnp.max(potential) - jnp.min(potential)
            else:  # "dataset": solved between epochs (see `dataset_allocation_refresh`)
                q = extra["allocation"][indices]
            aux = distillation_terms(logits, q, labels, alpha=alpha, base_loss=base,
                                     label_prior=prior, la_tau=la_tau)
            # Against the training-set mass: a batch need not match it, the stream does.
            diagnostics["marginal_error"] = jnp.max(jnp.abs(jnp.mean(q, axis=0) - mass))
        q_pred = jnp.argmax(aux.allocation, -1)
        true = clean[indices]
        noisy = (labels != true).astype(jnp.float32)
        hit = (q_pred == true).astype(jnp.float32)
        diagnostics.update({
            "allocation_accuracy": jnp.mean(hit),
            # Among mislabelled samples; a batch may have none, so the loop divides the sums
            # over the epoch (see `dsink_jax.train.loop`: *_numerator / *_denominator).
            "allocation_correction_numerator": jnp.sum(hit * noisy),
            "allocation_correction_denominator": jnp.sum(noisy),
            "allocation_entropy": aux.allocation_entropy,
            "distill_loss": jnp.mean(aux.distill),
        })
        return aux.per_example, extra, diagnostics

    def init_extra():
        if allocation == "online":
            return {"class_potential": np.zeros((len(class_mass),), np.float32)}
        if allocation == "dataset":
            c = len(class_mass)
            return {"allocation": np.full((num_train, c), 1.0 / c, np.float32)}
        return {}

    test_logits = None
    if test_prior is not None:
        test_shift = -jnp.log(jnp.maximum(jnp.asarray(test_prior, jnp.float32), 1e-12))

        def test_logits(outputs, params, extra):
            del params, extra
            return outputs[0] + test_shift
    return Objective("dsink", fn, init_extra, test_logits=test_logits)


def dataset_allocation_refresh(options: Any, *, noise_teacher_logits: np.ndarray,
                               class_mass: np.ndarray, class_counts: np.ndarray | None = None,
                               every_epochs: int, student_prior: np.ndarray | None = None):
    """The between-epochs solve of `allocation="dataset"`, as a loop `refresh_extra` hook.

    Every `every_epochs` epochs (from epoch 0 on) it runs the student over the unaugmented
    training images, solves Sinkhorn over all N samples against `class_mass` with the stored
    f_N log-probabilities, and returns the new `extra["allocation"]` [N, C]. It is a function
    of the state alone, so a resumed run recomputes exactly the same table.

    Args:
      options: `config.dsink` (epsilon, num_iters, backend, sinkhorn_mode,
        student_logit_adjustment).
      noise_teacher_logits: float [N, C] f_N's logits on the unaugmented training images.
      class_mass: [C] f_L's class mass over the training set.
      class_counts: [C] given-label counts (for `student_logit_adjustment`).
      every_epochs: refresh period k.
      student_prior: [C] the prior of `student_logit_adjustment` in place of the given-label
        prior of `class_counts` (`dsink.student_prior`, as in :func:`make_dsink_objective`).

    Returns:
      `refresh(state, epoch, predict_train) -> dict | None` for `dsink_jax.train.loop.train`,
      with `predict_train(state)` the student's logits on the unaugmented training set.
    """
    noise_log_probs = jax.nn.log_softmax(jnp.asarray(noise_teacher_logits, jnp.float32))
    mass = jnp.asarray(class_mass, jnp.float32)
    tau = float(options.student_logit_adjustment)
    shift = 0.0
    if tau:
        prior = _student_prior(class_counts, student_prior)
        if prior is None:
            raise ValueError(f"student_logit_adjustment={tau} needs class_counts (the given-label "
                             "counts); got class_counts=None")
        shift = tau * np.log(prior).astype(np.float32)
    epsilon, num_iters = float(options.epsilon), int(options.num_iters)
    backend, sinkhorn_mode = str(options.backend), str(options.sinkhorn_mode)

    def refresh(state, epoch: int, predict_train):
        if epoch % every_epochs:
            return None
        student = jax.nn.log_softmax(jnp.asarray(predict_train(state)) + shift)
        solved = ot.sinkhorn_allocation(noise_log_probs, student, mass, epsilon=epsilon,
                                        num_iters=num_iters, backend=backend,
                                        mode=sinkhorn_mode)
        return {"allocation": np.asarray(solved.allocation, np.float32)}

    return refresh


# ----------------------------------------------------------------------- OT-dynamic softmax

OT_INFERENCE_MODES = ("raw", "balanced")  # test logits: s cos, or s cos + h(nu uniform)
OT_TRAIN_TARGETS = ("prior", "uniform")  # nu of the heights during training


def make_ot_softmax_objective(options: Any, *, class_counts: np.ndarray) -> Objective:
    """OT-dynamic softmax + SupCon (docs/method.md section 2) as an objective of the one step.

    Each step sees two augmented views; the model is a cosine-head backbone with a projection
    head (`models.ProjectionNet`). The loss per view-example is

        CE(s * cos(W, z) + h, y) + supcon_weight * SupCon(projection, y)

    where the heights `h` (`extra["potential"]`) are not learned: they are the semi-discrete OT
    potential that gives each class cell the mass nu (given-label frequencies, or uniform) under
    the uniform measure on the sphere, re-solved after every `solve_every`-th optimizer step for
    the moved weights (`after_update`, warm-started: the "dynamic" softmax). With
    `inference="balanced"` a second potential for uniform masses
    (`extra["balanced_potential"]`) is kept alongside and added at test time.

    Args:
      options: `config.ot_softmax` (scale, supcon_weight, temperature, projection_dim,
        solve_every, solve_steps, num_samples, solver_learning_rate, entropic_epsilon,
        train_target, inference).
      class_counts: int [C] given-label counts (nu for `train_target="prior"`).
    """
    if options.train_target not in OT_TRAIN_TARGETS:
        raise ValueError(f"train_target={options.train_target!r}; allowed: "
                         f"{', '.join(OT_TRAIN_TARGETS)}")
    if options.inference not in OT_INFERENCE_MODES:
        raise ValueError(f"inference={options.inference!r}; allowed: "
                         f"{', '.join(OT_INFERENCE_MODES)}")
    num_classes = len(class_counts)
    nu = count_prior(class_counts) if options.train_target == "prior" else np.full(
        num_classes, 1.0 / num_classes)
    nu = jnp.asarray(nu, jnp.float32)
    uniform = jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
    scale, weight = float(options.scale), float(options.supcon_weight)
    temperature, balanced = float(options.temperature), options.inference == "balanced"
    solve_every = int(options.solve_every)
    solver = dict(scale=scale, num_samples=int(options.num_samples),
                  num_steps=int(options.solve_steps),
                  learning_rate=float(options.solver_learning_rate),
                  entropic_epsilon=float(options.entropic_epsilon))

    def fn(logits, labels, *, extra, outputs, params, **unused):
        del logits, unused
        _, features, projection = outputs  # both views, view-major: [2B, ...]
        batch_size = labels.shape[0]
        potential = jax.lax.stop_gradient(extra["potential"])
        weights = classifier_weights(params)
        ce = losses.ot_dynamic_softmax_loss(features, weights, jnp.concatenate([labels, labels]),
                                            potential, scale=scale)
        pairs = jnp.stack([projection[:batch_size], projection[batch_size:]], axis=1)
        contrast = losses.supcon_loss(pairs, labels, temperature=temperature)  # batch-major
        contrast_view_major = contrast.reshape(batch_size, 2).T.reshape(-1)
        first_view = losses.ot_dynamic_softmax_logits(features[:batch_size], weights, potential,
                                                      scale=scale)
        aux = {"ce": jnp.mean(ce), "supcon": jnp.mean(contrast),
               "accuracy": jnp.mean(jnp.argmax(first_view, -1) == labels),
               "potential_range": jnp.max(potential) - jnp.min(potential)}
        return ce + weight * contrast_view_major, extra, aux

    def after_update(extra, params, *, step, rng):
        weights = jax.lax.stop_gradient(classifier_weights(params))

        def resolve(extra):
            out = {**extra, "potential": ot.update_potential(extra["potential"], weights, nu,
                                                             rng=rng, **solver)}
            if balanced:
                out["balanced_potential"] = ot.update_potential(
                    extra["balanced_potential"], weights, uniform,
                    rng=jax.random.fold_in(rng, 1), **solver)
            return out
        return jax.lax.cond(step % solve_every == 0, resolve, lambda e: e, extra)

    def test_logits(outputs, params, extra):
        heights = extra["balanced_potential"] if balanced else jnp.zeros_like(extra["potential"])
        return losses.ot_dynamic_softmax_logits(outputs[1], classifier_weights(params), heights,
                                                scale=scale)

    def init_extra():
        return {"potential": np.zeros((num_classes,), np.float32),
                "balanced_potential": np.zeros((num_classes,), np.float32)}

    return Objective("ot_softmax", fn, init_extra, head="cosine", num_views=2,
                     projection_dim=int(options.projection_dim), after_update=after_update,
                     test_logits=test_logits)
