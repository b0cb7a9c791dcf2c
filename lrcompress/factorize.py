"""Pure maths: truncated and randomized SVD, low-rank (+ diagonal) fits, rank rules.

Every function takes a batch of matrices ``W`` of shape ``(G, m, n)`` (G gate blocks of a
recurrent weight, 1 for a Linear) and touches no ``nn.Module``. Factors use the balanced split
``L = U sqrt(S)``, ``R = sqrt(S) V^T`` so neither factor dominates the other's scale. With
``tied=True`` the G blocks share one ``R`` of shape ``(d, n)``: the stacked ``(G m, n)`` matrix
is factored, which is the exact optimum for a shared projection.

Given the second moment ``C`` of the vectors a weight multiplies (``lrcompress.calibration``),
the fits minimise the weighted error ``||(W - W_hat) S||_F``, ``S S^T = C`` instead: the error of
the weight's output on the calibration data (``lrcompress.whitening``; docs/calibration.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from .whitening import Whitening, as_whitening, weighted_diagonal_update, weighted_error

# Exact SVD is used below this smallest dimension; above it (and for ranks well below full)
# randomized SVD is ~40x faster on a 4096 x 4096 matrix for a Frobenius error within ~1%.
RANDOMIZED_MIN_DIM = 1024
# Exact SVD runs in float64 up to this size: cheap there, and it makes float32 factors exact
# to the last bit of the cast.
FLOAT64_MAX_DIM = 1024
SVD_METHODS = ("auto", "exact", "randomized")
# The projection identity ||W - L R||^2 = ||W||^2 - sum S^2 subtracts two nearly equal numbers
# when the fit is close: float32 singular values leave ~1e-6 relative noise in sum S^2, so a
# relative error below ~1e-3 is noise. Below this floor the error is measured by a rebuild.
CANCELLATION_FLOOR = 3e-2
# How a low-rank-plus-diagonal fit ended: its relative improvement fell to ``tol`` or below; it
# ran ``max_iter`` iterations; a randomized step from the best iterate did not improve it; the
# error reached zero.
DIAG_STOPS = ("converged", "max_iter", "stalled", "exact")
# Diagonal-fit defaults (fit_low_rank_plus_diagonal): stop once an iteration improves the error
# by 0.1% or less; the caps bound the cost where convergence is slow (docs/benchmarks.md).
DIAG_TOL = 1e-3
DIAG_MAX_ITER = {"exact": 50, "randomized": 20}


@dataclass
class Factors:
    """Fitted factors of a (G, m, n) weight and their relative Frobenius error.

    A low-rank-plus-diagonal fit also says how its iterations ended: ``diag_iterations`` (the
    iterations after the first diagonal fit), ``diag_last_change`` (the relative error decrease
    of the last one; None when none ran) and ``diag_stop`` (one of ``DIAG_STOPS``); other fits
    leave them empty. A fit to calibration data (``C`` given) also records ``weighted_error``,
    the relative error of the weight's output on that data (``whitening.weighted_error``), and
    ``damping``, the most its whitening added to ``C``'s eigenvalues (absolute: the relative ridge
    ``damping x mean(diag C)`` plus the rank-deficiency floor where it raised any; 0.0: the exact
    weighted fit, ``whitening.Whitening.damping``); ``rel_error`` stays the plain weight error.
    """

    L: Tensor  # (G, m, d)
    R: Tensor  # (G, d, n), or (d, n) when tied
    D: Tensor | None = None  # (G, m) diagonal, square blocks only
    rel_error: float = float("nan")
    errors: list[float] = field(default_factory=list)  # per diagonal-fit iteration
    method: str = "exact"
    diag_iterations: int | None = None
    diag_last_change: float | None = None
    diag_stop: str = ""
    weighted_error: float | None = None
    damping: float | None = None

    def compose(self) -> Tensor:
        return compose(self.L, self.R, self.D)

    def to(self, dtype: torch.dtype) -> "Factors":
        D = None if self.D is None else self.D.to(dtype)
        return replace(self, L=self.L.to(dtype), R=self.R.to(dtype), D=D)


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


def weighted_spectrum(blocks: Tensor, C: Tensor | Whitening | None = None, *, tied: bool = False,
                      damping: float | None = None) -> Tensor:
    """Singular values of ``W S`` per block, (G, k) (one row for the stacked matrix when ``tied``).

    Their discarded squares sum to the optimal squared weighted error at each rank (the whitened
    fit reaches it), so a budget can compare ranks across targets. ``C=None``: ``spectrum``.
    """
    if C is None:
        return spectrum(blocks, tied=tied)
    white = as_whitening(C, damping)
    A = _stack(blocks) if tied else blocks
    A = A.to(_work_dtype(A, "exact"))
    return torch.linalg.svdvals(A @ white.S.to(A.device, A.dtype))


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
    W: Tensor, rank: int, *, tied: bool = False, method: str = "auto", seed: int = 0, niter: int = 4,
    C: Tensor | Whitening | None = None, damping: float | None = None,
) -> Factors:
    """Best rank-``rank`` factors of every block (Eckart-Young), balanced split.

    With ``C`` (``n x n`` second moment of the vectors ``W`` multiplies, or its ``Whitening``),
    the factors minimise ``||(W - L R) S||_F`` with ``S S^T = C`` (damped as ``whitening`` says).
    The exact optimum, with no inverse of ``S``: any rank-``d`` ``X`` makes ``X S`` of rank
    ``d``, so the error is at least the Eckart-Young error of ``W S`` (the root of its discarded
    squared singular values); ``X = U_d U_d^T W`` (``U_d`` the top left singular vectors of
    ``W S``) reaches it, since ``X S = U_d U_d^T W S`` is the truncated SVD of ``W S``. Hence
    ``L R = U_d (U_d^T W)``, split in balance by the small SVD of ``U_d^T W``. Tied blocks: the
    same on the stacked matrix (the blocks share their input). ``C = I`` gives the plain fit.
    """
    method = choose_method(_fit_shape(W, tied), rank, method)
    if C is not None:
        return _weighted_low_rank(W, rank, as_whitening(C, damping), tied=tied, method=method, seed=seed,
                                  niter=niter)
    work = W.to(_work_dtype(W, method))
    factors, S, _ = _svd_fit(work, None, rank, tied=tied, method=method, seed=seed, niter=niter)
    out = factors.to(W.dtype)
    if method == "randomized" and out.L.dtype == factors.L.dtype:
        # L R is the projection of W onto its top subspace, so ||W - L R||^2 = ||W||^2 - sum S^2
        # exactly: no n x n rebuild needed (it costs as much as the fit's products).
        norm2 = frobenius(work) ** 2
        out.rel_error = math.sqrt(max(norm2 - float((S.double() ** 2).sum()), 0.0) / norm2) if norm2 else 0.0
    if not (method == "randomized" and out.L.dtype == factors.L.dtype) or out.rel_error < CANCELLATION_FLOOR:
        out.rel_error = relative_error(W, out.compose())
    return out


def _weighted_low_rank(W: Tensor, rank: int, white: Whitening, *, tied: bool, method: str, seed: int,
                       niter: int) -> Factors:
    work = W.to(_work_dtype(W, method))
    U, _, _, _ = _svd_parts(work @ white.S.to(work.device, work.dtype), None, rank, tied=tied, method=method,
                            seed=seed, niter=niter)
    A = _stack(work) if tied else work
    out = _balanced(U, U.mT @ A, W.shape[0], tied=tied)
    out.method = method
    return _with_errors(W, out.to(W.dtype), white)


def _with_errors(W: Tensor, out: Factors, white: Whitening) -> Factors:
    """Set the plain and the weighted error of a data-aware fit, both by a rebuild."""
    W_hat = out.compose()
    out.rel_error = relative_error(W, W_hat)
    out.weighted_error, out.damping = weighted_error(W, W_hat, white), white.damping
    return out


def _balanced(U: Tensor, R: Tensor, gates: int, *, tied: bool, D: Tensor | None = None) -> Factors:
    """Balanced factors of ``U R`` (``U`` orthonormal): the small SVD of ``R`` rebalances the split
    in O(d^2 n), with no product with ``W``."""
    Ub, Sb, Vbh = torch.linalg.svd(R, full_matrices=False)
    root = Sb.sqrt()
    L = (U @ Ub) * root.unsqueeze(-2)
    R = root.unsqueeze(-1) * Vbh
    # Contiguous, as a loaded file's factors are: products then round alike (bit-identical reloads).
    return Factors((L.reshape(gates, -1, L.shape[-1]) if tied else L).contiguous(), R.contiguous(), D)


def fit_low_rank_plus_diagonal(
    W: Tensor,
    rank: int,
    *,
    tied: bool = False,
    method: str = "auto",
    max_iter: int | None = None,
    tol: float = DIAG_TOL,
    seed: int = 0,
    niter: int = 2,
    C: Tensor | Whitening | None = None,
    damping: float | None = None,
) -> Factors:
    """Minimise ||W - L R - diag(D)||_F by alternating exact block minimisations.

    Each iteration takes the best rank-``rank`` left subspace ``U`` of ``A = W - diag(D)`` (its
    SVD), then the exact joint minimiser over D and ``R = U^T (W - diag(D))`` for that ``U``. That
    is a least-squares problem per column j: ``D_j += gap_j / (1 - ||U_j||^2)``, where ``gap`` is
    the residual's diagonal (with ``tied``, one G x G system per column, as the G blocks share the
    column). The textbook alternation ``D = diag(W - L R)`` takes the same step without the
    ``1 / (1 - ||U_j||^2)`` factor; on a strong diagonal it creeps (measured on 512-unit GRU
    blocks: after 60 iterations 19-120% above this fit's converged error; docs/benchmarks.md).
    The first iteration tries ``D = diag(W)`` (a low-rank part with a zero diagonal): the first
    SVD takes part of a strong diagonal into its subspace. Both half-steps are exact
    minimisations, so with exact SVD the error never increases.

    Acceleration (monotone-safeguarded extrapolation, as in accelerated alternating least squares):
    the next iteration starts from ``D + w delta`` with ``w`` growing 1.5x (up to ``8``) while the
    error keeps falling; when an iterate is no better than the best one, the fit returns to the
    best iterate with ``w = 1``. Every iterate's error is exact for its factors, and the best
    iterate is returned.

    Stops when an iteration improves the error by at most ``tol`` (relative: ``diag_stop =
    "converged"``), after ``max_iter`` iterations (default 50 with exact SVD, 20 with randomized
    SVD: ``"max_iter"``), when a step from the best iterate does not improve it (randomized
    SVD, or round-off: ``"stalled"``) or at zero error (``"exact"``). Randomized iterations are warm-started from the
    previous subspace without power iterations (two products with W each), so the initial fit
    needs fewer power iterations (``niter``) than a plain low-rank fit. ``errors[0]`` is the
    low-rank-only relative error, ``errors[1]`` the error after the first diagonal fit, then the
    best error after each iteration (non-increasing).

    With ``C`` (the ``n x n`` second moment of the vectors ``W`` multiplies, or its
    ``Whitening``) the same alternation minimises the weighted error ``||(W - L R - diag(D)) S||_F``,
    ``S S^T = C`` (damped): ``U`` from the SVD of ``(W - diag(D)) S``, ``R = U^T (W - diag(D))``
    (optimal under any weighting), and the diagonal from one ``n x n`` linear system per block
    (``whitening.weighted_diagonal_update``; for a fixed ``L R`` alone it reduces to the closed
    form ``D_i = (E C)_ii / C_ii`` per row, ``E = W - L R``). ``errors`` are then weighted errors,
    and ``weighted_error`` records the final one under the undamped ``C``. With ``C = I`` the
    iterates are this fit's own.

    Raises ``ValueError`` for non-square blocks.
    """
    m, n = W.shape[-2:]
    if m != n:
        raise ValueError(f"a diagonal needs square blocks, got {m}x{n}")
    method = choose_method(_fit_shape(W, tied), rank, method)
    if max_iter is None:
        max_iter = DIAG_MAX_ITER[method]
    work = W.to(_work_dtype(W, method))
    white = None if C is None else as_whitening(C, damping)
    problem = _DiagonalProblem.of(work) if white is None else _WeightedProblem.of(work, white)
    step = partial(problem.step, rank, tied=tied, method=method, seed=seed)
    best = step(None, None, niter)
    errors = [best.error_low_rank, best.error]
    # First trial: D = diag(W), i.e. a low-rank part with a zero diagonal. The first SVD fit takes
    # part of a strong diagonal into its subspace, and the iterations then take long to give it
    # back; low-rank parts of trained weights have small diagonals. Treated as an extrapolation:
    # when it is no better, the fit goes on from the first fit's own diagonal.
    D_next, basis, weight, extrapolated = _diagonal_of(work).clone(), best.basis, 1.0, True
    iterations, change, stop = 0, None, "max_iter"
    while True:
        if errors[-1] == 0.0:
            stop = "exact"
            break
        if iterations >= max_iter:
            break
        iterations += 1
        # Warm-started randomized steps need no power iteration: the subspace barely moves.
        trial = step(D_next, basis, 0)
        if trial.error <= best.error:
            change = (best.error - trial.error) / best.error
            best, basis = trial, trial.basis
            errors.append(best.error)
            if change <= tol:
                stop = "converged"
                break
            # Extrapolate along the step just taken, D_in + w delta: past the exact minimiser for
            # the current subspace, which lags behind as the subspace rotates with D.
            D_next, extrapolated = trial.D + (weight - 1.0) * trial.delta, weight > 1.0
            weight = min(1.5 * weight, 8.0)
        else:  # an extrapolation overshot, or (randomized SVD only) a plain step did not help
            change = 0.0
            errors.append(best.error)
            if not extrapolated:
                stop = "stalled"
                break
            D_next, basis, weight, extrapolated = best.D, best.basis, 1.0, False
    factors = best.factors(tied=tied)
    factors.errors, factors.method = errors, method
    factors.diag_iterations, factors.diag_last_change, factors.diag_stop = iterations, change, stop
    out = factors.to(W.dtype)
    if white is not None:
        return _with_errors(W, out, white)
    if method == "randomized" and out.L.dtype == factors.L.dtype and errors[-1] >= CANCELLATION_FLOOR:
        out.rel_error = errors[-1]  # exact for these factors (projection identity), no rebuild
    else:
        out.rel_error = relative_error(W, out.compose())
    return out


def _diagonal_of(W: Tensor) -> Tensor:
    return torch.diagonal(W, dim1=-2, dim2=-1)


class _DiagonalProblem(NamedTuple):
    W: Tensor  # (G, n, n) in the working dtype
    W_diag: Tensor  # (G, n)
    off_diag2: float  # squared Frobenius norm of W off its diagonals, float64
    norm: float  # ||W||_F

    @classmethod
    def of(cls, W: Tensor) -> "_DiagonalProblem":
        W_diag = _diagonal_of(W)
        total2 = frobenius(W) ** 2
        diag2 = float((W_diag.double() ** 2).sum())
        return cls(W, W_diag, total2 - diag2, math.sqrt(total2) or 1.0)

    def step(self, rank: int, D_in: Tensor | None, init: Tensor | None, niter: int, *, tied: bool, method: str,
             seed: int) -> "_DiagonalStep":
        return _diagonal_step(self, rank, D_in, init, niter, tied=tied, method=method, seed=seed)


class _DiagonalStep(NamedTuple):
    """One iteration: the SVD of W - diag(D_in), then D = D_in + delta with R refitted on U."""

    U: Tensor  # (G, n, d) orthonormal left basis; (G n, d) when tied
    UtA: Tensor  # U^T (W - diag(D_in)): (G, d, n) or (d, n)
    D: Tensor  # (G, n) the new diagonal, D_in + delta
    delta: Tensor  # (G, n)
    error_low_rank: float  # relative ||W - diag(D_in) - U S Vh||
    error: float  # relative ||W - diag(D) - U U^T (W - diag(D))||
    basis: Tensor | None  # randomized-SVD subspace, to warm-start the next step

    def factors(self, *, tied: bool) -> Factors:
        """Balanced factors of ``U R`` with ``R = U^T (W - diag(D)) = U^T (W - diag(D_in)) - U^T diag(delta)``."""
        G, n = self.D.shape
        if tied:
            shift = torch.einsum("gjk,gj->kj", self.U.reshape(G, n, -1), self.delta)
        else:
            shift = self.U.mT * self.delta.unsqueeze(-2)
        return _balanced(self.U, self.UtA - shift, G, tied=tied, D=self.D)


def _diagonal_step(p: _DiagonalProblem, rank: int, D_in: Tensor | None, init: Tensor | None, niter: int, *,
                   tied: bool, method: str, seed: int) -> _DiagonalStep:
    """U S Vh = best rank-``rank`` fit of W - diag(D_in); then the best D and R for that U."""
    U, S, Vh, basis = _svd_parts(p.W, D_in, rank, tied=tied, method=method, seed=seed, niter=niter, init=init)
    G, n = p.W_diag.shape
    shifted = p.W_diag if D_in is None else p.W_diag - D_in
    SVh = S.unsqueeze(-1) * Vh
    gap = shifted - (U.reshape(G, n, -1) * SVh.mT).sum(-1)  # the residual's diagonal, in O(n d)
    if method == "randomized":
        # U S Vh projects A = W - diag(D_in) onto its top subspace: ||A - U S Vh||^2 = ||A||^2 - sum S^2,
        # which saves forming A - L R (a full n x n product) at every step.
        err2 = max(p.off_diag2 + float((shifted.double() ** 2).sum()) - float((S.double() ** 2).sum()), 0.0)
    else:
        A = p.W if D_in is None else p.W - torch.diag_embed(D_in)
        err2 = frobenius(A - (U @ SVh).reshape(A.shape)) ** 2
    delta, gain2 = _diagonal_update(U.reshape(G, n, -1), gap, tied=tied)
    D = delta if D_in is None else D_in + delta
    return _DiagonalStep(U, SVh, D, delta, math.sqrt(err2) / p.norm, math.sqrt(max(err2 - gain2, 0.0)) / p.norm,
                         basis)


class _WeightedProblem(NamedTuple):
    W: Tensor  # (G, n, n) in the working dtype
    S: Tensor  # (n, n) whitening factor, working dtype
    C: Tensor  # (n, n) damped moment S S^T, float64
    norm: float  # ||W S||_F

    @classmethod
    def of(cls, W: Tensor, white: Whitening) -> "_WeightedProblem":
        S = white.S.to(W.device, W.dtype)
        return cls(W, S, white.damped().to(W.device), frobenius(W @ S) or 1.0)

    def step(self, rank: int, D_in: Tensor | None, init: Tensor | None, niter: int, *, tied: bool, method: str,
             seed: int) -> _DiagonalStep:
        """U from the SVD of (W - diag(D_in)) S; then the best D and R for that U, weighted."""
        G, n, _ = self.W.shape
        A = self.W if D_in is None else self.W - torch.diag_embed(D_in)
        B = A @ self.S
        U, _, _, basis = _svd_parts(B, None, rank, tied=tied, method=method, seed=seed, niter=niter, init=init)
        A2, B2 = (_stack(A), _stack(B)) if tied else (A, B)
        UtA = U.mT @ A2
        err2 = frobenius(B2 - U @ (U.mT @ B2)) ** 2  # ||(A - U U^T A) S||^2, no cancellation
        residual = (A2 - U @ UtA).reshape(G, n, n)
        delta, gain2 = weighted_diagonal_update(U, residual, self.C, tied=tied)
        D = delta if D_in is None else D_in + delta
        return _DiagonalStep(U, UtA, D, delta, math.sqrt(err2) / self.norm,
                             math.sqrt(max(err2 - gain2, 0.0)) / self.norm, basis)


def _diagonal_update(U: Tensor, gap: Tensor, *, tied: bool, floor: float = 1e-3) -> tuple[Tensor, float]:
    """Best diagonal change for a fixed left basis U (G, n, d), and the squared error it removes.

    With ``P = U U^T`` and R refitted, column j of the residual is ``(I - P)(a_j - delta_j e_j)``,
    so ``delta_j = gap_j / q_j`` with ``q_j = ||(I - P) e_j||^2 = 1 - ||U_j||^2``, removing
    ``gap_j^2 / q_j``. Tied blocks share the column: a G x G system ``M delta = gap`` with
    ``M_gh = [g = h] - <U_gj, U_hj>``. ``floor`` keeps the step finite where e_j nearly lies in
    the subspace (gap_j is then ~0 too); the removed energy ``2 delta.gap - delta^T M delta`` is
    exact for the step taken, which stays a descent step.
    """
    if not tied:
        q = 1.0 - (U * U).sum(-1)
        delta = gap / q.clamp_min(floor)
        gain2 = float((delta.double() * (2 * gap.double() - delta.double() * q.double())).sum())
        return delta, gain2
    G = U.shape[0]
    eye = torch.eye(G, dtype=U.dtype, device=U.device)
    M = eye - torch.einsum("gjk,hjk->jgh", U, U)  # (n, G, G)
    b = gap.mT.unsqueeze(-1)  # (n, G, 1)
    x = torch.linalg.solve(M + floor * eye, b)
    gain2 = float((2 * (x * b).sum() - (x.mT @ M @ x).sum()).double())
    return x.squeeze(-1).mT, gain2


def _svd_fit(
    W: Tensor, D: Tensor | None, rank: int, *, tied: bool, method: str, seed: int, niter: int,
    init: Tensor | None = None,
) -> tuple[Factors, Tensor, Tensor | None]:
    """Rank-``rank`` SVD of blocks(W) - diag(D); returns balanced factors, kept singular values, basis."""
    G, m, _ = W.shape
    U, S, Vh, basis = _svd_parts(W, D, rank, tied=tied, method=method, seed=seed, niter=niter, init=init)
    root = S.sqrt()
    L = U * root.unsqueeze(-2)
    R = root.unsqueeze(-1) * Vh
    if tied:
        L = L.reshape(G, m, rank)
    return Factors(L, R, method=method), S, basis


def _svd_parts(
    W: Tensor, D: Tensor | None, rank: int, *, tied: bool, method: str, seed: int, niter: int,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """U (G, m, d) or (G m, d) tied, S, Vh of the rank-``rank`` SVD of blocks(W) - diag(D), and the basis."""
    if method == "randomized":
        return _randomized(_Operator(W, D, tied=tied), rank, niter=niter, seed=seed, init=init)
    A = W if D is None else W - torch.diag_embed(D)
    U, S, Vh = torch.linalg.svd(_stack(A) if tied else A, full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :], None


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
