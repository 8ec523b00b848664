"""mesa_jax.plan and mesa_jax.hlo: target descriptions, the plugin check, a compiled program's report.

The default run needs no CUDA plugin: compiling for a GPU description skips where the plugin
(pip install -e ".[gpu-plan]") is absent.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from mesa_jax import hlo, memory, plan

HAS_PLUGIN = any(plan._installed(f"jax_plugins.{name}") for name in plan.PLUGINS)
needs_plugin = pytest.mark.skipif(not HAS_PLUGIN, reason='needs the CUDA plugin: pip install -e ".[gpu-plan]"')

# An optimized XLA:GPU module in miniature: one loop fusion, one Triton GEMM fusion, a cuBLAS call
# with a tuple shape, a conditional whose branch launches a fusion, a while loop; the fusion
# bodies' own instructions (a custom call inside one, too) launch nothing.
HLO = """\
HloModule jit_step, is_scheduled=true

%fused_add (param_0: bf16[8,4]) -> bf16[8,4] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  ROOT %add.1 = bf16[8,4]{1,0} add(%param_0, %param_0), metadata={op_name="jit(step)/while/add"}
}

%gemm_fusion_dot (parameter_0: bf16[8,4], parameter_1: bf16[4,4]) -> bf16[8,4] {
  %parameter_0 = bf16[8,4]{1,0} parameter(0)
  %parameter_1 = bf16[4,4]{1,0} parameter(1)
  %inner = (bf16[8,4]{1,0}, s8[0]{0}) custom-call(%parameter_0), custom_call_target="__cublas$gemm"
  ROOT %dot.0 = bf16[8,4]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%branch_0 (p: bf16[8,4]) -> bf16[8,4] {
  %p = bf16[8,4]{1,0} parameter(0)
  ROOT %loop_add_fusion.2 = bf16[8,4]{1,0} fusion(%p), kind=kLoop, calls=%fused_add
}

%body (t: bf16[8,4]) -> bf16[8,4] {
  ROOT %t = bf16[8,4]{1,0} parameter(0)
}

%cond (t.1: bf16[8,4]) -> pred[] {
  %t.1 = bf16[8,4]{1,0} parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main.9 (a: bf16[8,4], w: bf16[4,4], i: s32[]) -> bf16[8,4] {
  %a = bf16[8,4]{1,0} parameter(0)
  %w = bf16[4,4]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %loop_add_fusion = bf16[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_add
  %gemm = bf16[8,4]{1,0} fusion(%a, %w), kind=kCustom, calls=%gemm_fusion_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %cublas-lt-matmul.1 = (bf16[8,4]{1,0}, s8[4194304]{0}) custom-call(%a, %w), custom_call_target="__cublas$lt$matmul"
  %gte = bf16[8,4]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  %conditional = bf16[8,4]{1,0} conditional(%i, %gte), branch_computations={%branch_0}
  ROOT %while = bf16[8,4]{1,0} while(%conditional), condition=%cond, body=%body
}
"""


def test_counts_what_launches_outside_fusion_bodies():
    counts = hlo.count(HLO)
    assert counts.fusions == {"kLoop": 2, "__triton_gemm": 1}  # the branch's fusion counts, bodies do not
    assert counts.custom_calls == {"__cublas$lt$matmul": 1}
    assert (counts.conditionals, counts.while_loops) == (1, 1)
    assert [hlo.library(t) for t in ("__cublas$lt$matmul", "__cudnn$convForward", "__gpu$xla.gpu.triton",
                                      "__triton_gemm", "kLoop")] == ["cublas", "cudnn", "triton", "triton", "xla"]


def test_report_of_a_cpu_compile_has_memory_counts_and_bytes():
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    report = memory.compiled_report(lambda a: jnp.tanh(a @ a).sum(), x, target="cpu")
    assert report.target == "cpu" and report.memory.argument == 64 * 64 * 4 == report.peak - report.memory.temp - 4
    assert report.bytes_accessed and report.bytes_accessed >= 64 * 64 * 4 and report.compile_s > report.trace_s > 0
    assert report.conditionals == report.while_loops == 0


@pytest.mark.parametrize("name", sorted(plan.DESCRIPTIONS))
def test_shipped_descriptions_name_their_source_and_lose_only_unparsed_fields(name):
    path = plan.description_path(name)
    raw = path.read_text()
    assert "openxla/xla" in raw and "Apache License" in raw and "commit " in raw
    text = plan.read_description(path)
    setting = re.compile(r"^\s*collective_memory_granularity:", re.M)
    assert setting.search(raw) and not setting.search(text)
    assert len(raw.splitlines()) - len(text.splitlines()) == 1
    assert "device_memory_size:" in text and 'platform_name: "CUDA"' in text


def test_unknown_targets_and_a_missing_plugin_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown target 'h300'"):
        plan.resolve("h300")
    monkeypatch.setattr(plan, "_installed", lambda module: False)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[gpu-plan\]"') as error:
        plan.plugin_module()
    assert "\n" not in str(error.value)


def test_a_plugin_at_another_version_than_jaxlib_is_named(monkeypatch):
    monkeypatch.setattr(plan, "_installed", lambda module: module.endswith("xla_cuda12"))
    monkeypatch.setattr(plan.importlib.metadata, "version", lambda package: "0.0.1")
    with pytest.raises(RuntimeError, match="jax-cuda12-pjrt 0.0.1 does not match jaxlib"):
        plan.plugin_module()


@needs_plugin  # a fraction of a second each
@pytest.mark.parametrize("name", sorted(plan.DESCRIPTIONS))
def test_a_step_compiles_for_a_gpu_description_without_a_gpu(name):
    target = plan.resolve(name)
    assert target.memory_bytes > 80 * 10**9 and target.device.platform in ("cuda", "gpu")
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16)
    loss = lambda w, x: jnp.sum(jax.nn.gelu(x @ w).astype(jnp.float32) ** 2)
    report = memory.compiled_report(jax.grad(loss), w, x, target=name)
    assert report.target == name and report.memory.argument == (256 + 512) * 512 * 2
    assert report.libraries.get("cublas", 0) >= 2  # Triton GEMMs are off without autotuning: cuBLAS
    assert report.bytes_accessed > 0
