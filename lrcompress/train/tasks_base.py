"""What every task shares: the mini-batch, the task protocol, and the losses and metrics of
its three kinds of output (a class, a real value, a symbol at every step).

``evaluate`` returns *sums* over a batch (and a ``count``) so that an evaluation over many
batches is exact: add the dicts up, then call ``finalize`` once for the means.

Data reaches the loop through ``torch.utils.data``: a task's ``batches`` is a ``DataLoader``
over a ``TaskData`` (a map-style ``Dataset`` whose ``data[indices]`` is a whole ``Batch``, built
in one vectorised step) with a sampler of index lists, ``EpochOrder`` cut by ``BatchSampler``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..errors import ConfigError
from .fields import check_fields

SPLITS = ("train", "valid", "test")
SPLIT_CODES = {"train": 1, "valid": 2, "test": 3}
IGNORE = -100  # target of padded positions (F.cross_entropy's default ignore_index)


@dataclass
class Batch:
    """One mini-batch, batch first.

    ``x``: (B, T, input_size) float32, or (B, T) token ids for language modelling, or (B, F)
    for a feed-forward task. ``y``: (B,) class ids, (B, 1) real targets, or (B, T) symbol ids
    (``IGNORE`` at padded steps). ``lengths``: (B,) true lengths of padded sequences, else None.
    """

    x: Tensor
    y: Tensor
    lengths: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        lengths = None if self.lengths is None else self.lengths.to(device, non_blocking=non_blocking)
        return Batch(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking),
                     lengths)

    def __len__(self) -> int:
        return self.x.shape[0]


class Task:
    """A benchmark: batches of a split, the loss to minimise, and metrics.

    Subclasses set the class attributes and ``DEFAULTS`` (the task's settings, with their
    types), and implement ``batches``. ``stateful`` tasks (language modelling on contiguous
    streams) yield consecutive windows of the same streams, so a trainer may carry the
    recurrent state from one batch to the next (reset it at the start of each ``batches``).
    """

    name: ClassVar[str]
    input_size: int
    output_size: int
    output: str  # "last": predict from the final state; "sequence": at every step
    metric: str  # the headline metric in ``finalize``'s result
    higher_is_better: bool
    stateful: bool = False  # consecutive train batches continue the same sequences
    tokens: bool = False  # x holds (B, T) symbol ids (vocabulary size input_size)
    sequential: bool = True  # x has a time axis; False: (B, F) vectors for feed-forward models
    DEFAULTS: ClassVar[dict] = {}
    TYPES: ClassVar[dict] = {}
    CHOICES: ClassVar[dict] = {}

    def __init__(self, spec: dict):
        self.spec = self.checked(spec)

    @classmethod
    def checked(cls, spec: dict) -> dict:
        """``spec`` with defaults filled in; raises ``ConfigError`` on a bad key or value."""
        if not isinstance(spec, dict):
            raise ConfigError(f"[task] must be a table of settings, got {spec!r}")
        if spec.get("name", cls.name) != cls.name:
            raise ConfigError(f"task.name {spec['name']!r} does not match {cls.__name__} ({cls.name!r})")
        values = {k: v for k, v in spec.items() if k != "name"}
        out = check_fields("task", values, cls.DEFAULTS, types=cls.TYPES, choices=cls.CHOICES)
        cls.check(out)
        return {"name": cls.name, **out}

    @classmethod
    def check(cls, spec: dict) -> None:
        """Range checks of the settings (types are already checked)."""

    def batches(self, split: str, batch_size: int, *, seed: int, epoch: int = 0,
                shuffle: bool = True) -> Iterable[Batch]:
        """One pass over ``split`` (a ``DataLoader`` of ``Batch``es), its order fixed by
        ``(seed, epoch)``; ``shuffle=False``: the split's own order. Raises ``ConfigError``
        on an unknown split or a batch size below 1."""
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        """Examples (sequences, or target symbols for a language model) in one pass of ``split``."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches in one pass of ``batches("train", batch_size, ...)``."""
        return math.ceil(self.num_examples("train") / batch_size)

    def train_examples(self) -> int | None:
        """Examples in one pass of the training split as ``batch_size`` counts them (sequences,
        images); None where the split has no fixed size (an endless stream) or a batch counts
        something else (a language model's symbols)."""
        return self.num_examples("train") or None

    def check_batch_size(self, batch_size: int) -> None:
        """``ConfigError`` naming both numbers when one batch would be larger than the training
        split: every update would then take the whole split, a smaller batch than asked."""
        examples = self.train_examples()
        if examples is not None and batch_size > examples:
            raise ConfigError(f"train.batch_size = {batch_size} is larger than the {self.name} training split "
                              f"({examples} examples): use a batch_size of at most {examples}")

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError

    def evaluate(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.spec.items() if k != "name")
        return f"{type(self).__name__}({settings})"


def check_split(split: str, batch_size: int) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")


def epoch_order(size: int, *, seed: int, epoch: int, split: str, shuffle: bool) -> np.ndarray:
    """Example order of one pass: a permutation fixed by (seed, epoch, split), or 0..size-1."""
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, epoch, SPLIT_CODES[split]]).permutation(size)


class EpochOrder(Sampler[int]):
    """The example order of one pass (``epoch_order``) as a ``torch.utils.data.Sampler``."""

    def __init__(self, size: int, *, seed: int, epoch: int, split: str, shuffle: bool):
        self.size, self.seed, self.epoch, self.split, self.shuffle = size, seed, epoch, split, shuffle

    def __iter__(self):
        return iter(epoch_order(self.size, seed=self.seed, epoch=self.epoch, split=self.split,
                                shuffle=self.shuffle).tolist())

    def __len__(self) -> int:
        return self.size


class TaskData(Dataset):
    """The examples of one split as a map-style ``Dataset``: ``data[i]`` is example ``i`` as
    ``(x, y)`` tensors (so a plain ``DataLoader(data, batch_size=32, shuffle=True)`` works, its
    pairs accepted by ``fit``), and ``data[[i, j, ...]]`` is the ``Batch`` of those examples,
    built at once (what ``batch_loader`` asks for). Subclasses implement ``batch`` and ``__len__``."""

    def batch(self, indices) -> Batch:
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, (list, tuple, np.ndarray)):
            return self.batch(index)
        one = self.batch([index])
        return one.x[0], one.y[0]


def batch_loader(data: Dataset, batches: Iterable | None = None) -> DataLoader:
    """A ``DataLoader`` yielding ``data[item]`` for each item of ``batches`` (lists of indices,
    e.g. a ``BatchSampler``; ``None``: ``data[0], data[1], ...``, for data whose items are
    batches already). Its own generator keeps the global random state untouched, so the
    model's random draws (dropout) do not depend on how the data is read."""
    return DataLoader(data, sampler=batches, batch_size=None, generator=torch.Generator())


def shuffled_batches(data: Dataset, batch_size: int, *, seed: int, epoch: int, split: str,
                     shuffle: bool) -> DataLoader:
    """``batch_loader`` over ``data`` in ``epoch_order``, ``batch_size`` examples at a time
    (the last batch may be smaller)."""
    order = EpochOrder(len(data), seed=seed, epoch=epoch, split=split, shuffle=shuffle)
    return batch_loader(data, BatchSampler(order, batch_size, drop_last=False))


def _safe(num: float, den: float) -> float:
    return num / den if den else float("nan")


class Classification:
    """Mixin: one class per example from the final state; cross-entropy or squared hinge."""

    metric, higher_is_better = "accuracy", True
    hinge = False  # per-class squared hinge (one-vs-rest, targets +-1) instead of cross-entropy

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        if self.hinge:
            return squared_hinge(logits, batch.y).mean()
        return F.cross_entropy(logits, batch.y)

    def evaluate(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        logits = logits.detach().float()
        out = {"count": float(len(batch.y)),
               "correct": float((logits.argmax(-1) == batch.y).sum()),
               "nll": float(F.cross_entropy(logits, batch.y, reduction="sum"))}
        if self.hinge:
            out["hinge"] = float(squared_hinge(logits, batch.y).sum())
        return out

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"accuracy": _safe(sums["correct"], sums["count"]), "ce": _safe(sums["nll"], sums["count"])}
        if "hinge" in sums:
            out["hinge"] = _safe(sums["hinge"], sums["count"])
        return out


def squared_hinge(logits: Tensor, y: Tensor) -> Tensor:
    """Per example, sum over classes of max(0, 1 - t_k s_k)^2 with t = +1 for the class, -1 else."""
    signs = 2.0 * F.one_hot(y, logits.shape[-1]).to(logits.dtype) - 1.0
    return torch.clamp(1.0 - signs * logits, min=0.0).pow(2).sum(-1)


class Regression:
    """Mixin: one real value per example from the final state; mean squared error."""

    metric, higher_is_better = "mse", False

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(logits.reshape(batch.y.shape), batch.y)

    def evaluate(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        err = logits.detach().float().reshape(batch.y.shape) - batch.y
        return {"count": float(len(batch.y)), "se": float(err.pow(2).sum())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        return {"mse": _safe(sums["se"], sums["count"])}


def sequence_nll(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) symbols, ignoring padded steps."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)
