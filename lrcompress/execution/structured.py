"""Fast execution of recurrent layers whose weights are Kronecker or tensor-train matrices.

A ``StructuredWeight`` stands in for ``W^T`` in a prepared ``Op`` (its ``dense`` slot). The step
loops of ``loops`` (plain Python, ``loops.PLAIN``) multiply by ``W^T`` with ``torch.mm(x, W^T)``
or ``torch.addmm(b, x, W^T)``; for a ``StructuredWeight`` torch hands these calls to its
``__torch_function__`` (PyTorch's protocol for tensor-like types), which answers with the
parametrization's own product ``apply(x, *originals)`` (``+ b``), never forming ``W``:

- Kronecker: ``(A kron B) vec(X) = vec(B X A^T)``, one small factor at a time
  (``Kronecker.apply``; Van Loan 2000, the KRU's product, Jose et al. 2018);
- tensor train: the TT matrix-by-vector product, core by core (``TensorTrain.apply``;
  Oseledets 2011, sec. 4.3).

So ``runner.forward`` runs every form it handles (padded, packed, unbatched, bidirectional,
several layers, an initial state; ``nn.GRU``'s eq. 7, the paper's GRU eq. 6, ``nn.LSTM`` with
``proj_size``, ``nn.RNN``) on such layers unchanged, input and recurrent products alike, and
autograd runs through the loop (the gradients reach the factors and cores; no custom backward).
Low-rank and dense weights of the same layer keep their usual ``Op`` (``ops.prepare_op``):
``loops.gates`` handles both kinds in plain Python. Orthogonal (scaled Cayley) weights are not
given one: ``W`` is ``n x n`` anyway, they keep the dense rebuild.

    >>> cells = [prepare(gru, 0, 0)]                                     # doctest: +SKIP
    >>> out, h = runner.forward(gru, x, None, cells, loops.PLAIN)       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..structures import build, structure_of, structured
from .cost import WeightShape
from .ops import GATES, Cell, Op, prepare_op

# The structures with a product that never forms W (``apply``), and so a loop of their own.
FAST = ("kronecker", "tt")


class StructuredWeight:
    """``W^T`` ``(cols, gates*rows)`` of a Kronecker or TT weight, as the step loops use it.

    ``torch.mm(x, w)`` is ``x W^T`` and ``torch.addmm(b, x, w)`` is ``b + x W^T`` for ``x``
    ``(rows_x, cols)``, by the parametrization's ``apply`` on ``originals``; ``w.narrow(1, start,
    length)`` is the weight of whole gate blocks ``start/rows .. (start+length)/rows`` (the paper
    GRU's split: ``loops._part``). Any other torch function raises ``TypeError``. ``scale``:
    a column scale of ``W`` (``W diag(scale)``, recurrent dropout), applied to ``x``.
    """

    def __init__(self, param: nn.Module, originals: tuple[Tensor, ...], *, scale: Tensor | None = None):
        self.param, self.originals, self.scale = param, tuple(originals), scale
        self.structure = structure_of(param)
        self.gates, self.rows, self.cols = param.gates, param.rows, param.cols
        self.shape = (self.cols, self.gates * self.rows)  # as W^T's
        self._parts: dict[tuple[int, int], _Part] = {}

    def __repr__(self) -> str:
        return f"StructuredWeight({self.structure}, gates={self.gates}, rows={self.rows}, cols={self.cols})"

    def product(self, x: Tensor) -> Tensor:
        """``x W^T``: ``(..., cols)`` -> ``(..., gates*rows)``."""
        if self.scale is not None:
            x = x * self.scale
        return self.param.apply(x, *self.originals)

    def narrow(self, dim: int, start: int, length: int) -> "_Part":
        """Gate blocks of ``W^T`` (columns ``start .. start+length``, whole blocks only)."""
        if dim != 1 or start % self.rows or length % self.rows or not 0 <= start < start + length <= self.shape[1]:
            raise ConfigError(f"narrow({dim}, {start}, {length}) does not select whole gate blocks of {self!r}")
        key = (start // self.rows, length // self.rows)
        if key not in self._parts:  # the paper GRU cuts the same blocks at every step: make them once
            self._parts[key] = _Part(self, *key)
        return self._parts[key]

    def scaled(self, keep: Tensor) -> "StructuredWeight":
        """The weight ``W diag(keep)`` (``keep`` ``(cols,)``)."""
        scale = keep if self.scale is None else self.scale * keep
        return StructuredWeight(self.param, self.originals, scale=scale)

    def weight_shape(self, recurrent: bool) -> WeightShape:
        """The cost model's view: ``apply`` multiply-adds per input row, parameters, rebuild cost."""
        return WeightShape(self.gates, self.rows, self.cols, recurrent=recurrent,
                           apply_macs=self.param.apply_macs(1), params=self.param.parameter_count(),
                           rebuild_macs=rebuild_macs(self.param), calls=contractions(self.param))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs)


class _Part(StructuredWeight):
    """Gate blocks ``first .. first+count`` of a ``StructuredWeight``, with their own product."""

    def __init__(self, whole: StructuredWeight, first: int, count: int):
        self.param, self.originals, self.scale = whole.param, whole.originals, whole.scale
        self.structure, self.gates, self.rows, self.cols = whole.structure, count, whole.rows, whole.cols
        self.shape = (self.cols, count * self.rows)
        self._parts = {}
        self._apply = _part_product(whole, first, count)

    def product(self, x: Tensor) -> Tensor:
        if self.scale is not None:
            x = x * self.scale
        return self._apply(x)

    def narrow(self, dim: int, start: int, length: int) -> "_Part":
        raise ConfigError(f"{self!r} is already a part of a weight: narrow the whole weight")

    def scaled(self, keep: Tensor) -> "StructuredWeight":
        raise ConfigError(f"{self!r} is already a part of a weight: scale the whole weight, then narrow it")


def _dispatch(func, args, kwargs):
    """``torch.mm(x, w)`` and ``torch.addmm(b, x, w)`` for a ``StructuredWeight`` ``w``."""
    if not kwargs:
        if func is torch.mm and len(args) == 2 and isinstance(args[1], StructuredWeight):
            return args[1].product(args[0])
        if func is torch.addmm and len(args) == 3 and isinstance(args[2], StructuredWeight):
            return torch.add(args[2].product(args[1]), args[0])
    return NotImplemented  # torch then raises TypeError naming the function


def _part_product(whole: StructuredWeight, first: int, count: int) -> Callable[[Tensor], Tensor]:
    """``x -> x W_part^T`` for gate blocks ``first .. first+count``, from the blocks' own factors
    when each gate block has its own (Kronecker, per-gate TT, a joint TT whose first row mode is
    the gate), else the whole product cut to those blocks."""
    p, F, rows, cols = whole.param, whole.originals, whole.rows, whole.cols
    if count == whole.gates:
        return lambda x: p.apply(x, *F)
    if whole.structure == "kronecker" or (whole.structure == "tt" and not p.joint):
        # A module for `count` blocks with the same options, on the blocks' slices of the originals.
        sub = build(whole.structure, count, rows, cols, p.options())
        part = tuple(t.narrow(0, first, count) for t in F)
        return lambda x: sub.apply(x, *part)
    if whole.structure == "tt" and tuple(p.modes[0]) == (whole.gates, 1):
        from ..structured.tensor_train import tt_apply

        # The gate index is the most significant row mode: its core's slice is the blocks' train.
        part = (F[0].narrow(2, first, count), *F[1:])
        return lambda x: tt_apply(x.reshape(-1, cols), part)[0].reshape(*x.shape[:-1], count * rows)
    return lambda x: p.apply(x, *F).narrow(-1, first * rows, count * rows)


def fast(module: nn.Module, name: str) -> nn.Module | None:
    """The Kronecker or TT parametrization on ``module.<name>``, or None (dense, low rank, orthogonal)."""
    p = structured(module, name)
    return p if p is not None and structure_of(p) in FAST else None


def has_fast_weights(module: nn.RNNBase) -> bool:
    """Whether any weight of the recurrent layer is a Kronecker or TT matrix."""
    return any(fast(module, n) is not None for n in module._flat_weights_names)


def uses_structured(cells: list[Cell]) -> bool:
    """Whether prepared cells hold a ``StructuredWeight`` (they must run on ``loops.PLAIN``)."""
    return any(isinstance(op.dense, StructuredWeight) for cell in cells for op in cell if op is not None)


def prepare(module: nn.RNNBase, layer: int, direction: int) -> Cell:
    """``ops.prepare`` for a layer with Kronecker/TT weights: those become ``StructuredWeight``
    ops on the live originals (nothing is copied or formed), every other weight its usual ``Op``."""
    gates = GATES[module.mode]
    suffix = f"l{layer}{'_reverse' if direction else ''}"
    ih = _op(module, f"weight_ih_{suffix}", gates, f"bias_ih_{suffix}")
    hh = _op(module, f"weight_hh_{suffix}", gates, f"bias_hh_{suffix}")
    hr = _op(module, f"weight_hr_{suffix}", 1, None) if getattr(module, "proj_size", 0) > 0 else None
    return Cell(ih, hh, hr)


def _op(module: nn.Module, name: str, gates: int, bias_name: str | None) -> Op:
    p = fast(module, name)
    if p is None:
        return prepare_op(module, name, gates, bias_name)
    bias = getattr(module, bias_name) if bias_name and getattr(module, "bias", False) else None
    plist = module.parametrizations[name]
    # One original per Kronecker factor or TT core: original0 .. original{k-1}.
    originals = tuple(getattr(plist, f"original{i}") for i in range(contractions(p)))
    return Op(gates, StructuredWeight(p, originals), None, None, None, bias)


def rebuild_macs(p: nn.Module) -> int:
    """Multiply-adds of forming the dense ``W`` once (``forward``), for the cost model.

    Kronecker: the running product of the first factors, then the last one summing the terms,
    ``gates terms sum_{i>=2} (m_1..m_i)(n_1..n_i)``. TT (``tt_dense``): core k costs
    ``B (m_1..m_k)(n_1..n_k) r_{k-1} r_k``.
    """
    if structure_of(p) == "kronecker":
        total, rows, cols = 0, p.shapes[0][0], p.shapes[0][1]
        for m, n in p.shapes[1:]:
            rows, cols = rows * m, cols * n
            total += p.gates * p.terms * rows * cols
        return total
    total, rows, cols = 0, 1, 1
    for _, r_prev, m, n, r in p.core_shapes():
        rows, cols = rows * m, cols * n
        total += p.batch * rows * cols * r_prev * r
    return total


def contractions(p: nn.Module) -> int:
    """Contractions of one ``apply``, one per Kronecker factor or TT core (each an einsum or
    matmul with its reshapes): the per-step overhead the cost model charges beyond the
    multiply-adds. Also the number of originals."""
    return len(p.shapes) if structure_of(p) == "kronecker" else len(p.modes)
