"""``lrcompress.compress`` / ``merge`` on whole models: counts, rank rules, errors, targets, training.

Every numerical claim is checked against an independent reference: closed-form parameter counts,
singular values computed here in float64, the chain rule through a merged dense copy.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lrcompress as lrc
from lrcompress.config import CompressionConfig
from lrcompress.convert import compress_state_dict, factored_specs, factored_state_dict, merge_state_dict
from lrcompress.nn import FactoredRNN, Highway

from conftest import (HIDDEN, Net, assert_factor_gradients, assert_unchanged, factored_weights, make_inputs,
                      make_rnn, relative_difference, run_rnn, snapshot)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def compressed(model: nn.Module, **options) -> tuple[nn.Module, lrc.Report]:
    """A compressed deep copy of ``model`` and its report (no warning for ranks above break-even)."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no smaller than dense", UserWarning)
        return model, lrc.compress(model, **options)


# --- parameter counts ------------------------------------------------------------------------

N, D = HIDDEN, 2  # hidden size and rank of the closed forms
# Recurrent-matrix parameters of one layer per kind: dense G n^2; low rank G 2nd; plus diagonal
# G (2nd + n); tied G nd + dn (+ G n). A plain RNN has one block, so tying changes nothing.
CLOSED_FORMS = {
    "gru": {"dense": 3 * N * N, "plain": 3 * 2 * N * D, "diag": 3 * (2 * N * D + N), "tied": 3 * N * D + D * N,
            "tied+diag": 3 * N * D + D * N + 3 * N},
    "lstm": {"dense": 4 * N * N, "plain": 4 * 2 * N * D, "diag": 4 * (2 * N * D + N), "tied": 4 * N * D + D * N,
             "tied+diag": 4 * N * D + D * N + 4 * N},
    "rnn": {"dense": N * N, "plain": 2 * N * D, "diag": 2 * N * D + N, "tied": 2 * N * D, "tied+diag": 2 * N * D + N},
}
VARIANTS = {"plain": {}, "diag": {"diag": True}, "tied": {"tied": True}, "tied+diag": {"tied": True, "diag": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_parameter_counts_equal_the_closed_forms(kind: str, variant: str) -> None:
    dense = make_rnn(kind, num_layers=2, bidirectional=True)  # four recurrent matrices
    model, report = compressed(dense, rank=D, **VARIANTS[variant])
    dense_params, factored = CLOSED_FORMS[kind]["dense"], CLOSED_FORMS[kind][variant]
    assert len(report.targets) == 4
    for row in report.targets:
        assert (row.params_before, row.params_after) == (dense_params, factored), row.name
    for spec in factored_specs(model):
        assert (spec.dense_params, spec.factored_params) == (dense_params, factored), spec.name
    saved = lrc.count_params(dense) - lrc.count_params(model)
    assert saved == 4 * (dense_params - factored)
    assert (report.params_before, report.params_after) == (lrc.count_params(dense), lrc.count_params(model))
    # count_params counts what the model stores: the state dict of an RNN holds only parameters.
    assert lrc.count_params(model) == sum(t.numel() for t in model.state_dict().values())


# --- rank rules ------------------------------------------------------------------------------

def test_integer_rank_applies_to_every_target() -> None:
    _, report = compressed(make_rnn("lstm", num_layers=2), rank=3)
    assert [t.rank for t in report.targets] == [3, 3]


def test_fraction_is_rounded_up_from_each_targets_full_rank() -> None:
    # weight_hh blocks 8x3 (full 3), weight_ih_l0 blocks 8x5 (full 5), weight_hr 3x8 (full 3).
    dense = make_rnn("lstm", input_size=5, proj_size=3)
    _, report = compressed(dense, rank=0.3, include_input=True, include_projection=True)
    ranks = {t.name: t.rank for t in report.targets}
    assert ranks == {"weight_hh_l0": math.ceil(0.3 * 3), "weight_ih_l0": math.ceil(0.3 * 5),
                     "weight_hr_l0": math.ceil(0.3 * 3)}
    _, report = compressed(make_rnn("gru"), rank=0.25)
    assert report.targets[0].rank == 2  # exactly 0.25 * 8: no rounding up past an exact product


def energy_rank(blocks: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular values of every block (reference)."""
    ranks = []
    for s in torch.linalg.svdvals(blocks.double()):
        total = float((s ** 2).sum())
        ranks.append(next(k for k in range(1, len(s) + 1) if float((s[:k] ** 2).sum()) >= energy * total))
    return max(ranks)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_energy_rank_is_the_smallest_keeping_that_energy_in_every_gate(tied: bool) -> None:
    dense = make_rnn("gru", hidden_size=16, num_layers=2)
    _, report = compressed(dense, energy=0.9, tied=tied)
    _, by_string = compressed(dense, rank="energy=0.9", tied=tied)
    for row, same in zip(report.targets, by_string.targets):
        W = getattr(dense, row.name).detach()
        blocks = W[None] if tied else W.reshape(3, 16, 16)  # tied: one stacked 48x16 matrix
        assert row.rank == same.rank == energy_rank(blocks, 0.9), row.name


def test_per_target_ranks_first_matching_pattern_wins() -> None:
    dense = make_rnn("gru", num_layers=2, bidirectional=True)
    ranks = {"weight_hh_l1": 2, "weight_hh_l1*": 6, "*reverse": 5}
    _, report = compressed(dense, rank=3, ranks=ranks)
    assert {t.name: t.rank for t in report.targets} == {
        "weight_hh_l0": 3, "weight_hh_l0_reverse": 5, "weight_hh_l1": 2, "weight_hh_l1_reverse": 6}


def test_per_target_rank_by_module_name_including_enclosing_modules() -> None:
    _, report = compressed(Net(), rank=3, ranks={"body.1.0": 1, "highway": 0.5})
    ranks = {t.name: t.rank for t in report.targets}
    assert all(ranks[n] == 1 for n in ranks if n.startswith("body.1.0."))
    assert ranks["highway.gate.weight"] == ranks["highway.proposal.weight"] == 8  # half of 16
    _, report = compressed(Net(), rank=3, ranks={"body": 2, "gate": 1})
    assert {t.name: t.rank for t in report.targets if t.layer == "linear"} == {
        "highway.gate.weight": 1, "highway.proposal.weight": 3}
    assert all(t.rank == 2 for t in report.targets if t.layer == "gru")


# --- errors leave the model unchanged ---------------------------------------------------------

def with_bad_value(value: float) -> nn.Module:
    model = Net()
    with torch.no_grad():
        model.body[1][0].weight_hh_l1_reverse[5, 2] = value  # the last recurrent matrix
    return model


ERROR_CASES = {
    "rank 0": (Net, dict(rank=0), lrc.RankError),
    "negative rank": (Net, dict(rank=-2), lrc.RankError),
    "rank above full": (Net, dict(rank=HIDDEN + 1), lrc.RankError),
    "override above full": (Net, dict(rank=2, ranks={"weight_hh_l1_reverse": 2 * HIDDEN}), lrc.RankError),
    "override 0": (Net, dict(rank=2, ranks={"weight_hh_l1": 0}), lrc.RankError),
    "NaN weight": (lambda: with_bad_value(float("nan")), dict(rank=2), lrc.WeightError),
    "Inf weight": (lambda: with_bad_value(float("inf")), dict(rank=2), lrc.WeightError),
    "no targets": (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), dict(rank=2), lrc.TargetError),
    "everything excluded": (lambda: make_rnn("gru"), dict(rank=2, exclude=["weight_hh_*"]), lrc.TargetError),
    "target matches nothing": (Net, dict(rank=2, targets=["*.nothing"]), lrc.TargetError),
    "target not a Linear": (Net, dict(rank=2, targets=["body.1"]), lrc.TargetError),
    "exclude matches nothing": (Net, dict(rank=2, exclude=["nowhere"]), lrc.TargetError),
    "energy 0": (Net, dict(energy=0.0), lrc.ConfigError),
    "rank and energy": (Net, dict(rank=2, energy=0.9), lrc.ConfigError),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_its_error_and_leaves_the_model_unchanged(case: str) -> None:
    build, options, error = ERROR_CASES[case]
    model = build()
    before = snapshot(model)
    assert issubclass(error, ValueError)
    with pytest.raises(error):
        lrc.compress(model, **options)
    assert_unchanged(model, before)


def test_rank_error_names_the_layer_its_shape_and_the_rank() -> None:
    with pytest.raises(lrc.RankError) as info:
        lrc.compress(Net(), rank=9)
    message = str(info.value)
    assert "body.1.0.weight_hh_l0" in message and "8x8" in message and "9" in message
    with pytest.raises(lrc.RankError, match="-3"):
        lrc.compress(Net(), rank=-3)


def test_a_rank_larger_than_dense_warns_and_is_allowed() -> None:
    dense = make_rnn("gru")
    model = copy.deepcopy(dense)
    with pytest.warns(UserWarning, match="no smaller than dense"):
        report = lrc.compress(model, rank=6)  # 3 * 2 * 8 * 6 = 288 > 192
    assert report.targets[0].params_after > report.targets[0].params_before
    assert "no smaller than dense" in report.targets[0].note
    assert isinstance(model, FactoredRNN) and lrc.count_params(model) > lrc.count_params(dense)


def test_compressing_twice_is_refused() -> None:
    model, _ = compressed(make_rnn("gru"), rank=2)
    with pytest.raises(lrc.TargetError, match="already"):
        lrc.compress(model, rank=2)


# --- what compress touches ---------------------------------------------------------------------

def test_dtype_and_device_are_kept() -> None:
    dense = Net(dtype=torch.float64)
    model, report = compressed(dense, rank=3, diag=True, targets=["mix.*"])
    assert len(report.targets) == 4 + 2 + 2
    for name, (module, weight) in factored_weights(model).items():
        for factor in module.parametrizations[weight].parameters():
            assert factor.dtype == torch.float64 and factor.device == dense.head.weight.device, name
    x = dense.example_input()
    assert model(x).dtype == torch.float64


def test_nested_bidirectional_multilayer_model_is_compressed_optimally() -> None:
    dense = Net(dtype=torch.float64)
    model, report = compressed(dense, rank=3)
    gru = model.body[1][0]
    assert isinstance(gru, nn.GRU) and isinstance(gru, FactoredRNN)
    names = [t.name for t in report.targets]
    assert names == [f"body.1.0.weight_hh_l{k}{r}" for k in (0, 1) for r in ("", "_reverse")] + [
        "highway.proposal.weight", "highway.gate.weight"]
    for row in report.targets:
        W = dense.get_parameter(row.name).detach()
        module, _, weight = row.name.rpartition(".")
        W_hat = getattr(model.get_submodule(module), weight).detach()
        assert relative_difference(W_hat, W) == pytest.approx(row.rel_error, rel=1e-9)
        # Each gate block is its own best rank-3 approximation: the Eckart-Young bound.
        s = torch.linalg.svdvals(W.reshape(row.gates, -1, W.shape[1]))
        bound = float((s[:, 3:] ** 2).sum().sqrt() / W.norm())
        assert row.rel_error == pytest.approx(bound, rel=1e-9)
    assert relative_difference(model(dense.example_input()), dense(dense.example_input())) > 0


def test_linear_targets_by_pattern_and_highway_without() -> None:
    model, report = compressed(Net(), rank=2, diag=True, targets=["*.gate", "*.proposal"])
    names = {t.name for t in report.targets}
    assert {"mix.gate.weight", "mix.proposal.weight", "highway.gate.weight", "highway.proposal.weight"} <= names
    assert all(t.diag for t in report.targets if t.layer == "linear")  # 16x16 blocks are square
    assert parametrize.is_parametrized(model.mix.gate, "weight")
    assert not parametrize.is_parametrized(model.head) and not parametrize.is_parametrized(model.body[0])
    # Highway layers are found by type; a user-written one only through patterns.
    _, report = compressed(Net(), rank=2)
    assert {t.name for t in report.targets if t.layer == "linear"} == {"highway.gate.weight",
                                                                       "highway.proposal.weight"}


def test_exclude_patterns() -> None:
    _, report = compressed(Net(), rank=2, exclude=["*_reverse", "highway"])
    assert [t.name for t in report.targets] == ["body.1.0.weight_hh_l0", "body.1.0.weight_hh_l1"]
    _, report = compressed(Net(), rank=2, exclude=["body.1.0"])
    assert {t.name for t in report.targets} == {"highway.gate.weight", "highway.proposal.weight"}


# --- merge -----------------------------------------------------------------------------------

def test_merge_restores_plain_modules_with_the_same_outputs() -> None:
    model, _ = compressed(Net(), rank=2, diag=True, targets=["mix.*"])
    x = model.example_input()
    expected = model(x)
    lrc.merge(model)
    assert type(model.body[1][0]) is nn.GRU
    assert type(model.highway) is Highway and type(model.mix.gate) is nn.Linear
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7)


def test_merging_a_copy_leaves_the_original_factored_and_working() -> None:
    # deepcopy shares torch's injected parametrized class; merge must not strip the original's weights.
    model, _ = compressed(Net(), rank=2, targets=["mix.*"])
    x = model.example_input()
    expected = model(x)
    merged = lrc.merge(copy.deepcopy(model))
    assert type(merged.body[1][0]) is nn.GRU and type(merged.mix.gate) is nn.Linear
    assert isinstance(model.body[1][0], FactoredRNN) and parametrize.is_parametrized(model.mix.gate, "weight")
    assert torch.equal(model(x), expected)
    torch.testing.assert_close(merged(x), expected, rtol=1e-6, atol=1e-7)


def test_merge_state_dict_equals_the_model_merge() -> None:
    model, _ = compressed(Net(dtype=torch.float64), rank=2, diag=True, tied=True, targets=["mix.*"])
    merged = lrc.merge(copy.deepcopy(model)).state_dict()
    from_file_format = merge_state_dict(factored_state_dict(model), factored_specs(model))
    assert from_file_format.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(from_file_format[key], value, rtol=1e-12, atol=1e-14, msg=key)


def test_compress_state_dict_then_merge_equals_the_model_route() -> None:
    dense = Net(dtype=torch.float64)
    options = dict(rank=3, diag=True, targets=("mix.*", "highway.*"))  # no module types in a state dict
    tensors, specs, report = compress_state_dict(dense.state_dict(), CompressionConfig(**options))
    model, model_report = compressed(dense, **options)
    assert sorted(s.name for s in specs) == sorted(t.name for t in model_report.targets)
    assert "body.1.0.weight_hh_l0.L" in tensors and "body.1.0.weight_hh_l0" not in tensors
    merged = lrc.merge(model).state_dict()
    for key, value in merge_state_dict(tensors, specs).items():
        torch.testing.assert_close(value, merged[key], rtol=1e-12, atol=1e-14, msg=key)


# --- training ----------------------------------------------------------------------------------

TRAINABLE = {
    "gru": dict(kind="gru", options=dict(rank=3, diag=True)),
    "gru-tied": dict(kind="gru", options=dict(rank=3, tied=True)),
    "lstm": dict(kind="lstm", options=dict(rank=3, diag=True, include_input=True)),
    "lstm-proj": dict(kind="lstm", proj_size=3, options=dict(rank=2, include_projection=True)),
}


@pytest.mark.parametrize("case", list(TRAINABLE))
def test_an_optimiser_step_reaches_every_factor_and_changes_the_outputs(case: str) -> None:
    spec = TRAINABLE[case]
    extra = {"proj_size": spec["proj_size"]} if "proj_size" in spec else {}
    dense = make_rnn(spec["kind"], num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    model, _ = compressed(dense, **spec["options"])
    merged = lrc.merge(copy.deepcopy(model))
    x, hx = make_inputs(model, packed=True, initial_state=True)

    def loss(m: nn.Module) -> torch.Tensor:
        return sum((out ** 2).sum() for out in run_rnn(m, x, hx))

    assert_factor_gradients(model, merged, loss)
    before = [t.detach().clone() for t in run_rnn(model, x, hx)]
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if ".original" in n}
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    for name, value in factors.items():
        assert not torch.equal(model.get_parameter(name), value), name
    for after, old in zip(run_rnn(model, x, hx), before):
        assert relative_difference(after, old) > 1e-4


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    CompressionConfig(rank=24),
    CompressionConfig(rank=0.25, diag=True, tied=True, include_input=True, include_projection=True,
                      targets=("*.gate", "*.proposal"), exclude=("head",), ranks={"l0": 2, "l1": "energy=0.8"},
                      svd="exact", diag_iters=5, seed=3),
    CompressionConfig(energy=0.95, svd="randomized", diag_iters=0),
], ids=["int", "everything", "energy"])
def test_config_round_trips_through_json(config: CompressionConfig) -> None:
    again = CompressionConfig.from_json(config.to_json())
    assert again == config
    assert again.rule() == config.rule()


@pytest.mark.parametrize("bad", [
    dict(rank=2, energy=0.9), dict(), dict(rank=2, svd="lanczos"), dict(rank=2, diag_iters=-1),
    dict(rank=2, diag_iters=1.5), dict(rank=2, targets=[""]), dict(energy=1.5), dict(rank="lots"),
    dict(rank=True), dict(rank=1.5),
], ids=["rank+energy", "neither", "svd", "diag_iters<0", "diag_iters float", "empty pattern", "energy>1",
        "rank text", "rank bool", "fraction>1"])
def test_config_rejects_bad_combinations(bad: dict) -> None:
    with pytest.raises(lrc.ConfigError):
        CompressionConfig(**bad)


def test_config_from_dict_rejects_unknown_fields() -> None:
    data = CompressionConfig(rank=4).to_dict()
    data["rnak"] = 3
    with pytest.raises(lrc.ConfigError, match="rnak"):
        CompressionConfig.from_dict(data)
