"""Model families in stock flax.linen, compressed by ``mesa_jax.compress``: ViT/DeiT, Swin, PVT
(images), GPT-2 and Llama (causal language models).

    from mesa_jax import models
    model = models.create("swin-ti", num_classes=1000)     # any preset, by name
    lm = models.create("gpt2-s", vocab_size=256)           # a language model: tokens [B, T] -> logits
"""

from mesa_jax.models import gpt, llama, presets, pvt, swin, vit

FAMILIES = (vit, swin, pvt, gpt, llama)
LANGUAGE_MODELS = (gpt, llama)  # families whose models take tokens [B, T]


def names() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.PRESETS)


def family(name: str):
    """The module (vit, swin, pvt, gpt or llama) whose presets hold ``name``."""
    for module in FAMILIES:
        if name in module.PRESETS:
            return module
    raise ValueError(f"unknown model {name!r}; valid names: {names()}")


def preset(name: str) -> dict:
    return family(name).PRESETS[name]


def create(name: str, **kwargs):
    """The preset ``name`` of whichever family has it (vit.create, swin.create, gpt.create, ...)."""
    return family(name).create(name, **kwargs)


def is_language_model(name: str) -> bool:
    return family(name) in LANGUAGE_MODELS


__all__ = ["create", "family", "gpt", "is_language_model", "llama", "names", "preset", "presets", "pvt", "swin", "vit"]
