"""compress() with whole-model budgets (ratio, params, energy over all targets, diag="auto") and
with calibration data (output errors in the report), through the API and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lrcompress as lrc
from lrcompress.config import CompressionConfig
from lrcompress.convert import compress_state_dict
from lrcompress.factorize import factored_params

pytestmark = pytest.mark.usefixtures("one_thread")


def gru(seed: int = 0) -> nn.GRU:
    torch.manual_seed(seed)
    return nn.GRU(8, 32, num_layers=2)


def inputs(seed: int = 1, steps: int = 12, batch: int = 6) -> torch.Tensor:
    return torch.randn(steps, batch, 8, generator=torch.Generator().manual_seed(seed))


def step_cost(row) -> int:
    rows, cols = row.shape[0] // row.gates, row.shape[1]
    args = dict(diag=row.diag, tied=row.tied)
    return (factored_params(row.gates, rows, cols, row.rank + 1, **args)
            - factored_params(row.gates, rows, cols, row.rank, **args))


def assert_budget_met(report, budget: int, fixed: tuple[str, ...] = ()) -> None:
    """Never above the budget, and no target could take one more rank step (below dense) within it."""
    assert report.params_after <= budget
    for row in report.targets:
        if row.name in fixed:
            continue
        rows, cols = row.shape[0] // row.gates, row.shape[1]
        grows = factored_params(row.gates, rows, cols, row.rank + 1, diag=row.diag, tied=row.tied) < row.params_before
        assert not grows or report.params_after + step_cost(row) > budget, row.name


@pytest.mark.parametrize("options", [dict(), dict(diag=True), dict(tied=True), dict(diag="auto")])
def test_ratio_is_met_exactly(options):
    model = gru()
    before = lrc.count_params(model)
    report = lrc.compress(model, ratio=4, include_input=True, **options)
    assert report.ratio >= 4 and report.params_after == lrc.count_params(model)
    assert_budget_met(report, before // 4)
    assert len({row.rank for row in report.targets}) > 1 or options  # ranks differ between targets


def test_params_budget_and_overrides():
    model = gru()
    report = lrc.compress(model, params=9000, include_input=True, ranks={"weight_hh_l1": 5})
    assert report.params_after <= 9000 and lrc.count_params(model) == report.params_after
    rows = {row.name: row for row in report.targets}
    assert rows["weight_hh_l1"].rank == 5
    assert_budget_met(report, 9000, fixed=("weight_hh_l1",))


def test_infeasible_budget_is_one_rank_error_and_leaves_the_model():
    model = gru()
    dense = copy.deepcopy(model.state_dict())
    with pytest.raises(lrc.RankError, match=r"ratio 50 allows at most .* the smallest this model can get is"):
        lrc.compress(model, ratio=50)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())


def test_a_budget_checks_ranks_that_overrides_fix_everywhere():
    with pytest.raises(lrc.RankError, match="and the fixed ranks"):
        lrc.compress(gru(), params=9000, ranks={"weight_hh_l*": 30})
    report = lrc.compress(gru(), params=9000, ranks={"weight_hh_l*": 2})
    assert [row.rank for row in report.targets] == [2, 2] and report.params_after <= 9000


def test_state_dict_budget_counts_stored_values_and_refuses_calibration():
    tensors = gru().state_dict()
    config = CompressionConfig(ratio=3, include_input=True)
    out, specs, report = compress_state_dict(tensors, config)
    assert report.params_before == sum(t.numel() for t in tensors.values())
    assert report.params_after == sum(t.numel() for t in out.values()) <= report.params_before // 3
    with pytest.raises(lrc.ConfigError, match="bare state dicts cannot be calibrated"):
        compress_state_dict(tensors, config, calibration=inputs())


def test_model_energy_keeps_the_top_singular_values_of_all_targets():
    model = gru()
    weights = {n: p.detach().double() for n, p in model.named_parameters() if n.startswith("weight_hh")}
    report = lrc.compress(model, energy=0.6, energy_scope="model")
    # Independent: per target and rank, the squares of the 3 gate blocks' singular values summed.
    steps = sorted(((float(g), name, r) for name, W in weights.items()
                    for r, g in enumerate((torch.linalg.svdvals(W.reshape(3, 32, 32)) ** 2).sum(0), 1)), reverse=True)
    total, kept, ranks = sum(s[0] for s in steps), 0.0, {name: 1 for name in weights}
    for g, name, r in steps:
        if kept >= 0.6 * total:
            break
        kept, ranks[name] = kept + g, max(ranks[name], r)
    assert {row.name: row.rank for row in report.targets} == ranks


def test_config_round_trips_and_checks_budgets():
    for config in (CompressionConfig(ratio=4, diag="auto"), CompressionConfig(params=200_000, tied=True),
                   CompressionConfig(energy=0.9, energy_scope="model"),
                   CompressionConfig(ratio=2, damping=0.3, allocation="absolute")):
        assert CompressionConfig.from_json(config.to_json()) == config
    for bad, match in ((dict(rank=4, ratio=2), "exactly one"), (dict(ratio=0.5), "ratio must be"),
                       (dict(params=1.5), "params must be"), (dict(rank=4, diag="auto"), "diag=.auto. chooses diagonals within a budget"),
                       (dict(rank=4, diag="yes"), "diag must be"),
                       (dict(rank=4, energy_scope="model"), "energy_scope='model' needs"),
                       (dict(energy=0.9, energy_scope="global"), "energy_scope must be"),
                       (dict(ratio=4, damping=-1), "damping must be a finite number >= 0"),
                       (dict(ratio=4, damping=float("nan")), "damping must be a finite number >= 0"),
                       (dict(ratio=4, allocation="summed"), "allocation must be one of")):
        with pytest.raises(lrc.ConfigError, match=match):
            CompressionConfig(**bad)


def test_calibrated_report_gives_output_errors_measured_independently():
    model = gru()
    dense = copy.deepcopy(model)
    x = inputs()
    report = lrc.compress(model, ratio=3, include_input=True, calibration=x)
    with torch.no_grad():
        want, got = dense(x)[0].double(), model(x)[0].double()
    assert report.output_error == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-9)
    assert all(row.output_error is not None and 0 <= row.output_error < 1 for row in report.targets)
    text = str(report)
    assert "out.err" in text and "model output error on the calibration data" in text
    data = json.loads(report.to_json())
    assert data["output_error"] == report.output_error and "output_error" in data["targets"][0]
    assert "out.err" not in str(lrc.compress(gru(), rank=4))


def test_calibration_from_a_one_shot_iterator_equals_a_list():
    x = inputs()
    batches = [x[:, :3], x[:, 3:]]
    a = lrc.compress(gru(), ratio=1.5, calibration=batches)
    b = lrc.compress(gru(), ratio=1.5, calibration=iter(batches))
    assert a.output_error == pytest.approx(b.output_error, rel=1e-12)
    assert [r.rank for r in a.targets] == [r.rank for r in b.targets]


def test_calibration_lowers_the_output_error_on_low_dimensional_inputs():
    # Inputs in a 2-D subspace of R^8: the calibrated fits spend no rank on directions never used.
    basis = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    x = inputs(steps=20) @ torch.linalg.pinv(basis) @ basis
    plain = gru()
    lrc.compress(plain, ratio=3, include_input=True)
    calibrated = lrc.compress(gru(), ratio=3, include_input=True, calibration=x)
    with torch.no_grad():
        want = gru()(x)[0]
        plain_error = float((plain(x)[0] - want).norm() / want.norm())
    assert calibrated.output_error < 0.7 * plain_error


def test_forward_argument_is_used_for_every_pass():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = gru(), nn.Linear(32, 5)

        def forward(self, x, scale):
            return self.head(self.rnn(x * scale)[0])

    model = Tagger()
    calls = []

    def forward(m, batch):
        calls.append(batch["x"].shape)
        return m(batch["x"], batch["scale"])

    report = lrc.compress(model, ratio=1.5, calibration=[{"x": inputs(), "scale": 2.0}], forward=forward)
    assert len(calls) == 2  # statistics with the dense outputs, then the compressed outputs
    assert math.isfinite(report.output_error) and report.output_error > 0


# ---- the command line ---------------------------------------------------------------------------


def state_dict_file(d):
    torch.save(gru().state_dict(), d / "m.pt")
    return d / "m.pt"


def test_cli_ratio_params_and_diag_auto(run, tmp_path):
    src = state_dict_file(tmp_path)
    before = lrc.count_params(gru())
    code, out, err = run("convert", src, "--ratio", "3", "--include-input", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["params_after"] <= before // 3 and doc["config"]["ratio"] == 3
    code, out, err = run("convert", src, "--params", "8k", "--include-input", "--diag-auto", "--json", "--force")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["params_after"] <= 8_000 and doc["config"]["params"] == 8_000 and doc["config"]["diag"] == "auto"
    code, out, err = run("convert", src, "--energy", "0.6", "--energy-scope", "model", "--force")
    assert code == 0 and "wrote" in out, err


@pytest.mark.parametrize("args, message", [
    (["--params", "1.2345k"], "--params must be a positive whole number"),
    (["--ratio", "3", "--diag", "--diag-auto"], "--diag or --diag-auto"),
    (["--rank", "4", "--energy-scope", "model"], "energy_scope='model' needs an energy rank"),
    (["--rank", "4", "--ratio", "3"], "exactly one of rank and energy"),
    (["--ratio", "80"], "the smallest this model can get is"),
    (["--ratio", "3", "--calib-key", "x"], "give --calib too"),
    (["--ratio", "3", "--calib", "x.pt"], "bare state dicts cannot be calibrated"),
    (["--ratio", "3", "--calib-damping", "0.1"], "give --calib too"),
    (["--ratio", "3", "--calib", "x.pt", "--calib-damping", "-1"], "--calib-damping must be a finite number >= 0"),
    (["--ratio", "3", "--calib", "x.pt", "--calib-damping", "nan"], "--calib-damping must be a finite number >= 0"),
    (["--ratio", "3", "--allocation", "summed"], "allocation must be one of absolute, relative"),
])
def test_cli_budget_errors_are_one_line(run, tmp_path, args, message):
    code, out, err = run("convert", state_dict_file(tmp_path), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.lr.safetensors").exists()


def test_cli_calibration_of_a_trusted_whole_model(run, tmp_path):
    torch.save(gru(), tmp_path / "whole.pt")
    x = inputs()
    torch.save(x, tmp_path / "calib.pt")
    save_file({"x": x.contiguous(), "y": torch.zeros(3)}, tmp_path / "calib.safetensors")
    code, out, err = run("convert", tmp_path / "whole.pt", "--trust-pickle", "--ratio", "1.5", "--calib",
                         tmp_path / "calib.pt", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert 0 < doc["output_error"] < 1 and all(row["output_error"] is not None for row in doc["targets"])
    code, out, err = run("convert", tmp_path / "whole.pt", "--trust-pickle", "--ratio", "1.5", "--calib",
                         tmp_path / "calib.safetensors", "--calib-key", "x", "--json", "--force")
    assert code == 0, err
    assert json.loads(out)["output_error"] == pytest.approx(doc["output_error"], rel=1e-9)
    for key, message in ((None, "name the inputs with --calib-key"), ("z", "'z' is not in")):
        extra = [] if key is None else ["--calib-key", key]
        code, out, err = run("convert", tmp_path / "whole.pt", "--trust-pickle", "--ratio", "1.5", "--calib",
                             tmp_path / "calib.safetensors", *extra, "--force")
        assert code == 2 and message in err, err


def test_damping_and_allocation_reach_the_fits_and_the_report():
    x = inputs(steps=20)
    default = lrc.compress(gru(), ratio=3, include_input=True, calibration=x)
    assert default.config["damping"] == 0.01 and default.config["allocation"] == "relative"  # as documented
    # lambda = 0 is the exact weighted optimum: the least output error per target at the same ranks;
    # a huge ridge gives the plain fit at those ranks.
    ranks = {r.name: r.rank for r in default.targets}
    plain = lrc.compress(gru(), rank=1, ranks=ranks, include_input=True, calibration=x, damping=1e9)
    unweighted = lrc.compress(gru(), rank=1, ranks=ranks, include_input=True)
    for a, b in zip(plain.targets, unweighted.targets):
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-5)
    zero = lrc.compress(gru(), rank=1, ranks=ranks, include_input=True, calibration=x, damping=0.0)
    for a, b in zip(zero.targets, plain.targets):
        assert a.output_error <= b.output_error + 1e-9
    absolute = lrc.compress(gru(), ratio=3, include_input=True, calibration=x, allocation="absolute")
    assert absolute.config["allocation"] == "absolute" and absolute.params_after <= absolute.params_before / 3


def test_cli_calibration_damping_and_allocation(run, tmp_path):
    torch.save(gru(), tmp_path / "whole.pt")
    torch.save(inputs(), tmp_path / "calib.pt")
    code, out, err = run("convert", tmp_path / "whole.pt", "--trust-pickle", "--ratio", "1.5", "--calib",
                         tmp_path / "calib.pt", "--calib-damping", "0", "--allocation", "absolute", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"]["damping"] == 0.0 and doc["config"]["allocation"] == "absolute"
    CompressionConfig(ratio=2).save(tmp_path / "c.json")
    code, out, err = run("convert", tmp_path / "whole.pt", "--trust-pickle", "--config", tmp_path / "c.json",
                         "--calib", tmp_path / "calib.pt", "--calib-damping", "0", "--force")
    assert code == 2 and "drop --calib-damping" in err and len(err.strip().splitlines()) == 1, err


def test_trial_faults_are_one_clear_error_and_leave_the_model_alone(tmp_path, run):
    # From a new-user trial: a budget the model already meets, a batch the model cannot take, a raising
    # forward, forward= without data, --diag-auto without a budget, model weights given as --calib.
    import pytest
    import torch

    import lrcompress as lrc
    from lrcompress.errors import ConfigError, RankError

    torch.manual_seed(0)
    model = torch.nn.GRU(8, 16, num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 4, 8)
    n = lrc.count_params(model)
    for budget in (dict(ratio=1), dict(params=n), dict(params=10 * n)):
        with pytest.raises(RankError, match="nothing to compress"):
            lrc.compress(model, calibration=x, **budget)
    with pytest.raises(ConfigError, match=r"calibration batch 0: the model's call failed \(RuntimeError"):
        lrc.compress(model, ratio=2, calibration=torch.randn(10, 4, 7))
    with pytest.raises(ConfigError, match=r"calibration batch 0: the model's call failed \(ValueError: boom"):
        lrc.compress(model, ratio=2, calibration=x, forward=lambda m, b: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ConfigError, match="give calibration= too"):
        lrc.compress(model, rank=2, forward=lambda m, b: m(b))
    with pytest.raises(ConfigError, match="give ratio= or params= with it"):
        lrc.compress(model, rank=2, diag="auto")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half done

    torch.save(model, tmp_path / "gru.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(torch.randn(10, 4, 7), tmp_path / "bad.pt")
    result = run("convert", tmp_path / "gru.pt", "--trust-pickle", "--ratio", "2", "--calib", tmp_path / "bad.pt")
    assert result.code == 2 and result.err.startswith("error: calibration batch 0: the model's call failed")
    assert len(result.err.strip().splitlines()) == 1
    result = run("convert", tmp_path / "gru.pt", "--trust-pickle", "--rank", "2", "--diag-auto")
    assert result.code == 2 and "--diag-auto chooses diagonals within a budget" in result.err
    result = run("convert", tmp_path / "gru.pt", "--trust-pickle", "--ratio", "2", "--calib", tmp_path / "weights.pt")
    assert result.code == 2 and "holds model weights" in result.err
    assert not list(tmp_path.glob("*.lr.*"))
