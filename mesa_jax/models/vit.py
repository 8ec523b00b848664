"""ViT / DeiT built from mesa_jax.nn; ``quant=None`` is the plain-Flax baseline.

    model = vit.create("deit-s", num_classes=1000)              # int8, one group per head
    variables = model.init(jax.random.key(0), images)           # {"params", "mesa"}
    logits, state = model.apply(variables, images, train=True,
                                mutable=["mesa"], rngs={"dropout": key})

Baseline and mesa models are the same code with different layer classes
(``mesa_jax.nn.layers``), and share one params tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mesa_jax import nn as mnn
from mesa_jax.policy import Policy, Quant, fit_groups
from mesa_jax.quant import QuantConfig

PRESETS = {
    # name: image size, patch, width, depth, heads, MLP width, max drop-path rate
    "deit-ti": dict(image_size=224, patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768, drop_path=0.1),
    "deit-s": dict(image_size=224, patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536, drop_path=0.1),
    "deit-b": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, drop_path=0.1),
    # CIFAR-100: 32x32 images in 8x8 patches of 4 pixels, DeiT-Ti widths.
    "vit-c100": dict(image_size=32, patch_size=4, width=192, depth=12, num_heads=3, mlp_dim=768, drop_path=0.1),
}
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
PER_HEAD = "per_head"  # create()'s default: QuantConfig(num_groups=num_heads)


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch; ``rate`` may be traced.

    A per-sample [B, 1, 1] scale, so the backward pass keeps no full-size mask.
    """

    @nn.compact
    def __call__(self, x, rate, train: bool):
        if not train:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (x.shape[0], 1, 1))
        return x * (keep / (1.0 - rate)).astype(x.dtype)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    num_heads: int
    mlp_dim: int
    layers: mnn.Layers = mnn.Layers()

    @nn.compact
    def __call__(self, x, drop_rate, train: bool = False):
        lay = self.layers
        attn = mnn.SelfAttention(self.num_heads, lay.dense, lay.softmax, lay.matmul, name="attn")
        x = x + DropPath()(attn(lay.layer_norm(name="ln1")(x)), drop_rate, train)
        mlp = mnn.Mlp(self.mlp_dim, lay.dense, lay.gelu, name="mlp")
        x = x + DropPath()(mlp(lay.layer_norm(name="ln2")(x)), drop_rate, train)
        return x, None


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
    quant: Quant = None  # QuantConfig, Policy, or None for the plain-Flax baseline
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); params stay float32
    scan: bool = False  # nn.scan over blocks: one compiled block, stacked params
    remat: str | None = None  # jax.checkpoint policy name for each block

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        self._check(images)
        lay = mnn.layers(self.quant, self.dtype)
        embed = mnn.layers(fit_groups(self.quant, images.shape[-1]), self.dtype).conv
        p = self.patch_size
        x = embed(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(images)
        x = x.reshape(x.shape[0], -1, self.width)  # [B, N, C]
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        x = x + pos.astype(x.dtype)
        rates = jnp.asarray(np.linspace(0.0, self.drop_path, self.depth), jnp.float32)
        x = self._blocks(lay)(x, rates, train) if self.scan else self._unrolled(lay, x, rates, train)
        x = lay.layer_norm(name="norm")(x)
        return lay.dense(self.num_classes, name="head")(x[:, 0]).astype(jnp.float32)

    def _block_class(self):
        block = Block
        if self.remat is not None:
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"unknown remat policy {self.remat!r}; valid: {sorted(REMAT_POLICIES)}")
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
        return block

    def _unrolled(self, lay, x, rates, train):
        for i in range(self.depth):
            x, _ = self._block_class()(self.num_heads, self.mlp_dim, lay, name=f"block_{i}")(x, rates[i], train)
        return x

    def _blocks(self, lay):
        scanned = nn.scan(
            self._block_class(),
            variable_axes={"params": 0, mnn.COLLECTION: 0},
            split_rngs={"params": True, "dropout": True, mnn.COLLECTION: True},
            in_axes=(0, nn.broadcast),
            length=self.depth,
        )(self.num_heads, self.mlp_dim, lay, name="blocks")
        return lambda x, rates, train: scanned(x, rates, train)[0]

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


def create(name: str, *, num_classes: int, quant: Quant | str = PER_HEAD, dtype=None, **overrides) -> ViT:
    """A preset ViT. ``quant``: "per_head" (default: int8, one group per head, as Mesa's
    DeiT), a QuantConfig or Policy (for every layer), or None (the plain-Flax baseline)."""
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; valid names: {sorted(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViT)}
    if unknown:
        raise TypeError(f"unknown ViT field(s) {sorted(unknown)}")
    if isinstance(quant, str):
        if quant != PER_HEAD:
            raise ValueError(f"quant must be {PER_HEAD!r}, a QuantConfig, a Policy or None, got {quant!r}")
        quant = QuantConfig(num_groups=fields["num_heads"])
    model = ViT(num_classes=num_classes, quant=quant, dtype=dtype, **fields)
    if isinstance(quant, Policy) and quant.overrides:
        quant.check_paths(layer_paths(model))
    return model


def layer_paths(model: ViT) -> list[str]:
    """Module paths of every mesa layer of ``model`` (abstract init: nothing is computed)."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    is_layer = lambda module, method: isinstance(module, mnn._Compressed) and method == "__call__"
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, capture_intermediates=is_layer), images
    )
    flat = jax.tree_util.tree_flatten_with_path(variables["intermediates"])[0]
    return sorted({"/".join(str(k.key) for k in path[:-2]) for path, _ in flat})
