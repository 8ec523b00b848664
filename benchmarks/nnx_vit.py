"""A ViT written the way flax's NNX documentation writes one (stock ``nnx`` modules only):
what ``mesa_jax.compress`` must reach unedited, and the NNX rows of the memory
benchmark. ViT-S/16 is ``VisionTransformer(num_layers=12, num_heads=6, mlp_dim=1536,
hidden_size=384)``. ``activation``, ``attention`` and ``mlp`` are the additions to the documentation's
model: its ``nnx.gelu`` is the tanh approximation, DeiT's is exact; ``attention="einsum"``
and ``mlp="gated"`` are attention and a GeGLU MLP written by hand, as flax's gemma example
writes them (``EinsumAttention``, ``GatedMlp``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


class EinsumAttention(nnx.Module):
    """Self-attention written by hand as flax's gemma example writes it: nnx.Einsum projections,
    jnp.einsum products (grouped queries when ``num_kv_heads`` < ``num_heads``), softmax, a
    jnp.where mask when ``causal``."""

    def __init__(self, features: int, num_heads: int, num_kv_heads: int | None = None, causal: bool = False, *,
                 rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim, self.causal = features // num_heads, causal
        self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (num_heads, features, self.head_dim), rngs=rngs)
        self.kv_einsum = nnx.Einsum("BTD,CKDH->CBTKH", (2, self.num_kv_heads, features, self.head_dim), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (num_heads, self.head_dim, features), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        query = self.q_einsum(x) * self.head_dim**-0.5
        key, value = self.kv_einsum(x)
        if groups > 1:
            query = query.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
            logits = jnp.einsum("BTKGH,BSKH->BTKGS", query, key).reshape(b, t, self.num_heads, t)
        else:
            logits = jnp.einsum("BTNH,BSNH->BTNS", query, key)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[:, None, :], logits, -2.3819763e38)
        probs = jax.nn.softmax(logits, axis=-1).astype(key.dtype)
        if groups > 1:
            probs = probs.reshape(b, t, self.num_kv_heads, groups, t)
            encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape(b, t, self.num_heads, self.head_dim)
        else:
            encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, value)
        return self.attn_vec_einsum(encoded)


class GatedMlp(nnx.Module):
    """A GeGLU MLP written by hand as flax's gemma example writes its FeedForward:
    ``gelu(gate_proj(x)) * up_proj(x)``, then down_proj."""

    def __init__(self, features: int, hidden: int, activation=nnx.gelu, *, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(features, hidden, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(features, hidden, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(hidden, features, use_bias=False, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_value = self.activation(self.gate_proj(x))
        return self.down_proj(gate_value * self.up_proj(x))


class TransformerEncoder(nnx.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0, *,
                 activation=nnx.gelu, attention: str = "flax", mlp: str = "flax", rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.LayerNorm(hidden_size, rngs=rngs)
        if attention == "einsum":
            self.attn = EinsumAttention(hidden_size, num_heads, rngs=rngs)
        else:
            self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=hidden_size, dropout_rate=dropout_rate,
                                               broadcast_dropout=False, decode=False, deterministic=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(hidden_size, rngs=rngs)
        if mlp == "gated":
            self.mlp = GatedMlp(hidden_size, mlp_dim, activation, rngs=rngs)
        else:
            self.mlp = nnx.Sequential(
                nnx.Linear(hidden_size, mlp_dim, rngs=rngs),
                activation,
                nnx.Dropout(dropout_rate, rngs=rngs),
                nnx.Linear(mlp_dim, hidden_size, rngs=rngs),
                nnx.Dropout(dropout_rate, rngs=rngs),
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nnx.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, img_size: int = 224, patch_size: int = 16,
                 num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072, hidden_size: int = 768,
                 dropout_rate: float = 0.1, *, activation=nnx.gelu, attention: str = "flax", mlp: str = "flax",
                 rngs: nnx.Rngs = nnx.Rngs(0)):
        n_patches = (img_size // patch_size) ** 2
        self.patch_embeddings = nnx.Conv(in_channels, hidden_size, kernel_size=(patch_size, patch_size),
                                         strides=(patch_size, patch_size), padding="VALID", use_bias=True, rngs=rngs)
        initializer = jax.nn.initializers.truncated_normal(stddev=0.02)
        self.position_embeddings = nnx.Param(initializer(rngs.params(), (1, n_patches + 1, hidden_size), jnp.float32))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, hidden_size)))
        self.encoder = nnx.Sequential(*[
            TransformerEncoder(hidden_size, mlp_dim, num_heads, dropout_rate, activation=activation, attention=attention,
                               mlp=mlp, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.final_norm = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.classifier = nnx.Linear(hidden_size, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        patches = self.patch_embeddings(x)
        batch_size = patches.shape[0]
        patches = patches.reshape(batch_size, -1, patches.shape[-1])
        cls_token = jnp.tile(self.cls_token[...], [batch_size, 1, 1])
        x = jnp.concat([cls_token, patches], axis=1)
        embeddings = x + self.position_embeddings[...]
        embeddings = self.dropout(embeddings)
        x = self.encoder(embeddings)
        x = self.final_norm(x)
        x = x[:, 0]
        return self.classifier(x)


ACTIVATIONS = {  # the MLP's activation by name
    "gelu": functools.partial(nnx.gelu, approximate=False),  # DeiT-S's
    "gelu_tanh": nnx.gelu,  # the documentation's (jax.nn.gelu's default, the tanh approximation)
    "relu": nnx.relu,  # the original Transformer's
}


def vit_s16(num_classes: int = 1000, img_size: int = 224, *, activation: str = "gelu", attention: str = "flax",
            mlp: str = "flax", rngs: nnx.Rngs) -> VisionTransformer:
    """ViT-S/16 without dropout, as the memory benchmark compares it: DeiT-S's function (exact
    GELU) unless ``activation`` names another of ACTIVATIONS; nnx.MultiHeadAttention unless
    ``attention="einsum"`` (EinsumAttention); the documentation's MLP unless ``mlp="gated"``
    (GatedMlp, gate and up of 1536 features each)."""
    return VisionTransformer(num_classes, img_size=img_size, num_layers=12, num_heads=6, mlp_dim=1536,
                             hidden_size=384, dropout_rate=0.0, rngs=rngs, activation=ACTIVATIONS[activation],
                             attention=attention, mlp=mlp)
