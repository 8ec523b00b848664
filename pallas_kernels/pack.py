"""Pack / unpack kernels: one row of a [R, C] view per program, codes into words (bytes).

Per-group parameters reach a row as a per-row pair (heads: the row's head) and a
per-column pair (channel groups: the column's group); the unused one of each pair
is the identity (shift 0, scale 1), so with the rules of pallas_kernels.arithmetic
and the hash of pallas_kernels.hashing a kernel produces exactly the reference's
codes (mesa_jax.quant) for the same seed.

The pack kernel also emits each row's finite min and max per column group, from
the same read: reduced over rows by the caller, they are the tensor's per-group
range, so the running estimate needs no second pass.

Row ranges (QuantConfig(ranges="row")): the row pack kernel measures each of its
row's column groups first and packs with that range from the row it holds on chip,
still one read of HBM; every kernel that dequantizes reads a row's parameters as
one (shift, scale) pair per column group, the single pair of running ranges being
the case of one group.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import arithmetic
from pallas_kernels.hashing import uniform

TRITON = plgpu.CompilerParams(num_warps=4, num_stages=1)  # not Mosaic GPU: these are Triton kernels


def _row_lanes(x_ref, moments, per_word: int, words: int):
    """(lane slice, columns, float32 values) of each of a row's lanes; ``moments`` = (mean,
    rstd) normalizes them, as LayerNorm's residual is packed."""
    for lane in range(per_word):
        lanes = pl.ds(lane, words, stride=per_word)
        x = x_ref[lanes].astype(jnp.float32)
        yield lanes, jnp.arange(words, dtype=jnp.uint32) * per_word + lane, (
            x if moments is None else arithmetic.normalize(x, *moments))


def _fold_row_range(lo, hi, x, col, length: int, col_groups: int):
    """The running [slots] finite min and max of a row's column groups, with one lane more."""
    group_of = jnp.arange(lo.shape[0], dtype=jnp.uint32)[:, None]
    counted = (col < length) & (jnp.abs(x) < jnp.inf)  # finite entries of the row only
    in_group = counted[None, :] & (col[None, :] // (length // col_groups) == group_of)
    return (jnp.minimum(lo, jnp.min(jnp.where(in_group, x[None, :], jnp.inf), axis=1)),
            jnp.maximum(hi, jnp.max(jnp.where(in_group, x[None, :], -jnp.inf), axis=1)))


def _code_bits(code, col, length: int, bits: int, lane: int):
    """A lane's codes at their place in the row's words (0 past the row's end)."""
    return jnp.where(col < length, code.astype(jnp.uint32), 0) << arithmetic.lane_shift(bits, lane)


def _pack_kernel(x_ref, col_shift_ref, col_inv_ref, row_ref, base_ref, seed_ref, words_ref, lo_ref, hi_ref, *,
                 bits, length, stochastic, col_groups, normalize):
    """Codes of one row, and the row's finite min and max per column group, from one read."""
    per_word, words = arithmetic.codes_per_word(bits), words_ref.shape[0]
    row_shift, row_inv, row_base = row_ref[0], row_ref[1], base_ref[0]  # base: the row's flat index
    acc = jnp.zeros((words,), jnp.uint32)
    lo = jnp.full(lo_ref.shape, jnp.inf, jnp.float32)
    hi = jnp.full(hi_ref.shape, -jnp.inf, jnp.float32)
    moments = (row_ref[2], row_ref[3]) if normalize else None
    for lane, (lanes, col, x) in enumerate(_row_lanes(x_ref, moments, per_word, words)):
        noise = uniform(seed_ref[0], row_base + col) if stochastic else 0.5
        code = arithmetic.quantize(x, row_shift + col_shift_ref[lanes], row_inv * col_inv_ref[lanes], noise,
                                   2**bits - 1)
        acc = acc | _code_bits(code, col, length, bits, lane)
        lo, hi = _fold_row_range(lo, hi, x, col, length, col_groups)
    words_ref[...] = acc.astype(words_ref.dtype)
    lo_ref[...] = lo
    hi_ref[...] = hi


def _pack_row_ranges_kernel(x_ref, moments_ref, base_ref, seed_ref, words_ref, lo_ref, hi_ref, shift_ref,
                            scale_ref, *, bits, length, stochastic, col_groups, normalize):
    """One row packed with each of its column groups' own range: the row's finite min and max
    per group first, then the codes on arithmetic.row_affine's grid, both from the row on chip."""
    per_word, words, slots = arithmetic.codes_per_word(bits), words_ref.shape[0], lo_ref.shape[0]
    moments = (moments_ref[0], moments_ref[1]) if normalize else None
    lo = jnp.full((slots,), jnp.inf, jnp.float32)
    hi = jnp.full((slots,), -jnp.inf, jnp.float32)
    for _, col, x in _row_lanes(x_ref, moments, per_word, words):
        lo, hi = _fold_row_range(lo, hi, x, col, length, col_groups)
    lo_ref[...] = lo
    hi_ref[...] = hi
    shift_ref[...], scale_ref[...] = arithmetic.row_affine(*arithmetic.range_or_zero(lo, hi), 2**bits - 1)
    acc = jnp.zeros((words,), jnp.uint32)
    for lane, (lanes, col, x) in enumerate(_row_lanes(x_ref, moments, per_word, words)):
        shift = column_values(shift_ref, 0, col, slots, length // col_groups)
        scale = column_values(scale_ref, 0, col, slots, length // col_groups)
        noise = uniform(seed_ref[0], base_ref[0] + col) if stochastic else 0.5
        acc = acc | _code_bits(arithmetic.quantize(x, shift, 1.0 / scale, noise, 2**bits - 1), col, length, bits, lane)
    words_ref[...] = acc.astype(words_ref.dtype)


def column_values(ref, first: int, col, slots: int, group_len: int):
    """Each column's value of its group, from a row's per-group values ``ref[..., first:first + slots]``
    (column groups of ``group_len`` columns; one slot: one value for the whole row). Selected,
    not summed: exact."""
    out = ref[..., first : first + 1]
    for g in range(1, slots):
        out = jnp.where(col // group_len == g, ref[..., first + g : first + g + 1], out)
    return out


def dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits, slots: int, group_len: int):
    """(lane slice, dequantized float32 values) for each of the 8 // bits lanes of a row.

    ``words_ref`` holds one row ([W], ``row_ref`` [>= 2 * slots]) or a block of rows ([rows, W],
    ``row_ref`` [rows, >= 2 * slots]: the shifts of the row's column groups, then their scales);
    the lane slice indexes the last axis. A column's value is its row group's pair composed
    with its column's pair.
    """
    per_word, words = arithmetic.codes_per_word(bits), words_ref.shape[-1]
    w = words_ref[...].astype(jnp.uint32)
    as_row = lambda v: v.reshape((1,) * (w.ndim - 1) + v.shape)  # [W] -> [1, W] for a block of rows
    for lane in range(per_word):
        lanes = pl.ds(lane, words, stride=per_word)
        code = ((w >> arithmetic.lane_shift(bits, lane)) & (2**bits - 1)).astype(jnp.float32)
        col = as_row(jnp.arange(words) * per_word + lane)
        row_shift, row_scale = (column_values(row_ref, first, col, slots, group_len) for first in (0, slots))
        shift = row_shift + as_row(col_shift_ref[lanes])
        yield lanes, arithmetic.dequantize(code, shift, row_scale * as_row(col_scale_ref[lanes]))


def _unpack_kernel(words_ref, col_shift_ref, col_scale_ref, row_ref, x_ref, *, bits, slots, group_len):
    for lanes, x in dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits, slots, group_len):
        x_ref[lanes] = x.astype(x_ref.dtype)


def pad_columns(a, width: int, value=0.0):
    """[..., C] -> [..., width], padded on the right with ``value``."""
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])], constant_values=value)


@functools.partial(jax.jit, static_argnames=("bits", "stochastic", "col_groups", "interpret"))
def pack_rows(x, col_shift, col_inv, row_shift, row_inv, seed, row_mean=None, row_rstd=None, *, bits, stochastic,
              col_groups=1, interpret=False):
    """[R, C] -> ([R, words_per_row] words, [R, col_groups] row min, row max).

    The words are the reference's packed codes; the minima and maxima are over
    the finite entries of each row's ``col_groups`` contiguous column groups
    (+inf and -inf where there are none). With ``row_mean`` and ``row_rstd`` the
    row is first normalized, ``(x - mean) * rstd``, in the same read.
    """
    rows, length = x.shape
    words, width = arithmetic.padded_row(length, bits)
    slots = pl.next_power_of_2(col_groups)
    row_base = (jnp.arange(rows, dtype=jnp.uint32) * jnp.uint32(length)).reshape(rows, 1)
    normalize = row_mean is not None
    if not normalize:
        row_mean, row_rstd = jnp.zeros(rows), jnp.ones(rows)
    row = jnp.stack([row_shift, row_inv, row_mean, row_rstd], axis=1).astype(jnp.float32)
    kernel = functools.partial(_pack_kernel, bits=bits, length=length, stochastic=stochastic,
                               col_groups=col_groups, normalize=normalize)
    out_shape = (jax.ShapeDtypeStruct((words,), arithmetic.WORD), jax.ShapeDtypeStruct((slots,), jnp.float32),
                 jax.ShapeDtypeStruct((slots,), jnp.float32))
    call = pl.pallas_call(kernel, out_shape=out_shape, interpret=interpret, name="mesa_pack",
                          compiler_params=TRITON)
    packed, lo, hi = jax.vmap(call, in_axes=(0, None, None, 0, 0, None))(
        pad_columns(x, width), pad_columns(col_shift, width), pad_columns(col_inv, width), row, row_base,
        jnp.asarray(seed, jnp.uint32).reshape(1),
    )
    return packed[:, : arithmetic.words_per_row(length, bits)], lo[:, :col_groups], hi[:, :col_groups]


@functools.partial(jax.jit, static_argnames=("bits", "stochastic", "col_groups", "interpret"))
def pack_rows_with_ranges(x, seed, row_mean=None, row_rstd=None, *, bits, stochastic, col_groups, interpret=False):
    """[R, C] -> ([R, words_per_row] words, [R, col_groups] finite min and max of each row's
    column groups, [R, col_groups] shift and scale they were packed with: on
    arithmetic.row_affine's bfloat16 grid, in float32)."""
    rows, length = x.shape
    words, width = arithmetic.padded_row(length, bits)
    slots = pl.next_power_of_2(col_groups)
    row_base = (jnp.arange(rows, dtype=jnp.uint32) * jnp.uint32(length)).reshape(rows, 1)
    normalize = row_mean is not None
    moments = jnp.stack([row_mean, row_rstd] if normalize else [jnp.zeros(rows), jnp.ones(rows)], axis=1)
    kernel = functools.partial(_pack_row_ranges_kernel, bits=bits, length=length, stochastic=stochastic,
                               col_groups=col_groups, normalize=normalize)
    out_shape = (jax.ShapeDtypeStruct((words,), arithmetic.WORD), jax.ShapeDtypeStruct((slots,), jnp.float32),
                 jax.ShapeDtypeStruct((slots,), jnp.float32), jax.ShapeDtypeStruct((slots,), jnp.float32),
                 jax.ShapeDtypeStruct((slots,), jnp.float32))
    call = pl.pallas_call(kernel, out_shape=out_shape, interpret=interpret, name="mesa_pack_row_ranges",
                          compiler_params=TRITON)
    packed, *per_group = jax.vmap(call, in_axes=(0, 0, 0, None))(
        pad_columns(x, width), moments.astype(jnp.float32), row_base, jnp.asarray(seed, jnp.uint32).reshape(1))
    return packed[:, : arithmetic.words_per_row(length, bits)], *(v[:, :col_groups] for v in per_group)


@functools.partial(jax.jit, static_argnames=("bits", "length", "dtype", "slots", "group_len", "interpret"))
def unpack_rows(words, row, col_shift, col_scale, *, bits, length, dtype, slots=1, group_len=1, interpret=False):
    """[R, W] words -> [R, length] values, as the dequantization of quant.unpack.

    ``row`` [R, 2 * slots]: each row's (shift, scale) pairs, ``col_shift``/``col_scale`` padded
    to the kernel's row width (see dequantization_params).
    """
    padded, width = arithmetic.padded_row(length, bits)
    call = pl.pallas_call(
        functools.partial(_unpack_kernel, bits=bits, slots=slots, group_len=group_len),
        out_shape=jax.ShapeDtypeStruct((width,), dtype),
        interpret=interpret,
        name="mesa_unpack",
        compiler_params=TRITON,
    )
    out = jax.vmap(call, in_axes=(0, None, None, 0))(pad_columns(words, padded), col_shift, col_scale, row)
    return out[:, :length]


def rows_and_cols(values, shape, layout, identity: float):
    """Per-group [G] values as a per-row [R] and a per-column [C] vector of the [R, C] view."""
    rows, length = math.prod(shape[:-1]), shape[-1]
    axis = arithmetic.group_axis(shape, layout)
    if axis is None or axis == len(shape) - 1:  # groups of columns: contiguous chunks, or one per column
        return jnp.full((rows,), identity, jnp.float32), jnp.repeat(values, length // values.shape[0])
    per_row = values.reshape((1,) * axis + (-1,) + (1,) * (len(shape) - 2 - axis))  # e.g. row (b, h, n): head h
    return jnp.broadcast_to(per_row, shape[:-1]).reshape(rows), jnp.full((length,), identity, jnp.float32)


def column_groups(shape, layout, groups: int) -> int:
    """How many groups a row's columns fall into: 1 when the groups are rows."""
    axis = arithmetic.group_axis(shape, layout)
    return groups if axis is None or axis == len(shape) - 1 else 1


class Dequantization(NamedTuple):
    """What a row kernel reads to dequantize a packed [..., C] tensor."""

    row: jax.Array  # [R, 2 * slots]: each row's shifts, then scales, one per column group
    col_shift: jax.Array  # [width]: each column's, padded to the kernel's row width with the identity
    col_scale: jax.Array
    slots: int  # a power of two >= the row's column groups (one for running ranges)
    group_len: int  # columns per group of a row


def dequantization_params(shift, scale, shape, layout: str, bits: int, row_ranges: bool = False) -> Dequantization:
    """Running ranges: per-group [G] ``shift`` and ``scale`` as a pair per row and one per column.
    Row ranges: [..., Gr] pairs per row and column group; the columns' the identity."""
    _, width = arithmetic.padded_row(shape[-1], bits)
    if row_ranges:
        groups = shift.shape[-1]
        slots = pl.next_power_of_2(groups)
        pairs = [pad_columns(v.reshape(-1, groups).astype(jnp.float32), slots) for v in (shift, scale)]
        return Dequantization(jnp.concatenate(pairs, axis=1), jnp.zeros((width,), jnp.float32),
                              jnp.ones((width,), jnp.float32), slots, shape[-1] // groups)
    row_shift, col_shift = rows_and_cols(shift, shape, layout, 0.0)
    row_scale, col_scale = rows_and_cols(scale, shape, layout, 1.0)
    return Dequantization(jnp.stack([row_shift, row_scale], axis=1), pad_columns(col_shift, width, 0.0),
                          pad_columns(col_scale, width, 1.0), 1, shape[-1])


def pack(x, shift, inv_scale, seed, *, layout: str, bits: int, stochastic: bool, normalized_by=None,
         interpret: bool):
    """Words of x ([..., C] -> [..., W]) packed with per-group ``shift`` and ``inv_scale``, and
    each row's finite min and max per column group ([..., 1] for heads, [..., G] for
    channel groups; +inf and -inf where a row's group has no finite entry).

    ``normalized_by=(mean, rstd)`` ([..., 1] each) packs ``(x - mean) * rstd`` instead.
    """
    row_shift, col_shift = rows_and_cols(shift, x.shape, layout, 0.0)
    row_inv, col_inv = rows_and_cols(inv_scale, x.shape, layout, 1.0)
    moments = () if normalized_by is None else tuple(m.reshape(-1) for m in normalized_by)
    col_groups = column_groups(x.shape, layout, shift.shape[0])
    words, lo, hi = pack_rows(x.reshape(-1, x.shape[-1]), col_shift, col_inv, row_shift, row_inv, seed, *moments,
                              bits=bits, stochastic=stochastic, col_groups=col_groups, interpret=interpret)
    rows_shape = lambda a: a.reshape(*x.shape[:-1], a.shape[-1])
    return rows_shape(words), rows_shape(lo), rows_shape(hi)


def pack_with_row_ranges(x, seed, *, layout: str, groups: int, bits: int, stochastic: bool, normalized_by=None,
                         interpret: bool):
    """Words of x ([..., C] -> [..., W]) packed with each row's own range per column group, and
    ([..., Gr] each) the rows' finite min, max, and the shift and scale they were packed with."""
    moments = () if normalized_by is None else tuple(m.reshape(-1) for m in normalized_by)
    outs = pack_rows_with_ranges(x.reshape(-1, x.shape[-1]), seed, *moments, bits=bits, stochastic=stochastic,
                                 col_groups=column_groups(x.shape, layout, groups), interpret=interpret)
    return tuple(a.reshape(*x.shape[:-1], a.shape[-1]) for a in outs)


def unpack(words, shift, scale, *, shape, dtype, layout: str, bits: int, interpret: bool, row_ranges: bool = False):
    """The dequantized [..., C] tensor of ``shape`` from its words and per-group parameters
    (``row_ranges``: per row and column group, as pack_with_row_ranges gives them)."""
    d = dequantization_params(shift, scale, shape, layout, bits, row_ranges)
    out = unpack_rows(words.reshape(-1, words.shape[-1]), d.row, d.col_shift, d.col_scale, bits=bits,
                      length=shape[-1], dtype=jnp.dtype(dtype), slots=d.slots, group_len=d.group_len,
                      interpret=interpret)
    return out.reshape(shape)
