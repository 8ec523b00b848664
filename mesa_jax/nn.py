"""Flax Linen layers that keep int8 activations for the backward pass.

``import mesa_jax.nn as mnn`` and swap ``nn.Dense`` for ``mnn.Dense``: an ``mnn`` layer *is*
its flax namesake (a subclass: every constructor argument, default and parameter name),
plus ``quant`` (a QuantConfig, a Policy, or None for plain flax). It runs flax's own code
with mesa's ops injected at flax's injection points, through the same handlers as
``mesa_jax.compress`` (mesa_jax/_src/sites.py), so the forward is flax's, bit for bit.

Each compressed tensor has its running statistics in the ``"mesa"`` collection, updated only
when that collection is mutable (``apply(..., mutable=["mesa"])`` in training), like
``batch_stats``. Without the collection (evaluation, a params-only checkpoint) a layer computes
exactly what flax computes; with it mutable and empty the statistics are created.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax

from mesa_jax import ops
from mesa_jax._src import sites
from mesa_jax._src.stores import COLLECTION, LinenStore
from mesa_jax.policy import Quant
from mesa_jax.quant import QuantConfig

__all__ = ["COLLECTION", "Dense", "DenseGeneral", "Einsum", "Conv", "Embed", "LayerNorm", "RMSNorm", "BatchNorm",
           "MultiHeadDotProductAttention", "SelfAttention", "DotProductAttention", "GELU", "SiLU", "ReLU", "Gated",
           "Softmax", "MatMul", "gated"]

gated = sites.GATED  # act(g) * u; inside a compressed model (or a mesa layer) g and u are kept packed


class _Layer(nn.Module):
    """A flax layer plus ``quant``: flax's call, inside a mesa scope of its own."""

    quant: Quant = QuantConfig()
    _mesa_layer = True

    def __call__(self, *args, **kwargs):
        with sites.open_scope(self.quant, strict=True, owner=self):
            return super().__call__(*args, **kwargs)


class Dense(_Layer, nn.Dense):
    """flax.linen.Dense keeping an int8 copy of its input."""


class DenseGeneral(_Layer, nn.DenseGeneral):
    """flax.linen.DenseGeneral keeping an int8 copy of its input."""


class Einsum(_Layer, nn.Einsum):
    """flax.linen.Einsum keeping an int8 copy of its input."""


class Conv(_Layer, nn.Conv):
    """flax.linen.Conv keeping an int8 copy of its input."""


class Embed(_Layer, nn.Embed):
    """flax.linen.Embed whose ``attend`` (a tied head) keeps an int8 copy of its query; the
    lookup keeps nothing."""

    def attend(self, query):
        with sites.open_scope(self.quant, strict=True, owner=self):
            return super().attend(query)


class LayerNorm(_Layer, nn.LayerNorm):
    """flax.linen.LayerNorm (last axis) keeping an int8 copy of its normalized input and the per-row rstd."""


class RMSNorm(_Layer, nn.RMSNorm):
    """flax.linen.RMSNorm (last axis) keeping an int8 copy of x * rstd and the per-row rstd."""


class BatchNorm(_Layer, nn.BatchNorm):
    """flax.linen.BatchNorm (features on the last axis) keeping, in training, an int8 copy of its
    normalized input and the per-channel rstd; with the running averages it keeps nothing of x."""


class MultiHeadDotProductAttention(_Layer, nn.MultiHeadDotProductAttention):
    """flax.linen.MultiHeadDotProductAttention keeping its projections' inputs and query, key,
    value (per head; no N x N map; with attention dropout its key), or op by op
    (Policy(attention="per_op"))."""


class SelfAttention(_Layer, nn.SelfAttention):
    """flax.linen.SelfAttention, compressed as MultiHeadDotProductAttention."""


class DotProductAttention(_Layer, sites.AttentionFunction):
    """flax.linen.dot_product_attention as a layer, for ``attention_fn=`` of
    nn.MultiHeadDotProductAttention (``attention_fn=mnn.DotProductAttention()``: the params
    tree is unchanged, the statistics live under ``attention_fn``). The forward is flax's
    function; the backward keeps q, k, v packed per head and no N x N map (the fused op), with
    attention dropout its key (the mask is drawn again). With a custom einsum, or
    Policy(attention="per_op"): flax's function with mesa's einsums and softmax, op by op
    (the probabilities kept)."""

    @functools.wraps(sites.AttentionFunction.__call__)  # MHDPA passes what the signature names
    def __call__(self, *args, **kwargs):
        with sites.open_scope(self.quant, strict=True, owner=self):
            return sites.AttentionFunction.__call__(self, *args, **kwargs)


class GELU(nn.Module):
    """jax.nn.gelu (flax.linen.gelu) as a layer, keeping an int8 copy of its input. The
    default is jax.nn.gelu's, the tanh approximation; ``approximate=False`` is erf (DeiT's)."""

    approximate: bool = True
    quant: Quant = QuantConfig()

    @nn.compact
    def __call__(self, x):
        return sites.run_layer(self.quant, LinenStore(self), "gelu", sites.gelu(x, self.approximate))


class SiLU(nn.Module):
    """jax.nn.silu (flax.linen.silu, swish) as a layer, keeping an int8 copy of its input."""

    quant: Quant = QuantConfig()

    @nn.compact
    def __call__(self, x):
        return sites.run_layer(self.quant, LinenStore(self), "silu", sites.silu(x))


class ReLU(nn.Module):
    """jax.nn.relu (flax.linen.relu) as a layer, keeping one bit per element (its derivative,
    exactly) where JAX keeps a byte."""

    quant: Quant = QuantConfig()

    @nn.compact
    def __call__(self, x):
        return sites.run_layer(self.quant, LinenStore(self), "relu", sites.relu(x))


class Gated(nn.Module):
    """``act(g) * u``, a GLU's gated product (SwiGLU: silu), as a layer keeping int8 copies of
    g and u; a Dense taking its output keeps nothing of its own (see ``gated``)."""

    act: Callable = jax.nn.silu  # elementwise
    quant: Quant = QuantConfig()

    @nn.compact
    def __call__(self, g, u):
        if g.shape != u.shape:
            raise ValueError(f"Gated needs g and u of one shape, got {g.shape} and {u.shape}")
        return sites.run_layer(self.quant, LinenStore(self), "gated", sites.gated(g, u, self.act))


class Softmax(nn.Module):
    """Softmax over the last axis, keeping only an int8 copy of its output (per head if 4-D)."""

    axis: int = -1
    quant: Quant = QuantConfig()

    @nn.compact
    def __call__(self, x):
        if self.axis not in (-1, x.ndim - 1):
            raise ValueError(f"Softmax supports the last axis only, got axis={self.axis} for shape {x.shape}")
        return sites.run_layer(self.quant, LinenStore(self), "softmax", sites.softmax(x))


class MatMul(nn.Module):
    """``a @ b`` over leading batch dims, keeping int8 copies of both (per head if 4-D)."""

    quant: Quant = QuantConfig()

    @nn.compact
    def __call__(self, a, b):
        if a.ndim != b.ndim or a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"MatMul needs [..., N, K] @ [..., K, M] with equal batch dims, got {a.shape} @ {b.shape}")
        layouts = (ops.attention_layout(a.ndim), ops.attention_layout(b.ndim))
        return sites.run_layer(self.quant, LinenStore(self), "matmul",
                               sites.matmul(a, b, ops.matmul_reference, layouts))
