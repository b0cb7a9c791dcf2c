"""Factored layers built from scratch: ``LowRankGRU``/``LowRankLSTM``/``LowRankRNN`` and ``Highway``.

They must be drop-in ``nn.GRU``/``nn.LSTM``/``nn.RNN`` (isinstance, PackedSequence, initial
states, batch_first) computing exactly what the dense class computes with the rebuilt weights.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lrcompress as lrc
from lrcompress.nn import FactoredRNN, Highway, LowRankGRU, LowRankLSTM, LowRankRNN

from conftest import (BATCH, GATES, HIDDEN, INPUT, RNN_CLASSES, STEPS, assert_factor_gradients, make_inputs,
                      relative_difference, run_rnn)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

LOW_RANK = {"gru": LowRankGRU, "lstm": LowRankLSTM, "rnn": LowRankRNN}


def build(kind: str, **kwargs) -> nn.RNNBase:
    return LOW_RANK[kind](INPUT, HIDDEN, **kwargs)


def rebuilt_dense(layer: nn.RNNBase, kind: str, **kwargs) -> nn.RNNBase:
    """A plain ``nn.GRU``/... of the same shape loaded with ``layer``'s rebuilt dense weights."""
    dense = RNN_CLASSES[kind](INPUT, HIDDEN, **kwargs)
    dense.load_state_dict({name: getattr(layer, name).detach() for name in layer._flat_weights_names})
    return dense


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("diag,tied", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "diag", "tied", "tied+diag"])
def test_a_from_scratch_layer_is_its_dense_class_with_factored_recurrent_weights(kind: str, diag: bool,
                                                                                 tied: bool) -> None:
    layer = build(kind, rank=2, diag=diag, tied=tied, num_layers=2)
    assert isinstance(layer, RNN_CLASSES[kind]) and isinstance(layer, FactoredRNN)
    G, n, d = GATES[kind], HIDDEN, 2
    shared = tied and G > 1
    for weight in ("weight_hh_l0", "weight_hh_l1"):
        plist = layer.parametrizations[weight]
        assert plist.original0.shape == (G, n, d)
        assert plist.original1.shape == ((d, n) if shared else (G, d, n))
        assert hasattr(plist, "original2") == diag
        assert getattr(layer, weight).shape == (G * n, n)
    assert not parametrize.is_parametrized(layer, "weight_ih_l0")
    dense = RNN_CLASSES[kind](INPUT, HIDDEN, num_layers=2)
    recurrent = G * n * d + (1 if shared else G) * d * n + (G * n if diag else 0)
    assert lrc.count_params(dense) - lrc.count_params(layer) == 2 * (G * n * n - recurrent)


CALLS = list(itertools.product((False, True), (False, True), (False, True)))  # batch_first, packed, hx


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("batch_first,packed,initial_state", CALLS,
                         ids=["-".join(f for f, on in zip(("bf", "packed", "hx"), c) if on) or "default"
                              for c in CALLS])
def test_a_from_scratch_layer_computes_what_the_dense_layer_does_with_its_weights(
        kind: str, batch_first: bool, packed: bool, initial_state: bool) -> None:
    options = dict(num_layers=2, bidirectional=True, batch_first=batch_first, dtype=torch.float64)
    if kind == "lstm":
        options["proj_size"] = 3
    extra = dict(include_projection=True) if kind == "lstm" else dict(diag=True)
    layer = build(kind, rank=2, include_input=True, **extra, **options)
    dense = rebuilt_dense(layer, kind, **options)
    x, hx = make_inputs(layer, packed=packed, initial_state=initial_state)
    expected = run_rnn(dense, x, hx)
    for actual, want in zip(run_rnn(layer, x, hx), expected):
        torch.testing.assert_close(actual, want, rtol=1e-12, atol=1e-14)
    merged = lrc.merge(copy.deepcopy(layer))
    assert type(merged) is RNN_CLASSES[kind] and not parametrize.is_parametrized(merged)
    for actual, want in zip(run_rnn(merged, x, hx), expected):
        torch.testing.assert_close(actual, want, rtol=1e-12, atol=1e-14)


def test_an_optimiser_step_trains_every_factor_of_a_from_scratch_gru() -> None:
    layer = LowRankGRU(INPUT, HIDDEN, rank=3, diag=True, num_layers=2, bidirectional=True, dtype=torch.float64)
    merged = lrc.merge(copy.deepcopy(layer))
    x, hx = make_inputs(layer, packed=True, initial_state=True)

    def loss(m: nn.Module) -> torch.Tensor:
        return sum((out ** 2).sum() for out in run_rnn(m, x, hx))

    assert_factor_gradients(layer, merged, loss)
    before = [t.detach().clone() for t in run_rnn(layer, x, hx)]
    factors = {n: p.detach().clone() for n, p in layer.named_parameters() if ".original" in n}
    assert len(factors) == 4 * 3  # L, R, D for each of the four recurrent matrices
    torch.optim.Adam(layer.parameters(), lr=1e-2).step()
    for name, value in factors.items():
        assert not torch.equal(layer.get_parameter(name), value), name
    for after, old in zip(run_rnn(layer, x, hx), before):
        assert relative_difference(after, old) > 1e-4


def test_random_factors_give_weights_of_the_dense_initial_scale() -> None:
    # nn.GRU draws U(-1/sqrt(n), 1/sqrt(n)), of standard deviation 1/sqrt(3 n); the product L R must match.
    n = 128
    layer = LowRankGRU(INPUT, n, rank=16)
    std = float(layer.weight_hh_l0.detach().std())
    assert std == pytest.approx(1 / math.sqrt(3 * n), rel=0.1)
    factors = layer.parametrizations.weight_hh_l0.original0.detach().clone()
    layer.reset_parameters()  # draws new factors, still factored
    assert isinstance(layer, FactoredRNN) and parametrize.is_parametrized(layer, "weight_hh_l0")
    assert not torch.equal(layer.parametrizations.weight_hh_l0.original0, factors)
    assert float(layer.weight_hh_l0.detach().std()) == pytest.approx(1 / math.sqrt(3 * n), rel=0.1)


def test_a_fraction_rank_and_dtype_moves() -> None:
    layer = LowRankLSTM(INPUT, HIDDEN, rank=0.25, proj_size=4, include_projection=True)
    assert layer.parametrizations.weight_hh_l0.original0.shape[-1] == 1  # ceil(0.25 * min(8, 4))
    assert layer.parametrizations.weight_hr_l0.original0.shape[-1] == 1
    layer = copy.deepcopy(layer).double()
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    out, (h, c) = layer(torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64))
    assert out.dtype == h.dtype == c.dtype == torch.float64 and h.shape == (1, BATCH, 4)


@pytest.mark.parametrize("rank", [0, -1, HIDDEN + 1])
def test_an_impossible_rank_is_refused(rank: int) -> None:
    with pytest.raises(lrc.RankError, match=str(rank)):
        LowRankGRU(INPUT, HIDDEN, rank=rank)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_from_scratch_highway_computes_the_highway_formula(activation: str) -> None:
    layer = Highway(16, activation=activation, rank=4, diag=True, dtype=torch.float64)
    for linear in (layer.proposal, layer.gate):
        plist = linear.parametrizations.weight
        assert plist.original0.shape == (1, 16, 4) and plist.original2.shape == (1, 16)
    torch.testing.assert_close(layer.gate.bias, torch.full((16,), -1.0, dtype=torch.float64))
    x = torch.randn(5, 16, dtype=torch.float64)
    Wp, Wt = layer.proposal.weight.detach(), layer.gate.weight.detach()
    g = torch.relu if activation == "relu" else torch.tanh
    t = torch.sigmoid(x @ Wt.T + layer.gate.bias)
    expected = g(x @ Wp.T + layer.proposal.bias) * t + x * (1 - t)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-14)
    assert lrc.count_params(Highway(16)) - lrc.count_params(layer) == 2 * (16 * 16 - (2 * 16 * 4 + 16))


def test_from_scratch_rejects_energy_rank():
    from lrcompress.errors import ConfigError
    from lrcompress.nn import LowRankGRU

    with pytest.raises(ConfigError, match="energy"):
        LowRankGRU(2, 8, rank="energy=0.9")
