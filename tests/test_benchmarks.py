"""The benchmarks' logic on tiny inputs: the largest-batch search, ratios, tables, comparisons."""

import dataclasses
import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import fidelity, memory as memory_bench, speed, step_memory
from mesa_jax import hlo, memory, plan
from mesa_jax.models import vit

TINY = dict(image_size=32, patch_size=8, width=24, depth=1, num_heads=2, mlp_dim=48, drop_path=0.0)


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(vit.PRESETS, "vit-test", TINY)


@pytest.mark.parametrize("answer", [1, 7, 8, 100, 1000])
def test_max_batch_search_on_an_affine_peak_needs_a_handful_of_compilations(answer):
    calls = []

    def peak(batch):
        calls.append(batch)
        return 1000 + 10 * batch

    assert memory.max_batch_size(peak, 1000 + 10 * answer + 5) == answer
    assert len(calls) <= 5


PEAKS = {"quadratic": lambda b: 10**6 + 4000 * b + 3 * b * b,
         "staircase": lambda b: 10**6 + 4000 * (b // 24 * 24) + 7 * b,
         "concave": lambda b: 10**6 + int(90_000 * b**0.5)}


@pytest.mark.parametrize("shape", PEAKS)
def test_max_batch_search_is_exact_when_the_peak_is_not_affine(shape):
    peak = PEAKS[shape]
    for budget in range(10**6, 4 * 10**7, 1_234_567):
        found = memory.max_batch_size(peak, budget, start=64, multiple=8, limit=8192)
        fitting = [b for b in range(8, 8193, 8) if peak(b) <= budget]
        assert found == (fitting[-1] if fitting else 0), budget


def test_max_batch_respects_multiple_limit_and_nothing_fitting():
    peak = lambda b: 10 * b
    assert memory.max_batch_size(peak, 10 * 100, multiple=8) == 96
    assert memory.max_batch_size(peak, 10**9, limit=64) == 64
    assert memory.max_batch_size(peak, 5) == 0
    with pytest.raises(ValueError, match="budget_bytes"):
        memory.max_batch_size(peak, 0)


@pytest.mark.slow
def test_max_batch_on_a_compiled_model_fits_and_the_next_does_not():
    model = step_memory.build("vit-test", "mesa8")
    tx = step_memory.loop.make_optimizer(step_memory.loop.learning_rate_schedule(1e-3, 1, 10), 0.0)
    peak = lambda b: step_memory.loop.step_memory(model, tx, b, (32, 32, 3)).peak
    budget = peak(24) + 1
    found = memory.max_batch_size(peak, budget, start=8, multiple=8, limit=256)
    assert found >= 24 and peak(found) <= budget < peak(found + 8)


@pytest.mark.slow  # two models compiled for one benchmark row
def test_the_jax_attention_baseline_computes_the_baseline_s_function(key):
    base, jax_attention = (step_memory.build("vit-test", m) for m in ("baseline", "jax_attention"))
    images = jax.random.normal(key, (2, 32, 32, 3))
    variables = base.init(jax.random.key(1), images)
    np.testing.assert_allclose(jax_attention.apply(variables, images), base.apply(variables, images),
                               rtol=1e-5, atol=1e-5)


def test_mesa_step_keeps_fewer_residual_bytes_than_the_baseline_and_the_flash_like_one():
    base, flash, mesa = (step_memory.residual_bytes(step_memory.build("vit-test", m), 16)
                         for m in ("baseline", "flash_like", "mesa8"))
    assert mesa < flash / 2 < base / 2


def test_row_ranges_add_only_their_scales_and_4_bits_keep_less():
    mesa, row, mix, int4 = (step_memory.residual_bytes(step_memory.build("vit-test", m), 16)
                            for m in ("mesa8", "mesa8_row", "mesa_mix48", "mesa4_row"))
    # vit-test: 2 heads of 12: rows of 12 keep the running range (quant.ROW_MIN); int8 row
    # ranges are one per token row: rows of 24 (48 in the MLP) gain 4 bytes of scale and shift
    assert mesa < row <= mesa * (1 + 4 / 24)
    assert int4 < mix < row  # 4-bit rows of 12 codes still fill whole words: the saving shows at real widths


def test_speed_ratios_are_medians_of_per_repeat_ratios():
    times = {"baseline": [1.0, 2.0, 1.0], "mesa8": [1.1, 2.4, 3.0]}
    assert speed.ratios(times) == {"baseline": 1.0, "mesa8": pytest.approx(1.2)}
    assert "| mesa8 |" in speed.table(times, batch=8)


def report(target, peak, **counts):
    parts = memory.CompiledMemory(temp=peak - 2**20, argument=2**20, output=0, alias=0)
    return memory.ProgramReport(target, parts, counts.get("fusions", {"kLoop": 3}), counts.get("custom_calls", {}),
                                counts.get("conditionals", 0), 0, 2e9, 7e9, 1.5, 0.5)


def test_memory_table_gives_ratios_per_target_against_the_same_row_s_baseline():
    m = lambda cpu, h100: step_memory.StepMemory(residuals=cpu // 2, reports={"cpu": report("cpu", cpu),
                                                                              "h100": report("h100", h100)})
    model = step_memory.build("vit-test", "baseline")  # 32 pixels in patches of 8: 16 + 1 tokens
    rows = [("vit-test", "float32", 8, "baseline", m(4 * 2**20, 3 * 2**20), model),
            ("vit-test", "float32", 8, "mesa8", m(2**20, 2 * 2**20), model)]
    text = memory_bench.table(rows)
    assert "| XLA:CPU peak MiB | baseline / method | H100 plan MiB | baseline / method |" in text.splitlines()[0]
    per_token = 2**19 / (8 * 17 * model.depth)
    assert (f"| vit-test | float32 | 8 | mesa8 | 1 | 4.00x | 2 | 1.50x | 0 | "
            f"{per_token:,.0f} ({per_token / model.width:.1f} C) |") in text
    lines = list(memory_bench.max_batch_table([("m", "bfloat16", "mesa8", "h100", 80 * 2**30, 96)]))
    assert "largest batch" in lines[0] and lines[-1] == "| m | bfloat16 | mesa8 | h100 | 80.0 | 96 |"


def test_report_table_counts_libraries_and_control_flow():
    m = step_memory.StepMemory(residuals=0, reports={"h100": report(
        "h100", 3 * 2**20, fusions={"kLoop": 5, "__triton_gemm": 2},
        custom_calls={"__cublas$lt$matmul": 4, "__cudnn$convForward": 1, "__gpu$xla.gpu.triton": 3}, conditionals=7)})
    line = memory_bench.report_table([("m", "bfloat16", 8, "mesa8", m, None)]).splitlines()[-1]
    assert line == "| m | bfloat16 | 8 | mesa8 | h100 | 3 | 2 | 1 | 0 | 7 | 4 | 1 | 5 | 7 | 0 | 2.0 | 7 | 2 | 0.5 |"


def test_the_search_budget_is_the_target_s_memory_unless_given():
    cpu, h100 = plan.Target("cpu", None), plan.Target("h100", None, memory_bytes=84942979072)
    assert memory_bench.budget(h100, None) == 84942979072 and memory_bench.budget(h100, "16") == 16 * 2**30
    assert memory_bench.budget(h100, "75%") == 84942979072 * 3 // 4 and memory_bench.budget(cpu, None) == 16 * 2**30
    assert memory_bench.searched(h100) == h100 and memory_bench.searched(plan.Target("h100", None, (("a", 1),))) \
        .compiler_options == (("a", 1), *plan.NO_REMAT)


@pytest.mark.slow  # two compilations of a step
def test_a_cpu_target_compiles_the_step_the_default_device_does():
    model = step_memory.build("vit-test", "mesa8")
    default, cpu = (step_memory.compile_step(model, 8, t) for t in (None, "cpu"))
    assert default.memory == cpu.memory and default.fusions == cpu.fusions and cpu.target == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(not any(plan._installed(f"jax_plugins.{n}") for n in plan.PLUGINS),
                    reason='needs the CUDA plugin: pip install -e ".[gpu-plan]"')
def test_steps_compile_for_an_h100_without_one():
    base, mesa = (step_memory.compile_step(step_memory.build("vit-test", m), 64, "h100") for m in ("baseline", "mesa8"))
    assert base.target == mesa.target == "h100" and 0 < base.peak < plan.resolve("h100").memory_bytes
    assert base.libraries.get("cublas", 0) > 0 and base.conditionals == 0  # GEMMs on cuBLAS: no autotuning here
    assert mesa.memory.argument > base.memory.argument  # the "mesa" statistics travel in the state


def test_fidelity_compare_finds_the_worst_parameter():
    exact = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 2.0])}
    approx = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 2.0])}
    f = fidelity.compare(approx, exact)
    assert f.worst_param == "b" and f.worst_cosine == pytest.approx(2 / 5**0.5)
    assert fidelity.compare(exact, exact).relative_error == 0.0 and f.zero == ()
    # an exactly-zero gradient has no meaningful cosine: counted apart, with mesa's norm there
    exact["key_bias"], approx["key_bias"] = jnp.zeros(2), jnp.array([0.0, 0.01])
    f = fidelity.compare(approx, exact)
    assert f.worst_param == "b" and f.zero == (("key_bias", pytest.approx(0.01 / 5**0.5)),)


def test_kernel_benchmark_times_every_kernel_of_every_tensor(monkeypatch):
    from benchmarks import kernels

    tiny = {"layer_norm": (1, 5, 12), "gelu": (1, 5, 12), "softmax": (1, 6, 5, 5)}
    monkeypatch.setattr(kernels, "SHAPES", {k: (tiny[op], op) for k, (_, op) in kernels.SHAPES.items()})
    rows = kernels.run(["xla"], scale=1.0, dtype=jnp.float32, repeats=1, peak_gbs=1.0)
    names = {r["kernel"] for r in rows}
    assert names == {"pack + min/max (normalizing)", "pack + min/max", "unpack", "layer_norm backward",
                     "gelu backward", "softmax backward"}
    assert all(r["ms"] > 0 and r["of_peak"] == r["gb_per_s"] for r in rows)
    assert "| softmax backward | xla |" in kernels.table(rows)


def test_training_runs_are_compared_with_their_own_seed_s_baseline():
    final = lambda loss, accuracy: ({"eval_loss": loss, "eval_accuracy": accuracy}, [])
    runs = {0: {"baseline": final(2.0, 0.60), "mesa": final(2.2, 0.58)},
            1: {"baseline": final(1.0, 0.50), "mesa": final(1.0, 0.51)}}
    differences = fidelity.paired_differences(runs)
    np.testing.assert_allclose(differences["mesa"], [(0.1, -0.02, 0.58), (0.0, 0.01, 0.51)], atol=1e-12)
    mean, error = fidelity.mean_and_error([c[1] for c in differences["mesa"]])
    assert mean == pytest.approx(-0.005) and error == pytest.approx(0.015)  # stdev 0.0212 / sqrt(2)


def test_headroom_at_library_calls_from_xla_s_dumps(tmp_path):
    from benchmarks import step_plan

    prefix = "module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations"
    (tmp_path / f"{prefix}-buffer-assignment.txt").write_text(
        "allocation 0: size 64, parameter 0:\n value: <1 p @0> (size=64,offset=0): f32[16]\n"
        "allocation 1: size 300, preallocated-temp:\n"
        " value: <2 a @0> (size=100,offset=0): f32[25]\n value: <3 gemm{0} @0> (size=200,offset=100): f32[50]\n"
        " value: <4 conv{0} @0> (size=40,offset=0): f32[10]\n")
    (tmp_path / f"{prefix}-live-range.txt").write_text(
        "HloLiveRange (max 3):\n  InstructionSequence:\n    0:p\n    1:a\n    2:gemm\n    3:conv\n"
        "  BufferLiveRange:\n    p{}:0-3\n    a{}:1-2\n    gemm{0}:2-2\n    conv{0}:3-3\n"
        "  Live ranges at 2 (peak):\n    a{}: 100 bytes\n")
    (tmp_path / f"{prefix}.txt").write_text(
        '  %gemm = (f32[50]{0}, s8[0]{0}) custom-call(%a), custom_call_target="__cublas$lt$matmul"\n'
        '  ROOT %conv = (f32[10]{0}, u8[0]{0}) custom-call(%gemm), custom_call_target="__cudnn$convForward"\n')
    assert step_plan.live_temp(str(tmp_path)) == (300, ["p", "a", "gemm", "conv"], [0, 100, 300, 40])
    assert step_plan.headroom(str(tmp_path)) == ["least headroom at the 1 cublas calls: 0 MiB",
                                                 "least headroom at the 1 cudnn calls: 0 MiB"]


def test_traffic_sorts_the_entry_s_kernels_by_what_they_do(tmp_path):
    from benchmarks import step_plan

    (tmp_path / "module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations.txt").write_text(
        "%fused_x (p: bf16[8]) -> u8[8] {\n  %p = bf16[8]{0} parameter(0)\n}\n\n"
        "ENTRY %main (x: bf16[8]) -> bf16[8] {\n"
        "  %x = bf16[8]{0} parameter(0)\n"
        "  %pack = (u8[8]{0}, f32[2]{0}) fusion(%x), kind=kInput, calls=%fused_x\n"
        "  %codes = u8[8]{0} get-tuple-element(%pack), index=0\n"
        "  %unpack = bf16[8]{0} fusion(%codes), kind=kLoop, calls=%fused_y\n"
        "  %gemm = (bf16[8]{0}, s8[4]{0}) custom-call(%unpack, %x), custom_call_target=\"__cublas$gemm\"\n"
        "  %softmax = bf16[8]{0} fusion(%x), kind=kCustom, calls=%triton_softmax\n"
        "  ROOT %add = bf16[8]{0} fusion(%softmax, %x), kind=kLoop, calls=%fused_add\n}\n")
    assert step_plan.traffic(str(tmp_path)) == {  # (kernels, bytes of operands and outputs)
        "library call": (1, 16 + 16 + 16 + 4), "packs (writes u8)": (1, 16 + 8 + 8), "other fusion": (1, 16 * 3),
        "Triton fusion": (1, 16 + 16), "unpacks (reads u8)": (1, 8 + 16)}
    assert hlo.array_bytes("(u8[8]{0}, f32[2,3]{1,0})") == 8 + 24


def test_gpu_check_results_are_set_beside_each_other(tmp_path):
    """step_plan --compare: one row per step file, labelled by the file (mesa8 ran twice:
    XLA and Pallas), its time against the baseline's, and its real peak against its plans."""
    from benchmarks import step_plan

    def step(name, method, step_s, peak):
        row = dict(method=method, step_s=step_s, compile_s=40.0, peak_bytes=peak,
                   plan={"memory": {"peak": peak - 2**20}})
        (tmp_path / f"step_{name}.txt").write_text("compile log\n" + json.dumps(row) + "\n")

    step("baseline", "baseline", 0.030, 7000 * 2**20)
    step("mesa8_pallas", "mesa8", 0.045, 2800 * 2**20)
    (tmp_path / "step_mesa8.txt").write_text("Traceback: killed at its time limit\n")
    table = step_plan.compare(str(tmp_path)).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(rows) == {"baseline", "mesa8", "mesa8_pallas"}
    assert "1.50x" in rows["mesa8_pallas"] and "2,800" in rows["mesa8_pallas"] and "2,799" in rows["mesa8_pallas"]
    assert "no result" in rows["mesa8"]


def test_step_plan_repeats_in_turn_and_reports_the_least_compile_time(monkeypatch, tmp_path, capsys):
    """--repeat 3: each method compiled three times, methods alternating (a shared machine's
    compile times drift), its least time and least tracing time reported; --scan builds the models with
    scan=True."""
    from benchmarks import step_plan

    built = []
    times = {"baseline": iter([(30.0, 2.0), (25.0, 2.2), (28.0, 1.9)]), "mesa8": iter([(50.0, 5.0), (47.0, 4.0), (46.0, 4.5)])}
    monkeypatch.setattr(step_memory, "build", lambda model, method, dtype, backend, **kw: built.append(
        (method, kw)) or method)
    report = memory.ProgramReport("cpu", memory.CompiledMemory(1, 2, 3, 0), {}, {}, 0, 0, 1e9, 1e9, 0.0)
    monkeypatch.setattr(step_memory, "compile_step", lambda method, batch, target, dump_to=None: dataclasses.replace(
        report, **dict(zip(("compile_s", "trace_s"), next(times[method])))))
    step_plan.main(["--target", "cpu", "--methods", "baseline", "mesa8", "--repeat", "3", "--scan",
                    "--json", str(tmp_path / "plan.json")])
    assert [m for m, _ in built] == ["baseline", "mesa8"] * 3 and all(kw == {"scan": True} for _, kw in built)
    rows = [json.loads(line) for line in (tmp_path / "plan.json").read_text().splitlines()]
    assert [(r["method"], r["compile_s"], r["trace_s"], r["scan"]) for r in rows] == [("baseline", 25.0, 1.9, True),
                                                                                      ("mesa8", 46.0, 4.0, True)]
