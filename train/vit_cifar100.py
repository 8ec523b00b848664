"""Train a ViT on CIFAR-100 with mesa: python -m train.vit_cifar100 --workdir DIR [flags].

A short run on the CPU (falls back to synthetic data when CIFAR-100 is not prepared):

    python -m train.vit_cifar100 --workdir runs/demo --steps 300 --batch-size 64

The full recipe (100 epochs, batch 128; expected accuracy: see README):

    python -m train.vit_cifar100 --workdir runs/c100 --dataset cifar100

Rerunning a command with the same --workdir resumes from its latest checkpoint; a workdir
whose run has no checkpoint left that restores is refused rather than started over.
"""

from __future__ import annotations

from train import cli
from train.config import DATASETS, TrainConfig

HELP = {
    "model": "a mesa_jax.models vision preset (vit-c100, deit-*, swin-*, pvt-*)",
    "steps": "total optimizer steps; overrides --epochs",
    "epochs": "training epochs (ignored when --steps is given)",
    "warmup_epochs": "epochs of linear learning-rate warmup",
    "label_smoothing": "label smoothing of the cross-entropy",
    "dataset": "auto: CIFAR-100 if prepared, else synthetic (with a loud warning; with --data-dir, an error); "
               "synthetic-hard: noisier, a task that does not saturate",
    "data_dir": "TFDS data dir holding a prepared cifar100 (an error if it does not, under auto too)",
    "eval_batches": "evaluate on at most this many batches of --batch-size test images (None: the whole test "
                    "set); each evaluation row records eval_images",
}
PROG = "python -m train.vit_cifar100"
PROGRAM = cli.Program(PROG, __doc__, TrainConfig, HELP, {"dataset": DATASETS})


def parser():
    return cli.parser(PROGRAM)


def main(argv=None) -> int:
    """Errors a user can act on (flags, data, workdir, checkpoints, a full disk, divergence)
    end the program with one line and exit code 1 (2 for flags); Ctrl-C with one line and 130."""
    return cli.main(argv, PROGRAM)


if __name__ == "__main__":
    main()
