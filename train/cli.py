"""What the training programs' command lines share: a flag per config field, one-line errors.

    main(argv, Program("python -m train.lm", __doc__, LMConfig, HELP, CHOICES))

Errors a user can act on (flags, data, workdir, checkpoints, a full disk, divergence) end the
program with one line and exit code 1 (2 for flags); Ctrl-C with one line and 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

HELP = {  # the fields every program has (train.config.RunConfig)
    "model": "a mesa_jax.models preset",
    "bits": "code width of the kept activations (8, 4 or 2)",
    "ranges": "running: Mesa's running range estimates; row: each row's own range, kept with its codes",
    "attention_bits": "code width of the attention tensors (Q, K, V; softmax and matmul op by op); default --bits",
    "dtype": "compute dtype; params stay float32",
    "batch_size": "global batch size, split across devices",
    "steps": "total optimizer steps",
    "lr": "peak AdamW learning rate (linear warmup, cosine decay)",
    "weight_decay": "AdamW weight decay",
    "seed": "seed of initialisation, data order, augmentation and dropout",
    "eval_every": "steps between test-set evaluations (and one at the end); 0: never, not even at the end",
    "eval_batches": "evaluate on at most this many test batches of --batch-size (None: the whole test set); "
                    "each evaluation row records how much it read",
    "log_every": "steps between metrics rows",
    "checkpoint_every": "steps between checkpoints (and one at the end)",
}
SWITCHES = {  # boolean fields: a flag each
    "mesa": ("--no-mesa", "store_false", "train the plain-Flax baseline, same everything else"),
    "compare_memory": ("--compare-memory", "store_true",
                       "also compile the baseline's train step and log both peak memories (one more compilation)"),
}
TYPES = {"str": str, "int": int, "float": float, "int | None": int, "str | None": str}
CHOICES = {"bits": (8, 4, 2), "attention_bits": (8, 4, 2), "ranges": ("running", "row"), "dtype": ("float32", "bfloat16")}


@dataclasses.dataclass(frozen=True)
class Program:
    prog: str  # how it is run: "python -m train.lm"
    doc: str  # its --help description
    config: type  # its train.config class
    help: dict  # HELP's texts for its own fields, and any it words otherwise
    choices: dict  # CHOICES for its own fields
    multiple: tuple[str, ...] = ()  # fields given as several values (``--text A B``): a tuple
    default_text: dict = dataclasses.field(default_factory=dict)  # a default's words in --help


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2: never a traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(program: Program) -> argparse.ArgumentParser:
    p = _Parser(prog=program.prog, description=program.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="checkpoints and metrics.jsonl go here (required)")
    for name, (flag, action, text) in SWITCHES.items():
        p.add_argument(flag, dest=name, action=action, help=text)
    texts, choices = {**HELP, **program.help}, {**CHOICES, **program.choices}
    for field in dataclasses.fields(program.config):
        if field.name in SWITCHES:
            continue
        default = program.default_text.get(field.name, "%(default)s")
        kind = str if field.name in program.multiple else TYPES[field.type]
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                       nargs="+" if field.name in program.multiple else None, choices=choices.get(field.name),
                       help=f"{texts[field.name]} (default: {default})")
    return p


def main(argv, program: Program) -> int:
    """Parse, train, print the final metrics on one line; errors as the module docstring says."""
    args = vars(parser(program).parse_args(argv))
    workdir = args.pop("workdir")
    args.update({name: tuple(args[name]) for name in program.multiple})
    try:
        config = program.config(**args)
    except ValueError as err:
        sys.exit(f"{program.prog}: error: {err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax"):  # orbax's per-save chatter, jax's backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from train import checkpoint, data, run, workdir as workdirs  # after flag parsing: --help stays fast

        errors = (data.DataUnavailable, run.NonFinite, workdirs.WorkdirError, checkpoint.CheckpointError, ValueError)
        try:
            final = run.train_and_evaluate(config, workdir)
        except errors as err:
            sys.exit(f"{program.prog}: error: {err}")
    except KeyboardInterrupt as err:
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # another Ctrl-C while exiting: at once, quietly
        print(f"{program.prog}: {str(err) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return 0
