"""Strict settings for every test, and the shapes tests and benchmarks share."""

import os

# Tests compile over a thousand small programs: XLA:CPU's code generation dominates the run,
# their execution does not. LLVM at level 0 and XLA:CPU's older fusion emitters (half the
# compile time of a small program) cut it; HLO passes (and so XLA's buffer assignment, which
# the memory tests read) are unaffected. Set before jax creates its backend.
# XLA aborts on a flag it does not know: the emitter flag only for the jaxlib it was measured on.
from jaxlib import version as _jaxlib  # noqa: E402 (does not start jax's backend)

FAST_COMPILE = "--xla_backend_optimization_level=0" + (
    " --xla_cpu_use_fusion_emitters=false" if _jaxlib.__version__.startswith("0.10.") else "")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")
# Tests build the same small models again and again (each training run jits afresh):
# XLA's persistent cache, shared by the xdist workers, compiles each program once (every
# program: even a small one's compilation costs more than reading it back).
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def first_fast(values):
    """Parametrize one argument with ``values``: the first in the default run, the rest under
    -m slow (the same check where each case costs compilations)."""
    return [v if i == 0 else pytest.param(v, marks=pytest.mark.slow) for i, v in enumerate(values)]


# [..., C] activations: odd token counts on purpose (197 = DeiT's 196 patches + cls).
CHANNEL_SHAPES = [(2, 5, 8), (3, 7, 16)]
# [B, H, N, M] attention tensors.
HEAD_SHAPES = [(2, 3, 5, 5), (1, 4, 7, 6)]


def conditionals(lowered) -> int:
    """The conditionals of a lowered program that choose at run time: ``stablehlo.case`` ops with
    more than one branch that computes something (lax.platform_dependent's choice of the
    platform's branch is resolved when XLA compiles: its branches only return constants)."""
    count = 0
    for op in _walk(lowered.compiler_ir("stablehlo").operation):
        if op.name in ("stablehlo.case", "stablehlo.if"):
            working = [r for r in op.regions
                       if any(o.name not in ("stablehlo.constant", "stablehlo.return") for o in r.blocks[0].operations)]
            count += len(working) > 1 or (op.name == "stablehlo.if")
    return count


def _walk(op):
    yield op
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                yield from _walk(inner.operation)


@pytest.fixture
def key():
    return jax.random.key(0)
