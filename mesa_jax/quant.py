"""Per-group integer quantization of activations: the heart of mesa_jax.

A tensor kept for the backward pass is stored as ``bits``-bit codes plus a
float32 ``scale`` and ``shift`` per group::

    code = clip(floor((x - shift) / scale + u), 0, 2**bits - 1)    # u ~ U[0, 1)
    x_hat = shift + code * scale

with ``shift`` the group's running minimum and ``scale = max(span, EPS) /
(2**bits - 1)``. Codes are clamped at both ends (the original Mesa wrapped
overflowing values around) and packed ``32 // bits`` to a uint32 word along the
last axis, so 4- and 2-bit residuals really take a half or a quarter of a byte
per element.

Everything here is plain ``jnp`` and defines what the Pallas kernels must
reproduce bit for bit, including the counter-based hash behind stochastic
rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import pack as kernels
from pallas_kernels.hashing import uniform_from_index

Layout = Literal["channels", "heads"]

EPS = 1e-8  # floor of a group's range: a constant group packs to code 0 and unpacks exactly
VALID_BITS = (8, 4, 2)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Static settings of one compressed tensor (hashable: a non-diff argument)."""

    bits: int = 8  # code width; 4 and 2 pack several codes per byte
    num_groups: int = 1  # contiguous channel groups of a [..., C] tensor
    stochastic: bool = True  # unbiased stochastic rounding; False rounds to nearest
    ema_decay: float = 0.9  # running-estimate decay of Mesa
    # Mesa's order: fold a tensor's range into the running estimate, then pack with it
    # (two reads of the tensor). False packs with the estimate from before the tensor and
    # measures its range in the same read (see pack_and_update).
    update_first: bool = False

    def __post_init__(self):
        if self.bits not in VALID_BITS:
            raise ValueError(f"QuantConfig.bits must be one of {VALID_BITS}, got {self.bits!r}")
        if not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"QuantConfig.num_groups must be an int >= 1, got {self.num_groups!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"QuantConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for flag in ("stochastic", "update_first"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantConfig.{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def levels(self) -> int:
        return 2**self.bits - 1


class Stats(NamedTuple):
    """Running estimate of each group's range; ``count`` is the number of updates."""

    lo: jax.Array  # [G] float32 running minimum
    span: jax.Array  # [G] float32 running max - min
    count: jax.Array  # [] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed:
    """An activation kept as packed integer codes plus per-group scale and shift."""

    words: jax.Array  # [..., ceil(C * bits / 32)] uint32: rows of codes packed into words
    scale: jax.Array  # [G] float32
    shift: jax.Array  # [G] float32
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scale.nbytes + self.shift.nbytes


# ---------------------------------------------------------------- group layout


def num_groups_for(shape: tuple[int, ...], layout: Layout, config: QuantConfig) -> int:
    """Group count of a tensor: one per head for "heads", config.num_groups for "channels"."""
    if layout == "heads":
        if len(shape) != 4:
            raise ValueError(f"the 'heads' layout needs a [B, H, N, M] tensor, got shape {shape}")
        return shape[1]
    if layout != "channels":
        raise ValueError(f"unknown group layout {layout!r}; use 'channels' or 'heads'")
    if not shape:
        raise ValueError("cannot group a scalar: the 'channels' layout needs a [..., C] tensor")
    channels, groups = shape[-1], config.num_groups
    if channels % groups:
        raise ValueError(
            f"num_groups={groups} does not divide the channel dimension C={channels} of shape {shape}"
        )
    return groups


def _group_shape(shape: tuple[int, ...], layout: Layout, groups: int) -> tuple[int, ...]:
    """Shape to view x as, so that a per-group [G] vector broadcasts after a reshape."""
    if layout == "heads":
        return shape
    return (*shape[:-1], groups, shape[-1] // groups)


def _per_group(v: jax.Array, layout: Layout, ndim: int) -> jax.Array:
    """Reshape a [G] vector to broadcast against the grouped view of an ndim tensor."""
    if layout == "heads":
        return v.reshape(1, -1, 1, 1)
    return v.reshape((1,) * (ndim - 2) + (-1, 1))


def group_min_max(x: jax.Array, layout: Layout, groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-group [G] min and max over the finite entries (0 and 0 if a group has none).

    Under stop_gradient: autodiff must not keep the float input for their VJP.
    """
    x = jax.lax.stop_gradient(x)
    xg = x.reshape(_group_shape(x.shape, layout, groups)).astype(jnp.float32)
    group_axis = 1 if layout == "heads" else xg.ndim - 2
    axes = tuple(a for a in range(xg.ndim) if a != group_axis)
    finite = jnp.isfinite(xg)
    lo = jnp.min(jnp.where(finite, xg, jnp.inf), axis=axes)
    hi = jnp.max(jnp.where(finite, xg, -jnp.inf), axis=axes)
    empty = lo > hi
    return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


# ----------------------------------------------------------------- statistics


def init_stats(groups: int) -> Stats:
    return Stats(
        lo=jnp.zeros((groups,), jnp.float32),
        span=jnp.zeros((groups,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


def batch_stats(x: jax.Array, layout: Layout, groups: int) -> Stats:
    """The statistics of x alone, as a first observation would set them."""
    lo, hi = group_min_max(x, layout, groups)
    return Stats(lo, _finite_span(lo, hi), jnp.ones((), jnp.int32))


def observe(stats: Stats, lo: jax.Array, hi: jax.Array, config: QuantConfig) -> Stats:
    """EMA update with an observed per-group min and max; the first one initialises."""
    decay = jnp.where(stats.count > 0, config.ema_decay, 0.0)
    return Stats(
        lo=decay * stats.lo + (1 - decay) * lo,
        span=decay * stats.span + (1 - decay) * _finite_span(lo, hi),
        count=stats.count + 1,
    )


def update(stats: Stats, x: jax.Array, config: QuantConfig, layout: Layout = "channels") -> Stats:
    """Pure running-estimate update of ``stats`` with the tensor ``x``."""
    return observe(stats, *group_min_max(x, layout, stats.lo.shape[0]), config)


def _finite_span(lo: jax.Array, hi: jax.Array) -> jax.Array:
    # hi - lo overflows to inf for float32 extremes; inf would make every code NaN.
    return jnp.minimum(hi - lo, jnp.finfo(jnp.float32).max)


# ------------------------------------------------------- stochastic rounding


def hash_uniform(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """U[0, 1) float32 noise from a counter-based hash of (seed, flat element index).

    Integer-only (mul, xor, shift on uint32), so a Pallas kernel that knows an
    element's flat index reproduces the same number without a PRNG.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return uniform_from_index(index, seed)


# -------------------------------------------------------------- pack / unpack


def _check_groups(x: jax.Array, stats: Stats, config: QuantConfig, layout: Layout) -> None:
    groups = num_groups_for(x.shape, layout, config)
    if stats.lo.shape != (groups,):
        raise ValueError(
            f"statistics have {stats.lo.shape[0]} groups but a {layout} tensor of shape "
            f"{x.shape} needs {groups}"
        )


def _affine(x: jax.Array, stats: Stats, config: QuantConfig, layout: Layout):
    """Per-group float32 (shift, inverse scale) of x; checks the statistics fit x."""
    _check_groups(x, stats, config, layout)
    shift = stats.lo.astype(jnp.float32)
    return shift, config.levels / jnp.maximum(stats.span.astype(jnp.float32), EPS)


def quantize(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout):
    """Codes (uint32, one per element) and the per-group (scale, shift) of x."""
    shift, inv_scale = _affine(x, stats, config, layout)
    groups = shift.shape[0]
    xg = x.reshape(_group_shape(x.shape, layout, groups)).astype(jnp.float32)
    v = (xg - _per_group(shift, layout, xg.ndim)) * _per_group(inv_scale, layout, xg.ndim)
    noise = hash_uniform(seed, xg.shape) if config.stochastic else 0.5
    v = jnp.floor(v + noise)
    v = jnp.where(jnp.isnan(v), 0.0, jnp.clip(v, 0.0, config.levels))
    codes = v.astype(jnp.uint32).reshape(x.shape)
    return codes, 1.0 / inv_scale, shift


def normalized(x: jax.Array, normalized_by=None) -> jax.Array:
    """x, or ``(x - mean) * rstd`` row by row (in >= float32) for ``normalized_by=(mean, rstd)``.

    LayerNorm keeps its normalized input; passing the row moments instead of the
    normalized tensor lets a kernel normalize in the read it packs with.
    """
    if normalized_by is None:
        return x
    mean, rstd = normalized_by
    return (x.astype(jnp.promote_types(x.dtype, jnp.float32)) - mean) * rstd


def pack(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels",
         normalized_by=None) -> Packed:
    """Quantize x (or quant.normalized(x, normalized_by)) with the given statistics and
    pack the codes into uint32 words.

    Runs the jnp reference or the Pallas kernel, as ``pallas_kernels.get_impl()`` says;
    both give identical words.
    """
    return _pack_observe(x, stats, config, seed, layout, normalized_by)[0]


def pack_and_update(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels",
                    normalized_by=None) -> tuple[Packed, Stats]:
    """Pack x for the backward pass and fold its per-group range into the running ``stats``.

    x is packed with the range estimated *before* it (what falls outside is
    clamped) while its own range is measured in the same read: one pass over x.
    Only the first observation, with no estimate yet, measures x first and packs
    with its own range. ``config.update_first`` is Mesa's order instead: update
    the estimate with x, then pack with it (two passes).
    """
    _check_groups(x, stats, config, layout)
    if config.update_first:
        new = update(stats, normalized(x, normalized_by), config, layout)
        return pack(x, new, config, seed, layout, normalized_by), new

    def measure_first():
        lo, hi = group_min_max(normalized(x, normalized_by), layout, stats.lo.shape[0])
        own = Stats(lo, _finite_span(lo, hi), stats.count)
        return pack(x, own, config, seed, layout, normalized_by), lo, hi

    running = lambda: _pack_observe(x, stats, config, seed, layout, normalized_by)
    packed, lo, hi = jax.lax.cond(stats.count > 0, running, measure_first)
    return packed, observe(stats, lo, hi, config)


def _pack_observe(x, stats: Stats, config: QuantConfig, seed, layout: Layout, normalized_by):
    """(x packed with ``stats``, x's per-group min, max): one read of x under the kernels."""
    impl = pallas_kernels.get_impl()
    groups = stats.lo.shape[0]
    if impl == "xla":
        xn = normalized(x, normalized_by)
        codes, scale, shift = quantize(xn, stats, config, seed, layout)
        words = pack_codes(codes, config.bits)
        lo, hi = group_min_max(xn, layout, groups)
    else:
        shift, inv_scale = _affine(x, stats, config, layout)
        words, lo, hi = kernels.pack(x, shift, inv_scale, seed, layout=layout, bits=config.bits,
                                     stochastic=config.stochastic, normalized_by=normalized_by,
                                     interpret=impl == "pallas_interpret")
        scale = 1.0 / inv_scale
    dtype = x.dtype if normalized_by is None else jnp.promote_types(x.dtype, jnp.float32)
    return Packed(words, scale, shift, x.shape, jnp.dtype(dtype), config.bits, layout), lo, hi


def unpack(p: Packed) -> jax.Array:
    """The dequantized tensor, in the original shape and dtype."""
    impl = pallas_kernels.get_impl()
    if impl != "xla":
        return kernels.unpack(p.words, p.shift, p.scale, shape=p.shape, dtype=p.dtype, layout=p.layout,
                              bits=p.bits, interpret=impl == "pallas_interpret")
    codes = unpack_codes(p.words, p.bits, p.shape[-1])
    groups = p.scale.shape[0]
    cg = codes.reshape(_group_shape(p.shape, p.layout, groups)).astype(jnp.float32)
    x = _per_group(p.shift, p.layout, cg.ndim) + cg * _per_group(p.scale, p.layout, cg.ndim)
    return x.reshape(p.shape).astype(p.dtype)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """[..., C] codes -> [..., ceil(C * bits / 32)] uint32 words, lowest bits first.

    Words never straddle rows (each row is padded to whole words), so a kernel
    working on rows writes its words independently of its neighbours.
    """
    per_word = 32 // bits
    c = codes.astype(jnp.uint32)
    c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, -c.shape[-1] % per_word)])
    lanes = c.reshape(*c.shape[:-1], -1, per_word) << _lane_shifts(bits, c.ndim + 1)
    return jnp.bitwise_or.reduce(lanes, axis=-1)


def unpack_codes(words: jax.Array, bits: int, length: int) -> jax.Array:
    """Inverse of pack_codes: [..., W] words -> [..., length] uint32 codes."""
    lanes = (words[..., None] >> _lane_shifts(bits, words.ndim + 1)) & jnp.uint32(2**bits - 1)
    return lanes.reshape(*words.shape[:-1], -1)[..., :length]


def _lane_shifts(bits: int, ndim: int) -> jax.Array:
    """Bit offsets of the codes within a word, on the last of ``ndim`` axes."""
    return (jnp.arange(32 // bits, dtype=jnp.uint32) * bits).reshape((1,) * (ndim - 1) + (-1,))


def fake_quantize(x, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels"):
    """unpack(pack(x)): what the backward pass of an op sees instead of x."""
    return unpack(pack(x, stats, config, seed, layout))
