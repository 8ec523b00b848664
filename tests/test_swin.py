"""Swin Transformer in stock flax, compressed: the paper's shapes, masks and bias; mesa's forward is the baseline's."""

import jax
import numpy as np
import pytest

from mesa_jax import quant
from mesa_jax.models import swin

from pyramid_cases import assert_forward_is_the_baseline_s, assert_gradient_error_scales_with_the_step, init

TINY = dict(image_size=32, patch_size=2, embed_dim=12, depths=(2, 2, 1), num_heads=(3, 3, 6), window_size=4)


def tiny(quant="per_head", **overrides):
    return swin.create("swin-c100", num_classes=10, quant=quant, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


@pytest.mark.parametrize("size, window, shift", [(4, 2, 1), (8, 4, 2), (12, 4, 2)])
def test_shifted_window_mask_keeps_wrapped_tokens_apart(size, window, shift):
    """Direct construction: after rolling by -shift, a token wrapped around (row or column >=
    size - shift) may attend only to tokens wrapped the same way, within its window."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    wrapped = np.stack([rows >= size - shift, cols >= size - shift], axis=-1).astype(int)  # [H, W, 2]
    side = np.asarray(swin.window_partition(wrapped[None], window))  # [windows, N, 2]
    want = np.all(side[:, :, None] == side[:, None, :], axis=-1)
    np.testing.assert_array_equal(swin.shifted_window_mask(size, size, window, shift), want)
    assert not want.all()  # some pairs are masked


def test_windows_round_trip_and_relative_positions():
    x = jax.random.normal(jax.random.key(2), (2, 8, 12, 5))
    windows = swin.window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 5)
    np.testing.assert_array_equal(windows[1], x[0, 0:4, 4:8].reshape(16, 5))  # row-major windows
    np.testing.assert_array_equal(swin.window_reverse(windows, 4, 8, 12), x)
    index = swin.relative_position_index(3)
    assert index.shape == (9, 9) and index.min() == 0 and index.max() == 5 * 5 - 1
    assert (np.diag(index) == 2 * 5 + 2).all()  # zero offset: the table's centre
    assert index[0, 8] == 0 and index[8, 0] == 5 * 5 - 1  # offsets (-2, -2) and (2, 2)


def test_stages_halve_the_grid_and_double_the_width(images):
    model = tiny(quant=None)
    variables = jax.eval_shape(model.init, jax.random.key(1), images)  # shapes only: nothing compiled
    _, state = jax.eval_shape(lambda v: model.apply(v, images, capture_intermediates=True, mutable=["intermediates"]),
                              variables)
    shapes = {k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k.startswith("stage_")}
    assert shapes["stage_0_block_1"] == (2, 16, 16, 12) and shapes["stage_0_merge"] == (2, 8, 8, 24)
    assert shapes["stage_1_block_1"] == (2, 8, 8, 24) and shapes["stage_1_merge"] == (2, 4, 4, 48)
    assert shapes["stage_2_block_0"] == (2, 4, 4, 48)  # a grid of one window


@pytest.mark.slow  # the whole model compiled twice (7 s each); the default run checks its stages and what it keeps
def test_mesa_forward_and_params_are_the_baseline_s(images):
    assert_forward_is_the_baseline_s(tiny(quant=None), tiny(), images)


@pytest.mark.slow  # three compiled gradients of the model (about 40 s cold)
def test_the_gradient_error_scales_with_the_step(images):
    assert_gradient_error_scales_with_the_step(tiny, images, num_groups=3)

def test_attention_is_packed_per_head_and_the_bias_stays_exact(images):
    variables = init(tiny(), images)
    attn = variables["mesa"]["stage_1_block_1"]["attn"]
    assert {k: v.lo.shape for k, v in attn.items() if isinstance(v, quant.Stats)} == {
        f"dot_product_attention_0_{t}": (3,) for t in "qkv"}
    assert "relative_position_bias_table" in variables["params"]["stage_1_block_1"]["attn"]


@pytest.mark.parametrize("name, overrides, match", [
    ("swin-x", {}, r"valid names: \['swin-c100', 'swin-s', 'swin-ti'\]"),
    ("swin-c100", {"window_size": 3}, "not a multiple of window"),
    ("swin-c100", {"num_heads": (5, 6, 12, 24)}, "does not divide"),
])
def test_bad_configurations_say_what_is_wrong(name, overrides, match, images):
    with pytest.raises(ValueError, match=match):
        model = swin.create(name, num_classes=10, quant=None, **overrides)
        model.init(jax.random.key(0), images)
