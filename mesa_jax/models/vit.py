"""ViT / DeiT in stock flax.linen; the mesa variant is the same model through ``compress``.

    model = vit.create("deit-s", num_classes=1000)              # int8, one group per head
    variables = model.init(jax.random.key(0), images)           # {"params", "mesa"}
    logits, state = model.apply(variables, images, train=True,
                                mutable=["mesa"], rngs={"dropout": key})

Written with nn.Conv, nn.LayerNorm, nn.MultiHeadDotProductAttention, nn.Dense and
nn.gelu, as anyone would: ``create(..., quant=None)`` is the plain-flax baseline and
any other ``quant`` returns ``mesa_jax.compress(ViT(...), quant)``, so there is one
model, one params tree and one path.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mesa_jax.models import presets
from mesa_jax.nn import COLLECTION

PRESETS = {
    # name: image size, patch, width, depth, heads, MLP width, max drop-path rate
    "deit-ti": dict(image_size=224, patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768, drop_path=0.1),
    "deit-s": dict(image_size=224, patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536, drop_path=0.1),
    "deit-b": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, drop_path=0.1),
    # CIFAR-100: 32x32 images in 8x8 patches of 4 pixels, DeiT-Ti widths.
    "vit-c100": dict(image_size=32, patch_size=4, width=192, depth=12, num_heads=3, mlp_dim=768, drop_path=0.1),
}
REMAT_POLICIES = presets.REMAT_POLICIES


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch; ``rate`` may be traced.

    A per-sample [B, 1, ...] scale, so the backward pass keeps no full-size mask.
    """

    @nn.compact
    def __call__(self, x, rate, train: bool):
        if not train:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * (keep / (1.0 - rate)).astype(x.dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU (erf, as DeiT) -> Dense."""

    mlp_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = None
    attention_fn: Callable = nn.dot_product_attention

    @nn.compact
    def __call__(self, x, drop_rate, train: bool = False):
        y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, attention_fn=self.attention_fn,
                                            name="attn")(y, y)
        x = x + DropPath()(y, drop_rate, train)
        y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        y = MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)
        return x + DropPath()(y, drop_rate, train), None


class ViT(nn.Module):
    """Vision Transformer with a class token; ``__call__(images [B, H, W, C]) -> logits``."""

    num_classes: int
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0  # rate of the last block; earlier ones scale linearly from 0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); params stay float32
    scan: bool = False  # nn.scan over blocks: one compiled block, stacked params
    remat: str | None = None  # jax.checkpoint policy name for each block
    attention_fn: Callable = nn.dot_product_attention  # MHDPA's core (e.g. mnn.DotProductAttention())

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        self._check(images)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="embedding")(images)
        x = x.reshape(x.shape[0], -1, self.width)  # [B, N, C]
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        x = x + pos.astype(x.dtype)
        rates = jnp.asarray(np.linspace(0.0, self.drop_path, self.depth), jnp.float32)
        x = self._scanned(x, rates, train) if self.scan else self._unrolled(x, rates, train)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0]).astype(jnp.float32)

    def _block_class(self):
        return presets.remat(Block, self.remat, static_argnums=(3,))  # (self, x, drop_rate, train)

    def _unrolled(self, x, rates, train):
        for i in range(self.depth):
            block = self._block_class()(self.num_heads, self.mlp_dim, self.dtype, self.attention_fn, name=f"block_{i}")
            x, _ = block(x, rates[i], train)
        return x

    def _scanned(self, x, rates, train):
        blocks = nn.scan(
            self._block_class(),
            variable_axes={"params": 0, COLLECTION: 0},
            split_rngs={"params": True, "dropout": True, COLLECTION: True},
            in_axes=(0, nn.broadcast),
            length=self.depth,
        )(self.num_heads, self.mlp_dim, self.dtype, self.attention_fn, name="blocks")
        return blocks(x, rates, train)[0]

    def _check(self, images):
        want = (self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:3] != want:
            raise ValueError(
                f"ViT expects NHWC images of {want[0]}x{want[1]} pixels, got shape {images.shape}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide width={self.width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")


def create(name: str, **kwargs) -> ViT:
    """A preset ViT (see presets.create): ``create("deit-s", num_classes=1000)`` is int8, one
    group per head (Mesa's DeiT); ``quant=None`` is the plain-flax baseline."""
    return presets.create(ViT, PRESETS, name, **kwargs)
