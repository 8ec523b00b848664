"""Strict settings for every test, and the shapes tests and benchmarks share."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")

# [..., C] activations: odd token counts on purpose (197 = DeiT's 196 patches + cls).
CHANNEL_SHAPES = [(2, 5, 8), (3, 7, 16)]
# [B, H, N, M] attention tensors.
HEAD_SHAPES = [(2, 3, 5, 5), (1, 4, 7, 6)]


@pytest.fixture
def key():
    return jax.random.key(0)
