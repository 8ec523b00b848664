"""A Llama-style causal LM in stock flax.linen; the mesa variant is the same model through ``compress``.

    model = llama.create("llama-100m")                           # int8, one group per head
    logits, state = model.apply(variables, tokens, train=True, mutable=["mesa"])   # [B, T, V]

Written as Llama is: token embedding, pre-norm blocks with RMSNorm (``nn.RMSNorm``), attention
with rotary position embeddings applied to q and k (half-split pairs, as Llama's Hugging Face
and Gemma's code rotate them), a SwiGLU MLP whose product is ``mesa_jax.nn.gated(gate, up)``
(exactly ``nn.silu(gate) * up`` outside compress, which compress reaches written by hand too:
the name says it without relying on that), no biases, a final RMSNorm and an untied head
(``tie_embeddings=True``: the embedding's ``attend``, as Llama 3.2's small models). Attention is ``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` on the
rotated q and k, so ``compress`` keeps those packed per head once, and nothing T x T.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesa_jax.models import presets
from mesa_jax.nn import gated

PRESETS = {
    # name: vocabulary, width, depth, heads (head dim 64 and 32), SwiGLU hidden width (about 8/3 width)
    "llama-100m": dict(vocab_size=32000, width=640, depth=12, num_heads=10, mlp_dim=1728),  # 101M parameters
    # bytes (vocabulary 256): trains in minutes on a laptop CPU (python -m train.lm)
    "llama-tiny": dict(vocab_size=256, width=128, depth=4, num_heads=4, mlp_dim=352),  # 0.8M
}
INIT = nn.initializers.normal(0.02)  # Llama's, for every weight and the embedding


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10_000.0) -> jax.Array:
    """[T, D/2] rotation angles: position t turns pair i by t / theta^(2i / D)."""
    inverse_frequencies = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions.astype(jnp.float32)[:, None] * inverse_frequencies[None, :]


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotary position embedding of x [B, T, H, D]: the pairs (x[..., i], x[..., i + D/2]) are
    rotated by ``rope_angles``, computed in float32 and returned in x's dtype. Linear in x,
    so its backward pass keeps nothing of x."""
    angles = rope_angles(positions, x.shape[-1], theta)[None, :, None, :]  # [1, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    num_heads: int
    rope_theta: float = 10_000.0
    dtype: Any = None
    attention_fn: Callable = jax.nn.dot_product_attention  # (q, k, v, is_causal=True) on [B, T, H, D]

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        dense = lambda name: nn.Dense(c, use_bias=False, dtype=self.dtype, kernel_init=INIT, name=name)
        heads = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)  # [B, T, H, D]
        positions = jnp.arange(t)
        q = apply_rope(heads(dense("q_proj")(x)), positions, self.rope_theta)
        k = apply_rope(heads(dense("k_proj")(x)), positions, self.rope_theta)
        y = self.attention_fn(q, k, heads(dense("v_proj")(x)), is_causal=True)  # [B, T, H, D]
        return dense("o_proj")(y.reshape(b, t, c))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); compressed, it keeps gate(x) and up(x) packed and down keeps nothing."""

    mlp_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, kernel_init=INIT,
                                                name=name)
        y = gated(dense(self.mlp_dim, "gate_proj")(x), dense(self.mlp_dim, "up_proj")(x))  # silu(gate) * up
        return dense(x.shape[-1], "down_proj")(y)


class Block(nn.Module):
    """Pre-norm: x + attn(rms(x)), then x + mlp(rms(x))."""

    num_heads: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dtype: Any = None
    attention_fn: Callable = jax.nn.dot_product_attention

    @nn.compact
    def __call__(self, x):
        y = nn.RMSNorm(self.norm_eps, dtype=self.dtype, name="input_layernorm")(x)
        x = x + Attention(self.num_heads, self.rope_theta, self.dtype, self.attention_fn, name="self_attn")(y)
        y = nn.RMSNorm(self.norm_eps, dtype=self.dtype, name="post_attention_layernorm")(x)
        return x + SwiGLU(self.mlp_dim, self.dtype, name="mlp")(y)


class Llama(nn.Module):
    """``__call__(tokens [B, T] int) -> logits [B, T, vocab_size]`` (float32); ``head=False``:
    the final hidden states [B, T, width], which ``logits`` maps to the vocabulary (as GPT's)."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # True: the head is the token embedding, transposed
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); params stay float32
    remat: str | None = None  # jax.checkpoint policy name for each block (presets.REMAT_POLICIES)
    attention_fn: Callable = jax.nn.dot_product_attention  # the attention core (e.g. a recomputed one)

    def setup(self):
        self.embed_tokens = nn.Embed(self.vocab_size, self.width, embedding_init=INIT, dtype=self.dtype)
        block = presets.remat(Block, self.remat, static_argnums=())
        self.layers = [block(self.num_heads, self.mlp_dim, self.rope_theta, self.norm_eps, self.dtype,
                             self.attention_fn) for _ in range(self.depth)]  # layers_0, layers_1, ...
        self.norm = nn.RMSNorm(self.norm_eps, dtype=self.dtype)
        if not self.tie_embeddings:
            self.lm_head = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, kernel_init=INIT)

    def __call__(self, tokens: jax.Array, train: bool = False, head: bool = True) -> jax.Array:
        del train  # no dropout, as Llama pretrains
        self._check(tokens)
        x = self.embed_tokens(tokens)  # [B, T, C]
        for block in self.layers:
            x = block(x)
        x = self.norm(x)
        return self.logits(x) if head else x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., width] final hidden states -> [..., vocab_size] float32."""
        if self.tie_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def _check(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Llama expects integer tokens [B, T], got {tokens.dtype} {tokens.shape}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"num_heads={self.num_heads} must divide width={self.width} into even head widths")


def create(name: str, **kwargs) -> Llama:
    """A preset Llama (see presets.create): ``create("llama-100m")`` is int8, one group per head;
    ``quant=None`` is the plain-flax baseline; fields may be overridden (``vocab_size=256``)."""
    return presets.create(Llama, PRESETS, name, **kwargs)
