"""python -m train.lm: bytes of text (files, folders, the standard library), its split, its batches, the program."""

import json
import os

import numpy as np
import pytest

from mesa_jax.models import gpt
from train import lm, run, text
from train.config import LMConfig
from train_cases import program_output

WORDS = "def return import class self yield lambda while for if else try except with as pass".split()


@pytest.fixture(autouse=True)
def tiny_gpt(monkeypatch):
    monkeypatch.setitem(gpt.PRESETS, "gpt-tiny", dict(vocab_size=256, max_len=256, width=32, depth=1, num_heads=2))


@pytest.fixture
def folder(tmp_path):
    """Six small text files (one in a subfolder), a hidden file and a binary one."""
    root = tmp_path / "text"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        where = root / "sub" if i == 5 else root
        (where / f"f{i}.py").write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(12)) + "\n")
    (root / ".hidden").write_text("never read")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    return root


def cli(*args, capsys):
    return program_output(lm.main, args, capsys)


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_folder_splits_by_whole_files_the_same_way_every_time(folder):
    corpus = text.load([str(folder)], seq_len=16)
    files = sorted(p for p in folder.rglob("*.py"))
    assert (corpus.train_files, corpus.test_files) == (5, 1)
    held_out = [p.read_bytes() for p in files if p.read_bytes() in corpus.test.tobytes()]
    assert len(held_out) == 1 and held_out[0] not in corpus.train.tobytes()
    assert corpus.train.size + corpus.test.size == sum(p.stat().st_size for p in files) + 4  # 4 separators
    again = text.load([str(folder)], seq_len=16)
    assert again.digest == corpus.digest and np.array_equal(again.test, corpus.test)
    assert b"never read" not in corpus.train.tobytes() and b"PNG" not in corpus.train.tobytes()


def test_one_file_holds_out_its_tail(folder):
    path = folder / "f0.py"
    corpus = text.load([str(path)], seq_len=16)
    assert corpus.train.tobytes() + corpus.test.tobytes() == path.read_bytes()
    assert corpus.test.size == round(0.05 * path.stat().st_size)


def test_training_windows_are_a_function_of_seed_and_step_and_eval_reads_each_window_once(folder):
    corpus = text.load([str(folder)], seq_len=16)
    a = text.train_windows(corpus.train, 4, 16, seed=1, step=7)
    assert a.shape == (4, 17) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, text.train_windows(corpus.train, 4, 16, seed=1, step=7))
    assert not np.array_equal(a, text.train_windows(corpus.train, 4, 16, seed=1, step=8))
    batches = [(np.asarray(w), np.asarray(m)) for w, m in text.eval_batches(corpus, 4, 16)]
    starts = sorted(text.eval_windows(corpus.test, 16))
    assert starts == list(range(0, (corpus.test.size - 1) // 16 * 16, 16))
    assert sum(m.sum() for _, m in batches) == len(starts)
    assert sorted(w.tobytes() for ws, m in batches for w, keep in zip(ws, m) if keep) == sorted(
        corpus.test[s:s + 17].tobytes() for s in starts)


def test_the_default_text_is_the_standard_library_s_own_source():
    files = text.stdlib_files()
    assert len(files) > 100 and all(name.endswith(".py") for name, _ in files)
    assert not [name for name, _ in files if "site-packages" in name]
    assert files == sorted(files) and ("os.py", os.path.join(text.stdlib_root(), "os.py")) in files


def bad_text(kind: str, root):
    """A path of ``kind`` under ``root``: what --text must refuse."""
    if kind == "missing":
        return root / "missing"
    folder = root / kind
    folder.mkdir()
    if kind == "hidden-only":
        (folder / ".notes").write_text("hidden")
    if kind == "binary":
        (folder / "blob.bin").write_bytes(b"a\0b")
        return folder / "blob.bin"
    if kind == "short":
        (folder / "a.txt").write_text("too short")
        (folder / "b.txt").write_text("too")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing: no such file or folder"), ("empty", "holds no text files"),
    ("hidden-only", "holds no text files"), ("binary", "blob.bin is not text"), ("short", "fewer than one window")])
def test_bad_text_is_a_one_line_error(kind, message, tmp_path, capsys):
    path = bad_text(kind, tmp_path)
    code, _, err = cli("--workdir", str(tmp_path / "w"), "--text", str(path), "--seq-len", "16", capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err


def test_the_program_trains_a_tiny_gpt_then_resumes_to_train_longer(folder, tmp_path, capsys):
    common = ["--workdir", str(tmp_path / "w"), "--text", str(folder), "--batch-size", "4", "--seq-len", "16",
              "--eval-batches", "1", "--log-every", "1", "--warmup-steps", "1"]
    code, out, err = cli(*common, "--steps", "2", capsys=capsys)
    assert code == 0, err
    assert "eval_bits_per_byte=" in out and "tokens_per_sec=" in out
    header, *logged = rows(tmp_path / "w")
    assert header["train_files"] == 5 and header["eval_files"] == 1 and header["python"]
    assert header["config"]["text"] == [str(folder)] and header["dataset"].startswith(str(folder))
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    evaluation = [r for r in logged if "eval_loss" in r][-1]
    assert evaluation["eval_bits_per_byte"] == pytest.approx(evaluation["eval_loss"] / np.log(2))
    assert evaluation["eval_tokens"] == 4 * 16

    assert cli(*common, "--steps", "3", capsys=capsys)[0] == 0  # a longer run resumes from step 2
    logged = rows(tmp_path / "w")
    assert [(r["step"], r["event"]) for r in logged if "event" in r] == [(0, "start"), (2, "resume")]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]

    code, _, err = cli(*common, "--steps", "3", "--seq-len", "8", capsys=capsys)
    assert code == 1 and "--seq-len 16 -> 8" in err


@pytest.mark.slow  # three runs of the program
def test_a_killed_lm_run_resumes_exactly(folder, tmp_path, monkeypatch):
    config = LMConfig(batch_size=4, seq_len=16, steps=4, log_every=1, eval_every=4, eval_batches=1,
                      checkpoint_every=2, warmup_steps=1, text=(str(folder),))
    run.train_and_evaluate(config, str(tmp_path / "straight"))
    real = text.train_batches

    def dying(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt("killed")
            yield batch

    monkeypatch.setattr(text, "train_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(text, "train_batches", real)
    run.train_and_evaluate(config, str(tmp_path / "resumed"))
    last = lambda w: [r for r in rows(w) if r.get("step") == 4 and "event" not in r]
    straight, resumed = last(tmp_path / "straight"), last(tmp_path / "resumed")
    drop = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rs]
    assert drop(straight) == drop(resumed) and len(straight) == 2


def test_help_documents_the_lm_flags():
    help_text = lm.parser().format_help()
    for flag in ("--text", "--seq-len", "--warmup-steps", "--model", "--no-mesa", "--bits", "--ranges", "--attention"):
        assert flag in help_text
    assert "standard library" in help_text and "(default: gpt-tiny)" in help_text


def test_the_curves_compare_each_run_with_its_own_seed_s_baseline():
    from benchmarks import lm_curves

    run = lambda bpb: [{"step": 10, "bits_per_byte": bpb + 0.1}, {"step": 10, "eval_bits_per_byte": bpb}]
    runs = {0: {"baseline": run(2.0), "mesa8": run(2.02)}, 1: {"baseline": run(3.0), "mesa8": run(3.0)}}
    assert lm_curves.paired(runs)["mesa8"] == pytest.approx([0.01, 0.0])
    assert lm_curves.mean_and_error([0.01, 0.0]) == pytest.approx((0.005, 0.005))
    text = lm_curves.table(runs)
    assert "| mesa8 | 0 | 2.1200 | 2.0200 | +1.000% |" in text and "| mesa8 | 2.5100 | +0.500% ± 0.500% |" in text


def test_cudnn_attention_without_a_gpu_is_a_one_line_error(folder, tmp_path, capsys):
    code, _, err = cli("--workdir", str(tmp_path / "w"), "--text", str(folder), "--seq-len", "16", "--attention",
                       "cudnn", capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "--attention cudnn needs an NVIDIA GPU" in err, err
    assert cli("--workdir", str(tmp_path / "w"), "--attention", "flash", capsys=capsys)[0] == 2
