"""mesa_jax: exact forward, int8 activations for the backward pass (Mesa, arXiv 2111.11124)."""

from mesa_jax import memory, ops, quant
from mesa_jax.quant import Packed, QuantConfig, Stats

__all__ = ["QuantConfig", "Stats", "Packed", "memory", "ops", "quant"]
