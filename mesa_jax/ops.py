"""Differentiable ops whose forward is exact and whose residuals are packed integers.

Every op takes, besides its operands, the running statistics of each kept
activation, a uint32 ``seed`` for stochastic rounding, and a static ``config``:
``QuantConfig`` keeps int codes, ``None`` keeps the float activation and runs the
*same* custom backward (the exact mode the numerical-gradient tests check).
(``relu`` keeps one bit per element, exactly: no statistics, no seed.)
Every op returns ``(y, stats)``: its output and a tuple of the statistics updated with
the range of each tensor it kept, measured in the same read that packs it (see
quant.pack_and_update); exact mode returns the statistics unchanged.

An op packs what it keeps *before* its custom_vjp (``keep``, in the primal
computation), and hands the residual to it: residuals are data that flow between ops,
and inside ``sharing()`` each activation is kept once (mesa_jax._src.residuals).

Each op reads top to bottom: the op (keeps, then calls its core), its
``*_reference`` (the plain jnp computation, differentiated by JAX: what
``quant=None`` layers run), the custom_vjp core, ``_fwd`` (ties the residual to
the output), ``_bwd`` (the formula on the restored activation), ``defvjp``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mesa_jax import quant
from mesa_jax._src.residuals import (after, fused_kernel as _fused_kernel, kernel_args as _kernel_args, keep,
                                     keep_signs, materialize as _materialize, own, restore, share, sharing)
from mesa_jax.attention import attention
from mesa_jax.quant import Layout, Packed, QuantConfig, Stats, init_stats
from pallas_kernels import arithmetic, fused

__all__ = [
    "linear", "dense", "conv", "gelu", "silu", "relu", "layer_norm", "rms_norm", "batch_norm", "softmax", "bilinear",
    "matmul", "gated", "attention",  # the ops
    "dense_reference", "conv_reference", "gelu_reference", "silu_reference", "relu_reference", "layer_norm_reference",
    "rms_norm_reference", "batch_norm_reference", "batch_moments", "softmax_reference", "matmul_reference",
    "gated_reference", "DotGeneral", "ConvGeneral", "Einsum", "Reshaped", "GeluOf", "AffineOf", "GatedOf",
    "normalized_input", "row_moments", "attention_layout", "kept_output", "sharing", "keep",
    "Stats", "Packed", "QuantConfig", "init_stats",
]

def _f32(x):
    """x in at least float32: bf16 math in float32, float64 stays float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _channels_last(v, ndim):
    """A [C] parameter reshaped to broadcast over the last axis of an ndim tensor."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


# --------------------------------------------------------------------- linear


def linear(x, params, stats, seed, config, fn):
    """``fn(x, params)`` for any ``fn`` affine in x: a dense layer, a convolution, an einsum
    with a kernel. Keeps x packed (channel groups of its last axis); the backward is
    fn's own VJP at the restored x (dx does not depend on x, d params does).

    ``fn`` is static: a hashable map such as ``DotGeneral`` or ``ConvGeneral``.
    """
    kept, stats = keep(x, stats, seed, config)
    return _linear(x, params, kept, fn), (stats,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear(x, params, kept, fn):
    return fn(x, params)


def _linear_fwd(x, params, kept, fn):
    y, (kept,) = _materialize(fn(x, params), kept)
    return y, (kept, params)


def _linear_bwd(fn, residuals, g):
    res, params = residuals
    x, g = restore(res, g)
    dx, dparams = jax.vjp(fn, x, params)[1](g)
    return *_tied_on_gpu(dx, dparams), None


def _tied_on_gpu(dx, dparams):
    """dx leaves with d params: XLA:GPU's scheduler may otherwise put the weight-gradient GEMMs
    off to the end of the backward pass, every layer's restored input and cotangent alive until
    then (gpt2-s, int4 row ranges, cuDNN's forward, batch 536 at 2048: 117.9 GiB planned, 73.6
    tied). Not on XLA:CPU, where the tie changed the gradients' rounding from one program to the
    next (a resumed run then left the uninterrupted one's trajectory)."""
    return lax.platform_dependent(dx, dparams, cpu=lambda *a: a, default=lambda *a: lax.optimization_barrier(a))


_linear.defvjp(own(_linear_fwd), _linear_bwd)


@dataclasses.dataclass(frozen=True)
class DotGeneral:
    """``lax.dot_general(x, kernel, ...)`` as a static map (flax's Dense, DenseGeneral)."""

    dimension_numbers: tuple
    precision: Any = None
    preferred_element_type: Any = None

    def __call__(self, x, kernel):
        return lax.dot_general(x, kernel, self.dimension_numbers, self.precision, self.preferred_element_type)


@dataclasses.dataclass(frozen=True)
class ConvGeneral:
    """``lax.conv_general_dilated(x, kernel, ...)`` as a static map (flax's Conv: any padding,
    dilation, feature groups)."""

    window_strides: tuple
    padding: Any
    lhs_dilation: Any = None
    rhs_dilation: Any = None
    dimension_numbers: Any = None
    feature_group_count: int = 1
    batch_group_count: int = 1
    precision: Any = None
    preferred_element_type: Any = None

    def __call__(self, x, kernel):
        return lax.conv_general_dilated(x, kernel, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class Einsum:
    """``jnp.einsum(spec, a, b, ...)`` as a static map: flax's Einsum (an input and a kernel),
    attention's products (two activations)."""

    spec: str
    precision: Any = None
    preferred_element_type: Any = None

    def __call__(self, a, b):
        return jnp.einsum(self.spec, a, b, precision=self.precision, preferred_element_type=self.preferred_element_type,
                          _dot_general=lax.dot_general)


@dataclasses.dataclass(frozen=True)
class Reshaped:
    """``fn(x.reshape(shape), params)``: lets an op keep x in another view (e.g. the heads of a
    [..., H, D] input merged into [..., H * D] channel groups); the reshape is free."""

    fn: Any
    shape: tuple

    def __call__(self, x, params):
        return self.fn(x.reshape(self.shape), params)


@dataclasses.dataclass(frozen=True)
class _Biased:
    """``fn(x, kernel) + bias`` over the last axis (bias may be None): the public dense and conv."""

    fn: Any

    def __call__(self, x, params):
        kernel, bias = params
        y = self.fn(x, kernel)
        return y if bias is None else y + _channels_last(bias, y.ndim)


def dense(x, kernel, bias, stats, seed, config, precision=None):
    """x @ kernel + bias over the last axis of x (any leading dims); bias may be None."""
    return linear(x, (kernel, bias), stats, seed, config, _Biased(DotGeneral(_last_axis(x.ndim), precision)))


def dense_reference(x, kernel, bias, precision=None):
    """flax.linen.Dense's computation, differentiated by JAX: the baseline."""
    return _Biased(DotGeneral(_last_axis(x.ndim), precision))(x, (kernel, bias))


def _last_axis(ndim: int) -> tuple:
    return (((ndim - 1,), (0,)), ((), ()))


def conv(x, kernel, bias, stats, seed, config, strides: Sequence[int], padding):
    """N-D convolution, channels last (``x: [B, *spatial, C]``, ``kernel: [*window, C, F]``)."""
    return linear(x, (kernel, bias), stats, seed, config, _Biased(_channels_last_conv(x, kernel, strides, padding)))


def conv_reference(x, kernel, bias, strides, padding):
    """The plain channels-last convolution, differentiated by JAX: the baseline."""
    return _Biased(_channels_last_conv(x, kernel, strides, padding))(x, (kernel, bias))


def _channels_last_conv(x, kernel, strides, padding) -> ConvGeneral:
    spatial = x.ndim - 2
    letters = "HWDXYZ"[:spatial] if spatial <= 3 else "".join(chr(ord("a") + i) for i in range(spatial))
    dims = lax.conv_dimension_numbers(x.shape, kernel.shape, ("N" + letters + "C", letters + "IO", "N" + letters + "C"))
    padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
    return ConvGeneral(tuple(strides), padding, dimension_numbers=dims)


# ----------------------------------------------------------------------- gelu


def gelu(x, stats, seed, config, approximate: bool = False):
    """GELU, exact (erf) or with the tanh approximation. Keeps its input; shares its output
    as gelu of that residual (an elementwise recomputation in the next op's backward)."""
    kept, stats = keep(x, stats, seed, config)
    y = _gelu(x, kept, approximate)
    share(y, kept, GeluOf(approximate))
    return y, (stats,)


def gelu_reference(x, approximate: bool = False):
    return jax.nn.gelu(x, approximate=approximate)


@dataclasses.dataclass(frozen=True)
class GeluOf:
    """GELU's output from its restored input: what an op keeping that output restores."""

    approximate: bool

    def __call__(self, x):
        return gelu_reference(x, self.approximate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gelu(x, kept, approximate):
    return gelu_reference(x, approximate)


def _gelu_fwd(x, kept, approximate):
    return _materialize(gelu_reference(x, approximate), kept)


def _gelu_bwd(approximate, res, g):
    (res,) = res
    if _fused_kernel(res):
        dx = fused.gelu_backward(res.words, res.shift, res.scale, g, approximate=approximate, layout=res.layout,
                                 **_kernel_args(res))
        return dx.astype(res.dtype), None
    x, g = restore(res, g)
    return (g * arithmetic.gelu_derivative(_f32(x), approximate)).astype(x.dtype), None


_gelu.defvjp(own(_gelu_fwd), _gelu_bwd)


# ----------------------------------------------------------------------- silu


def silu(x, stats, seed, config):
    """SiLU (swish), x * sigmoid(x). Keeps its input; shares its output as silu of that
    residual (an elementwise recomputation in the next op's backward)."""
    kept, stats = keep(x, stats, seed, config)
    y = _silu(x, kept)
    share(y, kept, silu_reference)
    return y, (stats,)


def silu_reference(x):
    return jax.nn.silu(x)


@jax.custom_vjp
def _silu(x, kept):
    return silu_reference(x)


def _silu_fwd(x, kept):
    return _materialize(silu_reference(x), kept)


def _silu_bwd(res, g):
    (res,) = res
    x, g = restore(res, g)
    return _elementwise_vjp(silu_reference, x, g), None


def _elementwise_vjp(fn, x, g):
    """The VJP of an elementwise ``fn`` at x in >= float32, in x's dtype."""
    return jax.vjp(fn, _f32(x))[1](_f32(g))[0].astype(x.dtype)


_silu.defvjp(own(_silu_fwd), _silu_bwd)


# ----------------------------------------------------------------------- relu


def relu(x, config):
    """ReLU. Keeps one bit per element, whether x > 0: its derivative exactly, an eighth of
    the byte JAX keeps (the next op keeps the output, as it would anyway). No statistics."""
    return _relu(x, keep_signs(x, config)), ()


def relu_reference(x):
    return jax.nn.relu(x)


@jax.custom_vjp
def _relu(x, kept):
    return relu_reference(x)


def _relu_fwd(x, kept):
    return _materialize(relu_reference(x), kept)


def _relu_bwd(res, g):
    (res,) = res
    positive, g = restore(res, g)  # 1 and 0 (x itself in exact mode)
    return jnp.where(positive > 0, g, jnp.zeros_like(g)), None


_relu.defvjp(own(_relu_fwd), _relu_bwd)


# ----------------------------------------------------------------- layer_norm


def layer_norm(x, scale, bias, stats, seed, config, epsilon: float = 1e-6, fast_variance: bool = True, dtype=None):
    """LayerNorm over the last axis; scale/bias ([C]) may be None. Statistics in >= float32;
    the output in ``dtype``, else the inputs' result type (flax's rule).

    Keeps the *normalized* input, packed, and the per-row rstd: every row then has
    unit scale, so one range per group fits all rows (the raw input's rows differ
    by orders of magnitude, e.g. the class token against the patches).
    ``stats`` describe the normalized input (see ``normalized_input``). Shares its
    output as x_hat * scale + bias of that residual (the next Dense keeps nothing).
    """
    return _norm(x, scale, bias, stats, seed, config, _Norm(epsilon, fast_variance, dtype, True))


def rms_norm(x, scale, stats, seed, config, epsilon: float = 1e-6, dtype=None):
    """RMSNorm over the last axis (flax's: LayerNorm without the mean, no bias); scale may be
    None. Keeps x * rstd packed and the per-row rstd, and shares its output, as layer_norm."""
    return _norm(x, scale, None, stats, seed, config, _Norm(epsilon, True, dtype, False))


def layer_norm_reference(x, scale, bias, epsilon=1e-6, fast_variance: bool = True, dtype=None):
    """flax.linen.LayerNorm's arithmetic, step for step, so the forward is bit-identical."""
    return _Norm(epsilon, fast_variance, dtype, True).reference(x, scale, bias)


def rms_norm_reference(x, scale, epsilon=1e-6, dtype=None):
    """flax.linen.RMSNorm's arithmetic (its mean is zero), step for step."""
    return _Norm(epsilon, True, dtype, False).reference(x, scale, None)


def batch_norm(x, scale, bias, stats, seed, config, epsilon: float = 1e-5, fast_variance: bool = True, dtype=None):
    """BatchNorm with the batch's statistics (training): flax's arithmetic over every axis but
    the last (the channels). Keeps the normalized input packed and the per-channel rstd, and
    shares its output, as layer_norm; the running averages are the caller's (``batch_moments``)."""
    return _norm(x, scale, bias, stats, seed, config, _Norm(epsilon, fast_variance, dtype, True, per_channel=True))


def batch_norm_reference(x, scale, bias, epsilon=1e-5, fast_variance: bool = True, dtype=None):
    """flax's BatchNorm with the batch's statistics, step for step."""
    return _Norm(epsilon, fast_variance, dtype, True, per_channel=True).reference(x, scale, bias)


def batch_moments(x, fast_variance: bool = True):
    """BatchNorm's batch mean and variance ([C], in >= float32), as flax computes them: what
    its running averages take in."""
    mean, var = _moments(x, fast_variance, axes=tuple(range(x.ndim - 1)))
    return mean.reshape(-1), var.reshape(-1)


@dataclasses.dataclass(frozen=True)
class _Norm:
    """The static settings of a normalization over the last axis; ``centered``: LayerNorm
    (subtract the mean), else RMSNorm (flax's ``use_mean=False``: the mean is zero);
    ``per_channel``: BatchNorm, over every axis but the last instead."""

    epsilon: float
    fast_variance: bool
    dtype: Any
    centered: bool
    per_channel: bool = False

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The axes the moments are taken over."""
        return tuple(range(ndim - 1)) if self.per_channel else (ndim - 1,)

    def moments(self, x):
        """Mean and rstd over ``axes`` (kept), in >= float32."""
        mean, var = _moments(x, self.fast_variance, self.centered, self.axes(x.ndim))
        return mean, lax.rsqrt(var + self.epsilon)

    def reference(self, x, scale, bias):
        mean, mul = self.moments(x)
        if scale is not None:
            mul = mul * _channels_last(scale, x.ndim)
        y = (_f32(x) - mean) * mul
        if bias is not None:
            y = y + _channels_last(bias, x.ndim)
        return y.astype(self.dtype or jnp.result_type(*(a for a in (x, scale, bias) if a is not None)))


def _norm(x, scale, bias, stats, seed, config, norm: _Norm):
    mean, rstd = norm.moments(x)
    if norm.per_channel:  # the kernels normalize rows: the normalized tensor is packed as it is
        kept, stats = keep(quant.normalize_rows(x, (mean, rstd)), stats, seed, config)
    else:  # a kernel normalizes as it packs
        kept, stats = keep(x, stats, seed, config, normalized_by=(mean, rstd))
    y = _layer_norm(x, scale, bias, kept, lax.stop_gradient(rstd), norm)
    share(y, kept, AffineOf(y.dtype), scale, bias)
    return y, (stats,)


def _moments(x, fast_variance: bool = True, centered: bool = True, axes=(-1,)):
    """Mean and (clipped) variance over ``axes`` (kept), in >= float32, as flax computes them:
    ``E[x^2] - E[x]^2`` (fast) or ``E[(x - E[x])^2]``; not ``centered``: 0 and ``E[x^2]``."""
    xf = _f32(x)
    if not centered:
        var = jnp.mean(lax.square(xf), axis=axes, keepdims=True)
        return jnp.zeros_like(var), var
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    if not fast_variance:
        return mean, jnp.mean(lax.square(xf - mean), axis=axes, keepdims=True)
    mean2 = jnp.mean(lax.square(xf), axis=axes, keepdims=True)
    return mean, jnp.maximum(0.0, mean2 - lax.square(mean))


def row_moments(x, epsilon=1e-6, fast_variance: bool = True, centered: bool = True):
    """Mean (zero if not ``centered``) and rstd ([..., 1]) over the last axis, in >= float32."""
    return _Norm(epsilon, fast_variance, None, centered).moments(x)


def normalized_input(x, epsilon=1e-6, fast_variance: bool = True, centered: bool = True, per_channel: bool = False):
    """What LayerNorm (RMSNorm: not ``centered``; BatchNorm: ``per_channel``, over every axis but
    the last) keeps: (x - mean) * rstd, and rstd, in >= float32."""
    mean, rstd = _Norm(epsilon, fast_variance, None, centered, per_channel).moments(x)
    return quant.normalize_rows(x, (mean, rstd)), rstd


@dataclasses.dataclass(frozen=True)
class AffineOf:
    """LayerNorm's output from its restored normalized input: x_hat * scale + bias, in ``dtype``."""

    dtype: Any

    def __call__(self, x_hat, scale, bias):
        y = _f32(x_hat)
        if scale is not None:
            y = y * _channels_last(scale, y.ndim)
        if bias is not None:
            y = y + _channels_last(bias, y.ndim)
        return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _layer_norm(x, scale, bias, kept, rstd, norm):
    return norm.reference(x, scale, bias)


def _layer_norm_fwd(x, scale, bias, kept, rstd, norm):
    y, (kept,) = _materialize(norm.reference(x, scale, bias), kept)
    x_dtype = jnp.zeros((0,), x.dtype)  # zero bytes: the dtype dx must come back in
    return y, (kept, rstd, scale, bias, x_dtype)


def _layer_norm_bwd(norm, residuals, g):
    res, rstd, scale, bias, x_dtype = residuals
    scale = after(scale, g)
    if _fused_kernel(res) and norm.centered and not norm.per_channel:
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
    axes = norm.axes(gf.ndim)
    mean_gn = jnp.mean(gn, axes, keepdims=True) if norm.centered else 0.0  # RMSNorm: no mean to differentiate
    dx = arithmetic.layer_norm_input_grad(xn, gn, rstd, mean_gn, jnp.mean(gn * xn, axes, keepdims=True))
    return dx.astype(x_dtype.dtype), dscale, dbias, None, None


_layer_norm.defvjp(own(_layer_norm_fwd), _layer_norm_bwd)


# -------------------------------------------------------------------- softmax


def attention_layout(ndim: int) -> Layout:
    """[..., H, N, M] attention tensors (4-D or more) are grouped per head, the rest per channel group."""
    return ndim - 3 if ndim >= 4 else "channels"


def softmax(x, stats, seed, config, layout: Layout | None = None):
    """Softmax over the last axis. Keeps only its output (the backward needs nothing else),
    and shares it: the matmul that takes the probabilities keeps nothing. ``layout``: its
    grouping (default: per head, axis -3, if 4-D)."""
    y = lax.stop_gradient(softmax_reference(x))  # computed once: packed, and the core's output
    kept, stats = keep(y, stats, seed, config, attention_layout(y.ndim) if layout is None else layout)
    y = _softmax(x, y, kept)
    share(y, kept)
    return y, (stats,)


def softmax_reference(x):
    return jax.nn.softmax(x, axis=-1)


def kept_output(x):
    """What softmax keeps, declared before it exists: a tensor shaped like its input ``x`` that
    is never another op's residual (``x`` may be one: a LayerNorm's or GELU's output)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


@jax.custom_vjp
def _softmax(x, y, kept):
    """``y`` (softmax(x)) as a function of x, whose backward reads ``kept``."""
    return y


def _softmax_fwd(x, y, kept):
    return _materialize(y, kept)


def _softmax_bwd(res, g):
    (res,) = res
    if _fused_kernel(res):
        dx = fused.softmax_backward(res.words, res.shift, res.scale, g, layout=res.layout, **_kernel_args(res))
        return dx.astype(res.dtype), None, None
    y, g = restore(res, g)
    yf, gf = _f32(y), _f32(g)
    dx = arithmetic.softmax_input_grad(yf, gf, jnp.sum(gf * yf, axis=-1, keepdims=True))
    return dx.astype(y.dtype), None, None


_softmax.defvjp(own(_softmax_fwd), _softmax_bwd)


# ------------------------------------------------------------------- bilinear


def bilinear(a, b, stats_a, stats_b, seed_a, seed_b, config, fn, layouts=("channels", "channels")):
    """``fn(a, b)`` for ``fn`` linear in each of two activations (a matmul, an attention einsum).
    Keeps both packed, grouped by ``layouts``; the backward is fn's VJP at the restored
    pair. Returns ``(y, (stats_a, stats_b))``.
    """
    kept_a, stats_a = keep(a, stats_a, seed_a, config, layouts[0])
    kept_b, stats_b = keep(b, stats_b, seed_b, config, layouts[1])
    return _bilinear(a, b, kept_a, kept_b, fn), (stats_a, stats_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bilinear(a, b, kept_a, kept_b, fn):
    return fn(a, b)


def _bilinear_fwd(a, b, kept_a, kept_b, fn):
    return _materialize(fn(a, b), kept_a, kept_b)


def _bilinear_bwd(fn, kept, g):
    res_a, res_b = kept
    a, g = restore(res_a, g)
    b, g = restore(res_b, g)
    da, db = jax.vjp(fn, a, b)[1](g)
    return da, db, None, None


_bilinear.defvjp(own(_bilinear_fwd), _bilinear_bwd)


def matmul(a, b, stats_a, stats_b, seed_a, seed_b, config):
    """Batched a @ b (``[..., N, K] @ [..., K, M]``); 4-D operands are grouped per head.

    Returns ``(y, (stats_a, stats_b))``.
    """
    layouts = (attention_layout(a.ndim), attention_layout(b.ndim))
    return bilinear(a, b, stats_a, stats_b, seed_a, seed_b, config, jnp.matmul, layouts)


def matmul_reference(a, b):
    return jnp.matmul(a, b)


# ---------------------------------------------------------------------- gated


def gated(g, u, stats_g, stats_u, seed_g, seed_u, config, act=jax.nn.silu):
    """The gated product ``act(g) * u`` of a GLU MLP (SwiGLU: ``act=jax.nn.silu``; ``act``
    elementwise and hashable). Keeps g and u packed (what autodiff of the product keeps is
    act(g) and u in float); shares its output as act(g) * u of both residuals, so the down
    projection keeps nothing. Returns ``(y, (stats_g, stats_u))``."""
    kept_g, stats_g = keep(g, stats_g, seed_g, config)
    kept_u, stats_u = keep(u, stats_u, seed_u, config)
    y = _gated(g, u, kept_g, kept_u, act)
    leaves, tree = jax.tree.flatten(kept_u)
    share(y, kept_g, GatedOf(act, tree), *leaves)
    return y, (stats_g, stats_u)


def gated_reference(g, u, act=jax.nn.silu):
    return act(g) * u


@dataclasses.dataclass(frozen=True)
class GatedOf:
    """The gated product from its restored gate and the leaves of the up residual (a shared
    output derives from one residual; the second one travels as its arrays): restored only
    after the gate, which itself waits for the cotangent."""

    act: Any
    tree: Any  # the up residual's treedef

    def __call__(self, g, *leaves):
        u, g = restore(jax.tree.unflatten(self.tree, leaves), g)
        return gated_reference(g, u, self.act)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gated(g, u, kept_g, kept_u, act):
    return gated_reference(g, u, act)


def _gated_fwd(g, u, kept_g, kept_u, act):
    return _materialize(gated_reference(g, u, act), kept_g, kept_u)


def _gated_bwd(act, kept, dy):
    res_g, res_u = kept
    g, dy = restore(res_g, dy)
    u, dy = restore(res_u, dy)
    a, act_vjp = jax.vjp(act, _f32(g))
    dyf = _f32(dy)
    return act_vjp(dyf * _f32(u))[0].astype(g.dtype), (dyf * a).astype(u.dtype), None, None


_gated.defvjp(own(_gated_fwd), _gated_bwd)
