"""The converter on real text (issue 12): PTB GRU n = 512, converted and fine-tuned vs trained from scratch.

The dense character-level GRU of ``recipes/ptb-gru-512-cpu.toml`` (a finished run directory,
``runs/ptb-gru-512``: 891,954 parameters, of which the recurrent weight ``weight_hh_l0``, 3 gate
blocks of 512 x 512, holds 3 n^2 = 786,432) has its **recurrent weight** shrunk ``ratio`` times
(2, 4, 8, 16: the ratio is of the recurrent values; input weights, biases and the output layer,
105,522 values, stay dense) to low rank (LR, ``W = L R``, ``3 (2 n d)`` values) or low rank plus
diagonal (LRD, ``W = L R + D``, ``3 (2 n d + n)``; the paper's eq. 5), at the rank whose count is
closest to ``3 n^2 / ratio`` (``bench_structures.match``: ties go to the smaller count). Per point:

* ``converted-plain``: truncated SVD of each gate block (``lrc.compress(rank=d, diag=...)``);
* ``converted-data-aware``: the whitened fit on 256 training sentences under a parameter budget
  (``lrc.compress(params=..., calibration=...)``, compress's default damping and allocation; with
  one target the budget picks the same rank as the plain point);
* both scored on the whole test split before fine-tuning, fine-tuned ``--steps`` updates (Adam
  ``--lr``, batch 32 sentences, norm clipping 1.0, seed 0: the same for every point, no
  validation, the last weights kept) and scored again;
* ``scratch``: the same recipe trained from a random start as a factored model
  (``--set model.rank=d --set model.diag=...``, the dense run's 3,000 updates), then scored;
* last, plain LR at the first two ratios fine-tuned ``--long-steps`` updates (default 3,000, as
  many as a from-scratch run; names ending ``-ft3000``).

Points run cheapest-and-most-informative first (conversions at the first two ratios, their
from-scratch runs, then the rest), and finished points are skipped on a rerun; an interrupted
from-scratch run continues from its last checkpoint (``train_recipe(..., resume=True)``). The
summary (JSON + CSV) is written after every point; points not run yet are listed with the command
that runs them.

    LRCOMPRESS_DATA=<ptb folder> OMP_NUM_THREADS=1 python benchmarks/study_converter_ptb.py run runs/ptb-gru-512 \\
        --out benchmarks/results/converter-ptb-gru-512.json          # ~2.5 h on one core; resumable
    python benchmarks/study_converter_ptb.py table benchmarks/results/converter-ptb-gru-512.json
    python benchmarks/study_converter_ptb.py plot benchmarks/results/converter-ptb-gru-512.json \\
        --out benchmarks/results/converter-ptb-gru-512.png
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

import lrcompress as lrc
from lrcompress.io import load_model, write_text_atomic
from lrcompress.train import engine
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build, train_recipe

from _common import machine  # this folder: see _common.py
from bench_calibration import calibration_windows
from bench_structures import Family, load_run, match, recurrent_shape, test_metrics

RATIOS = (4, 16, 2, 8)  # run order: the first two ratios' points (conversions, then scratch) come first
EARLY = 2               # how many of the ratios form the first group
STRUCTURES = ("LR", "LRD")
CONVERTED = ("converted-data-aware", "converted-plain")
RECIPE = "recipes/ptb-gru-512-cpu.toml"
STEPS, LR = 300, 1e-3   # fine-tuning: as bench_calibration.py finetune
LONG_STEPS = 3000       # the extra long fine-tunes: as many updates as a from-scratch run
CALIB = 256             # training sentences for the data-aware fit (bench_calibration's default)
CSV_FIELDS = ("name", "method", "structure", "ratio", "rank", "recurrent_params", "params", "ratio_recurrent",
              "ratio_total", "bpc_before", "bpc_after", "updates", "wall_seconds", "status", "command")


# -- sizes: pure arithmetic ----------------------------------------------------------------------

def rank_for_ratio(ratio: float, diag: bool, gates: int = 3, rows: int = 512, cols: int = 512) -> tuple[int, int]:
    """(rank, recurrent values) of LR (``diag=False``) or LRD whose count is closest to
    ``gates rows cols / ratio`` (ties: the smaller; ``bench_structures.match``)."""
    budget = round(gates * rows * cols / ratio)
    options, count = match(Family.parse("lrd" if diag else "lowrank"), gates, rows, cols, budget)
    return options["rank"], count


def plan(ratios=RATIOS, early: int = EARLY, gates: int = 3, n: int = 512, other: int = 105_522,
         long_steps: int = 0) -> list[dict]:
    """Every point in the order it runs: per group of ratios (the first ``early``, then the rest),
    the conversions (per ratio, per structure: data-aware, then plain), then the from-scratch runs
    (per structure, the smallest model first). ``other``: the values left dense (not recurrent).
    ``long_steps``: last, plain LR at the first ``early`` ratios fine-tuned that many updates
    (``finetune_steps``; every other converted point takes the run's ``--steps``)."""
    dense = gates * n * n
    points = []
    for group in (list(ratios[:early]), list(ratios[early:])):
        for ratio in group:
            for structure in STRUCTURES:
                for method in CONVERTED:
                    points.append(_point(method, structure, ratio, gates, n, other, dense))
        for structure in STRUCTURES:
            for ratio in sorted(group, reverse=True):
                points.append(_point("scratch", structure, ratio, gates, n, other, dense))
    for ratio in sorted(ratios[:early], reverse=True) if long_steps else ():
        point = _point("converted-plain", "LR", ratio, gates, n, other, dense)
        point.update(name=f"{point['name']}-ft{long_steps}", finetune_steps=long_steps)
        points.append(point)
    return points


def _point(method, structure, ratio, gates, n, other, dense) -> dict:
    rank, recurrent = rank_for_ratio(ratio, structure == "LRD", gates, n, n)
    return {"name": f"{method}-{structure}-{ratio:g}x", "method": method, "structure": structure, "ratio": ratio,
            "rank": rank, "recurrent_params": recurrent, "params": other + recurrent,
            "ratio_recurrent": dense / recurrent, "ratio_total": (other + dense) / (other + recurrent),
            "status": "not run yet"}


def scratch_overrides(point: dict) -> list[str]:
    return [f"model.rank={point['rank']}", f"model.diag={'true' if point['structure'] == 'LRD' else 'false'}"]


def scratch_command(point: dict, work: Path) -> str:
    sets = " ".join(f"--set {o}" for o in scratch_overrides(point))
    return f"lrcompress train {RECIPE} {sets} -o {work / point['name']} --resume"


# -- running the points ------------------------------------------------------------------------

def finetune_recipe(steps: int, lr: float) -> dict:
    return {"optimizer": "adam", "lr": lr, "batch_size": 32, "steps": steps, "eval_every": steps, "clip": "norm",
            "clip_value": 1.0, "seed": 0}


def run_conversion(point: dict, dense, task, calib: list, train: dict) -> dict:
    """Convert, score, fine-tune, score: the fields a converted point adds."""
    model = copy.deepcopy(dense)
    diag = point["structure"] == "LRD"
    start = time.perf_counter()
    if point["method"] == "converted-plain":
        report = lrc.compress(model, rank=point["rank"], diag=diag)
    else:  # the data-aware fit under a whole-model budget: only the recurrent weight is a target
        report = lrc.compress(model, params=point["params"], diag=diag, calibration=calib)
    fit_seconds = time.perf_counter() - start
    (row,) = report.to_dict()["targets"]
    if report.params_after != point["params"] or row["rank"] != point["rank"]:  # closed form vs library: a bug
        raise SystemExit(f"{point['name']}: compress gave rank {row['rank']}, {report.params_after:,} params; "
                         f"expected rank {point['rank']}, {point['params']:,}")
    before = test_metrics(model, task)
    print(f"  {point['name']}: rank {row['rank']}, {report.params_after:,} params, test bpc before "
          f"{before['bpc']:.4f} (fit {fit_seconds:.1f}s)", flush=True)
    model.train()
    train = {**train, "steps": point.get("finetune_steps", train["steps"])}
    train["eval_every"] = train["steps"]
    fitted = engine.fit(model, lambda epoch: task.batches("train", train["batch_size"], seed=0, epoch=epoch),
                        task=task, recipe=train, steps_per_epoch=task.steps_per_epoch(train["batch_size"]),
                        progress=False)
    model.eval()
    after = test_metrics(model, task)
    return {"bpc_before": before["bpc"], "bpc_after": after["bpc"], "test_before": before, "test_after": after,
            "updates": fitted.steps, "rel_error": row["rel_error"], "output_error": row.get("output_error"),
            "fit_seconds": fit_seconds, "wall_seconds": time.perf_counter() - start}


def run_scratch(point: dict, work: Path) -> dict:
    """Train (or continue) the from-scratch run, then score its saved model like the others."""
    out = work / point["name"]
    start = time.perf_counter()
    if not (out / "summary.json").is_file() or not (out / "model.safetensors").is_file():
        train_recipe(RECIPE, out, overrides=scratch_overrides(point), resume=out.exists(), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    task, model = build(load_recipe(out / "recipe.toml"))
    load_model(model, out / "model.safetensors")
    model.eval()
    if lrc.count_params(model) != point["params"]:
        raise SystemExit(f"{point['name']}: the trained model has {lrc.count_params(model):,} params, "
                         f"expected {point['params']:,}")
    after = test_metrics(model, task)
    print(f"  {point['name']}: {point['params']:,} params, test bpc {after['bpc']:.4f} "
          f"(run summary {summary['test']['bpc']:.4f}, {summary['wall_time']:.0f}s)", flush=True)
    return {"bpc_before": None, "bpc_after": after["bpc"], "test_after": after, "updates": summary["steps"],
            "best_step": summary["best_step"], "wall_seconds": summary["wall_time"],
            "run_dir": str(out), "run_summary_test_bpc": summary["test"]["bpc"],
            "this_call_seconds": time.perf_counter() - start}


def cmd_run(args) -> None:
    command = " ".join(["python", "benchmarks/study_converter_ptb.py", *sys.argv[1:]])
    prefix = "LRCOMPRESS_DATA=<ptb folder> OMP_NUM_THREADS=1 "
    task, recipe, dense, weights = load_run(args.run)
    names, gates, rows, cols = recurrent_shape(dense)
    total = lrc.count_params(dense)
    other = total - len(names) * gates * rows * cols
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    done = {p["name"]: p for p in previous.get("points", []) if p.get("status") == "done"}
    result = {"command": prefix + command.split(" --only")[0], "machine": machine(), "load_before": os.getloadavg(),
              "run": str(args.run), "weights": weights.name, "recipe": recipe["meta"]["name"], "metric": "bpc",
              "test": "whole test split (3,761 sentences, each from a zero state; batches of 256)",
              "counts": {"recurrent": len(names) * gates * rows * cols, "other": other, "total": total,
                         "gates": gates, "hidden_size": rows},
              "finetune": finetune_recipe(args.steps, args.lr), "calibration_sentences": args.calib,
              "dense": previous.get("dense"), "points": []}
    if result["dense"] is None:
        result["dense"] = {"params": total, "recurrent_params": len(names) * gates * rows * cols,
                           "test": test_metrics(dense, task),
                           "run_summary_test_bpc": json.loads((args.run / "summary.json").read_text())["test"]["bpc"]}
    print(f"dense: {total:,} params, test bpc {result['dense']['test']['bpc']:.4f}", flush=True)
    points = plan(args.ratios, EARLY, gates, rows, other, args.long_steps)
    for p in points:
        p["command"] = (scratch_command(p, args.work) if p["method"] == "scratch"
                        else prefix + result["command"][len(prefix):] + f" --only {p['name']}")
        p.update(done.get(p["name"], {}))
    result["points"] = points
    write_summary(args.out, result)
    calib = None
    for p in points:
        if p["status"] == "done" or (args.only and p["name"] not in args.only) or \
                (args.skip_scratch and p["method"] == "scratch"):
            continue
        if p["method"] == "scratch":
            p.update(run_scratch(p, args.work))
        else:
            if calib is None:
                calib = calibration_windows(task, args.calib)
            p.update(run_conversion(p, dense, task, calib, result["finetune"]))
        p["status"] = "done"
        print(f"  {p['name']}: test bpc after {p['bpc_after']:.4f}, {p['wall_seconds']:.0f}s", flush=True)
        write_summary(args.out, result)
    result["load_after"] = os.getloadavg()
    write_summary(args.out, result)
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


def write_summary(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n", force=True)
    write_text_atomic(path.with_suffix(".csv"), to_csv(result), force=True)


# -- the table, the CSV, the plot ---------------------------------------------------------------

def dense_row(summary: dict) -> dict:
    d = summary["dense"]
    return {"name": "dense", "method": "dense", "structure": "dense", "ratio": 1, "rank": None,
            "recurrent_params": d["recurrent_params"], "params": d["params"], "ratio_recurrent": 1.0,
            "ratio_total": 1.0, "bpc_before": None, "bpc_after": d["test"]["bpc"], "updates": 3000,
            "wall_seconds": None, "status": "done", "command": f"lrcompress train {RECIPE} -o {summary['run']}"}


def rows(summary: dict) -> list[dict]:
    """The dense row, then every point by ratio, structure and method."""
    order = {m: i for i, m in enumerate(("converted-plain", "converted-data-aware", "scratch"))}
    return [dense_row(summary)] + sorted(summary["points"], key=lambda p: (p["ratio"], p["structure"],
                                                                         order[p["method"]]))


def to_csv(summary: dict) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows(summary):
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return text.getvalue()


def _bpc(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(summary: dict) -> str:
    """The markdown table of docs/results.md (bpc to 3 decimals; "not run yet" where a point is)."""
    lines = ["| method | structure | rank | recurrent params | total params | ratio (recurrent / total) | "
             "test bpc before fine-tuning | test bpc after | updates | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(summary):
        method = r["method"] + (f", {r['finetune_steps']:,} updates" if "finetune_steps" in r else "")
        head = (f"| {method} | {r['structure']} | {'-' if r['rank'] is None else r['rank']} | "
                f"{r['recurrent_params']:,} | {r['params']:,} | {r['ratio_recurrent']:.2f}x / {r['ratio_total']:.2f}x | ")
        if r["status"] != "done":
            lines.append(head + "not run yet | not run yet | | |")
            continue
        updates = "3,000" if r["method"] == "dense" else (
            f"{r['updates']:,}" if r["method"] == "scratch" else f"3,000 + {r['updates']:,}")
        wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.1f} min"
        lines.append(head + f"{_bpc(r['bpc_before'])} | {_bpc(r['bpc_after'])} | {updates} | {wall} |")
    return "\n".join(lines)


def cmd_table(args) -> None:
    print(table(json.loads(args.summary.read_text())))


STYLE = {"converted-plain": ("tab:orange", "s"), "converted-data-aware": ("tab:blue", "o"),
         "scratch": ("tab:green", "^")}


def cmd_plot(args) -> None:
    """Test bpc against total parameters (log x): each method and structure one line, after
    fine-tuning (solid: LR, dashed: LRD); converted points before fine-tuning faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrcompress.train.plots import save_figure

    summary = json.loads(args.summary.read_text())
    done = [p for p in summary["points"] if p["status"] == "done"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, (color, marker) in STYLE.items():
        for structure, style in zip(STRUCTURES, ("-", "--")):
            pts = sorted((p["params"], p["bpc_after"], p["bpc_before"]) for p in done
                         if p["method"] == method and p["structure"] == structure and "finetune_steps" not in p)
            if not pts:
                continue
            x, after, before = zip(*pts)
            ax.plot(x, after, color=color, marker=marker, linestyle=style, label=f"{method} {structure}"
                    + ("" if method == "scratch" else f" (+{summary['finetune']['steps']} updates)"))
            if method != "scratch":
                ax.plot(x, before, color=color, marker=marker, linestyle=style, alpha=0.3, markerfacecolor="none",
                        label=f"{method} {structure}, before fine-tuning")
    long = sorted((p["params"], p["bpc_after"], p["finetune_steps"]) for p in done if "finetune_steps" in p)
    if long:
        ax.plot([x for x, _, _ in long], [y for _, y, _ in long], color="tab:red", marker="D", linestyle=":",
                label=f"converted-plain LR (+{long[0][2]:,} updates)")
    d = summary["dense"]
    ax.scatter([d["params"]], [d["test"]["bpc"]], color="black", marker="*", s=120, zorder=5,
               label=f"dense ({d['params']:,} params)")
    ax.axhline(d["test"]["bpc"], color="black", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (whole model)")
    ax.set_ylabel("test bits per character")
    ax.set_title("PTB characters, GRU n = 512: converted vs trained from scratch")
    ax.legend(fontsize=7)
    save_figure(fig, args.out, force=True)
    print(f"wrote {args.out}")


# -- entry point ----------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="every point not yet done, in plan order; summary after each")
    p.add_argument("run", type=Path, help="the dense run directory (recipe.toml + model.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="summary JSON (a CSV is written next to it)")
    p.add_argument("--work", type=Path, default=Path("runs/study-ptb"), help="from-scratch run directories")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="in run order (default 4 16 2 8)")
    p.add_argument("--steps", type=int, default=STEPS, help="fine-tuning updates (default 300)")
    p.add_argument("--lr", type=float, default=LR, help="fine-tuning learning rate (default 1e-3)")
    p.add_argument("--long-steps", type=int, default=LONG_STEPS,
                   help="last: plain LR at the first two ratios fine-tuned this many updates (0: none)")
    p.add_argument("--calib", type=int, default=CALIB, help="training sentences for the data-aware fit")
    p.add_argument("--only", nargs="+", help="point names to run (default: all not done)")
    p.add_argument("--skip-scratch", action="store_true", help="run only the conversions")
    p.set_defaults(run_command=cmd_run)
    p = sub.add_parser("table", help="a summary as the markdown table")
    p.add_argument("summary", type=Path)
    p.set_defaults(run_command=cmd_table)
    p = sub.add_parser("plot", help="test bpc against parameters (PNG)")
    p.add_argument("summary", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run_command=cmd_plot)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run_command(args)


if __name__ == "__main__":
    main()
