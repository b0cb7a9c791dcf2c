"""Data-aware (whitened) fits against independent float64 references.

The weighted problem ``min ||(W - X) S||_F``, ``S S^T = C``, has a closed-form optimum that is
computed here a different way (Cholesky factor, inverse square root) than the fit computes it
(eigendecomposition, projection): its value is the discarded energy of ``W S`` and its minimiser
``X* = [W C^{1/2}]_d C^{-1/2}``. The weighted diagonal steps are checked against brute-force
least squares on the vectorised problem.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lrcompress import factorize
from lrcompress.errors import ConfigError, WeightError
from lrcompress.factorize import fit_low_rank, fit_low_rank_plus_diagonal, weighted_spectrum
from lrcompress.whitening import weighted_diagonal_update, weighted_error, whitening


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def spd(n: int, seed: int = 0, decay: float = 0.7) -> Tensor:
    """A random SPD second moment with a spread of scales, as hidden states have."""
    Q = torch.linalg.qr(randn(n, n, seed=seed)).Q
    return (Q * decay ** torch.arange(n, dtype=torch.float64)) @ Q.T


def sqrtm(C: Tensor, power: float) -> Tensor:
    lam, Q = torch.linalg.eigh(C)
    return (Q * lam ** power) @ Q.T


def weighted_norm2(E: Tensor, C: Tensor) -> float:
    """||E K||_F^2 with K the Cholesky factor of C: a factor the fit never uses."""
    return float(torch.linalg.norm(E @ torch.linalg.cholesky(C)) ** 2)


SHAPES = [(3, 8, 8), (4, 6, 9), (1, 10, 7)]


@pytest.mark.parametrize("gates,rows,cols", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
def test_whitened_low_rank_is_the_weighted_optimum(gates: int, rows: int, cols: int, rank: int) -> None:
    W, C = randn(gates, rows, cols, seed=1), spd(cols, seed=2)
    f = fit_low_rank(W, rank, method="exact", C=C)
    X = f.compose()
    K = torch.linalg.cholesky(C)
    s = torch.linalg.svdvals(W @ K)  # (gates, k)
    for g in range(gates):
        # Value: the discarded energy of W K; minimiser: the generalized Eckart-Young solution.
        assert weighted_norm2(W[g] - X[g], C) == pytest.approx(float((s[g, rank:] ** 2).sum()), rel=1e-9)
        U, S, Vh = torch.linalg.svd(W[g] @ sqrtm(C, 0.5))
        X_star = (U[:, :rank] * S[:rank]) @ Vh[:rank] @ sqrtm(C, -0.5)
        torch.testing.assert_close(X[g], X_star, rtol=0, atol=1e-9)
    expected = math.sqrt(float((s[:, rank:] ** 2).sum()) / weighted_norm2(W.reshape(-1, cols), C))
    assert f.weighted_error == pytest.approx(expected, rel=1e-9)
    assert f.damping == 0.0
    assert f.rel_error == pytest.approx(float(torch.linalg.norm(W - X) / torch.linalg.norm(W)), rel=1e-9)


def test_tied_whitened_fit_is_the_optimum_of_the_stacked_matrix() -> None:
    W, C = randn(3, 6, 6, seed=3), spd(6, seed=4)
    f = fit_low_rank(W, 2, tied=True, method="exact", C=C)
    assert f.R.shape == (2, 6)
    s = torch.linalg.svdvals(W.reshape(-1, 6) @ torch.linalg.cholesky(C))
    assert weighted_norm2((W - f.compose()).reshape(-1, 6), C) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-9)
    # The weighted optimum beats the plain fit on the weighted error, and loses on the plain one.
    plain = fit_low_rank(W, 2, tied=True, method="exact")
    assert f.weighted_error < weighted_error(W, plain.compose(), C)
    assert f.rel_error > plain.rel_error


def test_weighted_spectrum_gives_the_fit_error_at_every_rank() -> None:
    W, C = randn(3, 7, 7, seed=5), spd(7, seed=6)
    s = weighted_spectrum(W, C)
    assert s.shape == (3, 7)
    torch.testing.assert_close(weighted_spectrum(W), factorize.spectrum(W))
    total = weighted_norm2(W.reshape(-1, 7), C)
    for rank in (1, 4):
        f = fit_low_rank(W, rank, method="exact", C=C)
        assert f.weighted_error ** 2 * total == pytest.approx(float((s[:, rank:] ** 2).sum()), rel=1e-9)
    tied = weighted_spectrum(W, C, tied=True)
    f = fit_low_rank(W, 3, tied=True, method="exact", C=C)
    assert f.weighted_error ** 2 * total == pytest.approx(float((tied[3:] ** 2).sum()), rel=1e-9)


def test_randomized_whitened_fit_matches_exact_when_it_sees_every_direction() -> None:
    W, C = randn(3, 9, 9, seed=25), spd(9, seed=26)  # rank + oversampling covers all 9 columns
    exact = fit_low_rank(W, 2, method="exact", C=C)
    randomized = fit_low_rank(W, 2, method="randomized", C=C)
    assert randomized.method == "randomized"
    torch.testing.assert_close(randomized.compose(), exact.compose(), rtol=0, atol=1e-8)


def test_weighted_error_is_the_output_error_on_the_data() -> None:
    V = randn(500, 9, seed=7) * torch.linspace(0.1, 3, 9, dtype=torch.float64)  # samples v
    W, W_hat = randn(2, 5, 9, seed=8), randn(2, 5, 9, seed=9)
    C = V.T @ V / len(V)
    direct = torch.linalg.norm((W - W_hat) @ V.T) / torch.linalg.norm(W @ V.T)
    assert weighted_error(W, W_hat, C) == pytest.approx(float(direct), rel=1e-12)
    assert weighted_error(W, W, C) == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_identity_moment_gives_todays_fits(tied: bool) -> None:
    W, eye = randn(3, 8, 8, seed=10), torch.eye(8, dtype=torch.float64)
    for fit in (fit_low_rank, fit_low_rank_plus_diagonal):
        plain, white = fit(W, 3, tied=tied, method="exact"), fit(W, 3, tied=tied, method="exact", C=eye)
        torch.testing.assert_close(white.compose(), plain.compose(), rtol=0, atol=1e-10)
        assert white.rel_error == pytest.approx(plain.rel_error, abs=1e-10)
        assert white.weighted_error == pytest.approx(plain.rel_error, abs=1e-10)
        assert white.damping == 0.0 and plain.weighted_error is None
    plain = fit_low_rank_plus_diagonal(W, 3, tied=tied, method="exact")
    white = fit_low_rank_plus_diagonal(W, 3, tied=tied, method="exact", C=eye)
    assert white.errors == pytest.approx(plain.errors, abs=1e-10)
    assert (white.diag_iterations, white.diag_stop) == (plain.diag_iterations, plain.diag_stop)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_weighted_diagonal_fit_is_monotone_and_beats_low_rank(tied: bool, method: str) -> None:
    n = 12
    C = spd(n, seed=11, decay=0.8)
    W = randn(3, n, n, seed=12) * 0.3 + torch.diag_embed(2 + randn(3, n, seed=13))  # a strong diagonal
    lrd = fit_low_rank_plus_diagonal(W, 3, tied=tied, method=method, C=C)
    lr = fit_low_rank(W, 3, tied=tied, method="exact", C=C)
    assert lrd.weighted_error <= lr.weighted_error
    assert lrd.weighted_error < 0.8 * lr.weighted_error  # the diagonal pays here
    assert all(b <= a + 1e-15 for a, b in zip(lrd.errors[1:], lrd.errors[2:]))
    assert lrd.errors[1] <= lrd.errors[0]
    assert lrd.diag_stop in factorize.DIAG_STOPS
    assert lrd.weighted_error == pytest.approx(lrd.errors[-1], rel=1e-9)  # errors are weighted, C full rank


def test_weighted_diagonal_recovers_an_exact_low_rank_plus_diagonal() -> None:
    n = 10
    L, R, D = randn(2, n, 2, seed=14), randn(2, 2, n, seed=15), 1 + randn(2, n, seed=16).abs()
    W = L @ R + torch.diag_embed(D)
    f = fit_low_rank_plus_diagonal(W, 2, method="exact", C=spd(n, seed=17), max_iter=200, tol=1e-12)
    assert f.weighted_error < 1e-6
    torch.testing.assert_close(f.D, D, rtol=0, atol=1e-5)


def brute_force_joint(A: Tensor, U: Tensor, C: Tensor) -> Tensor:
    """min over R, d of ||(A - U R - diag(d)) K||_F by least squares on the vectorised problem."""
    n, k = A.shape[0], U.shape[1]
    K = torch.linalg.cholesky(C)
    cols = []
    for a in range(k):
        for j in range(n):
            E = torch.zeros(k, n, dtype=A.dtype)
            E[a, j] = 1
            cols.append((U @ E @ K).reshape(-1))
    for i in range(n):
        E = torch.zeros(n, n, dtype=A.dtype)
        E[i, i] = 1
        cols.append((E @ K).reshape(-1))
    X = torch.linalg.lstsq(torch.stack(cols, 1), (A @ K).reshape(-1, 1)).solution
    return X[k * n:, 0]


def test_weighted_diagonal_step_is_the_joint_least_squares_optimum() -> None:
    n, k = 6, 2
    A, C = randn(n, n, seed=18), spd(n, seed=19)
    U = torch.linalg.qr(randn(n, k, seed=20)).Q
    residual = A - U @ (U.T @ A)
    delta, gain2 = weighted_diagonal_update(U[None], residual[None], C, tied=False, floor=0.0)
    torch.testing.assert_close(delta[0], brute_force_joint(A, U, C), rtol=0, atol=1e-9)
    after = residual - (torch.eye(n, dtype=A.dtype) - U @ U.T) @ torch.diag(delta[0])
    assert weighted_norm2(residual, C) - weighted_norm2(after, C) == pytest.approx(gain2, rel=1e-9)
    # No low-rank part: the per-row closed form d_i = (E C)_ii / C_ii.
    d, _ = weighted_diagonal_update(torch.zeros(1, n, 0, dtype=A.dtype), A[None], C, tied=False, floor=0.0)
    torch.testing.assert_close(d[0], (A @ C).diagonal() / C.diagonal(), rtol=0, atol=1e-12)
    torch.testing.assert_close(d[0], brute_force_joint(A, torch.zeros(n, 0, dtype=A.dtype), C), rtol=0, atol=1e-9)


def test_rank_deficient_moment_is_damped_and_fits_the_data_exactly() -> None:
    n, seen = 12, 5
    V = randn(40, seen, seed=21) @ randn(seen, n, seed=22)  # the data spans 5 directions
    C = V.T @ V / len(V)
    white = whitening(C)
    assert white.floored == n - seen and white.damping > 0
    assert white.damping == pytest.approx(1e-8 * float(torch.linalg.eigvalsh(C)[-1]))
    W = randn(3, n, n, seed=23)
    for fit in (fit_low_rank, fit_low_rank_plus_diagonal):
        f = fit(W, seen, method="exact", C=C)
        assert torch.isfinite(f.compose()).all() and f.damping == white.damping
        assert f.weighted_error < 1e-6  # rank 5 reproduces W on the 5 directions the data visits
    torch.testing.assert_close(white.unwhiten(W @ white.S), W, rtol=0, atol=1e-6)
    # No data at all: the plain fit.
    zero = fit_low_rank(W, 3, method="exact", C=torch.zeros(n, n, dtype=torch.float64))
    torch.testing.assert_close(zero.compose(), fit_low_rank(W, 3, method="exact").compose(), rtol=0, atol=1e-10)


def test_full_rank_moment_is_not_damped() -> None:
    C = spd(8, seed=24)
    white = whitening(C)
    assert white.floored == 0 and white.damping == 0.0
    torch.testing.assert_close(white.damped(), C, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad,error", [
    (torch.full((3, 3), float("nan")), WeightError), (torch.eye(3)[:2], ConfigError),
])
def test_bad_moments_are_refused(bad: Tensor, error: type) -> None:
    with pytest.raises(error):
        whitening(bad)
    with pytest.raises(ConfigError, match="damping"):
        whitening(torch.eye(3), damping=-1.0)


# -- damping: the relative ridge C + lambda mean(diag C) I ----------------------------------------

def test_damping_adds_a_relative_ridge_and_zero_is_the_exact_moment() -> None:
    C = spd(8, seed=30)
    for lam in (0.0, 0.1, 3.0):
        white = whitening(C, damping=lam)
        want = C + lam * float(C.diagonal().mean()) * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(white.damped(), want, rtol=0, atol=1e-12)
        # the same lambda whatever the activations' scale: scaling C scales the ridge with it
        torch.testing.assert_close(whitening(1e3 * C, damping=lam).damped(), 1e3 * want, rtol=1e-12, atol=0)
    W = randn(3, 6, 8, seed=31)
    exact, damped = fit_low_rank(W, 2, method="exact", C=C, damping=0.0), fit_low_rank(W, 2, method="exact", C=C,
                                                                                         damping=1.0)
    s = torch.linalg.svdvals(W @ torch.linalg.cholesky(C))
    optimum = math.sqrt(float((s[:, 2:] ** 2).sum() / (s ** 2).sum()))
    assert exact.weighted_error == pytest.approx(optimum, rel=1e-9)  # lambda = 0: the weighted optimum
    assert damped.weighted_error > exact.weighted_error * (1 + 1e-6)  # a ridge trades output error away
    assert damped.damping == pytest.approx(float(C.diagonal().mean()), rel=1e-12)


@pytest.mark.parametrize("fit", [fit_low_rank, fit_low_rank_plus_diagonal])
def test_infinite_damping_tends_to_the_plain_fit(fit) -> None:
    W, C = randn(3, 8, 8, seed=32), spd(8, seed=33, decay=0.5)
    plain = fit(W, 3, method="exact").compose()
    errors = [float((fit(W, 3, method="exact", C=C, damping=lam).compose() - plain).norm() / plain.norm())
              for lam in (1e2, 1e4, 1e8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6  # O(1 / lambda) convergence
    assert float((fit(W, 3, method="exact", C=C).compose() - plain).norm() / plain.norm()) > 1e-2


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_damping_is_one_clear_error(bad) -> None:
    with pytest.raises(ConfigError, match=r"damping must be a finite number >= 0.*got") as info:
        whitening(torch.eye(3), damping=bad)
    assert "\n" not in str(info.value)
