"""What each training program trains: its data, model, loss and metrics (train.run does the rest).

    task = tasks.for_config(config)      # ImageTask (TrainConfig) or TextTask (LMConfig)
    task.load()                          # reads the data; DataUnavailable in one line
    model = task.model()                 # mesa (config.mesa) or the baseline

A task's steps are pure functions of (state, batch...) that run.train_and_evaluate jits and
shards; its batches are functions of (seed, step), so a resumed run sees what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesa_jax import Policy, QuantConfig, models
from train import data, loop, text
from train.config import LMConfig, RunConfig, TrainConfig


def quant_of(config: RunConfig):
    """What mesa keeps, from --bits, --ranges and --attention-bits. Channel groups: the heads,
    except for 8-bit row ranges, one per token row: as faithful (README, fidelity) for 4 bytes
    of scale and shift per row instead of per head."""
    if config.ranges == "row" and config.bits == 8:
        base = QuantConfig(ranges="row")
    else:
        base = models.presets.per_head(models.preset(config.model), bits=config.bits, ranges=config.ranges)
    if config.attention_bits in (None, config.bits):
        return base
    attention = dataclasses.replace(base, bits=config.attention_bits)
    return Policy(base, by_kind={kind: attention for kind in ("attention", "softmax", "matmul")})


class Task:
    """The program-specific half of a run; subclasses fill in every method."""

    unit = "examples"  # what throughput counts: rows log ``{unit}_per_sec``

    def __init__(self, config: RunConfig):
        self.config = config

    def model_fields(self) -> dict:
        """The preset's fields this program sets (the classes, the vocabulary)."""
        raise NotImplementedError

    def model(self, mesa: bool | None = None) -> nn.Module:
        """The config's model: compressed with ``quant_of(config)``, or the baseline (``mesa=False``)."""
        config = self.config
        mesa = config.mesa if mesa is None else mesa
        dtype = jnp.bfloat16 if config.dtype == "bfloat16" else None
        return models.create(config.model, quant=quant_of(config) if mesa else None, dtype=dtype,
                             **self.model_fields())


class ImageTask(Task):
    """CIFAR-100 (or the synthetic stand-in) for a classifier: crop, flip, resize on the device."""

    unit = "images"

    def load(self) -> None:
        self.dataset = data.load(self.config.dataset, self.config.data_dir, self.config.seed)
        self.per_epoch = data.steps_per_epoch(self.dataset.train, self.config.batch_size)

    @property
    def identity(self) -> str:
        return self.dataset.name

    def header(self) -> dict:
        name = self.dataset.name
        return {"dataset": name,
                "dataset_warning": None if name == "cifar100" else "CIFAR-100 unavailable: SYNTHETIC data",
                "train_images": len(self.dataset.train.labels)}

    def schedule(self) -> tuple[int, int]:
        return self.config.total_steps(self.per_epoch), self.config.warmup_steps(self.per_epoch)

    def model_fields(self) -> dict:
        return {"num_classes": data.NUM_CLASSES}

    def model_input(self, model) -> tuple[tuple[int, ...], jnp.dtype]:
        return image_shape(model), jnp.float32

    def batch_spec(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        b = self.config.batch_size
        return jax.ShapeDtypeStruct((b, *data.IMAGE_SHAPE), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32)

    def units_per_step(self) -> int:
        return self.config.batch_size

    def train_step(self, model):
        """Augment on the device (crop, flip, resize for 224-pixel models), then one step."""
        augment = lambda images, key: _resize(data.augment(images, key), model.image_size)
        return functools.partial(loop.train_step, label_smoothing=self.config.label_smoothing, augment=augment)

    def eval_step(self, model):
        def step(state, images, labels, mask):
            return loop.eval_step(state, _resize(data.standardize(images), model.image_size), labels, mask)

        return step

    def train_batches(self, start: int, stop: int, sharding):
        for step, images, labels in data.train_batches(self.dataset.train, self.config.batch_size, self.config.seed,
                                                       start, stop, sharding):
            yield step, (images, labels)

    def eval_batches(self, sharding):
        for images, labels, mask in data.eval_batches(self.dataset.test, self.config.batch_size, sharding):
            yield (images, labels), mask

    def eval_metrics(self, totals: dict) -> dict:
        return {"eval_loss": float(totals["loss_sum"] / totals["count"]),
                "eval_accuracy": float(totals["correct"] / totals["count"]), "eval_images": int(totals["count"])}

    def describe(self, evaluation: dict) -> str:
        return f"eval loss {evaluation['eval_loss']:.4f}  accuracy {evaluation['eval_accuracy']:.4f}"


def image_shape(model) -> tuple[int, int, int]:
    """What the model sees: CIFAR images resized to its preset's size (224 for DeiT)."""
    return model.image_size, model.image_size, data.IMAGE_SHAPE[-1]


def _resize(images, size: int):
    if images.shape[1] == size:
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


class TextTask(Task):
    """Bytes of text for a causal language model: next-byte loss, evaluation in bits per byte."""

    unit = "tokens"

    def load(self) -> None:
        if self.config.attention == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(f"--attention cudnn needs an NVIDIA GPU; JAX runs on {jax.default_backend()} here")
        self.corpus = text.load(self.config.text, self.config.seq_len)

    @property
    def identity(self) -> str:
        return self.corpus.identity

    def header(self) -> dict:
        return self.corpus.describe()

    def schedule(self) -> tuple[int, int]:
        return self.config.steps, min(self.config.warmup_steps, self.config.steps // 2)

    def model_fields(self) -> dict:
        """Bytes for tokens; learned positions (GPT) as many as the training windows; the attention core."""
        fields = {"vocab_size": text.VOCAB_SIZE, "attention_fn": models.presets.ATTENTION[self.config.attention]}
        return fields | ({"max_len": self.config.seq_len} if "max_len" in models.preset(self.config.model) else {})

    def model_input(self, model) -> tuple[tuple[int, ...], jnp.dtype]:
        return (self.config.seq_len,), jnp.int32

    def batch_spec(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        return (jax.ShapeDtypeStruct((self.config.batch_size, self.config.seq_len + 1), jnp.uint8),)

    def units_per_step(self) -> int:
        return self.config.batch_size * self.config.seq_len

    def train_step(self, model):
        return loop.lm_train_step

    def eval_step(self, model):
        return loop.lm_eval_step

    def train_batches(self, start: int, stop: int, sharding):
        config = self.config
        for step, windows in text.train_batches(self.corpus, config.batch_size, config.seq_len, config.seed, start,
                                                stop, sharding):
            yield step, (windows,)

    def eval_batches(self, sharding):
        for windows, mask in text.eval_batches(self.corpus, self.config.batch_size, self.config.seq_len, sharding):
            yield (windows,), mask

    def eval_metrics(self, totals: dict) -> dict:
        loss = float(totals["loss_sum"] / totals["count"])
        return {"eval_loss": loss, "eval_bits_per_byte": loss / math.log(2), "eval_tokens": int(totals["count"])}

    def describe(self, evaluation: dict) -> str:
        return f"eval loss {evaluation['eval_loss']:.4f}  {evaluation['eval_bits_per_byte']:.4f} bits per byte"


def for_config(config: RunConfig) -> Task:
    if isinstance(config, LMConfig):
        return TextTask(config)
    if isinstance(config, TrainConfig):
        return ImageTask(config)
    raise TypeError(f"no training program for a {type(config).__name__}")
