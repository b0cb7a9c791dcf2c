"""Benchmarks read from local files (never downloaded): MNIST from the standard IDX ``.gz``
files, and character-level Penn Treebank from ``ptb.char.{train,valid,test}.txt(.gz)``.

Files are looked up in the task's ``data_dir`` setting, else in the folder named by the
``LRCOMPRESS_DATA`` environment variable; in either, directly or in a ``mnist/`` or ``ptb/``
subfolder, plain or gzipped. Data is read on first use, so building a task (and a model for
it) needs no data when the sizes are known (MNIST). A missing file raises
``MissingDataError`` naming the file, the folders searched and the variable.

    >>> task = MnistTask({"permute": True})          # reads nothing yet
    >>> task.input_size, task.output_size
    (1, 10)
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, FormatError
from .fields import check_range
from .tasks_base import (IGNORE, Batch, Classification, Task, TaskData, batch_loader, check_split, sequence_nll,
                         shuffled_batches)

DATA_ENV = "LRCOMPRESS_DATA"
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
EOL = "\n"  # the end-of-line symbol of the character vocabulary
LN2 = float(np.log(2.0))


class MissingDataError(ConfigError):
    """A data file of a task is not where the task settings or ``LRCOMPRESS_DATA`` point."""


def find_data_file(name: str, subdir: str, data_dir: str = "") -> Path:
    """``name`` or ``name.gz`` in ``data_dir`` (else ``$LRCOMPRESS_DATA``), or its ``subdir``."""
    root = data_dir or os.environ.get(DATA_ENV, "")
    if not root:
        raise MissingDataError(f"{name} is needed but no data folder is set: set the task's data_dir or the "
                               f"{DATA_ENV} environment variable to a folder holding {subdir}/{name}(.gz)")
    folders = [Path(root).expanduser(), Path(root).expanduser() / subdir]
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    source = "task.data_dir" if data_dir else DATA_ENV
    raise MissingDataError(f"{name}(.gz) not found in {' or '.join(map(str, folders))} (from {source}); "
                           f"point task.data_dir or the {DATA_ENV} environment variable at the data folder")


def read_bytes(path: Path) -> bytes:
    """A file's content, gunzipped when it starts with the gzip magic number."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise FormatError(f"{path} is not a valid gzip file: {exc}") from None
    return data


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as a numpy array.

    Header: two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32.
    """
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES or data[3] == 0:
        raise FormatError(f"{path} is not an IDX file (header {data[:4].hex()!r})")
    ndim, dtype = data[3], np.dtype(IDX_TYPES[data[2]])
    start = 4 + 4 * ndim
    if len(data) < start:
        raise FormatError(f"{path} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - start != expected:
        raise FormatError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) "
                          f"but the file holds {len(data) - start}")
    return np.frombuffer(data, dtype, offset=start).reshape(shape)


def read_mnist(split: str, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 784) uint8, labels (N,) int64) of MNIST's "train" or "test" file pair."""
    image_name, label_name = MNIST_FILES[split]
    images = find_data_file(image_name, "mnist", data_dir)
    labels = find_data_file(label_name, "mnist", data_dir)
    return _read_mnist_pair(images, labels, _stamp(images), _stamp(labels))


def _stamp(path: Path) -> tuple[int, int]:
    # Part of the cache key, so a file rewritten in place is read again.
    info = path.stat()
    return info.st_mtime_ns, info.st_size


@lru_cache(maxsize=4)
def _read_mnist_pair(image_path: Path, label_path: Path, *stamps) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise FormatError(f"{image_path} / {label_path}: expected (N, 28, 28) images and (N,) labels, "
                          f"got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise FormatError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise FormatError(f"{label_path}: labels must be 0..9, got {labels.min()}..{labels.max()}")
    return np.ascontiguousarray(images.reshape(len(images), -1)), labels.astype(np.int64)


def authors_permutation() -> np.ndarray:
    """The pixel order of the paper's psMNIST runs, (784,) int: the authors' ``RNN_mnist.py``
    (github.com/Avmb/lowrank-gru) seeds numpy's global generator with 1234, shuffles the indices
    of its 50,000 training and 10,000 validation images, then draws
    ``np.random.permutation(784)``. NumPy's legacy ``RandomState`` keeps that stream fixed
    across versions, so replaying the same draws gives their ``P``."""
    state = np.random.RandomState(1234)
    state.shuffle(np.arange(50_000))  # their data shuffles: only the draws they use matter here
    state.shuffle(np.arange(10_000))
    return state.permutation(MnistTask.PIXELS)


class MnistTask(Classification, Task):
    """MNIST digit classification (paper 3.0.3 and appendix A.1).

    ``layout = "sequence"``: one pixel per step, 784 steps of (B, 784, 1) values in [0, 1];
    ``permute = true`` reorders the pixels by one fixed permutation (permuted sequential
    MNIST): step ``t`` reads pixel ``P[t]`` of the row-major image. ``permutation = "seed"``
    draws ``P`` from ``permutation_seed``; ``"lowrank-gru"`` is the authors' own ``P``
    (``authors_permutation``), for runs comparable pixel for pixel with the paper's Table 1. ``layout = "flat"``: (B, 784) vectors for
    feed-forward (highway) models. Splits: the last ``valid_size`` images of the training file
    are the validation set (5,000 -> 55k/5k; 10,000 gives the 50k/10k split of the paper's
    ``mnist.pkl.gz``), the t10k file is the test set. ``train_size > 0`` keeps only the first
    images of the training part (quick runs). ``loss = "hinge2"``: the per-class squared hinge of
    appendix A.1 instead of cross-entropy.
    """

    name = "mnist"
    output_size, output = 10, "last"
    DEFAULTS: ClassVar[dict] = {
        "data_dir": "",  # "" -> $LRCOMPRESS_DATA
        "layout": "sequence",
        "permute": False,
        "permutation": "seed",
        "permutation_seed": 0,
        "valid_size": 5000,
        "train_size": 0,  # 0: all of the training part
        "loss": "ce",
    }
    CHOICES: ClassVar[dict] = {"layout": ("sequence", "flat"), "loss": ("ce", "hinge2"),
                               "permutation": ("seed", "lowrank-gru")}
    PIXELS, TRAIN_FILE_SIZE, TEST_SIZE = 784, 60_000, 10_000

    @classmethod
    def check(cls, spec: dict) -> None:
        check_range("task", spec, "valid_size", 1, cls.TRAIN_FILE_SIZE - 1)
        check_range("task", spec, "train_size", 0, cls.TRAIN_FILE_SIZE - spec["valid_size"])
        check_range("task", spec, "permutation_seed", 0)
        if spec["permutation"] != "seed" and not spec["permute"]:
            raise ConfigError(f"task.permutation = {spec['permutation']!r} orders pixels only with task.permute = true")

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.sequential = self.spec["layout"] == "sequence"
        self.input_size = 1 if self.sequential else self.PIXELS
        self.hinge = self.spec["loss"] == "hinge2"
        if not self.spec["permute"]:
            self.permutation = None
        elif self.spec["permutation"] == "lowrank-gru":
            self.permutation = authors_permutation()
        else:
            self.permutation = np.random.default_rng(self.spec["permutation_seed"]).permutation(self.PIXELS)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of a split, read on first use."""
        check_split(split, 1)
        images, labels = read_mnist("test" if split == "test" else "train", self.spec["data_dir"])
        if split == "test":
            return images, labels
        cut = len(images) - self.spec["valid_size"]
        if cut <= 0:
            raise FormatError(f"the MNIST training file holds {len(images)} images, too few for "
                              f"task.valid_size = {self.spec['valid_size']}")
        if split == "valid":
            return images[cut:], labels[cut:]
        end = self.spec["train_size"] or cut
        return images[:end], labels[:end]

    def num_examples(self, split: str) -> int:
        check_split(split, 1)
        if split == "test":
            return self.TEST_SIZE
        if split == "valid":
            return self.spec["valid_size"]
        return self.spec["train_size"] or self.TRAIN_FILE_SIZE - self.spec["valid_size"]

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.arrays("train")[0]) // batch_size)

    def dataset(self, split: str) -> "Images":
        """The images of ``split`` as a ``torch.utils.data.Dataset`` (files read now)."""
        return Images(self, *self.arrays(split))

    def batches(self, split: str, batch_size: int, *, seed: int, epoch: int = 0,
                shuffle: bool = True) -> DataLoader:
        check_split(split, batch_size)
        return shuffled_batches(self.dataset(split), batch_size, seed=seed, epoch=epoch, split=split, shuffle=shuffle)

    def inputs(self, images: np.ndarray) -> Tensor:
        """(B, 784) uint8 images as float inputs in [0, 1], permuted and laid out."""
        x = torch.from_numpy(images).float().div_(255.0)
        if self.permutation is not None:
            x = x[:, torch.from_numpy(self.permutation)]
        return x.unsqueeze(-1) if self.spec["layout"] == "sequence" else x


class Images(TaskData):
    """MNIST images and labels of one split; a batch holds the task's inputs (``MnistTask.inputs``)."""

    def __init__(self, task: MnistTask, images: np.ndarray, labels: np.ndarray):
        self.task, self.images, self.labels = task, images, labels

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        return Batch(self.task.inputs(self.images[idx]), torch.from_numpy(self.labels[idx]))


def read_char_lines(path: Path) -> list[list[str]]:
    """Lines of a PTB-style character file: symbols separated by whitespace, blank lines skipped."""
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text: {exc}") from None
    return [line.split() for line in text.split("\n") if line.strip()]


def read_ptb_char(split: str, data_dir: str = "") -> tuple[tuple[str, ...], ...]:
    """The lines of ``ptb.char.<split>.txt(.gz)``, each as its tuple of symbols."""
    path = find_data_file(f"ptb.char.{split}.txt", "ptb", data_dir)
    return _read_char_file(path, _stamp(path))


@lru_cache(maxsize=6)
def _read_char_file(path: Path, stamp: tuple[int, int]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(line) for line in read_char_lines(path))


class Vocabulary:
    """Symbol <-> id; built from the training text, sorted so ids do not depend on file order."""

    def __init__(self, symbols):
        self.symbols = sorted(set(symbols))
        self.ids = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, symbols, where: str) -> np.ndarray:
        try:
            return np.fromiter((self.ids[s] for s in symbols), dtype=np.int64)
        except KeyError as exc:
            raise FormatError(f"{where}: symbol {exc.args[0]!r} does not occur in the training text") from None


class PtbCharTask(Task):
    """Character-level language modelling on Penn Treebank (paper 3.0.4, appendix A.3).

    Each line is its symbols (``_`` stands for a space) followed, when ``eol`` is true, by an
    end-of-line symbol: 49 + 1 = 50 symbols on the standard files (``eol = false``: 49, the
    characters A.3 counts; the loader of Gal's LSTM code, Zaremba's ``data.lua``, still turns
    every line end into ``<eos>``, so its stream holds 50). The vocabulary comes from the
    training file.

    ``mode = "stream"`` (stateful): a split is one symbol stream cut into ``batch_size``
    contiguous streams and read in windows of ``seq_len`` steps, x = symbols t, y = symbols
    t + 1; consecutive batches continue the same streams, so a trainer may carry the state
    across windows. With ``shuffle`` the training streams start at a random offset below
    ``seq_len`` each epoch. ``mode = "sentences"``: every line is an independent sequence
    (the paper's scheme: no state kept between sentences) that starts from the end-of-line
    symbol; batches are padded (targets ``IGNORE``) and group lines of similar length.

    Metrics: ``bpc`` (bits per character), ``ppl`` = 2^bpc (per-character perplexity) and
    ``ce`` in nats, over every predicted symbol; ``ppl_paper`` averages as the paper's code did
    (``finalize``).
    """

    name = "ptb_char"
    output, tokens = "sequence", True
    metric, higher_is_better = "bpc", False
    # loss_average: "symbols", the mean NLL over the batch's symbols; "sentences" (sentence mode),
    # each sentence's mean NLL per symbol, averaged over sentences (the authors' dl4mt-lm cost)
    DEFAULTS: ClassVar[dict] = {"data_dir": "", "mode": "stream", "seq_len": 100, "eol": True,
                                "loss_average": "symbols"}
    CHOICES: ClassVar[dict] = {"mode": ("stream", "sentences"), "loss_average": ("symbols", "sentences")}
    BUCKET = 64  # batches per length-sorted bucket in sentence mode

    @classmethod
    def check(cls, spec: dict) -> None:
        check_range("task", spec, "seq_len", 1)
        if spec["mode"] == "sentences" and not spec["eol"]:
            raise ConfigError("task.mode = 'sentences' starts each line from the end-of-line symbol, "
                              "so it needs task.eol = true")
        if spec["loss_average"] == "sentences" and spec["mode"] != "sentences":
            raise ConfigError("task.loss_average = 'sentences' averages per sentence: it needs task.mode = 'sentences'")

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.stateful = self.spec["mode"] == "stream"
        self._vocab: Vocabulary | None = None
        self._lines: dict[str, list[np.ndarray]] = {}

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            lines = read_ptb_char("train", self.spec["data_dir"])
            symbols = {s for line in lines for s in line}
            self._vocab = Vocabulary(symbols | ({EOL} if self.spec["eol"] else set()))
        return self._vocab

    @property
    def input_size(self) -> int:
        return len(self.vocab)

    @property
    def output_size(self) -> int:
        return len(self.vocab)

    def lines(self, split: str) -> list[np.ndarray]:
        """Symbol ids of each line of ``split`` (with the end-of-line symbol when ``eol``)."""
        check_split(split, 1)
        if split not in self._lines:
            vocab, tail = self.vocab, (EOL,) if self.spec["eol"] else ()
            where = f"ptb.char.{split}.txt"
            self._lines[split] = [vocab.encode(line + tail, where)
                                  for line in read_ptb_char(split, self.spec["data_dir"])]
        return self._lines[split]

    def stream(self, split: str) -> np.ndarray:
        lines = self.lines(split)
        return np.concatenate(lines) if lines else np.zeros(0, dtype=np.int64)

    def num_examples(self, split: str) -> int:
        """Symbols in ``split`` (in stream mode a few at the stream ends are not predicted)."""
        return sum(len(line) for line in self.lines(split))

    def train_examples(self) -> int | None:
        """Training sentences in sentence mode (a batch holds sentences); None in stream mode,
        where a batch holds streams and ``batches`` refuses a text too short for them."""
        return None if self.stateful else len(self.lines("train"))

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.stateful:
            steps = len(self.stream("train")) // batch_size - 1
            return max(0, -(-steps // self.spec["seq_len"]))
        return -(-len(self.lines("train")) // batch_size)

    def batches(self, split: str, batch_size: int, *, seed: int, epoch: int = 0,
                shuffle: bool = True) -> DataLoader:
        check_split(split, batch_size)
        if self.stateful:
            return self._windows(split, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
        return self._sentences(split, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)

    def _windows(self, split: str, batch_size: int, *, seed: int, epoch: int, shuffle: bool) -> DataLoader:
        data, seq_len = self.stream(split), self.spec["seq_len"]
        per_stream = len(data) // batch_size
        if per_stream < 2:
            raise ConfigError(f"the {split} text ({len(data)} symbols) is too short for batch_size {batch_size}")
        streams = torch.from_numpy(data[:per_stream * batch_size].reshape(batch_size, per_stream))
        offset = 0
        if shuffle and split == "train":
            rng = np.random.default_rng([seed, epoch, 1])
            offset = int(rng.integers(0, min(seq_len, per_stream - 1)))
        return batch_loader(Windows(streams, seq_len, offset))  # in order: the state runs on

    def _sentences(self, split: str, batch_size: int, *, seed: int, epoch: int, shuffle: bool) -> DataLoader:
        lines = self.lines(split)
        if shuffle:
            rng = np.random.default_rng([seed, epoch, 2])
            order = rng.permutation(len(lines))
            bucket = batch_size * self.BUCKET  # sort within buckets: little padding, still random
            order = np.concatenate([sorted(order[i:i + bucket], key=lambda j: len(lines[j]))
                                    for i in range(0, len(order), bucket)]) if len(order) else order
            groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            groups = [groups[i] for i in rng.permutation(len(groups))]
        else:
            order = sorted(range(len(lines)), key=lambda j: len(lines[j]))
            groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        return batch_loader(Sentences(lines, self.vocab.ids[EOL]), [list(map(int, g)) for g in groups])

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        if self.spec.get("loss_average") != "sentences":
            return sequence_nll(logits, batch.y)
        # dl4mt-lm (lm/small_lm_dr.py build_model): (cost * x_mask).sum(0) / x_mask.sum(0), then .mean()
        nll = sequence_nll(logits, batch.y, reduction="none").view(batch.y.shape)
        counts = (batch.y != IGNORE).sum(1)
        rows = counts > 0
        return (nll.sum(1)[rows] / counts[rows]).mean()

    def evaluate(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        nll = sequence_nll(logits.detach().float(), batch.y, reduction="none").view(batch.y.shape)  # 0 if padded
        counts = (batch.y != IGNORE).sum(1)
        out = {"count": float(counts.sum()), "nll": float(nll.sum())}
        if not self.stateful:  # each row is one sentence: its mean NLL per symbol, for ppl_paper
            rows = counts > 0
            out["sentences"] = float(rows.sum())
            out["sentence_ce"] = float((nll.sum(1)[rows] / counts[rows]).sum())
        return out

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """``ce``, ``bpc``, ``ppl`` over every predicted symbol (total NLL / total symbols), and
        ``ppl_paper``, Table 2's average: in sentence mode the authors' dl4mt-lm figure,
        ``exp`` of the mean over sentences of each sentence's NLL per symbol (end of line
        counted), i.e. the geometric mean of per-sentence perplexities (``ce_paper`` its log);
        in stream mode Gal's and Zaremba's whole-stream total / count, equal to ``ppl``."""
        ce = sums["nll"] / sums["count"] if sums["count"] else float("nan")
        out = {"bpc": ce / LN2, "ppl": float(2.0 ** (ce / LN2)), "ce": ce}
        if "sentences" in sums:
            ce_paper = sums["sentence_ce"] / sums["sentences"] if sums["sentences"] else float("nan")
            out.update(ce_paper=ce_paper, ppl_paper=float(np.exp(ce_paper)))
        else:
            out["ppl_paper"] = out["ppl"]
        return out


class Windows(Dataset):
    """Consecutive windows of ``batch_size`` parallel symbol streams: item ``k`` is the batch
    x = ``streams[:, t:t + seq_len]``, y = the symbols one step later, ``t = offset + k seq_len``
    (the last window may be shorter). Read in order, each window continues the previous one."""

    def __init__(self, streams: Tensor, seq_len: int, offset: int = 0):
        self.streams, self.seq_len, self.offset = streams, seq_len, offset
        self.last = streams.shape[1] - 1  # the last symbol is only ever a target

    def __len__(self) -> int:
        return max(0, -(-(self.last - self.offset) // self.seq_len))

    def __getitem__(self, k: int) -> Batch:
        if not 0 <= k < len(self):
            raise IndexError(k)
        start = self.offset + k * self.seq_len
        stop = min(start + self.seq_len, self.last)
        return Batch(self.streams[:, start:stop].contiguous(), self.streams[:, start + 1:stop + 1].contiguous())


class Sentences(TaskData):
    """Lines as independent sequences starting from the symbol ``start`` (end of line): a batch
    pads them to the longest, targets ``IGNORE`` beyond each line's length."""

    def __init__(self, lines: list[np.ndarray], start: int):
        self.lines, self.start = lines, start

    def __len__(self) -> int:
        return len(self.lines)

    def batch(self, indices) -> Batch:
        lines = [self.lines[j] for j in indices]
        longest = max(len(line) for line in lines)
        x = torch.zeros(len(lines), longest, dtype=torch.long)
        y = torch.full((len(lines), longest), IGNORE, dtype=torch.long)
        for i, line in enumerate(lines):
            ids = torch.from_numpy(line)
            x[i, 0] = self.start
            x[i, 1:len(line)] = ids[:-1]
            y[i, :len(line)] = ids
        return Batch(x, y, torch.tensor([len(line) for line in lines]))
