"""The causal language models (GPT-2, Llama): exact under compress, RoPE, the causal mask, residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
import pytest

from mesa_jax import memory, models
from mesa_jax.models import gpt, llama

TINY = {  # the tiny presets' families at test sizes: head widths 16, one block (two for remat)
    "gpt-tiny": dict(width=32, depth=1, num_heads=2, max_len=32),
    "llama-tiny": dict(width=32, depth=1, num_heads=2, mlp_dim=48),
}
B, T = 2, 24  # T differs from every width, so a T x T residual shows


def tokens(seed=0, b=B, t=T):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 256)


@pytest.fixture(scope="module")
def pairs():
    """{name: (mesa model, baseline, variables)}: the same params for both."""
    out = {}
    for name, fields in TINY.items():
        mesa, base = models.create(name, **fields), models.create(name, quant=None, **fields)
        out[name] = mesa, base, jax.jit(mesa.init)(jax.random.key(0), tokens())
    return out


@pytest.mark.parametrize("name", TINY)
def test_the_compressed_forward_is_the_baseline_s_bit_for_bit_and_causal(name, pairs):
    """Row 1 is row 0 with token 10 changed: logits before it are the same, bit for bit."""
    mesa, base, variables = pairs[name]
    x = tokens(1)
    x = x.at[1].set(x[0].at[10].set((x[0, 10] + 1) % 256))
    logits, state = jax.jit(lambda v, x: mesa.apply(v, x, train=True, mutable=["mesa"]))(variables, x)
    np.testing.assert_array_equal(logits, jax.jit(base.apply)({"params": variables["params"]}, x))
    assert logits.shape == (B, T, 256) and logits.dtype == jnp.float32
    assert jax.tree.structure(state["mesa"]) == jax.tree.structure(variables["mesa"])
    np.testing.assert_array_equal(logits[0, :10], logits[1, :10])
    assert not np.array_equal(logits[0, 10:], logits[1, 10:])


def test_rope_rotates_each_pair_by_its_position_angle():
    """Pairs (x_i, x_{i + D/2}) as complex numbers, multiplied by exp(i t / 10000^(2i/D)): in float64."""
    d, theta = 8, 10_000.0
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 3, d)), np.float64)
    positions = np.array([0, 1, 2, 7, 100])
    z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * np.exp(
        1j * positions[None, :, None, None] * theta ** (-np.arange(0, d, 2) / d))
    expected = np.concatenate([z.real, z.imag], axis=-1)
    got = jax.jit(llama.apply_rope)(jnp.asarray(x, jnp.float32), jnp.asarray(positions), theta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], jnp.asarray(x, jnp.float32)[:, 0])  # position 0: the identity


def test_rope_makes_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(4), (2, 1, 1, 1, 16))
    rope = jax.jit(llama.apply_rope)
    score = lambda m, n: float(jnp.sum(rope(q, jnp.array([m])) * rope(k, jnp.array([n]))))
    for m, n in ((3, 1), (10, 4), (50, 50)):
        assert score(m, n) == pytest.approx(score(m + 17, n + 17), rel=1e-4, abs=1e-5)
    assert score(5, 1) != pytest.approx(score(5, 2), rel=1e-3)
    assert llama.apply_rope(q.astype(jnp.bfloat16), jnp.array([3])).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", TINY)
def test_compressed_lms_keep_q_k_v_packed_and_nothing_sequence_squared(name, pairs):
    """What autodiff keeps under compress: the attention's (rotated) Q, K, V as uint8 codes per head,
    and no [.., T, T] tensor anywhere."""
    mesa, _, variables = pairs[name]

    def loss(params, stats, x):
        logits, _ = mesa.apply({"params": params, "mesa": stats}, x, train=True, mutable=["mesa"])
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    kept = [r for r in memory.saved_residuals(loss, variables["params"], variables["mesa"], tokens())
            if "argument" not in r.source]
    assert not [r for r in kept if list(r.shape).count(T) >= 2]
    heads = [r for r in kept if r.shape == (B, T, 2, 16)]
    assert len(heads) == 3 and all(r.dtype == jnp.uint8 for r in heads)
    # nothing of a block's width in float but the loss's probabilities: the norms, the MLP (GELU;
    # SwiGLU through mesa_jax.nn.gated) and the head (GPT's tied to the embedding) keep codes once
    width, mlp = TINY[name]["width"], TINY[name].get("mlp_dim", 4 * TINY[name]["width"])
    floats = [r for r in kept if jnp.issubdtype(r.dtype, jnp.floating) and np.prod(r.shape) >= B * T * width]
    assert [r.shape for r in floats] == [(B, T - 1, 256)], floats
    codes = sorted(r.shape[-1] for r in kept if r.dtype == jnp.uint8 and r.shape[:2] == (B, T) and len(r.shape) == 3)
    expected = [width] * 4 + [mlp] * (2 if name.startswith("llama") else 1)  # 2 norms, o_proj, final norm
    assert codes == sorted(expected), codes


def test_the_lm_presets_are_in_the_registry():
    assert all(models.is_language_model(n) for n in ("gpt2-s", "gpt2-m", "gpt-tiny", "llama-100m", "llama-tiny"))
    assert not models.is_language_model("vit-c100")
    assert isinstance(models.create("gpt2-s", quant=None), gpt.GPT)
    assert isinstance(models.create("llama-tiny"), llama.Llama)
    with pytest.raises(TypeError, match="num_classes"):
        models.create("gpt-tiny", num_classes=10)


@pytest.mark.slow  # traces the 124M-355M models (a few seconds)
def test_the_lm_presets_have_their_sizes():
    sizes = {"gpt2-s": 124.4e6, "gpt2-m": 354.8e6, "llama-100m": 100.4e6}
    for name, expected in sizes.items():
        model = models.create(name, quant=None)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes)) == pytest.approx(expected, rel=1e-3), name


def test_bad_inputs_are_named():
    model = models.create("gpt-tiny", quant=None, **TINY["gpt-tiny"])
    with pytest.raises(ValueError, match="exceeds max_len=32"):
        model.init(jax.random.key(0), jnp.zeros((1, 40), jnp.int32))
    with pytest.raises(ValueError, match="integer tokens"):
        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.float32))


@pytest.mark.slow  # one compilation per model, each a few seconds
@pytest.mark.parametrize("name, remat", [("gpt-tiny", "nothing_saveable"), ("llama-tiny", "dots_saveable"),
                                         ("llama-tiny", None)])
def test_gradients_under_remat_and_tied_heads_match_the_baseline(name, remat):
    fields = {**TINY[name], "depth": 2, "remat": remat} | ({"tie_embeddings": True} if remat is None else {})
    mesa, base = models.create(name, **fields), models.create(name, quant=None, **fields)
    x = tokens(5)
    variables = mesa.init(jax.random.key(0), x)

    def grads(model, variables):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["mesa"])
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

        return ravel_pytree(jax.jit(jax.grad(loss))(variables["params"]))[0]

    g, exact = grads(mesa, variables), grads(base, {"params": variables["params"]})
    assert float(jnp.vdot(g, exact) / (jnp.linalg.norm(g) * jnp.linalg.norm(exact))) > 0.99


def test_the_lm_memory_table_sets_each_method_beside_its_row_s_baseline():
    from benchmarks import lm_memory, step_memory

    def m(peak):
        parts = memory.CompiledMemory(temp=peak - 2**20, argument=2**20, output=0, alias=0)
        report = memory.ProgramReport("h100", parts, {"kLoop": 1}, {}, 0, 0, None, None, 1.0)
        return step_memory.StepMemory(peak // 2, {"h100": report})

    kept = lm_memory.Residuals(2**21, 1536.0, 4096.0)
    rows = [("gpt2-s", "bfloat16", 2048, 8, "baseline", m(6 * 2**20), kept),
            ("gpt2-s", "bfloat16", 2048, 8, "mesa8", m(2 * 2**20), kept),
            ("gpt2-s", "bfloat16", 2048, 8, "cudnn", m(3 * 2**20), None)]
    lines = lm_memory.table(rows).splitlines()
    assert "| H100 plan MiB | baseline / method |" in lines[0]
    assert lines[3] == "| gpt2-s | bfloat16 | 2048 | 8 | mesa8 | 2 | 3.00x | 2 | 1,536 | 4,096 |"
    assert lines[4].endswith("| cudnn | 3 | 2.00x | - | - | - |")
    assert lm_memory.build("gpt2-s", "flash_like", seq=4096).max_len == 4096
    assert lm_memory.build("gpt2-s", "remat", seq=512).max_len == 1024


@pytest.mark.slow  # traces each method at two batches, two depths and two sequence lengths
def test_residuals_per_token_and_block_are_flat_in_the_sequence_but_the_baseline_s(monkeypatch):
    from benchmarks import lm_memory

    monkeypatch.setitem(gpt.PRESETS, "gpt-tiny", dict(vocab_size=256, max_len=64, width=32, num_heads=2, depth=4))
    per_token = {m: [lm_memory.residuals("gpt-tiny", m, jnp.bfloat16, 2, t).per_block_token for t in (16, 48)]
                 for m in ("baseline", "flash_like", "remat", "mesa8")}
    assert per_token["baseline"][1] > per_token["baseline"][0]
    for method in ("flash_like", "remat", "mesa8"):
        assert per_token[method][0] == per_token[method][1], method
    assert per_token["remat"][0] == 32 * 2  # the block's bfloat16 input
    assert per_token["mesa8"][0] < per_token["flash_like"][0] / 4


@pytest.mark.parametrize("name", TINY)
def test_the_chunked_loss_is_the_whole_logits_loss_and_keeps_no_logits(name, pairs):
    """train.lm's loss applies the head to 5 positions of both sequences at a time (10 tokens; 5
    does not divide T: the last span is padded): the baseline's losses and gradients are those of
    its [B, T, V] logits, to float32 rounding, and autodiff keeps no vocabulary-wide tensor,
    compressed or not."""
    from train import loop

    mesa, base, variables = pairs[name]
    x = tokens(2, t=T + 1)

    def chunked(model, params, stats):
        hidden, _ = model.apply({"params": params, **stats}, x[:, :-1], train=True, head=False, mutable=["mesa"])
        return loop.next_token_losses(loop.head(model.apply, params), hidden, x[:, 1:], chunk=10)

    def whole(params):
        return optax.softmax_cross_entropy_with_integer_labels(base.apply({"params": params}, x[:, :-1]), x[:, 1:])

    params, stats = variables["params"], {"mesa": variables["mesa"]}
    got, want = jax.jit(lambda p: chunked(base, p, {}))(params), jax.jit(whole)(params)
    assert got.shape == (B, T)
    eps, width = float(jnp.finfo(jnp.float32).eps), TINY[name]["width"]  # a logit: width products, in another order
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * width * eps * float(jnp.max(want)))
    grad = lambda f: ravel_pytree(jax.jit(jax.grad(lambda p: f(p).mean()))(params))[0]
    g, exact = grad(lambda p: chunked(base, p, {})), grad(whole)
    np.testing.assert_allclose(g, exact, rtol=0, atol=B * T * width * eps * float(jnp.max(jnp.abs(exact))))
    for model, collections in ((base, {}), (mesa, stats)):
        kept = memory.saved_residuals(lambda p: chunked(model, p, collections).mean(), params)
        assert not [r for r in kept if "argument" not in r.source and r.shape[-1:] == (256,)], kept


def test_cudnn_attention_is_compressed_as_xla_s_is():
    """train.lm --attention cudnn: the model calls jax's cuDNN flash attention and compress keeps
    its Q, K, V packed, as with XLA's (traced, not run: cuDNN's version is assumed on this CPU)."""
    from benchmarks import lm_memory

    model = models.create("gpt-tiny", dtype=jnp.bfloat16, attention_fn=models.presets.ATTENTION["cudnn"],
                          **TINY["gpt-tiny"])

    def loss(params, stats, x):
        logits, _ = model.apply({"params": params, "mesa": stats}, x, train=True, mutable=["mesa"])
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    with lm_memory.assumed_cudnn(90800):
        variables = jax.eval_shape(model.init, jax.random.key(0), tokens())
        kept = memory.saved_residuals(loss, variables["params"], variables["mesa"], tokens())
    heads = [r for r in kept if r.shape == (B, T, 2, 16) and "argument" not in r.source]
    assert len(heads) == 3 and all(r.dtype == jnp.uint8 for r in heads), heads
