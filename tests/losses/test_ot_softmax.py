"""Tests for dsink_jax.losses.ot_softmax and .supcon: hand-built oracles, a loop SupCon, gradients, jit and vmap."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsink_jax.losses.ot_softmax import ot_dynamic_softmax_logits
from dsink_jax.losses.ot_softmax import ot_dynamic_softmax_loss
from dsink_jax.losses.supcon import supcon_loss


def _data(seed=0, batch=4, dim=3, num_classes=5):
    gen = np.random.default_rng(seed)
    features = gen.standard_normal((batch, dim)).astype(np.float32)
    weights = gen.standard_normal((num_classes, dim)).astype(np.float32)
    potential = gen.standard_normal(num_classes).astype(np.float32)
    labels = gen.integers(0, num_classes, batch).astype(np.int32)
    return features, weights, potential, labels


def _numpy_logits(features, weights, potential, scale):
    cos = np.array([[f @ w / (np.linalg.norm(f) * np.linalg.norm(w)) for w in weights]
                    for f in features])
    return scale * cos + potential


def test_logits_are_scaled_cosines_plus_potential():
    features, weights, potential, _ = _data()
    logits = ot_dynamic_softmax_logits(features, weights, potential, scale=7.0)
    np.testing.assert_allclose(logits, _numpy_logits(features, weights, potential, 7.0),
                               rtol=1e-5, atol=1e-5)
    # Hand value: z = (3, 4) and w = (1, 0) have cosine 0.6.
    np.testing.assert_allclose(
        ot_dynamic_softmax_logits(jnp.array([[3.0, 4.0]]), jnp.array([[1.0, 0.0]]),
                                  jnp.array([0.25]), scale=10.0), [[6.25]], rtol=1e-6)


def test_loss_is_cross_entropy_on_the_hand_built_logits():
    features, weights, potential, labels = _data()
    loss = ot_dynamic_softmax_loss(features, weights, labels, potential, scale=5.0)
    logits = _numpy_logits(features, weights, potential, 5.0)
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    chex.assert_shape(loss, (4,))
    np.testing.assert_allclose(loss, -log_softmax[np.arange(4), labels], rtol=1e-5)
    # The potential matters: a large height on the true class drives its loss towards zero.
    boosted = potential.copy()
    boosted[labels[0]] += 50.0
    assert float(ot_dynamic_softmax_loss(features, weights, labels, boosted, scale=5.0)[0]) < 1e-6


def test_loss_gradients_reach_features_and_weights_but_not_the_potential():
    features, weights, potential, labels = _data(1)
    loss = jax.jit(lambda f, w, h: jnp.sum(
        ot_dynamic_softmax_loss(f, w, labels, h, scale=4.0)))
    jax.test_util.check_grads(lambda f, w: loss(f, w, potential), (features, weights), order=1,
                              modes=["rev"], atol=1e-2, rtol=1e-2)
    grad_f, grad_w, grad_h = jax.grad(loss, argnums=(0, 1, 2))(features, weights, potential)
    np.testing.assert_array_equal(grad_h, np.zeros_like(potential))
    assert float(jnp.abs(grad_f).max()) > 1e-3 and float(jnp.abs(grad_w).max()) > 1e-3
    # Scale invariance of the cosine: the feature gradient is orthogonal to the feature.
    np.testing.assert_allclose(jnp.sum(grad_f * features, axis=1), 0.0, atol=1e-5)


def test_loss_jit_and_vmap_match_eager():
    batches = [_data(seed) for seed in range(3)]
    features, weights, potential, labels = (np.stack(parts) for parts in zip(*batches))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(f, w, y, h, scale):
        return ot_dynamic_softmax_loss(f, w, y, h, scale=scale)

    batched = jax.vmap(loss, in_axes=(0, 0, 0, 0, None))(features, weights, labels, potential,
                                                          jnp.float32(3.0))
    for i in range(3):
        eager = ot_dynamic_softmax_loss(features[i], weights[i], labels[i], potential[i], scale=3.0)
        np.testing.assert_allclose(batched[i], eager, rtol=1e-6)
        np.testing.assert_allclose(loss(features[i], weights[i], labels[i], potential[i],
                                        jnp.float32(2.0 + i)),
                                   ot_dynamic_softmax_loss(features[i], weights[i], labels[i],
                                                           potential[i], scale=2.0 + i), rtol=1e-6)


def _supcon_loop(projections, labels, temperature, base_temperature):
    """Khosla et al. (2020), one anchor at a time, as in the paper's equation (2)."""
    batch, views, _ = projections.shape
    z = [(b, v, projections[b, v] / np.linalg.norm(projections[b, v]))
         for b in range(batch) for v in range(views)]
    losses = []
    for i, (b_i, _, z_i) in enumerate(z):
        denominator = sum(np.exp(z_i @ z_a / temperature)
                          for a, (_, _, z_a) in enumerate(z) if a != i)
        terms = [np.log(np.exp(z_i @ z_p / temperature) / denominator)
                 for p, (b_p, _, z_p) in enumerate(z) if p != i and labels[b_p] == labels[b_i]]
        losses.append(-(temperature / base_temperature) * np.mean(terms))
    return np.array(losses)


@pytest.mark.parametrize("views, base_temperature", [(2, None), (3, 0.07)])
def test_supcon_equals_a_direct_loop(views, base_temperature):
    gen = np.random.default_rng(views)
    projections = gen.standard_normal((5, views, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1], np.int32)  # Repeated classes and a singleton class.
    loss = supcon_loss(projections, labels, temperature=0.5, base_temperature=base_temperature)
    expected = _supcon_loop(projections.astype(np.float64), labels, 0.5, base_temperature or 0.5)
    chex.assert_shape(loss, (5 * views,))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_supcon_hand_value_for_two_orthogonal_examples():
    # Two examples, two identical views each, orthogonal across examples. Anchor: its other view
    # (cos 1) is the only positive, the other example's views (cos 0) are negatives:
    # loss = -log(e^(1/T) / (e^(1/T) + 2)).
    projections = jnp.array([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 1.0]]])
    temperature = 0.2
    expected = np.log(np.exp(1 / temperature) + 2) - 1 / temperature
    np.testing.assert_allclose(supcon_loss(projections, jnp.array([0, 1]), temperature=temperature),
                               np.full(4, expected), rtol=0, atol=1e-6)  # Float32 cancellation.


def test_supcon_is_equivariant_to_view_and_batch_order():
    gen = np.random.default_rng(7)
    projections = gen.standard_normal((6, 3, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 0], np.int32)
    loss = np.asarray(supcon_loss(projections, labels)).reshape(6, 3)
    for perm in itertools.permutations(range(3)):
        permuted = np.asarray(supcon_loss(projections[:, perm], labels)).reshape(6, 3)
        np.testing.assert_allclose(permuted, loss[:, perm], rtol=1e-5, atol=1e-6)
    order = gen.permutation(6)
    shuffled = np.asarray(supcon_loss(projections[order], labels[order])).reshape(6, 3)
    np.testing.assert_allclose(shuffled, loss[order], rtol=1e-5, atol=1e-6)


def test_supcon_jit_vmap_and_gradients():
    gen = np.random.default_rng(3)
    projections = gen.standard_normal((2, 4, 2, 3)).astype(np.float32)
    labels = np.array([[0, 1, 0, 1], [2, 2, 0, 1]], np.int32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(p, y, temperature):
        return supcon_loss(p, y, temperature=temperature)

    batched = jax.vmap(loss, in_axes=(0, 0, None))(projections, labels, jnp.float32(0.1))
    for i in range(2):
        np.testing.assert_allclose(batched[i], supcon_loss(projections[i], labels[i]), rtol=1e-5)
        loss(projections[i], labels[i], jnp.float32(0.3))  # New temperature: no retrace.
    jax.test_util.check_grads(lambda p: jnp.sum(loss(p, labels[0], jnp.float32(0.5))),
                              (projections[0],), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: supcon_loss(jnp.ones((4, 1, 3)), jnp.zeros(4, jnp.int32)), ValueError,
         "single view"),
        (lambda: supcon_loss(jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)), ValueError,
         r"projections must have shape \[B, V, p\]"),
        (lambda: supcon_loss(jnp.ones((4, 2, 3)), jnp.zeros(3, jnp.int32)), ValueError,
         r"labels must have shape \[B\] = \(4,\)"),
        (lambda: supcon_loss(jnp.ones((4, 2, 3)), jnp.zeros(4, jnp.int32), temperature=0.0),
         ValueError, "temperature must be > 0"),
        (lambda: supcon_loss(jnp.ones((4, 2, 3)), jnp.zeros(4, jnp.int32),
                             base_temperature=-1.0), ValueError, "base_temperature must be > 0"),
        (lambda: supcon_loss(jnp.ones((4, 2, 3)), jnp.zeros(4)), TypeError, "integer"),
        (lambda: ot_dynamic_softmax_loss(jnp.ones((2, 3)), jnp.ones((5, 3)),
                                         jnp.array([0, 1]), jnp.zeros(5), scale=0.0),
         ValueError, "scale must be > 0"),
        (lambda: ot_dynamic_softmax_loss(jnp.ones((2, 3)), jnp.ones((5, 4)),
                                         jnp.array([0, 1]), jnp.zeros(5), scale=1.0),
         ValueError, "share the feature size d"),
        (lambda: ot_dynamic_softmax_loss(jnp.ones((2, 3)), jnp.ones((5, 3)),
                                         jnp.array([0, 1]), jnp.zeros(4), scale=1.0),
         ValueError, r"potential must have shape \[C\] = \(5,\)"),
        (lambda: ot_dynamic_softmax_loss(jnp.ones((2, 3)), jnp.ones((5, 3)),
                                         jnp.array([0, 1, 2]), jnp.zeros(5), scale=1.0),
         ValueError, r"labels must have shape \[B\] = \(2,\)"),
        (lambda: ot_dynamic_softmax_loss(jnp.ones((2, 3)), jnp.ones((5, 3)),
                                         jnp.array([0, 5]), jnp.zeros(5), scale=1.0),
         ValueError, r"labels must lie in \[0, 4\]"),
        (lambda: ot_dynamic_softmax_logits(jnp.ones((2, 3, 1)), jnp.ones((5, 3)), jnp.zeros(5),
                                           scale=1.0), ValueError, r"features must be \[B, d\]"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()
