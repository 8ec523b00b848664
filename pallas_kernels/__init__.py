"""Pallas kernels for packing activations, and the backends that run the packing.

A backend is chosen once, in ``QuantConfig(backend=...)``, and recorded in every packed
residual, so that its unpacking and fused backward run on the backend that packed it:

- ``XLA`` (the default): the plain-jnp reference in mesa_jax.quant, on every platform (on
  an H200 each XLA kernel ran 1.3-3.3x faster than its Triton counterpart: docs/results.md);
- ``TRITON``: these kernels, compiled by Pallas's Triton backend (a GPU);
- ``TRITON_INTERPRET``: the same kernels run by the Pallas interpreter (any platform, slow:
  what the CPU tests use).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backend:
    """Who packs and unpacks: ``name`` "xla" or "triton"; ``interpret`` runs Triton kernels
    in the Pallas interpreter. Static and hashable (a QuantConfig field)."""

    name: str = "xla"
    interpret: bool = False

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"unknown mesa_jax backend {self.name!r}; valid: {list(NAMES)}")
        if self.interpret and self.name == "xla":
            raise ValueError("interpret=True runs Pallas kernels: it goes with the 'triton' backend")

    @property
    def kernels(self) -> bool:
        """Whether Pallas kernels run (else the jnp reference)."""
        return self.name != "xla"


NAMES = ("xla", "triton")
XLA = Backend("xla")
TRITON = Backend("triton")
TRITON_INTERPRET = Backend("triton", interpret=True)


def backend(spec: str | Backend) -> Backend:
    """A Backend from itself or a name: "xla", "triton", "triton-interpret"."""
    if isinstance(spec, Backend):
        return spec
    name, _, mode = str(spec).partition("-")
    if mode not in ("", "interpret"):
        raise ValueError(f"unknown mesa_jax backend {spec!r}; valid: xla, triton, triton-interpret")
    return Backend(name, interpret=mode == "interpret")
