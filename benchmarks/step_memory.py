"""Compile-time memory of one full training step (forward, backward, AdamW update).

Shared by the model memory benchmark and its tests: nothing is executed, so
DeiT-B at batch 256 can be sized on a laptop CPU, and planned for an H100 on one
(``target="h100"``, see mesa_jax.plan).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

import optax

from mesa_jax import Policy, QuantConfig, memory, policy
from mesa_jax import models
from train import loop

METHODS = ("baseline", "jax_attention", "flash_like", "remat_nothing", "remat_dots", "mesa8", "mesa8_remat", "mesa4",
           "mesa2", "mesa8_row", "mesa4_row", "mesa_mix48")
TX = loop.make_optimizer(loop.learning_rate_schedule(1e-3, 10, 100), 0.05)  # every measured step's AdamW


def recomputed_attention(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
                         dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None,
                         force_fp32_for_softmax: bool = False):
    """flax's dot_product_attention under jax.checkpoint: its backward recomputes the
    probabilities from q, k, v and keeps nothing N x N, which is what flash attention keeps
    (the baseline a modern JAX user compares against; its speed is not flash attention's)."""

    def attend(query, key, value, bias, mask):
        return nn.dot_product_attention(query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
                                        deterministic, dtype, precision, force_fp32_for_softmax=force_fp32_for_softmax)

    return jax.checkpoint(attend)(query, key, value, bias, mask)


def build(model_name: str, method: str, dtype=None, backend="xla", **overrides) -> nn.Module:
    """The model a method trains: baseline, the baseline with jax.nn.dot_product_attention as
    its attention core, flash-like (the baseline with its attention core recomputed), nn.remat
    with a policy (these three: ViT/DeiT, which have the fields), mesa
    at 8/4/2 bits, mesa at 8 bits with row ranges (one per row), at 4 bits with row ranges
    (per head-sized group), or the 4/8-bit mix with row ranges. ``backend``: who packs
    mesa's residuals (pallas_kernels.Backend or its name: "xla", "triton", "triton-interpret")."""
    remat = {"remat_nothing": "nothing_saveable", "remat_dots": "dots_saveable",
             "mesa8_remat": "nothing_saveable"}.get(method)
    if remat:
        overrides = {**overrides, "remat": remat}
    if method == "flash_like":
        overrides = {**overrides, "attention_fn": recomputed_attention}
    if method == "jax_attention":  # the core flax NNX's attention calls (no dropout): the NNX rows' baseline
        overrides = {**overrides, "attention_fn": jax.nn.dot_product_attention}
    per_head = models.presets.per_head(models.preset(model_name))  # int8, channel groups = heads
    if method in ("baseline", "jax_attention", "flash_like", "remat_nothing", "remat_dots"):
        quant = None
    elif method == "mesa8_remat":  # block remat, the recomputation's residuals packed
        quant = per_head
    elif method in ("mesa8", "mesa4", "mesa2"):
        quant = dataclasses.replace(per_head, bits=int(method[4:]))
    elif method == "mesa8_row":
        quant = QuantConfig(ranges="row")  # one range per token row (per head-row for attention tensors)
    elif method == "mesa4_row":
        quant = policy.int4_row_ranges(per_head.num_groups)
    elif method == "mesa_mix48":
        quant = policy.int4_with_int8_attention(per_head.num_groups)
    else:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    with_backend = lambda config: dataclasses.replace(config, backend=backend)
    if quant is not None:
        quant = quant.map_configs(with_backend) if isinstance(quant, Policy) else with_backend(quant)
    return models.create(model_name, num_classes=1000, quant=quant, dtype=dtype, **overrides)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    residuals: int  # bytes autodiff keeps for the backward pass (jaxpr level, params excluded)
    reports: dict[str, memory.ProgramReport]  # the jitted, state-donating train step compiled per target

    @property
    def peak(self) -> int:
        """Compile-time peak bytes for the first target measured."""
        return next(iter(self.reports.values())).peak


def measure(model: nn.Module, batch: int, targets=(None,)) -> StepMemory:
    """Residual bytes, and the step compiled for each target (None: jax's default device)."""
    reports = {}
    for target in targets:
        report = compile_step(model, batch, target)
        reports[report.target] = report
    return StepMemory(residual_bytes(model, batch), reports)


def step_args(model: nn.Module, batch: int):
    """(state, images, labels) of a train step, as ShapeDtypeStructs."""
    shape = (model.image_size, model.image_size, 3)
    state = jax.eval_shape(functools.partial(loop.create_state, model, TX, 0, shape))
    return state, jax.ShapeDtypeStruct((batch, *shape), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32)


def compile_step(model: nn.Module, batch: int, target=None, dump_to: str | None = None) -> memory.ProgramReport:
    """The jitted, state-donating train step compiled for ``target``: its report (nothing runs)."""
    step = jax.jit(loop.train_step, donate_argnums=0)
    return memory.compiled_report(step, *step_args(model, batch), target=target, dump_to=dump_to)


def residual_bytes(model: nn.Module, batch: int) -> int:
    """The bytes autodiff keeps for the backward pass of the training loss (traced, not compiled)."""
    state, images, labels = step_args(model, batch)

    def loss(params, mesa, images, labels):
        variables = {"params": params, **({"mesa": mesa} if mesa else {})}
        logits, _ = model.apply(variables, images, train=True, mutable=["mesa"], rngs={"dropout": jax.random.key(0)})
        return loop.cross_entropy(logits, labels)

    kept = memory.saved_residuals(loss, state.params, state.mesa, images, labels)
    return sum(r.nbytes for r in kept if "argument" not in r.source)


def measure_nnx(method: str, batch: int, image_size: int = 224, activation: str = "gelu", attention: str = "flax",
                mlp: str = "flax", targets=(None,)) -> StepMemory:
    """The same step for the NNX ViT-S/16 of benchmarks.nnx_vit (float32): ``baseline`` as
    written, ``mesa8`` compressed in place by mesa_jax.compress (int8, per head),
    ``mesa8_exact_products`` the same with the "matmul" and "gated" kinds run exactly (what
    compress reached of attention and GLUs written by hand before it reached their einsums
    and products); DeiT-S's exact GELU, flax's attention and the documentation's MLP unless
    ``activation``, ``attention`` or ``mlp`` names another (nnx_vit.vit_s16)."""
    from flax import nnx
    from benchmarks import nnx_vit
    import mesa_jax

    kinds = {"mesa8": policy.KINDS,
             "mesa8_exact_products": tuple(k for k in policy.KINDS if k not in ("matmul", "gated"))}
    if method not in ("baseline", *kinds):
        raise ValueError(f"the NNX rows measure baseline, mesa8 and mesa8_exact_products, not {method!r}")
    model = nnx_vit.vit_s16(img_size=image_size, activation=activation, attention=attention, mlp=mlp,
                            rngs=nnx.Rngs(0))
    if method != "baseline":  # channel groups = heads, as deit-s
        mesa_jax.compress(model, Policy(QuantConfig(num_groups=6, bits=8), kinds=kinds[method]))
        # the statistics of the functions it calls (GELU's) are made at its first call: call it once
        # before nnx.split (README, known limits); made in the step's trace they would be constants
        model(jnp.zeros((1, image_size, image_size, 3)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, images, labels):
        model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables at this trace level
        return loop.cross_entropy(model(images), labels), nnx.state(model, nnx.Not(nnx.Param))

    return _measure_functional(loss, params, rest, batch, image_size, targets)


def measure_resnet(method: str, batch: int, image_size: int = 224, targets=(None,)) -> StepMemory:
    """The same step (cross-entropy, AdamW) for the ResNet-18 of benchmarks.linen_resnet (float32,
    the running averages updated): ``baseline`` as written, ``mesa8`` compressed (int8, one
    group: the widths are not divisible by a head count), ``mesa8_no_bn_relu`` the same with
    BatchNorm and ReLU run as flax does (what compress reached before the two kinds)."""
    import mesa_jax
    from benchmarks import linen_resnet

    kinds = {"mesa8": policy.KINDS,
             "mesa8_no_bn_relu": tuple(k for k in policy.KINDS if k not in ("batch_norm", "relu"))}
    if method not in ("baseline", *kinds):
        raise ValueError(f"the ResNet rows measure baseline, mesa8 and mesa8_no_bn_relu, not {method!r}")
    model = linen_resnet.ResNet()
    if method != "baseline":
        model = mesa_jax.compress(model, Policy(QuantConfig(), kinds=kinds[method]))
    # initialized in training mode, so that BatchNorm's statistics exist: the state a step takes
    # from the second on (flax's example initializes in evaluation mode; its first step makes them)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(params, rest, images, labels):
        logits, rest = model.apply({"params": params, **rest}, images, mutable=list(rest))
        return loop.cross_entropy(logits, labels), rest

    return _measure_functional(loss, params, rest, batch, image_size, targets)


def _measure_functional(loss, params, rest, batch: int, image_size: int, targets) -> StepMemory:
    """Residual bytes and compiled reports of the state-donating AdamW step of
    ``loss(params, rest, images, labels) -> (value, rest)``: a model whose state is not
    loop.TrainState (the NNX ViT, the ResNet's running averages)."""
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def step(params, rest, opt_state, images, labels):
        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, images, labels)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, value

    opt_state = jax.eval_shape(TX.init, params)
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    reports = [memory.compiled_report(jitted, params, rest, opt_state, images, labels, target=t) for t in targets]
    kept = memory.saved_residuals(lambda *args: loss(*args)[0], params, rest, images, labels)
    return StepMemory(sum(r.nbytes for r in kept if "argument" not in r.source), {r.target: r for r in reports})
