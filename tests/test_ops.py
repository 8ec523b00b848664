"""Custom backward passes of mesa_jax.ops: numerical gradients, quantized VJPs, residuals."""

import functools
import inspect
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.flatten_util import ravel_pytree
from absl.testing import parameterized
from jax.test_util import check_grads

from mesa_jax import memory, ops, quant
from mesa_jax.quant import QuantConfig

from op_cases import BN_EPSILON, CASES, SEED, SEED_B, stats_of

CONFIG = QuantConfig()
SEEDS = (SEED, SEED_B)


def op_fn(case, config):
    return functools.partial(case.call, config)


def vjp_of(f, inputs, g):
    """The VJP of f at ``inputs`` applied to ``g``, jitted: one compilation instead of op-by-op dispatch."""
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](g))(*inputs)


def cotangent(case, inputs):
    out = jax.eval_shape(case.reference, *inputs)
    return jax.random.normal(jax.random.key(99), out.shape, out.dtype)


def packed_values(case, inputs):
    """The tensors the op packs, computed exactly."""
    what = {"out": lambda: case.reference(*inputs), "normalized": lambda: ops.normalized_input(inputs[0])[0],
            "rms_normalized": lambda: ops.normalized_input(inputs[0], centered=False)[0],
            "batch_normalized": lambda: ops.normalized_input(inputs[0], BN_EPSILON, per_channel=True)[0]}
    return [what[i]() if isinstance(i, str) else inputs[i] for i, _ in case.packed]


def dequantized(case, inputs, config):
    """The tensors the quantized backward sees: x_hat for each packed tensor."""
    return [
        quant.fake_quantize(v, stats_of(v, layout), config, seed, layout)
        for v, (_, layout), seed in zip(packed_values(case, inputs), case.packed, SEEDS)
    ]


def reference_grads(case, inputs, g):
    """Textbook gradients of the reference, as a function of the packed tensors' values."""
    kind = case.packed[0][0]
    if kind == "out":  # softmax, from its output y
        return lambda y: (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)
    if kind == "normalized":  # layer norm, from xn = (x - mean) * rstd and the exact rstd
        _, rstd = ops.normalized_input(inputs[0])
        scale = inputs[1].reshape(1, 1, -1)

        def ln_grads(xn):
            gn = g * scale
            dx = rstd * (gn - gn.mean(-1, keepdims=True) - xn * (gn * xn).mean(-1, keepdims=True))
            return dx, jnp.sum(g * xn, axis=(0, 1)), jnp.sum(g, axis=(0, 1))

        return ln_grads
    if kind == "batch_normalized":  # batch norm, from xn = (x - mean) * rstd per channel and the exact rstd
        _, rstd = ops.normalized_input(inputs[0], BN_EPSILON, per_channel=True)
        axes = tuple(range(g.ndim - 1))

        def bn_grads(xn):
            gn = g * inputs[1].reshape((1,) * (g.ndim - 1) + (-1,))
            dx = rstd * (gn - gn.mean(axes, keepdims=True) - xn * (gn * xn).mean(axes, keepdims=True))
            return dx, jnp.sum(g * xn, axis=axes), jnp.sum(g, axis=axes)

        return bn_grads
    if kind == "rms_normalized":  # rms norm, from xn = x * rstd and the exact rstd
        _, rstd = ops.normalized_input(inputs[0], centered=False)
        scale = inputs[1].reshape(1, 1, -1)
        return lambda xn: (rstd * (g * scale - xn * (g * scale * xn).mean(-1, keepdims=True)),
                           jnp.sum(g * xn, axis=(0, 1)))

    def grads(*packed):
        args = list(inputs)
        for (i, _), v in zip(case.packed, packed):
            args[i] = v
        return jax.vjp(case.reference, *args)[1](g)

    return grads


def segment_bound(case, fn, xs, x_hats, g):
    """A rigorous per-element bound of |fn(x_hat) - fn(x)|.

    Every gradient formula here is a polynomial of degree <= 2 in the kept tensors,
    except GELU's, SiLU's and the gated product's: along the segment x + t (x_hat - x) its
    Jacobian is then affine in t, so ``|J(t)| @ |x_hat - x|`` is convex in t and its maximum
    over [0, 1] is at an end. GELU's is ``g * gelu'(x)``, elementwise: ``|g| * max|gelu''| *
    |x_hat - x|`` (SiLU's the same). The gated product's, ``(g u silu'(a), g silu(a))`` of
    (a, u): ``|g| (|du| |silu'(a_hat)| + |u| max|silu''| |da|)`` and ``|g| max|silu'| |da|``.
    """
    deltas = [xh - x for x, xh in zip(xs, x_hats)]
    if case.name.startswith(("gelu", "silu")):
        curvature = GELU_CURVATURE if case.name.startswith("gelu") else SILU_CURVATURE
        return jnp.abs(g).reshape(-1) * curvature * jnp.abs(deltas[0]).reshape(-1)
    if case.name.startswith("gated"):
        (_, u), (a_hat, _), (da, du) = xs, x_hats, deltas
        slope = jax.vmap(jax.grad(jax.nn.silu))(a_hat.reshape(-1)).reshape(a_hat.shape)
        dg = jnp.abs(g) * (jnp.abs(du) * jnp.abs(slope) + jnp.abs(u) * SILU_CURVATURE * jnp.abs(da))
        return jnp.concatenate([dg.reshape(-1), (jnp.abs(g) * SILU_SLOPE * jnp.abs(da)).reshape(-1)])
    flat = lambda *v: ravel_pytree(fn(*v))[0]
    ends = []
    for point in (xs, x_hats):
        jacs = jax.jacfwd(flat, argnums=tuple(range(len(xs))))(*point)
        ends.append(sum(jnp.abs(j).reshape(j.shape[0], -1) @ jnp.abs(d).reshape(-1) for j, d in zip(jacs, deltas)))
    return jnp.maximum(*ends)


GELU_CURVATURE = math.sqrt(2 / math.pi)  # max |gelu''|, at 0, for the erf and the tanh form (checked below)
SILU_CURVATURE = 0.5  # max |silu''|, at 0
SILU_SLOPE = 1.0999  # max |silu'|, near x = 2.4


def test_gelu_and_silu_curvature_bounds():
    with jax.enable_x64(True):
        x = jnp.linspace(-12.0, 12.0, 240_001, dtype=jnp.float64)
        for approximate in (False, True):
            second = jax.vmap(jax.grad(jax.grad(lambda t: jax.nn.gelu(t, approximate=approximate))))(x)
            assert float(jnp.max(jnp.abs(second))) <= GELU_CURVATURE * (1 + 1e-12)
        assert float(jnp.max(jnp.abs(jax.vmap(jax.grad(jax.grad(jax.nn.silu)))(x)))) <= SILU_CURVATURE * (1 + 1e-12)
        assert float(jnp.max(jnp.abs(jax.vmap(jax.grad(jax.nn.silu))(x)))) <= SILU_SLOPE


class OpsWithAndWithoutJit(chex.TestCase):
    """Each op's forward is the reference's, traced op by op and under jax.jit, in exact and
    quantized mode; its gradients have its inputs' shapes and dtypes."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(case.name, case) for case in CASES])
    def test_forward_is_the_reference_s(self, case):
        inputs = case.inputs(jax.random.key(0))
        for config in (None, CONFIG):
            chex.assert_trees_all_close(self.variant(op_fn(case, config))(*inputs), case.reference(*inputs),
                                        rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*[(case.name, case) for case in CASES])
    def test_gradients_match_the_inputs(self, case):
        inputs = case.inputs(jax.random.key(0))
        loss = lambda *a: jnp.sum(op_fn(case, CONFIG)(*a))
        grads = self.variant(jax.grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, inputs)
        chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_under_grad_is_bit_identical_to_exact_mode(case, key):
    """Quantizing changes what is kept, never what is computed."""
    inputs = case.inputs(key)
    fwd = lambda config: jax.jit(lambda *a: jax.vjp(op_fn(case, config), *a)[0])(*inputs)
    np.testing.assert_array_equal(fwd(CONFIG), fwd(None))


@pytest.mark.slow  # the float64 check below is the stricter one
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_exact_mode_numerical_gradients_float32(case, key):
    inputs = case.inputs(key)
    check_grads(op_fn(case, None), inputs, order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_exact_mode_numerical_gradients_float64(case, key):
    with jax.enable_x64(True):
        inputs = case.inputs(key, jnp.float64)
        check_grads(op_fn(case, None), inputs, order=1, modes=["rev"])


# In float64 rounding is ~1e-16 relative: what is left between two paths is quantization
# (the codes are computed in float32 either way). Sums here have at most ~10^2 terms.
FLOAT64_ROUNDING = 1e3 * np.finfo(np.float64).eps


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_quantized_vjp_is_the_reference_vjp_at_the_dequantized_input(case, key):
    with jax.enable_x64(True):
        inputs = case.inputs(key, jnp.float64)
        g = cotangent(case, inputs)
        got = vjp_of(op_fn(case, CONFIG), inputs, g)
        want = reference_grads(case, inputs, g)(*dequantized(case, inputs, CONFIG))
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=FLOAT64_ROUNDING, atol=FLOAT64_ROUNDING)


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=pytest.mark.slow)])  # same bound, coarser step
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_quantized_gradient_error_is_bounded_by_the_step(case, bits, key):
    config = QuantConfig(bits=bits)
    with jax.enable_x64(True):
        inputs = case.inputs(key, jnp.float64)
        g = cotangent(case, inputs)
        exact = ravel_pytree(vjp_of(op_fn(case, None), inputs, g))[0]
        quantized = ravel_pytree(vjp_of(op_fn(case, config), inputs, g))[0]
        fn = reference_grads(case, inputs, g)
        bound = jax.jit(lambda *a: segment_bound(case, fn, *a))(packed_values(case, inputs),
                                                                 dequantized(case, inputs, config), g)
        error = jnp.abs(quantized - exact)
        assert jnp.all(error <= bound + FLOAT64_ROUNDING * (1 + jnp.abs(exact)))
        assert jnp.max(error) > 0  # the quantized path was really taken


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bfloat16_in_bfloat16_grads_out(case, key):
    inputs = case.inputs(key, jnp.bfloat16)
    grads = vjp_of(op_fn(case, CONFIG), inputs, jnp.ones(jax.eval_shape(case.reference, *inputs).shape, inputs[0].dtype))
    chex.assert_trees_all_equal_dtypes(grads, inputs)
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("value", [0.0, pytest.param(2.5, marks=pytest.mark.slow)])  # a second constant: -m slow
def test_constant_inputs_give_finite_gradients(case, value, key):
    inputs = (jnp.full(case.shapes[0], value),) + case.inputs(key)[1:]
    g = jnp.ones(jax.eval_shape(case.reference, *inputs).shape)
    assert all(jnp.all(jnp.isfinite(d)) for d in vjp_of(op_fn(case, CONFIG), inputs, g))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_residuals_hold_no_float_copy_of_an_activation(case, key):
    """Float residuals as large as a packed activation may only be parameters (kept anyway)."""
    inputs = case.inputs(key)
    names = list(inspect.signature(case.call).parameters)[1:]
    normalized = str(case.packed[0][0]).endswith("normalized")
    packed = {i for i, _ in case.packed if not isinstance(i, str)} | ({0} if normalized else set())
    parameters = {names[i] for i in range(len(inputs)) if i not in packed}
    smallest = min(v.size for v in packed_values(case, inputs))
    for r in memory.saved_residuals(op_fn(case, CONFIG), *inputs):
        if jnp.issubdtype(r.dtype, jnp.floating) and int(np.prod(r.shape)) >= smallest:
            assert any(r.source == f"from the argument {n}" for n in parameters), r


def test_two_calls_before_backward_each_keep_their_own_snapshot(key):
    """One op applied to two tensors packed with different statistics stays exact for both."""
    x1, x2 = jax.random.normal(key, (2, 4, 8)) * jnp.array([1.0, 10.0]).reshape(2, 1, 1)
    s1, s2 = stats_of(x1), stats_of(x2)
    f = lambda a, b: jnp.sum(ops.gelu(a, s1, SEED, CONFIG)[0] * ops.gelu(b, s2, SEED, CONFIG)[0])
    da, db = jax.grad(f, argnums=(0, 1))(x1, x2)
    h1, h2 = quant.fake_quantize(x1, s1, CONFIG, SEED), quant.fake_quantize(x2, s2, CONFIG, SEED)
    gelu_grad = jax.grad(lambda t: jnp.sum(jax.nn.gelu(t, approximate=False)))
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(da, gelu(x2) * gelu_grad(h1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, gelu(x1) * gelu_grad(h2), rtol=1e-5, atol=1e-6)


def test_a_linear_op_hands_back_dx_only_with_its_weight_gradient_on_a_gpu(key):
    """dx and d params leave the backward together in a program lowered for a GPU: its scheduler
    cannot put the weight-gradient GEMM off to the end of the backward pass, keeping the restored
    input and the cotangent alive until then (gpt2-s, int4 row ranges, batch 536 on the H100
    plan: 117.9 GiB, 73.6 GiB tied). Not on a CPU (see ops._tied_on_gpu)."""
    x, kernel = jax.random.normal(key, (2, 5, 8)), jax.random.normal(jax.random.key(1), (8, 6))
    fn = ops.DotGeneral((((2,), (0,)), ((), ())))
    grads = jax.jit(jax.grad(lambda x, k: jnp.sum(ops.linear(x, k, stats_of(x), SEED, CONFIG, fn)[0]), argnums=(0, 1)))
    text = {p: export.export(grads, platforms=[p])(x, kernel).mlir_module() for p in ("cuda", "cpu")}
    tie = re.compile(r"optimization_barrier %\S+, %\S+ : tensor<2x5x8xf32>, tensor<8x6xf32>")
    assert tie.search(text["cuda"]) and not tie.search(text["cpu"])


def test_seed_and_statistics_are_not_differentiated(key):
    x = jax.random.normal(key, (3, 8))

    count = jnp.ones((), jnp.int32)

    def loss(x, lo, span, seed):
        return jnp.sum(ops.gelu(x, quant.Stats(lo, span, count), seed, CONFIG)[0])

    stats = stats_of(x)
    dlo, dspan = jax.jit(jax.grad(loss, argnums=(1, 2)))(x, stats.lo, stats.span, SEED)
    assert jnp.all(dlo == 0) and jnp.all(dspan == 0)
    with pytest.raises(TypeError, match="int"):
        jax.grad(loss, argnums=3)(x, stats.lo, stats.span, SEED)


def test_nan_cotangent_is_not_hidden(key):
    x = jax.random.normal(key, (3, 8))
    _, vjp = jax.vjp(lambda x: ops.gelu(x, stats_of(x), SEED, CONFIG)[0], x)
    assert jnp.isnan(vjp(jnp.full_like(x, jnp.nan))[0]).all()


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_a_nan_in_the_cotangent_poisons_no_more_than_the_exact_gradient(case, key):
    """The restored activation depends on the cotangent (for XLA:CPU's scheduling) without changing."""
    inputs = case.inputs(key)
    g = cotangent(case, inputs).reshape(-1).at[0].set(jnp.nan).reshape(cotangent(case, inputs).shape)
    exact = vjp_of(op_fn(case, None), inputs, g)
    quantized = vjp_of(op_fn(case, CONFIG), inputs, g)
    for e, q in zip(exact, quantized):
        np.testing.assert_array_equal(jnp.isnan(q), jnp.isnan(e))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("config", [None, CONFIG], ids=["exact", "packed"])
def test_relu_forward_and_gradient_are_jax_s_bit_for_bit(config, dtype, key):
    """ReLU keeps whether x > 0, which is its derivative: nothing is approximated. Zeros (jax's
    derivative at 0 is 0), infinities and NaN included; 13 channels, not a multiple of 8."""
    x = jax.random.normal(key, (3, 4, 13), dtype).at[0, 0, :4].set(jnp.array([0.0, -0.0, jnp.inf, jnp.nan], dtype))
    g = jax.random.normal(jax.random.key(7), x.shape, dtype)

    def forward_and_vjp(relu):
        y, vjp = jax.vjp(relu, x)
        return y, vjp(g)[0]

    got = jax.jit(lambda: forward_and_vjp(lambda x: ops.relu(x, config)[0]))()
    chex.assert_trees_all_equal(got, jax.jit(lambda: forward_and_vjp(jax.nn.relu))())


def test_relu_keeps_one_bit_per_element(key):
    x = jax.random.normal(key, (3, 4, 13))
    kept = memory.saved_residuals(lambda x: ops.relu(x, CONFIG)[0], x)
    words = [r for r in kept if r.shape != (1,)]  # besides the codes' scale and shift, one float each
    assert [(r.shape, r.dtype) for r in words] == [((3, 4, 2), jnp.uint8)]  # a row's 13 bits in 2 bytes
    assert "mesa_residual" in words[0].source and len(kept) == 3
