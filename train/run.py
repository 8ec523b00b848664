"""train_and_evaluate: data, sharding, the step loop, evaluation, checkpoints, metrics.

Rerunning with the same workdir resumes from the latest checkpoint: params,
optimizer state, mesa statistics, RNG and data position (the step), so a killed
run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mesa_jax import QuantConfig
from mesa_jax.memory import compiled_analysis
from mesa_jax.models import vit
from train import data, loop
from train.checkpoint import Checkpointer
from train.config import TrainConfig

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def build_model(config: TrainConfig, mesa: bool | None = None) -> vit.ViT:
    mesa = config.mesa if mesa is None else mesa
    heads = vit.PRESETS[config.model]["num_heads"]
    quant = QuantConfig(bits=config.bits, num_groups=heads) if mesa else None
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else None
    return vit.create(config.model, num_classes=data.NUM_CLASSES, quant=quant, dtype=dtype)


def make_train_step(model: vit.ViT, label_smoothing: float):
    """Augment on the device (crop, flip, resize for 224-pixel models), then one step."""
    augment = lambda images, key: _resize(data.augment(images, key), model.image_size)
    return functools.partial(loop.train_step, label_smoothing=label_smoothing, augment=augment)


def make_eval_step(model: vit.ViT):
    def step(state, images, labels, mask):
        return loop.eval_step(state, _resize(data.normalize(images), model.image_size), labels, mask)

    return step


def _resize(images, size: int):
    if images.shape[1] == size:
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


class MetricsLog:
    """WORKDIR/metrics.jsonl: a header row, then one JSON object per logged step."""

    def __init__(self, path: str):
        self.path = path

    def write(self, row: dict) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (the run died before checkpointing them)."""
        if jax.process_index() != 0 or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in rows if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise."""

    def __init__(self, start: int, total: int):
        self.bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, row: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if row:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_sec']:.0f}")
        elif row:
            log.info("step %d  loss %.4f  lr %.2e  %.0f img/s", step, row["loss"], row["learning_rate"],
                     row["images_per_sec"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def maybe_initialize_distributed() -> None:
    """Multi-host: jax.distributed.initialize() when a cluster environment says so."""
    tasks = (int(os.environ.get(v, "1")) for v in ("OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"))
    if "JAX_COORDINATOR_ADDRESS" in os.environ or any(n > 1 for n in tasks):
        jax.distributed.initialize()


def evaluate(eval_fn, state, split: data.Split, batch_size: int, sharding) -> dict:
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    for images, labels, mask in data.eval_batches(split, batch_size, sharding):
        for k, v in jax.device_get(eval_fn(state, images, labels, mask)).items():
            totals[k] += v
    return {"eval_loss": float(totals["loss_sum"] / totals["count"]),
            "eval_accuracy": float(totals["correct"] / totals["count"])}


def compile_train_step(model: vit.ViT, config: TrainConfig, state, batches):
    """The jitted, state-donating train step, compiled for this run's shapes and shardings
    (``state`` may be abstract): what the loop runs, and whose memory the header reports."""
    spec = (jax.ShapeDtypeStruct((config.batch_size, *data.IMAGE_SHAPE), jnp.uint8, sharding=batches),
            jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batches))
    return jax.jit(make_train_step(model, config.label_smoothing), donate_argnums=0).lower(state, *spec).compile()


def _header(config, dataset, train_fn, tx, mesh, workdir) -> dict:
    """The first metrics row: config, data actually used, devices, the step's compile-time
    peak memory (and the baseline's with --compare-memory: one more compilation)."""
    per_method = {"mesa" if config.mesa else "baseline": compiled_analysis(train_fn).peak}
    if config.compare_memory and config.mesa:
        base = build_model(config, mesa=False)
        state = jax.eval_shape(lambda: loop.create_state(base, tx, config.seed, data.IMAGE_SHAPE))
        per_method["baseline"] = compiled_analysis(compile_train_step(base, config, state, None)).peak
    return {
        "step": 0,
        "config": dataclasses.asdict(config),
        "dataset": dataset.name,
        "dataset_warning": None if dataset.name == "cifar100" else "CIFAR-100 unavailable: SYNTHETIC data",
        "train_images": len(dataset.train.labels),
        "devices": [str(d) for d in mesh.devices.flat],
        "jax_version": jax.__version__,
        "step_peak_bytes": per_method,
        "workdir": os.path.abspath(workdir),
    }


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict:
    """Train, evaluate and checkpoint; returns the final metrics."""
    maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    mesh = loop.make_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"--batch-size {config.batch_size} is not divisible by the {mesh.size} devices")
    dataset = data.load(config.dataset, config.data_dir, config.seed)
    per_epoch = data.steps_per_epoch(dataset.train, config.batch_size)
    total = config.total_steps(per_epoch)
    schedule = loop.learning_rate_schedule(config.lr, config.warmup_steps(per_epoch), total)
    tx = loop.make_optimizer(schedule, config.weight_decay)
    model = build_model(config)
    state = jax.device_put(loop.create_state(model, tx, config.seed, data.IMAGE_SHAPE), loop.replicated(mesh))

    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"))
    metrics = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
        metrics.truncate_after(int(state.step))
        log.info("resuming from step %d of %d", int(state.step), total)
    batches = loop.batch_sharding(mesh)
    train_fn = compile_train_step(model, config, state, batches)
    if checkpoints.latest_step() is None:
        header = _header(config, dataset, train_fn, tx, mesh, workdir)
        metrics.write(header)
        peaks = {k: v / 2**20 for k, v in header["step_peak_bytes"].items()}
        log.info("train step peak memory (compile-time): %s",
                 ", ".join(f"{k} {v:,.0f} MiB" for k, v in peaks.items())
                 + (f" ({peaks['baseline'] / peaks['mesa']:.1f}x less with mesa)" if len(peaks) == 2 else ""))

    eval_fn = jax.jit(make_eval_step(model))
    progress = Progress(int(state.step), total)
    final, clock, seen = {}, time.perf_counter(), 0
    try:
        for step, images, labels in data.train_batches(dataset.train, config.batch_size, config.seed,
                                                       int(state.step), total, batches):
            state, step_metrics = train_fn(state, images, labels)
            done, seen = step + 1, seen + config.batch_size
            row = None
            if done % config.log_every == 0 or done == total:
                now = time.perf_counter()
                row = {"step": done, **_finite(jax.device_get(step_metrics), done, checkpoints),
                       "learning_rate": float(schedule(done)), "images_per_sec": seen / (now - clock)}
                clock, seen = now, 0
                metrics.write(row)
                final.update(row)
            progress.update(done, row)
            if done % config.eval_every == 0 or done == total:
                row = {"step": done, **evaluate(eval_fn, state, dataset.test, config.batch_size, batches)}
                metrics.write(row)
                final.update(row)
                log.info("step %d  eval loss %.4f  accuracy %.4f", done, row["eval_loss"], row["eval_accuracy"])
            if done % config.checkpoint_every == 0 or done == total:
                _finite(jax.device_get(step_metrics), done, checkpoints)
                checkpoints.save(state)
    finally:
        progress.close()
        checkpoints.close()
    return final


def _finite(step_metrics: dict, step: int, checkpoints: Checkpointer) -> dict:
    values = {k: float(v) for k, v in step_metrics.items()}
    if not np.isfinite(values["loss"]):
        raise NonFiniteLoss(
            f"loss is {values['loss']} at step {step}; stopping. The last good checkpoint is step "
            f"{checkpoints.latest_step()} (lower --lr, or --dtype float32)"
        )
    return values
