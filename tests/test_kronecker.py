"""``lrcompress.structured.kronecker`` against independent float64 references.

A matrix that is exactly a sum of ``terms`` Kronecker products (built with ``torch.kron``) is
recovered to 1e-10; the two-factor fit's error equals the Eckart-Young bound of the Van Loan-
Pitsianis rearrangement, built here block by block; ``apply`` equals ``x @ W.T``; gradients
reach every factor; the KRU penalty is zero exactly on orthogonal factors; bad options are one
``ConfigError``/``RankError`` line naming the shape; options survive JSON.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lrcompress.errors import ConfigError, RankError, WeightError
from lrcompress.structured.kronecker import Kronecker, kronecker, parse_factors, random_originals, unitary_penalty

# Fits at full size (more terms than pay off) are part of the checks; their size note is tested once.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Kronecker factors")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def kron_all(factors: list[Tensor]) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


def kron_sum_weight(shapes, gates: int, terms: int, seed: int = 0) -> Tensor:
    """``gates`` stacked blocks, each an exact sum of ``terms`` Kronecker products of random factors."""
    blocks, s = [], seed
    for _ in range(gates):
        block = 0
        for _ in range(terms):
            fs = []
            for m, n in shapes:
                fs.append(randn(m, n, seed=s))
                s += 1
            block = block + kron_all(fs)
        blocks.append(block)
    return torch.cat(blocks)


def rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def rearranged(block: Tensor, shapes) -> Tensor:
    """Van Loan-Pitsianis ``R(W)``: row ``(i, j)`` is the vectorised ``(i, j)``-th ``m2 x n2`` block."""
    (m1, n1), (m2, n2) = shapes
    rows = [block[i * m2:(i + 1) * m2, j * n2:(j + 1) * n2].reshape(-1) for i in range(m1) for j in range(n1)]
    return torch.stack(rows)


TWO = [((3, 3), (4, 4)), ((2, 3), (4, 5)), ((5, 2), (1, 3)), ((4, 2), (2, 6))]


@pytest.mark.parametrize("shapes", TWO)
@pytest.mark.parametrize("gates", [1, 3])
@pytest.mark.parametrize("terms", [1, 2, 3])
def test_two_factor_sum_of_kronecker_products_is_recovered(shapes, gates: int, terms: int) -> None:
    W = kron_sum_weight(shapes, gates, terms, seed=10 * terms + gates)
    rows, cols = W.shape[0] // gates, W.shape[1]
    K = Kronecker(gates, rows, cols, factors=shapes, terms=terms)
    F = K.fit(W)
    assert [tuple(f.shape) for f in F] == [(gates, terms, m, n) for m, n in shapes]
    assert all(f.dtype == torch.float64 for f in F)
    assert rel(K(*F), W) < 1e-10
    # The same weight rebuilt by torch.kron from the returned factors (forward is not its own judge).
    ref = torch.cat([sum(kron_all([f[g, t] for f in F]) for t in range(terms)) for g in range(gates)])
    assert rel(ref, W) < 1e-10


@pytest.mark.parametrize("shapes", TWO)
@pytest.mark.parametrize("terms", [1, 2, 3])
def test_two_factor_error_is_the_rearranged_eckart_young_bound(shapes, terms: int) -> None:
    gates = 3
    (m1, n1), (m2, n2) = shapes
    W = randn(gates * m1 * m2, n1 * n2, seed=terms)
    W0 = W.clone()
    K = Kronecker(gates, m1 * m2, n1 * n2, factors=shapes, terms=terms, svd="exact")
    F = K.fit(W)
    assert torch.equal(W, W0)  # the fit does not touch W
    W_hat = K(*F)
    for g in range(gates):
        blk = slice(g * m1 * m2, (g + 1) * m1 * m2)
        s = torch.linalg.svdvals(rearranged(W[blk], shapes))
        bound = float((s[terms:] ** 2).sum().sqrt())
        achieved = float(torch.linalg.norm(W[blk] - W_hat[blk]))
        assert achieved == pytest.approx(bound, rel=1e-9, abs=1e-12)
        # The factors share each singular value evenly: ||A_t|| = ||B_t|| = sqrt(s_t).
        for t in range(terms):
            norms = [float(f[g, t].norm()) for f in F]
            assert norms == pytest.approx([math.sqrt(float(s[t]))] * 2, rel=1e-9)


def test_two_factor_full_terms_reproduce_any_matrix() -> None:
    shapes = ((2, 3), (4, 5))
    W = randn(2 * 8, 15, seed=3)
    K = Kronecker(2, 8, 15, factors=shapes, terms=6)  # min(2*3, 4*5): the rearrangement's full rank
    assert rel(K(*K.fit(W)), W) < 1e-12


@pytest.mark.parametrize("shapes", [((2, 3), (3, 2), (2, 2)), ((2, 2),) * 4, ((3, 1), (1, 4), (2, 2))])
def test_several_factor_exact_product_is_recovered(shapes) -> None:
    W = kron_sum_weight(shapes, gates=2, terms=1, seed=5)
    K = Kronecker(2, W.shape[0] // 2, W.shape[1], factors=shapes, terms=1)
    F = K.fit(W)
    assert rel(K(*F), W) < 1e-10
    ref = torch.cat([kron_all([f[g, 0] for f in F]) for g in range(2)])
    assert rel(ref, W) < 1e-10
    # The scale is shared evenly: every factor of a term has the same norm.
    norms = torch.stack([f.norm(dim=(-2, -1)) for f in F])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-12, atol=0)


def test_three_factor_als_improves_on_its_start_and_recovers_a_sum() -> None:
    shapes = ((2, 3), (4, 2), (3, 3))
    W = kron_sum_weight(shapes, gates=2, terms=2, seed=7)
    errors = {}
    for sweeps in (0, 5, 200):
        K = Kronecker(2, 24, 18, factors=shapes, terms=2, sweeps=sweeps)
        errors[sweeps] = rel(K(*K.fit(W)), W)
    assert errors[0] > 1e-3  # the sequential start alone is not exact for two terms ...
    assert errors[200] <= errors[5] <= errors[0]  # ... ALS never makes it worse ...
    assert errors[200] < 1e-8  # ... and here finds the exact sum


def test_fit_on_any_matrix_never_worse_with_more_sweeps() -> None:
    W = randn(3 * 16, 16, seed=11)

    def error(sweeps: int) -> float:
        K = Kronecker(3, 16, 16, factors=(2, 4, 2), terms=3, sweeps=sweeps)
        return rel(K(*K.fit(W)), W)

    e0, e1, e10 = error(0), error(1), error(10)
    assert e10 <= e1 + 1e-12 and e1 <= e0 + 1e-12
    assert e10 < e0 < 1.0


@pytest.mark.parametrize("shapes,terms", [(((2, 3), (4, 5)), 2), (((2, 2), (3, 1), (1, 4)), 3), ((2,) * 4, 1)])
def test_apply_equals_x_times_w_transposed(shapes, terms: int) -> None:
    shapes = tuple((s, s) if isinstance(s, int) else s for s in shapes)
    gates = 3
    rows, cols = math.prod(m for m, _ in shapes), math.prod(n for _, n in shapes)
    K = Kronecker(gates, rows, cols, factors=shapes, terms=terms)
    F = tuple(randn(gates, terms, m, n, seed=i) for i, (m, n) in enumerate(shapes))
    x = randn(2, 5, cols, seed=99)
    y = K.apply(x, *F)
    assert y.shape == (2, 5, gates * rows)
    torch.testing.assert_close(y, x @ K(*F).T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match=str(cols)):
        K.apply(randn(4, cols + 1), *F)


def test_apply_macs_counts_the_products_apply_runs() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    for factors, terms, gates in ((((2, 3), (4, 5)), 2, 3), ((4, 4, 4), 1, 1), (((3, 2), (2, 4), (5, 1)), 3, 2)):
        shapes = [(f, f) if isinstance(f, int) else f for f in factors]
        rows, cols = math.prod(m for m, _ in shapes), math.prod(n for _, n in shapes)
        K = Kronecker(gates, rows, cols, factors=factors, terms=terms)
        F = random_originals(gates, rows, cols, options=K.options(), bound=1.0)
        with FlopCounterMode(display=False) as counter:
            K.apply(torch.randn(7, cols), *F)
        assert counter.get_total_flops() == 2 * K.apply_macs(7)


def test_gradients_reach_every_factor() -> None:
    gru = nn.GRU(8, 8, dtype=torch.float64)
    kronecker(gru, "weight_hh_l0", factors=((2, 4), (4, 2)), terms=2, gates=3)
    lin = nn.Linear(12, 24, dtype=torch.float64)
    kronecker(lin, factors=((2, 3), (3, 2), (4, 2)))
    x = randn(5, 2, 8)
    out, _ = gru(x)
    (out.pow(2).sum() + lin(randn(4, 12)).pow(2).sum() + unitary_penalty(gru)).backward()
    for plist, k in ((gru.parametrizations.weight_hh_l0, 2), (lin.parametrizations.weight, 3)):
        for i in range(k):
            grad = getattr(plist, f"original{i}").grad
            assert grad is not None and grad.abs().sum() > 0, f"original{i} got no gradient"


def test_parametrize_round_trip_keeps_the_weight_within_the_fit_error() -> None:
    shapes = ((4, 3), (2, 3))
    lin = nn.Linear(9, 8, dtype=torch.float64)
    W0 = lin.weight.detach().clone()
    kronecker(lin, factors=shapes, terms=2)
    s = torch.linalg.svdvals(rearranged(W0, shapes))
    bound = float((s[2:] ** 2).sum().sqrt())
    assert float(torch.linalg.norm(lin.weight.detach() - W0)) == pytest.approx(bound, rel=1e-9)
    fitted = lin.weight.detach().clone()
    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    assert torch.equal(lin.weight.detach(), fitted)
    kronecker(lin, factors=shapes, terms=2)  # a weight that is already a sum of 2 products: kept
    assert rel(lin.weight.detach(), fitted) < 1e-12
    assert sum(p.numel() for n, p in lin.named_parameters() if "original" in n) == \
        lin.parametrizations.weight[0].parameter_count() == 2 * (12 + 6)


def test_fitted_originals_are_used_once_and_dtype_is_kept() -> None:
    lin = nn.Linear(16, 16)
    F = tuple(torch.ones(1, 1, 4, 4) for _ in range(2))
    kronecker(lin, factors="4x4", originals=F)
    assert torch.equal(lin.weight.detach(), torch.ones(16, 16))
    assert lin.parametrizations.weight[0]._pending is None
    W = randn(16, 16).float()
    F32 = lin.parametrizations.weight[0].fit(W)
    assert all(f.dtype == torch.float32 for f in F32)
    with pytest.raises(ConfigError, match=r"\(1, 1, 4, 4\)"):
        kronecker(nn.Linear(16, 16), factors="4x4", originals=(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 8)))


@pytest.mark.parametrize("factors", [(2, 3), (2, 2, 2)])
def test_zero_weight_gives_zero_factors(factors) -> None:
    n = math.prod(factors)
    K = Kronecker(1, n, n, factors=factors, terms=2)
    F = K.fit(torch.zeros(n, n, dtype=torch.float64))
    assert all(torch.isfinite(f).all() and not f.any() for f in F)


def test_check_rejects_shapes_that_do_not_factor() -> None:
    with pytest.raises(ConfigError, match=r"3 block\(s\) of 8x8") as info:
        Kronecker.check(3, 8, 8, factors=(2, 2))
    assert "\n" not in str(info.value) and "2x2" in str(info.value)
    with pytest.raises(ConfigError, match=r"4x8,8x4 make 32x32 .* 1 block\(s\) of 6x10"):
        Kronecker.check(1, 6, 10, factors="4x8,8x4")
    gru = nn.GRU(6, 6)
    with pytest.raises(ConfigError, match=r"3 block\(s\) of 6x6"):
        kronecker(gru, "weight_hh_l0", factors=(2, 2), gates=3)
    assert not parametrize.is_parametrized(gru)  # validated before anything was registered


@pytest.mark.parametrize("options,error,fragment", [
    ({}, ConfigError, "factors="),
    ({"factors": (16,)}, ConfigError, "2 or more"),
    ({"factors": (4, 0)}, ConfigError, "positive"),
    ({"factors": (4, 4.0)}, ConfigError, "positive"),
    ({"factors": (4, True)}, ConfigError, "positive"),
    ({"factors": (4, 4), "terms": 0}, RankError, "terms=0"),
    ({"factors": (4, 4), "terms": 17}, RankError, "1..16"),
    ({"factors": (4, 4), "svd": "fast"}, ConfigError, "svd"),
    ({"factors": (4, 4), "sweeps": -1}, ConfigError, "sweeps"),
    ({"factors": (4, 4), "rank": 3}, TypeError, "rank"),
])
def test_bad_options_are_one_line_errors(options, error, fragment) -> None:
    with pytest.raises(error, match=fragment) as info:
        Kronecker.check(1, 16, 16, **options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,expected", [
    ("64x64", (64, 64)), ("2x2x2x2", (2, 2, 2, 2)), ("4x8,8x4", ((4, 8), (8, 4))),
    (" 4 , 8x2 ", ((4, 4), (8, 2))), ("3X5,2x2", ((3, 5), (2, 2))),
])
def test_parse_factors(text: str, expected) -> None:
    assert parse_factors(text) == expected


@pytest.mark.parametrize("text", ["", "64", "4xx4", "a,b", "0x4", "4x8,", "-4x4", "4x8x", "4,", "4x8,8x4x2"])
def test_parse_factors_rejects_junk(text: str) -> None:
    with pytest.raises(ConfigError, match="Kronecker factors") as info:
        parse_factors(text)
    assert "\n" not in str(info.value)


def test_module_errors_name_the_weight() -> None:
    lin = nn.Linear(16, 16)
    with pytest.raises(ConfigError, match="not a 2-D weight"):
        kronecker(lin, "bias", factors=(4, 4))
    with pytest.raises(ConfigError, match=r"\(48, 16\).*gates=5"):
        kronecker(nn.GRU(16, 16), "weight_hh_l0", factors=(4, 4), gates=5)
    kronecker(lin, factors=(4, 4))
    with pytest.raises(ConfigError, match="already parametrized"):
        kronecker(lin, factors=(4, 4))
    with pytest.raises(ConfigError, match=r"\(8, 16\)"):
        lin.parametrizations.weight[0].fit(torch.zeros(8, 16))
    with pytest.raises(WeightError, match="NaN"):
        lin.parametrizations.weight[0].fit(torch.full((16, 16), float("nan")))


def test_unitary_penalty_is_zero_exactly_on_orthogonal_factors() -> None:
    lin = nn.Linear(12, 12, dtype=torch.float64)
    kronecker(lin, factors=((3, 3), (2, 2), (2, 2)), terms=2)
    plist = lin.parametrizations.weight
    with torch.no_grad():
        for i, (m, _) in enumerate(plist[0].shapes):
            F = getattr(plist, f"original{i}")
            F.copy_(torch.linalg.qr(randn(*F.shape, seed=i)).Q)
    assert unitary_penalty(lin).item() < 1e-24
    assert unitary_penalty(plist).item() < 1e-24
    # The product of orthogonal factors is orthogonal (terms=1): the property the penalty buys.
    one = Kronecker(1, 12, 12, factors=(3, 2, 2))
    Q = [torch.linalg.qr(randn(1, 1, m, m, seed=i)).Q for i, m in enumerate((3, 2, 2))]
    W = one(*Q)
    torch.testing.assert_close(W.T @ W, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    # Away from orthogonal: positive, equal to sum ||F^T F - I||^2 computed by hand, and differentiable.
    with torch.no_grad():
        plist.original0.mul_(1.5)
    expected = sum(((f.mT @ f - torch.eye(f.shape[-1], dtype=f.dtype)) ** 2).sum().item()
                   for f in (plist.original0.detach(), plist.original1.detach(), plist.original2.detach()))
    penalty = unitary_penalty(lin)
    assert penalty.item() == pytest.approx(expected, rel=1e-12) and penalty.item() > 1.0
    penalty.backward()
    assert plist.original0.grad.abs().sum() > 0 and plist.original1.grad.abs().max() < 1e-12


def test_unitary_penalty_skips_non_square_factors_and_needs_a_kronecker_weight() -> None:
    lin = nn.Linear(6, 8, dtype=torch.float64)
    kronecker(lin, factors=((2, 3), (4, 2)))
    assert unitary_penalty(lin).item() == 0.0
    mixed = nn.Linear(12, 8, dtype=torch.float64)
    kronecker(mixed, factors=((2, 3), (4, 4)))
    F = mixed.parametrizations.weight.original1
    assert unitary_penalty(mixed).item() == pytest.approx(((F.mT @ F - torch.eye(4)) ** 2).sum().item())
    with pytest.raises(ConfigError, match="no Kronecker"):
        unitary_penalty(nn.Linear(4, 4))


@pytest.mark.parametrize("factors,extra", [
    ("4x4", {}), ((4, 4), {"terms": 3}), ("2x3,3x2", {}), (((2, 2), 2), {"svd": "exact"}),
    ((2, 2, 2, 2), {"sweeps": 3}),
])
def test_options_round_trip_through_json(factors, extra) -> None:
    pairs = [(f, f) if isinstance(f, int) else tuple(f) for f in
             (parse_factors(factors) if isinstance(factors, str) else factors)]
    rows, cols = math.prod(m for m, _ in pairs), math.prod(n for _, n in pairs)
    K = Kronecker(1, rows, cols, factors=factors, **extra)
    stored = json.loads(json.dumps(K.options()))
    again = Kronecker(1, rows, cols, **stored)
    assert again.options() == K.options() and again.shapes == K.shapes
    assert Kronecker.check(1, rows, cols, **stored) == K.options()
    assert repr(again) == repr(K)
    F = K.fit(randn(rows, cols))
    assert torch.equal(again(*F), K(*F))
    # Defaults are not recorded; a non-square factor makes the normal form pairs.
    assert set(K.options()) == {"factors", "terms", *extra}
    if factors == "2x3,3x2":
        assert K.options()["factors"] == ((2, 3), (3, 2))
    if factors == ((2, 2), 2):
        assert K.options()["factors"] == (2, 2)


def test_more_parameters_than_dense_warns_once_in_one_line() -> None:
    with pytest.warns(UserWarning, match="more than the dense 16") as caught:
        Kronecker.check(1, 4, 4, factors=(2, 2), terms=4)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Kronecker.check(1, 16, 16, factors=(4, 4), terms=2)


def test_random_originals_have_the_dense_init_scale() -> None:
    bound = 0.125
    torch.manual_seed(0)
    for factors, terms in (((8, 8), 1), ((4, 4, 4), 2), (((2, 4), (8, 2)), 3)):
        shapes = [(f, f) if isinstance(f, int) else f for f in factors]
        rows, cols = math.prod(m for m, _ in shapes), math.prod(n for _, n in shapes)
        K = Kronecker(3, rows, cols, factors=factors, terms=terms)
        var = torch.stack([K(*random_originals(3, rows, cols, options=K.options(), bound=bound,
                                               dtype=torch.float64)).var() for _ in range(20)]).mean()
        assert float(var) == pytest.approx(bound ** 2 / 3, rel=0.2), factors
    F = random_originals(3, 16, 16, options={"factors": "4x4", "terms": 2}, bound=1.0, dtype=torch.float32)
    assert [tuple(f.shape) for f in F] == [(3, 2, 4, 4)] * 2 and F[0].dtype == torch.float32
