"""XLA's plan for one training step on a target, without running it: the measuring tool for a step.

    python -m benchmarks.step_plan --target h100 --model deit-s --batch 128 --dtype bfloat16 \
        --methods baseline flash_like mesa8
    python -m benchmarks.step_plan --target h200 --methods mesa8 --backend triton   # the Pallas kernels
    python -m benchmarks.step_plan --target h100 --methods mesa8 --dump /tmp/mesa8      # + XLA's dumps
    python -m benchmarks.step_plan --compare results/gpu     # gpu_check.sh's real peaks beside the plans
    python -m benchmarks.step_plan --methods baseline mesa8 --repeat 3 --scan   # compile time: least of 3

For each method: the jitted, state-donating train step (forward, backward, AdamW) compiled
for the target (h100, h200 or a description's path: XLA:GPU without a GPU, pip install -e
".[gpu-plan]"; gpu: this machine's; cpu), as one table line of mesa_jax.memory.ProgramReport
and, with --json, one JSON object per line. --dump keeps XLA's dumps per method
(DIR/METHOD/*memory-usage-report.txt: the buffers live at the peak; *buffer-assignment.txt;
the optimized HLO) and prints the largest buffers live at the peak and the kernels' traffic
by what they do (pack, unpack, library GEMMs, Triton fusions, other fusions). --repeat N
compiles the methods N times in turn and reports each one's least compile time, and least
time of jax's tracing and lowering within it (a shared machine's compile times vary by 15%
from run to run; the other columns are deterministic);
--scan compiles the models with nn.scan over their blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import os
import re

from benchmarks import memory as memory_bench, step_memory
from mesa_jax import hlo, models, plan


def peak_buffers(dump_dir: str, top: int = 8) -> list[str]:
    """The ``top`` largest buffers live at the peak, from XLA's live-range dump (GPU) of the step."""
    found = sorted(glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations-live-range.txt")))
    if not found:
        return []
    text = open(found[-1]).read()
    section = text.split("(peak):", 1)[-1] if "(peak):" in text else ""
    sizes = re.findall(r"^\s+(\S+): (\d+) bytes", section, re.M)
    return [f"{name}: {int(size) / 2**20:,.1f} MiB" for name, size in sorted(sizes, key=lambda s: -int(s[1]))[:top]]


def live_temp(dump_dir: str):
    """(temp allocation bytes, instruction names in program order, live temporary bytes at each)
    from XLA:GPU's buffer assignment and live ranges of the step; None without them."""
    def read(suffix):
        found = sorted(glob.glob(os.path.join(dump_dir, f"*train_step*after_optimizations-{suffix}.txt")))
        return open(found[-1]).read() if found else None

    assignment, ranges = read("buffer-assignment"), read("live-range")
    temp = assignment and re.search(r"allocation \d+: size (\d+), preallocated-temp:(.*?)(?=\nallocation |\Z)",
                                    assignment, re.S)
    if not temp or not ranges:
        return None
    sizes = dict(re.findall(r"value: <\d+ (\S+) @\d+> \(size=(\d+),", temp.group(2)))
    order, spans = ranges.split("BufferLiveRange:", 1)
    names = [name for _, name in re.findall(r"^\s+(\d+):(\S+)$", order, re.M)]
    change = [0] * (len(names) + 1)
    for value, start, end in re.findall(r"^\s+(\S+):(\d+)-(\d+)$", spans.split("Live ranges at")[0], re.M):
        size = int(sizes.get(value.removesuffix("{}"), 0))  # a non-tuple value: "name{}" there, "name" here
        change[int(start)] += size
        change[min(int(end) + 1, len(names))] -= size
    live = list(itertools.accumulate(change[:-1]))
    return int(temp.group(1)), names, live


def headroom(dump_dir: str) -> list[str]:
    """The least headroom below the planned temporaries at the custom calls of each library
    (cuBLAS, cuDNN, ...): a workspace there raises the peak only by what exceeds it."""
    found = live_temp(dump_dir)
    programs = sorted(glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt")))
    if not found or not programs:
        return []
    calls = dict(re.findall(r'^\s+(?:ROOT )?%(\S+) = .*custom-call\(.*custom_call_target="([^"]+)"',
                            open(programs[-1]).read(), re.M))
    temp, names, live = found
    least: dict[str, list[int]] = {}
    for name, b in zip(names, live):
        if name in calls:
            least.setdefault(hlo.library(calls[name]), []).append(temp - b)
    return [f"least headroom at the {len(at)} {lib} calls: {min(at) / 2**20:,.0f} MiB" for lib, at in least.items()]


def traffic(dump_dir: str) -> dict[str, tuple[int, int]]:
    """hlo.traffic of the step's optimized program in XLA's dumps ({} without them)."""
    programs = sorted(glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt")))
    return hlo.traffic(open(programs[-1]).read()) if programs else {}


def compare(out_dir: str) -> str:
    """The steps gpu_check.sh ran (step_NAME.txt, device_step's JSON): real step time, compile
    time and real peak, beside XLA's compile-time plan of the program that ran and a
    description's plan (plan.json from --json, when one was made for the same methods)."""
    planned = {}
    if os.path.exists(os.path.join(out_dir, "plan.json")):
        for line in open(os.path.join(out_dir, "plan.json")):
            row = json.loads(line)
            planned[row["method"]] = row
    lines = ["| step | ms | time / baseline | compile s | real peak MiB | compiled on this GPU MiB | "
             "description plan MiB | real / description plan |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    results = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "step_*.txt"))):
        rows = [json.loads(l) for l in open(path) if l.startswith("{")]
        results[os.path.basename(path)[5:-4]] = rows[-1] if rows else None
    base = (results.get("baseline") or {}).get("step_s")
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"
    for name, real in results.items():
        if real is None:
            lines.append(f"| {name} | (no result: see step_{name}.txt) | | | | | | |")
            continue
        peak, plan_there = real.get("peak_bytes"), planned.get(real["method"], {})
        here, there = real.get("plan", {}).get("memory", {}).get("peak"), plan_there.get("memory", {}).get("peak")
        ratio = f"{peak / there:.3f}" if peak and there else "-"
        slower = f"{real['step_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {1e3 * real['step_s']:.1f} | {slower} | {real.get('compile_s', 0):.0f} | {mib(peak)} | "
                     f"{mib(here)} | {mib(there)} {plan_there.get('target', '')} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="h100", help="h100 (default), h200, a description's path, gpu or cpu")
    parser.add_argument("--model", default="deit-s", choices=models.names())
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=list(memory_bench.DTYPES))
    parser.add_argument("--methods", nargs="+", default=["baseline", "mesa8"], choices=step_memory.METHODS)
    parser.add_argument("--backend", default="xla", choices=["xla", "triton"], help="who packs mesa's residuals")
    parser.add_argument("--dump", metavar="DIR", help="keep XLA's dumps in DIR/METHOD")
    parser.add_argument("--json", metavar="FILE", help="also write one JSON object per method to FILE")
    parser.add_argument("--compare", metavar="DIR", help="only print gpu_check.sh's real peaks in DIR beside the plans")
    parser.add_argument("--repeat", type=int, default=1, help="compile each method this many times, in turn")
    parser.add_argument("--scan", action="store_true", help="nn.scan over the blocks (models with a scan field)")
    args = parser.parse_args(argv)
    if args.compare:
        return print(compare(args.compare))
    try:
        target = plan.resolve(args.target)
    except (RuntimeError, ValueError) as e:
        parser.error(str(e))
    results, fastest = [], {}
    overrides = {"scan": True} if args.scan else {}

    def least(method, report):
        """(compile, tracing) seconds: the least of ``method``'s compiles so far, this one's included."""
        these = report.compile_s, report.trace_s
        fastest[method] = tuple(map(min, these, fastest.get(method, these)))
        return fastest[method]

    for _, method in itertools.product(range(args.repeat - 1), args.methods):  # the runs before the reported one
        model = step_memory.build(args.model, method, memory_bench.DTYPES[args.dtype], args.backend, **overrides)
        least(method, step_memory.compile_step(model, args.batch, target))
    for method in args.methods:
        model = step_memory.build(args.model, method, memory_bench.DTYPES[args.dtype], args.backend, **overrides)
        dump = os.path.join(args.dump, method) if args.dump else None
        report = step_memory.compile_step(model, args.batch, target, dump_to=dump)
        compile_s, trace_s = least(method, report)
        report = dataclasses.replace(report, compile_s=compile_s, trace_s=trace_s)
        results.append((args.model, args.dtype, args.batch, method, step_memory.StepMemory(0, {target.name: report}), None))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "method": method,
                                    "scan": args.scan, **report.as_dict()}) + "\n")
        if dump:
            kernels = [f"{kind}: {count} kernels, {moved / 1e9:.1f} GB of operands and outputs"
                       for kind, (count, moved) in traffic(dump).items()]
            print(f"{method}: largest buffers live at the peak ({dump}):", *peak_buffers(dump), *headroom(dump),
                  *kernels, sep="\n  ", flush=True)
    print(memory_bench.report_table(results))


if __name__ == "__main__":
    main()
