"""mesa_jax.memory, and the int8 residuals really existing in the compiled program."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import op_chains
from mesa_jax import memory, ops, quant
from mesa_jax.quant import QuantConfig

from op_cases import SEED, stats_of

SHAPE = (8, 32, 128)  # [B, N, C]; attention links view it as [B, 4, 32, 32]


# dense and conv are linear ops as matmul is; softmax keeps its output, GELU its input as LayerNorm
# keeps its normalized input: the default run compiles matmul and layer_norm, -m slow the rest
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n not in ("matmul", "layer_norm") else n
                                  for n in op_chains.OPS])
def test_compiled_step_keeps_int8_not_float(name):
    """Each extra link costs its packed residuals in the compiled program, not its floats.

    The bound comes from the int8 sizes autodiff reports; the float chain must cost
    several times more, or the test could not tell the two apart.
    """
    packed, mesa = op_chains.per_link(name, SHAPE, QuantConfig())
    _, baseline = op_chains.per_link(name, SHAPE, None)
    assert mesa <= 1.1 * packed, (name, mesa, packed)
    assert baseline >= 2.5 * packed, (name, baseline, packed)


def test_saved_residuals_reports_shapes_dtypes_bytes_and_sources():
    x = jnp.ones((2, 4, 8))
    found = memory.saved_residuals(lambda x: ops.gelu(x, stats_of(x), SEED, QuantConfig())[0], x)
    words = [r for r in found if r.dtype == quant.WORD and r.shape == (2, 4, 8)]  # 8-bit codes: a byte each
    assert len(words) == 1 and words[0].nbytes == 64
    assert all(isinstance(r.source, str) and r.source for r in found)
    exact = memory.saved_residuals(lambda x: ops.gelu(x, None, SEED, None)[0], x)
    assert [(r.shape, r.nbytes) for r in exact] == [((2, 4, 8), 256)]
    assert "argument" in exact[0].source


def test_peak_bytes_compiles_without_running():
    big = jax.ShapeDtypeStruct((1024, 1024, 64), jnp.float32)  # 256 MiB, never allocated
    report = memory.compiled_memory(lambda x: jnp.sin(x) * 2, big)
    assert report.argument == report.output == 2**28
    assert memory.peak_bytes(lambda x: jnp.sin(x) * 2, big) == report.peak >= 2**29
