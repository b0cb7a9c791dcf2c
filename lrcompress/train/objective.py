"""What a batch means to the engine: the loss and metrics to compute, and how to call the model.

``Objective`` wraps a ``Task`` (``lrcompress.train.tasks``) or user functions ``loss_fn`` and
``metric_fn``, or the loss the model returns itself (a Hugging Face ``ModelOutput``'s ``.loss``
or a dict's ``"loss"``); ``forward`` calls a model on a ``Batch`` (with its lengths, or carrying
the recurrent state of a stream task) or on a ``DictBatch`` (``model(**batch)``);
``run_evaluation`` sums the metrics over a data set.

    >>> objective = Objective(torch.nn.functional.mse_loss)
    >>> objective.higher_is_better
    False
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .distributed import Distributed
from .models import detach_state
from .tasks_base import Batch

LOWER_IS_BETTER = ("loss", "mse", "ce", "nll", "error", "bpc", "ppl", "perplexity", "hinge")
Data = Iterable | Callable[..., Iterable]


class Objective:
    """Loss and metrics of a batch: from a ``Task``, or from user functions.

    ``sums`` returns per-batch sums (with ``count``) so evaluation over many batches (and many
    ranks) is exact; ``finalize`` turns the totals into means.
    """

    def __init__(self, loss_fn: Callable | None = None, metric_fn: Callable | None = None, *, task=None,
                 metric: str | None = None, higher_is_better: bool | None = None):
        # neither loss_fn nor task: the model returns its loss (checked on the first batch)
        self.task, self.loss_fn, self.metric_fn = task, loss_fn, metric_fn
        self.stateful = bool(getattr(task, "stateful", False))
        self.metric = metric or (task.metric if task is not None else None)
        if higher_is_better is None and task is not None and self.metric == task.metric:
            higher_is_better = task.higher_is_better
        self._higher = higher_is_better

    def loss(self, output, batch: Batch, model: nn.Module | None = None) -> Tensor:
        if self.task is None and self.loss_fn is None:
            return model_loss(output)
        if self.task is not None and self.loss_fn is None:
            loss = self.task.loss(output, batch)
            penalty = getattr(model, "penalty", None)  # e.g. the recipe models' L2 on the output matrix
            return loss + penalty() if callable(penalty) else loss
        return self.loss_fn(output, batch.y)

    def sums(self, output, batch: Batch) -> dict[str, float]:
        if self.task is not None and self.loss_fn is None:
            return dict(self.task.evaluate(output, batch))
        n = float(len(batch))
        loss = model_loss(output) if self.loss_fn is None else self.loss_fn(output, batch.y)
        out = {"count": n, "loss": float(loss) * n}
        if self.metric_fn is not None:
            value = self.metric_fn(output, batch.y)
            values = value if isinstance(value, dict) else {"metric": value}
            out.update({k: float(v) * n for k, v in values.items()})
        return out

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        if self.task is not None and self.loss_fn is None:
            return dict(self.task.finalize(sums))
        n = sums.get("count", 0.0)
        return {k: (v / n if n else float("nan")) for k, v in sums.items() if k != "count"}

    def headline(self, metrics: dict[str, float]) -> str:
        """The metric that decides best checkpoint, plateau and early stopping."""
        if self.metric is None:
            extra = [k for k in metrics if k != "loss"]
            self.metric = extra[0] if extra else "loss"
        if self.metric not in metrics:
            raise ConfigError(f"metric {self.metric!r} is not among the evaluation results {sorted(metrics)}")
        return self.metric

    @property
    def higher_is_better(self) -> bool:
        if self._higher is None:
            name = (self.metric or "loss").lower()
            return not any(word in name for word in LOWER_IS_BETTER)
        return self._higher


@torch.no_grad()
def run_evaluation(model: nn.Module, data: Data, objective: Objective, device: torch.device, dist: Distributed,
                   autocast, *, shard: bool = True) -> dict[str, float]:
    """``objective.finalize`` of the metric sums over ``data`` (and over the ranks), in eval mode."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    carry = None
    try:
        for item in (data() if callable(data) and not hasattr(data, "__iter__") else data):
            batch = as_batch(item)
            batch = (dist.shard(batch) if shard else batch).to(device, non_blocking=True)
            with autocast():
                output, carry = forward(model, batch, carry, objective.stateful)
            for k, v in objective.sums(output, batch).items():
                totals[k] = totals.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    if dist.world > 1:
        totals = dist.sum(totals, device)
    return objective.finalize(totals)


class StatefulForward(nn.Module):
    """``forward(x, state, lengths) -> (output, state)`` of a model with ``forward_stateful``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "forward_stateful", None)):
            raise ConfigError(f"a stateful task needs a model with forward_stateful(x, state, lengths), "
                              f"not {type(model).__name__}")
        self.model = model

    def forward(self, x: Tensor, state=None, lengths: Tensor | None = None):
        return self.model.forward_stateful(x, state, lengths)


def model_loss(output) -> Tensor:
    """The loss a model returned: ``output.loss`` (a Hugging Face ``ModelOutput``) or ``output["loss"]``."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, Tensor):
        raise ConfigError(f"fit needs a loss_fn (or a task), or a model whose output carries its loss "
                          f"(.loss or a 'loss' entry, e.g. given labels); got a {type(output).__name__} without one")
    return loss


class DictBatch:
    """A batch given as a mapping of named tensors (a Hugging Face collator's output): the model
    runs as ``model(**batch)``; ``y`` is its ``"labels"`` entry (None without), for ``loss_fn``
    and ``metric_fn``. Batch first: ``len`` is the first dimension of its first tensor."""

    lengths = None

    def __init__(self, data: Mapping):
        self.data = dict(data)
        if not any(isinstance(v, Tensor) and v.dim() > 0 for v in self.data.values()):
            raise ConfigError(f"a dict batch must hold tensors with a batch dimension, got keys {sorted(self.data)}")

    @property
    def y(self):
        return self.data.get("labels")

    def to(self, device, non_blocking: bool = False) -> "DictBatch":
        return DictBatch({k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
                          for k, v in self.data.items()})

    def __len__(self) -> int:
        return next(v.shape[0] for v in self.data.values() if isinstance(v, Tensor) and v.dim() > 0)


def forward(model: nn.Module, batch: Batch, carry, stateful: bool):
    """``(output, carried state)``: ``model(x)``, ``model(x, lengths)`` when the batch has lengths,
    ``model(**batch)`` for a ``DictBatch``, or the stateful ``model(x, carry, lengths)`` whose
    state is detached for the next window."""
    if isinstance(batch, DictBatch):
        if stateful:
            raise ConfigError("a stateful task needs (x, y) batches, not dict batches")
        return model(**batch.data), None
    if stateful:
        output, state = model(batch.x, carry, batch.lengths)
        return output, detach_state(state)
    return (model(batch.x) if batch.lengths is None else model(batch.x, batch.lengths)), None


def as_batch(item) -> Batch | DictBatch:
    """A batch from a loader item: a ``Batch``, ``(x, y)``, ``(x, y, lengths)``, a dict with
    ``x`` and ``y``, or any other mapping of named tensors (a ``DictBatch``: ``model(**item)``)."""
    if isinstance(item, (Batch, DictBatch)):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return Batch(*item)
    if isinstance(item, Mapping):
        if {"x", "y"} <= set(item):
            return Batch(item["x"], item["y"], item.get("lengths"))
        return DictBatch(item)
    raise ConfigError(f"training data must yield (x, y) pairs, Batch objects or dicts of tensors, "
                      f"got {type(item).__name__}")

