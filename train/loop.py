"""Train state, the steps (a classifier's, a causal language model's), and data-parallel sharding.

The model's ``"mesa"`` statistics travel in the state beside the params, like
``batch_stats``; steps are pure functions of (state, batch), jitted by the caller.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from mesa_jax.memory import CompiledMemory, compiled_memory
from mesa_jax.nn import COLLECTION

DATA_AXIS = "data"


class TrainState(train_state.TrainState):
    mesa: Any  # the model's "mesa" statistics ({} for the baseline)
    rng: jax.Array  # raw key data (uint32): dropout keys are folded from it and the step
    bad_step: jax.Array  # int32: the first step whose update was non-finite (not applied), -1 if none


def create_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, input_shape,
                 input_dtype=jnp.float32) -> TrainState:
    """Initialise params and statistics from ``seed`` for inputs of ``input_shape`` (one example:
    an image's [H, W, C], a sequence's [T] with ``input_dtype`` int32)."""
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    variables = jax.jit(model.init)(init_key, jnp.zeros((1, *input_shape), input_dtype))  # one compilation
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        mesa=variables.get(COLLECTION, {}),
        tx=tx,
        rng=jax.random.key_data(dropout_key),
        bad_step=jnp.full((), -1, jnp.int32),
    ).replace(step=jnp.zeros((), jnp.int32))  # an array, like every later step's: checkpoints restore alike


def _variables(state: TrainState, params) -> dict:
    return {"params": params, COLLECTION: state.mesa} if state.mesa else {"params": params}


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """The step's keys (augmentation, dropout): one split of the run's key folded with the step."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)))


def optimizer_step(state: TrainState, inputs, loss_of, dropout: jax.Array, **apply_kwargs):
    """The model on ``inputs`` (statistics updated), ``loss_of(outputs, params) -> (loss, metrics)``,
    its gradient applied unless non-finite (``guarded``); returns the new state and the metrics."""

    def loss_fn(params):
        outputs, updates = state.apply_fn(
            _variables(state, params), inputs, train=True, mutable=[COLLECTION], rngs={"dropout": dropout},
            **apply_kwargs
        )
        loss, metrics = loss_of(outputs, params)
        return loss, (metrics, updates)

    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    new = state.apply_gradients(grads=grads, mesa=updates.get(COLLECTION, state.mesa))
    return guarded(state, new, loss, grad_norm), {"loss": loss, **metrics, "grad_norm": grad_norm}


def train_step(state: TrainState, images, labels, label_smoothing: float = 0.1, augment=None):
    """One optimizer step of a classifier; returns the new state (params, statistics) and its metrics.

    ``augment(images, key) -> images`` runs on the device first.
    """
    augment_key, dropout = step_keys(state)
    if augment is not None:
        images = augment(images, augment_key)

    def loss_of(logits, params):
        return cross_entropy(logits, labels, label_smoothing), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    return optimizer_step(state, images, loss_of, dropout)


def lm_train_step(state: TrainState, windows):
    """One optimizer step of a causal language model on ``windows`` [B, T + 1] of tokens: each
    position predicts the next. Metrics: loss (nats per token) and bits per token (per byte, for bytes)."""
    _, dropout = step_keys(state)
    windows = windows.astype(jnp.int32)

    def loss_of(hidden, params):  # [B, T, C]
        loss = next_token_losses(head(state.apply_fn, params), hidden, windows[:, 1:]).mean()
        return loss, {"bits_per_byte": loss / jnp.log(2.0)}

    return optimizer_step(state, windows[:, :-1], loss_of, dropout, head=False)


def head(apply_fn, params):
    """``hidden -> logits`` of a language model (its ``logits`` method: the vocabulary head, uncompressed)."""
    return lambda hidden: apply_fn({"params": params}, hidden, method="logits")


LOSS_CHUNK = 4096  # tokens whose logits exist at once in next_token_losses


def next_token_losses(logits_of, hidden, targets, chunk: int = LOSS_CHUNK):
    """[B, T] cross-entropy (nats) of ``targets`` [B, T] under ``logits_of(hidden)``, hidden [B, T, C].

    A span of positions of every sequence at a time (about ``chunk`` tokens), each span's
    logits recomputed in the backward pass: a model with a large vocabulary holds [B, span, V]
    float32 logits and their gradient instead of [B, T, V] (gpt2-s at sequence 2048: 0.4 GB
    per sequence, more than its activations), for a second head GEMM in the backward pass.
    Spans split the sequence, not the batch, so a batch-sharded step stays sharded.
    """
    b, t, c = hidden.shape
    span = max(1, min(t, chunk // max(b, 1)))
    spans = -(-t // span)
    pad = spans * span - t  # padded positions' losses are computed and dropped
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, spans, span, c).swapaxes(0, 1)  # [spans, B, span, C]
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, spans, span).swapaxes(0, 1)

    @jax.checkpoint
    def losses(h, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits_of(h), y)

    return jax.lax.map(lambda hy: losses(*hy), (h, y)).swapaxes(0, 1).reshape(b, spans * span)[:, :t]


def guarded(state: TrainState, new: TrainState, loss, grad_norm) -> TrainState:
    """``new`` if its loss, gradient and parameters are finite and no step failed before;
    else ``state`` itself, with ``bad_step`` naming the first failed step (1-based).

    Checked on the device every step, read by the host only when it logs, evaluates or
    checkpoints: a non-finite update is never applied, so nothing non-finite is saved.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new.params))
    ok = finite & (state.bad_step < 0)
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    first_bad = jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step + 1)
    return kept.replace(bad_step=first_bad.astype(jnp.int32))


def eval_step(state: TrainState, images, labels, mask):
    """Summed loss, correct count and example count over the ``mask``ed (real) examples."""
    logits = state.apply_fn(_variables(state, state.params), images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == labels, False)),
        "count": jnp.sum(mask),
    }


def lm_eval_step(state: TrainState, windows, mask):
    """Summed next-token loss (nats) and token count over the ``mask``ed (real) windows [B, T + 1]."""
    windows = windows.astype(jnp.int32)
    hidden = state.apply_fn(_variables(state, state.params), windows[:, :-1], train=False, head=False)
    losses = next_token_losses(head(state.apply_fn, state.params), hidden, windows[:, 1:])  # [B, T]
    return {"loss_sum": jnp.sum(jnp.where(mask[:, None], losses, 0.0)),
            "count": jnp.sum(mask) * losses.shape[1]}


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over all (local and remote) devices, with Auto axes."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return jax.sharding.Mesh(devices, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The learning rate of optimizer step k (0-based): linear warmup over ``warmup_steps``
    steps reaching ``peak`` at the last of them (the first step learns too: peak /
    warmup_steps), then cosine decay towards 1% of ``peak`` at ``total_steps``."""
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1), alpha=1e-2)
    if warmup_steps < 1:
        return decay
    warmup = optax.linear_schedule(peak / warmup_steps, peak, warmup_steps - 1)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(schedule: optax.Schedule, weight_decay: float, clip_norm: float = 1.0):
    """AdamW after global-norm clipping (the DeiT recipe)."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def step_memory(model: nn.Module, tx, batch: int, image_shape, step_fn=train_step) -> CompiledMemory:
    """Compile-time memory of the jitted, state-donating ``step_fn`` (nothing is run)."""
    state = jax.eval_shape(lambda: create_state(model, tx, 0, image_shape))
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return compiled_memory(jax.jit(step_fn, donate_argnums=0), state, images, labels)
