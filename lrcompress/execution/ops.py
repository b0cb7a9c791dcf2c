"""One recurrent layer's weights in the layouts the step loop multiplies fastest.

A weight of G stacked gate blocks becomes an ``Op``: either ``dense`` (``W^T``), or the factors
as ``right`` (``R^T``, ``(n, G d)``, or ``(n, d)`` when tied) and ``left`` (``(G, d, m)`` per gate,
or ``(d, G m)`` when tied), plus ``diag`` ``(G, 1, m)`` and the bias shaped for a fused
``addmm``/``baddbmm``. Nothing here forms ``L R``.

    >>> gru = LowRankGRU(8, 32, rank=4)
    >>> cell = prepare(gru, 0, 0)
    >>> cell.hh.left.shape
    torch.Size([3, 4, 32])
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn

from ..parametrizations import factorization


class Op(NamedTuple):
    """``x -> blocks(x W^T + b)`` as (G, rows, m): dense or factored, never both."""

    gates: int
    dense: Optional[Tensor]  # W^T, (n, G m); or execution.structured's stand-in for a Kronecker/TT W^T
    right: Optional[Tensor]  # R^T, (n, G d) untied or (n, d) tied
    left: Optional[Tensor]  # L^T per gate (G, d, m) untied, or (d, G m) tied
    diag: Optional[Tensor]  # (G, 1, m)
    bias: Optional[Tensor]  # (G m,) for dense and tied, (G, 1, m) untied

    @property
    def factored(self) -> bool:
        return self.dense is None


class Cell(NamedTuple):
    """The weights of one layer and direction: input, recurrent and (LSTM) projection ops."""

    ih: Op
    hh: Op
    hr: Optional[Op]


def prepare(module: nn.RNNBase, layer: int, direction: int) -> Cell:
    """The ``Cell`` of ``module``'s ``layer`` (0-based) and ``direction`` (0 forward, 1 reverse)."""
    gates = GATES[module.mode]
    suffix = f"l{layer}{'_reverse' if direction else ''}"
    ih = prepare_op(module, f"weight_ih_{suffix}", gates, f"bias_ih_{suffix}")
    hh = prepare_op(module, f"weight_hh_{suffix}", gates, f"bias_hh_{suffix}")
    hr = prepare_op(module, f"weight_hr_{suffix}", 1, None) if getattr(module, "proj_size", 0) > 0 else None
    return Cell(ih, hh, hr)


def prepare_op(module: nn.Module, name: str, gates: int, bias_name: str | None) -> Op:
    """The ``Op`` of ``module.<name>``: factors when lrcompress factored it, else the dense weight."""
    bias = getattr(module, bias_name) if bias_name and getattr(module, "bias", False) else None
    p = factorization(module, name)
    if p is None:
        return Op(gates, getattr(module, name).t(), None, None, None, bias)
    params = module.parametrizations[name]
    L, R = params.original0, params.original1
    _, m, d = L.shape
    right = R.reshape(-1, R.shape[-1]).t()
    if p.tied:
        left = L.reshape(gates * m, d).t().contiguous()
    else:
        left = L.transpose(1, 2).contiguous()
        bias = None if bias is None else bias.view(gates, 1, m)
    diag = params.original2.unsqueeze(1) if p.diag else None
    return Op(gates, None, right, left, diag, bias)


def sources(module: nn.RNNBase) -> list[Tensor]:
    """The tensors every prepared cell derives from: a change in any of them invalidates a cache."""
    return [t for _, t in module.named_parameters()]


def version(module: nn.Module) -> tuple:
    """A key that changes when any weight is replaced, moved, or modified in place.

    Tensors made under ``torch.inference_mode()`` keep no version counter (reading ``_version``
    raises), so they enter the key by identity only; ``tracked`` tells whether the key also sees
    in-place changes.
    """
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device, t.shape)
                 for t in sources(module))


def tracked(key: tuple) -> bool:
    """Whether a ``version`` key sees in-place changes of every weight (no inference tensors,
    whose entries hold ``None`` for the version)."""
    return all(entry[1] is not None for entry in key)


GATES = {"GRU": 3, "LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1}
