"""The per-element rules of mesa_jax, written once for the jnp reference and the kernels.

``mesa_jax.quant`` and ``mesa_jax.ops`` apply these to whole tensors, the Pallas
kernels to the lanes of a row; both call the same functions, so a kernel's codes
and gradients cannot drift from the reference's. Everything is float32 jnp,
elementwise (or, for the backward formulas, given the row sums).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

# --------------------------------------------------------------------- groups


def group_axis(shape: tuple[int, ...], layout) -> int | None:
    """The axis whose indices are the groups of a tensor of ``shape``, or None for the
    "channels" layout (contiguous chunks of the last axis).

    Layouts: "channels"; "heads" (a [B, H, N, M] attention tensor: axis 1); or an axis.
    """
    if layout == "channels":
        return None
    if layout == "heads":
        if len(shape) != 4:
            raise ValueError(f"the 'heads' layout needs a [B, H, N, M] tensor, got shape {shape}")
        return 1
    if isinstance(layout, int) and not isinstance(layout, bool) and -len(shape) <= layout < len(shape):
        return layout % len(shape)
    raise ValueError(f"unknown group layout {layout!r} for shape {shape}; use 'channels', 'heads' or an axis")


def grouped_shape(shape: tuple[int, ...], layout, groups: int) -> tuple[int, int, int]:
    """The [outer, G, inner] view of a tensor (a reshape) in which group g is [:, g, :]."""
    axis = group_axis(shape, layout)
    if axis is None:  # [..., C]: contiguous channel chunks
        return math.prod(shape[:-1]), groups, shape[-1] // groups
    return math.prod(shape[:axis]), groups, math.prod(shape[axis + 1 :])


# ---------------------------------------------------------------------- codes


def quantize(x, shift, inv_scale, noise, levels: int):
    """The float code of x: ``floor((x - shift) * inv_scale + noise)`` clamped to
    [0, levels] at both ends (never wrapped around); NaN (a NaN input) gives 0."""
    v = jnp.floor((x - shift) * inv_scale + noise)
    return jnp.where(jnp.isnan(v), 0.0, jnp.clip(v, 0.0, float(levels)))


def dequantize(code, shift, scale):
    """The value a code stands for."""
    return shift + code * scale


def normalize(x, mean, rstd):
    """LayerNorm's normalized input: what it keeps instead of x."""
    return (x - mean) * rstd


def range_or_zero(lo, hi):
    """A group's (min, max) over its finite entries; (0, 0) where it has none (lo > hi)."""
    empty = lo > hi
    return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


# Row ranges are clipped to +-2**126 (values beyond clamp): the top of the grid, shift +
# levels * scale with both rounded outward, then stays below float32's maximum.
ROW_LIMIT = 2.0**126
EPS = 1e-8  # the smallest span a range may have (a constant row still gets a finite grid)


def row_affine(lo, hi, levels: int):
    """A row's (shift, scale) from its finite (min, max): float32 values that bfloat16 holds
    exactly, the shift rounded down and the scale up, so the stored grid still covers
    [lo, hi]; both finite whatever the range."""
    lo, hi = jnp.clip(lo, -ROW_LIMIT, ROW_LIMIT), jnp.clip(hi, -ROW_LIMIT, ROW_LIMIT)
    shift = to_bfloat16_grid(lo, down=True)
    span = jnp.maximum(hi - shift, EPS)
    return shift, to_bfloat16_grid(span * (1.0 / levels), down=False)


def to_bfloat16_grid(v, down: bool):
    """Finite float32 ``v`` rounded toward -inf (``down``) or +inf onto bfloat16's values.

    bfloat16 is float32's top 16 bits: truncating the low ones rounds toward zero, and
    one unit more of the kept magnitude rounds away from it. Integer operations only,
    so a Triton kernel computes it as the reference does.
    """
    bits = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    kept = bits & jnp.uint32(0xFFFF0000)
    negative = (bits >> 31) == 1  # the sign bit: XLA:CPU compares subnormals as zero
    away = (bits != kept) & (negative == down)  # a dropped remainder, and rounding away from zero
    return lax.bitcast_convert_type(jnp.where(away, kept + jnp.uint32(0x10000), kept), jnp.float32)


# ---------------------------------------------------------------------- words


# Codes are packed into bytes: 8-bit codes are a plain uint8 array, the shape of the tensor
# (XLA:GPU then writes them from the fusion that measures the tensor, and reads them back
# through a convert); 4- and 2-bit codes share a byte. uint32 words were measured too: the
# H100 plan of a DeiT-S step moves 4.3 GB more with them (the lanes' OR is a reduction XLA
# fuses with nothing).
WORD = jnp.uint8


def codes_per_word(bits: int) -> int:
    return 8 * jnp.dtype(WORD).itemsize // bits


def words_per_row(length: int, bits: int) -> int:
    """Words (bytes) a row of ``length`` codes takes: rows never share a word."""
    return -(-length // codes_per_word(bits))


def padded_row(length: int, bits: int) -> tuple[int, int]:
    """(words, codes) of a row padded to a power of two of words, as the kernels see it:
    Triton blocks must be powers of two, so every strided lane load stays in bounds."""
    words = 1 << max(words_per_row(length, bits) - 1, 0).bit_length()
    return words, words * codes_per_word(bits)


def lane_shift(bits: int, lane):
    """Bit offset of lane ``lane`` (column ``word * codes_per_word + lane``) in its word."""
    return bits * lane


# ---------------------------------------------------------------- derivatives


def gelu_derivative(x, approximate: bool, erf=lax.erf):
    """d gelu / dx; ``erf`` is replaceable (Triton lowers no erf)."""
    if approximate:
        c = math.sqrt(2 / math.pi)
        t = jnp.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def softmax_input_grad(y, g, row_sum_gy):
    """dx of y = softmax(x) from y, the cotangent g and the row's sum(g * y)."""
    return y * (g - row_sum_gy)


def layer_norm_input_grad(x_hat, gn, rstd, row_mean_gn, row_mean_gn_x_hat):
    """dx of LayerNorm from its normalized input, gn = g * scale and their row means."""
    return rstd * (gn - row_mean_gn - x_hat * row_mean_gn_x_hat)
