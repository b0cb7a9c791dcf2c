"""benchmarks/study_converter_ptb.py: rank-for-ratio arithmetic against the closed-form counts and the
library's models, the plan's order, one conversion point end to end on a tiny model, and the stored
summary against the table in docs/results.md."""

import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import study_converter_ptb as st  # noqa: E402

import lrcompress as lrc  # noqa: E402
from lrcompress.nn import LowRankGRU  # noqa: E402

SUMMARY = ROOT / "benchmarks/results/converter-ptb-gru-512.json"
N, GATES, VOCAB = 512, 3, 50
OTHER = GATES * N * VOCAB + 2 * GATES * N + N * VOCAB + VOCAB  # input weight, two biases, output layer


def lr_count(n, r, diag):
    """The paper's counts (docs/recipes.md): low rank 3 (2 n d), plus diagonal 3 (2 n d + n)."""
    return GATES * (2 * n * r + (n if diag else 0))


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("diag", [False, True])
def test_rank_for_ratio_is_the_closest_closed_form_count(ratio, diag):
    rank, count = st.rank_for_ratio(ratio, diag)
    assert count == lr_count(N, rank, diag)
    budget = GATES * N * N / ratio
    best = min(range(1, N + 1), key=lambda r: (abs(lr_count(N, r, diag) - budget), lr_count(N, r, diag)))
    assert rank == best
    # by hand: 3 n^2 / ratio is a multiple of 3 * 2n, so LR hits it exactly; LRD's extra 3n is half a
    # rank step, equally far above and below: the tie goes to the smaller model, one rank down
    assert rank == N // (2 * ratio) - diag
    assert count == budget - GATES * N * diag  # LRD: rank r + 1 would be 3n over, as far


@pytest.mark.parametrize("ratio,diag", [(4, False), (16, True), (2, True)])
def test_plan_counts_match_the_library_model(ratio, diag):
    # the from-scratch model of the recipe: LowRankGRU(50, 512, rank, diag) plus the 512 -> 50 output layer
    (point,) = [p for p in st.plan() if p["method"] == "scratch" and p["ratio"] == ratio
                and p["structure"] == ("LRD" if diag else "LR")]
    rnn = LowRankGRU(VOCAB, N, rank=point["rank"], diag=diag, batch_first=True)
    assert lrc.count_params(rnn) + N * VOCAB + VOCAB == point["params"]
    assert point["params"] == OTHER + point["recurrent_params"] and OTHER == 105_522
    assert point["ratio_recurrent"] == pytest.approx(GATES * N * N / point["recurrent_params"])
    assert point["ratio_total"] == pytest.approx((OTHER + GATES * N * N) / point["params"])


def test_plan_runs_the_first_two_ratios_first_and_every_point_once():
    points = st.plan()
    names = [p["name"] for p in points]
    assert len(names) == len(set(names)) == 4 * 2 * 3
    assert {p["ratio"] for p in points[:12]} == {4, 16} and {p["ratio"] for p in points[12:]} == {2, 8}
    assert all(p["method"] != "scratch" for p in points[:8]) and all(p["method"] == "scratch" for p in points[8:12])
    assert names[8:12] == ["scratch-LR-16x", "scratch-LR-4x", "scratch-LRD-16x", "scratch-LRD-4x"]
    assert all(p["status"] == "not run yet" for p in points)
    assert st.scratch_overrides(points[9]) == ["model.rank=64", "model.diag=false"]
    assert "--set model.rank=63 --set model.diag=true" in st.scratch_command(points[11], Path("runs/x"))


def test_the_long_fine_tunes_come_last():
    points = st.plan(long_steps=3000)
    assert [p["name"] for p in points[24:]] == ["converted-plain-LR-16x-ft3000", "converted-plain-LR-4x-ft3000"]
    assert all(p["finetune_steps"] == 3000 for p in points[24:]) and all("finetune_steps" not in p for p in points[:24])


def _summary(points):
    return {"run": "runs/ptb-gru-512", "finetune": {"steps": 300},
            "dense": {"params": OTHER + GATES * N * N, "recurrent_params": GATES * N * N, "test": {"bpc": 1.665}},
            "points": points}


def test_table_and_csv_mark_unfinished_points():
    points = st.plan()
    points[0].update(status="done", bpc_before=2.5, bpc_after=1.9, updates=300, wall_seconds=120.0)
    summary = _summary(points)
    lines = st.table(summary).splitlines()
    assert len(lines) == 2 + 1 + len(points)
    assert "| dense | dense | - | 786,432 | 891,954 | 1.00x / 1.00x | - | 1.665 | 3,000 |  |" in lines
    row = next(x for x in lines if x.startswith("| converted-data-aware | LR | 64 |"))
    assert row.endswith("| 2.500 | 1.900 | 3,000 + 300 | 2.0 min |")
    assert sum("not run yet" in x for x in lines) == len(points) - 1
    read = list(csv.DictReader(io.StringIO(st.to_csv(summary))))
    assert [r["name"] for r in read] == [r["name"] for r in st.rows(summary)]
    done = next(r for r in read if r["name"] == points[0]["name"])
    assert float(done["bpc_after"]) == 1.9 and done["status"] == "done"


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    points = st.plan(long_steps=3000)
    for p, after in zip(points[:3] + points[-1:], (2.1, 2.0, 1.9, 1.8)):
        p.update(status="done", bpc_before=None if p["method"] == "scratch" else 2.5, bpc_after=after)
    (tmp_path / "s.json").write_text(json.dumps(_summary(points)))
    st.main(["plot", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_conversion_point_end_to_end_on_a_tiny_model():
    # the text task (inside CPython, no download) and a GRU n = 16: convert, score, fine-tune 2 updates
    from lrcompress.train.recipe import check_recipe
    from lrcompress.train.run import build

    recipe = {"meta": {"name": "t"}, "task": {"name": "text", "seq_len": 20},
              "model": {"cell": "gru", "hidden_size": 16}, "train": {"seed": 0, "steps": 1}}
    task, dense = build(check_recipe(recipe))
    dense.eval()
    other = lrc.count_params(dense) - 3 * 16 * 16
    points = {p["name"]: p for p in st.plan((4,), 1, 3, 16, other)}
    calib = st.calibration_windows(task, 32)
    points["converted-plain-LRD-4x"]["finetune_steps"] = 3  # a long point's own count wins
    train = st.finetune_recipe(2, 1e-3)
    for name in ("converted-plain-LRD-4x", "converted-data-aware-LR-4x"):
        point = points[name]
        row = st.run_conversion(point, dense, task, calib, train)
        assert row["updates"] == point.get("finetune_steps", 2) and 0 < row["bpc_after"] < 20 and 0 < row["bpc_before"] < 20
        assert 0 < row["rel_error"] < 1
        assert (row["output_error"] is None) == (point["method"] == "converted-plain")
    assert isinstance(dense.rnn, torch.nn.GRU) and not lrc.count_params(dense) - other - 3 * 16 * 16


# -- the stored figures and the doc -----------------------------------------------------------

@pytest.fixture(scope="module")
def stored():
    return json.loads(SUMMARY.read_text())


def _section():
    text = (ROOT / "docs/results.md").read_text()
    start = text.index("## The converter on real text (PTB, GRU n = 512)")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def test_the_doc_table_is_the_stored_summary(stored):
    section = _section()
    assert st.table(stored) in section
    assert (SUMMARY.with_suffix(".csv")).read_text() == st.to_csv(stored)


def test_every_figure_in_the_doc_section_is_in_the_stored_summary(stored):
    # every bpc the prose quotes to 3 decimals (x.xxx, or a difference +x.xxx) comes from the JSON
    done = [p for p in stored["points"] if p["status"] == "done"]
    values = {f"{stored['dense']['test']['bpc']:.3f}"}
    values |= {f"{p[k]:.3f}" for p in done for k in ("bpc_before", "bpc_after") if p.get(k) is not None}
    diffs = {f"{a[k] - b[j]:.3f}" for a in done for b in done + [{"bpc_after": stored["dense"]["test"]["bpc"]}]
             for k in ("bpc_before", "bpc_after") for j in ("bpc_before", "bpc_after")
             if a.get(k) is not None and b.get(j) is not None}
    allowed = values | {d.lstrip("-") for d in diffs}
    prose = _section().replace(st.table(stored), "")
    for number in re.findall(r"(?<![\d.])\d+\.\d{3}(?!\d)", prose):
        assert number in allowed, number


def test_stored_points_agree_with_the_closed_forms(stored):
    assert stored["counts"] == {"recurrent": 786_432, "other": OTHER, "total": 891_954, "gates": 3, "hidden_size": N}
    plan = {p["name"]: p for p in st.plan(long_steps=st.LONG_STEPS)}
    for p in stored["points"]:
        assert p["params"] == plan[p["name"]]["params"] and p["rank"] == plan[p["name"]]["rank"]
        if p["status"] == "done":
            assert p["updates"] == (3000 if p["method"] == "scratch" else
                                    p.get("finetune_steps", stored["finetune"]["steps"]))
            assert (p["bpc_before"] is None) == (p["method"] == "scratch")
        else:
            assert p["status"] == "not run yet" and p["command"]
