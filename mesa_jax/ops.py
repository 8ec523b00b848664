"""Differentiable ops whose forward is exact and whose residuals are packed integers.

Every op takes, besides its operands, the running statistics of each kept
activation, a uint32 ``seed`` for stochastic rounding, and a static ``config``:
``QuantConfig`` keeps int codes, ``None`` keeps the float activation and runs the
*same* custom backward (the exact mode the numerical-gradient tests check).
Every op returns ``(y, stats)``: its output and the statistics updated with the
range of what it kept, measured in the same read that packs it (see
quant.pack_and_update); exact mode returns the statistics unchanged.

Each op reads top to bottom: primal, its ``*_reference`` (the plain jnp
computation, differentiated by JAX: what ``quant=None`` layers run), ``_fwd``
(what is kept), ``_bwd`` (the formula on the restored activation), ``defvjp``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mesa_jax import quant
from mesa_jax.quant import Layout, Packed, QuantConfig, Stats
from pallas_kernels import arithmetic, fused

RESIDUAL_NAME = "mesa_residual"  # checkpoint_name of every kept activation


def keep(x, stats: Stats | None, seed, config: QuantConfig | None, layout: Layout = "channels", normalized_by=None):
    """(what the backward pass keeps of x, the statistics updated with it): packed codes,
    or x itself in exact mode. ``normalized_by``: keep quant.normalize_rows(x, normalized_by)."""
    if config is None:
        return quant.normalize_rows(x, normalized_by), stats
    packed, stats = quant.pack_and_update(x, stats, config, seed, layout, normalized_by)
    return checkpoint_name(packed, RESIDUAL_NAME), stats


def updated(stats: Stats | None, kept, config: QuantConfig | None, layout: Layout = "channels"):
    """The statistics ``keep`` returns, without packing: what a primal (undifferentiated) op returns."""
    return stats if config is None else quant.update(stats, kept, config, layout)


def restore(res, g):
    """The activation a residual stands for, unpacked only once the cotangent exists.

    Without a dependency on ``g`` XLA is free to unpack (and transpose, for a
    matmul) early in the forward pass, keeping float copies alive: exactly the
    memory mesa exists to save. The optimization barrier expresses the
    dependency on GPU; XLA:CPU drops barriers, so the words also get a data
    dependency on the cotangent that changes no value (``_after``).
    """
    if not isinstance(res, Packed):
        return res, g
    res, g = lax.optimization_barrier((res, g))
    return quant.unpack(_after(res, g)), g


def _after(p: Packed, g) -> Packed:
    """``p`` with words that depend on the cotangent ``g`` and equal ``p.words`` bit for bit.

    ``min(w, w | b) == w`` for unsigned integers, whatever ``b`` (here the bits of
    g's first element, 0 if g is empty), and XLA's simplifier does not know it.
    """
    first = g.reshape(-1)[:1]
    bits = lax.bitcast_convert_type(first, jnp.dtype(f"uint{8 * first.dtype.itemsize}")).astype(jnp.uint32)
    bits = jnp.sum(bits, dtype=jnp.uint32)  # a scalar; sharded g: a sum all-reduce (no OR one on CPU)
    return dataclasses.replace(p, words=jnp.minimum(p.words, p.words | bits))


def _fused_kernel(res) -> bool:
    """Whether the backward of a residual runs a fused Pallas kernel (unpack + formula)."""
    return isinstance(res, Packed) and res.implementation != "xla"


def _kernel_args(res: Packed) -> dict:
    return dict(bits=res.bits, interpret=res.implementation == "pallas_interpret")


def _materialize(y, *kept):
    """Tie packed residuals to the forward output, so the codes are written in the forward."""
    if not any(isinstance(k, Packed) for k in kept):
        return y, kept
    return lax.optimization_barrier((y, kept))


def _f32(x):
    """x in at least float32: bf16 math in float32, float64 stays float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _channels_last(v, ndim):
    """A [C] parameter reshaped to broadcast over the last axis of an ndim tensor."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


# ---------------------------------------------------------------------- dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def dense(x, kernel, bias, stats, seed, config, precision=None):
    """x @ kernel + bias over the last axis of x (any leading dims); bias may be None."""
    return dense_reference(x, kernel, bias, precision), updated(stats, x, config)


def dense_reference(x, kernel, bias, precision=None):
    """flax.linen.Dense's computation, differentiated by JAX: the baseline."""
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return y if bias is None else y + _channels_last(bias, y.ndim)


def _dense_fwd(x, kernel, bias, stats, seed, config, precision):
    kept, stats = keep(x, stats, seed, config)
    y, (kept,) = _materialize(dense_reference(x, kernel, bias, precision), kept)
    return (y, stats), (kept, kernel, bias)


def _dense_bwd(config, precision, residuals, cotangents):
    res, kernel, bias = residuals
    g, _ = cotangents
    x, g = restore(res, g)
    batch = tuple(range(g.ndim - 1))
    dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)  # [..., C_in]
    dk = lax.dot_general(x, g, ((batch, batch), ((), ())), precision=precision)  # [C_in, C_out]
    db = None if bias is None else jnp.sum(g, axis=batch).astype(bias.dtype)
    return dx.astype(x.dtype), dk.astype(kernel.dtype), db, None, None


dense.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------- conv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def conv(x, kernel, bias, stats, seed, config, strides: Sequence[int], padding):
    """N-D convolution, channels last (``x: [B, *spatial, C]``, ``kernel: [*window, C, F]``)."""
    return conv_reference(x, kernel, bias, strides, padding), updated(stats, x, config)


def conv_reference(x, kernel, bias, strides, padding):
    """The plain channels-last convolution, differentiated by JAX: the baseline."""
    spatial = x.ndim - 2
    dims = lax.conv_dimension_numbers(x.shape, kernel.shape, _conv_layout(spatial))
    y = lax.conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=dims)
    return y if bias is None else y + _channels_last(bias, y.ndim)


def _conv_layout(spatial: int):
    letters = "HWDXYZ"[:spatial] if spatial <= 3 else "".join(chr(ord("a") + i) for i in range(spatial))
    return ("N" + letters + "C", letters + "IO", "N" + letters + "C")


def _conv_fwd(x, kernel, bias, stats, seed, config, strides, padding):
    kept, stats = keep(x, stats, seed, config)
    y, (kept,) = _materialize(conv_reference(x, kernel, bias, strides, padding), kept)
    return (y, stats), (kept, kernel, bias)


def _conv_bwd(config, strides, padding, residuals, cotangents):
    res, kernel, bias = residuals
    g, _ = cotangents
    x, g = restore(res, g)
    _, vjp = jax.vjp(lambda x, k, b: conv_reference(x, k, b, strides, padding), x, kernel, bias)
    dx, dk, db = vjp(g.astype(x.dtype))
    return dx, dk, db, None, None


conv.defvjp(_conv_fwd, _conv_bwd)


# ----------------------------------------------------------------------- gelu


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gelu(x, stats, seed, config, approximate: bool = False):
    """GELU, exact (erf) or with the tanh approximation."""
    return gelu_reference(x, approximate), updated(stats, x, config)


def gelu_reference(x, approximate: bool = False):
    return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, stats, seed, config, approximate):
    kept, stats = keep(x, stats, seed, config)
    y, res = _materialize(gelu_reference(x, approximate), kept)
    return (y, stats), res


def _gelu_bwd(config, approximate, res, cotangents):
    (res,), (g, _) = res, cotangents
    if _fused_kernel(res):
        dx = fused.gelu_backward(res.words, res.shift, res.scale, g, approximate=approximate, layout=res.layout,
                                 **_kernel_args(res))
        return dx.astype(res.dtype), None, None
    x, g = restore(res, g)
    return (g * arithmetic.gelu_derivative(_f32(x), approximate)).astype(x.dtype), None, None


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ----------------------------------------------------------------- layer_norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def layer_norm(x, scale, bias, stats, seed, config, epsilon: float = 1e-6):
    """LayerNorm over the last axis; scale/bias ([C]) may be None. Statistics in >= float32.

    Keeps the *normalized* input, packed, and the per-row rstd: every row then has
    unit scale, so one range per group fits all rows (the raw input's rows differ
    by orders of magnitude, e.g. the class token against the patches).
    ``stats`` describe the normalized input (see ``normalized_input``).
    """
    return layer_norm_reference(x, scale, bias, epsilon), updated(stats, normalized_input(x, epsilon)[0], config)


def layer_norm_reference(x, scale, bias, epsilon=1e-6):
    """flax.linen.LayerNorm's arithmetic, step for step, so the forward is bit-identical."""
    mean, var = _moments(x)
    mul = lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * _channels_last(scale, x.ndim)
    y = (_f32(x) - mean) * mul
    if bias is not None:
        y = y + _channels_last(bias, x.ndim)
    return y.astype(jnp.result_type(*(a for a in (x, scale, bias) if a is not None)))


def _moments(x):
    """Mean and (fast, clipped) variance over the last axis, in >= float32."""
    xf = _f32(x)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    mean2 = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def row_moments(x, epsilon=1e-6):
    """Mean and rstd ([..., 1]) over the last axis, in >= float32."""
    mean, var = _moments(x)
    return mean, lax.rsqrt(var + epsilon)


def normalized_input(x, epsilon=1e-6):
    """LayerNorm's normalized input (x - mean) * rstd over the last axis, and rstd ([..., 1]), in >= float32."""
    mean, rstd = row_moments(x, epsilon)
    return quant.normalize_rows(x, (mean, rstd)), rstd


def _layer_norm_fwd(x, scale, bias, stats, seed, config, epsilon):
    mean, rstd = row_moments(x, epsilon)
    kept, stats = keep(x, stats, seed, config, normalized_by=(mean, rstd))  # a kernel normalizes as it packs
    y, (kept,) = _materialize(layer_norm_reference(x, scale, bias, epsilon), kept)
    x_dtype = jnp.zeros((0,), x.dtype)  # zero bytes: the dtype dx must come back in
    return (y, stats), (kept, rstd, scale, bias, x_dtype)


def _layer_norm_bwd(config, epsilon, residuals, cotangents):
    res, rstd, scale, bias, x_dtype = residuals
    g, _ = cotangents
    if _fused_kernel(res):
        gamma = jnp.ones(g.shape[-1], jnp.float32) if scale is None else scale
        dx, dscale, dbias = fused.layer_norm_backward(res.words, res.shift, res.scale, rstd, g, gamma,
                                                      **_kernel_args(res))
        dscale = None if scale is None else dscale.astype(scale.dtype)
        return dx.astype(x_dtype.dtype), dscale, None if bias is None else dbias.astype(bias.dtype), None, None
    xn, g = restore(res, g)
    xn, gf = _f32(xn), _f32(g)
    batch = tuple(range(g.ndim - 1))
    dscale = None if scale is None else jnp.sum(gf * xn, axis=batch).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(gf, axis=batch).astype(bias.dtype)
    gn = gf if scale is None else gf * _channels_last(scale, gf.ndim)
    dx = arithmetic.layer_norm_input_grad(xn, gn, rstd, jnp.mean(gn, -1, keepdims=True),
                                          jnp.mean(gn * xn, -1, keepdims=True))
    return dx.astype(x_dtype.dtype), dscale, dbias, None, None


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# -------------------------------------------------------------------- softmax


def attention_layout(ndim: int) -> Layout:
    """[B, H, N, M] tensors are grouped per head; anything else per channel group."""
    return "heads" if ndim == 4 else "channels"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax(x, stats, seed, config):
    """Softmax over the last axis. Keeps only its output: the backward needs nothing else."""
    y = softmax_reference(x)
    return y, updated(stats, y, config, attention_layout(y.ndim))


def softmax_reference(x):
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x, stats, seed, config):
    y = softmax_reference(x)
    kept, stats = keep(y, stats, seed, config, attention_layout(y.ndim))
    y, res = _materialize(y, kept)
    return (y, stats), res


def _softmax_bwd(config, res, cotangents):
    (res,), (g, _) = res, cotangents
    if _fused_kernel(res):
        dx = fused.softmax_backward(res.words, res.shift, res.scale, g, layout=res.layout, **_kernel_args(res))
        return dx.astype(res.dtype), None, None
    y, g = restore(res, g)
    yf, gf = _f32(y), _f32(g)
    dx = arithmetic.softmax_input_grad(yf, gf, jnp.sum(gf * yf, axis=-1, keepdims=True))
    return dx.astype(y.dtype), None, None


softmax.defvjp(_softmax_fwd, _softmax_bwd)


# --------------------------------------------------------------------- matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def matmul(a, b, stats_a, stats_b, seed_a, seed_b, config):
    """Batched a @ b (``[..., N, K] @ [..., K, M]``); 4-D operands are grouped per head.

    Returns ``(y, (stats_a, stats_b))``.
    """
    stats_a = updated(stats_a, a, config, attention_layout(a.ndim))
    stats_b = updated(stats_b, b, config, attention_layout(b.ndim))
    return matmul_reference(a, b), (stats_a, stats_b)


def matmul_reference(a, b):
    return jnp.matmul(a, b)


def _matmul_fwd(a, b, stats_a, stats_b, seed_a, seed_b, config):
    kept_a, stats_a = keep(a, stats_a, seed_a, config, attention_layout(a.ndim))
    kept_b, stats_b = keep(b, stats_b, seed_b, config, attention_layout(b.ndim))
    y, kept = _materialize(matmul_reference(a, b), kept_a, kept_b)
    return (y, (stats_a, stats_b)), kept


def _matmul_bwd(config, kept, cotangents):
    (res_a, res_b), (g, _) = kept, cotangents
    a, g = restore(res_a, g)
    b, g = restore(res_b, g)
    da = jnp.matmul(g, jnp.swapaxes(b, -1, -2))  # [..., N, K]
    db = jnp.matmul(jnp.swapaxes(a, -1, -2), g)  # [..., K, M]
    return da.astype(a.dtype), db.astype(b.dtype), None, None, None, None


matmul.defvjp(_matmul_fwd, _matmul_bwd)
