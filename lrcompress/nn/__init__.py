"""Ready layers for training factored models from scratch."""

from .cells import FactoredCell, LowRankGRUCell, LowRankLSTMCell, LowRankRNNCell
from .highway import Highway
from .rnn import FactoredRNN, LowRankGRU, LowRankLSTM, LowRankRNN

__all__ = ["FactoredCell", "FactoredRNN", "Highway", "LowRankGRU", "LowRankGRUCell", "LowRankLSTM",
           "LowRankLSTMCell", "LowRankRNN", "LowRankRNNCell"]
