"""Faults found by trying the tool as a user would (round g): each test fails on the old code."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.errors import ConfigError, OutputExistsError, SecondOrderError
from conftest import addition_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny addition task and GRU (as in test_json_output.py): each run takes well under a second.
RECIPE = addition_recipe(hidden_size=6, steps=4, eval_every=2, length=5, train_size=64, eval_size=32)
# Adam at lr = 1e37 without clipping: the weights overflow at once, every metric is NaN/Inf.
DIVERGE = ("--set", "train.lr=1e37", "--set", "train.clip=none")


def _strict(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as RFC 8259 parsers do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _strict_files(folder: Path) -> list[Path]:
    """Every JSON and JSON-lines file under ``folder``, each parsed strictly (the list, to count)."""
    files = sorted([*folder.rglob("*.json"), *folder.rglob("*.jsonl")])
    for path in files:
        text = path.read_text()
        for doc in (text.splitlines() if path.suffix == ".jsonl" else [text]):
            _strict(doc)
    return files


# -- 1. strict JSON everywhere ------------------------------------------------------------

def test_strict_json_helper_turns_non_finite_floats_into_null_at_any_depth():
    from lrcompress.jsonout import dumps

    data = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": {"e": float("nan")}},
            "f": "NaN", "g": None, "h": 3, "i": True}
    assert _strict(dumps(data)) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": {"e": None}},
                                    "f": "NaN", "g": None, "h": 3, "i": True}
    assert _strict(dumps({"x": 0.1}, indent=2)) == {"x": 0.1}  # finite values and json's options untouched


def test_a_diverged_train_writes_strict_json_everywhere_and_report_reads_it_back(tmp_path, run):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = tmp_path / "run"
    result = run("-q", "train", tmp_path / "r.toml", "--out", out, "--json", *DIVERGE)
    assert result.code == 3, result.err  # finished, with non-finite metrics
    summary = _strict(result.out)
    assert summary["warnings"] and "not finite" in summary["warnings"][0]
    assert summary["val"] == {"mse": None} and summary["test"] == {"mse": None}
    assert {p.name for p in _strict_files(out)} == {"summary.json", "metrics.jsonl"}
    assert _strict((out / "summary.json").read_text())["test"] == {"mse": None}
    records = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["val"]["mse"] is None for r in records)

    table = run("report", out)  # the text table shows the missing metric as "-", no crash
    assert table.code == 0, table.err
    cells = table.out.splitlines()[2].split()  # run, rank, diag, params, ratio, "test mse", dense, before, after, time
    assert cells[cells.index("mse") + 1:cells.index("mse") + 4] == ["-", "-", "-"]
    rows = _strict(run("report", out, "--json").out)
    assert rows[0]["after"] is None


def test_a_diverged_sweep_point_writes_strict_json_everywhere(tmp_path, run):
    (tmp_path / "r.toml").write_text(RECIPE)
    assert run("-q", "train", tmp_path / "r.toml", "--out", tmp_path / "dense").code == 0
    out = tmp_path / "sweep"
    result = run("-q", "sweep", tmp_path / "dense", "--ranks", "2", "--out", out, "--json", *DIVERGE)
    assert result.code == 3, result.err  # the point ended with NaN/Inf metrics
    points = _strict(result.out)["points"]
    assert points[0]["test"] == {"mse": None} and math.isfinite(points[0]["dense"]["test"]["mse"])
    names = {p.relative_to(out).as_posix() for p in _strict_files(out)}
    assert {"sweep.json", "rank2/finetune.json", "rank2/summary.json", "rank2/metrics.jsonl"} <= names
    table = run("report", out)
    assert table.code == 0 and "rank2" in table.out
    assert run("-q", "sweep", tmp_path / "dense", "--ranks", "2", "--out", out, *DIVERGE).code == 3  # reread: no crash


def test_report_to_json_is_strict():
    from lrcompress.report import Report

    assert _strict(Report([], 10, 5, output_error=float("nan")).to_json())["output_error"] is None


# -- 2. save_model never overwrites a file by default ----------------------------------------

def test_save_model_refuses_an_existing_file_unless_forced(tmp_path):
    model = nn.GRU(3, 8)
    lrc.compress(model, rank=2)
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"a user's own file")
    with pytest.raises(OutputExistsError, match="mine.safetensors"):
        lrc.save_model(model, path)
    assert path.read_bytes() == b"a user's own file"
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary left behind
    lrc.save_model(model, path, force=True)
    fresh = nn.GRU(3, 8)
    lrc.load_model(fresh, path)
    assert torch.equal(fresh.weight_hh_l0, model.weight_hh_l0)


def test_a_resumed_run_still_replaces_its_own_model_file(tmp_path):
    from lrcompress.train.run import train_recipe

    (tmp_path / "r.toml").write_text(RECIPE)
    out = tmp_path / "run"
    train_recipe(tmp_path / "r.toml", out, progress=False)
    first = (out / "model.safetensors").read_bytes()
    summary = train_recipe(tmp_path / "r.toml", out, resume=True, overrides=["train.steps=8"], progress=False)
    assert summary["steps"] == 8 and (out / "model.safetensors").read_bytes() != first


# -- 3. sweep: duplicate ranks, diag with both_diag ---------------------------------------------

@pytest.mark.parametrize("args, words", [
    (("--ranks", "3,3"), "ranks 3,3 list 3 more than once"),
    (("--ranks", "2,4,2,4,8"), "list 2, 4 more than once"),
    (("--ranks", "3", "--diag", "--both-diag"), "diag (--diag) and both_diag (--both-diag) are alternatives")])
def test_sweep_refuses_repeated_ranks_and_diag_with_both_diag(tmp_path, run, args, words):
    result = run("sweep", tmp_path / "no-source", "--out", tmp_path / "sweep", *args)
    assert result.code == 2 and result.err.startswith("error: ")
    assert len(result.err.strip().splitlines()) == 1 and words in result.err, result.err
    assert not (tmp_path / "sweep").exists()


# -- 4. clip_value with clip = none ---------------------------------------------------------------

def test_clip_value_without_clipping_is_one_config_error_naming_both_keys():
    from lrcompress.train.recipe import check_train

    with pytest.raises(ConfigError, match=r"train\.clip_value = 5\.0 .* train\.clip = 'none'"):
        check_train({"steps": 1, "clip": "none", "clip_value": 5.0})
    assert check_train({"steps": 1, "clip": "none"})["clip_value"] == 1.0  # the default: nothing ignored
    assert check_train({"steps": 1, "clip": "norm", "clip_value": 5.0})["clip_value"] == 5.0


def test_clip_value_without_clipping_is_refused_from_the_command_line(tmp_path, run):
    (tmp_path / "r.toml").write_text(RECIPE)
    result = run("train", tmp_path / "r.toml", "--out", tmp_path / "run", "--set", "train.clip=none",
                 "--set", "train.clip_value=5")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "train.clip_value" in result.err and "train.clip = 'none'" in result.err
    assert not (tmp_path / "run").exists()


def test_every_shipped_recipe_still_loads():
    from lrcompress.train.recipe import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
    assert len(recipes) > 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in recipes:
            load_recipe(path)


# -- 5. SecondOrderError from a SequenceModel with per-sequence masks -----------------------------

def _sequence_model(scheme: str, recurrent: float, inputs: float, **kwargs):
    from lrcompress.train.models import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(nn.GRU(3, 6, batch_first=True), 2, "last", recurrent_dropout=recurrent,
                          input_dropout=inputs, dropout_masks=scheme, **kwargs).double()
    lrc.compress(model, rank=2, diag=True)
    return model.train()


def _masked_output(model, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)  # the same per-sequence masks on every call
    return model(x)


CASES = [("per_gate", 0.3, 0.0), ("per_gate", 0.0, 0.3), ("dl4mt", 0.3, 0.2)]


@pytest.mark.parametrize("scheme, recurrent, inputs", CASES)
def test_second_order_error_of_a_sequence_model_names_a_remedy_it_can_apply(scheme, recurrent, inputs):
    model = _sequence_model(scheme, recurrent, inputs)
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(SecondOrderError, match="variational_backward = 'autograd'"):
        torch.autograd.grad(_masked_output(model, x).pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("scheme, recurrent, inputs", CASES)
def test_variational_backward_autograd_gives_the_same_gradients_and_a_correct_second_derivative(
        scheme, recurrent, inputs):
    """First order: equal to the written-out backward's (float64). Second order: checked by
    ``gradgradcheck`` against finite differences of the first derivative."""
    model = _sequence_model(scheme, recurrent, inputs)
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    fast = torch.autograd.grad(_masked_output(model, x).pow(2).sum(), [x, *model.parameters()])
    model.variational_backward = "autograd"
    slow = torch.autograd.grad(_masked_output(model, x).pow(2).sum(), [x, *model.parameters()])
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert "autograd step loop" in model.rnn.__dict__["_lrc_variational_note"]
    assert torch.autograd.gradgradcheck(lambda inp: _masked_output(model, inp), (x,))


def test_variational_backward_is_checked_and_batch_masks_are_the_other_remedy():
    from lrcompress.train.models import SequenceModel

    with pytest.raises(ConfigError, match="variational_backward must be 'auto' or 'autograd', got 'dense'"):
        SequenceModel(nn.GRU(3, 6, batch_first=True), 2, "last", variational_backward="dense")
    model = _sequence_model("per_gate", 0.3, 0.0)
    model.dropout_masks = "batch"
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(_masked_output(model, x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()  # a second derivative
    assert all(p.grad is not None for p in model.head.parameters())


# -- 6. a batch larger than the training split ----------------------------------------------------

def test_a_batch_larger_than_the_training_split_is_one_config_error_naming_both_numbers(tmp_path, run):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "addition-gru-small.toml"
    result = run("train", recipe, "--out", tmp_path / "run", "--batch-size", "30000", "--steps", "1")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "train.batch_size = 30000" in result.err and "(20000 examples)" in result.err
    assert not (tmp_path / "run").exists()


def test_batch_size_check_where_the_task_knows_its_training_set():
    from lrcompress.train.tasks import build_task

    addition = build_task({"name": "addition", "length": 5, "train_size": 64})
    addition.check_batch_size(64)  # the whole split in one batch is what was asked
    with pytest.raises(ConfigError, match=r"train\.batch_size = 65 .* \(64 examples\)"):
        addition.check_batch_size(65)
    build_task({"name": "copy", "lag": 5, "train_size": 0}).check_batch_size(10**6)  # an endless stream
    mnist = build_task({"name": "mnist", "train_size": 100, "valid_size": 10})
    with pytest.raises(ConfigError, match=r"train\.batch_size = 101 .* \(100 examples\)"):
        mnist.check_batch_size(101)
