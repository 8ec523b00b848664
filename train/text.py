"""Bytes of text for causal language models: files or folders, a held-out split by file, windows.

    corpus = text.load([], seq_len=256)            # the Python standard library's own source
    corpus = text.load(["notes/", "book.txt"], 256)
    for step, windows in text.train_batches(corpus, 32, 256, seed=0, start=0, stop=100): ...

Tokens are bytes (a vocabulary of 256: no tokenizer). Without paths the text is the ``*.py``
files of the running Python's standard library (``sysconfig``'s stdlib directory, its
site-packages excluded), found at run time; a folder gives every file under it that is text
(no NUL byte in its first 8 KiB; hidden files and folders skipped), an explicit file is read
as it is. Files are sorted by path and joined with a NUL byte. Whole files are held out for
evaluation (those first in the order of a hash of their path, until they hold 5% of the
bytes), so evaluation never sees a training file and the split does not depend on the seed;
a single file holds out its last 5%. A training batch is ``batch`` windows of ``seq_len + 1``
bytes at offsets drawn from (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would; evaluation reads non-overlapping windows of the held-out text in
one fixed shuffled order (the first batches are a uniform sample of it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig
from typing import Iterator, Sequence

import jax
import numpy as np

from train.data import DataUnavailable, prefetch

VOCAB_SIZE = 256  # bytes
EVAL_FRACTION = 0.05  # of the bytes, held out as whole files
SEPARATOR = b"\0"  # between files: a byte text never holds
SNIFF = 8192  # bytes read to tell text from binary (a NUL among them: binary, as git decides)
EVAL_ORDER_SEED = 0  # the held-out windows' order: the same for every run


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str  # what the text is ("the Python 3.11.7 standard library" or the paths given)
    train: np.ndarray  # uint8 [N]: the training files, joined
    test: np.ndarray  # uint8 [M]: the held-out files, joined
    train_files: int
    test_files: int
    digest: str  # SHA-256 of every file's name and bytes, in order: the data a workdir's run trains on

    @property
    def identity(self) -> str:
        """What a workdir records: resuming on other text (an edited file, another Python) is refused."""
        return f"{self.name} (sha256 {self.digest[:16]})"

    def describe(self) -> dict:
        return {"dataset": self.identity, "text": self.name, "train_files": self.train_files,
                "train_bytes": int(self.train.size), "eval_files": self.test_files, "eval_bytes": int(self.test.size),
                "text_sha256": self.digest, "python": platform.python_version()}


# ------------------------------------------------------------------- sources


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[tuple[str, str]]:
    """(name, path) of the standard library's ``*.py`` files, sorted; installed packages excluded."""
    root = stdlib_root()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted((os.path.relpath(p, root), p) for p in found)


def text_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(name, path) of the text in ``paths`` (files, or folders searched recursively), sorted."""
    found = []
    for given in paths:
        if os.path.isfile(given):
            if _is_binary(given):
                raise DataUnavailable(f"--text {given} is not text (it holds a NUL byte)")
            found.append((given, given))
        elif os.path.isdir(given):
            inside = _folder_text(given)
            if not inside:
                raise DataUnavailable(f"--text {given} holds no text files (searched recursively; hidden, empty "
                                      f"and binary files are skipped)")
            found += [(os.path.join(given, name), path) for name, path in inside]
        else:
            raise DataUnavailable(f"--text {given}: no such file or folder")
    return sorted(found)


def _folder_text(root: str) -> list[tuple[str, str]]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            path = os.path.join(folder, f)
            if not f.startswith(".") and os.path.isfile(path) and os.path.getsize(path) and not _is_binary(path):
                found.append((os.path.relpath(path, root), path))
    return found


def _is_binary(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return SEPARATOR in f.read(SNIFF)
    except OSError as err:
        raise DataUnavailable(f"--text {path}: cannot read it ({err.strerror})") from None


# ------------------------------------------------------------------- corpus


def load(paths: Sequence[str] = (), seq_len: int = 256) -> Corpus:
    """The text of ``paths`` (none: the standard library's source), split for training and
    evaluation; each split must hold a window of ``seq_len + 1`` bytes."""
    if paths:
        files, name = text_files(paths), ", ".join(paths)
    else:
        files, name = stdlib_files(), f"the Python {platform.python_version()} standard library ({stdlib_root()})"
        if not files:
            raise DataUnavailable(f"no *.py files in {stdlib_root()}: this Python ships without its standard "
                                  f"library's source; give --text PATH")
    contents = [_read(path) for _, path in files]
    digest = hashlib.sha256()
    for (file_name, _), data in zip(files, contents):
        digest.update(f"{file_name}\0{len(data)}\0".encode())
        digest.update(data)
    train, test, held_out = split(files, contents)
    corpus = Corpus(name, _join(train), _join(test), len(files) - held_out, held_out, digest.hexdigest())
    for split_name, stream in (("training", corpus.train), ("held-out", corpus.test)):
        if stream.size < seq_len + 1:
            raise DataUnavailable(f"the {split_name} text of {name} holds {stream.size} bytes, fewer than one "
                                  f"window of --seq-len {seq_len} + 1: give more text or a shorter --seq-len")
    return corpus


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataUnavailable(f"--text {path}: cannot read it ({err.strerror})") from None


def split(files: list[tuple[str, str]], contents: list[bytes]) -> tuple[list[bytes], list[bytes], int]:
    """(training texts, held-out texts, held-out file count): whole files, first in the order of
    the SHA-256 of their names, until they hold EVAL_FRACTION of the bytes; one file: its tail."""
    if len(files) == 1:
        cut = len(contents[0]) - round(EVAL_FRACTION * len(contents[0]))
        return [contents[0][:cut]], [contents[0][cut:]], 0
    order = sorted(range(len(files)), key=lambda i: hashlib.sha256(files[i][0].encode()).hexdigest())
    goal, held, size = EVAL_FRACTION * sum(map(len, contents)), set(), 0
    for i in order[:-1]:  # at least one file trains
        if size >= goal and held:
            break
        held.add(i)
        size += len(contents[i])
    return ([c for i, c in enumerate(contents) if i not in held], [c for i, c in enumerate(contents) if i in held],
            len(held))


def _join(texts: list[bytes]) -> np.ndarray:
    return np.frombuffer(SEPARATOR.join(texts), np.uint8)


# ------------------------------------------------------------------ batching


def train_windows(stream: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """uint8 [batch, seq_len + 1]: the windows of training step ``step``, at offsets drawn from (seed, step)."""
    starts = np.random.default_rng([seed, step]).integers(0, stream.size - seq_len, batch)
    return stream[starts[:, None] + np.arange(seq_len + 1)]


def train_batches(corpus: Corpus, batch: int, seq_len: int, seed: int, start: int, stop: int,
                  sharding=None) -> Iterator:
    """(step, windows) for steps [start, stop), prefetched on a thread and put on device."""

    def make(step):
        return step, jax.device_put(train_windows(corpus.train, batch, seq_len, seed, step), sharding)

    return prefetch(map(make, range(start, stop)))


def eval_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """int64 [W]: the starts of the held-out text's non-overlapping windows, in their fixed order."""
    count = (stream.size - 1) // seq_len
    return np.random.default_rng(EVAL_ORDER_SEED).permutation(count) * seq_len


def eval_batches(corpus: Corpus, batch: int, seq_len: int, sharding=None) -> Iterator:
    """(windows, mask) over every held-out window; the last batch is padded and masked."""
    starts = eval_windows(corpus.test, seq_len)
    for begin in range(0, starts.size, batch):
        chosen = starts[begin:begin + batch]
        mask = np.arange(batch) < chosen.size
        chosen = np.pad(chosen, (0, batch - chosen.size))
        yield jax.device_put((corpus.test[chosen[:, None] + np.arange(seq_len + 1)], mask), sharding)
