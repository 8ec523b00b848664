"""The training program under faults: what a careful user does to it, repeated.

Conflicting reruns, a second run at once, damaged checkpoints (truncated, emptied,
flipped bytes), a step that diverges, unusable workdirs; and, marked slow, kill -9 at
random moments of real runs (mid-step, mid-checkpoint), each resumed to the end and
compared with an uninterrupted run.
"""

import errno
import glob
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mesa_jax.models import vit
from train import checkpoint, data, loop, run
from train.workdir import Workdir, WorkdirError
from train_cases import (TINY, cli, config, dies_after, restored, rows, small_synthetic,  # noqa: F401
                         tiny_preset, use_small_synthetic)


@pytest.mark.parametrize("change", [dict(batch_size=16)] + [  # the rest: the same check, slow
    pytest.param(c, marks=pytest.mark.slow) for c in (dict(mesa=False), dict(bits=4), dict(dtype="bfloat16"), dict(seed=1),
                                                      dict(lr=2e-3), dict(model="deit-ti"))])
def test_a_rerun_with_other_settings_is_refused_naming_them(change, tmp_path, use_small_synthetic):
    run.train_and_evaluate(config(steps=2), str(tmp_path))
    before = rows(tmp_path)
    with pytest.raises(WorkdirError, match="holds a run with other settings") as err:
        run.train_and_evaluate(config(steps=2, **change), str(tmp_path))
    assert str(err.value).count("\n") == 0
    named = {"mesa": "--no-mesa", "batch_size": "--batch-size"}.get(next(iter(change)), f"--{next(iter(change))}")
    assert named in str(err.value)
    assert rows(tmp_path) == before  # nothing touched


@pytest.mark.slow  # repeated coverage: kept out of the default run
def test_a_rerun_may_train_longer_and_change_its_intervals(tmp_path, use_small_synthetic):
    run.train_and_evaluate(config(steps=2), str(tmp_path))
    run.train_and_evaluate(config(steps=4, log_every=1, eval_every=4, checkpoint_every=4), str(tmp_path))
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [2, 3, 4]
    assert int(restored(tmp_path, config()).step) == 4


def test_a_second_run_at_once_is_refused(tmp_path, use_small_synthetic):
    with Workdir.open(str(tmp_path)):  # a first run holds the workdir
        with pytest.raises(WorkdirError, match=r"another run \(pid \d+\) is using"):
            run.train_and_evaluate(config(steps=2), str(tmp_path))
    run.train_and_evaluate(config(steps=2), str(tmp_path))  # released with it


@pytest.mark.parametrize("kind", ["file", "parent_is_file", "empty", "cannot_create"])
def test_unusable_workdirs_are_one_line_errors(kind, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    workdir = {"file": str(tmp_path / "f"), "parent_is_file": str(tmp_path / "f" / "w"), "empty": "",
               "cannot_create": "/proc/mesa-jax-test"}[kind]
    code, _, err = cli("--workdir", workdir, "--steps", "1", "--dataset", "synthetic", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "--workdir" in err


def damage(workdir, step: int, how: str) -> None:
    """Damage checkpoint ``step``: truncate its largest file, empty its tree metadata, or flip bytes."""
    files = [f for f in glob.glob(f"{workdir}/checkpoints/{step}/**", recursive=True) if os.path.isfile(f)]
    if how == "metadata":
        target = next(f for f in files if f.endswith("default/_METADATA"))
        open(target, "w").close()
        return
    target = max(files, key=os.path.getsize)
    blob = bytearray(open(target, "rb").read())
    if how == "truncate":
        blob = blob[: len(blob) // 2]
    else:  # flip bytes in the middle of the largest array file
        for i in range(len(blob) // 2, len(blob) // 2 + 8):
            blob[i] ^= 0xFF
    open(target, "wb").write(bytes(blob))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, small_synthetic):
    """(a run with checkpoints at steps 2 and 4, the same run uninterrupted to step 4), made once."""
    root = tmp_path_factory.mktemp("two_checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(vit.PRESETS, "vit-test", TINY)
        patch.setattr(data, "synthetic", lambda seed=0: small_synthetic)
        run.train_and_evaluate(config(steps=4, checkpoint_every=2), str(root / "straight"))
        run.train_and_evaluate(config(steps=2, checkpoint_every=2), str(root / "w"))
        run.train_and_evaluate(config(steps=4, checkpoint_every=2), str(root / "w"))
    return root / "w", root / "straight"


@pytest.mark.parametrize("how", ["truncate", pytest.param("metadata", marks=pytest.mark.slow),
                                 pytest.param("flip", marks=pytest.mark.slow)])  # flip: also tested below
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(how, two_checkpoints, tmp_path, use_small_synthetic,
                                                                 caplog):
    cfg = config(steps=4, checkpoint_every=2)
    workdir, straight = tmp_path / "w", two_checkpoints[1]
    shutil.copytree(two_checkpoints[0], workdir)
    damage(workdir, 4, how)
    state = restored(workdir, cfg)
    assert int(state.step) == 2
    assert "checkpoint step 4" in caplog.text and "trying an older one" in caplog.text
    assert os.listdir(f"{workdir}/checkpoints-damaged")  # kept for inspection
    run.train_and_evaluate(cfg, str(workdir))  # and training resumes from step 2, exactly
    for a, b in zip(jax.tree.leaves(restored(workdir, cfg)), jax.tree.leaves(restored(straight, cfg))):
        np.testing.assert_array_equal(a, b)


def flags(workdir, *more):
    return ["--workdir", str(workdir), "--model", "vit-test", "--batch-size", "8", "--log-every", "2",
            "--eval-every", "3", "--checkpoint-every", "2", "--dataset", "synthetic", "--warmup-epochs", "0.1", *more]


def test_no_checkpoint_that_verifies_is_a_one_line_error_and_never_a_restart(tmp_path, use_small_synthetic, capsys):
    """The damaged checkpoint is set aside; this rerun and the identical one after it stop in
    one line, and neither trains from step 0 over the run's metrics."""
    run.train_and_evaluate(config(steps=2), str(tmp_path))
    damage(tmp_path, 2, "flip")
    before = rows(tmp_path)
    for _ in range(2):
        code, _, err = cli(*flags(tmp_path, "--steps", "6"), capsys=capsys)
        assert code == 1 and err.count("\n") == 1 and "holds a run" in err and "move the workdir aside" in err
        assert rows(tmp_path) == before
    assert os.listdir(tmp_path / "checkpoints-damaged")


def test_a_workdir_whose_checkpoints_are_gone_refuses_to_start_over(two_checkpoints, tmp_path, use_small_synthetic):
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints[0], workdir)
    shutil.rmtree(workdir / "checkpoints")
    before = rows(workdir)
    with pytest.raises(WorkdirError, match=r"records its checkpoint step 4\) but no checkpoint of it restores"):
        run.train_and_evaluate(config(steps=4, checkpoint_every=2), str(workdir))
    assert rows(workdir) == before


def without_checksum(workdir, step: int) -> None:
    """Checkpoint ``step`` as one written before checksums lived in the step: no custom metadata."""
    path = pathlib.Path(f"{workdir}/checkpoints/{step}/_CHECKPOINT_METADATA")
    path.write_text(json.dumps({**json.loads(path.read_text()), "custom_metadata": {}}))


def test_checkpoints_without_checksums_restore_unverified_saying_so(two_checkpoints, tmp_path, use_small_synthetic,
                                                                   caplog):
    """An old workdir's checksums.json still verifies its steps; with it deleted, the intact steps
    restore unverified (one log line), and one with a non-finite value is set aside."""
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints[0], workdir)
    cfg, model = config(steps=4, checkpoint_every=2), run.build_model(config())
    like = loop.create_state(model, loop.make_optimizer(lambda count: 1e-3, cfg.weight_decay), 0, (32, 32, 3))

    def restore():
        ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=3)
        try:
            return ckpt.restore(like)
        finally:
            ckpt.close()

    expected = restore()
    for step in (2, 4):
        without_checksum(workdir, step)
    legacy = workdir / "checkpoints" / "checksums.json"
    legacy.write_text(json.dumps({"4": checkpoint.digest(expected)}))
    assert int(restore().step) == 4 and "UNVERIFIED" not in caplog.text

    legacy.unlink()
    state = restore()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert "checkpoint step 4" in caplog.text and "restored UNVERIFIED" in caplog.text
    assert not os.path.exists(workdir / "checkpoints-damaged")

    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=3)
    bad = state.replace(step=state.step + 2, params=jax.tree.map(lambda p: p.at[...].set(jnp.nan), state.params))
    ckpt.manager.save(6, args=ocp.args.StandardSave(bad), force=True)  # as the old code saved: no checksum
    ckpt.close()
    assert int(restore().step) == 4
    assert "checkpoint step 6" in caplog.text and "non-finite values" in caplog.text


def interrupt_second_save(monkeypatch, raise_it):
    """Orbax's array writes of the second save run, then ``raise_it()`` before the step commits."""
    real, calls = ocp.StandardCheckpointHandler.async_save, []

    async def save(self, *args, **kwargs):
        futures = await real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise_it()
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", save)
    return real


@pytest.mark.parametrize("presses", [1, pytest.param(2, marks=pytest.mark.slow)])  # a second press: -m slow
def test_ctrl_c_during_a_save_is_one_line_exit_130_and_the_run_resumes(presses, tmp_path, use_small_synthetic,
                                                                        monkeypatch, capsys):
    """A first Ctrl-C lets the save (step 4) complete; a second interrupts it, leaving step 2 intact."""
    real = interrupt_second_save(monkeypatch, lambda: [signal.raise_signal(signal.SIGINT) for _ in range(presses)])
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a program
    try:
        code, out, err = cli(*flags(tmp_path, "--steps", "6"), capsys=capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the program")
    finally:
        signal.signal(signal.SIGINT, handler)
    saved = 6 - 2 * presses
    assert code == 130 and err == ("python -m train.vit_cifar100: interrupted; rerun the same command to resume "
                                   f"from checkpoint step {saved}\n")
    assert int(restored(tmp_path, config()).step) == saved
    assert not glob.glob(f"{tmp_path}/checkpoints/*tmp*")  # an interrupted save's directory, removed on opening
    if presses == 1:
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", real)
        assert cli(*flags(tmp_path, "--steps", "6"), capsys=capsys)[0] == 0
        assert [(r["step"], r["event"]) for r in rows(tmp_path) if "event" in r] == [(0, "start"), (4, "resume")]


def test_a_full_disk_during_a_save_is_one_line_and_the_workdir_resumable(tmp_path, use_small_synthetic, monkeypatch,
                                                                        capsys, caplog):
    """Orbax logs tensorstore's ENOSPC from its threads with tracebacks, and tensorstore's
    callbacks report more through sys.unraisablehook; the program says it once."""
    def disk_full():
        error = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": No space left on device "
                           "[os_error_code='28']")
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception: %s", error, exc_info=error)
        closed = RuntimeError("Event loop is closed")
        sys.unraisablehook(type("UnraisableHookArgs", (), dict(exc_type=RuntimeError, exc_value=closed,
                                                                exc_traceback=None, err_msg=None, object=None)))
        raise error

    interrupt_second_save(monkeypatch, disk_full)
    code, _, err = cli(*flags(tmp_path, "--steps", "4"), capsys=capsys)
    assert code == 1 and err.count("\n") == 1
    assert "No space left on device" in err and "resume from checkpoint step 2" in err
    assert "_SignalingThread" not in caplog.text and "Event loop" not in err
    assert int(restored(tmp_path, config()).step) == 2


@pytest.mark.slow  # the same one-line path as a full disk during a save
def test_a_full_disk_while_logging_is_one_line(tmp_path, use_small_synthetic, monkeypatch, capsys):
    real = run.MetricsLog.write

    def write(self, row):
        if row["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        real(self, row)

    monkeypatch.setattr(run.MetricsLog, "write", write)
    code, _, err = cli(*flags(tmp_path, "--steps", "4", "--log-every", "1"), capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "metrics.jsonl" in err and "checkpoint step 2" in err


def test_an_unwritable_checkpoints_directory_is_refused_before_compiling(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    directory.chmod(0o555)
    real = tempfile.NamedTemporaryFile

    def probe(*args, dir=None, **kwargs):  # what a read-only directory does to its owner (root writes anyway)
        if dir == str(directory):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", probe)
    monkeypatch.setattr(loop, "create_state", lambda *a: pytest.fail("compiled before checking the checkpoints"))
    code, _, err = cli(*flags(tmp_path, "--steps", "4"), capsys=capsys)
    directory.chmod(0o755)
    assert code == 1 and err.count("\n") == 1 and f"cannot write checkpoints in {directory}" in err


@pytest.mark.slow  # one more compilation (the learning rate is in the program) for one sentence of a message
def test_a_run_diverging_before_its_first_checkpoint_says_there_is_none(tmp_path, use_small_synthetic):
    with pytest.raises(run.NonFinite, match=r"step 1 gave a non-finite .* No checkpoint was saved: rerun with a "
                                            r"lower --lr"):
        run.train_and_evaluate(config(steps=2, lr=1e30), str(tmp_path))


def test_a_diverging_step_is_never_applied_or_saved(tmp_path, use_small_synthetic, monkeypatch):
    """Steps 1-4 learn; from step 5 the learning rate is inf. The run stops naming step 5, and
    the newest checkpoint (step 4) is finite and equals an uninterrupted run's step 4."""
    real = loop.learning_rate_schedule
    monkeypatch.setattr(loop, "learning_rate_schedule",
                        lambda *a: (lambda count, s=real(*a): jnp.where(count < 4, s(count), jnp.inf)))
    cfg = config(steps=8, log_every=1, eval_every=100, checkpoint_every=2)
    with pytest.raises(run.NonFinite, match=r"step 5 gave a non-finite .* stopped at step 5. The newest "
                                            r"checkpoint \(step 4\) is finite"):
        run.train_and_evaluate(cfg, str(tmp_path / "w"))
    monkeypatch.setattr(loop, "learning_rate_schedule", real)
    real_batches = data.train_batches
    monkeypatch.setattr(data, "train_batches", dies_after(4, real_batches))  # the same run, stopped after step 4
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(cfg, str(tmp_path / "ok"))
    monkeypatch.setattr(data, "train_batches", real_batches)
    bad, good = restored(tmp_path / "w", cfg), restored(tmp_path / "ok", cfg)
    assert int(bad.step) == 4 and int(bad.bad_step) == -1
    for a, b in zip(jax.tree.leaves(bad), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in rows(tmp_path / "w") if "loss" in r] == [1, 2, 3, 4]  # no row for the bad step


def test_the_guard_keeps_the_state_and_names_the_first_bad_step():
    state = loop.TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=loop.make_optimizer(
        lambda c: 0.1, 0.0), mesa={}, rng=jnp.zeros(2, jnp.uint32), bad_step=jnp.full((), -1, jnp.int32))
    new = state.replace(step=state.step + 1, params={"w": jnp.array([1.0, jnp.nan, 2.0])})
    kept = loop.guarded(state, new, jnp.float32(1.0), jnp.float32(1.0))
    assert int(kept.bad_step) == 1 and np.array_equal(kept.params["w"], state.params["w"])
    later = loop.guarded(kept, kept.replace(step=kept.step + 1), jnp.float32(1.0), jnp.float32(1.0))
    assert int(later.bad_step) == 1 and int(later.step) == 0  # sticky: nothing applies after a bad step
    fine = loop.guarded(state, state.replace(step=state.step + 1), jnp.float32(1.0), jnp.float32(1.0))
    assert int(fine.bad_step) == -1 and int(fine.step) == 1


KILLED = """
import sys, jax
from mesa_jax.models import vit
vit.PRESETS["vit-test"] = dict(image_size=32, patch_size=8, width=24, depth=1, num_heads=2, mlp_dim=48, drop_path=0.1)
from train import data, vit_cifar100
data.synthetic = lambda seed=0, _d=data.synthetic(0, 64, 24): _d
vit_cifar100.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path):
    """Real processes, SIGKILL at random moments once training has progressed (mid-step,
    mid-checkpoint, mid-metrics), six times, then run to the end: the final state equals an
    uninterrupted run's, and the metrics have each step once."""
    flags = ["--model", "vit-test", "--steps", "24", "--batch-size", "8", "--log-every", "1", "--eval-every", "8",
             "--checkpoint-every", "3", "--dataset", "synthetic", "--warmup-epochs", "0.1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = lambda w: [sys.executable, "-c", KILLED, "--workdir", str(w), *flags]
    straight = subprocess.run(command(tmp_path / "straight"), cwd=root, env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    logged = lambda: len(rows(tmp_path / "killed")) if os.path.exists(tmp_path / "killed" / "metrics.jsonl") else 0
    rng = random.Random(0)
    for _ in range(6):
        before = logged()
        process = subprocess.Popen(command(tmp_path / "killed"), cwd=root, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while logged() <= before + 1 and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = subprocess.run(command(tmp_path / "killed"), cwd=root, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    cfg = config(steps=24)
    for a, b in zip(jax.tree.leaves(restored(tmp_path / "killed", cfg)),
                    jax.tree.leaves(restored(tmp_path / "straight", cfg))):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in rows(tmp_path / "killed") if "loss" in r] == list(range(1, 25))
    assert [r["step"] for r in rows(tmp_path / "killed") if "eval_loss" in r] == [8, 16, 24]
