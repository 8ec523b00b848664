"""Attention that keeps packed Q, K and V and no N x N tensor: the flash-attention trade.

``attention(q, k, v, bias, mask, stats, seeds, config, forward)`` computes the forward
with ``forward`` itself (flax's dot_product_attention, or jax.nn.dot_product_attention:
whatever the baseline runs, cuDNN included), so the output is the baseline's bit for
bit. It keeps Q, K and V packed per head (int8) and nothing of size N x N: the
backward recomputes the probabilities from the restored Q and K one block of queries
at a time, so no full [B, H, N, N] float tensor is alive at once, and their
normalization from the restored logits themselves (rows sum to one: see README for
the fidelity of this choice against a saved log-sum-exp).

Layout: ``[B, T, H, D]`` for q and ``[B, S, H, D]`` for k, v (flax's and jax's); bias and
mask broadcast to ``[B, H, T, S]``. The forward's semantics the backward must know
(where the scale applies, causal masking) are ``forward``'s fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mesa_jax import ops
from mesa_jax.quant import QuantConfig

BLOCK = 64  # queries per backward block: [B, H, BLOCK, S] floats alive at once, not [B, H, T, S]


@dataclasses.dataclass(frozen=True)
class Forward:
    """A baseline attention as a static map, and the semantics its backward needs.

    ``fn(q, k, v, bias, mask) -> out``; ``scale`` multiplies q @ k (None: 1/sqrt(D));
    ``is_causal`` adds a causal mask.
    """

    fn: Any
    scale: float | None = None
    is_causal: bool = False

    def __call__(self, q, k, v, bias, mask):
        return self.fn(q, k, v, bias, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def attention(q, k, v, bias, mask, stats, seeds, config: QuantConfig, forward: Forward):
    """``forward(q, k, v, bias, mask)``, keeping packed q, k, v (one group per head).

    ``stats``/``seeds``: triples for q, k, v. Returns ``(out, updated stats)``.
    """
    layout = q.ndim - 2  # [B, L, H, D]: one group per head
    updated = tuple(ops.updated(s, t, config, layout) for s, t in zip(stats, (q, k, v)))
    return forward(q, k, v, bias, mask), updated


def _attention_fwd(q, k, v, bias, mask, stats, seeds, config, forward):
    layout = q.ndim - 2
    kept, updated = zip(*(ops.keep(t, s, seed, config, layout) for t, s, seed in zip((q, k, v), stats, seeds)))
    out, kept = ops._materialize(forward(q, k, v, bias, mask), *kept)
    return (out, tuple(updated)), (kept, bias, mask)


def _attention_bwd(config, forward, residuals, cotangents):
    kept, bias, mask = residuals
    g, _ = cotangents
    q, g = ops.restore(kept[0], g)
    k, g = ops.restore(kept[1], g)
    v, g = ops.restore(kept[2], g)
    dq, dk, dv, dbias = blocked_backward(q, k, v, bias, mask, g, forward)
    return dq, dk, dv, dbias, None, None, None


attention.defvjp(ops.own(_attention_fwd), _attention_bwd)


def probabilities(q, k, bias, mask, forward: Forward, first_query: int = 0):
    """softmax(scale * q @ k + bias, masked) in >= float32: [B, H, Tq, S] for the queries of q
    (``first_query`` is the index of q's first row, for the causal mask)."""
    scale = forward.scale if forward.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(compute), k.astype(compute)) * scale
    if bias is not None:
        logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - bias.ndim) + bias.shape).astype(compute)
    allowed = None if mask is None else jnp.broadcast_to(mask, logits.shape)
    if forward.is_causal:
        rows = first_query + lax.broadcasted_iota(jnp.int32, logits.shape[-2:], 0)
        causal = rows >= lax.broadcasted_iota(jnp.int32, logits.shape[-2:], 1)
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(compute).min)
    return jax.nn.softmax(logits, axis=-1), scale


def blocked_backward(q, k, v, bias, mask, g, forward: Forward, block: int = BLOCK):
    """(dq, dk, dv, dbias) of softmax attention, one block of ``block`` queries at a time.

    Per block: P = softmax(scale q_b k^T + bias_b), dP = g_b v^T, dS = P (dP - rowsum(P dP)),
    dq_b = scale dS k, dk += scale dS^T q_b, dv += P^T g_b, dbias_b = dS (summed to bias's shape).
    """
    t = q.shape[1]
    blocks = -(-t // block)
    pad = blocks * block - t
    padded = lambda a, axis: jnp.pad(a, [(0, pad if i == axis else 0) for i in range(a.ndim)])
    qp, gp = padded(q, 1), padded(g, 1)  # padded queries have g = 0: they contribute nothing
    per_query = lambda a: a is not None and a.ndim >= 2 and a.shape[-2] == t  # rows that follow the queries
    bias_rows, mask_rows = per_query(bias), per_query(mask)
    bias_p = padded(bias, bias.ndim - 2) if bias_rows else bias
    mask_p = padded(mask, mask.ndim - 2) if mask_rows else mask

    def rows(a, start, follows):
        return lax.slice_in_dim(a, start, start + block, axis=a.ndim - 2) if follows else a

    compute = jnp.promote_types(q.dtype, jnp.float32)
    k32, v32 = k.astype(compute), v.astype(compute)
    dk = dv = jnp.zeros(k.shape, compute)
    dbias = None if bias is None or bias_rows else jnp.zeros(bias.shape, compute)
    dqs, dbiases = [], []
    for start in range(0, blocks * block, block):  # unrolled: XLA schedules and frees block by block
        q_b, g_b = qp[:, start : start + block].astype(compute), gp[:, start : start + block].astype(compute)
        bias_b = rows(bias_p, start, bias_rows)
        p, scale = probabilities(q_b, k, bias_b, rows(mask_p, start, mask_rows), forward, start)
        dp = jnp.einsum("bthd,bshd->bhts", g_b, v32)
        ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
        dqs.append(jnp.einsum("bhts,bshd->bthd", ds, k32) * scale)
        dk = dk + jnp.einsum("bhts,bthd->bshd", ds, q_b) * scale
        dv = dv + jnp.einsum("bhts,bthd->bshd", p, g_b)
        if bias is not None and bias_rows:
            dbiases.append(_summed_to(ds, bias_b.shape))
        elif bias is not None:  # a bias shared by all queries: accumulated
            dbias = dbias + _summed_to(ds, bias_b.shape)
    dq = jnp.concatenate(dqs, axis=1)[:, :t]
    if bias is not None and bias_rows:
        dbias = jnp.concatenate(dbiases, axis=-2)[..., :t, :]
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def _summed_to(ds, shape):
    """dS [B, H, Tb, S] summed over the axes a bias of ``shape`` broadcasts along."""
    target = (1,) * (ds.ndim - len(shape)) + tuple(shape)
    axes = tuple(i for i, (n, m) in enumerate(zip(target, ds.shape)) if n == 1 and m != 1)
    return jnp.sum(ds, axis=axes, keepdims=True).reshape(shape)
