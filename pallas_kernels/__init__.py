"""Pallas kernels for packing activations, and the names of the implementations.

An implementation is chosen per ``QuantConfig(implementation=...)``: "xla" (the
plain-jnp reference in mesa_jax.quant), "pallas" (Triton kernels, GPU) or
"pallas_interpret" (the same kernels run by the Pallas interpreter: any backend,
slow; what the CPU tests use). ``None`` is the default: the MESA_JAX_IMPL
environment variable if set, else "xla" on every backend (on an H200 each XLA kernel
ran 1.3-3.3x faster than its Pallas Triton counterpart: README, "GPU figures"), read
once per process, so an already-traced function can never change implementation.
"""

from __future__ import annotations

import functools
import os

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")
ENV = "MESA_JAX_IMPL"


def check(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown mesa_jax implementation {name!r}; valid: {list(IMPLEMENTATIONS)}")
    return name


@functools.cache
def default() -> str:
    if os.environ.get(ENV):
        return check(os.environ[ENV])
    return "xla"


def resolve(name: str | None) -> str:
    """The implementation ``name`` stands for: itself, or the process default for None."""
    return default() if name is None else check(name)
