"""The sites: one handler per kind, written once for flax.linen and flax.nnx.

A kind (``policy.KINDS``) says what a call keeps for the backward pass, how each kept tensor
is grouped and what its statistics are named: a ``Work`` (the tensors, the mesa op, the
exact computation). ``run`` executes a Work against a module's ``Store`` (stores.py).
The flax layers reach their kind through the tables at the end (``LINEN``, ``NNX``): a
handler runs flax's own call with mesa's op injected at flax's injection point
(``dot_general``, ``conv_general_dilated``, ``einsum_op``, ``attention_fn``), or computes
flax's arithmetic with mesa's op where there is none (LayerNorm, Linen's Einsum); functions
called inside modules reach theirs through ``FUNCTIONS``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.extend import source_info_util

from mesa_jax import attention as attention_op, ops, quant
from mesa_jax._src import residuals, scope as scopes
from mesa_jax._src.scope import Scope
from mesa_jax._src.stores import Store, join, linen_scan
from mesa_jax.policy import as_policy
from mesa_jax.quant import Layout, QuantConfig


source_info_util.register_exclusion(__file__)  # the exact computations it runs keep the model's line


class Kept(NamedTuple):
    """A tensor a site keeps: its statistics' name, the tensor, its grouping (``one_group``: one
    range however many channels, for channels that are a sequence whose length varies)."""

    name: str
    x: Any
    layout: Layout
    one_group: bool = False


class Work(NamedTuple):
    """One call of a kind: what it keeps, ``op(stats, seeds, config) -> (y, stats)`` (the
    mesa op, a statistics tuple in, one out), and ``exact()`` (the baseline's computation)."""

    kept: tuple[Kept, ...]
    op: Callable
    exact: Callable


def fitted(config: QuantConfig, shape, layout: Layout, strict: bool) -> QuantConfig:
    """compress applies one config to a whole model: where its group count does not divide a
    tensor's channels (RGB into a patch embedding) that tensor uses one group. A mesa layer,
    configured on its own (``strict``), raises instead."""
    if strict or layout != "channels" or not shape or shape[-1] % config.num_groups == 0:
        return config
    return dataclasses.replace(config, num_groups=1)


def run(scope: Scope, store: Store, config: QuantConfig, work: Work):
    """``work``'s op with the store's statistics, storing the updated ones; its exact computation
    where the store has none. A tensor another op's residual stands for needs none."""
    configs = [dataclasses.replace(config, num_groups=1) if k.one_group else
               fitted(config, k.x.shape, k.layout, scope.strict) for k in work.kept]
    stats = []
    for k, c in zip(work.kept, configs):
        if residuals.shared(k.x) is not None:
            stats.append(None)
            continue
        found = store.stats(k.name, k.x.shape, quant.num_groups_for(k.x.shape, k.layout, c))
        if found is None:
            return work.exact()
        stats.append(found)
    seeds = tuple(None if s is None else store.seed(k.name, s.count) for k, s in zip(work.kept, stats))
    with scopes.suspended():
        y, updated = work.op(tuple(stats), seeds, configs[0] if configs else config)
    for k, old, new in zip(work.kept, stats, updated):
        if old is not None:
            store.update(k.name, new)
    return y


# --------------------------------------------------------------------- kinds


def linear(x, params, fn, name: str = "inputs") -> Work:
    """dense, conv: ``fn(x, params)`` affine in x, keeping x in channel groups."""
    return Work((Kept(name, x, "channels"),), lambda s, seeds, c: ops.linear(x, params, s[0], seeds[0], c, fn),
                lambda: fn(x, params))


def layer_norm(x, scale, bias, epsilon, fast_variance, dtype, name: str = "normalized") -> Work:
    """LayerNorm over the last axis with flax's arithmetic, keeping the normalized input."""
    settings = dict(epsilon=epsilon, fast_variance=fast_variance, dtype=dtype)
    x_hat = ops.normalized_input(x, epsilon, fast_variance)[0]
    return Work((Kept(name, x_hat, "channels"),),
                lambda s, seeds, c: ops.layer_norm(x, scale, bias, s[0], seeds[0], c, **settings),
                lambda: ops.layer_norm_reference(x, scale, bias, **settings))


def rms_norm(x, scale, epsilon, dtype, name: str = "normalized") -> Work:
    """RMSNorm over the last axis with flax's arithmetic, keeping x * rstd."""
    x_hat = ops.normalized_input(x, epsilon, centered=False)[0]
    return Work((Kept(name, x_hat, "channels"),),
                lambda s, seeds, c: ops.rms_norm(x, scale, s[0], seeds[0], c, epsilon, dtype),
                lambda: ops.rms_norm_reference(x, scale, epsilon, dtype))


def batch_norm(x, scale, bias, epsilon, fast_variance, dtype, name: str = "normalized") -> Work:
    """BatchNorm with the batch's statistics (training), with flax's arithmetic over every axis
    but the last, keeping the normalized input."""
    settings = dict(epsilon=epsilon, fast_variance=fast_variance, dtype=dtype)
    x_hat = ops.normalized_input(x, epsilon, fast_variance, per_channel=True)[0]
    return Work((Kept(name, x_hat, "channels"),),
                lambda s, seeds, c: ops.batch_norm(x, scale, bias, s[0], seeds[0], c, **settings),
                lambda: ops.batch_norm_reference(x, scale, bias, **settings))


def gelu(x, approximate: bool, name: str = "inputs", exact=None) -> Work:
    return Work((Kept(name, x, "channels"),), lambda s, seeds, c: ops.gelu(x, s[0], seeds[0], c, approximate),
                exact or (lambda: ops.gelu_reference(x, approximate)))


def silu(x, name: str = "inputs", exact=None) -> Work:
    return Work((Kept(name, x, "channels"),), lambda s, seeds, c: ops.silu(x, s[0], seeds[0], c),
                exact or (lambda: ops.silu_reference(x)))


def relu(x, exact=None) -> Work:
    """ReLU, keeping one bit per element (no statistics: nothing is quantized)."""
    return Work((), lambda s, seeds, c: ops.relu(x, c), exact or (lambda: ops.relu_reference(x)))


def gated(g, u, act, names=("gate", "up")) -> Work:
    """``act(g) * u`` (a GLU's gated product), keeping g and u."""
    act = _undispatched(act)
    kept = (Kept(names[0], g, "channels"), Kept(names[1], u, "channels"))
    return Work(kept, lambda s, seeds, c: ops.gated(g, u, *s, *seeds, c, act), lambda: ops.gated_reference(g, u, act))


def softmax(x, name: str = "outputs", exact=None, layout: Layout | None = None) -> Work:
    """Softmax over the last axis, keeping its output per head (axis -3 if 4-D, unless
    ``layout`` says where the heads are); by channels, as one group: its channels are the keys,
    whose number varies with the sequence."""
    layout = ops.attention_layout(x.ndim) if layout is None else layout
    kept = Kept(name, ops.kept_output(x), layout, one_group=layout == "channels")
    return Work((kept,), lambda s, seeds, c: ops.softmax(x, s[0], seeds[0], c, layout),
                exact or (lambda: ops.softmax_reference(x)))


def matmul(a, b, fn, layouts, names=("a", "b")) -> Work:
    """``fn(a, b)`` bilinear in two activations (a matmul, attention's einsums), keeping both."""
    kept = (Kept(names[0], a, layouts[0]), Kept(names[1], b, layouts[1]))
    return Work(kept, lambda s, seeds, c: ops.bilinear(a, b, *s, *seeds, c, fn, layouts), lambda: fn(a, b))


def attention(forward, q, k, v, bias, mask, is_causal=False, scale=None, names=("q", "k", "v"), dropout=None,
              rng=None) -> Work:
    """``forward(q, k, v, bias, mask[, rng])`` (the framework's attention; with ``dropout``, an
    attention_op.Dropout, it drops probabilities out with the key ``rng``) as the fused op:
    q, k, v ([B, L, H, D]) kept per head, the key, nothing N x N."""

    def op(stats, seeds, config):
        spec = attention_op.Forward(forward, scale, is_causal, config.saved_lse, dropout)
        return attention_op.packed_attention(q, k, v, bias, mask, stats, seeds, config, spec, rng)

    kept = tuple(Kept(n, t, t.ndim - 2) for n, t in zip(names, (q, k, v)))
    exact = lambda: forward(q, k, v, bias, mask) if dropout is None else forward(q, k, v, bias, mask, rng)
    return Work(kept, op, exact)


# ------------------------------------------------ flax's injection points


def _injection(original, as_map):
    """A site standing in for ``original`` (a function flax lets a layer replace), keeping its
    input: ``as_map(*args, **kwargs) -> (x, params, fn)`` with ``fn(x, params)`` affine in x."""

    def site(scope, store, config, *args, out_sharding=None, **kwargs):
        if out_sharding is not None:
            return original(*args, out_sharding=out_sharding, **kwargs)
        return run(scope, store, config, linear(*as_map(*args, **kwargs)))

    return site


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    fn = ops.DotGeneral(_tuples(dimension_numbers), precision, preferred_element_type)
    (contract, _), (batch, _) = fn.dimension_numbers
    if batch or len(contract) < 2 or sorted(a % lhs.ndim for a in contract) != list(
            range(lhs.ndim - len(contract), lhs.ndim)):
        return lhs, rhs, fn
    x = lhs.reshape(*lhs.shape[: -len(contract)], math.prod(lhs.shape[-len(contract):]))
    return x, rhs, ops.Reshaped(fn, lhs.shape)  # [..., H, D] kept as [..., H * D] channel groups


def _conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, *rest, **kwargs):
    fn = ops.ConvGeneral(*map(_tuples, (window_strides, padding, lhs_dilation, rhs_dilation)), *rest, **kwargs)
    return lhs, rhs, fn


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


dot_general = _injection(lax.dot_general, _dot_general)  # Linen's Dense, DenseGeneral; NNX's Linear(General)
conv_general_dilated = _injection(lax.conv_general_dilated, _conv)  # Linen's and NNX's Conv
einsum = _injection(jnp.einsum, lambda spec, x, kernel, precision=None, preferred_element_type=None: (
    x, kernel, ops.Einsum(spec, precision, preferred_element_type)))  # NNX's Einsum (its einsum_op)


def _mesa(fn):
    fn._mesa = True
    return fn


def _is_mesa(fn) -> bool:
    """A function mesa injected, or a mesa layer (which applies its own quant)."""
    return getattr(fn, "_mesa", False) or getattr(fn, "_mesa_layer", False)


def injected(field: str, defaults: tuple, make):
    """A handler running the layer's own call with ``field``, an injection point (flax's value:
    one of ``defaults``), set to ``make(scope, store)`` (None: run it as it is). Not where the
    user set the field (or its ``*_cls`` twin) to something of their own."""

    def handler(scope: Scope, store: Store, module, next_fun, args, kwargs):
        current, call = getattr(module, field), lambda: next_fun(*args, **kwargs)
        if _is_mesa(current):
            return call()
        if _undispatched(current) not in defaults or getattr(module, f"{field}_cls", None) is not None:
            return scope.unsupported(store, module, f"a custom {field}", call)
        fn = make(scope, store)
        if fn is None:
            return call()
        with scopes.fields_set(module, **{field: _mesa(fn)}):
            return call()

    return handler


def _with_config(kind: str, site):
    """``site`` with the scope, the store and the config of the ``kind`` site (None: exact)."""

    def make(scope: Scope, store: Store):
        config = scope.config(kind, store.path)
        return None if config is None else functools.partial(site, scope, store, config)

    return make


# ------------------------------------------- layers without an injection point


def _overrides(module, method: str = "__call__") -> bool:
    """Whether the module's class changes its flax namesake's ``method`` (then only flax's own
    code is safe); mesa's own subclasses (its layers, compress's) do not."""
    for cls in type(module).__mro__:
        if (cls, method) in LINEN or cls in NNX:
            return False
        if method in vars(cls) and not is_mesa_class(cls):
            return True
    return False


def is_mesa_class(cls) -> bool:
    """A class mesa made: a layer of mesa_jax.nn or mesa_jax.nnx (their methods open its scope),
    or the subclass compress made of a model's class."""
    return cls.__module__ in _LAYER_MODULES or "_mesa_base" in vars(cls) or "_mesa_uncompressed" in vars(cls)


_LAYER_MODULES = ("mesa_jax.nn", "mesa_jax.nnx")


def _last_axis(axes, ndim: int) -> bool:
    return tuple(a % ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))) == (ndim - 1,)


_DEFAULT_PROMOTE = (None, nn.dtypes.promote_dtype, nnx.nn.dtypes.promote_dtype)


def _norm_handler(kind: str, work: Callable):
    """LayerNorm, RMSNorm over the last axis (Linen's, NNX's): flax's parameters, promotion and
    arithmetic, keeping the normalized input packed and the per-row rstd;
    ``work(module, x, scale, bias)`` is the kind's Work."""

    def handler(scope: Scope, store: Store, module, next_fun, args, kwargs):
        x, call = args[0], lambda: next_fun(*args, **kwargs)
        what = _unsupported_norm_setting(module, x, kwargs, reduction_axes=module.reduction_axes,
                                         feature_axes=module.feature_axes)
        if what:
            return scope.unsupported(store, module, what, call)
        config = scope.config(kind, store.path)
        if config is None:
            return call()
        scale, bias = _norm_params(store, module, x.shape[-1])
        if getattr(module, "promote_dtype", None) is not None:  # NNX's: flax promotes before normalizing
            x, scale, bias = module.promote_dtype((x, scale, bias), dtype=module.dtype)
        return run(scope, store, config, work(module, x, scale, bias))

    return handler


def _unsupported_norm_setting(module, x, kwargs, **last_axes) -> str | None:
    """The first setting of a flax norm layer that mesa does not compress, or None; ``last_axes``:
    its axis settings that must name x's last axis."""
    for what, supported in (("an overridden __call__", not _overrides(module)),
                            *((f"{name}={axes}", _last_axis(axes, x.ndim)) for name, axes in last_axes.items()),
                            (f"axis_name={module.axis_name!r}", module.axis_name is None),
                            ("axis_index_groups", module.axis_index_groups is None),
                            ("force_float32_reductions=False", getattr(module, "force_float32_reductions", True)),
                            ("a custom promote_dtype", getattr(module, "promote_dtype", None) in _DEFAULT_PROMOTE),
                            ("mask", kwargs.get("mask") is None)):
        if not supported:
            return what
    return None


def _norm_params(store: Store, module, features: int):
    """A norm layer's (scale, bias) over ``features`` channels, None where it has none."""
    init = lambda name: getattr(module, f"{name}_init", None)  # Linen's (NNX made its parameters already)
    param = lambda name: store.param(name, init(name), (features,), module.param_dtype)
    use_bias = getattr(module, "use_bias", False)  # RMSNorm has none
    return param("scale") if module.use_scale else None, param("bias") if use_bias else None


layer_norm_handler = _norm_handler("layer_norm", lambda m, x, scale, bias: layer_norm(
    x, scale, bias, m.epsilon, m.use_fast_variance, m.dtype))
rms_norm_handler = _norm_handler("rms_norm", lambda m, x, scale, bias: rms_norm(x, scale, m.epsilon, m.dtype))


def batch_norm_handler(scope: Scope, store: Store, module, next_fun, args, kwargs):
    """BatchNorm over every axis but the last (Linen's, NNX's) with the batch's statistics:
    flax's parameters, promotion, running averages and arithmetic, keeping the normalized input
    packed and the per-channel rstd. With the running averages (evaluation) it is affine in x
    and keeps nothing of it: flax's own call."""
    x, call = args[0], lambda: next_fun(*args, **kwargs)
    given = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    running = module.use_running_average if given is None else given
    linen = isinstance(module, nn.Module)
    if running is None or running or (linen and given is not None and module.use_running_average is not None):
        return call()  # evaluation, or flax's own error
    what = _unsupported_norm_setting(module, x, kwargs, axis=module.axis)
    if what:
        return scope.unsupported(store, module, what, call)
    config = scope.config("batch_norm", store.path)
    if config is None:
        return call()
    scale, bias = _norm_params(store, module, x.shape[-1])
    if linen:
        averages = [module.variable("batch_stats", name, lambda s, fill=fill: fill(s, jnp.float32), (x.shape[-1],))
                    for name, fill in (("mean", jnp.zeros), ("var", jnp.ones))]
        read = lambda v: v.value
    else:  # NNX's BatchStats; flax promotes them with x, scale and bias before normalizing
        averages, read = [module.mean, module.var], lambda v: v[...]
        x, _, _, scale, bias = module.promote_dtype((x, *map(read, averages), scale, bias), dtype=module.dtype)
    if not (linen and module.is_initializing()):
        for average, batch in zip(averages, ops.batch_moments(x, module.use_fast_variance)):
            new = module.momentum * read(average) + (1 - module.momentum) * batch
            if linen:
                average.value = new
            else:
                average[...] = new
    return run(scope, store, config, batch_norm(x, scale, bias, module.epsilon, module.use_fast_variance, module.dtype))


def _attend(x, embedding):
    """flax's Embed.attend after its promotion: a linear map of x (the tied head)."""
    return jnp.dot(x, embedding.T)


def attend_handler(scope: Scope, store: Store, module, next_fun, args, kwargs):
    """Embed.attend (Linen's, NNX's), a tied head: flax's promotion and product, keeping the query."""
    call = lambda: next_fun(*args, **kwargs)
    for what, supported in (("an overridden attend", not _overrides(module, "attend")),
                            ("a custom promote_dtype", module.promote_dtype in _DEFAULT_PROMOTE),
                            ("out_sharding", kwargs.get("out_sharding") is None)):
        if not supported:
            return scope.unsupported(store, module, what, call)
    config = scope.config("dense", store.path)
    if config is None:
        return call()
    (query,) = args or (kwargs["query"],)
    embedding = module.embedding
    if isinstance(embedding, nnx.Variable):  # NNX's promote_dtype takes a tuple, Linen's the arrays
        query, embedding = module.promote_dtype((query, embedding[...]), dtype=module.dtype)
    else:
        query, embedding = module.promote_dtype(query, embedding, dtype=module.dtype)
    return run(scope, store, config, linear(query, embedding, _attend, name="query"))


def linen_einsum_handler(scope: Scope, store: Store, module, next_fun, args, kwargs):
    """Linen's Einsum (no injection point): flax's parameters, bias shape and promotion, mesa's einsum."""
    if _overrides(module):
        return scope.unsupported(store, module, "an overridden __call__", lambda: next_fun(*args, **kwargs))
    config = scope.config("dense", store.path)
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
    y = run(scope, store, config, linear(inputs, kernel, ops.Einsum(spec, module.precision,
                                                                     module.preferred_element_type)))
    return y if bias is None else y + bias.reshape(broadcast_shape)


# ------------------------------------------------------------------ attention


def attention_fn(scope: Scope, store: Store, default):
    """``default`` (flax.linen's or flax.nnx's dot_product_attention) as mesa runs it, or None
    (exact). Policy.attention "fused": the fused op with ``default`` as its forward, attention
    dropout included (its key kept, the mask drawn again in the backward; not with sown
    weights or custom einsums: then op by op where it can); "per_op": flax.linen's function
    with mesa's einsums (query, key, probabilities, value, per head) and its softmax intercepted."""
    fused = scope.config("attention", store.path) if scope.policy.attention == "fused" else None
    per_op = None
    if default is nn.dot_product_attention and (fused is not None or scope.policy.attention == "per_op"):
        per_op = scope.config("matmul", store.path)
    if fused is None and per_op is None:
        return None

    def attend(query, key, value, bias=None, mask=None, **kwargs):
        custom = [kwargs.get(k) is not None for k in ("qk_attn_weights_einsum", "attn_weights_value_einsum",
                                                      "einsum_dot_general", "module")]
        dropping = kwargs.get("dropout_rate", 0.0) > 0 and not kwargs.get("deterministic", False)
        rng = kwargs.get("dropout_rng") if dropping else None
        if (fused is not None and not any(custom) and (rng is not None or not dropping) and query.ndim == 4
                and key.shape[-2] == query.shape[-2]):
            names = ("dtype", "precision", "force_fp32_for_softmax", "is_causal") + (
                ("dropout_rate", "broadcast_dropout", "deterministic") if dropping else ())
            settings = {k: kwargs[k] for k in names if k in kwargs}
            dropout = attention_op.Dropout(settings["dropout_rate"], settings.get("broadcast_dropout", True)) \
                if dropping else None
            mask = None if mask is None else mask.astype(jnp.bool_)
            forward = attention_op.Baseline.of(default, **settings)
            return run(scope, store, fused, attention(forward, query, key, value, bias, mask,
                                                      settings.get("is_causal", False), dropout=dropout, rng=rng))
        if per_op is None or any(custom[:3]):
            return default(query, key, value, bias, mask, **kwargs)
        # [..., L, H, D] operands grouped per head (axis -2); probabilities [..., H, Q, K] (axis -3)
        qk = _attention_einsum(scope, store, per_op, ("q", "k"), (-2, -2), kwargs.get("precision"))
        av = _attention_einsum(scope, store, per_op, ("probs", "v"), (-3, -2), kwargs.get("precision"))
        return default(query, key, value, bias, mask, **{**kwargs, "qk_attn_weights_einsum": qk,
                                                         "attn_weights_value_einsum": av})

    attend.__signature__ = inspect.signature(default)  # Linen's MHDPA passes what it declares
    return attend


def _attention_einsum(scope, store, config, names, axes, precision):
    def einsum(spec, a, b):
        layouts = (axes[0] % a.ndim, axes[1] % b.ndim)
        return run(scope, store, config, matmul(a, b, ops.Einsum(spec, precision), layouts, names))

    return einsum


class AttentionFunction(nn.Module):
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


def _attention_function(scope: Scope, store: Store, module, next_fun, args, kwargs):
    fn = attention_fn(scope, store, nn.dot_product_attention)
    return next_fun(*args, **kwargs) if fn is None else fn(*args, **kwargs)


def _attention(default):
    """Linen's MultiHeadDotProductAttention, NNX's MultiHeadAttention: the projections
    compressed as dense layers, the core (flax's ``default``) by ``attention_fn``."""
    return injected("attention_fn", (default,), lambda scope, store: attention_fn(scope, store, default))


# ---------------------------------------------- functions called in a module


def function_site(scope: Scope, function: str, kind: str, work: Callable, exact: Callable):
    """A registered function called inside a module: its statistics live in that module, named
    after the call (``gelu_0``; ``dot_product_attention_0_q`` where it keeps several tensors):
    ``work(name)`` is the Work with that name."""
    frame = scopes.innermost_frame()
    name = frame.next_name(function)
    config = scope.config(kind, join(frame.store.path, name))
    return exact() if config is None else run(scope, frame.store, config, work(name))


def _gelu(scope, original, x, approximate: bool = True):
    exact = lambda: original(x, approximate=approximate)
    y = function_site(scope, "gelu", "gelu", lambda name: gelu(x, approximate, name, exact), exact)
    return _activation(scope, y, x, functools.partial(original, approximate=approximate))


def _silu(scope, original, x):
    exact = lambda: original(x)
    return _activation(scope, function_site(scope, "silu", "silu", lambda name: silu(x, name, exact), exact), x,
                       original)


def _relu(scope, original, x):
    exact = lambda: original(x)
    if not jnp.ndim(x):
        return exact()
    return _activation(scope, function_site(scope, "relu", "relu", lambda name: relu(x, exact), exact), x, original)


def _activation(scope: Scope, y, x, act):
    """``y = act(x)``, recorded: a product that takes it (``act(g) * u`` written by hand, a GLU's
    gated product) is then a "gated" site (``_multiply``)."""
    scope.record_activation(y, x, act)
    return y


def _multiply(scope, original, a, b):
    """``act(g) * u`` (or ``u * act(g)``) written by hand, with ``act`` an activation reached in
    a module (gelu, silu, relu: GeGLU, SwiGLU, ReGLU) and u of its shape: the "gated" kind, as
    ``gated(g, u, act)`` is (g and u packed once, g shared with the activation's own copy, which
    is then unused; the projection taking the product keeps nothing). Any other product is JAX's."""
    exact = lambda: original(a, b)
    for y, u in ((a, b), (b, a)):
        found = scope.activation_of(y)
        if (found is not None and isinstance(u, jax.Array) and jnp.shape(u) == jnp.shape(y)
                and jnp.issubdtype(u.dtype, jnp.floating) and not _called_by_a_library()):
            g, act = found
            return _gated_site(scope, g, act, u, exact)
    return exact()


def gated_product(g, u, act=jax.nn.silu):
    """``act(g) * u``, the gated product of a GLU MLP (SwiGLU: silu; ``act`` elementwise).
    Called inside a compressed module it keeps g and u packed, once, and the projection that
    takes the product keeps nothing; elsewhere it is exactly ``act(g) * u`` (which a compressed
    module reaches too, when it computes act(g) itself: ``_multiply``)."""
    return ops.gated_reference(g, u, act)


def _gated(scope, original, g, u, act=jax.nn.silu):
    exact = lambda: original(g, u, act)
    if jnp.shape(g) != jnp.shape(u) or not jnp.ndim(g):
        return exact()
    return _gated_site(scope, g, act, u, exact)


def _gated_site(scope, g, act, u, exact):
    """The "gated" site of ``act(g) * u``: ``gated_product`` called, or the product by hand."""
    return function_site(scope, "gated", "gated", lambda name: gated(g, u, act, (f"{name}_gate", f"{name}_up")), exact)


def _undispatched(fn):
    """``fn`` with a dispatcher (a registered function's stand-in while a scope is open,
    ``nn.silu`` then) replaced by its original: an op's backward may run inside a scope."""
    if isinstance(fn, functools.partial):
        return functools.partial(_undispatched(fn.func), *fn.args, **fn.keywords)
    return getattr(fn, "__mesa_original__", fn)


def _softmax(scope, original, x, axis=-1, where=None, **kwargs):
    """Softmax over the last axis. Flax calls it inside its attention's core, which the
    attention's handler decides (fused, or with Policy(attention="per_op") op by op: then
    this is one of its sites); the core it leaves exact keeps its probabilities in float."""
    exact = lambda: original(x, axis=axis, where=where, **kwargs)
    in_flax_attention = _caller() in _FLAX_ATTENTION
    if (where is not None or kwargs or axis not in (-1, x.ndim - 1)
            or (scope.policy.attention != "per_op" and in_flax_attention)):
        return exact()
    layout = scopes.innermost_frame().heads.get(jnp.shape(x))  # the heads of the product it normalizes
    if layout is None and x.ndim >= 4 and not in_flax_attention:
        layout = "channels"  # heads mesa did not see (scores reshaped after their product): one group
    return function_site(scope, "softmax", "softmax", lambda name: softmax(x, name, exact, layout), exact)


def _jax_attention(scope, original, query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                   implementation=None, **kwargs):
    """jax.nn.dot_product_attention called inside a module: the fused op with it as the forward
    (4-D inputs; sequence lengths, local windows and returned residuals run exactly)."""
    exact = lambda: original(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                             implementation=implementation, **kwargs)
    if any(v is not None and v is not False for v in kwargs.values()) or jnp.ndim(query) != 4:
        return exact()
    forward = attention_op.JaxAttention(scale, is_causal, implementation)
    work = lambda name: attention(forward, query, key, value, bias, mask, is_causal, scale,
                                  tuple(f"{name}_{t}" for t in "qkv"))
    return function_site(scope, "dot_product_attention", "attention", work, exact)


def _einsum(scope, original, spec, *operands, **kwargs):
    """jnp.einsum of two activations written in a module (attention by hand: gemma's
    ``einsum('BTNH,BSNH->BTNS', q, k)``, then the probabilities' with v): the "matmul" kind,
    both operands kept packed per head (``_einsum_heads``); the probabilities a softmax kept
    are not kept again. An einsum with a variable of the module (a dense layer by hand) runs
    exactly, as do flax's own (its layers' handlers decide for them)."""
    exact = lambda: original(spec, *operands, **kwargs)
    supported = set(kwargs) <= {"precision", "preferred_element_type"} and len(operands) == 2
    parsed = _einsum_heads(spec) if supported and _batched(*operands) else None
    if parsed is None or _called_by_a_library() or _holds_variable(operands):
        return exact()
    (a_spec, b_spec), output, label = parsed
    layouts = ("channels", "channels") if label is None else (
        _label_axis(a_spec, label, operands[0].ndim), _label_axis(b_spec, label, operands[1].ndim))
    fn = ops.Einsum(spec, kwargs.get("precision"), kwargs.get("preferred_element_type"))
    work = lambda name: matmul(*operands, fn, layouts, (f"{name}_a", f"{name}_b"))
    y = function_site(scope, "einsum", "matmul", work, exact)
    return _product(y, None if label is None else _label_axis(output, label, jnp.ndim(y)))


def _matmul(scope, original, a, b, **kwargs):
    """``a @ b`` or jnp.matmul of two activations with the same batch axes (``q @ k^T`` by
    hand): the "matmul" kind, as ``mnn.MatMul`` (4-D operands grouped per head)."""
    exact = lambda: original(a, b, **kwargs)
    if (kwargs or not _batched(a, b) or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or _called_by_a_library()
            or _holds_variable((a, b))):
        return exact()
    layouts = (ops.attention_layout(a.ndim), ops.attention_layout(b.ndim))
    work = lambda name: matmul(a, b, ops.matmul_reference, layouts, (f"{name}_a", f"{name}_b"))
    y = function_site(scope, "matmul", "matmul", work, exact)
    return _product(y, ops.attention_layout(y.ndim) if y.ndim >= 4 else None)


def _product(y, heads: int | None):
    """A product's output, whose heads axis (None: none) the module call records: a softmax over
    it (attention's scores) is grouped per head wherever the model put the heads, so that its
    statistics do not depend on the sequence length (gemma's [B, T, N, S] scores)."""
    if heads is not None:
        scopes.innermost_frame().heads[jnp.shape(y)] = heads
    return y


def _batched(a, b) -> bool:
    """Two floating arrays of three or more axes: a batch of matrices each (a weight has none)."""
    return all(isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 3 for x in (a, b))


def _einsum_heads(spec):
    """``((lhs, rhs), output, heads label)`` of a two-operand einsum of two activations, or None
    where it is not one: both operands must begin with the same label (the batch; or both with
    "...") that the output keeps. The heads are the last label the two share with the output
    after it (None: they share none, and are grouped per channel group)."""
    if not isinstance(spec, str) or spec.count("->") != 1:
        return None
    inputs, output = spec.replace(" ", "").split("->")
    specs = inputs.split(",")
    lead = lambda s: "..." if s.startswith("...") else s[:1]
    if len(specs) != 2 or not lead(specs[0]) or lead(specs[0]) != lead(specs[1]) or lead(specs[0]) not in output:
        return None
    heads = [c for c in specs[0][len(lead(specs[0])):] if c.isalpha() and c in specs[1] and c in output]
    return tuple(specs), output, heads[-1] if heads else None


def _label_axis(spec: str, label: str, ndim: int) -> int:
    before, _, after = spec.rpartition("...") if "..." in spec else ("", "", spec)
    return before.index(label) if label in before else ndim - len(after) + after.index(label)


def _caller() -> str:
    """The module whose code called the function (past the dispatcher and JAX's ``@`` operator,
    which is its user's call)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in _DISPATCHING:
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


def _called_by_a_library() -> bool:
    """flax's calls inside its layers are their handlers' business, and a JAX function built on
    another is not its user's call of that one."""
    return _caller().startswith(("flax.", "jax.", "jaxlib"))


_DISPATCHING = (__name__, scopes.__name__, "jax._src.numpy.array_methods")
_FLAX_ATTENTION = ("flax.linen.attention", "flax.nnx.nn.attention")  # where flax calls softmax


def _holds_variable(operands) -> bool:
    """Whether an operand is a variable (a parameter) of the module calling the function."""
    store = scopes.innermost_frame().store
    return any(store.holds(x) for x in operands)


# ------------------------------------------------------------------ the tables

# Linen's injection points default to None, NNX's to the lax function
_DENSE = injected("dot_general", (None,), _with_config("dense", dot_general))
_CONV = injected("conv_general_dilated", (None,), _with_config("conv", conv_general_dilated))
_NNX_DENSE = injected("dot_general", (None, lax.dot_general), _with_config("dense", dot_general))
_NNX_CONV = injected("conv_general_dilated", (lax.conv_general_dilated,), _with_config("conv", conv_general_dilated))

# (flax.linen class, method) -> handler(scope, store, module, next_fun, args, kwargs)
LINEN = {
    (nn.Dense, "__call__"): _DENSE,
    (nn.DenseGeneral, "__call__"): _DENSE,
    (nn.Einsum, "__call__"): linen_einsum_handler,
    (nn.Conv, "__call__"): _CONV,
    (nn.LayerNorm, "__call__"): layer_norm_handler,
    (nn.RMSNorm, "__call__"): rms_norm_handler,
    (nn.BatchNorm, "__call__"): batch_norm_handler,
    (nn.Embed, "attend"): attend_handler,  # the lookup keeps nothing
    (nn.MultiHeadDotProductAttention, "__call__"): _attention(nn.dot_product_attention),
    (AttentionFunction, "__call__"): _attention_function,
}


class Planned(NamedTuple):
    """Statistics an NNX layer gets when it is made: ``size`` channels (or heads: ``layout``
    "heads"; None: unknown before a call), stacked ``lead`` times (layers made by nnx.vmap)."""

    name: str
    size: int | None
    layout: str
    lead: tuple


def _lead(param, ndim: int) -> tuple:
    return tuple(param.shape[: param.ndim - ndim]) if param is not None else ()


def _linear_general_stats(m):
    trailing = tuple(sorted(m.axis)) == tuple(range(-len(m.axis), 0))
    channels = math.prod(m.in_features) if trailing and not m.batch_axis else None
    ndim = len(m.batch_axis) + len(m.in_features) + len(m.out_features)
    return [Planned("inputs", channels, "channels", _lead(m.kernel, ndim))]


def _einsum_stats(m):
    spec = (m.einsum_str or "").replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return []
    lhs, rhs = spec.split("->")[0].split(",")
    channels = m.kernel_shape[rhs.index(lhs[-1])] if lhs and lhs[-1] in rhs else None
    return [Planned("inputs", channels, "channels", _lead(m.kernel, len(m.kernel_shape)))]


def _attention_stats(m):
    lead = _lead(m.query.kernel, 3)
    return [] if m.num_kv_heads != m.num_heads else [Planned(n, m.num_heads, "heads", lead) for n in "qkv"]


class NnxKind(NamedTuple):
    kind: str  # the Policy kind
    handler: Callable  # handler(scope, store, module, next_fun, args, kwargs)
    planned: Callable  # module -> [Planned]: the statistics made with the layer
    method: str = "__call__"  # the method the handler runs


# flax.nnx class -> its kind, handler and statistics
NNX = {
    nnx.Linear: NnxKind("dense", _NNX_DENSE, lambda m: [Planned("inputs", m.in_features, "channels", _lead(m.kernel, 2))]),
    nnx.LinearGeneral: NnxKind("dense", _NNX_DENSE, _linear_general_stats),
    nnx.Einsum: NnxKind("dense", injected("einsum_op", (jnp.einsum,), _with_config("dense", einsum)), _einsum_stats),
    nnx.Conv: NnxKind("conv", _NNX_CONV, lambda m: [Planned("inputs", m.in_features, "channels",
                                                        _lead(m.kernel, len(m.kernel_size) + 2))]),
    nnx.LayerNorm: NnxKind("layer_norm", layer_norm_handler, lambda m: [Planned(
        "normalized", m.num_features, "channels", _lead(m.scale if m.scale is not None else m.bias, 1))]),
    nnx.RMSNorm: NnxKind("rms_norm", rms_norm_handler, lambda m: [Planned(
        "normalized", m.num_features, "channels", _lead(m.scale, 1))]),
    nnx.BatchNorm: NnxKind("batch_norm", batch_norm_handler, lambda m: [Planned(
        "normalized", m.num_features, "channels", _lead(m.mean, 1))]),
    # the tied head; statistics at the first attend (an embedding used only for lookups has none)
    nnx.Embed: NnxKind("dense", attend_handler, lambda m: [], "attend"),
    nnx.MultiHeadAttention: NnxKind("attention", _attention(nnx.dot_product_attention), _attention_stats),
}

# functions reached wherever a module calls them -> handler(scope, original, *args, **kwargs)
FUNCTIONS = scopes.dispatchers({
    jax.nn.gelu: _gelu,
    jax.nn.silu: _silu,  # jax.nn.swish, nn.silu, nnx.silu: the same function
    jax.nn.relu: _relu,  # nn.relu, nnx.relu
    gated_product: _gated,
    jax.nn.softmax: _softmax,
    jax.nn.dot_product_attention: _jax_attention,
    jnp.einsum: _einsum,  # attention written by hand
    jnp.matmul: _matmul,  # and the @ operator
    jnp.multiply: _multiply,  # and the * operator: a GLU's act(g) * u written by hand
    nn.scan: lambda scope, original, *args, **kwargs: linen_scan(original, *args, **kwargs),
})


GATED = FUNCTIONS[gated_product]  # mesa_jax.nn.gated, mesa_jax.nnx.gated: gated_product, compressed in a scope


def open_scope(quant, *, strict: bool = False, owner=None, check: bool = False):
    """A scope compressing with ``quant`` (a QuantConfig, a Policy or None) whatever flax layer
    or registered function the code inside reaches (see scope.opened)."""
    return scopes.opened(Scope(as_policy(quant), LINEN, FUNCTIONS, strict, owner), check)


def run_layer(quant, store: Store, kind: str, work: Work):
    """A mesa layer of one function (GELU, Softmax, MatMul): ``work`` with the layer's own quant."""
    scope = Scope(as_policy(quant), LINEN, FUNCTIONS, strict=True)
    config = scope.config(kind, store.path)
    return work.exact() if config is None else run(scope, store, config, work)
