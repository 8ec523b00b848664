"""Shared residuals (ops.sharing): an op's output that the next op keeps is kept once, by the
first op's residual (LayerNorm -> Dense, GELU -> Dense, softmax -> matmul)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesa_jax import memory, ops, quant
from mesa_jax.quant import QuantConfig

from op_cases import SEED, SEED_B, stats_of

CONFIG = QuantConfig(num_groups=4)
B, N, C, F = 3, 17, 32, 24
MAX_GELU_SLOPE = 1.1289  # max |d gelu(x) / dx| (erf GELU), at x = sqrt(2)


def chain(kind: str, shared: bool):
    """``kind`` (layer_norm or gelu) followed by a dense layer, inside ``ops.sharing()`` or not."""

    def f(x, kernel, scale, bias):
        with ops.sharing() if shared else contextlib.nullcontext():
            if kind == "layer_norm":
                y, _ = ops.layer_norm(x, scale, bias, stats_of(ops.normalized_input(x)[0], config=CONFIG), SEED, CONFIG)
            else:
                y, _ = ops.gelu(x, stats_of(x, config=CONFIG), SEED, CONFIG)
            return ops.dense(y, kernel, None, stats_of(y, config=CONFIG), SEED_B, CONFIG)[0]

    return f


def inputs(key):
    kx, kk, ks, kb = jax.random.split(key, 4)
    return (jax.random.normal(kx, (B, N, C)) * 2.0, jax.random.normal(kk, (C, F)) / np.sqrt(C),
            1.0 + jax.random.normal(ks, (C,)), jax.random.normal(kb, (C,)))


def grads(f, args, g):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](g))(*args)


def restored_input(kind, x, scale, bias):
    """What the shared dense layer's backward reads: the first op's residual, dequantized, mapped."""
    if kind == "layer_norm":
        x_hat = ops.normalized_input(x)[0]
        deq = quant.fake_quantize(x_hat, stats_of(x_hat, config=CONFIG), CONFIG, SEED, "channels")
        return ops.AffineOf(x.dtype)(deq, scale, bias), x_hat
    deq = quant.fake_quantize(x, stats_of(x, config=CONFIG), CONFIG, SEED, "channels")
    return ops.GeluOf(False)(deq), x


@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_the_shared_backward_reads_the_first_op_s_residual(kind, key):
    args = inputs(key)
    x, kernel, scale, bias = args
    g = jax.random.normal(jax.random.key(7), (B, N, F))
    dx, dkernel, dscale, dbias = grads(chain(kind, True), args, g)
    unshared = grads(chain(kind, False), args, g)
    for got, want in zip((dx, dscale, dbias), (unshared[0], unshared[2], unshared[3])):
        np.testing.assert_array_equal(got, want)  # the first op's own backward is unchanged
    y_r, _ = restored_input(kind, x, scale, bias)
    _, want = jax.vjp(lambda k: ops.dense_reference(y_r, k, None), kernel)
    # float32: the restored input's elementwise math may round differently inside the jitted
    # backward (an ulp of y), and each entry sums B * N products
    eps = float(jnp.finfo(jnp.float32).eps)
    atol = B * N * eps * float(jnp.max(jnp.abs(y_r)) * jnp.max(jnp.abs(g)))
    np.testing.assert_allclose(dkernel, want(g)[0], rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_the_shared_gradient_is_within_the_quantization_bound(kind, key):
    """|y_restored - y| <= slope * step per channel (stochastic rounding: under one step of the
    first op's group; slope |scale| for LayerNorm, max |gelu'| for GELU), so each kernel
    gradient entry is within that times sum_rows |g|."""
    args = inputs(key)
    x, kernel, scale, bias = args
    g = jax.random.normal(jax.random.key(7), (B, N, F))
    dkernel = grads(chain(kind, True), args, g)[1]
    exact = grads(lambda *a: ops.dense_reference(ops.layer_norm_reference(*a[:1], a[2], a[3]) if kind == "layer_norm"
                                                 else ops.gelu_reference(a[0]), a[1], None), args, g)[1]
    _, packed = restored_input(kind, x, scale, bias)
    stats = stats_of(packed, config=CONFIG)
    step = jnp.repeat(stats.span / (2**CONFIG.bits - 1), C // CONFIG.num_groups)  # per channel
    slope = jnp.abs(scale) if kind == "layer_norm" else MAX_GELU_SLOPE
    bound = (slope * step)[:, None] * jnp.sum(jnp.abs(g), axis=(0, 1))[None, :]
    rounding = 1e-5 * jnp.max(jnp.abs(exact))
    assert bool(jnp.all(jnp.abs(dkernel - exact) <= bound + rounding))
    assert float(jnp.max(jnp.abs(dkernel - exact))) > 0  # it is the quantized path


@pytest.mark.parametrize("kind", ["layer_norm", "gelu"])
def test_sharing_keeps_one_packed_copy(kind, key):
    args = inputs(key)

    def words(shared):
        return [r for r in memory.saved_residuals(chain(kind, shared), *args) if r.dtype == quant.WORD]

    assert len(words(False)) == 2 and len(words(True)) == 1
    assert sum(r.nbytes for r in words(True)) == B * N * C  # int8: one byte per element


@pytest.mark.slow  # the op-by-op attention path (the fused op is the default)
def test_softmax_output_is_the_matmul_s_operand(key):
    """The per-op attention path: the probabilities are packed once, by the softmax."""
    s = jax.random.normal(key, (2, 3, 9, 9))
    v = jax.random.normal(jax.random.key(3), (2, 3, 9, 8))

    def f(shared):
        def attend(s, v):
            with ops.sharing() if shared else contextlib.nullcontext():
                p, _ = ops.softmax(s, stats_of(jax.nn.softmax(s), 1, CONFIG), SEED, CONFIG)
                return ops.matmul(p, v, stats_of(p, 1, CONFIG), stats_of(v, 1, CONFIG), SEED_B, SEED, CONFIG)[0]

        return attend

    kept = lambda shared: [r for r in memory.saved_residuals(f(shared), s, v) if r.dtype == quant.WORD]
    assert len(kept(False)) == 3 and len(kept(True)) == 2
    g = jax.random.normal(jax.random.key(4), (2, 3, 9, 8))
    ds, dv = grads(f(True), (s, v), g)
    p_r = quant.fake_quantize(jax.nn.softmax(s), stats_of(jax.nn.softmax(s), 1, CONFIG), CONFIG, SEED, 1)
    np.testing.assert_allclose(dv, jnp.einsum("bhnm,bhnd->bhmd", p_r, g), rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(ds)))
