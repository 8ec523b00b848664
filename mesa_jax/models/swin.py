"""Swin Transformer (Liu et al., 2021) in stock flax.linen; the mesa variant through ``compress``.

    model = swin.create("swin-ti", num_classes=1000)            # int8
    baseline = swin.create("swin-ti", num_classes=1000, quant=None)

Written as the paper and its reference code describe it: a 4x4 patch embedding, four
stages of blocks that attend within 7x7 windows, every second block over windows
shifted by half a window (a cyclic roll, with a mask keeping tokens that wrapped around
apart), a learned relative position bias per head, and patch merging between stages.
The window attention calls ``jax.nn.dot_product_attention`` with the bias and the
mask, so ``compress`` keeps its Q, K and V packed per head and no N x N map; the bias
and the mask stay exact.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mesa_jax.models import presets
from mesa_jax.models.vit import DropPath, MlpBlock

PRESETS = {
    # name: image size, patch, width of stage 1, blocks and heads per stage, window, max drop-path rate
    "swin-ti": dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                    window_size=7, drop_path=0.2),
    "swin-s": dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                   window_size=7, drop_path=0.3),
    # CIFAR-100: 32x32 images in patches of 2 (16x16 tokens), windows of 4: stage grids 16, 8, 4, 2.
    "swin-c100": dict(image_size=32, patch_size=2, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      window_size=4, drop_path=0.1),
}


def window_partition(x, window: int):
    """[B, H, W, C] -> [B * H/window * W/window, window * window, C]: windows, row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows, window: int, h: int, w: int):
    """The inverse of ``window_partition``."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """[N, N] (N = window^2): the bias-table row of each (query, key) pair, from their offset."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    offset = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)  # [N, N, 2] >= 0
    return offset[..., 0] * (2 * window - 1) + offset[..., 1]


@functools.cache
def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """[windows, N, N] bool: which tokens of a window of the rolled grid may attend to each
    other: those from the same region of the unrolled image (the reference code's -100)."""
    regions = np.zeros((1, h, w, 1))
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols] = label
            label += 1
    labels = np.asarray(window_partition(regions, window))[..., 0]  # [windows, N]
    return labels[:, :, None] == labels[:, None, :]


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, with a learned relative position bias."""

    num_heads: int
    window_size: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, mask=None):
        """x: [B * windows, N, C]; mask: [windows, N, N] bool or None."""
        b, n, c = x.shape
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * self.window_size - 1) ** 2, self.num_heads))
        bias = table[relative_position_index(self.window_size).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
        if mask is not None:  # windows of every image, image-major: [B * windows, 1, N, N]
            mask = jnp.tile(mask[:, None], (b // mask.shape[0], 1, 1, 1))
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias[None].astype(qkv.dtype),
                                         mask=mask)
        return nn.Dense(c, dtype=self.dtype, name="proj")(y.reshape(b, n, c))


class SwinBlock(nn.Module):
    """x + W-MSA(ln(x)) (or SW-MSA: windows shifted by ``shift_size``), then x + mlp(ln(x))."""

    num_heads: int
    window_size: int
    shift_size: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, drop_rate, train: bool = False):
        _, h, w, c = x.shape
        s = self.shift_size
        y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        mask = jnp.asarray(shifted_window_mask(h, w, self.window_size, s)) if s else None
        windows = WindowAttention(self.num_heads, self.window_size, self.dtype, name="attn")(
            window_partition(y, self.window_size), mask)
        y = window_reverse(windows, self.window_size, h, w)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + DropPath()(y, drop_rate, train)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(4 * c, self.dtype, name="mlp")(y)
        return x + DropPath()(y, drop_rate, train)


class PatchMerging(nn.Module):
    """[B, H, W, C] -> [B, H/2, W/2, 2C]: each 2x2 neighbourhood concatenated, normed, projected."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")(x)


class Swin(nn.Module):
    """Swin Transformer; ``__call__(images [B, H, W, 3]) -> logits``."""

    num_classes: int
    image_size: int
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    drop_path: float = 0.0  # rate of the last block; earlier ones scale linearly from 0
    dtype: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        self._check(images)
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(images)
        x = nn.LayerNorm(dtype=self.dtype, name="patch_norm")(x)
        rates = jnp.asarray(np.linspace(0.0, self.drop_path, sum(self.depths)), jnp.float32)
        block = 0
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            grid = x.shape[1]
            window = min(self.window_size, grid)  # a grid no larger than a window: one window, no shift
            for i in range(depth):
                shift = window // 2 if i % 2 and grid > self.window_size else 0
                x = SwinBlock(heads, window, shift, self.dtype, name=f"stage_{stage}_block_{i}")(x, rates[block], train)
                block += 1
            if stage < len(self.depths) - 1:
                x = PatchMerging(self.dtype, name=f"stage_{stage}_merge")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)

    def _check(self, images):
        want = (self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:3] != want:
            raise ValueError(f"Swin expects NHWC images of {want[0]}x{want[1]} pixels, got shape {images.shape}")
        grid = self.image_size // self.patch_size
        for stage in range(len(self.depths)):
            size = grid >> stage
            window = min(self.window_size, size)
            if size % window or (stage and (grid >> (stage - 1)) % 2):
                raise ValueError(f"stage {stage} has a {size}x{size} grid: not a multiple of window {window} "
                                 f"(image_size / patch_size must halve evenly down the stages)")
        width = lambda stage: self.embed_dim << stage
        for stage, heads in enumerate(self.num_heads):
            if width(stage) % heads:
                raise ValueError(f"num_heads={heads} does not divide stage {stage}'s width {width(stage)}")


def create(name: str, **kwargs) -> Swin:
    """A preset Swin (see presets.create): int8 by default, ``quant=None`` the plain-flax baseline."""
    return presets.create(Swin, PRESETS, name, **kwargs)
