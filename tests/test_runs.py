"""Runs through the CLI: train a recipe, fine-tune a converted model, sweep ranks (resumably),
report; errors are one line with exit code 2."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from typer.testing import CliRunner

from lrcompress import load_model
from lrcompress.cli import app, main
from lrcompress.train import evaluate, run
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build
from conftest import addition_recipe

RECIPE = addition_recipe(hidden_size=8, steps=30, eval_every=10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A small dense GRU trained on the addition task through ``lrcompress train``."""
    root = tmp_path_factory.mktemp("runs")
    (root / "tiny.toml").write_text(RECIPE)
    result = CliRunner().invoke(app, ["train", str(root / "tiny.toml"), "--out", str(root / "dense"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "params" in result.output and "test mse" in result.output
    return root / "dense"


def cli(*args: str):
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == 0, result.output
    return result.output


def test_train_writes_a_complete_run(dense_run):
    for name in ("recipe.toml", "metrics.jsonl", "last.safetensors", "best.safetensors", "model.safetensors",
                 "summary.json"):
        assert (dense_run / name).is_file(), name
    summary = json.loads((dense_run / "summary.json").read_text())
    records = [json.loads(line) for line in (dense_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30] and summary["steps"] == 30
    assert summary["metric"] == "mse" and summary["best_step"] in (10, 20, 30)
    assert summary["val"]["mse"] == min(r["val"]["mse"] for r in records)
    # model.safetensors is the best model: reloading it reproduces the reported test metric
    recipe = load_recipe(dense_run / "recipe.toml")
    task, model = build(recipe)
    load_model(model, dense_run / "model.safetensors")
    test = evaluate(model, lambda: task.batches("test", 256, seed=0, shuffle=False), task=task)
    assert test["mse"] == pytest.approx(summary["test"]["mse"], rel=1e-6)


def test_resume_extends_a_finished_run(dense_run, tmp_path):
    out = tmp_path / "longer"
    cli("train", str(dense_run / "recipe.toml"), "--out", str(out), "--steps", "20")
    first = (out / "metrics.jsonl").read_text().splitlines()
    cli("train", str(dense_run / "recipe.toml"), "--out", str(out), "--steps", "40", "--resume")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first and [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]
    assert "steps = 40" in (out / "recipe.toml").read_text()


def test_finetune_reports_before_and_after(dense_run, tmp_path):
    out = tmp_path / "r2"
    text = cli("finetune", str(dense_run), "--rank", "2", "--diag", "--out", str(out), "--steps", "20")
    assert "converted" in text and "fine-tuned" in text
    summary = json.loads((out / "summary.json").read_text())
    dense = json.loads((dense_run / "summary.json").read_text())
    assert summary["dense"]["test"]["mse"] == pytest.approx(dense["test"]["mse"], rel=1e-6)
    assert summary["converted"]["test"]["mse"] != summary["dense"]["test"]["mse"]  # rank 2 < 8 changes the model
    assert summary["params"] < summary["params_dense"] == dense["params"]
    assert summary["ratio"] == pytest.approx(summary["params_dense"] / summary["params"])
    assert summary["steps"] == 20 and "steps = 20" in (out / "recipe.toml").read_text()
    # the fine-tuned model loads into the dense skeleton and scores what the summary says
    task, model = build(load_recipe(out / "recipe.toml"))
    load_model(model, out / "model.safetensors")
    test = evaluate(model, lambda: task.batches("test", 256, seed=0, shuffle=False), task=task)
    assert test["mse"] == pytest.approx(summary["test"]["mse"], rel=1e-6)
    finetune = json.loads((out / "finetune.json").read_text())
    assert finetune["conversion"]["targets"][0]["rank"] == 2 and finetune["conversion"]["targets"][0]["diag"]


def test_finetune_from_a_weights_file_needs_the_recipe(dense_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "from-file"
    args = ["finetune", str(dense_run / "model.safetensors"), "--rank", "1", "--out", str(out), "--steps", "5"]
    assert run_main(monkeypatch, args) == 2
    assert "--recipe" in capsys.readouterr().err
    cli(*args, "--recipe", str(dense_run / "recipe.toml"))
    assert json.loads((out / "summary.json").read_text())["rank"] == 1


def test_sweep_is_resumable_and_reported(dense_run, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ("sweep", str(dense_run), "--ranks", "1,2", "--both-diag", "--out", str(out), "--steps", "10")
    text = cli(*args)
    assert len([line for line in text.splitlines() if line.startswith("rank")]) == 4
    calls = []
    real = run.finetune
    monkeypatch.setattr(run, "finetune", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    (out / "rank2-diag" / "summary.json").unlink()  # as if stopped before the end
    text = cli(*args)
    assert calls == ["rank2-diag"]
    assert text.count("skipped") == 3
    assert json.loads((out / "rank2-diag" / "summary.json").read_text())["steps"] == 10

    rows = json.loads(cli("report", str(out), "--json", "--csv", str(tmp_path / "r.csv")))
    assert [(r["rank"], r["diag"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    params = [r["params"] for r in rows]
    assert params == sorted(set(params)) and all(r["ratio"] > 1 for r in rows)
    assert all(r["before"] is not None and r["after"] is not None and r["split"] == "test" for r in rows)
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,rank,diag") and len(csv_lines) == 5
    table = cli("report", str(out))
    assert "rank1-diag" in table and "test mse" in table


def test_report_plot(dense_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    cli("sweep", str(dense_run), "--ranks", "1", "--out", str(out), "--steps", "5")
    with monkeypatch.context() as patch:  # restores an already imported matplotlib (and its pyplot) after
        patch.setitem(sys.modules, "matplotlib", None)  # as if not installed
        assert run_main(monkeypatch, ["report", str(out), "--plot", str(tmp_path / "p.png")]) == 2
        assert "pip install 'lrcompress[plot]'" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    cli("report", str(out), "--plot", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["train", "missing.toml"], "missing.toml not found"),
    (["train", "{recipe}", "--set", "train.learning_rate=1"], "unknown key train.learning_rate"),
    (["train", "{recipe}", "--set", "train.optimizer=sgd"], "train.optimizer"),
    (["finetune", "no-such-run", "--rank", "2", "--out", "x"], "no such run directory or file: no-such-run"),
    (["finetune", "{dense}", "--rank", "99", "--out", "{tmp}/x"], "rank 99 is impossible"),
    (["sweep", "{dense}", "--ranks", "4,x", "--out", "{tmp}/s"], "--ranks must be a comma list"),
    (["report", "{tmp}"], "holds no finished run"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, dense_run, tmp_path, monkeypatch, capsys):
    fill = {"recipe": str(dense_run / "recipe.toml"), "dense": str(dense_run), "tmp": str(tmp_path)}
    assert run_main(monkeypatch, [a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_train_refuses_to_overwrite_a_run(dense_run, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in dense_run.iterdir()}
    args = ["train", str(dense_run / "recipe.toml"), "--out", str(dense_run), "--set", "train.lr=0.5"]
    assert run_main(monkeypatch, args) == 2
    assert "--resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dense_run.iterdir()} == before  # nothing touched


def test_interrupted_train_exits_130_and_resumes(dense_run, tmp_path, monkeypatch, capsys):
    real_fit = run.fit

    def stopping_fit(*args, **kwargs):  # as if Ctrl-C came during update 5
        return real_fit(*args, **kwargs, on_step=lambda loop: loop.step == 5 and loop.stop())

    monkeypatch.setattr(run, "fit", stopping_fit)
    out = tmp_path / "cut"
    args = ["train", str(dense_run / "recipe.toml"), "--out", str(out), "--steps", "20", "--set", "train.lr=0.02"]
    assert run_main(monkeypatch, args) == 130
    said = capsys.readouterr().out
    assert "interrupted at update 5; continue with: lrcompress train" in said
    assert not (out / "model.safetensors").exists() and (out / "last.safetensors").is_file()
    monkeypatch.setattr(run, "fit", real_fit)
    hint = shlex.split(said.split("continue with: ", 1)[1].strip())  # the command it printed, run as printed
    assert hint[0] == "lrcompress"
    cli(*hint[1:])
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


def test_finetune_refuses_a_low_rank_run(tmp_path, monkeypatch, capsys):
    source = tmp_path / "lowrank"
    source.mkdir()
    (source / "recipe.toml").write_text(RECIPE.replace("hidden_size = 8", "hidden_size = 8\nrank = 2"))
    (source / "model.safetensors").write_bytes(b"")
    assert run_main(monkeypatch, ["finetune", str(source), "--rank", "1", "--out", str(tmp_path / "x")]) == 2
    assert "trained low-rank (model.rank = 2)" in capsys.readouterr().err


def run_main(monkeypatch, args: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["lrcompress", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code
