"""Fused backward kernels: unpack the residual and apply the op's derivative in one pass.

On a GPU each of these reads the packed words and the cotangent once and writes
the input gradient once; the XLA path unpacks into a float tensor first. Rows of
a [R, C] view, one per program (LayerNorm: a block of rows, whose parameter
gradients are summed in the kernel), lanes strided as in pallas_kernels/pack.py;
the formulas are pallas_kernels.arithmetic's, as in the ``_bwd`` of mesa_jax.ops.

Triton has no erf: exact-GELU's derivative uses Abramowitz & Stegun 7.1.26
(|error| < 1.5e-7), which only the backward pass ever sees.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import arithmetic
from pallas_kernels.pack import TRITON, dequantization_params, dequantized_lanes, pad_columns


def erf(x):
    """Abramowitz & Stegun 7.1.26, from exp only (Triton lowers no erf)."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return jnp.sign(x) * (1.0 - poly * jnp.exp(-a * a))


def _gelu_bwd_kernel(words_ref, col_shift_ref, col_scale_ref, row_ref, g_ref, dx_ref, *, bits, slots, group_len,
                     approximate):
    for lanes, x in dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits, slots, group_len):
        g = g_ref[lanes].astype(jnp.float32)
        dx_ref[lanes] = (g * arithmetic.gelu_derivative(x, approximate, erf)).astype(dx_ref.dtype)


def _softmax_bwd_kernel(words_ref, col_shift_ref, col_scale_ref, row_ref, g_ref, dx_ref, *, bits, slots, group_len,
                        length):
    per_word = arithmetic.codes_per_word(bits)
    ys, gs, total = [], [], jnp.float32(0.0)
    lanes_of_row = dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits, slots, group_len)
    for lane, (lanes, y) in enumerate(lanes_of_row):
        valid = jnp.arange(words_ref.shape[0]) * per_word + lane < length
        g = jnp.where(valid, g_ref[lanes].astype(jnp.float32), 0.0)
        ys.append((lanes, y))
        gs.append(g)
        total = total + jnp.sum(g * y)
    for (lanes, y), g in zip(ys, gs):
        dx_ref[lanes] = arithmetic.softmax_input_grad(y, g, total).astype(dx_ref.dtype)


def _layer_norm_bwd_kernel(words_ref, col_shift_ref, col_scale_ref, row_ref, g_ref, gamma_ref,
                           dx_ref, dgamma_ref, dbeta_ref, *, bits, slots, group_len, length):
    """A block of rows: dx, and the block's sums of g * x_hat and g (padded rows and columns have g = 0).
    ``row_ref`` [rows, >= 2 * slots + 1]: each row's dequantization pairs, then its rstd."""
    rstd = row_ref[:, 2 * slots : 2 * slots + 1]
    lanes_of_block = list(dequantized_lanes(words_ref, col_shift_ref, col_scale_ref, row_ref, bits, slots,
                                            group_len))
    gs = [g_ref[:, lanes].astype(jnp.float32) for lanes, _ in lanes_of_block]
    gns = [g * gamma_ref[lanes][None, :] for (lanes, _), g in zip(lanes_of_block, gs)]
    mean_gn = sum(jnp.sum(gn, axis=1, keepdims=True) for gn in gns) / length
    mean_gnx = sum(jnp.sum(gn * xn, axis=1, keepdims=True) for (_, xn), gn in zip(lanes_of_block, gns)) / length
    for (lanes, xn), g, gn in zip(lanes_of_block, gs, gns):
        dx_ref[:, lanes] = arithmetic.layer_norm_input_grad(xn, gn, rstd, mean_gn, mean_gnx).astype(dx_ref.dtype)
        dgamma_ref[lanes] = jnp.sum(g * xn, axis=0)
        dbeta_ref[lanes] = jnp.sum(g, axis=0)


def _backward(kernel, words, shift, scale, g, *, layout, bits, row_ranges, interpret, **params):
    """Run a row kernel over [..., C] cotangents ``g`` and the packed words of the residual
    (``row_ranges``: packed with them)."""
    shape, length = g.shape, g.shape[-1]
    padded, width = arithmetic.padded_row(length, bits)
    d = dequantization_params(shift, scale, shape, layout, bits, row_ranges)
    call = pl.pallas_call(
        functools.partial(kernel, bits=bits, slots=d.slots, group_len=d.group_len, **params),
        out_shape=jax.ShapeDtypeStruct((width,), g.dtype),
        interpret=interpret,
        name=kernel.__name__.strip("_"),
        compiler_params=TRITON,
    )
    dx = jax.vmap(call, in_axes=(0, None, None, 0, 0))(
        pad_columns(words.reshape(-1, words.shape[-1]), padded), d.col_shift, d.col_scale, d.row,
        pad_columns(g.reshape(-1, length), width),
    )
    return dx[:, :length].reshape(shape)


@functools.partial(jax.jit, static_argnames=("layout", "bits", "approximate", "row_ranges", "interpret"))
def gelu_backward(words, shift, scale, g, *, layout, bits, approximate, row_ranges=False, interpret=False):
    """g * gelu'(x_hat), x_hat unpacked in the same pass."""
    return _backward(_gelu_bwd_kernel, words, shift, scale, g, layout=layout, bits=bits, row_ranges=row_ranges,
                     interpret=interpret, approximate=approximate)


@functools.partial(jax.jit, static_argnames=("layout", "bits", "row_ranges", "interpret"))
def softmax_backward(words, shift, scale, g, *, layout, bits, row_ranges=False, interpret=False):
    """y_hat * (g - sum(g * y_hat)) over each row, y_hat unpacked in the same pass."""
    return _backward(_softmax_bwd_kernel, words, shift, scale, g, layout=layout, bits=bits, row_ranges=row_ranges,
                     interpret=interpret, length=g.shape[-1])


LN_BLOCK_ROWS = 8  # rows per program: the parameter gradients are summed over them in registers


@functools.partial(jax.jit, static_argnames=("bits", "row_ranges", "interpret"))
def layer_norm_backward(words, shift, scale, rstd, g, gamma, *, bits, row_ranges=False, interpret=False):
    """(dx, dgamma, dbeta) of LayerNorm from the packed normalized input; dx in g's dtype,
    the parameter gradients in float32.

    ``words``/``shift``/``scale``: the channel-grouped residual of x_hat =
    (x - mean) * rstd; ``rstd`` [..., 1]; ``gamma`` [C] (ones for no scale).
    Each program reads a block of rows of words and cotangents once, writes dx,
    and sums g * x_hat and g over its rows; a small XLA sum adds the blocks.
    """
    shape, length = g.shape, g.shape[-1]
    padded, width = arithmetic.padded_row(length, bits)
    rows = math.prod(shape[:-1])
    blocks = -(-rows // LN_BLOCK_ROWS)
    d = dequantization_params(shift, scale, shape, "channels", bits, row_ranges)
    row = jnp.concatenate([d.row, rstd.reshape(rows, 1).astype(jnp.float32)], axis=1)  # pairs, then rstd

    def blocked(a, cols):  # [rows, n] -> [blocks, LN_BLOCK_ROWS, cols], zero padded
        a = jnp.pad(a, ((0, blocks * LN_BLOCK_ROWS - rows), (0, cols - a.shape[1])))
        return a.reshape(blocks, LN_BLOCK_ROWS, cols)

    call = pl.pallas_call(
        functools.partial(_layer_norm_bwd_kernel, bits=bits, slots=d.slots, group_len=d.group_len, length=length),
        out_shape=(jax.ShapeDtypeStruct((LN_BLOCK_ROWS, width), g.dtype),
                   jax.ShapeDtypeStruct((width,), jnp.float32), jax.ShapeDtypeStruct((width,), jnp.float32)),
        interpret=interpret,
        name="layer_norm_bwd_kernel",
        compiler_params=TRITON,
    )
    dx, dgamma, dbeta = jax.vmap(call, in_axes=(0, None, None, 0, 0, None))(
        blocked(words.reshape(rows, -1), padded), d.col_shift, d.col_scale,
        blocked(row, pl.next_power_of_2(row.shape[1])),
        blocked(g.reshape(rows, length), width), pad_columns(gamma.astype(jnp.float32), width),
    )
    dx = dx.reshape(blocks * LN_BLOCK_ROWS, width)[:rows, :length].reshape(shape)
    return dx, jnp.sum(dgamma, axis=0)[:length], jnp.sum(dbeta, axis=0)[:length]
