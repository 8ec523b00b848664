"""Counter-based hashing behind stochastic rounding and layer seeds, shared by kernels and reference.

Integer-only (add, mul, xor, shift on uint32), so a Pallas kernel that knows an
element's flat index reproduces the jnp reference's noise without a PRNG.
"""

import jax.numpy as jnp


def mix(h):
    """lowbias32 (C. Wellons): a bijection of uint32 whose output bits each depend on every input bit."""
    h = jnp.asarray(h, jnp.uint32)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def combine(key, counter):
    """A uint32 hash of the pair (key, counter): independent-looking across both.

    Two rounds, both keyed: ``mix(counter + k)`` alone would make the sequence of one
    key a shifted copy of another key's; the second round, keyed again, decorrelates
    such copies. (Mixing ``counter * c ^ key`` instead would be symmetric in counter
    and a key derived the same way: element i at step c would get element c's noise
    at step i.)
    """
    k = mix(key)
    return mix(mix(jnp.asarray(counter, jnp.uint32) + k) ^ k)


def uniform(seed, index):
    """U[0, 1) float32 noise of element ``index`` of a tensor packed with ``seed``: 24 hash bits."""
    return (combine(seed, index) >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
