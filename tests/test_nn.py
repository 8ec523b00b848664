"""mesa_jax.nn layers: their flax namesakes with int8 residuals, statistics in "mesa", Policy."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mesa_jax.nn as mnn
from mesa_jax import Policy, QuantConfig, memory, quant

from layer_cases import ONE_PER_HANDLER, TWIN_IDS, TWINS, one_per_handler

NEAREST = QuantConfig(stochastic=False)
EXACT_GELU = functools.partial(jax.nn.gelu, approximate=False)

def twin(name, kwargs, **extra):
    return getattr(nn, name)(**kwargs), getattr(mnn, name)(**kwargs, **extra)


def grads(module, variables, x, mutable=()):
    def loss(params, x):
        out = module.apply({**variables, "params": params}, x, mutable=list(mutable) or False)
        out = out[0] if mutable else out
        return jnp.sum(out * jnp.cos(out))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)


# one layer of each handler in each dtype in the default run, every layer under -m slow
FORWARD_CASES = [pytest.param(*twin_case, dtype, id=f"{dtype.__name__}-{twin_case[0]}",
                              marks=[] if twin_case[0] in ONE_PER_HANDLER else [pytest.mark.slow])
                 for dtype in (jnp.float32, jnp.bfloat16) for twin_case in TWINS]


@pytest.mark.parametrize("_, name, kwargs, shape, dtype", FORWARD_CASES)
def test_params_and_forward_are_flax_s(_, name, kwargs, shape, dtype, key):
    flax_layer, mesa_layer = twin(name, {**kwargs, "dtype": dtype})
    x = jax.random.normal(key, shape, dtype)
    flax_vars = flax_layer.init(jax.random.key(1), x)
    mesa_vars = mesa_layer.init(jax.random.key(1), x)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(flax_vars["params"]) == shapes(mesa_vars["params"])
    want = flax_layer.apply(flax_vars, x)
    np.testing.assert_array_equal(mesa_layer.apply({**flax_vars, "mesa": mesa_vars["mesa"]}, x), want)
    np.testing.assert_array_equal(mesa_layer.apply(flax_vars, x), want)  # no statistics: flax's computation
    out, _ = mesa_layer.apply({**flax_vars, "mesa": mesa_vars["mesa"]}, x, mutable=["mesa"])
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("_, name, kwargs, shape", TWINS, ids=TWIN_IDS)
def test_quant_none_is_flax_exactly(_, name, kwargs, shape, key):
    flax_layer, plain = twin(name, kwargs, quant=None)
    x = jax.random.normal(key, shape)
    variables = flax_layer.init(jax.random.key(1), x)
    assert "mesa" not in plain.init(jax.random.key(1), x)
    np.testing.assert_array_equal(plain.apply(variables, x), flax_layer.apply(variables, x))
    for a, b in zip(jax.tree.leaves(grads(plain, variables, x)), jax.tree.leaves(grads(flax_layer, variables, x))):
        np.testing.assert_array_equal(a, b)


def relative_error(got, want):
    a, b = ravel_pytree(got)[0], ravel_pytree(want)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("_, name, kwargs, shape", one_per_handler(TWINS), ids=TWIN_IDS)
def test_gradients_approach_flax_s_with_the_step_and_residuals_are_packed(_, name, kwargs, shape, key):
    """Gradient errors are first order in the quantization step: 4 -> 8 bits divides the step
    by 17 (255 / 15); the error must shrink with it (a factor 2 for the two noise draws).
    Only parameters and packed words may be kept as large floats."""
    x = jax.random.normal(key, shape)
    flax_layer = getattr(nn, name)(**kwargs)
    variables = flax_layer.init(jax.random.key(1), x)
    exact = grads(flax_layer, variables, x)
    errors = {}
    for bits in (8, 4):
        layer = getattr(mnn, name)(**kwargs, quant=QuantConfig(bits=bits))
        mesa_vars = layer.init(jax.random.key(1), x)
        errors[bits] = relative_error(grads(layer, mesa_vars, x, mutable=["mesa"]), exact)
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors
    loss = lambda params: jnp.sum(layer.apply({**mesa_vars, "params": params}, x, mutable=["mesa"])[0])
    size = min(x.size, np.prod(jax.eval_shape(flax_layer.apply, variables, x).shape))
    for r in memory.saved_residuals(loss, mesa_vars["params"]):
        if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= size:
            assert "argument" in r.source, r


def test_gelu_s_default_is_jax_s_tanh_approximation(key):
    x = jax.random.normal(key, (4, 8)) * 3
    variables = mnn.GELU().init(jax.random.key(0), x)
    np.testing.assert_array_equal(mnn.GELU().apply(variables, x), nn.gelu(x))


def test_statistics_update_only_when_mutable(key):
    layer = mnn.GELU()
    x = jax.random.normal(key, (4, 8)) * 3
    variables = layer.init(jax.random.key(0), x)
    assert int(variables["mesa"]["inputs"].count) == 0  # init observes nothing
    out = layer.apply(variables, x)  # evaluation: returns the output only, changes nothing
    np.testing.assert_array_equal(out, jax.nn.gelu(x))
    _, state = layer.apply(variables, x, mutable=["mesa"])
    s = state["mesa"]["inputs"]
    assert int(s.count) == 1 and float(s.lo[0]) == float(x.min())
    _, state = layer.apply(state, x * 2, mutable=["mesa"])
    s2 = state["mesa"]["inputs"]
    np.testing.assert_allclose(s2.lo, 0.9 * s.lo + 0.1 * (2 * x).min(), rtol=1e-6)


def test_params_only_evaluates_exactly_and_trains_by_creating_the_statistics(key):
    layer = mnn.Dense(3)
    x = jax.random.normal(key, (2, 4))
    params = nn.Dense(3).init(key, x)["params"]  # a checkpoint of the plain model
    np.testing.assert_array_equal(layer.apply({"params": params}, x), nn.Dense(3).apply({"params": params}, x))
    assert memory.saved_residuals(lambda p: jnp.sum(layer.apply({"params": p}, x)), params)[0].dtype == jnp.float32
    _, state = layer.apply({"params": params}, x, mutable=["mesa"])  # training from it
    assert int(state["mesa"]["inputs"].count) == 1


def test_group_count_must_divide_channels(key):
    with pytest.raises(ValueError, match=r"num_groups=3.*C=8"):
        mnn.Dense(4, quant=QuantConfig(num_groups=3)).init(key, jnp.ones((2, 8)))


def test_first_step_packs_with_the_batch_statistics(key):
    layer = mnn.GELU(approximate=False, quant=NEAREST)
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
            gelu = mnn.GELU(approximate=False, quant=NEAREST)
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


def test_attention_statistics_are_per_head_and_no_probabilities_are_kept(key):
    attn = mnn.SelfAttention(num_heads=4, quant=QuantConfig(num_groups=2))
    variables = attn.init(key, jnp.ones((2, 5, 16)))
    shapes = jax.tree.map(jnp.shape, variables["mesa"])
    assert shapes["q"].lo == shapes["k"].lo == shapes["v"].lo == (4,)
    assert shapes["query"]["inputs"].lo == shapes["out"]["inputs"].lo == (2,)  # channel groups: num_groups
    assert "probs" not in shapes and "softmax_0" not in shapes  # the flash-style op: Q, K, V only
    per_op = mnn.SelfAttention(num_heads=4, quant=Policy(kinds=("dense", "matmul", "softmax"), attention="per_op"))
    shapes = jax.tree.map(jnp.shape, per_op.init(key, jnp.ones((2, 5, 16)))["mesa"])
    assert shapes["softmax_0"].lo == (4,)  # the op-by-op path, for comparison
    assert "probs" not in shapes  # the probabilities' matmul keeps the softmax's residual


@pytest.mark.parametrize(
    "module, args, match",
    [
        (mnn.MatMul(), [(2, 3, 4), (2, 5, 6)], "MatMul needs"),
        (mnn.Softmax(axis=0), [(2, 3)], "last axis"),
        (mnn.LayerNorm(reduction_axes=(1, 2)), [(2, 3, 4)], NotImplementedError),
        (mnn.LayerNorm(force_float32_reductions=False), [(2, 3, 4)], NotImplementedError),
        (mnn.Dense(3, dot_general=jax.lax.dot_general), [(2, 4)], NotImplementedError),
        (mnn.MultiHeadDotProductAttention(2, attention_fn=lambda q, k, v, **kw: v), [(2, 3, 4)], NotImplementedError),
    ],
)
def test_bad_inputs_and_unsupported_arguments_name_the_problem(module, args, match, key):
    if match is NotImplementedError:
        with pytest.raises(NotImplementedError, match=r"(reduction_axes|force_float32|dot_general|attention_fn).*"
                                                      r"use quant=None"):
            module.init(key, *[jnp.ones(s) for s in args])
        return
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

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return mnn.Dense(8, quant=policy)(mnn.GELU(quant=policy, name="gelu")(mnn.Dense(16, quant=policy)(x)))

    variables = Mlp().init(key, jnp.ones((2, 3, 8)))
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
    layer = mnn.GELU(approximate=False, quant=config)
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


@pytest.mark.parametrize("_, name, kwargs, shape", one_per_handler(TWINS), ids=TWIN_IDS)
def test_an_empty_batch_gives_flax_s_empty_result_in_evaluation_and_training(_, name, kwargs, shape, key):
    flax_layer, mesa_layer = twin(name, kwargs)
    variables = mesa_layer.init(jax.random.key(1), jax.random.normal(key, shape))
    empty = jnp.zeros((0, *shape[1:]))
    want = flax_layer.apply({"params": variables["params"]}, empty)
    assert mesa_layer.apply(variables, empty).shape == want.shape == (0, *want.shape[1:])
    out, state = mesa_layer.apply(variables, empty, mutable=["mesa"])
    assert out.shape == want.shape and all(np.all(np.isfinite(s.lo)) for s in jax.tree.leaves(
        state["mesa"], is_leaf=lambda s: isinstance(s, quant.Stats)) for s in [s])
    grads(mesa_layer, variables, empty, mutable=["mesa"])  # differentiable too
