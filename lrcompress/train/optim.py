"""Optimisers and learning-rate schedules: PyTorch's, set up as the paper and the recipes need.

- ``rmsprop``: ``torch.optim.RMSprop`` with the authors' accumulator start. Their Theano code
  (the uRNN code they built on) starts the squared-gradient average at 1e-3, not 0, so the
  first steps are not huge; ``build_rmsprop`` fills that state in before a parameter's first
  step (a step pre-hook; torch only creates state when it finds none). Decay 0.9. With eps
  inside the square root (their memory task), ``PaperRMSprop``.
- ``adafactor``: ``torch.optim.Adafactor`` (Shazeer & Stern 2018) with the paper's relative
  step size ``min(1e-2, 1/sqrt(t)) * max(eps2, RMS(p))``.
- ``adam``: ``torch.optim.Adam``.
- schedules: ``torch.optim.lr_scheduler.OneCycleLR`` (stepped after every update) and
  ``ReduceLROnPlateau`` (stepped after every evaluation, on a score where higher is better).

Where eps goes: the authors' step is ``lr g / sqrt(acc + eps)`` (``optimizations.py``,
``rms_prop``: eps 0 by default, 1e-8 on the memory task), torch's ``lr g / (sqrt(acc) + eps)``.
With ``eps = 0`` the two are one formula and torch's class runs; ``eps_inside=True`` with
``eps > 0`` builds ``PaperRMSprop``, a small optimiser with the authors' formula exactly
(recipes: ``train.rmsprop_eps_inside``; the two steps differ by a relative ~eps / sqrt(acc)).

    >>> opt = build_optimizer(torch.nn.Linear(4, 4).parameters(), "rmsprop", lr=1e-3)
    >>> type(opt).__name__
    'RMSprop'
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import ConfigError

OPTIMIZERS = ("rmsprop", "adam", "adafactor")
SCHEDULES = ("constant", "plateau", "onecycle")
INITIAL_ACCUMULATOR = 1e-3  # the authors' start of RMSProp's squared-gradient average
ADAFACTOR_MAX_STEP = 1e-2  # Shazeer & Stern's cap of the relative step size
ADAFACTOR_EPS = (1e-30, 1e-3)  # Shazeer & Stern's eps1 (squared gradients), eps2 (parameter scale)


def build_rmsprop(params: Iterable, *, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-8,
                  initial_accumulator: float = INITIAL_ACCUMULATOR, weight_decay: float = 0.0,
                  eps_inside: bool = False) -> torch.optim.Optimizer:
    """The authors' RMSProp: ``acc = alpha acc + (1 - alpha) g^2`` with ``acc`` starting at
    ``initial_accumulator``, then ``p -= lr g / (sqrt(acc) + eps)`` (torch's place for eps) or,
    with ``eps_inside``, ``p -= lr g / sqrt(acc + eps)`` (the authors' Theano code,
    ``optimizations.py`` ``rms_prop``: alpha 0.9, start 1e-3, eps 0, 1e-8 on the memory task).

    A ``torch.optim.RMSprop`` unless ``eps_inside`` and ``eps > 0`` (then ``PaperRMSprop``; with
    eps 0 both places are one formula). With ``eps = 0`` torch's step ``g / sqrt(acc)`` is 0/0 =
    NaN wherever a gradient entry and its accumulator are both 0, so ``eps = 0`` needs
    ``initial_accumulator > 0`` and ``alpha > 0.5`` (then the accumulator of a zero gradient
    decays to the smallest subnormal number and stays there: ``alpha`` times it rounds back to
    it, never to 0); else ``ConfigError`` naming the values. For torch's class the start value is kept in each
    parameter group (``initial_accumulator``), so it survives ``state_dict``/``load_state_dict``
    and groups added later; a registered step pre-hook fills the state of each parameter that
    has a gradient and no state yet. Either result is a plain torch optimiser (usable with
    ``transformers.Trainer(optimizers=(opt, None))``). Raises ``ConfigError`` on a value
    outside its range.

    >>> opt = build_rmsprop(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    >>> type(build_rmsprop(torch.nn.Linear(2, 2).parameters(), eps=1e-8, eps_inside=True)).__name__
    'PaperRMSprop'
    """
    _check_rmsprop(lr, alpha, eps, initial_accumulator, weight_decay)
    check_zero_eps(eps, initial_accumulator, alpha)
    if eps_inside and eps > 0:
        return PaperRMSprop(params, lr=lr, alpha=alpha, eps=eps, initial_accumulator=initial_accumulator,
                            weight_decay=weight_decay)
    optimizer = torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay)
    start_accumulator(optimizer, initial_accumulator)
    return optimizer


def _check_rmsprop(lr: float, alpha: float, eps: float, initial_accumulator: float, weight_decay: float) -> None:
    for name, value, high in (("lr", lr, None), ("alpha", alpha, 1.0), ("eps", eps, None),
                              ("initial_accumulator", initial_accumulator, None), ("weight_decay", weight_decay, None)):
        if not (value >= 0 and (high is None or value < high)):
            raise ConfigError(f"RMSProp {name} must be >= 0{f' and < {high}' if high else ''}, got {value!r}")


def check_zero_eps(eps: float, initial_accumulator: float, alpha: float, prefix: str = "") -> None:
    """Refuse the RMSProp settings whose step (torch's, eps 0) divides 0 by 0: ``eps = 0`` with
    ``initial_accumulator = 0`` (a gradient entry that is 0 at its first step) or with
    ``alpha <= 0.5`` (a zero gradient's accumulator decays to exactly 0). ``ConfigError``
    naming both values; ``prefix`` is put before the names (``train.rmsprop_``)."""
    if eps != 0:
        return
    name = prefix or "RMSProp "
    if initial_accumulator == 0:
        raise ConfigError(f"{name}eps = 0 with {prefix or ''}initial_accumulator = 0: a gradient entry that is 0 "
                          "gives 0/0 = NaN weights; set either above 0 (the authors': eps 0, accumulator 1e-3)")
    if alpha <= 0.5:
        raise ConfigError(f"{name}eps = 0 with {prefix or ''}alpha = {alpha!r}: the accumulator of a gradient entry "
                          "that stays 0 decays to exactly 0 and the step is 0/0 = NaN; use alpha > 0.5 (the "
                          "paper's 0.9) or eps > 0")


class PaperRMSprop(torch.optim.Optimizer):
    """RMSProp with eps inside the square root, as in the authors' Theano code
    (``optimizations.py``, ``rms_prop``), for each parameter ``p`` with gradient ``g``::

        g   <- g + weight_decay * p                 (0 in the paper)
        acc <- alpha * acc + (1 - alpha) * g^2      (acc starts at initial_accumulator, 1e-3)
        p   <- p - lr * g / sqrt(acc + eps)

    torch's ``RMSprop`` adds eps outside the root and cannot express this. State per parameter:
    ``step`` and ``square_avg`` (torch's names). The denominator is
    ``max(sqrt(acc + eps), sqrt(1 - alpha) |g|)``: the same in exact arithmetic (``acc >=
    (1 - alpha) g^2``), but where ``g^2`` underflowed (eps 0) a step stays at most
    ``lr / sqrt(1 - alpha)`` instead of exploding; where it is 0 (then ``g = 0`` up to a
    subnormal: the formula's 0/0, eps 0 and ``acc`` 0) the weight does not move. So no gradient
    makes a NaN step. Raises ``ConfigError`` on a value out of range.

    >>> opt = PaperRMSprop(torch.nn.Linear(2, 2).parameters(), lr=1e-3, eps=1e-8)
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-8,
                 initial_accumulator: float = INITIAL_ACCUMULATOR, weight_decay: float = 0.0):
        _check_rmsprop(lr, alpha, eps, initial_accumulator, weight_decay)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, initial_accumulator=initial_accumulator,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps, decay = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PaperRMSprop does not support sparse gradients")
                g = p.grad.add(p, alpha=decay) if decay else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.full_like(p, group["initial_accumulator"],
                                                          memory_format=torch.preserve_format)
                state["step"] += 1
                acc = state["square_avg"]
                acc.mul_(alpha).addcmul_(g, g, value=1 - alpha)
                # max(...): equal in exact arithmetic, bounded where g^2 underflowed (class docstring)
                denom = torch.maximum(acc.add(eps).sqrt_(), g.abs().mul_((1 - alpha) ** 0.5))
                p.add_(torch.where(denom > 0, g / denom, 0.0), alpha=-lr)  # 0/0 (g = 0, acc = 0): no step
        return loss


def start_accumulator(optimizer: torch.optim.RMSprop, value: float = INITIAL_ACCUMULATOR) -> torch.optim.RMSprop:
    """Make ``optimizer`` start each parameter's ``square_avg`` at ``value`` instead of 0."""
    optimizer.defaults["initial_accumulator"] = value
    for group in optimizer.param_groups:
        group["initial_accumulator"] = value
    optimizer.register_step_pre_hook(_fill_accumulators)
    return optimizer


def _fill_accumulators(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # torch.optim.RMSprop._init_group creates state only when it finds none ("if len(state) == 0"),
    # on every path (single-tensor and foreach); the keys below are the ones it would create.
    for group in optimizer.param_groups:
        start = group.get("initial_accumulator")
        if start is None:
            continue
        for p in group["params"]:
            if p.grad is None or optimizer.state.get(p):
                continue
            state = optimizer.state[p]
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if group.get("capturable")
                             else torch.zeros((), dtype=torch.float32))
            state["square_avg"] = torch.full_like(p, start, memory_format=torch.preserve_format)
            if group.get("momentum", 0) > 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("centered"):
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_adafactor(params: Iterable, *, max_step: float = ADAFACTOR_MAX_STEP,
                    weight_decay: float = 0.0) -> torch.optim.Adafactor:
    """Shazeer & Stern's Adafactor (algorithms 4 and 5, relative step, update clipping at 1) as
    ``torch.optim.Adafactor``: factored second moments over the last two dimensions (leading
    ones, such as a GRU's stacked gates, are a batch), ``beta2_t = 1 - t^-0.8``, step size
    ``min(max_step, 1/sqrt(t)) * max(1e-3, RMS(p))``.

    Differences from the paper that torch's implementation brings (see its documentation):
    eps1 (1e-30) floors the second-moment estimate instead of being added to ``g^2``;
    ``weight_decay`` is decoupled and scaled by ``max_step``, not by the step size.

    >>> opt = build_adafactor(torch.nn.Linear(8, 8).parameters())
    """
    if not max_step > 0:
        raise ConfigError(f"Adafactor's maximum relative step must be positive, got {max_step!r}")
    return torch.optim.Adafactor(params, lr=max_step, beta2_decay=-0.8, eps=ADAFACTOR_EPS, d=1.0,
                                 weight_decay=weight_decay)


def build_optimizer(params: Iterable, name: str, *, lr: float, weight_decay: float = 0.0,
                    rmsprop_alpha: float = 0.9, rmsprop_eps: float = 1e-8, rmsprop_eps_inside: bool = False,
                    rmsprop_initial_accumulator: float = INITIAL_ACCUMULATOR) -> torch.optim.Optimizer:
    """The optimiser a recipe names (the ``rmsprop_*`` values: ``build_rmsprop``'s). For
    ``adafactor``, ``lr`` caps the relative step size (torch's meaning) and ``lr=0`` selects
    the paper's cap, 1e-2.

    >>> build_optimizer(torch.nn.Linear(2, 2).parameters(), "adam", lr=1e-3).__class__.__name__
    'Adam'
    """
    if name == "rmsprop":
        return build_rmsprop(params, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps, weight_decay=weight_decay,
                             initial_accumulator=rmsprop_initial_accumulator, eps_inside=rmsprop_eps_inside)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return build_adafactor(params, max_step=lr or ADAFACTOR_MAX_STEP, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str = "constant", *, total_steps: int = 0,
                    patience: int = 3, factor: float = 0.5):
    """The learning-rate schedule a recipe names, or ``None`` for ``constant``.

    - ``onecycle``: ``OneCycleLR`` peaking at each group's current lr (cosine warm-up from
      lr/25 over the first 30% of ``total_steps``, then cosine decay to lr/25e4; no momentum
      cycling). Step it after every update.
    - ``plateau``: ``ReduceLROnPlateau`` on a score where *higher is better*: the lr is
      multiplied by ``factor`` once ``patience`` evaluations in a row did not strictly improve
      on the best score (torch's ``patience`` counts the evaluations tolerated, so it is
      ``patience - 1`` here; threshold 0, no floor). Step it with the score after every evaluation.

    Raises ``ConfigError`` for an unknown kind, a ``onecycle`` without a known number of
    updates, or a plateau ``factor``/``patience`` out of range.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if kind == "onecycle":
        if total_steps < 4:
            raise ConfigError("lr_schedule 'onecycle' needs a known number of updates: set train.steps "
                              "(or train.epochs with a data source of known length)")
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps, cycle_momentum=False)
    if kind == "plateau":
        if not (0 < factor < 1 and patience >= 1):
            raise ConfigError(f"plateau needs 0 < plateau_factor < 1 and plateau_patience >= 1, "
                              f"got {factor!r} and {patience!r}")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=factor, patience=patience - 1,
                                                          threshold=0.0, threshold_mode="abs", eps=0.0)
    return None
