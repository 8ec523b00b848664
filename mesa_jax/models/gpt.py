"""GPT-2 in stock flax.linen; the mesa variant is the same model through ``compress``.

    model = gpt.create("gpt2-s")                                 # int8, one group per head
    variables = model.init(jax.random.key(0), tokens)            # tokens [B, T] int32
    logits, state = model.apply(variables, tokens, train=True, mutable=["mesa"])   # [B, T, V]

Written as GPT-2 is (and nanoGPT writes it): token and learned position embeddings, pre-norm
blocks of causal self-attention (one fused q, k, v projection) and a 4x MLP with tanh GELU, a
final LayerNorm, and a head tied to the token embedding (``wte.attend``). Attention is
``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` on [B, T, H, D], so ``compress``
keeps Q, K and V packed per head and nothing T x T. ``create(..., quant=None)`` is the
plain-flax baseline.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesa_jax.models import presets

PRESETS = {
    # name: vocabulary, positions, width, depth, heads (MLP: 4 x width)
    "gpt2-s": dict(vocab_size=50257, max_len=1024, width=768, depth=12, num_heads=12),  # 124M parameters
    "gpt2-m": dict(vocab_size=50257, max_len=1024, width=1024, depth=24, num_heads=16),  # 355M
    # bytes (vocabulary 256): trains in minutes on a laptop CPU (python -m train.lm)
    "gpt-tiny": dict(vocab_size=256, max_len=256, width=128, depth=4, num_heads=4),  # 0.8M
}
INIT = nn.initializers.normal(0.02)  # GPT-2's, for every weight and embedding


class CausalSelfAttention(nn.Module):
    num_heads: int
    depth: int  # of the model: the output projection's init is scaled by 1/sqrt(2 depth), as GPT-2's
    dtype: Any = None
    attention_fn: Callable = jax.nn.dot_product_attention  # (q, k, v, is_causal=True) on [B, T, H, D]

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=INIT, name="c_attn")(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, c // self.num_heads)  # [B, T, 3, H, D]
        y = self.attention_fn(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)  # [B, T, H, D]
        out_init = nn.initializers.normal(0.02 / (2 * self.depth) ** 0.5)
        return nn.Dense(c, dtype=self.dtype, kernel_init=out_init, name="c_proj")(y.reshape(b, t, c))


class Mlp(nn.Module):
    """Dense -> GELU (tanh, as GPT-2) -> Dense."""

    mlp_dim: int
    depth: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=INIT, name="c_fc")(x)
        y = nn.gelu(y, approximate=True)
        out_init = nn.initializers.normal(0.02 / (2 * self.depth) ** 0.5)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=out_init, name="c_proj")(y)


class Block(nn.Module):
    """Pre-norm: x + attn(ln_1(x)), then x + mlp(ln_2(x)); dropout on each branch's output."""

    num_heads: int
    mlp_dim: int
    depth: int
    dropout_rate: float = 0.0
    dtype: Any = None
    attention_fn: Callable = jax.nn.dot_product_attention

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = nn.LayerNorm(dtype=self.dtype, name="ln_1")(x)
        x = x + drop(CausalSelfAttention(self.num_heads, self.depth, self.dtype, self.attention_fn, name="attn")(y))
        y = nn.LayerNorm(dtype=self.dtype, name="ln_2")(x)
        return x + drop(Mlp(self.mlp_dim, self.depth, self.dtype, name="mlp")(y))


class GPT(nn.Module):
    """``__call__(tokens [B, T] int) -> logits [B, T, vocab_size]`` (float32), T <= max_len.

    ``head=False`` returns the final hidden states [B, T, width] instead, and ``logits`` maps
    any of them to the vocabulary: a loss can then hold the logits of a chunk of tokens at a
    time (train.loop.next_token_losses) rather than all [B, T, vocab_size] of them.
    """

    vocab_size: int
    max_len: int  # learned positions
    width: int
    depth: int
    num_heads: int
    mlp_dim: int | None = None  # None: 4 x width
    dropout_rate: float = 0.0  # on the embeddings and each branch (nanoGPT pretrains with 0)
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); params stay float32
    remat: str | None = None  # jax.checkpoint policy name for each block (presets.REMAT_POLICIES)
    attention_fn: Callable = jax.nn.dot_product_attention  # the attention core (e.g. a recomputed one)

    def setup(self):
        self.wte = nn.Embed(self.vocab_size, self.width, embedding_init=INIT, dtype=self.dtype)
        self.wpe = nn.Embed(self.max_len, self.width, embedding_init=INIT, dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout_rate)
        block = presets.remat(Block, self.remat, static_argnums=(2,))  # (self, x, train)
        self.h = [block(self.num_heads, self.mlp_dim or 4 * self.width, self.depth, self.dropout_rate, self.dtype,
                        self.attention_fn) for _ in range(self.depth)]  # h_0, h_1, ...
        self.ln_f = nn.LayerNorm(dtype=self.dtype)

    def __call__(self, tokens: jax.Array, train: bool = False, head: bool = True) -> jax.Array:
        self._check(tokens)
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]  # [B, T, C]
        x = self.drop(x, deterministic=not train)
        for block in self.h:
            x = block(x, train)
        x = self.ln_f(x)
        return self.logits(x) if head else x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., width] final hidden states -> [..., vocab_size] float32: the head is the token embedding, transposed."""
        return self.wte.attend(hidden).astype(jnp.float32)

    def _check(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"GPT expects integer tokens [B, T], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"a sequence of {tokens.shape[1]} tokens exceeds max_len={self.max_len} positions")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide width={self.width}")


def create(name: str, **kwargs) -> GPT:
    """A preset GPT (see presets.create): ``create("gpt2-s")`` is int8, one group per head;
    ``quant=None`` is the plain-flax baseline; fields may be overridden (``vocab_size=256``)."""
    return presets.create(GPT, PRESETS, name, **kwargs)
