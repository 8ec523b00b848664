"""mesa_jax: exact forward, int8 activations for the backward pass (Mesa, arXiv 2111.11124)."""

from mesa_jax import memory, models, nn, ops, quant
from mesa_jax.compress import compress
from mesa_jax.policy import Policy
from mesa_jax.quant import Packed, QuantConfig, Stats

__all__ = ["compress", "QuantConfig", "Policy", "Stats", "Packed", "memory", "models", "nn", "ops", "quant"]
