"""Compile-time memory of one full training step (forward, backward, AdamW update).

Shared by the model memory benchmark and its tests: nothing is executed, so
DeiT-B at batch 256 can be sized on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesa_jax import memory
from mesa_jax import models
from train import loop

METHODS = ("baseline", "flash_like", "remat_nothing", "remat_dots", "mesa8", "mesa4", "mesa2")


def recomputed_attention(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
                         dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None,
                         force_fp32_for_softmax: bool = False):
    """flax's dot_product_attention under jax.checkpoint: its backward recomputes the
    probabilities from q, k, v and keeps nothing N x N, which is what flash attention keeps
    (the baseline a modern JAX user compares against; its speed is not flash attention's)."""

    def attend(query, key, value, bias, mask):
        return nn.dot_product_attention(query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
                                        deterministic, dtype, precision, force_fp32_for_softmax=force_fp32_for_softmax)

    return jax.checkpoint(attend)(query, key, value, bias, mask)


def build(model_name: str, method: str, dtype=None, **overrides) -> nn.Module:
    """The model a method trains: baseline, flash-like (the baseline with its attention core
    recomputed), nn.remat with a policy (these two: ViT/DeiT, which have the fields), or mesa
    at 8/4/2 bits."""
    remat = {"remat_nothing": "nothing_saveable", "remat_dots": "dots_saveable"}.get(method)
    if remat:
        overrides = {**overrides, "remat": remat}
    if method == "flash_like":
        overrides = {**overrides, "attention_fn": recomputed_attention}
    if method in ("baseline", "flash_like") or remat:
        quant = None
    elif method in ("mesa8", "mesa4", "mesa2"):
        quant = models.presets.per_head(models.preset(model_name), bits=int(method[4:]))
    else:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    return models.create(model_name, num_classes=1000, quant=quant, dtype=dtype, **overrides)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    peak: int  # compile-time peak bytes of the jitted, state-donating train step
    temp: int
    residuals: int  # bytes autodiff keeps for the backward pass (jaxpr level, params excluded)


def measure(model: nn.Module, batch: int) -> StepMemory:
    shape = (model.image_size, model.image_size, 3)
    tx = loop.make_optimizer(loop.learning_rate_schedule(1e-3, 10, 100), 0.05)
    compiled = loop.step_memory(model, tx, batch, shape)
    state = jax.eval_shape(functools.partial(loop.create_state, model, tx, 0, shape))
    images = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def loss(params, mesa, images, labels):
        variables = {"params": params, **({"mesa": mesa} if mesa else {})}
        logits, _ = model.apply(variables, images, train=True, mutable=["mesa"], rngs={"dropout": jax.random.key(0)})
        return loop.cross_entropy(logits, labels)

    kept = memory.saved_residuals(loss, state.params, state.mesa, images, labels)
    residuals = sum(r.nbytes for r in kept if "argument" not in r.source)
    return StepMemory(compiled.peak, compiled.temp, residuals)
