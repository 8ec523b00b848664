"""Modern LM blocks under compress, written as flax's authors write them: RMSNorm, SiLU, a SwiGLU
MLP through mesa_jax's ``gated`` and a head tied to the embedding (``Embed.attend``), in Linen
and NNX: the forward is the original's bit for bit, the gradient error is first order in the
quantization step, and what is kept is uint8 codes, each activation once."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import mesa_jax
from mesa_jax import QuantConfig, memory
from mesa_jax import nn as mnn
from mesa_jax import nnx as mnnx

V, C, H = 40, 16, 24  # vocabulary, width, SwiGLU hidden width
B, T = 2, 6
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 0, V)


class LinenLM(nn.Module):
    """Embedding, RMSNorm, a SwiGLU MLP, a SiLU branch (jax.nn.swish), RMSNorm, the tied head."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(V, C)
        x = embed(tokens)
        y = nn.RMSNorm()(x)
        gate, up = nn.Dense(H, use_bias=False)(y), nn.Dense(H, use_bias=False)(y)
        x = x + nn.Dense(C, use_bias=False)(mnn.gated(gate, up))
        x = x + nn.Dense(C)(jax.nn.swish(nn.Dense(C)(x)))
        return embed.attend(nn.RMSNorm()(x))


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, C, rngs=rngs)
        self.norm, self.final_norm = nnx.RMSNorm(C, rngs=rngs), nnx.RMSNorm(C, rngs=rngs)
        self.gate, self.up = (nnx.Linear(C, H, use_bias=False, rngs=rngs) for _ in range(2))
        self.down = nnx.Linear(H, C, use_bias=False, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(C, C, rngs=rngs), nnx.Linear(C, C, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        y = self.norm(x)
        x = x + self.down(mnnx.gated(self.gate(y), self.up(y)))
        x = x + self.fc2(nnx.silu(self.fc1(x)))
        return self.embed.attend(self.final_norm(x))


def objective(logits):
    return jnp.sum(jnp.cos(logits) * logits)


def relative_error(got, want):
    a, b = ravel_pytree(got)[0], ravel_pytree(want)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def float_activations(loss, *args):
    """Float residuals of ``loss`` (a sum of the logits: it keeps nothing itself) as large as the
    smallest activation ([B, T, C]) that are not arguments."""
    kept = memory.saved_residuals(loss, *args)
    return [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and r.nbytes >= B * T * C * 4
            and "argument" not in r.source], kept


def test_silu_s_names_are_one_function():
    assert jax.nn.swish is jax.nn.silu and nn.silu is jax.nn.silu and nnx.silu is jax.nn.silu


def test_linen_block_is_exact_keeps_codes_once_and_its_error_is_first_order():
    model = LinenLM()
    variables = jax.jit(mesa_jax.compress(model).init)(jax.random.key(1), TOKENS)
    # the functions' statistics sit in the module that calls them; the Dense layers after a norm,
    # the gated product and SiLU keep nothing of their own
    assert set(variables["mesa"]) == {"RMSNorm_0", "RMSNorm_1", "gated_0_gate", "gated_0_up", "Dense_4", "silu_0"}
    want = jax.jit(model.apply)({"params": variables["params"]}, TOKENS)

    def grads(bits):
        compressed = mesa_jax.compress(model, QuantConfig(bits=bits))

        def loss(params):
            logits, _ = compressed.apply({**variables, "params": params}, TOKENS, mutable=["mesa"])
            return objective(logits), logits

        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"]), compressed

    exact = jax.jit(jax.grad(lambda p: objective(model.apply({"params": p}, TOKENS))))(variables["params"])
    (g8, logits), compressed = grads(8)
    (g4, _), _ = grads(4)
    np.testing.assert_array_equal(logits, want)
    errors = relative_error(g8, exact), relative_error(g4, exact)
    assert 0 < errors[0] <= 2 * (15 / 255) * errors[1], errors
    floats, kept = float_activations(lambda p: jnp.sum(compressed.apply({**variables, "params": p}, TOKENS,
                                                                        mutable=["mesa"])[0]), variables["params"])
    assert floats == []
    codes = sorted(r.shape for r in kept if r.dtype == jnp.uint8)  # norms (2), fc1's and SiLU's inputs, gate, up
    assert codes == sorted([(B, T, C)] * 4 + [(B, T, H)] * 2), codes


def test_nnx_block_is_exact_keeps_codes_once_and_statistics_are_mesa_stats():
    plain, model = NnxLM(nnx.Rngs(1)), mesa_jax.compress(NnxLM(nnx.Rngs(1)))
    run = nnx.jit(lambda m, t: m(t))
    np.testing.assert_array_equal(run(model, TOKENS), run(plain, TOKENS))
    stats = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, mnnx.MesaStat))}
    assert {"norm/normalized", "final_norm/normalized", "gated_0_gate", "gated_0_up", "silu_0"} <= stats, stats

    grads = nnx.jit(lambda m: nnx.grad(lambda m: objective(m(TOKENS)))(m))
    assert relative_error(nnx.to_pure_dict(grads(model)), nnx.to_pure_dict(grads(plain))) < 0.05
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    floats, _ = float_activations(lambda p, r: jnp.sum(nnx.merge(graphdef, p, r, copy=True)(TOKENS)), params, rest)
    assert floats == []


def test_rms_norm_then_dense_keeps_one_copy_and_the_row_rstd():
    class NormDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(H)(nn.RMSNorm()(x))

    x = jax.random.normal(jax.random.key(2), (B, T, C))
    model = mesa_jax.compress(NormDense())
    variables = model.init(jax.random.key(3), x)
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, mutable=["mesa"])[0])
    kept = [r for r in memory.saved_residuals(loss, variables["params"]) if "argument" not in r.source]
    assert sorted((r.shape, str(r.dtype)) for r in kept if r.nbytes > 8) == [
        ((B, T, 1), "float32"), ((B, T, C), "uint8")]  # rstd, x * rstd: the Dense keeps nothing of its own


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_silu_gated_and_embed_layers_are_their_functions(framework):
    g, u = jax.random.normal(jax.random.key(4), (2, B, T, H))
    query = jax.random.normal(jax.random.key(5), (B, T, C))
    if framework == "linen":
        calls = {"silu": (mnn.SiLU(), (g,), jax.nn.silu(g)), "gated": (mnn.Gated(), (g, u), jax.nn.silu(g) * u)}
        for name, (layer, args, want) in calls.items():
            variables = layer.init(jax.random.key(0), *args)
            out, state = layer.apply(variables, *args, mutable=["mesa"])
            np.testing.assert_array_equal(out, want)
            assert set(state["mesa"]) == ({"inputs"} if name == "silu" else {"gate", "up"})
        embed = mnn.Embed(V, C)
        variables = embed.init(jax.random.key(0), query, method="attend")
        out, state = embed.apply(variables, query, method="attend", mutable=["mesa"])
        np.testing.assert_array_equal(out, nn.Embed(V, C).apply({"params": variables["params"]}, query,
                                                                method="attend"))
        assert set(state["mesa"]) == {"query"}
    else:
        np.testing.assert_array_equal(mnnx.SiLU()(g), jax.nn.silu(g))
        np.testing.assert_array_equal(mnnx.Gated()(g, u), jax.nn.silu(g) * u)
        embed, plain = mnnx.Embed(V, C, rngs=nnx.Rngs(0)), nnx.Embed(V, C, rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(embed.attend(query), plain.attend(query))
        np.testing.assert_array_equal(embed(TOKENS), plain(TOKENS))
        assert [k for k, _ in nnx.to_flat_state(nnx.state(embed, mnnx.MesaStat))] == [("query",)]
    with pytest.raises(ValueError, match="one shape"):
        (mnnx.Gated() if framework == "nnx" else mnn.Gated().bind({}))(g, u[..., :3])


def test_gated_outside_a_scope_is_the_plain_product():
    g, u = jax.random.normal(jax.random.key(6), (2, B, T, H))
    np.testing.assert_array_equal(mnn.gated(g, u), jax.nn.silu(g) * u)
    gelu = lambda t: jax.nn.gelu(t, approximate=True)
    np.testing.assert_array_equal(mnnx.gated(g, u, gelu), gelu(g) * u)
