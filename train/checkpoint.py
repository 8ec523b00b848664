"""Atomic, checksummed checkpoints of the whole train state, and a restore that verifies them.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact. The state holds params,
optimizer state, mesa statistics, step, RNG and the non-finite flag; the data position
is the step (train/data.py), so a resumed run continues exactly.

Orbax does not notice flipped bytes in an array file: it restores them. Each save
therefore first records a SHA-256 of the state's bytes in checksums.json (written
atomically, before orbax's rename, so every complete step has one), and ``restore``
walks the steps from the newest: one that fails to restore (truncated or emptied
files) or to verify is reported in one line and moved aside to
``<checkpoints>-damaged/<step>`` (kept for inspection; the run may then save that
step again); none left is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.workdir import write_atomically

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of the run restores and verifies."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )
        self.checksums_path = os.path.join(self.directory, "checksums.json")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, state) -> None:
        step = int(state.step)
        sums = {k: v for k, v in self._checksums().items() if int(k) in self.steps()}
        sums[str(step)] = digest(state)
        if jax.process_index() == 0:
            write_atomically(self.checksums_path, json.dumps(sums, indent=1) + "\n")
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, like):
        """The newest checkpoint that restores and matches its checksum, laid out (shapes,
        dtypes, shardings) like the state ``like``; None when there is no checkpoint."""
        steps = self.steps()
        if not steps:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        sums = self._checksums()
        for step in steps:
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                problem = None if sums.get(str(step)) == digest(state) else (
                    "does not match its checksum (damaged files, or no checksum recorded)")
            except Exception as err:  # orbax raises many types for damaged files
                problem = f"does not restore ({type(err).__name__}: {_first_line(err)})"
            if problem is None:
                return state
            log.warning("checkpoint step %d in %s %s; moved to %s, trying an older one", step, self.directory,
                        problem, self._set_aside(step))
        raise CheckpointError(f"no checkpoint in {self.directory} restores and verifies (steps {steps}); "
                              f"move the workdir aside to start afresh")

    def _set_aside(self, step: int) -> str:
        aside = os.path.join(f"{self.directory}-damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def _checksums(self) -> dict:
        try:
            with open(self.checksums_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def close(self) -> None:
        self.manager.close()


def digest(state) -> str:
    """SHA-256 of every array of ``state``, in tree order, with its dtype and shape.
    (Multi-host runs hold no process with every array: they are not checksummed.)"""
    if jax.process_count() > 1:
        return "multi-host: not checksummed"
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
