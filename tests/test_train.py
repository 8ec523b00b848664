"""The training program: flags, TFDS (mocked) and synthetic data, presets, resume, metrics, sharding."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesa_jax.models import pvt, swin, vit
from mesa_jax import QuantConfig, policy
from train import data, loop, run
from train.config import TrainConfig
from train_cases import (cli, config, dies_after, restored, rows, small_synthetic, tiny_preset,  # noqa: F401
                         use_small_synthetic)

@pytest.mark.parametrize(
    "flags, message",
    [(["--bits", "3"], "--bits"), (["--lr", "-1"], "--lr must be finite and > 0"), (["--lr", "inf"], "--lr"),
     (["--lr", "nan"], "--lr"), (["--steps", "0"], "--steps"), (["--dtype", "float16"], "--dtype"),
     (["--ranges", "rows"], "--ranges"), (["--attention-bits", "16"], "--attention-bits"), ([], "--workdir")],
)
def test_bad_flags_exit_nonzero_with_one_line(flags, message, tmp_path, capsys):
    workdir = [] if message == "--workdir" else ["--workdir", str(tmp_path)]
    code, _, err = cli(*workdir, *flags, capsys=capsys)
    assert code != 0
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_the_module_runs_from_a_checkout_and_documents_every_flag_with_its_default():
    """The one end-to-end subprocess: python -m train.vit_cifar100 from the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "train.vit_cifar100", "--help"], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--no-mesa", "--bits", "--dtype", "--batch-size", "--epochs", "--steps", "--lr",
                 "--weight-decay", "--warmup-epochs", "--seed", "--dataset", "--data-dir", "--workdir",
                 "--eval-every", "--eval-batches", "--compare-memory"):
        assert flag in out.stdout
    assert "(default: vit-c100)" in out.stdout


def test_trains_on_mock_tfds_cifar100(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        final = run.train_and_evaluate(config(dataset="cifar100", steps=4, compare_memory=True), str(tmp_path))
    header, *logged = rows(tmp_path)
    assert header["event"] == "start" and header["step"] == 0
    assert header["dataset"] == "cifar100" and header["dataset_warning"] is None
    assert header["step_peak_bytes"]["mesa"] < header["step_peak_bytes"]["baseline"]
    train_rows = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all({"loss", "learning_rate", "images_per_sec"} <= set(r) for r in train_rows)
    assert 0.0 <= final["eval_accuracy"] <= 1.0 and np.isfinite(final["eval_loss"])


def test_cifar100_requested_but_missing_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataUnavailable, match="nothing-here: no such directory"):
        data.load("cifar100", data_dir=str(tmp_path / "nothing-here"))
    with pytest.raises(data.DataUnavailable, match="no prepared array_record copy there"):
        data.load("cifar100", data_dir=str(tmp_path))


def test_auto_falls_back_to_synthetic_loudly_and_records_it(tmp_path, use_small_synthetic, monkeypatch, caplog):
    def unprepared(split, data_dir):  # the default TFDS data dir holds no cifar100
        assert data_dir is None
        raise data.DataUnavailable("cannot read TFDS cifar100 from the default TFDS data dir")

    monkeypatch.setattr(data, "_tfds_split", unprepared)
    run.train_and_evaluate(config(dataset="auto", steps=2), str(tmp_path / "w"))
    assert "SYNTHETIC" in caplog.text
    header = rows(tmp_path / "w")[0]
    assert header["dataset"] == "synthetic" and "SYNTHETIC" in header["dataset_warning"]


def test_a_mistyped_data_dir_is_a_one_line_error_under_auto_and_a_corrected_rerun_runs(tmp_path, use_small_synthetic,
                                                                                        capsys):
    """--dataset auto with an explicit --data-dir that does not hold CIFAR-100: an error, not
    synthetic data; and the failed run, which never trained, binds nothing in its workdir."""
    workdir, typo = tmp_path / "w", tmp_path / "tensorflow_datsets"
    common = ["--workdir", str(workdir), "--model", "vit-test", "--steps", "2", "--batch-size", "8"]
    code, _, err = cli(*common, "--data-dir", str(typo), capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and f"{typo}: no such directory" in err
    assert not os.path.exists(workdir / "config.json")
    assert cli(*common, "--dataset", "synthetic", capsys=capsys)[0] == 0  # a config.json of auto refused it


def test_eval_batches_caps_evaluation_and_eval_every_0_never_evaluates(tmp_path, use_small_synthetic):
    final = run.train_and_evaluate(config(steps=2, eval_every=0), str(tmp_path))
    assert "eval_loss" not in final and not [r for r in rows(tmp_path) if "eval_loss" in r]
    final = run.train_and_evaluate(config(steps=4, eval_every=4, eval_batches=1), str(tmp_path))  # resumable
    assert [(r["step"], r["eval_images"]) for r in rows(tmp_path) if "eval_loss" in r] == [(4, 8)]
    assert final["eval_images"] == 8


@pytest.mark.slow  # repeated coverage: kept out of the default run
def test_synthetic_data_is_learnable(tmp_path, use_small_synthetic):
    run.train_and_evaluate(config(steps=16, lr=3e-3, log_every=1, eval_every=100), str(tmp_path))
    losses = [r["loss"] for r in rows(tmp_path)[1:] if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_killed_run_resumes_exactly_and_its_metrics_have_no_step_twice(tmp_path, use_small_synthetic, monkeypatch):
    cfg = config()
    run.train_and_evaluate(cfg, str(tmp_path / "straight"))
    real = data.train_batches
    monkeypatch.setattr(data, "train_batches", dies_after(3, real))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    monkeypatch.setattr(data, "train_batches", real)
    run.train_and_evaluate(cfg, str(tmp_path / "resumed"))  # picks up at the step-2 checkpoint

    straight, resumed = restored(tmp_path / "straight", cfg), restored(tmp_path / "resumed", cfg)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    logged = rows(tmp_path / "resumed")
    assert [(r["step"], r["event"]) for r in logged if "event" in r] == [(0, "start"), (2, "resume")]
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6]  # rows past the checkpoint dropped
    assert [r["step"] for r in logged if "eval_loss" in r] == [3, 6]


def test_each_row_reports_the_learning_rate_of_its_step_and_the_first_step_learns(tmp_path, use_small_synthetic):
    cfg = config(steps=4, log_every=1, warmup_epochs=0.25)  # 8 steps an epoch: warmup 2 steps
    run.train_and_evaluate(cfg, str(tmp_path))
    schedule = loop.learning_rate_schedule(cfg.lr, 2, 4)
    assert [r["learning_rate"] for r in rows(tmp_path) if "loss" in r] == pytest.approx(
        [float(schedule(k)) for k in range(4)])
    assert float(schedule(0)) == pytest.approx(cfg.lr / 2) and float(schedule(1)) == pytest.approx(cfg.lr)


def test_a_fresh_start_after_a_kill_before_any_checkpoint_leaves_one_header(tmp_path, use_small_synthetic,
                                                                               monkeypatch):
    cfg = config(log_every=1, checkpoint_every=5)
    real = data.train_batches
    monkeypatch.setattr(data, "train_batches", dies_after(2, real))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(cfg, str(tmp_path))
    monkeypatch.setattr(data, "train_batches", real)
    run.train_and_evaluate(cfg, str(tmp_path))
    logged = rows(tmp_path)
    assert [r["event"] for r in logged if "event" in r] == ["start"]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_metrics_stay_valid_json_with_non_finite_values(tmp_path):
    from train.metrics import MetricsLog

    log = MetricsLog(str(tmp_path / "m.jsonl"))
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "nested": [float("-inf"), 1.0]})
    with open(tmp_path / "m.jsonl") as f:
        assert json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
            "step": 1, "loss": None, "grad_norm": None, "nested": [None, 1.0]}


@pytest.mark.slow  # one train-step compilation per preset (about 25 s cold); vit-test trains in many others
def test_every_preset_trains_through_the_program(tmp_path, use_small_synthetic, monkeypatch):
    """The 224-pixel presets resize CIFAR images on the device (tiny widths, their own sizes)."""
    for name in [n for n in vit.PRESETS if n != "vit-test"]:
        monkeypatch.setitem(vit.PRESETS, name, {**vit.PRESETS[name], "width": 24, "depth": 1, "num_heads": 2,
                                                "mlp_dim": 48})
        final = run.train_and_evaluate(config(model=name, steps=2, eval_every=100), str(tmp_path / name))
        assert np.isfinite(final["loss"]) and 0 <= final["eval_accuracy"] <= 1, name


PYRAMIDS = {  # tiny widths and depths, the presets' own image, patch, window and reduction sizes
    "swin": (swin, dict(embed_dim=12, depths=(2, 1, 1, 1), num_heads=(3, 3, 3, 3))),
    "pvt": (pvt, dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                      mlp_ratios=(2, 2, 2, 2))),
}


@pytest.mark.slow  # one train-step compilation each (15-25 s cold); the ViT presets train in the default run
@pytest.mark.parametrize("name", ["swin-c100", "pvt-c100", "swin-ti", "pvt-ti"])
def test_swin_and_pvt_train_through_the_program(name, tmp_path, use_small_synthetic, monkeypatch):
    family, tiny = PYRAMIDS[name.split("-")[0]]
    monkeypatch.setitem(family.PRESETS, name, {**family.PRESETS[name], **tiny})
    final = run.train_and_evaluate(config(model=name, steps=2, eval_every=100), str(tmp_path))
    assert np.isfinite(final["loss"]) and 0 <= final["eval_accuracy"] <= 1


def test_unknown_models_list_every_family_s_presets():
    with pytest.raises(ValueError, match=r"--model must be one of .*'pvt-ti'.*'swin-ti'.*'vit-c100'"):
        config(model="resnet-50")


@pytest.mark.slow  # repeated coverage: kept out of the default run
def test_a_finished_run_reports_its_final_metrics(tmp_path, use_small_synthetic, capsys):
    flags = ["--workdir", str(tmp_path), "--model", "vit-test", "--steps", "2", "--batch-size", "8",
             "--dataset", "synthetic", "--eval-every", "100"]
    first = cli(*flags, capsys=capsys)
    again = cli(*flags, capsys=capsys)
    assert first[0] == again[0] == 0
    assert "eval_accuracy=" in again[1] and again[1] == first[1]


def test_batch_must_divide_devices(tmp_path, use_small_synthetic, monkeypatch):
    monkeypatch.setattr(run.loop, "make_mesh", lambda: jax.sharding.Mesh(np.array(jax.devices() * 3), ("data",)))
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        run.train_and_evaluate(config(batch_size=8), str(tmp_path))


def test_data_order_is_a_function_of_seed_and_step(small_synthetic):
    a = data.train_indices(small_synthetic.train, 8, seed=1, step=9)
    assert np.array_equal(a, data.train_indices(small_synthetic.train, 8, seed=1, step=9))
    epoch = np.concatenate([data.train_indices(small_synthetic.train, 8, 1, s) for s in range(8)])
    assert sorted(epoch) == list(range(64))


def test_eval_batches_cover_the_split_once(small_synthetic):
    masks = [np.asarray(m) for _, _, m in data.eval_batches(small_synthetic.test, 10)]
    assert sum(m.sum() for m in masks) == 24 and all(len(m) == 10 for m in masks)


def test_augment_keeps_shape_and_flips(small_synthetic):
    images = jnp.asarray(small_synthetic.train.images[:8])
    out = data.augment(images, jax.random.key(0))
    assert out.shape == (8, 32, 32, 3) and out.dtype == jnp.float32
    assert not np.allclose(out, data.standardize(images))


SHARDED = """
import json, sys, jax, numpy as np
from mesa_jax.models import pvt, swin, vit
vit.PRESETS["vit-test"] = dict(image_size=32, patch_size=8, width=24, depth=1, num_heads=2, mlp_dim=48, drop_path=0.0)
from train import data, run, vit_cifar100
from train.config import TrainConfig
data.synthetic = lambda seed=0, _d=data.synthetic(0, 64, 16): _d
cfg = TrainConfig(model="vit-test", batch_size=8, steps=3, dataset="synthetic", eval_every=100, log_every=1)
final = run.train_and_evaluate(cfg, sys.argv[1])
print(json.dumps({"devices": jax.device_count(), "loss": final["loss"], "eval_loss": final["eval_loss"]}))
"""


@pytest.mark.slow
def test_data_parallel_on_4_devices_matches_one(tmp_path):
    results = []
    for n in (1, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / str(n))], env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [r["devices"] for r in results] == [1, 4]
    np.testing.assert_allclose(results[1]["loss"], results[0]["loss"], rtol=1e-4)
    np.testing.assert_allclose(results[1]["eval_loss"], results[0]["eval_loss"], rtol=1e-4)


def test_ranges_and_attention_bits_reach_every_kind_of_layer():
    quant = run.quant_of(TrainConfig(bits=4, ranges="row", attention_bits=8))
    assert quant.resolve("dense", "block_0/mlp/fc1") == QuantConfig(bits=4, num_groups=3, ranges="row")
    assert quant.resolve("attention", "block_0/attn").bits == 8
    assert run.quant_of(TrainConfig(bits=4, attention_bits=4)) == QuantConfig(bits=4, num_groups=3)
    assert run.quant_of(TrainConfig(ranges="row")) == QuantConfig(ranges="row")  # 8 bits: one range per row
    assert run.quant_of(TrainConfig(bits=4, ranges="row")) == policy.int4_row_ranges(num_groups=3)


@pytest.mark.slow  # makes both 10,000-image sets
def test_the_hard_synthetic_set_is_the_same_patterns_with_more_noise():
    easy, hard = data.load("synthetic"), data.load("synthetic-hard")
    assert hard.name == "synthetic-hard"
    np.testing.assert_array_equal(easy.train.labels, hard.train.labels)
    assert np.std(hard.train.images.astype(float)) > np.std(easy.train.images.astype(float))
