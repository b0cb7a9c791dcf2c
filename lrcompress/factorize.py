"""Pure maths: truncated and randomized SVD, low-rank (+ diagonal) fits, rank rules.

Every function takes a batch of matrices ``W`` of shape ``(G, m, n)`` (G gate blocks of a
recurrent weight, 1 for a Linear) and touches no ``nn.Module``. Factors use the balanced split
``L = U sqrt(S)``, ``R = sqrt(S) V^T`` so neither factor dominates the other's scale. With
``tied=True`` the G blocks share one ``R`` of shape ``(d, n)``: the stacked ``(G m, n)`` matrix
is factored, which is the exact optimum for a shared projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

# Exact SVD is used below this smallest dimension; above it (and for ranks well below full)
# randomized SVD is ~40x faster on a 4096 x 4096 matrix for a Frobenius error within ~1%.
RANDOMIZED_MIN_DIM = 1024
# Exact SVD runs in float64 up to this size: cheap there, and it makes float32 factors exact
# to the last bit of the cast.
FLOAT64_MAX_DIM = 1024
SVD_METHODS = ("auto", "exact", "randomized")


@dataclass
class Factors:
    """Fitted factors of a (G, m, n) weight and their relative Frobenius error."""

    L: Tensor  # (G, m, d)
    R: Tensor  # (G, d, n), or (d, n) when tied
    D: Tensor | None = None  # (G, m) diagonal, square blocks only
    rel_error: float = float("nan")
    errors: list[float] = field(default_factory=list)  # per diagonal-fit iteration
    method: str = "exact"

    def compose(self) -> Tensor:
        return compose(self.L, self.R, self.D)

    def to(self, dtype: torch.dtype) -> "Factors":
        D = None if self.D is None else self.D.to(dtype)
        return Factors(self.L.to(dtype), self.R.to(dtype), D, self.rel_error, self.errors, self.method)


def compose(L: Tensor, R: Tensor, D: Tensor | None = None) -> Tensor:
    """Rebuild the (G, m, n) dense blocks from L (G, m, d), R (G or none, d, n), D (G, m)."""
    W = L @ R
    if D is not None:
        # In place on the fresh product (its backward needs only L and R): no n x n diag_embed.
        W.diagonal(dim1=-2, dim2=-1).add_(D)
    return W


def relative_error(W: Tensor, W_hat: Tensor) -> float:
    """||W - W_hat||_F / ||W||_F over the whole batch, accumulated in float64 (0/0 gives 0)."""
    norm = frobenius(W)
    diff = frobenius(W - W_hat.to(W.dtype))
    return diff / norm if norm > 0 else diff


def frobenius(x: Tensor) -> float:
    # float32 norms of 50M entries drift by ~0.4% in torch; float64 accumulation does not.
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def eckart_young_error(singular_values: Tensor, rank: int) -> float:
    """Optimal rank-``rank`` Frobenius error sqrt(sum of discarded s_i^2) over a batch of spectra."""
    s = singular_values.double()
    return float(torch.sqrt((s[..., rank:] ** 2).sum()))


def spectrum(W: Tensor, *, tied: bool = False) -> Tensor:
    """Singular values per block, (G, k); one row for the stacked matrix when ``tied``."""
    A = _stack(W) if tied else W
    return torch.linalg.svdvals(A.to(_work_dtype(A, "exact")))


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular values in every row (block)."""
    s2 = singular_values.double() ** 2
    total = s2.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    kept = s2.cumsum(-1) / total
    # Count ranks still short of the target; a tiny slack absorbs round-off at exact fractions.
    ranks = (kept < energy - 1e-12).sum(-1) + 1
    return int(ranks.clamp(max=s2.shape[-1]).max())


def factored_params(gates: int, rows: int, cols: int, rank: int, *, diag: bool, tied: bool) -> int:
    """Parameter count of the factored weight: G m d + (1 or G) d n (+ G m)."""
    return gates * rows * rank + (1 if tied else gates) * rank * cols + (gates * rows if diag else 0)


def choose_method(shape: tuple[int, ...], rank: int, method: str = "auto") -> str:
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    if method != "auto":
        return method
    k = min(shape[-2:])
    return "randomized" if k >= RANDOMIZED_MIN_DIM and rank <= k // 4 else "exact"


def randomized_svd(
    A: Tensor, rank: int, *, oversample: int = 10, niter: int = 4, seed: int = 0, init: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Halko-Martinsson-Tropp range finder with QR-stabilised power iterations.

    Returns ``U[..., :rank], S[..., :rank], Vh[..., :rank, :]`` and the ``(..., n, p)`` right basis,
    which a later call can pass as ``init`` to start from a nearby subspace (warm start).
    """
    return _randomized(_Operator(A, None, tied=False), rank, oversample=oversample, niter=niter,
                       seed=seed, init=init)


class _Operator:
    """``blocks(W) - diag(D)`` (stacked when tied), applied through products, never formed."""

    def __init__(self, W: Tensor, D: Tensor | None, *, tied: bool):
        self.W, self.D, self.tied = W, D, tied
        self.shape = tuple(_stack(W).shape) if tied else tuple(W.shape[-2:])

    def mm(self, X: Tensor) -> Tensor:  # A @ X
        Y = self.W @ X
        if self.D is not None:
            Y = Y - self.D.unsqueeze(-1) * X
        return Y.reshape(-1, Y.shape[-1]) if self.tied else Y

    def rmm(self, Y: Tensor) -> Tensor:  # A^T @ Y
        if self.tied:
            Y = Y.reshape(*self.W.shape[:-1], Y.shape[-1])
        Z = self.W.mT @ Y
        if self.D is not None:
            Z = Z - self.D.unsqueeze(-1) * Y
        return Z.sum(0) if self.tied else Z


def _randomized(op: _Operator, rank: int, *, oversample: int = 10, niter: int, seed: int,
                init: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, n = op.shape
    p = min(rank + oversample, m, n)
    if init is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        init = torch.randn(n, p, generator=gen, dtype=op.W.dtype).to(op.W.device)
    Q = torch.linalg.qr(op.mm(init)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(op.mm(torch.linalg.qr(op.rmm(Q)).Q)).Q
    Ub, S, Vh = torch.linalg.svd(op.rmm(Q).mT, full_matrices=False)
    U = Q @ Ub
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :], Vh.mT


def fit_low_rank(
    W: Tensor, rank: int, *, tied: bool = False, method: str = "auto", seed: int = 0, niter: int = 4
) -> Factors:
    """Best rank-``rank`` factors of every block (Eckart-Young), balanced split."""
    method = choose_method(_fit_shape(W, tied), rank, method)
    work = W.to(_work_dtype(W, method))
    factors, S, _ = _svd_fit(work, None, rank, tied=tied, method=method, seed=seed, niter=niter)
    out = factors.to(W.dtype)
    if method == "randomized" and out.L.dtype == factors.L.dtype:
        # L R is the projection of W onto its top subspace, so ||W - L R||^2 = ||W||^2 - sum S^2
        # exactly: no n x n rebuild needed (it costs as much as the fit's products).
        norm2 = frobenius(work) ** 2
        out.rel_error = math.sqrt(max(norm2 - float((S.double() ** 2).sum()), 0.0) / norm2) if norm2 else 0.0
    else:
        out.rel_error = relative_error(W, out.compose())
    return out


def fit_low_rank_plus_diagonal(
    W: Tensor,
    rank: int,
    *,
    tied: bool = False,
    method: str = "auto",
    max_iter: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    niter: int = 2,
) -> Factors:
    """Minimise ||W - L R - diag(D)||_F by alternating exact block minimisations.

    Starts from the SVD fit with D = diag of its residual ("diagonal fitted to the residual"),
    then alternates an SVD of W - diag(D) with D = diag(W - L R). Each half-step is the exact
    minimiser over its block, so the error never increases with exact SVD; with randomized SVD
    an increase stops the loop and the best iterate is kept. Stops when the relative
    improvement falls below ``tol`` or after ``max_iter`` iterations (default 50 with exact SVD,
    3 with randomized SVD, where each iteration costs two products with W and most of the gain
    comes first). The warm-started iterations refine the subspace, so the initial randomized
    fit needs fewer power iterations (``niter``) than a plain low-rank fit. ``errors[0]`` is the
    low-rank-only relative error, ``errors[1]`` the error after the first diagonal fit, then
    one entry per iteration.
    """
    m, n = W.shape[-2:]
    if m != n:
        raise ValueError(f"a diagonal needs square blocks, got {m}x{n}")
    method = choose_method(_fit_shape(W, tied), rank, method)
    if max_iter is None:
        max_iter = 3 if method == "randomized" else 50
    work = W.to(_work_dtype(W, method))
    fit = partial(_diagonal_step, _DiagonalProblem.of(work), rank, tied=tied, method=method, seed=seed)
    first = fit(None, None, niter)
    best, D, basis = first.factors, first.D, first.basis
    best.D = D
    errors = [first.error_low_rank, first.error]
    for _ in range(max_iter):
        if errors[-1] == 0.0:
            break
        # Warm-started randomized steps need no power iteration: the subspace barely moves.
        step = fit(D, basis, 0)
        if step.error > errors[-1]:  # only possible with randomized SVD: keep the best iterate
            break
        best, D, basis = step.factors, step.D, step.basis
        best.D = D
        errors.append(step.error)
        if errors[-2] - step.error <= tol * errors[-2]:
            break
    best.errors = errors
    best.method = method
    out = best.to(W.dtype)
    if method == "randomized" and out.L.dtype == best.L.dtype:
        out.rel_error = errors[-1]  # exact for these factors (projection identity), no rebuild
    else:
        out.rel_error = relative_error(W, out.compose())
    return out


class _DiagonalProblem(NamedTuple):
    W: Tensor  # (G, n, n) in the working dtype
    W_diag: Tensor  # (G, n)
    off_diag2: float  # squared Frobenius norm of W off its diagonals, float64
    norm: float  # ||W||_F

    @classmethod
    def of(cls, W: Tensor) -> "_DiagonalProblem":
        W_diag = torch.diagonal(W, dim1=-2, dim2=-1)
        total2 = frobenius(W) ** 2
        diag2 = float((W_diag.double() ** 2).sum())
        return cls(W, W_diag, total2 - diag2, math.sqrt(total2) or 1.0)


class _DiagonalStep(NamedTuple):
    factors: Factors  # low-rank part fitted to W - diag(D_old)
    D: Tensor  # the diagonal refitted to W - L R
    error_low_rank: float  # relative ||W - diag(D_old) - L R||
    error: float  # relative ||W - L R - diag(D)||
    basis: Tensor | None  # randomized-SVD subspace, to warm-start the next step


def _diagonal_step(p: _DiagonalProblem, rank: int, D_old: Tensor | None, init: Tensor | None, niter: int, *,
                   tied: bool, method: str, seed: int) -> _DiagonalStep:
    """One alternation: L R = best rank-``rank`` fit of W - diag(D_old), then D = diag(W - L R)."""
    factors, S, basis = _svd_fit(p.W, D_old, rank, tied=tied, method=method, seed=seed, niter=niter, init=init)
    shifted = p.W_diag if D_old is None else p.W_diag - D_old
    gap = shifted - _diagonal_of_product(factors)  # the residual's diagonal
    if method == "randomized":
        # L R projects A = W - diag(D_old) onto its top subspace: ||A - L R||^2 = ||A||^2 - sum S^2,
        # which saves forming A - L R (a full n x n product) at every step.
        err2 = max(p.off_diag2 + float((shifted.double() ** 2).sum()) - float((S.double() ** 2).sum()), 0.0)
    else:
        A = p.W if D_old is None else p.W - torch.diag_embed(D_old)
        err2 = frobenius(A - factors.compose()) ** 2
    # Refitting the diagonal removes exactly the residual's diagonal energy.
    refit2 = max(err2 - float((gap.double() ** 2).sum()), 0.0)
    D = gap if D_old is None else gap + D_old
    return _DiagonalStep(factors, D, math.sqrt(err2) / p.norm, math.sqrt(refit2) / p.norm, basis)


def _diagonal_of_product(f: Factors) -> Tensor:
    """diag(L R) per block in O(n d), without forming L R."""
    return (f.L * f.R.mT).sum(-1)


def _svd_fit(
    W: Tensor, D: Tensor | None, rank: int, *, tied: bool, method: str, seed: int, niter: int,
    init: Tensor | None = None,
) -> tuple[Factors, Tensor, Tensor | None]:
    """Rank-``rank`` SVD of blocks(W) - diag(D); returns factors, kept singular values, basis."""
    G, m, _ = W.shape
    basis = None
    if method == "randomized":
        U, S, Vh, basis = _randomized(_Operator(W, D, tied=tied), rank, niter=niter, seed=seed, init=init)
    else:
        A = W if D is None else W - torch.diag_embed(D)
        U, S, Vh = torch.linalg.svd(_stack(A) if tied else A, full_matrices=False)
        U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    root = S.sqrt()
    L = U * root.unsqueeze(-2)
    R = root.unsqueeze(-1) * Vh
    if tied:
        L = L.reshape(G, m, rank)
    return Factors(L, R, method=method), S, basis


def _stack(W: Tensor) -> Tensor:
    return W.reshape(-1, W.shape[-1])


def _fit_shape(W: Tensor, tied: bool) -> tuple[int, int]:
    return tuple(_stack(W).shape) if tied else tuple(W.shape[-2:])


def _work_dtype(A: Tensor, method: str) -> torch.dtype:
    if A.dtype == torch.float64:
        return torch.float64
    if method == "exact" and min(A.shape[-2:]) <= FLOAT64_MAX_DIM:
        return torch.float64
    return torch.float32


def fraction_rank(fraction: float, full_rank: int) -> int:
    """Rank for a fraction of full rank, rounded up so at least that fraction is kept."""
    return max(1, math.ceil(fraction * full_rank - 1e-9))
