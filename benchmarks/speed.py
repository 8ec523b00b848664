"""Train-step time of mesa and nn.remat relative to the baseline, measured interleaved.

    python -m benchmarks.speed                       # vit-c100, batch 64, this machine
    python -m benchmarks.speed --model deit-s --batch 128 --dtype bfloat16   # a GPU

Every method is compiled (ahead of time) and warmed up first; then each repeat times
``--steps`` steps of every method in turn, and the ratio to the baseline is taken within
the repeat. The table gives the median ratio over repeats: robust to a shared, noisy
machine, where absolute times are not. A second table says what XLA made of each step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from benchmarks import memory as memory_bench, step_memory
from mesa_jax import memory, models, plan
from train import loop

DEFAULT_METHODS = ("baseline", "mesa8", "flash_like", "remat_nothing", "remat_dots")


class Runner(NamedTuple):
    run: Callable[[int], float]  # run(steps) -> seconds
    report: memory.ProgramReport  # the step it runs, as compiled (ahead of time, once)


def make_runner(model, batch: int, seed: int = 0) -> Runner:
    """One jitted, state-donating train step on fixed random data, compiled ahead of time."""
    tx = loop.make_optimizer(loop.learning_rate_schedule(1e-4, 1, 10**6), 0.05)
    shape = (model.image_size, model.image_size, 3)
    state = loop.create_state(model, tx, seed, shape)
    key = jax.random.key(seed)
    images = jax.random.normal(key, (batch, *shape))
    labels = jax.random.randint(key, (batch,), 0, model.num_classes)
    step, seconds, tracing = plan.compile(jax.jit(loop.train_step, donate_argnums=0), state, images, labels)
    box = [state]

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            box[0], metrics = step(box[0], images, labels)
        jax.block_until_ready((box[0], metrics))
        return time.perf_counter() - start

    return Runner(run, memory.program_report(step, seconds, trace_s=tracing))


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over repeats of each method's time divided by the baseline's in the same repeat."""
    base = times["baseline"]
    return {m: statistics.median(t / b for t, b in zip(ts, base)) for m, ts in times.items()}


def measure(model_name: str, batch: int, dtype, methods, steps: int, repeats: int):
    """(seconds per step of each repeat, the compiled step's report), per method."""
    runners = {m: make_runner(step_memory.build(model_name, m, dtype), batch) for m in methods}
    for runner in runners.values():
        runner.run(2)  # warm
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m, runner in runners.items():
            times[m].append(runner.run(steps) / steps)
    return times, {m: runner.report for m, runner in runners.items()}


def table(times: dict[str, list[float]], batch: int) -> str:
    lines = ["| method | median step s | images/s | time / baseline (median of ratios) |", "|---|---:|---:|---:|"]
    for m, r in ratios(times).items():
        median = statistics.median(times[m])
        lines.append(f"| {m} | {median:.3f} | {batch / median:.1f} | {r:.3f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-c100", choices=models.names())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=step_memory.METHODS)
    parser.add_argument("--steps", type=int, default=3, help="steps per timing (default: 3)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default: 5)")
    args = parser.parse_args(argv)
    methods = ["baseline"] + [m for m in args.methods if m != "baseline"]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    times, reports = measure(args.model, args.batch, dtype, methods, args.steps, args.repeats)
    device = jax.devices()[0]
    print(f"{args.model}, batch {args.batch}, {args.dtype}, {args.repeats} repeats x {args.steps} steps; "
          f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    print(table(times, args.batch))
    print()
    print(memory_bench.report_table([(args.model, args.dtype, args.batch, m, step_memory.StepMemory(0, {r.target: r}), None)
                                     for m, r in reports.items()]))


if __name__ == "__main__":
    main()
