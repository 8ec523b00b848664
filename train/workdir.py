"""A run's working directory: checked once, locked, and tied to the configuration it started with.

    with Workdir.open(path) as workdir:      # one-line errors for unusable paths; exclusive lock
        workdir.check(config)                # first use records it; a conflict is refused
        workdir.check_dataset("cifar100")    # the data set the run trains on, likewise

The lock is an ``fcntl.flock`` on WORKDIR/lock: a second run on the same workdir is
refused at once, and a killed run releases it with its process. The configuration
is WORKDIR/config.json, written atomically; a rerun may change only the flags in
train.config.RESUMABLE (train longer, log, evaluate or checkpoint at other intervals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os

import jax

from train.config import RESUMABLE, TrainConfig, flag


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not a directory, not writable, busy, or another run's."""


class Workdir:
    def __init__(self, path: str):
        self.path = path

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str):
        """Create (or reuse) the directory, and hold its lock for the duration."""
        usable(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise WorkdirError(f"--workdir {path} cannot be created: {err.strerror}") from None
        workdir = cls(path)
        with workdir._lock():
            yield workdir

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @contextlib.contextmanager
    def _lock(self):
        if jax.process_index() != 0:  # one writer per run
            yield
            return
        fd = os.open(self.file("lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise WorkdirError(f"another run (pid {holder}) is using --workdir {self.path}; wait for it to "
                                   f"finish or use another workdir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def check(self, config: TrainConfig) -> None:
        """Record ``config`` on first use; afterwards refuse one that differs from the record."""
        recorded = self._recorded()
        if recorded is None:
            self._record(dataclasses.asdict(config))
            return
        differing = config.differences(recorded)
        if differing:
            resumable = ", ".join(flag(name) for name in RESUMABLE)
            raise WorkdirError(f"--workdir {self.path} holds a run with other settings ({'; '.join(differing)}): "
                               f"rerun with the recorded ones (only {resumable} may change) or use another workdir")

    def check_dataset(self, name: str) -> None:
        """Record the data set the run trains on (auto may fall back to synthetic); refuse another."""
        recorded = self._recorded() or {}
        used = recorded.get("dataset_used")
        if used is None:
            self._record({**recorded, "dataset_used": name})
        elif used != name:
            raise WorkdirError(f"--workdir {self.path} holds a run trained on {used!r} data, but {name!r} is what "
                               f"is available now: resuming would change the data mid-run; use another workdir")

    def _recorded(self) -> dict | None:
        path = self.file("config.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise WorkdirError(f"{path} is unreadable ({err}); it records the configuration of the run in "
                               f"--workdir {self.path}: restore it or use another workdir") from None

    def _record(self, values: dict) -> None:
        if jax.process_index() == 0:
            write_atomically(self.file("config.json"), json.dumps(values, indent=1) + "\n")


def usable(path: str) -> None:
    """One-line errors for a workdir that cannot hold a run."""
    if not path:
        raise WorkdirError("--workdir is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {path} is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(f"--workdir {path}: {parent} is a file, not a directory")
    writable = path if os.path.isdir(path) else parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {path}: {writable} is not writable")


def write_atomically(path: str, text: str) -> None:
    """Write a whole file or nothing: a temporary file, flushed to disk, then renamed over."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
