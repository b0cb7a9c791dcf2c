"""lrcompress: low-rank and low-rank-plus-diagonal compression of recurrent networks.

>>> import lrcompress as lrc
>>> report = lrc.compress(model, rank=24, diag=True)   # doctest: +SKIP

The public names load on first use (PEP 562 ``__getattr__``): ``import lrcompress.cli`` then
does not import PyTorch, so ``lrcompress --help`` answers at once.
"""

from importlib import import_module

from .version import __version__
from .errors import (ConfigError, FormatError, LRCompressError, OutputExistsError, RankError, TargetError,
                     WeightError)

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "CompressionConfig": "config", "RankRule": "config", "TargetSpec": "config",
    "apply": "convert", "compress": "convert", "count_params": "convert", "merge": "convert",
    "accelerate": "execution",
    "fit_low_rank": "factorize", "fit_low_rank_plus_diagonal": "factorize",
    "load_model": "io", "save_model": "io",
    "from_pretrained": "pretrained", "save_pretrained": "pretrained",
    "LowRank": "parametrizations", "LowRankPlusDiagonal": "parametrizations", "low_rank": "parametrizations",
    "Report": "report",
    "fold_weight_norm": "checkpoints", "read_checkpoint": "checkpoints", "rename_keys": "checkpoints",
    # Structures beyond low rank (docs/structures.md), one module each in lrcompress.structured.
    "Kronecker": "structured.kronecker", "kronecker": "structured.kronecker", "unitary_penalty": "structured.kronecker",
    "TensorTrain": "structured.tensor_train", "tensor_train": "structured.tensor_train",
    "ScaledCayley": "structured.orthogonal", "scaled_cayley": "structured.orthogonal", "STRUCTURES": "structures",
}


def __getattr__(name: str):
    if name == "integrations":  # lrc.integrations.StabiliserCallback; transformers loads only then
        return import_module(".integrations", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrcompress' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CompressionConfig", "ConfigError", "FormatError", "LRCompressError", "LowRank", "LowRankPlusDiagonal",
    "OutputExistsError", "RankError", "RankRule", "Report", "TargetError", "TargetSpec", "WeightError",
    "__version__", "accelerate", "apply", "compress", "count_params", "fit_low_rank", "fit_low_rank_plus_diagonal",
    "load_model", "low_rank", "merge", "save_model",
    "fold_weight_norm", "read_checkpoint", "rename_keys", "from_pretrained", "save_pretrained",
    "Kronecker", "STRUCTURES", "ScaledCayley", "TensorTrain", "kronecker", "scaled_cayley", "tensor_train",
    "unitary_penalty",
]
