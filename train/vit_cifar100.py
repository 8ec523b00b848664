"""Train a ViT on CIFAR-100 with mesa: python -m train.vit_cifar100 --workdir DIR [flags].

A short run on the CPU (falls back to synthetic data when CIFAR-100 is not prepared):

    python -m train.vit_cifar100 --workdir runs/demo --steps 300 --batch-size 64

The full recipe (100 epochs, batch 128; expected accuracy: see README):

    python -m train.vit_cifar100 --workdir runs/c100 --dataset cifar100

Rerunning a command with the same --workdir resumes from its latest checkpoint; a workdir
whose run has no checkpoint left that restores is refused rather than started over.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

from train.config import DATASETS, TrainConfig

HELP = {
    "model": "a mesa_jax.models preset (vit-c100, deit-*, swin-*, pvt-*)",
    "bits": "code width of the kept activations (8, 4 or 2)",
    "ranges": "running: Mesa's running range estimates; row: each row's own range, kept with its codes",
    "attention_bits": "code width of the attention tensors (Q, K, V; softmax and matmul op by op); default --bits",
    "dtype": "compute dtype; params stay float32",
    "batch_size": "global batch size, split across devices",
    "epochs": "training epochs (ignored when --steps is given)",
    "steps": "total optimizer steps; overrides --epochs",
    "lr": "peak AdamW learning rate (linear warmup, cosine decay)",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "epochs of linear learning-rate warmup",
    "label_smoothing": "label smoothing of the cross-entropy",
    "seed": "seed of initialisation, data order, augmentation and dropout",
    "dataset": "auto: CIFAR-100 if prepared, else synthetic (with a loud warning; with --data-dir, an error); "
               "synthetic-hard: noisier, a task that does not saturate",
    "data_dir": "TFDS data dir holding a prepared cifar100 (an error if it does not, under auto too)",
    "eval_every": "steps between test-set evaluations (and one at the end); 0: never, not even at the end",
    "eval_batches": "evaluate on at most this many batches of --batch-size test images (None: the whole test "
                    "set); each evaluation row records eval_images",
    "log_every": "steps between metrics rows",
    "checkpoint_every": "steps between checkpoints (and one at the end)",
}
SWITCHES = {  # boolean fields: a flag each
    "mesa": ("--no-mesa", "store_false", "train the plain-Flax baseline, same everything else"),
    "compare_memory": ("--compare-memory", "store_true",
                       "also compile the baseline's train step and log both peak memories (one more compilation)"),
}
TYPES = {"str": str, "int": int, "float": float, "int | None": int, "str | None": str}
CHOICES = {"bits": (8, 4, 2), "attention_bits": (8, 4, 2), "ranges": ("running", "row"),
           "dtype": ("float32", "bfloat16"), "dataset": DATASETS}


PROG = "python -m train.vit_cifar100"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2: never a traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="checkpoints and metrics.jsonl go here (required)")
    for name, (flag, action, text) in SWITCHES.items():
        p.add_argument(flag, dest=name, action=action, help=text)
    for field in dataclasses.fields(TrainConfig):
        if field.name in SWITCHES:
            continue
        kind = TYPES[field.type]
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                       choices=CHOICES.get(field.name), help=f"{HELP[field.name]} (default: %(default)s)")
    return p


def main(argv=None) -> int:
    """Errors a user can act on (flags, data, workdir, checkpoints, a full disk, divergence)
    end the program with one line and exit code 1 (2 for flags); Ctrl-C with one line and 130."""
    args = vars(parser().parse_args(argv))
    workdir = args.pop("workdir")
    try:
        config = TrainConfig(**args)
    except ValueError as err:
        sys.exit(f"{PROG}: error: {err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax"):  # orbax's per-save chatter, jax's backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from train import checkpoint, data, run, workdir as workdirs  # after flag parsing: --help stays fast

        errors = (data.DataUnavailable, run.NonFinite, workdirs.WorkdirError, checkpoint.CheckpointError, ValueError)
        try:
            final = run.train_and_evaluate(config, workdir)
        except errors as err:
            sys.exit(f"{PROG}: error: {err}")
    except KeyboardInterrupt as err:
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # another Ctrl-C while exiting: at once, quietly
        print(f"{PROG}: {str(err) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    main()
