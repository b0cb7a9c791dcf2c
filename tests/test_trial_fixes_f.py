"""Faults found by trying the tool as a user would (round f): each test fails on the old code."""

import pytest
import torch
from torch import nn

from lrcompress.errors import ConfigError
from lrcompress.train import fit
from lrcompress.train.fields import check_range


def _tiny_data():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, 3), torch.randn(16, 5, 2)
    return [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_a_learning_rate_that_overflows_the_optimizer_is_one_config_error():
    """Adam's bias correction turns lr = 1e38 into a step of 1e39, beyond float32: a bad setting
    named with its value, not a RuntimeError from inside torch.optim."""
    with pytest.raises(ConfigError, match=r"train\.lr = 1e\+38 overflows the Adam update at step 1"):
        fit(_Net(), _tiny_data(), nn.functional.mse_loss, recipe={"steps": 3, "lr": 1e38, "optimizer": "adam"})
    result = fit(_Net(), _tiny_data(), nn.functional.mse_loss, recipe={"steps": 3, "lr": 1e-3, "optimizer": "adam"})
    assert result.steps == 3  # a sane rate is untouched by the check


@pytest.mark.parametrize("spec, shown", [({"low": 0.0, "low_open": True}, "(0.0, inf)"),
                                         ({"high": 1.0}, "(-inf, 1.0]"),
                                         ({"low": 0.0, "high": 1.0, "high_open": True}, "[0.0, 1.0)")])
def test_range_messages_never_claim_an_infinity_is_allowed(spec, shown):
    with pytest.raises(ConfigError) as info:
        check_range("train", {"lr": float("inf") if "high" not in spec else float("-inf")}, "lr", **spec)
    assert f"must be in {shown}" in str(info.value)
