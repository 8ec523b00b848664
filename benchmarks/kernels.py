"""Kernel throughput: Pallas vs the XLA reference, as achieved memory bandwidth.

    python -m benchmarks.kernels --peak-gbs 4800         # on a GPU (H200: 4.8 TB/s)
    python -m benchmarks.kernels --scale 0.05 --backend triton-interpret   # a CPU smoke run

Shapes are DeiT-S's at batch 128 (times ``--scale`` on the batch): the tensors
LayerNorm, GELU and softmax keep. For each kernel (the forward's pack, which also
measures the per-group range, LayerNorm's normalizing as well; unpack; the op's
fused backward, timed alone on prepared residuals): median time over repeats,
bytes read + written, GB/s, and the fraction of ``--peak-gbs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from mesa_jax import QuantConfig, ops, quant

SHAPES = {"block input [B, 197, 384]": ((128, 197, 384), "layer_norm"),
          "mlp hidden [B, 197, 1536]": ((128, 197, 1536), "gelu"),
          "attention [B, 6, 197, 197]": ((128, 6, 197, 197), "softmax")}


def cases(shape, op_name, dtype, backend: str):
    """{kernel: (function, its arguments, bytes read + written)} for the tensor an op keeps."""
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    layout = "heads" if op_name == "softmax" else "channels"
    groups = shape[1] if layout == "heads" else 6
    config = QuantConfig(num_groups=1 if layout == "heads" else groups, backend=backend)
    moments = ops.row_moments(x) if op_name == "layer_norm" else None
    kept = ops.normalized_input(x)[0] if op_name == "layer_norm" else jax.nn.softmax(x) if op_name == "softmax" else x
    stats = quant.stats_of(kept, layout, groups)
    seed = jnp.uint32(1)
    op = {"gelu": lambda t: ops.gelu(t, stats, seed, config)[0],
          "softmax": lambda t: ops.softmax(t, stats, seed, config)[0],
          "layer_norm": lambda t: ops.layer_norm(t, None, None, stats, seed, config)[0]}[op_name]
    pack = lambda t: quant.pack_and_update(t, stats, config, seed, layout, moments)
    packed = jax.jit(pack)(x)[0]
    backward = jax.vjp(op, x)[1]  # its residuals are arguments of the timed function
    words, io = packed.words.nbytes, x.nbytes
    return {
        "pack + min/max" + (" (normalizing)" if moments else ""): (pack, (x,), io + words),
        "unpack": (quant.unpack, (packed,), words + io),
        f"{op_name} backward": (lambda f, g: f(g), (backward, jnp.ones_like(x)), words + 2 * io),
    }


def time_it(fn, args, repeats: int) -> list[float]:
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        out.append(time.perf_counter() - start)
    return out


def run(impls, scale: float, dtype, repeats: int, peak_gbs: float):
    rows = []
    for label, (shape, op_name) in SHAPES.items():
        shape = (max(1, round(shape[0] * scale)), *shape[1:])
        for impl in impls:
            for name, (fn, args, nbytes) in cases(shape, op_name, dtype, impl).items():
                seconds = statistics.median(time_it(fn, args, repeats))
                gbs = nbytes / seconds / 1e9
                rows.append(dict(tensor=label, shape=shape, kernel=name, impl=impl, ms=seconds * 1e3,
                                 gb_per_s=gbs, of_peak=gbs / peak_gbs))
    return rows


def table(rows) -> str:
    lines = ["| tensor | kernel | impl | ms | GB/s | of peak |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['tensor']} | {r['kernel']} | {r['impl']} | {r['ms']:.3f} | {r['gb_per_s']:.0f} | "
              f"{r['of_peak']:.0%} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["xla", "triton"], choices=["xla", "triton", "triton-interpret"])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of batch 128 (default: 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="memory bandwidth to compare with")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(args.backend, args.scale, jnp.dtype(args.dtype), args.repeats, args.peak_gbs)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {args.dtype}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
