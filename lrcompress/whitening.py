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
FLOOR = 1e-8
# The relative ridge ``compress`` applies by default with calibration data (docs/calibration.md
# gives the measurements it was chosen by); ``whitening`` itself defaults to none.
CALIBRATION_DAMPING = 0.01


@dataclass(frozen=True)
class Whitening:
    """A factor ``S`` (``n x n``, float64) with ``S S^T = C + ridge I``, floored where ``C`` is rank-deficient.

    ``S = Q diag(sqrt(lambda'))`` from the eigendecomposition ``C = Q diag(lambda) Q^T``, with
    ``lambda' = max(lambda + ridge, floor)``. ``ridge`` is the absolute ridge (``damping`` times
    ``mean(diag C)``), ``floor`` the absolute eigenvalue floor and ``floored`` how many
    eigenvalues it raised. With ``ridge == 0`` and ``floored == 0``, ``S S^T = C`` up to
    round-off and every fit is the exact weighted optimum. ``C`` is the moment as given, which
    ``weighted_error`` uses.
    """

    C: Tensor  # (n, n) as given, float64
    S: Tensor  # (n, n)
    eigenvalues: Tensor  # (n,) of C, ascending
    basis: Tensor  # (n, n) eigenvectors Q
    floor: float
    floored: int
    ridge: float = 0.0

    @property
    def damping(self) -> float:
        """What was added to ``C``'s eigenvalues at most: the ridge, plus the floor where it raised any (absolute)."""
        return self.ridge + (self.floor if self.floored else 0.0)

    def damped(self) -> Tensor:
        """``S S^T``: ``C`` plus the ridge, its small eigenvalues raised to the floor (n x n, float64)."""
        return self.S @ self.S.mT

    def unwhiten(self, Y: Tensor) -> Tensor:
        """``Y S^{-1}`` (maps a whitened ``W S`` back to ``W``); stable: ``S^{-1} = diag(lambda'^-1/2) Q^T``."""
        scale = (self.eigenvalues + self.ridge).clamp_min(self.floor).rsqrt()
        return (Y * scale.to(Y.dtype)) @ self.basis.mT.to(Y.dtype)


def whitening(C: Tensor, *, damping: float = 0.0, floor: float | None = None) -> Whitening:
    """Factor a damped second moment ``C + damping mean(diag C) I`` (``C``: ``n x n``, PSD) as ``S S^T``.

    ``damping`` (``lambda >= 0``, scale-free): a relative ridge. ``0`` fits the exact weighted
    optimum of the data; larger values trust the data less, and as ``lambda -> infinity`` the
    fit tends to the plain (unweighted) one, since ``S S^T / (lambda mean(diag C)) -> I``. Why a
    ridge helps (docs/calibration.md): a weighted fit spends no rank on directions the
    calibration data barely visits, and a recurrent weight's errors are fed back through the
    next step's state, which the one-step objective does not see (the damped fits of SVD-LLM
    and ASVD, the ridge of GPTQ's Hessian).

    After the ridge, eigenvalues below ``floor`` (default ``FLOOR = 1e-8``) times the largest
    -- the directions the data never visits, and round-off below zero -- are raised to that
    floor, so ``S`` is invertible and the problem has one answer. With ``damping=0`` a ``C``
    whose eigenvalues all lie above the floor is used exactly as it is. A zero ``C`` (no data
    reached the weight) becomes ``I``: the fit is then the plain one. Raises ``WeightError``
    when ``C`` holds NaN or Inf, ``ConfigError`` for a non-square ``C``, a ``damping`` that is
    negative or not finite, or a ``floor`` outside [0, 1).

    >>> white = whitening(torch.diag(torch.tensor([4.0, 1.0, 0.0])))
    >>> white.floored, white.damping                      # the unvisited direction is floored
    (1, 4e-08)
    >>> torch.allclose(white.S @ white.S.mT, torch.diag(torch.tensor([4.0, 1.0, 4e-8], dtype=torch.float64)))
    True
    >>> whitening(torch.diag(torch.tensor([4.0, 1.0, 1.0])), damping=0.5).damped().diagonal()  # + 0.5 * 2
    tensor([5.0000, 2.0000, 2.0000], dtype=torch.float64)
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ConfigError(f"a second moment must be a square matrix, got shape {tuple(C.shape)}")
    check_damping(damping)
    if floor is None:
        floor = FLOOR
    if not 0.0 <= floor < 1.0:
        raise ConfigError(f"eigenvalue floor must be in [0, 1), got {floor!r}")
    C = C.to(torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise WeightError("second moment holds NaN or Inf (calibration data or activations not finite)")
    C = (C + C.mT) / 2  # exact symmetry: eigh reads one triangle
    eigenvalues, Q = torch.linalg.eigh(C)
    n = C.shape[0]
    # Relative to the average eigenvalue (tr C / n = mean(diag C)): the same lambda means the
    # same trust in the data whatever the activations' scale.
    ridge = float(damping) * float(C.diagonal().sum()) / n if n and damping else 0.0
    top = float(eigenvalues[-1]) + ridge if C.numel() else 0.0
    # Scale-free floor; a zero C has no scale, and any positive floor then gives the plain fit.
    absolute = floor * top if top > 0 else 1.0
    absolute = max(absolute, torch.finfo(torch.float64).tiny)
    floored = int((eigenvalues + ridge < absolute).sum())
    S = Q * (eigenvalues + ridge).clamp_min(absolute).sqrt()
    return Whitening(C, S, eigenvalues, Q, absolute, floored, ridge)


def check_damping(damping: float, where: str = "damping") -> float:
    """``damping`` itself when it is a number ``>= 0`` (finite); else ``ConfigError`` naming it."""
    if (isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping)
            or damping < 0):
        raise ConfigError(f"{where} must be a finite number >= 0 (a relative ridge; 0: none), got {damping!r}")
    return float(damping)


def as_whitening(C: Tensor | Whitening, damping: float | None = None) -> Whitening:
    """``C`` itself when already a ``Whitening``, else ``whitening(C, damping=damping)`` (None: 0)."""
    return C if isinstance(C, Whitening) else whitening(C, damping=damping or 0.0)


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
