"""Packing, statistics and stochastic rounding of mesa_jax.quant."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesa_jax import quant
from mesa_jax.quant import QuantConfig

from conftest import CHANNEL_SHAPES, HEAD_SHAPES, conditionals, first_fast

SEED = jnp.uint32(7)


def roundtrip(x, config, layout="channels", seed=SEED):
    groups = quant.num_groups_for(x.shape, layout, config)
    stats = quant.stats_of(x, layout, groups)
    packed = quant.pack(x, stats, config, seed, layout)
    return packed, quant.unpack(packed), stats


def step_of(stats, config, layout, shape):
    """The quantization step of each element of a tensor of ``shape``."""
    step = jnp.maximum(stats.span, quant.EPS) / config.levels
    view = quant.grouped_shape(shape, layout, step.shape[0])
    return jnp.broadcast_to(step.reshape(1, -1, 1), view).reshape(shape)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(bits=3), "bits"), (dict(bits=16), "bits"), (dict(num_groups=0), "num_groups"),
     (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=-0.1), "ema_decay"),
     (dict(update_first=1), "update_first"), (dict(bits=8.0), "bits"), (dict(bits=True), "bits"),
     (dict(num_groups=2.0), "num_groups"), (dict(backend="cuda"), "backend 'cuda'")],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def test_config_is_hashable_and_frozen():
    assert hash(QuantConfig()) == hash(QuantConfig())
    with pytest.raises(AttributeError):
        QuantConfig().bits = 4


def test_indivisible_channels_name_c_and_groups():
    with pytest.raises(ValueError, match=r"num_groups=3.*C=8"):
        quant.num_groups_for((2, 8), "channels", QuantConfig(num_groups=3))


def test_heads_layout_needs_rank_4():
    with pytest.raises(ValueError, match=r"\[B, H, N, M\]"):
        quant.num_groups_for((2, 8), "heads", QuantConfig())


def test_stats_with_wrong_group_count_are_rejected():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="2 groups"):
        quant.pack(x, quant.init_stats(2), QuantConfig(num_groups=4), SEED)
    for update_first in (False, True):
        with pytest.raises(ValueError, match="2 groups.*needs 4"):
            quant.pack_and_update(x, quant.init_stats(2), QuantConfig(num_groups=4, update_first=update_first), SEED)


@pytest.mark.parametrize("shape", first_fast(CHANNEL_SHAPES))
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_nearest_rounding_error_is_half_a_step(key, shape, groups):
    config = QuantConfig(num_groups=groups, stochastic=False)
    x = jax.random.normal(key, shape) * 3
    packed, xh, stats = roundtrip(x, config)
    step = step_of(stats, config, "channels", shape)
    assert xh.shape == x.shape and xh.dtype == x.dtype
    assert jnp.all(jnp.abs(xh - x) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("shape", HEAD_SHAPES)
def test_heads_have_one_range_each(key, shape):
    config = QuantConfig()
    x = jax.random.normal(key, shape) * jnp.arange(1, shape[1] + 1).reshape(1, -1, 1, 1)
    packed, xh, stats = roundtrip(x, config, "heads")
    assert packed.scale.shape == (shape[1],)
    np.testing.assert_allclose(stats.lo, jnp.min(x, axis=(0, 2, 3)), rtol=1e-6)
    assert jnp.all(jnp.abs(xh - x) <= step_of(stats, config, "heads", shape) * (1 + 1e-5))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_really_take_bits_per_element(bits):
    x = jnp.linspace(-1, 1, 3 * 64).reshape(3, 64)
    packed, _, _ = roundtrip(x, QuantConfig(bits=bits))
    assert packed.words.dtype == jnp.uint8
    assert packed.words.nbytes == x.size * bits // 8
    assert packed.nbytes == x.size * bits // 8 + 8  # + one float32 scale and shift


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_codes_round_trips_ragged_sizes(bits):
    codes = jnp.arange(3 * 37, dtype=jnp.uint32).reshape(3, 37) % (2**bits)
    words = quant.pack_codes(codes, bits)
    assert words.shape == (3, math.ceil(37 * bits / 8))  # rows padded to whole bytes
    np.testing.assert_array_equal(quant.unpack_codes(words, bits, 37), codes)


def test_stochastic_rounding_is_unbiased(key):
    config = QuantConfig(bits=2)
    x = jax.random.uniform(key, (4, 16), minval=-1, maxval=1)
    stats = quant.stats_of(x, "channels", 1)
    seeds = jnp.arange(4000, dtype=jnp.uint32)
    samples = jax.jit(jax.vmap(lambda s: quant.fake_quantize(x, stats, config, s)))(seeds)
    step = float(stats.span[0]) / config.levels
    # Each sample lies within one step of x with mean x: variance <= step**2 / 4.
    bound = 5 * step / (2 * math.sqrt(len(seeds)))
    assert jnp.max(jnp.abs(samples.mean(0) - x)) <= bound
    # and the rounding is really random, not nearest:
    assert jnp.mean(jnp.abs(samples[0] - samples[1])) > 0.1 * step


def test_same_seed_same_codes_other_seed_other_codes(key):
    x = jax.random.normal(key, (8, 32))
    a, _, _ = roundtrip(x, QuantConfig(), seed=jnp.uint32(1))
    b, _, _ = roundtrip(x, QuantConfig(), seed=jnp.uint32(1))
    c, _, _ = roundtrip(x, QuantConfig(), seed=jnp.uint32(2))
    np.testing.assert_array_equal(a.words, b.words)
    assert not np.array_equal(a.words, c.words)


def test_hash_noise_is_uniform():
    u = quant.noise(jnp.uint32(3), (256, 256))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    hist = np.histogram(np.asarray(u), bins=16, range=(0, 1))[0] / u.size
    assert np.all(np.abs(hist - 1 / 16) < 0.005)


@pytest.mark.parametrize("stochastic", [True, False])
def test_out_of_range_values_clamp_never_wrap(stochastic):
    config = QuantConfig(stochastic=stochastic)
    stats = quant.Stats(jnp.array([0.0]), jnp.array([1.0]), jnp.array(5))
    x = jnp.array([[-100.0, -0.5, 0.5, 1.5, 100.0, jnp.inf, -jnp.inf]])
    xh = quant.fake_quantize(x, stats, config, SEED)
    np.testing.assert_array_equal(xh[0, [0, 1, 4, 5, 6]], [0.0, 0.0, 1.0, 1.0, 0.0])
    assert xh[0, 3] == 1.0
    assert abs(float(xh[0, 2]) - 0.5) <= 1 / 255


@pytest.mark.parametrize("value", [0.0, 3.25, -1e-3])
def test_constant_groups_come_back_exactly(value):
    x = jnp.full((4, 8), value)
    packed, xh, _ = roundtrip(x, QuantConfig(num_groups=2))
    np.testing.assert_array_equal(xh, x)
    assert jnp.all(jnp.isfinite(packed.scale))


def test_huge_and_non_finite_inputs_give_finite_statistics():
    x = jnp.array([[3e38, -3e38, jnp.nan, jnp.inf, 1.0, -jnp.inf, 0.0, 2.0]])
    packed, xh, stats = roundtrip(x, QuantConfig())
    assert jnp.all(jnp.isfinite(stats.lo)) and jnp.all(jnp.isfinite(stats.span))
    assert jnp.all(jnp.isfinite(packed.scale))
    assert jnp.all(jnp.isfinite(xh))


def test_all_non_finite_group_packs_to_zero():
    x = jnp.array([[jnp.nan, jnp.inf], [1.0, 2.0]])
    _, xh, stats = roundtrip(x, QuantConfig(num_groups=2))
    assert jnp.all(jnp.isfinite(xh))
    np.testing.assert_array_equal(stats.lo, [1.0, 2.0])


def test_bfloat16_round_trip_keeps_dtype(key):
    x = jax.random.normal(key, (4, 16), jnp.bfloat16)
    _, xh, stats = roundtrip(x, QuantConfig(stochastic=False))
    assert xh.dtype == jnp.bfloat16
    bf16_ulp = 2.0**-7 * float(jnp.max(jnp.abs(x)))
    assert jnp.max(jnp.abs(xh.astype(jnp.float32) - x.astype(jnp.float32))) <= (
        float(stats.span[0]) / 255 / 2 + bf16_ulp
    )


def test_first_update_initialises_then_ema(key):
    config = QuantConfig(num_groups=2, ema_decay=0.9)
    a = jax.random.normal(key, (5, 8))
    b = a * 2 + 1
    s1 = quant.update(quant.init_stats(2), a, config)
    np.testing.assert_allclose(s1.lo, a.reshape(5, 2, 4).min((0, 2)), rtol=1e-6)
    assert int(s1.count) == 1
    s2 = quant.update(s1, b, config)
    lo_b, hi_b = quant.group_min_max(b, "channels", 2)
    np.testing.assert_allclose(s2.lo, 0.9 * s1.lo + 0.1 * lo_b, rtol=1e-6)
    np.testing.assert_allclose(s2.span, 0.9 * s1.span + 0.1 * (hi_b - lo_b), rtol=1e-6)
    assert int(s2.count) == 2


def test_pack_and_update_packs_with_the_estimate_from_before_the_tensor(key):
    config = QuantConfig(stochastic=False)
    x = jax.random.normal(key, (3, 16))
    before = quant.Stats(jnp.array([-0.5]), jnp.array([1.0]), jnp.array(3))
    packed, after = quant.pack_and_update(x, before, config, SEED)
    np.testing.assert_array_equal(packed.words, quant.pack(x, before, config, SEED).words)  # clamped to [-0.5, 0.5]
    want = quant.update(before, x, config)
    np.testing.assert_array_equal(after.lo, want.lo)
    np.testing.assert_array_equal(after.span, want.span)
    assert int(after.count) == 4


def test_pack_and_update_measures_a_first_tensor_before_packing_it(key):
    config = QuantConfig(stochastic=False)
    x = jax.random.normal(key, (3, 16)) * 4
    packed, after = jax.jit(quant.pack_and_update, static_argnums=2)(x, quant.init_stats(1), config, SEED)
    own = quant.stats_of(x, "channels", 1)
    np.testing.assert_array_equal(packed.words, quant.pack(x, own, config, SEED).words)
    np.testing.assert_array_equal(after.lo, own.lo)
    np.testing.assert_array_equal(after.span, own.span)


def test_update_first_is_mesa_s_order(key):
    config = QuantConfig(stochastic=False, update_first=True)
    x = jax.random.normal(key, (3, 16)) * 4
    before = quant.Stats(jnp.array([-0.5]), jnp.array([1.0]), jnp.array(3))
    packed, after = quant.pack_and_update(x, before, config, SEED)
    want = quant.update(before, x, config)
    np.testing.assert_array_equal(after.span, want.span)
    np.testing.assert_array_equal(packed.words, quant.pack(x, want, config, SEED).words)


def test_normalized_by_packs_the_normalized_rows(key):
    config = QuantConfig(num_groups=2, stochastic=False)
    x = jax.random.normal(key, (3, 5, 16)) * 3 + 1
    moments = jnp.mean(x, -1, keepdims=True), jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-6)
    xn = quant.normalize_rows(x, moments)
    stats = quant.stats_of(xn, "channels", 2)
    packed, after = quant.pack_and_update(x, stats, config, SEED, normalized_by=moments)
    np.testing.assert_array_equal(packed.words, quant.pack(xn, stats, config, SEED).words)
    np.testing.assert_array_equal(after.lo, quant.update(stats, xn, config).lo)


def test_an_outlier_widens_the_estimate_by_at_most_its_growth_bound(key):
    """One element of 1e6 (or 3e38) among O(1) values: the new span is at most
    1 + 2 * GROWTH * (1 - decay) times the old one (1.2x at decay 0.9), not 1e5."""
    config = QuantConfig(num_groups=2)
    stats = quant.update(quant.init_stats(2), jax.random.normal(key, (64, 8)), config)
    for outlier in (1e6, -1e6, 3e38):
        x = jax.random.normal(jax.random.key(1), (64, 8)).at[5, 6].set(outlier)
        after = quant.update(stats, x, config)
        bound = 1 + 2 * quant.GROWTH * (1 - config.ema_decay)
        assert jnp.all(after.span <= stats.span * bound * (1 + 1e-6)), (outlier, after.span / stats.span)
        assert jnp.all(jnp.isfinite(after.lo)) and int(after.count) == 2


def test_a_change_of_scale_is_followed_by_the_growth_bound_per_step(key):
    config = QuantConfig()
    stats = quant.update(quant.init_stats(1), jax.random.normal(key, (64, 8)), config)
    for _ in range(40):  # the data's scale jumps 100x: the estimate follows, 1.2x a step
        stats = quant.update(stats, 100 * jax.random.normal(key, (64, 8)), config)
    lo, hi = quant.group_min_max(100 * jax.random.normal(key, (64, 8)), "channels", 1)
    np.testing.assert_allclose(stats.span, hi - lo, rtol=0.1)


@pytest.mark.parametrize("empty", [jnp.zeros((0, 8)), jnp.full((4, 8), jnp.nan), jnp.full((4, 8), jnp.inf)])
def test_an_empty_or_non_finite_batch_is_no_observation(empty, key):
    config = QuantConfig(num_groups=2)
    fresh = quant.init_stats(2)
    for a, b in zip(quant.update(fresh, empty, config), fresh):
        np.testing.assert_array_equal(a, b)
    x = jax.random.normal(key, (4, 8))
    warm = quant.update(fresh, x, config)
    for a, b in zip(quant.update(warm, empty, config), warm):
        np.testing.assert_array_equal(a, b)
    # after an empty first batch, the next one is still a first observation: its own range
    packed, after = quant.pack_and_update(x, quant.update(fresh, empty, config), config, SEED)
    np.testing.assert_array_equal(packed.words, quant.pack(x, quant.stats_of(x, "channels", 2), config, SEED).words)
    assert int(after.count) == 1


def test_a_zero_span_estimate_packs_with_the_tensor_s_own_range(key):
    """A constant dummy batch at init, or a zero-initialised layer's output, leaves a span of 0:
    no information about the spread of what comes next, so that is measured, not clamped to."""
    config = QuantConfig(stochastic=False)
    zero = quant.Stats(jnp.zeros(1), jnp.zeros(1), jnp.array(3))
    x = jax.random.normal(key, (3, 16))
    packed, after = quant.pack_and_update(x, zero, config, SEED)
    np.testing.assert_array_equal(packed.words, quant.pack(x, quant.stats_of(x, "channels", 1), config, SEED).words)
    np.testing.assert_allclose(after.span, quant.stats_of(x, "channels", 1).span, rtol=1e-6)  # taken as is


def test_packing_has_no_conditional_on_a_gpu():
    """The first observation is a select, not a lax.cond (a host round trip per tensor on a GPU).
    Lowered for CUDA (no GPU needed): no conditional; on XLA:CPU, one, always true (the boundary
    that keeps the codes materialized there: quant.kept_whole_on_cpu)."""
    x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    stats = quant.init_stats(1)
    for config in (QuantConfig(), QuantConfig(update_first=True), QuantConfig(ranges="row")):
        traced = jax.jit(quant.pack_and_update, static_argnums=2).trace(x, stats, config, SEED)
        assert conditionals(traced.lower(lowering_platforms=("cuda",))) == 0
        assert conditionals(traced.lower()) == (config.ranges == "running")


def _correlation(a, b):
    a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def test_noise_is_independent_across_steps_layers_and_transposed_pairs():
    """The sample correlation of n independent pairs has standard deviation 1/sqrt(n):
    every correlation must stay within 5 of those (a chance failure: ~6e-7)."""
    n = 1 << 16
    noise_at = lambda layer, step: quant.noise(quant.layer_seed(layer, jnp.uint32(step)), (n,))
    bound = 5 / np.sqrt(n)
    for step in (0, 1, 7, 1000):
        assert abs(_correlation(noise_at("block_0/mlp/fc1/inputs", step), noise_at("block_0/mlp/fc1/inputs", step + 1))) < bound
    assert abs(_correlation(noise_at("block_0/mlp/fc1/inputs", 3), noise_at("block_1/mlp/fc1/inputs", 3))) < bound
    assert abs(_correlation(noise_at("block_0/mlp/fc1/inputs", 3), noise_at("block_0/mlp/fc2/inputs", 3))) < bound
    # element i at step c against element c at step i, over a k x k grid of (i, c)
    k = 256
    grid = np.stack([np.asarray(quant.noise(quant.layer_seed("head/inputs", jnp.uint32(c)), (k,))) for c in range(k)])
    upper = np.triu_indices(k, 1)
    assert abs(_correlation(grid[upper], grid.T[upper])) < 5 / np.sqrt(len(upper[0]))
    # and one seed's noise is no shifted copy of another's
    a, b = (np.asarray(quant.noise(jnp.uint32(s), (n,))) for s in (1, 2))
    for shift in (1, 2, 1 << 10):
        assert abs(_correlation(a[shift:], b[:-shift])) < bound and abs(_correlation(a[:-shift], b[shift:])) < bound
