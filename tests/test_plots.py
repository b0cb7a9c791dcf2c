"""The report figures: files written, and honest choices checked on the Axes (not on pixels):
log scale for a loss spanning decades, the dense model as one point, titles, labels, legends
outside the data; learning curves from metrics.jsonl with ``report --curves --metric``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from lrcompress.errors import LRCompressError  # noqa: E402
from lrcompress.train import plots, run as runs  # noqa: E402


def sweep_rows(metric: str = "mse", after=(0.004, 0.002, 0.001), before=(0.5, 0.05, 0.002)) -> list[dict]:
    """Three ranks of a GRU (n = 16) at rank 1, 2, 4 without diagonal; dense: 977 params."""
    rows = []
    for rank, params, a, b in zip((1, 2, 4), (305, 401, 593), after, before):
        rows.append({"run": f"rank{rank}", "rank": rank, "diag": False, "tied": False, "params": params,
                     "ratio": 977 / params, "metric": metric, "split": "test", "dense": 0.0009, "before": b,
                     "after": a, "wall_time": 1.0})
    return rows


def test_sweep_figure_is_honest():
    fig = plots.sweep_figure(sweep_rows())
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # mse from 0.0009 to 0.5: three decades
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "parameters (count)"  # 305 to 977: not a decade
    assert "test mse" in ax.get_title() and "lower is better" in ax.get_title()
    assert ax.get_xlabel().startswith("parameters") and "mean squared error" in ax.get_ylabel()
    dense = [line for line in ax.get_lines() if line.get_label().startswith("dense")]
    assert len(dense) == 1 and list(dense[0].get_xdata()) == [977] and list(dense[0].get_ydata()) == [0.0009]
    assert dense[0].get_linestyle() == "None"  # a point at the dense size, not a line across all sizes
    assert not [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1 and len(line.get_xdata()) > 1]
    legend = ax.get_legend()
    fig.canvas.draw()
    # below the axes (covers no data) and no wider than they are (the data keeps the figure's width)
    box, axes = legend.get_window_extent(), ax.get_window_extent()
    assert box.y1 < axes.y0 and box.width <= axes.width
    fig.clf()


def rank_labels(ax):
    return [t for t in ax.texts if t.get_text().startswith("r=")]


def test_rank_labels_sit_inside_the_axes_and_off_their_lines():
    rows = sweep_rows("bpc", after=(2.4, 2.1, 2.0), before=(3.5, 2.7, 2.2))
    rows += [{**r, "run": r["run"] + "-diag", "diag": True, "params": r["params"] + 48, "after": r["after"] - 0.01}
             for r in rows]
    fig = plots.sweep_figure(rows)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer, axes = fig.canvas.get_renderer(), ax.get_window_extent()
    labels = rank_labels(ax)
    assert sorted(t.get_text() for t in labels) == ["r=1", "r=1", "r=2", "r=2", "r=4", "r=4"]
    fine_tuned = [line for line in ax.get_lines() if line.get_label().endswith("fine-tuned")]
    for t in labels:
        box = t.get_window_extent(renderer)
        assert axes.x0 <= box.x0 and box.x1 <= axes.x1 and axes.y0 <= box.y0 and box.y1 <= axes.y1, t.get_text()
        for line in fine_tuned:  # no drawn point of either fine-tuned line inside a label
            for x, y in ax.transData.transform(line.get_xydata()):
                assert not box.contains(x, y), (t.get_text(), line.get_label())
    # the two families' labels go to opposite sides: low-rank below its points, diagonal above
    below = {t.get_text(): t.get_window_extent(renderer).y1 for t in labels if t.get_color() == fine_tuned[0].get_color()}
    for r in rows[:3]:
        assert below[f"r={r['rank']}"] <= ax.transData.transform((r["params"], r["after"]))[1]
    fig.clf()


def test_curves_sort_names_naturally_tick_whole_updates_and_say_what_they_show():
    records = {name: [{"step": 20, "train_loss": 1.0 + i, "lr": 1e-3, "val": {"bpc": 2.0 + i}}]
               for i, name in enumerate(["rank16", "rank4-diag", "rank4", "rank32"])}
    fig = plots.curves_figure(records)  # one evaluation per run: dots
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["rank4", "rank4-diag", "rank16", "rank32"]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert lo == 0 and len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
    assert ax.get_title() == "learning curves: validation bpc"
    assert plots.curves_figure(records, "train_loss").axes[0].get_title() == "learning curves: training loss"
    assert plots.natural_key("rank4") < plots.natural_key("rank16") < plots.natural_key("rank16-diag")


def test_log_size_axis_when_sizes_span_a_decade():
    rows = sweep_rows()
    rows[0].update(params=60, ratio=977 / 60)  # 60 to 977 parameters
    ax = plots.sweep_figure(rows).axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "parameters (count, log scale)"


def test_linear_scale_when_values_stay_within_a_decade_or_are_not_losses():
    near = plots.sweep_figure(sweep_rows(after=(0.0012, 0.0011, 0.001), before=(0.002, 0.0015, 0.0012)))
    assert near.axes[0].get_yscale() == "linear"
    accuracy = plots.sweep_figure(sweep_rows("accuracy", after=(0.9, 0.95, 0.97), before=(0.01, 0.5, 0.9)))
    assert accuracy.axes[0].get_yscale() == "linear" and "higher is better" in accuracy.axes[0].get_title()
    assert plots.use_log_scale("bpc", [1.4, 1.5]) is False and plots.use_log_scale("ce", [0.01, 2.0]) is True


def test_dense_run_row_is_the_dense_point(tmp_path):
    dense = {"run": "dense", "rank": None, "diag": None, "tied": None, "params": 977, "ratio": None,
             "metric": "mse", "split": "test", "dense": None, "before": None, "after": 0.0009, "wall_time": 5.0}
    fig = plots.sweep_figure([dense, *sweep_rows()])
    points = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("dense")]
    assert [(list(p.get_xdata()), list(p.get_ydata())) for p in points] == [([977], [0.0009])]
    path = plots.save_figure(fig, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_sweep(root, n_runs: int = 2):
    """A sweep directory as `lrcompress sweep` leaves it: per run a summary.json and metrics.jsonl."""
    for i in range(n_runs):
        where = root / f"rank{i + 1}"
        where.mkdir(parents=True)
        summary = {"metric": "mse", "rank": i + 1, "diag": False, "params": 300 + 100 * i, "ratio": 3.0,
                   "test": {"mse": 0.001}, "converted": {"test": {"mse": 0.1}}, "dense": {"test": {"mse": 0.001}},
                   "wall_time": 2.0}
        (where / "summary.json").write_text(json.dumps(summary))
        records = [{"step": s, "epoch": 0, "lr": 0.01 / s, "train_loss": 1.0 / s ** 2, "nan_events": 0,
                    "val": {"mse": 0.5 / s ** 2 + i * 1e-4}} for s in (10, 20, 40, 80)]
        (where / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_curves_figure_per_run_and_metric(tmp_path):
    fake_sweep(tmp_path / "s")
    records = {d.name: runs._read_records(d / "metrics.jsonl") for d in runs.run_dirs(tmp_path / "s")}
    fig = plots.curves_figure(records, "mse")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["rank1", "rank2"]
    assert list(ax.get_lines()[0].get_xdata()) == [10, 20, 40, 80]
    assert ax.get_yscale() == "log" and "validation mse" in ax.get_title() and ax.get_xlabel().startswith("update")
    fig = plots.curves_figure(records, "train_loss")
    assert "training loss" in fig.axes[0].get_ylabel()
    with pytest.raises(LRCompressError, match="choose --metric from: lr, mse, train_loss"):
        plots.curves_figure(records, "bpc")


def test_report_curves_and_plot_from_the_command_line(run, tmp_path):
    fake_sweep(tmp_path / "s")
    result = run("report", tmp_path / "s", "--plot", tmp_path / "p.png", "--curves", tmp_path / "c.png",
                 "--json")
    assert result.code == 0, result.err
    assert len(json.loads(result.out)) == 2
    for name in ("p.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    result = run("report", tmp_path / "s", "--curves", tmp_path / "lr.png", "--metric", "lr")
    assert result.code == 0 and (tmp_path / "lr.png").is_file() and f"wrote {tmp_path / 'lr.png'}" in result.out
    result = run("report", tmp_path / "s", "--curves", tmp_path / "c.png")  # exists: refused without --force
    assert result.code == 2 and "--force" in result.err
    result = run("report", tmp_path / "s", "--metric", "mse")
    assert result.code == 2 and result.err.startswith("error: --metric chooses what --curves draws")
    result = run("report", tmp_path / "s", "--plot", tmp_path / "x.png", "--curves", tmp_path / "x.png")
    assert result.code == 2 and "--plot and --curves both name" in result.err and not (tmp_path / "x.png").exists()


def test_an_unknown_curves_metric_writes_nothing(run, tmp_path):
    fake_sweep(tmp_path / "s")
    outputs = [tmp_path / "t.csv", tmp_path / "p.png", tmp_path / "c.png"]
    result = run("report", tmp_path / "s", "--csv", outputs[0], "--plot", outputs[1], "--curves", outputs[2],
                 "--metric", "perplexityy")
    assert result.code == 2 and "no run recorded metric 'perplexityy'" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not any(p.exists() for p in outputs)  # checked before the CSV or the sweep plot was written
