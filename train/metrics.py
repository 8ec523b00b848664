"""WORKDIR/metrics.jsonl: valid JSON Lines, one header row per run segment, no step twice.

Rows: a header (``"event": "start"`` for a fresh run, ``"resume"`` when a run continues
from a checkpoint: configuration, data set, devices, step memory), then per logged step
``step``, ``loss``, ``accuracy`` (images) or ``bits_per_byte`` (text), ``grad_norm``,
``learning_rate`` (of that step) and ``images_per_sec`` or ``tokens_per_sec``, and
evaluation rows (``eval_loss`` with ``eval_accuracy`` and ``eval_images``, or with
``eval_bits_per_byte`` and ``eval_tokens``). Non-finite numbers are written as ``null``. A
segment starts by dropping the rows a killed one logged past the checkpoint it resumes from
(all of them for a fresh start).
"""

from __future__ import annotations

import json
import math
import os

import jax

from train.workdir import write_atomically


class MetricsLog:
    def __init__(self, path: str):
        self.path = path

    def rows(self) -> list[dict]:
        """The rows written so far; a line cut short by a kill is skipped."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        return rows

    def start_segment(self, header: dict, resumed_from: int) -> None:
        """Keep the rows up to the checkpoint resumed from (none for a fresh start), then the header."""
        if jax.process_index() != 0:
            return
        kept = [r for r in self.rows() if resumed_from and r.get("step", 0) <= resumed_from]
        event = "resume" if resumed_from else "start"
        lines = [_dumps(r) for r in kept] + [_dumps({"step": resumed_from, "event": event, **header})]
        write_atomically(self.path, "".join(line + "\n" for line in lines))

    def write(self, row: dict) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(_dumps(row) + "\n")

    def latest(self) -> dict:
        """The latest value of every metric logged (what a finished run reports)."""
        return {k: v for row in self.rows() if "event" not in row for k, v in row.items()}


def _dumps(row: dict) -> str:
    return json.dumps(_json_safe(row), allow_nan=False)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
