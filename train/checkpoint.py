"""Atomic, checksummed checkpoints of the whole train state, and a restore that verifies them.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save (kill -9, a full disk) leaves the previous checkpoint intact; the
temporary directory is removed when the next run opens the checkpoints. A first Ctrl-C
during a save lets it complete and then raises KeyboardInterrupt (the run stops with
that step saved); a second one interrupts the save at once, which leaves the previous
checkpoint intact. The state
holds params, optimizer state, mesa statistics, step, RNG and the non-finite flag; the
data position is the step (train/data.py), so a resumed run continues exactly.

Orbax does not notice flipped bytes in an array file: it restores them. Each save
therefore records a SHA-256 of the state's bytes in the step's own metadata
(``<step>/_CHECKPOINT_METADATA``, written inside the temporary directory, so atomic
with the step: no single file vouches for every checkpoint). Checkpoints written
before that kept their sums in ``checksums.json``, still read. ``restore`` walks the
steps from the newest: one that fails to restore (truncated or emptied files) or to
match its checksum is reported in one line and moved aside to
``<checkpoints>-damaged/<step>-<time>`` (kept for inspection; the run may then save
that step again). A step with no checksum anywhere is restored *unverified*, saying so
in one line, after checking what can be checked without one: its stored tree, shapes
and dtypes are this run's, and every value is finite.

Orbax's threads report a failed save at length (absl and asyncio log records with
tracebacks, tensorstore's through ``sys.unraisablehook``, about 2,750 lines for a full
disk on DeiT): a save holds them back, replays them when it succeeds or fails for an
unexpected reason, and drops them when the failure is one the program reports in one
line (no space, no permission: ``train.workdir.storage_error``; Ctrl-C), after waiting
(in ``close``) for the save's threads, which may still be writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from train.workdir import storage_error

log = logging.getLogger(__name__)

CHECKSUM = "sha256"  # the key of a step's checksum in its orbax custom metadata


class CheckpointError(RuntimeError):
    """The checkpoints directory cannot be used."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.damaged = f"{self.directory}-damaged"
        writable(self.directory)  # before orbax touches it: its first write is a save, after training
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True),
        )
        self.legacy_checksums_path = os.path.join(self.directory, "checksums.json")
        self._failed: tuple[_Hush, list[threading.Thread]] | None = None  # a failed save's, until close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, state) -> None:
        """Save ``state`` as its step, with its checksum; a full disk or a denied write raises
        OSError naming the step's directory."""
        step = int(state.step)
        checksum = digest(state)
        with _ctrl_c_waits():
            hush, running = _Hush(), set(threading.enumerate())
            try:
                self.manager.save(step, args=ocp.args.StandardSave(state), custom_metadata={CHECKSUM: checksum},
                                  force=True)
                self.manager.wait_until_finished()
            except BaseException as err:
                failure = storage_error(err)
                if failure is None and not isinstance(err, KeyboardInterrupt):
                    hush.end(replay=True)
                    raise
                self._failed = hush, [t for t in threading.enumerate() if t not in running]
                if failure is not None:
                    raise OSError(failure.errno, failure.strerror, os.path.join(self.directory, str(step))) from None
                raise
            hush.end(replay=True)

    def restore(self, like):
        """The newest checkpoint that restores and verifies, laid out (shapes, dtypes,
        shardings) like the state ``like``; None when none does (damaged ones set aside)."""
        steps = self.steps()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        legacy = _read_json(self.legacy_checksums_path)
        for step in steps:
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                problem = self._verify(step, state, self._checksum(step) or legacy.get(str(step)))
            except Exception as err:  # orbax raises many types for damaged files
                problem = f"does not restore ({type(err).__name__}: {_first_line(err)})"
            if problem is None:
                return state
            log.warning("checkpoint step %d in %s %s; moved to %s, trying an older one", step, self.directory,
                        problem, self._set_aside(step))
        return None

    def _verify(self, step: int, state, checksum: str | None) -> str | None:
        """What is wrong with a restored step, or None."""
        if checksum is not None:
            return None if checksum == digest(state) else "does not match its checksum (damaged files)"
        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "default").tree
        if _layout(stored) != _layout(state):
            return "has no checksum, and its arrays' tree, shapes or dtypes are not this run's state"
        if not all(np.isfinite(a).all() for a in _host_leaves(state) if np.issubdtype(a.dtype, np.inexact)):
            return "has no checksum, and non-finite values"
        log.warning("checkpoint step %d in %s has no checksum (none in its metadata, none in checksums.json): "
                    "restored UNVERIFIED; its tree, shapes and dtypes match and every value is finite",
                    step, self.directory)
        return None

    def _checksum(self, step: int) -> str | None:
        try:
            return (self.manager.metadata(step).custom_metadata or {}).get(CHECKSUM)
        except Exception:  # unreadable step metadata: no checksum to trust
            return None

    def _set_aside(self, step: int) -> str:
        aside = os.path.join(self.damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(self.damaged, exist_ok=True)
            os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def close(self, wait_s: float = 60.0) -> None:
        """Close orbax's manager; after a failed save, first wait (``wait_s`` at most) for
        that save's threads, quietly: they report the failure again as they end."""
        try:
            if self._failed is not None:
                deadline = time.monotonic() + wait_s
                for thread in self._failed[1]:
                    thread.join(max(0.0, deadline - time.monotonic()))
            self.manager.close()
        finally:
            if self._failed is not None:
                self._failed[0].end(replay=False)
                self._failed = None


def writable(directory: str) -> None:
    """Refuse, in one line, a checkpoints directory this process cannot write (read-only,
    another user's): checked when the run opens it, before anything compiles or trains."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoints in {directory} ({err.strerror}): make it writable, "
                              f"or use another workdir") from None


@contextlib.contextmanager
def _ctrl_c_waits():
    """A first Ctrl-C (SIGINT) in the block is held until the block completes, then raised
    as KeyboardInterrupt; a second one raises at once. Only where Python's own handler is
    installed (the main thread of a program that did not change it)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pressed = []

    def hold(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


class _Hush:
    """Holds back, from creation to ``end``, what orbax's threads report: records of the
    absl, asyncio and concurrent.futures loggers, and the exceptions passed to Python's
    hooks (tensorstore's callbacks into a closed event loop go to ``sys.unraisablehook``)."""

    LOGGERS = ("absl", "asyncio", "concurrent.futures")
    HOOKS = ((sys, "excepthook"), (sys, "unraisablehook"), (threading, "excepthook"))

    def __init__(self):
        self.records, self.calls = [], []
        self.hooks = [getattr(owner, name) for owner, name in self.HOOKS]
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self._hold)
        for i, (owner, name) in enumerate(self.HOOKS):
            setattr(owner, name, lambda *args, i=i: self.calls.append((i, args)))

    def _hold(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def end(self, replay: bool) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self._hold)
        for (owner, name), hook in zip(self.HOOKS, self.hooks):
            setattr(owner, name, hook)
        if replay:
            for record in self.records:
                logging.getLogger(record.name).handle(record)
            for i, args in self.calls:
                self.hooks[i](*args)


def digest(state) -> str:
    """SHA-256 of every array of ``state``, in tree order, with its dtype and shape.
    (Multi-host runs hold no process with every array: they are not checksummed.)"""
    if jax.process_count() > 1:
        return "multi-host: not checksummed"
    h = hashlib.sha256()
    for a in _host_leaves(state):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _host_leaves(state) -> list[np.ndarray]:
    return [np.asarray(jax.device_get(leaf)) for leaf in jax.tree.leaves(state)]


def _layout(tree) -> dict:
    """{path: (shape, dtype)}, the path as plain names: orbax's stored dicts and the
    state's attributes and tuples compare equal when they hold the same arrays."""
    name = lambda key: str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
    return {tuple(map(name, path)): (tuple(a.shape), np.dtype(a.dtype))
            for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
