"""Cached teachers: the table of a frozen teacher's log-probabilities, looked up by index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsink_jax.train import step as step_lib


def _logits(n=16, c=7, seed=0):
    return np.random.default_rng(seed).normal(0, 3, (n, c)).astype(np.float32)


def test_full_table_rows_are_the_teachers_log_probabilities():
    logits = _logits()
    table = step_lib.teacher_table(logits)
    indices = jnp.asarray([3, 0, 15, 3], jnp.int32)
    got = step_lib.CachedTeacher(7).lookup(table, indices)
    np.testing.assert_allclose(got, jax.nn.log_softmax(logits[np.asarray(indices)]), atol=1e-6)
    assert step_lib.teacher_table_bytes(16, 7) == sum(v.nbytes for v in table.values())


@pytest.mark.parametrize("k", [1, 3])
def test_topk_table_keeps_the_k_largest_and_spreads_the_rest(k):
    logits = _logits()
    exact = np.asarray(jax.nn.log_softmax(logits))
    table = step_lib.teacher_table(logits, topk=k)
    assert step_lib.teacher_table_bytes(16, 7, k) == sum(v.nbytes for v in table.values())
    got = np.asarray(step_lib.CachedTeacher(7).lookup(table, jnp.arange(16)))
    top = np.argsort(-exact, axis=-1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(got, top, -1),
                               np.take_along_axis(exact, top, -1), atol=1e-6)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)  # still a distribution
    others = np.ones_like(exact, bool)
    np.put_along_axis(others, top, False, -1)
    rest = got[others].reshape(16, 7 - k)
    np.testing.assert_allclose(rest, rest[:, :1].repeat(7 - k, 1), atol=1e-6)  # evenly
    assert np.all(got.argmax(-1) == exact.argmax(-1))


def test_topk_of_all_but_one_class_is_exact():
    logits = _logits(c=5)
    got = step_lib.CachedTeacher(5).lookup(step_lib.teacher_table(logits, topk=4),
                                           jnp.arange(16))
    np.testing.assert_allclose(got, jax.nn.log_softmax(logits), atol=1e-5)


def test_table_rejects_bad_topk_and_shapes():
    with pytest.raises(ValueError, match=r"topk=7 must be in \[0, C\)"):
        step_lib.teacher_table(_logits(), topk=7)
    with pytest.raises(ValueError, match="expected \\[N, C\\]"):
        step_lib.teacher_table(np.zeros(4, np.float32))


def test_lookup_under_jit_and_vmap_traces_once():
    import chex

    teacher = step_lib.CachedTeacher(7)
    table = jax.tree.map(jnp.asarray, step_lib.teacher_table(_logits(), topk=2))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def look(table, indices):
        return step_lib.teacher_logits(teacher, table, None, indices)

    first = look(table, jnp.asarray([1, 2], jnp.int32))
    again = look(table, jnp.asarray([5, 1], jnp.int32))
    np.testing.assert_allclose(again[1], first[0])
    batched = jax.vmap(lambda i: teacher.lookup(table, i))(jnp.arange(16).reshape(4, 4))
    np.testing.assert_allclose(batched.reshape(16, 7), teacher.lookup(table, jnp.arange(16)))
