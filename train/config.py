"""The configuration of a training run: one frozen dataclass per program, validated on creation.

``RunConfig`` holds what every program's run has (model, mesa, optimizer, intervals);
``TrainConfig`` adds the image program's data and recipe (defaults: the full CIFAR-100
recipe, DeiT's scaled for 32x32 images; ``python -m train.vit_cifar100 --help``), ``LMConfig``
the language-model program's (``python -m train.lm --help``).
"""

from __future__ import annotations

import dataclasses
import json
import math

from mesa_jax import models


DATASETS = ("auto", "cifar100", "synthetic", "synthetic-hard")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str  # a mesa_jax.models preset of the program's kind
    mesa: bool = True  # False: the plain-Flax baseline, same everything else
    bits: int = 8  # code width of the kept activations (8, 4 or 2)
    ranges: str = "running"  # running (Mesa's estimates) or row (each row's own range)
    attention_bits: int | None = None  # code width of the attention tensors; None: --bits
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    batch_size: int = 128  # global batch, split across devices
    steps: int | None = None  # total optimizer steps
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 1000  # steps between evaluations (and one at the end); 0: never
    eval_batches: int | None = None  # evaluate on at most this many test batches; None: the whole test set
    log_every: int = 50  # steps between metrics rows
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    compare_memory: bool = False  # also compile the baseline's step to log its peak memory

    def __post_init__(self):
        errors = [message for ok, message in self.checks() if not ok]
        if errors:
            raise ValueError("; ".join(errors))

    @classmethod
    def models(cls) -> list[str]:
        """The presets this program trains."""
        return models.names()

    def checks(self) -> list[tuple[bool, str]]:
        """(valid, message) for each setting; a subclass adds its own."""
        return [
            (self.model in self.models(), f"--model must be one of {self.models()}, got {self.model!r}"),
            (self.bits in (8, 4, 2), f"--bits must be 8, 4 or 2, got {self.bits}"),
            (self.ranges in ("running", "row"), f"--ranges must be running or row, got {self.ranges!r}"),
            (self.attention_bits in (None, 8, 4, 2), f"--attention-bits must be 8, 4 or 2, got {self.attention_bits}"),
            (self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be finite and > 0, got {self.lr}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be finite and >= 0, got {self.weight_decay}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0 (0: never), got {self.eval_every}"),
            (self.eval_batches is None or self.eval_batches >= 1,
             f"--eval-batches must be >= 1, got {self.eval_batches}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
        ]

    def differences(self, recorded: dict) -> list[str]:
        """The flags whose values differ from a recorded configuration, ignoring those a
        resumed run may change (RESUMABLE): ``["--batch-size 8 -> 16", ...]``. Values compare
        as JSON records them (a tuple of paths as a list)."""
        mine = json.loads(json.dumps(dataclasses.asdict(self)))
        return [f"{flag(name)} {recorded.get(name)!r} -> {mine[name]!r}" for name in mine
                if name not in RESUMABLE and recorded.get(name, mine[name]) != mine[name]]


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """python -m train.vit_cifar100: a vision model on CIFAR-100 (or its synthetic stand-in)."""

    model: str = "vit-c100"  # a mesa_jax.models vision preset (ViT/DeiT, Swin, PVT)
    epochs: int = 100
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    dataset: str = "auto"  # auto (CIFAR-100, else synthetic), cifar100, synthetic, synthetic-hard
    data_dir: str | None = None  # TFDS data dir holding a prepared cifar100

    @classmethod
    def models(cls) -> list[str]:
        return [name for name in models.names() if not models.is_language_model(name)]

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"--warmup-epochs must be finite and >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}"),
        ]

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return min(round(self.warmup_epochs * steps_per_epoch), self.total_steps(steps_per_epoch) // 2)


@dataclasses.dataclass(frozen=True)
class LMConfig(RunConfig):
    """python -m train.lm: a causal language model on bytes of text (nanoGPT's small-model recipe)."""

    model: str = "gpt-tiny"  # a mesa_jax.models language-model preset (GPT-2, Llama)
    batch_size: int = 32
    steps: int = 2000
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_batches: int | None = 16
    seq_len: int = 256  # tokens (bytes) per training window
    warmup_steps: int = 100  # linear warmup (at most half the steps), then cosine decay
    text: tuple[str, ...] = ()  # files or folders of text; (): the Python standard library's source
    attention: str = "xla"  # the attention core: xla (jax's XLA kernels) or cudnn (cuDNN's flash attention: GPU)

    @classmethod
    def models(cls) -> list[str]:
        return [name for name in models.names() if models.is_language_model(name)]

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.steps is not None, "--steps is required"),
            (self.seq_len >= 1, f"--seq-len must be >= 1, got {self.seq_len}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (all(isinstance(p, str) and p for p in self.text), f"--text paths must be non-empty, got {self.text}"),
            (self.attention in models.presets.ATTENTION,
             f"--attention must be one of {', '.join(models.presets.ATTENTION)}, got {self.attention!r}"),
        ]


# Settings a resumed run may change: how long it trains, how often (and on how much) it
# logs, evaluates and checkpoints, where it reads the (same) data from. Everything else must match the workdir's.
RESUMABLE = ("epochs", "steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "compare_memory",
             "data_dir")


def flag(name: str) -> str:
    return "mesa (--no-mesa)" if name == "mesa" else "--" + name.replace("_", "-")
