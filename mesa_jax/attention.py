"""Attention that keeps packed Q, K and V and no N x N tensor: the flash-attention trade.

``attention(q, k, v, stats, seed, config, ...)`` is jax.nn.dot_product_attention's;
``packed_attention(..., forward)`` computes the forward with ``forward`` itself (flax's
dot_product_attention, or jax.nn.dot_product_attention: whatever the baseline runs,
cuDNN included), so the output is the baseline's bit for bit. It keeps Q, K and V packed per head (int8) and nothing of size N x N: the
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

from mesa_jax._src.residuals import keep, materialize, own, restore
from mesa_jax.quant import QuantConfig
from pallas_kernels.hashing import combine

# The backward recomputes the probabilities a block of queries at a time: [B, H, block, S]
# float32 alive at once, not [B, H, T, S]. A block takes every query while that stays under
# BLOCK_BYTES (DeiT-S at batch 128: one block of 197, 119 MB), else the largest power of two
# of queries that fits (at least MIN_BLOCK): fewer, larger GEMMs where the map is small.
BLOCK_BYTES = 1 << 28
MIN_BLOCK = 64
# cuBLAS's tensor cores take 16-bit operands in multiples of 8 rows and columns: XLA:GPU pads
# every such GEMM operand to it, as a copy (DeiT's 197 tokens: each [B, H, 197, 197] map
# copied to 200 x 200 twice a layer). The backward pads its queries and keys once, where it
# restores them, and makes its maps at the padded size (padded keys masked out).
ALIGN = 8


@dataclasses.dataclass(frozen=True)
class Dropout:
    """flax's attention dropout: the probabilities times keep / (1 - rate), ``keep`` drawn
    from the forward's key, one draw for every batch and head if ``broadcast``. The backward
    keeps the key, not the mask, and draws the same mask again (flash attention's trade)."""

    rate: float
    broadcast: bool = True

    def keep(self, rng, shape):
        """Which of the attention weights of ``shape`` [..., T, S] are kept, as flax draws them
        (a boolean: a byte per element where a float multiplier would be four)."""
        drawn = (1,) * (len(shape) - 2) + tuple(shape[-2:]) if self.broadcast else tuple(shape)
        return jax.random.bernoulli(rng, 1.0 - self.rate, drawn)

    def multiplier(self, keep, dtype):
        """keep / keep_prob in ``dtype``, flax's arithmetic."""
        return keep.astype(dtype) / jnp.asarray(1.0 - self.rate, dtype)


@dataclasses.dataclass(frozen=True)
class Forward:
    """A baseline attention as a static map, and the semantics its backward needs.

    ``fn(q, k, v, bias, mask[, rng]) -> out``; ``scale`` multiplies q @ k (None: 1/sqrt(D));
    ``is_causal`` adds a causal mask. ``saved_lse``: the forward also keeps each query
    row's log-sum-exp of the exact logits (float32, [B, H, T]) and the backward
    normalizes the restored logits with it, instead of with their own log-sum-exp.
    ``dropout``: ``fn`` drops probabilities out with the key it is given.
    """

    fn: Any
    scale: float | None = None
    is_causal: bool = False
    saved_lse: bool = False
    dropout: Dropout | None = None

    def __call__(self, q, k, v, bias, mask, rng=None):
        return self.fn(q, k, v, bias, mask) if self.dropout is None else self.fn(q, k, v, bias, mask, rng)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """``fn(q, k, v, bias, mask, **kwargs)`` as a static map: a framework's attention function
    (flax.linen's or flax.nnx's dot_product_attention) with its settings; a dropout key, the
    one dynamic setting, is passed with the call."""

    fn: Any
    kwargs: tuple = ()  # sorted (name, value) pairs

    @classmethod
    def of(cls, fn, **kwargs) -> "Baseline":
        return cls(fn, tuple(sorted(kwargs.items())))

    def __call__(self, q, k, v, bias, mask, rng=None):
        return self.fn(q, k, v, bias, mask, **dict(self.kwargs), **({} if rng is None else {"dropout_rng": rng}))


@dataclasses.dataclass(frozen=True)
class JaxAttention:
    """jax.nn.dot_product_attention as a static map (its implementation choice: cuDNN's
    flash attention on a GPU when asked)."""

    scale: float | None = None
    is_causal: bool = False
    implementation: str | None = None

    def __call__(self, q, k, v, bias, mask):
        return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=self.scale, is_causal=self.is_causal,
                                            implementation=self.implementation)


def attention(q, k, v, stats, seed, config: QuantConfig | None, *, bias=None, mask=None, is_causal: bool = False,
              scale: float | None = None, implementation: str | None = None):
    """``jax.nn.dot_product_attention(q, k, v, bias, mask, scale=, is_causal=, implementation=)``,
    keeping q, k and v packed per head and nothing of size N x N. ``stats``: the running
    statistics of q, k, v (a triple); ``seed``: a uint32 from which each gets its own.
    Returns ``(out, updated stats)``; ``config=None`` keeps q, k, v as they are (exact).
    ``implementation``: jax.nn.dot_product_attention's (e.g. "cudnn"); the packing kernels
    follow ``config.implementation``.
    """
    saved_lse = config is not None and config.saved_lse
    forward = Forward(JaxAttention(scale, is_causal, implementation), scale, is_causal, saved_lse)
    seeds = tuple(combine(jnp.asarray(seed, jnp.uint32), jnp.uint32(i)) for i in range(3))
    return packed_attention(q, k, v, bias, mask, stats, seeds, config, forward)


def packed_attention(q, k, v, bias, mask, stats, seeds, config: QuantConfig | None, forward: Forward, rng=None):
    """``forward(q, k, v, bias, mask, rng)``, keeping q, k, v packed (one group per head) and
    ``rng``, the dropout key (with ``forward.dropout``).

    ``stats``/``seeds``: triples for q, k, v. Returns ``(out, updated stats)``.
    """
    layout = q.ndim - 2  # [B, L, H, D]: one group per head
    kept, updated = zip(*(keep(t, s, seed, config, layout) for t, s, seed in zip((q, k, v), stats, seeds)))
    return _attention(q, k, v, bias, mask, rng, tuple(kept), forward), tuple(updated)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, bias, mask, rng, kept, forward: Forward):
    return forward(q, k, v, bias, mask, rng)


def _attention_fwd(q, k, v, bias, mask, rng, kept, forward):
    lse = row_log_sum_exp(q, k, bias, mask, forward) if forward.saved_lse else None
    out, kept = materialize(forward(q, k, v, bias, mask, rng), *kept)
    return out, (kept, bias, mask, lse, rng)


def _attention_bwd(forward, residuals, g):
    kept, bias, mask, lse, rng = residuals
    q, g = restore(kept[0], g)
    k, g = restore(kept[1], g)
    v, g = restore(kept[2], g)
    dq, dk, dv, dbias = blocked_backward(q, k, v, bias, mask, g, forward, lse=lse, rng=rng)
    return dq, dk, dv, dbias, None, None, None


_attention.defvjp(own(_attention_fwd), _attention_bwd)


def logits(q, k, bias, mask, forward: Forward, first_query: int = 0):
    """scale * q @ k + bias, masked, in >= float32: [B, H, Tq, S] for the queries of q
    (``first_query`` is the index of q's first row, for the causal mask), and the scale.
    The product runs and rounds in q's dtype, as the baseline's forward computes it; the
    rest in float32."""
    scale = forward.scale if forward.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.einsum("bthd,bshd->bhts", q, k).astype(compute) * scale
    if bias is not None:
        s = s + jnp.reshape(bias, (1,) * (s.ndim - bias.ndim) + bias.shape).astype(compute)
    allowed = None if mask is None else jnp.broadcast_to(mask, s.shape)
    if forward.is_causal:
        rows = first_query + lax.broadcasted_iota(jnp.int32, s.shape[-2:], 0)
        causal = rows >= lax.broadcasted_iota(jnp.int32, s.shape[-2:], 1)
        allowed = causal if allowed is None else allowed & jnp.broadcast_to(causal, s.shape)
    if allowed is not None:
        s = jnp.where(allowed, s, jnp.finfo(compute).min)
    return s, scale


def probabilities(q, k, bias, mask, forward: Forward, first_query: int = 0, lse=None):
    """softmax of ``logits``, or exp(logits - lse) with a given per-row log-sum-exp."""
    s, scale = logits(q, k, bias, mask, forward, first_query)
    return (jax.nn.softmax(s, axis=-1) if lse is None else jnp.exp(s - lse[..., None])), scale


def query_block(batch: int, heads: int, queries: int, keys: int) -> int:
    """Queries per backward block: all of them while [B, H, T, S] float32 fits BLOCK_BYTES."""
    per_query = batch * heads * keys * 4
    if queries * per_query <= BLOCK_BYTES:
        return queries
    return max(MIN_BLOCK, 1 << max(BLOCK_BYTES // per_query, 1).bit_length() - 1)


def row_log_sum_exp(q, k, bias, mask, forward: Forward, block: int | None = None):
    """Each query row's log-sum-exp of the logits, float32 [B, H, T], one block of queries at a time."""
    block = block or query_block(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    rows = []
    for start in range(0, q.shape[1], block):
        q_b = q[:, start: start + block]
        bias_b = _rows(bias, start, q_b.shape[1], q.shape[1])
        s, _ = logits(q_b, k, bias_b, _rows(mask, start, q_b.shape[1], q.shape[1]), forward, start)
        rows.append(jax.nn.logsumexp(s, axis=-1).astype(jnp.float32))
    return jnp.concatenate(rows, axis=-1)


def _rows(a, start, size, t):
    """The query rows [start, start + size) of a bias or mask that has per-query rows, else a."""
    if a is None or a.ndim < 2 or a.shape[-2] != t:
        return a
    return lax.slice_in_dim(a, start, start + size, axis=a.ndim - 2)


def alignment(dtype) -> int:
    """The multiple the backward pads its sequences to: ALIGN for 16-bit inputs, else 1."""
    return ALIGN if jnp.dtype(dtype).itemsize == 2 else 1


def blocked_backward(q, k, v, bias, mask, g, forward: Forward, block: int | None = None, lse=None,
                     align: int | None = None, rng=None):
    """(dq, dk, dv, dbias) of softmax attention, one block of ``block`` queries at a time
    (default ``query_block``: one block where the [B, H, T, S] map is small).

    Per block: P = softmax(scale q_b k^T + bias_b) (or exp(. - lse_b) with a saved
    log-sum-exp), dP = g_b v^T, dS = P (dP - rowsum(P dP)), dq_b = scale dS k,
    dk += scale dS^T q_b, dv += P^T g_b, dbias_b = dS (summed to bias's shape). Products
    run in the inputs' dtype (bfloat16 GEMMs for bfloat16 inputs, as the baseline's
    backward: half the bytes of float32 ones), the softmax algebra in float32, and the
    blocks' dk, dv sum in float32. With ``forward.dropout`` the mask M (keep / keep_prob) is
    drawn again from ``rng``: dv += (P M)^T g_b and dP = (g_b v^T) M. Several blocks are one
    rolled loop (lax.fori_loop): a long sequence compiles as fast as a short one, and each
    block's map is freed before the next.
    Queries and keys are padded to a multiple of ``align`` (default ``alignment``): padded
    queries have g = 0, padded keys are masked out, and both are cut from the gradients.
    """
    t, s = q.shape[1], k.shape[1]
    align = align or alignment(q.dtype)
    block = min(block or query_block(q.shape[0], q.shape[2], t, s), t)
    blocks = -(-t // block)
    aligned = lambda n: -(-n // align) * align
    if blocks == 1:
        block = aligned(t)
    pad, key_pad = blocks * block - t, aligned(s) - s
    padded = lambda a, axis, n=pad: a if not n else jnp.pad(a, [(0, n if i == axis else 0) for i in range(a.ndim)])
    qp, gp = padded(q, 1), padded(g.astype(q.dtype), 1)  # padded queries have g = 0: they contribute nothing
    kp, vp = padded(k, 1, key_pad), padded(v, 1, key_pad)
    per_query = lambda a: a is not None and a.ndim >= 2 and a.shape[-2] == t  # rows that follow the queries
    per_key = lambda a: a is not None and a.ndim >= 1 and a.shape[-1] == s and key_pad > 0  # columns that follow the keys

    def padded_like_the_map(a):
        """A bias or mask (or None) padded along its axes that follow the queries and the keys."""
        a = padded(a, a.ndim - 2) if per_query(a) else a
        return padded(a, a.ndim - 1, key_pad) if per_key(a) else a

    bias_rows, mask_rows = per_query(bias), per_query(mask)
    bias_p, mask_p = padded_like_the_map(bias), padded_like_the_map(mask)
    if key_pad:  # padded keys never attend
        keys = (jnp.arange(s + key_pad) < s).reshape(1, 1, 1, -1)
        mask_p = keys if mask_p is None else mask_p & keys
    lse_p = None if lse is None else jnp.pad(lse, [(0, 0), (0, 0), (0, pad)], constant_values=jnp.inf)  # P = 0
    compute = jnp.promote_types(q.dtype, jnp.float32)
    kept_p = None if forward.dropout is None else padded_like_the_map(
        forward.dropout.keep(rng, (q.shape[0], q.shape[2], t, s)))
    product = lambda spec, a, b: jnp.einsum(spec, a, b).astype(compute)

    def gradients(start):
        """dq, dk, dv and dbias of the queries [start, start + block)."""
        rows = lambda a, axis, follows=True: (lax.dynamic_slice_in_dim(a, start, block, axis)
                                             if follows and blocks > 1 else a)
        q_b, g_b = rows(qp, 1), rows(gp, 1)
        bias_b = None if bias is None else rows(bias_p, bias.ndim - 2, bias_rows)
        mask_b = None if mask_p is None else rows(mask_p, mask_p.ndim - 2, mask_rows)
        p, scale = probabilities(q_b, kp, bias_b, mask_b, forward, start, None if lse is None else rows(lse_p, 2))
        dp = product("bthd,bshd->bhts", g_b, vp)
        p_out = p  # what multiplies v: out = (P M) v with dropout
        if kept_p is not None:  # M in q's dtype, as the forward computed it
            m_b = forward.dropout.multiplier(rows(kept_p, 2), q.dtype).astype(compute)
            p_out, dp = p * m_b, dp * m_b
        ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
        ds_low, p_low = ds.astype(q.dtype), p_out.astype(q.dtype)  # the GEMMs' operands, in the inputs' dtype
        dq_b = product("bhts,bshd->bthd", ds_low, kp) * scale
        dk_b, dv_b = product("bhts,bthd->bshd", ds_low, q_b) * scale, product("bhts,bthd->bshd", p_low, g_b)
        return dq_b, dk_b, dv_b, None if bias is None else _summed_to(ds, bias_b.shape)

    dq, dk, dv, dbias = gradients(0)
    if blocks > 1:
        # The first block's gradients start the loop's sums and rows: a loop started from zeros
        # has XLA:GPU create every layer's zeros in one kernel at the start of the backward pass,
        # all alive at once (gpt2-s: 36 [B, T, 768] float32 buffers), where values computed from
        # the layer's own gradients are created when that layer's backward runs.
        after_first = lambda a, axis: jnp.pad(a, [(0, (blocks - 1) * block if i == axis else 0)
                                                  for i in range(a.ndim)])
        dq = after_first(dq.astype(q.dtype), 1)  # each block's rows are final: kept in q's dtype
        if bias_rows:
            dbias = after_first(dbias.astype(bias.dtype), dbias.ndim - 2)

        def step(i, carry):  # dk, dv and a shared bias's gradient sum over the blocks; dq and bias rows fill in
            dq, dk, dv, dbias = carry
            start = i * block
            dq_b, dk_b, dv_b, dbias_b = gradients(start)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_b.astype(q.dtype), start, 1)
            if bias_rows:
                dbias = lax.dynamic_update_slice_in_dim(dbias, dbias_b.astype(bias.dtype), start, dbias.ndim - 2)
            elif bias is not None:
                dbias = dbias + dbias_b
            return dq, dk + dk_b, dv + dv_b, dbias

        dq, dk, dv, dbias = lax.fori_loop(1, blocks, step, (dq, dk, dv, dbias))
    if bias is not None:
        dbias = dbias[..., :t, :] if bias_rows else dbias
        dbias = (dbias[..., :s] if per_key(bias) else dbias).astype(bias.dtype)
    return dq[:, :t].astype(q.dtype), dk[:, :s].astype(k.dtype), dv[:, :s].astype(v.dtype), dbias


def _summed_to(ds, shape):
    """dS [B, H, Tb, S] summed over the axes a bias of ``shape`` broadcasts along."""
    target = (1,) * (ds.ndim - len(shape)) + tuple(shape)
    axes = tuple(i for i, (n, m) in enumerate(zip(target, ds.shape)) if n == 1 and m != 1)
    return jnp.sum(ds, axis=axes, keepdims=True).reshape(shape)
