"""Ready layers for training factored models from scratch."""

from .highway import Highway
from .rnn import FactoredRNN, LowRankGRU, LowRankLSTM, LowRankRNN

__all__ = ["FactoredRNN", "Highway", "LowRankGRU", "LowRankLSTM", "LowRankRNN"]
