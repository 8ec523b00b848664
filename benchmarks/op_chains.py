"""Chains of one op inside Transformer-like links, shared by the memory test and benchmark.

A link is the op followed by a dense layer; linear ops are followed by a GELU
instead, because in a purely linear chain the cotangents do not depend on the
forward pass and XLA:CPU then interleaves backward and forward freely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mesa_jax import memory, ops, quant

OPS = ("dense", "conv", "gelu", "layer_norm", "softmax", "matmul")
SEED = jnp.uint32(1)
HEADS = 4


def _stats(t, layout="channels"):
    groups = t.shape[1] if layout == "heads" else 1
    return quant.stats_of(t, layout, groups)


def link(name: str, shape: tuple[int, int, int]):
    """``link(x, kernel, config) -> x`` for x of ``shape`` = [B, N, C] (N == C // HEADS).

    ``config=None`` is the baseline: the ops' plain references, differentiated by JAX.
    """
    b, n, c = shape
    heads = lambda t: t.reshape(b, n, HEADS, n).transpose(0, 2, 1, 3)  # [B, H, N, N]
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(b, n, c)
    image = lambda t: t.reshape(b, n // 8, 8, c)
    mesa_or_plain = lambda op, plain: lambda *a, q: plain(*a) if q is None else op(*a, q)
    dense = mesa_or_plain(lambda x, k, q: ops.dense(x, k, None, _stats(x), SEED, q)[0],
                          lambda x, k: ops.dense_reference(x, k, None))
    gelu = mesa_or_plain(lambda x, q: ops.gelu(x, _stats(x), SEED, q)[0], ops.gelu_reference)
    softmax = mesa_or_plain(lambda t, q: ops.softmax(t, _stats(t, "heads"), SEED, q)[0], ops.softmax_reference)
    matmul = mesa_or_plain(lambda t, q: ops.matmul(t, t, _stats(t, "heads"), _stats(t, "heads"), SEED, SEED, q)[0],
                           lambda t: ops.matmul_reference(t, t))
    conv = mesa_or_plain(lambda x, k, q: ops.conv(x, k, None, _stats(x), SEED, q, (1, 1), "SAME")[0],
                         lambda x, k: ops.conv_reference(x, k, None, (1, 1), "SAME"))
    layer_norm = mesa_or_plain(lambda x, q: ops.layer_norm(x, None, None, _stats(x), SEED, q)[0],
                               lambda x: ops.layer_norm_reference(x, None, None))
    links = {
        "dense": lambda x, k, q: gelu(dense(x, k, q=q), q=q),
        "conv": lambda x, k, q: gelu(conv(image(x), k, q=q), q=q).reshape(b, n, c),
        "gelu": lambda x, k, q: dense(gelu(x, q=q), k, q=q),
        "layer_norm": lambda x, k, q: dense(layer_norm(x, q=q), k, q=q),
        "softmax": lambda x, k, q: dense(merge(softmax(heads(x), q=q)), k, q=q),
        "matmul": lambda x, k, q: dense(merge(matmul(heads(x), q=q)), k, q=q),
    }
    return links[name]


def chain_loss(name: str, shape, config):
    one = link(name, shape)

    def loss(x, kernels):
        for k in kernels:
            x = one(x, k, config)
        return jnp.sum(x)

    return loss


def chain_args(name: str, shape, links: int):
    c = shape[-1]
    kernel = (3, 3, c, c) if name == "conv" else (c, c)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return x, [jax.ShapeDtypeStruct(kernel, jnp.float32)] * links


def per_link(name: str, shape, config, links=(4, 8)):
    """Bytes one more link costs: (kept by autodiff, compiled temp), both for the gradient."""

    def measure(n):
        loss, args = chain_loss(name, shape, config), chain_args(name, shape, n)
        kept = sum(r.nbytes for r in memory.saved_residuals(loss, *args) if "argument" not in r.source)
        temp = memory.compiled_memory(jax.grad(loss, argnums=(0, 1)), *args).temp
        return kept, temp

    (k0, t0), (k1, t1) = measure(links[0]), measure(links[1])
    steps = links[1] - links[0]
    return (k1 - k0) / steps, (t1 - t0) / steps
