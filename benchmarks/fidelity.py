"""Gradient fidelity of mesa against the exact gradient, on structured and noise inputs.

    python -m benchmarks.fidelity                    # vit-c100, batch 32, several configs
    python -m benchmarks.fidelity --model deit-s --batch 8

For each quantization config: the running statistics are warmed on a few
batches (as in training), then the gradient of one held-out batch is compared
with the exact (baseline) gradient at the same params: global cosine, worst
per-parameter cosine (and which), and global relative error.

Inputs: "structured" is the synthetic CIFAR-like set of train/data.py (smooth
class patterns, Student-t noise: heavy tails and outliers), resized for 224-pixel
models; "gaussian" is i.i.d. N(0, 1) pixels.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mesa_jax import QuantConfig
from mesa_jax.models import vit
from train import data, loop

WARM_BATCHES = 3


def inputs(kind: str, model: vit.ViT, batch: int, index: int):
    """Batch ``index`` of images [B, S, S, 3] (normalised) and labels."""
    size = model.image_size
    if kind == "gaussian":
        key = jax.random.key(index)
        return jax.random.normal(key, (batch, size, size, 3)), jax.random.randint(key, (batch,), 0, 100)
    split = _synthetic().train
    idx = slice(index * batch, (index + 1) * batch)
    images = data.normalize(jnp.asarray(split.images[idx]))
    if size != images.shape[1]:
        images = jax.image.resize(images, (batch, size, size, 3), "bilinear")
    return images, jnp.asarray(split.labels[idx])


_CACHE = {}


def _synthetic():
    if "set" not in _CACHE:
        _CACHE["set"] = data.synthetic(seed=0, train_size=2_000, test_size=10)
    return _CACHE["set"]


def _grads(model, variables, images, labels):
    def loss(params):
        logits, state = model.apply({**variables, "params": params}, images, train=False, mutable=["mesa"])
        return loop.cross_entropy(logits, labels), state

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


@dataclasses.dataclass(frozen=True)
class Fidelity:
    global_cosine: float
    worst_cosine: float
    worst_param: str
    relative_error: float


def cosine(a, b) -> float:
    a, b = jnp.ravel(a).astype(jnp.float32), jnp.ravel(b).astype(jnp.float32)
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))


def compare(approx, exact) -> Fidelity:
    flat_a, flat_e = ravel_pytree(approx)[0], ravel_pytree(exact)[0]
    per_param = {
        "/".join(str(k.key) for k in path): cosine(a, e)
        for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(approx)[0], jax.tree.leaves(exact))
    }
    worst = min(per_param, key=per_param.get)
    error = float(jnp.linalg.norm(flat_a - flat_e) / jnp.linalg.norm(flat_e))
    return Fidelity(cosine(flat_a, flat_e), per_param[worst], worst, error)


def gradient_fidelity(name: str, quant, kind: str, batch: int, params=None, **overrides) -> Fidelity:
    """Warm the statistics on WARM_BATCHES batches, then compare one batch's gradient."""
    model = vit.create(name, num_classes=100, quant=quant, **overrides)
    baseline = vit.create(name, num_classes=100, quant=None, **overrides)
    variables = model.init(jax.random.key(0), inputs(kind, model, 1, 0)[0])
    if params is not None:
        variables = {**variables, "params": params}
    for i in range(WARM_BATCHES):
        _, state = _grads(model, variables, *inputs(kind, model, batch, i))
        variables = {**variables, **state}
    held_out = inputs(kind, model, batch, WARM_BATCHES)
    approx, _ = _grads(model, variables, *held_out)
    exact, _ = _grads(baseline, {"params": variables["params"]}, *held_out)
    return compare(approx, exact)


def configs(num_heads: int):
    return {
        "int8, group per head (default)": QuantConfig(num_groups=num_heads),
        "int8, 1 group": QuantConfig(num_groups=1),
        "int8, nearest rounding": QuantConfig(num_groups=num_heads, stochastic=False),
        "int4, group per head": QuantConfig(bits=4, num_groups=num_heads),
        "int2, group per head": QuantConfig(bits=2, num_groups=num_heads),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-c100", choices=sorted(vit.PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inputs", nargs="+", default=["structured", "gaussian"], choices=["structured", "gaussian"])
    args = parser.parse_args(argv)
    heads = vit.PRESETS[args.model]["num_heads"]
    print(f"{args.model}, batch {args.batch}, at initialisation, statistics warmed on {WARM_BATCHES} batches; "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print("| config | inputs | global cosine | worst param cosine | worst param | rel. error |")
    print("|---|---|---:|---:|---|---:|")
    for label, config in configs(heads).items():
        for kind in args.inputs:
            f = gradient_fidelity(args.model, config, kind, args.batch)
            print(f"| {label} | {kind} | {f.global_cosine:.5f} | {f.worst_cosine:.4f} | {f.worst_param} | {f.relative_error:.4f} |")


if __name__ == "__main__":
    main()
