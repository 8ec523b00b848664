"""A ResNet written the way flax's ImageNet example writes one (stock ``flax.linen`` modules
only: ``nn.Conv``, ``nn.BatchNorm`` with ``use_running_average=not train``, ``nn.relu``,
``nn.max_pool``): what ``mesa_jax.compress`` must reach unedited, and the convolutional rows
of the memory benchmark (``python -m benchmarks.memory --resnet``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class ResidualBlock(nn.Module):
    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        residual = x
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj")(residual)
            residual = norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int] = (2, 2, 2, 2)  # ResNet-18
    num_classes: int = 1000
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, name="conv_init")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn_init")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResidualBlock(self.width * 2**i, strides)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
