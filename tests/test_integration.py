"""One entry point for Linen and NNX models: mesa_jax.compress, its sites and its Policy rules.

Tiny models, each compiled once: the framework-level behaviours (which sites exist, what they
are called, which training patterns work), not the numerics (test_nn, test_nnx, test_ops)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mesa_jax
from mesa_jax import Policy, QuantConfig, Rule, uncompressed
from mesa_jax import nnx as mnnx

X = jax.random.normal(jax.random.key(0), (2, 5, 8))


class LinenRoot(nn.Module):
    """Functions called at the model's root, twice."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="fc")(jax.nn.gelu(jax.nn.gelu(x)))


class NnxRoot(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc(jax.nn.gelu(jax.nn.gelu(x)))


def nnx_stats(model):
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, mnnx.MesaStat))}


def test_root_level_functions_have_the_same_site_paths_in_linen_and_nnx():
    """``gelu_0``, ``gelu_1`` at the root in both: a rule on ``gelu_1`` is valid and applies in both."""
    policy = Policy(QuantConfig(), overrides={"gelu_1": None})
    variables = mesa_jax.compress(LinenRoot(), policy).init(jax.random.key(1), X)
    model = mesa_jax.compress(NnxRoot(nnx.Rngs(1)), policy)
    model(X)
    for names in (set(variables["mesa"]), set(nnx_stats(model))):
        assert "gelu_0" in names and "gelu_1" not in names, names
    chex.assert_shape([variables["mesa"]["gelu_0"].lo, nnx_stats(model)["gelu_0"].lo], (1,))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_a_rule_that_matches_nothing_raises_after_the_first_pass(framework):
    policy = Policy(rules=[Rule("fc2", config=None)])
    with pytest.raises(ValueError, match=r"\['fc2'\] match no layer"):
        if framework == "linen":
            mesa_jax.compress(LinenRoot(), policy).init(jax.random.key(1), X)
        else:
            mesa_jax.compress(NnxRoot(nnx.Rngs(1)), policy)(X)


def test_one_compress_for_both_frameworks_and_uncompressed():
    """Linen: a new model, the original untouched. NNX: the same object, changed in place.
    ``uncompressed`` gives back flax's own computation in both."""
    linen = LinenRoot()
    compressed = mesa_jax.compress(linen)
    assert compressed is not linen and type(linen) is LinenRoot and isinstance(compressed, LinenRoot)
    variables = compressed.init(jax.random.key(1), X)
    chex.assert_trees_all_equal(compressed.apply(variables, X), linen.apply({"params": variables["params"]}, X))
    assert type(uncompressed(compressed)) is LinenRoot

    model = NnxRoot(nnx.Rngs(1))
    want = model(X)
    params = nnx.state(model, nnx.Param)
    assert mesa_jax.compress(model) is model and isinstance(model, NnxRoot) and type(model) is not NnxRoot
    chex.assert_trees_all_equal(model(X), want)
    assert uncompressed(model) is model and type(model) is NnxRoot and not nnx_stats(model)
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), params)


class Hybrid(nnx.Module):
    """A conv/attention hybrid as NNX users write one: Conv + BatchNorm stem, a block list
    (nnx.List) of LayerNorm, attention, Dropout and an MLP, a pooled head."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([nnx.LayerNorm(8, rngs=rngs), nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)])
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.gelu, nnx.Linear(16, 8, rngs=rngs))
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, images):
        x = nnx.relu(self.norm(self.stem(images)))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, H * W, C]
        norm, attn = self.blocks
        x = x + self.drop(attn(norm(x)))
        x = x + self.mlp(x)
        return self.head(x.mean(axis=1))


IMAGES = jax.random.normal(jax.random.key(2), (4, 4, 4, 3))
LABELS = jnp.arange(4) % 3


def loss_fn(model, images, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()


def test_an_nnx_model_with_batch_norm_dropout_and_lists_trains_with_nnx_jit():
    """The canonical NNX step (nnx.jit, nnx.value_and_grad, nnx.Optimizer): BatchNorm's and
    mesa's statistics both update in training, neither in evaluation."""
    model = mesa_jax.compress(Hybrid(nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, IMAGES, LABELS)) for _ in range(3)]
    assert losses[-1] < losses[0] and np.isfinite(losses).all()
    stats = nnx_stats(model)
    assert {"stem/inputs", "blocks/1/q", "mlp/layers/0/inputs", "mlp/gelu_0"} <= set(stats)
    assert int(stats["blocks/0/normalized"].count) == 3
    model.eval()
    before = nnx.state(model, nnx.Not(nnx.Param))
    nnx.jit(loss_fn)(model, IMAGES, LABELS)
    chex.assert_trees_all_equal(nnx.state(model, nnx.Not(nnx.Param)), before)
    assert model.norm.use_running_average and model.mlp.layers[0].use_running_average


def test_flax_s_functional_pattern_trains_a_compressed_nnx_model():
    """nnx.split outside, nnx.merge and nnx.grad inside jax.jit: the state that comes out is the
    state that goes in. Statistics of functions called inside modules (``mlp/gelu_0``) are made
    at the model's first call, so the model is called once before it is split."""
    model = mesa_jax.compress(Hybrid(nnx.Rngs(0)))
    model(IMAGES)  # makes mlp/gelu_0
    graphdef, state = nnx.split(model)
    tx = optax.sgd(1e-2)
    opt_state = tx.init(nnx.state(model, nnx.Param))

    @jax.jit
    def step(state, opt_state, images, labels):
        model = nnx.merge(graphdef, state)
        grads = nnx.grad(loss_fn)(model, images, labels)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return nnx.state(model), opt_state

    first, opt_state = step(state, opt_state, IMAGES, LABELS)
    second, _ = step(first, opt_state, IMAGES, LABELS)
    chex.assert_trees_all_equal_structs(second, state)
    count = lambda s: int(s["blocks"][1]["q"].get_value().count)
    assert count(state) == 1 and count(first) == 2 and count(second) == 3
