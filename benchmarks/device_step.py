"""One method's train step on the current device: step time and real peak memory.

    python -m benchmarks.device_step --method mesa8 --model deit-s --batch 128 --dtype bfloat16
    python -m benchmarks.device_step --method mesa8 --backend triton    # mesa's Pallas kernels

Run one method per process: ``memory_stats()["peak_bytes_in_use"]`` is a
high-water mark of the whole process. Prints one JSON object (peak is null on
backends without memory statistics, such as the CPU), with ``plan``: XLA's
compile-time report of the very program that ran (compiled here, autotuned on this
device), to set beside the real peak and beside a description's plan
(``python -m benchmarks.step_plan --target h200``).
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp

from benchmarks import speed, step_memory
from mesa_jax import models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=step_memory.METHODS)
    parser.add_argument("--model", default="deit-s", choices=models.names())
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="xla", choices=["xla", "triton", "triton-interpret"],
                        help="who packs mesa's residuals: XLA (default) or the Pallas Triton kernels")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--memory-profile", help="write jax's device memory profile (pprof) after the steps here")
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    runner = speed.make_runner(step_memory.build(args.model, args.method, dtype, args.backend), args.batch)
    first_steps = runner.run(2)  # warm
    seconds = statistics.median(runner.run(1) for _ in range(args.steps))
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    result = dict(method=args.method, backend=args.backend, model=args.model, batch=args.batch, dtype=args.dtype,
                  step_s=seconds, compile_s=runner.report.compile_s, two_steps_s=first_steps,
                  images_per_s=args.batch / seconds, peak_bytes=stats.get("peak_bytes_in_use"),
                  device=device.device_kind, jax=jax.__version__, plan=runner.report.as_dict())
    print(json.dumps(result))
    if args.memory_profile:  # what stays allocated between steps, by the Python stack that made it
        jax.profiler.save_device_memory_profile(args.memory_profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
