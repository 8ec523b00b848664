"""Flax Linen layers that keep int8 activations, and how flax's own layers run compressed.

``import mesa_jax.nn as mnn`` and swap ``nn.Dense`` for ``mnn.Dense``: an ``mnn``
layer *is* its flax namesake (a subclass: every constructor argument, default and
parameter name), plus ``quant`` (a QuantConfig, a Policy, or None for plain flax).
It runs flax's own code with mesa's ops injected at flax's injection points
(``dot_general``, ``conv_general_dilated``, ``attention_fn``), so the forward is
flax's, bit for bit; ``mesa_jax.compress`` reaches unmodified models' layers with
the same handlers. LayerNorm and Einsum have no injection point: their handlers
compute flax's arithmetic with mesa's op.

Each compressed tensor has its running statistics in the ``"mesa"`` collection,
updated only when that collection is mutable (``apply(..., mutable=["mesa"])`` in
training), like ``batch_stats``. Without the collection (evaluation, a params-only
checkpoint) a layer computes exactly what flax computes; with it mutable and empty
(training from a params-only checkpoint) the statistics are created.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax

from mesa_jax import attention as attention_op, interception, ops, quant
from mesa_jax.policy import Quant, resolve
from mesa_jax.quant import Layout, QuantConfig

COLLECTION = "mesa"
DEFAULT = QuantConfig()


# ------------------------------------------------------------------ statistics


def path_of(module: nn.Module) -> str:
    return "/".join(module.path)


def _statistics(module: nn.Module, name: str, x, layout: Layout, config: QuantConfig, strict: bool):
    """(the "mesa" variable of ``x``'s running statistics, the config to pack it with), or None
    when the module has no statistics to pack with (evaluation without the collection)."""
    config = fitted(config, x.shape, layout, strict)
    groups = quant.num_groups_for(x.shape, layout, config)
    if module.has_variable(COLLECTION, name):
        stats = module.variable(COLLECTION, name)
    elif module.is_mutable_collection(COLLECTION):
        stats = module.variable(COLLECTION, name, quant.init_stats, groups)
    elif module.is_initializing():
        raise ValueError(
            f"cannot create the {COLLECTION!r} statistics of {path_of(module) or '<root>'}/{name}: the "
            f"{COLLECTION!r} collection is not mutable there during init. A lifted transform (nn.scan, "
            f"nn.vmap, ...) must carry it, e.g. variable_axes={{'params': 0, '{COLLECTION}': 0}}, and "
            f"init's mutable= must include it"
        )
    else:
        return None
    if stats.value.lo.shape != (groups,):
        raise ValueError(
            f"{COLLECTION!r} statistics {path_of(module)}/{name} hold {stats.value.lo.shape[0]} groups but "
            f"a tensor of shape {x.shape} needs {groups}"
        )
    return stats, config


def fitted(config: QuantConfig, shape, layout: Layout, strict: bool) -> QuantConfig:
    """compress applies one config to a whole model: where its group count does not divide a
    tensor's channels (RGB into a patch embedding) that tensor uses one group. A mesa layer,
    configured on its own, raises instead."""
    if strict or layout != "channels" or not shape or shape[-1] % config.num_groups == 0:
        return config
    return dataclasses.replace(config, num_groups=1)


def _seed(module: nn.Module, name: str, count):
    """From the "mesa" RNG stream when given, else from the layer path and step count."""
    if module.has_rng(COLLECTION):
        return jax.random.bits(module.make_rng(COLLECTION), (), jax.numpy.uint32)
    return quant.layer_seed("/".join((*module.path, name)), count)


def _compressed(module: nn.Module, kept, op, exact, strict: bool):
    """Run ``op(stats, seeds, configs) -> (y, updated stats)`` (an op's own return) on the tensors ``kept``
    ([(name, x, layout, config)]) with their running statistics, storing the updates when
    the collection is mutable; ``exact()`` when the module has no statistics. A tensor
    another op's residual already stands for (``ops.shared``) has none (stats and seed None)."""
    found = [(None, config) if ops.shared(x) is not None else _statistics(module, name, x, layout, config, strict)
             for name, x, layout, config in kept]  # a tensor another op's residual stands for needs none
    if any(f is None for f in found):
        return exact()
    variables = [v for v, _ in found]
    stats = [None if v is None else v.value for v in variables]
    seeds = [None if s is None else _seed(module, name, s.count) for (name, *_), s in zip(kept, stats)]
    with interception.suspended():
        y, updated = op(stats, seeds, [c for _, c in found])
    updated = [updated] if isinstance(updated, quant.Stats) or updated is None else updated  # Stats or a pair
    if module.is_mutable_collection(COLLECTION) and not module.is_initializing():
        for variable, value in zip(variables, updated):
            if variable is not None:
                variable.value = value
    return y


def _unsupported(module: nn.Module, argument: str, next_fun, args, kwargs):
    """A layer setting flax supports and mesa does not compress: an error for a mesa layer,
    flax's exact computation (float residuals) inside compress."""
    if interception.strict():
        raise NotImplementedError(
            f"{type(module).__name__} at {path_of(module) or '<root>'}: {argument} is not supported with "
            f"quant (compressed); use quant=None or flax.linen.{type(module).__name__}"
        )
    return next_fun(*args, **kwargs)


def _is_mesa(fn) -> bool:
    """A function mesa injected, or a mesa layer (which applies its own quant)."""
    return getattr(fn, "_mesa", False) or getattr(fn, "_mesa_layer", False)


def _mesa(fn):
    fn._mesa = True
    return fn


# ------------------------------------------------- flax layers, compressed


def _injected(field: str, make):
    """A handler running flax's own call with ``field``, one of flax's injection points, set to
    ``make(module, config)``: a mesa function. Not where the user set the field (or its
    ``*_cls`` twin) to something of their own."""

    def handler(module, kind, next_fun, args, kwargs):
        current = getattr(module, field)
        if _is_mesa(current):
            return next_fun(*args, **kwargs)
        if current is not None or getattr(module, f"{field}_cls", None) is not None:
            return _unsupported(module, f"a custom {field}", next_fun, args, kwargs)
        config = interception.config(kind, path_of(module))
        if config is None:
            return next_fun(*args, **kwargs)
        with interception.fields_set(module, **{field: _mesa(make(module, config))}):
            return next_fun(*args, **kwargs)

    return handler


def _run(module: nn.Module):
    """How a site in a Linen module runs: ``run(kept, op, exact)`` with the module's statistics."""
    return lambda kept, op, exact: _compressed(module, kept, op, exact, interception.strict())


def dot_general_site(run, config, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None):
    """``lax.dot_general`` keeping ``lhs`` packed (flax's Dense, DenseGeneral; nnx.Linear,
    LinearGeneral), run by a framework's ``run(kept, op, exact)``."""
    fn = ops.DotGeneral(_tuples(dimension_numbers), precision, preferred_element_type)
    if out_sharding is not None:
        return lax.dot_general(lhs, rhs, fn.dimension_numbers, precision, preferred_element_type,
                               out_sharding=out_sharding)
    (contract, _), (batch, _) = fn.dimension_numbers
    x = lhs
    if not batch and len(contract) > 1 and sorted(a % lhs.ndim for a in contract) == list(
            range(lhs.ndim - len(contract), lhs.ndim)):
        # [..., H, D] kept as [..., H * D] channel groups
        x = lhs.reshape(*lhs.shape[: -len(contract)], math.prod(lhs.shape[-len(contract):]))
        fn = ops.Reshaped(fn, lhs.shape)
    op = lambda stats, seeds, configs: ops.linear(x, rhs, stats[0], seeds[0], configs[0], fn)
    return run([("inputs", x, "channels", config)], op, lambda: fn(x, rhs))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def conv_site(run, config, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
              preferred_element_type=None, out_sharding=None):
    """``lax.conv_general_dilated`` keeping ``lhs`` packed (flax's Conv, nnx.Conv)."""
    fn = ops.ConvGeneral(_tuples(window_strides), _tuples(padding), _tuples(lhs_dilation), _tuples(rhs_dilation),
                         dimension_numbers, feature_group_count, batch_group_count, precision, preferred_element_type)
    if out_sharding is not None:
        return lax.conv_general_dilated(lhs, rhs, **{f.name: getattr(fn, f.name) for f in dataclasses.fields(fn)},
                                        out_sharding=out_sharding)
    op = lambda stats, seeds, configs: ops.linear(lhs, rhs, stats[0], seeds[0], configs[0], fn)
    return run([("inputs", lhs, "channels", config)], op, lambda: fn(lhs, rhs))


def _overrides_call(module, flax_cls) -> bool:
    """Whether the module's class changes flax's __call__ (then only flax's own code is safe);
    mesa's own subclasses (mnn layers, compress's) do not."""
    for cls in type(module).__mro__:
        if cls is flax_cls:
            return False
        mesa = vars(cls).get("_mesa_layer") or "_mesa_uncompressed" in vars(cls)
        if "__call__" in vars(cls) and not mesa:
            return True
    return False


def _einsum(module, kind, next_fun, args, kwargs):
    """nn.Einsum (no injection point): flax's parameters, bias shape and promotion, mesa's einsum."""
    if _overrides_call(module, nn.Einsum):
        return _unsupported(module, "an overridden __call__", next_fun, args, kwargs)
    config = interception.config(kind, path_of(module))
    if config is None:
        return next_fun(*args, **kwargs)
    inputs, *rest = args
    spec = nn.merge_param("einsum_str", module.einsum_str, rest[0] if rest else kwargs.get("einsum_str"))
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return next_fun(*args, **kwargs)  # flax raises its own error
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = None
    if module.use_bias:
        bias_shape, broadcast_shape = module._get_bias_shape(spec, inputs, kernel)
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    fn = ops.Einsum(spec, module.precision, module.preferred_element_type)
    op = lambda stats, seeds, configs: ops.linear(inputs, kernel, stats[0], seeds[0], configs[0], fn)
    y = _compressed(module, [("inputs", inputs, "channels", config)], op, lambda: fn(inputs, kernel),
                    interception.strict())
    return y if bias is None else y + bias.reshape(broadcast_shape)


def _layer_norm(module, kind, next_fun, args, kwargs):
    """nn.LayerNorm over the last axis: flax's parameters and arithmetic, keeping the
    normalized input packed and the per-row rstd."""
    x = args[0]
    last = lambda axes: tuple(a % x.ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))) == (
        x.ndim - 1,)
    for argument, supported in (
            ("an overridden __call__", not _overrides_call(module, nn.LayerNorm)),
            (f"reduction_axes={module.reduction_axes}", last(module.reduction_axes)),
            (f"feature_axes={module.feature_axes}", last(module.feature_axes)),
            (f"axis_name={module.axis_name!r}", module.axis_name is None),
            ("axis_index_groups", module.axis_index_groups is None),
            ("force_float32_reductions=False", module.force_float32_reductions),
            ("mask", kwargs.get("mask") is None)):
        if not supported:
            return _unsupported(module, argument, next_fun, args, kwargs)
    config = interception.config(kind, path_of(module))
    if config is None:
        return next_fun(*args, **kwargs)
    features = (x.shape[-1],)
    scale = module.param("scale", module.scale_init, features, module.param_dtype) if module.use_scale else None
    bias = module.param("bias", module.bias_init, features, module.param_dtype) if module.use_bias else None
    return layer_norm_site(_run(module), config, x, scale, bias, module.epsilon, module.use_fast_variance, module.dtype)


def layer_norm_site(run, config, x, scale, bias, epsilon, fast_variance, dtype):
    """LayerNorm over the last axis with flax's arithmetic, keeping the normalized input packed
    (flax's nn.LayerNorm, nnx.LayerNorm)."""
    settings = dict(epsilon=epsilon, fast_variance=fast_variance, dtype=dtype)
    x_hat = ops.normalized_input(x, epsilon, fast_variance)[0]
    op = lambda stats, seeds, configs: ops.layer_norm(x, scale, bias, stats[0], seeds[0], configs[0], **settings)
    return run([("normalized", x_hat, "channels", config)], op,
               lambda: ops.layer_norm_reference(x, scale, bias, **settings))


def _attention(module, kind, next_fun, args, kwargs):
    """nn.MultiHeadDotProductAttention (and nn.SelfAttention): flax's call, its projections
    compressed as DenseGeneral, its core (flax's default attention_fn) replaced by mesa's."""
    if _is_mesa(module.attention_fn):
        return next_fun(*args, **kwargs)
    if module.attention_fn is not nn.dot_product_attention:
        return _unsupported(module, "a custom attention_fn", next_fun, args, kwargs)
    path = path_of(module)
    fused, per_op = interception.config("attention", path), interception.config("matmul", path)
    if fused is None and per_op is None:
        return next_fun(*args, **kwargs)
    with interception.fields_set(module, attention_fn=_mesa(_attention_fn(module, fused, per_op))):
        return next_fun(*args, **kwargs)


def _attention_fn(module, fused, per_op):
    """flax's dot_product_attention, as mesa runs it. ``fused``: the flash-style op (packed Q,
    K, V, no N x N residual; not with attention dropout); else ``per_op``: flax's function with
    mesa's einsums (query, key, probabilities, value, per head) and its softmax intercepted."""

    def attention(query, key, value, bias=None, mask=None, *, precision=None, einsum_dot_general=None,
                  qk_attn_weights_einsum=None, attn_weights_value_einsum=None, **kwargs):
        custom = einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum
        dropout = kwargs.get("dropout_rate", 0.0) > 0 and not kwargs.get("deterministic", False)
        if fused is not None and not any(custom) and not dropout and kwargs.get("module") is None and query.ndim == 4:
            forward = FlaxAttention(kwargs.get("dtype"), precision, kwargs.get("force_fp32_for_softmax", False))
            return fused_attention_site(_run(module), fused, forward, query, key, value, bias, mask)
        if per_op is None or any(custom):
            return nn.dot_product_attention(query, key, value, bias, mask, precision=precision,
                                            einsum_dot_general=einsum_dot_general,
                                            qk_attn_weights_einsum=qk_attn_weights_einsum,
                                            attn_weights_value_einsum=attn_weights_value_einsum, **kwargs)
        # [..., L, H, D] operands grouped per head (axis -2); probabilities [..., H, Q, K] (axis -3)
        # statistics names differ from the submodules' ("query", "key", "value", "out")
        qk = _attention_einsum(module, per_op, ("q", "k"), (-2, -2), precision)
        av = _attention_einsum(module, per_op, ("probs", "v"), (-3, -2), precision)
        return nn.dot_product_attention(query, key, value, bias, mask, qk_attn_weights_einsum=qk,
                                        attn_weights_value_einsum=av, **kwargs)

    attention.__signature__ = inspect.signature(nn.dot_product_attention)  # MHDPA passes what it declares
    return attention


@dataclasses.dataclass(frozen=True)
class FlaxAttention:
    """flax's dot_product_attention without dropout, as a static map: the fused op's forward."""

    dtype: Any = None
    precision: Any = None
    force_fp32_for_softmax: bool = False

    def __call__(self, q, k, v, bias, mask):
        return nn.dot_product_attention(q, k, v, bias, mask, dtype=self.dtype, precision=self.precision,
                                        force_fp32_for_softmax=self.force_fp32_for_softmax, deterministic=True)


class _AttentionFunction(nn.Module):
    """flax.linen.dot_product_attention as a module (its namesake has none): what
    mnn.DotProductAttention compresses. The signature is the function's: MHDPA passes an
    ``attention_fn`` only the arguments its signature names."""

    @nn.compact
    def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
                 dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None, module=None,
                 force_fp32_for_softmax: bool = False, einsum_dot_general=None, qk_attn_weights_einsum=None,
                 attn_weights_value_einsum=None):
        return nn.dot_product_attention(query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
                                        deterministic, dtype, precision, module, force_fp32_for_softmax,
                                        einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum)


def fused_attention_site(run, config, forward, query, key, value, bias, mask, is_causal: bool = False):
    """mesa_jax.attention with ``forward`` (the framework's attention function, no dropout):
    q, k, v kept per head ([B, L, H, D], one group per head)."""
    spec = attention_op.Forward(forward, scale=1.0 / math.sqrt(query.shape[-1]), is_causal=is_causal,
                                saved_lse=config.saved_lse)
    kept = [(name, t, t.ndim - 2, config) for name, t in (("q", query), ("k", key), ("v", value))]
    op = lambda stats, seeds, configs: attention_op.packed_attention(query, key, value, bias, mask, tuple(stats),
                                                              tuple(seeds), configs[0], spec)
    return run(kept, op, lambda: forward(query, key, value, bias, mask))


def _dot_product_attention(module, kind, next_fun, args, kwargs):
    """mnn.DotProductAttention: mesa's attention core, the statistics in the layer itself."""
    path = path_of(module)
    fused, per_op = interception.config("attention", path), interception.config("matmul", path)
    if fused is None and per_op is None:
        return next_fun(*args, **kwargs)
    return _attention_fn(module, fused, per_op)(*args, **kwargs)


def _attention_einsum(module, config, names, axes, precision):
    def einsum(spec, a, b):
        fn = ops.Einsum(spec, precision)
        layouts = (axes[0] % a.ndim, axes[1] % b.ndim)
        kept = [(names[0], a, layouts[0], config), (names[1], b, layouts[1], config)]
        op = lambda stats, seeds, configs: ops.bilinear(a, b, *stats, *seeds, configs[0], fn, layouts)
        return _compressed(module, kept, op, lambda: fn(a, b), interception.strict())

    return einsum


# ------------------------------------------------- functions, compressed


def _linen_site(module: nn.Module, name: str, kind: str, tensors, op, exact):
    """A function called inside a Linen module (interception.function_site)."""
    state = getattr(module, "_state", None)
    if not (state is not None and (state.in_compact_method or state.in_setup)):
        return exact()  # variables need @compact or setup
    site = interception.next_call_name(name)
    config = interception.config(kind, f"{path_of(module)}/{site}")
    if config is None:
        return exact()
    kept = [(site if suffix is None else f"{site}_{suffix}", x, layout, config) for suffix, x, layout in tensors]
    return _compressed(module, kept, op, exact, False)


def _gelu(original, x, approximate: bool = True):
    op = lambda stats, seeds, configs: ops.gelu(x, stats[0], seeds[0], configs[0], approximate)
    return interception.function_site("gelu", "gelu", [(None, x, "channels")], op,
                          lambda: original(x, approximate=approximate))


def _softmax(original, x, axis=-1, where=None, **kwargs):
    if where is not None or kwargs or axis not in (-1, x.ndim - 1):
        return original(x, axis=axis, where=where, **kwargs)
    op = lambda stats, seeds, configs: ops.softmax(x, stats[0], seeds[0], configs[0])
    return interception.function_site("softmax", "softmax", [(None, ops.kept_output(x), ops.attention_layout(x.ndim))], op,
                          lambda: original(x, axis=axis))


def _jax_attention(original, query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                   implementation=None, **kwargs):
    """jax.nn.dot_product_attention called inside a module: the fused op with it as the forward
    (4-D inputs; sequence lengths, local windows and returned residuals run exactly)."""
    exact = lambda: original(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                             implementation=implementation, **kwargs)
    if any(v is not None and v is not False for v in kwargs.values()) or jax.numpy.ndim(query) != 4:
        return exact()

    def op(stats, seeds, configs):
        forward = attention_op.Forward(attention_op.JaxAttention(scale, is_causal, implementation), scale, is_causal,
                                       configs[0].saved_lse)
        return attention_op.packed_attention(query, key, value, bias, mask, tuple(stats), tuple(seeds), configs[0],
                                             forward)

    tensors = [(name, t, 2) for name, t in (("q", query), ("k", key), ("v", value))]  # [B, L, H, D]: per head
    return interception.function_site("dot_product_attention", "attention", tensors, op, exact)


# Dense, DenseGeneral: flax's call with a dot_general that keeps its input packed. Conv: flax's
# call (padding, dilation, feature groups, masks: all flax's) with such a conv_general_dilated.
_dense = _injected("dot_general", lambda module, config: functools.partial(dot_general_site, _run(module), config))
interception.register_module(nn.Dense, "dense", _dense)
interception.register_module(nn.DenseGeneral, "dense", _dense)
interception.register_module(nn.Einsum, "dense", _einsum)
interception.register_module(nn.Conv, "conv", _injected(
    "conv_general_dilated", lambda module, config: functools.partial(conv_site, _run(module), config)))
interception.register_module(nn.LayerNorm, "layer_norm", _layer_norm)
interception.register_module(nn.MultiHeadDotProductAttention, "attention", _attention)
interception.register_module(_AttentionFunction, "attention", _dot_product_attention)
interception.register_site_runner(nn.Module, _linen_site)
interception.register_function(jax.nn.gelu, _gelu)
interception.register_function(jax.nn.softmax, _softmax)
interception.register_function(jax.nn.dot_product_attention, _jax_attention)


# -------------------------------------------------------------- the layers


def _compressed_namesake(flax_cls: type, kinds: str) -> type:
    """``flax_cls`` plus a ``quant`` field: flax's call, inside a mesa scope with that quant."""

    def __call__(self, *args, **kwargs):
        with interception.scope(self.quant, owner=self):
            return flax_cls.__call__(self, *args, **kwargs)

    doc = (f"flax.linen.{flax_cls.__name__}, keeping int8 copies of {kinds} for the backward pass: every flax "
           f"argument and parameter, plus ``quant`` (QuantConfig, Policy, or None for flax's own computation).")
    namespace = {"__annotations__": {"quant": Quant}, "quant": DEFAULT, "_mesa_layer": True, "__call__": __call__,
                 "__doc__": doc, "__module__": __name__, "__qualname__": flax_cls.__name__}
    return type(flax_cls.__name__, (flax_cls,), namespace)


Dense = _compressed_namesake(nn.Dense, "its input")
DenseGeneral = _compressed_namesake(nn.DenseGeneral, "its input")
Einsum = _compressed_namesake(nn.Einsum, "its input")
Conv = _compressed_namesake(nn.Conv, "its input")
LayerNorm = _compressed_namesake(nn.LayerNorm, "its normalized input (and the per-row rstd)")
MultiHeadDotProductAttention = _compressed_namesake(
    nn.MultiHeadDotProductAttention, "the projections' inputs, query, key, probabilities and value (per head)")
SelfAttention = _compressed_namesake(
    nn.SelfAttention, "the projections' inputs, query, key, probabilities and value (per head)")


class DotProductAttention(_AttentionFunction):
    """flax.linen.dot_product_attention as a layer, for ``attention_fn=`` of
    nn.MultiHeadDotProductAttention (``attention_fn=mnn.DotProductAttention()``: the params
    tree is unchanged, the statistics live under ``attention_fn``). The forward is flax's
    function; the backward keeps q, k, v packed per head and no N x N map (the fused op).
    With attention dropout, a custom einsum, or a Policy without the "attention" kind:
    flax's function with mesa's einsums and softmax, op by op (the probabilities kept)."""

    quant: Quant = DEFAULT
    _mesa_layer = True

    @functools.wraps(_AttentionFunction.__call__)
    def __call__(self, *args, **kwargs):
        with interception.scope(self.quant, owner=self):
            return _AttentionFunction.__call__(self, *args, **kwargs)


class _Function(nn.Module):
    """A jnp function as a layer: its statistics in this module's "mesa" collection."""

    def _site(self, kind, name, x, layout, op, exact):
        config = resolve(self.quant, kind, path_of(self))
        if config is None:
            return exact()
        return _compressed(self, [(name, x, layout, config)], op, exact, True)


class GELU(_Function):
    """jax.nn.gelu (flax.linen.gelu) as a layer, keeping an int8 copy of its input. The
    default is jax.nn.gelu's, the tanh approximation; ``approximate=False`` is erf (DeiT's)."""

    approximate: bool = True
    quant: Quant = DEFAULT

    @nn.compact
    def __call__(self, x):
        op = lambda stats, seeds, configs: ops.gelu(x, stats[0], seeds[0], configs[0], self.approximate)
        return self._site("gelu", "inputs", x, "channels", op, lambda: ops.gelu_reference(x, self.approximate))


class Softmax(_Function):
    """Softmax over the last axis, keeping only an int8 copy of its output (per head if 4-D)."""

    axis: int = -1
    quant: Quant = DEFAULT

    @nn.compact
    def __call__(self, x):
        if self.axis not in (-1, x.ndim - 1):
            raise ValueError(f"Softmax supports the last axis only, got axis={self.axis} for shape {x.shape}")
        op = lambda stats, seeds, configs: ops.softmax(x, stats[0], seeds[0], configs[0])
        return self._site("softmax", "outputs", ops.kept_output(x), ops.attention_layout(x.ndim), op, lambda: ops.softmax_reference(x))


class MatMul(_Function):
    """``a @ b`` over leading batch dims, keeping int8 copies of both (per head if 4-D)."""

    quant: Quant = DEFAULT

    @nn.compact
    def __call__(self, a, b):
        if a.ndim != b.ndim or a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"MatMul needs [..., N, K] @ [..., K, M] with equal batch dims, got {a.shape} @ {b.shape}")
        config = resolve(self.quant, "matmul", path_of(self))
        if config is None:
            return ops.matmul_reference(a, b)
        layouts = (ops.attention_layout(a.ndim), ops.attention_layout(b.ndim))
        kept = [("a", a, layouts[0], config), ("b", b, layouts[1], config)]
        op = lambda stats, seeds, configs: ops.bilinear(a, b, *stats, *seeds, configs[0], ops.matmul_reference,
                                                        layouts)
        return _compressed(self, kept, op, lambda: ops.matmul_reference(a, b), True)
