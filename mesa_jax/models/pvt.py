"""Pyramid Vision Transformer (PVT v1, Wang et al., 2021) in stock flax.linen; mesa through ``compress``.

    model = pvt.create("pvt-ti", num_classes=1000)             # int8
    baseline = pvt.create("pvt-ti", num_classes=1000, quant=None)

Four stages, each a patch embedding (a strided convolution and a LayerNorm), a learned
position embedding and Transformer blocks whose attention is *spatial-reduction
attention*: the queries are all tokens, the keys and values come from the tokens
reduced by an ``sr x sr`` strided convolution (and a LayerNorm), so attention is N x
N / sr^2. The last stage adds a class token, which the head reads. Written with
nn.Conv, nn.LayerNorm, nn.MultiHeadDotProductAttention (queries and keys from
different sequences), nn.Dense and nn.gelu, so ``compress`` reaches all of it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mesa_jax.models import presets
from mesa_jax.models.vit import DropPath, MlpBlock

PRESETS = {
    # name: image size, first patch (later stages: 2), widths, blocks, heads, MLP ratios, reduction ratios
    "pvt-ti": dict(image_size=224, patch_size=4, embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2),
                   num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), drop_path=0.1),
    "pvt-s": dict(image_size=224, patch_size=4, embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3),
                  num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), drop_path=0.1),
    # CIFAR-100: 32x32 images in patches of 2, stage grids 16, 8, 4, 2.
    "pvt-c100": dict(image_size=32, patch_size=2, embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2),
                     num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(4, 2, 1, 1), drop_path=0.1),
}


class SpatialReductionAttention(nn.Module):
    """Attention of every token to the tokens of an ``sr x sr``-reduced grid."""

    num_heads: int
    sr_ratio: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, grid: int):
        """x: [B, grid * grid (+ 1 class token), C]; the reduction reads the grid tokens."""
        b, n, c = x.shape
        reduced = x
        if self.sr_ratio > 1:
            tokens = x.reshape(b, grid, grid, c)
            reduced = nn.Conv(c, (self.sr_ratio,) * 2, strides=(self.sr_ratio,) * 2, padding="VALID",
                              dtype=self.dtype, name="sr")(tokens).reshape(b, -1, c)
            reduced = nn.LayerNorm(dtype=self.dtype, name="norm")(reduced)
        return nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, name="attn")(x, reduced)


class Block(nn.Module):
    num_heads: int
    mlp_ratio: int
    sr_ratio: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, grid: int, drop_rate, train: bool = False):
        y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        y = SpatialReductionAttention(self.num_heads, self.sr_ratio, self.dtype, name="attn")(y, grid)
        x = x + DropPath()(y, drop_rate, train)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(self.mlp_ratio * x.shape[-1], self.dtype, name="mlp")(y)
        return x + DropPath()(y, drop_rate, train)


class PVT(nn.Module):
    """PVT v1; ``__call__(images [B, H, W, 3]) -> logits``."""

    num_classes: int
    image_size: int
    patch_size: int
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[int, ...]
    sr_ratios: tuple[int, ...]
    drop_path: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        self._check(images)
        rates = jnp.asarray(np.linspace(0.0, self.drop_path, sum(self.depths)), jnp.float32)
        x, block, last = images, 0, len(self.depths) - 1
        for stage, width in enumerate(self.embed_dims):
            p = self.patch_size if stage == 0 else 2
            x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                        name=f"patch_embed_{stage}")(x)
            b, grid, _, _ = x.shape
            x = nn.LayerNorm(dtype=self.dtype, name=f"patch_norm_{stage}")(x.reshape(b, grid * grid, width))
            if stage == last:
                cls = self.param("cls_token", nn.initializers.zeros, (1, 1, width))
                x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], axis=1)
            pos = self.param(f"pos_embed_{stage}", nn.initializers.truncated_normal(0.02), (1, x.shape[1], width))
            x = x + pos.astype(x.dtype)
            for i in range(self.depths[stage]):
                x = Block(self.num_heads[stage], self.mlp_ratios[stage], self.sr_ratios[stage], self.dtype,
                          name=f"stage_{stage}_block_{i}")(x, grid, rates[block], train)
                block += 1
            if stage < last:
                x = x.reshape(b, grid, grid, width)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0]).astype(jnp.float32)

    def _check(self, images):
        want = (self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:3] != want:
            raise ValueError(f"PVT expects NHWC images of {want[0]}x{want[1]} pixels, got shape {images.shape}")
        grid = self.image_size // self.patch_size
        for stage, (width, heads, sr) in enumerate(zip(self.embed_dims, self.num_heads, self.sr_ratios)):
            size = grid >> stage
            if size < 1 or size % sr or (stage and (grid >> (stage - 1)) % 2):
                raise ValueError(f"stage {stage} has a {size}x{size} grid: not divisible by its reduction ratio "
                                 f"{sr} (image_size / patch_size must halve evenly down the stages)")
            if width % heads:
                raise ValueError(f"num_heads={heads} does not divide stage {stage}'s width {width}")


def create(name: str, **kwargs) -> PVT:
    """A preset PVT (see presets.create): int8 by default, ``quant=None`` the plain-flax baseline."""
    return presets.create(PVT, PRESETS, name, **kwargs)
