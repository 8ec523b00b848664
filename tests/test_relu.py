"""ReLU under compress and as a layer: one bit per element kept, its derivative exact.

The models are written as flax's examples write a ReLU MLP (wmt's feed-forward block, the
MNIST classifier's hidden layer): ``nn.relu`` / ``nnx.relu`` between two dense layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mesa_jax
from mesa_jax import Policy, Rule, memory
from mesa_jax import nn as mnn
from mesa_jax import nnx as mnnx

SHAPE, HIDDEN = (2, 5, 8), 32


class FeedForward(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden)(x)
        h = nn.relu(h)
        return nn.Dense(x.shape[-1])(h)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + FeedForward(HIDDEN, name="mlp")(x)


class NnxFeedForward(nnx.Module):
    def __init__(self, features, hidden, rngs):
        self.fc1 = nnx.Linear(features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, features, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.mlp = NnxFeedForward(SHAPE[-1], HIDDEN, rngs)

    def __call__(self, x):
        return x + self.mlp(x)


def loss_and_model(framework, quant):
    """(loss(params, x), params, forward(x)) of the net, compressed with ``quant`` (False: as
    written); the loss is linear in the output, so that it keeps nothing of its own."""
    x, weights = jax.random.normal(jax.random.key(0), SHAPE), jax.random.normal(jax.random.key(2), SHAPE)
    if framework == "linen":
        model = LinenNet() if quant is False else mesa_jax.compress(LinenNet(), quant)
        variables = model.init(jax.random.key(1), x)

        def apply(params, x):
            state = {**variables, "params": params}
            return model.apply(state, x, mutable=["mesa"])[0] if "mesa" in variables else model.apply(state, x)

        return lambda p, x: jnp.sum(apply(p, x) * weights), variables["params"], lambda x: apply(variables["params"], x)
    model = NnxNet(nnx.Rngs(1))
    if quant is not False:
        mesa_jax.compress(model, quant)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    apply = lambda p, x: nnx.merge(graph, p, rest, copy=True)(x)
    return lambda p, x: jnp.sum(apply(p, x) * weights), params, lambda x: apply(params, x)


def fc1_bias_gradient(grads, framework):
    mlp = grads["mlp"]
    return mlp["Dense_0"]["bias"] if framework == "linen" else mlp["fc1"]["bias"][...]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_relu_between_dense_layers_keeps_bits_and_its_gradient_is_exact(framework):
    """The compressed MLP keeps fc1's input and fc2's (ReLU's output) as bytes and ReLU's sign as
    bits, no byte-sized mask and no float activation; the forward is flax's bit for bit, and
    fc1's bias gradient (fc2's dx, masked by ReLU) is the exact one: ReLU's backward is exact
    and fc2's dx does not depend on what fc2 kept."""
    x = jax.random.normal(jax.random.key(0), SHAPE)
    loss, params, forward = loss_and_model(framework, False)
    c_loss, c_params, c_forward = loss_and_model(framework, mesa_jax.QuantConfig())
    np.testing.assert_array_equal(c_forward(x), forward(x))
    want, got = (jax.jit(jax.grad(f))(p, x) for f, p in ((loss, params), (c_loss, c_params)))
    np.testing.assert_allclose(fc1_bias_gradient(got, framework), fc1_bias_gradient(want, framework),
                               rtol=4 * np.finfo(np.float32).eps, atol=0)
    kept = memory.saved_residuals(c_loss, c_params, x)
    activations = [(r.shape, r.dtype) for r in kept if np.prod(r.shape) > 1  # not a group's scale or shift
                   and not r.source.startswith(("from the argument", "from a constant"))]  # not params, weights
    assert sorted(activations, key=str) == sorted([(SHAPE, jnp.uint8), ((*SHAPE[:-1], HIDDEN), jnp.uint8),
                                                   ((*SHAPE[:-1], HIDDEN // 8), jnp.uint8)], key=str), kept


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_a_rule_names_relu_by_its_path_in_both_frameworks(framework):
    """``mlp/relu_0`` in Linen and NNX: a rule for it makes ReLU keep JAX's byte-sized mask; a
    rule matching no site raises."""
    x = jax.random.normal(jax.random.key(0), SHAPE)
    loss, params, _ = loss_and_model(framework, Policy(rules=[Rule("mlp/relu_0", ("relu",), None)]))
    assert any(r.dtype == jnp.bool_ for r in memory.saved_residuals(loss, params, x))
    with pytest.raises(ValueError, match="match no layer"):
        loss, params, forward = loss_and_model(framework, Policy(rules=[Rule("mlp/relu_1", ("relu",), None)]))
        forward(x)


@pytest.mark.parametrize("layer", [mnn.ReLU(), mnnx.ReLU(), mnnx.ReLU(quant=None)], ids=["linen", "nnx", "nnx-exact"])
def test_relu_layers_are_jax_s_relu(layer):
    x = jax.random.normal(jax.random.key(0), SHAPE).at[0, 0, 0].set(0.0)
    g = jax.random.normal(jax.random.key(1), SHAPE)
    apply = (lambda x: layer.apply({}, x)) if isinstance(layer, nn.Module) else layer
    for relu in (apply, jax.nn.relu):
        y, vjp = jax.vjp(relu, x)
        np.testing.assert_array_equal(y, jax.nn.relu(x))
        np.testing.assert_array_equal(vjp(g)[0], jax.vjp(jax.nn.relu, x)[1](g)[0])
