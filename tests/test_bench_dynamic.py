"""benchmarks/bench_dynamic.py: point parsing and the markdown table, on fabricated summaries."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_dynamic as bd  # noqa: E402


def _point(method, segment, lr, decay, static, dynamic):
    return {"method": method, "segment": segment, "lr": lr, "decay": decay,
            "static": {"bpc": static, "count": 100}, "dynamic": {"bpc": dynamic, "count": 100, "skipped": 0}}


def test_table_bolds_the_best_marks_divergence_and_labels_models():
    summary = {"models": [
        {"name": "dense", "convert": None, "points": [
            _point("sgd", 50, 0.01, 0.0, 1.7, 1.65),
            _point("rms", 20, 1e-4, 1e-3, 1.7, 1.6),
            _point("rms", 50, 1e-3, 0.0, 1.7, 80.06)]},  # > 2x static: diverged, never the best
        {"name": "lrd:64", "convert": {"rank": 64, "diag": True}, "points": [
            _point("sgd", 50, 0.01, 0.0, 2.0, 1.8)]}]}
    lines = bd.table(summary).splitlines()
    assert lines[0] == "| model | method | segment | lr | decay | static bpc | dynamic bpc | gain |"
    assert len(lines) == 2 + 4
    assert lines[2] == "| dense | sgd | 50 | 0.01 | 0 | 1.7000 | 1.6500 | -0.0500 |"
    assert lines[3] == "| dense | rms | 20 | 1e-4 | 0.001 | 1.7000 | **1.6000** | -0.1000 |"
    assert "80.06 (diverged)" in lines[4] and "+78.3600" in lines[4]
    # a model with one point: nothing to pick, no bold; the conversion spelled out
    assert lines[5] == ("| rank 64 + diag, converted, not fine-tuned | sgd | 50 | 0.01 | 0 | 2.0000 | 1.8000 "
                        "| -0.2000 |")


def test_one_model_has_no_model_column_and_static_only_summaries():
    one = {"models": [{"name": "dense", "convert": None, "points": [_point("rms", 50, 3e-5, 1e-3, 1.66, 1.6)]}]}
    lines = bd.table(one).splitlines()
    assert lines[0].startswith("| method |") and lines[2] == "| rms | 50 | 3e-5 | 0.001 | 1.6600 | 1.6000 | -0.0600 |"
    static = {"models": [{"name": "dense", "convert": None, "points": [],
                          "static": {"bpc": 21.8123, "count": 20000}}]}
    assert bd.table(static).splitlines()[2] == "| 20,000 | 21.8123 |"


def test_points_and_models_parse_or_name_the_bad_value():
    assert bd.parse_point("rms:20:1e-4:0.001") == ("rms", 20, 1e-4, 1e-3)
    assert bd.parse_model("dense") is None and bd.parse_model("lrd:64") == {"rank": 64, "diag": True}
    assert [bd.number(v) for v in (0.0, 0.3, 0.001, 1e-4, 2.5e-5)] == ["0", "0.3", "0.001", "1e-4", "2.5e-5"]
    assert bd.parse_model("lowrank:8") == {"rank": 8, "diag": False}
    for bad in ("rms:20:1e-4", "adam:20:1e-4:0", "sgd:x:0.01:0"):
        with pytest.raises(SystemExit, match="point"):
            bd.parse_point(bad)
    with pytest.raises(SystemExit, match="lrd:0"):
        bd.parse_model("lrd:0")
    # the named lists hold the CLI's defaults, and the text list the defaults plus the text grid's best
    assert bd.POINTS["defaults"] == [("sgd", 50, 0.01, 0.0), ("rms", 50, 3e-5, 1e-3)]
    assert set(bd.POINTS["defaults"]) <= set(bd.POINTS["ptb-grid"]) and len(set(bd.POINTS["ptb-grid"])) == 18
    assert ("rms", 20, 1e-4, 1e-3) in bd.POINTS["text"] and set(bd.POINTS["text"]) <= set(bd.POINTS["text-grid"])
