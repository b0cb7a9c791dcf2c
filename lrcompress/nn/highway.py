"""A dense highway layer (paper eq. 3) that the converter recognises without patterns."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class Highway(nn.Module):
    """``y = g(W_pi x + b_pi) * t + x * (1 - t)`` with ``t = sigmoid(W_tau x + b_tau)``.

    ``proposal`` holds W_pi, ``gate`` the transform gate W_tau; the carry gate is ``1 - t``.
    ``transform_bias`` starts the gate closed (-1, as in the paper's appendix A.1). Pass
    ``rank`` (and ``diag``) to train a low-rank highway layer from scratch.

    >>> layer = Highway(64, rank=8, diag=True)
    >>> layer(torch.zeros(2, 64)).shape
    torch.Size([2, 64])
    """

    def __init__(self, features: int, activation: str = "relu", transform_bias: float = -1.0, *,
                 rank: int | None = None, diag: bool = False, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.features, self.activation = features, activation
        self.proposal = nn.Linear(features, features, device=device, dtype=dtype)
        self.gate = nn.Linear(features, features, device=device, dtype=dtype)
        nn.init.constant_(self.gate.bias, transform_bias)
        if rank is not None:
            from ..convert import factor_from_scratch  # the converter imports this module

            factor_from_scratch(self, rank=rank, diag=diag)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.sigmoid(self.gate(x))
        return ACTIVATIONS[self.activation](self.proposal(x)) * t + x * (1 - t)

    def extra_repr(self) -> str:
        return f"{self.features}, activation={self.activation!r}"
