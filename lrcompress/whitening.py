"""Pure maths for data-aware fits: whitening a second moment, weighted errors, weighted diagonals.

A target weight ``W`` (``m x n``) multiplies vectors ``v`` whose second moment over calibration
data is ``C = E[v v^T]`` (``n x n``, see ``lrcompress.calibration``). Its output error over that
data is, for any approximation ``W_hat``,

    E ||(W - W_hat) v||^2 = tr((W - W_hat) C (W - W_hat)^T) = ||(W - W_hat) S||_F^2,  S S^T = C,

so the data-aware fits minimise the Frobenius norm after right-multiplying by a factor ``S`` of
``C`` (the "whitened" problem of SVD-LLM and DRONE). This module factors ``C`` and holds the
weighted-norm pieces; ``lrcompress.factorize`` uses them in its fits. It imports nothing of ours
but the error classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError, WeightError

# Eigenvalues of C below this fraction of the largest are raised to it (see ``whitening``).
DAMPING = 1e-8


@dataclass(frozen=True)
class Whitening:
    """A factor ``S`` (``n x n``, float64) with ``S S^T = C`` plus the damping rank-deficient data needs.

    ``S = Q diag(sqrt(lambda'))`` from the eigendecomposition ``C = Q diag(lambda) Q^T``, with
    ``lambda' = max(lambda, floor)``. ``floor`` is the absolute eigenvalue floor and ``floored``
    how many eigenvalues it raised (0 when ``C`` needed no damping: then ``S S^T = C`` up to
    round-off and every fit is the exact weighted optimum). ``C`` is the moment as given, which
    ``weighted_error`` uses.
    """

    C: Tensor  # (n, n) as given, float64
    S: Tensor  # (n, n)
    eigenvalues: Tensor  # (n,) of C, ascending
    basis: Tensor  # (n, n) eigenvectors Q
    floor: float
    floored: int

    @property
    def damping(self) -> float:
        """The eigenvalue floor actually applied (0.0 when ``C`` needed none)."""
        return self.floor if self.floored else 0.0

    def damped(self) -> Tensor:
        """``S S^T``: ``C`` with its small eigenvalues raised to the floor (n x n, float64)."""
        return self.S @ self.S.mT

    def unwhiten(self, Y: Tensor) -> Tensor:
        """``Y S^{-1}`` (maps a whitened ``W S`` back to ``W``); stable: ``S^{-1} = diag(lambda'^-1/2) Q^T``."""
        scale = self.eigenvalues.clamp_min(self.floor).rsqrt()
        return (Y * scale.to(Y.dtype)) @ self.basis.mT.to(Y.dtype)


def whitening(C: Tensor, *, damping: float | None = None) -> Whitening:
    """Factor a second moment ``C`` (``n x n``, symmetric positive semi-definite) as ``S S^T``.

    Eigenvalues below ``damping`` (default ``DAMPING = 1e-8``) times the largest -- the
    directions the data never (or barely) visits, and round-off below zero -- are raised to that
    floor, so ``S`` is invertible and every direction keeps a tiny weight. A ``C`` whose
    eigenvalues all lie above the floor is left exactly as it is (no ridge is added), so its fit
    is the exact weighted optimum. A zero ``C`` (no data reached the weight) becomes ``I``: the
    fit is then the plain one. Raises ``WeightError`` when ``C`` holds NaN or Inf,
    ``ConfigError`` for a non-square ``C`` or a damping outside [0, 1).

    >>> white = whitening(torch.diag(torch.tensor([4.0, 1.0, 0.0])))
    >>> white.floored, white.damping                      # the unvisited direction is floored
    (1, 4e-08)
    >>> torch.allclose(white.S @ white.S.mT, torch.diag(torch.tensor([4.0, 1.0, 4e-8], dtype=torch.float64)))
    True
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ConfigError(f"a second moment must be a square matrix, got shape {tuple(C.shape)}")
    if damping is None:
        damping = DAMPING
    if not 0.0 <= damping < 1.0:
        raise ConfigError(f"damping must be in [0, 1), got {damping!r}")
    C = C.to(torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise WeightError("second moment holds NaN or Inf (calibration data or activations not finite)")
    C = (C + C.mT) / 2  # exact symmetry: eigh reads one triangle
    eigenvalues, Q = torch.linalg.eigh(C)
    top = float(eigenvalues[-1]) if C.numel() else 0.0
    # Scale-free floor; a zero C has no scale, and any positive floor then gives the plain fit.
    floor = damping * top if top > 0 else 1.0
    floor = max(floor, torch.finfo(torch.float64).tiny)
    floored = int((eigenvalues < floor).sum())
    S = Q * eigenvalues.clamp_min(floor).sqrt()
    return Whitening(C, S, eigenvalues, Q, floor, floored)


def as_whitening(C: Tensor | Whitening, damping: float | None = None) -> Whitening:
    """``C`` itself when already a ``Whitening``, else ``whitening(C, damping=damping)``."""
    return C if isinstance(C, Whitening) else whitening(C, damping=damping)


def weighted_error(W: Tensor, W_hat: Tensor, C: Tensor | Whitening) -> float:
    """``||(W - W_hat) S||_F / ||W S||_F`` with ``S S^T = C``, in float64 (0/0 gives 0).

    ``W`` and ``W_hat``: ``(..., m, n)`` (gate blocks are rows of one output); ``C``: ``(n, n)``,
    the second moment of the vectors ``v`` the weight multiplies (undamped when a ``Whitening``
    is given). Since the layer computes ``W v``, this is the relative Frobenius error of the
    weight's output ``W v`` over the calibration data: ``sqrt(sum_v ||(W - W_hat) v||^2 /
    sum_v ||W v||^2)``. The bias is not part of it (it is kept exactly). Computed as
    ``tr(E C E^T)`` on the difference ``E`` itself, so a close fit loses no digits to cancellation.
    """
    C = (C.C if isinstance(C, Whitening) else C).to(torch.float64)
    W = W.to(torch.float64)
    E = W - W_hat.to(W.device, torch.float64)
    num = max(float(((E @ C) * E).sum()), 0.0)
    den = max(float(((W @ C) * W).sum()), 0.0)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def weighted_diagonal_update(U: Tensor, residual: Tensor, C: Tensor, *, tied: bool,
                             floor: float = 1e-3) -> tuple[Tensor, float]:
    """Best diagonal change under the weighted norm for a fixed left basis, and the error it removes.

    ``U``: ``(G, n, d)`` orthonormal left bases (tied: one ``(G n, d)`` basis of the stacked
    blocks); ``residual``: ``(I - U U^T)(W - diag(D_in))`` as ``(G, n, n)``; ``C``: the damped
    ``(n, n)`` moment. With R refitted (``R = U^T (W - diag(D))``, optimal for any weighting),
    the residual is ``M (A - diag(delta))`` with ``M = I - U U^T`` and its weighted square norm
    ``tr(E C E^T)`` is a quadratic in ``delta``: ``delta^T H delta - 2 b^T delta + const`` with

        H = C o M   (Hadamard product; tied: H[(g,j),(h,l)] = C_jl M[(g,j),(h,l)]),
        b_j = (residual C)_jj.

    ``H`` is positive semi-definite (Schur product theorem), so ``delta = H^{-1} b`` is the exact
    minimiser. With ``C = I``, ``H = diag(1 - ||U_j||^2)`` (tied: one ``G x G`` block per column)
    and this is ``factorize._diagonal_update`` exactly, floor included: untied, ``H_jj`` is raised
    to at least ``floor C_jj``; tied, ``floor C_jj`` is added. The removed energy
    ``2 delta.b - delta^T H delta`` is exact for the step taken, which stays a descent step.
    Solved in float64: an ``n x n`` system per block (``G n x G n`` when tied).
    """
    G, n = residual.shape[0], C.shape[0]
    C64 = C.to(torch.float64)
    b = (residual.to(torch.float64) * C64).sum(-1)  # (G, n): (residual C)_jj, C symmetric
    U64 = U.to(torch.float64)
    if not tied:
        H = C64 * (torch.eye(n, dtype=torch.float64, device=C.device) - U64 @ U64.mT)  # (G, n, n)
        Hr = H.clone()
        Hr.diagonal(dim1=-2, dim2=-1).copy_(torch.maximum(H.diagonal(dim1=-2, dim2=-1), floor * C64.diagonal()))
        delta = torch.linalg.solve(Hr, b.unsqueeze(-1)).squeeze(-1)
        gain2 = float(2 * (delta * b).sum() - (delta.unsqueeze(-2) @ H @ delta.unsqueeze(-1)).sum())
        return delta.to(residual.dtype), gain2
    M = torch.eye(G * n, dtype=torch.float64, device=C.device) - U64 @ U64.mT  # (G n, G n)
    H = M * C64.repeat(G, G)
    bb = b.reshape(-1)
    Hr = H + torch.diag_embed((floor * C64.diagonal()).repeat(G))
    x = torch.linalg.solve(Hr, bb)
    gain2 = float(2 * (x * bb).sum() - x @ H @ x)
    return x.reshape(G, n).to(residual.dtype), gain2
