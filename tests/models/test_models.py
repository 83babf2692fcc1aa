"""Tests of the models: the (logits, features) contract, heads, parameter counts, BatchNorm, width.

The heavy models are built with `jax.eval_shape` only; forward passes use the small ones on 8x8.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsink_jax.models import MODEL_NAMES, count_params, get_model, option_a_shortcut
from dsink_jax.models.resnet import TORCH_DEFAULT_INIT, BasicBlock, PreActBlock
from dsink_jax.models.small import KAIMING_NORMAL

NUM_CLASSES = 5
X8 = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
X32 = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
FEATURE_DIMS = {"mlp": 128, "cnn": 64, "resnet8": 64, "resnet20": 64, "resnet32": 64,
                "preact_resnet18": 512, "resnet50": 2048, "resnext50_32x4d": 2048,
                "resnet50_tiny": 256, "resnext50_tiny": 256}


def _shapes(name, **kwargs):
    """Variables of a model as `jax.ShapeDtypeStruct`s on [2, 32, 32, 3] inputs (no compute)."""
    return jax.eval_shape(get_model(name, **kwargs).init, jax.random.key(0), X32)


def _init(model, x=X8, seed=1, *args):
    """Variables of the shapes `model.init` gives, filled by numpy (He-scaled normal kernels).

    `model.init` is exercised in `test_real_init`; elsewhere it is avoided because every new
    parameter shape costs a compilation of JAX's random sampler (about a second on a loaded CPU).
    """
    shapes = jax.eval_shape(lambda key, x: model.init(key, x, *args), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "bias" and path[-2].key == "head":
            return jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)
        if name in ("mean", "bias"):  # BatchNorm starts as the identity, as at a real init.
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name in ("var", "scale"):
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x, **kwargs):
    # Eager on purpose: op-by-op executables are cached across tests, whereas each jitted conv
    # net costs a whole XLA compilation.
    return model.apply(variables, x, **kwargs)


def test_real_init():
    model = get_model("mlp", num_classes=NUM_CLASSES, head="cosine")
    variables = model.init(jax.random.key(0), X8)
    chex.assert_trees_all_equal_shapes(variables, _init(model))
    logits, _ = model.apply(variables, X8)
    assert np.all(np.isfinite(logits))
    # Conv inits: PyTorch's kaiming_normal_ (fan-in, gain sqrt 2) and default U(+-1/sqrt(fan_in)).
    fan_in = 3 * 3 * 64
    kernel = KAIMING_NORMAL(jax.random.key(1), (3, 3, 64, 64))
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / fan_in), rtol=0.03)
    kernel = TORCH_DEFAULT_INIT(jax.random.key(1), (3, 3, 64, 64))
    assert np.max(np.abs(kernel)) <= 1.0 / np.sqrt(fan_in)
    np.testing.assert_allclose(np.std(kernel), 1.0 / np.sqrt(3.0 * fan_in), rtol=0.03)


@pytest.mark.parametrize("name,head", [("mlp", "linear"), ("mlp", "cosine"), ("mlp", "none"),
                                       ("cnn", "cosine"), ("resnet8", "linear")])
def test_contract_and_heads(name, head):
    model = get_model(name, num_classes=NUM_CLASSES, head=head)
    variables = _init(model)
    logits, features = _apply(model, variables, X8)
    dim = FEATURE_DIMS[name]
    chex.assert_shape(features, (3, dim))
    assert features.dtype == jnp.float32
    params = variables["params"]
    if head == "none":
        assert logits is None
        assert "head" not in params
        return
    chex.assert_shape(logits, (3, NUM_CLASSES))
    assert logits.dtype == jnp.float32
    kernel = params["head"]["kernel"]
    chex.assert_shape(kernel, (dim, NUM_CLASSES))
    if head == "linear":
        expected = features @ kernel + params["head"]["bias"]
    else:
        assert "bias" not in params["head"]
        expected = (features / jnp.linalg.norm(features, axis=1, keepdims=True)) @ (
            kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True))
        assert jnp.all(jnp.abs(logits) <= 1.0 + 1e-6)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("head", ["linear", "cosine", "none"])
def test_every_name_and_head_contract_by_shape(name, head):
    model = get_model(name, num_classes=10, head=head)
    variables = jax.eval_shape(model.init, jax.random.key(0), X32)
    logits, features = jax.eval_shape(model.apply, variables, X32)
    assert (features.shape, features.dtype) == ((2, FEATURE_DIMS[name]), jnp.float32)
    assert ("batch_stats" in variables) == (name != "mlp")
    if head == "none":
        assert logits is None and "head" not in variables["params"]
    else:
        assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32)
        assert variables["params"]["head"]["kernel"].shape == (FEATURE_DIMS[name], 10)
        assert ("bias" in variables["params"]["head"]) == (head == "linear")


def test_resnet_param_counts():
    counts = {name: count_params(_shapes(name, num_classes=10)["params"])
              for name in ("resnet8", "resnet20", "resnet32")}
    # By hand for option A (parameter-free shortcuts), 10 classes: stem 3*9*16 + BN 32; a
    # 16-channel block 2*(16*16*9) + 2 BN * 32; the first 32-channel block 16*32*9 + 32*32*9
    # + 2 BN * 64; ...; head 64*10 + 10.
    stem, head = 3 * 9 * 16 + 32, 64 * 10 + 10
    block16 = 2 * 16 * 16 * 9 + 64
    block32, first32 = 2 * 32 * 32 * 9 + 128, 16 * 32 * 9 + 32 * 32 * 9 + 128
    block64, first64 = 2 * 64 * 64 * 9 + 256, 32 * 64 * 9 + 64 * 64 * 9 + 256
    for name, n in (("resnet8", 1), ("resnet20", 3), ("resnet32", 5)):
        expected = (stem + n * block16 + first32 + (n - 1) * block32 + first64
                    + (n - 1) * block64 + head)
        assert counts[name] == expected, name
    assert counts["resnet32"] == 464_154
    assert 440_000 <= counts["resnet32"] <= 480_000


def test_imagenet_resnets_have_torchvisions_parameter_counts():
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    for name, expected in (("resnet50", 25_557_032), ("resnext50_32x4d", 25_028_904)):
        variables = jax.eval_shape(get_model(name, num_classes=1000).init, jax.random.key(0), x)
        assert count_params(variables["params"]) == expected, name


@pytest.mark.slow(seconds=14)
def test_tiny_imagenet_resnet_trains_a_step_in_bfloat16():
    model = get_model("resnext50_tiny", num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    # Jitted: eager op-by-op dispatch of a ResNeXt-50 (even a tiny one) takes over a minute.
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))

    def loss(params):
        (logits, _), _ = model.apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])
        return logits.sum(), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert logits.dtype == jnp.float32 and logits.shape == (4, NUM_CLASSES)
    # The last BN of each bottleneck starts at zero: a block starts as its shortcut.
    assert float(jnp.abs(variables["params"]["stage1_block0"]["bn3"]["scale"]).max()) == 0.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_preact_resnet18_param_count():
    variables = _shapes("preact_resnet18", num_classes=10)
    n = count_params(variables["params"])
    assert n == 11_171_274
    assert 11_000_000 <= n <= 11_300_000
    # 1x1 shortcuts only where the shape changes (first block of stages 2-4).
    shortcuts = [k for k, v in variables["params"].items()
                 if isinstance(v, dict) and "shortcut" in v]
    assert shortcuts == ["stage2_block0", "stage3_block0", "stage4_block0"]


def test_mlp_param_count():
    variables = _init(get_model("mlp", num_classes=10), X8[..., :1])
    assert count_params(variables["params"]) == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10


def test_width_scales_channels():
    wide = _shapes("resnet8", num_classes=10, width=0.5)
    assert wide["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)
    assert wide["params"]["head"]["kernel"].shape == (32, 10)
    preact = get_model("preact_resnet18", num_classes=10, width=0.25)
    variables = jax.eval_shape(preact.init, jax.random.key(0), X32)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert jax.eval_shape(preact.apply, variables, X32)[1].shape == (2, 128)
    cnn = _shapes("cnn", num_classes=10, width=2.0)
    assert cnn["params"]["head"]["kernel"].shape == (128, 10)
    mlp = _shapes("mlp", num_classes=10, width=0.5)
    assert mlp["params"]["head"]["kernel"].shape == (64, 10)


def test_batch_norm_updates_in_train_mode_only():
    model = get_model("cnn", num_classes=NUM_CLASSES)
    variables = _init(model)
    # Train: statistics move by momentum 0.9 (PyTorch's 0.1) from the init (mean 0, var 1).
    (_, _), state = _apply(model, variables, X8, train=True,
                           mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "conv_0")
    conv_out = state["intermediates"]["conv_0"]["__call__"][0]
    stats = state["batch_stats"]["bn_0"]
    np.testing.assert_allclose(stats["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
    # Eval: running statistics are used and left unchanged.
    (_, features), eval_state = _apply(model, variables, X8, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(eval_state["batch_stats"], variables["batch_stats"])
    # ... so an example's output does not depend on the rest of the batch, unlike in train mode.
    _, alone = _apply(model, variables, X8[:1], train=False)
    np.testing.assert_allclose(alone[0], features[0], rtol=1e-5, atol=1e-6)
    (_, train_alone), _ = _apply(model, variables, X8[:1], train=True, mutable=["batch_stats"])
    (_, train_batch), _ = _apply(model, variables, X8, train=True, mutable=["batch_stats"])
    assert not np.allclose(train_alone[0], train_batch[0], atol=1e-3)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = jnp.arange(1 * 4 * 4 * 2, dtype=jnp.float32).reshape(1, 4, 4, 2)
    out = option_a_shortcut(x, out_channels=4, stride=2)
    chex.assert_shape(out, (1, 2, 2, 4))
    np.testing.assert_array_equal(out[..., 1:3], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(out[..., 0], 0.0)
    np.testing.assert_array_equal(out[..., 3], 0.0)
    with pytest.raises(ValueError, match="out_channels"):
        option_a_shortcut(x, out_channels=1, stride=1)


def _zero_conv2(variables):
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    params["conv2"]["kernel"] = jnp.zeros_like(params["conv2"]["kernel"])
    return {**variables, "params": params}


def test_basic_block_is_residual():
    # With the residual branch's last conv zeroed, the block is relu(x + bn2 bias) = relu(x).
    block = BasicBlock(4, 1)
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 4)).astype(np.float32)
    variables = _zero_conv2(_init(block, x, 0, False))
    np.testing.assert_allclose(_apply(block, variables, x, train=False), jax.nn.relu(x), atol=1e-6)


def test_preact_block_shortcut_takes_preactivated_input():
    # DivideMix: out = conv2(...) + relu(bn1(x)); eval BN with fresh stats is x / sqrt(1 + 1e-5).
    block = PreActBlock(4, 1)
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 4)).astype(np.float32)
    variables = _zero_conv2(_init(block, x, 0, False))
    expected = jax.nn.relu(x / np.sqrt(1 + 1e-5))
    np.testing.assert_allclose(_apply(block, variables, x, train=False), expected, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    x = X8
    f32 = get_model("cnn", num_classes=NUM_CLASSES)
    bf16 = get_model("cnn", num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    variables = _init(f32, x)
    bf16_variables = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(bf16_variables))
    logits16, features16 = _apply(bf16, variables, x)
    assert logits16.dtype == jnp.float32 and features16.dtype == jnp.float32
    logits32, _ = _apply(f32, variables, x)
    np.testing.assert_allclose(logits16, logits32, rtol=0.1, atol=0.1)


def test_jit_equals_eager_and_no_retrace():
    model = get_model("cnn", num_classes=NUM_CLASSES)
    variables = _init(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    (logits, features), _ = forward(variables, X8)
    (eager_logits, eager_features), _ = model.apply(variables, X8, train=True,
                                                    mutable=["batch_stats"])
    np.testing.assert_allclose(logits, eager_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features, eager_features, rtol=1e-5, atol=1e-5)
    forward(variables, X8 + 1.0)  # New values, same shapes: no second trace.


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(name="resnet101", num_classes=10), ValueError, "name must be one of"),
    (dict(name="cnn", num_classes=10, head="arcface"), ValueError, "head must be one of"),
    (dict(name="cnn", num_classes=0), ValueError, "num_classes must be >= 1"),
    (dict(name="cnn", num_classes=2.5), TypeError, "num_classes must be an int"),
    (dict(name="cnn", num_classes=10, width=0.0), ValueError, "width must be a finite number > 0"),
    (dict(name="cnn", num_classes=10, width=float("nan")), ValueError, "width"),
    (dict(name="cnn", num_classes=10, dtype=jnp.int32), ValueError, "dtype must be a floating"),
])
def test_bad_arguments_raise(kwargs, error, match):
    name = kwargs.pop("name")
    with pytest.raises(error, match=match):
        get_model(name, **kwargs)
