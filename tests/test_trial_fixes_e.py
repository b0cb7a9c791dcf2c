"""Faults a new-user trial found in the training engine and the recipe options (task FX).

- a refused ``--resume`` (or a refused first run) writes nothing: the run stays resumable;
- a checkpoint that does not fit the model is named key by key, on one line;
- weight-normalised factors still count as low rank (``factorization``): the highway bottleneck
  dropout, the factored and the masked backward run on them, with the gradients of autograd
  through the plain model (float64);
- RMSProp settings that divide 0 by 0 are refused; ``PaperRMSprop`` never moves a weight whose
  gradient is 0, and an underflowing gradient moves it by at most ``lr / sqrt(1 - alpha)``;
- a run whose weights turn NaN stops as ``diverged`` with warnings (exit code 3), keeping the
  best weights;
- reports show the accuracy beside another selection metric, and the rank of a run trained
  low-rank from scratch; plots draw accuracies in percent;
- options that would be silently ignored are refused or noted; ``clip_exempt`` entries are
  checked; ``model.update_gate_bias`` can be unset from the command line.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lrcompress.errors import ConfigError, FormatError
from lrcompress.nn import LowRankGRU
from lrcompress.nn.highway import Highway
from lrcompress.parametrizations import factorization
from lrcompress.train import plots
from lrcompress.train.checkpoint import state_mismatch
from lrcompress.train.engine import fit
from lrcompress.train.models import glorot_init_
from lrcompress.train.optim import PaperRMSprop, build_rmsprop
from lrcompress.train.recipe import apply_overrides, check_recipe, check_train
from lrcompress.train.run import collect, finetune, format_report, train_recipe, write_csv
from lrcompress.train.stabilisers import Stabiliser, clip_exemptions, weight_norm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"meta": {"name": "tiny"},
        "task": {"name": "copy", "lag": 5, "data_length": 3, "train_size": 40, "valid_size": 20, "test_size": 20},
        "model": {"cell": "gru", "hidden_size": 8},
        "train": {"optimizer": "rmsprop", "lr": 3e-3, "batch_size": 10, "steps": 2, "eval_every": 1, "device": "cpu"}}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- F2/F3: a refused resume writes nothing, and says which keys do not fit ----------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f2") / "run"
    train_recipe(TINY, out, progress=False)
    return out


@pytest.mark.parametrize("bad, said", [
    ('train.clip_exempt=["nope"]', "has no parameter 'nope'"),
    ("model.hidden_size=12", "--set model.hidden_size=12 on a resume"),  # refused before the checkpoint is read
    ("model.learn_initial_state=true", "a resume cannot change the task or the model"),
])
def test_a_refused_resume_leaves_the_run_resumable(trained, tmp_path, bad, said):
    run = tmp_path / "run"
    run.mkdir()
    for name, data in snapshot(trained).items():
        (run / name).write_bytes(data)
    (run / ".lrcompress-run").write_text("written by lrcompress\n")
    before = snapshot(run)
    with pytest.raises((ConfigError, FormatError)) as caught:
        train_recipe(TINY, run, overrides=[bad, "train.steps=4"], resume=True, progress=False)
    message = str(caught.value)
    assert said in message and "\n" not in message
    assert snapshot(run) == before  # recipe.toml, metrics, checkpoints: byte for byte
    summary = train_recipe(TINY, run, overrides=["train.steps=4"], resume=True, progress=False)
    assert summary["steps"] == 4 and summary["stopped"] == "steps"


def test_a_refused_first_run_or_finetune_leaves_no_folder(trained, tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        train_recipe(TINY, tmp_path / "fresh", overrides=['train.clip_exempt=["nope"]'], progress=False)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ConfigError, match="nope"):
        finetune(trained, tmp_path / "ft", rank=2, overrides=['train.clip_exempt=["nope"]'], progress=False)
    assert not (tmp_path / "ft").exists()


def test_state_mismatch_names_missing_unexpected_and_shapes_on_one_line():
    saved = {"a": torch.zeros(2), "b": torch.zeros(3, 4), **{f"x{i}": torch.zeros(1) for i in range(7)}}
    model = {"a": torch.zeros(2), "b": torch.zeros(4, 4), "c": torch.zeros(1)}
    text = state_mismatch(saved, model)
    assert text == ("missing c; unexpected x0, x1, x2, x3, x4 and 2 more; "
                    "shapes differ: b (3, 4) in the checkpoint vs (4, 4) in the model")
    assert state_mismatch(model, model) == ""


# -- F4: weight-normalised factors are still low rank ---------------------------------------------

def test_highway_bottleneck_dropout_runs_on_weight_normalised_factors():
    torch.manual_seed(0)
    plain = Highway(6, rank=2, diag=True, bottleneck_dropout=0.5).double().train()
    normed = copy.deepcopy(plain)
    assert weight_norm(normed) and factorization(normed.gate, "weight") is not None
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.manual_seed(1)
    want = plain(x)
    torch.manual_seed(1)
    got = normed(x)  # was: AttributeError 'NoneType' object has no attribute 'diag'
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # weight norm keeps the function
    got.sum().backward()
    scales = normed.gate.parametrizations.weight.parametrizations.original0.original0  # g of L
    assert scales.grad is not None and scales.grad.abs().sum() > 0


def _grads(rnn, x, h0, run):
    rnn.zero_grad(set_to_none=True)
    out, h = run(rnn, x, h0)
    torch.manual_seed(9)
    loss = (out * torch.randn(out.shape, dtype=out.dtype)).sum() + (h * torch.randn(h.shape, dtype=h.dtype)).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in rnn.named_parameters()}


def _normed_gru(tied: bool = False) -> nn.Module:
    torch.manual_seed(3)
    rnn = LowRankGRU(3, 6, rank=2, diag=True, tied=tied, batch_first=True).double()
    weight_norm(rnn)
    assert factorization(rnn, "weight_hh_l0") is not None  # was None: the factors' own parametrizations counted
    return rnn


@pytest.mark.parametrize("scheme", ["dl4mt", "per_gate"])
def test_masked_backward_on_weight_normalised_factors_equals_autograd(scheme):
    from lrcompress.nn.variational import draw_masks, masked_backward, run_variational

    rnn = _normed_gru()
    assert masked_backward(rnn)
    torch.manual_seed(5)
    masks = draw_masks(rnn, 4, 7, scheme=scheme, recurrent=0.5, inputs=0.3)
    assert len(masks.layers[0].groups) == 3  # low-rank untied: a group per gate in both (dl4mt: 2 if read as dense)
    x, h0 = torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(1, 4, 6, dtype=torch.float64)
    fast = _grads(rnn, x, h0, lambda m, a, b: run_variational(m, a, b, masks, backward="auto"))
    ref = _grads(rnn, x, h0, lambda m, a, b: run_variational(m, a, b, masks, backward="autograd"))
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-12)
    assert fast[1].keys() == ref[1].keys() and any("parametrizations.original0" in k for k in ref[1])
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_factored_backward_on_weight_normalised_factors_equals_the_dense_path(tied):
    from lrcompress.execution import accelerate
    from lrcompress.execution.ops import prepare

    dense = _normed_gru(tied)
    fast = accelerate(copy.deepcopy(dense), mode="factored", training=True)
    assert prepare(fast, 0, 0).hh.factored  # the factors, not a rebuilt W (was: dense, silently)
    x, h0 = torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(1, 4, 6, dtype=torch.float64)
    got = _grads(fast, x, h0, lambda m, a, b: m(a, b))
    want = _grads(dense, x, h0, lambda m, a, b: m(a, b))
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-10, atol=1e-12, msg=name)
    # inference: the prepared factors follow a change of the weight-norm scales
    for module in (fast, dense):
        module.eval()
        with torch.no_grad():
            module.parametrizations.weight_hh_l0.parametrizations.original0.original0.mul_(1.5)
    with torch.no_grad():
        fast(x, h0)  # prepares (and caches) the factors
        fast.parametrizations.weight_hh_l0.parametrizations.original0.original0.mul_(2.0)
        dense.parametrizations.weight_hh_l0.parametrizations.original0.original0.mul_(2.0)
        torch.testing.assert_close(fast(x, h0)[0], dense(x, h0)[0], rtol=1e-10, atol=1e-12)


def test_glorot_init_refuses_weight_normalised_factors():
    rnn = _normed_gru()
    with pytest.raises(ConfigError, match="weight-normalised"):
        glorot_init_(rnn)


# -- F5: RMSProp's 0/0, and runs that diverge --------------------------------------------------

def test_rmsprop_settings_that_divide_zero_by_zero_are_refused():
    with pytest.raises(ConfigError, match=r"train.rmsprop_eps = 0 with train.rmsprop_initial_accumulator = 0"):
        check_train({"steps": 1, "rmsprop_eps": 0.0, "rmsprop_initial_accumulator": 0.0})
    with pytest.raises(ConfigError, match=r"train.rmsprop_eps = 0 with train.rmsprop_alpha = 0.5"):
        check_train({"steps": 1, "rmsprop_eps": 0.0, "rmsprop_alpha": 0.5})
    with pytest.raises(ConfigError, match="initial_accumulator = 0"):
        build_rmsprop([nn.Parameter(torch.ones(1))], eps=0.0, initial_accumulator=0.0)
    check_train({"steps": 1, "rmsprop_eps": 0.0})  # the authors' setting: accumulator 1e-3, alpha 0.9
    check_train({"steps": 1, "rmsprop_eps": 1e-8, "rmsprop_initial_accumulator": 0.0})
    # what the refused settings did: torch's step on a zero gradient is 0/0
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.RMSprop([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([1.0, 0.0])
    opt.step()
    assert torch.isnan(p[1]) and torch.isfinite(p[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paper_rmsprop_zero_and_underflowing_gradients(dtype):
    lr, alpha = 0.1, 0.9
    p = nn.Parameter(torch.ones(3, dtype=dtype))
    opt = PaperRMSprop([p], lr=lr, alpha=alpha, eps=0.0, initial_accumulator=0.0)
    p.grad = torch.zeros(3, dtype=dtype)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=dtype))  # 0/0 in the formula: no step
    tiny = torch.finfo(dtype).tiny
    g = torch.tensor([0.0, tiny / 2, -tiny / 2], dtype=dtype)  # subnormal: their squares underflow to 0
    assert torch.equal(g * g, torch.zeros(3, dtype=dtype))
    p.grad = g
    before = p.detach().clone()
    opt.step()
    step = (p.detach() - before).double()
    # exact arithmetic: acc = (1 - alpha) g^2, step = -lr sign(g) / sqrt(1 - alpha), 0 where g = 0
    want = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64) * lr / math.sqrt(1 - alpha)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(step, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_a_run_whose_weights_turn_nan_stops_as_diverged_and_keeps_the_best(tmp_path):
    from lrcompress.train.run import build

    recipe = check_recipe(TINY)
    task, model = build(recipe)

    def poison(loop):  # as a 0/0 in an optimiser would: the weights become NaN after update 3
        if loop.step == 3:
            with torch.no_grad():
                loop.model.head.weight.fill_(float("nan"))

    with pytest.warns(UserWarning, match="diverged: the weights became NaN/Inf by update 3"):
        result = fit(model, lambda e: task.batches("train", 10, seed=0, epoch=e), task=task,
                     recipe={**recipe["train"], "steps": 20, "eval_every": 1},
                     val_loader=lambda: task.batches("valid", 20, seed=0, shuffle=False), run_dir=tmp_path / "run",
                     on_step=poison, progress=False)
    assert result.stopped == "diverged" and result.steps == 3  # not 17 more skipped updates
    assert result.best_step == 2 and math.isfinite(result.val["ce"])  # the best weights are kept
    assert result.warnings and "from update 2" in result.warnings[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"] == "diverged" and summary["warnings"] == result.warnings


def test_final_nan_metrics_warn_and_the_cli_exits_with_3(capsys):
    from lrcompress.cli_train import _report_run

    summary = {"run_dir": "runs/x", "steps": 3, "stopped": "diverged", "wall_time": 1.0, "metric": "ce",
               "val": {"ce": float("nan")}, "params": 10, "warnings": ["final val ce is not finite"]}
    with pytest.raises(SystemExit) as stop:
        _report_run(summary, False, "")
    assert stop.value.code == 3 and "(diverged)" in capsys.readouterr().out
    _report_run({**summary, "stopped": "steps", "warnings": [], "val": {"ce": 0.5}}, False, "")  # a sound run: no exit


def test_nan_metrics_without_nan_weights_are_reported(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    data = [(torch.randn(4, 2), torch.randn(4, 1))]
    bad = [(torch.full((4, 2), float("nan")), torch.zeros(4, 1))]
    with pytest.warns(UserWarning, match="final val loss is not finite"):
        result = fit(model, data, nn.functional.mse_loss, recipe={"steps": 2, "eval_every": 1}, val_loader=bad,
                     progress=False)
    assert result.stopped == "steps" and result.warnings and torch.isfinite(model.weight).all()


# -- F6 and reports: accuracy beside CE, rank of a low-rank run, percent on plots ----------------

def _fake_run(folder: Path, summary: dict, model: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    recipe = apply_overrides({"task": {"name": "copy"}, "model": model or {}, "train": {"steps": 1}}, [])
    from lrcompress.train.recipe import dump_recipe

    (folder / "recipe.toml").write_text(dump_recipe(check_recipe(recipe)))


def test_report_shows_accuracy_beside_ce_for_trained_and_finetuned_runs(tmp_path):
    _fake_run(tmp_path / "dense", {"kind": "train", "metric": "ce", "params": 100, "wall_time": 5.0,
                                   "val": {"ce": 0.3, "accuracy": 0.91}, "test": {"ce": 0.31, "accuracy": 0.9012}})
    rows = collect(tmp_path / "dense")
    assert rows[0]["accuracy_after"] == 0.9012 and rows[0]["accuracy_before"] is None
    table = format_report(rows)
    assert "after acc" in table.splitlines()[0] and "90.12%" in table and "dense acc" not in table
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "rank4", {"kind": "finetune", "metric": "ce", "rank": 4, "diag": False, "params": 50,
                                "ratio": 2.0, "wall_time": 1.0, "test": {"ce": 0.4, "accuracy": 0.88},
                                "dense": {"test": {"ce": 0.31, "accuracy": 0.9012}},
                                "converted": {"test": {"ce": 2.0, "accuracy": 0.2}}})
    rows = collect(sweep)
    table = format_report(rows)
    header = table.splitlines()[0]
    assert all(h in header for h in ("dense acc", "before acc", "after acc")) and header.endswith("time")
    assert "90.12%" in table and "20.00%" in table and "88.00%" in table and "0.4" in table
    csv = write_csv(rows, tmp_path / "r.csv").read_text().splitlines()
    assert csv[0].endswith("accuracy_dense,accuracy_before,accuracy_after") and csv[1].endswith("0.9012,0.2,0.88")
    # headline accuracy: no second copy of it
    _fake_run(tmp_path / "acc", {"kind": "train", "metric": "accuracy", "params": 100, "wall_time": 5.0,
                                 "test": {"ce": 0.31, "accuracy": 0.9}})
    assert "acc" not in format_report(collect(tmp_path / "acc")).splitlines()[0].replace("accuracy", "")


def test_finetune_and_sweep_lines_show_accuracy_beside_ce(capsys):
    from lrcompress.cli_train import _report_run
    from lrcompress.train.run import point_line

    summary = {"run_dir": "runs/ft", "steps": 3, "stopped": "steps", "wall_time": 1.0, "metric": "ce",
               "converted": {"test": {"ce": 2.0, "accuracy": 0.2}}, "dense": {"test": {"ce": 0.3, "accuracy": 0.9012}},
               "test": {"ce": 0.4, "accuracy": 0.88}, "params_dense": 100, "params": 50, "ratio": 2.0}
    _report_run(summary, False, "")
    assert "test accuracy: dense 90.12%, converted 20.00%, fine-tuned 88.00%" in capsys.readouterr().out
    assert "test ce 2 -> 0.4 (accuracy 20.00% -> 88.00%)" in point_line(summary)
    assert "DIVERGED" in point_line({**summary, "stopped": "diverged", "warnings": ["x"]})


def test_report_shows_the_rank_of_a_run_trained_low_rank(tmp_path):
    recipe = copy.deepcopy(TINY)
    recipe["model"].update(rank=2, diag=True)
    train_recipe(recipe, tmp_path / "lr", progress=False)
    (row,) = collect(tmp_path / "lr")
    assert (row["rank"], row["diag"], row["tied"], row["structure"]) == (2, True, False, None)
    line = format_report([row]).splitlines()[2].split()
    assert line[1:3] == ["2", "yes"]
    train_recipe(TINY, tmp_path / "dense", progress=False)
    (row,) = collect(tmp_path / "dense")
    assert row["rank"] is None and format_report([row]).splitlines()[2].split()[1:3] == ["-", "no"]


def test_plots_draw_accuracy_in_percent():
    rows = [{"run": "rank2", "rank": 2, "diag": False, "structure": "lowrank", "options": {}, "params": 50,
             "ratio": 2.0, "metric": "accuracy", "split": "test", "dense": 0.9, "before": 0.5, "after": 0.85,
             "wall_time": 1.0}]
    ax = plots.sweep_figure(rows).axes[0]
    assert "% correct" in ax.get_ylabel()
    ys = sorted(float(y) for line in ax.get_lines() for y in line.get_ydata())
    assert ys == [50.0, 85.0, 90.0]
    records = {"run": [{"step": 1, "val": {"accuracy": 0.25}}, {"step": 2, "val": {"accuracy": 0.5}}]}
    ax = plots.curves_figure(records, "accuracy").axes[0]
    assert list(ax.get_lines()[0].get_ydata()) == [25.0, 50.0] and "%" in ax.get_ylabel()
    import matplotlib.pyplot as plt

    plt.close("all")


# -- smaller: silently ignored options, clip_exempt, update_gate_bias --------------------------

@pytest.mark.parametrize("key, value", [("rmsprop_eps_inside", True), ("rmsprop_initial_accumulator", 0.0),
                                        ("rmsprop_alpha", 0.99), ("rmsprop_eps", 0.0)])
@pytest.mark.parametrize("optimizer", ["adam", "adafactor"])
def test_rmsprop_settings_with_another_optimizer_are_refused(key, value, optimizer):
    with pytest.raises(ConfigError, match=f"train.{key} = .* is an RMSProp setting and train.optimizer = "
                                          f"'{optimizer}'"):
        check_train({"steps": 1, "optimizer": optimizer, key: value})
    resolved = check_train({"steps": 1, "optimizer": optimizer})  # every default written out: fine
    assert check_train(resolved) == resolved


def test_per_sequence_masks_without_any_dropout_rate_are_noted():
    spec = {"task": {"name": "copy"}, "model": {"dropout_masks": "per_gate"}, "train": {"steps": 1}}
    with pytest.warns(UserWarning, match="dropout_masks = 'per_gate' changes nothing: every dropout rate is 0"):
        check_recipe(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_recipe({**spec, "train": {"steps": 1, "recurrent_dropout": 0.1}})
        check_recipe({**spec, "model": {"dropout_masks": "per_gate", "input_dropout": 0.1}})


@pytest.mark.parametrize("names, said", [
    (["weight_hh_l0:"], "gate letter after the colon"),
    ([":n"], "gate letter after the colon"),
    (["bias_hh_l0", "bias_hh_l0"], "lists 'bias_hh_l0' twice"),
    (["bias_hh_l0", "bias_hh_l0:n"], "'bias_hh_l0' alone already leaves every gate unclipped"),
])
def test_clip_exempt_entries_are_checked(names, said):
    with pytest.raises(ConfigError, match=said):
        check_train({"steps": 1, "clip_exempt": names})
    with pytest.raises(ConfigError, match=said):
        clip_exemptions(nn.GRU(2, 4), names)


def test_clip_exempt_gates_only_on_tensors_that_stack_gates():
    lstm = nn.LSTM(3, 8, proj_size=4)  # weight_hr_l0 (4, 8): 4 rows would pass a shape test for 4 gates
    with pytest.raises(ConfigError, match="weight_hr_l0 of shape .4, 8. does not stack the 4 gates"):
        clip_exemptions(lstm, ["weight_hr_l0:i"])
    assert clip_exemptions(lstm, ["weight_hr_l0"])  # the whole projection: fine
    tied = LowRankGRU(3, 6, rank=3, tied=True)  # R (3, 6): one for all three gates
    with pytest.raises(ConfigError, match="does not stack the 3 gates"):
        clip_exemptions(tied, ["parametrizations.weight_hh_l0.original1:n"])
    weight_norm(tied)
    with pytest.raises(ConfigError, match="does not stack the 3 gates"):
        clip_exemptions(tied, ["parametrizations.weight_hh_l0.parametrizations.original1.original:n"])
    untied = LowRankGRU(3, 6, rank=2)
    spans = clip_exemptions(untied, ["parametrizations.weight_hh_l0.original1:n"])
    assert list(spans.values()) == [[(0, 2)]]  # R (3, 2, 6): gates r, z still clipped
    weight_norm(untied)
    spans = clip_exemptions(untied, ["parametrizations.weight_hh_l0.parametrizations.original0.original1:z"])
    assert list(spans.values()) == [[(0, 1), (2, 3)]]
    Stabiliser(untied, clip="element", clip_exempt=["bias_hh_l0:n"])


def test_update_gate_bias_can_be_unset_from_the_command_line():
    base = {"task": {"name": "copy"}, "model": {"update_gate_bias": 4.0}, "train": {"steps": 1}}
    for text in ("none", '""', "None"):
        assert check_recipe(apply_overrides(base, [f"model.update_gate_bias={text}"]))["model"]["update_gate_bias"] \
            is None
    assert check_recipe(apply_overrides(base, ["model.output_dropout=none"]))["model"]["output_dropout"] is None
    with pytest.raises(ConfigError, match="model.update_gate_bias must be a number"):
        check_recipe(apply_overrides(base, ["model.update_gate_bias=high"]))
