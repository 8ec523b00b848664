"""What a training step keeps for its backward pass, and what it needs at its peak.

Both are answered without running anything: ``saved_residuals`` traces, and
``compiled_memory`` / ``peak_bytes`` / ``compiled_report`` compile and read XLA's memory
analysis, so a DeiT-B step at batch 128 can be sized on a laptop CPU. ``target`` says
for what: jax's default device (``None``), ``"cpu"``, this machine's ``"gpu"``, or an
H100/H200 described to XLA:GPU (``"h100"``, ``"h200"``, a description's path; see
``mesa_jax.plan``), so "does this fit on an H100?" has an answer without one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax._src import ad_checkpoint as _ad_checkpoint  # the engine of print_saved_residuals
from jax._src import api_util, core

from mesa_jax import hlo, plan


class Residual(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype | jax.typing.DTypeLike  # PRNG keys keep their extended dtype
    nbytes: int
    source: str  # "from the argument x" or "output of <primitive> from <file:line>"


class CompiledMemory(NamedTuple):
    """XLA's compile-time buffer assignment of one program, in bytes."""

    temp: int
    argument: int
    output: int
    alias: int  # outputs that reuse (donated) argument buffers

    @property
    def peak(self) -> int:
        return self.temp + self.argument + self.output - self.alias


def saved_residuals(fn: Callable, *args) -> list[Residual]:
    """The arrays reverse-mode autodiff of ``fn(*args)`` keeps, with where each came from.

    Each array counts once: an array several ops keep (mesa's shared residuals), or that
    an ``optimization_barrier`` passes on (mesa ties residuals to outputs with one; XLA
    aliases them), is one buffer.
    """
    leaves, tree = jax.tree.flatten(args)
    flat = lambda *leaves: fn(*jax.tree.unflatten(tree, leaves))
    closed, shapes = jax.make_jaxpr(lambda *leaves: jax.vjp(flat, *leaves), return_shape=True)(*leaves)
    jaxpr = closed.jaxpr
    kept = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(shapes[1])):]
    passed_on = {out: v for eqn in jaxpr.eqns if eqn.primitive.name == "optimization_barrier"
                 for out, v in zip(eqn.outvars, eqn.invars)}

    def origin(v):
        while not isinstance(v, core.Literal) and v in passed_on:
            v = passed_on[v]
        return v

    unique = list({id(v): v for v in map(origin, kept)}.values())
    arg_names = api_util.debug_info("saved_residuals", fn, args, {}).arg_names or ("",) * len(leaves)  # per leaf
    found = _ad_checkpoint._saved_residuals(jaxpr.replace(outvars=unique), arg_names)
    return [Residual(tuple(aval.shape), aval.dtype, _nbytes(aval), source) for aval, source in found]


def residual_bytes(fn: Callable, *args) -> int:
    """Total bytes of ``saved_residuals(fn, *args)``."""
    return sum(r.nbytes for r in saved_residuals(fn, *args))


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program: its memory and what XLA made of it (see ``mesa_jax.hlo``)."""

    target: str  # what it was compiled for: "cpu", "gpu", "h100", "h200", a description's path
    memory: CompiledMemory  # peak and its parts
    fusions: dict[str, int]  # launched fusions by kind (kLoop, kInput, kOutput, __triton_gemm, ...)
    custom_calls: dict[str, int]  # by target (__cublas$gemm, __cudnn$convForward, __gpu$xla.gpu.triton, ...)
    conditionals: int
    while_loops: int
    bytes_accessed: float | None  # XLA's cost analysis; None where it gives none
    flops: float | None  # the same analysis' arithmetic: on a GPU target, what is not cuBLAS/cuDNN
    compile_s: float  # tracing, lowering and compiling
    trace_s: float = 0.0  # of compile_s, jax's tracing and lowering (the rest is XLA's)

    @property
    def peak(self) -> int:
        return self.memory.peak

    @property
    def libraries(self) -> dict[str, int]:
        """Custom calls and kCustom fusions by the library that runs them: cublas, cudnn, triton, xla."""
        counts: dict[str, int] = {}
        for target, n in [*self.custom_calls.items(), *self.fusions.items()]:
            if target.startswith("k"):  # kLoop, kInput, kOutput: XLA's own fusions
                continue
            counts[hlo.library(target)] = counts.get(hlo.library(target), 0) + n
        return counts

    def as_dict(self) -> dict:
        """JSON-ready: the memory parts by name with the peak, and the library counts."""
        return {**dataclasses.asdict(self), "memory": {**self.memory._asdict(), "peak": self.peak},
                "libraries": self.libraries}


def compiled_memory(fn: Callable, *args, target=None) -> CompiledMemory:
    """Compile ``fn`` (jitted here unless it already is) for ``args`` (arrays or
    ShapeDtypeStructs) on ``target`` and read its memory analysis."""
    compiled, *_ = plan.compile(fn, *args, target=target)
    return compiled_analysis(compiled)


def compiled_report(fn: Callable, *args, target=None, dump_to: str | None = None) -> ProgramReport:
    """``compiled_memory`` and what the program is made of; ``dump_to`` keeps XLA's dumps."""
    compiled, seconds, tracing = plan.compile(fn, *args, target=target, dump_to=dump_to)
    return program_report(compiled, seconds, target, tracing)


def program_report(compiled, compile_s: float = 0.0, target=None, trace_s: float = 0.0) -> ProgramReport:
    """The report of an already compiled program."""
    counts, cost = hlo.count(compiled.as_text()), hlo.cost(compiled)
    name = plan.resolve(target).name if target is not None else jax.default_backend()
    return ProgramReport(name, compiled_analysis(compiled), counts.fusions, counts.custom_calls,
                         counts.conditionals, counts.while_loops, *(cost or (None, None)), compile_s, trace_s)


def compiled_analysis(compiled) -> CompiledMemory:
    """The memory analysis of an already compiled program (``jax.jit(f).lower(...).compile()``)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend gives no compile-time memory analysis")
    return CompiledMemory(
        temp=analysis.temp_size_in_bytes,
        argument=analysis.argument_size_in_bytes,
        output=analysis.output_size_in_bytes,
        alias=analysis.alias_size_in_bytes,
    )


def peak_bytes(fn: Callable, *args, target=None) -> int:
    """Compile-time peak bytes of ``jax.jit(fn)(*args)`` on ``target``: temporaries + arguments + outputs."""
    return compiled_memory(fn, *args, target=target).peak


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize


def max_batch_size(peak_of_batch: Callable[[int], int], budget_bytes: int, *, start: int = 8,
                   multiple: int = 1, limit: int = 1 << 16) -> int:
    """The largest batch (a multiple of ``multiple``) whose peak fits ``budget_bytes``.

    ``peak_of_batch(batch) -> bytes`` is usually a compile-only measurement such
    as ``peak_bytes``; it must grow with the batch. A step's peak is close to
    affine in the batch, so each guess is where the line through the two
    measurements nearest the budget meets it, kept strictly inside the bracket
    found so far; a guess that barely shrinks the bracket is followed by one
    bisection. About 3 compilations for an affine peak (each minutes for a Swin
    on a CPU), never much more than bisection's 2 log2(answer) otherwise.
    The answer is always checked, not predicted: it fits and the next multiple
    does not. Returns 0 if even ``multiple`` does not fit, and ``limit`` if the
    limit fits.
    """
    if budget_bytes <= 0 or multiple < 1 or start < 1:
        raise ValueError(f"need budget_bytes > 0, multiple >= 1, start >= 1; got {budget_bytes}, {multiple}, {start}")
    top = max(limit // multiple, 1)
    peaks: dict[int, int] = {}  # units of ``multiple`` -> peak bytes
    low, high = 0, top + 1  # invariant: low fits (or is 0), high does not fit (or is past the limit)
    guess, interpolated = min(max(start // multiple, 1), top), False
    while True:
        peaks[guess] = peak_of_batch(guess * multiple)
        near_an_end = high <= top and min(guess - low, high - guess) <= (high - low) // 4
        low, high = (guess, high) if peaks[guess] <= budget_bytes else (low, guess)
        if high - low <= 1:
            return min(low, top) * multiple
        if interpolated and near_an_end:  # the line barely shrank a closed bracket: halve it once
            guess, interpolated = (low + high) // 2, False
            continue
        guess, interpolated = _affine_guess(peaks, budget_bytes, low, high), True


def _affine_guess(peaks: dict[int, int], budget_bytes: int, low: int, high: int) -> int:
    """Where the line through the two measurements nearest the budget crosses it, inside (low, high)."""
    nearest = sorted(peaks.items(), key=lambda item: abs(item[1] - budget_bytes))[:2]
    if len(nearest) == 1:  # one measurement: a line from the origin, steeper than the truth, guesses low
        nearest.append((0, 0))
    (a, peak_a), (b, peak_b) = nearest
    slope = (peak_b - peak_a) / (b - a)
    guess = a + (budget_bytes - peak_a) / slope if slope > 0 else 2 * max(low, 1)
    return int(min(max(guess, low + 1), high - 1))
