"""Model families built from mesa_jax.nn."""

from mesa_jax.models import vit

__all__ = ["vit"]
