"""QuantConfig(ranges="row"): each row packs with its own range, kept in bfloat16 next to its codes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mesa_jax.nn as mnn
from mesa_jax import Policy, QuantConfig, ops, policy, quant
from mesa_jax.policy import KINDS

from conftest import first_fast

ROW = QuantConfig(ranges="row", stochastic=False)
SEED = jnp.uint32(7)


def reference(x: np.ndarray, groups: int, bits: int):
    """Plain numpy: per row and channel group, finite min/max clipped to +-2**126, shift
    rounded down and scale up to bfloat16, nearest codes clamped to [0, levels]."""
    levels = 2**bits - 1
    xr = x.reshape(*x.shape[:-1], groups, -1).astype(np.float32)
    finite = np.isfinite(xr)
    lo = np.where(finite, xr, np.inf).min(-1)
    hi = np.where(finite, xr, -np.inf).max(-1)
    empty = ~np.isfinite(lo)
    lo, hi = np.where(empty, 0, lo), np.where(empty, 0, hi)
    lo, hi = np.clip(lo, -2.0**126, 2.0**126), np.clip(hi, -2.0**126, 2.0**126)

    def rounded(v, down):
        r = v.astype(ml_dtypes.bfloat16)
        off = r.astype(np.float32) > v if down else r.astype(np.float32) < v
        return np.where(off, np.nextafter(r, ml_dtypes.bfloat16(-np.inf if down else np.inf)), r)

    shift = rounded(lo, True)
    scale = rounded(np.maximum(hi - shift.astype(np.float32), np.float32(1e-8)) * np.float32(1 / levels), False)
    inv = np.float32(1) / scale.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and huge entries: clipped below
        v = np.floor((xr - shift.astype(np.float32)[..., None]) * inv[..., None] + np.float32(0.5))
    codes = np.where(np.isnan(v), 0, np.clip(v, 0, levels)).astype(np.uint32)
    return codes.reshape(x.shape), shift, scale


def packed_rows(x, groups=1, bits=8, layout="channels", config=ROW):
    config = QuantConfig(ranges="row", stochastic=config.stochastic, bits=bits, num_groups=groups)
    return quant.pack_and_update(x, quant.init_stats(quant.num_groups_for(x.shape, layout, config)), config, SEED,
                                 layout)


@pytest.mark.parametrize("shape", first_fast([(2, 5, 32), (3, 7, 48)]))  # rows of >= quant.ROW_MIN per range
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bits", [8, 4])
def test_codes_and_scales_equal_a_numpy_reference(shape, groups, bits, key):
    x = jax.random.normal(key, shape) * jnp.exp(jax.random.normal(jax.random.key(3), shape[:-1] + (1,)))
    packed, _ = packed_rows(x, groups, bits)
    codes, shift, scale = reference(np.asarray(x), groups, bits)
    np.testing.assert_array_equal(quant.unpack_codes(packed.words, bits, shape[-1]), codes)
    np.testing.assert_array_equal(np.asarray(packed.shift), shift)
    np.testing.assert_array_equal(np.asarray(packed.scale), scale)
    assert packed.scale.dtype == jnp.bfloat16 and packed.scale.shape == (*shape[:-1], groups)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_zeros_constants_non_finite_and_huge_rows_stay_finite(bits):
    rows = jnp.array([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [1.0, jnp.nan, jnp.inf, -jnp.inf],
                      [jnp.nan] * 4, [3e38, -3e38, 1.0, 2.0], [-3.4e38] * 4, [1e-30, 0, 0, 0]])
    x = jnp.tile(rows, (1, quant.ROW_MIN // 4))
    packed, stats = packed_rows(x, bits=bits)
    assert packed.rows
    back = quant.unpack(packed)
    assert bool(jnp.all(jnp.isfinite(back))) and bool(jnp.all(jnp.isfinite(stats.lo) & jnp.isfinite(stats.span)))
    np.testing.assert_array_equal(back[:2], x[:2])  # zeros and constants come back exactly
    np.testing.assert_array_equal(back[3], 0.0)  # a row of NaN packs to zero
    codes, _, _ = reference(np.asarray(x), 1, bits)
    np.testing.assert_array_equal(quant.unpack_codes(packed.words, bits, x.shape[-1]), codes)


def test_a_single_huge_element_costs_only_its_row():
    x = jax.random.normal(jax.random.key(0), (4, 64))
    x = x.at[2, 5].set(1e6)
    packed = packed_rows(x)[0]
    err = jnp.abs(quant.unpack(packed) - x).max(axis=-1)
    assert float(packed.scale[2, 0]) > 1e3  # 1e6 / 255: that row's step
    assert float(jnp.delete(err, 2).max()) < 0.03  # the other rows keep their own fine step


def test_attention_rows_are_per_head(key):
    q = jax.random.normal(key, (2, 5, 3, 16)) * jnp.array([0.1, 1.0, 10.0]).reshape(1, 1, 3, 1)
    packed, stats = packed_rows(q, layout=2)
    assert packed.scale.shape == (2, 5, 3, 1) and stats.lo.shape == (3,)  # the running statistics: per head
    step = packed.scale.astype(jnp.float32)
    assert bool(jnp.all(jnp.abs(quant.unpack(packed) - q) <= step * 0.5 + 1e-6))


def test_short_rows_keep_the_running_range():
    """An RGB image's rows of 3 would take 4 bytes of scale and shift for 3 of codes."""
    image = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    packed, _ = packed_rows(image)
    assert not packed.rows and packed.scale.shape == (1,)


def test_memory_adds_four_bytes_per_row_and_group():
    x = jnp.ones((2, 197, 384))
    running = quant.pack(x, quant.init_stats(6), QuantConfig(num_groups=6), SEED)
    rows = packed_rows(x, groups=6)[0]
    assert rows.nbytes - running.nbytes == 2 * 197 * 6 * 4 - 2 * 6 * 4


@pytest.mark.parametrize("bits", [pytest.param(8, marks=pytest.mark.slow), 4])  # the same bound at both widths
def test_gradients_are_within_the_bound_of_each_row_s_step(bits, key):
    """A dense layer's kernel gradient with nearest row ranges differs from the exact one by
    x_err^T g, |x_err| <= step / 2 per row: the bound below, elementwise."""
    x = jax.random.normal(key, (6, 16)) * jnp.exp(jnp.arange(6.0))[:, None]
    w = jax.random.normal(jax.random.key(1), (16, 4))
    g = jax.random.normal(jax.random.key(2), (6, 4))
    config = QuantConfig(ranges="row", stochastic=False, bits=bits)
    stats = quant.init_stats(1)
    fn = lambda w: ops.dense(x, w, None, stats, SEED, config)[0]
    grad = jax.vjp(fn, w)[1](g)[0]
    exact = x.T @ g
    step = jnp.broadcast_to(quant.pack_and_update(x, stats, config, SEED)[0].scale.astype(jnp.float32), x.shape)
    bound = (step / 2).T @ jnp.abs(g)
    assert bool(jnp.all(jnp.abs(grad - exact) <= bound * (1 + 1e-5) + 1e-5))
    assert float(jnp.abs(grad - exact).max()) > 0


def test_a_layer_trains_with_row_ranges_and_updates_its_running_statistics(key):
    layer = mnn.Dense(4, quant=QuantConfig(ranges="row"))
    x = jax.random.normal(key, (3, 16))
    variables = layer.init(jax.random.key(0), x)
    y, state = layer.apply(variables, x, mutable=["mesa"])
    np.testing.assert_array_equal(y, mnn.Dense(4, quant=None).apply(variables, x))
    assert int(state["mesa"]["inputs"].count) == 1


def test_bad_ranges_names_raise():
    with pytest.raises(ValueError, match=r"QuantConfig.ranges must be one of \['running', 'row'\], got 'rows'"):
        QuantConfig(ranges="rows")


def test_the_policy_mix_picks_bits_per_layer_kind():
    mix = policy.int4_with_int8_attention(num_groups=2)
    assert mix.resolve("dense", "block_0/mlp/fc1").bits == 4 and mix.resolve("gelu", "x").bits == 4
    for kind in ("attention", "softmax", "matmul"):
        assert mix.resolve(kind, "block_0/attn").bits == 8
    assert mix.resolve("dense", "any").ranges == "row" and mix.resolve("dense", "any").num_groups == 2
    low = Policy(policy.int4_row_ranges(num_groups=2))
    assert {low.resolve(kind, "x") for kind in KINDS} == {QuantConfig(bits=4, num_groups=2, ranges="row")}
    custom = Policy(QuantConfig(bits=8), by_kind={"gelu": QuantConfig(bits=2)}, overrides={"head": None})
    assert custom.resolve("gelu", "block_0/gelu_0").bits == 2 and custom.resolve("dense", "head") is None
    with pytest.raises(ValueError, match="unknown layer kind"):
        Policy(by_kind={"mlp": QuantConfig()})
