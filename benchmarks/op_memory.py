"""Per-op memory: float vs int8 residuals, and what the compiled gradient really keeps.

    python -m benchmarks.op_memory [--shape 32 64 256] [--bits 8]

For each op, a chain of Transformer-like links (benchmarks/op_chains.py) is
differentiated; the table gives the bytes ONE more link adds: kept by autodiff
(jaxpr level, arguments excluded) and compiled temp memory (XLA:CPU buffer
assignment). Nothing is executed.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks import op_chains
from mesa_jax.quant import QuantConfig


def rows(shape, config):
    for name in op_chains.OPS:
        kept_f, temp_f = op_chains.per_link(name, shape, None)
        kept_q, temp_q = op_chains.per_link(name, shape, config)
        yield name, kept_f, kept_q, temp_f, temp_q


def table(shape, config) -> str:
    mib = lambda b: f"{b / 2**20:8.2f}"
    lines = [
        f"per-link bytes (MiB), activation [B, N, C] = {list(shape)}, int{config.bits}, "
        f"jax {jax.__version__} on {jax.default_backend()}",
        "| op | residual float | residual int | ratio | compiled temp float | compiled temp int | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kf, kq, tf, tq in rows(shape, config):
        lines.append(
            f"| {name} | {mib(kf)} | {mib(kq)} | {kf / kq:5.2f}x | {mib(tf)} | {mib(tq)} | {tf / max(tq, 1):5.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 256), metavar=("B", "N", "C"),
                        help="activation shape; N must equal C / 4 (default: 32 64 256)")
    parser.add_argument("--bits", type=int, default=8, choices=(8, 4, 2), help="code width (default: 8)")
    args = parser.parse_args(argv)
    if args.shape[1] * op_chains.HEADS != args.shape[2] or args.shape[1] % 8:
        parser.error(f"--shape needs N == C / {op_chains.HEADS} and N divisible by 8, got {args.shape}")
    print(table(tuple(args.shape), QuantConfig(bits=args.bits)))


if __name__ == "__main__":
    main()
