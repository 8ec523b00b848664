"""``mesa_jax.compress``: mesa for an unmodified flax.linen or flax.nnx model, same params.

Linen modules are immutable descriptions: ``compress`` returns a new one, an instance of a
subclass of the model's class (same name, same fields) whose ``methods`` run inside a mesa
scope. NNX modules are objects holding their state: ``compress`` changes the model in
place (each module's class swapped for a subclass, ``MesaStat`` variables added next to the
same ``Param`` objects) and returns it. ``uncompressed`` undoes either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Sequence

import flax.linen as nn
from flax import nnx

from mesa_jax import quant as quant_lib
from mesa_jax._src import scope as scopes, sites
from mesa_jax._src.stores import MesaStat, NnxStore
from mesa_jax.policy import Quant, as_policy
from mesa_jax.quant import QuantConfig


def compress(model, quant: Quant = QuantConfig(), *, methods: Sequence[str] = ("__call__",)):
    """``model`` keeping int8 activations for the backward pass; the forward is the original's.

    - a flax.linen Module: a **new** model (a subclass of its class, the same fields) whose
      ``methods`` are compressed; ``init`` gives the original's params and a "mesa" collection.
    - a flax.nnx Module: **the same object, changed in place** (its Params stay the same
      objects; ``MesaStat`` statistics are added) and returned; ``methods`` is Linen's only.

    ``quant``: a QuantConfig for every site, or a Policy (mesa_jax.policy); a rule that matches
    no site raises after the first pass over the model (Linen's ``init``, NNX's first call).
    Where a config's group count does not divide a tensor's channels, that tensor uses one group.
    """
    as_policy(quant)  # raises on anything else
    if isinstance(model, nn.Module):
        return _compress_linen(model, quant, methods)
    if isinstance(model, nnx.Module):
        return _compress_nnx(model, quant)
    raise TypeError(f"compress takes a flax.linen or flax.nnx Module, got {type(model).__name__}")


def uncompressed(model):
    """The original behind ``compress(model)``: for Linen a new model of the original class
    (flax's own computation); for NNX the same object, its classes and variables restored."""
    if isinstance(model, nn.Module):
        base = getattr(type(model), "_mesa_uncompressed", type(model))
        return base(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init})
    for _, module in nnx.iter_modules(model):
        base = getattr(type(module), "_mesa_base", None)
        for name, value in list(vars(module).items()):
            if isinstance(value, MesaStat) or name.startswith("mesa_") or name in getattr(module, "mesa_added", ()):
                delattr(module, name)
        if base is not None:
            object.__setattr__(module, "__class__", base)
    return model


# ------------------------------------------------------------------ Linen


def _compress_linen(model: nn.Module, quant: Quant, methods) -> nn.Module:
    base = getattr(type(model), "_mesa_uncompressed", type(model))
    for name in methods:
        if not callable(getattr(base, name, None)):
            raise ValueError(f"{base.__name__} has no method {name!r} to compress")
    namespace = {name: _in_scope(getattr(base, name), quant) for name in methods}
    cls = type(base.__name__, (base,), {**namespace, "_mesa_uncompressed": base, "__module__": base.__module__,
                                        "__qualname__": base.__qualname__})
    return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init})


def _in_scope(method, quant: Quant):
    def compressed(self, *args, **kwargs):
        with sites.open_scope(quant, check=self.is_initializing()):
            return method(self, *args, **kwargs)

    compressed.__name__, compressed.__doc__ = getattr(method, "__name__", "compressed"), method.__doc__
    return compressed


# -------------------------------------------------------------------- NNX


def _compress_nnx(model: nnx.Module, quant: Quant) -> nnx.Module:
    if hasattr(type(model), "_mesa_base"):
        raise ValueError(f"{type(model).__name__} is already compressed (compress an NNX model once)")
    in_place(model, quant, strict=False)
    model.mesa_root = True  # its first call checks the policy
    return model


def in_place(root: nnx.Module, quant: Quant, strict: bool) -> None:
    """Compress the modules of ``root`` in place (a model, or a mesa layer being made): each
    gets its path, a train/eval switch (its own ``use_running_average`` if it has one, as
    nnx.BatchNorm), its quant, a mesa ``__call__`` and, a layer of sites.NNX, its config and the
    statistics it keeps (those of a size known only at the first call: then). Mesa layers inside,
    and parts compressed before, keep their own quant."""
    policy = as_policy(quant)
    for path, module in nnx.iter_modules(root):
        layer = getattr(module, "_mesa_layer", False)
        if (layer and module is not root) or hasattr(type(module), "_mesa_base"):
            continue
        module.mesa_path, module.mesa_quant = "/".join(map(str, path)), quant
        if not hasattr(module, "use_running_average"):
            module.use_running_average, module.mesa_added = False, ("use_running_average",)
        namesake = nnx_namesake(type(module))
        if namesake is not None:
            _attach(module, sites.NNX[namesake], policy, strict)
        if not layer and callable(getattr(type(module), "__call__", None)):
            swap_class(module)


def nnx_namesake(cls: type) -> type | None:
    """The NNX class of NNX's table (sites.NNX) whose kind's method (``__call__``, an embedding's
    ``attend``) ``cls`` runs, or None where a subclass changes it (it then runs as written, its
    functions and submodules compressed)."""
    namesake = next((c for c in cls.__mro__ if c in sites.NNX), None)
    if namesake is None:
        return None
    method = sites.NNX[namesake].method
    mro = cls.__mro__
    if any(method in vars(c) and not sites.is_mesa_class(c) for c in mro[:mro.index(namesake)]):
        return None
    return namesake


def _attach(module, kind: sites.NnxKind, policy, strict: bool) -> None:
    module.mesa_config = config = policy.resolve(kind.kind, module.mesa_path)
    for planned in kind.planned(module) if config is not None else ():
        if planned.size is not None:
            fit = sites.fitted(config, (planned.size,), "channels", strict)
            groups = planned.size if planned.layout == "heads" else quant_lib.num_groups_for((planned.size,), "channels", fit)
            NnxStore(module).create(planned.name, groups, planned.lead)


def nnx_method(name: str):
    """``name`` (``__call__``, ``attend``) of a module of a compressed NNX model, or of a mesa NNX
    layer: opens the mesa scope when called first (the model's first call checks the policy), is
    the frame of the functions it calls, and runs its kind's handler if it is the method of one."""

    def method(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            scope = scopes.current()
            if scope is None or getattr(self, "_mesa_layer", False):
                quant = self.mesa_quant
                scope = stack.enter_context(sites.open_scope(quant, strict=getattr(self, "_mesa_layer", False),
                                                             owner=self, check=getattr(self, "mesa_root", False)))
            store = NnxStore(self)
            stack.enter_context(scopes.frame(store, self))
            namesake = nnx_namesake(type(self))
            call = functools.partial(getattr(getattr(self, "_mesa_base", None) or namesake, name), self)
            kind = None if namesake is None else sites.NNX[namesake]
            if kind is None or kind.method != name or getattr(self, "mesa_config", None) is None:
                return call(*args, **kwargs)
            return kind.handler(scope, store, self, call, args, kwargs)

    method.__name__ = method.__qualname__ = name
    return method


nnx_call = nnx_method("__call__")


def set_view(base: type):
    """``set_view`` (nnx.view) taking ``use_running_average`` besides the base's own arguments."""
    parent = getattr(base, "set_view", None)
    params = [p for p in inspect.signature(parent).parameters.values() if p.name != "self"] if parent else []
    if any(p.name == "use_running_average" for p in params):
        return parent  # nnx.BatchNorm's: mesa reads the same attribute

    def view(self, use_running_average: bool | None = None, **kwargs):
        if use_running_average is not None:
            self.use_running_average = use_running_average
        return parent(self, **kwargs) if parent else None

    own = inspect.Parameter("use_running_average", inspect.Parameter.KEYWORD_ONLY, default=None)
    view.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), own]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params
           if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)])
    return view


_swapped: dict[type, type] = {}  # a cache of the subclasses made, one per class


def swap_class(module) -> None:
    """Make ``module`` an instance of a subclass of its class whose ``__call__`` (and its kind's
    method, an embedding's ``attend``) runs inside mesa: the same object (``isinstance`` holds)."""
    base = type(module)
    if base not in _swapped:
        namespace = {"__call__": nnx_call, "set_view": set_view(base), "_mesa_base": base,
                     "__module__": base.__module__, "__qualname__": base.__qualname__}
        namesake = nnx_namesake(base)
        if namesake is not None and sites.NNX[namesake].method != "__call__":
            namespace[sites.NNX[namesake].method] = nnx_method(sites.NNX[namesake].method)
        _swapped[base] = type(base.__name__, (base,), namespace)
    object.__setattr__(module, "__class__", _swapped[base])
