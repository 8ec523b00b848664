"""What every model family's ``create`` does with a preset: its fields, the overrides checked, and
mesa by default (int8, channel groups = the heads); and the blocks' rematerialization policies."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax

from mesa_jax._src.compress import compress
from mesa_jax.policy import Quant
from mesa_jax.quant import QuantConfig

PER_HEAD = "per_head"  # create()'s default quant
# A language model's attention core by name (its ``attention_fn``; train.lm's --attention): jax's
# with XLA's kernels, whose forward materializes the T x T logits, or cuDNN's flash attention
# (NVIDIA GPUs). mesa keeps the forward the model calls, so with cuDNN's no T x T map exists.
ATTENTION = {
    "xla": jax.nn.dot_product_attention,
    "cudnn": functools.partial(jax.nn.dot_product_attention, implementation="cudnn"),
}
REMAT_POLICIES = {  # a model's ``remat`` field: the jax.checkpoint policy of each block
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def per_head(fields: dict, **config) -> QuantConfig:
    """Mesa's DeiT default: channel groups = the heads (of the first stage, for a pyramid whose
    stages differ); attention tensors are grouped per head whatever this says."""
    heads = fields["num_heads"]
    return QuantConfig(num_groups=heads if isinstance(heads, int) else heads[0], **config)


def create(cls, presets: dict, name: str, *, quant: Quant | str = PER_HEAD, dtype=None, **overrides):
    """``cls`` with preset ``name``'s fields and ``overrides`` (``num_classes`` for a vision
    model); ``quant``: "per_head", a QuantConfig or Policy (for every layer), or None (the
    plain-flax baseline)."""
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
    model = cls(dtype=dtype, **fields)
    return model if quant is None else compress(model, quant)


def remat(block: type[nn.Module], policy: str | None, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """``block`` under nn.remat with the named policy (None: as it is); ``static_argnums`` count
    ``self`` as 0, as nn.remat does."""
    if policy is None:
        return block
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; valid: {sorted(REMAT_POLICIES)}")
    return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)
