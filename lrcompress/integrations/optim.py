"""``paper_optimizer``: the authors' RMSProp (or Adam, Adafactor) with a torch learning-rate
schedule, as the ``(optimizer, scheduler)`` pair that ``transformers.Trainer(optimizers=...)``
takes. Needs only PyTorch.

    >>> opt, sched = paper_optimizer(torch.nn.GRU(4, 8), lr=1e-3)
    >>> type(opt).__name__, type(sched).__name__
    ('RMSprop', 'ConstantLR')
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..train import build_optimizer

SCHEDULES = ("constant", "plateau", "onecycle")


def paper_optimizer(model: nn.Module, lr: float = 1e-3, *, optimizer: str = "rmsprop", schedule: str = "constant",
                    total_steps: int = 0, weight_decay: float = 0.0, rmsprop_alpha: float = 0.9,
                    rmsprop_eps: float = 1e-8, plateau_patience: int = 3, plateau_factor: float = 0.5,
                    plateau_mode: str = "min") -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` over the trainable parameters of ``model``.

    ``optimizer``: ``rmsprop`` (the authors': decay ``rmsprop_alpha`` 0.9, accumulator starting
    at 1e-3), ``adam`` or ``adafactor``, as ``lrcompress.train.build_optimizer`` builds them.
    ``schedule``:

    - ``constant``: ``ConstantLR(factor=1)`` (the lr never changes; Trainer steps it per update);
    - ``plateau``: ``ReduceLROnPlateau(mode=plateau_mode, factor, patience)``, the paper's
      halving; the Trainer steps it after each evaluation with ``metric_for_best_model``
      (``"min"`` for a loss, ``"max"`` for an accuracy);
    - ``onecycle``: ``OneCycleLR`` peaking at ``lr`` over ``total_steps`` updates (the
      Trainer's ``max_steps``), 30% warm-up, no momentum cycling.

    Call it after ``compress`` and after any weight normalisation, so the optimiser holds the
    factors. Raises ``ConfigError`` on an unknown name or a value out of range.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters")
    opt = build_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay, rmsprop_alpha=rmsprop_alpha,
                          rmsprop_eps=rmsprop_eps)
    if schedule == "constant":
        return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if schedule == "plateau":
        if not (0 < plateau_factor < 1 and plateau_patience >= 0 and plateau_mode in ("min", "max")):
            raise ConfigError(f"plateau needs 0 < plateau_factor < 1, plateau_patience >= 0 and plateau_mode "
                              f"min or max, got {plateau_factor!r}, {plateau_patience!r}, {plateau_mode!r}")
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=plateau_mode, factor=plateau_factor,
                                                               patience=plateau_patience)
    if schedule == "onecycle":
        if total_steps < 1:
            raise ConfigError("schedule 'onecycle' needs total_steps (the Trainer's max_steps)")
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.3,
                                                        cycle_momentum=False)
    raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
