"""``mesa_jax.compress``: mesa for an unmodified flax.linen model, same params tree.

    model = compress(MyViT(...))                       # QuantConfig() everywhere it reaches
    variables = model.init(key, images)                # {"params": <the original tree>, "mesa": ...}
    logits, state = model.apply(variables, images, mutable=["mesa"])   # training
    logits = model.apply({"params": params}, images)   # evaluation: exactly the original

The compressed model is an instance of a subclass of the model's class (same name,
same fields), whose ``methods`` run inside a mesa scope (mesa_jax.interception):
every nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.LayerNorm and
nn.MultiHeadDotProductAttention it calls, wherever it sits (submodules, nn.scan,
nn.remat, nn.vmap, shared modules), and every jax.nn.gelu / jax.nn.softmax called
inside its modules, keep int8 residuals; everything else runs as written. An
``nn.scan`` made inside the model whose variable_axes do not carry the "mesa"
collection gets it, stacked like the params.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import flax.linen as nn
from flax.core.scope import in_filter

from mesa_jax import interception
from mesa_jax.nn import COLLECTION  # importing mesa_jax.nn registers the layers' handlers
from mesa_jax.policy import Policy, Quant
from mesa_jax.quant import QuantConfig


def compress(model: nn.Module, quant: Quant = QuantConfig(), *, methods: Sequence[str] = ("__call__",)) -> nn.Module:
    """``model`` whose ``methods`` keep int8 activations for the backward pass.

    ``quant``: a QuantConfig for every site, or a Policy (kinds: dense, conv, layer_norm,
    gelu, softmax, matmul; overrides are globs on the module path, e.g. ``"head"`` or
    ``"*/attention/*"``; one that matches nothing raises after init). Where a config's
    group count does not divide a tensor's channels, that tensor uses one group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress takes a flax.linen Module, got {type(model).__name__}")
    if quant is not None and not isinstance(quant, (QuantConfig, Policy)):
        raise TypeError(f"quant must be a QuantConfig, a Policy or None, got {type(quant).__name__}")
    base = getattr(type(model), "_mesa_uncompressed", type(model))
    for name in methods:
        if not callable(getattr(base, name, None)):
            raise ValueError(f"{base.__name__} has no method {name!r} to compress")
    namespace = {name: _in_scope(getattr(base, name), quant) for name in methods}
    cls = type(base.__name__, (base,), {**namespace, "_mesa_uncompressed": base, "__module__": base.__module__,
                                        "__qualname__": base.__qualname__})
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
    return cls(**fields)


def uncompressed(model: nn.Module) -> nn.Module:
    """The original model behind ``compress(model)`` (the same fields, flax's own computation)."""
    base = getattr(type(model), "_mesa_uncompressed", type(model))
    return base(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init})


def _in_scope(method, quant: Quant):
    def compressed(self, *args, **kwargs):
        with interception.scope(quant, check_policy=self.is_initializing()):
            return method(self, *args, **kwargs)

    compressed.__name__ = getattr(method, "__name__", "compressed")
    compressed.__doc__ = getattr(method, "__doc__", None)
    return compressed


def _scan(original, *args, **kwargs):
    """nn.scan made inside a compressed model: carry the "mesa" statistics (stacked like the
    params, one set per iteration) and split the "mesa" RNG stream, unless the call does."""
    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    axes = dict(given["variable_axes"])
    if not any(in_filter(f, COLLECTION) for f in (*axes, given["variable_broadcast"], given["variable_carry"])):
        given["variable_axes"] = {**axes, COLLECTION: next((a for f, a in axes.items() if in_filter(f, "params")), 0)}
    rngs = dict(given["split_rngs"])
    if not any(in_filter(f, COLLECTION) for f in rngs):
        given["split_rngs"] = {**rngs, COLLECTION: True}
    return original(*bound.args, **bound.kwargs)


interception.register_function(nn.scan, _scan)
