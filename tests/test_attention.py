"""mesa_jax.attention: the baseline's forward, packed Q/K/V, a blocked backward with no N x N residual."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import mesa_jax.nn as mnn
import mesa_jax
from mesa_jax import QuantConfig, attention, compress, memory, ops, quant

B, T, H, D = 2, 37, 3, 8  # ragged: 37 queries
SEEDS = tuple(jnp.uint32(s) for s in (3, 4, 5))


def qkv(key, dtype=jnp.float32, t=T):
    return tuple(jax.random.normal(k, (B, t, H, D), dtype) for k in jax.random.split(key, 3))


def flax_forward(**kwargs):
    """flax.linen's dot_product_attention without dropout, as compress runs it."""
    return attention.Forward(attention.Baseline.of(nn.dot_product_attention, **kwargs), scale=1.0 / np.sqrt(D))


def jax_forward(is_causal=False, saved_lse=False):
    return attention.Forward(attention.JaxAttention(is_causal=is_causal), is_causal=is_causal, saved_lse=saved_lse)


def op(forward, config, mask=None):
    """The op as a function of (q, k, v, bias), with each tensor's own statistics."""

    def f(q, k, v, bias):
        stats = tuple(quant.stats_of(t, 2, H) for t in (q, k, v)) if config else (None,) * 3
        return attention.packed_attention(q, k, v, bias, mask, stats, SEEDS, config, forward)[0]

    return f


BIASES = {"none": None, "per_query": (1, H, T, T), "shared": (1, H, 1, T)}  # shared by all queries
MASK = jax.random.bernoulli(jax.random.key(6), 0.8, (B, 1, T, T))


@pytest.mark.parametrize("bias", ["per_query", "shared", pytest.param("none", marks=pytest.mark.slow)])  # no bias: in the others
@pytest.mark.parametrize("forward", ["flax", "jax", "jax_causal", "jax_saved_lse"])
def test_forward_is_the_baseline_s_and_the_exact_backward_is_autodiff_s(forward, bias, key):
    q, k, v = qkv(key)
    b = None if BIASES[bias] is None else jax.random.normal(jax.random.key(5), BIASES[bias])
    mask = None if forward == "jax_causal" else MASK
    spec = {"flax": flax_forward(), "jax": jax_forward(), "jax_causal": jax_forward(True),
            "jax_saved_lse": jax_forward(saved_lse=True)}[forward]
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    out, vjp = jax.vjp(op(spec, None, mask), q, k, v, b)
    want_out, want_vjp = jax.vjp(lambda q, k, v, b: spec(q, k, v, b, mask), q, k, v, b)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(jax.jit(op(spec, QuantConfig(), mask))(q, k, v, b),
                                  jax.jit(lambda *a: spec(*a, mask))(q, k, v, b))
    eps = float(jnp.finfo(jnp.float32).eps)
    for got, want in zip(vjp(g), want_vjp(g)):
        if want is not None:  # float32 sums over up to T terms, in another order
            np.testing.assert_allclose(got, want, rtol=0, atol=T * eps * float(jnp.max(jnp.abs(want))))


def test_exact_mode_numerical_gradients_float64(key):
    """flax's forward computes in the inputs' dtype (jax.nn's softmax is always float32)."""
    with jax.enable_x64(True):
        q, k, v = qkv(key, jnp.float64, t=9)
        bias = jax.random.normal(jax.random.key(5), (1, H, 9, 9), jnp.float64)
        check_grads(op(flax_forward(), None), (q, k, v, bias), order=1, modes=["rev"])


@pytest.mark.parametrize("saved_lse", [False, True])
@pytest.mark.parametrize("bias_rows", [T, 1])  # a bias row per query (its gradient stacks), or one shared (it sums)
def test_blocks_give_the_one_block_backward(saved_lse, bias_rows, key):
    q, k, v = qkv(key)
    bias = jax.random.normal(jax.random.key(5), (1, H, bias_rows, T))
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    lse = attention.row_log_sum_exp(q, k, bias, MASK, flax_forward(), block=T) if saved_lse else None
    whole = attention.blocked_backward(q, k, v, bias, MASK, g, flax_forward(), block=T, lse=lse)
    for block in (8, 16, 64):
        lse = attention.row_log_sum_exp(q, k, bias, MASK, flax_forward(), block=block) if saved_lse else None
        for a, b in zip(attention.blocked_backward(q, k, v, bias, MASK, g, flax_forward(), block=block, lse=lse),
                        whole):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("case", ["per_query_bias", "shared_bias_saved_lse", "causal_blocks"])
def test_sequences_padded_to_the_alignment_give_the_unpadded_backward(case, key):
    """37 queries and 37 keys padded to 40 (``align=8``, what 16-bit inputs get): padded keys
    masked out, padded queries without gradient, both cut off: the unpadded gradients."""
    q, k, v = qkv(key)
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    forward, mask, block = flax_forward(), MASK, None
    bias = jax.random.normal(jax.random.key(5), (1, H, T if case == "per_query_bias" else 1, T))
    if case == "causal_blocks":
        forward, mask, bias, block = jax_forward(is_causal=True), None, None, 16
    lse = attention.row_log_sum_exp(q, k, bias, mask, forward) if case == "shared_bias_saved_lse" else None
    want = attention.blocked_backward(q, k, v, bias, mask, g, forward, block=block, lse=lse, align=1)
    got = attention.blocked_backward(q, k, v, bias, mask, g, forward, block=block, lse=lse, align=8)
    for a, b in zip(got, want):
        if b is not None:
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_16_bit_inputs_make_the_maps_at_the_aligned_size(key):
    """XLA:GPU would pad each bfloat16 GEMM operand of 37 rows or columns to 40 as a copy; the
    backward's products take and make 40 instead (float32 inputs, which cuBLAS takes unpadded,
    stay at 37)."""
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))

    def product_sizes(dtype):
        q, k, v = qkv(key, dtype)
        jaxpr = jax.make_jaxpr(lambda *a: attention.blocked_backward(*a, None, MASK, g, flax_forward()))(q, k, v)
        return {n for e in jaxpr.eqns if e.primitive.name == "dot_general"
                for x in (*e.invars, *e.outvars) for n in x.aval.shape}

    assert T not in product_sizes(jnp.bfloat16) and 40 in product_sizes(jnp.bfloat16)
    assert T in product_sizes(jnp.float32) and 40 not in product_sizes(jnp.float32)


def test_the_block_loop_starts_from_the_first_block_not_from_zeros(key):
    """Zeros of dk's or dq's size would be constants XLA:GPU creates for every layer at once at
    the start of the backward pass (all alive together); the loop starts from data instead."""
    q, k, v = qkv(key)
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    jaxpr = jax.make_jaxpr(lambda *a: attention.blocked_backward(*a, None, MASK, g, flax_forward(), block=8))(q, k, v)
    sizes = {math.prod(x.shape) for x in (q, k)}
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
    made = {v: e.primitive.name for e in jaxpr.eqns for v in e.outvars}
    constants = [made.get(v) for v in loop.invars if math.prod(v.aval.shape) in sizes]
    assert constants and "broadcast_in_dim" not in constants, constants


@pytest.mark.parametrize("saved_lse", [False, True])
def test_the_quantized_backward_is_the_exact_one_at_the_dequantized_inputs(saved_lse, key):
    """What the op keeps: q, k, v packed per head, the same codes quant.fake_quantize gives,
    and with ``saved_lse`` the log-sum-exp of the exact logits."""
    config, spec = QuantConfig(), jax_forward(saved_lse=saved_lse)
    q, k, v = qkv(key)
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    _, vjp = jax.vjp(op(spec, config, MASK), q, k, v, None)
    hats = [quant.fake_quantize(t, quant.stats_of(t, 2, H), config, seed, 2) for t, seed in zip((q, k, v), SEEDS)]
    lse = attention.row_log_sum_exp(q, k, None, MASK, spec) if saved_lse else None
    want = attention.blocked_backward(*hats, None, MASK, g, spec, lse=lse)
    for a, b in zip(vjp(g)[:3], want[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_the_public_op_is_jax_s_dot_product_attention(key):
    """``attention(q, k, v, stats, seed, config, ...)``: jax.nn.dot_product_attention's arguments
    and output, statistics for q, k, v updated, one seed for all three."""
    q, k, v = qkv(key)
    stats = tuple(quant.init_stats(H) for _ in range(3))
    out, updated = jax.jit(functools.partial(ops.attention, config=QuantConfig(), mask=MASK, scale=0.3))(
        q, k, v, stats, jnp.uint32(9))
    np.testing.assert_array_equal(out, jax.jit(functools.partial(jax.nn.dot_product_attention, mask=MASK,
                                                                 scale=0.3))(q, k, v))
    for s, t in zip(updated, (q, k, v)):
        np.testing.assert_array_equal(s.lo, jnp.min(t, axis=(0, 1, 3)))
        assert int(s.count) == 1
    with pytest.raises(ValueError, match="groups"):
        ops.attention(q, k, v, (quant.init_stats(2),) * 3, 0, QuantConfig())


def test_the_gradient_error_scales_with_the_step(key):
    q, k, v = qkv(key)
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    exact = ravel_pytree(jax.vjp(op(flax_forward(), None, MASK), q, k, v, None)[1](g)[:3])[0]
    errors = {}
    for bits in (8, 4):
        got = ravel_pytree(jax.vjp(op(flax_forward(), QuantConfig(bits=bits), MASK), q, k, v, None)[1](g)[:3])[0]
        errors[bits] = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


@pytest.mark.parametrize("saved_lse", [False, True])
def test_only_packed_q_k_v_are_kept_no_n_by_n_tensor(saved_lse, key):
    """And with ``saved_lse``, the float32 log-sum-exp of each head's query rows."""
    q, k, v = qkv(key)
    stats = tuple(quant.stats_of(t, 2, H) for t in (q, k, v))
    config = QuantConfig(saved_lse=saved_lse)
    kept = memory.saved_residuals(lambda q, k, v: ops.attention(q, k, v, stats, 3, config, mask=MASK)[0], q, k, v)
    assert sorted(r.shape for r in kept if r.dtype == quant.WORD) == [(B, T, H, D)] * 3  # int8 q, k, v
    floats = [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and r.nbytes > 4 * 2 * H]  # not the ranges
    assert [(r.shape, r.dtype) for r in floats] == ([((B, H, T), jnp.float32)] if saved_lse else []), kept


def test_bfloat16_in_bfloat16_grads_out(key):
    q, k, v = qkv(key, jnp.bfloat16)
    out, vjp = jax.vjp(op(flax_forward(dtype=jnp.bfloat16), QuantConfig()), q, k, v, None)
    grads = vjp(jnp.ones_like(out))[:3]
    assert [d.dtype for d in grads] == [jnp.bfloat16] * 3 and all(jnp.all(jnp.isfinite(d)) for d in grads)


def mhdpa(attention_fn=nn.dot_product_attention, **kwargs):
    return nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * D, attention_fn=attention_fn, **kwargs)


def test_dot_product_attention_layer_is_an_attention_fn_for_stock_mhdpa(key):
    """``attention_fn=mnn.DotProductAttention()``: flax's params tree and forward, statistics of
    q, k, v per head under attention_fn, and gradients whose error shrinks with the step."""
    x = jax.random.normal(key, (B, T, 12))
    plain = mhdpa()
    variables = plain.init(jax.random.key(1), x, x)
    layer = lambda quant: mhdpa(mnn.DotProductAttention(quant=quant))
    mesa_vars = layer(QuantConfig()).init(jax.random.key(1), x, x)
    assert jax.tree.map(jnp.shape, mesa_vars["params"]) == jax.tree.map(jnp.shape, variables["params"])
    assert {name: s.lo.shape for name, s in mesa_vars["mesa"]["attention_fn"].items()} == {n: (H,) for n in "qkv"}
    np.testing.assert_array_equal(jax.jit(layer(QuantConfig()).apply)(mesa_vars, x, x),
                                  jax.jit(plain.apply)(variables, x, x))

    def grads(model, variables):
        loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, x, mutable=["mesa"])[0] ** 2)
        return ravel_pytree(jax.jit(jax.grad(loss))(variables["params"]))[0]

    exact = grads(plain, variables)
    errors = {bits: float(jnp.linalg.norm(grads(layer(QuantConfig(bits=bits)), {**mesa_vars, "params":
                                                                              variables["params"]}) - exact))
              for bits in (8, 4)}
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


def dropout_forward(broadcast):
    """flax.linen's dot_product_attention with attention dropout, as compress runs it."""
    settings = dict(dropout_rate=0.3, broadcast_dropout=broadcast, deterministic=False)
    return attention.Forward(attention.Baseline.of(nn.dot_product_attention, **settings), scale=1.0 / np.sqrt(D),
                             dropout=attention.Dropout(0.3, broadcast))


@pytest.mark.parametrize("broadcast", [True, False])  # one mask for every batch and head, or one each
def test_dropout_s_mask_is_drawn_again_from_the_key_in_the_backward(broadcast, key):
    """With attention dropout the forward is flax's (the same key, the same mask), what is kept
    is packed q, k, v and the key (nothing N x N), and the exact-mode backward, which draws the
    mask again, is autodiff's of flax's function; blocks give the one-block backward."""
    q, k, v = qkv(key)
    rng, spec = jax.random.key(11), dropout_forward(broadcast)
    bias = jax.random.normal(jax.random.key(5), (1, H, T, T))
    g = jax.random.normal(jax.random.key(7), (B, T, H, D))
    fused = lambda config: lambda q, k, v, b: attention.packed_attention(
        q, k, v, b, MASK, tuple(quant.stats_of(t, 2, H) for t in (q, k, v)) if config else (None,) * 3, SEEDS,
        config, spec, rng)[0]
    out, vjp = jax.vjp(fused(None), q, k, v, bias)
    want_out, want_vjp = jax.vjp(lambda q, k, v, b: spec(q, k, v, b, MASK, rng), q, k, v, bias)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(jax.jit(fused(QuantConfig()))(q, k, v, bias),
                                  jax.jit(lambda *a: spec(*a, MASK, rng))(q, k, v, bias))
    eps = float(jnp.finfo(jnp.float32).eps)
    for got, want in zip(vjp(g), want_vjp(g)):
        np.testing.assert_allclose(got, want, rtol=0, atol=T * eps * float(jnp.max(jnp.abs(want))))
    whole = attention.blocked_backward(q, k, v, bias, MASK, g, spec, block=T, rng=rng)
    for a, b in zip(attention.blocked_backward(q, k, v, bias, MASK, g, spec, block=16, rng=rng), whole):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(b))))
    kept = memory.saved_residuals(fused(QuantConfig()), q, k, v, bias)
    made = [r for r in kept if not r.source.startswith(("from the argument", "from a constant"))]  # not MASK
    assert not [r for r in made if r.shape[-2:] == (T, T)]  # nothing N x N: no mask, no probabilities


def test_dot_product_attention_layer_with_dropout_is_the_fused_op(key):
    """MHDPA with attention dropout: flax's forward bit for bit with the same dropout key,
    statistics of q, k, v only (no probabilities kept), gradients whose error shrinks with the step."""
    x = jax.random.normal(key, (B, T, 12))
    rngs = {"dropout": jax.random.key(3)}
    plain = mhdpa(dropout_rate=0.3, deterministic=False)
    variables = plain.init({"params": jax.random.key(1), **rngs}, x, x)
    layer = lambda quant: mhdpa(mnn.DotProductAttention(quant=quant), dropout_rate=0.3, deterministic=False)
    mesa_vars = layer(QuantConfig()).init({"params": jax.random.key(1), **rngs}, x, x)
    assert set(mesa_vars["mesa"]["attention_fn"]) == {"q", "k", "v"}
    np.testing.assert_array_equal(layer(QuantConfig()).apply(mesa_vars, x, x, rngs=rngs),
                                  plain.apply(variables, x, x, rngs=rngs))

    def grads(model, variables):
        loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, x, mutable=["mesa"], rngs=rngs)[0] ** 2)
        return ravel_pytree(jax.jit(jax.grad(loss))(variables["params"]))[0]

    exact = grads(plain, variables)
    errors = {bits: float(jnp.linalg.norm(grads(layer(QuantConfig(bits=bits, stochastic=False)),
                                                 {**mesa_vars, "params": variables["params"]}) - exact))
              for bits in (8, 4)}
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


def test_compress_leaves_a_mesa_attention_fn_its_own_quant(key):
    x = jax.random.normal(key, (B, T, 12))
    model = mhdpa(mnn.DotProductAttention(quant=None))
    mesa = compress(model).init(jax.random.key(1), x, x)["mesa"]
    assert set(mesa) == {"query", "key", "value", "out"}  # the projections only: no "attention_fn"


def test_nnx_multi_head_attention_with_dropout_is_the_fused_op(key):
    """NNX's MultiHeadAttention with attention dropout, compressed in place: its forward with the
    same dropout stream, statistics of q, k, v only, gradients first order in the step."""
    from flax import nnx

    x = jax.random.normal(key, (B, T, 12))
    make = lambda: nnx.MultiHeadAttention(H, 12, dropout_rate=0.3, decode=False, deterministic=False,
                                          rngs=nnx.Rngs(0, dropout=5))
    compressed = lambda config: mesa_jax.compress(make(), config)
    np.testing.assert_array_equal(compressed(QuantConfig())(x), make()(x))
    assert {n for n, v in vars(compressed(QuantConfig())).items() if isinstance(v, mesa_jax.nnx.MesaStat)} == set("qkv")

    def grads(model):
        loss = lambda model: jnp.sum(model(x) ** 2)
        return ravel_pytree(nnx.to_pure_dict(nnx.state(nnx.grad(loss)(model), nnx.Param)))[0]

    exact = grads(make())
    errors = {bits: float(jnp.linalg.norm(grads(compressed(QuantConfig(bits=bits, stochastic=False))) - exact))
              for bits in (8, 4)}
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors
