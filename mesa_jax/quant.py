"""Per-group integer quantization of activations: the readable reference of mesa_jax.

A tensor kept for the backward pass is stored as ``bits``-bit codes plus a
float32 ``scale`` and ``shift`` per group::

    code  = clip(floor((x - shift) / scale + u), 0, 2**bits - 1)    # u ~ U[0, 1), or 0.5
    x_hat = shift + code * scale

with ``shift`` the group's running minimum and ``scale = max(span, EPS) /
(2**bits - 1)``. Codes are clamped at both ends (the original Mesa wrapped
overflowing values around) and packed ``8 // bits`` to a byte along the last
axis (8-bit codes are a plain uint8 array), so 4- and 2-bit residuals really
take a half or a quarter of a byte per element.

This module is plain jnp and defines what the Pallas kernels must reproduce bit
for bit. The per-element rules (the code formula above, the dequantization,
LayerNorm's normalization, "a group with no finite entry has range 0", the word
layout) are the small functions of pallas_kernels.arithmetic, and the noise ``u``
is pallas_kernels.hashing's counter-based hash of (seed, flat element index):
the reference here and the kernels call the same functions. Which of the two
runs is ``QuantConfig.backend``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import zlib
from typing import Literal, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import arithmetic
from pallas_kernels import pack as kernels
from pallas_kernels.hashing import combine, uniform

__all__ = [  # the reference's public names: the config, the records, the statistics, pack/unpack
    "QuantConfig", "Stats", "Packed", "Layout", "init_stats", "stats_of", "update", "fold_range", "num_groups_for",
    "layer_seed", "pack", "unpack", "pack_and_update", "pack_and_measure", "pack_signs", "fake_quantize", "WORD",
    "GROWTH",
]

Layout = Union[Literal["channels", "heads"], int]  # see pallas_kernels.arithmetic.group_axis

WORD = arithmetic.WORD  # what codes are packed into: bytes
EPS = arithmetic.EPS  # floor of a group's range: a constant group packs to code 0 and unpacks exactly
VALID_BITS = (8, 4, 2)
RANGES = ("running", "row")


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
    # who packs (pallas_kernels.Backend, or its name: "xla", "triton", "triton-interpret"):
    # this module's jnp, or the Triton kernels (compiled, or in the Pallas interpreter)
    backend: pallas_kernels.Backend = pallas_kernels.XLA
    # Attention (mesa_jax.attention): also keep each query row's log-sum-exp of the exact
    # logits (float32: 4 bytes per head and token) and normalize the restored logits with
    # it. False: normalize them by their own log-sum-exp (restored rows sum to one).
    saved_lse: bool = False
    # "running": each group's range is the running estimate (Mesa's). "row": each row of the
    # last axis (per channel group; an attention tensor's rows lie within one head) packs
    # with its own finite min/max, measured from the tensor itself in the read that packs
    # it, and keeps that scale and shift in bfloat16 next to its codes (rows of fewer than
    # ROW_MIN elements per range, such as RGB pixels, keep the running range). The running
    # statistics are updated in both modes.
    ranges: str = "running"

    def __post_init__(self):
        def integer(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"QuantConfig.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))

        integer("bits")
        if self.bits not in VALID_BITS:
            raise ValueError(f"QuantConfig.bits must be one of {VALID_BITS}, got {self.bits!r}")
        integer("num_groups")
        if self.num_groups < 1:
            raise ValueError(f"QuantConfig.num_groups must be an int >= 1, got {self.num_groups!r}")
        if not isinstance(self.ema_decay, numbers.Real) or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"QuantConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for flag in ("stochastic", "update_first", "saved_lse"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        object.__setattr__(self, "backend", pallas_kernels.backend(self.backend))
        if self.ranges not in RANGES:
            raise ValueError(f"QuantConfig.ranges must be one of {list(RANGES)}, got {self.ranges!r}")

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
    """An activation kept as packed integer codes plus per-group (or per-row) scale and shift."""

    words: jax.Array  # [..., ceil(C * bits / 8)] uint8: rows of codes packed into bytes (WORD)
    scale: jax.Array  # [G] float32; with ``rows``: [..., Gr] bfloat16, one per row and channel group
    shift: jax.Array  # like scale
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    backend: pallas_kernels.Backend = dataclasses.field(metadata=dict(static=True))  # unpack runs the same
    rows: bool = dataclasses.field(default=False, metadata=dict(static=True))  # QuantConfig(ranges="row")

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scale.nbytes + self.shift.nbytes


# ---------------------------------------------------------------- group layout


def num_groups_for(shape: tuple[int, ...], layout: Layout, config: QuantConfig) -> int:
    """Group count of a tensor: config.num_groups for "channels", else one per index of the
    group axis (one per head for "heads")."""
    axis = arithmetic.group_axis(shape, layout) if shape else None
    if axis is not None:
        return shape[axis]
    if not shape:
        raise ValueError("cannot group a scalar: the 'channels' layout needs a [..., C] tensor")
    channels, groups = shape[-1], config.num_groups
    if channels % groups:
        raise ValueError(
            f"num_groups={groups} does not divide the channel dimension C={channels} of shape {shape}"
        )
    return groups


grouped_shape = arithmetic.grouped_shape


def regroup(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x.reshape(shape)`` through the [rows, rest] view both shapes share, one merge or one
    split at a time: under explicit sharding (jax.make_mesh's default) jax rejects a reshape
    that does more at once, such as a batch-sharded [B, N, C] into [B * N, G, C // G]."""
    shape = tuple(shape)
    for i in range(1, x.ndim):
        rows = math.prod(x.shape[:i])
        j = next((j for j in range(1, len(shape)) if math.prod(shape[:j]) == rows), None)
        if j is not None:
            merged = x.reshape(rows, *x.shape[i:]).reshape(rows, math.prod(x.shape[i:]))
            return merged.reshape(rows, *shape[j:]).reshape(shape)
    return x.reshape(shape)


def _per_group(v: jax.Array) -> jax.Array:
    """A [G] vector, to broadcast against a grouped view."""
    return v.reshape(1, -1, 1)


def _group_range(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[G] min of ``lo`` and max of ``hi``, grouped views holding +-inf where nothing counts
    (a group with nothing finite stays (+inf, -inf): ``seen`` is False there)."""
    lo, hi = _min_max(lo, hi, (0, 2))
    return _replicated(lo), _replicated(hi)


def _min_max(lo: jax.Array, hi: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(min of ``lo``, max of ``hi``) over ``axes`` (+inf, -inf if empty) as one variadic reduction:
    XLA:CPU fuses the masks that make ``lo`` and ``hi`` into it, where two reductions had it write
    both masked float copies (+1 GB at DeiT-S batch 128 in row mode)."""
    return jax.lax.reduce((lo, hi), (jnp.array(jnp.inf, lo.dtype), jnp.array(-jnp.inf, hi.dtype)), _both, axes)


def _both(a, b):
    """lax.reduce's computation for _min_max: one function, so an eager call reuses its compilation."""
    return jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])


def _replicated(v: jax.Array) -> jax.Array:
    """``v`` on every device, as the statistics are: under explicit sharding a range measured
    over channels split across devices would otherwise stay split, and differ in type from
    the statistics (which lax.cond's two branches must agree on)."""
    spec = jax.typeof(v).sharding.spec
    return jax.sharding.reshard(v, P()) if any(axis is not None for axis in spec) else v


def group_min_max(x: jax.Array, layout: Layout, groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-group [G] min and max over the finite entries (+inf and -inf if a group has none).

    Under stop_gradient: autodiff must not keep the float input for their VJP.
    """
    x = jax.lax.stop_gradient(x)
    xg = regroup(x, grouped_shape(x.shape, layout, groups)).astype(jnp.float32)
    finite = jnp.isfinite(xg)
    return _group_range(jnp.where(finite, xg, jnp.inf), jnp.where(finite, xg, -jnp.inf))


# ----------------------------------------------------------------- statistics


def init_stats(groups: int) -> Stats:
    return Stats(
        lo=jnp.zeros((groups,), jnp.float32),
        span=jnp.zeros((groups,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


def stats_of(x: jax.Array, layout: Layout, groups: int) -> Stats:
    """The statistics of x alone, as a first observation sets them."""
    lo, hi = arithmetic.range_or_zero(*group_min_max(x, layout, groups))
    return Stats(lo, _finite_span(lo, hi), jnp.ones((), jnp.int32))


def seen(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """[G] whether a measured group had a finite entry (group_min_max gives lo > hi if not)."""
    return lo <= hi


def informative(stats: Stats) -> jax.Array:
    """[G] whether a group's running estimate can pack a tensor: it has seen one, with a range.
    A zero span (nothing seen yet, a constant such as a zero-initialised layer's output, a
    constant dummy batch at init) says nothing about the spread of what comes next."""
    return (stats.count > 0) & (stats.span > 0)


# One batch moves the estimate by at most this many of its own spans on each side: its range is
# clipped to [lo - GROWTH * span, hi + GROWTH * span] before the EMA, so a single outlier (1e6
# among O(1) values) widens the span by at most 2 * GROWTH * (1 - ema_decay) (1.2x at decay
# 0.9), while a real change of scale is followed by that factor per step.
GROWTH = 1.0


def fold_range(stats: Stats, lo: jax.Array, hi: jax.Array, config: QuantConfig) -> Stats:
    """The running estimate updated with a measured per-group min and max: an EMA (decay
    ``config.ema_decay``) of the range clipped to GROWTH spans around the estimate. A group
    without an informative estimate takes the range as it is; a group with nothing finite
    (an empty or all-NaN batch) keeps its estimate, and a tensor with nothing finite does not
    count as an observation."""
    known = informative(stats)
    width = GROWTH * stats.span
    clipped_lo = jnp.where(known, jnp.maximum(lo, stats.lo - width), lo)
    clipped_hi = jnp.where(known, jnp.minimum(hi, stats.lo + stats.span + width), hi)
    decay = jnp.where(known, config.ema_decay, 0.0)
    new_lo = decay * stats.lo + (1 - decay) * clipped_lo
    new_span = decay * stats.span + (1 - decay) * _finite_span(clipped_lo, clipped_hi)
    observed = seen(lo, hi)
    return Stats(
        lo=jnp.where(observed, new_lo, stats.lo),
        span=jnp.where(observed, new_span, stats.span),
        count=stats.count + jnp.any(observed).astype(stats.count.dtype),
    )


def packing_range(stats: Stats, lo: jax.Array, hi: jax.Array) -> Stats:
    """The range a tensor packs with, given its measured (lo, hi): the running estimate where
    it is informative, else the tensor's own range (a first observation). A select, not a
    branch: no conditional in the compiled step (a lax.cond is a host round trip on a GPU)."""
    own_lo, own_hi = arithmetic.range_or_zero(lo, hi)
    known = informative(stats)
    return Stats(jnp.where(known, stats.lo, own_lo), jnp.where(known, stats.span, _finite_span(own_lo, own_hi)),
                 stats.count)


def update(stats: Stats, x: jax.Array, config: QuantConfig, layout: Layout = "channels") -> Stats:
    """Pure running-estimate update of ``stats`` with the tensor ``x``."""
    return fold_range(stats, *group_min_max(x, layout, stats.lo.shape[0]), config)


def _finite_span(lo: jax.Array, hi: jax.Array) -> jax.Array:
    # hi - lo overflows to inf for float32 extremes; inf would make every code NaN.
    return jnp.minimum(hi - lo, jnp.finfo(jnp.float32).max)


# ------------------------------------------------------- stochastic rounding


def noise(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """U[0, 1) float32 noise of every element: the hash of (seed, flat element index)."""
    return uniform(seed, jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape))


def layer_seed(path: str, count: jax.Array) -> jax.Array:
    """The seed a layer at module ``path`` packs with at its ``count``-th update."""
    return combine(jnp.uint32(zlib.crc32(path.encode())), jnp.asarray(count).astype(jnp.uint32))


# -------------------------------------------------------------- pack / unpack


def _check_groups(x: jax.Array, stats: Stats, config: QuantConfig, layout: Layout) -> None:
    groups = num_groups_for(x.shape, layout, config)
    if stats.lo.shape != (groups,):
        raise ValueError(
            f"statistics have {stats.lo.shape[0]} groups but a {layout} tensor of shape "
            f"{x.shape} needs {groups}"
        )


def _affine(x: jax.Array, stats: Stats, config: QuantConfig, layout: Layout):
    """Per-group float32 (shift, scale, inverse scale) of x; checks the statistics fit x.

    No reciprocal of a quotient and no division by a constant: XLA's simplifier
    rewrites those (``a / c`` into ``a * (1 / c)``) inside some programs and not in
    others, and the codes must not depend on which program packs.
    """
    _check_groups(x, stats, config, layout)
    span = jnp.maximum(stats.span.astype(jnp.float32), EPS)
    return stats.lo.astype(jnp.float32), span * (1.0 / config.levels), config.levels / span


def quantize(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout):
    """Codes (uint32, one per element) and the per-group (scale, shift) of x."""
    shift, scale, inv_scale = _affine(x, stats, config, layout)
    xg = regroup(x, grouped_shape(x.shape, layout, shift.shape[0])).astype(jnp.float32)
    u = noise(seed, xg.shape) if config.stochastic else 0.5
    codes = arithmetic.quantize(xg, _per_group(shift), _per_group(inv_scale), u, config.levels)
    return regroup(codes.astype(jnp.uint32), x.shape), scale, shift


def normalize_rows(x: jax.Array, moments=None) -> jax.Array:
    """x, or ``(x - mean) * rstd`` row by row (in >= float32) for ``moments=(mean, rstd)``.

    LayerNorm keeps its normalized input; passing the row moments instead of the
    normalized tensor lets a kernel normalize in the read it packs with.
    """
    if moments is None:
        return x
    mean, rstd = moments
    return arithmetic.normalize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), mean, rstd)


def pack(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels",
         normalized_by=None) -> Packed:
    """Quantize x (or normalize_rows(x, normalized_by)) with the given statistics and pack
    the codes into bytes, with the reference or the kernels (config.backend):
    both give identical words."""
    return _pack_measure(x, stats, config, seed, layout, normalized_by)[0]


def pack_and_update(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels",
                    normalized_by=None) -> tuple[Packed, Stats]:
    """Pack x for the backward pass and fold its per-group range into the running ``stats``.

    x is packed with the range estimated *before* it (what falls outside is clamped), or
    with its own range where there is no informative estimate yet (``packing_range``: the
    first observation, a batch after an empty one); its range, measured first, then updates
    the estimate (``fold_range``). ``config.update_first`` is Mesa's order instead: update
    the estimate with x, then pack with it. Both read x twice (measure, pack): XLA:GPU runs
    the pack as its own pass either way, and its plan shows the same bytes for both orders.
    """
    packed, lo, hi = pack_and_measure(x, stats, config, seed, layout, normalized_by)
    return packed, fold_range(stats, lo, hi, config)


def pack_and_measure(x: jax.Array, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels",
                     normalized_by=None) -> tuple[Packed, jax.Array, jax.Array]:
    """(x packed as pack_and_update packs it, x's per-group finite min, max).

    Traced once per signature (``jit(inline=True)``: the trace's equations are copied into
    each call, so the program is the one a plain call gives): a model's identical blocks
    share one trace of their packing, where tracing each site's own was half the Python time
    of compiling a compressed step.
    """
    _check_groups(x, stats, config, layout)
    return _pack_and_measure(x, stats, seed, normalized_by, config=config, layout=layout)


@functools.partial(jax.jit, static_argnames=("config", "layout"), inline=True)
def _pack_and_measure(x, stats: Stats, seed, normalized_by, *, config: QuantConfig, layout: Layout):
    if by_rows(x.shape, layout, stats.lo.shape[0], config):  # no estimate needed
        # the row's range, then its codes: two reads of x; the barrier makes them reads of one
        # buffer (XLA:CPU otherwise fuses LayerNorm's normalization into both, keeping its inputs)
        x, normalized_by = jax.lax.optimization_barrier((x, normalized_by))
        return _pack_measure(x, stats, config, seed, layout, normalized_by)

    def measure_then_pack(x, stats, seed, normalized_by):
        lo, hi = group_min_max(normalize_rows(x, normalized_by), layout, stats.lo.shape[0])
        with_range = fold_range(stats, lo, hi, config) if config.update_first else packing_range(stats, lo, hi)
        return pack(x, with_range, config, seed, layout, normalized_by), lo, hi

    return kept_whole_on_cpu(measure_then_pack, x, stats, seed, normalized_by)


def kept_whole_on_cpu(fn, x, stats: Stats, *args):
    """``fn(x, stats, *args)``; on XLA:CPU inside a conditional whose predicate is always true
    (but not known to XLA, unless the statistics are constants).

    XLA:CPU drops optimization barriers before fusing, then fuses the packing into the
    backward pass, where it recomputes the codes from x: the float tensor stays alive and
    the packed copy never exists (DeiT-S batch 128 bfloat16: a 3.1 GiB peak, not 2.2). A
    conditional is a boundary it keeps. Other platforms keep the barriers and run ``fn`` as
    it is: on a GPU a conditional costs a host round trip (lax.platform_dependent resolves
    the platform when the program is lowered, not at run time).
    """
    def in_conditional(*a):
        # the other branch never runs; it differs from fn's so that XLA hoists nothing out of
        # the conditional (a convert to the codes' dtype, found at the root of both, would be)
        nothing = lambda *a: jax.tree.map(jnp.zeros_like, fn(*a))  # fn's types (and shardings); fn is dead code
        return jax.lax.cond(jnp.all(a[1].span >= 0), fn, nothing, *a)  # spans are never negative

    return jax.lax.platform_dependent(x, stats, *args, cpu=in_conditional, default=fn)


def _pack_measure(x, stats: Stats, config: QuantConfig, seed, layout: Layout, normalized_by):
    """(x packed with ``stats``, x's per-group min, max): one read of x under the kernels."""
    groups = stats.lo.shape[0]
    # the kernels need a non-empty grid; an empty tensor has nothing to pack anyway
    backend = pallas_kernels.XLA if x.size == 0 else config.backend
    if by_rows(x.shape, layout, groups, config):
        return _pack_rows(x, config, seed, layout, normalized_by, groups, backend)
    if not backend.kernels:
        xn = normalize_rows(x, normalized_by)
        codes, scale, shift = quantize(xn, stats, config, seed, layout)
        words = pack_codes(codes, config.bits)
        lo, hi = group_min_max(xn, layout, groups)
    else:
        shift, scale, inv_scale = _affine(x, stats, config, layout)
        words, row_lo, row_hi = kernels.pack(x, shift, inv_scale, seed, layout=layout, bits=config.bits,
                                             stochastic=config.stochastic, normalized_by=normalized_by,
                                             interpret=backend.interpret)
        view = grouped_shape(row_lo.shape, layout, groups)  # [..., 1] per head-row, [..., G] per row
        lo, hi = _group_range(regroup(row_lo, view), regroup(row_hi, view))
    dtype = x.dtype if normalized_by is None else jnp.promote_types(x.dtype, jnp.float32)
    return Packed(words, scale, shift, x.shape, jnp.dtype(dtype), config.bits, layout, backend), lo, hi


ROW_MIN = 16  # row ranges need at least this many elements per range (an RGB pixel's 3 would triple its bytes)


def by_rows(shape: tuple[int, ...], layout: Layout, groups: int, config: QuantConfig) -> bool:
    """Whether a tensor packs with row ranges: asked for, and rows long enough to pay for
    their 4 bytes of scale and shift (shorter ones keep the running range)."""
    return config.ranges == "row" and bool(shape) and row_view(shape, layout, groups)[-1] >= ROW_MIN


def row_view(shape: tuple[int, ...], layout: Layout, groups: int) -> tuple[int, ...]:
    """Row ranges: ``shape[:-1] + (Gr, C // Gr)``, one range per row of the last axis and
    channel group (Gr = the groups for "channels", else 1: a head's rows are its own)."""
    axis = arithmetic.group_axis(shape, layout)
    split = groups if axis is None or axis == len(shape) - 1 else 1
    return (*shape[:-1], split, shape[-1] // split)


def _pack_rows(x, config: QuantConfig, seed, layout: Layout, normalized_by, groups: int, backend):
    """(x packed with each row's own range, x's per-group min, max for the running statistics)."""
    if not backend.kernels:
        xn = normalize_rows(x, normalized_by)
        xr = regroup(xn, row_view(x.shape, layout, groups)).astype(jnp.float32)
        finite = jnp.isfinite(jax.lax.stop_gradient(xr))
        raw_lo, raw_hi = _min_max(jnp.where(finite, xr, jnp.inf), jnp.where(finite, xr, -jnp.inf), (xr.ndim - 1,))
        shift, scale = arithmetic.row_affine(*arithmetic.range_or_zero(raw_lo, raw_hi), config.levels)
        u = noise(seed, xr.shape) if config.stochastic else 0.5
        codes = arithmetic.quantize(xr, shift[..., None], 1.0 / scale[..., None], u, config.levels)
        words = pack_codes(regroup(codes.astype(jnp.uint32), x.shape), config.bits)
    else:  # the range of a row, then its codes, from one read of the row
        words, raw_lo, raw_hi, shift, scale = kernels.pack_with_row_ranges(
            x, seed, layout=layout, groups=groups, bits=config.bits, stochastic=config.stochastic,
            normalized_by=normalized_by, interpret=backend.interpret)
    axis = arithmetic.group_axis(x.shape, layout)
    by_group = (-1 if axis is None or axis == x.ndim - 1 else axis)  # the axis of raw_lo holding the groups
    view = grouped_shape(raw_lo.shape, by_group, groups)
    lo, hi = _group_range(regroup(raw_lo, view), regroup(raw_hi, view))
    dtype = x.dtype if normalized_by is None else jnp.promote_types(x.dtype, jnp.float32)
    packed = Packed(words, scale.astype(ROW_SCALE_DTYPE), shift.astype(ROW_SCALE_DTYPE), x.shape, jnp.dtype(dtype),
                    config.bits, layout, backend, rows=True)
    return packed, lo, hi


ROW_SCALE_DTYPE = jnp.bfloat16  # 4 bytes of scale and shift per row and group (arithmetic.row_affine's grid)


def unpack(p: Packed) -> jax.Array:
    """The dequantized tensor, in the original shape and dtype, by the backend that packed it."""
    if p.backend.kernels:
        return kernels.unpack(p.words, p.shift, p.scale, shape=p.shape, dtype=p.dtype, layout=p.layout,
                              bits=p.bits, interpret=p.backend.interpret, row_ranges=p.rows)
    codes = unpack_codes(p.words, p.bits, p.shape[-1])
    compute = jnp.promote_types(p.dtype, jnp.float32)  # float64 stays exact: code * scale has < 53 bits
    if p.rows:  # [..., Gr] pairs: each row's per channel group
        groups = p.scale.shape[-1]
        view, shift, scale = (*p.shape[:-1], groups, p.shape[-1] // groups), p.shift[..., None], p.scale[..., None]
    else:  # [G] pairs
        view = grouped_shape(p.shape, p.layout, p.scale.shape[0])
        shift, scale = _per_group(p.shift), _per_group(p.scale)
    x = arithmetic.dequantize(regroup(codes, view).astype(compute), shift.astype(compute), scale.astype(compute))
    return regroup(x, p.shape).astype(p.dtype)


SIGN_BITS = 1


def pack_signs(x: jax.Array) -> Packed:
    """Whether each element of x is positive, as 1-bit codes eight to a byte: ReLU's derivative,
    exactly (it needs no range). Unpacks to 1 and 0 in x's dtype."""
    one = jnp.ones((1,), jnp.float32)
    words = pack_codes((x > 0).astype(jnp.uint32), SIGN_BITS)
    return Packed(words, one, jnp.zeros_like(one), x.shape, x.dtype, SIGN_BITS, "channels", pallas_kernels.XLA)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """[..., C] codes -> [..., ceil(C * bits / 8)] words (bytes), lowest bits first.

    Words never straddle rows (each row is padded to whole words), so a kernel
    working on rows writes its words independently of its neighbours.
    """
    length, per_word = codes.shape[-1], arithmetic.codes_per_word(bits)
    if per_word == 1:
        return codes.astype(WORD)
    words = arithmetic.words_per_row(length, bits)
    c = jnp.pad(codes.astype(jnp.uint32), [(0, 0)] * (codes.ndim - 1) + [(0, words * per_word - length)])
    lanes = c.reshape(*c.shape[:-1], words, per_word) << _lane_shifts(bits, c.ndim + 1)
    return jnp.bitwise_or.reduce(lanes, axis=-1).astype(WORD)


def unpack_codes(words: jax.Array, bits: int, length: int) -> jax.Array:
    """Inverse of pack_codes: [..., W] words -> [..., length] uint32 codes."""
    words = words.astype(jnp.uint32)
    if arithmetic.codes_per_word(bits) == 1:
        return words
    lanes = (words[..., None] >> _lane_shifts(bits, words.ndim + 1)) & jnp.uint32(2**bits - 1)
    return lanes.reshape(*words.shape[:-1], words.shape[-1] * arithmetic.codes_per_word(bits))[..., :length]


def _lane_shifts(bits: int, ndim: int) -> jax.Array:
    """Bit offsets of the codes within a word, on the last of ``ndim`` axes."""
    lanes = jnp.arange(arithmetic.codes_per_word(bits), dtype=jnp.uint32)
    return arithmetic.lane_shift(bits, lanes).reshape((1,) * (ndim - 1) + (-1,))


def fake_quantize(x, stats: Stats, config: QuantConfig, seed, layout: Layout = "channels"):
    """unpack(pack(x)): what the backward pass of an op sees instead of x."""
    return unpack(pack(x, stats, config, seed, layout))
