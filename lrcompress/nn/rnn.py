"""Recurrent layers whose weights are factored: subclasses of ``nn.GRU``/``nn.LSTM``/``nn.RNN``.

They take every argument of their parent plus ``rank``, ``diag``, ``tied``, so they drop into
code that expects ``nn.GRU`` (``isinstance`` checks, PackedSequence, initial states). The
converter gives converted layers the same classes, in place.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.nn.utils import parametrize

from ..config import RankValue


class Factored:
    """What every factored recurrent class shares: built from scratch with random factors, and
    ``reset_parameters`` re-draws them (the dense class would draw each factor like a weight)."""

    _dense_class: type[nn.Module]

    def __init__(self, *args, rank: RankValue, diag: bool = False, tied: bool = False, include_input: bool = False,
                 **kwargs):
        options = {"include_projection": kwargs.pop("include_projection")} if "include_projection" in kwargs else {}
        self._dense_class.__init__(self, *args, **kwargs)
        from ..convert import factor_from_scratch  # convert imports this module

        factor_from_scratch(self, rank=rank, diag=diag, tied=tied, include_input=include_input, **options)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if parametrize.is_parametrized(self):
            from ..convert import reset_factors

            reset_factors(self)


def factored_subclass(cls: type, mixin: type, registry: dict[type, type]) -> type:
    """``cls`` with ``mixin`` in front: the factored counterpart of a dense class (cached, so a
    user's subclass of ``nn.GRU`` gets one class for all its converted instances)."""
    if issubclass(cls, mixin):
        return cls
    if cls not in registry:
        registry[cls] = type(f"LowRank{cls.__name__}", (mixin, cls), {"_dense_class": cls})
    return registry[cls]


class FactoredRNN(Factored):
    """Mixin: rebuild each factored weight once per forward, then run the dense kernel."""

    _dense_class: type[nn.RNNBase]

    def forward(self, input, hx=None):
        # lrcompress.accelerate() attaches a factored execution; it answers None to use this path.
        accelerated = self.__dict__.get("_lrc_acceleration")
        if accelerated is not None:
            result = accelerated.run(self, input, hx)
            if result is not None:
                return result
        # RNNBase.forward reads every weight twice (change check, then refresh) and would try to
        # flatten them in place on CUDA; caching makes one rebuild per call, and pre-seeding the
        # refs means RNNBase sees no change and never touches the rebuilt tensors.
        with parametrize.cached():
            self._flat_weights = [getattr(self, n) if hasattr(self, n) else None for n in self._flat_weights_names]
            self._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in self._flat_weights]
            try:
                return super().forward(input, hx)
            finally:
                self._init_flat_weights()

    def _init_flat_weights(self) -> None:
        # Rebuilt weights are autograd outputs: holding one here between calls would pin its graph
        # and break deepcopy/pickling, so factored weights are left as None until the next forward.
        self._flat_weights = [None if parametrize.is_parametrized(self, n) else getattr(self, n, None)
                              for n in self._flat_weights_names]
        self._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in self._flat_weights]


class LowRankGRU(FactoredRNN, nn.GRU):
    """``nn.GRU`` with low-rank (``diag=True``: plus diagonal) recurrent matrices.

    >>> gru = LowRankGRU(51, 128, rank=24, diag=True, batch_first=True)
    >>> out, h = gru(torch.zeros(2, 10, 51))
    """

    _dense_class = nn.GRU


class LowRankLSTM(FactoredRNN, nn.LSTM):
    """``nn.LSTM`` with factored recurrent matrices (``proj_size`` supported; no diagonal on the
    non-square ``4h x p`` blocks, and ``include_projection`` also factors ``weight_hr``)."""

    _dense_class = nn.LSTM


class LowRankRNN(FactoredRNN, nn.RNN):
    """``nn.RNN`` (tanh or relu) with factored recurrent matrices."""

    _dense_class = nn.RNN


_FACTORED = {nn.GRU: LowRankGRU, nn.LSTM: LowRankLSTM, nn.RNN: LowRankRNN}


def factored_class(cls: type[nn.RNNBase]) -> type:
    """The factored counterpart of a recurrent layer class."""
    return factored_subclass(cls, FactoredRNN, _FACTORED)
