"""CIFAR-100 input pipeline (TFDS, no TensorFlow) and its offline fallback.

Images stay uint8 on the host; a batch is gathered by index from a per-epoch
permutation that depends only on (seed, epoch), so the data position of a run is
its step number and a resumed run sees exactly the batches an uninterrupted one
would. Crop, flip and normalisation run on the device (``augment``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
MEAN = np.array([0.5071, 0.4865, 0.4409], np.float32) * 255  # CIFAR-100 channel statistics
STD = np.array([0.2673, 0.2564, 0.2762], np.float32) * 255

log = logging.getLogger(__name__)


class DataUnavailable(RuntimeError):
    """The requested data set could not be read (not prepared, offline, unreadable dir)."""


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # [N, 32, 32, 3] uint8
    labels: np.ndarray  # [N] int32

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[1:] != IMAGE_SHAPE or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, 32, 32, 3], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels {self.labels.shape} do not match images {self.images.shape}")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str  # "cifar100", "synthetic" or "synthetic-hard"
    train: Split
    test: Split


# ------------------------------------------------------------------- sources


def load(kind: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """``kind``: "cifar100" (TFDS, error if unavailable), "synthetic", or "auto"
    (CIFAR-100 when it can be read, else the synthetic set with a loud warning). A
    ``data_dir`` given explicitly must hold CIFAR-100, under auto too: a mistyped path
    is an error, never a silent switch to synthetic data."""
    if kind == "synthetic":
        return synthetic(seed)
    if kind == "synthetic-hard":
        return synthetic(seed, noise=HARD_NOISE, name="synthetic-hard")
    if kind not in ("auto", "cifar100"):
        raise ValueError(f"unknown dataset {kind!r}; use auto, cifar100, synthetic or synthetic-hard")
    try:
        return Dataset("cifar100", *(_tfds_split(s, data_dir) for s in ("train", "test")))
    except DataUnavailable as err:
        if kind == "cifar100":
            raise
        if data_dir is not None:
            raise DataUnavailable(f"{err} (--dataset auto falls back to synthetic data only when no --data-dir "
                                  f"is given)") from err.__cause__
        log.warning(
            "\n" + "!" * 78 + "\n!! CIFAR-100 is not available (%s).\n!! Training on a SYNTHETIC "
            "CIFAR-shaped data set instead; the metrics record dataset=synthetic.\n" + "!" * 78, err
        )
        return synthetic(seed)


def _tfds_split(split: str, data_dir: str | None) -> Split:
    """A prepared TFDS cifar100 split, read with tfds.data_source (array_record, no TF)."""
    import tensorflow_datasets as tfds

    where = data_dir or "the default TFDS data dir"
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataUnavailable(f"cannot read TFDS cifar100 from {data_dir}: no such directory")
    try:
        source = tfds.data_source("cifar100", split=split, data_dir=data_dir, download=False)
        records = [source[i] for i in range(len(source))]
    except Exception as err:  # TFDS raises many types for "not prepared" / unreadable dirs
        raise DataUnavailable(f"cannot read TFDS cifar100 '{split}' from {where}: no prepared array_record copy "
                              f"there ({type(err).__name__}); prepare it as the README says") from err
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return Split(images, labels)


HARD_NOISE = 2.0  # synthetic-hard: a vit-c100 baseline ends between 40% and 80% in 300 steps (not 99%)


def synthetic(seed: int = 0, train_size: int = 10_000, test_size: int = 2_000, noise: float = 0.7,
              name: str = "synthetic") -> Dataset:
    """A learnable CIFAR-shaped set: per-class smooth colour patterns, shifted and noised.

    Each class has a prototype built from a few random low-frequency waves; a
    sample shifts it by up to 4 pixels and adds heavy-tailed (Student-t) noise of
    scale ``noise``, so the task needs spatial features, and activations have
    outliers like real data. A larger ``noise`` makes the task harder.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:40] / 40.0
    freqs = rng.uniform(0.5, 3.0, (NUM_CLASSES, 3, 2))
    phases = rng.uniform(0, 2 * np.pi, (NUM_CLASSES, 3))
    colours = rng.uniform(-1, 1, (NUM_CLASSES, 3, 3))
    waves = np.sin(2 * np.pi * (freqs[..., 0, None, None] * xx + freqs[..., 1, None, None] * yy) + phases[..., None, None])
    prototypes = np.einsum("kwhv,kwc->khvc", waves, colours)  # [K, 40, 40, 3]

    def split(n, split_rng):
        labels = split_rng.integers(0, NUM_CLASSES, n).astype(np.int32)
        dy, dx = split_rng.integers(0, 9, (2, n))
        rows = dy[:, None] + np.arange(32)[None]
        cols = dx[:, None] + np.arange(32)[None]
        images = prototypes[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
        images = images + noise * split_rng.standard_t(3, images.shape)
        return Split(np.clip(128 + 60 * images, 0, 255).astype(np.uint8), labels)

    return Dataset(name, split(train_size, rng), split(test_size, np.random.default_rng(seed + 1)))


# ------------------------------------------------------------------ batching


def steps_per_epoch(split: Split, batch_size: int) -> int:
    if batch_size > len(split.labels):
        raise ValueError(f"batch size {batch_size} exceeds the {len(split.labels)} training images")
    return len(split.labels) // batch_size


def train_indices(split: Split, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The image indices of training batch ``step``: epoch-wise permutations, remainder dropped."""
    epoch, i = divmod(step, steps_per_epoch(split, batch_size))
    order = np.random.default_rng([seed, epoch]).permutation(len(split.labels))
    return order[i * batch_size : (i + 1) * batch_size]


def train_batches(split: Split, batch_size: int, seed: int, start: int, stop: int, sharding=None) -> Iterator:
    """(step, images uint8, labels) for steps [start, stop), prefetched on a thread and put on device."""

    def make(step):
        idx = train_indices(split, batch_size, seed, step)
        return step, *jax.device_put((split.images[idx], split.labels[idx]), sharding)

    return prefetch(map(make, range(start, stop)))


def eval_batches(split: Split, batch_size: int, sharding=None) -> Iterator:
    """(images, labels, mask) over the whole split; the last batch is padded and masked."""
    n = len(split.labels)
    for begin in range(0, n, batch_size):
        idx = np.arange(begin, begin + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield jax.device_put((split.images[idx], split.labels[idx], mask), sharding)


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run ``items`` on a background thread, ``depth`` ahead; errors surface in the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker():
        try:
            for item in items:
                buffer.put(item)
        except BaseException as err:  # re-raised by the consumer
            buffer.put(err)
        buffer.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# -------------------------------------------------------------- on the device


def standardize(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32, standardised per channel."""
    return (images.astype(jnp.float32) - MEAN.reshape(1, 1, 1, 3)) / STD.reshape(1, 1, 1, 3)


def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """Random crop (zero-pad 4, crop 32) and horizontal flip, per image; then normalise."""
    x = standardize(images)
    b = x.shape[0]
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 9)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), IMAGE_SHAPE)
    x = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)
