"""Ready layers for training factored models from scratch."""

from .cells import FactoredCell, LowRankGRUCell, LowRankLSTMCell, LowRankRNNCell
from .highway import Highway
from .rnn import FactoredRNN, LowRankGRU, LowRankLSTM, LowRankRNN
from .scornn import ScoRNN, scornn_optimizer
from .structured import structured_rnn

__all__ = ["FactoredCell", "FactoredRNN", "Highway", "LowRankGRU", "LowRankGRUCell", "LowRankLSTM",
           "LowRankLSTMCell", "LowRankRNN", "LowRankRNNCell", "ScoRNN", "scornn_optimizer", "structured_rnn"]
