"""Generated benchmarks: the memory (copy) task and its two variants, and the addition task.

Every example is a pure function of ``(task seed, split, index)``: example ``i`` of a split is
drawn from its own generator, so a split is a fixed data set (the paper's 100,000 training and
10,000 validation/test examples by default) whatever the batch size, and the training seed
only decides the order. ``train_size = 0`` trains on an endless stream of fresh examples
instead, ``steps_per_epoch`` batches per epoch. ``task.dataset(split)`` is a split as a
``torch.utils.data.Dataset``; ``task.batches(...)`` a ``DataLoader`` over it in the seeded order.

    >>> task = CopyTask({"lag": 5, "train_size": 100})
    >>> batch = next(iter(task.batches("train", 4, seed=0)))
    >>> batch.x.shape, batch.y.shape
    (torch.Size([4, 25, 10]), torch.Size([4, 25]))
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .fields import check_range
from .tasks_base import (SPLIT_CODES, Batch, Regression, Task, TaskData, batch_loader, check_split, sequence_nll,
                         shuffled_batches)

STREAM_CODE = 4  # generator namespace of the endless training stream


class SyntheticTask(Task):
    """A task whose examples are generated from seeds; subclasses implement ``generate``."""

    DEFAULTS: ClassVar[dict] = {
        "seed": 0,  # data seed: fixes every example of every split, independent of the training seed
        "train_size": 100_000,  # 0: an endless stream of fresh examples
        "valid_size": 10_000,
        "test_size": 10_000,
        "steps_per_epoch": 1000,  # batches per epoch of the endless stream (train_size = 0)
    }

    @classmethod
    def check(cls, spec: dict) -> None:
        check_range("task", spec, "seed", 0)
        for key in ("train_size", "valid_size", "test_size"):
            check_range("task", spec, key, 0)
        for key in ("valid_size", "test_size", "steps_per_epoch"):
            check_range("task", spec, key, 1)

    def generate(self, rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``n`` examples of ``split`` as (inputs, targets) arrays, before conversion to tensors."""
        raise NotImplementedError

    def to_batch(self, x: np.ndarray, y: np.ndarray) -> Batch:
        return Batch(torch.from_numpy(x), torch.from_numpy(y))

    def examples(self, split: str, indices) -> Batch:
        """Examples ``indices`` of ``split``, each from its own generator."""
        parts = [self.generate(np.random.default_rng([self.spec["seed"], SPLIT_CODES[split], int(i)]), 1, split)
                 for i in indices]
        return self.to_batch(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def num_examples(self, split: str) -> int:
        """Examples in ``split``; 0 for the endless training stream."""
        check_split(split, 1)
        return self.spec[f"{split}_size"]

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.spec["train_size"] == 0:
            return self.spec["steps_per_epoch"]
        return super().steps_per_epoch(batch_size)

    def dataset(self, split: str) -> "Examples":
        """The examples of ``split`` (a fixed-size one) as a ``torch.utils.data.Dataset``."""
        check_split(split, 1)
        if self.spec[f"{split}_size"] == 0:
            raise ConfigError(f"the {split} split is an endless stream (task.{split}_size = 0): use batches()")
        return Examples(self, split)

    def batches(self, split: str, batch_size: int, *, seed: int, epoch: int = 0,
                shuffle: bool = True) -> DataLoader:
        check_split(split, batch_size)
        if self.spec[f"{split}_size"] == 0:  # the endless training stream: fresh examples, batch by batch
            return batch_loader(FreshBatches(self, batch_size, seed=seed, epoch=epoch))
        return shuffled_batches(self.dataset(split), batch_size, seed=seed, epoch=epoch, split=split, shuffle=shuffle)


class Examples(TaskData):
    """The examples of one split of a ``SyntheticTask``, each a pure function of its index."""

    def __init__(self, task: SyntheticTask, split: str):
        self.task, self.split = task, split

    def __len__(self) -> int:
        return self.task.spec[f"{self.split}_size"]

    def batch(self, indices) -> Batch:
        return self.task.examples(self.split, indices)


class FreshBatches(Dataset):
    """One epoch of the endless training stream: item ``step`` is a whole batch of fresh
    examples, drawn from a generator seeded by (task seed, training seed, epoch, step)."""

    def __init__(self, task: SyntheticTask, batch_size: int, *, seed: int, epoch: int):
        self.task, self.batch_size, self.seed, self.epoch = task, batch_size, seed, epoch

    def __len__(self) -> int:
        return self.task.spec["steps_per_epoch"]

    def __getitem__(self, step: int) -> Batch:
        if not 0 <= step < len(self):
            raise IndexError(step)
        rng = np.random.default_rng([self.task.spec["seed"], STREAM_CODE, self.seed, self.epoch, step])
        return self.task.to_batch(*self.task.generate(rng, self.batch_size))


class CopyTask(SyntheticTask):
    """The memory task of Arjovsky et al. (paper 3.0.1) and its variable-length (Danihelka et
    al.) and variable-lag (Henaff et al.) variants; symbols a0..a9 as ids 0..9, one-hot inputs.

    An example with ``L`` data symbols and gap ``g`` has ``T = lag + 2 * data_length`` steps:

    - input: ``L`` data symbols drawn from a0..a7, ``g - 1`` blanks a8, the "run" symbol a9,
      then blanks to the end;
    - target: blanks for the first ``L + g`` steps, the ``L`` data symbols, then blanks.

    ``variant = "fixed"``: ``L = data_length`` (10), ``g = lag`` (N), so T = N + 20, the input
    has N - 1 blanks and the target N + 10 blanks before the data, exactly as in the paper.
    ``"variable_length"``: ``L`` uniform in 1..data_length per example, ``g = lag``.
    ``"variable_lag"``: ``L = data_length``, ``g`` uniform in 1..lag per example. The sequence
    length stays T in every variant (as in the paper's code), padded with blanks.

    Metrics: ``ce``, the cross-entropy in nats averaged over all steps (the paper's measure,
    target < 1e-3), ``accuracy`` over the steps whose target is a data symbol, and
    ``sequence_accuracy``, the share of examples with every data symbol right.
    """

    name = "copy"
    SYMBOLS, BLANK, RUN = 8, 8, 9  # a0..a7 are data symbols, a8 the blank, a9 "run"
    input_size, output_size, output = 10, 10, "sequence"
    metric, higher_is_better = "ce", False
    DEFAULTS: ClassVar[dict] = {**SyntheticTask.DEFAULTS, "lag": 100, "variant": "fixed", "data_length": 10}
    CHOICES: ClassVar[dict] = {"variant": ("fixed", "variable_length", "variable_lag")}

    @classmethod
    def check(cls, spec: dict) -> None:
        super().check(spec)
        check_range("task", spec, "lag", 1)
        check_range("task", spec, "data_length", 1)

    @property
    def length(self) -> int:
        return self.spec["lag"] + 2 * self.spec["data_length"]

    def generate(self, rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        size, lag, variant = self.spec["data_length"], self.spec["lag"], self.spec["variant"]
        data = rng.integers(0, self.SYMBOLS, size=(n, size))
        L = rng.integers(1, size + 1, size=(n, 1)) if variant == "variable_length" else np.full((n, 1), size)
        g = rng.integers(1, lag + 1, size=(n, 1)) if variant == "variable_lag" else np.full((n, 1), lag)
        t = np.arange(self.length)[None, :]
        rows = np.arange(n)[:, None]
        x = np.where(t < L, data[rows, np.minimum(t, size - 1)], self.BLANK)
        x = np.where(t == L + g - 1, self.RUN, x)
        shifted = np.clip(t - L - g, 0, size - 1)
        y = np.where((t >= L + g) & (t < 2 * L + g), data[rows, shifted], self.BLANK)
        return x.astype(np.int64), y.astype(np.int64)

    def to_batch(self, x: np.ndarray, y: np.ndarray) -> Batch:
        return Batch(F.one_hot(torch.from_numpy(x), self.input_size).float(), torch.from_numpy(y))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        return sequence_nll(logits, batch.y)

    def evaluate(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        logits = logits.detach().float()
        right = logits.argmax(-1) == batch.y
        data = batch.y != self.BLANK
        return {"count": float(len(batch.y)), "steps": float(batch.y.numel()),
                "nll": float(sequence_nll(logits, batch.y, reduction="sum")),
                "data_steps": float(data.sum()), "data_correct": float((right & data).sum()),
                "sequences_correct": float((right | ~data).all(-1).sum())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        def ratio(a: str, b: str) -> float:
            return sums[a] / sums[b] if sums[b] else float("nan")

        return {"ce": ratio("nll", "steps"), "accuracy": ratio("data_correct", "data_steps"),
                "sequence_accuracy": ratio("sequences_correct", "count")}


class AdditionTask(Regression, SyntheticTask):
    """The addition task (paper 3.0.2): ``length`` steps of two channels, the first uniform in
    [0, 1), the second 0 except for two 1s. The target is the sum of the two marked values,
    predicted from the final state; metric: mean squared error (always answering 1 scores
    ~0.167, the variance of the sum).

    Marker placement: in training, one in each half (the first in steps ``0 .. length//2 - 1``,
    the second in ``length//2 .. length - 1``), as in the authors' ``RNN_adding.py``;
    ``eval_markers`` places those of the validation and test splits: ``"halves"`` the same way,
    or ``"anywhere"``: two distinct steps drawn uniformly from ``0 .. length - 1`` (the authors'
    test set, ``np.random.choice(T, 2, replace=False)``; they had no validation set and chose
    their model on that test set)."""

    name = "addition"
    input_size, output_size, output = 2, 1, "last"
    DEFAULTS: ClassVar[dict] = {**SyntheticTask.DEFAULTS, "length": 750, "eval_markers": "halves"}
    CHOICES: ClassVar[dict] = {"eval_markers": ("halves", "anywhere")}

    @classmethod
    def check(cls, spec: dict) -> None:
        super().check(spec)
        check_range("task", spec, "length", 2)

    def generate(self, rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        T = self.spec["length"]
        values = rng.random((n, T)).astype(np.float32)
        if split != "train" and self.spec["eval_markers"] == "anywhere":
            first = rng.integers(0, T, size=n)
            second = rng.integers(0, T - 1, size=n)
            second += second >= first  # uniform over the other T - 1 steps: distinct, in either order
        else:
            first = rng.integers(0, T // 2, size=n)
            second = rng.integers(T // 2, T, size=n)
        rows = np.arange(n)
        markers = np.zeros((n, T), dtype=np.float32)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        y = (values[rows, first] + values[rows, second]).astype(np.float32)[:, None]
        return np.stack([values, markers], axis=-1), y

