"""Trial fixes: a sweep reuses a finished point only when it was made exactly as asked now
(structure, options, rank/diag/tied, recipe overrides, steps), else one line and exit 2; the
report of a TT/Kronecker sweep tables and plots its points as points, by structure and options,
with the real dense model as the reference."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from lrcompress.cli import app, main
from lrcompress.train import run
from conftest import addition_recipe

RECIPE = addition_recipe(hidden_size=16, steps=10, eval_every=5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("trialc")
    (root / "tiny.toml").write_text(RECIPE)
    cli("train", str(root / "tiny.toml"), "--out", str(root / "dense"), "--no-progress")
    return root / "dense"


@pytest.fixture(scope="module")
def tt_sweep(dense):
    out = dense.parent / "sw-tt"
    cli("sweep", str(dense), "--out", str(out), "--structure", "tt", "--tt-shape", "4x4", "--ranks", "2,4",
        "--steps", "3", "--no-progress")
    return out


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def run_main(monkeypatch, args: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["lrcompress", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.mark.parametrize("change, message", [
    (["--tt-shape", "2x8"], "tt-rank2 was made with --tt-shape = [4, 4], not [2, 8]"),
    (["--tt-shape", "4x4", "--set", "train.lr=0.02"], "tt-rank2 was made with train.lr = 0.01, not 0.02"),
    (["--tt-shape", "4x4", "--steps", "4"], "tt-rank2 was made with train.steps = 3, not 4"),
])
def test_sweep_refuses_a_point_made_otherwise(change, message, tt_sweep, dense, monkeypatch, capsys):
    before = (tt_sweep / "tt-rank2" / "summary.json").read_bytes()
    args = ["sweep", dense, "--out", tt_sweep, "--structure", "tt", "--ranks", "2,4", "--steps", "3", *change]
    assert run_main(monkeypatch, args) == 2
    err = capsys.readouterr().err
    assert message in err and "another --out" in err and len(err.strip().splitlines()) == 1, err
    assert (tt_sweep / "tt-rank2" / "summary.json").read_bytes() == before  # nothing redone or replaced


def test_sweep_of_another_structure_into_the_folder_is_refused(tt_sweep, dense, monkeypatch, capsys):
    args = ["sweep", dense, "--out", tt_sweep, "--structure", "kronecker", "--kron-factors", "4x4", "--ranks", "1"]
    assert run_main(monkeypatch, args) == 2
    assert 'was made with structure = "tt", not "kronecker"' in capsys.readouterr().err
    assert not (tt_sweep / "kronecker-terms1").exists()


def test_the_same_sweep_reuses_and_extends(tt_sweep, dense, monkeypatch):
    calls = []
    real = run.finetune
    monkeypatch.setattr(run, "finetune", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    # the same options, --device spelt out (how a point runs, not what it is), and one new TT-rank
    text = cli("sweep", str(dense), "--out", str(tt_sweep), "--structure", "tt", "--tt-shape", "4x4",
               "--ranks", "2,3", "--steps", "3", "--device", "cpu", "--no-progress")
    assert "tt-rank2: done earlier, skipped" in text and calls == ["tt-rank3"]
    shutil.rmtree(tt_sweep / "tt-rank3")  # keep the module's sweep at TT-ranks 2, 4


def test_lowrank_sweep_refuses_tied_over_untied(dense, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lr"
    cli("sweep", str(dense), "--out", str(out), "--ranks", "2", "--steps", "2", "--no-progress")
    assert run_main(monkeypatch, ["sweep", dense, "--out", out, "--ranks", "2", "--steps", "2", "--tied"]) == 2
    assert "rank2 was made with tied = false, not true" in capsys.readouterr().err
    # a rank with and without diagonal added to the same sweep is not a change of what a point is
    text = cli("sweep", str(dense), "--out", str(out), "--ranks", "2", "--both-diag", "--steps", "2", "--no-progress")
    assert "rank2: done earlier, skipped" in text and "rank2-diag: params" in text


def test_finetune_resume_refuses_another_conversion(dense, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    cli("finetune", str(dense), "--out", str(out), "--rank", "2", "--steps", "2", "--no-progress")
    assert run_main(monkeypatch, ["finetune", dense, "--out", out, "--rank", "3", "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "was made with rank = 2, not 3" in err and "another --out" in err


def test_report_of_a_structured_sweep(tt_sweep, dense, tmp_path):
    rows = json.loads(cli("report", str(tt_sweep), "--json"))
    assert [(r["run"], r["structure"], r["options"]) for r in rows] == [
        ("tt-rank2", "tt", {"tt_ranks": 2, "tt_shape": [4, 4]}), ("tt-rank4", "tt", {"tt_ranks": 4, "tt_shape": [4, 4]})]
    table = cli("report", str(tt_sweep))
    header = table.splitlines()[0].split()
    assert header[:3] == ["run", "structure", "options"] and "rank" not in header
    assert "ranks 2, shape 4x4" in table and "ranks 4, shape 4x4" in table
    cli("report", str(tt_sweep), "--csv", str(tmp_path / "r.csv"))
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,rank,diag,tied,structure,options") and ",tt," in csv_lines[1]

    pytest.importorskip("matplotlib")
    from lrcompress.train import plots

    dense_summary = json.loads((dense / "summary.json").read_text())
    ax = plots.sweep_figure(run.collect(tt_sweep)).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    tuned = lines["TT (shape 4x4), fine-tuned"]
    assert list(tuned.get_xdata()) == [r["params"] for r in rows] and list(tuned.get_ydata()) == [r["after"] for r in rows]
    star = [line for label, line in lines.items() if label.startswith("dense")]
    # the dense model: its own parameter count, and the test metric its run measured
    assert len(star) == 1 and list(star[0].get_xdata()) == [dense_summary["params"]]
    assert star[0].get_ydata()[0] == pytest.approx(dense_summary["test"]["mse"], rel=1e-6)
    assert sorted(t.get_text() for t in ax.texts) == ["TT-r=2", "TT-r=4"]


def test_plot_families_of_mixed_rows():
    pytest.importorskip("matplotlib")
    from lrcompress.train import plots

    base = {"diag": False, "tied": False, "ratio": 2.0, "metric": "mse", "split": "test", "dense": 0.1,
            "before": 0.3, "wall_time": 1.0}
    rows = [{**base, "run": "rank2", "rank": 2, "structure": "lowrank", "options": {}, "params": 400, "after": 0.2},
            {**base, "run": "kronecker-terms1", "rank": None, "structure": "kronecker",
             "options": {"terms": 1, "kron_factors": [4, 4]}, "params": 300, "after": 0.25},
            {**base, "run": "kronecker-terms2", "rank": None, "structure": "kronecker",
             "options": {"terms": 2, "kron_factors": [4, 4]}, "params": 350, "after": 0.22}]
    ax = plots.sweep_figure(rows).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "low-rank, fine-tuned" in labels and "Kronecker (factors 4x4), fine-tuned" in labels
    assert [label for label in labels if label.startswith("dense")] == ["dense (800 parameters)"]
    assert sorted(t.get_text() for t in ax.texts) == ["1 term", "2 terms", "r=2"]
