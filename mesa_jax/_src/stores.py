"""Where a module keeps the running statistics of the tensors its sites compress.

A site asks its ``Store`` for a tensor's statistics by name, gives back the updated ones,
and asks for the seed of its stochastic rounding; the two stores answer from Linen's
``"mesa"`` collection and from NNX's ``MesaStat`` variables (as qwix's
``flax_util.get_or_create_variable`` serves both frameworks from one function).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.scope import in_filter

from mesa_jax import quant
from mesa_jax.quant import Stats

COLLECTION = "mesa"  # Linen's collection of statistics, its RNG stream, and NNX's variable name in nnx.bridge


class MesaStat(nnx.Variable):
    """The running range statistics (``quant.Stats``) of one compressed tensor: what Linen
    keeps in the "mesa" collection. Filter with it like ``nnx.BatchStat``."""


nnx.register_variable_name(COLLECTION, MesaStat)  # nnx.bridge maps it to Linen's "mesa" collection


def join(path: str, name: str) -> str:
    """A site's path: ``name`` under the module at ``path`` ("" at the model's root)."""
    return f"{path}/{name}" if path else name


class Store(Protocol):
    """Where a module's sites keep their statistics (LinenStore, NnxStore)."""

    path: str  # the module's path in the model ("" at the root)
    framework: str  # "flax.linen" or "flax.nnx": what an error message points to

    def stats(self, name: str, shape: tuple, groups: int) -> Stats | None: ...  # None: run exactly
    def update(self, name: str, stats: Stats) -> None: ...  # kept in training, not in evaluation
    def seed(self, name: str, count) -> jax.Array: ...  # uint32, for stochastic rounding
    def param(self, name: str, init, shape: tuple, dtype): ...  # a parameter of the module
    def holds(self, x) -> bool: ...  # whether x is the value of one of the module's variables


def _groups_mismatch(what: str, held: tuple, shape: tuple, groups: int, hint: str = "") -> ValueError:
    stacked = f" per stacked layer {held[:-1]}" if len(held) > 1 else ""
    return ValueError(f"{what} holds {held[-1]} groups{stacked} but a tensor of shape {shape} needs {groups}{hint}")


@dataclasses.dataclass(frozen=True)
class LinenStore:
    """A bound flax.linen module's "mesa" collection: created when it is mutable (init, or
    training from a params-only checkpoint), updated when mutable outside init, absent in
    evaluation without it (then the module computes exactly what flax computes)."""

    module: nn.Module
    framework = "flax.linen"

    @property
    def path(self) -> str:
        return "/".join(self.module.path)

    def stats(self, name, shape, groups):
        module, where = self.module, join(self.path, name)
        state = getattr(module, "_state", None)
        if state is None:
            return None  # an unbound module
        if module.has_variable(COLLECTION, name):
            value = module.get_variable(COLLECTION, name)
        elif module.is_mutable_collection(COLLECTION):
            with _definable(state):
                value = module.variable(COLLECTION, name, quant.init_stats, groups).value
        elif module.is_initializing():
            raise ValueError(
                f"cannot create the {COLLECTION!r} statistics of {where}: the {COLLECTION!r} collection is not "
                f"mutable there during init. A lifted transform (nn.scan, nn.vmap, ...) must carry it, e.g. "
                f"variable_axes={{'params': 0, '{COLLECTION}': 0}}, and init's mutable= must include it")
        else:
            return None
        if value.lo.shape != (groups,):
            raise _groups_mismatch(f"{COLLECTION!r} statistics {where}", value.lo.shape, shape, groups)
        return value

    def update(self, name, stats):
        if self.module.is_mutable_collection(COLLECTION) and not self.module.is_initializing():
            self.module.put_variable(COLLECTION, name, stats)

    def seed(self, name, count):
        """From the "mesa" RNG stream when given, else from the site's path and count."""
        if self.module.has_rng(COLLECTION):
            return jax.random.bits(self.module.make_rng(COLLECTION), (), jnp.uint32)
        return quant.layer_seed(join(self.path, name), count)

    def param(self, name, init, shape, dtype):
        return self.module.param(name, init, shape, dtype)

    def holds(self, x):
        return _holds(self.module.variables, x)


@contextlib.contextmanager
def _definable(state):
    """flax creates variables in setup or a compact method only; statistics are mesa's, not the
    module's definitions, and a method that is neither (Embed.attend, a tied head) has some."""
    outside = not (state.in_compact_method or state.in_setup)
    state.in_compact_method = state.in_compact_method or outside
    try:
        yield
    finally:
        state.in_compact_method = state.in_compact_method and not outside


@dataclasses.dataclass(frozen=True)
class NnxStore:
    """An NNX module's ``MesaStat`` attributes: made with the layer (``create``) or at a
    function's first call, updated unless the module's ``use_running_average`` is set
    (``model.eval()``, ``nnx.view(model, use_running_average=True)``)."""

    module: nnx.Module
    framework = "flax.nnx"

    @property
    def path(self) -> str:
        return getattr(self.module, "mesa_path", "")

    def stats(self, name, shape, groups):
        variable = vars(self.module).get(name)
        if variable is None:
            variable = self.create(name, groups)
        elif not isinstance(variable, MesaStat):
            raise ValueError(f"{self.path or '<root>'}: attribute {name!r} is a {type(variable).__name__}, "
                             f"not the MesaStat mesa keeps there")
        value = variable.get_value()
        if value.lo.shape != (groups,):
            raise _groups_mismatch(f"MesaStat {join(self.path, name)}", value.lo.shape, shape, groups,
                                   " (a stacked layer runs under nnx.scan/nnx.vmap)" if value.lo.ndim > 1 else "")
        return value

    def create(self, name: str, groups: int, lead: tuple = ()) -> MesaStat:
        """New statistics ``name``, stacked ``lead`` times (the layers nnx.vmap made at once)."""
        if name in vars(self.module):
            raise ValueError(f"{self.path or '<root>'} already has an attribute {name!r}: mesa keeps a statistic there")
        variable = MesaStat(jax.tree.map(lambda a: jnp.broadcast_to(a, (*lead, *a.shape)), quant.init_stats(groups)))
        setattr(self.module, name, variable)
        return variable

    def update(self, name, stats):
        if not getattr(self.module, "use_running_average", False):
            vars(self.module)[name].set_value(stats)

    def seed(self, name, count):
        return quant.layer_seed(join(self.path, name), count)

    def param(self, name, init, shape, dtype):
        variable = getattr(self.module, name, None)
        return None if variable is None else variable[...]

    def holds(self, x):
        return _holds(nnx.state(self.module), x)


def _holds(variables, x) -> bool:
    return any(leaf is x for leaf in jax.tree.leaves(variables))


def linen_scan(original, *args, **kwargs):
    """nn.scan made inside a compressed Linen model: carry the "mesa" statistics (stacked like
    the params, one set per iteration) and split the "mesa" RNG stream, unless the call does."""
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
