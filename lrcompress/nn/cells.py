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

from .rnn import Factored, factored_subclass


class FactoredCell(Factored):
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


class LowRankGRUCell(FactoredCell, nn.GRUCell):
    """``nn.GRUCell`` with a low-rank (``diag=True``: plus diagonal) recurrent matrix.

    >>> cell = LowRankGRUCell(80, 512, rank=64, diag=True)
    >>> h = cell(torch.zeros(4, 80), torch.zeros(4, 512))
    """

    _dense_class = nn.GRUCell


class LowRankLSTMCell(FactoredCell, nn.LSTMCell):
    """``nn.LSTMCell`` with a factored recurrent matrix; takes and returns ``(h, c)``."""

    _dense_class = nn.LSTMCell


class LowRankRNNCell(FactoredCell, nn.RNNCell):
    """``nn.RNNCell`` (tanh or relu) with a factored recurrent matrix."""

    _dense_class = nn.RNNCell


_FACTORED = {nn.GRUCell: LowRankGRUCell, nn.LSTMCell: LowRankLSTMCell, nn.RNNCell: LowRankRNNCell}


def factored_cell_class(cls: type[nn.RNNCellBase]) -> type:
    """The factored counterpart of a cell class."""
    return factored_subclass(cls, FactoredCell, _FACTORED)
