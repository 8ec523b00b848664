"""Flax Linen layers over mesa_jax.ops: drop-in for their flax.linen namesakes.

``import mesa_jax.nn as mnn`` and swap ``nn.Dense`` for ``mnn.Dense``: same
constructor arguments, defaults and parameter names, plus ``quant`` (a
QuantConfig, a Policy, or None for plain flax behaviour). Each compressed tensor
has its running statistics in the ``"mesa"`` collection; they are updated only
when that collection is mutable (``apply(..., mutable=["mesa"])`` in training),
like flax's ``batch_stats``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from mesa_jax import ops, quant
from mesa_jax.policy import Quant, resolve
from mesa_jax.quant import Layout, QuantConfig

COLLECTION = "mesa"
Dtype = Any
Initializer = Callable[..., jax.Array]
DEFAULT = QuantConfig()


class _Compressed(nn.Module):
    """Shared machinery: resolve the config, read/update statistics, make a seed."""

    kind = ""  # policy kind of the layer, set by each subclass

    @property
    def _where(self) -> str:
        return "/".join(self.path) or "<root>"

    def _config(self) -> QuantConfig | None:
        return resolve(self.quant, self.kind, "/".join(self.path))

    def _statistics(self, name: str, x: jax.Array, layout: Layout, config: QuantConfig):
        """(the variable holding the running statistics of ``x``, a seed to pack ``x`` with)."""
        groups = quant.num_groups_for(x.shape, layout, config)
        if not (self.is_initializing() or self.has_variable(COLLECTION, name)):
            raise ValueError(
                f"{type(self).__name__} at {self._where} has no {COLLECTION!r} "
                f"statistics: apply with the {COLLECTION!r} collection from model.init "
                f"(variables={{'params': ..., '{COLLECTION}': ...}})"
            )
        stats = self.variable(COLLECTION, name, quant.init_stats, groups)
        if stats.value.lo.shape != (groups,):
            raise ValueError(
                f"{COLLECTION!r} statistics {self._where}/{name} hold {stats.value.lo.shape[0]} "
                f"groups but the input of shape {x.shape} needs {groups}"
            )
        return stats, self._seed(name, stats.value.count)

    def _record(self, stats, updated: quant.Stats) -> None:
        """Keep the statistics an op returned, if the collection is mutable (training)."""
        if self.is_mutable_collection(COLLECTION) and not self.is_initializing():
            stats.value = updated

    def _seed(self, name: str, count: jax.Array) -> jax.Array:
        """From the "mesa" RNG stream when given, else from the layer path and step count."""
        if self.has_rng(COLLECTION):
            return jax.random.bits(self.make_rng(COLLECTION), (), jnp.uint32)
        return quant.layer_seed("/".join((*self.path, name)), count)


class Dense(_Compressed):
    """flax.linen.Dense with an int8 copy of its input kept for the backward pass."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.linear.default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    quant: Quant = DEFAULT
    kind = "dense"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        config = self._config()
        if config is None:
            return ops.dense_reference(inputs, kernel, bias, self.precision)
        stats, seed = self._statistics("inputs", inputs, "channels", config)
        y, updated = ops.dense(inputs, kernel, bias, stats.value, seed, config, self.precision)
        self._record(stats, updated)
        return y


class Conv(_Compressed):
    """flax.linen.Conv (channels last, no dilation or feature groups), int8 input residual."""

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.linear.default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    quant: Quant = DEFAULT
    kind = "conv"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        window = tuple(self.kernel_size)
        if inputs.ndim != len(window) + 2:
            raise ValueError(
                f"Conv with kernel_size {window} needs [batch, *{len(window)} spatial, channels] "
                f"inputs, got shape {inputs.shape}"
            )
        strides = (self.strides,) * len(window) if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
        kernel_shape = (*window, inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        config = self._config()
        if config is None:
            return ops.conv_reference(inputs, kernel, bias, strides, padding)
        stats, seed = self._statistics("inputs", inputs, "channels", config)
        y, updated = ops.conv(inputs, kernel, bias, stats.value, seed, config, strides, padding)
        self._record(stats, updated)
        return y


class LayerNorm(_Compressed):
    """flax.linen.LayerNorm over the last axis, keeping an int8 copy of its normalized input."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros_init()
    scale_init: Initializer = nn.initializers.ones_init()
    quant: Quant = DEFAULT
    kind = "layer_norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (jnp.shape(x)[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, features, self.param_dtype) if self.use_bias else None
        config = self._config()
        if config is None:
            y = ops.layer_norm_reference(x, scale, bias, self.epsilon)
        else:
            stats, seed = self._statistics("normalized", x, "channels", config)
            y, updated = ops.layer_norm(x, scale, bias, stats.value, seed, config, self.epsilon)
            self._record(stats, updated)
        return y if self.dtype is None else y.astype(self.dtype)


class GELU(_Compressed):
    """jax.nn.gelu as a layer (exact erf by default), keeping an int8 copy of its input."""

    approximate: bool = False
    quant: Quant = DEFAULT
    kind = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self._config()
        if config is None:
            return ops.gelu_reference(x, self.approximate)
        stats, seed = self._statistics("inputs", x, "channels", config)
        y, updated = ops.gelu(x, stats.value, seed, config, self.approximate)
        self._record(stats, updated)
        return y


class Softmax(_Compressed):
    """Softmax over the last axis, keeping only an int8 copy of its output (per head if 4-D)."""

    axis: int = -1
    quant: Quant = DEFAULT
    kind = "softmax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.axis not in (-1, x.ndim - 1):
            raise ValueError(f"Softmax supports the last axis only, got axis={self.axis} for shape {x.shape}")
        config = self._config()
        if config is None:
            return ops.softmax_reference(x)
        stats, seed = self._statistics("outputs", x, ops.attention_layout(x.ndim), config)  # y has x's shape
        y, updated = ops.softmax(x, stats.value, seed, config)
        self._record(stats, updated)
        return y


class MatMul(_Compressed):
    """``a @ b`` over leading batch dims, keeping int8 copies of both (per head if 4-D)."""

    quant: Quant = DEFAULT
    kind = "matmul"

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if a.ndim != b.ndim or a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"MatMul needs [..., N, K] @ [..., K, M] with equal batch dims, got {a.shape} @ {b.shape}")
        config = self._config()
        if config is None:
            return ops.matmul_reference(a, b)
        stats_a, seed_a = self._statistics("a", a, ops.attention_layout(a.ndim), config)
        stats_b, seed_b = self._statistics("b", b, ops.attention_layout(b.ndim), config)
        y, (updated_a, updated_b) = ops.matmul(a, b, stats_a.value, stats_b.value, seed_a, seed_b, config)
        self._record(stats_a, updated_a)
        self._record(stats_b, updated_b)
        return y


# ------------------------------------------------------------------ blocks

ModuleDef = Any


class Layers(NamedTuple):
    """The layer classes a block is built from: swap them to change every layer at once."""

    dense: ModuleDef = Dense
    conv: ModuleDef = Conv
    layer_norm: ModuleDef = LayerNorm
    gelu: ModuleDef = GELU
    softmax: ModuleDef = Softmax
    matmul: ModuleDef = MatMul


def layers(quant: Quant = DEFAULT, dtype: Dtype | None = None) -> Layers:
    """mesa layer classes bound to ``quant`` and ``dtype``.

    ``quant=None`` gives the plain-flax baseline: flax.linen's own Dense, Conv and
    LayerNorm, and the parameter-free layers running plain jnp.
    """
    if quant is None:
        plain = dict(dense=nn.Dense, conv=nn.Conv, layer_norm=nn.LayerNorm)
    else:
        plain = dict(dense=Dense, conv=Conv, layer_norm=LayerNorm)
    typed = {k: functools.partial(v, dtype=dtype) for k, v in plain.items()}
    if quant is not None:
        typed = {k: functools.partial(v, quant=quant) for k, v in typed.items()}
    return Layers(
        **typed,
        gelu=functools.partial(GELU, quant=quant),
        softmax=functools.partial(Softmax, quant=quant),
        matmul=functools.partial(MatMul, quant=quant),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention; Q, K, V, the probabilities and both matmuls grouped per head."""

    num_heads: int
    dense: ModuleDef = Dense
    softmax: ModuleDef = Softmax
    matmul: ModuleDef = MatMul

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3:
            raise ValueError(f"SelfAttention needs [batch, tokens, width] inputs, got shape {x.shape}")
        b, n, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide the width {c}")
        h, d = self.num_heads, c // self.num_heads
        qkv = self.dense(3 * c, name="qkv")(x).reshape(b, n, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, H, N, D]
        scores = self.matmul(name="scores")(q * d**-0.5, k.swapaxes(-1, -2))  # [B, H, N, N]
        probs = self.softmax(name="softmax")(scores)
        mixed = self.matmul(name="mix")(probs, v)  # [B, H, N, D]
        return self.dense(c, name="proj")(mixed.transpose(0, 2, 1, 3).reshape(b, n, c))


class Mlp(nn.Module):
    """Dense -> GELU -> Dense."""

    hidden: int
    dense: ModuleDef = Dense
    gelu: ModuleDef = GELU

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.gelu(name="gelu")(self.dense(self.hidden, name="fc1")(x))
        return self.dense(x.shape[-1], name="fc2")(y)
