"""Sums of Kronecker products as a ``torch.nn.utils.parametrize`` parametrization.

A weight of ``gates`` stacked ``rows x cols`` blocks; every block is its own sum of ``terms``
Kronecker products of ``k >= 2`` small factors (the Kronecker Recurrent Unit's recurrent matrix,
Jose, Cisse and Fleuret, ICML 2018, generalised to several terms and non-square factors)::

    W_g = sum_t  F1[g, t] kron F2[g, t] kron ... kron Fk[g, t],    Fi[g, t] of shape (m_i, n_i)

with ``prod m_i = rows`` and ``prod n_i = cols``. The factors are stored as ``original0`` ...
``original{k-1}``, ``original{i}`` of shape ``(gates, terms, m_i, n_i)``.

Fit (``right_inverse``) -- the nearest Kronecker product (Van Loan and Pitsianis, 1993). Rearrange
a block into the ``k``-way tensor ``T[(i1,j1), ..., (ik,jk)] = W[(i1..ik), (j1..jk)]`` (row and
column indices split row-major over the factors). Then ``W = sum_t kron_i Fi[t]`` exactly when
``T = sum_t vec(F1[t]) o ... o vec(Fk[t])`` (outer products), so

* two factors: ``T`` is a matrix whose rows are the vectorised ``m2 x n2`` sub-blocks of ``W``,
  ``||W - sum_t A_t kron B_t||_F = ||T - sum_t vec(A_t) vec(B_t)^T||_F``, and its truncated SVD
  to ``terms`` is optimal (Eckart-Young): the error is the root of the discarded squared singular
  values of ``T``. The singular values are split evenly between the factors (``sqrt(s)`` each).
* ``k >= 3`` factors: a CP decomposition of ``T``, which has no closed form. Start from
  sequential nearest Kronecker products: the SVD of the unfolding ``(p_1, p_2 ... p_k)`` gives the
  first factor of each term, and each term's remainder is fitted, recursively, by a single
  Kronecker product of the remaining factors (more terms than the unfolding's rank are peeled off
  the residual in further rounds). Then ``sweeps`` alternating-least-squares sweeps (CP-ALS: each
  factor in turn is the exact least-squares solution with the others fixed, so the error never
  grows; stop early when a sweep improves the squared error by less than 1e-6 of itself). The
  start is exact when ``W`` is exactly one Kronecker product (``terms=1``); for more terms ALS is a
  local method (exact sums are usually, not provably, found).
  Finally each term's scale is split evenly between its factors.

``apply`` multiplies ``x W^T`` without forming ``W``: ``(A kron B) vec(X) = vec(B X A^T)``
generalised to ``k`` factors -- ``x`` is reshaped to its ``k`` column modes and contracted with one
factor at a time. For square factors of an ``n x n`` block that is ``batch * gates * terms * n *
sum(m_i)`` multiply-adds instead of ``batch * gates * n^2`` (n = 4096 = 64 x 64: 128 per row and
term instead of 4096).

    >>> lin = torch.nn.Linear(64, 64)
    >>> kronecker(lin, "weight", factors=(8, 8), terms=2)  # doctest: +ELLIPSIS
    ParametrizedLinear(...)
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import registrable_weight
from ..errors import ConfigError, RankError, WeightError
from ..factorize import SVD_METHODS, fit_low_rank
from ..parametrizations import chained, own_class

# CP-ALS sweeps after the sequential start (k >= 3 factors only): enough for the ALS error to
# settle on the shapes we convert; each sweep costs about `terms * k` products with the weight.
DEFAULT_SWEEPS = 25
# A sweep that improves ||T - T_hat||^2 by less than this fraction of its value ends ALS.
ALS_TOL = 1e-6
# Index letters for einsum over any number of modes; 'z' (gate batch) and 't' (term) are taken.
_MODES = "abcdefghijklmnopqrsuvwxyABCDEFGHIJKLMNOPQRSTUVWXYZ"

Shape = tuple[int, int]


def parse_factors(text: str) -> tuple[int, ...] | tuple[Shape, ...]:
    """Kronecker factor shapes from their CLI form.

    ``"64x64"`` -> ``(64, 64)``: square factors ``(64 x 64) kron (64 x 64)``; ``"2x2x2x2"`` -> four
    square factors of 2. With commas each item is one factor's block shape ``MxN`` (or ``M`` for
    ``M x M``): ``"4x8,8x4"`` -> ``((4, 8), (8, 4))``. At least two factors.

    Raises ``ConfigError`` (one line naming the text) for anything else.
    """
    if not isinstance(text, str):
        raise ConfigError(f"Kronecker factors must be a string like '64x64' or '4x8,8x4', got {text!r}")
    s = text.strip().lower()
    number = r"\s*[1-9]\d*\s*"
    try:
        if "," in s:
            items = s.split(",")
            if not all(re.fullmatch(f"{number}(x{number})?", item) for item in items):
                raise ValueError
            pairs = [tuple(int(v) for v in item.split("x")) for item in items]
            out: tuple = tuple((p[0], p[0]) if len(p) == 1 else p for p in pairs)
        else:
            if not re.fullmatch(f"{number}(x{number})+", s):
                raise ValueError
            out = tuple(int(v) for v in s.split("x"))
    except ValueError:
        raise ConfigError(f"Kronecker factors {text!r} are not 'AxB[xC...]' (square factors) or "
                          f"'m1xn1,m2xn2[,...]' (factor block shapes), e.g. '64x64' or '4x8,8x4'") from None
    if len(out) < 2:
        raise ConfigError(f"Kronecker factors {text!r} name one factor; a Kronecker product needs 2 or more")
    return out


def _shapes(factors, where: str) -> tuple[Shape, ...]:
    """Factor shapes ``((m1, n1), ...)`` from ints (square), pairs, or the CLI string."""
    if isinstance(factors, str):
        factors = parse_factors(factors)
    if not isinstance(factors, Sequence) or len(factors) < 2:
        raise ConfigError(f"Kronecker factors must be 2 or more factor sizes or (rows, cols) pairs "
                          f"for {where}, got {factors!r}")

    def size(v) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ConfigError(f"Kronecker factor sizes must be positive integers for {where}, got {factors!r}")
        return int(v)

    out = []
    for f in factors:
        if isinstance(f, Sequence) and not isinstance(f, str) and len(f) == 2:
            out.append((size(f[0]), size(f[1])))
        else:
            out.append((size(f), size(f)))
    return tuple(out)


def _spell(shapes: tuple[Shape, ...]) -> str:
    """Factor shapes in their CLI form: ``64x64`` (square) or ``4x8,8x4``."""
    if all(a == b for a, b in shapes):
        return "x".join(str(a) for a, _ in shapes)
    return ",".join(f"{a}x{b}" for a, b in shapes)


class Kronecker(nn.Module):
    """``W = blocks(sum_t F1[t] kron ... kron Fk[t])`` for ``gates`` stacked ``rows x cols`` blocks.

    Options: ``factors`` -- square factor sizes ``(a, b, ...)`` (``a * b * ... = rows = cols``),
    factor block shapes ``((m1, n1), (m2, n2), ...)`` (``prod m = rows``, ``prod n = cols``), or
    their string form (``parse_factors``); ``terms`` -- the number of Kronecker products summed
    (1 .. the generic CP-rank bound ``prod p_i / max p_i``, ``p_i = m_i n_i``); ``svd`` -- the SVD
    of the rearranged matrix ("auto", "exact", "randomized", as ``factorize.fit_low_rank``);
    ``sweeps`` -- CP-ALS sweeps for 3 or more factors. Originals: ``k`` tensors
    ``(gates, terms, m_i, n_i)``. See the module docstring for the maths.
    """

    structure: ClassVar[str] = "kronecker"

    def __init__(self, gates: int, rows: int, cols: int, **options):
        super().__init__()
        opts = self.check(gates, rows, cols, **options)
        self.gates, self.rows, self.cols = gates, rows, cols
        self._options = opts
        self.factors, self.terms = opts["factors"], opts["terms"]
        self.svd, self.sweeps = opts.get("svd", "auto"), opts.get("sweeps", DEFAULT_SWEEPS)
        self.shapes = _shapes(self.factors, "")
        # Originals fitted ahead of registration (the converter validates and fits everything
        # before touching a model); consumed by the first right_inverse, as in LowRank.
        self._pending: tuple[Tensor, ...] | None = None

    @classmethod
    def check(cls, gates: int, rows: int, cols: int, *, factors=None, terms: int = 1, svd: str = "auto",
              sweeps: int = DEFAULT_SWEEPS) -> dict:
        """Validate the options for ``gates`` blocks of ``rows x cols``; return them normalised.

        ``factors`` comes back as a tuple of ints when every factor is square, else as a tuple of
        ``(m, n)`` pairs; ``svd`` and ``sweeps`` only when not their defaults. Raises
        ``ConfigError`` (factors that do not multiply to the block shape, bad sizes or option
        values) or ``RankError`` (``terms`` out of range), one line naming the value and the block
        shape. Warns when the factors hold more parameters than the dense weight.
        """
        for name, v in (("gates", gates), ("rows", rows), ("cols", cols)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Kronecker {name} must be a positive integer, got {v!r}")
        where = f"{gates} block(s) of {rows}x{cols}"
        if factors is None:
            raise ConfigError(f"Kronecker needs factors= (e.g. '64x64' or '4x8,8x4') for {where}")
        shapes = _shapes(factors, where)
        m, n = math.prod(s[0] for s in shapes), math.prod(s[1] for s in shapes)
        if (m, n) != (rows, cols):
            raise ConfigError(f"Kronecker factors {_spell(shapes)} make {m}x{n} blocks, but the weight has "
                              f"{where}: the factors' rows must multiply to {rows} and their columns to {cols}")
        p = [a * b for a, b in shapes]
        most = math.prod(p) // max(p)
        if isinstance(terms, bool) or not isinstance(terms, numbers.Integral) or not 1 <= terms <= most:
            raise RankError(f"Kronecker terms={terms!r} is impossible for factors {_spell(shapes)} of {where} "
                            f"(1..{most})")
        if svd not in SVD_METHODS:
            raise ConfigError(f"Kronecker svd must be one of {SVD_METHODS}, got {svd!r}")
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
            raise ConfigError(f"Kronecker sweeps must be a non-negative integer, got {sweeps!r}")
        terms = int(terms)
        count = gates * terms * sum(p)
        if count > gates * rows * cols:
            warnings.warn(f"Kronecker factors {_spell(shapes)} with terms={terms} hold {count} parameters, more than "
                          f"the dense {gates * rows * cols} of {where}", stacklevel=2)
        square = all(a == b for a, b in shapes)
        out = {"factors": tuple(a for a, _ in shapes) if square else shapes, "terms": terms}
        # Fit settings are recorded only when not the defaults, so stored options and report
        # cells name the structure alone in the usual case.
        if svd != "auto":
            out["svd"] = svd
        if sweeps != DEFAULT_SWEEPS:
            out["sweeps"] = sweeps
        return out

    def options(self) -> dict:
        """The normalised options: ``Kronecker(gates, rows, cols, **options())`` is identical."""
        return dict(self._options)

    def parameter_count(self) -> int:
        """``gates * terms * sum(m_i n_i)``: the numel of all originals."""
        return self.gates * self.terms * sum(a * b for a, b in self.shapes)

    def forward(self, *F: Tensor) -> Tensor:
        """Dense weight ``(gates*rows, cols)`` from the factors ``(gates, terms, m_i, n_i)``."""
        P = F[0]
        for Fi in F[1:-1]:  # running Kronecker product of the first factors, per gate and term
            g, t, a, b = P.shape
            P = torch.einsum("ztab,ztcd->ztacbd", P, Fi).reshape(g, t, a * Fi.shape[2], b * Fi.shape[3])
        # The last product sums the terms, so no (gates, terms, rows, cols) tensor is ever held.
        return torch.einsum("ztab,ztcd->zacbd", P, F[-1]).reshape(self.gates * self.rows, self.cols)

    def apply(self, x: Tensor, *F: Tensor) -> Tensor:
        """``x @ W.T`` for ``x`` ``(..., cols)`` -> ``(..., gates*rows)``, never forming ``W``.

        ``(A kron B) vec(X) = vec(B X A^T)``, generalised: ``x`` becomes ``(N, n1, ..., nk)`` and
        each step contracts the leading column mode with one factor and moves its row mode to the
        back, so after ``k`` steps the modes are ``(m1, ..., mk)`` in order.
        """
        if x.shape[-1] != self.cols:
            raise ConfigError(f"input of shape {tuple(x.shape)} does not end in {self.cols} (the weight's columns)")
        lead = x.shape[:-1]
        k = len(F)
        Y = torch.einsum("ztmn,Nnr->Nztrm", F[0], x.reshape(-1, self.shapes[0][1], self.cols // self.shapes[0][1]))
        for i in range(1, k):
            N, g, t = Y.shape[:3]
            Y = Y.reshape(N, g, t, self.shapes[i][1], -1)
            # The last contraction also sums the terms.
            Y = torch.einsum("ztmn,Nztnr->Nztrm" if i < k - 1 else "ztmn,Nztnr->Nzrm", F[i], Y)
        return Y.reshape(*lead, self.gates * self.rows)

    def apply_macs(self, batch: int) -> int:
        """Multiply-adds of ``apply`` on ``batch`` input rows, for a cost model: step ``i`` costs
        ``batch gates terms (m_1..m_i)(n_i..n_k)``; dense is ``batch gates rows cols``."""
        total = 0
        for i in range(len(self.shapes)):
            done = math.prod(m for m, _ in self.shapes[: i + 1])
            left = math.prod(n for _, n in self.shapes[i:])
            total += batch * self.gates * self.terms * done * left
        return total

    def right_inverse(self, W: Tensor) -> tuple[Tensor, ...]:
        originals, self._pending = self._pending, None
        if originals is None:
            originals = self.fit(W)
        return tuple(t.to(device=W.device, dtype=W.dtype) for t in originals)

    def fit(self, W: Tensor) -> tuple[Tensor, ...]:
        """Nearest sum of ``terms`` Kronecker products to each gate block of ``W`` ``(gates*rows, cols)``.

        Returns ``k`` factors ``(gates, terms, m_i, n_i)`` in ``W``'s dtype and device; ``W`` is not
        modified. Two factors: optimal (Van Loan-Pitsianis + Eckart-Young); more: sequential start
        plus CP-ALS (module docstring). Raises ``ConfigError`` for a weight of another shape,
        ``WeightError`` for one holding NaN or Inf.
        """
        if W.dim() != 2 or tuple(W.shape) != (self.gates * self.rows, self.cols):
            raise ConfigError(f"weight of shape {tuple(W.shape)} is not {self.gates} block(s) of "
                              f"{self.rows}x{self.cols} for Kronecker factors {_spell(self.shapes)}")
        if not torch.isfinite(W).all():
            raise WeightError(f"weight of shape {tuple(W.shape)} holds NaN or Inf; it has no Kronecker fit")
        k = len(self.shapes)
        work = W.detach()
        if work.dtype != torch.float64:
            # Small weights are fitted in float64 (cheap there; exact to the last bit of the cast).
            work = work.to(torch.float64 if work.numel() <= 1 << 22 else torch.float32)
        # (g, m1..mk, n1..nk) -> (g, m1, n1, ..., mk, nk) -> (g, p1, ..., pk)
        T = work.reshape(self.gates, *(a for a, _ in self.shapes), *(b for _, b in self.shapes))
        T = T.permute(0, *(j for i in range(k) for j in (1 + i, 1 + k + i)))
        T = T.reshape(self.gates, *(a * b for a, b in self.shapes))
        vecs = _sequential(T, self.terms, self.svd)
        if k > 2:
            vecs = _als(T, vecs, self.sweeps)
        vecs = _balance(vecs)
        return tuple(v.reshape(self.gates, self.terms, a, b).to(W.dtype).contiguous()
                     for v, (a, b) in zip(vecs, self.shapes))

    def extra_repr(self) -> str:
        return (f"gates={self.gates}, rows={self.rows}, cols={self.cols}, factors={self.factors}, "
                f"terms={self.terms}")


def _sequential(T: Tensor, terms: int, svd: str) -> list[Tensor]:
    """CP factors ``(B, terms, p_i)`` of ``T`` ``(B, p1, ..., pk)`` by nested nearest Kronecker products.

    Two modes: the truncated SVD (optimal). More: SVD of the ``(p1, rest)`` unfolding, then each
    term's remainder by one Kronecker product of the other factors; terms beyond the unfolding's
    rank come from the same procedure on the residual.
    """
    B, p = T.shape[0], T.shape[1:]
    out: list[Tensor] | None = None
    left, residual = terms, T
    while left > 0:
        r = min(left, p[0], math.prod(p[1:]))
        L, R = _truncated(residual.reshape(B, p[0], -1), r, svd)
        chunk = [L.mT]  # (B, r, p1): sqrt(s) u_t
        if len(p) == 2:
            chunk.append(R)
        else:
            rest = _sequential(R.reshape(B * r, *p[1:]), 1, svd)
            chunk += [v.reshape(B, r, -1) for v in rest]
        out = chunk if out is None else [torch.cat(pair, 1) for pair in zip(out, chunk)]
        left -= r
        if left:
            residual = T - _compose(out)
    return out


def _truncated(A: Tensor, r: int, svd: str) -> tuple[Tensor, Tensor]:
    """Balanced rank-``r`` truncated SVD ``L (B, p, r)``, ``R (B, r, q)`` of ``A`` ``(B, p, q)``.

    A long matrix is first reduced by a QR of its long side, ``A = R_qr^T Q^T`` (or ``Q R_qr``):
    the same singular values and vectors, exactly, at the cost of one pass over ``A`` -- LAPACK's
    SVD of a 256 x 65536 unfolding (a 4096 x 4096 weight as 16 x 256 blocks) takes ~20 s on one
    core, its QR plus a 256 x 256 SVD ~2 s.
    """
    p, q = A.shape[-2:]
    if q >= 2 * p:
        Q, S = torch.linalg.qr(A.mT)  # A^T = Q S: A = S^T Q^T
        f = fit_low_rank(S.mT, r, method=svd)
        return f.L, f.R @ Q.mT
    if p >= 2 * q:
        Q, S = torch.linalg.qr(A)
        f = fit_low_rank(S, r, method=svd)
        return Q @ f.L, f.R
    f = fit_low_rank(A, r, method=svd)
    return f.L, f.R


def _compose(vecs: list[Tensor]) -> Tensor:
    """``sum_t v1[t] o ... o vk[t]``: ``(B, p1, ..., pk)`` from ``k`` tensors ``(B, terms, p_i)``."""
    modes = _MODES[: len(vecs)]
    return torch.einsum(",".join(f"zt{c}" for c in modes) + f"->z{modes}", *vecs)


def _als(T: Tensor, vecs: list[Tensor], sweeps: int) -> list[Tensor]:
    """CP-ALS sweeps on ``T`` ``(B, p1, ..., pk)`` from the factors ``vecs`` ``(B, terms, p_i)``.

    Mode ``i``'s update is the normal-equation solution ``F_i = pinv(V) M``: ``V`` the Hadamard
    product of the other factors' Gram matrices (``terms x terms``), ``M`` the contraction of ``T``
    with the other factors (MTTKRP), so each update is an exact least-squares step (Kolda and
    Bader, 2009, sec. 3.4).
    """
    vecs = list(vecs)
    k, modes = len(vecs), _MODES[: len(vecs)]
    norm2 = float(torch.linalg.vector_norm(T)) ** 2
    floor = (torch.finfo(T.dtype).eps ** 2) * norm2
    prev = float(torch.linalg.vector_norm(T - _compose(vecs))) ** 2
    for _ in range(sweeps):
        if prev <= floor:  # exact to working precision already
            break
        for i in range(k):
            others = [j for j in range(k) if j != i]
            V = math.prod(vecs[j] @ vecs[j].mT for j in others)
            spec = f"z{modes}," + ",".join(f"zt{modes[j]}" for j in others) + f"->zt{modes[i]}"
            M = torch.einsum(spec, T, *(vecs[j] for j in others))
            vecs[i] = torch.linalg.pinv(V, hermitian=True) @ M
        # Measured by a rebuild (as cheap as one update): the Gram-matrix identity for the error
        # cancels catastrophically near an exact fit.
        err2 = float(torch.linalg.vector_norm(T - _compose(vecs))) ** 2
        if prev - err2 <= ALS_TOL * prev:
            break
        prev = err2
    return vecs


def _balance(vecs: list[Tensor]) -> list[Tensor]:
    """Give every factor of a term the same norm, the k-th root of the term's scale (signs kept)."""
    norms = torch.stack([v.norm(dim=-1) for v in vecs])  # (k, B, terms)
    scale = norms.prod(0).pow(1.0 / len(vecs))
    # A term with a zero factor is zero: zero all its factors rather than divide by zero.
    gain = torch.where(norms > 0, scale / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return [v * g.unsqueeze(-1) for v, g in zip(vecs, gain)]


def kronecker(module: nn.Module, name: str = "weight", *, factors, terms: int = 1, gates: int = 1,
              svd: str = "auto", sweeps: int = DEFAULT_SWEEPS,
              originals: tuple[Tensor, ...] | None = None) -> nn.Module:
    """Register a sum-of-Kronecker-products parametrization on ``module.<name>``; returns ``module``.

    ``factors``, ``terms``, ``svd``, ``sweeps``: as ``Kronecker``; ``gates``: the number of stacked
    gate blocks (3 for ``nn.GRU``'s weights, 4 for ``nn.LSTM``'s). The current weight is fitted
    (``Kronecker.fit``), or ``originals`` (already fitted, shapes ``(gates, terms, m_i, n_i)``) are
    used. Raises ``ConfigError`` for a weight that is not 2-D, is already parametrized, does not
    split into ``gates`` blocks or does not factor; ``RankError`` for ``terms`` out of range.

        >>> gru = torch.nn.GRU(16, 16)
        >>> kronecker(gru, "weight_hh_l0", factors=(4, 4), gates=3)  # doctest: +ELLIPSIS
        ParametrizedGRU(...)
    """
    weight = registrable_weight(module, name, gates)
    param = Kronecker(gates, weight.shape[0] // gates, weight.shape[1], factors=factors, terms=terms, svd=svd,
                      sweeps=sweeps)
    if originals is not None:
        want = [(gates, param.terms, a, b) for a, b in param.shapes]
        if [tuple(t.shape) for t in originals] != want:
            raise ConfigError(f"Kronecker originals of shapes {[tuple(t.shape) for t in originals]} do not "
                              f"match {want} for {type(module).__name__}.{name}")
        param._pending = tuple(originals)
    own_class(module)  # a deepcopy shares the parametrized class: leave the original alone
    parametrize.register_parametrization(module, name, param)
    return module


def unitary_penalty(target: nn.Module) -> Tensor:
    """The KRU soft unitary penalty ``sum_F ||F^T F - I||_F^2`` over every square Kronecker factor.

    ``target``: a module (every Kronecker-parametrized weight in it and its submodules counts) or
    one ``module.parametrizations.<name>`` list. Each gate's and each term's square factor adds
    its own term (Jose et al., ICML 2018, the soft unitary constraint on the KRU factors; for
    ``terms=1`` unitary factors make ``W`` unitary); non-square factors add nothing. Differentiable,
    to be added to a training loss with a weight. Raises ``ConfigError`` when ``target`` holds no
    Kronecker parametrization.
    """
    if isinstance(target, parametrize.ParametrizationList):
        lists = [target]
    elif isinstance(target, nn.Module):
        lists = [plist for m in target.modules() if parametrize.is_parametrized(m)
                 for plist in m.parametrizations.values()]
    else:
        raise ConfigError(f"unitary_penalty needs a module, got {type(target).__name__}")
    lists = [pl for pl in lists if len(chained(pl)) == 1 and isinstance(pl[0], Kronecker)]
    if not lists:
        raise ConfigError(f"{type(target).__name__} has no Kronecker-parametrized weight (see kronecker())")
    terms = []
    for pl in lists:
        for i in range(len(pl[0].shapes)):
            F = getattr(pl, f"original{i}")
            if F.shape[-1] == F.shape[-2]:
                eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
                terms.append(((F.mT @ F - eye) ** 2).sum())
    first = getattr(lists[0], "original0")
    return torch.stack(terms).sum() if terms else first.new_zeros(())


def random_originals(gates: int, rows: int, cols: int, *, options: dict, bound: float,
                     dtype: torch.dtype | None = None, device: torch.device | None = None) -> tuple[Tensor, ...]:
    """Random factors whose product has the entry variance of a ``U(-bound, bound)`` dense init.

    An entry of ``W`` is a sum over ``terms`` of a product of ``k`` independent factor entries, so
    with factor entries ``U(-b, b)`` its variance is ``terms (b^2/3)^k``; ``b`` solves
    ``terms (b^2/3)^k = bound^2/3``. ``options`` as ``Kronecker.check``. For training from scratch.
    """
    with warnings.catch_warnings():  # a note on the size was given when the options were checked
        warnings.simplefilter("ignore")
        opts = Kronecker.check(gates, rows, cols, **options)
    shapes, terms = _shapes(opts["factors"], ""), opts["terms"]
    b = math.sqrt(3.0 * (bound ** 2 / (3.0 * terms)) ** (1.0 / len(shapes)))
    return tuple(torch.empty(gates, terms, m, n, dtype=dtype, device=device).uniform_(-b, b) for m, n in shapes)
