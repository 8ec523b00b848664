"""What an op keeps for its backward pass, as data that flows between ops.

An op packs what it keeps *before* its custom_vjp (``keep``, in the primal computation)
and hands the residual to it; its forward ties the residual to its output
(``materialize``), its backward restores it once the cotangent exists (``restore``).
Inside ``sharing()`` an activation several ops keep is packed once, and an op's output that
the next op keeps (LayerNorm -> Dense, GELU -> Dense, softmax -> matmul) is kept as a
function of the first op's residual (``share``, ``Derived``), also inside a scanned body,
whose custom_vjp forwards JAX traces one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mesa_jax import quant
from mesa_jax.quant import Layout, Packed, QuantConfig, Stats

RESIDUAL_NAME = "mesa_residual"  # checkpoint_name of every kept activation


class _Running(threading.local):
    depth = 0


_running = _Running()


def own(fwd):
    """Mark a custom_vjp forward as mesa's own computation: compress intercepts nothing inside
    it. JAX may trace a forward long after the call that made it (a differentiated nn.scan
    body), while compress's scope is still open; the baseline code an op runs (jax.nn.gelu,
    flax's attention) must stay the baseline's then."""

    @functools.wraps(fwd)
    def wrapped(*args, **kwargs):
        _running.depth += 1
        try:
            return fwd(*args, **kwargs)
        finally:
            _running.depth -= 1

    return wrapped


def running() -> bool:
    """Whether this thread is inside an op's forward."""
    return _running.depth > 0


def keep(x, stats: Stats | None, seed, config: QuantConfig | None, layout: Layout = "channels", normalized_by=None):
    """(what the backward pass keeps of x, the statistics updated with it): packed codes,
    or x itself in exact mode. ``normalized_by``: keep quant.normalize_rows(x, normalized_by).
    Called in the primal computation: the residual is data, not differentiated.

    Inside ``sharing()``: an op's output another op shared (``share``) is kept as that
    op's residual, and the statistics are returned unchanged (``stats`` may be None); an
    array another op already packed (the same object, layout and config) is not packed
    again, and its measured range is folded into this op's statistics.
    """
    if config is None:
        return (x if normalized_by is None else lax.stop_gradient(quant.normalize_rows(x, normalized_by))), stats
    residual = shared(x) if normalized_by is None else None
    if residual is not None:
        return residual, stats
    key = (id(x), layout, config) if normalized_by is None and _shared.packed is not None else None
    if key is not None and _current(_shared.packed.get(key)):
        _, _, packed, lo, hi = _shared.packed[key]
    else:
        packed, lo, hi = quant.pack_and_measure(*lax.stop_gradient((x, stats)), config, seed, layout,
                                                lax.stop_gradient(normalized_by))
        packed = checkpoint_name(packed, RESIDUAL_NAME)
        if key is not None:
            _shared.packed[key] = (x, _trace(), packed, lo, hi)  # x held: its id stays its own
    return packed, quant.fold_range(stats, lo, hi, config)


def keep_signs(x, config: QuantConfig | None):
    """What ReLU keeps of x: whether each element is positive, one bit each (quant.pack_signs),
    or x itself in exact mode."""
    if config is None:
        return x
    return checkpoint_name(quant.pack_signs(lax.stop_gradient(x)), RESIDUAL_NAME)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["source", "args"], meta_fields=["fn"])
@dataclasses.dataclass(frozen=True)
class Derived:
    """An activation kept as ``fn(restored source, *args)``: the residual of the op that
    produced it, e.g. LayerNorm's output as x_hat * scale + bias of LayerNorm's packed x_hat,
    GELU's output as gelu of GELU's packed input. It costs no bytes of its own."""

    source: Packed
    args: tuple
    fn: Any


class _Shared(threading.local):
    packed: dict | None = None  # (id(x), layout, config) -> (x, trace, Packed, lo, hi)
    outputs: dict | None = None  # id(y) -> (y, trace, residual): ops' outputs kept by their residuals


def _trace():
    return jax.extend.core.get_opaque_trace_state()


def _current(entry) -> bool:
    """Whether a table entry was made in the trace now running: an array passed unchanged into
    several traces (a vmapped layer's broadcast input) is another value in each."""
    return entry is not None and entry[1] == _trace()


_shared = _Shared()


@contextlib.contextmanager
def sharing():
    """Keep each activation once, for the ops run (traced) inside: a tensor several ops keep
    (an attention layer's q/k/v input) is packed once, an op's output the next op keeps is
    kept by the first op's residual (``share``)."""
    outer = _shared.packed, _shared.outputs
    if _shared.packed is None:
        _shared.packed, _shared.outputs = {}, {}
    try:
        yield
    finally:
        _shared.packed, _shared.outputs = outer


def share(y, kept, fn=None, *args):
    """Within ``sharing()``: an op that keeps ``y`` (this op's output) keeps ``kept`` (this op's
    residual), or ``Derived(kept, args, fn)``, instead of packing y. Packed residuals only:
    exact mode keeps what JAX keeps."""
    if _shared.outputs is not None and isinstance(kept, Packed):
        residual = kept if fn is None else Derived(kept, args, fn)  # args: parameters, not copied
        _shared.outputs[id(y)] = (y, _trace(), residual)  # y held: its id stays its own


def shared(x):
    """The residual another op shares for ``x`` (see ``share``), or None."""
    entry = None if _shared.outputs is None else _shared.outputs.get(id(x))
    return entry[2] if _current(entry) else None


def restore(res, g):
    """The activation a residual stands for, unpacked only once the cotangent exists.

    Without a dependency on ``g`` XLA is free to unpack (and transpose, for a
    matmul) early in the forward pass, keeping float copies alive: exactly the
    memory mesa exists to save. The optimization barrier expresses the
    dependency on GPU; XLA:CPU drops barriers, so the words also get a data
    dependency on the cotangent that changes no value (``after``).
    """
    if isinstance(res, Derived):
        x, g = restore(res.source, g)
        return res.fn(x, *(after(a, g) for a in res.args)), g
    if not isinstance(res, Packed):
        return res, g
    res, g = lax.optimization_barrier((res, g))
    return quant.unpack(dataclasses.replace(res, words=after(res.words, g))), g


def after(a, g):
    """``a`` bit for bit, as a value that depends on the cotangent ``g`` on XLA:CPU: what a
    backward reads of the forward (a residual, a parameter it broadcasts) is then computed
    there, not kept from the forward (XLA:CPU drops optimization barriers, and merges a
    parameter's [B, N, C] broadcast in the forward with the backward's, keeping it alive in
    between). Other platforms keep the barriers, and get ``a`` itself: on XLA:GPU the
    dependency costs a pass over every residual (DeiT-S batch 128 bfloat16 on the H100
    plan: 3.6 GB moved and 319 fusions).

    ``min(w, w | b) == w`` for unsigned integers, whatever ``b`` (here the summed bits of
    g's first channel, 0 if g is empty), and XLA's simplifier does not know it. The first
    channel of every row, not g's first element: a batch-sharded g cannot be sliced to one
    element under explicit sharding.
    """
    if a is None:
        return None
    return lax.platform_dependent(a, g, cpu=_tied, default=lambda a, g: a)


def _tied(a, g):
    first = g[..., :1] if g.ndim else g
    bits = lax.bitcast_convert_type(first, jnp.dtype(f"uint{8 * first.dtype.itemsize}")).astype(jnp.uint32)
    bits = jnp.sum(bits, dtype=jnp.uint32)  # a scalar; sharded g: a sum all-reduce (no OR one on CPU)
    uint = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
    w = a if a.dtype == uint else lax.bitcast_convert_type(a, uint)
    w = jnp.minimum(w, w | bits.astype(uint))
    return w if a.dtype == uint else lax.bitcast_convert_type(w, a.dtype)


def fused_kernel(res) -> bool:
    """Whether the backward of a residual runs a fused Pallas kernel (unpack + formula)."""
    return isinstance(res, Packed) and res.backend.kernels


def kernel_args(res: Packed) -> dict:
    return dict(bits=res.bits, row_ranges=res.rows, interpret=res.backend.interpret)


def materialize(y, *kept):
    """Tie packed residuals to the forward output, so the codes are written in the forward.

    Returns the residuals themselves, not the barrier's copies: a residual several ops
    keep stays one value (one stacked output of a scanned body, not one per op).
    """
    if not any(isinstance(k, (Packed, Derived)) for k in kept):
        return y, kept
    y, _ = lax.optimization_barrier((y, kept))
    return y, kept
