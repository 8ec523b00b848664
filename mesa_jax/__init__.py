"""mesa_jax: exact forward, int8 activations for the backward pass (Mesa, arXiv 2111.11124).

    model = mesa_jax.compress(model)   # a flax.linen model: a new one; a flax.nnx model: in place
"""

from mesa_jax import memory, models, nn, nnx, ops, policy, quant
from mesa_jax._src.compress import compress, uncompressed
from mesa_jax.policy import Policy, Rule, int4_row_ranges, int4_with_int8_attention
from mesa_jax.quant import QuantConfig
from pallas_kernels import TRITON, TRITON_INTERPRET, XLA, Backend

__all__ = ["compress", "uncompressed", "QuantConfig", "Policy", "Rule", "int4_row_ranges", "int4_with_int8_attention",
           "Backend", "XLA", "TRITON", "TRITON_INTERPRET", "nn", "nnx", "ops", "memory", "models", "policy", "quant"]
