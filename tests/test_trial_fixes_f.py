"""Faults found by trying the tool as a user would (round f): each test fails on the old code."""

import json
import re

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


class _Scale(nn.Module):
    def forward(self, x):
        return 2.0 * x


def test_a_structure_whose_factor_is_itself_parametrized_still_reads_as_that_structure():
    """A parametrization on a Kronecker factor (a user's own, or weight normalisation) makes torch
    add a ``parametrizations`` child to the weight's list: it is not a second parametrization of
    the weight, so the weight is still Kronecker and still counted by the unitary penalty."""
    from torch.nn.utils import parametrize

    from lrcompress.structured.kronecker import kronecker, unitary_penalty
    from lrcompress.structures import parametrization, structure_of, structured

    lin = nn.Linear(12, 12, dtype=torch.float64)
    kronecker(lin, factors=((3, 3), (2, 2), (2, 2)))
    plist = lin.parametrizations.weight
    before = unitary_penalty(lin).item()
    F = plist.original0.detach().clone()
    parametrize.register_parametrization(plist, "original0", _Scale())
    assert len(plist) == 2  # torch counts the factor's own list: the old check read "not Kronecker"
    assert structure_of(parametrization(lin, "weight")) == "kronecker" and structured(lin, "weight") is plist[0]
    eye = torch.eye(3, dtype=torch.float64)
    expected = before - ((F.mT @ F - eye) ** 2).sum().item() + ((4 * F.mT @ F - eye) ** 2).sum().item()
    assert unitary_penalty(lin).item() == pytest.approx(expected, rel=1e-12)


def test_scornn_optimizer_finds_a_skew_original_that_is_itself_parametrized():
    """scoRNN's A trains at its own rate even when the user chained a parametrization on it: the
    leaf parameter goes into the orthogonal group, once, and nothing else changes group."""
    from torch.nn.utils import parametrize

    from lrcompress.nn.scornn import ScoRNN, scornn_optimizer

    model = nn.Sequential(ScoRNN(2, 6))
    plist = model[0].parametrizations.weight_hh_l0
    parametrize.register_parametrization(plist, "original0", _Scale())
    leaf = plist.parametrizations.original0.original
    rest, skew = scornn_optimizer(model, lr=1e-3, lr_orthogonal=1e-4).param_groups
    assert skew["params"] == [leaf] and skew["lr"] == 1e-4
    assert all(p is not leaf for p in rest["params"]) and len(rest["params"]) == 3


def test_a_sweep_point_refused_at_its_first_update_does_not_block_the_corrected_sweep(tmp_path):
    """A point whose start failed before any checkpoint (here lr = 1e38) left only its recipe and
    conversion record: rerunning the sweep with a sane rate starts it afresh with that rate, rather
    than refusing because the dead start 'was made with train.lr = 1e+38'."""
    from lrcompress.train.run import sweep, train_recipe

    recipe = {"meta": {"name": "t"}, "task": {"name": "addition", "length": 6, "train_size": 64, "valid_size": 32,
                                              "test_size": 32},
              "model": {"cell": "gru", "hidden_size": 8}, "train": {"steps": 4, "batch_size": 16, "eval_every": 2, "optimizer": "adam"}}
    dense = tmp_path / "dense"
    train_recipe(recipe, dense, progress=False)
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="overflows"):
        sweep(dense, out, ranks=[2], overrides=["train.lr=1e38"], progress=False, echo=lambda s: None)
    assert not (out / "rank2" / "last.safetensors").exists()
    points = sweep(dense, out, ranks=[2], overrides=["train.steps=2"], progress=False, echo=lambda s: None)
    assert points[0]["steps"] == 2 and "1e+38" not in (out / "rank2" / "recipe.toml").read_text()
    # A point that did train keeps its settings: a changed recipe is still refused.
    with pytest.raises(ConfigError, match="was made with train.steps"):
        sweep(dense, out, ranks=[2], overrides=["train.steps=3"], progress=False, echo=lambda s: None)


# -- a resume continues the run as it was made -------------------------------------------------

def _small_recipe(**train):
    return {"meta": {"name": "r"}, "task": {"name": "addition", "length": 6, "train_size": 64, "valid_size": 32,
                                            "test_size": 32},
            "model": {"cell": "gru", "hidden_size": 8},
            "train": {"steps": 4, "batch_size": 16, "eval_every": 2, "optimizer": "adam", "lr": 0.01, **train}}


def _lrs(run_dir):
    import json

    return [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_takes_the_learning_rate_and_weight_decay_it_is_given(tmp_path):
    """The optimiser's saved param groups used to bring back the old lr: a changed rate was
    recorded in recipe.toml yet never used. Now it applies from the next update, with a warning."""
    from lrcompress.train.run import train_recipe

    run = tmp_path / "run"
    train_recipe(_small_recipe(), run, progress=False)
    with pytest.warns(UserWarning, match="changed settings: lr, weight_decay"):
        train_recipe(_small_recipe(), run, resume=True, progress=False,
                     overrides=["train.steps=8", "train.lr=0.0001", "train.weight_decay=0.5"])
    assert _lrs(run) == [0.01, 0.01, 0.0001, 0.0001]
    from lrcompress.train.checkpoint import load_checkpoint

    groups = load_checkpoint(run / "last.safetensors").optimizer["param_groups"]
    assert all(g["lr"] == 0.0001 and g["weight_decay"] == 0.5 for g in groups)


@pytest.mark.parametrize("change, refused", [
    (["train.optimizer=rmsprop"], "train.optimizer = 'rmsprop'"),
    (["train.lr_schedule=onecycle"], "train.lr_schedule = 'onecycle'"),
    (["train.seed=7"], "train.seed = 7"),
    (["task.length=5"], "--set task.length=5"),
    (["model.hidden_size=16"], "--set model.hidden_size=16"),
])
def test_a_resume_refuses_what_the_checkpoint_cannot_follow_and_stays_resumable(tmp_path, change, refused):
    """Another optimiser (KeyError 'square_avg' inside torch), a schedule (KeyError
    'initial_lr'), another seed, task or model: one ConfigError, and nothing in the run changes."""
    from lrcompress.train.run import train_recipe

    run = tmp_path / "run"
    train_recipe(_small_recipe(), run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=re.escape(refused)):
        train_recipe(_small_recipe(), run, resume=True, progress=False, overrides=["train.steps=6", *change])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert train_recipe(_small_recipe(), run, resume=True, progress=False, overrides=["train.steps=6"])["steps"] == 6


def test_a_resume_with_a_schedule_refuses_a_new_rate(tmp_path):
    from lrcompress.train.run import train_recipe

    run = tmp_path / "run"
    train_recipe(_small_recipe(lr_schedule="onecycle"), run, progress=False)
    with pytest.raises(ConfigError, match=r"train\.lr = 0\.1 .* trained with 0\.01"):
        train_recipe(_small_recipe(lr_schedule="onecycle"), run, resume=True, progress=False,
                     overrides=["train.lr=0.1"])


def test_a_resume_refuses_a_recipe_that_is_not_the_runs_own(tmp_path):
    """``lrcompress train OTHER.toml --out RUN --resume`` used to ignore OTHER without a word."""
    from lrcompress.train.run import train_recipe

    run = tmp_path / "run"
    train_recipe(_small_recipe(), run, progress=False)
    other = _small_recipe()
    other["task"]["length"] = 7
    with pytest.raises(ConfigError, match=r"task\.length = 6, but the recipe asks 7.*recipe\.toml"):
        train_recipe(other, run, resume=True, progress=False)
    longer = _small_recipe(steps=6)  # only how long: allowed
    assert train_recipe(longer, run, resume=True, progress=False)["steps"] == 6
    assert train_recipe(run / "recipe.toml", run, resume=True, progress=False,
                        overrides=["train.steps=8"])["steps"] == 8


# -- finetune's rank as the report shows it -----------------------------------------------------

@pytest.fixture(scope="module")
def dense_small(tmp_path_factory):
    from lrcompress.train.run import train_recipe

    run = tmp_path_factory.mktemp("dense") / "run"
    train_recipe(_small_recipe(), run, progress=False)
    return run


def test_finetune_refuses_a_rank_and_an_energy_together(dense_small, tmp_path):
    from lrcompress.train.run import finetune

    for rank, energy in ((4, 0.9), ("energy=0.9", 0.8)):
        with pytest.raises(ConfigError, match="exactly one of rank and energy"):
            finetune(dense_small, tmp_path / "both", rank=rank, energy=energy, progress=False)
        assert not (tmp_path / "both").exists()


def test_finetune_records_the_rank_it_used_and_report_reads_it(dense_small, tmp_path):
    """``--rank 0.5`` (half of n = 8) and ``--rank energy=F`` made summaries the report refused
    ("rank is 'energy=0.9', not a number") or mislabelled (rank 0.5)."""
    from lrcompress.train.run import collect, finetune, format_report

    half = finetune(dense_small, tmp_path / "half", rank=0.5, progress=False, overrides=["train.steps=2"])
    assert (half["rank"], half["rank_asked"]) == (4, 0.5)
    spelled = finetune(dense_small, tmp_path / "spelled", rank="energy=0.9", progress=False,
                       overrides=["train.steps=2"])
    plain = finetune(dense_small, tmp_path / "plain", energy=0.9, progress=False, overrides=["train.steps=2"])
    assert spelled["energy"] == plain["energy"] == 0.9 and spelled["params"] == plain["params"]
    assert spelled["rank"] == plain["rank"] and isinstance(spelled["rank"], int)
    rows = {r["run"]: r for r in collect(tmp_path)}
    assert rows["half"]["rank"] == 4 and rows["spelled"]["rank"] == spelled["rank"]
    assert "half" in format_report(list(rows.values()))


@pytest.mark.parametrize("schedule", ["step", "plateau", "onecycle"])
def test_a_resume_with_the_callers_own_optimizer_and_scheduler_equals_the_uninterrupted_run(tmp_path, schedule):
    """The caller's scheduler had lowered the lr (StepLR, ReduceLROnPlateau) or cycled Adam's
    betas (OneCycleLR): the resume used to put the fresh optimizer's values back over them."""
    def run(run_dir, stop=None, resume=False):
        torch.manual_seed(0)
        model = _Net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = {"step": lambda: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                 "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
                 "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=12)}[schedule]()

        def on_step(loop):
            if loop.step == stop:
                loop._signalled = True

        return fit(model, _tiny_data(), nn.functional.mse_loss, recipe={"steps": 12, "eval_every": 2},
                   optimizer=opt, scheduler=sched, val_loader=_tiny_data()[:1], run_dir=run_dir, resume=resume,
                   on_step=on_step, progress=False), opt

    (full, opt_full) = run(tmp_path / "full")
    run(tmp_path / "cut", stop=5)
    resumed, opt_resumed = run(tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in full.history]
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in resumed.history] == strip
    assert opt_full.param_groups[0]["lr"] == opt_resumed.param_groups[0]["lr"]


def test_a_resume_with_another_optimizer_class_is_refused(tmp_path):
    torch.manual_seed(0)
    model = _Net()
    fit(model, _tiny_data(), nn.functional.mse_loss, recipe={"steps": 2}, run_dir=tmp_path / "r",
        optimizer=torch.optim.RMSprop(model.parameters(), lr=1e-3), progress=False)
    for other in (torch.optim.SGD, torch.optim.Adam):
        with pytest.raises(ConfigError, match=f"a {other.__name__} optimizer on a resume .* trained with RMSprop"):
            fit(model, _tiny_data(), nn.functional.mse_loss, recipe={"steps": 4}, run_dir=tmp_path / "r", resume=True,
                optimizer=other(model.parameters(), lr=1e-3), progress=False)
    with pytest.raises(ConfigError, match="train.steps = 1 on a resume .* 2 updates already"):
        fit(model, _tiny_data(), nn.functional.mse_loss, recipe={"steps": 1}, run_dir=tmp_path / "r", resume=True,
            optimizer=torch.optim.RMSprop(model.parameters(), lr=1e-3), progress=False)


def test_a_finetune_or_sweep_rerun_refuses_points_converted_from_another_model(dense_small, tmp_path):
    """The point's stored dense and converted metrics belong to the model it was converted from:
    resuming or reusing it for another source used to mix the two without a word."""
    from lrcompress.train.run import finetune, sweep, train_recipe

    other = tmp_path / "other"
    train_recipe(_small_recipe(seed=1), other, progress=False)
    finetune(dense_small, tmp_path / "ft", rank=2, progress=False, overrides=["train.steps=2"])
    with pytest.raises(ConfigError, match=r"was converted from .*model\.safetensors, not .*other"):
        finetune(other, tmp_path / "ft", rank=2, resume=True, progress=False, overrides=["train.steps=4"])
    sweep(dense_small, tmp_path / "sw", ranks=[2], progress=False, echo=lambda s: None, overrides=["train.steps=2"])
    with pytest.raises(ConfigError, match=r"rank2 was converted from"):
        sweep(other, tmp_path / "sw", ranks=[2], progress=False, echo=lambda s: None, overrides=["train.steps=2"])


def test_runs_and_sweeps_keep_to_their_own_folders(dense_small, tmp_path):
    """``train --out SWEEP`` and ``sweep --out RUN`` used to succeed, and ``report`` then showed
    only one of the two."""
    from lrcompress.train.run import sweep, train_recipe

    sweep(dense_small, tmp_path / "sw", ranks=[2], progress=False, echo=lambda s: None, overrides=["train.steps=2"])
    with pytest.raises(ConfigError, match="is a sweep directory"):
        train_recipe(_small_recipe(), tmp_path / "sw", progress=False)
    run = tmp_path / "run"
    train_recipe(_small_recipe(), run, progress=False)
    with pytest.raises(ConfigError, match="is a run directory"):
        sweep(dense_small, run, ranks=[2], progress=False, echo=lambda s: None)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_sweep_refuses_a_users_file_in_a_point_folder_before_any_point_trains(dense_small, tmp_path, kind):
    from lrcompress.errors import LRCompressError
    from lrcompress.train.run import sweep

    out = tmp_path / "sw"
    out.mkdir()
    if kind == "file":
        (out / "rank4").write_text("mine")
    else:
        (out / "rank4").mkdir()
        (out / "rank4" / "notes.txt").write_text("mine")
    with pytest.raises(LRCompressError, match="rank4"):
        sweep(dense_small, out, ranks=[2, 4], progress=False, echo=lambda s: None, overrides=["train.steps=2"])
    assert not (out / "rank2").exists()  # the first point did not train
    assert (out / "rank4").exists() and sorted(p.name for p in out.iterdir()) == ["rank4"]


def test_forced_dense_execution_is_named_in_the_summary():
    """``train.execution = "dense"`` used to leave ``execution: {}`` (no masks) or name the masked
    path as if the setting had been ignored (per-sequence masks)."""
    import sys

    sys.path.insert(0, "tests")
    from test_fidelity_text import B, T, lm_model

    x = torch.randint(0, 11, (B, T))
    plain = lm_model("batch", rank=2)
    got = fit(plain, [(x, x)], lambda out, y: out.float().mean(), recipe={"steps": 1, "execution": "dense"}).execution
    assert got == {"rnn": "dense rebuild (train.execution = dense)"}
    masked = lm_model("dl4mt", rank=2)
    got = fit(masked, [(x, x)], lambda out, y: out.float().mean(), recipe={"steps": 1, "execution": "dense"}).execution
    assert got["rnn"].startswith("factored backward with per-sequence dropout masks") and "no PyTorch kernel" in got["rnn"]


def test_evaluating_a_model_whose_outputs_are_not_finite_exits_3(tmp_path, run):
    """``lrcompress evaluate`` printed bpc inf and exited 0 where train/finetune exit 3."""
    from safetensors.torch import load_file, save_file

    from conftest import train_char_lm

    run_dir = train_char_lm(tmp_path, steps=2)
    weights = load_file(run_dir / "model.safetensors")
    name = next(k for k in weights if k.endswith("weight_hh_l0"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, run_dir / "model.safetensors")
    result = run("evaluate", run_dir, "--symbols", "40")
    assert result.code == 3 and "not finite" in result.err and "Traceback" not in result.err


def test_report_names_the_sweep_points_that_have_not_finished(dense_small, tmp_path, run):
    from lrcompress.train.run import sweep

    out = tmp_path / "sw"
    sweep(dense_small, out, ranks=[2], progress=False, echo=lambda s: None, overrides=["train.steps=2"])
    (out / "rank4").mkdir()  # a point that started: its recipe, no summary yet
    (out / "rank4" / "recipe.toml").write_text((out / "rank2" / "recipe.toml").read_text())
    result = run("report", out)
    assert result.code == 0 and "rank2" in result.out and "rank4" not in result.out
    assert "not finished yet (no summary.json): rank4" in result.err
    doc = run("report", out, "--json")
    assert [r["run"] for r in json.loads(doc.out)] == ["rank2"]


def test_inspect_of_an_all_zero_gate_block_says_rank_0_keeps_all_of_it():
    """An all-zero block read E@8 = 0.0% at full rank and r@0.5 = 8: a zero matrix is exactly
    rank 0 (the Eckart-Young error of any rank is 0)."""
    from lrcompress.summary import spectra

    gru = nn.GRU(4, 8)
    with torch.no_grad():
        gru.weight_hh_l0[8:16].zero_()  # the update gate's block
    rows = spectra(dict(gru.state_dict()), [1, 8]).rows
    zero = next(r for r in rows if r["gate"] == "z")
    assert set(zero["rank_for_energy"].values()) == {0} and zero["energy_at_rank"] == {"1": 1.0, "8": 1.0}
    other = next(r for r in rows if r["gate"] == "r")
    assert other["energy_at_rank"]["8"] == pytest.approx(1.0) and other["energy_at_rank"]["1"] < 1.0


def test_report_shows_a_tied_column_when_a_point_is_tied(dense_small, tmp_path):
    from lrcompress.train.run import collect, finetune, format_report

    finetune(dense_small, tmp_path / "a", rank=2, progress=False, overrides=["train.steps=2"])
    untied_only = format_report(collect(tmp_path))
    assert "tied" not in untied_only.splitlines()[0]  # unchanged when no point is tied
    finetune(dense_small, tmp_path / "b", rank=2, tied=True, progress=False, overrides=["train.steps=2"])
    lines = format_report(collect(tmp_path)).splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "rank", "diag", "tied"]
    cells = {line.split()[0]: line.split() for line in lines[2:4]}
    assert cells["a"][3] == "no" and cells["b"][3] == "yes" and cells["a"][1] == cells["b"][1] == "2"


def test_the_training_cost_model_counts_the_dense_kernels_own_training_overhead():
    """At n = 128, d = 24 and batch 1 the factored backward measured 1.5-1.8x faster than the
    rebuilt path (benchmarks/bench_training_choice.py), yet the model picked dense: the dense
    kernel's per-step cost in training is now its own profile entry, and inference is unchanged."""
    from dataclasses import replace

    from lrcompress.execution.cost import PROFILES, WeightShape, estimate

    shapes = [WeightShape(3, 128, 1, recurrent=False), WeightShape(3, 128, 128, 24, diag=True)]
    now = estimate(shapes, batch=1, steps=100, training=True)
    before = estimate(shapes, batch=1, steps=100, training=True, profile=replace(PROFILES["cpu"], dense_train_step=None))
    assert now.choice == "factored" and before.choice == "dense"
    assert now.factored == before.factored  # only the dense side changed
    steps, passes = 100, 2
    assert now.dense - before.dense == pytest.approx(steps * passes * (40e-6 - 12e-6))
    assert estimate(shapes, batch=1, steps=100) == estimate(shapes, batch=1, steps=100,
                                                           profile=replace(PROFILES["cpu"], dense_train_step=None))


class _CallsCode:
    def __reduce__(self):
        import os

        return (os.getcwd, ())  # harmless, but a call: the safe loader refuses it


def test_unreadable_checkpoints_say_what_may_be_wrong(tmp_path, run):
    """A pickle that calls code read as just 'corrupt'; an empty state dict as 'not a state dict
    of tensors; name the entry with --key'; a zip of garbage leaked PyTorch's plea for reports;
    ``report`` on a file said the path did not exist."""
    import io
    import zipfile

    torch.save({"a": _CallsCode()}, tmp_path / "code.pt")
    result = run("convert", tmp_path / "code.pt", "--rank", "2")
    assert result.code == 2 and "runs code" in result.err and "--trust-pickle" in result.err
    assert not (tmp_path / "code.lr.safetensors").exists()
    torch.save({"state_dict": {}}, tmp_path / "empty.pt")
    result = run("convert", tmp_path / "empty.pt", "--rank", "2")
    assert result.code == 2 and "holds no tensors (an empty state dict?)" in result.err
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", bytes(range(256)) * 4)
    (tmp_path / "garbage.pt").write_bytes(buffer.getvalue())
    result = run("convert", tmp_path / "garbage.pt", "--rank", "2")
    assert result.code == 2 and "Could this error message be improved" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    result = run("report", tmp_path / "empty.pt")
    assert result.code == 2 and "is a file, not a run or sweep directory" in result.err
