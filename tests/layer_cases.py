"""One table of flax.linen layers, shared by the mesa_jax.nn and compress tests."""

import pytest

# (id, layer name in flax.linen and mesa_jax.nn, constructor arguments, input shape)
TWINS = [
    ("dense", "Dense", dict(features=6), (2, 5, 8)),
    ("dense_nobias", "Dense", dict(features=6, use_bias=False), (2, 5, 8)),
    ("dense_general_heads", "DenseGeneral", dict(features=(2, 3), axis=-1), (2, 5, 8)),
    ("dense_general_merge", "DenseGeneral", dict(features=6, axis=(-2, -1)), (2, 5, 2, 4)),
    ("einsum", "Einsum", dict(shape=(8, 2, 3), einsum_str="bnc,chd->bnhd"), (2, 5, 8)),
    ("conv_patch", "Conv", dict(features=4, kernel_size=(2, 2), strides=(2, 2), padding="VALID"), (2, 6, 6, 3)),
    ("conv_same", "Conv", dict(features=4, kernel_size=(3, 3)), (2, 6, 6, 3)),
    ("conv_dilated_grouped_circular", "Conv",
     dict(features=4, kernel_size=(3, 3), kernel_dilation=2, feature_group_count=2, padding="CIRCULAR"), (2, 6, 6, 4)),
    ("layer_norm", "LayerNorm", dict(), (2, 5, 8)),
    ("layer_norm_noscale", "LayerNorm", dict(use_scale=False, epsilon=1e-5), (2, 5, 8)),
    ("layer_norm_slow_variance", "LayerNorm", dict(use_fast_variance=False), (2, 5, 8)),
    ("rms_norm", "RMSNorm", dict(), (2, 5, 8)),
    ("rms_norm_eps", "RMSNorm", dict(epsilon=1e-5), (2, 5, 8)),
    ("attention", "MultiHeadDotProductAttention", dict(num_heads=2), (2, 5, 8)),
    ("self_attention_fp32_softmax", "SelfAttention", dict(num_heads=4, force_fp32_for_softmax=True), (2, 5, 8)),
]
TWIN_IDS = [t[0] for t in TWINS]
# one layer of each handler: the default run's cases where each costs a compilation or more
ONE_PER_HANDLER = ("dense", "einsum", "conv_patch", "layer_norm", "rms_norm", "attention")


def one_per_handler(cases):
    """``cases`` (rows named by their first item) with all but ONE_PER_HANDLER's under -m slow."""
    return [c if c[0] in ONE_PER_HANDLER else pytest.param(*c, marks=pytest.mark.slow) for c in cases]
