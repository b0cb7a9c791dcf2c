"""Structured recurrent matrices beyond low rank, one file per structure (docs/structures.md).

- ``kronecker``: a sum of Kronecker products of small factors (Kronecker Recurrent Units);
- ``tensor_train``: a tensor-train matrix, per gate or jointly over a cell's gates;
- ``orthogonal``: the scaled Cayley transform of scoRNN.

Each module holds a parametrization class and its verb (``kronecker(module, "weight", ...)``);
``lrcompress.structures`` is the registry the converter uses. The modules import only torch and
lrcompress's pure maths, so importing one does not load the converter.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError


def registrable_weight(module: nn.Module, name: str, gates) -> Tensor:
    """``module.<name>``, checked before a structure's verb registers on it: a 2-D weight, not
    yet parametrized, splitting into ``gates`` stacked blocks. Raises ``ConfigError`` naming it."""
    weight = getattr(module, name, None)
    where = f"{type(module).__name__}.{name}"
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ConfigError(f"{where} is not a 2-D weight")
    if parametrize.is_parametrized(module, name):
        raise ConfigError(f"{where} is already parametrized")
    if isinstance(gates, bool) or not isinstance(gates, int) or gates < 1 or weight.shape[0] % gates:
        raise ConfigError(f"{where} of shape {tuple(weight.shape)} does not split into gates={gates!r} blocks")
    return weight
