"""``--json`` on every command: stdout holds exactly one JSON document, with the right values;
narration, evaluation lines and notes go to stderr; errors stay one line on stderr, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lrcompress.train import run as runs
from conftest import addition_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny addition task and GRU (as in test_runs.py): each run takes well under a second.
RECIPE = addition_recipe(hidden_size=6, steps=4, eval_every=2, length=5, train_size=64, eval_size=32)
HIDDEN = 6


def document(result) -> object:
    """The one JSON document on stdout of a successful command (a second line would fail here)."""
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 1, result.out  # one document, nothing else: no tables, no "wrote ..." lines
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A finished dense run directory (built through the library, not the command under test)."""
    root = tmp_path_factory.mktemp("json")
    (root / "tiny.toml").write_text(RECIPE)
    runs.train_recipe(root / "tiny.toml", root / "dense", progress=False)
    return root / "dense"


def test_train_json_is_the_written_summary(run, tmp_path):
    (tmp_path / "tiny.toml").write_text(RECIPE)
    # Default progress: the training loop writes one line per evaluation, which must not reach stdout.
    result = run("train", tmp_path / "tiny.toml", "--out", tmp_path / "run", "--json")
    summary = document(result)
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run_dir"] == str(tmp_path / "run") and summary["steps"] == 4
    assert "step 2" in result.err  # the evaluation lines went to stderr instead


def test_finetune_json_is_the_written_summary(run, dense_run, tmp_path):
    summary = document(run("finetune", dense_run, "--out", tmp_path / "ft", "--rank", "2", "--diag", "--steps", "2",
                           "--json"))
    assert summary == json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["run_dir"] == str(tmp_path / "ft") and summary["rank"] == 2 and summary["diag"] is True
    # weight_hh (3n x n) becomes 3 gates of L (n x 2) + R (2 x n) + D (n): the closed-form saving
    n = HIDDEN
    assert summary["params_dense"] - summary["params"] == 3 * n * n - 3 * (2 * n * 2 + n)


def test_sweep_and_report_json(run, dense_run, tmp_path):
    out = tmp_path / "sweep"
    result = run("sweep", dense_run, "--out", out, "--ranks", "1,2", "--steps", "2", "--json")
    doc = document(result)
    assert doc["out"] == str(out)
    assert [(p["rank"], p["diag"]) for p in doc["points"]] == [(1, False), (2, False)]
    for point in doc["points"]:  # each point is its run's summary
        assert point == json.loads((out / runs.point_name(point["rank"], False) / "summary.json").read_text())
    assert "rank1:" in result.err and "rank2:" in result.err  # the per-point lines, on stderr

    result = run("report", out, "--json", "--csv", tmp_path / "r.csv")
    rows = document(result)
    assert (tmp_path / "r.csv").is_file() and result.err == ""
    by_rank = {p["rank"]: p for p in doc["points"]}
    for r in rows:
        point = by_rank[r["rank"]]
        assert r["params"] == point["params"] and r["after"] == point["test"]["mse"]
        assert r["before"] == point["converted"]["test"]["mse"] and r["dense"] == point["dense"]["test"]["mse"]


def test_demo_json_rows_and_folder(run, tmp_path):
    result = run("demo", "--task", "addition", "--out", tmp_path / "demo", "--steps", "2", "--finetune-steps", "2",
                 "--json")
    doc = document(result)
    assert doc["out"] == str(tmp_path / "demo")
    rows = doc["rows"]
    assert [r["run"] for r in rows] == ["dense"] + [f"rank{d}{s}" for d in (2, 4, 8) for s in ("", "-diag")]
    n = 32  # the demo's GRU: its recurrent 3n^2 becomes 3*2nd (+3n with the diagonal)
    for r in rows[1:]:
        assert rows[0]["params"] - r["params"] == 3 * n * n - (3 * 2 * n * r["rank"] + (3 * n if r["diag"] else 0))
    assert "test mse" in result.err  # the narration and the table went to stderr


@pytest.fixture
def compressed(run, tmp_path):
    """A GRU state dict converted at rank 2 with diagonal (through ``convert --json``)."""
    torch.save(torch.nn.GRU(3, HIDDEN, num_layers=2).state_dict(), tmp_path / "gru.pt")
    doc = document(run("convert", tmp_path / "gru.pt", "--rank", "2", "--diag", "--json"))
    assert doc["output"] == str(tmp_path / "gru.lr.safetensors")
    assert [t["name"] for t in doc["targets"]] == ["weight_hh_l0", "weight_hh_l1"]
    return tmp_path / "gru.lr.safetensors"


def test_merge_json_and_rebuilt_weights(run, compressed, tmp_path):
    doc = document(run("merge", compressed, "--json"))
    output = tmp_path / "gru.dense.safetensors"
    assert doc == {"output": str(output), "rebuilt": ["weight_hh_l0", "weight_hh_l1"], "tensors": 8}
    factors, merged = load_file(compressed), load_file(output)
    assert len(merged) == doc["tensors"]
    for name in doc["rebuilt"]:  # W_g = L_g R_g + diag(D_g), in float64
        L, R, D = (factors[f"{name}.{k}"].double() for k in "LRD")
        expected = (L @ R + torch.diag_embed(D)).flatten(0, 1)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_inspect_and_bench_json(run, compressed):
    doc = document(run("inspect", compressed, "--json"))
    # per layer: 3 gates of L (6x2) + R (2x6) + D (6) replace 3*6*6 values
    assert [t["factored_params"] for t in doc["targets"]] == [3 * (2 * HIDDEN * 2 + HIDDEN)] * 2
    doc = document(run("bench", "--synthetic", "gru:8:2", "--seq", "2", "--rounds", "1", "--threads", "1", "--json"))
    assert doc["threads"] == 1 and [layer["name"] for layer in doc["layers"]] == ["synthetic"]


@pytest.mark.parametrize("args", [
    ("merge", "{tmp}/missing.lr.safetensors"),
    ("train", "{tmp}/missing.toml"),
    ("sweep", "{tmp}", "--out", "{tmp}/s", "--ranks", "0"),
    ("report", "{tmp}/missing"),
    ("demo", "--out", "{tmp}/file.txt", "--steps", "2"),
])
def test_json_errors_are_one_line_on_stderr(run, tmp_path, args):
    (tmp_path / "file.txt").write_text("not a folder")
    result = run(*[a.format(tmp=tmp_path) for a in args], "--json")
    assert result.code == 2 and result.out == ""
    assert len(result.err.splitlines()) == 1 and result.err.startswith("error: ")


def test_sweep_refuses_an_impossible_rank_before_any_point(run, dense_run, tmp_path):
    # rank 99 exceeds the 6x6 recurrent blocks: the sweep must fail before fine-tuning rank 1
    result = run("sweep", dense_run, "--out", tmp_path / "sweep", "--ranks", "1,99,7", "--steps", "2", "--json")
    assert result.code == 2 and result.out == ""
    assert result.err.strip() == (f"error: ranks 7, 99 are impossible for rnn.weight_hh_l0 (gru recurrent, 3 block(s) "
                                  f"of {HIDDEN}x{HIDDEN}): ranks must be 1..{HIDDEN}")
    assert not (tmp_path / "sweep").exists()
