"""A run's working directory: checked once, locked, and tied to the run it holds.

    with Workdir.open(path) as workdir:      # one-line errors for unusable paths; exclusive lock
        workdir.check(config)                # a run the workdir holds refuses other settings
        workdir.check_dataset("cifar100")    # and another data set
        workdir.refuse_start_over()          # when no checkpoint restores: only if it holds no run
        workdir.record(config, "cifar100")   # when training starts
        workdir.saved(step)                  # after each checkpoint

The lock is an ``fcntl.flock`` on WORKDIR/lock: a second run on the same workdir is
refused at once, and a killed run releases it with its process. The configuration
is WORKDIR/config.json, written atomically when a run starts training (a run that
fails before that leaves none), with the data set it trains on and the newest
checkpoint it saved.

The workdir *holds a run* once that run has saved a checkpoint (config.json names
it; or checkpoints are present, or set aside in checkpoints-damaged/). From then on a
rerun may change only the flags in train.config.RESUMABLE (train longer, log,
evaluate or checkpoint at other intervals), and a rerun that finds no checkpoint to
restore is refused in one line instead of starting over from step 0 (which would
rewrite metrics.jsonl). Until then nothing would be lost: a rerun, with any
settings, starts afresh and replaces the record (a run killed before its first
checkpoint, a run that failed before its first step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re

import jax

from train.config import RESUMABLE, RunConfig, flag


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not a directory, not writable, full, busy, or another run's;
    or it holds a run that has no checkpoint left to resume from."""


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
        try:
            fd = os.open(self.file("lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkdirError(f"--workdir {self.path}: cannot open its lock file ({err.strerror})") from None
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

    def check(self, config: RunConfig) -> None:
        """Refuse ``config`` where it differs from the run the workdir holds (RESUMABLE aside)."""
        recorded = self._binding()
        differing = config.differences(recorded) if recorded else []
        if differing:
            resumable = ", ".join(flag(name) for name in RESUMABLE)
            raise WorkdirError(f"--workdir {self.path} holds a run with other settings ({'; '.join(differing)}): "
                               f"rerun with the recorded ones (only {resumable} may change) or use another workdir")

    def check_dataset(self, name: str) -> None:
        """Refuse a data set other than the one the run the workdir holds trains on (auto may
        fall back to synthetic)."""
        used = (self._binding() or {}).get("dataset_used")
        if used is not None and used != name:
            raise WorkdirError(f"--workdir {self.path} holds a run trained on {used!r} data, but {name!r} is what "
                               f"is available now: resuming would change the data mid-run; use another workdir")

    def holds_run(self) -> str | None:
        """What shows that the workdir holds a run (see the module docstring), or None."""
        saved = (self._recorded() or {}).get("checkpoint_step")
        if saved is not None:
            return f"config.json records its checkpoint step {saved}"
        if _listing(self.file("checkpoints-damaged")):
            return "its checkpoints were set aside in checkpoints-damaged/"
        if any(entry.isdigit() for entry in _listing(self.file("checkpoints"))):
            return "it has checkpoints"
        return None

    def refuse_start_over(self) -> None:
        """Called when no checkpoint restores: a workdir that holds a run must not start over."""
        held = self.holds_run()
        if held is not None:
            kept = _listing(self.file("checkpoints-damaged"))
            damaged = " (damaged ones are kept in checkpoints-damaged/)" if kept else ""
            raise WorkdirError(f"--workdir {self.path} holds a run ({held}) but no checkpoint of it restores: put its "
                               f"checkpoints back in {self.file('checkpoints')}{damaged}, or move the workdir aside "
                               f"to start afresh")

    def record(self, config: RunConfig, dataset: str) -> None:
        """Record the configuration and data set of the run now training (keeping its newest checkpoint)."""
        kept = {k: v for k, v in (self._recorded() or {}).items() if k == "checkpoint_step"}
        self._record({**dataclasses.asdict(config), "dataset_used": dataset, **kept})

    def saved(self, step: int) -> None:
        """Record that checkpoint ``step`` is complete: from now on the workdir holds the run."""
        self._record({**(self._recorded() or {}), "checkpoint_step": step})

    def _binding(self) -> dict | None:
        """The record, where it binds a rerun: once the workdir holds a run."""
        recorded = self._recorded()
        return recorded if recorded is not None and self.holds_run() else None

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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: leave no partial temporary file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# Errors a user fixes outside the program (free space, permissions), reported in one line.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(err: BaseException) -> OSError | None:
    """The out-of-space or permission OSError behind ``err``, or None. Orbax reports
    tensorstore's as ``ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")`` (the
    code, not the status: XLA's out-of-memory errors are RESOURCE_EXHAUSTED too)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        code = re.search(r"os_error_code='?(\d+)", str(err))
        if code and int(code.group(1)) in STORAGE_ERRNOS:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        err = err.__cause__ or err.__context__
    return None


def _listing(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
