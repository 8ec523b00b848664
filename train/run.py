"""train_and_evaluate: sharding, the step loop, evaluation, checkpoints, metrics, for every program.

What a program trains (data, model, loss, metrics) is its task (train.tasks: images for
train.vit_cifar100, bytes of text for train.lm); everything else is here, shared.

Rerunning with the same workdir resumes from the newest checkpoint that restores and
verifies: params, optimizer state, mesa statistics, RNG and data position (the
step), so a killed run continues exactly as an uninterrupted one would. What a kill
loses: the steps since that checkpoint. What is refused: a second run on the
workdir, a rerun whose settings differ from the recorded ones, and a rerun of a
workdir that holds a run but no checkpoint that restores (train.workdir): it never
starts over from step 0. A non-finite loss, gradient or parameter is never applied
(train.loop.guarded); the run stops at the next log, evaluation or checkpoint step,
naming the first bad step. Ctrl-C (``Interrupted``) and a full disk or a denied
write (``WorkdirError``) stop the run with a one-line message naming the checkpoint
a rerun resumes from.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import sys
import time

import flax.linen as nn
import jax

from mesa_jax.memory import compiled_analysis
from train import data, loop, tasks
from train.checkpoint import CheckpointError, Checkpointer
from train.config import RunConfig
from train.metrics import MetricsLog
from train.tasks import image_shape, quant_of  # noqa: F401  (the image program's, named here as before)
from train.workdir import Workdir, WorkdirError, storage_error

log = logging.getLogger(__name__)


class NonFinite(RuntimeError):
    """A step's loss, gradient or updated parameters were not finite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message names the checkpoint a rerun resumes from."""


def build_model(config: RunConfig, mesa: bool | None = None) -> nn.Module:
    """The run's model: mesa (``quant_of(config)``) or, with ``mesa=False``, the baseline."""
    return tasks.for_config(config).model(mesa)


def compile_train_step(task: tasks.Task, model: nn.Module, state, batches):
    """The jitted, state-donating train step, compiled for this run's shapes and shardings
    (``state`` may be abstract): what the loop runs, and whose memory the header reports."""
    spec = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batches) for s in task.batch_spec()]
    return jax.jit(task.train_step(model), donate_argnums=0).lower(state, *spec).compile()


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise."""

    def __init__(self, start: int, total: int, unit: str):
        self.bar, self.unit = None, unit
        if sys.stderr.isatty() and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, row: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if row:
                self.bar.set_postfix({"loss": f"{row['loss']:.4f}", f"{self.unit}/s": f"{row[self.rate]:.0f}"})
        elif row:
            log.info("step %d  loss %.4f  lr %.2e  %.0f %s/s", step, row["loss"], row["learning_rate"], row[self.rate],
                     self.unit)

    @property
    def rate(self) -> str:
        return f"{self.unit}_per_sec"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def maybe_initialize_distributed() -> None:
    """Multi-host: jax.distributed.initialize() when a cluster environment says so."""
    counts = (int(os.environ.get(v, "1")) for v in ("OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"))
    if "JAX_COORDINATOR_ADDRESS" in os.environ or any(n > 1 for n in counts):
        jax.distributed.initialize()


def evaluate(task: tasks.Task, eval_fn, state, sharding, max_batches: int | None = None) -> dict:
    """The task's evaluation metrics over its test split's first ``max_batches`` batches (None: all of it)."""
    totals = {}
    for batch, mask in itertools.islice(task.eval_batches(sharding), max_batches):
        for k, v in jax.device_get(eval_fn(state, *batch, mask)).items():
            totals[k] = totals.get(k, 0) + v
    return task.eval_metrics(totals)


def _header(config, task, train_fn, tx, mesh, workdir) -> dict:
    """A segment's header row: config, data actually used, devices, the step's compile-time
    peak memory (and the baseline's with --compare-memory: one more compilation)."""
    per_method = {"mesa" if config.mesa else "baseline": compiled_analysis(train_fn).peak}
    if config.compare_memory and config.mesa:
        base = task.model(mesa=False)
        state = jax.eval_shape(lambda: loop.create_state(base, tx, config.seed, *task.model_input(base)))
        per_method["baseline"] = compiled_analysis(compile_train_step(task, base, state, None)).peak
    return {
        "config": dataclasses.asdict(config),
        **task.header(),
        "devices": [str(d) for d in mesh.devices.flat],
        "jax_version": jax.__version__,
        "step_peak_bytes": per_method,
        "workdir": os.path.abspath(workdir),
    }


def train_and_evaluate(config: RunConfig, workdir: str) -> dict:
    """Train, evaluate and checkpoint in ``workdir`` (locked for the run); returns the final metrics.

    Ctrl-C raises ``Interrupted``; a full disk or a denied write (during a save too: orbax's
    own reports of it are silenced, train.checkpoint) raises ``WorkdirError``; both say, in
    one line, which checkpoint a rerun resumes from. An unwritable checkpoints directory is
    refused before anything compiles.
    """
    maybe_initialize_distributed()
    with Workdir.open(workdir) as wd:
        checkpoints = Checkpointer(wd.file("checkpoints"))
        try:
            wd.check(config)
            return _train(config, tasks.for_config(config), wd, checkpoints)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {_resume_hint(checkpoints)}") from None
        except (data.DataUnavailable, NonFinite, WorkdirError, CheckpointError):
            raise  # one line already, whatever caused them
        except Exception as err:
            failure = storage_error(err)
            if failure is None:
                raise
            remedy = "free space" if failure.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix permissions"
            where = f" ({failure.filename})" if failure.filename else ""
            raise WorkdirError(f"{failure.strerror}{where}: {remedy}, then {_resume_hint(checkpoints)}") from None
        finally:
            checkpoints.close()


def _resume_hint(checkpoints: Checkpointer) -> str:
    steps = checkpoints.steps()
    if steps:
        return f"rerun the same command to resume from checkpoint step {steps[0]}"
    return "rerun the same command (no checkpoint was saved yet: it starts from step 0)"


def _train(config: RunConfig, task: tasks.Task, wd: Workdir, checkpoints: Checkpointer) -> dict:
    mesh = loop.make_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"--batch-size {config.batch_size} is not divisible by the {mesh.size} devices")
    task.load()
    wd.check_dataset(task.identity)
    total, warmup = task.schedule()
    schedule = loop.learning_rate_schedule(config.lr, warmup, total)
    tx = loop.make_optimizer(schedule, config.weight_decay)
    model = task.model()
    state = jax.device_put(loop.create_state(model, tx, config.seed, *task.model_input(model)),
                           loop.replicated(mesh))

    metrics = MetricsLog(wd.file("metrics.jsonl"))
    restored = checkpoints.restore(state)
    if restored is None:
        wd.refuse_start_over()
        _say_if_replacing(metrics)
    state = restored if restored is not None else state
    start = int(state.step)
    if start >= total:
        log.info("the run in %s already finished (step %d of %d)", wd.path, start, total)
        return metrics.latest()
    batches = loop.batch_sharding(mesh)
    train_fn = compile_train_step(task, model, state, batches)
    header = _header(config, task, train_fn, tx, mesh, wd.path)
    wd.record(config, task.identity)  # the run starts training: from its first checkpoint on, it binds reruns
    metrics.start_segment(header, resumed_from=start)
    _log_memory(header, start, total)
    eval_fn = jax.jit(task.eval_step(model))
    return _loop(config, task, state, train_fn, eval_fn, schedule, total, batches, checkpoints, metrics, wd)


def _say_if_replacing(metrics: MetricsLog) -> None:
    logged = [r for r in metrics.rows() if "event" not in r]
    if logged:
        log.warning("%s: the run logged %d rows but saved no checkpoint; starting from step 0 replaces them",
                    metrics.path, len(logged))


def _log_memory(header: dict, start: int, total: int) -> None:
    if start:
        log.info("resuming from step %d of %d", start, total)
    peaks = {k: v / 2**20 for k, v in header["step_peak_bytes"].items()}
    log.info("train step peak memory (compile-time): %s",
             ", ".join(f"{k} {v:,.0f} MiB" for k, v in peaks.items())
             + (f" ({peaks['baseline'] / peaks['mesa']:.1f}x less with mesa)" if len(peaks) == 2 else ""))


def _loop(config, task, state, train_fn, eval_fn, schedule, total, batches, checkpoints, metrics, wd) -> dict:
    """The steps, with the host reading the device only at log, evaluation and checkpoint steps."""
    progress = Progress(int(state.step), total, task.unit)
    final, clock, steps_timed = {}, time.perf_counter(), 0
    try:
        for step, batch in task.train_batches(int(state.step), total, batches):
            state, step_metrics = train_fn(state, *batch)
            done, steps_timed = step + 1, steps_timed + 1
            save_now, last = done % config.checkpoint_every == 0, done == total
            log_now = done % config.log_every == 0
            eval_now = config.eval_every > 0 and (done % config.eval_every == 0 or last)  # 0: never
            row = None
            if log_now or eval_now or save_now or last:
                values = jax.device_get({**step_metrics, "bad_step": state.bad_step})  # waits for the step
                seconds = time.perf_counter() - clock
                _stop_if_bad(int(values.pop("bad_step")), done, checkpoints)
                if log_now or last:
                    row = {"step": done, **{k: float(v) for k, v in values.items()},
                           "learning_rate": float(schedule(done - 1)),
                           progress.rate: steps_timed * task.units_per_step() / seconds}
                    metrics.write(row)
                    final.update(row)
                if eval_now:
                    evaluation = {"step": done, **evaluate(task, eval_fn, state, batches, config.eval_batches)}
                    metrics.write(evaluation)
                    final.update(evaluation)
                    log.info("step %d  %s", done, task.describe(evaluation))
                if save_now or last:
                    checkpoints.save(state)
                    wd.saved(done)
                clock, steps_timed = time.perf_counter(), 0  # throughput excludes evaluation and saving
            progress.update(done, row)
    finally:
        progress.close()
    return final


def _stop_if_bad(bad_step: int, done: int, checkpoints: Checkpointer) -> None:
    if bad_step >= 0:
        saved = checkpoints.steps()
        then = (f"The newest checkpoint (step {saved[0]}) is finite: rerun to retry from it, or start a new workdir "
                f"with a lower --lr (or --dtype float32)" if saved else
                "No checkpoint was saved: rerun with a lower --lr (or --dtype float32), in this workdir or another")
        raise NonFinite(f"step {bad_step} gave a non-finite loss, gradient or parameters; its update was not "
                        f"applied and the run stopped at step {done}. {then}")
