"""Training curves of python -m train.lm: the baseline against mesa, seed by seed, in bits per byte.

    python -m benchmarks.lm_curves                   # gpt-tiny on the standard library's text, 3 seeds
    python -m benchmarks.lm_curves --model llama-tiny --steps 600 --seeds 0 1 2 --plot docs/lm_curves_llama.png
    python -m benchmarks.lm_curves --steps 20 --seeds 0 --eval-every 10 --workdir /tmp/curves   # a smoke test

Each method trains with each seed (the same initialisation, the same windows, the same held-out
text and schedule; a seed draws the first two), in WORKDIR/seed{seed}/{method} through
train.run.train_and_evaluate, so rerunning resumes or reuses finished runs. The table gives each
run's final training loss and held-out bits per byte against its own seed's baseline, then the
mean of those paired differences over the seeds with its standard error; the plot the held-out
bits per byte at each evaluation and the training loss, averaged over the seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics

from train.config import LMConfig

METHODS = {  # name: LMConfig settings
    "baseline": dict(mesa=False),
    "mesa8": dict(),  # int8, running ranges, a channel group per head
    "mesa8-row": dict(ranges="row"),  # int8, each row's own range
    "mesa4-row": dict(bits=4, ranges="row"),  # int4, each row's own range per head-sized group
}


def train(method: str, seed: int, workdir: str, **settings) -> list[dict]:
    """The metrics rows of ``method``'s run with ``seed`` (trained, resumed or already finished)."""
    from train import run

    path = os.path.join(workdir, f"seed{seed}", method)
    run.train_and_evaluate(LMConfig(**METHODS[method], seed=seed, **settings), path)
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


def paired(runs: dict) -> dict[str, list[float]]:
    """{method: [final eval bits per byte / its seed's baseline's - 1, for each seed]}."""
    out = {}
    for by_method in runs.values():
        base = final(by_method["baseline"], "eval_bits_per_byte")
        for method, rows in by_method.items():
            out.setdefault(method, []).append(final(rows, "eval_bits_per_byte") / base - 1)
    return out


def mean_and_error(values) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def table(runs: dict) -> str:
    differences = paired(runs)
    lines = ["| method | seed | final train loss (bits/byte) | eval bits per byte | eval / baseline - 1 |",
             "|---|---:|---:|---:|---:|"]
    for i, (seed, by_method) in enumerate(runs.items()):
        for method, rows in by_method.items():
            lines.append(f"| {method} | {seed} | {final(rows, 'bits_per_byte'):.4f} | "
                         f"{final(rows, 'eval_bits_per_byte'):.4f} | {differences[method][i]:+.3%} |")
    lines += ["", f"mean over {len(runs)} seeds (± standard error of the per-seed differences):",
              "| method | eval bits per byte | eval / baseline - 1 |", "|---|---:|---:|"]
    for method, diffs in differences.items():
        bpb = statistics.mean(final(by_method[method], "eval_bits_per_byte") for by_method in runs.values())
        mean, error = mean_and_error(diffs)
        lines.append(f"| {method} | {bpb:.4f} | {mean:+.3%} ± {error:.3%} |")
    return "\n".join(lines)


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    methods = next(iter(runs.values()))
    for method in methods:
        for ax, key in ((left, "eval_bits_per_byte"), (right, "bits_per_byte")):
            per_seed = [[(r["step"], r[key]) for r in by_method[method] if key in r] for by_method in runs.values()]
            steps = [s for s, _ in per_seed[0]]
            mean = [statistics.mean(points[i][1] for points in per_seed) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o" if key.startswith("eval") else None, markersize=3, label=method)
    header = next(iter(methods.values()))[0]
    model = header["config"]["model"]
    left.set(xlabel="step", ylabel="held-out bits per byte", title=f"{model}: evaluation (mean of {len(runs)} seeds)")
    right.set(xlabel="step", ylabel="training bits per byte", title=f"{model}: training loss")
    right.set_ylim(top=min(8.0, right.get_ylim()[1]))
    left.legend()
    fig.suptitle(f"python -m train.lm on {header['text']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="runs to train (baseline first)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--text", nargs="+", default=[], help="files or folders (default: the standard library)")
    parser.add_argument("--workdir", default="results/lm_curves", help="where the runs go (reruns reuse them)")
    parser.add_argument("--plot", metavar="PNG", help="plot the curves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if "baseline" not in args.methods:
        args.methods.insert(0, "baseline")
    settings = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=10,
                    checkpoint_every=args.eval_every, text=tuple(args.text))  # a killed run loses little
    runs = {seed: {m: train(m, seed, args.workdir, **settings) for m in args.methods} for seed in args.seeds}
    header = runs[args.seeds[0]]["baseline"][0]
    print(f"{args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} bytes, seeds {args.seeds}, on "
          f"{header['text']} ({header['train_files']} training files, {header['train_bytes']:,} bytes; "
          f"{header['eval_files']} held out, {header['eval_bytes']:,} bytes; evaluation on "
          f"{final(runs[args.seeds[0]]['baseline'], 'eval_tokens'):,} held-out tokens); jax {header['jax_version']}")
    print(table(runs))
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
