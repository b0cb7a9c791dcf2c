"""Recurrent cells whose weights are factored: subclasses of ``nn.GRUCell``/``nn.LSTMCell``/``nn.RNNCell``.

Autoregressive decoders, neural vocoders and streaming detectors keep their state in cells and
run one step per call. These classes take every argument of their parent plus ``rank``,
``diag``, ``tied`` and ``include_input``, so they drop into such code (``isinstance`` checks,
unbatched input, ``hx=None``). The converter gives converted cells the same classes, in place.

A cell's ``forward`` reads ``weight_ih``/``weight_hh`` once per call, so the parametrization
works as is (one rebuild of each factored weight per step); ``lrcompress.accelerate`` attaches
a factored step that never forms ``L R``.

    >>> cell = LowRankGRUCell(80, 512, rank=64, diag=True)
    >>> h = cell(torch.zeros(1, 80))          # (1, 512); hx=None starts from zeros
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from ..config import RankValue


class FactoredCell:
    """Mixin: run the accelerated step when one is attached, else the parent's dense forward."""

    _dense_class: type[nn.RNNCellBase]

    def forward(self, input, hx=None):
        # lrcompress.accelerate() attaches a factored step; it answers None to use the dense path.
        accelerated = self.__dict__.get("_lrc_acceleration")
        if accelerated is not None:
            result = accelerated.run(self, input, hx)
            if result is not None:
                return result
        return super().forward(input, hx)

    def reset_parameters(self) -> None:
        # RNNCellBase draws every parameter U(-1/sqrt(h), 1/sqrt(h)), factors included: re-draw
        # those so that the product, not each factor, has that spread.
        super().reset_parameters()
        if parametrize.is_parametrized(self):
            from ..convert import reset_factors

            reset_factors(self)


def _from_scratch(cell: nn.RNNCellBase, rank: RankValue, diag: bool, tied: bool, include_input: bool) -> None:
    from ..convert import factor_from_scratch  # convert imports this module

    factor_from_scratch(cell, rank=rank, diag=diag, tied=tied, include_input=include_input)


class LowRankGRUCell(FactoredCell, nn.GRUCell):
    """``nn.GRUCell`` with a low-rank (``diag=True``: plus diagonal) recurrent matrix.

    >>> cell = LowRankGRUCell(80, 512, rank=64, diag=True)
    >>> h = cell(torch.zeros(4, 80), torch.zeros(4, 512))
    """

    _dense_class = nn.GRUCell

    def __init__(self, *args, rank: RankValue, diag: bool = False, tied: bool = False,
                 include_input: bool = False, **kwargs):
        nn.GRUCell.__init__(self, *args, **kwargs)
        _from_scratch(self, rank, diag, tied, include_input)


class LowRankLSTMCell(FactoredCell, nn.LSTMCell):
    """``nn.LSTMCell`` with a factored recurrent matrix; takes and returns ``(h, c)``."""

    _dense_class = nn.LSTMCell

    def __init__(self, *args, rank: RankValue, diag: bool = False, tied: bool = False,
                 include_input: bool = False, **kwargs):
        nn.LSTMCell.__init__(self, *args, **kwargs)
        _from_scratch(self, rank, diag, tied, include_input)


class LowRankRNNCell(FactoredCell, nn.RNNCell):
    """``nn.RNNCell`` (tanh or relu) with a factored recurrent matrix."""

    _dense_class = nn.RNNCell

    def __init__(self, *args, rank: RankValue, diag: bool = False, tied: bool = False,
                 include_input: bool = False, **kwargs):
        nn.RNNCell.__init__(self, *args, **kwargs)
        _from_scratch(self, rank, diag, tied, include_input)


_FACTORED = {nn.GRUCell: LowRankGRUCell, nn.LSTMCell: LowRankLSTMCell, nn.RNNCell: LowRankRNNCell}


def factored_cell_class(cls: type[nn.RNNCellBase]) -> type:
    """The factored counterpart of a cell class (a cached subclass for user subclasses)."""
    if issubclass(cls, FactoredCell):
        return cls
    if cls not in _FACTORED:
        _FACTORED[cls] = type(f"LowRank{cls.__name__}", (FactoredCell, cls), {"_dense_class": cls})
    return _FACTORED[cls]
