"""The training loop: ``fit(model, train_loader, loss_fn, recipe=...)``.

One loop serves the recipes (``lrcompress train``/``finetune``) and user code: data is any
iterable of ``(x, y)`` pairs or ``Batch`` objects (a ``DataLoader``), or a function of the
epoch returning one. Per update: forward (optionally under autocast), backward, the paper's
stabilisers (non-finite check with one host sync, clipping, recovery, max-norm), optimiser
step and learning-rate schedule. Every ``eval_every`` updates: validation, best/last
checkpoints, plateau halving, early stopping. Ctrl-C or SIGTERM stops at the next update
boundary and leaves a checkpoint that ``resume=True`` continues bit-exactly (on CPU).

    >>> result = fit(model, loader, torch.nn.functional.cross_entropy,
    ...              recipe={"steps": 1000, "lr": 1e-3}, val_loader=val_loader)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from ..errors import ConfigError, FormatError
from ..io import write_text_atomic
from ..jsonout import dumps as json_dumps
from ..progress import bar as progress_bar, is_quiet
from ..report import format_metric
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, save_weights, seed_everything, set_rng_state
from .distributed import Distributed, unwrap
from .models import set_dropout
from .objective import Data, Objective, StatefulForward, as_batch, forward, run_evaluation
from .optim import build_optimizer, build_scheduler
from .recipe import check_train
from .rundir import check_run_dir, claim_run_dir
from .stabilisers import Stabiliser, has_weight_norm, weight_norm
from .tasks_base import Batch
from .tensorboard import TensorBoardLog, require as require_tensorboard


@dataclass
class TrainConfig:
    """How to train: the ``[train]`` section of a recipe, checked by ``recipe.check_train``
    (defaults: the paper's RMSProp set-up, equal to ``recipe.RECIPE_DEFAULTS``). ``steps`` or
    ``epochs`` must be set.

    >>> TrainConfig(steps=1000, optimizer="adam").lr
    0.001
    """

    optimizer: str = "rmsprop"  # rmsprop (the paper's), adam, adafactor
    lr: float = 1e-3  # adafactor: 0 selects its relative step size
    batch_size: int = 20
    steps: int = 0  # updates to run (0: run `epochs` epochs)
    epochs: int = 0  # passes over the training data (0: no limit, `steps` decides)
    eval_every: int = 500  # updates between evaluations and checkpoints (0: once per epoch)
    clip: str = "element"  # none, element (clamp at +-clip_value), norm (global gradient norm)
    clip_value: float = 1.0
    nan_policy: str = "skip"  # on a NaN/Inf gradient norm: skip, decay (0.1 * param step), restore, none
    weight_norm: bool = False  # weight-normalise the factor matrices (appendix A.2)
    max_row_norm: float = 0.0  # clip factor-matrix row norms after each update (paper: 10; 0 = off)
    recurrent_dropout: float = 0.0  # > 0: variational dropout of the state (recipe models, models.set_dropout)
    dropout: float = 0.0  # > 0: replaces the rate of every nn.Dropout of the model
    lr_schedule: str = "constant"  # constant, plateau (multiply by plateau_factor), onecycle
    plateau_patience: int = 3  # evaluations without improvement before the lr is lowered
    plateau_factor: float = 0.5
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    amp: str = "none"  # none, bf16, fp16 (autocast on CUDA; fp16 adds a GradScaler)
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1e-8
    rmsprop_eps_inside: bool = False  # lr g / sqrt(acc + eps) as the authors' code (optim.PaperRMSprop)
    rmsprop_initial_accumulator: float = 1e-3  # start of the squared-gradient average
    clip_exempt: list = field(default_factory=list)  # parameter names (or "name:gate") left unclipped
    select: str = ""  # metric picking the best checkpoint ("": the task's headline metric)
    weight_decay: float = 0.0
    lr_orthogonal: float = 0.0  # > 0: lr of the scaled Cayley skew originals (scoRNN's A); 0: lr
    unitary_penalty: float = 0.0  # > 0: loss += this * KRU soft unitary penalty of the Kronecker factors
    # Factored recurrent layers in training: "auto" (the cost model picks, per layer and batch
    # shape, the factored backward of execution.bptt or the dense rebuild), "factored", "dense".
    execution: str = "auto"

    def __post_init__(self) -> None:
        for key, value in check_train(asdict(self)).items():  # the recipe's checks: one rule book
            object.__setattr__(self, key, value)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict | None) -> "TrainConfig":
        """From a ``[train]`` table; unknown keys and bad values raise ``ConfigError``."""
        return cls(**check_train(dict(values or {})))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    """What ``fit`` did. ``best``/``val``/``test`` hold metric dicts (``val``/``test`` with the
    returned weights: the best ones when validation data was given)."""

    steps: int  # updates done
    epochs: int  # passes over the training data begun (the last may be partial)
    stopped: str  # "steps", "epochs", "early_stopping", "interrupted" or "diverged" (non-finite weights)
    metric: str
    higher_is_better: bool
    best_step: int | None = None
    best: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    nan_events: int = 0
    amp_overflows: int = 0
    wall_time: float = 0.0
    run_dir: Path | None = None
    execution: dict[str, str] = field(default_factory=dict)  # per factored layer: the path its training ran
    # Why the result is not to be trusted, one line each: the weights diverged (stopped
    # "diverged"), final validation/test metrics that are NaN/Inf. Empty for a sound run; each
    # line is also a UserWarning, and `lrcompress train` then exits with code 3.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"] = None if self.run_dir is None else str(self.run_dir)
        d.pop("history")
        return d


def parameter_groups(model: nn.Module, config: TrainConfig) -> list:
    """The trainable parameters for the recipe's optimiser: one list, or with ``config.lr_orthogonal``
    two groups, the scaled Cayley skew originals (scoRNN's ``A``, ``nn.scornn.orthogonal_parameters``)
    at that rate and the rest at ``config.lr`` (Helfrich et al. 2018 train ``A`` at its own, smaller
    rate). Raises ``ConfigError`` when ``lr_orthogonal`` is set and the model has no such weight."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not config.lr_orthogonal:
        return trainable
    from ..nn.scornn import orthogonal_parameters

    skew = [p for p in orthogonal_parameters(model) if p.requires_grad]
    if not skew:
        raise ConfigError(f"train.lr_orthogonal = {config.lr_orthogonal} needs a scaled Cayley (orthogonal) "
                          f"weight, and {type(model).__name__} has none (model.cell = 'scornn' or "
                          "model.structure = 'orthogonal')")
    ids = {id(p) for p in skew}
    rest = [p for p in trainable if id(p) not in ids]
    return ([{"params": rest}] if rest else []) + [{"params": skew, "lr": config.lr_orthogonal}]


class _AnySums(dict):
    """Empty metric sums that claim every key (value 0): a task's ``finalize`` of them names its metrics."""

    def __missing__(self, key):
        return 0.0

    def __contains__(self, key) -> bool:
        return True


def check_select(name: str, task=None) -> str:
    """``train.select``, checked against the metrics ``task`` reports (the keys of its
    ``finalize``) before any update; without a task it is checked at the first evaluation.
    Raises ``ConfigError`` naming the metric and the task's metrics."""
    if task is None:
        return name
    known = list(task.finalize(_AnySums()))
    if name not in known:
        raise ConfigError(f"train.select = {name!r} is not a metric of task {task.name!r} "
                          f"(its metrics: {', '.join(known)})")
    return name


def attach_execution(model: nn.Module, execution: str) -> dict[str, nn.Module]:
    """Give the factored recurrent layers of ``model`` the training-time path ``execution``
    (``TrainConfig.execution``) and return them by name. Layers a caller already accelerated
    (or set to ``accelerate(mode="dense")``) keep that choice, unless ``execution`` forces a path;
    ``dense`` attaches nothing."""
    from ..execution import acceleration, accelerate
    from ..execution.dispatch import DENSE_CHOSEN
    from ..nn.rnn import FactoredRNN

    if execution == "dense":
        return {}
    found = {name or "model": m for name, m in unwrap(model).named_modules() if isinstance(m, FactoredRNN)}
    for module in found.values():
        current = acceleration(module)
        if current is None and execution == "auto" and module.__dict__.get(DENSE_CHOSEN):
            continue  # the caller's accelerate(mode="dense") stands
        if current is None or execution == "factored":
            accelerate(module, mode=execution, training=True)
        elif not current.training:  # the caller's inference choice, now also for training
            accelerate(module, mode=current.mode, training=True, cuda_graphs=current.cuda_graphs,
                       threads=current.threads, profile=current.profile)
    return found


# Param-group entries a learning-rate schedule writes (OneCycleLR: its peak and floor): a resume
# leaves them as the checkpoint saved them.
SCHEDULE_OWNED = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")


def describe_execution(layers: dict[str, nn.Module], model: nn.Module | None = None) -> dict[str, str]:
    """What each accelerated layer of ``layers`` (by name) ran in its last training call, in words
    (for the log and ``summary.json``); with ``model``, also its other recurrent layers (dense
    ones included) that ran per-sequence dropout masks."""
    from ..execution import acceleration

    out = {}
    if model is not None:
        layers = dict(layers)
        for name, module in unwrap(model).named_modules():
            if "_lrc_variational_note" in module.__dict__ and module not in layers.values():
                layers[name or "model"] = module
    for name, module in layers.items():
        current = acceleration(module)
        last = None if current is None else current.last
        note = module.__dict__.get("_lrc_variational_note")  # per-sequence dropout masks bypass it in training
        if note is not None:
            out[name] = note
        if last is None or note is not None:
            continue
        choice, estimate = last
        path = "factored backward through the factors" if choice == "factored" else "dense rebuild"
        if estimate is None:
            out[name] = f"{path} ({'forced' if choice == 'factored' else 'no factored backward for this layer or input'})"
        else:
            out[name] = f"{path} (cost model: factored {estimate.speedup:.1f}x the speed of dense)"
    return out


def forced_dense(model: nn.Module, described: dict[str, str]) -> dict[str, str]:
    """``train.execution = "dense"`` in words for the log: every factored layer rebuilds its
    weights for PyTorch's kernel, except where per-sequence dropout masks took a path of their own
    (no PyTorch kernel takes them)."""
    from ..nn.rnn import FactoredRNN

    out = dict(described)
    for name, module in unwrap(model).named_modules():
        name = name or "model"
        if name in out:
            out[name] += " (train.execution = dense: no PyTorch kernel takes per-sequence masks)"
        elif isinstance(module, FactoredRNN):
            out[name] = "dense rebuild (train.execution = dense)"
    return out


def fit(model: nn.Module, train_loader: Data, loss_fn: Callable | None = None, *,
        recipe: TrainConfig | dict | None = None, val_loader: Data | None = None, test_loader: Data | None = None,
        metric_fn: Callable | None = None, metric: str | None = None, higher_is_better: bool | None = None,
        task=None, run_dir: str | Path | None = None, resume: bool = False,
        optimizer: torch.optim.Optimizer | None = None, scheduler=None, steps_per_epoch: int | None = None,
        on_step: Callable[["Loop"], None] | None = None, progress: bool | None = None, restore_best: bool = True,
        shard: bool = True, summary: dict | None = None, tensorboard: str | Path | None = None,
        on_start: Callable[[], None] | None = None) -> FitResult:
    """Train ``model`` and return a ``FitResult``.

    - ``train_loader``: an iterable of ``(x, y)`` or ``Batch`` (re-iterated each epoch), or a
      function ``epoch -> iterable``. Items may also be dicts of named tensors (a Hugging
      Face collator's output): the model then runs as ``model(**batch)``, and ``loss_fn`` may be
      left out when the model returns its loss (``output.loss`` or ``output["loss"]``). ``val_loader``/``test_loader``: an iterable or a function
      of no argument.
    - ``loss_fn(model(x), y) -> scalar``; ``metric_fn(model(x), y) -> float | dict`` (batch
      means), ``metric`` names the one that picks the best checkpoint (default: the first
      ``metric_fn`` value, else the validation loss). A ``task`` (``lrcompress.train.tasks``)
      supplies loss and metrics instead.
    - ``recipe``: a ``TrainConfig`` or a ``[train]`` dict (unset keys take the paper's defaults;
      without ``steps`` and ``epochs``, one epoch).
    - ``run_dir``: where ``metrics.jsonl``, ``last.safetensors``, ``best.safetensors`` and
      ``summary.json`` go; ``resume=True`` continues from ``last.safetensors``.
    - ``optimizer``/``scheduler``: your own (any torch optimiser and LR scheduler) instead of
      the recipe's; the scheduler steps after every update (skipped ones included), a
      ``ReduceLROnPlateau`` after every evaluation with the headline validation metric (else
      the training loss) as it is, so its ``mode`` decides the direction.
    - ``on_step(loop)``: called after every update (``loop.step``, ``loop.model``, ``loop.stop()``).
    - ``progress``: bars for the updates and evaluation passes on stderr (``None``: only when
      stderr is a terminal; ``lrcompress.progress.set_quiet`` silences them and the
      per-evaluation lines).
    - ``tensorboard``: a folder for TensorBoard event files (train loss and lr per update,
      validation metrics per evaluation, test metrics at the end); needs the ``tensorboard``
      package (``pip install 'lrcompress[tensorboard]'``, else ``ConfigError``).
    - Under ``torchrun`` each rank trains on its slice of every batch (``shard=False`` when
      your loader already shards).
    - ``on_start()``: called once everything is checked and in place -- optimiser, stabilisers,
      and with ``resume`` the checkpoint, loaded -- right before anything is written to
      ``run_dir``: a refused run leaves no trace (``lrcompress train`` writes ``recipe.toml`` here).
    """
    if not isinstance(recipe, TrainConfig):
        recipe = dict(recipe or {})
        if "steps" not in recipe and "epochs" not in recipe:
            recipe["epochs"] = 1  # neither given: one pass over the data
    config = recipe if isinstance(recipe, TrainConfig) else TrainConfig.from_dict(recipe)
    if config.select and metric is None:  # the recipe's selection metric, e.g. psMNIST's validation CE
        metric = check_select(config.select, task)
        if higher_is_better is None and not (task is not None and metric == task.metric):
            higher_is_better = metric.endswith("accuracy")  # else an error, a loss, a CE, ...
    objective = Objective(loss_fn, metric_fn, task=task, metric=metric, higher_is_better=higher_is_better)
    loop = Loop(model, config, objective, train_loader, val_loader, test_loader, run_dir=run_dir, optimizer=optimizer,
                scheduler=scheduler, steps_per_epoch=steps_per_epoch, on_step=on_step, progress=progress, shard=shard,
                tensorboard=tensorboard)
    loop.on_start = on_start
    try:
        return loop.run(resume=resume, restore_best=restore_best, summary=summary or {})
    finally:
        loop.dist.close()


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, loss_fn: Callable | None = None, *, metric_fn: Callable | None = None,
             task=None, device: torch.device | str | None = None, progress: bool | None = False) -> dict[str, float]:
    """Metrics of ``model`` over ``data`` (means over examples), without training.

    ``progress``: a bar over the batches on stderr (``None``: when stderr is a terminal).

    >>> evaluate(model, val_loader, torch.nn.functional.cross_entropy)   # doctest: +SKIP
    {'loss': 0.41}
    """
    objective = Objective(loss_fn, metric_fn, task=task)
    device = torch.device(device) if device is not None else _model_device(model)
    model = StatefulForward(model) if objective.stateful else model
    return run_evaluation(model, counted(data, progress), objective, device, Distributed(), contextlib.nullcontext)


class Loop:
    """The state of one ``fit`` call; ``on_step`` callbacks receive it."""

    def __init__(self, model: nn.Module, config: TrainConfig, objective: Objective, train_loader: Data,
                 val_loader: Data | None, test_loader: Data | None, *, run_dir, optimizer, steps_per_epoch,
                 on_step, progress, shard, tensorboard=None, scheduler=None):
        self.config, self.objective = config, objective
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.dist = Distributed.setup(config.device)
        self.device = self.dist.device(config.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.on_step, self.shard = on_step, shard
        self.show = progress  # None: bars only when stderr is a terminal (lrcompress.progress)
        self.tensorboard_dir, self.board = tensorboard, None  # the writer opens in run()
        if tensorboard is not None:
            require_tensorboard()  # before any work: one line naming the extra
        self.model = model.to(self.device)
        self.accelerated = attach_execution(model, config.execution)
        self.execution: dict[str, str] = {}
        if config.dropout or config.recurrent_dropout:  # the recipe's rates replace the model's
            set_dropout(model, dropout=config.dropout or None, recurrent_dropout=config.recurrent_dropout or None)
        if config.weight_norm and not has_weight_norm(model):
            if not weight_norm(model):
                warnings.warn("train.weight_norm is set but the model has no factored weights; ignored",
                              UserWarning, stacklevel=3)
        self.optimizer = optimizer or build_optimizer(
            parameter_groups(model, config), config.optimizer, lr=config.lr,
            weight_decay=config.weight_decay, rmsprop_alpha=config.rmsprop_alpha, rmsprop_eps=config.rmsprop_eps,
            rmsprop_eps_inside=config.rmsprop_eps_inside,
            rmsprop_initial_accumulator=config.rmsprop_initial_accumulator)
        if config.unitary_penalty:
            from ..structured.kronecker import unitary_penalty

            unitary_penalty(model)  # a model without Kronecker factors: ConfigError now, not at the first update
        self.stabiliser = Stabiliser(model, self.optimizer, clip=config.clip, clip_value=config.clip_value,
                                     nan_policy=config.nan_policy, max_row_norm=config.max_row_norm,
                                     clip_exempt=config.clip_exempt)
        # a stateful model runs forward_stateful; DDP must wrap the module whose forward is called
        self.forward_model = StatefulForward(model) if objective.stateful else model
        self.train_model = self.dist.wrap(self.forward_model, self.device)
        self.autocast, self.scaler = self._amp()
        self.epoch_length = steps_per_epoch if steps_per_epoch is not None else _length(train_loader)
        self.total_steps = self._total_steps()
        # torch's schedulers: onecycle steps after every update; plateau after every evaluation, on
        # the score that also picks the best checkpoint and stops early (higher is better)
        if scheduler is not None and config.lr_schedule != "constant":
            raise ConfigError(f"give a scheduler or train.lr_schedule={config.lr_schedule!r}, not both")
        if scheduler is not None and getattr(scheduler, "optimizer", self.optimizer) is not self.optimizer:
            # else fit steps a scheduler whose optimiser never updates anything: a silent no-op
            raise ConfigError("the scheduler belongs to another optimizer: pass that optimizer as optimizer="
                              if optimizer is None else
                              "the scheduler belongs to another optimizer than optimizer=: build it on that one")
        self.own_scheduler = scheduler is None  # the recipe's plateau follows the score, a user's the metric
        self.scheduler = scheduler if scheduler is not None else build_scheduler(
            self.optimizer, config.lr_schedule, total_steps=self.total_steps, patience=config.plateau_patience,
            factor=config.plateau_factor)
        # progress through the data and the run
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, Tensor] | None = None
        self.bad_evals = 0
        self.amp_overflows = 0
        self.diverged_at: int | None = None  # the evaluation that found the weights non-finite
        self.wall_before = 0.0  # wall time of earlier sessions of a resumed run
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.history: list[dict] = []
        self.carry = None  # recurrent state carried across windows of a stateful task
        self.rng_epoch: dict | None = None
        self._stop_reason: str | None = None
        self._signalled = False

    # -- public for callbacks -------------------------------------------------------------
    def stop(self, reason: str = "interrupted") -> None:
        """Stop after the current update (``interrupted`` leaves a resumable checkpoint)."""
        self._stop_reason = reason

    @property
    def nan_events(self) -> int:
        return self.stabiliser.nan_events

    # -- the run ----------------------------------------------------------------------------
    def run(self, *, resume: bool, restore_best: bool, summary: dict) -> FitResult:
        try:
            return self._run(resume=resume, restore_best=restore_best, summary=summary)
        finally:
            if self.board is not None:
                self.board.close()

    def _run(self, *, resume: bool, restore_best: bool, summary: dict) -> FitResult:
        if self.run_dir is not None:
            check_run_dir(self.run_dir, resume)  # never deletes or replaces files lrcompress did not write
        start = time.perf_counter()
        resumed = resume and self.run_dir is not None and (self.run_dir / "last.safetensors").is_file()
        if resumed:  # a checkpoint that does not fit is refused here, before anything is written
            self._load(self.run_dir / "last.safetensors")
        else:
            # the same on every rank, so shuffling loaders yield the same batches everywhere
            seed_everything(self.config.seed)
        if self.on_start is not None:
            self.on_start()
        self._prepare_dir(resumed)
        self.stabiliser.remember()
        if self.tensorboard_dir is not None and self.dist.main:
            self.board = TensorBoardLog(self.tensorboard_dir, purge_step=self.step if resumed else None)
        bar = progress_bar(total=self.total_steps or None, initial=self.step, desc="train", unit="update",
                           progress=self.show if self.dist.main else False)
        previous = self._install_signal_handlers()
        try:
            stopped = self._train(bar, resumed, start)
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
        wall = self.wall_before + time.perf_counter() - start
        epochs = self.epoch + (1 if self.batch_in_epoch else 0)
        result = FitResult(self.step, epochs, stopped, self.objective.metric or "loss",
                           self.objective.higher_is_better, self.best_step, self.best_metrics,
                           nan_events=self.nan_events, amp_overflows=self.amp_overflows, wall_time=wall,
                           history=self.history, run_dir=self.run_dir, execution=self.execution)
        if stopped == "interrupted":
            return result
        restored = restore_best and self.best_state is not None
        if restored:
            unwrap(self.model).load_state_dict(self.best_state)
        if self.val_loader is not None:
            result.val = self._evaluate(self.val_loader)
        if self.test_loader is not None:
            result.test = self._evaluate(self.test_loader)
            if self.board is not None:
                self.board.final("test", result.test, self.step)
        result.wall_time = self.wall_before + time.perf_counter() - start
        result.warnings = self._warnings(result, restored)
        if self.dist.main:
            for line in result.warnings:
                warnings.warn(line, UserWarning, stacklevel=4)
        if self.run_dir is not None and self.dist.main:
            write_json(self.run_dir / "summary.json", {**result.to_dict(), **summary})
        return result

    def _train(self, bar, resumed: bool, start: float) -> str:
        replay = resumed and self.batch_in_epoch > 0  # resuming mid-epoch
        while not self._limit_reached():
            ended = True
            for batch in self._epoch_batches(replay):
                self._update(batch)
                stop = self._after_update(bar, start)
                if stop:
                    return stop
                if self._limit_reached():
                    ended = False
                    break
            replay = False
            if ended:
                stop = self._end_epoch(bar, start)
                if stop:
                    return stop
        if self.history and self.history[-1]["step"] == self.step:
            self._checkpoint(start)
        else:
            self._evaluate_and_save(bar, start)
        if self._stop_reason == "diverged":  # found by the last evaluation
            return "diverged"
        return "steps" if self.config.steps and self.step >= self.config.steps else "epochs"

    def _after_update(self, bar, start: float) -> str | None:
        """Count the update, evaluate when due, and say whether to stop (and why)."""
        self.step += 1
        self.batch_in_epoch += 1
        bar.update(1)
        if not self.execution and (self.accelerated or self.step == 1):  # once a layer has run
            self.execution = describe_execution(self.accelerated, self.model)
            if self.config.execution == "dense":
                self.execution = forced_dense(self.model, self.execution)
            if self.execution and self.show is not False and self.dist.main and not is_quiet():
                bar.write("execution: " + "; ".join(f"{k}: {v}" for k, v in self.execution.items()))
        if self.board is not None:  # one host sync per update, only when asked for
            self.board.update(self.step, float(self.last_loss), self.optimizer.param_groups[0]["lr"])
        if self.on_step is not None:
            self.on_step(self)
        if self.config.eval_every and self.step % self.config.eval_every == 0:
            self._evaluate_and_save(bar, start)
        if self.dist.any(self._signalled or self._stop_reason == "interrupted", self.device):
            self._checkpoint(start)
            return "interrupted"
        return self._stop_reason

    def _end_epoch(self, bar, start: float) -> str | None:
        if self.batch_in_epoch == 0:
            raise ConfigError(f"the training data yielded no batch in epoch {self.epoch} (a one-shot iterator? "
                              "pass a list, a DataLoader or a function epoch -> iterable)")
        self.epoch += 1
        self.batch_in_epoch = 0
        self.carry = None
        if not self.config.eval_every:
            self._evaluate_and_save(bar, start)
        return self._stop_reason

    def _limit_reached(self) -> bool:
        cfg = self.config
        return bool((cfg.steps and self.step >= cfg.steps) or (cfg.epochs and self.epoch >= cfg.epochs))

    def _epoch_batches(self, replay: bool) -> Iterator[Batch]:
        """This epoch's batches; on resume mid-epoch, replay the epoch's start and skip what was done."""
        now = rng_state() if replay else None
        if replay:
            set_rng_state(self.rng_epoch)
        else:
            self.rng_epoch = rng_state()
        source = self.train_loader
        sampler = getattr(source, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        it = iter(source(self.epoch) if callable(source) and not hasattr(source, "__iter__") else source)
        if replay:
            for _ in range(self.batch_in_epoch):
                next(it, None)
            set_rng_state(now)
        return (as_batch(item) for item in it)

    # -- one update -------------------------------------------------------------------------
    def _update(self, batch: Batch) -> None:
        batch = (self.dist.shard(batch) if self.shard else batch).to(self.device, non_blocking=True)
        self.train_model.train()
        with self.autocast():
            output, self.carry = forward(self.train_model, batch, self.carry, self.objective.stateful)
            loss = self.objective.loss(output, batch, self.model)
            if self.config.unitary_penalty:  # KRU's soft unitary constraint on the Kronecker factors
                from ..structured.kronecker import unitary_penalty

                loss = loss + self.config.unitary_penalty * unitary_penalty(unwrap(self.model))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.stabiliser.check():
                self.stabiliser.clip_()
                with self._overflow_is_a_setting():
                    self.scaler.step(self.optimizer)
                self.stabiliser.after_step()
            else:  # fp16 overflow: the scaler skips the step and lowers its scale
                self.amp_overflows += 1
            self.scaler.update()
        else:
            loss.backward()
            if self.stabiliser.before_step():
                with self._overflow_is_a_setting():
                    self.optimizer.step()
                self.stabiliser.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self._advance_schedule()
        value = self.last_loss = loss.detach().double()
        finite = torch.isfinite(value)
        self.loss_sum += torch.where(finite, value, torch.zeros_like(value))
        self.loss_count += finite.double()

    @contextlib.contextmanager
    def _overflow_is_a_setting(self):
        """A learning rate that overflows the optimizer's float arithmetic (``train.lr = 1e38``
        with Adam's bias correction) is a bad setting, not a crash: one ``ConfigError`` naming it."""
        try:
            yield
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            lr = self.optimizer.param_groups[0]["lr"]
            raise ConfigError(f"train.lr = {lr!r} overflows the {type(self.optimizer).__name__} update "
                              f"at step {self.step + 1} ({exc}); use a smaller learning rate") from None

    def _advance_schedule(self) -> None:
        """Step a per-update scheduler (skipped updates count too), never past its last step."""
        sched = self.scheduler
        if sched is None or isinstance(sched, ReduceLROnPlateau):
            return
        if sched.last_epoch < getattr(sched, "total_steps", math.inf):  # OneCycleLR refuses more
            sched.step()

    def _observe_plateau(self, score: float, value: float) -> bool:
        """Feed a plateau scheduler the evaluation score (the recipe's, higher is better) or the
        metric's value (a user's scheduler, whose mode says which way); True when it lowered the lr."""
        if not isinstance(self.scheduler, ReduceLROnPlateau):
            return False
        before = [g["lr"] for g in self.optimizer.param_groups]
        self.scheduler.step(score if self.own_scheduler else value)
        return [g["lr"] for g in self.optimizer.param_groups] != before

    # -- evaluation and checkpoints ---------------------------------------------------------
    def _evaluate(self, data: Data) -> dict[str, float]:
        data = counted(data, self.show if self.dist.main else False)
        return run_evaluation(self.forward_model, data, self.objective, self.device, self.dist, self.autocast,
                         shard=self.shard)

    def _evaluate_and_save(self, bar, start: float) -> None:
        train_loss = float(self.loss_sum / self.loss_count) if self.loss_count > 0 else float("nan")
        self.loss_sum.zero_()
        self.loss_count.zero_()
        # "lr" is filled in after the plateau scheduler has seen this evaluation: the next update's
        record = {"step": self.step, "epoch": self.epoch, "lr": None, "train_loss": train_loss,
                  "nan_events": self.nan_events}
        if self.scaler is not None:
            record["amp_overflows"] = self.amp_overflows
        score, value = -train_loss, train_loss  # without validation data, the training loss decides
        if self.val_loader is not None:
            val = self._evaluate(self.val_loader)
            record["val"] = val
            value = val[self.objective.headline(val)]
            score = value if self.objective.higher_is_better else -value
        elif self.objective.metric is None:
            self.objective.metric = "loss"
        record["wall_time"] = self.wall_before + time.perf_counter() - start
        if math.isfinite(score) and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_step, self.bad_evals = score, self.step, 0
            self.best_metrics = dict(record.get("val", {"loss": train_loss}))
            if self.val_loader is not None:
                self.best_state = {k: v.detach().clone() for k, v in unwrap(self.model).state_dict().items()}
                if self.run_dir is not None and self.dist.main:
                    save_weights(self.run_dir / "best.safetensors", unwrap(self.model),
                                 {"step": self.step, "metrics": self.best_metrics})
        else:
            self.bad_evals += 1
        if math.isfinite(score):
            self.stabiliser.remember()
        lowered = self._observe_plateau(score, value)
        record["lr"] = self.optimizer.param_groups[0]["lr"]  # the one the next update uses
        if lowered and self.dist.main:
            bar.write(f"step {self.step}: no improvement for {self.config.plateau_patience} evaluations; "
                      f"learning rate x{self.config.plateau_factor}, now {record['lr']:.3g}" if self.own_scheduler
                      else f"step {self.step}: the scheduler lowered the learning rate to {record['lr']:.3g}")
        self.history.append(record)
        if self.board is not None:
            self.board.evaluation(record)
        if self.run_dir is not None and self.dist.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json_dumps(record) + "\n")  # strict JSON: a NaN/Inf metric is null
        bar.set_postfix_str(_postfix(record, self.objective.metric))
        if self.show is not False and self.dist.main and not is_quiet():  # one line per evaluation, also in logs
            bar.write(_log_line(record))
            sys.stdout.flush()  # visible at once in logs too
        patience = self.config.early_stopping_patience
        if patience and self.bad_evals >= patience:
            self._stop_reason = "early_stopping"
        self._check_divergence(bar)
        self._checkpoint(start)

    def _check_divergence(self, bar) -> None:
        """Stop (``"diverged"``) once the weights hold NaN/Inf and the policy cannot bring them
        back: under ``skip``, ``decay`` and ``none`` every later update is skipped or NaN too, so
        running on only burns time; ``restore`` returns to the last good state at the next
        update. One host sync per evaluation."""
        if self.config.nan_policy == "restore" or self.diverged_at is not None:
            return
        params = [p.detach() for p in unwrap(self.model).parameters()]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        self.diverged_at = self.step
        self._stop_reason = "diverged"
        if self.dist.main:
            bar.write(f"step {self.step}: the weights are not finite (NaN/Inf) and nan_policy "
                      f"{self.config.nan_policy!r} cannot recover them; stopping")

    def _warnings(self, result: FitResult, restored: bool) -> list[str]:
        """``FitResult.warnings``: divergence, and final metrics that are not finite."""
        out = []
        if self.diverged_at is not None:
            kept = (f"the model kept is the best one, from update {self.best_step}" if restored else
                    "no earlier weights were kept (no finite validation result before): the model is not finite")
            out.append(f"the run diverged: the weights became NaN/Inf by update {self.diverged_at} and the run "
                       f"stopped there (nan_policy {self.config.nan_policy!r} cannot recover them); {kept}")
        bad = [f"{split} {name}" for split, metrics in (("val", result.val), ("test", result.test))
               for name, value in metrics.items() if not math.isfinite(value)]
        if bad:
            out.append(f"final {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite (NaN/Inf): the "
                       "model's outputs are not usable (docs/training.md, 'Runs that diverge')")
        return out

    def _refuse_fixed_changes(self, saved: dict, path: Path, step: int) -> None:
        """A resume cannot change what the checkpoint's state was built for: the optimiser (its
        state tensors), the schedule (its state; with one, also the lr it schedules), the seed
        (the RNG state comes back), the selection metric (the best score), weight normalisation
        (the parameters) or RMSProp's initial accumulator (already used). One ``ConfigError``
        naming the key, before anything is restored or written."""
        if self.config.steps and self.config.steps < step:
            raise ConfigError(f"train.steps = {self.config.steps} on a resume of {path.parent}, which has made "
                              f"{step} updates already: ask for more")
        fixed = ["optimizer", "lr_schedule", "seed", "select", "weight_norm", "rmsprop_initial_accumulator"]
        if saved.get("lr_schedule", "constant") != "constant":
            fixed += ["lr", "lr_orthogonal", "plateau_factor", "plateau_patience"]
        for key in fixed:
            if key in saved and getattr(self.config, key, saved[key]) != saved[key]:
                raise ConfigError(f"train.{key} = {getattr(self.config, key)!r} on a resume of {path.parent}, which "
                                  f"was trained with {saved[key]!r}: its checkpoint holds state for that setting; "
                                  f"resume without the change, or train into another folder")
        kind = saved.get("optimizer_class")  # the class itself: a caller's own optimizer too
        if kind is not None and kind != type(self.optimizer).__name__:
            raise ConfigError(f"a {type(self.optimizer).__name__} optimizer on a resume of {path.parent}, which was "
                              f"trained with {kind}: its checkpoint holds {kind}'s state; resume with the same "
                              f"optimizer, or train into another folder")

    def _checkpoint(self, start: float) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        trainer = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_score": self.best_score, "best_step": self.best_step, "best_metrics": self.best_metrics,
            "bad_evals": self.bad_evals, "nan_events": self.nan_events, "amp_overflows": self.amp_overflows,
            "wall_time": self.wall_before + time.perf_counter() - start,
            "schedule": self.scheduler.state_dict() if self.scheduler is not None else {},
            "loss_sum": float(self.loss_sum), "loss_count": float(self.loss_count), "metric": self.objective.metric,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": {**self.config.to_dict(), "optimizer_class": type(self.optimizer).__name__}}
        carry = list(_flatten(self.carry)) if self.carry is not None else []
        save_checkpoint(self.run_dir / "last.safetensors", unwrap(self.model), self.optimizer, trainer=trainer,
                        rng=rng_state(), rng_epoch=self.rng_epoch if self.batch_in_epoch else None, carry=carry)

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        t = ckpt.trainer
        saved = t.get("config", {})
        self._refuse_fixed_changes(saved, path, t["step"])
        # The optimiser's saved param groups would bring back the old lr, weight decay, betas...:
        # keep what the recipe asks now and put it back after the restore (below).
        asked = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            ckpt.restore(unwrap(self.model), self.optimizer)
        except FormatError as exc:  # resumed with another model: say which file, and the usual cause
            raise FormatError(f"{path}: {exc} (a resumed run must build the model it saved: drop overrides "
                              "that change the model)") from None
        # A schedule (the recipe's, or a scheduler object of the caller's) owns the lr and the
        # momentum terms it may cycle: those stay as the checkpoint saved them.
        owned = SCHEDULE_OWNED + (("lr", "betas", "momentum") if self.scheduler is not None else ())
        for group, wanted in zip(self.optimizer.param_groups, asked):
            for key, value in wanted.items():
                if key not in owned:
                    group[key] = value
        changed = {k for k, v in saved.items()
                   if getattr(self.config, k, v) != v and k not in ("steps", "epochs", "eval_every", "device",
                                                                      "early_stopping_patience")}
        if changed:
            warnings.warn(f"resuming with changed settings: {', '.join(sorted(changed))} (they apply from update "
                          f"{t['step'] + 1} on)", UserWarning, stacklevel=4)
        self.step, self.epoch, self.batch_in_epoch = t["step"], t["epoch"], t["batch_in_epoch"]
        self.best_score, self.best_step, self.best_metrics = t["best_score"], t["best_step"], t["best_metrics"]
        self.bad_evals, self.amp_overflows, self.wall_before = t["bad_evals"], t["amp_overflows"], t["wall_time"]
        self.stabiliser.nan_events = t["nan_events"]
        if self.scheduler is not None and "last_epoch" in t["schedule"]:  # not an empty (constant) state
            self.scheduler.load_state_dict(t["schedule"])
            end = getattr(self.scheduler, "total_steps", None)
            if end is not None and self.config.steps > end:
                warnings.warn(f"the one-cycle schedule of {path.parent} ends at update {end}: updates {end + 1} to "
                              f"{self.config.steps} run at its final lr ({self.optimizer.param_groups[0]['lr']:.3g})",
                              UserWarning, stacklevel=4)
        self.loss_sum.fill_(t["loss_sum"])
        self.loss_count.fill_(t["loss_count"])
        self.objective.metric = self.objective.metric or t.get("metric")
        if self.scaler is not None and t.get("scaler"):
            self.scaler.load_state_dict(t["scaler"])
        if ckpt.carry:
            carry = [c.to(self.device) for c in ckpt.carry]
            self.carry = carry[0] if len(carry) == 1 else tuple(carry)
        self.rng_epoch = ckpt.rng_epoch
        set_rng_state(ckpt.rng)
        best = self.run_dir / "best.safetensors"
        if best.is_file() and self.val_loader is not None:
            self.best_state = load_checkpoint(best).model
        self.history = [r for r in _read_jsonl(self.run_dir / "metrics.jsonl") if r.get("step", 0) <= self.step]

    def _prepare_dir(self, resumed: bool) -> None:
        """The first writes to the run directory (after every check): claim it, then drop the
        records of an earlier run (a fresh start) or those written after the checkpoint (a kill
        between the two, on resume)."""
        if self.run_dir is None:
            return
        if self.dist.main:
            claim_run_dir(self.run_dir)
            if resumed:
                _write_jsonl(self.run_dir / "metrics.jsonl", self.history)
            else:
                for name in ("metrics.jsonl", "best.safetensors", "summary.json"):
                    (self.run_dir / name).unlink(missing_ok=True)
        self.dist.barrier()

    # -- set-up helpers ---------------------------------------------------------------------
    def _amp(self):
        mode = self.config.amp
        if mode == "none":
            return contextlib.nullcontext, None
        if self.device.type != "cuda":
            warnings.warn(f"train.amp={mode!r} needs a CUDA device; training in float32 on {self.device}",
                          UserWarning, stacklevel=4)
            return contextlib.nullcontext, None
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16

        def autocast():
            return torch.autocast("cuda", dtype=dtype)

        return autocast, (torch.amp.GradScaler("cuda") if mode == "fp16" else None)

    def _total_steps(self) -> int:
        cfg = self.config
        by_epochs = cfg.epochs * self.epoch_length if cfg.epochs and self.epoch_length else 0
        if cfg.steps and by_epochs:
            return min(cfg.steps, by_epochs)
        return cfg.steps or by_epochs

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._signalled:  # a second Ctrl-C: stop right now
                raise KeyboardInterrupt
            self._signalled = True
            if self.dist.main:
                tqdm.write("stopping after this update (Ctrl-C again to abort without a checkpoint)")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for s, h in (previous or {}).items():
            signal.signal(s, h)


def counted(data: Data, progress: bool | None) -> Callable[[], Iterator]:
    """``data`` (an iterable, or a function returning one) as a function whose batches pass
    through an evaluation bar: a long test pass (psMNIST: minutes) is not silent."""
    def batches():
        items = data() if callable(data) and not hasattr(data, "__iter__") else data
        return progress_bar(items, progress=progress, desc="evaluate", unit="batch")
    return batches


def _length(data) -> int:
    try:
        return len(data)
    except TypeError:
        return 0


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _flatten(state):
    if isinstance(state, Tensor):
        yield state
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _flatten(s)


def _postfix(record: dict, metric: str | None) -> str:
    parts = [f"loss={record['train_loss']:.4g}"]
    if "val" in record and metric in record["val"]:
        parts.append(f"val_{metric}={format_metric(metric, record['val'][metric])}")
    if record["nan_events"]:
        parts.append(f"nan={record['nan_events']}")
    return " ".join(parts)


def _log_line(record: dict) -> str:
    parts = [f"step {record['step']}", f"train loss {record['train_loss']:.4g}"]
    parts += [f"val {k} {format_metric(k, v)}" for k, v in record.get("val", {}).items()]  # accuracies in %
    parts.append(f"lr {record['lr']:.3g}")
    if record["nan_events"]:
        parts.append(f"non-finite gradients {record['nan_events']}")
    return ", ".join(parts)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as strict JSON (a NaN/Inf is null: ``jsonout.dumps``) atomically (a
    temporary file a killed run leaves is swept later)."""
    write_text_atomic(path, json_dumps(data, indent=2) + "\n", force=True)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json_dumps(r) + "\n" for r in records), force=True)
