"""Optimisers: the paper's RMSProp, Adam (torch's), and Adafactor with factored second moments.

``RMSProp`` is the authors' update: the accumulator starts at 1e-3 (not 0, so the first steps
are not huge), decays by 0.9, and the step is ``lr * g / sqrt(acc + eps)``. ``Adafactor``
follows Shazeer & Stern (2018): for a matrix it keeps only row and column sums of the squared
gradients and rebuilds the second moment as their outer product over the total.

    >>> opt = build_optimizer(torch.nn.Linear(4, 4).parameters(), "rmsprop", lr=1e-3)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ..errors import ConfigError

OPTIMIZERS = ("rmsprop", "adam", "adafactor")


class PerParameter(torch.optim.Optimizer):
    """An optimiser whose update treats each parameter on its own: ``step`` evaluates the closure
    and calls ``update(p, group, state)`` for every parameter that has a gradient.

    >>> class Sgd(PerParameter):
    ...     def update(self, p, group, state): p.sub_(p.grad, alpha=group["lr"])
    """

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group, self.state[p])
        return loss


class RMSProp(PerParameter):
    """``acc = alpha acc + (1 - alpha) g^2;  p -= lr g / sqrt(acc + eps)``, ``acc`` starting at
    ``initial_accumulator`` (the paper's Theano code: alpha 0.9, acc 1e-3, eps 1e-8).

    ``weight_decay`` adds ``wd * p`` to the gradient (L2), as ``torch.optim.RMSprop`` does.

    >>> opt = RMSProp(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    """

    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-8,
                 initial_accumulator: float = 1e-3, weight_decay: float = 0.0):
        for name, value, low, high in (("lr", lr, 0.0, math.inf), ("alpha", alpha, 0.0, 1.0),
                                       ("eps", eps, 0.0, math.inf), ("initial_accumulator", initial_accumulator,
                                                                     0.0, math.inf),
                                       ("weight_decay", weight_decay, 0.0, math.inf)):
            if not low <= value < high:
                raise ConfigError(f"RMSProp {name} must be in [{low}, {high}), got {value!r}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, initial_accumulator=initial_accumulator,
                                      weight_decay=weight_decay))

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        g = p.grad
        if group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["square_avg"] = torch.full_like(p, group["initial_accumulator"],
                                                  memory_format=torch.preserve_format)
        state["step"] += 1
        acc = state["square_avg"]
        acc.mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
        p.addcdiv_(g, acc.add(group["eps"]).sqrt_(), value=-group["lr"])


class Adafactor(PerParameter):
    """Adafactor (Shazeer & Stern 2018, algorithms 4 and 5, with update clipping).

    Tensors of 2 or more dimensions keep factored second moments over their last two
    dimensions (leading dimensions, such as a GRU's stacked gates, are a batch): row sums
    ``R`` and column sums ``C`` of ``g^2 + eps1``; the estimate is ``V = R C^T / sum(R)``.
    Vectors keep the full ``V``. The decay is ``beta2_t = 1 - t^decay_rate``; the update
    ``U = g / sqrt(V)`` is divided by ``max(1, RMS(U) / clip_threshold)``.

    Step size: ``lr=None`` uses the paper's relative step ``min(1e-2, 1/sqrt(t))`` times
    ``max(eps2, RMS(p))``; a number is used as it is (times ``max(eps2, RMS(p))`` only with
    ``scale_parameter=True``). ``beta1`` adds momentum on the clipped update; ``weight_decay``
    is decoupled (``p -= lr_t * wd * p``).

    >>> opt = Adafactor(torch.nn.Linear(8, 8).parameters())
    """

    def __init__(self, params, lr: float | None = None, *, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool | None = None):
        if lr is not None and not lr > 0:
            raise ConfigError(f"Adafactor lr must be positive or None (relative step), got {lr!r}")
        if not decay_rate < 0:
            raise ConfigError(f"Adafactor decay_rate must be negative, got {decay_rate!r}")
        if beta1 is not None and not 0 <= beta1 < 1:
            raise ConfigError(f"Adafactor beta1 must be in [0, 1) or None, got {beta1!r}")
        if scale_parameter is None:
            scale_parameter = lr is None
        super().__init__(params, dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter))

    @staticmethod
    def factored(p: Tensor) -> bool:
        return p.dim() >= 2

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        eps1, eps2 = group["eps"]
        g = p.grad if p.grad.dtype == torch.float64 else p.grad.float()  # half-precision: in float32
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if self.factored(p):
                state["row"] = g.new_zeros(g.shape[:-1])
                state["col"] = g.new_zeros(g.shape[:-2] + g.shape[-1:])
            else:
                state["sq"] = torch.zeros_like(g)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(g)
        state["step"] += 1
        t = float(state["step"])
        beta2 = 1.0 - t ** group["decay_rate"]
        g2 = g * g + eps1
        if self.factored(p):
            row, col = state["row"], state["col"]
            row.mul_(beta2).add_(g2.sum(dim=-1), alpha=1 - beta2)
            col.mul_(beta2).add_(g2.sum(dim=-2), alpha=1 - beta2)
            update = g / second_moment(row, col).sqrt()
        else:
            state["sq"].mul_(beta2).add_(g2, alpha=1 - beta2)
            update = g / state["sq"].sqrt()
        update.div_((rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        step_size = min(1e-2, 1.0 / math.sqrt(t)) if group["lr"] is None else group["lr"]
        if group["scale_parameter"]:
            step_size = rms(p.to(g.dtype)).clamp(min=eps2) * step_size
        if group["weight_decay"]:
            p.sub_(p * (step_size * group["weight_decay"]))
        p.sub_((update * step_size).to(p.dtype))


def second_moment(row: Tensor, col: Tensor) -> Tensor:
    """Adafactor's factored estimate ``R C^T / (1^T R)`` (batched over leading dimensions)."""
    return row.unsqueeze(-1) * col.unsqueeze(-2) / row.sum(dim=-1, keepdim=True).unsqueeze(-1)


def rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


def build_optimizer(params: Iterable, name: str, *, lr: float, weight_decay: float = 0.0,
                    rmsprop_alpha: float = 0.9, rmsprop_eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimiser a recipe names. For ``adafactor``, ``lr=0`` selects the relative step size.

    >>> build_optimizer(torch.nn.Linear(2, 2).parameters(), "adam", lr=1e-3).__class__.__name__
    'Adam'
    """
    if name == "rmsprop":
        return RMSProp(params, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return Adafactor(params, lr=lr or None, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


SCHEDULES = ("constant", "plateau", "onecycle")


class Schedule:
    """The learning rate of each update, as a factor of the recipe's: ``constant``; ``plateau``
    (multiply by ``factor`` after ``patience`` evaluations without improvement, the paper's
    halving); ``onecycle`` (cosine warm-up from lr/25 to lr over the first 30% of
    ``total_steps``, then cosine decay to lr/25e4, as ``torch``'s OneCycleLR).

    >>> Schedule("onecycle", total_steps=100).factor(29)
    1.0
    """

    WARMUP, START, END = 0.3, 1 / 25, 1 / 25e4

    def __init__(self, kind: str = "constant", *, total_steps: int = 0, patience: int = 3, factor: float = 0.5,
                 higher_is_better: bool = False):
        if kind not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        if kind == "onecycle" and total_steps < 4:
            raise ConfigError("lr_schedule 'onecycle' needs a known number of updates: set train.steps "
                              "(or train.epochs with a data source of known length)")
        if kind == "plateau" and not (0 < factor < 1 and patience >= 1):
            raise ConfigError(f"plateau needs 0 < plateau_factor < 1 and plateau_patience >= 1, "
                              f"got {factor!r} and {patience!r}")
        self.kind, self.total_steps, self.patience, self.plateau_factor = kind, total_steps, patience, factor
        self.higher_is_better = higher_is_better
        self.scale, self.best, self.bad = 1.0, None, 0

    def factor(self, step: int) -> float:
        """Factor for the update that follows ``step`` completed updates."""
        if self.kind != "onecycle":
            return self.scale
        peak, last = self.WARMUP * self.total_steps - 1, self.total_steps - 1  # OneCycleLR's phase ends
        if step <= peak:
            return _cosine(self.START, 1.0, step / peak)
        return _cosine(1.0, self.END, min(1.0, (step - peak) / (last - peak)))

    def observe(self, value: float) -> bool:
        """Feed an evaluation result; returns True when the plateau schedule lowered the rate."""
        if self.kind != "plateau":
            return False
        better = value == value and (self.best is None or (value > self.best if self.higher_is_better
                                                           else value < self.best))
        if better:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        self.scale *= self.plateau_factor
        self.bad = 0
        return True

    def apply(self, optimizer: torch.optim.Optimizer, base_lrs: list, step: int) -> None:
        f = self.factor(step)
        for group, base in zip(optimizer.param_groups, base_lrs):
            if base is not None:  # Adafactor's relative step has no lr to scale
                group["lr"] = base * f

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad = state["scale"], state["best"], state["bad"]


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2
