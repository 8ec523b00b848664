"""mesa_jax.nn layers: drop-in for flax.linen, statistics in the "mesa" collection, Policy."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mesa_jax.nn as mnn
from mesa_jax import Policy, QuantConfig, ops, quant

NEAREST = QuantConfig(stochastic=False)

FLAX_TWINS = [
    (nn.Dense(6), mnn.Dense(6), (2, 5, 8)),
    (nn.Dense(6, use_bias=False), mnn.Dense(6, use_bias=False), (2, 5, 8)),
    (nn.Conv(4, (2, 2), strides=(2, 2), padding="VALID"), mnn.Conv(4, (2, 2), strides=(2, 2), padding="VALID"), (2, 6, 6, 3)),
    (nn.Conv(4, (3, 3)), mnn.Conv(4, (3, 3)), (2, 6, 6, 3)),
    (nn.LayerNorm(), mnn.LayerNorm(), (2, 5, 8)),
    (nn.LayerNorm(use_scale=False, epsilon=1e-5), mnn.LayerNorm(use_scale=False, epsilon=1e-5), (2, 5, 8)),
]
TWIN_IDS = ["dense", "dense_nobias", "conv_patch", "conv_same", "layer_norm", "layer_norm_noscale"]


def grads(module, variables, x, mutable=()):
    def loss(params, x):
        out = module.apply({**variables, "params": params}, x, mutable=list(mutable) or False)
        out = out[0] if mutable else out
        return jnp.sum(out * jnp.cos(out))

    return jax.grad(loss, argnums=(0, 1))(variables["params"], x)


@pytest.mark.parametrize("flax_layer, mesa_layer, shape", FLAX_TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_and_forward_are_flax_s(flax_layer, mesa_layer, shape, dtype, key):
    x = jax.random.normal(key, shape, dtype)
    flax_vars = flax_layer.init(jax.random.key(1), x)
    mesa_vars = mesa_layer.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, flax_vars["params"]) == jax.tree.map(jnp.shape, mesa_vars["params"])
    np.testing.assert_array_equal(mesa_layer.apply(flax_vars | {"mesa": mesa_vars["mesa"]}, x), flax_layer.apply(flax_vars, x))


@pytest.mark.parametrize("flax_layer, mesa_layer, shape", FLAX_TWINS, ids=TWIN_IDS)
def test_quant_none_is_flax_forward_exactly_gradients_to_the_ulp(flax_layer, mesa_layer, shape, key):
    """Dense and Conv differentiate the same expression; LayerNorm's autodiff may differ by an ulp."""
    x = jax.random.normal(key, shape)
    plain = mesa_layer.clone(quant=None)
    variables = flax_layer.init(jax.random.key(1), x)
    assert "mesa" not in plain.init(jax.random.key(1), x)
    np.testing.assert_array_equal(plain.apply(variables, x), flax_layer.apply(variables, x))
    for a, b in zip(jax.tree.leaves(grads(plain, variables, x)), jax.tree.leaves(grads(flax_layer, variables, x))):
        np.testing.assert_allclose(a, b, rtol=4 * np.finfo(np.float32).eps, atol=4 * np.finfo(np.float32).eps)


def first_step_op(layer, params, x):
    """The op call a mesa layer makes on its first training step (no estimate yet, seed from its path)."""
    config = layer.quant
    seed = quant.layer_seed("inputs", 0)
    if isinstance(layer, mnn.Dense):
        return ops.dense(x, params["kernel"], params.get("bias"), quant.init_stats(1), seed, config)[0]
    if isinstance(layer, mnn.Conv):
        strides = (layer.strides,) * 2 if isinstance(layer.strides, int) else layer.strides
        return ops.conv(x, params["kernel"], params.get("bias"), quant.init_stats(1), seed, config, strides,
                        layer.padding)[0]
    return ops.layer_norm(x, params.get("scale"), params.get("bias"), quant.init_stats(1),
                          quant.layer_seed("normalized", 0), config, layer.epsilon)[0]


@pytest.mark.parametrize("flax_layer, mesa_layer, shape", FLAX_TWINS, ids=TWIN_IDS)
def test_quantized_layer_gradients_are_its_op_s(flax_layer, mesa_layer, shape, key):
    """The layer hands the op its parameters, statistics, seed and config: its gradients are the op's
    (whose distance to the exact gradient test_ops bounds by the quantization step)."""
    x = jax.random.normal(key, shape)
    variables = mesa_layer.init(jax.random.key(1), x)
    got = grads(mesa_layer, variables, x, mutable=["mesa"])

    def loss(params, x):
        out = first_step_op(mesa_layer, params, x)
        return jnp.sum(out * jnp.cos(out))

    want = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_statistics_update_only_when_mutable(key):
    layer = mnn.GELU()
    x = jax.random.normal(key, (4, 8)) * 3
    variables = layer.init(jax.random.key(0), x)
    assert int(variables["mesa"]["inputs"].count) == 0  # init observes nothing
    out = layer.apply(variables, x)  # evaluation: returns the output only, changes nothing
    np.testing.assert_array_equal(out, jax.nn.gelu(x, approximate=False))
    _, state = layer.apply(variables, x, mutable=["mesa"])
    s = state["mesa"]["inputs"]
    assert int(s.count) == 1 and float(s.lo[0]) == float(x.min())
    _, state = layer.apply(state, x * 2, mutable=["mesa"])
    s2 = state["mesa"]["inputs"]
    np.testing.assert_allclose(s2.lo, 0.9 * s.lo + 0.1 * (2 * x).min(), rtol=1e-6)


def test_missing_collection_is_a_clear_error(key):
    layer = mnn.Dense(3)
    x = jnp.ones((2, 4))
    params = layer.init(key, x)["params"]
    with pytest.raises(ValueError, match="has no 'mesa' statistics"):
        layer.apply({"params": params}, x)


def test_group_count_must_divide_channels(key):
    with pytest.raises(ValueError, match=r"num_groups=3.*C=8"):
        mnn.Dense(4, quant=QuantConfig(num_groups=3)).init(key, jnp.ones((2, 8)))


def test_first_step_packs_with_the_batch_statistics(key):
    layer = mnn.GELU(quant=NEAREST)
    x = jax.random.normal(key, (4, 8))
    variables = layer.init(jax.random.key(0), x)
    g = jax.grad(lambda x: jnp.sum(layer.apply(variables, x, mutable=["mesa"])[0]))(x)
    x_hat = quant.fake_quantize(x, quant.stats_of(x, "channels", 1), NEAREST, 0)
    want = jax.grad(lambda t: jnp.sum(jax.nn.gelu(t, approximate=False)))(x_hat)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)  # two derivative formulas, float32


def test_a_layer_called_twice_before_backward_uses_each_call_s_snapshot(key):
    """The second call packs with the statistics the first call updated; both stay exact."""

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, a, b):
            gelu = mnn.GELU(quant=NEAREST)
            return gelu(a) * gelu(b)

    a, b = jax.random.normal(key, (2, 4, 8)) * jnp.array([1.0, 5.0]).reshape(2, 1, 1)
    variables = Twice().init(jax.random.key(0), a, b)
    ga, gb = jax.grad(lambda a, b: jnp.sum(Twice().apply(variables, a, b, mutable=["mesa"])[0]), (0, 1))(a, b)
    first = quant.stats_of(a, "channels", 1)  # call 1: no update yet, a's own range
    second = quant.update(quant.init_stats(1), a, NEAREST)  # call 2: the running estimate after a
    a_hat, b_hat = quant.fake_quantize(a, first, NEAREST, 0), quant.fake_quantize(b, second, NEAREST, 0)
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    dgelu = jax.grad(lambda t: jnp.sum(gelu(t)))
    np.testing.assert_allclose(ga, gelu(b) * dgelu(a_hat), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gb, gelu(a) * dgelu(b_hat), rtol=1e-5, atol=1e-6)


def test_seeds_come_from_the_mesa_rng_when_given(key):
    layer = mnn.GELU()
    x = jax.random.normal(key, (64, 64))
    variables = layer.init(jax.random.key(0), x)

    def grad(**rngs):
        return jax.grad(lambda x: jnp.sum(layer.apply(variables, x, rngs=rngs, mutable=["mesa"])[0]))(x)

    np.testing.assert_array_equal(grad(), grad())  # derived from path and count: deterministic
    np.testing.assert_array_equal(grad(mesa=jax.random.key(3)), grad(mesa=jax.random.key(3)))
    assert not np.array_equal(grad(mesa=jax.random.key(3)), grad(mesa=jax.random.key(4)))
    assert not np.array_equal(grad(), grad(mesa=jax.random.key(3)))


def test_attention_statistics_are_per_head(key):
    attn = mnn.SelfAttention(num_heads=4)
    variables = attn.init(key, jnp.ones((2, 5, 16)))
    shapes = jax.tree.map(jnp.shape, variables["mesa"])
    assert shapes["softmax"]["outputs"].lo == (4,)
    assert shapes["scores"]["a"].lo == shapes["mix"]["b"].lo == (4,)
    assert shapes["qkv"]["inputs"].lo == (1,)  # channel groups: the config's num_groups


@pytest.mark.parametrize(
    "module, args, match",
    [
        (mnn.SelfAttention(num_heads=3), [(2, 5, 16)], "num_heads=3 does not divide the width 16"),
        (mnn.SelfAttention(num_heads=2), [(5, 16)], r"\[batch, tokens, width\]"),
        (mnn.MatMul(), [(2, 3, 4), (2, 5, 6)], "MatMul needs"),
        (mnn.Softmax(axis=0), [(2, 3)], "last axis"),
        (mnn.Conv(4, (3, 3)), [(2, 6, 3)], "Conv with kernel_size"),
    ],
)
def test_bad_inputs_name_the_problem(module, args, match, key):
    with pytest.raises(ValueError, match=match):
        module.init(key, *[jnp.ones(s) for s in args])


def test_policy_resolves_kinds_and_path_overrides():
    policy = Policy(QuantConfig(bits=8), kinds=("dense", "gelu"), overrides={"block_1/*": QuantConfig(bits=4), "head": None})
    assert policy.resolve("dense", "block_0/mlp/fc1").bits == 8
    assert policy.resolve("dense", "block_1/mlp/fc1").bits == 4
    assert policy.resolve("layer_norm", "block_0/ln1") is None
    assert policy.resolve("dense", "head") is None
    hash(policy)  # a static module field


def test_policy_rejects_typos():
    with pytest.raises(ValueError, match=r"unknown layer kind\(s\) \['dens'\]"):
        Policy(kinds=("dens",))
    with pytest.raises(ValueError, match=r"match no layer"):
        Policy(overrides={"blok_*": None}).check_paths(["block_0/attn/qkv"])
    with pytest.raises(TypeError, match="QuantConfig or None"):
        Policy(overrides={"head": 8})


def test_layers_take_a_policy(key):
    policy = Policy(kinds=("gelu",))
    mlp = mnn.Mlp(16, functools.partial(mnn.Dense, quant=policy), functools.partial(mnn.GELU, quant=policy))
    variables = mlp.init(key, jnp.ones((2, 3, 8)))
    assert list(variables["mesa"]) == ["gelu"]


def test_layers_work_under_vmap_and_jit(key):
    """Per-example gradients: each example packs with its own batch statistics."""
    layer = mnn.Dense(4, quant=NEAREST)
    xs = jax.random.normal(key, (3, 5, 8))
    variables = layer.init(jax.random.key(0), xs[0])

    def grad_one(x):
        return jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, x, mutable=["mesa"])[0] ** 2))(
            variables["params"])

    batched = jax.jit(jax.vmap(grad_one))(xs)
    for i in range(3):
        one = grad_one(xs[i])
        np.testing.assert_allclose(batched["kernel"][i], one["kernel"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update_first", [False, True])
def test_later_steps_pack_with_the_running_range_or_mesa_s_updated_one(update_first, key):
    config = dataclasses.replace(NEAREST, update_first=update_first)
    layer = mnn.GELU(quant=config)
    a, b = jax.random.normal(key, (2, 4, 8)) * jnp.array([1.0, 3.0]).reshape(2, 1, 1)
    variables = layer.init(jax.random.key(0), a)
    _, state = layer.apply(variables, a, mutable=["mesa"])  # step 1 sets the range to a's
    g = jax.grad(lambda x: jnp.sum(layer.apply(state, x, mutable=["mesa"])[0]))(b)
    running = state["mesa"]["inputs"]
    packed_with = quant.update(running, b, config) if update_first else running
    dgelu = jax.grad(lambda t: jnp.sum(jax.nn.gelu(t, approximate=False)))
    np.testing.assert_allclose(g, dgelu(quant.fake_quantize(b, packed_with, NEAREST, 0)), rtol=1e-5, atol=1e-6)
    _, after = layer.apply(state, b, mutable=["mesa"])
    np.testing.assert_allclose(after["mesa"]["inputs"].span, quant.update(running, b, config).span, rtol=1e-6)
