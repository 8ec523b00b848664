"""PVT v1 in stock flax, compressed: spatial-reduction attention (keys from a shorter sequence than
the queries), stages of different widths; mesa's forward is the baseline's."""

import jax
import pytest

from mesa_jax import quant
from mesa_jax.models import pvt

from pyramid_cases import assert_forward_is_the_baseline_s, assert_gradient_error_scales_with_the_step, init

TINY = dict(embed_dims=(8, 16, 24, 32), depths=(2, 1, 1, 1), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2))  # sr 4, 2, 1, 1


def tiny(quant="per_head", **overrides):
    return pvt.create("pvt-c100", num_classes=10, quant=quant, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def test_stages_and_reduction_ratios(images):
    """Stage grids 16, 8, 4, 2; keys and values from grids reduced 4x and 2x, then none."""
    model = tiny(quant=None)
    variables = jax.eval_shape(model.init, jax.random.key(1), images)  # shapes only: nothing compiled
    _, state = jax.eval_shape(lambda v: model.apply(v, images, capture_intermediates=True, mutable=["intermediates"]),
                              variables)
    def out_of(tree, path):
        for key in path:
            tree = tree[key]
        return tree["__call__"][0].shape

    assert out_of(state["intermediates"], ["stage_0_block_1"]) == (2, 256, 8)
    assert out_of(state["intermediates"], ["stage_0_block_0", "attn", "sr"]) == (2, 4, 4, 8)  # 16 / 4
    assert out_of(state["intermediates"], ["stage_1_block_0", "attn", "sr"]) == (2, 4, 4, 16)  # 8 / 2
    assert "sr" not in state["intermediates"]["stage_2_block_0"]["attn"]  # ratio 1: keys are the tokens
    assert out_of(state["intermediates"], ["stage_3_block_0"]) == (2, 1 + 4, 32)  # the class token + 2 x 2


@pytest.mark.slow  # the whole model compiled twice (7 s each); the default run checks its stages and what it keeps
def test_mesa_forward_and_params_are_the_baseline_s(images):
    assert_forward_is_the_baseline_s(tiny(quant=None), tiny(), images)


@pytest.mark.slow  # three compiled gradients of the model (about 40 s cold)
def test_the_gradient_error_scales_with_the_step(images):
    assert_gradient_error_scales_with_the_step(tiny, images)

def test_queries_and_reduced_keys_are_packed_per_head(images):
    attn = init(tiny(), images)["mesa"]["stage_1_block_0"]["attn"]
    shapes = {k: v.lo.shape for k, v in attn["attn"].items() if isinstance(v, quant.Stats)}
    assert shapes == {"q": (2,), "k": (2,), "v": (2,)}
    assert "norm" in attn and "sr" in attn  # the reduction's convolution and LayerNorm are compressed too


@pytest.mark.parametrize("name, overrides, match", [
    ("pvt-x", {}, r"valid names: \['pvt-c100', 'pvt-s', 'pvt-ti'\]"),
    ("pvt-c100", {"sr_ratios": (3, 2, 1, 1)}, "reduction ratio"),
    ("pvt-c100", {"num_heads": (3, 2, 5, 8)}, "does not divide"),
])
def test_bad_configurations_say_what_is_wrong(name, overrides, match, images):
    with pytest.raises(ValueError, match=match):
        pvt.create(name, num_classes=10, quant=None, **overrides).init(jax.random.key(0), images)
