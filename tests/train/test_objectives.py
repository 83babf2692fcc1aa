"""The D-SINK training objective: allocation modes, alpha warm-up, logit adjustment, diagnostics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsink_jax import ot
from dsink_jax.losses.dsink import distillation_terms, dsink_loss
from dsink_jax.train import objectives

B, C, N = 16, 4, 40


def options(**overrides):
    base = dict(alpha=2.0, epsilon=2.0, num_iters=200, backend="native", sinkhorn_mode="auto",
                base_loss="ce", allocation="batch", potential_learning_rate=0.1,
                alpha_warmup_epochs=0.0, student_logit_adjustment=0.0, class_mass_prior="none")
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def batch(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    logits = 2.0 * jax.random.normal(keys[0], (B, C))
    noise = 2.0 * jax.random.normal(keys[1], (B, C))
    imbalance = 2.0 * jax.random.normal(keys[2], (B, C))
    labels = jax.random.randint(keys[3], (B,), 0, C)
    indices = jnp.arange(B, dtype=jnp.int32) * 2
    return logits, noise, imbalance, labels, indices


CLEAN = np.arange(N) % C
COUNTS = np.array([20, 10, 6, 4])
MASS = np.array([0.4, 0.3, 0.2, 0.1], np.float32)


def make(**overrides):
    return objectives.make_dsink_objective(
        options(**overrides), clean_labels=CLEAN, steps_per_epoch=10,
        class_mass=None if overrides.get("allocation", "batch") == "batch" else MASS,
        class_counts=COUNTS)


def test_batch_mode_equals_dsink_loss_and_reports_diagnostics():
    logits, noise, imbalance, labels, indices = batch(0)
    objective = make()
    per_example, extra, diag = objective(logits, labels, indices=indices, extra={}, step=0,
                                         teacher_logits=(noise, imbalance))
    _, aux = dsink_loss(logits, noise, imbalance, labels, alpha=2.0, num_iters=200)
    np.testing.assert_allclose(per_example, aux.per_example, rtol=1e-6)
    assert extra == {}
    q_pred = np.argmax(np.asarray(aux.allocation), -1)
    true = CLEAN[np.asarray(indices)]
    np.testing.assert_allclose(diag["allocation_accuracy"], np.mean(q_pred == true))
    noisy = np.asarray(labels) != true
    assert float(diag["allocation_correction_denominator"]) == noisy.sum()
    assert float(diag["allocation_correction_numerator"]) == np.sum((q_pred == true) & noisy)


def test_online_mode_uses_the_carried_potential_and_moves_it():
    logits, noise, _, labels, indices = batch(1)
    objective = make(allocation="online", potential_learning_rate=0.3)
    extra = {k: jnp.asarray(v) for k, v in objective.init_extra().items()}
    np.testing.assert_array_equal(extra["class_potential"], np.zeros(C))
    potential = jnp.asarray([0.5, -0.2, 0.1, -0.4])
    per_example, new_extra, diag = objective(
        logits, labels, indices=indices, extra={"class_potential": potential}, step=0,
        teacher_logits=(noise,))
    q = ot.allocation_from_potential(jax.nn.log_softmax(noise), jax.nn.log_softmax(logits),
                                     potential)
    expected = distillation_terms(logits, q, labels, alpha=2.0).per_example
    np.testing.assert_allclose(per_example, expected, rtol=1e-6)
    np.testing.assert_allclose(
        new_extra["class_potential"],
        ot.class_potential_step(potential, q, MASS, learning_rate=0.3), rtol=1e-6)
    np.testing.assert_allclose(diag["marginal_error"],
                               np.max(np.abs(np.mean(q, 0) - MASS)), rtol=1e-5)


def test_dataset_mode_looks_its_targets_up_by_index():
    logits, _, _, labels, indices = batch(2)
    objective = make(allocation="dataset")
    table = jax.nn.softmax(jax.random.normal(jax.random.key(7), (N, C)))
    per_example, extra, _ = objective(logits, labels, indices=indices,
                                      extra={"allocation": table}, step=0, teacher_logits=())
    expected = distillation_terms(logits, table[indices], labels, alpha=2.0).per_example
    np.testing.assert_allclose(per_example, expected, rtol=1e-6)
    assert objective.init_extra()["allocation"].shape == (N, C)


def test_dataset_refresh_solves_over_the_whole_set_on_its_schedule():
    noise_logits = np.asarray(2.0 * jax.random.normal(jax.random.key(4), (N, C)))
    student_logits = np.asarray(2.0 * jax.random.normal(jax.random.key(5), (N, C)))
    calls = []

    def predict_train(state):
        calls.append(state)
        return student_logits

    refresh = objectives.dataset_allocation_refresh(
        options(allocation="dataset"), noise_teacher_logits=noise_logits, class_mass=MASS,
        every_epochs=2)
    assert refresh("state", 1, predict_train) is None and not calls
    new = refresh("state", 2, predict_train)
    assert calls == ["state"]
    expected = ot.sinkhorn_allocation(jax.nn.log_softmax(noise_logits),
                                      jax.nn.log_softmax(student_logits), MASS, num_iters=200).allocation
    np.testing.assert_allclose(new["allocation"], expected, atol=1e-6)
    np.testing.assert_allclose(new["allocation"].mean(0), MASS, atol=1e-4)


def test_sinkhorn_mode_option_reaches_both_solves():
    # f_N's logit -2e4 on class 2 underflows that kernel column: "auto" falls back to the log
    # domain, a forced "kernel" solve returns NaN. Both the per-batch and the dataset solve.
    logits, noise, imbalance, labels, indices = batch(8)
    noise = noise.at[:, 2].set(-2e4)
    for mode, finite in (("auto", True), ("kernel", False)):
        per_example, _, _ = make(sinkhorn_mode=mode)(
            logits, labels, indices=indices, extra={}, step=0, teacher_logits=(noise, imbalance))
        assert bool(np.all(np.isfinite(per_example))) is finite, mode
        refresh = objectives.dataset_allocation_refresh(
            options(allocation="dataset", sinkhorn_mode=mode),
            noise_teacher_logits=np.asarray(noise), class_mass=MASS, every_epochs=1)
        table = refresh("state", 0, lambda state: np.asarray(logits))["allocation"]
        assert bool(np.all(np.isfinite(table))) is finite, mode


def test_class_mass_prior_reweights_f_l_by_the_label_prior_before_the_batch_mass():
    logits, noise, imbalance, labels, indices = batch(7)
    per_example, _, _ = make(class_mass_prior="label_prior")(
        logits, labels, indices=indices, extra={}, step=0, teacher_logits=(noise, imbalance))
    log_prior = jnp.log(COUNTS / COUNTS.sum())
    _, aux = dsink_loss(logits, noise, imbalance + log_prior, labels, alpha=2.0, num_iters=200)
    np.testing.assert_allclose(per_example, aux.per_example, rtol=1e-5)
    mass = jax.nn.softmax(imbalance + log_prior).mean(0)
    np.testing.assert_allclose(aux.class_mass, mass, rtol=1e-5)
    assert not np.allclose(mass, jax.nn.softmax(imbalance).mean(0), atol=1e-2)


def test_base_loss_la_uses_the_given_label_prior():
    logits, noise, imbalance, labels, indices = batch(3)
    per_example, _, _ = make(base_loss="la")(logits, labels, indices=indices, extra={}, step=0,
                                             teacher_logits=(noise, imbalance))
    prior = COUNTS / COUNTS.sum()
    _, aux = dsink_loss(logits, noise, imbalance, labels, alpha=2.0, num_iters=200,
                        base_loss="la", label_prior=prior)
    np.testing.assert_allclose(per_example, aux.per_example, rtol=1e-6)


def test_alpha_warmup_ramps_the_distillation_weight():
    logits, noise, imbalance, labels, indices = batch(4)
    objective = make(alpha_warmup_epochs=2.0)  # 20 steps
    _, aux = dsink_loss(logits, noise, imbalance, labels, alpha=1.0, num_iters=200)
    for step, weight in ((0, 2.0 / 20), (9, 2.0 * 10 / 20), (19, 2.0), (50, 2.0)):
        per_example, _, _ = objective(logits, labels, indices=indices, extra={}, step=step,
                                      teacher_logits=(noise, imbalance))
        np.testing.assert_allclose(per_example, aux.base + weight * aux.distill,
                                   rtol=1e-5)


def test_student_logit_adjustment_shifts_every_term_by_tau_log_prior():
    logits, noise, imbalance, labels, indices = batch(5)
    per_example, _, _ = make(student_logit_adjustment=0.5)(
        logits, labels, indices=indices, extra={}, step=0, teacher_logits=(noise, imbalance))
    shifted = logits + 0.5 * jnp.log(COUNTS / COUNTS.sum())
    _, aux = dsink_loss(shifted, noise, imbalance, labels, alpha=2.0, num_iters=200)
    np.testing.assert_allclose(per_example, aux.per_example, rtol=1e-5)
    unshifted, _, _ = make()(logits, labels, indices=indices, extra={}, step=0,
                             teacher_logits=(noise, imbalance))
    assert not np.allclose(per_example, unshifted)


def test_hparams_in_extra_override_the_options():
    logits, noise, imbalance, labels, indices = batch(6)
    hparams = {"alpha": jnp.float32(0.5), "epsilon": jnp.float32(1.0)}
    per_example, _, _ = make()(logits, labels, indices=indices, extra={"hparams": hparams},
                               step=0, teacher_logits=(noise, imbalance))
    _, aux = dsink_loss(logits, noise, imbalance, labels, alpha=0.5, epsilon=1.0,
                        num_iters=200)
    np.testing.assert_allclose(per_example, aux.per_example, rtol=1e-5)


def test_bad_allocation_options_raise():
    with pytest.raises(ValueError, match="allocation='global'; allowed: batch, dataset, online"):
        objectives.make_dsink_objective(options(allocation="global"), clean_labels=CLEAN,
                                        steps_per_epoch=1, class_counts=COUNTS)
    with pytest.raises(ValueError, match="allocation='online' needs the training-set class_mass"):
        objectives.make_dsink_objective(options(allocation="online"), clean_labels=CLEAN,
                                        steps_per_epoch=1, class_counts=COUNTS)


# ----------------------------------------------------------------------- OT-dynamic softmax

def test_ot_softmax_objective_in_the_one_step_equals_a_hand_written_step():
    """The generic step with the OT objective is the method's step, written out here.

    Reference: two views (keys split(fold_in(rng, step), 3)), CE on s cos(W, z) + h over both,
    SupCon on the projections, one SGD update, then h re-solved for the new weights with the
    third key (and the balanced h with fold_in of it).
    """
    import functools

    import optax

    from dsink_jax import losses, pipelines
    from dsink_jax.models import classifier_weights
    from dsink_jax.train import step as step_lib

    config = pipelines.ot_softmax.build_config(
        dict(pipelines.ot_softmax.ARGS, preset="smoke", inference="balanced"))
    training_set = pipelines.prepare_training_set(config)
    o = config.ot_softmax
    objective = objectives.make_ot_softmax_objective(
        o, class_counts=training_set.noisy_class_counts)
    method = pipelines.build_method(config, training_set, objective=objective)
    state = step_lib.init_state(method, jax.random.PRNGKey(0), training_set.x_train[:1])
    counts = np.maximum(training_set.noisy_class_counts, 1)
    nu = jnp.asarray(counts / counts.sum(), jnp.float32)
    idx = np.arange(32, dtype=np.int32)
    batch = {"images": training_set.x_train[idx], "labels": training_set.noisy_labels[idx],
             "indices": idx}

    def reference_step(state):
        view1, view2, solve = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
        views = jnp.concatenate([method.augment.train(view1, batch["images"]),
                                 method.augment.train(view2, batch["images"])])
        labels = jnp.asarray(batch["labels"])

        def loss_fn(params):  # the smoke MLP has no BatchNorm statistics
            _, features, projection = method.model.apply({"params": params}, views, train=True)
            w = classifier_weights(params)
            ce = losses.ot_dynamic_softmax_loss(features, w, jnp.concatenate([labels, labels]),
                                                state.extra["potential"], scale=o.scale)
            pairs = jnp.stack([projection[:32], projection[32:]], axis=1)
            contrast = losses.supcon_loss(pairs, labels, temperature=o.temperature)
            return jnp.mean(ce) + o.supcon_weight * jnp.mean(contrast)

        grads = jax.grad(loss_fn)(state.params)
        updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        w = classifier_weights(params)
        solve_args = dict(scale=o.scale, num_samples=o.num_samples, num_steps=o.solve_steps,
                          learning_rate=o.solver_learning_rate)
        extra = {"potential": ot.update_potential(state.extra["potential"], w, nu, rng=solve,
                                                  **solve_args),
                 "balanced_potential": ot.update_potential(
                     state.extra["balanced_potential"], w, jnp.full_like(nu, 0.1),
                     rng=jax.random.fold_in(solve, 1), **solve_args)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             extra=extra)

    generic = jax.jit(functools.partial(step_lib.train_step, method=method))
    ours, theirs = state, state
    for _ in range(2):
        ours, metrics = generic(ours, batch)
        theirs = jax.jit(reference_step)(theirs)
    assert not ours.batch_stats
    for a, b in zip(jax.tree.leaves((ours.params, ours.extra)),
                    jax.tree.leaves((theirs.params, theirs.extra))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(ours.extra["potential"]))) > 0  # the heights were re-solved
    for key in ("ce", "supcon", "potential_range", "accuracy"):
        assert np.isfinite(float(metrics[key]))
    # Test time: s cos(W, z) + the balanced heights.
    logits = step_lib.test_logits(ours, batch["images"], method=method)
    _, features, _ = method.model.apply(ours.variables, method.augment.eval(batch["images"]))
    np.testing.assert_allclose(logits, losses.ot_dynamic_softmax_logits(
        features, classifier_weights(ours.params), ours.extra["balanced_potential"],
        scale=o.scale), rtol=1e-6)


def test_teacher_logits_are_scaled_to_their_losses_logits():
    # LDAM's model gives cosines; as a teacher its probabilities are softmax(30 cos).
    logits, noise, imbalance, labels, indices = batch(8)
    cosines = jnp.tanh(imbalance / 4)
    objective = objectives.make_dsink_objective(
        options(), clean_labels=CLEAN, steps_per_epoch=10, class_counts=COUNTS,
        teacher_scales=(1.0, 30.0))
    per_example, _, _ = objective(logits, labels, indices=indices, extra={}, step=0,
                                  teacher_logits=(noise, cosines))
    _, aux = dsink_loss(logits, noise, 30.0 * cosines, labels, alpha=2.0, num_iters=200)
    np.testing.assert_allclose(per_example, aux.per_example, rtol=1e-5)
    config = ml_collections.ConfigDict({"ldam_scale": 30.0})
    assert objectives.logit_scale("ldam_drw", config) == 30.0
    assert objectives.logit_scale("la", config) == 1.0


def test_the_dataset_solve_with_a_student_logit_adjustment_needs_class_counts():
    noise_logits = np.zeros((6, C), np.float32)
    with pytest.raises(ValueError, match="student_logit_adjustment=1.0 needs class_counts"):
        objectives.dataset_allocation_refresh(
            options(allocation="dataset", student_logit_adjustment=1.0),
            noise_teacher_logits=noise_logits, class_mass=MASS, every_epochs=1)


@pytest.mark.parametrize("name,robust", [("gce_la", "generalized_cross_entropy"),
                                         ("sce_la", "symmetric_cross_entropy")])
def test_robust_losses_with_logit_adjustment_shift_the_logits_by_tau_log_prior(name, robust):
    from dsink_jax import configs, losses

    opts = ml_collections.ConfigDict(dict(configs.LOSS_DEFAULTS, la_tau=0.5))
    objective = objectives.make_objective(name, opts, class_counts=COUNTS, num_train=N,
                                          steps_per_epoch=10, epochs=2)
    logits, _, _, labels, indices = batch()
    got, _, _ = objective(logits, labels, indices=indices, extra={}, step=0)
    prior = COUNTS / COUNTS.sum()
    kwargs = ({"q": opts.gce_q} if name == "gce_la" else
              {"alpha": opts.sce_alpha, "beta": opts.sce_beta})
    want = getattr(losses, robust)(logits + 0.5 * jnp.log(prior), labels, **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain, _, _ = objectives.make_objective(name[:-3], opts, class_counts=COUNTS, num_train=N,
                                            steps_per_epoch=10, epochs=2)(
        logits, labels, indices=indices, extra={}, step=0)
    assert not np.allclose(plain, got)  # the adjustment matters
    assert objectives.LOSS_KIND[name] == "noise+imbalance"


def test_select_la_keeps_the_smallest_running_losses_of_each_class_after_its_start():
    from dsink_jax import configs, losses

    opts = ml_collections.ConfigDict(dict(configs.LOSS_DEFAULTS, select_keep=0.5,
                                          select_beta=0.5, select_start_fraction=0.5))
    objective = objectives.make_objective("select_la", opts, class_counts=COUNTS, num_train=N,
                                          steps_per_epoch=10, epochs=2)  # selects from step 10
    extra = objective.init_extra()
    assert extra["select_losses"].shape == (N,) and np.all(extra["select_labels"] == -1)
    logits, logits2, _, labels, indices = batch()
    prior = COUNTS / COUNTS.sum()
    la = losses.logit_adjusted_loss(logits, labels, class_prior=prior, tau=opts.la_tau)
    fn = jax.jit(objective.fn)
    # Before the start: every sample counts, and the memory takes the first visit's loss.
    got, extra1, aux = fn(logits, labels, indices=indices, extra=extra, step=9,
                          teacher_logits=(), outputs=(), params=None)
    np.testing.assert_allclose(got, la, rtol=1e-6)
    assert float(aux["kept_fraction"]) == 1.0
    np.testing.assert_allclose(extra1["select_losses"][indices], la, rtol=1e-6)
    np.testing.assert_array_equal(extra1["select_labels"][indices], labels)
    # From the start: the running loss (half old, half new) against its class's median.
    la2 = losses.logit_adjusted_loss(logits2, labels, class_prior=prior, tau=opts.la_tau)
    got2, extra2, aux2 = fn(logits2, labels, indices=indices, extra=extra1, step=10,
                            teacher_logits=(), outputs=(), params=None)
    running = 0.5 * np.asarray(la) + 0.5 * np.asarray(la2)
    np.testing.assert_allclose(extra2["select_losses"][indices], running, rtol=1e-6)
    kept = np.zeros(B, bool)
    for c in range(C):
        members = np.flatnonzero(np.asarray(labels) == c)
        order = members[np.argsort(running[members])]
        kept[order[:max(int(np.ceil(0.5 * members.size)), 1)]] = True
    np.testing.assert_allclose(float(aux2["kept_fraction"]), kept.mean(), rtol=1e-6)
    np.testing.assert_allclose(got2, np.where(kept, np.asarray(la2) / kept.mean(), 0.0),
                               rtol=1e-5)
    # The gradient reaches only the kept samples.
    grad = jax.grad(lambda z: jnp.mean(objective.fn(z, labels, indices=indices, extra=extra1,
                                                    step=10)[0]))(logits2)
    assert np.all(np.abs(np.asarray(grad))[~kept].sum(-1) == 0)
    assert np.all(np.abs(np.asarray(grad))[kept].sum(-1) > 0)


def test_student_prior_replaces_the_label_prior_in_every_term():
    logits, noise, _, labels, indices = batch(5)
    prior = np.array([0.7, 0.2, 0.06, 0.04], np.float32)
    extra = {"class_potential": jnp.asarray([0.3, -0.1, 0.2, -0.4])}

    def run(**kwargs):
        objective = objectives.make_dsink_objective(
            options(allocation="online", student_logit_adjustment=1.0, base_loss="la"),
            clean_labels=CLEAN, steps_per_epoch=10, class_mass=MASS, class_counts=COUNTS,
            **kwargs)
        return objective(logits, labels, indices=indices, extra=extra, step=0,
                         teacher_logits=(noise,))[0]

    per_example = run(student_prior=prior)
    shifted = logits + jnp.log(prior)
    q = ot.allocation_from_potential(jax.nn.log_softmax(noise), jax.nn.log_softmax(shifted),
                                     extra["class_potential"])
    expected = distillation_terms(shifted, q, labels, alpha=2.0, base_loss="la",
                                  label_prior=jnp.asarray(prior)).per_example
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    # The given-label prior as student_prior is the default; another prior changes the loss.
    np.testing.assert_allclose(run(student_prior=COUNTS / COUNTS.sum()), run(), rtol=1e-6)
    assert not np.allclose(per_example, run())


def test_dataset_refresh_uses_the_student_prior():
    noise_logits = np.asarray(2.0 * jax.random.normal(jax.random.key(4), (N, C)))
    student_logits = np.asarray(2.0 * jax.random.normal(jax.random.key(5), (N, C)))
    prior = np.array([0.7, 0.2, 0.06, 0.04], np.float32)
    refresh = objectives.dataset_allocation_refresh(
        options(allocation="dataset", student_logit_adjustment=0.5),
        noise_teacher_logits=noise_logits, class_mass=MASS, every_epochs=1,
        student_prior=prior)
    new = refresh("state", 0, lambda state: student_logits)
    expected = ot.sinkhorn_allocation(
        jax.nn.log_softmax(noise_logits),
        jax.nn.log_softmax(student_logits + 0.5 * np.log(prior)), MASS,
        num_iters=200).allocation
    np.testing.assert_allclose(new["allocation"], expected, atol=1e-6)
