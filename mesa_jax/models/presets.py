"""What every model family's ``create`` does with a preset: its fields, the overrides checked, and
mesa by default (int8, channel groups = the heads)."""

from __future__ import annotations

import dataclasses

from mesa_jax.compress import compress
from mesa_jax.policy import Quant
from mesa_jax.quant import QuantConfig

PER_HEAD = "per_head"  # create()'s default quant


def per_head(fields: dict, **config) -> QuantConfig:
    """Mesa's DeiT default: channel groups = the heads (of the first stage, for a pyramid whose
    stages differ); attention tensors are grouped per head whatever this says."""
    heads = fields["num_heads"]
    return QuantConfig(num_groups=heads if isinstance(heads, int) else heads[0], **config)


def create(cls, presets: dict, name: str, *, num_classes: int, quant: Quant | str = PER_HEAD, dtype=None,
           **overrides):
    """``cls`` with preset ``name``'s fields and ``overrides``; ``quant``: "per_head", a
    QuantConfig or Policy (for every layer), or None (the plain-flax baseline)."""
    family = cls.__name__
    if name not in presets:
        raise ValueError(f"unknown {family} preset {name!r}; valid names: {sorted(presets)}")
    fields = {**presets[name], **overrides}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"unknown {family} field(s) {sorted(unknown)}")
    if isinstance(quant, str):
        if quant != PER_HEAD:
            raise ValueError(f"quant must be {PER_HEAD!r}, a QuantConfig, a Policy or None, got {quant!r}")
        quant = per_head(fields)
    model = cls(num_classes=num_classes, dtype=dtype, **fields)
    return model if quant is None else compress(model, quant)
