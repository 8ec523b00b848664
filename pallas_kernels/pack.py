"""Pack / unpack kernels: one row of a [R, C] view per program, codes into uint32 words.

Per-group parameters reach a row as a per-row pair (heads: the row's head) and a
per-column pair (channel groups: the column's group); the unused one of each pair
is the identity (shift 0, scale 1), so the arithmetic is bit for bit the
reference's (mesa_jax.quant), hash noise included: a kernel and the reference
produce identical codes for the same seed.

Rows are padded on the host to a power-of-two number of words, so every strided
lane load is in bounds (Triton blocks must be powers of two).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.hashing import uniform_from_index


def _pack_kernel(x_ref, col_shift_ref, col_inv_ref, row_ref, base_ref, seed_ref, words_ref, *, bits, length,
                 stochastic):
    per_word, words = 32 // bits, words_ref.shape[0]
    row_shift, row_inv, row_base = row_ref[0], row_ref[1], base_ref[0]  # base: the row's flat index
    acc = jnp.zeros((words,), jnp.uint32)
    for lane in range(per_word):
        lanes = pl.ds(lane, words, stride=per_word)
        col = jnp.arange(words, dtype=jnp.uint32) * per_word + lane
        x = x_ref[lanes].astype(jnp.float32)
        v = (x - (row_shift + col_shift_ref[lanes])) * (row_inv * col_inv_ref[lanes])
        noise = uniform_from_index(row_base + col, seed_ref[0]) if stochastic else 0.5
        v = jnp.floor(v + noise)
        v = jnp.where(jnp.isnan(v), 0.0, jnp.clip(v, 0.0, 2.0**bits - 1))
        code = jnp.where(col < length, v.astype(jnp.uint32), 0)
        acc = acc | (code << (bits * lane))
    words_ref[...] = acc


def dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits):
    """(lane slice, dequantized float32 values) for each of the 32 // bits lanes of a row."""
    per_word, words = 32 // bits, words_ref.shape[0]
    w = words_ref[...]
    for lane in range(per_word):
        lanes = pl.ds(lane, words, stride=per_word)
        code = ((w >> (bits * lane)) & (2**bits - 1)).astype(jnp.float32)
        yield lanes, (row_ref[0] + col_shift_ref[lanes]) + code * (row_ref[1] * col_scale_ref[lanes])


def _unpack_kernel(words_ref, col_shift_ref, col_scale_ref, row_ref, x_ref, *, bits):
    for lanes, x in dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits):
        x_ref[lanes] = x.astype(x_ref.dtype)


TRITON = plgpu.CompilerParams(num_warps=4, num_stages=1)  # not Mosaic GPU: these are Triton kernels


def padded_words(length: int, bits: int) -> int:
    return pl.next_power_of_2(-(-length // (32 // bits)))


@functools.partial(jax.jit, static_argnames=("bits", "stochastic", "interpret"))
def pack_rows(x, col_shift, col_inv, row_shift, row_inv, seed, *, bits, stochastic, interpret=False):
    """[R, C] -> [R, ceil(C * bits / 32)] uint32 words, as quant.pack_codes(quantize(x))."""
    rows, length = x.shape
    words = padded_words(length, bits)
    width = words * (32 // bits)
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - length)])
    row_base = (jnp.arange(rows, dtype=jnp.uint32) * jnp.uint32(length)).reshape(rows, 1)
    row = jnp.stack([row_shift, row_inv], axis=1)
    kernel = functools.partial(_pack_kernel, bits=bits, length=length, stochastic=stochastic)
    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((words,), jnp.uint32), interpret=interpret, name="mesa_pack",
        compiler_params=TRITON,
    )
    packed = jax.vmap(call, in_axes=(0, None, None, 0, 0, None))(
        pad(x), pad(col_shift), pad(col_inv), row, row_base, jnp.asarray(seed, jnp.uint32).reshape(1)
    )
    return packed[:, : -(-length // (32 // bits))]


@functools.partial(jax.jit, static_argnames=("bits", "length", "dtype", "interpret"))
def unpack_rows(words, col_shift, col_scale, row_shift, row_scale, *, bits, length, dtype, interpret=False):
    """[R, W] words -> [R, length] values, as the dequantization of quant.unpack."""
    padded = padded_words(length, bits)
    width = padded * (32 // bits)
    pad_cols = lambda a, value: jnp.pad(a, (0, width - length), constant_values=value)
    call = pl.pallas_call(
        functools.partial(_unpack_kernel, bits=bits),
        out_shape=jax.ShapeDtypeStruct((width,), dtype),
        interpret=interpret,
        name="mesa_unpack",
        compiler_params=TRITON,
    )
    row = jnp.stack([row_shift, row_scale], axis=1)
    full = jnp.pad(words, ((0, 0), (0, padded - words.shape[1])))
    out = jax.vmap(call, in_axes=(0, None, None, 0))(full, pad_cols(col_shift, 0.0), pad_cols(col_scale, 1.0), row)
    return out[:, :length]


def rows_and_cols(values, shape, layout: str, identity: float):
    """Per-group [G] values as a per-row [R] and a per-column [C] vector of the [R, C] view."""
    rows, length = math.prod(shape[:-1]), shape[-1]
    if layout == "heads":  # [B, H, N, M]: row (b, h, n) belongs to head h
        row = jnp.broadcast_to(values.reshape(1, -1, 1), shape[:-1]).reshape(rows)
        return row, jnp.full((length,), identity, jnp.float32)
    row = jnp.full((rows,), identity, jnp.float32)
    return row, jnp.repeat(values, length // values.shape[0])


def pack(x, shift, inv_scale, seed, *, layout: str, bits: int, stochastic: bool, interpret: bool):
    """Words of x ([..., C] -> [..., W]) packed with per-group ``shift`` and ``inv_scale``."""
    row_shift, col_shift = rows_and_cols(shift, x.shape, layout, 0.0)
    row_inv, col_inv = rows_and_cols(inv_scale, x.shape, layout, 1.0)
    flat = x.reshape(-1, x.shape[-1])
    words = pack_rows(flat, col_shift, col_inv, row_shift, row_inv, seed, bits=bits, stochastic=stochastic,
                      interpret=interpret)
    return words.reshape(*x.shape[:-1], words.shape[-1])


def unpack(words, shift, scale, *, shape, dtype, layout: str, bits: int, interpret: bool):
    """The dequantized [..., C] tensor of ``shape`` from its words and per-group parameters."""
    row_shift, col_shift = rows_and_cols(shift, shape, layout, 0.0)
    row_scale, col_scale = rows_and_cols(scale, shape, layout, 1.0)
    flat = words.reshape(-1, words.shape[-1])
    out = unpack_rows(flat, col_shift, col_scale, row_shift, row_scale, bits=bits, length=shape[-1],
                      dtype=jnp.dtype(dtype), interpret=interpret)
    return out.reshape(shape)
