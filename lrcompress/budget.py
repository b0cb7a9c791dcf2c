"""Rank budgets: every target's rank (and diagonal) for a whole-model parameter budget.

The problem: choose ranks ``r_t`` minimising the summed squared error ``sum_t err_t(r_t)`` subject
to ``untouched + sum_t params_t(r_t) <= budget``. For a low-rank fit ``err_t(r)`` is the tail
``sum_{i > r} s_i^2`` of the target's (weighted, when calibrated) singular values (Eckart-Young;
for the weighted norm those of ``W S``, ``S S^T = C``, as in SVD-LLM), so the rank step
``r - 1 -> r`` removes ``s_r^2`` and costs a fixed number of parameters (``G m + G n``, or
``G m + n`` tied; rank 1 costs its whole factored size). The gains fall with ``r``, so taking
steps in order of gain per parameter is optimal for the continuous problem (a fractional knapsack
with concave values) and exact whenever every step costs the same; a single pass that skips a
step that no longer fits leaves no step unused that would still fit (the budget only shrinks).

The curves may be relative (``relative``; ``allocation="relative"``, compress's default): each
target's gains divided by its squared norm ``||W S||_F^2``, so the sum minimised is that of the
targets' squared relative errors. It is scale-free: the absolute sum lets a target with large
outputs starve one with small outputs (a one-hot input weight next to a recurrent weight), and on
trained character models that cost far more than it saved (docs/calibration.md). The allocation
below is the same for either curve.

Ranks run from 1 (every target keeps at least rank 1) to the break-even rank: the largest rank
whose factors are still smaller than the dense weight. Targets with a rank fixed by an override
take their cost off the budget first.

A diagonal (``diag=True``) has no closed-form error curve: this module uses the spectrum of
``W - diag(W)``, the error of the feasible fit ``D = diag(W)`` plus the best rank-``r`` part of the
rest. It bounds the alternating fit's error from above (that fit tries exactly this start and
keeps its best iterate; with exact SVD), so the allocation is conservative where diagonals are strong.

``diag="auto"`` chooses per target whether a diagonal pays for itself, by Lagrangian relaxation:
with ``lam`` the error removed per parameter by the first rank step the budget could not buy, a
target takes the diagonal when ``min_r err_D(r) + lam params_D(r) < min_r err(r) + lam params(r)``.
The choice and the allocation are iterated to a fixed point; the allocation with the least summed
error among those tried (and among "no diagonals" and "all diagonals") is kept, then any leftover
parameters buy a diagonal where it lowers the error, best gain first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch
from torch import Tensor

from .errors import ConfigError, RankError
from .factorize import factored_params


@dataclass(frozen=True)
class Option:
    """One way to fit a target: with or without a diagonal, and its error curve.

    ``gains[i]``: squared (weighted) error removed by the rank step ``i -> i + 1``, the squared
    singular values summed over gate blocks (non-increasing; the whole spectrum, so that
    ``gains[r:].sum()`` is the error left at rank ``r``).
    """

    diag: bool
    gains: Tensor  # (k,) float64

    @cached_property
    def errors(self) -> list[float]:
        """``errors[r]``: the squared error left at rank ``r`` (0..k), the tail sum of the gains."""
        tails = self.gains.flip(0).cumsum(0).flip(0).tolist()
        return tails + [0.0]


@dataclass(frozen=True)
class Target:
    """What the allocator knows of one weight: its shape, its options and an override's rank."""

    name: str
    gates: int
    rows: int  # of one gate block
    cols: int
    tied: bool
    options: tuple[Option, ...]  # one, or (no diagonal, diagonal) for diag="auto"
    rank: int | None = None  # fixed by a per-pattern override

    @property
    def dense_params(self) -> int:
        return self.gates * self.rows * self.cols

    def params(self, rank: int, diag: bool) -> int:
        return factored_params(self.gates, self.rows, self.cols, rank, diag=diag, tied=self.tied)

    def ranks(self, option: Option) -> tuple[int, int]:
        """Lowest and highest rank this option may take: 1 up to the break-even rank (or the override)."""
        if self.rank is not None:
            return self.rank, self.rank
        step = self.params(2, option.diag) - self.params(1, option.diag)
        below_dense = (self.dense_params - self.params(1, option.diag) - 1) // step + 1  # params(r) < dense
        return 1, max(1, min(len(option.gains), below_dense))


@dataclass(frozen=True)
class Choice:
    """The rank and diagonal chosen for a target."""

    rank: int
    diag: bool


def options(gains: Tensor, diag_gains: Tensor | None, diag: bool | str) -> tuple[Option, ...]:
    """The options of a target for ``diag`` (False, True, "auto"); ``diag_gains`` None: blocks not square."""
    plain = Option(False, _non_increasing(gains))
    if diag_gains is None or diag is False:
        return (plain,)
    with_diag = Option(True, _non_increasing(diag_gains))
    return (with_diag,) if diag is True else (plain, with_diag)


def step_gains(singular_values: Tensor) -> Tensor:
    """Per-rank gains from singular values of shape (G, k) or (k,): squares summed over blocks."""
    s2 = singular_values.double() ** 2
    return s2.reshape(-1, s2.shape[-1]).sum(0)


def relative(gains: Tensor, diag_gains: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gains divided by the target's whole squared norm ``gains.sum()`` (``||W||^2``, or ``||W S||^2``
    weighted), for ``allocation="relative"``; the diagonal option's by the same norm, so both
    options of a target stay comparable. A zero weight keeps its (zero) gains."""
    total = float(gains.double().sum())
    scale = 1.0 / total if total > 0 else 1.0
    return gains.double() * scale, None if diag_gains is None else diag_gains.double() * scale


def budget_for(params_before: int, *, ratio: float | None = None, params: int | None = None) -> int:
    """Most whole-model parameters allowed: ``params``, or ``params_before / ratio`` rounded down (exactly)."""
    if (ratio is None) == (params is None):
        raise ConfigError("give exactly one of ratio and params")
    budget = int(params) if params is not None else math.floor(Fraction(params_before) / Fraction(ratio))
    if budget >= params_before:  # every target would sit at its break-even rank: bigger errors, no saving
        asked = f"params={int(params):,}" if params is not None else f"ratio={ratio:g}"
        raise RankError(f"{asked} allows {budget:,} parameters and the model has {params_before:,}: nothing to "
                        "compress; ask for fewer parameters")
    return budget


def allocate(targets: list[Target], budget: int, *, untouched: int = 0,
             asked: str = "") -> dict[str, Choice]:
    """Ranks (and diagonals) minimising the summed squared error within ``budget`` parameters.

    ``untouched``: parameters of the model outside every target (they count in the budget).
    ``asked``: how the user gave the budget, for the error message (e.g. ``"ratio 8"``).
    Raises ``RankError`` when even the smallest choice (rank 1, or the fixed rank, everywhere; no
    optional diagonal) exceeds ``budget``, naming the smallest achievable parameter count.
    """
    cheapest = [t.options[0] for t in targets]  # no diagonal wherever that is allowed
    least = untouched + sum(t.params(t.ranks(o)[0], o.diag) for t, o in zip(targets, cheapest))
    if least > budget:
        what = (f"{asked} allows at most {budget:,} parameters" if asked
                else f"a budget of {budget:,} parameters is too small")
        raise RankError(f"{what}: the smallest this model can get is {least:,} "
                        f"(rank 1 on every target{', diagonals included' if any(o.diag for o in cheapest) else ''}"
                        f"{', and the fixed ranks' if any(t.rank for t in targets) else ''})")
    plain = _allocation(targets, cheapest, budget, untouched)
    tried = [plain]
    if any(len(t.options) > 1 for t in targets):  # diag="auto": iterate the choice and the allocation
        everywhere = _allocation(targets, [t.options[-1] for t in targets], budget, untouched)
        tried += [everywhere] if everywhere is not None else []
        result, seen = plain, {plain.diags}
        for _ in range(len(targets) + 1):  # settles in a few rounds; the bound only guards against a cycle
            result = _allocation(targets, [_lagrangian_option(t, result.price) for t in targets], budget, untouched)
            if result is None or result.diags in seen:
                break
            seen.add(result.diags)
            tried.append(result)
    best = min(tried, key=lambda r: (r.error, sum(r.diags)))  # on a tie, no diagonal that buys nothing
    return {t.name: Choice(r, o.diag) for t, r, o in zip(targets, best.ranks, best.options)}


def energy_ranks(targets: list[Target], energy: float) -> dict[str, int]:
    """Ranks keeping ``energy`` of the squared singular values of all targets together.

    The smallest set of the largest singular values (over every target; a target's rank step
    counts the squares of all its blocks) whose squares reach ``energy`` of the total; every
    target keeps at least rank 1. Targets with a fixed ``rank`` keep it and are left out.
    """
    free = [t for t in targets if t.rank is None]
    steps = sorted(((-float(g), r, i) for i, t in enumerate(free) for r, g in enumerate(t.options[0].gains, 1)))
    total = sum(-s[0] for s in steps)
    ranks = [1] * len(free)
    kept = 0.0
    for neg_gain, r, i in steps:
        if kept >= energy * total - 1e-12 * total:
            break
        kept -= neg_gain
        ranks[i] = max(ranks[i], r)
    return {**{t.name: t.rank for t in targets if t.rank is not None},
            **{t.name: r for t, r in zip(free, ranks)}}


@dataclass(frozen=True)
class _Result:
    options: tuple[Option, ...]
    ranks: tuple[int, ...]
    error: float  # summed squared error of the modelled curves
    price: float  # error removed per parameter by the first step that did not fit (0: none refused)

    @property
    def diags(self) -> tuple[bool, ...]:
        return tuple(o.diag for o in self.options)


def _allocation(targets: list[Target], chosen: list[Option], budget: int, untouched: int) -> _Result | None:
    """Greedy ranks for fixed options, then leftovers buy diagonals; None when even the lowest ranks do not fit."""
    chosen = list(chosen)
    ranks = [t.ranks(o)[0] for t, o in zip(targets, chosen)]
    used = untouched + sum(t.params(r, o.diag) for t, r, o in zip(targets, ranks, chosen))
    if used > budget:
        return None
    steps = []
    for i, (t, o) in enumerate(zip(targets, chosen)):
        lo, hi = t.ranks(o)
        cost = t.params(2, o.diag) - t.params(1, o.diag)
        steps += [(-float(o.gains[r - 1]) / cost, r, i, cost) for r in range(lo + 1, hi + 1)]
    price, blocked = 0.0, set()
    for neg_ratio, r, i, cost in sorted(steps):  # ratio falls with r within a target: order kept
        if i in blocked or ranks[i] != r - 1:
            continue
        if used + cost > budget:
            blocked.add(i)  # its later steps cost as much: they can never fit either
            price = price or -neg_ratio
            continue
        ranks[i], used = r, used + cost
    # Leftovers too small for a rank step may still buy a diagonal (cheaper than a step) where it helps.
    while True:
        buys = []  # (gain, target index, cost)
        for i, t in enumerate(targets):
            if len(t.options) > 1 and not chosen[i].diag:
                D = t.options[-1]
                cost = t.params(ranks[i], True) - t.params(ranks[i], False)
                gain = chosen[i].errors[ranks[i]] - D.errors[ranks[i]]
                if gain > 0 and used + cost <= budget and ranks[i] <= t.ranks(D)[1]:
                    buys.append((gain, i, cost))
        if not buys:
            break
        _, i, cost = max(buys, key=lambda b: b[0])
        chosen[i], used = targets[i].options[-1], used + cost
    error = sum(o.errors[r] for o, r in zip(chosen, ranks))
    return _Result(tuple(chosen), tuple(ranks), error, price)


def _lagrangian_option(target: Target, price: float) -> Option:
    """The option with the least ``err(r) + price * params(r)`` over its ranks (no diagonal on a tie)."""
    def cost(o: Option) -> float:
        lo, hi = target.ranks(o)
        return min(o.errors[r] + price * target.params(r, o.diag) for r in range(lo, hi + 1))

    return min(target.options, key=cost)


def _non_increasing(gains: Tensor) -> Tensor:
    # Singular values come sorted; sorting again guards the greedy order against round-off.
    return torch.sort(gains.double().flatten(), descending=True).values
