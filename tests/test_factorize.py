"""The maths of ``lrcompress.factorize`` against independent float64 references.

Exact SVD must reach the Eckart-Young bound sqrt(sum of discarded s_i^2), per gate block and for
the stacked (tied) matrix; randomized SVD must come within 2% of it on decaying spectra; the
low-rank-plus-diagonal fit must never be worse than low-rank alone and must recover a matrix that
is exactly low rank plus diagonal.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lrcompress import factorize
from lrcompress.factorize import fit_low_rank, fit_low_rank_plus_diagonal


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def with_spectrum(rows: int, cols: int, s: Tensor, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``U diag(s) V^T`` with random orthonormal U (rows x k) and V (cols x k): singular values ``s``."""
    U = torch.linalg.qr(randn(rows, len(s), seed=seed, dtype=dtype)).Q
    V = torch.linalg.qr(randn(cols, len(s), seed=seed + 1, dtype=dtype)).Q
    return (U * s.to(dtype)) @ V.T


def reference_error(W: Tensor, L: Tensor, R: Tensor, D: Tensor | None = None) -> float:
    """||W - L R - diag(D)||_F / ||W||_F, recomputed in float64 from the factors."""
    W, L, R = W.double(), L.double(), R.double()
    W_hat = L @ R + (torch.diag_embed(D.double()) if D is not None else 0)
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W))


def eckart_young(s: Tensor, rank: int) -> Tensor:
    """sqrt(sum of discarded s_i^2), per row of singular values."""
    return (s[..., rank:] ** 2).sum(-1).sqrt()


SHAPES = [(3, 8, 8), (4, 6, 9), (1, 10, 7), (3, 12, 5)]  # (gates, rows, cols)


@pytest.mark.parametrize("gates,rows,cols", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_exact_low_rank_error_is_eckart_young_per_gate(gates: int, rows: int, cols: int, rank: int) -> None:
    W = randn(gates, rows, cols)
    f = fit_low_rank(W, rank, method="exact")
    assert f.L.shape == (gates, rows, rank) and f.R.shape == (gates, rank, cols)
    s = torch.linalg.svdvals(W)  # (gates, k), float64
    per_gate = eckart_young(s, rank)
    achieved = torch.linalg.norm(W - f.L @ f.R, dim=(-2, -1))
    torch.testing.assert_close(achieved, per_gate, rtol=1e-9, atol=1e-12)
    bound = float(per_gate.norm() / torch.linalg.norm(W))
    assert f.rel_error == pytest.approx(bound, rel=1e-9)
    assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R), rel=1e-9)


@pytest.mark.parametrize("gates,rows,cols", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_exact_tied_error_is_eckart_young_of_the_stacked_matrix(gates: int, rows: int, cols: int,
                                                                 rank: int) -> None:
    W = randn(gates, rows, cols, seed=1)
    f = fit_low_rank(W, rank, tied=True, method="exact")
    assert f.L.shape == (gates, rows, rank) and f.R.shape == (rank, cols)  # one shared R
    s = torch.linalg.svdvals(W.reshape(gates * rows, cols))
    bound = float(eckart_young(s, rank) / torch.linalg.norm(W))
    assert f.rel_error == pytest.approx(bound, rel=1e-9)
    assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R), rel=1e-9)
    # Sharing R costs accuracy against separate per-gate factors of the same rank.
    assert f.rel_error >= fit_low_rank(W, rank, method="exact").rel_error - 1e-12


def test_float32_fit_reaches_the_float64_bound() -> None:
    W = randn(3, 16, 16, seed=2, dtype=torch.float32)
    f = fit_low_rank(W, 4, method="exact")
    assert f.L.dtype == f.R.dtype == torch.float32
    s = torch.linalg.svdvals(W.double())
    bound = float(eckart_young(s, 4).norm() / torch.linalg.norm(W.double()))
    assert f.rel_error == pytest.approx(bound, rel=1e-5)


def test_full_rank_fit_is_exact() -> None:
    W = randn(4, 6, 9, seed=3)
    f = fit_low_rank(W, 6, method="exact")
    assert f.rel_error < 1e-14
    torch.testing.assert_close(f.compose(), W, rtol=0, atol=1e-13)


def decaying(k: int, scale: float) -> Tensor:
    return torch.exp(-torch.arange(k, dtype=torch.float64) / scale) + 1e-3


# Large float32 matrices of a known, decaying spectrum (built in float32, orthonormal to ~1e-6, so
# the designed s is the spectrum far inside the 2% margin): the bound needs no 1024-sized SVD.
@pytest.mark.parametrize("rows,cols,rank", [(1024, 1024, 32), (1024, 2048, 64)])
def test_randomized_low_rank_is_within_2_percent_of_eckart_young(rows: int, cols: int, rank: int) -> None:
    s = decaying(min(rows, cols), 60.0)
    W = with_spectrum(rows, cols, s, dtype=torch.float32)[None]
    assert factorize.choose_method(tuple(W.shape), rank) == "randomized"  # what "auto" picks here
    f = fit_low_rank(W, rank, method="randomized")
    assert f.method == "randomized" and f.L.dtype == torch.float32
    bound = float(eckart_young(s, rank) / s.norm())
    assert bound * (1 - 1e-3) <= f.rel_error <= 1.02 * bound
    assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R), rel=1e-4)


def test_randomized_tied_is_within_2_percent_of_the_stacked_bound() -> None:
    s = decaying(1024, 40.0)
    W = with_spectrum(1024, 1024, s, seed=5, dtype=torch.float32).reshape(2, 512, 1024)
    f = fit_low_rank(W, 32, tied=True, method="randomized")
    assert f.method == "randomized" and f.R.shape == (32, 1024)
    bound = float(eckart_young(s, 32) / s.norm())
    assert bound * (1 - 1e-3) <= f.rel_error <= 1.02 * bound


def test_randomized_diagonal_fit_improves_on_its_low_rank_start() -> None:
    s = decaying(1024, 40.0)
    W = (with_spectrum(1024, 1024, s, seed=7, dtype=torch.float32) + 0.05 * torch.eye(1024))[None]
    plain = fit_low_rank(W, 32, method="randomized")
    f = fit_low_rank_plus_diagonal(W, 32, method="randomized")
    assert f.method == "randomized"
    assert_non_increasing(f.errors)
    assert f.rel_error < plain.rel_error
    assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R, f.D), rel=1e-3)


def assert_non_increasing(errors: list[float]) -> None:
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-12), errors


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rank", [1, 4])
def test_diagonal_fit_beats_low_rank_and_never_gets_worse(tied: bool, dtype: torch.dtype, rank: int) -> None:
    W = randn(3, 16, 16, seed=6, dtype=dtype)
    plain = fit_low_rank(W, rank, tied=tied, method="exact")
    f = fit_low_rank_plus_diagonal(W, rank, tied=tied, method="exact")
    assert f.D is not None and f.D.shape == (3, 16) and f.D.dtype == dtype
    assert f.R.shape == ((rank, 16) if tied else (3, rank, 16))
    assert len(f.errors) >= 3  # low-rank error, first diagonal fit, then iterations
    assert_non_increasing(f.errors)
    assert f.errors[0] == pytest.approx(plain.rel_error, rel=1e-6)
    assert f.errors[-1] < f.errors[0]  # a random matrix's diagonal is worth fitting
    assert f.rel_error <= plain.rel_error
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert f.rel_error == pytest.approx(reference_error(W, f.L, f.R, f.D), rel=tolerance)
    assert f.errors[-1] == pytest.approx(f.rel_error, rel=tolerance)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_diagonal_fit_recovers_an_exact_low_rank_plus_diagonal_matrix(tied: bool) -> None:
    gates, n, rank = 3, 24, 3
    L = randn(gates, n, rank, seed=7)
    R = randn(rank, n, seed=8) if tied else randn(gates, rank, n, seed=8)
    W = L @ R + torch.diag_embed(3 * randn(gates, n, seed=9))
    assert fit_low_rank_plus_diagonal(W, rank, tied=tied, method="exact").rel_error < 1e-8
    assert fit_low_rank(W, rank, tied=tied, method="exact").rel_error > 0.05


def test_diagonal_needs_square_blocks() -> None:
    with pytest.raises(ValueError, match="square"):
        fit_low_rank_plus_diagonal(randn(3, 6, 8), 2)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_rank_for_energy_is_the_smallest_rank_keeping_that_share_in_every_block(energy: float) -> None:
    s = torch.linalg.svdvals(randn(3, 20, 20, seed=10))
    share = (s ** 2).cumsum(-1) / (s ** 2).sum(-1, keepdim=True)
    per_block = [next(k + 1 for k in range(20) if share[g, k] >= energy) for g in range(3)]
    assert factorize.rank_for_energy(s, energy) == max(per_block)


@pytest.mark.parametrize("fraction,full,expected", [(0.25, 8, 2), (0.3, 8, 3), (1.0, 7, 7), (0.01, 8, 1),
                                                    (0.5, 7, 4)])
def test_fraction_rank_rounds_up(fraction: float, full: int, expected: int) -> None:
    assert factorize.fraction_rank(fraction, full) == expected == max(1, math.ceil(fraction * full))
