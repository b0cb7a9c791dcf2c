"""Tensor-train (TT) matrices as a ``torch.nn.utils.parametrize`` parametrization.

A ``M x N`` matrix with ``M = m1 m2 ... md`` and ``N = n1 n2 ... nd`` is a TT-matrix (Oseledets,
"Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011) when

    W[(i1..id), (j1..jd)] = G1[i1, j1] G2[i2, j2] ... Gd[id, jd],

each ``Gk[ik, jk]`` an ``r_{k-1} x r_k`` matrix (``r_0 = r_d = 1``); the ``r_k`` are the TT-ranks of
the d - 1 bonds, the multi-indices are row-major (``i1`` most significant). The cores are stored as
``original0 .. original{d-1}``, core k of shape ``(B, r_{k-1}, m_k, n_k, r_k)`` with ``B = gates``
(each gate block its own train) or ``B = 1`` when ``joint=True``: then the whole stacked
``(gates*rows, cols)`` weight is ONE train, the "fully tensorized" RNN (Onu et al. 2020,
shared/paper/001_*) that shares the train between all gates of a cell; a shape that describes
one ``rows x cols`` block gets a leading ``(gates, 1)`` mode, the gate index.

The fit is TT-SVD (Oseledets 2011, Algorithm 1): sequential truncated SVDs of the unfoldings of
the ``(m1 n1, m2 n2, ..., md nd)`` tensor. Its Frobenius error is at most the root of the summed
squared discarded singular values over all bonds (Theorem 2.2), and it is exact at full TT-rank.
``apply`` multiplies by ``W^T`` one core at a time, never forming ``W``.

    >>> lin = torch.nn.Linear(64, 64)
    >>> tensor_train(lin, "weight", ranks=4, shape=(4, 4, 4))  # doctest: +ELLIPSIS
    ParametrizedLinear(...)
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import registrable_weight
from ..errors import ConfigError, RankError, WeightError
from ..parametrizations import own_class

# A step's SVD runs in float64 when the unfolding's smaller side is at most this (as
# factorize.FLOAT64_MAX_DIM): cheap there, and it makes a float32 fit exact to the cast.
FLOAT64_MAX_DIM = 1024

Shape = tuple[tuple[int, int], ...]


def parse_shape(text: str) -> tuple[int, ...] | Shape:
    """The CLI form of a TT shape: ``"8x8x8x8"`` -> ``(8, 8, 8, 8)``, square modes (row mode =
    column mode); ``"4x2,8x8"`` -> ``((4, 2), (8, 8))``, one ``row_mode x col_mode`` pair per core,
    comma-separated (in that form a bare ``"8"`` is the square mode ``(8, 8)``). The syntax is the
    Kronecker factors' (``kronecker.parse_factors``). Raises ConfigError for anything else.
    """
    s = re.sub(r"\s", "", str(text)).lower()
    if re.fullmatch(r"\d+(x\d+)*", s):
        return tuple(int(v) for v in s.split("x"))
    if re.fullmatch(r"\d+(x\d+)?(,\d+(x\d+)?)+", s):
        items = [tuple(int(v) for v in item.split("x")) for item in s.split(",")]
        return tuple((it[0], it[-1]) for it in items)
    raise ConfigError(f"TT shape {text!r} is not 'm1xm2x...' (square modes) or 'm1xn1,m2xn2,...' (pairs)")


def parse_ranks(text: str) -> int | tuple[int, ...]:
    """The CLI form of TT-ranks: ``"8"`` -> 8 (every bond), ``"4,8,4"`` -> ``(4, 8, 4)`` (one per bond).

    Raises ConfigError for anything else.
    """
    s = re.sub(r"\s", "", str(text)).lower()
    if not re.fullmatch(r"\d+(,\d+)*", s):
        raise ConfigError(f"TT-ranks {text!r} are not 'r' or 'r1,r2,...' (one per bond)")
    values = tuple(int(v) for v in s.split(","))
    return values[0] if len(values) == 1 else values


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy ints too; bools are not ranks


def _modes(shape: Any) -> Shape:
    """``shape`` (string, ints, pairs, or a mix) as a tuple of ``(m, n)`` pairs, or ConfigError."""
    raw = parse_shape(shape) if isinstance(shape, str) else shape
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ConfigError(f"TT shape {shape!r} is not a sequence of modes")
    modes = []
    for given in raw:
        mode = (given, given) if _is_int(given) else given
        if (not isinstance(mode, Sequence) or len(mode) != 2 or not all(_is_int(v) for v in mode)
                or min(mode) < 1):
            raise ConfigError(f"TT shape {shape!r}: mode {given!r} is not a positive int or (rows, cols) pair")
        modes.append((int(mode[0]), int(mode[1])))
    if len(modes) < 2:
        raise ConfigError(f"TT shape {shape!r} has {len(modes)} mode(s); a tensor train needs 2 or more")
    return tuple(modes)


def format_shape(modes: Sequence[Sequence[int]]) -> str:
    """The ``parse_shape`` string of ``modes``: ``"8x8x8"`` when all square, else ``"4x2,8x8"``."""
    if all(m == n for m, n in modes):
        return "x".join(str(m) for m, _ in modes)
    return ",".join(f"{m}x{n}" for m, n in modes)


def max_ranks(modes: Sequence[Sequence[int]], ranks: Sequence[int] | None = None) -> list[int]:
    """The largest useful TT-rank of each bond, given the requested ``ranks`` (None: unbounded).

    Bond k's unfolding is ``(m1 n1 ... mk nk) x (rest)``, so ``r_k <= min(prod left, prod right)``;
    with its neighbours' ranks fixed, also ``r_k <= r_{k-1} m_k n_k`` and ``r_k <= m_{k+1} n_{k+1}
    r_{k+1}`` (a larger r_k adds parameters but no expressive power, and TT-SVD could not fill it).
    """
    sizes = [m * n for m, n in modes]
    caps = [math.inf] * (len(modes) - 1) if ranks is None else list(ranks)
    left = 1
    for k in range(len(caps)):  # forward pass: r_k <= r_{k-1} m_k n_k
        caps[k] = left = min(caps[k], left * sizes[k])
    right = 1
    for k in reversed(range(len(caps))):  # backward pass: r_k <= m_{k+1} n_{k+1} r_{k+1}
        caps[k] = right = min(caps[k], right * sizes[k + 1])
    return [int(c) for c in caps]


def tt_svd(blocks: Tensor, modes: Sequence[Sequence[int]], ranks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """TT-SVD (Oseledets 2011, Algorithm 1) of a batch of matrices ``blocks`` ``(B, M, N)``.

    ``modes`` are ``(m_k, n_k)`` pairs with ``prod m = M``, ``prod n = N``; ``ranks`` the d - 1
    TT-ranks, each at most ``max_ranks(modes)``. Returns the cores ``(B, r_{k-1}, m_k, n_k, r_k)``
    and ``discarded`` ``(B, d - 1)``: per bond, the sum of the squared singular values that step
    dropped. ``||W - TT||_F <= sqrt(discarded.sum(-1))`` (Theorem 2.2); 0 at full TT-rank.
    Computes in ``blocks``' dtype (float64 for small unfoldings, float32 at least).
    """
    B, M, N = blocks.shape
    d = len(modes)
    # (B, m1..md, n1..nd) -> (B, m1, n1, m2, n2, ...): core k's indices sit next to each other.
    T = blocks.reshape(B, *(m for m, _ in modes), *(n for _, n in modes))
    T = T.permute(0, *(i for k in range(d) for i in (1 + k, 1 + d + k)))
    work = torch.promote_types(blocks.dtype, torch.float32)
    C = T.reshape(B, 1, -1)  # the remainder, (B, r_{k-1} * m_k n_k * rest) before each step
    cores, discarded, r_prev = [], [], 1
    for k, (m, n) in enumerate(modes[:-1]):
        C = C.reshape(B, r_prev * m * n, -1)
        dtype = torch.float64 if min(C.shape[-2:]) <= FLOAT64_MAX_DIM else work
        U, S, Vh = torch.linalg.svd(C.to(dtype), full_matrices=False)
        r = ranks[k]
        discarded.append(S[:, r:].pow(2).sum(-1))
        cores.append(U[:, :, :r].reshape(B, r_prev, m, n, r).to(work))
        C = (S[:, :r, None] * Vh[:, :r]).to(work)
        r_prev = r
    m, n = modes[-1]
    cores.append(C.reshape(B, r_prev, m, n, 1))
    lost = torch.stack(discarded, -1) if discarded else blocks.new_zeros(B, 0)
    return cores, lost.to(work)


def tt_dense(cores: Sequence[Tensor]) -> Tensor:
    """The matrices ``(B, M, N)`` of a train of cores ``(B, r_{k-1}, m_k, n_k, r_k)``."""
    B = cores[0].shape[0]
    X = cores[0].new_ones(B, 1, 1, 1)  # (B, rows so far, cols so far, bond)
    for G in cores:
        _, _, m, n, r = G.shape
        X = torch.einsum("bijr,brmns->bimjns", X, G).reshape(B, X.shape[1] * m, X.shape[2] * n, r)
    return X[..., 0]


def tt_apply(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """``x W_b^T`` for every matrix ``W_b`` of the train, ``x`` ``(P, N)`` -> ``(B, P, M)``.

    Contracts the column modes of ``x`` with one core at a time (the TT matrix-by-vector
    product), never forming ``W``: one transpose and one batched matmul per
    core, on a state ``(B, columns left, P, rows so far, bond, this core's column mode)`` of at most
    ``B P r max_k (m_1..m_k)(n_k..n_d)`` entries.
    """
    P, N = x.shape
    n = cores[0].shape[3]
    Z = x.reshape(P, n, N // n).permute(2, 0, 1).reshape(1, -1, n)  # bond r_0 = 1
    rows = 1
    for k, G in enumerate(cores):
        B, r_prev, m, n, r = G.shape
        Y = torch.matmul(Z, G.transpose(2, 3).reshape(B, r_prev * n, m * r))  # (b, left P rows, m r)
        rows *= m
        if k + 1 < len(cores):
            # Bring the next column mode (the most significant of those left) next to the bond.
            n = cores[k + 1].shape[3]
            Z = Y.reshape(Y.shape[0], n, -1).transpose(1, 2).reshape(Y.shape[0], -1, r * n)
    return Y.reshape(Y.shape[0], P, rows)  # no columns left, r_d = 1


class TensorTrain(nn.Module):
    """``W`` = one TT-matrix per ``rows x cols`` gate block (or one for the whole stacked weight).

    Options (keyword-only; ``check`` normalises them):

    - ``shape``: the modes, ``(m1, m2, ...)`` square modes (``prod = rows = cols``), or pairs
      ``((m1, n1), (m2, n2), ...)`` with ``prod m = rows``, ``prod n = cols``, or a ``parse_shape``
      string. With ``joint=True`` the row modes multiply to ``gates * rows``, or to ``rows``: then
      the gate mode ``(gates, 1)`` is put first. Normalised to a list of ``[m, n]`` pairs.
    - ``ranks``: one int for every bond, or one per bond (``len(shape) - 1``, counting the gate
      mode's bond). A rank above its bond's maximal rank (``max_ranks``) is capped to it, with a
      ``warnings.warn`` line (none for an int on the added gate bond, whose maximum is ``gates``).
    - ``joint``: one train for the whole ``(gates*rows, cols)`` weight (fully tensorized RNN).

    Originals: the d cores, ``(B, r_{k-1}, m_k, n_k, r_k)``, ``B = 1 if joint else gates``.
    Raises ConfigError (RankError for a rank below 1) naming the bad value and the block shape.
    """

    structure: ClassVar[str] = "tt"

    def __init__(self, gates: int, rows: int, cols: int, *, ranks: int | Sequence[int],
                 shape: str | Sequence[int] | Sequence[Sequence[int]], joint: bool = False):
        super().__init__()
        opts = self.check(gates, rows, cols, ranks=ranks, shape=shape, joint=joint)
        self.gates, self.rows, self.cols = gates, rows, cols
        self.modes: Shape = tuple((m, n) for m, n in opts["shape"])
        self.ranks: tuple[int, ...] = tuple(opts["ranks"])
        self.joint: bool = opts["joint"]
        # Cores fitted ahead of registration (the converter validates and fits every target
        # before touching the model); consumed by the first right_inverse.
        self._pending: tuple[Tensor, ...] | None = None

    @classmethod
    def check(cls, gates: int, rows: int, cols: int, *, ranks: int | Sequence[int],
              shape: str | Sequence[int] | Sequence[Sequence[int]], joint: bool = False) -> dict:
        """The normalised options ``{"shape": [[m, n], ...], "ranks": [...], "joint": bool}``.

        Touches no tensor. Raises ConfigError when the shape does not factor the block or the
        ranks are malformed, RankError for a rank below 1; warns (one line) when ranks are capped.
        """
        if not all(_is_int(v) and v >= 1 for v in (gates, rows, cols)):
            raise ConfigError(f"TT needs positive gates, rows and cols, got gates={gates!r}, rows={rows!r}, "
                              f"cols={cols!r}")
        block = f"{gates} block(s) of {rows}x{cols}"
        if not isinstance(joint, bool):
            raise ConfigError(f"TT joint={joint!r} is not a bool (for {block})")
        modes = _modes(shape)
        M, N = math.prod(m for m, _ in modes), math.prod(n for _, n in modes)
        gate_mode = joint and gates > 1 and M == rows and N == cols
        if gate_mode:
            modes = ((gates, 1),) + modes  # the gate index is the most significant row mode
        elif (M, N) != ((gates if joint else 1) * rows, cols):
            want = f"{'joint ' if joint else ''}{(gates if joint else 1) * rows}x{cols}"
            hint = " (the stacked gates: use joint=True)" if (not joint and (M, N) == (gates * rows, cols)) else ""
            raise ConfigError(f"TT shape {format_shape(modes)} is {M}x{N}, not {want} for {block}{hint}")
        bonds = len(modes) - 1
        if _is_int(ranks):
            wanted = [int(ranks)] * bonds
        elif (isinstance(ranks, Sequence) and not isinstance(ranks, str) and all(_is_int(r) for r in ranks)
              and len(ranks) == bonds):
            wanted = [int(r) for r in ranks]
        else:
            raise ConfigError(f"TT-ranks {ranks!r} are not one int or {bonds} ints (one per bond of "
                              f"shape {format_shape(modes)}) for {block}")
        if min(wanted) < 1:
            raise RankError(f"TT-ranks {ranks!r} must be >= 1 for {block}")
        capped = max_ranks(modes, wanted)
        # An int meant for the user's own bonds says nothing about the added gate bond: no note there.
        quiet = 1 if gate_mode and _is_int(ranks) else 0
        notes = [f"bond {k + 1} {w} -> {c}" for k, (w, c) in enumerate(zip(wanted, capped)) if c < w and k >= quiet]
        if notes:
            warnings.warn(f"TT-ranks capped to each bond's maximal rank for {block}, shape "
                          f"{format_shape(modes)}: {', '.join(notes)}", UserWarning, stacklevel=2)
        return {"shape": [[m, n] for m, n in modes], "ranks": capped, "joint": joint}

    def options(self) -> dict:
        """The normalised options: ``TensorTrain(gates, rows, cols, **options())`` rebuilds this."""
        return {"shape": [[m, n] for m, n in self.modes], "ranks": list(self.ranks), "joint": self.joint}

    @property
    def batch(self) -> int:
        """How many trains: 1 when joint, else one per gate block."""
        return 1 if self.joint else self.gates

    def core_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each original: ``(B, r_{k-1}, m_k, n_k, r_k)``."""
        r = (1, *self.ranks, 1)
        return [(self.batch, r[k], m, n, r[k + 1]) for k, (m, n) in enumerate(self.modes)]

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.core_shapes())

    def apply_macs(self, batch: int) -> int:
        """Multiply-adds of ``apply`` on ``batch`` input rows (``tt_apply``'s matmuls), for a cost
        model: ``sum_k B P (m_1..m_k)(n_{k+1}..n_d) r_{k-1} n_k r_k``; dense is ``gates rows cols P``."""
        total, rows, left = 0, 1, self.cols
        for _, r_prev, m, n, r in self.core_shapes():
            rows, left = rows * m, left // n
            total += self.batch * batch * rows * left * r_prev * n * r
        return total

    def forward(self, *cores: Tensor) -> Tensor:
        return tt_dense(cores).reshape(self.gates * self.rows, self.cols)

    def right_inverse(self, W: Tensor) -> tuple[Tensor, ...]:
        cores, self._pending = self._pending, None
        if cores is None:
            cores = self.fit(W)
        return tuple(c.to(device=W.device, dtype=W.dtype) for c in cores)

    def fit(self, W: Tensor) -> tuple[Tensor, ...]:
        """TT-SVD cores of the dense weight ``W`` ``(gates*rows, cols)``, in W's dtype and device.

        Error: ``||W - forward(*fit(W))||_F <= sqrt(sum of discarded squared singular values)``
        (``tt_svd``; Oseledets 2011, Theorem 2.2), 0 at full TT-rank. Raises ConfigError for a
        weight of another shape, WeightError for NaN/Inf.
        """
        return self.fit_with_bound(W)[0]

    def fit_with_bound(self, W: Tensor) -> tuple[tuple[Tensor, ...], float]:
        """``fit(W)`` and its error bound ``sqrt(sum discarded^2)`` over all trains and bonds."""
        if tuple(W.shape) != (self.gates * self.rows, self.cols):
            raise ConfigError(f"weight of shape {tuple(W.shape)} is not {self.gates} block(s) of "
                              f"{self.rows}x{self.cols}")
        if not W.dtype.is_floating_point or not torch.isfinite(W).all():
            raise WeightError(f"weight of shape {tuple(W.shape)} is not finite floating point")
        blocks = W.detach().reshape(self.batch, -1, self.cols)
        cores, lost = tt_svd(blocks, self.modes, self.ranks)
        bound = float(lost.sum().clamp_min(0).sqrt())
        return tuple(c.to(dtype=W.dtype, device=W.device).contiguous() for c in cores), bound

    def apply(self, x: Tensor, *cores: Tensor) -> Tensor:
        """``x @ W.T`` for ``x`` ``(..., cols)`` -> ``(..., gates*rows)``, core by core (``tt_apply``)."""
        lead = x.shape[:-1]
        y = tt_apply(x.reshape(-1, self.cols), cores)  # (B, P, M)
        return y.transpose(0, 1).reshape(*lead, self.gates * self.rows)

    def extra_repr(self) -> str:
        return (f"gates={self.gates}, rows={self.rows}, cols={self.cols}, shape={format_shape(self.modes)}, "
                f"ranks={list(self.ranks)}, joint={self.joint}")


def random_originals(gates: int, rows: int, cols: int, *, options: dict, bound: float,
                     dtype: torch.dtype | None = None, device: torch.device | None = None) -> tuple[Tensor, ...]:
    """Random cores for training from scratch, ``W`` entries with the variance of ``U(-bound, bound)``.

    An entry of ``W`` is a sum of ``R = r_1 ... r_{d-1}`` products of d independent core entries;
    with every core entry ``U(-b, b)`` (variance ``v = b^2/3``) its variance is ``R v^d``, so
    ``v = (bound^2 / 3 / R)^(1/d)``. ``options`` as for ``TensorTrain`` (normalised by ``check``).
    """
    tt = TensorTrain(gates, rows, cols, **options)
    shapes = tt.core_shapes()
    v = (bound ** 2 / 3 / math.prod(tt.ranks)) ** (1 / len(shapes))
    b = math.sqrt(3 * v)
    return tuple(torch.empty(s, dtype=dtype, device=device).uniform_(-b, b) for s in shapes)


def tensor_train(module: nn.Module, name: str = "weight", *, ranks: int | Sequence[int],
                 shape: str | Sequence[int] | Sequence[Sequence[int]], gates: int = 1, joint: bool = False,
                 originals: Sequence[Tensor] | None = None) -> nn.Module:
    """Register a TT-matrix parametrization (``TensorTrain``) on ``module.<name>``; returns ``module``.

    The weight ``(gates*rows, cols)`` is fitted by TT-SVD (never re-sampled), or takes the given
    ``originals`` (cores already fitted, shape-checked by the caller). Raises ConfigError for a
    weight that is not 2-D, is already parametrized, does not split into ``gates`` blocks, or
    options that do not fit (``TensorTrain.check``).

        >>> gru_cell = torch.nn.GRUCell(16, 16)
        >>> tensor_train(gru_cell, "weight_hh", ranks=4, shape=(4, 4), gates=3, joint=True)  # doctest: +ELLIPSIS
        ParametrizedGRUCell(...)
    """
    weight = registrable_weight(module, name, gates)
    param = TensorTrain(gates, weight.shape[0] // gates, weight.shape[1], ranks=ranks, shape=shape, joint=joint)
    if originals is not None:
        param._pending = tuple(originals)
    own_class(module)  # a deepcopy shares the parametrized class: leave the original alone
    parametrize.register_parametrization(module, name, param, unsafe=originals is not None)
    return module
