"""Flax NNX layers that keep int8 activations, and NNX's statistics variable.

A mesa NNX layer *is* its NNX namesake (a subclass: constructor arguments, ``Param``s and
forward, bit for bit) plus ``quant``. Each tensor it compresses has its running statistics
in a ``MesaStat`` variable (Linen's ``"mesa"`` collection, through ``nnx.bridge``), made with
the layer (a function called inside a module, such as ``nnx.gelu``, makes its own at its
first call), updated in training and fixed in evaluation: ``model.train()`` /
``model.eval()`` or ``nnx.view(model, use_running_average=True)``, like ``nnx.BatchNorm``'s.
Unmodified NNX models: ``mesa_jax.compress(model)`` (in place).
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from mesa_jax._src import sites
from mesa_jax._src.compress import in_place, nnx_call, nnx_method, nnx_namesake, set_view
from mesa_jax._src.stores import MesaStat, NnxStore
from mesa_jax.policy import Quant
from mesa_jax.quant import QuantConfig

__all__ = ["MesaStat", "Linear", "LinearGeneral", "Einsum", "Conv", "Embed", "LayerNorm", "RMSNorm", "BatchNorm",
           "MultiHeadAttention", "GELU", "SiLU", "ReLU", "Gated", "Softmax", "gated"]

gated = sites.GATED  # act(g) * u; inside a compressed model (or a mesa layer) g and u are kept packed


class _Layer:
    """An NNX layer plus ``quant`` (keyword-only): its statistics made with it, its call
    compressed (and its submodules', MultiHeadAttention's projections)."""

    _mesa_layer = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.set_view = set_view(nnx_namesake(cls))

    def __init__(self, *args, quant: Quant = QuantConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        in_place(self, quant, strict=True)

    __call__ = nnx_call


class Linear(_Layer, nnx.Linear):
    """flax.nnx.Linear keeping an int8 copy of its input."""


class LinearGeneral(_Layer, nnx.LinearGeneral):
    """flax.nnx.LinearGeneral keeping an int8 copy of its input."""


class Einsum(_Layer, nnx.Einsum):
    """flax.nnx.Einsum keeping an int8 copy of its input."""


class Conv(_Layer, nnx.Conv):
    """flax.nnx.Conv keeping an int8 copy of its input."""


class Embed(_Layer, nnx.Embed):
    """flax.nnx.Embed whose ``attend`` (a tied head) keeps an int8 copy of its query; the lookup
    keeps nothing."""

    attend = nnx_method("attend")


class LayerNorm(_Layer, nnx.LayerNorm):
    """flax.nnx.LayerNorm (last axis) keeping an int8 copy of its normalized input."""


class RMSNorm(_Layer, nnx.RMSNorm):
    """flax.nnx.RMSNorm (last axis) keeping an int8 copy of x * rstd."""


class BatchNorm(_Layer, nnx.BatchNorm):
    """flax.nnx.BatchNorm (features on the last axis) keeping, in training, an int8 copy of its
    normalized input; with the running averages (``model.eval()``) it keeps nothing of x."""


class MultiHeadAttention(_Layer, nnx.MultiHeadAttention):
    """flax.nnx.MultiHeadAttention keeping the projections' inputs and query, key, value (per
    head; no N x N map)."""


class _Function(nnx.Module):
    """A jnp function as a layer: its statistics (made at the first call, when the input's
    grouping is known) in this module."""

    _mesa_layer = True

    def __init__(self, quant: Quant = QuantConfig()):
        self.quant = quant
        self.use_running_average = False

    def set_view(self, use_running_average: bool | None = None):
        if use_running_average is not None:
            self.use_running_average = use_running_average


class GELU(_Function):
    """jax.nn.gelu (nnx.gelu) as a layer keeping an int8 copy of its input; ``approximate``
    as jax.nn.gelu's (True: tanh; False: erf, DeiT's)."""

    def __init__(self, approximate: bool = True, *, quant: Quant = QuantConfig()):
        super().__init__(quant)
        self.approximate = approximate

    def __call__(self, x):
        return sites.run_layer(self.quant, NnxStore(self), "gelu", sites.gelu(x, self.approximate))


class SiLU(_Function):
    """jax.nn.silu (nnx.silu, swish) as a layer keeping an int8 copy of its input."""

    def __call__(self, x):
        return sites.run_layer(self.quant, NnxStore(self), "silu", sites.silu(x))


class ReLU(_Function):
    """jax.nn.relu (nnx.relu) as a layer keeping one bit per element (its derivative, exactly)
    where JAX keeps a byte."""

    def __call__(self, x):
        return sites.run_layer(self.quant, NnxStore(self), "relu", sites.relu(x))


class Gated(_Function):
    """``act(g) * u``, a GLU's gated product (SwiGLU: silu), as a layer keeping int8 copies of g
    and u; a Linear taking its output keeps nothing of its own (see ``gated``)."""

    def __init__(self, act: Callable = jax.nn.silu, *, quant: Quant = QuantConfig()):
        super().__init__(quant)
        self.act = act

    def __call__(self, g, u):
        if g.shape != u.shape:
            raise ValueError(f"Gated needs g and u of one shape, got {g.shape} and {u.shape}")
        return sites.run_layer(self.quant, NnxStore(self), "gated", sites.gated(g, u, self.act))


class Softmax(_Function):
    """Softmax over the last axis keeping only an int8 copy of its output (per head if 4-D)."""

    def __call__(self, x):
        return sites.run_layer(self.quant, NnxStore(self), "softmax", sites.softmax(x))
