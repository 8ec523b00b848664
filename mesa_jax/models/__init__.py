"""Model families in stock flax.linen, compressed by ``mesa_jax.compress``: ViT/DeiT, Swin, PVT.

    from mesa_jax import models
    model = models.create("swin-ti", num_classes=1000)     # any preset, by name
"""

from mesa_jax.models import presets, pvt, swin, vit

FAMILIES = (vit, swin, pvt)


def names() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.PRESETS)


def family(name: str):
    """The module (vit, swin or pvt) whose presets hold ``name``."""
    for module in FAMILIES:
        if name in module.PRESETS:
            return module
    raise ValueError(f"unknown model {name!r}; valid names: {names()}")


def preset(name: str) -> dict:
    return family(name).PRESETS[name]


def create(name: str, **kwargs):
    """The preset ``name`` of whichever family has it (vit.create, swin.create, pvt.create)."""
    return family(name).create(name, **kwargs)


__all__ = ["create", "family", "names", "preset", "presets", "pvt", "swin", "vit"]
