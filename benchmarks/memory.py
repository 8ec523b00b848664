"""Peak memory of one training step: baseline vs nn.remat vs mesa, compiled not run.

    python -m benchmarks.memory                       # DeiT-Ti/S/B, 224x224, batch 128
    python -m benchmarks.memory --models deit-s --batches 32 64 128 256 --plot mem.png
    python -m benchmarks.memory --models deit-s --budget-gib 16    # + largest batch that fits
    python -m benchmarks.memory --models deit-s --scan --no-max-batch   # nn.scan over the blocks
    python -m benchmarks.memory --models deit-s --image-sizes 224 384 512 --methods baseline flash_like mesa8 \
        --no-max-batch                                                  # memory against tokens
    python -m benchmarks.memory --models deit-s --dtypes float32 --methods baseline mesa8 --nnx --no-max-batch
                                            # + the NNX ViT-S/16 compressed in place (mesa_jax.nnx)

For each model, dtype, batch and method: XLA's compile-time peak bytes of the
jitted, state-donating train step (forward, backward, AdamW update), its ratio to
the baseline's, and the bytes autodiff keeps for the backward pass, in all and per
token and block (in bytes and in units of the width C). Nothing is
executed, so this runs on a laptop CPU; on XLA:CPU the peak can understate what
mesa saves (it drops optimization barriers), the residual bytes cannot.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import step_memory
from mesa_jax import memory
from mesa_jax import models
from mesa_jax.models import vit
from train import loop

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
DEFAULT_METHODS = ("baseline", "remat_nothing", "remat_dots", "mesa8")


def rows(model_names, dtypes, batches, methods, scan: bool = False, image_sizes=(None,)):
    """(label, dtype, batch, method, StepMemory, model) for every combination, baseline first."""
    for name in model_names:
        for size in image_sizes:
            sized = ({} if size is None else {"image_size": size}) | ({"scan": True} if scan else {})
            label = name + (f" @{size}" if size else "") + (" (scan)" if scan else "")
            for dtype in dtypes:
                for batch in batches:
                    for method in methods:
                        model = step_memory.build(name, method, DTYPES[dtype], **sized)
                        yield label, dtype, batch, method, step_memory.measure(model, batch), model


def per_token_block(m, model, batch: int) -> float | None:
    """Residual bytes per token and block (the whole model's residuals: embedding and head
    included); ViT/DeiT only (a pyramid's stages differ in tokens and width)."""
    if model is None:  # the NNX ViT-S/16
        return m.residuals / (batch * 197 * 12)
    if not isinstance(model, vit.ViT):
        return None
    tokens = (model.image_size // model.patch_size) ** 2 + 1
    return m.residuals / (batch * tokens * model.depth)


def max_batches(model_names, dtypes, methods, budget_bytes: int):
    """(model, dtype, method, largest batch, a multiple of 8, whose step peak fits the budget)."""
    tx = loop.make_optimizer(loop.learning_rate_schedule(1e-3, 10, 100), 0.05)
    for name in model_names:
        for dtype in dtypes:
            for method in methods:
                model = step_memory.build(name, method, DTYPES[dtype])
                shape = (model.image_size, model.image_size, 3)
                def peak(batch, model=model, shape=shape):
                    began = time.perf_counter()
                    bytes_ = loop.step_memory(model, tx, batch, shape).peak
                    print(f"  {name} {dtype} {method} batch {batch}: {bytes_ / 2**30:.2f} GiB "
                          f"({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
                    return bytes_

                yield name, dtype, method, memory.max_batch_size(peak, budget_bytes, start=64, multiple=8, limit=8192)
                jax.clear_caches()  # a long search compiles many programs: free each row's


def max_batch_table(results, budget_gib: float):
    """Lines of the largest-batch table, each as soon as its row is measured (slow rows)."""
    yield f"| model | dtype | method | largest batch under {budget_gib:g} GiB |"
    yield "|---|---|---|---:|"
    for name, dtype, method, batch in results:
        yield f"| {name} | {dtype} | {method} | {batch} |"


def table(results) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"
    lines = [
        "| model | dtype | batch | method | peak MiB | baseline / method | residuals MiB | B / token / block |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    baseline = {}
    for name, dtype, batch, method, m, model in results:
        if method == "baseline":
            baseline[name, dtype, batch] = m.peak
        ref = baseline.get((name, dtype, batch))
        ratio = f"{ref / m.peak:.2f}x" if ref else "-"
        per_token = per_token_block(m, model, batch)
        width = 384 if model is None else getattr(model, "width", 1)
        per_token = "-" if per_token is None else f"{per_token:,.0f} ({per_token / width:.1f} C)"
        lines.append(f"| {name} | {dtype} | {batch} | {method} | {mib(m.peak)} | {ratio} | {mib(m.residuals)} | "
                     f"{per_token} |")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, dtype, batch, method, m, _ in results:
        series.setdefault((name, dtype, method), []).append((batch, m.peak / 2**30))
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
    parser.add_argument("--budget-gib", type=float, default=16.0,
                        help="memory budget of the largest-batch search (default: 16)")
    parser.add_argument("--nnx", action="store_true",
                        help="also the NNX ViT-S/16 (benchmarks.nnx_vit), float32, baseline and mesa8, with "
                             "DeiT-S's exact GELU and with the documentation's tanh GELU")
    parser.add_argument("--only-max-batch", action="store_true", help="only the largest-batch search")
    parser.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                        help="skip the largest-batch search (a few compilations per row)")
    args = parser.parse_args(argv)
    if "baseline" not in args.methods:
        args.methods.insert(0, "baseline")
    if args.only_max_batch:
        return print_max_batches(args)
    start = time.time()
    results = list(rows(args.models, args.dtypes, args.batches, args.methods, args.scan, args.image_sizes))
    if args.nnx:
        for name, approximate in (("nnx vit-s16", False), ("nnx vit-s16, tanh gelu", True)):
            measure = functools.partial(step_memory.measure_nnx, approximate_gelu=approximate)
            results += [(name, "float32", batch, method, measure(method, batch), None)
                        for batch in args.batches for method in ("baseline", "mesa8")]
    print(f"compile-time peak of one train step; jax {jax.__version__} on {jax.default_backend()}, "
          f"{time.time() - start:.0f} s")
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.max_batch:
        print_max_batches(args)


def print_max_batches(args) -> None:
    budget = int(args.budget_gib * 2**30)
    for line in max_batch_table(max_batches(args.models, args.dtypes, args.methods, budget), args.budget_gib):
        print(line, flush=True)


if __name__ == "__main__":
    main()
