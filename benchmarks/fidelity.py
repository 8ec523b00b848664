"""Gradient fidelity of mesa against the exact gradient, on structured and noise inputs.

    python -m benchmarks.fidelity                    # vit-c100, batch 32, several configs
    python -m benchmarks.fidelity --model deit-s --batch 8 --default-only --inputs structured
    python -m benchmarks.fidelity --train-steps 300 --plot curves.png   # + training curves
    python -m benchmarks.fidelity --default-only --nnx   # + the NNX ViT compressed by mesa_jax.nnx
    python -m benchmarks.fidelity --only-variance --variance 8 4 --train-steps 300   # ActNN's criterion
    python -m benchmarks.fidelity --default-only --train-steps 300 --train-dataset synthetic-hard \
        --workdir results/fidelity-hard --train-methods baseline mesa mesa-int8-row mesa-int4-row --train-seeds 0 1 2

With ``--train-steps N``, vit-c100 is also trained for N steps with and without
mesa (same seed, data and schedule; CIFAR-100 when prepared, else the synthetic
set, which the table names; with several ``--train-seeds``, each method once per
seed), the final loss and accuracy are compared, and the
per-parameter gradient fidelity is measured again at the trained parameters, for
both packing orders (see QuantConfig.update_first). Runs already in the workdir
are resumed, not retrained: delete it to start over.

For each quantization config: the running statistics are warmed on a few
batches (as in training), then the gradient of one held-out batch is compared
with the exact (baseline) gradient at the same params: global cosine, worst
per-parameter cosine (and which), and global relative error. Parameters whose exact
gradient is zero up to rounding (attention's key bias: softmax ignores a shift shared
by all keys) have no meaningful cosine; the table counts them and gives the largest
mesa gradient norm there relative to the global one.

Inputs: "structured" is the synthetic CIFAR-like set of train/data.py (smooth
class patterns, Student-t noise: heavy tails and outliers), resized for 224-pixel
models; "gaussian" is i.i.d. N(0, 1) pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mesa_jax import QuantConfig, models, policy
from mesa_jax.policy import Policy
from train import data, loop

WARM_BATCHES = 3


def inputs(kind: str, model, batch: int, index: int):
    """Batch ``index`` of images [B, S, S, 3] (normalised) and labels."""
    size = model.image_size
    if kind == "gaussian":
        key = jax.random.key(index)
        return jax.random.normal(key, (batch, size, size, 3)), jax.random.randint(key, (batch,), 0, 100)
    split = _synthetic().train
    idx = slice(index * batch, (index + 1) * batch)
    images = data.standardize(jnp.asarray(split.images[idx]))
    if size != images.shape[1]:
        images = jax.image.resize(images, (batch, size, size, 3), "bilinear")
    return images, jnp.asarray(split.labels[idx])


@functools.cache
def _synthetic():
    return data.synthetic(seed=0, train_size=2_000, test_size=10)


@functools.partial(jax.jit, static_argnums=0)  # one compilation per model instance: warm-up and held-out share it
def _grads(model, variables, images, labels, rng=None):
    def loss(params):
        logits, state = model.apply({**variables, "params": params}, images, train=False, mutable=["mesa"],
                                    rngs={} if rng is None else {"mesa": rng})
        return loop.cross_entropy(logits, labels), state

    return jax.grad(loss, has_aux=True)(variables["params"])


@dataclasses.dataclass(frozen=True)
class Fidelity:
    global_cosine: float
    worst_cosine: float
    worst_param: str
    relative_error: float
    # parameters whose exact gradient is zero up to float32 rounding (e.g. attention's key
    # bias, by softmax's shift invariance), with mesa's gradient norm there / the global one
    zero: tuple[tuple[str, float], ...] = ()


# An exact gradient below this fraction of the global norm is zero up to float32 rounding:
# a cosine with it measures noise against noise.
ZERO = 100 * float(jnp.finfo(jnp.float32).eps)


def cosine(a, b) -> float:
    a, b = jnp.ravel(a).astype(jnp.float32), jnp.ravel(b).astype(jnp.float32)
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))


def compare(approx, exact) -> Fidelity:
    flat_a, flat_e = ravel_pytree(approx)[0], ravel_pytree(exact)[0]
    norm = float(jnp.linalg.norm(flat_e))
    zero = {name: float(jnp.linalg.norm(a)) / norm for (name, a), e in _named(approx, exact)
            if float(jnp.linalg.norm(e)) < ZERO * norm}
    worst, worst_cosine, _ = next(p for p in compare_per_param(approx, exact) if p[0] not in zero)
    error = float(jnp.linalg.norm(flat_a - flat_e) / norm)
    return Fidelity(cosine(flat_a, flat_e), worst_cosine, worst, error, tuple(zero.items()))


def _named(approx, exact):
    """((parameter path, approx leaf), exact leaf) pairs."""
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(approx)[0], jax.tree.leaves(exact)):
        yield ("/".join(str(k.key) for k in path), a), e


def fidelity_grads(name: str, quant, kind: str, batch: int, params=None, held_out: int = WARM_BATCHES,
                   **overrides):
    """(mesa gradient, exact gradient) of batch ``held_out``, statistics warmed on the
    WARM_BATCHES batches before it."""
    model = models.create(name, num_classes=100, quant=quant, **overrides)
    baseline = models.create(name, num_classes=100, quant=None, **overrides)
    variables = model.init(jax.random.key(0), inputs(kind, model, 1, 0)[0])
    if params is not None:
        variables = {**variables, "params": params}
    for i in range(held_out - WARM_BATCHES, held_out):
        _, state = _grads(model, variables, *inputs(kind, model, batch, i))
        variables = {**variables, **state}
    images, labels = inputs(kind, model, batch, held_out)
    approx, _ = _grads(model, variables, images, labels)
    exact, _ = _grads(baseline, {"params": variables["params"]}, images, labels)
    jax.clear_caches()  # _grads compiles per model instance: free them, or a long run exhausts memory
    return approx, exact


def gradient_fidelity(name: str, quant, kind: str, batch: int, params=None, **overrides) -> Fidelity:
    return compare(*fidelity_grads(name, quant, kind, batch, params, **overrides))


def nnx_fidelity(kind: str, batch: int, attention: str = "flax", mlp: str = "flax",
                 ranges: str = "running") -> Fidelity:
    """The NNX ViT of benchmarks.nnx_vit in vit-c100's shape (``attention="einsum"``,
    ``mlp="gated"``: written by hand as gemma's), compressed in place by mesa_jax.compress
    (int8, a group per head, ``ranges``), against the same model uncompressed."""
    from flax import nnx
    from benchmarks import nnx_vit
    import mesa_jax

    shape = models.preset("vit-c100")
    make = lambda: nnx_vit.VisionTransformer(100, img_size=shape["image_size"], patch_size=shape["patch_size"],
                                             num_layers=shape["depth"], num_heads=shape["num_heads"],
                                             mlp_dim=shape["mlp_dim"], hidden_size=shape["width"], dropout_rate=0.0,
                                             attention=attention, mlp=mlp, rngs=nnx.Rngs(0))
    baseline, model = make(), mesa_jax.compress(make(), QuantConfig(num_groups=shape["num_heads"], ranges=ranges))
    grad = nnx.jit(nnx.grad(lambda m, images, labels: loop.cross_entropy(m(images), labels)))
    sized = argparse.Namespace(image_size=shape["image_size"])
    for i in range(WARM_BATCHES):
        grad(model, *inputs(kind, sized, batch, i))
    images, labels = inputs(kind, sized, batch, WARM_BATCHES)
    return compare(nnx.to_pure_dict(grad(model, images, labels)), nnx.to_pure_dict(grad(baseline, images, labels)))


def variance_criterion(name: str, config: QuantConfig, kinds, batch: int, params=None, draws: int = 4):
    """ActNN's criterion, per layer kind: (kind, the variance quantizing only that kind adds to
    the gradient, the minibatch sampling variance of the exact gradient), both summed over
    all parameters at the same parameters. Quantization: E||g_mesa - g||^2 over ``draws``
    noise seeds on one held-out batch (statistics warmed before it); sampling: the variance
    of the exact gradient over ``draws`` batches of the same size."""
    baseline = models.create(name, num_classes=100, quant=None)
    if params is None:
        params = baseline.init(jax.random.key(0), inputs("structured", baseline, 1, 0)[0])["params"]
    flat = lambda tree: ravel_pytree(tree)[0]
    batches = [inputs("structured", baseline, batch, i) for i in range(WARM_BATCHES, WARM_BATCHES + draws)]
    exact = jnp.stack([flat(_grads(baseline, {"params": params}, *b)[0]) for b in batches])
    sampling = float(jnp.mean(jnp.sum((exact - exact.mean(0)) ** 2, axis=-1)))
    rows = []
    for kind in kinds:
        model = models.create(name, num_classes=100, quant=Policy(config, kinds=(kind,)))
        variables = {**model.init(jax.random.key(0), batches[0][0][:1]), "params": params}
        for i in range(WARM_BATCHES):
            variables = {**variables, **_grads(model, variables, *inputs("structured", model, batch, i))[1]}
        draws_ = jnp.stack([flat(_grads(model, variables, *batches[0], jax.random.key(j))[0]) for j in range(draws)])
        rows.append((kind, float(jnp.mean(jnp.sum((draws_ - exact[0]) ** 2, axis=-1))), sampling))
        jax.clear_caches()
    return rows


def compare_per_param(approx, exact) -> list[tuple[str, float, float]]:
    """(parameter, cosine, relative error) for every parameter, worst cosine first."""
    out = [(name, cosine(a, e), float(jnp.linalg.norm(a - e) / (jnp.linalg.norm(e) + 1e-30)))
           for (name, a), e in _named(approx, exact)]
    return sorted(out, key=lambda t: t[1])


# training runs (a workdir each, named by the key) and their TrainConfig settings
TRAIN_METHODS = {
    "baseline": dict(mesa=False),
    "mesa": dict(),  # int8, running ranges: the default
    "mesa-int8-row": dict(ranges="row"),
    "mesa-int4-row-attention-int8": dict(bits=4, ranges="row", attention_bits=8),
    "mesa-int4-row": dict(bits=4, ranges="row"),  # policy.int4_row_ranges: channel groups = heads
}


def train_curves(steps: int, workdir: str, batch: int, methods=("baseline", "mesa"), dataset: str = "synthetic",
                 seed: int = 0):
    """Train vit-c100 with each method for ``steps`` (same seed, data order, schedule), in
    WORKDIR/seed{seed}/{method}; returns {method: (final metrics, rows)}."""
    import json
    import os

    from train import run
    from train.config import TrainConfig

    out = {}
    for method in methods:
        config = TrainConfig(**TRAIN_METHODS[method], steps=steps, batch_size=batch, eval_every=steps, log_every=10,
                             checkpoint_every=steps, warmup_epochs=0.5, dataset=dataset, seed=seed)
        path = os.path.join(workdir, f"seed{seed}", method)
        run.train_and_evaluate(config, path)
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        final = {k: v for row in rows if "step" in row for k, v in row.items()}  # the latest of each metric
        out[method] = (final, rows)
    return out


def trained_params(workdir: str, steps: int, batch: int, seed: int = 0):
    """The parameters of the baseline run of ``seed`` in ``workdir``."""
    from train import run
    from train.checkpoint import Checkpointer
    from train.config import TrainConfig

    config = TrainConfig(mesa=False, steps=steps, batch_size=batch)  # the architecture: data set irrelevant
    tx = loop.make_optimizer(loop.learning_rate_schedule(config.lr, 1, 2), config.weight_decay)
    like = loop.create_state(run.build_model(config), tx, config.seed, data.IMAGE_SHAPE)
    ckpt = Checkpointer(f"{workdir}/seed{seed}/baseline/checkpoints")
    try:
        return ckpt.restore(like).params
    finally:
        ckpt.close()


def paired_differences(runs) -> dict[str, list[tuple[float, float, float]]]:
    """{method: [(eval loss / baseline - 1, accuracy - baseline, accuracy) for each seed]} of
    ``runs`` = {seed: train_curves(...)}: each run against its own seed's baseline."""
    out = {}
    for curves in runs.values():
        base = curves["baseline"][0]
        for method, (final, _) in curves.items():
            out.setdefault(method, []).append((final["eval_loss"] / base["eval_loss"] - 1,
                                               final["eval_accuracy"] - base["eval_accuracy"], final["eval_accuracy"]))
    return out


def mean_and_error(values) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n))."""
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def plot_curves(curves, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, (_, rows) in curves.items():
        points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ax.plot(*zip(*points), label=method)
    dataset = curves["baseline"][1][0]["dataset"]
    ax.set(xlabel="step", ylabel="training loss", title=f"vit-c100 on {dataset}: baseline vs mesa")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def configs(num_heads: int):
    default = QuantConfig(num_groups=num_heads)
    return {
        "int8, group per head (default)": default,
        "int8, attention with a saved log-sum-exp": QuantConfig(num_groups=num_heads, saved_lse=True),
        "int8, attention op by op (probabilities kept)": Policy(default, attention="per_op"),
        "int8, 1 group": QuantConfig(num_groups=1),
        "int8, nearest rounding": QuantConfig(num_groups=num_heads, stochastic=False),
        "int8, update then pack (Mesa's order)": QuantConfig(num_groups=num_heads, update_first=True),
        "int4, group per head": QuantConfig(bits=4, num_groups=num_heads),
        "int2, group per head": QuantConfig(bits=2, num_groups=num_heads),
        **ranges_configs(num_heads),
    }


def ranges_configs(num_heads: int):
    """Row ranges (QuantConfig(ranges="row")) at 8 bits, one per token row; at 4 and 2 bits per
    row and head-sized channel group; and the 4/8-bit mix."""
    return {
        "int8, row ranges": QuantConfig(ranges="row"),
        "int4, row ranges (policy.int4_row_ranges)": policy.int4_row_ranges(num_heads),
        "int4 row ranges, attention int8 (policy.int4_with_int8_attention)": policy.int4_with_int8_attention(num_heads),
        "int2, row ranges": QuantConfig(bits=2, num_groups=num_heads, ranges="row"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-c100", choices=models.names())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inputs", nargs="+", default=["structured", "gaussian"], choices=["structured", "gaussian"])
    parser.add_argument("--train-steps", type=int, default=0, help="also train vit-c100 for this many steps")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[0], metavar="SEED",
                        help="train every method with each seed (compared with that seed's baseline)")
    parser.add_argument("--train-methods", nargs="+", default=["baseline", "mesa"], choices=list(TRAIN_METHODS),
                        help="runs to train (baseline first)")
    parser.add_argument("--train-dataset", default="synthetic", choices=["synthetic", "synthetic-hard", "cifar100"],
                        help="synthetic-hard: a task that does not saturate")
    parser.add_argument("--workdir", default="results/fidelity", help="where the training runs go")
    parser.add_argument("--plot", metavar="PNG", help="plot the training curves")
    parser.add_argument("--held-out", type=int, default=4, help="held-out batches at the trained parameters")
    parser.add_argument("--default-only", action="store_true", help="only the default config (large models)")
    parser.add_argument("--nnx", action="store_true", help="also the NNX ViT in vit-c100's shape (mesa_jax.nnx)")
    parser.add_argument("--variance", nargs="+", type=int, metavar="BITS", default=[],
                        help="ActNN's criterion per layer kind at these bits, running and row ranges "
                             "(at the trained parameters with --train-steps)")
    parser.add_argument("--only-variance", action="store_true",
                        help="only the variance criterion (with --train-steps: at those trained parameters)")
    args = parser.parse_args(argv)
    heads = models.presets.per_head(models.preset(args.model)).num_groups
    if args.only_variance:
        return report_variance(args, heads)
    print(f"{args.model}, batch {args.batch}, at initialisation, statistics warmed on {WARM_BATCHES} batches; "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print(f"| config | inputs | {HEADER}")
    print("|---|---|---:|---:|---|---:|---|")
    chosen = list(configs(heads).items())[:1] if args.default_only else configs(heads).items()
    for label, config in chosen:
        for kind in args.inputs:
            print(f"| {label} | {kind} | {row(gradient_fidelity(args.model, config, kind, args.batch))}")
    if args.nnx:
        for kind in args.inputs:
            print(f"| NNX ViT (vit-c100's shape), compressed in place | {kind} | {row(nnx_fidelity(kind, args.batch))}")
            for ranges in ("running", "row"):
                print(f"| the same, attention and GeGLU written by hand (gemma's), {ranges} ranges | {kind} | "
                      f"{row(nnx_fidelity(kind, args.batch, attention='einsum', mlp='gated', ranges=ranges))}")
    if args.train_steps:
        report_training(args)
    if args.variance:
        report_variance(args, heads)


HEADER = ("global cosine | worst param cosine | worst param | rel. error | exact-zero params (mesa norm / "
          "global, max) |")


def row(f: Fidelity) -> str:
    zero = f"{len(f.zero)} ({max(v for _, v in f.zero):.1e})" if f.zero else "-"
    return (f"{f.global_cosine:.5f} | {f.worst_cosine:.4f} | {f.worst_param} | {f.relative_error:.4f} | "
            f"{zero} |")


def report_training(args) -> None:
    """Final metrics of every method and seed against that seed's baseline; with several seeds,
    the mean of those paired differences and its standard error over the seeds."""
    runs = {seed: train_curves(args.train_steps, args.workdir, args.train_batch, args.train_methods,
                               args.train_dataset, seed) for seed in args.train_seeds}
    curves = runs[args.train_seeds[0]]
    print(f"\nvit-c100 trained {args.train_steps} steps, batch {args.train_batch}, seeds {args.train_seeds} "
          f"(a seed draws the initialisation, the data order and, for synthetic data, the set itself), "
          f"on {curves['baseline'][1][0]['dataset']} data")
    print("| method | seed | final train loss | eval loss | eval accuracy | eval loss / baseline - 1 | "
          "accuracy - baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    differences = paired_differences(runs)
    for i, (seed, seed_curves) in enumerate(runs.items()):
        for method, (final, _) in seed_curves.items():
            loss, accuracy, _ = differences[method][i]
            print(f"| {method} | {seed} | {final['loss']:.4f} | {final['eval_loss']:.4f} | "
                  f"{final['eval_accuracy']:.4f} | {loss:+.2%} | {100 * accuracy:+.2f} points |")
    if len(runs) > 1:
        print(f"\nmean over the {len(runs)} seeds (± standard error of the mean of the per-seed differences):")
        print("| method | eval accuracy | eval loss / baseline - 1 | accuracy - baseline |\n|---|---:|---:|---:|")
        for method, rows in differences.items():
            (loss, loss_se), (accuracy, accuracy_se), (mean_accuracy, _) = (mean_and_error(c) for c in zip(*rows))
            print(f"| {method} | {mean_accuracy:.4f} | {loss:+.2%} ± {loss_se:.2%} | "
                  f"{100 * accuracy:+.2f} ± {100 * accuracy_se:.2f} points |")
    params = trained_params(args.workdir, args.train_steps, args.train_batch, args.train_seeds[0])
    heads = models.preset("vit-c100")["num_heads"]
    held_out = range(WARM_BATCHES, WARM_BATCHES + args.held_out)
    print(f"\nat the trained baseline parameters of seed {args.train_seeds[0]}, group per head; held-out batches "
          f"{held_out.start}-{held_out.stop - 1}, each after warming on the {WARM_BATCHES} before it:")
    print(f"| config | held-out batch | {HEADER}")
    print("|---|---:|---:|---:|---|---:|---|")
    worst = []
    trained = {"int8 running, pack then update (default)": QuantConfig(num_groups=heads),
               "int8 running, update then pack (Mesa)": QuantConfig(num_groups=heads, update_first=True),
               "int4 running": QuantConfig(bits=4, num_groups=heads), **ranges_configs(heads)}
    for label, config in trained.items():
        for i in held_out:
            approx, exact = fidelity_grads("vit-c100", config, "structured", args.batch, params, held_out=i)
            f = compare(approx, exact)
            if not worst:
                worst = [p for p in compare_per_param(approx, exact) if p[0] not in dict(f.zero)][:8]
            print(f"| {label} | {i} | {row(f)}", flush=True)
    print(f"\nworst parameters, pack then update (default), batch {held_out.start}:")
    print("| parameter | cosine | relative error |\n|---|---:|---:|")
    for name, c, e in worst:
        print(f"| {name} | {c:.4f} | {e:.4f} |")
    if args.plot:
        plot_curves(curves, args.plot)
        print(f"wrote {args.plot}")



def report_variance(args, heads: int) -> None:
    params = None
    if args.train_steps:
        params = trained_params(args.workdir, args.train_steps, args.train_batch, args.train_seeds[0])
    where = f"the trained baseline parameters ({args.train_steps} steps)" if args.train_steps else "initialisation"
    print(f"\nvariance criterion (ActNN) at {where}, {args.model}, batch {args.batch}, only one layer kind "
          f"quantized at a time; quantization: E||g_mesa - g||^2 over 4 seeds, sampling: over 4 batches")
    print("| kind | bits | ranges | quantization variance | sampling variance | quantization / sampling |")
    print("|---|---:|---|---:|---:|---:|")
    kinds = ("dense", "conv", "layer_norm", "gelu", "attention")
    for bits in args.variance:
        for ranges in ("running", "row"):
            config = QuantConfig(bits=bits, num_groups=heads, ranges=ranges)
            for kind, quantized, sampling in variance_criterion(args.model, config, kinds, args.batch, params):
                print(f"| {kind} | {bits} | {ranges} | {quantized:.3e} | {sampling:.3e} | {quantized / sampling:.2e} |",
                      flush=True)


if __name__ == "__main__":
    main()
