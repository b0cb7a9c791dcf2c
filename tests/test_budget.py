"""Rank budgets (lrcompress.budget): greedy allocation against exhaustive search, budgets met
exactly, overrides, infeasible budgets, the diagonal choice and the model-wide energy rule."""

from __future__ import annotations

import itertools

import pytest
import torch

from lrcompress.budget import Target, allocate, budget_for, energy_ranks, options, relative, step_gains
from lrcompress.errors import RankError


def spectrum_target(name: str, n: int, *, gates: int = 1, cols: int | None = None, tied: bool = False,
                    diag=False, rank: int | None = None, W: torch.Tensor | None = None,
                    scaled: bool = False) -> Target:
    """A target whose curves come from a random (or given) weight, as convert builds them."""
    cols = cols or n
    if W is None:
        W = torch.randn(gates, n, cols, dtype=torch.float64) / n ** 0.5
    s = torch.linalg.svdvals(W.reshape(-1, cols) if tied else W)
    diag_gains = None
    if n == cols:
        off = W - torch.diag_embed(torch.diagonal(W, dim1=-2, dim2=-1))
        diag_gains = step_gains(torch.linalg.svdvals(off.reshape(-1, cols) if tied else off))
    gains = step_gains(s)
    if scaled:  # allocation="relative": curves divided by the target's ||W||^2, as convert does
        gains, diag_gains = relative(gains, diag_gains)
    return Target(name, gates, n, cols, tied, options(gains, diag_gains, diag), rank)


def used(targets, choices, untouched=0) -> int:
    return untouched + sum(t.params(choices[t.name].rank, choices[t.name].diag) for t in targets)


def error(targets, choices) -> float:
    return sum(next(o for o in t.options if o.diag == choices[t.name].diag).errors[choices[t.name].rank]
               for t in targets)


def exhaustive(targets, budget, untouched=0) -> float:
    """The least summed error over every rank tuple (one option per target) within the budget."""
    best = float("inf")
    ranges = [range(t.ranks(t.options[0])[0], t.ranks(t.options[0])[1] + 1) for t in targets]
    for ranks in itertools.product(*ranges):
        cost = untouched + sum(t.params(r, False) for t, r in zip(targets, ranks))
        if cost <= budget:
            best = min(best, sum(t.options[0].errors[r] for t, r in zip(targets, ranks)))
    return best


def test_equal_step_costs_match_exhaustive_search_at_every_budget():
    # Same-shaped targets: every rank step costs the same, so the greedy order is optimal at any budget.
    targets = [spectrum_target(n, 8, gates=g) for n, g in (("a", 3), ("b", 3), ("c", 3))]
    lowest = sum(t.params(1, False) for t in targets) + 7
    for budget in range(lowest, lowest + 48 * 12, 37):
        choices = allocate(targets, budget, untouched=7)
        assert used(targets, choices, 7) <= budget
        assert error(targets, choices) == pytest.approx(exhaustive(targets, budget, 7), rel=1e-12)


def test_unequal_step_costs_match_exhaustive_search_on_greedy_boundaries():
    # Different shapes and tying: the greedy prefix that spends a budget exactly is optimal.
    targets = [spectrum_target("gru", 6, gates=3), spectrum_target("rnn", 9),
               spectrum_target("tied", 6, gates=3, tied=True), spectrum_target("wide", 5, cols=12)]
    steps = sorted((-float(t.options[0].gains[r - 1]) / (t.params(2, False) - t.params(1, False)), r, i)
                   for i, t in enumerate(targets) for r in range(2, t.ranks(t.options[0])[1] + 1))
    budget = sum(t.params(1, False) for t in targets)
    checked = 0
    for _, r, i in steps:
        budget += targets[i].params(2, False) - targets[i].params(1, False)
        choices = allocate(targets, budget)
        assert used(targets, choices) == budget  # a greedy prefix spends it exactly
        assert error(targets, choices) == pytest.approx(exhaustive(targets, budget), rel=1e-12)
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("diag", [False, True, "auto"])
def test_budget_is_never_exceeded_and_no_fitting_step_is_left(diag):
    targets = [spectrum_target("a", 10, gates=3, diag=diag), spectrum_target("b", 7, diag=diag),
               spectrum_target("c", 8, gates=4, tied=True, diag=diag), spectrum_target("d", 6, cols=9, diag=diag)]
    untouched = 123
    smallest = untouched + sum(t.params(1, t.options[0].diag) for t in targets)
    for budget in range(smallest, smallest + 900, 29):
        choices = allocate(targets, budget, untouched=untouched)
        spent = used(targets, choices, untouched)
        assert spent <= budget
        for t in targets:
            c = choices[t.name]
            option = next(o for o in t.options if o.diag == c.diag)
            assert t.ranks(option)[0] <= c.rank <= t.ranks(option)[1]
            assert t.params(c.rank, c.diag) < t.dense_params or c.rank == 1
            if c.rank < t.ranks(option)[1]:  # the next rank step would not fit
                assert spent + t.params(c.rank + 1, c.diag) - t.params(c.rank, c.diag) > budget
            if len(t.options) > 1 and not c.diag and c.rank <= t.ranks(t.options[1])[1]:
                better = t.options[1].errors[c.rank] < option.errors[c.rank]
                assert not better or spent + t.params(c.rank, True) - t.params(c.rank, False) > budget


def test_ranks_stop_at_break_even():
    t = spectrum_target("a", 10, gates=3)
    lo, hi = t.ranks(t.options[0])
    assert (lo, hi) == (1, 4)  # 3*10*r + 3*r*10 < 300 <=> r < 5
    choices = allocate([t], 10**6)
    assert choices["a"].rank == 4 and t.params(4, False) < t.dense_params <= t.params(5, False)


def test_overrides_keep_their_rank_and_cost():
    free = [spectrum_target("a", 8, gates=3), spectrum_target("b", 8, gates=3)]
    fixed = spectrum_target("c", 8, gates=3, rank=7)  # past break-even: the user's choice stands
    for budget in (400, 520, 700):
        choices = allocate([*free, fixed], budget + fixed.params(7, False), untouched=5)
        assert choices["c"].rank == 7
        assert {k: choices[k] for k in "ab"} == allocate(free, budget, untouched=5)


def test_infeasible_budget_names_the_minimum():
    targets = [spectrum_target("a", 10, gates=3), spectrum_target("b", 10, gates=3, rank=2)]
    smallest = 50 + targets[0].params(1, False) + targets[1].params(2, False)
    with pytest.raises(RankError, match=f"ratio 8 allows at most 99 parameters: the smallest this model can get "
                                        f"is {smallest:,} .*fixed ranks"):
        allocate(targets, 99, untouched=50, asked="ratio 8")
    assert allocate(targets, smallest, untouched=50)["a"].rank == 1


def test_auto_diagonal_goes_where_it_pays():
    torch.manual_seed(1)
    n = 12
    strong = 4 * torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(n, n, dtype=torch.float64)
    hollow = torch.randn(n, 3, dtype=torch.float64) @ torch.randn(3, n, dtype=torch.float64)
    hollow.fill_diagonal_(0.0)  # a diagonal buys nothing here
    targets = [spectrum_target("strong", n, W=strong[None], diag="auto"),
               spectrum_target("hollow", n, W=hollow[None], diag="auto")]
    budget = sum(t.params(3, False) for t in targets)
    choices = allocate(targets, budget)
    assert choices["strong"].diag and not choices["hollow"].diag
    plain = [spectrum_target(t.name, n, W=w[None]) for t, w in zip(targets, (strong, hollow))]
    everywhere = [spectrum_target(t.name, n, W=w[None], diag=True) for t, w in zip(targets, (strong, hollow))]
    assert error(targets, choices) <= error(plain, allocate(plain, budget)) * (1 + 1e-12)
    assert error(targets, choices) <= error(everywhere, allocate(everywhere, budget)) * (1 + 1e-12)
    assert error(targets, choices) < 0.5 * error(plain, allocate(plain, budget))


def test_model_energy_keeps_the_largest_singular_values_of_all_targets():
    def diagonal(*values):
        return torch.diag(torch.tensor(values, dtype=torch.float64))[None]

    big = spectrum_target("big", 8, W=diagonal(10.0, 9, 8, 1, 1, 1, 1, 1))
    small = spectrum_target("small", 8, W=diagonal(2.0, 1.5, 1, 1, 1, 1, 1, 1))
    total = 100 + 81 + 64 + 5 + 4 + 2.25 + 6
    assert energy_ranks([big, small], (100 + 81 + 64) / total) == {"big": 3, "small": 1}
    assert energy_ranks([big, small], (100 + 81 + 64 + 4) / total) == {"big": 3, "small": 1}
    assert energy_ranks([big, small], (100 + 81 + 64 + 4 + 2.25) / total) == {"big": 3, "small": 2}
    assert energy_ranks([big, small], 1.0) == {"big": 8, "small": 8}
    fixed = spectrum_target("fixed", 8, rank=5)
    assert energy_ranks([big, small, fixed], 0.1)["fixed"] == 5


def test_budget_for_rounds_down_exactly():
    assert budget_for(1000, ratio=4) == 250
    assert budget_for(1000, ratio=3) == 333
    assert budget_for(1000, ratio=2.5) == 400
    assert budget_for(1000, params=321) == 321


def test_relative_allocation_is_scale_free_and_optimal_for_relative_errors():
    # "big" is "small" times 30 in scale: the absolute criterion starves the small one, the relative
    # one sees two equal problems; on the relative curves greedy still equals exhaustive search.
    torch.manual_seed(4)
    W = torch.randn(3, 12, 12, dtype=torch.float64)
    budget = 2 * spectrum_target("x", 12, gates=3).params(3, False)
    absolute = [spectrum_target("big", 12, gates=3, W=30 * W), spectrum_target("small", 12, gates=3, W=W)]
    scaled = [spectrum_target("big", 12, gates=3, W=30 * W, scaled=True),
              spectrum_target("small", 12, gates=3, W=W, scaled=True)]
    a, r = allocate(absolute, budget), allocate(scaled, budget)
    assert a["big"].rank > a["small"].rank and r["big"].rank == r["small"].rank == 3
    assert scaled[0].options[0].errors[0] == pytest.approx(1.0, rel=1e-12)  # rank 0 leaves all of ||W||^2
    for b in range(sum(t.params(1, False) for t in scaled), budget + 200, 23):
        choices = allocate(scaled, b)
        assert error(scaled, choices) == pytest.approx(exhaustive(scaled, b), rel=1e-12)
    diag = spectrum_target("d", 12, gates=3, W=W, diag="auto", scaled=True)
    plain = spectrum_target("d", 12, gates=3, W=W, scaled=True)
    torch.testing.assert_close(diag.options[0].gains, plain.options[0].gains)  # one norm for both options
    assert diag.options[1].errors[0] < 1.0
