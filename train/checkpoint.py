"""Atomic checkpoints of the whole train state with orbax, and resumption.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. The state holds
params, optimizer state, mesa statistics, step and RNG; the data position is the
step (train/data.py), so a resumed run continues exactly.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state) -> None:
        self.manager.save(int(state.step), args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, like):
        """The latest checkpoint, laid out (shapes, dtypes, shardings) like the state ``like``."""
        step = self.manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
