"""The counter-based hash behind stochastic rounding, shared by kernels and reference.

Integer-only (mul, xor, shift on uint32), so a Pallas kernel that knows an
element's flat index produces the same number as plain jnp, without a PRNG.
"""

import jax.numpy as jnp


def uniform_from_index(index, seed):
    """lowbias32-style mixer of ``index`` keyed by ``seed``; the top 24 bits as U[0, 1)."""
    h = index * jnp.uint32(0x9E3779B9) ^ jnp.asarray(seed, jnp.uint32)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
