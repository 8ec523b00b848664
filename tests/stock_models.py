"""Models mesa_jax did not write, in their authors' styles: what compress must reach unedited.

- ``CNN``: the convolutional classifier of flax's MNIST tutorial (nn.Conv, nn.relu,
  nn.avg_pool, nn.Dense).
- ``Encoder``: a pre-norm Transformer encoder as flax's examples write one
  (MlpBlock with nn.Dense / nn.gelu / nn.Dropout, nn.LayerNorm,
  nn.MultiHeadDotProductAttention with dropout, a ``deterministic`` flag).
- ``ScannedViT``: a big_vision-style ViT: patch nn.Conv, class token, blocks under
  ``nn.scan(nn.remat(...))`` built inside ``__call__`` with ``variable_axes={"params": 0}``,
  an activation held in a field.
- ``SetupMlp``: a ``setup``-style module (no ``nn.compact``), its activations assigned in
  ``setup`` (one alone, two in a tuple), a second method besides ``__call__``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, inputs, *, deterministic):
        x = nn.Dense(self.mlp_dim)(inputs)
        x = nn.gelu(x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        output = nn.Dense(inputs.shape[-1])(x)
        return nn.Dropout(rate=self.dropout_rate)(output, deterministic=deterministic)


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, inputs, *, deterministic):
        x = nn.LayerNorm()(inputs)
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                                            deterministic=deterministic)(x, x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = x + inputs
        y = nn.LayerNorm()(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate)(y, deterministic=deterministic)
        return x + y


class Encoder(nn.Module):
    num_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 32
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for _ in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate)(x, deterministic=not train)
        return nn.LayerNorm(name="encoder_norm")(x)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    act: Callable = nn.gelu
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic=True):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, deterministic=deterministic)(
            y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
        y = self.act(y)
        y = nn.Dense(x.shape[-1], dtype=self.dtype)(y)
        return x + y, None


class ScannedViT(nn.Module):
    num_classes: int = 10
    patch_size: int = 4
    width: int = 32
    depth: int = 2
    mlp_dim: int = 64
    num_heads: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, image, *, train=False):
        x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                    padding="VALID", name="embedding", dtype=self.dtype)(image)
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
        x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, h * w + 1, c), x.dtype)
        block = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,))
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=self.depth)(
            self.mlp_dim, self.num_heads, dtype=self.dtype, name="encoderblock")(x, not train)
        x = nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)
        return nn.Dense(self.num_classes, name="head", dtype=self.dtype)(x[:, 0])


class WindowAttention(nn.Module):
    """Attention over windows of tokens with a learned relative bias, written as recent JAX
    models write it: a fused qkv Dense and jax.nn.dot_product_attention."""

    num_heads: int = 3

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        bias = self.param("relative_bias", nn.initializers.normal(0.02), (self.num_heads, n, n))
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias[None])
        return nn.Dense(c, name="proj")(y.reshape(b, n, c))


class SetupMlp(nn.Module):
    hidden: int = 32

    def setup(self):
        self.fc1 = nn.Dense(self.hidden)
        self.fc2 = nn.Dense(self.hidden)
        self.out = nn.Dense(8)
        self.act = nn.gelu
        self.acts = (nn.relu, jax.nn.softmax)

    def __call__(self, x):
        return self.out(self.hidden_features(x))

    def hidden_features(self, x):
        h = self.act(self.fc1(x))
        for act in self.acts:
            h = act(self.fc2(h))
        return h


class EinsumAttention(nn.Module):
    """Causal self-attention written by hand as gemma (flax's examples) writes it: DenseGeneral
    projections, jnp.einsum products, a jnp.where mask, softmax."""

    num_heads: int = 3

    @nn.compact
    def __call__(self, x):
        t, c = x.shape[-2:]
        head_dim = c // self.num_heads
        q, k, v = (nn.DenseGeneral((self.num_heads, head_dim), name=n)(x) for n in "qkv")
        logits = jnp.einsum("BTNH,BSNH->BTNS", q * head_dim**-0.5, k)
        causal = jnp.tril(jnp.ones((t, t), bool))[:, None, :]
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e10), axis=-1).astype(v.dtype)
        encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, v)
        return nn.DenseGeneral(c, axis=(-2, -1), name="out")(encoded)


class MatmulAttention(nn.Module):
    """Self-attention written by hand as ports of PyTorch ViTs write it: a fused qkv Dense,
    heads first, ``q @ k^T`` (and jnp.matmul for the values)."""

    num_heads: int = 3

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [B, H, N, D] each
        attn = jax.nn.softmax((q @ jnp.swapaxes(k, -2, -1)) * (c // self.num_heads) ** -0.5)
        y = jnp.matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, n, c)
        return nn.Dense(c, name="proj")(y)


class EinsumDense(nn.Module):
    """einsums with the module's own weights (a dense layer and experts' weights written by
    hand): no product of two activations."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], x.shape[-1]))
        experts = self.param("experts", nn.initializers.lecun_normal(), (x.shape[0], x.shape[-1], 4))
        return jnp.einsum("ecd,edf->ecf", jnp.einsum("btd,df->btf", x, w), experts)


class GluMlp(nn.Module):
    """Gated MLPs written by hand as Llama's (``silu(gate) * up``) and Gemma's (``up *
    gelu(gate)``, the product either way round) ports write them, and a ReGLU of the input."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.Dense(self.hidden, name="gate")(x)) * nn.Dense(self.hidden, name="up")(x)
        h = nn.Dense(x.shape[-1], name="down")(h)
        h = nn.Dense(self.hidden, name="up2")(h) * nn.gelu(nn.Dense(self.hidden, name="gate2")(h), approximate=False)
        return nn.Dense(x.shape[-1], name="down2")(h) * nn.relu(x)
