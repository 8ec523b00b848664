"""What the training tests share: a tiny preset, a small synthetic set, configs, readers."""

import gc
import json
import os
import signal
import sys
import warnings

import pytest

from mesa_jax.models import vit
from train import data, loop, run, vit_cifar100
from train.checkpoint import Checkpointer
from train.config import TrainConfig

TINY = dict(image_size=32, patch_size=8, width=24, depth=1, num_heads=2, mlp_dim=48, drop_path=0.1)


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(vit.PRESETS, "vit-test", TINY)


@pytest.fixture(scope="module")
def small_synthetic():
    return data.synthetic(seed=0, train_size=64, test_size=24)


@pytest.fixture
def use_small_synthetic(monkeypatch, small_synthetic):
    monkeypatch.setattr(data, "synthetic", lambda seed=0: small_synthetic)


def config(**kw):
    base = dict(model="vit-test", batch_size=8, steps=6, log_every=2, eval_every=3, checkpoint_every=2,
                dataset="synthetic", warmup_epochs=0.1)
    return TrainConfig(**{**base, **kw})


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restored(workdir, cfg):
    """The state the run in ``workdir`` would resume from."""
    model = run.build_model(cfg)
    tx = loop.make_optimizer(loop.learning_rate_schedule(cfg.lr, 1, 2), cfg.weight_decay)
    like = loop.create_state(model, tx, cfg.seed, run.image_shape(model))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore(like)
    finally:
        ckpt.close()


def cli(*args, capsys):
    """python -m train.vit_cifar100 ARGS in this process (see ``program_output``)."""
    return program_output(vit_cifar100.main, args, capsys)


def program_output(main, args, capsys):
    """Run a program's ``main(args)`` in this process: (exit code, stdout, stderr). Its Ctrl-C
    handling, a process's, is undone."""
    handler = signal.getsignal(signal.SIGINT)
    with warnings.catch_warnings():  # earlier tests' garbage (orbax's un-awaited reads of a damaged
        warnings.simplefilter("ignore")  # checkpoint) warns when collected: not into this program's stderr
        gc.collect()
    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (print(exit.code, file=sys.stderr) or 1)
    finally:
        signal.signal(signal.SIGINT, handler)
    out = capsys.readouterr()
    return code, out.out, out.err


def dies_after(n: int, batches):
    """``batches`` (data.train_batches) that raise KeyboardInterrupt before the n-th batch: a kill."""

    def dying(*args, **kwargs):
        for i, batch in enumerate(batches(*args, **kwargs)):
            if i == n:
                raise KeyboardInterrupt("killed")
            yield batch

    return dying
