"""Fit quality of the default low-rank-plus-diagonal fit at every rank, and how its iterations end.

The weights mimic a trained GRU recurrent weight with strong self-connections: per gate block a
decaying spectrum (random orthonormal U, V), noise, and a diagonal 1 + U(0, 1). Such a diagonal
is where the textbook alternation (SVD of W - diag(D), then D = diag(W - L R)) creeps. The
reference is the best of a long exact fit (float64, 60 iterations, no tolerance) and the
textbook alternation written out here; ``RANDOMIZED_MIN_DIM`` is lowered so that ``auto``
switches from randomized to exact SVD between ranks n/4 and n/4 + 1 at this small n.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import lrcompress as lrc
from lrcompress import factorize
from lrcompress.factorize import DIAG_STOPS, compose, fit_low_rank, fit_low_rank_plus_diagonal

N, GATES = 128, 3


def strongly_diagonal(n: int = N, seed: int = 0) -> Tensor:
    """(3, n, n) float32: U diag(4 exp(-i / (n/21))) V^T (width n/2) + N(0, 0.01/n) noise + diag(1 + U(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    width = n // 2
    s = 4.0 * torch.exp(-torch.arange(width, dtype=torch.float64) / (48 * n / 1024))
    blocks = []
    for _ in range(GATES):
        U = torch.linalg.qr(torch.randn(n, width, generator=gen, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, width, generator=gen, dtype=torch.float64)).Q
        noise = torch.randn(n, n, generator=gen, dtype=torch.float64) * (0.1 / math.sqrt(n))
        blocks.append((U * s) @ V.T + noise + torch.diag(1 + torch.rand(n, generator=gen, dtype=torch.float64)))
    return torch.stack(blocks).float()


def textbook_alternation(W: Tensor, rank: int, iters: int) -> float:
    """Relative error of the classic alternation from D = 0, exact SVD in float64."""
    W = W.double()
    D = torch.zeros(W.shape[:-1], dtype=W.dtype)
    for _ in range(iters):
        U, S, Vh = torch.linalg.svd(W - torch.diag_embed(D), full_matrices=False)
        LR = (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]
        D = torch.diagonal(W - LR, dim1=-2, dim2=-1).clone()
    return float(torch.linalg.norm(W - LR - torch.diag_embed(D)) / torch.linalg.norm(W))


def reference_error(W: Tensor, L: Tensor, R: Tensor, D: Tensor | None = None) -> float:
    W, W_hat = W.double(), L.double() @ R.double()
    if D is not None:
        W_hat = W_hat + torch.diag_embed(D.double())
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W))


def assert_non_increasing(errors: list[float]) -> None:
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-12), errors


@pytest.fixture
def small_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factorize, "RANDOMIZED_MIN_DIM", N // 4)


def test_default_fit_is_within_2_percent_of_converged_at_every_rank(small_switch: None) -> None:
    W = strongly_diagonal()
    assert factorize.choose_method(tuple(W.shape), N // 4) == "randomized"
    assert factorize.choose_method(tuple(W.shape), N // 4 + 1) == "exact"
    errors = {}
    for rank in (N // 8, N // 4, N // 4 + 1, N // 2):
        f = fit_low_rank_plus_diagonal(W, rank)  # the default: method auto, default iterations
        long = fit_low_rank_plus_diagonal(W.double(), rank, method="exact", max_iter=60, tol=0.0)
        textbook = textbook_alternation(W, rank, 50)
        converged = min(long.rel_error, textbook)
        assert f.rel_error <= 1.02 * converged, (rank, f.method, f.rel_error, long.rel_error, textbook)
        assert f.rel_error < textbook  # the textbook alternation, 50 iterations, is well above it
        assert_non_increasing(f.errors)
        tolerance = 1e-4 if f.method == "randomized" else 1e-6
        assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R, f.D), rel=tolerance)
        assert f.diag_stop in DIAG_STOPS and f.diag_iterations == len(f.errors) - 2
        errors[rank] = (f.rel_error, converged)
    # No jump where auto switches method: one more rank never costs more than the 2% margin.
    assert errors[N // 4 + 1][0] <= errors[N // 4][0] * 1.02
    assert errors[N // 4][0] <= 1.02 * errors[N // 4][1]


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("rank", [4, 16, 40])
def test_with_a_zero_diagonal_the_diagonal_fit_is_never_worse_than_low_rank(method: str, rank: int) -> None:
    W = strongly_diagonal(seed=1)
    W.diagonal(dim1=-2, dim2=-1).zero_()
    plain = fit_low_rank(W, rank, method=method)
    f = fit_low_rank_plus_diagonal(W, rank, method=method)
    assert f.rel_error <= plain.rel_error * (1 + 1e-6)
    assert_non_increasing(f.errors)
    assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R, f.D), rel=1e-4)


@pytest.mark.parametrize("rank", [8, 32, 64])
def test_plain_low_rank_still_meets_eckart_young(rank: int) -> None:
    W = strongly_diagonal(seed=2).double()
    f = fit_low_rank(W, rank, method="exact")
    s = torch.linalg.svdvals(W)
    bound = float((s[..., rank:] ** 2).sum().sqrt() / torch.linalg.norm(W))
    assert f.rel_error == pytest.approx(bound, rel=1e-9)
    assert f.diag_stop == "" and f.diag_iterations is None


def test_the_fit_says_how_it_ended() -> None:
    W = strongly_diagonal(seed=3).double()
    capped = fit_low_rank_plus_diagonal(W, 16, method="exact", max_iter=1, tol=0.0)
    assert (capped.diag_iterations, capped.diag_stop) == (1, "max_iter") and len(capped.errors) == 3
    assert capped.diag_last_change == pytest.approx((capped.errors[1] - capped.errors[2]) / capped.errors[1])
    none = fit_low_rank_plus_diagonal(W, 16, method="exact", max_iter=0)
    assert (none.diag_iterations, none.diag_stop, none.diag_last_change) == (0, "max_iter", None)
    converged = fit_low_rank_plus_diagonal(W, 16, method="exact", tol=1e-2)
    assert converged.diag_stop == "converged" and converged.diag_last_change <= 1e-2
    # An exactly low-rank-plus-diagonal matrix: the error reaches (numerically) zero.
    L, R = torch.randn(3, 24, 2, dtype=torch.float64), torch.randn(3, 2, 24, dtype=torch.float64)
    exact = fit_low_rank_plus_diagonal(L @ R + torch.diag_embed(1 + torch.rand(3, 24, dtype=torch.float64)), 2,
                                       method="exact", tol=0.0, max_iter=200)
    assert exact.rel_error < 1e-8 and exact.diag_stop in ("exact", "stalled", "converged")


def test_report_rows_say_how_the_diagonal_fit_ended() -> None:
    torch.manual_seed(0)
    model = torch.nn.GRU(4, 32)
    report = lrc.compress(model, rank=4, diag=True)
    row = report.targets[0]
    assert row.diag_stop in DIAG_STOPS and row.diag_iterations >= 1 and row.diag_last_change is not None
    assert report.to_dict()["targets"][0]["diag_stop"] == row.diag_stop
    assert f"{row.diag_iterations} it, {row.diag_stop}" in str(report)
    plain = lrc.compress(torch.nn.GRU(4, 32), rank=4).targets[0]
    assert (plain.diag_stop, plain.diag_iterations, plain.diag_fit) == ("", None, "-")


@pytest.mark.parametrize("rank", [64, 63, 48])
@pytest.mark.parametrize("diag", [False, True])
def test_reported_error_is_the_real_one_near_full_rank(rank, diag):
    """The projection identity cancels near full rank: the report must still give the real error."""
    torch.manual_seed(0)
    n = 64
    U, V = torch.linalg.qr(torch.randn(n, n))[0], torch.linalg.qr(torch.randn(n, n))[0]
    W = ((U * torch.exp(-torch.arange(n) / 10.0)) @ V.T + torch.diag(torch.rand(n)))[None]
    fit = (fit_low_rank_plus_diagonal if diag else fit_low_rank)(W, rank, method="randomized")
    D = None if fit.D is None else fit.D.double()
    real = float(torch.linalg.vector_norm(W.double() - compose(fit.L.double(), fit.R.double(), D))
                 / torch.linalg.vector_norm(W.double()))
    assert fit.rel_error == pytest.approx(real, rel=1e-3, abs=1e-7)
