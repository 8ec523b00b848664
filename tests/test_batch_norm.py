"""BatchNorm under compress and as a layer: in training it keeps its normalized input packed.

The models are written as flax's ImageNet example writes a ResNet block: a convolution,
``nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)``, ``nn.relu``
(Linen); ``nnx.Conv``, ``nnx.BatchNorm``, ``nnx.relu`` with ``model.train()`` / ``model.eval()``
(NNX).
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import mesa_jax
from mesa_jax import QuantConfig, memory, quant
from mesa_jax import nn as mnn

SHAPE = (4, 6, 6, 8)  # NHWC
NEAREST = {bits: QuantConfig(bits=bits, stochastic=False) for bits in (8, 4)}


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        y = nn.Conv(16, (3, 3), use_bias=False)(x)
        y = nn.relu(norm()(y))
        return nn.Conv(8, (1, 1))(y)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(8, 16, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.conv2 = nnx.Conv(16, 8, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.conv2(nnx.relu(self.norm(self.conv1(x))))


X, WEIGHTS = jax.random.normal(jax.random.key(0), SHAPE) * 2 + 1, jax.random.normal(jax.random.key(1), SHAPE)


def linen_step(quant, train=True):
    """(loss(params), params, batch_stats after one step) of the Linen block, compressed with
    ``quant`` (False: as written); the loss is linear in the output."""
    model = LinenBlock() if quant is False else mesa_jax.compress(LinenBlock(), quant)
    variables = model.init(jax.random.key(2), X, train=False)
    mutable = ["batch_stats", "mesa"] if train else ["mesa"]

    def apply(params):
        out, state = model.apply({**variables, "params": params}, X, train=train, mutable=mutable)
        return jnp.sum(out * WEIGHTS), state.get("batch_stats")

    return (lambda p: apply(p)[0]), variables["params"], apply(variables["params"])


def nnx_step(quant, train=True):
    model = NnxBlock(nnx.Rngs(2))
    if quant is not False:
        mesa_jax.compress(model, quant)
    model.train() if train else model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return jnp.sum(model(X) * WEIGHTS), nnx.state(model, nnx.BatchStat)

    return (lambda p: apply(p)[0]), params, apply(params)


STEPS = {"linen": linen_step, "nnx": nnx_step}


def grads(step, quant, train=True):
    loss, params, _ = step(quant, train)
    return jax.jit(jax.grad(loss))(params)


def norm_grads(grads):
    """The BatchNorm's scale and bias gradients, flat."""
    norm = grads["BatchNorm_0"] if "BatchNorm_0" in grads else grads["norm"]
    return ravel_pytree(nnx.to_pure_dict(norm) if isinstance(norm, nnx.State) else norm)[0]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_training_keeps_the_normalized_input_packed_with_flax_s_forward_and_running_averages(framework):
    """The compressed block's output and updated running averages are flax's bit for bit; its
    gradient error is first order in the quantization step (8 bits at most 2 x 15/255 of 4
    bits'); what it keeps of the [B, H, W, C] activations is bytes, no float copy."""
    step = STEPS[framework]
    loss, params, (out, averages) = step(False)
    c_loss, c_params, (c_out, c_averages) = step(NEAREST[8])
    np.testing.assert_array_equal(c_out, out)
    jax.tree.map(np.testing.assert_array_equal, c_averages, averages)
    flat = lambda quant: ravel_pytree(grads(step, quant))[0]
    exact = flat(False)
    errors = {bits: float(jnp.linalg.norm(flat(NEAREST[bits]) - exact) / jnp.linalg.norm(exact)) for bits in (8, 4)}
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors
    kept = [r for r in memory.saved_residuals(c_loss, c_params)
            if np.prod(r.shape) >= np.prod(SHAPE[:-1]) and not r.source.startswith(("from the argument", "from a"))]
    assert all(r.dtype == quant.WORD for r in kept), kept
    assert ((*SHAPE[:-1], 16), quant.WORD) in [(r.shape, r.dtype) for r in kept]  # the normalized input


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_with_the_running_averages_it_is_flax_s_own_call(framework):
    """Evaluation (use_running_average, model.eval()): BatchNorm is affine in x; mesa leaves it
    to flax, so its scale and bias gradients (from its input, which flax keeps, and the second
    convolution's dx, which does not depend on what that keeps) are the plain model's; in
    training they come from the packed normalized input."""
    step = STEPS[framework]
    for train, same in ((False, True), (True, False)):
        got, want = (norm_grads(grads(step, quant, train)) for quant in (NEAREST[8], False))
        assert bool(jnp.allclose(got, want, rtol=4 * np.finfo(np.float32).eps, atol=0)) == same


def test_a_setting_mesa_does_not_compress_runs_exactly_under_compress_and_raises_in_a_mesa_layer():
    x = jnp.ones(SHAPE)
    masked = nn.BatchNorm(use_running_average=False)
    variables = mesa_jax.compress(masked).init(jax.random.key(0), x, mask=x > 0)
    assert "mesa" not in variables  # flax's own call: no statistics made
    with pytest.raises(NotImplementedError, match="BatchNorm at <root>: mask is not supported"):
        mnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x, mask=x > 0)


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_forward_and_running_averages_are_flax_s_in_every_dtype(x_dtype, dtype):
    """Linen's and NNX's BatchNorm (NNX promotes x with its running averages first), alone:
    output, its dtype and the updated running averages, bit for bit."""
    x = X.astype(x_dtype)
    linen = nn.BatchNorm(use_running_average=False, dtype=dtype)
    variables = linen.init(jax.random.key(0), x)
    want, state = linen.apply(variables, x, mutable=["batch_stats"])
    compressed = mesa_jax.compress(linen)
    got, c_state = compressed.apply(compressed.init(jax.random.key(0), x), x, mutable=["batch_stats", "mesa"])
    chex.assert_trees_all_equal((got, c_state["batch_stats"]), (want, state["batch_stats"]))
    plain, compressed = (nnx.BatchNorm(SHAPE[-1], dtype=dtype, rngs=nnx.Rngs(0)) for _ in range(2))
    mesa_jax.compress(compressed)
    chex.assert_trees_all_equal(compressed(x), plain(x))
    chex.assert_trees_all_equal(nnx.state(compressed, nnx.BatchStat), nnx.state(plain, nnx.BatchStat))
