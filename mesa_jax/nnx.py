"""Flax NNX: mesa's layers, and compression of an existing NNX model in place.

    model = MyModel(..., rngs=nnx.Rngs(0))       # any NNX model, a restored checkpoint included
    mesa_jax.nnx.compress(model)                 # in place: the same object, the same Params
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(loss_fn)(model, x, y)   # Params only; the statistics update as state
        optimizer.update(model, grads)

A mesa NNX layer *is* its NNX namesake (a subclass: constructor arguments, ``Param``s and
forward, bit for bit) plus ``quant``. Each tensor it compresses has its running
statistics in a ``MesaStat`` variable (Linen's ``"mesa"`` collection, through
``nnx.bridge``), created with the layer (a function called inside a module, such as
``nnx.gelu``, creates its own at its first call), updated in training and fixed in
evaluation: ``model.train()`` / ``model.eval()`` or ``nnx.view(model,
use_running_average=True)``, like ``nnx.BatchNorm``'s. Which tensor each layer keeps, and
how, is mesa_jax.nn's (the sites the Linen layers run); the numerics are mesa_jax.ops'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from mesa_jax import interception, nn as linen_sites, ops, quant
from mesa_jax.policy import Policy, Quant, resolve
from mesa_jax.quant import QuantConfig

COLLECTION = linen_sites.COLLECTION
DEFAULT = QuantConfig()


class MesaStat(nnx.Variable):
    """The running range statistics (``quant.Stats``) of one compressed tensor: what Linen
    keeps in the "mesa" collection. Filter with it like ``nnx.BatchStat``."""


nnx.register_variable_name(COLLECTION, MesaStat)


# ------------------------------------------------------------- running a site


def _run(module: nnx.Module, kept, op, exact):
    """``op(stats, seeds, configs) -> (y, updated)`` on the tensors ``kept`` ([(name, x, layout,
    config)]) with the module's MesaStat variables of those names (created here if missing:
    a function site's first call), updated unless ``module.use_running_average``. ``exact``
    is the site protocol's fallback, never needed here: an NNX module always has its statistics."""
    variables, configs = [], []
    for name, x, layout, config in kept:
        config = linen_sites.fitted(config, x.shape, layout, interception.strict())
        configs.append(config)
        if ops.shared(x) is not None:  # another op's residual stands for it: no statistics
            variables.append(None)
            continue
        groups = quant.num_groups_for(x.shape, layout, config)
        variable = vars(module).get(name)
        if variable is None:
            variable = MesaStat(quant.init_stats(groups))
            setattr(module, name, variable)
        elif not isinstance(variable, MesaStat):
            raise ValueError(f"{_where(module)}: attribute {name!r} is a {type(variable).__name__}, not the "
                             f"MesaStat mesa keeps there")
        held = variable.get_value().lo.shape
        if held != (groups,):
            raise ValueError(f"MesaStat {_where(module)}/{name} holds {held[-1]} groups"
                             f"{' per stacked layer ' + str(held[:-1]) if len(held) > 1 else ''} but a tensor of "
                             f"shape {x.shape} needs {groups} (a stacked layer runs under nnx.scan/nnx.vmap)")
        variables.append(variable)
    stats = [None if v is None else v.get_value() for v in variables]
    seeds = [None if s is None else quant.layer_seed(f"{_where(module)}/{name}", s.count)
             for (name, *_), s in zip(kept, stats)]
    with interception.suspended():
        y, updated = op(stats, seeds, configs)
    updated = [updated] if isinstance(updated, quant.Stats) or updated is None else updated
    if not getattr(module, "use_running_average", False):
        for variable, value in zip(variables, updated):
            if variable is not None:
                variable.set_value(value)
    return y


def _where(module) -> str:
    return getattr(module, "mesa_path", "") or type(module).__name__


def _site(module, name, kind, tensors, op, exact):
    """A registered function (jax.nn.gelu, softmax, dot_product_attention) called inside an
    NNX module of a compressed model: statistics ``gelu_0``, ... in that module."""
    site = interception.next_call_name(name)
    config = interception.config(kind, f"{_where(module)}/{site}")
    if config is None:
        return exact()
    kept = [(site if suffix is None else f"{site}_{suffix}", x, layout, config) for suffix, x, layout in tensors]
    return _run(module, kept, op, exact)


interception.register_site_runner(nnx.Module, _site)


# ------------------------------------------------------ the namesakes' forwards


def _runner(module):
    return lambda kept, op, exact: _run(module, kept, op, exact)


def _dense_call(module, config, *args, **kwargs):
    custom = getattr(module, "dot_general_cls", None) is not None or module.dot_general not in (None, lax.dot_general)
    if custom:
        return _unsupported(module, "a custom dot_general", args, kwargs)
    fn = functools.partial(linen_sites.dot_general_site, _runner(module), config)
    with interception.fields_set(module, dot_general=fn):
        return _namesake(module).__call__(module, *args, **kwargs)


def _einsum_call(module, config, inputs, einsum_str=None, out_sharding=None):
    if module.einsum_op is not jnp.einsum:
        return _unsupported(module, "a custom einsum_op", (inputs, einsum_str), dict(out_sharding=out_sharding))

    def einsum(spec, x, kernel, precision=None, preferred_element_type=None, out_sharding=None):
        fn = ops.Einsum(spec, precision, preferred_element_type)
        if out_sharding is not None:
            return jnp.einsum(spec, x, kernel, precision=precision, preferred_element_type=preferred_element_type,
                              out_sharding=out_sharding)
        op = lambda stats, seeds, configs: ops.linear(x, kernel, stats[0], seeds[0], configs[0], fn)
        return _run(module, [("inputs", x, "channels", config)], op, lambda: fn(x, kernel))

    with interception.fields_set(module, einsum_op=einsum):
        return nnx.Einsum.__call__(module, inputs, einsum_str, out_sharding=out_sharding)


def _conv_call(module, config, *args, **kwargs):
    if module.conv_general_dilated is not lax.conv_general_dilated:
        return _unsupported(module, "a custom conv_general_dilated", args, kwargs)
    fn = functools.partial(linen_sites.conv_site, _runner(module), config)
    with interception.fields_set(module, conv_general_dilated=fn):
        return nnx.Conv.__call__(module, *args, **kwargs)


def _layer_norm_call(module, config, x, *, mask=None):
    last = lambda axes: tuple(a % x.ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))) == (
        x.ndim - 1,)
    for argument, supported in ((f"reduction_axes={module.reduction_axes}", last(module.reduction_axes)),
                                (f"feature_axes={module.feature_axes}", last(module.feature_axes)),
                                (f"axis_name={module.axis_name!r}", module.axis_name is None),
                                ("axis_index_groups", module.axis_index_groups is None),
                                ("a custom promote_dtype", module.promote_dtype is nnx.nn.dtypes.promote_dtype),
                                ("mask", mask is None)):
        if not supported:
            return _unsupported(module, argument, (x,), dict(mask=mask))
    scale = module.scale[...] if module.scale is not None else None
    bias = module.bias[...] if module.bias is not None else None
    return linen_sites.layer_norm_site(_runner(module), config, x, scale, bias, module.epsilon,
                                       module.use_fast_variance, module.dtype)


@dataclasses.dataclass(frozen=True)
class NnxAttention:
    """nnx.dot_product_attention without dropout, as a static map: the fused op's forward."""

    dtype: Any = None
    precision: Any = None
    is_causal: bool = False

    def __call__(self, q, k, v, bias, mask):
        return nnx.dot_product_attention(q, k, v, bias, mask, dtype=self.dtype, precision=self.precision,
                                         is_causal=self.is_causal)


def _attention_call(module, config, *args, **kwargs):
    if module.attention_fn is not nnx.dot_product_attention:
        return _unsupported(module, "a custom attention_fn", args, kwargs)

    def attention(query, key, value, bias=None, mask=None, *, dropout_rate=0.0, deterministic=False, dtype=None,
                  precision=None, module=None, is_causal=False, **rest):
        exact = lambda: nnx.dot_product_attention(query, key, value, bias, mask, dropout_rate=dropout_rate,
                                                  deterministic=deterministic, dtype=dtype, precision=precision,
                                                  module=module, is_causal=is_causal, **rest)
        dropout = dropout_rate > 0 and not deterministic
        if dropout or module is not None or query.ndim != 4 or key.shape[-2] != query.shape[-2]:
            return exact()  # attention dropout, sown weights, grouped-query heads: exactly as written
        mask = None if mask is None else mask.astype(jnp.bool_)
        return linen_sites.fused_attention_site(_runner(owner), config, NnxAttention(dtype, precision, is_causal),
                                                query, key, value, bias, mask, is_causal)

    owner = module
    with interception.fields_set(module, attention_fn=attention):
        return nnx.MultiHeadAttention.__call__(module, *args, **kwargs)


def _unsupported(module, argument, args, kwargs):
    """A setting NNX supports and mesa does not compress: an error for a mesa layer, the
    namesake's exact computation inside compress."""
    if interception.strict():
        raise NotImplementedError(f"{type(module).__name__} at {_where(module)}: {argument} is not supported with "
                                  f"quant (compressed); use quant=None or flax.nnx.{type(module).__name__}")
    return _namesake(module).__call__(module, *args, **kwargs)


# ------------------------------------------- statistics created with the layer


def _lead(param, ndim: int) -> tuple:
    """The stacked-layer dimensions (nnx.vmap-created layers) in front of a parameter."""
    return tuple(param.shape[: param.ndim - ndim]) if param is not None else ()


def _channels_of_trailing(in_features: tuple, axis: tuple) -> int | None:
    trailing = tuple(range(-len(axis), 0))
    return math.prod(in_features) if tuple(sorted(axis)) == trailing else None


def _dense_tensors(module):
    if isinstance(module, nnx.LinearGeneral):
        channels = None if module.batch_axis else _channels_of_trailing(module.in_features, module.axis)
        ndim = len(module.batch_axis) + len(module.in_features) + len(module.out_features)
        return [("inputs", channels, "channels", _lead(module.kernel, ndim))]
    return [("inputs", module.in_features, "channels", _lead(module.kernel, 2))]


def _einsum_tensors(module):
    spec = (module.einsum_str or "").replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return [("inputs", None, "channels", ())]
    lhs, rhs = spec.split("->")[0].split(",")
    channels = module.kernel_shape[rhs.index(lhs[-1])] if lhs and lhs[-1] in rhs else None
    return [("inputs", channels, "channels", _lead(module.kernel, len(module.kernel_shape)))]


def _conv_tensors(module):
    return [("inputs", module.in_features, "channels", _lead(module.kernel, len(module.kernel_size) + 2))]


def _layer_norm_tensors(module):
    param = module.scale if module.scale is not None else module.bias
    return [("normalized", module.num_features, "channels", _lead(param, 1))]


def _attention_tensors(module):
    if module.num_kv_heads != module.num_heads:
        return []
    return [(name, module.num_heads, "heads", _lead(module.query.kernel, 3)) for name in ("q", "k", "v")]


# class -> (Policy kind, its forward, the tensors it keeps: [(name, channels or heads, layout, stacked dims)])
_SUPPORTED = {
    nnx.Linear: ("dense", _dense_call, _dense_tensors),
    nnx.LinearGeneral: ("dense", _dense_call, _dense_tensors),
    nnx.Einsum: ("dense", _einsum_call, _einsum_tensors),
    nnx.Conv: ("conv", _conv_call, _conv_tensors),
    nnx.LayerNorm: ("layer_norm", _layer_norm_call, _layer_norm_tensors),
    nnx.MultiHeadAttention: ("attention", _attention_call, _attention_tensors),
}


def _namesake(module) -> type:
    return next(cls for cls in type(module).__mro__ if cls in _SUPPORTED)


def _placed(module, path: str) -> None:
    """Every module mesa runs in: its path (seeds, messages) and a train/eval switch (its own
    ``use_running_average`` if it has one, as nnx.BatchNorm does)."""
    module.mesa_path = path
    if not hasattr(module, "use_running_average"):
        module.use_running_average = False


def _attach(module, config: QuantConfig | None, path: str, strict: bool) -> None:
    """Give ``module`` (an instance of a supported class) its config and statistics."""
    kind, _, tensors = _SUPPORTED[_namesake(module)]
    module.mesa_config = config
    _placed(module, path)
    if config is None:
        return
    for name, size, layout, lead in tensors(module):
        if name in vars(module):
            raise ValueError(f"{_where(module)} already has an attribute {name!r}: mesa keeps a statistic there")
        if size is None:
            continue  # not known before a call: created at the first one
        if layout == "heads":
            groups = size
        else:
            fitted = linen_sites.fitted(config, (size,), "channels", strict)
            groups = quant.num_groups_for((size,), "channels", fitted)
        setattr(module, name, MesaStat(jax.tree.map(lambda a: jnp.broadcast_to(a, (*lead, *a.shape)),
                                                    quant.init_stats(groups))))


# ------------------------------------------------------------- class swapping


def _set_view(base: type):
    """``set_view`` that adds ``use_running_average`` to the base's own (nnx.view)."""
    parent = getattr(base, "set_view", None)
    params = [p for p in inspect.signature(parent).parameters.values() if p.name != "self"] if parent else []

    def set_view(self, use_running_average: bool | None = None, **kwargs):
        if use_running_average is not None:
            self.use_running_average = use_running_average
        return parent(self, **kwargs) if parent else None

    own = inspect.Parameter("use_running_average", inspect.Parameter.KEYWORD_ONLY, default=None)
    set_view.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), own]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params
           if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)])
    return set_view


@contextlib.contextmanager
def _functions_held(module):
    """The module's attributes that hold a registered function (``self.act = nnx.gelu``), and
    the items of its nnx.List attributes that do (nnx.Sequential's), hold its dispatcher
    during the call."""
    names = [name for name, value in vars(module).items() if interception.dispatching(value) is not value]
    items = [(seq, i, item) for seq in vars(module).values() if isinstance(seq, nnx.List)
             for i, item in enumerate(seq) if interception.dispatching(item) is not item]
    with interception.rebound(module, names):
        for seq, i, item in items:
            seq[i] = interception.dispatching(item)
        try:
            yield
        finally:
            for seq, i, item in items:
                seq[i] = item


def _compressed_call(self, *args, **kwargs):
    """A module of a compressed model: opens the mesa scope when called first (the root, or a
    submodule called on its own), is the frame of the functions it calls, and runs its
    compressed forward if it is a supported layer."""
    with contextlib.ExitStack() as stack:
        if not interception.active():
            stack.enter_context(interception.scope(self.mesa_quant))
        stack.enter_context(interception.called(self))
        stack.enter_context(_functions_held(self))
        config = getattr(self, "mesa_config", None)
        if config is not None:
            return _SUPPORTED[_namesake(self)][1](self, config, *args, **kwargs)
        return self._mesa_base.__call__(self, *args, **kwargs)


_swapped: dict[type, type] = {}


def _swap_class(module) -> None:
    """Make ``module`` an instance of a subclass of its class whose ``__call__`` runs inside
    mesa (its sites compressed, functions called in it intercepted): the same object."""
    base = type(module)
    if base not in _swapped:
        namespace = {"__call__": _compressed_call, "set_view": _set_view(base), "_mesa_base": base,
                     "__module__": base.__module__, "__qualname__": base.__qualname__}
        _swapped[base] = type(base.__name__, (base,), namespace)
    object.__setattr__(module, "__class__", _swapped[base])


def compress(model: nnx.Module, quant: Quant = QuantConfig()) -> nnx.Module:
    """Compress ``model`` in place and return it: every nnx.Linear, LinearGeneral, Einsum,
    Conv, LayerNorm and MultiHeadAttention in it keeps int8 activations for the backward
    pass, and so do jax.nn.gelu / softmax / dot_product_attention called inside its modules.

    The Params stay the same objects (nothing is copied; a checkpoint of the original
    restores into it); statistics (MesaStat) are added next to them. ``quant``: a
    QuantConfig, or a Policy whose overrides are globs on module paths ("blocks/0/mlp/*");
    an override that matches no module raises.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"mesa_jax.nnx.compress takes a flax.nnx Module, got {type(model).__name__}")
    if quant is not None and not isinstance(quant, (QuantConfig, Policy)):
        raise TypeError(f"quant must be a QuantConfig, a Policy or None, got {type(quant).__name__}")
    modules = [("/".join(map(str, path)), module) for path, module in nnx.iter_modules(model)]
    if hasattr(type(model), "_mesa_base"):
        raise ValueError(f"{type(model).__name__} is already compressed (mesa_jax.nnx.compress runs once per model)")
    if isinstance(quant, Policy) and quant.overrides:
        sites = [p for p, _ in modules] + [f"{p}/{f}_0".lstrip("/") for p, _ in modules
                                             for f in ("gelu", "softmax", "dot_product_attention")]
        dead = [glob for glob, _ in quant.overrides if not fnmatch.filter(sites, glob)]
        if dead:
            raise ValueError(f"Policy override(s) {dead} match no module; module paths are e.g. "
                             f"{[p for p, _ in modules if p][:6]}")
    for path, module in modules:
        if isinstance(module, _Layer) or hasattr(type(module), "_mesa_base"):
            continue  # a mesa layer (and its projections), or a part compressed before, keeps its quant
        if _supported(module):
            _attach(module, resolve(quant, _SUPPORTED[_namesake(module)][0], path), path, strict=False)
        else:
            _placed(module, path)
        module.mesa_quant = quant
        if callable(getattr(type(module), "__call__", None)):
            _swap_class(module)
    return model


def _supported(module) -> bool:
    """An instance of a supported NNX class whose __call__ is that class's own (a subclass that
    changes it runs as written, its functions and submodules still compressed)."""
    for cls in type(module).__mro__:
        if cls in _SUPPORTED:
            return True
        if "__call__" in vars(cls):
            return False
    return False


# -------------------------------------------------------------- the layers


class _Layer:
    """Marks mesa's own NNX layers (constructed with ``quant``)."""


def _layer(base: type, kinds: str) -> type:
    def __init__(self, *args, quant: Quant = DEFAULT, **kwargs):
        base.__init__(self, *args, **kwargs)
        kind = _SUPPORTED[base][0]
        for path, child in nnx.iter_modules(self):
            if child is not self and _supported(child):
                path = "/".join(map(str, path))  # MultiHeadAttention's projections
                _attach(child, resolve(quant, _SUPPORTED[_namesake(child)][0], path), path, strict=True)
                child.mesa_quant = quant
                _swap_class(child)
        _attach(self, resolve(quant, kind, ""), "", strict=True)

    def __call__(self, *args, **kwargs):
        config = self.mesa_config
        if config is None:
            return base.__call__(self, *args, **kwargs)
        with interception.scope(config, owner=self), interception.called(self):
            return _SUPPORTED[base][1](self, config, *args, **kwargs)

    doc = (f"flax.nnx.{base.__name__}, keeping int8 copies of {kinds} for the backward pass: every NNX "
           f"argument and Param, plus ``quant`` (QuantConfig, Policy, or None for NNX's own computation).")
    return type(base.__name__, (_Layer, base), {
        "__init__": __init__, "__call__": __call__, "set_view": _set_view(base), "__doc__": doc,
        "__module__": __name__, "__qualname__": base.__name__})


Linear = _layer(nnx.Linear, "its input")
LinearGeneral = _layer(nnx.LinearGeneral, "its input")
Einsum = _layer(nnx.Einsum, "its input")
Conv = _layer(nnx.Conv, "its input")
LayerNorm = _layer(nnx.LayerNorm, "its normalized input")
MultiHeadAttention = _layer(nnx.MultiHeadAttention,
                            "the projections' inputs and query, key, value (per head; no N x N map)")


class _Function(_Layer, nnx.Module):
    """A jnp function as a layer: its statistics (created at the first call, when the
    input's grouping is known) in this module."""

    def __init__(self, quant: Quant = DEFAULT):
        self.mesa_config = resolve(quant, self.kind, "")
        self.mesa_path = ""
        self.use_running_average = False

    def set_view(self, use_running_average: bool | None = None):
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _call(self, name, x, layout, op, exact):
        if self.mesa_config is None:
            return exact()
        with interception.scope(self.mesa_config, owner=self):
            return _run(self, [(name, x, layout, self.mesa_config)], op, exact)


class GELU(_Function):
    """jax.nn.gelu (nnx.gelu) as a layer keeping an int8 copy of its input; ``approximate``
    as jax.nn.gelu's (True: tanh; False: erf, DeiT's)."""

    kind = "gelu"

    def __init__(self, approximate: bool = True, *, quant: Quant = DEFAULT):
        super().__init__(quant)
        self.approximate = approximate

    def __call__(self, x):
        op = lambda stats, seeds, configs: ops.gelu(x, stats[0], seeds[0], configs[0], self.approximate)
        return self._call("inputs", x, "channels", op, lambda: ops.gelu_reference(x, self.approximate))


class Softmax(_Function):
    """Softmax over the last axis keeping only an int8 copy of its output (per head if 4-D)."""

    kind = "softmax"

    def __call__(self, x):
        op = lambda stats, seeds, configs: ops.softmax(x, stats[0], seeds[0], configs[0])
        return self._call("outputs", ops.kept_output(x), ops.attention_layout(x.ndim), op, lambda: ops.softmax_reference(x))

