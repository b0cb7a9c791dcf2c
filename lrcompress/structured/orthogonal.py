"""Scaled Cayley orthogonal weights (scoRNN) as a ``torch.nn.utils.parametrize`` parametrization.

A weight of ``gates`` stacked ``n x n`` blocks; every block is its own orthogonal matrix
(Helfrich, Willmott and Ye, "Orthogonal Recurrent Neural Networks with Scaled Cayley Transform",
ICML 2018, eq. 3)::

    W_g = (I + A_g)^{-1} (I - A_g) D_g,      A_g skew-symmetric,  D_g = diag(+-1)

``A_g`` is stored as its strict upper triangle, ``original0`` of shape ``(gates, n(n-1)/2)``
(row-major, ``torch.triu_indices(n, n, 1)`` order), so every value of it is a free parameter and
``A`` is skew by construction. ``D`` is fixed, not trained: the persistent buffer ``signs``
``(gates, n)`` of the parametrization module, saved in a state dict as
``parametrizations.<name>.0.signs``. The Cayley transform alone never has the eigenvalue -1
(``(I + A)^{-1}(I - A) x = -x`` would need ``2x = 0``); the ``-1`` entries of ``D`` make every
orthogonal matrix reachable (the paper's Theorem 3.2).

Fit (``right_inverse``) from a trained ``W`` -- three steps per gate block:

1. ``Q = U V^T`` from the SVD ``W = U S V^T``: the polar factor, the orthogonal matrix nearest to
   ``W`` in the Frobenius norm (Fan and Hoffman 1955); ``||W - Q||_F^2 = sum_i (s_i - 1)^2``
   (``polar_error``). ``Q = W`` when ``W`` is orthogonal.
2. ``D`` such that ``I + Q D`` is invertible (``cayley_signs``). Gaussian elimination of
   ``I + Q D`` without pivoting, choosing each sign when its column is reached: the pivot of
   column ``k`` is ``1 + d_k c_k`` (``c_k`` the reduced diagonal entry of ``Q``, the identity part
   being untouched by the row operations), so ``d_k = sign(c_k)`` makes it ``1 + |c_k| >= 1`` and
   ``|det(I + Q D)|``, the product of the pivots, is at least 1: always invertible. Then a local
   search (Kahan 2006; O'Dorney, "Minimizing the Cayley transform of an orthogonal matrix by
   multiplying by signature matrices", 2014): flipping ``d_j, d_k`` multiplies ``|det(I + Q D)|``
   by ``a_jk^2`` (``A`` the Cayley transform of ``Q D``; by the matrix determinant lemma), so while
   some ``|a_jk| > 1`` that pair is flipped. ``|det|`` grows strictly over finitely many sign
   choices, so this ends, with every ``|a_jk| <= 1``: a small ``A``, and
   ``cond(I + Q D) = cond(I + A) = sqrt(1 + ||A||_2^2) <= sqrt(1 + (n-1)^2)``.
   A single flip would make ``I + Q D`` singular (the factor is ``a_kk = 0``), which is why pairs.
3. ``A = (I + Q D)^{-1} (I - Q D)``: the Cayley transform is its own inverse, so
   ``(I + A)^{-1}(I - A) = Q D`` and ``W_hat = Q D D = Q``; ``A`` is skew because ``Q D`` is
   orthogonal (rounding is removed by keeping ``(A - A^T)/2``).

Each block is then exactly orthogonal (to rounding), whatever ``W`` was; the relative error of the
fit is ``||W - Q||_F / ||W||_F`` (``polar_error``, 0 for an orthogonal ``W``).

``apply`` multiplies ``x W^T = (x D)(I + A)(I - A)^{-1}`` by one linear solve per gate (``W`` is
``n x n`` anyway: no saving over forming it, only no explicit inverse).

    >>> rnn = torch.nn.RNN(8, 16)
    >>> scaled_cayley(rnn, "weight_hh_l0")  # doctest: +ELLIPSIS
    ParametrizedRNN(...)
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import registrable_weight
from ..errors import ConfigError, WeightError
from ..parametrizations import own_class

# Columns per panel of the blocked sign-choosing elimination (step 2): the sequential part costs
# O(n^2 * PANEL), the rest is matrix products.
PANEL = 64
# The local search flips a pair only when |a_jk| exceeds 1 by this much, so rounding can never
# make it cycle; each flip multiplies |det(I + QD)| by at least (1 + tol)^2.
FLIP_TOL = 1e-9


def skew(a: Tensor, n: int) -> Tensor:
    """The skew-symmetric ``(..., n, n)`` matrices whose strict upper triangles are ``a`` ``(..., n(n-1)/2)``
    (row-major, ``torch.triu_indices(n, n, 1)`` order). Differentiable in ``a``."""
    i, j = torch.triu_indices(n, n, 1, device=a.device)
    upper = a.new_zeros(*a.shape[:-1], n, n)
    upper[..., i, j] = a
    return upper - upper.mT


def triangle(A: Tensor) -> Tensor:
    """The strict upper triangle ``(..., n(n-1)/2)`` of square matrices ``A`` ``(..., n, n)``, inverse of ``skew``."""
    n = A.shape[-1]
    i, j = torch.triu_indices(n, n, 1, device=A.device)
    return A[..., i, j]


def cayley(A: Tensor, signs: Tensor) -> Tensor:
    """``(I + A)^{-1} (I - A) D`` for skew ``A`` ``(..., n, n)`` and ``D = diag(signs)`` ``(..., n)``.

    ``I + A`` is always invertible for skew ``A`` (its eigenvalues are ``1 + i lambda``), with
    smallest singular value at least 1, so the solve is well conditioned.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye + A, eye - A) * signs.unsqueeze(-2)


def nearest_orthogonal(W: Tensor) -> Tensor:
    """The polar factor ``U V^T`` of square matrices ``W`` ``(..., n, n)`` (``W = U S V^T``): the
    orthogonal matrix nearest to ``W`` in the Frobenius norm (Fan and Hoffman 1955)."""
    U, _, Vh = torch.linalg.svd(W)
    return U @ Vh


def polar_error(W: Tensor, gates: int = 1) -> Tensor:
    """Per gate block, ``||W_g - Q_g||_F / ||W_g||_F`` with ``Q_g`` the nearest orthogonal matrix:
    the relative error of the scaled Cayley fit, ``(gates,)`` float64.

    From the singular values alone: ``||W - U V^T||_F^2 = sum_i (s_i - 1)^2``. A zero block gives
    ``inf`` (every orthogonal matrix is at distance ``sqrt(n)``). ``W`` is ``(gates*n, n)``.
    """
    if W.dim() != 2 or W.shape[0] != gates * W.shape[1]:
        raise ConfigError(f"weight of shape {tuple(W.shape)} is not {gates} square block(s)")
    s = torch.linalg.svdvals(W.detach().double().reshape(gates, W.shape[1], W.shape[1]))
    return ((s - 1) ** 2).sum(-1).sqrt() / (s ** 2).sum(-1).sqrt()


def cayley_signs(Q: Tensor, *, max_flips: int | None = None) -> Tensor:
    """Signs ``d`` ``(..., n)`` with ``I + Q diag(d)`` invertible and every entry of the Cayley
    transform ``A = (I + Q D)^{-1}(I - Q D)`` at most 1 in magnitude, for orthogonal ``Q`` ``(..., n, n)``.

    Step 2 of the module docstring: sign-chosen elimination (``|det(I + Q D)| >= 1``, so always
    invertible), then pair flips while some ``|a_jk| > 1`` (each multiplies ``|det|`` by
    ``a_jk^2``). ``max_flips`` (default ``4 n``) bounds the search; the signs stay valid (invertible)
    whenever it stops. Computed in float64; returns signs in ``Q``'s dtype.
    """
    n = Q.shape[-1]
    lead = Q.shape[:-2]
    F = Q.detach().to(torch.float64).reshape(-1, n, n).clone()
    d = _elimination_signs(F)
    limit = 4 * n if max_flips is None else max_flips
    Q64 = Q.detach().to(torch.float64).reshape(-1, n, n)
    for g in range(Q64.shape[0]):  # the search is sequential; gates are few
        _flip_pairs(Q64[g], d[g], limit)
    return d.reshape(*lead, n).to(Q.dtype)


def _elimination_signs(F: Tensor) -> Tensor:
    """Signs from Gaussian elimination of ``I + F D`` (``F`` ``(B, n, n)``, overwritten): column k of
    the reduced matrix is ``e_k + d_k F[:, k]`` (row operations are lower triangular and leave the
    later identity columns alone), so its pivot is ``1 + d_k F[k, k]``; ``d_k = sign(F[k, k])``.
    Blocked right-looking LU: each panel is eliminated column by column, then the trailing columns
    get the panel's row operations as one triangular solve and one product."""
    B, n, _ = F.shape
    d = F.new_empty(B, n)
    for k0 in range(0, n, PANEL):
        k1 = min(k0 + PANEL, n)
        P = F[:, k0:, k0:k1]  # the panel (a view): rows k0.., its columns
        for j in range(k1 - k0):
            c = P[:, j, j]
            dj = torch.where(c >= 0, 1.0, -1.0).to(F.dtype)
            d[:, k0 + j] = dj
            # multipliers of the rows below: their column entry d_j F[i, k] over the pivot 1 + |c|
            P[:, j + 1:, j] *= (dj / (1 + c.abs())).unsqueeze(-1)
            P[:, j + 1:, j + 1:] -= P[:, j + 1:, j, None] * P[:, j, None, j + 1:]
        if k1 < n:
            b = k1 - k0
            L11 = P[:, :b, :].tril(-1) + torch.eye(b, dtype=F.dtype, device=F.device)
            U12 = torch.linalg.solve_triangular(L11, F[:, k0:k1, k1:], upper=False, unitriangular=True)
            F[:, k0:k1, k1:] = U12
            F[:, k1:, k1:] -= P[:, b:, :] @ U12
    return d


def _flip_pairs(Q: Tensor, d: Tensor, limit: int) -> None:
    """Flip sign pairs ``(j, k)`` of ``d`` (in place) while ``|a_jk| > 1``, largest first.

    ``A`` is updated by the rank-2 (Woodbury) form of the flip, ``O(n^2)`` per flip:
    ``A' = A - (A - I) E K^{-1} E^T (A + I)``, ``E = [e_j e_k]``, ``K = A[E, E]`` (2 x 2, skew).
    """
    n = Q.shape[-1]
    if n < 2:
        return
    eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
    S = eye + Q * d
    A = torch.linalg.solve(S, eye - Q * d)
    for _ in range(limit):
        upper = A.triu(1).abs()
        flat = int(upper.argmax())
        j, k = divmod(flat, n)
        a = A[j, k]
        if not bool(a.abs() > 1 + FLIP_TOL):
            return
        E = [j, k]
        K_inv = torch.stack([torch.stack([a.new_zeros(()), -1 / a]), torch.stack([1 / a, a.new_zeros(())])])
        A = A - (A - eye)[:, E] @ K_inv @ (A + eye)[E, :]
        d[j], d[k] = -d[j], -d[k]


class ScaledCayley(nn.Module):
    """``W = blocks((I + A_g)^{-1} (I - A_g) D_g)``: ``gates`` stacked orthogonal ``n x n`` blocks.

    Option ``negatives``: the number of ``-1`` entries of each ``D_g`` (scoRNN's rho) -- one int for
    every gate, one per gate, or None (0). It sets ``signs`` for weights drawn from scratch (the
    last ``negatives`` entries are -1, as in the paper's code); a fit chooses ``D`` itself
    (``fit``), and ``options()`` then reports the fitted counts. Buffer ``signs`` ``(gates, n)``:
    ``D``, persistent (in the state dict as ``parametrizations.<name>.0.signs``), not trainable.
    Original: ``(gates, n(n-1)/2)``, the strict upper triangles of ``A``. Square blocks only.
    See the module docstring for the maths.
    """

    structure: ClassVar[str] = "orthogonal"

    def __init__(self, gates: int, rows: int, cols: int, **options):
        super().__init__()
        opts = self.check(gates, rows, cols, **options)
        self.gates, self.rows, self.cols = gates, rows, cols
        self.n = rows
        counts = opts["negatives"] or 0
        counts = [counts] * gates if isinstance(counts, int) else list(counts)
        signs = torch.ones(gates, rows)
        for g, k in enumerate(counts):
            if k:
                signs[g, rows - k:] = -1.0
        self.register_buffer("signs", signs)
        # Originals fitted ahead of registration (by this module's own fit, which also set
        # ``signs``); consumed by the first right_inverse, as in LowRank.
        self._pending: tuple[Tensor, ...] | None = None

    @classmethod
    def check(cls, gates: int, rows: int, cols: int, *, negatives=None) -> dict:
        """Validate the options for ``gates`` blocks of ``rows x cols``; return them normalised.

        ``negatives`` comes back as None (not asked: 0 for a weight drawn from scratch), one int (a
        per-gate list whose counts are all equal gives that count) or a list of one int per gate.
        Raises ``ConfigError`` (non-square blocks, a count outside ``0..n``, a list of the wrong
        length), one line naming the value and the block shape.
        """
        for name, v in (("gates", gates), ("rows", rows), ("cols", cols)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"scaled Cayley {name} must be a positive integer, got {v!r}")
        where = f"{gates} block(s) of {rows}x{cols}"
        if rows != cols:
            raise ConfigError(f"scaled Cayley (orthogonal) needs square gate blocks, got {where}")

        def count(v) -> int:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= rows:
                raise ConfigError(f"scaled Cayley negatives={negatives!r} is impossible for {where} "
                                  f"(a count of -1 signs, 0..{rows})")
            return int(v)

        if negatives is None:  # kept as not asked (0 when drawing; a fit chooses D anyway)
            return {"negatives": None}
        if isinstance(negatives, (list, tuple)):
            if len(negatives) != gates:
                raise ConfigError(f"scaled Cayley negatives={list(negatives)!r} must give one count per gate "
                                  f"({gates}) for {where}")
            counts = [count(v) for v in negatives]
            return {"negatives": counts[0] if len(set(counts)) == 1 else counts}
        return {"negatives": count(negatives)}

    def options(self) -> dict:
        """The normalised options, read from ``signs`` (the fitted counts after a fit):
        ``ScaledCayley(gates, rows, cols, **options())`` has the same shapes and counts; the exact
        placement of the signs comes back with the state dict (buffer ``signs``)."""
        counts = [int(c) for c in (self.signs < 0).sum(-1).tolist()]
        return {"negatives": counts[0] if len(set(counts)) == 1 else counts}

    def parameter_count(self) -> int:
        """``gates * n(n-1)/2``: the numel of the original (``signs`` are fixed, not counted)."""
        return self.gates * self.n * (self.n - 1) // 2

    def forward(self, a: Tensor) -> Tensor:
        """Dense weight ``(gates*n, n)`` from the upper triangles ``a`` ``(gates, n(n-1)/2)``."""
        A = skew(a, self.n)
        return cayley(A, self.signs.to(dtype=A.dtype, device=A.device)).reshape(self.gates * self.n, self.n)

    def apply(self, x: Tensor, a: Tensor) -> Tensor:
        """``x @ W.T`` for ``x`` ``(..., n)`` -> ``(..., gates*n)`` by one solve per gate, without
        forming ``W``: ``W^T = D (I + A)(I - A)^{-1}`` (``A^T = -A``), so
        ``x W^T = y (I - A)^{-1}`` with ``y = (x D)(I + A)``, i.e. solve ``z (I - A) = y``."""
        if x.shape[-1] != self.n:
            raise ConfigError(f"input of shape {tuple(x.shape)} does not end in {self.n} (the weight's columns)")
        lead = x.shape[:-1]
        A = skew(a, self.n)
        eye = torch.eye(self.n, dtype=A.dtype, device=A.device)
        X = x.reshape(1, -1, self.n) * self.signs.to(dtype=A.dtype, device=A.device).unsqueeze(1)  # (g, N, n)
        Z = torch.linalg.solve(eye - A, X @ (eye + A), left=False)  # (g, N, n)
        return Z.transpose(0, 1).reshape(*lead, self.gates * self.n)

    def right_inverse(self, W: Tensor) -> tuple[Tensor, ...]:
        originals, self._pending = self._pending, None
        if originals is None:
            originals = self.fit(W)
        return tuple(t.to(device=W.device, dtype=W.dtype) for t in originals)

    def fit(self, W: Tensor) -> tuple[Tensor, ...]:
        """Scaled Cayley fit of each gate block of ``W`` ``(gates*n, n)``: ``(a,)``, ``a`` ``(gates, n(n-1)/2)``.

        Sets ``signs`` (the chosen ``D``) as a side effect, so ``forward(*fit(W))`` is the nearest
        orthogonal matrix to each block (exactly ``W`` when ``W`` is orthogonal); its relative
        error is ``polar_error(W, gates)``. Computed in float64; results in ``W``'s dtype and
        device; ``W`` is not modified. ``negatives`` plays no part: the counts come from the fit
        (``options()`` reports them). Raises ``ConfigError`` for a weight of another shape,
        ``WeightError`` for one holding NaN or Inf.
        """
        n, g = self.n, self.gates
        if W.dim() != 2 or tuple(W.shape) != (g * n, n):
            raise ConfigError(f"weight of shape {tuple(W.shape)} is not {g} block(s) of {n}x{n} for scaled Cayley")
        if not torch.isfinite(W).all():
            raise WeightError(f"weight of shape {tuple(W.shape)} holds NaN or Inf; it has no orthogonal fit")
        blocks = W.detach().to(torch.float64).reshape(g, n, n)
        Q = nearest_orthogonal(blocks)
        d = cayley_signs(Q)
        eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
        QD = Q * d.unsqueeze(-2)
        A = torch.linalg.solve(eye + QD, eye - QD)
        A = (A - A.mT) / 2
        with torch.no_grad():
            self.signs.copy_(d.to(device=self.signs.device, dtype=self.signs.dtype))
        return (triangle(A).to(dtype=W.dtype, device=W.device).contiguous(),)

    def extra_repr(self) -> str:
        return f"gates={self.gates}, n={self.n}, negatives={self.options()['negatives']}"


def scaled_cayley(module: nn.Module, name: str = "weight", *, negatives=None, gates: int = 1,
                  originals: tuple[Tensor, ...] | None = None) -> nn.Module:
    """Register a scaled Cayley orthogonal parametrization on ``module.<name>``; returns ``module``.

    Every ``n x n`` gate block of the current weight is fitted (``ScaledCayley.fit``: the nearest
    orthogonal matrix, ``D`` chosen by the fit; ``negatives`` only matters with ``originals``, for a
    weight drawn from scratch). ``gates``: the number of stacked gate
    blocks (1 for ``nn.RNN``, 3 for ``nn.GRU``, 4 for ``nn.LSTM``). ``originals`` (``(a,)``,
    already fitted or drawn; shape ``(gates, n(n-1)/2)``) are registered as given, with ``signs``
    from ``negatives``. Raises ``ConfigError`` for a weight that is not 2-D, is already
    parametrized, or does not split into square ``gates`` blocks.

        >>> gru = torch.nn.GRU(16, 16)
        >>> scaled_cayley(gru, "weight_hh_l0", gates=3)  # doctest: +ELLIPSIS
        ParametrizedGRU(...)
    """
    weight = registrable_weight(module, name, gates)
    param = ScaledCayley(gates, weight.shape[0] // gates, weight.shape[1], negatives=negatives)
    if originals is not None:
        want = [(gates, param.parameter_count() // gates)]
        if [tuple(t.shape) for t in originals] != want:
            raise ConfigError(f"scaled Cayley originals of shapes {[tuple(t.shape) for t in originals]} do not "
                              f"match {want} for {type(module).__name__}.{name}")
        param._pending = tuple(originals)
    param = param.to(device=weight.device)
    own_class(module)  # a deepcopy shares the parametrized class: leave the original alone
    parametrize.register_parametrization(module, name, param)
    return module


def random_originals(gates: int, rows: int, cols: int, *, options: dict, bound: float = 0.0,
                     dtype: torch.dtype | None = None, device: torch.device | None = None) -> tuple[Tensor, ...]:
    """scoRNN's initial ``A`` for each gate: block diagonal with ``2 x 2`` blocks
    ``[[0, s], [-s, 0]]``, ``s = -tan(t/2)`` with ``t ~ U(0, pi/2)`` (the paper's code; Henaff,
    Szlam and LeCun 2016), so ``W`` starts as rotations by angles in ``(0, pi/2)`` times ``D``.

    ``bound`` is accepted for the common signature and ignored: ``W`` is orthogonal, so its scale
    is fixed (spectral norm 1, entry RMS ``1/sqrt(n)``; a ``U(-1/sqrt(n), 1/sqrt(n))`` dense init,
    PyTorch's for RNNs, has entry RMS ``1/sqrt(3n)``). ``options`` as ``ScaledCayley.check``.
    Returns ``(a,)``, ``a`` ``(gates, n(n-1)/2)``. For training from scratch.
    """
    ScaledCayley.check(gates, rows, cols, **options)
    n = rows
    # Entry (2i, 2i+1) of the strict upper triangle, in triu_indices order: row r starts at
    # r*n - r(r+1)/2, and (r, r+1) is its first entry.
    rows_ = torch.arange(0, n - 1, 2)
    index = rows_ * n - rows_ * (rows_ + 1) // 2
    t = torch.empty(gates, len(index), dtype=dtype, device=device).uniform_(0.0, math.pi / 2)
    a = torch.zeros(gates, n * (n - 1) // 2, dtype=dtype, device=device)
    a[:, index.to(a.device)] = -torch.tan(t / 2)
    return (a,)
