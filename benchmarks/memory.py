"""Peak memory of one training step: baseline vs nn.remat vs mesa, compiled not run.

    python -m benchmarks.memory                       # DeiT-Ti/S/B, 224x224, batch 128
    python -m benchmarks.memory --models deit-s --batches 32 64 128 256 --plot mem.png
    python -m benchmarks.memory --models deit-s --budget-gib 16    # + largest batch that fits
    python -m benchmarks.memory --models deit-s --scan --no-max-batch   # nn.scan over the blocks
    python -m benchmarks.memory --models deit-s --image-sizes 224 384 512 --methods baseline flash_like mesa8 \
        --no-max-batch                                                  # memory against tokens
    python -m benchmarks.memory --models deit-s --dtypes float32 --methods baseline mesa8 --nnx --no-max-batch
                                            # + the NNX ViT-S/16 compressed in place (mesa_jax.nnx)
    python -m benchmarks.memory --models deit-s --dtypes float32 --methods baseline mesa8 --resnet --no-max-batch
                                            # + a Linen ResNet-18 (BatchNorm, ReLU), as flax's example writes one
    python -m benchmarks.memory --targets cpu h100 --no-max-batch   # + XLA:GPU's plan for an H100
    python -m benchmarks.memory --models deit-s --dtypes bfloat16 --methods baseline flash_like mesa8 \
        --targets h100 --only-max-batch                     # largest batch in the H100's memory

For each model, dtype, batch and method: XLA's compile-time peak bytes of the
jitted, state-donating train step (forward, backward, AdamW update) for each target
(``--targets``: cpu, gpu, h100, h200 or a description's path; see mesa_jax.plan), its
ratio to the baseline's, and the bytes autodiff keeps for the backward pass, in all and
per token and block (in bytes and in units of the width C); then what XLA made of each
compiled step (mesa_jax.memory.ProgramReport). Nothing is executed, so this runs on a
laptop CPU. XLA:CPU's peak is not a GPU's (it keeps bfloat16 as float32, fuses and
schedules otherwise, drops optimization barriers); an H100/H200 target is XLA:GPU's own
plan, compiled without the GPU (pip install -e ".[gpu-plan]").
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import linen_resnet, step_memory
from mesa_jax import memory, plan
from mesa_jax import models
from mesa_jax.models import vit

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
DEFAULT_METHODS = ("baseline", "remat_nothing", "remat_dots", "mesa8")
TARGET_LABELS = {"cpu": "XLA:CPU peak", "gpu": "GPU plan", "h100": "H100 plan", "h200": "H200 plan"}
DEFAULT_BUDGET_GIB = 16.0  # the largest-batch search's budget where the target's memory is unknown (the CPU)


def rows(model_names, dtypes, batches, methods, scan: bool = False, image_sizes=(None,), targets=("cpu",)):
    """(label, dtype, batch, method, StepMemory, model) for every combination, baseline first."""
    for name in model_names:
        for size in image_sizes:
            sized = ({} if size is None else {"image_size": size}) | ({"scan": True} if scan else {})
            label = name + (f" @{size}" if size else "") + (" (scan)" if scan else "")
            for dtype in dtypes:
                for batch in batches:
                    for method in methods:
                        model = step_memory.build(name, method, DTYPES[dtype], **sized)
                        yield label, dtype, batch, method, step_memory.measure(model, batch, targets), model


def per_token_block(m, model, batch: int) -> float | None:
    """Residual bytes per token and block (the whole model's residuals: embedding and head
    included); ViT/DeiT only (a pyramid's stages differ in tokens and width)."""
    if model is None:  # the NNX ViT-S/16
        return m.residuals / (batch * 197 * 12)
    if not isinstance(model, vit.ViT):
        return None
    tokens = (model.image_size // model.patch_size) ** 2 + 1
    return m.residuals / (batch * tokens * model.depth)


def budget(target: plan.Target, budget_gib: str | float | None) -> int:
    """The search's budget in bytes: ``budget_gib`` GiB, or a percentage of the target's memory
    ("75%": jax's default share of a GPU), or (None) all of it; 16 GiB where it is unknown (the CPU)."""
    memory_bytes = target.memory_bytes or int(DEFAULT_BUDGET_GIB * 2**30)
    if budget_gib is None:
        return memory_bytes
    if isinstance(budget_gib, str) and budget_gib.endswith("%"):
        return int(memory_bytes * float(budget_gib[:-1]) / 100)
    return int(float(budget_gib) * 2**30)


def searched(target: plan.Target) -> plan.Target:
    """The target a search compiles for: a GPU description's programs as written (XLA:GPU would
    rematerialize past about 60 GiB on an H100, and the plan stop growing with the batch)."""
    return plan.without_rematerialization(target) if target.compiler_options else target


def max_batches(model_names, dtypes, methods, targets, budgets_gib=(None,), start: int = 64,
                known: dict | None = None):
    """(model, dtype, method, target, budget bytes, largest batch, a multiple of 8, whose step peak
    fits the budget), for each budget in ``budgets_gib`` (None: the target's memory). ``known``
    maps (model, dtype, method, batch, target name) to peaks already measured (the batch-128
    table's, below any rematerialization limit), so the search does not compile them again."""
    known = {} if known is None else known
    for target in targets:
        for name in model_names:
            for dtype in dtypes:
                for method in methods:
                    model = step_memory.build(name, method, DTYPES[dtype])

                    def peak(batch, model=model, method=method, name=name, dtype=dtype):
                        key = (name, dtype, method, batch, target.name)
                        if key not in known:
                            report = step_memory.compile_step(model, batch, searched(target))
                            known[key] = report.peak
                            print(f"  {name} {dtype} {method} batch {batch} on {target.name}: "
                                  f"{report.peak / 2**30:.2f} GiB ({report.compile_s:.0f} s)", file=sys.stderr, flush=True)
                        return known[key]

                    for budget_gib in budgets_gib:
                        limit = budget(target, budget_gib)
                        found = memory.max_batch_size(peak, limit, start=start, multiple=8, limit=8192)
                        yield name, dtype, method, target.name, limit, found
                    jax.clear_caches()  # a long search compiles many programs: free each row's


def max_batch_table(results):
    """Lines of the largest-batch table, each as soon as its row is measured (slow rows)."""
    yield "| model | dtype | method | target | budget GiB | largest batch |"
    yield "|---|---|---|---|---:|---:|"
    for name, dtype, method, target, budget_bytes, batch in results:
        yield f"| {name} | {dtype} | {method} | {target} | {budget_bytes / 2**30:.1f} | {batch} |"


def _mib(b) -> str:
    return f"{b / 2**20:,.0f}"


def table(results) -> str:
    """Peak and ratio per target (column pairs), residual bytes, per token and block."""
    targets = list(dict.fromkeys(t for *_, m, _ in results for t in m.reports))
    header = "".join(f" {TARGET_LABELS.get(t, t + ' plan')} MiB | baseline / method |" for t in targets)
    lines = [f"| model | dtype | batch | method |{header} residuals MiB | B / token / block |",
             "|---|---|---:|---|" + "---:|---:|" * len(targets) + "---:|---:|"]
    baseline = {}
    for name, dtype, batch, method, m, model in results:
        if method == "baseline":
            baseline[name, dtype, batch] = m
        ref = baseline.get((name, dtype, batch))
        peaks = ""
        for t in targets:
            report = m.reports.get(t)
            ratio = f"{ref.reports[t].peak / report.peak:.2f}x" if ref and report and t in ref.reports else "-"
            peaks += f" {_mib(report.peak) if report else '-'} | {ratio} |"
        per_token = per_token_block(m, model, batch)
        width = 384 if model is None else getattr(model, "width", 1)
        per_token = "-" if per_token is None else f"{per_token:,.0f} ({per_token / width:.1f} C)"
        lines.append(f"| {name} | {dtype} | {batch} | {method} |{peaks} {_mib(m.residuals)} | {per_token} |")
    return "\n".join(lines)


def report_table(results) -> str:
    """What XLA made of each compiled step (mesa_jax.memory.ProgramReport), one line per target."""
    lines = ["| model | dtype | batch | method | target | peak MiB | temp | arguments | outputs - aliased | "
             "fusions | cuBLAS | cuDNN | Triton | conditionals | while loops | GB accessed | GFLOP (not GEMM) | "
             "compile s | of which tracing s |",
             "|---|---|---:|---|---|" + "---:|" * 14]
    for name, dtype, batch, method, m, _ in results:
        for t, r in m.reports.items():
            lib = r.libraries
            accessed = "-" if r.bytes_accessed is None else f"{r.bytes_accessed / 1e9:,.1f}"
            flops = "-" if r.flops is None else f"{r.flops / 1e9:,.0f}"
            lines.append(
                f"| {name} | {dtype} | {batch} | {method} | {t} | {_mib(r.peak)} | {_mib(r.memory.temp)} | "
                f"{_mib(r.memory.argument)} | {_mib(r.memory.output - r.memory.alias)} | {sum(r.fusions.values())} | "
                f"{lib.get('cublas', 0)} | {lib.get('cudnn', 0)} | {lib.get('triton', 0)} | {r.conditionals} | "
                f"{r.while_loops} | {accessed} | {flops} | {r.compile_s:.0f} | {r.trace_s:.1f} |")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, dtype, batch, method, m, _ in results:
        series.setdefault((name, dtype, method), []).append((batch, m.peak / 2**30))  # the first target's
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(step_memory.METHODS)}
    styles = {"float32": "-", "bfloat16": "--"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, dtype, method), points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, styles[dtype], marker="o", color=colours[method], label=f"{name} {dtype} {method}")
    ax.set(xlabel="batch size", ylabel="peak GiB (compile-time, XLA)", title="Training-step peak memory")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit-ti", "deit-s", "deit-b"], choices=models.names())
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[128])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=step_memory.METHODS)
    parser.add_argument("--scan", action="store_true", help="nn.scan over the blocks (scan=True)")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[None], metavar="PIXELS",
                        help="image sizes (default: the preset's); tokens = (size / patch)^2 + 1")
    parser.add_argument("--plot", metavar="PNG", help="also plot peak memory against batch size")
    parser.add_argument("--targets", "--target", nargs="+", default=["cpu"], metavar="TARGET",
                        help="compile for: cpu (default), gpu (this machine's), h100, h200 (XLA:GPU without a GPU: "
                             'pip install -e ".[gpu-plan]"), or the path of a GPU description (.txtpb)')
    parser.add_argument("--budget-gib", nargs="+", default=[None], metavar="GIB",
                        help="memory budgets of the largest-batch search, in GiB or as a share of the target's "
                             "memory (75%%: jax's default share of a GPU); default: the target's memory (16 GiB "
                             "for the CPU)")
    parser.add_argument("--max-batch-start", type=int, default=64, metavar="BATCH",
                        help="the search's first batch (default: 64; the batches of the table are not compiled again)")
    parser.add_argument("--nnx", action="store_true",
                        help="also the NNX ViT-S/16 (benchmarks.nnx_vit), float32, baseline and mesa8, with "
                             "DeiT-S's exact GELU, with the documentation's tanh GELU, with ReLU, and with attention "
                             "and a GeGLU MLP written by hand as gemma's (and mesa8 with those products exact)")
    parser.add_argument("--resnet", action="store_true",
                        help="also the Linen ResNet-18 (benchmarks.linen_resnet), float32: baseline, mesa8, and mesa8 "
                             "with BatchNorm and ReLU run as flax does")
    parser.add_argument("--only-max-batch", action="store_true", help="only the largest-batch search")
    parser.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                        help="skip the largest-batch search (a few compilations per row)")
    args = parser.parse_args(argv)
    if "baseline" not in args.methods:
        args.methods.insert(0, "baseline")
    try:
        targets = [plan.resolve(t) for t in args.targets]
    except (RuntimeError, ValueError) as e:  # no plugin, an unknown name, an unreadable description
        parser.error(str(e))
    if args.only_max_batch:
        return print_max_batches(args, targets, {})
    start = time.time()
    results = list(rows(args.models, args.dtypes, args.batches, args.methods, args.scan, args.image_sizes, targets))
    if args.nnx:
        by_hand = ("baseline", "mesa8_exact_products", "mesa8")
        for name, activation, attention, mlp, methods in (
                ("nnx vit-s16", "gelu", "flax", "flax", ("baseline", "mesa8")),
                ("nnx vit-s16, tanh gelu", "gelu_tanh", "flax", "flax", ("baseline", "mesa8")),
                ("nnx vit-s16, relu", "relu", "flax", "flax", ("baseline", "mesa8")),
                ("nnx vit-s16, einsum attention", "gelu", "einsum", "flax", by_hand),
                ("nnx vit-s16, einsum attention, GeGLU", "gelu", "einsum", "gated", by_hand)):
            measure = functools.partial(step_memory.measure_nnx, activation=activation, attention=attention, mlp=mlp,
                                        targets=targets)
            results += [(name, "float32", batch, method, measure(method, batch), None)
                        for batch in args.batches for method in methods]
    if args.resnet:
        measure = functools.partial(step_memory.measure_resnet, targets=targets)
        results += [("resnet-18", "float32", batch, method, measure(method, batch), linen_resnet.ResNet())
                    for batch in args.batches for method in ("baseline", "mesa8_no_bn_relu", "mesa8")]
    print(f"compile-time peak of one train step for {', '.join(t.name for t in targets)}; jax {jax.__version__}, "
          f"{time.time() - start:.0f} s")
    print(table(results))
    print()
    print(report_table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.max_batch:
        known = {(name, dtype, method, batch, t): r.peak for name, dtype, batch, method, m, _ in results
                 for t, r in m.reports.items()}
        print_max_batches(args, targets, known)


def print_max_batches(args, targets, known) -> None:
    results = max_batches(args.models, args.dtypes, args.methods, targets, args.budget_gib, args.max_batch_start, known)
    for line in max_batch_table(results):
        print(line, flush=True)


if __name__ == "__main__":
    main()
