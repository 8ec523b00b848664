"""mesa_jax.compress on models mesa_jax did not write (tests/stock_models.py)."""

import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import stock_models
from layer_cases import TWIN_IDS, TWINS, one_per_handler
from mesa_jax import Policy, QuantConfig, compress, memory, policy, quant
from mesa_jax import uncompressed

IMAGES = (2, 16, 16, 3)
TOKENS = (2, 7, 16)
MODELS = {  # name: (model, input shape, extra apply arguments)
    "cnn": (stock_models.CNN(), IMAGES, {}),
    "encoder": (stock_models.Encoder(), TOKENS, {"train": False}),
    "scanned_vit": (stock_models.ScannedViT(), IMAGES, {"train": False}),
}


def inputs(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def init(model, x):
    return jax.jit(model.init)(jax.random.key(1), x)


def loss_and_grads(model, variables, x, **kwargs):
    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, mutable=["mesa"], **kwargs)
        return jnp.sum(out * jnp.cos(out))

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


def stats_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, quant.Stats))


@pytest.mark.parametrize("_, name, kwargs, shape", one_per_handler(TWINS), ids=TWIN_IDS)
def test_every_stock_layer_alone_keeps_its_params_forward_and_packs_its_input(_, name, kwargs, shape):
    layer = getattr(nn, name)(**kwargs)
    x = inputs(shape)
    original = init(layer, x)
    variables = init(compress(layer), x)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, original["params"])
    np.testing.assert_array_equal(compress(layer).apply({**original, "mesa": variables["mesa"]}, x),
                                  layer.apply(original, x))
    kept = kept_by(compress(layer), x)
    assert any(r.dtype == quant.WORD for r in kept)
    assert all(not jnp.issubdtype(r.dtype, jnp.floating) or np.prod(r.shape) < x.size // 4 for r in kept), kept


@pytest.mark.parametrize("name", [n if n != "scanned_vit" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_params_tree_and_forward_are_the_original_s(name):
    model, shape, kwargs = MODELS[name]
    x = inputs(shape)
    original = init(model, x)
    compressed = compress(model)
    variables = init(compressed, x)
    spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert spec(variables["params"]) == spec(original["params"])
    assert stats_leaves(variables["mesa"])
    want = jax.jit(functools.partial(model.apply, **kwargs))(original, x)
    np.testing.assert_array_equal(jax.jit(functools.partial(compressed.apply, **kwargs))(
        {**original, "mesa": variables["mesa"]}, x), want)
    np.testing.assert_array_equal(jax.jit(functools.partial(compressed.apply, **kwargs))(original, x), want)
    loss_c, _ = loss_and_grads(compressed, {**original, "mesa": variables["mesa"]}, x, **kwargs)
    loss_o, _ = loss_and_grads(model, original, x, **kwargs)
    assert float(loss_c) == float(loss_o)  # the forward under autodiff too


@pytest.mark.parametrize("name", [n if n == "encoder" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_gradient_error_scales_with_the_step(name):  # scanned_vit: three compiled gradients, about 12 s cold
    """First order in the step: 15/255 of the 4-bit error at 8 bits (a factor 2 for the noise draws)."""
    model, shape, kwargs = MODELS[name]
    x = inputs(shape)
    errors = gradient_errors(model, init(model, x), x, **kwargs)
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


def gradient_errors(model, original, x, **kwargs):
    """{bits: relative error of the compressed model's parameter gradient} for int8 and int4."""
    _, exact = loss_and_grads(model, original, x, **kwargs)
    errors = {}
    for bits in (8, 4):
        compressed = compress(model, QuantConfig(bits=bits))
        variables = {**original, "mesa": init(compressed, x)["mesa"]}
        _, got = loss_and_grads(compressed, variables, x, **kwargs)
        a, b = ravel_pytree(got)[0], ravel_pytree(exact)[0]
        errors[bits] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    return errors


def test_one_outlier_batch_does_not_capture_the_running_ranges():
    """Statistics warmed on three batches, then one batch with an element of 1e6 (or 3e38):
    every span grows at most 1 + 2 GROWTH (1 - decay) times (1.2x), so the next clean batch's
    gradient error grows at most like the step (it was 0.54 in cosine before the update was
    clipped); an all-NaN batch is no observation at all."""
    model, shape, kwargs = MODELS["encoder"]
    config = QuantConfig(stochastic=False)
    compressed = compress(model, config)
    batches = [inputs(shape, seed) for seed in range(5)]
    variables = init(compressed, batches[0])
    params = variables["params"]
    observe = jax.jit(lambda mesa, x: compressed.apply({"params": params, "mesa": mesa}, x, mutable=["mesa"],
                                                        **kwargs)[1]["mesa"])
    warm = variables["mesa"]
    for x in batches[:3]:
        warm = observe(warm, x)
    _, exact = loss_and_grads(model, {"params": params}, batches[4], **kwargs)

    def error_and_cosine(mesa):
        _, got = loss_and_grads(compressed, {"params": params, "mesa": mesa}, batches[4], **kwargs)
        a, b = ravel_pytree(got)[0], ravel_pytree(exact)[0]
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)), float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))

    before, _ = error_and_cosine(warm)
    bound = 1 + 2 * quant.GROWTH * (1 - config.ema_decay)
    for outlier in (1e6, 3e38):
        after = observe(warm, batches[3].at[0, 0, 0].set(outlier))
        growth = max(float(jnp.max(a.span / b.span)) for a, b in zip(stats_leaves(after), stats_leaves(warm)))
        assert growth <= bound * (1 + 1e-6), growth
        error, cosine = error_and_cosine(after)
        assert error <= growth * before * 1.05 and cosine >= 0.99, (outlier, error, before, cosine)
    nan_first = observe(variables["mesa"], jnp.full(shape, jnp.nan))
    for a, b in zip(jax.tree.leaves(nan_first), jax.tree.leaves(variables["mesa"])):
        np.testing.assert_array_equal(a, b)  # count 0 still: the next batch is the first observation


def kept_by(model, x, **kwargs):
    variables = init(model, x)
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, mutable=["mesa"], **kwargs)[0])
    return [r for r in memory.saved_residuals(loss, variables["params"]) if "argument" not in r.source]


def test_a_transformer_keeps_no_float_activation():
    """Everything the encoder's backward needs is reached: no float residual as large as a
    token row of the batch [B, N] survives (the original keeps dozens of [B, N, C] ones)."""
    model, shape, kwargs = MODELS["encoder"]
    x = inputs(shape)
    floats = lambda kept: [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) > x.size // x.shape[-1]]
    assert len(floats(kept_by(model, x, **kwargs))) > 10
    assert floats(kept_by(compress(model), x, **kwargs)) == []


def test_activations_a_setup_assigns_are_reached():
    """A setup-style module's activations (held as attributes ``setup`` assigned, one in a tuple)
    are sites like those of compact modules, called from any of its methods: GELU's input,
    ReLU's signs and softmax's output are kept, packed; nothing in float."""
    model, x = stock_models.SetupMlp(), inputs(TOKENS)
    variables = init(compress(model), x)
    assert {"gelu_0", "softmax_0"} <= set(variables["mesa"])
    kept = kept_by(compress(model), x)
    assert sum("keep_signs" in r.source and r.dtype == quant.WORD for r in kept) == 1
    assert not [r for r in kept if not r.dtype == quant.WORD and np.prod(r.shape) >= x.size]


def test_a_cnn_keeps_its_convolution_and_dense_inputs_packed_and_relu_s_signs_as_bits():
    """Conv and Dense inputs are packed, a byte per element; each ReLU keeps one bit per
    element (an eighth of its channels in bytes), not JAX's boolean mask."""
    model, shape, _ = MODELS["cnn"]
    kept = kept_by(compress(model), inputs(shape))
    packed = [r for r in kept if r.dtype == quant.WORD and "keep_signs" not in r.source]
    signs = [r.shape for r in kept if "keep_signs" in r.source and r.dtype == quant.WORD]
    assert len(packed) == 4  # two Conv, two Dense
    assert signs == [(2, 16, 16, 32 // 8), (2, 8, 8, 64 // 8), (2, 256 // 8)]
    assert not any(r.dtype == jnp.bool_ for r in kept)


@pytest.mark.slow  # repeated coverage: kept out of the default run
def test_training_from_a_params_only_checkpoint_creates_the_statistics():
    model, shape, kwargs = MODELS["encoder"]
    x = inputs(shape)
    params = init(model, x)["params"]  # a checkpoint of the original model
    compressed = compress(model)
    _, state = compressed.apply({"params": params}, x, mutable=["mesa"], **kwargs)
    assert {int(s.count) for s in stats_leaves(state["mesa"])} == {1}
    _, state = compressed.apply({"params": params, **state}, x, mutable=["mesa"], **kwargs)
    assert {int(s.count) for s in stats_leaves(state["mesa"])} == {2}


@pytest.mark.slow  # repeated coverage: kept out of the default run
def test_training_mode_with_dropout_matches_the_original():
    model, shape, _ = MODELS["encoder"]
    x = inputs(shape)
    original = init(model, x)
    compressed = compress(model)
    rngs = {"dropout": jax.random.key(7)}
    want = model.apply(original, x, train=True, rngs=rngs)
    got, _ = compressed.apply({**original, **init(compressed, x)}, x, train=True, rngs=rngs, mutable=["mesa"])
    np.testing.assert_array_equal(got, want)


def test_differentiating_a_scanned_model_keeps_the_statistics_where_init_put_them():
    """JAX traces the custom_vjp forwards of a differentiated scan body later, still inside
    compress's scope: mesa's own ops must not be intercepted then (they were, at the root)."""
    model, shape, kwargs = MODELS["scanned_vit"]
    x = inputs(shape)
    compressed = compress(model)
    variables = init(compressed, x)

    def loss(params):
        out, state = compressed.apply({**variables, "params": params}, x, mutable=["mesa"], **kwargs)
        return jnp.sum(out), state

    _, state = jax.grad(loss, has_aux=True)(variables["params"])
    assert jax.tree.structure(state["mesa"]) == jax.tree.structure(variables["mesa"])


def test_scan_made_inside_the_model_carries_the_statistics():
    """ScannedViT's nn.scan says variable_axes={"params": 0}: compress adds "mesa", stacked."""
    model, shape, _ = MODELS["scanned_vit"]
    variables = init(compress(model), inputs(shape))
    block = variables["mesa"]["encoderblock"]
    assert block["LayerNorm_1"]["normalized"].lo.shape == (model.depth, 1)
    assert "Dense_0" not in block  # its input is LayerNorm_1's output: LayerNorm_1's residual stands for it
    assert block["MultiHeadDotProductAttention_0"]["q"].lo.shape == (model.depth, model.num_heads)


ScannedAtDefinition = nn.scan(stock_models.Encoder1DBlock, variable_axes={"params": 0},
                              split_rngs={"params": True}, in_axes=nn.broadcast, length=2)


class PrebuiltScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ScannedAtDefinition(32, 2)(x, True)[0]


def test_a_lift_built_outside_the_model_that_omits_mesa_says_what_to_add():
    with pytest.raises(ValueError, match=r"variable_axes=\{'params': 0, 'mesa': 0\}"):
        compress(PrebuiltScan()).init(jax.random.key(0), inputs(TOKENS))


def test_vmapped_layers_and_a_shared_module():
    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.vmap(nn.Dense, variable_axes={"params": 0, "mesa": 0}, split_rngs={"params": True},
                            in_axes=None, out_axes=0, axis_size=3)(4)
            shared = nn.Dense(4, name="shared")
            return dense(x).sum(0) + shared(x) + shared(2 * x)

    x = inputs((2, 8))
    variables = init(compress(Ensemble()), x)
    assert variables["mesa"]["VmapDense_0"]["inputs"].lo.shape == (3, 1)
    assert variables["mesa"]["shared"]["inputs"].lo.shape == (1,)
    original = init(Ensemble(), x)
    np.testing.assert_array_equal(compress(Ensemble()).apply({**original, "mesa": variables["mesa"]}, x),
                                  Ensemble().apply(original, x))


def test_policy_overrides_by_path_and_typos_raise_after_init():
    model, shape, kwargs = MODELS["encoder"]
    x = inputs(shape)
    policy = Policy(QuantConfig(), overrides={"EncoderBlock_0/*": None, "encoder_norm": None})
    mesa = init(compress(model, policy), x)["mesa"]
    assert "EncoderBlock_0" not in mesa and "encoder_norm" not in mesa and "EncoderBlock_1" in mesa
    gelu_only = init(compress(model, Policy(kinds=("gelu",))), x)["mesa"]
    assert list(gelu_only["EncoderBlock_0"]["MlpBlock_0"]) == ["gelu_0"]
    with pytest.raises(ValueError, match="match no layer"):
        init(compress(model, Policy(overrides={"EncoderBlok_*": None})), x)


def test_a_method_that_reaches_part_of_the_model_is_not_checked_against_the_whole_policy():
    class AutoEncoder(nn.Module):
        def setup(self):
            self.encoder, self.decoder = nn.Dense(4), nn.Dense(8)

        def __call__(self, x):
            return self.decoder(self.encode(x))

        def encode(self, x):
            return nn.gelu(self.encoder(x))

    x = inputs((2, 8))
    model = compress(AutoEncoder(), Policy(overrides={"decoder": None}), methods=("__call__", "encode"))
    variables = init(model, x)  # the override matched at init
    assert "decoder" not in variables["mesa"] and "encoder" in variables["mesa"]
    np.testing.assert_array_equal(model.apply(variables, x, method="encode"),
                                  AutoEncoder().apply({"params": variables["params"]}, x, method="encode"))


def test_interception_does_not_leak_to_other_models_or_threads():
    """While a compressed model is traced, another thread runs a plain model: it keeps its
    floats and gets no statistics; after the call everything is as before."""
    plain, shape, kwargs = MODELS["encoder"]
    x = inputs(shape)
    params = init(plain, x)["params"]
    plain_loss = lambda p: jnp.sum(plain.apply({"params": p}, x, **kwargs))
    before = memory.saved_residuals(plain_loss, params)
    seen = {}

    def other_thread():
        seen["residuals"] = memory.saved_residuals(plain_loss, params)
        seen["variables"] = plain.init(jax.random.key(1), x, **kwargs)

    class CallsOut(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.gelu(nn.Dense(16)(x))  # compressed here...
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()  # ...while the other thread runs the plain model
            return y

    compress(CallsOut()).init(jax.random.key(0), x)
    assert [(r.shape, r.dtype) for r in seen["residuals"]] == [(r.shape, r.dtype) for r in before]
    assert "mesa" not in seen["variables"]
    assert jax.nn.gelu is nn.gelu and jax.nn.gelu.__module__ == "jax._src.nn.functions"
    assert [(r.shape, r.dtype) for r in memory.saved_residuals(plain_loss, params)] == [
        (r.shape, r.dtype) for r in before]


def test_compress_of_a_compressed_model_and_back():
    model = stock_models.CNN()
    once, twice = compress(model), compress(compress(model), QuantConfig(bits=4))
    assert type(twice).__mro__[1] is type(model) and type(once).__name__ == "CNN"
    assert type(uncompressed(twice)) is type(model)
    with pytest.raises(TypeError, match="flax.linen or flax.nnx Module"):
        compress(lambda x: x)
    with pytest.raises(ValueError, match="no method 'encode'"):
        compress(model, methods=("encode",))


def test_jax_dot_product_attention_called_in_a_module_is_the_fused_op():
    """jax.nn.dot_product_attention inside a module: the same forward, q, k, v packed per head
    (statistics named after the call), no N x N residual, the bias's gradient within the step."""
    model, x = stock_models.WindowAttention(), inputs((2, 49, 24))
    original = init(model, x)
    variables = init(compress(model), x)
    shapes = {name: s.lo.shape for name, s in variables["mesa"].items() if isinstance(s, quant.Stats)}
    assert shapes == {f"dot_product_attention_0_{t}": (3,) for t in "qkv"}
    np.testing.assert_array_equal(jax.jit(compress(model).apply)(variables, x), jax.jit(model.apply)(original, x))
    floats = [r for r in kept_by(compress(model), x) if jnp.issubdtype(r.dtype, jnp.floating)]
    # the bias [1, H, N, N] (a parameter) is kept; nothing as large as the probabilities [B, H, N, N]
    assert all(np.prod(r.shape) < 2 * 3 * 49 * 49 for r in floats), floats
    _, exact = loss_and_grads(model, original, x)
    errors = {}
    for bits in (8, 4):
        _, got = loss_and_grads(compress(model, QuantConfig(bits=bits)), {**variables, "params": original["params"]}, x)
        errors[bits] = float(jnp.linalg.norm(got["relative_bias"] - exact["relative_bias"]))
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


@pytest.mark.parametrize("name, products", [("EinsumAttention", "einsum"), ("MatmulAttention", "matmul")])
def test_attention_written_by_hand_keeps_its_products_operands_packed_per_head(name, products):
    """jnp.einsum / jnp.matmul of two activations inside a module (attention by hand): the
    "matmul" kind, q, k and v packed per head, the probabilities once (softmax's copy), the
    same forward, the gradient error first order in the step."""
    model, x = getattr(stock_models, name)(), inputs(TOKENS[:2] + (24,))
    original = init(model, x)
    variables = init(compress(model), x)
    shapes = {n: s.lo.shape for n, s in variables["mesa"].items() if n.startswith((products, "softmax"))}
    assert shapes == {f"{products}_0_a": (3,), f"{products}_0_b": (3,), f"{products}_1_b": (3,),  # not 1_a: shared
                      "softmax_0": (3,)}  # per head wherever the scores keep them: any sequence length fits
    np.testing.assert_array_equal(jax.jit(compress(model).apply)(variables, x), jax.jit(model.apply)(original, x))
    shorter = x[:, :4]
    np.testing.assert_array_equal(compress(model).apply(variables, shorter, mutable=["mesa"])[0],
                                  model.apply(original, shorter))
    floats = lambda kept: [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= x.size
                           and "_where" not in r.source]  # jnp.where's zero tangent: a constant, not memory
    assert len(floats(kept_by(model, x))) >= 4 and floats(kept_by(compress(model), x)) == []
    errors = gradient_errors(model, original, x)
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


def test_einsums_with_the_module_s_weights_and_flax_s_own_einsums_run_exactly():
    """An einsum with a parameter (a dense layer, experts' weights by hand) is no product of
    activations; flax's attention left exact by the policy keeps its own einsums exact (they
    keep q, k and v, [B, L, H, D], in float as the original does)."""
    x = inputs((2, 7, 24))
    for model, quant_, kept_shape in ((stock_models.EinsumDense(), QuantConfig(), x.shape),
                                      (nn.MultiHeadDotProductAttention(3), Policy(by_kind={"attention": None}),
                                       (2, 7, 3, 8))):
        original = init(model, x)
        variables = init(compress(model, quant_), x)
        assert not [n for n in jax.tree_util.tree_flatten_with_path(variables.get("mesa", {}))[0]
                    if "einsum" in jax.tree_util.keystr(n[0])]
        np.testing.assert_array_equal(compress(model, quant_).apply(variables, x), model.apply(original, x))
        kept = [str(r.dtype) for r in kept_by(compress(model, quant_), x) if r.shape == kept_shape]
        assert len(kept) >= 2 and set(kept) == {"float32"}, kept


def test_gated_mlps_written_by_hand_keep_gate_and_up_packed_once():
    """``silu(g) * u``, ``u * gelu(g)`` and ``u * relu(x)`` inside a module are "gated" sites: g
    and u packed (g's codes shared with the activation's, which is then unused), the down
    projection keeping nothing, nothing float, the same forward, the gradient error first
    order in the step."""
    model, x = stock_models.GluMlp(), inputs(TOKENS)
    original = init(model, x)
    variables = init(compress(model), x)
    assert {f"gated_{i}_{t}" for i in (0, 1, 2) for t in ("gate", "up")} <= set(variables["mesa"])
    assert not {"down", "down2"} & set(variables["mesa"])  # their input is a gated product's output
    np.testing.assert_array_equal(jax.jit(compress(model).apply)(variables, x), jax.jit(model.apply)(original, x))
    kept = kept_by(compress(model), x)
    assert sorted(r.shape for r in kept if r.dtype == quant.WORD) == [(2, 7, 16)] * 3 + [(2, 7, 32)] * 4
    # x (the first projections', relu's), g, u, the second projections' input, g2, u2, down2's output
    assert not [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= x.size]
    errors = gradient_errors(model, original, x)
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors
    without = compress(model, Policy(QuantConfig(), kinds=tuple(k for k in policy.KINDS if k != "gated")))
    assert len([r for r in kept_by(without, x) if jnp.issubdtype(r.dtype, jnp.floating)
                and np.prod(r.shape) >= x.size]) == 5  # act(g) and u of both GLUs, relu(x): JAX's products
