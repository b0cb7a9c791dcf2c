"""lrcompress: low-rank and low-rank-plus-diagonal compression of recurrent networks.

>>> import lrcompress as lrc
>>> report = lrc.compress(model, rank=24, diag=True)   # doctest: +SKIP
"""

from .version import __version__
from .config import CompressionConfig, RankRule, TargetSpec
from .convert import apply, compress, count_params, merge
from .execution import accelerate
from .errors import (ConfigError, FormatError, LRCompressError, OutputExistsError, RankError, TargetError,
                     WeightError)
from .factorize import fit_low_rank, fit_low_rank_plus_diagonal
from .io import load_model, save_model
from .parametrizations import LowRank, LowRankPlusDiagonal, low_rank
from .report import Report
from .checkpoints import fold_weight_norm, read_checkpoint, rename_keys

__all__ = [
    "CompressionConfig", "ConfigError", "FormatError", "LRCompressError", "LowRank", "LowRankPlusDiagonal",
    "OutputExistsError", "RankError", "RankRule", "Report", "TargetError", "TargetSpec", "WeightError",
    "__version__", "accelerate", "apply", "compress", "count_params", "fit_low_rank", "fit_low_rank_plus_diagonal",
    "load_model", "low_rank", "merge", "save_model",
    "fold_weight_norm", "read_checkpoint", "rename_keys",
]
