"""Pallas pack/unpack kernels in interpret mode against the jnp reference, and the backend choice."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from mesa_jax import QuantConfig, quant
from mesa_jax.models import vit
from pallas_kernels import arithmetic, pack as kernels

from conftest import CHANNEL_SHAPES, HEAD_SHAPES, first_fast

SEED = jnp.uint32(21)
# The CPU runs the kernels in the interpreter; benchmarks/gpu_check.sh sets "triton" on a GPU.
KERNELS = pallas_kernels.backend(os.environ.get("MESA_JAX_TEST_KERNELS", "triton-interpret"))
# Ragged and DeiT-like rows: 197 tokens, odd widths.
KERNEL_SHAPES = [(s, "channels") for s in CHANNEL_SHAPES + [(2, 5, 37), (1, 3, 197)]] + [
    (s, "heads") for s in HEAD_SHAPES + [(1, 2, 197, 197)]
]
# The interpreter is slow: the default run checks two shapes (a channel tensor whose rows the
# block does not divide, a head tensor) at the first setting; the rest of the matrix is marked
# slow (benchmarks/gpu_check.sh runs it all, compiled).
KERNEL_FAST = [c if c in (((2, 5, 37), "channels"), (HEAD_SHAPES[0], "heads")) else pytest.param(*c, marks=pytest.mark.slow)
               for c in KERNEL_SHAPES]


def stats_for(x, layout, config):
    return quant.stats_of(x, layout, quant.num_groups_for(x.shape, layout, config))


def both(config):
    """(config on the jnp reference, config on the kernels under test)."""
    return dataclasses.replace(config, backend=pallas_kernels.XLA), dataclasses.replace(config, backend=KERNELS)


def test_the_default_is_xla_and_backends_are_named_objects(monkeypatch):
    monkeypatch.setenv("MESA_JAX_IMPL", "pallas")  # no environment variable decides it
    assert QuantConfig().backend == pallas_kernels.XLA and not QuantConfig().backend.kernels
    assert QuantConfig(backend="triton-interpret").backend == pallas_kernels.TRITON_INTERPRET
    assert QuantConfig(backend="triton").backend == pallas_kernels.Backend("triton", interpret=False)
    with pytest.raises(ValueError, match="unknown mesa_jax backend 'cuda'"):
        QuantConfig(backend="cuda")
    with pytest.raises(ValueError, match="goes with the 'triton' backend"):
        pallas_kernels.Backend("xla", interpret=True)


def test_the_residual_records_the_backend_that_packed_it(key):
    """Unpacking (and the fused backward) follow the residual, never a setting read later."""
    x = jax.random.normal(key, (2, 5, 8))
    for config in both(QuantConfig()):
        packed = quant.pack(x, stats_for(x, "channels", config), config, SEED)
        assert packed.backend == config.backend
    empty = jnp.zeros((0, 5, 8))
    packed = quant.pack(empty, quant.init_stats(1), both(QuantConfig())[1], SEED)
    assert packed.backend == pallas_kernels.XLA and quant.unpack(packed).shape == empty.shape  # no kernel grid of 0


def with_non_finite(x):
    flat = x.reshape(-1)
    return flat.at[1].set(jnp.nan).at[x.shape[-1] + 2].set(jnp.inf).at[-1].set(-jnp.inf).reshape(x.shape)


@pytest.mark.parametrize("shape, layout", KERNEL_FAST, ids=str)
@pytest.mark.parametrize("bits", first_fast([8, 4, 2]))
def test_kernel_codes_and_statistics_are_the_reference_s(shape, layout, bits, key):
    """Words, and the running statistics updated with the range measured in the same read."""
    groups = 4 if layout == "channels" and shape[-1] % 4 == 0 else 1
    for stochastic in (True, False):
        reference, kernel = both(QuantConfig(bits=bits, num_groups=groups, stochastic=stochastic))
        x = with_non_finite(jax.random.normal(key, shape) * 2)
        stats = stats_for(x * 0.5 + 0.25, layout, reference)  # an estimate that clamps some of x
        want, want_stats = quant.pack_and_update(x, stats, reference, SEED, layout)
        got, got_stats = quant.pack_and_update(x, stats, kernel, SEED, layout)
        np.testing.assert_array_equal(got.words, want.words)
        np.testing.assert_array_equal(got.scale, want.scale)
        for a, b in zip(got_stats, want_stats):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(2, 5, 37), (1, 3, 197), (2, 4, 64)], ids=str)
@pytest.mark.parametrize("dtype", first_fast([jnp.float32, jnp.bfloat16]))
def test_kernel_normalizes_rows_as_it_packs(shape, dtype, key):
    """LayerNorm's residual: (x - mean) * rstd packed, and its range measured, in one read."""
    from mesa_jax import ops

    reference, kernel = both(QuantConfig(num_groups=2 if shape[-1] % 2 == 0 else 1))
    x = (jax.random.normal(key, shape) * 3 + 1).astype(dtype)
    moments = ops.row_moments(x)
    stats = stats_for(ops.normalized_input(x)[0], "channels", reference)
    want, want_stats = quant.pack_and_update(x, stats, reference, SEED, normalized_by=moments)
    got, got_stats = quant.pack_and_update(x, stats, kernel, SEED, normalized_by=moments)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_array_equal(got.words, want.words)
    for a, b in zip(got_stats, want_stats):
        np.testing.assert_array_equal(a, b)


def test_kernel_statistics_of_groups_without_finite_entries():
    config = QuantConfig(num_groups=2, stochastic=False, backend=KERNELS)
    x = jnp.array([[jnp.nan, jnp.inf, 1.0, 3.0], [-jnp.inf, jnp.nan, 2.0, -1.0]])
    _, after = quant.pack_and_update(x, quant.init_stats(2), config, SEED)
    np.testing.assert_array_equal(after.lo, [0.0, -1.0])
    np.testing.assert_array_equal(after.span, [0.0, 4.0])


@pytest.mark.parametrize("shape, layout", KERNEL_FAST, ids=str)
@pytest.mark.parametrize("dtype", first_fast([jnp.float32, jnp.bfloat16]))
def test_kernel_unpack_matches_the_reference(shape, layout, dtype, key):
    reference, kernel = both(QuantConfig(bits=4))
    x = (jax.random.normal(key, shape) * 3).astype(dtype)
    packed = quant.pack(x, stats_for(x, layout, reference), reference, SEED, layout)
    want = quant.unpack(packed)
    got = quant.unpack(dataclasses.replace(packed, backend=KERNELS))
    assert got.dtype == want.dtype == dtype and got.shape == shape
    # shift + code * scale: identical up to XLA contracting it into a fused multiply-add
    tolerance = 2 * float(jnp.finfo(dtype).eps) * float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=tolerance, rtol=0)


def test_kernels_clamp_out_of_range_values():
    config = QuantConfig(stochastic=False, backend=KERNELS)
    stats = quant.Stats(jnp.array([0.0]), jnp.array([1.0]), jnp.array(3))
    x = jnp.array([[-5.0, 0.5, 7.0, jnp.nan, jnp.inf]])
    xh = quant.unpack(quant.pack(x, stats, config, SEED))
    np.testing.assert_allclose(xh[0, [0, 2, 3, 4]], [0.0, 1.0, 0.0, 1.0])


def hard_rows(x):
    """x with rows that test a row's own range: constant, zeros, NaN and inf, one huge element
    (past the row grid's +-2**126 limit), and tiny values."""
    flat = x.reshape(-1, x.shape[-1])
    flat = flat.at[0].set(3.0).at[1].set(0.0).at[2, :3].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
    flat = flat.at[3, 5].set(1e38).at[4].multiply(1e-30)
    return flat.reshape(x.shape)


# (shape, layout, groups, stochastic, LayerNorm's normalization): rows of one range; two
# channel groups of 32; a head's rows of 20 (rows under quant.ROW_MIN keep the running range)
ROW_KERNEL_CASES = [((2, 5, 37), "channels", 1, True, False), ((2, 4, 64), "channels", 2, False, True),
                    ((1, 2, 20, 20), "heads", 1, True, False)]


@pytest.mark.parametrize("shape, layout, groups, stochastic, normalize",
                         [c if c[1] == "heads" or c[3] else pytest.param(*c, marks=pytest.mark.slow)
                          for c in ROW_KERNEL_CASES], ids=str)  # each layout in the default run
@pytest.mark.parametrize("bits", first_fast([8, 4]))
def test_row_range_kernel_codes_scales_and_statistics_are_the_reference_s(shape, layout, groups, stochastic,
                                                                          normalize, bits, key):
    """One read per row: the row's range, then its codes on the same bfloat16 grid, bit for bit;
    the unpack kernel reads the per-row scales back."""
    from mesa_jax import ops

    reference, kernel = both(QuantConfig(bits=bits, num_groups=groups, stochastic=stochastic, ranges="row"))
    x = hard_rows(jax.random.normal(key, shape) * 2)
    moments = ops.row_moments(jnp.nan_to_num(x)) if normalize else None
    stats = stats_for(jnp.nan_to_num(x), layout, reference)
    want, want_stats = quant.pack_and_update(x, stats, reference, SEED, layout, normalized_by=moments)
    got, got_stats = quant.pack_and_update(x, stats, kernel, SEED, layout, normalized_by=moments)
    assert got.rows and got.scale.dtype == quant.ROW_SCALE_DTYPE and got.backend == KERNELS
    pairs = [(got.words, want.words), (got.scale, want.scale), (got.shift, want.shift), *zip(got_stats, want_stats)]
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(quant.unpack(got), quant.unpack(want))  # shift + code * scale, both ways


@pytest.mark.slow  # a whole ViT's gradient through the interpreted kernels (about 10 s cold); gpu_check runs it
def test_whole_vit_gradients_are_the_same_under_the_kernels():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    def grads(config):
        model = vit.create("vit-c100", num_classes=10, width=24, depth=1, num_heads=2, mlp_dim=48, drop_path=0.0,
                           patch_size=8, quant=config)  # 17 tokens: the interpreter runs row by row
        variables = jax.jit(model.init)(jax.random.key(1), images)

        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, images, mutable=["mesa"])
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

        return jax.jit(jax.grad(loss))(variables["params"])

    want, got = (grads(config) for config in both(QuantConfig(num_groups=2)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits, col_groups, normalize", [(8, 1, False), (2, 3, True)])
def test_kernels_lower_to_triton_for_cuda(bits, col_groups, normalize):
    """Cross-lowering on the CPU: the kernels are valid Triton programs (no GPU needed)."""
    x = jnp.ones((4, 195), jnp.bfloat16)
    ones, zeros = jnp.ones(195), jnp.zeros(195)
    moments = (jnp.zeros(4), jnp.ones(4)) if normalize else ()
    f = lambda x: kernels.pack_rows(x, zeros, ones, jnp.zeros(4), jnp.ones(4), 3, *moments, bits=bits,
                                    stochastic=True, col_groups=col_groups)[0]
    d = kernels.dequantization_params(jnp.zeros(1), jnp.ones(1), (4, 195), "channels", bits)
    g = lambda w: kernels.unpack_rows(w, d.row, d.col_shift, d.col_scale, bits=bits, length=195, dtype=jnp.bfloat16)
    # row ranges: the two-pass row kernel, and unpacking with per-row pairs of col_groups groups
    f_rows = lambda x: kernels.pack_rows_with_ranges(x, 3, *moments, bits=bits, stochastic=True,
                                                     col_groups=col_groups)[0]
    r = kernels.dequantization_params(jnp.zeros((4, col_groups)), jnp.ones((4, col_groups)), (4, 195), "channels",
                                      bits, row_ranges=True)
    g_rows = lambda w: kernels.unpack_rows(w, r.row, r.col_shift, r.col_scale, bits=bits, length=195,
                                           dtype=jnp.bfloat16, slots=r.slots, group_len=r.group_len)
    words = jax.eval_shape(f, x)
    for fn, arg in ((f, x), (g, words), (f_rows, x), (g_rows, words)):
        text = jax.jit(fn).trace(arg).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()


@pytest.mark.parametrize("approximate", [False, True])
def test_kernel_erf_and_gelu_derivative_match_jax(approximate):
    from pallas_kernels import fused

    x = jnp.linspace(-6, 6, 1001)
    bound = 1.5e-7 + 3 * float(jnp.finfo(jnp.float32).eps)  # A&S 7.1.26, plus float32 evaluation
    np.testing.assert_allclose(fused.erf(x), jax.lax.erf(x), atol=bound, rtol=0)
    want = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=approximate)))(x)
    # the derivative sums terms as large as 1 + |x|: a few float32 ulp of that, either way
    term_bound = bound + 3 * float(jnp.finfo(jnp.float32).eps) * (1 + jnp.abs(x))
    assert jnp.all(jnp.abs(arithmetic.gelu_derivative(x, approximate, fused.erf) - want) <= term_bound)


FUSED_CASES = [
    ("gelu", (2, 5, 37), "channels"), ("gelu", (1, 3, 197), "channels"),
    ("softmax", (2, 3, 5, 5), "heads"), ("softmax", (1, 2, 197, 197), "heads"), ("softmax", (2, 5, 37), "channels"),
    ("layer_norm", (2, 5, 37), "channels"), ("layer_norm", (3, 7, 64), "channels"),
    ("layer_norm_no_scale", (1, 3, 197), "channels"),
]


def fused_case(op, shape, key):
    """((stats, config) -> the op as a function of its differentiable inputs, those inputs,
    the tensor the op keeps)."""
    from mesa_jax import ops

    x = jax.random.normal(key, shape) * 2 + 0.5
    if op == "gelu":
        return lambda stats, config: lambda x: ops.gelu(x, stats, SEED, config)[0], (x,), x
    if op == "softmax":
        return lambda stats, config: lambda x: ops.softmax(x, stats, SEED, config)[0], (x,), jax.nn.softmax(x)
    params = jax.random.normal(jax.random.key(3), (2, shape[-1]))
    if op == "layer_norm_no_scale":
        make = lambda stats, config: lambda x: ops.layer_norm(x, None, None, stats, SEED, config)[0]
        return make, (x,), ops.normalized_input(x)[0]
    make = lambda stats, config: lambda x, scale, bias: ops.layer_norm(x, scale, bias, stats, SEED, config)[0]
    return make, (x, *params), ops.normalized_input(x)[0]


# one case of each op in the default run (the first listed), the others and 4 bits under -m slow
FUSED_FAST = [case if case[0] not in [c[0] for c in FUSED_CASES[:i]] else pytest.param(*case, marks=pytest.mark.slow)
              for i, case in enumerate(FUSED_CASES)]


@pytest.mark.parametrize("op, shape, layout", FUSED_FAST, ids=str)
@pytest.mark.parametrize("bits", first_fast([8, 4]))
def test_fused_backward_kernels_match_the_xla_backward(op, shape, layout, bits, key):
    config = QuantConfig(bits=bits, num_groups=2 if op.startswith("layer_norm") and shape[-1] % 2 == 0 else 1)
    assert_fused_backward_is_the_xla_one(op, shape, layout, config, key)


def assert_fused_backward_is_the_xla_one(op, shape, layout, config, key):
    make, inputs, kept = fused_case(op, shape, key)
    stats = stats_for(kept, layout, config)
    g = jax.random.normal(jax.random.key(7), shape)
    want, got = (jax.vjp(make(stats, c), *inputs)[1](g) for c in both(config))
    # same codes; float32 formulas in another order (and A&S erf): a few ulp of the result,
    # and of each of the (at most 21) rows summed into a parameter gradient
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * float(jnp.max(jnp.abs(b))))


# the default run: LayerNorm's blocks of rows with two groups each; GELU's and softmax's rows under -m slow
@pytest.mark.parametrize("op, shape, layout", [pytest.param("gelu", (2, 5, 37), "channels", marks=pytest.mark.slow),
                                              pytest.param("softmax", (1, 2, 20, 20), "heads", marks=pytest.mark.slow),
                                              ("layer_norm", (3, 7, 64), "channels")], ids=str)
def test_fused_backward_kernels_read_per_row_scales(op, shape, layout, key):
    """As the running-range case above, with each row's own (shift, scale) per channel group."""
    config = QuantConfig(bits=4, num_groups=2 if op == "layer_norm" else 1, ranges="row")
    assert_fused_backward_is_the_xla_one(op, shape, layout, config, key)


@pytest.mark.parametrize("row_ranges", [False, True])
@pytest.mark.parametrize("name", ["gelu_backward", "softmax_backward", "layer_norm_backward"])
def test_fused_kernels_lower_to_triton_for_cuda(name, row_ranges):
    from pallas_kernels import fused

    words = jax.ShapeDtypeStruct((4, 197), quant.WORD)
    g = jax.ShapeDtypeStruct((4, 197), jnp.bfloat16)
    shift, scale = (jnp.zeros((4, 3)), jnp.ones((4, 3))) if row_ranges else (jnp.zeros(1), jnp.ones(1))
    if name == "layer_norm_backward":
        fn = lambda w, g: fused.layer_norm_backward(w, shift, scale, jnp.ones((4, 1)), g, jnp.ones(197), bits=8,
                                                    row_ranges=row_ranges)
    else:
        extra = {"approximate": False} if name == "gelu_backward" else {}
        fn = lambda w, g: getattr(fused, name)(w, shift, scale, g, layout="channels", bits=8, row_ranges=row_ranges,
                                               **extra)
    text = jax.jit(fn).trace(words, g).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()
