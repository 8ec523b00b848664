"""Kernel throughput: Pallas vs the XLA reference, as achieved memory bandwidth.

    python -m benchmarks.kernels --peak-gbs 4800         # on a GPU (H200: 4.8 TB/s)
    python -m benchmarks.kernels --scale 0.05 --impl pallas_interpret   # a CPU smoke run

Shapes are DeiT-S's at batch 128 (times ``--scale`` on the batch). For each
kernel: median time over interleaved repeats, bytes read + written, GB/s, and
the fraction of ``--peak-gbs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import pallas_kernels
from mesa_jax import QuantConfig, ops, quant

SHAPES = {"mlp hidden [B, 197, 1536]": ((128, 197, 1536), "channels"),
          "attention [B, 6, 197, 197]": ((128, 6, 197, 197), "heads")}


def cases(shape, layout, dtype):
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    groups = 6 if layout == "channels" else shape[1]
    config = QuantConfig(num_groups=groups if layout == "channels" else 1)
    stats = quant.batch_stats(x, layout, groups)
    seed = jnp.uint32(1)
    packed = quant.pack(x, stats, config, seed, layout)
    g = jnp.ones_like(x)
    words = packed.words.nbytes
    io = x.nbytes
    op = (lambda t: ops.softmax(t, stats, seed, config)[0]) if layout == "heads" else (
        lambda t: ops.gelu(t, stats, seed, config)[0])
    return {
        "pack": (lambda: quant.pack(x, stats, config, seed, layout).words, io + words),
        "unpack": (lambda: quant.unpack(packed), words + io),
        ("softmax" if layout == "heads" else "gelu") + " backward": (
            lambda: jax.vjp(op, x)[1](g)[0], words + 2 * io),
    }


def time_it(fn, repeats: int) -> list[float]:
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted())
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted())
        out.append(time.perf_counter() - start)
    return out


def run(impls, scale: float, dtype, repeats: int, peak_gbs: float):
    rows = []
    for label, (shape, layout) in SHAPES.items():
        shape = (max(1, round(shape[0] * scale)), *shape[1:])
        for impl in impls:
            pallas_kernels.set_impl(impl)
            for name, (fn, nbytes) in cases(shape, layout, dtype).items():
                seconds = statistics.median(time_it(fn, repeats))
                gbs = nbytes / seconds / 1e9
                rows.append(dict(tensor=label, shape=shape, kernel=name, impl=impl, ms=seconds * 1e3,
                                 gb_per_s=gbs, of_peak=gbs / peak_gbs))
    pallas_kernels.set_impl(None)
    return rows


def table(rows) -> str:
    lines = ["| tensor | kernel | impl | ms | GB/s | of peak |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['tensor']} | {r['kernel']} | {r['impl']} | {r['ms']:.3f} | {r['gb_per_s']:.0f} | "
              f"{r['of_peak']:.0%} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", nargs="+", default=["xla", "pallas"], choices=pallas_kernels.IMPLS)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of batch 128 (default: 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="memory bandwidth to compare with")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(args.impl, args.scale, jnp.dtype(args.dtype), args.repeats, args.peak_gbs)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {args.dtype}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
