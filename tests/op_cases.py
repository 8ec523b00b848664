"""One table of the ops under test: inputs, the op call, and an independent reference.

Each case's ``call(config, *inputs)`` runs the mesa op with the batch statistics of
each packed tensor; ``reference(*inputs)`` is plain jnp (autodiff by JAX);
``packed`` names what the op keeps, with its layout: an argument index, "out"
(softmax keeps its output), "normalized" (layer_norm keeps (x - mean) * rstd),
"rms_normalized" (rms_norm keeps x * rstd) or "batch_normalized" (batch_norm keeps
(x - mean) * rstd with moments over every axis but the last).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mesa_jax import ops, quant

SEED = jnp.uint32(11)
SEED_B = jnp.uint32(12)


def stats_of(t, layout="channels", config=quant.QuantConfig()):
    return quant.stats_of(t, layout, quant.num_groups_for(t.shape, layout, config))


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    call: Callable  # (config, *inputs) -> output (the op's y, without its statistics)
    reference: Callable  # (*inputs) -> output
    packed: tuple[tuple[int | str, str], ...]  # (argument index or "out", layout)

    def inputs(self, key, dtype=jnp.float32):
        keys = jax.random.split(key, len(self.shapes))
        return tuple(jax.random.normal(k, s, dtype) for k, s in zip(keys, self.shapes))

    def __repr__(self):
        return self.name


def _ln_reference(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale.reshape(1, 1, -1) + bias.reshape(1, 1, -1)


def _rms_reference(x, scale, eps=1e-6):
    return x / jnp.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale.reshape(1, 1, -1)


BN_EPSILON = 1e-5  # flax's BatchNorm default


def _bn_reference(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    channels = lambda v: v.reshape((1,) * (x.ndim - 1) + (-1,))
    return (x - mean) / jnp.sqrt(var + BN_EPSILON) * channels(scale) + channels(bias)


def _conv_reference(x, k, b):
    y = jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b.reshape(1, 1, 1, -1)


CASES = [
    OpCase(
        "dense", ((2, 5, 8), (8, 6), (6,)),
        lambda c, x, k, b: ops.dense(x, k, b, stats_of(x), SEED, c)[0],
        lambda x, k, b: x @ k + b.reshape(1, 1, -1),
        ((0, "channels"),),
    ),
    OpCase(
        "conv", ((2, 6, 6, 3), (2, 2, 3, 4), (4,)),
        lambda c, x, k, b: ops.conv(x, k, b, stats_of(x), SEED, c, (2, 2), "VALID")[0],
        _conv_reference,
        ((0, "channels"),),
    ),
    OpCase(
        "gelu", ((2, 5, 8),),
        lambda c, x: ops.gelu(x, stats_of(x), SEED, c)[0],
        lambda x: jax.nn.gelu(x, approximate=False),
        ((0, "channels"),),
    ),
    OpCase(
        "gelu_tanh", ((2, 5, 8),),
        lambda c, x: ops.gelu(x, stats_of(x), SEED, c, True)[0],
        lambda x: jax.nn.gelu(x, approximate=True),
        ((0, "channels"),),
    ),
    OpCase(
        "layer_norm", ((2, 5, 8), (8,), (8,)),
        lambda c, x, s, b: ops.layer_norm(x, s, b, stats_of(ops.normalized_input(x)[0]), SEED, c)[0],
        _ln_reference,
        (("normalized", "channels"),),
    ),
    OpCase(
        "rms_norm", ((2, 5, 8), (8,)),
        lambda c, x, s: ops.rms_norm(x, s, stats_of(ops.normalized_input(x, centered=False)[0]), SEED, c)[0],
        _rms_reference,
        (("rms_normalized", "channels"),),
    ),
    OpCase(
        "batch_norm", ((4, 3, 3, 8), (8,), (8,)),
        lambda c, x, s, b: ops.batch_norm(
            x, s, b, stats_of(ops.normalized_input(x, BN_EPSILON, per_channel=True)[0]), SEED, c, BN_EPSILON)[0],
        _bn_reference,
        (("batch_normalized", "channels"),),
    ),
    OpCase(
        "silu", ((2, 5, 8),),
        lambda c, x: ops.silu(x, stats_of(x), SEED, c)[0],
        lambda x: x / (1 + jnp.exp(-x)),
        ((0, "channels"),),
    ),
    OpCase(
        "gated_silu", ((2, 5, 8), (2, 5, 8)),
        lambda c, g, u: ops.gated(g, u, stats_of(g), stats_of(u), SEED, SEED_B, c)[0],
        lambda g, u: g / (1 + jnp.exp(-g)) * u,
        ((0, "channels"), (1, "channels")),
    ),
    OpCase(
        "softmax_heads", ((2, 3, 5, 5),),
        lambda c, x: ops.softmax(x, stats_of(jax.nn.softmax(x), "heads"), SEED, c)[0],
        lambda x: jax.nn.softmax(x, axis=-1),
        (("out", "heads"),),
    ),
    OpCase(
        "softmax_channels", ((2, 5, 8),),
        lambda c, x: ops.softmax(x, stats_of(jax.nn.softmax(x)), SEED, c)[0],
        lambda x: jax.nn.softmax(x, axis=-1),
        (("out", "channels"),),
    ),
    OpCase(
        "matmul_heads", ((2, 3, 5, 4), (2, 3, 4, 6)),
        lambda c, a, b: ops.matmul(a, b, stats_of(a, "heads"), stats_of(b, "heads"), SEED, SEED_B, c)[0],
        jnp.matmul,
        ((0, "heads"), (1, "heads")),
    ),
    OpCase(
        "matmul_3d", ((2, 5, 4), (2, 4, 6)),
        lambda c, a, b: ops.matmul(a, b, stats_of(a), stats_of(b), SEED, SEED_B, c)[0],
        jnp.matmul,
        ((0, "channels"), (1, "channels")),
    ),
]
