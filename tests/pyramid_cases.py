"""Checks Swin and PVT share: the compressed model's forward is the baseline's, its gradient
error shrinks with the quantization step."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mesa_jax import QuantConfig


def init(model, images):
    return jax.jit(model.init)(jax.random.key(1), images)


def assert_forward_is_the_baseline_s(base, mesa, images):
    base_vars, variables = init(base, images), init(mesa, images)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, base_vars["params"])
    variables = {**variables, "params": base_vars["params"]}
    np.testing.assert_array_equal(jax.jit(mesa.apply)(variables, images), jax.jit(base.apply)(base_vars, images))


def assert_gradient_error_scales_with_the_step(tiny, images, **config):
    """8-bit error <= 2 x 15/255 x the 4-bit one, at the baseline's parameters (``tiny(quant)`` builds the model)."""
    base = tiny(quant=None)
    base_vars = init(base, images)

    def grads(model, variables):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, images, mutable=["mesa"])
            return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])

        return ravel_pytree(jax.jit(jax.grad(loss))(variables["params"]))[0]

    exact = grads(base, base_vars)
    errors = {}
    for bits in (8, 4):
        mesa = tiny(quant=QuantConfig(bits=bits, **config))
        variables = {**init(mesa, images), "params": base_vars["params"]}
        errors[bits] = float(jnp.linalg.norm(grads(mesa, variables) - exact) / jnp.linalg.norm(exact))
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors
