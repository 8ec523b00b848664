"""mesa_jax.nnx: NNX layers that are their namesakes, and in-place compression of NNX models."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import mesa_jax
import mesa_jax.nn as mnn
from mesa_jax import Policy, QuantConfig, memory
from mesa_jax import nnx as mnnx

from benchmarks import nnx_vit

NEAREST = QuantConfig(stochastic=False)

# (id, class name in flax.nnx and mesa_jax.nnx, positional and keyword arguments, input shape)
NNX_TWINS = [
    ("linear", "Linear", (8, 6), dict(), (2, 5, 8)),
    ("linear_nobias", "Linear", (8, 6), dict(use_bias=False), (2, 5, 8)),
    ("linear_general_heads", "LinearGeneral", (8, (2, 3)), dict(), (2, 5, 8)),
    ("linear_general_merge", "LinearGeneral", ((2, 4), 6), dict(axis=(-2, -1)), (2, 5, 2, 4)),
    ("einsum", "Einsum", ("bnc,chd->bnhd", (8, 2, 3)), dict(bias_shape=(2, 3)), (2, 5, 8)),
    ("conv_patch", "Conv", (3, 4), dict(kernel_size=(2, 2), strides=(2, 2), padding="VALID"), (2, 6, 6, 3)),
    ("conv_same", "Conv", (4, 4), dict(kernel_size=(3, 3), feature_group_count=2), (2, 6, 6, 4)),
    ("layer_norm", "LayerNorm", (8,), dict(), (2, 5, 8)),
    ("layer_norm_slow_variance", "LayerNorm", (8,), dict(use_fast_variance=False, epsilon=1e-5), (2, 5, 8)),
    ("rms_norm", "RMSNorm", (8,), dict(), (2, 5, 8)),
    ("rms_norm_bfloat16", "RMSNorm", (8,), dict(dtype=jnp.bfloat16), (2, 5, 8)),  # flax promotes the scale first
    ("layer_norm_bfloat16", "LayerNorm", (8,), dict(dtype=jnp.bfloat16), (2, 5, 8)),
    ("attention", "MultiHeadAttention", (2, 8), dict(decode=False), (2, 5, 8)),
]
IDS = [t[0] for t in NNX_TWINS]
# the gradient check on one layer of each class in the default run, the variants under -m slow
GRADIENT_TWINS = [t if t[0] in ("linear", "einsum", "conv_patch", "layer_norm", "attention")
                  else pytest.param(*t, marks=pytest.mark.slow) for t in NNX_TWINS]


def twins(name, args, kwargs, **extra):
    return (getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(1)),
            getattr(mnnx, name)(*args, **kwargs, **extra, rngs=nnx.Rngs(1)))


run = nnx.jit(lambda model, x: model(x))  # eager NNX calls of a whole model dispatch op by op: slow


def pure(module, *filters):
    return nnx.to_pure_dict(nnx.state(module, *filters))


@nnx.jit
def grads(module, x):
    """d/d(params, x) of a fixed nonlinear function of the output, as a training step takes it."""
    loss = lambda module, x: jnp.sum(jnp.cos(module(x)) * module(x))
    return nnx.grad(loss, argnums=(0, 1))(module, x)


def relative_error(got, want):
    a, b = ravel_pytree(got)[0], ravel_pytree(want)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("_, name, args, kwargs, shape", NNX_TWINS, ids=IDS)
def test_params_and_forward_are_nnx_s(_, name, args, kwargs, shape, key):
    plain, mesa = twins(name, args, kwargs)
    x = jax.random.normal(key, shape)
    assert jax.tree.map(jnp.shape, pure(plain, nnx.Param)) == jax.tree.map(jnp.shape, pure(mesa, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, pure(plain, nnx.Param), pure(mesa, nnx.Param))
    want = plain(x)
    np.testing.assert_array_equal(mesa(x), want)  # training: packs and updates its statistics
    assert all(v.get_value().count == 1 for _, v in nnx.to_flat_state(nnx.state(mesa, mnnx.MesaStat)))
    mesa.eval()
    np.testing.assert_array_equal(mesa(x), want)


@pytest.mark.parametrize("_, name, args, kwargs, shape", GRADIENT_TWINS, ids=IDS)
def test_gradients_approach_nnx_s_with_the_step_and_residuals_are_packed(_, name, args, kwargs, shape, key):
    """As the Linen layers': the error is first order in the step (4 -> 8 bits divides it by
    17; a factor 2 for the two noise draws), and only parameters and packed words are kept."""
    x = jax.random.normal(key, shape)
    plain = getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(1))
    exact = grads(plain, x)
    errors = {}
    for bits in (8, 4):
        mesa = getattr(mnnx, name)(*args, **kwargs, quant=QuantConfig(bits=bits), rngs=nnx.Rngs(1))
        approx = grads(mesa, x)
        errors[bits] = relative_error((nnx.to_pure_dict(approx[0]), approx[1]), (nnx.to_pure_dict(exact[0]), exact[1]))
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors
    graphdef, params, rest = nnx.split(mesa, nnx.Param, ...)
    loss = lambda params, rest: jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x))
    size = min(x.size, plain(x).size)
    for r in memory.saved_residuals(loss, params, rest):
        if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= size:
            assert "argument" in r.source, r


def test_attention_keeps_q_k_v_per_head_and_no_probabilities():
    attn = mnnx.MultiHeadAttention(4, 16, decode=False, quant=QuantConfig(num_groups=2), rngs=nnx.Rngs(0))
    shapes = {"/".join(map(str, k)): v.get_value().lo.shape for k, v in nnx.to_flat_state(nnx.state(attn, mnnx.MesaStat))}
    assert shapes == {"q": (4,), "k": (4,), "v": (4,), "query/inputs": (2,), "key/inputs": (2,),
                      "value/inputs": (2,), "out/inputs": (2,)}  # created with the layer, before any call
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    kept = memory.saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)), params)
    assert not [r for r in kept if r.shape[-2:] == (7, 7)], kept  # no N x N tensor


def block_model(rngs):
    """A pre-norm Transformer block as NNX's documentation writes one."""

    class Block(nnx.Module):
        def __init__(self, d, heads, *, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

    return Block(16, 2, rngs=rngs)


def small_vit():
    return nnx_vit.VisionTransformer(10, img_size=16, patch_size=4, num_layers=2, num_heads=2, mlp_dim=32,
                                     hidden_size=16, dropout_rate=0.0, rngs=nnx.Rngs(0))


def test_compress_works_in_place_keeping_the_param_objects_and_the_forward():
    model = small_vit()
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    want = run(model, x)
    params = {path: v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert mesa_jax.compress(model) is model
    after = {path: v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert after.keys() == params.keys() and all(after[p] is params[p] for p in params)  # the same objects
    assert isinstance(model, nnx_vit.VisionTransformer) and isinstance(model.encoder.layers[0].attn,
                                                                        nnx.MultiHeadAttention)
    np.testing.assert_array_equal(run(model, x), want)
    stats = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, mnnx.MesaStat))}
    assert {"patch_embeddings/inputs", "encoder/layers/0/attn/q", "encoder/layers/1/norm2/normalized",
            "encoder/layers/0/mlp/gelu_0"} <= stats  # gelu inside nnx.Sequential: created at its first call


def test_a_checkpoint_of_the_original_restores_into_the_compressed_model(tmp_path):
    import orbax.checkpoint as ocp

    original = small_vit()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(original, nnx.Param))
    checkpointer.wait_until_finished()
    model = mesa_jax.compress(small_vit())
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    nnx.update(model, jax.tree.map(lambda a: a + 1, nnx.state(model, nnx.Param)))  # moved away
    restored = checkpointer.restore(tmp_path / "ckpt", nnx.state(model, nnx.Param))
    nnx.update(model, restored)
    np.testing.assert_array_equal(run(model, x), run(original, x))


def counts(model):
    return {"/".join(map(str, k)): int(v.get_value().count) for k, v in nnx.to_flat_state(
        nnx.state(model, mnnx.MesaStat))}


def test_statistics_update_in_training_and_stay_fixed_in_evaluation_and_views():
    model = mesa_jax.compress(block_model(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    run(model, x)
    trained = counts(model)
    assert trained["ln1/normalized"] == trained["gelu_0"] == trained["attn/q"] == 1
    assert trained["fc1/inputs"] == 0  # LayerNorm's residual stands for it: nothing to measure
    model.eval()
    run(model, x)
    assert counts(model) == trained
    model.train()
    run(nnx.view(model, use_running_average=True), x)
    assert counts(model) == trained
    run(model, x)
    assert counts(model)["ln1/normalized"] == 2


def linen_block():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.MultiHeadDotProductAttention(2, name="attn")(nn.LayerNorm(name="ln1", epsilon=1e-6)(x))
            x = x + y
            h = nn.Dense(64, name="fc1")(nn.LayerNorm(name="ln2", epsilon=1e-6)(x))
            return x + nn.Dense(16, name="fc2")(nn.gelu(h))

    return Block()


def test_optimizer_steps_under_nnx_jit_match_the_linen_model_s_on_the_same_weights():
    """The same block in NNX and Linen, compressed by each API with nearest rounding (no
    noise: seeds differ by path): the optimizer steps agree to float rounding (the two
    frameworks' attention forwards differ in the last bits)."""
    x = jax.random.normal(jax.random.key(1), (4, 5, 16))
    y = jax.random.normal(jax.random.key(2), (4, 5, 16))
    model = mesa_jax.compress(block_model(nnx.Rngs(0)), NEAREST)
    linen = mesa_jax.compress(linen_block(), NEAREST)
    variables = linen.init(jax.random.key(0), x)
    params = pure(model, nnx.Param)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, variables["params"])
    tx = optax.sgd(0.1, momentum=0.9)  # not Adam: it would blow the key bias's zero-up-to-rounding gradient up
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def linen_step(params, mesa, opt_state):
        def loss(params):
            out, state = linen.apply({"params": params, "mesa": mesa}, x, mutable=["mesa"])
            return jnp.mean((out - y) ** 2), state["mesa"]

        (value, mesa), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), mesa, opt_state, value

    linen_params, mesa, opt_state = params, variables["mesa"], tx.init(params)
    for _ in range(4):
        nnx_loss = nnx_step(model, optimizer)
        linen_params, mesa, opt_state, linen_loss = linen_step(linen_params, mesa, opt_state)
        np.testing.assert_allclose(nnx_loss, linen_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), pure(model, nnx.Param),
                 linen_params)
    np.testing.assert_allclose(model.ln1.normalized.get_value().lo, mesa["ln1"]["normalized"].lo, rtol=1e-5)
    assert counts(model)["ln1/normalized"] == 4


def test_the_bridge_maps_the_statistics_both_ways():
    x = jnp.ones((2, 8))
    bridged = nnx.bridge.ToNNX(mnn.Dense(4), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(bridged, x)
    assert [type(v) for _, v in nnx.to_flat_state(nnx.state(bridged, mnnx.MesaStat))] == [mnnx.MesaStat]
    linen = nnx.bridge.ToLinen(mnnx.Linear, args=(8, 4))
    variables = linen.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables["mesa"])["inputs"].lo == (1,)


def test_stacked_layers_under_nnx_vmap_and_scan_keep_stacked_statistics(key):
    """Layers made by nnx.vmap (stacked Params) get statistics stacked the same way, an
    nnx.scan over them updates each layer's own, and a function called inside them creates
    its statistics stacked at the first scan."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.linear = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return x + nnx.gelu(self.linear(nnx.relu(self.norm(x))))

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return MLP(nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 3))

    def forward(stack, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, x):
            return layer(x)

        return body(stack, x)

    x = jax.random.normal(key, (2, 8))
    want = forward(stack, x)
    mesa_jax.compress(stack)
    assert stack.norm.normalized.get_value().lo.shape == (3, 1)
    np.testing.assert_array_equal(forward(stack, x), want)
    np.testing.assert_array_equal(stack.linear.inputs.get_value().count, [1, 1, 1])
    assert stack.gelu_0.get_value().lo.shape == (3, 1)
    lo = stack.norm.normalized.get_value().lo[:, 0]
    assert len(set(np.asarray(lo).tolist())) == 3  # each layer measured its own input


@pytest.mark.parametrize("make, match", [
    (lambda: mesa_jax.compress(lambda x: x), "takes a flax.linen or flax.nnx Module"),
    (lambda: mesa_jax.compress(mesa_jax.compress(block_model(nnx.Rngs(0)))), "already compressed"),
    (lambda: mesa_jax.compress(block_model(nnx.Rngs(0)), Policy(overrides={"fc3": None}))(jnp.ones((2, 5, 16))),
     r"\['fc3'\] match no layer"),  # at the first call, when the sites are known
    (lambda: mesa_jax.compress(block_model(nnx.Rngs(0)), quant="int8"), "quant must be"),
    (lambda: mnnx.Linear(6, 4, quant=QuantConfig(num_groups=4), rngs=nnx.Rngs(0)), "does not divide"),
])
def test_bad_inputs_name_the_problem(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_an_unsupported_setting_raises_for_a_layer_and_runs_exactly_inside_compress():
    x = jnp.ones((2, 8))
    custom = lambda *args, **kwargs: jax.lax.dot_general(*args, **kwargs)
    with pytest.raises(NotImplementedError, match="custom dot_general"):
        mnnx.Linear(8, 4, dot_general=custom, rngs=nnx.Rngs(0))(x)
    plain = nnx.Linear(8, 4, dot_general=custom, rngs=nnx.Rngs(0))
    want = plain(x)
    np.testing.assert_array_equal(mesa_jax.compress(plain)(x), want)


def test_a_policy_picks_configs_by_module_path():
    model = mesa_jax.compress(block_model(nnx.Rngs(0)), Policy(QuantConfig(bits=8), overrides={
        "fc2": QuantConfig(bits=4), "attn": None}))
    assert model.fc2.mesa_config.bits == 4 and model.fc1.mesa_config.bits == 8
    assert model.attn.mesa_config is None and not hasattr(model.attn, "q")


def test_mesa_layers_inside_a_model_keep_their_own_quant_under_compress():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.attn = mnnx.MultiHeadAttention(2, 16, decode=False, quant=QuantConfig(bits=4), rngs=rngs)
            self.fc = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.attn(x))

    model = mesa_jax.compress(Model(nnx.Rngs(0)))
    assert model.attn.mesa_config.bits == 4 and model.attn.query.mesa_config.bits == 4
    assert model.fc.mesa_config.bits == 8
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    assert run(model, x).shape == (2, 5, 16) and counts(model)["attn/q"] == 1


def test_a_block_under_nnx_remat_is_compressed_and_updates_its_statistics():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.block = block_model(rngs)

        def __call__(self, x):
            return nnx.remat(lambda block, x: block(x))(self.block, x)

    model = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    want = run(model, x)
    mesa_jax.compress(model)
    np.testing.assert_array_equal(run(model, x), want)
    nnx.jit(nnx.grad(lambda m: jnp.sum(m(x))))(model)
    assert counts(model)["block/gelu_0"] == 2 and counts(model)["block/attn/q"] == 2


SHARDED = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.flatten_util import ravel_pytree
    from jax.sharding import AxisType, PartitionSpec as P
    import mesa_jax
    from mesa_jax import nnx as mnnx

    class Block(nnx.Module):  # annotated for tensor parallelism as flax's GSPMD guide does
        def __init__(self, dim, heads, rngs, tensor_parallel):
            lecun = nnx.initializers.lecun_normal()
            init = lambda *names: nnx.with_partitioning(lecun, names) if tensor_parallel else lecun
            self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs,
                                               kernel_init=init(None, "model", None), out_kernel_init=init("model", None, None))
            self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
            self.fc1 = nnx.Linear(dim, 4 * dim, kernel_init=init(None, "model"), rngs=rngs)
            self.fc2 = nnx.Linear(4 * dim, dim, kernel_init=init("model", None), rngs=rngs)
            self.head = nnx.Linear(dim, 10, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x))
            x = x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))
            return self.head(x.mean(axis=1))

    def train(mesh):
        with jax.set_mesh(mesh):
            model = Block(16, 4, nnx.Rngs(0), tensor_parallel="model" in mesh.axis_names)
            mesa_jax.compress(model)
            optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

            @nnx.jit
            def step(model, optimizer, x, y):
                loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
                value, grads = nnx.value_and_grad(loss)(model)
                optimizer.update(model, grads)
                return value

            x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 6, 16)), P("data"))
            y = jax.device_put(jnp.arange(8) % 10, P("data"))
            losses = [float(step(model, optimizer, x, y)) for _ in range(2)]
        flat = lambda kind: np.asarray(ravel_pytree(jax.device_get(nnx.to_pure_dict(nnx.state(model, kind))))[0])
        return dict(losses=losses, params=flat(nnx.Param), stats=flat(mnnx.MesaStat),
                    fc1=str(model.fc1.kernel.get_value().sharding.spec))

    auto = lambda shape, names, devices: jax.make_mesh(shape, names, (AxisType.Auto,) * len(shape), devices=devices)
    alone = train(auto((1, 1), ("data", "model"), jax.devices()[:1]))
    runs = {"auto data x model": train(auto((2, 2), ("data", "model"), jax.devices())),
            "explicit data": train(jax.make_mesh((4,), ("data",)))}  # jax.make_mesh's default: explicit axes
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(json.dumps({name: dict(losses=max(abs(a - b) for a, b in zip(run["losses"], alone["losses"])),
                                 params=rel(run["params"], alone["params"]),
                                 stats=rel(run["stats"], alone["stats"]), fc1=run["fc1"])
                      for name, run in runs.items()}))
    """
)


@pytest.mark.slow  # a 4-device subprocess
def test_sharded_state_trains_as_on_one_device():
    """Tensor-parallel Params (flax's nnx.with_partitioning, auto axes) and a batch split over
    an explicit mesh (jax.make_mesh's default) train as on one device: the rounding noise is
    the same bits, so only the order of float32 reductions differs (~1e-7 per step)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["auto data x model"]["fc1"] == "P(None, 'model')"  # compress kept the Param's sharding
    for name, run in runs.items():
        assert run["losses"] < 1e-5 and run["params"] < 1e-5 and run["stats"] < 1e-5, (name, run)


def test_attention_written_by_hand_keeps_its_einsums_operands_packed_per_head():
    """Grouped-query attention by hand (gemma's einsums): its products are "matmul" sites,
    q, k, probabilities and v packed per key-value head (the last label the two operands
    share with the output), statistics made at the first call; the same forward, the gradient
    error first order in the step."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    make = lambda: nnx_vit.EinsumAttention(16, 4, 2, causal=True, rngs=nnx.Rngs(0))
    plain = make()
    want = run(plain, x)
    errors = {}
    for bits in (8, 4):
        model = mesa_jax.compress(make(), QuantConfig(bits=bits))
        np.testing.assert_array_equal(run(model, x), want)
        stats = {k: v.get_value().lo.shape for k, v in nnx.to_flat_state(nnx.state(model, mnnx.MesaStat))}
        assert {k: s for k, s in stats.items() if k[0].startswith("einsum")} == {
            (f"einsum_{i}_{t}",): (2,) for i in (0, 1) for t in "ab"}  # the reshaped probabilities: kept again
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        kept = memory.saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)), params)
        assert not [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= x.size
                    and "argument" not in r.source and "_where" not in r.source], kept
        errors[bits] = relative_error(grads(model, x), grads(plain, x))
    assert 0 < errors[8] <= 2 * (15 / 255) * errors[4], errors


@pytest.mark.parametrize("kv_heads, softmax_groups", [(4, 4), (2, 1)])
def test_hand_written_attention_s_statistics_fit_any_sequence_length(kv_heads, softmax_groups):
    """gemma's scores are [B, T, N, S]: its softmax is grouped by the heads the einsum put there
    (with grouped queries the scores are reshaped after it: one group), so a model trained at
    one length runs at another (one token, as a decoder samples)."""
    make = lambda: nnx_vit.EinsumAttention(16, 4, kv_heads, causal=True, rngs=nnx.Rngs(0))
    model, plain = mesa_jax.compress(make()), make()
    for t in (7, 1):
        x = jax.random.normal(jax.random.key(t), (2, t, 16))
        np.testing.assert_array_equal(run(model, x), run(plain, x))
    assert model.softmax_0.get_value().lo.shape == (softmax_groups,)


def test_flax_s_own_einsums_stay_flax_s():
    """MultiHeadAttention's core left exact by the policy runs flax's einsums (with dropout,
    flax's core is its einsums) as they are."""
    make = lambda: nnx.MultiHeadAttention(2, 8, dropout_rate=0.5, deterministic=False, decode=False, rngs=nnx.Rngs(0))
    model = mesa_jax.compress(make(), Policy(by_kind={"attention": None}))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    np.testing.assert_array_equal(run(model, x), run(make(), x))
    names = {k[-1] for k, _ in nnx.to_flat_state(nnx.state(model, mnnx.MesaStat))}
    assert names == {"inputs"}, names  # the projections' only


def test_a_gated_mlp_written_by_hand_keeps_gate_and_up_packed():
    """gemma's FeedForward, ``gelu(gate_proj(x)) * up_proj(x)``: a "gated" site (statistics at
    its first call), the down projection keeping nothing, the same forward; a ufunc's own
    methods (``jnp.multiply.reduce``) answer inside a compressed call."""
    make = lambda: nnx_vit.GatedMlp(8, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    model = mesa_jax.compress(make())
    np.testing.assert_array_equal(run(model, x), run(make(), x))
    names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, mnnx.MesaStat))}
    assert {"gated_0_gate", "gated_0_up", "gelu_0"} <= names
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    kept = memory.saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)), params)
    assert sorted(r.shape for r in kept if r.dtype == jnp.uint8) == [(2, 5, 8), (2, 5, 16), (2, 5, 16)], kept
    assert not [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= x.size
                and "argument" not in r.source]

    class Reduces(nnx.Module):
        def __call__(self, x):
            return jnp.multiply.reduce(nnx.gelu(x), axis=-1)

    np.testing.assert_array_equal(mesa_jax.compress(Reduces())(x), jnp.multiply.reduce(nnx.gelu(x), axis=-1))
