"""Pallas kernels for packing activations, and the switch that picks an implementation.

Implementations by name: "xla" (the plain-jnp reference in mesa_jax.quant),
"pallas" (Triton kernels, GPU), "pallas_interpret" (the same kernels run by the
Pallas interpreter: any backend, slow; what the CPU tests use). The choice comes
from ``set_impl(...)``, else the MESA_JAX_IMPL environment variable, else
"pallas" on a GPU and "xla" elsewhere. It is read when a function is traced.
"""

from __future__ import annotations

import os

import jax

IMPLS = ("xla", "pallas", "pallas_interpret")
ENV = "MESA_JAX_IMPL"
_chosen: str | None = None


def _check(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"unknown mesa_jax implementation {name!r}; valid: {list(IMPLS)}")
    return name


def set_impl(name: str | None) -> None:
    """Use implementation ``name`` from now on; None goes back to the environment/default."""
    global _chosen
    _chosen = None if name is None else _check(name)


def get_impl() -> str:
    if _chosen is not None:
        return _chosen
    if os.environ.get(ENV):
        return _check(os.environ[ENV])
    return "pallas" if jax.default_backend() == "gpu" else "xla"
