"""Low-rank and low-rank-plus-diagonal weights as ``torch.nn.utils.parametrize`` parametrizations.

A recurrent weight stacks G gate blocks, ``(G*m, n)``; each block is ``L_g R_g (+ diag(D_g))``
with its own factors, or with one shared ``R`` when ``tied``. ``forward`` rebuilds the dense
weight (so ``nn.GRU`` still runs on cuDNN/MKL), ``right_inverse`` fits factors to a dense
weight by truncated SVD. Factors are stored as ``original0`` (L), ``original1`` (R) and
``original2`` (D).

    >>> lin = torch.nn.Linear(64, 64)
    >>> low_rank(lin, "weight", rank=8, diag=True)  # doctest: +ELLIPSIS
    ParametrizedLinear(...)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .factorize import Factors, compose, fit_low_rank, fit_low_rank_plus_diagonal


class LowRank(nn.Module):
    """``W = blocks(L R)`` for a weight of ``gates`` stacked ``rows x cols`` blocks."""

    diag = False

    def __init__(self, gates: int, rank: int, *, tied: bool = False, svd: str = "auto",
                 diag_iters: int | None = None, seed: int = 0, factors: Factors | None = None):
        super().__init__()
        if gates < 1 or rank < 1:
            raise ValueError(f"gates and rank must be positive, got gates={gates}, rank={rank}")
        self.gates, self.rank, self.tied = gates, rank, tied
        self.svd, self.diag_iters, self.seed = svd, diag_iters, seed
        # Factors fitted ahead of registration (the converter validates and fits everything
        # before touching a model); consumed by the first right_inverse.
        self._pending = factors

    def forward(self, L: Tensor, R: Tensor) -> Tensor:
        return compose(L, R).flatten(0, 1)

    def right_inverse(self, W: Tensor) -> tuple[Tensor, ...]:
        factors, self._pending = self._pending, None
        if factors is None:
            factors = self.fit(W)
        # Contiguous once, here: SVD factors are often transposed views (strides like (512, 1, 64)),
        # and in-place row updates (max-norm, optimisers' foreach paths) want plain row-major storage.
        return tuple(t.to(device=W.device, dtype=W.dtype).contiguous() for t in self._unpack(factors))

    def fit(self, W: Tensor) -> Factors:
        return fit_low_rank(self._blocks(W), self.rank, tied=self.tied, method=self.svd, seed=self.seed)

    def _blocks(self, W: Tensor) -> Tensor:
        if W.dim() != 2 or W.shape[0] % self.gates:
            raise ValueError(f"weight of shape {tuple(W.shape)} does not split into {self.gates} gate blocks")
        return W.detach().reshape(self.gates, W.shape[0] // self.gates, W.shape[1])

    def _unpack(self, f: Factors) -> tuple[Tensor, ...]:
        return f.L, f.R

    def extra_repr(self) -> str:
        return f"gates={self.gates}, rank={self.rank}, tied={self.tied}"


class LowRankPlusDiagonal(LowRank):
    """``W = blocks(L R + diag(D))``; every block must be square."""

    diag = True

    def forward(self, L: Tensor, R: Tensor, D: Tensor) -> Tensor:
        return compose(L, R, D).flatten(0, 1)

    def fit(self, W: Tensor) -> Factors:
        return fit_low_rank_plus_diagonal(self._blocks(W), self.rank, tied=self.tied, method=self.svd,
                                          max_iter=self.diag_iters, seed=self.seed)

    def _unpack(self, f: Factors) -> tuple[Tensor, ...]:
        return f.L, f.R, f.D


def low_rank(module: nn.Module, name: str = "weight", rank: int = 1, *, gates: int = 1, diag: bool = False,
             tied: bool = False, svd: str = "auto", diag_iters: int | None = None,
             factors: Factors | None = None) -> nn.Module:
    """Register a low-rank (``diag=True``: plus diagonal) parametrization on ``module.<name>``.

    The current weight is kept as well as the rank allows: factors come from its truncated SVD
    (or from ``factors`` when given). Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__}.{name} is not a 2-D weight")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized")
    rows, cols = weight.shape[0] // gates, weight.shape[1]
    if not 1 <= rank <= max_rank(gates, rows, cols, tied):
        raise ValueError(f"rank {rank} is impossible for {gates} block(s) of {rows}x{cols} "
                         f"(1..{max_rank(gates, rows, cols, tied)})")
    if diag and rows != cols:
        raise ValueError(f"a diagonal needs square blocks, got {rows}x{cols}")
    cls = LowRankPlusDiagonal if diag else LowRank
    param = cls(gates, rank, tied=tied, svd=svd, diag_iters=diag_iters, factors=factors)
    own_class(module)
    # Given factors were shape-checked by the caller; skipping the check saves a full rebuild.
    parametrize.register_parametrization(module, name, param, unsafe=factors is not None)
    return module


def own_class(module: nn.Module) -> nn.Module:
    """Give an already parametrized ``module`` a private copy of its parametrized class. Returns ``module``.

    ``torch.nn.utils.parametrize`` injects one class per parametrized instance and keeps each
    weight as a property *on that class*; ``copy.deepcopy`` reuses the class, so registering or
    removing a parametrization on a copy would add or delete a property of the original too
    (``KeyError`` on its weight). Call this before either. A module that is not parametrized
    yet gets its own class from ``register_parametrization`` and is left alone. Cheap: one
    ``type()`` call copying the class namespace (properties included).
    """
    if parametrize.is_parametrized(module):
        cls = type(module)
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    return module


def max_rank(gates: int, rows: int, cols: int, tied: bool) -> int:
    """Largest meaningful rank: full rank of a block, or of the stacked blocks when tied."""
    return min(gates * rows, cols) if tied else min(rows, cols)


def chained(plist: parametrize.ParametrizationList) -> list[nn.Module]:
    """The parametrizations chained on one weight, in order.

    Its factors may themselves be parametrized (weight normalisation, ``train.stabilisers``, or
    a user's own on a Kronecker factor): torch then adds a ``parametrizations`` child to the
    list, which ``len(plist)`` counts but which is not a parametrization of the weight (else a
    weight-normalised factor would make its weight read as "not factored").
    """
    return [m for key, m in plist._modules.items() if key.isdigit()]


def factorization(module: nn.Module, name: str) -> LowRank | None:
    """The lrcompress parametrization on ``module.<name>``, or None (see ``chained``)."""
    if not parametrize.is_parametrized(module, name):
        return None
    own = chained(module.parametrizations[name])
    return own[0] if len(own) == 1 and isinstance(own[0], LowRank) else None


def random_factors(gates: int, rows: int, cols: int, rank: int, *, diag: bool, tied: bool, bound: float,
                   dtype: torch.dtype | None = None, device: torch.device | None = None) -> Factors:
    """Random factors whose product has the variance of ``U(-bound, bound)`` entries.

    Each factor entry is ``U(-b, b)`` with ``d (b^2/3)^2 = bound^2/3``; the diagonal starts at
    ``U(-0.01, 0.01)`` as in the paper's code. For training from scratch.
    """
    b = math.sqrt(math.sqrt(3.0) * bound / math.sqrt(rank))

    def uniform(*shape: int, scale: float) -> Tensor:
        return torch.empty(*shape, dtype=dtype, device=device).uniform_(-scale, scale)

    L = uniform(gates, rows, rank, scale=b)
    R = uniform(rank, cols, scale=b) if tied else uniform(gates, rank, cols, scale=b)
    D = uniform(gates, rows, scale=0.01) if diag else None
    return Factors(L, R, D)
