"""The figures of ``lrcompress report``: a metric against parameters (``--plot``) and learning
curves (``--curves``). Needs matplotlib (``pip install 'lrcompress[plot]'``).

Honest by construction: a loss-like metric whose values span a decade or more is drawn on a
log scale (else small differences vanish next to the converted models' large errors); the
dense model is one point at its size, not a line across sizes it never had; every figure has
a title and axes named with their units; legends sit below the axes, outside the data.

    >>> fig = sweep_figure(collect("runs/sweep"))                 # doctest: +SKIP
    >>> save_figure(fig, "sweep.png")                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..errors import LRCompressError
from ..io import write_atomic

# Metrics where lower is better and values can span decades: drawn on a log scale when they do.
LOSS_LIKE = {"loss", "train_loss", "ce", "nll", "mse", "ppl", "bpc"}
# What each metric measures, for axis labels.
UNITS = {"bpc": "bits per character", "ce": "cross-entropy, nats", "nll": "nats", "loss": "training objective",
         "train_loss": "training objective", "mse": "mean squared error", "ppl": "perplexity",
         "accuracy": "% correct", "sequence_accuracy": "% of sequences correct",
         "lr": "learning rate"}
SPLITS = {"val": "validation", "test": "test", "train": "training"}


def scale(metric: str | None) -> float:
    """What a metric's values are multiplied by on an axis: accuracies (fractions in the files)
    are drawn in percent, as the tables and logs print them (``report.format_metric``)."""
    return 100.0 if str(metric or "").endswith("accuracy") else 1.0


def use_log_scale(metric: str, values) -> bool:
    """Log scale for a loss-like ``metric`` whose positive ``values`` span at least 10x."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if metric not in LOSS_LIKE or not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) >= 10


NAMES = {"train_loss": "training loss", "lr": "learning rate"}


def axis_label(metric: str, split: str | None = None) -> str:
    name = f"{SPLITS.get(split, split)} {metric}" if split else NAMES.get(metric, metric)
    unit = UNITS.get(metric)
    return f"{name} ({unit})" if unit and unit != name else name


def sweep_figure(rows: list[dict]):
    """Parameters (log x) against the metric, before and after fine-tuning, per family
    (low-rank, low-rank + diagonal, each structure with its options: ``tt (shape 4x4x4)``),
    with the dense model as one point at its size.

    ``rows``: ``run.collect``'s rows. A row is a converted point when it has a rank or a
    ``structure`` (TT and Kronecker points have no rank), else the dense reference; without a
    dense run among the rows, the dense point is recovered from a converted one (its dense
    metric, and params x compression ratio). Raises ``LRCompressError`` when no row has a
    parameter count and a metric.
    """
    from .run import family_label

    plt = _pyplot()
    drawn = [r for r in rows if r["params"] and r["after"] is not None]
    if not drawn:
        raise LRCompressError("nothing to plot: no run has a parameter count and a metric")
    first = next((r for r in drawn if _is_point(r)), drawn[0])
    metric, split = first["metric"], first["split"]
    factor = scale(metric)  # accuracies in percent
    drawn = [{**r, **{k: r[k] * factor for k in ("after", "before", "dense") if r.get(k) is not None}} for r in drawn]
    points = [r for r in drawn if _is_point(r)]
    dense_rows = [r for r in drawn if not _is_point(r)]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    values, labelled, families = [], [], {}
    for r in points:
        families.setdefault(family_label(r), []).append(r)
    for i, (label, group) in enumerate(families.items()):
        group.sort(key=lambda r: r["params"])
        marker = MARKERS[i % len(MARKERS)]
        done = "trained" if all(r.get("kind") == "train" for r in group) else "fine-tuned"  # from scratch, or converted
        line, = ax.plot([r["params"] for r in group], [r["after"] for r in group], marker=marker,
                        label=f"{label}, {done}")
        values += [r["after"] for r in group]
        before = [(r["params"], r["before"]) for r in group if r["before"] is not None]
        if before:
            ax.plot(*zip(*before), marker=marker, linestyle=":", alpha=0.6, color=line.get_color(),
                    markerfacecolor="none", label=f"{label}, converted (before fine-tuning)")
            values += [b for _, b in before]
        # low-rank below its line and low-rank + diagonal above (they nearly coincide); others alternate
        below = not group[0].get("diag") if group[0].get("structure") in (None, "lowrank") else i % 2 == 0
        labelled.append((group, line.get_color(), below))
    dense = _dense_point(dense_rows, points)
    if dense is not None:
        ax.plot([dense[0]], [dense[1]], marker="*", markersize=14, linestyle="none", color="black",
                label=f"dense ({dense[0]:,} parameters)")
        values.append(dense[1])
    sizes = [r["params"] for r in points] + ([dense[0]] if dense is not None else [])
    if max(sizes) >= 10 * min(sizes):  # a log axis only when sizes span a decade
        ax.set_xscale("log")
    else:
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    if use_log_scale(metric, values):
        ax.set_yscale("log")
    ax.set_xlabel("parameters (count" + (", log scale)" if ax.get_xscale() == "log" else ")"))
    ax.set_ylabel(axis_label(metric, split) + (", log scale" if ax.get_yscale() == "log" else ""))
    better = "lower is better" if metric in LOSS_LIKE else "higher is better"
    ax.set_title(f"{SPLITS.get(split, split)} {metric} against model size ({better})")
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.08, y=0.1)  # room for the rank labels inside the axes
    _legend_below(ax, ncol=2)
    fig.tight_layout()
    for group, color, below in labelled:  # after the layout: the offsets follow the drawn slopes
        _label_ranks(ax, group, color, below=below)
    return fig


MARKERS = ("o", "s", "^", "D", "v", "P")


def _is_point(r: dict) -> bool:
    """A converted run (a rank, or a structure's options), not the dense model it came from."""
    return r.get("rank") is not None or r.get("structure") is not None


def point_label(r: dict) -> str:
    """The label beside a point: ``r=4`` (rank), ``TT-r=2`` (TT-rank), ``2 terms`` (Kronecker)."""
    from .run import point_size

    size = point_size(r)
    structure = r.get("structure")
    if structure == "tt":
        return f"TT-r={size}"
    if structure == "kronecker":
        return f"{size} term" + ("" if size == 1 else "s")
    return f"r={size}" if size is not None else r["run"]


def _legend_below(ax, ncol: int) -> None:
    """A legend under the axes (under the x label), so the data keeps the figure's width."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False)


def _label_ranks(ax, group: list[dict], color, *, below: bool) -> None:
    """``r=K`` (``point_label``) beside each fine-tuned point, off its line: offset perpendicular to the line's
    local direction on screen, low-rank on the lower side and low-rank + diagonal on the upper
    (the two families nearly coincide: a diagonal adds only n parameters)."""
    screen = ax.transData.transform([(r["params"], r["after"]) for r in group])
    for i, r in enumerate(group):
        a, b = screen[max(i - 1, 0)], screen[min(i + 1, len(group) - 1)]
        dx, dy = (b - a) if len(group) > 1 else (1.0, 0.0)
        norm = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / norm, dx / norm  # a unit normal; flip it to the family's side
        if (ny > 0) == below:
            nx, ny = -nx, -ny
        ax.annotate(point_label(r), (r["params"], r["after"]), textcoords="offset points",
                    xytext=(9 * nx, 9 * ny), ha="left" if nx > 0.3 else "right" if nx < -0.3 else "center",
                    va="bottom" if ny > 0.3 else "top" if ny < -0.3 else "center", fontsize=7, color=color)


def curves_figure(runs: dict[str, list[dict]], metric: str | None = None):
    """Learning curves: ``metric`` against the update count, one line per run.

    ``runs``: run name -> its ``metrics.jsonl`` records. ``metric``: ``train_loss``, ``lr``, or
    a validation metric name (default: the validation metric present in the first record, else
    ``train_loss``). Raises ``LRCompressError`` naming the metrics there are when no run has it.
    """
    plt = _pyplot()
    metric = metric or _default_metric(runs)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values, drawn = [], 0
    for name, records in sorted(runs.items(), key=lambda item: natural_key(item[0])):
        series = [(r["step"], _value(r, metric)) for r in records]
        series = [(s, v) for s, v in series if v is not None and math.isfinite(v)]
        if series:
            ax.plot(*zip(*series), marker="." if len(series) < 30 else None, label=name)
            values += [v for _, v in series]
            drawn += 1
    if not drawn:
        plt.close(fig)
        known = sorted({k for recs in runs.values() for r in recs for k in ("train_loss", "lr", *r.get("val", {}))})
        raise LRCompressError(f"no run recorded metric {metric!r}; choose --metric from: {', '.join(known) or '-'}")
    split = None if metric in ("train_loss", "lr") else "val"
    if metric == "lr" or use_log_scale(metric, values):
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(left=0)  # updates start at 0: one evaluation per run is a dot at its update, not a lone tick
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("update (optimiser steps)")
    ax.set_ylabel(axis_label(metric, split) + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title(f"learning curves: {axis_label(metric, split).split(' (')[0]}")
    ax.grid(True, alpha=0.3)
    _legend_below(ax, ncol=min(drawn, 4))
    fig.tight_layout()
    return fig


def natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers: rank4 before rank16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def save_figure(fig, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``fig`` atomically in the format of the extension (PNG without one) and close it."""
    plt = _pyplot()
    path = Path(path)
    kind = path.suffix[1:].lower() or "png"
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=kind, bbox_inches="tight"),
                            force=force)
    except ValueError as exc:  # matplotlib: an extension it cannot write
        raise LRCompressError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None
    finally:
        plt.close(fig)


def _dense_point(dense_rows: list[dict], points: list[dict]) -> tuple[int, float] | None:
    """(parameters, metric) of the dense model: its own run when reported, else recovered from a
    converted run (its dense metric, and params x compression ratio)."""
    if dense_rows:
        return dense_rows[0]["params"], dense_rows[0]["after"]
    for r in points:
        if r["dense"] is not None and r["ratio"]:
            return round(r["params"] * r["ratio"]), r["dense"]
    return None


def _value(record: dict, metric: str) -> float | None:
    if metric in ("train_loss", "lr"):
        return record.get(metric)
    value = record.get("val", {}).get(metric)
    return value * scale(metric) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _default_metric(runs: dict[str, list[dict]]) -> str:
    for records in runs.values():
        for r in records:
            if r.get("val"):
                return next(iter(r["val"]))
    return "train_loss"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LRCompressError("plotting needs matplotlib: pip install 'lrcompress[plot]'") from None
    return plt
