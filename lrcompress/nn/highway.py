"""A dense highway layer (paper eq. 3) that the converter recognises without patterns."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..parametrizations import factorization

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class Highway(nn.Module):
    """``y = g(W_pi x + b_pi) * t + x * (1 - t)`` with ``t = sigmoid(W_tau x + b_tau)``.

    ``proposal`` holds W_pi, ``gate`` the transform gate W_tau; the carry gate is ``1 - t``.
    ``transform_bias`` starts the gate closed (-1, as in the paper's appendix A.1). Pass
    ``rank`` (and ``diag``) to train a low-rank highway layer from scratch. With
    ``bottleneck_dropout`` (a low-rank layer, in training) the rank-d codes ``R x`` of both
    matrices are multiplied by one shared dropout mask per example before ``L``, as the
    authors' code does (Avmb/lowrank-highwaynetwork, ``highwaylrdropoutbn_layer.py``: ``d_1``).

    >>> layer = Highway(64, rank=8, diag=True)
    >>> layer(torch.zeros(2, 64)).shape
    torch.Size([2, 64])
    """

    def __init__(self, features: int, activation: str = "relu", transform_bias: float = -1.0, *,
                 rank: int | None = None, diag: bool = False, bottleneck_dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= bottleneck_dropout < 1.0:
            raise ConfigError(f"bottleneck_dropout must be in [0, 1), got {bottleneck_dropout!r}")
        if bottleneck_dropout and rank is None:
            raise ConfigError("bottleneck_dropout needs a low-rank layer (rank), which has a bottleneck")
        self.bottleneck_dropout = bottleneck_dropout
        self.features, self.activation = features, activation
        self.proposal = nn.Linear(features, features, device=device, dtype=dtype)
        self.gate = nn.Linear(features, features, device=device, dtype=dtype)
        nn.init.constant_(self.gate.bias, transform_bias)
        if rank is not None:
            from ..convert import factor_from_scratch  # the converter imports this module

            factor_from_scratch(self, rank=rank, diag=diag)

    def forward(self, x: Tensor) -> Tensor:
        gate, proposal = self.transforms(x)
        t = torch.sigmoid(gate)
        return ACTIVATIONS[self.activation](proposal) * t + x * (1 - t)

    def transforms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(W_tau x + b_tau, W_pi x + b_pi) for (B, features) ``x``; in training with
        ``bottleneck_dropout``, ``L (m * (R x)) + D x + b`` with one (B, rank) mask ``m`` shared
        by both (kept codes scaled by 1 / keep)."""
        rate = getattr(self, "bottleneck_dropout", 0.0)  # absent on layers pickled before the option
        if not (self.training and rate):
            return self.gate(x), self.proposal(x)
        mask = None
        out = []
        for linear in (self.gate, self.proposal):
            plist = linear.parametrizations["weight"]
            code = x @ plist.original1[0].t()  # R x: (B, d)
            if mask is None:  # drawn once, for both matrices
                keep = 1.0 - rate
                mask = torch.empty_like(code).bernoulli_(keep) / keep
            y = (code * mask) @ plist.original0[0].t()
            if factorization(linear, "weight").diag:
                y = y + x * plist.original2[0]
            out.append(y if linear.bias is None else y + linear.bias)
        return out[0], out[1]

    def extra_repr(self) -> str:
        return f"{self.features}, activation={self.activation!r}"
