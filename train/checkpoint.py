"""Atomic, checksummed checkpoints of the whole train state, and a restore that verifies them.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact. The state holds params,
optimizer state, mesa statistics, step, RNG and the non-finite flag; the data position
is the step (train/data.py), so a resumed run continues exactly.

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
from etils import epath

log = logging.getLogger(__name__)

CHECKSUM = "sha256"  # the key of a step's checksum in its orbax custom metadata


class CheckpointError(RuntimeError):
    """The checkpoints directory cannot be used."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.damaged = f"{self.directory}-damaged"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )
        self.legacy_checksums_path = os.path.join(self.directory, "checksums.json")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, state) -> None:
        """Save ``state`` as its step, with its checksum in the step's own metadata."""
        step = int(state.step)
        self.manager.save(step, args=ocp.args.StandardSave(state), custom_metadata={CHECKSUM: digest(state)},
                          force=True)
        self.manager.wait_until_finished()

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

    def close(self) -> None:
        self.manager.close()


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
