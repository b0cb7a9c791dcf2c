"""Data-aware fits and rank budgets on trained models, before and after fine-tuning (issue 9).

For a trained run (a run directory: its ``recipe.toml`` and weights) and budgets of 2x, 4x and
8x fewer parameters, the recurrent and input weights are replaced by

* plain SVD at one uniform rank (the largest that fits the budget), low rank (LR) and low
  rank plus diagonal (LRD);
* whitened SVD (``calibration=``: the input second moments of every weight, measured on
  windows of the training split) at the same uniform ranks, LR and LRD;
* budget allocation (``ratio=``), plain and whitened, LR, LRD and ``diag="auto"``;

and each is scored on the test split (or its first ``--test-windows`` batches) before any fine-tuning (bits per character for the
language models), next to the dense model, with compress's defaults (``damping``, ``allocation``).
``sweep`` runs a damping x allocation grid on the validation split (how the defaults were
chosen). ``finetune`` then fine-tunes two of them for the same number of updates with
``lrcompress.train.fit`` and reports how many updates the data-aware one needs to reach the
plain one's best validation figure (``updates_to_match``); ``timing`` times calibration + fit;
``table`` prints a ``measure`` summary as markdown.

Every subcommand writes a JSON summary (``--out``, under benchmarks/results/) and prints a table.

    python benchmarks/bench_calibration.py train-text --out runs/text-lstm-256          # the second model, ~10 min
    python benchmarks/bench_calibration.py sweep runs/text-lstm-256 --out benchmarks/results/calibration-text-sweep.json
    python benchmarks/bench_calibration.py measure runs/ptb-gru-512 --out benchmarks/results/calibration-ptb.json
    python benchmarks/bench_calibration.py finetune runs/ptb-gru-512 --ratio 4 --steps 300 \\
        --out benchmarks/results/calibration-ptb-finetune.json
    python benchmarks/bench_calibration.py timing runs/ptb-gru-512 --out benchmarks/results/calibration-ptb-timing.json
    python benchmarks/bench_calibration.py plot benchmarks/results/calibration-ptb.json benchmarks/results/calibration-text.json \\
        --out benchmarks/results/calibration.png

The PTB run needs ``$LRCOMPRESS_DATA`` pointing at the folder with ``ptb.char.*.txt``.
Targets (issue 9): at 4x the whitened budgeted fit cuts plain uniform SVD's test-bpc increase by
>= 30%; it reaches plain SVD's fine-tuned quality in <= half the updates; calibration + fit of
the n = 512 GRU under 30 s on 2 cores.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

import lrcompress as lrc
from lrcompress.budget import budget_for
from lrcompress.config import CompressionConfig
from lrcompress.convert import model_outputs, output_error
from lrcompress.factorize import factored_params
from lrcompress.io import load_model, write_text_atomic
from lrcompress.targets import find_targets
from lrcompress.train import engine
from lrcompress.train.checkpoint import load_checkpoint
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build, train_recipe

from _common import add_table_command, machine, run_study, study_parser, timed  # this folder: see _common.py

RATIOS = (2, 4, 8)
EVAL_BATCH = 32  # streams the test split is cut into (the training batch size: run.py's layout)

# The second model: an LSTM character model on the prose that ships with CPython (no download).
TEXT_RECIPE = {
    "meta": {"name": "text-lstm-256", "description": "Char-level LM on pydoc_data.topics, dense LSTM n = 256",
             "source": "Not a paper row: the second trained model of the calibration benchmark"},
    "task": {"name": "text", "seq_len": 100},
    "model": {"cell": "lstm", "hidden_size": 256},
    "train": {"optimizer": "adam", "lr": 0.002, "batch_size": 32, "steps": 2000, "eval_every": 250,
              "clip": "norm", "clip_value": 1.0, "seed": 0},
}


# -- the trained model -----------------------------------------------------------------------

def load_run(run: Path, weights: str | None = None):
    """(task, recipe, dense model) of a run directory: ``model.safetensors`` when the run has
    finished, else its best validation checkpoint ``best.safetensors`` (``--weights`` picks)."""
    recipe = load_recipe(run / "recipe.toml")
    task, model = build(recipe)
    path = run / (weights or ("model.safetensors" if (run / "model.safetensors").is_file() else "best.safetensors"))
    if path.name == "model.safetensors":
        load_model(model, path)
    else:  # a training checkpoint: weights under model.*
        load_checkpoint(path).restore(model)
    model.eval()
    return task, recipe, model, path


def calibration_windows(task, count: int, batch: int = 32) -> list[torch.Tensor]:
    """``count`` windows of the training split as inputs (``count // batch`` batches of ``batch``
    windows, in stream order: the streams start spread over the whole split)."""
    loader = task.batches("train", batch, seed=0, shuffle=False)
    return [b.x for b in itertools.islice(loader, max(1, count // batch))]


def test_metrics(model, task, split: str = "test", limit: int | None = None) -> dict:
    """The task's metrics on ``split`` (state carried from window to window, as in training)."""
    def data():
        loader = task.batches(split, EVAL_BATCH, seed=0, shuffle=False)
        return loader if limit is None else itertools.islice(loader, limit)
    return engine.evaluate(model, data, task=task)


def cmd_train_text(args) -> None:
    summary = train_recipe(TEXT_RECIPE, args.out, overrides=args.set, progress=False)
    print(json.dumps({k: summary.get(k) for k in ("steps", "val", "test", "wall_time")}, indent=1))


# -- the variants ----------------------------------------------------------------------------

# (name, fit, rank choice, diag): "plain" = plain SVD, "white" = whitened (calibrated) SVD.
VARIANTS = (
    ("plain-uniform-LR", "plain", "uniform", False),
    ("plain-uniform-LRD", "plain", "uniform", True),
    ("white-uniform-LR", "white", "uniform", False),
    ("white-uniform-LRD", "white", "uniform", True),
    ("plain-budget-LR", "plain", "budget", False),
    ("plain-budget-LRD", "plain", "budget", True),
    ("white-budget-LR", "white", "budget", False),
    ("white-budget-LRD", "white", "budget", True),
    ("white-budget-auto", "white", "budget", "auto"),
)
TARGETS = CompressionConfig(rank=1, include_input=True)  # recurrent and input weights (the names only)
# compress's defaults the variants use: the calibration damping and the budget's allocation criterion
DEFAULTS = {k: getattr(TARGETS, k) for k in ("damping", "allocation")}


def uniform_ranks(model, budget: int, diag: bool) -> dict[str, int]:
    """The largest uniform rank ``d`` whose model fits ``budget`` parameters, per target.

    Each target takes ``min(d, its break-even rank)`` (a target never grows past its dense size,
    as under a budget); a diagonal goes on square blocks only, as ``compress`` does.
    """
    targets = find_targets(model, TARGETS)
    untouched = lrc.count_params(model) - sum(c.gates * c.rows * c.cols for c in targets)

    def cost(c, r):
        return factored_params(c.gates, c.rows, c.cols, r, diag=diag and c.rows == c.cols, tied=False)

    caps = {c.name: max(r for r in range(1, min(c.rows, c.cols) + 1) if cost(c, r) < c.gates * c.rows * c.cols
                        or r == 1) for c in targets}
    best = None
    for d in range(1, max(caps.values()) + 1):
        ranks = {c.name: min(d, caps[c.name]) for c in targets}
        if untouched + sum(cost(c, ranks[c.name]) for c in targets) > budget:
            break
        best = ranks
    if best is None:
        raise SystemExit(f"budget {budget:,} is below rank 1 everywhere")
    return best


def convert(dense, variant: tuple, ratio: float, calib: list, **options) -> tuple:
    """A compressed copy of ``dense`` for one variant at whole-model ``ratio``: (model, report, seconds).

    ``options``: further ``lrc.compress`` options (``damping``, ``allocation``)."""
    name, fit, choice, diag = variant
    model = copy.deepcopy(dense)
    kwargs = dict(options)
    if fit == "white":
        kwargs["calibration"] = calib
    else:
        kwargs.pop("damping", None)
    if choice == "uniform":
        ranks = uniform_ranks(model, budget_for(lrc.count_params(model), ratio=ratio), diag)
        kwargs.update(rank=1, ranks=ranks)
        kwargs.pop("allocation", None)
    else:
        kwargs.update(ratio=ratio)
    wall, _, report = timed(lambda: lrc.compress(model, include_input=True, diag=diag, **kwargs))
    return model, report, wall


def describe(model, report, metrics: dict, dense_metrics: dict, metric: str, output_error: float) -> dict:
    rows = report.to_dict()["targets"]
    return {"params": report.params_after, "ratio": report.ratio,
            "ranks": {r["name"]: r["rank"] for r in rows}, "diag": {r["name"]: r["diag"] for r in rows},
            "weight_error": {r["name"]: r["rel_error"] for r in rows},
            "output_error": output_error, "test": metrics,
            "increase": metrics[metric] - dense_metrics[metric]}


def cmd_measure(args) -> None:
    task, recipe, dense, weights = load_run(args.run, args.weights)
    metric = task.metric
    calib = calibration_windows(task, args.calib_windows)
    reference = model_outputs(dense, calib)
    start = time.perf_counter()
    dense_metrics = test_metrics(dense, task, limit=args.test_windows)
    print(f"{args.run} ({weights.name}): {lrc.count_params(dense):,} params, dense test {metric} "
          f"{dense_metrics[metric]:.4f} ({time.perf_counter() - start:.0f}s per evaluation)", flush=True)
    result = {"command": " ".join(["python", "benchmarks/bench_calibration.py", *sys.argv[1:]]),
              "machine": machine(), "load_before": os.getloadavg(), "run": str(args.run), "weights": weights.name,
              "recipe": recipe["meta"]["name"], "metric": metric, "params": lrc.count_params(dense),
              "calibration": {"windows": sum(len(x) for x in calib), "seq_len": calib[0].shape[1], "split": "train"},
              "test_windows": args.test_windows, "dense": {"test": dense_metrics}, "defaults": DEFAULTS, "budgets": []}
    for ratio in args.ratios:
        budget = budget_for(result["params"], ratio=ratio)
        entry = {"ratio": ratio, "budget": budget, "variants": {}}
        result["budgets"].append(entry)
        for variant in VARIANTS:
            if args.only and variant[0] not in args.only:
                continue
            model, report, wall = convert(dense, variant, ratio, calib)
            out_err = output_error(reference, model_outputs(model, calib))
            metrics = test_metrics(model, task, limit=args.test_windows)
            entry["variants"][variant[0]] = row = {**describe(model, report, metrics, dense_metrics, metric, out_err),
                                                   "fit_seconds": wall}
            print(f"  {ratio}x  {variant[0]:<18} {row['params']:>9,} params  ranks "
                  f"{','.join(map(str, row['ranks'].values())):<9} test {metric} {metrics[metric]:.4f} "
                  f"(+{row['increase']:.4f})  output error {out_err:.3f}  fit {wall:.1f}s", flush=True)
        plain = entry["variants"].get("plain-uniform-LR")
        if plain:
            for name, row in entry["variants"].items():
                row["cut_vs_plain_uniform_LR"] = 1 - row["increase"] / plain["increase"]
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)  # after every budget
    result["load_after"] = os.getloadavg()
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


def cmd_sweep(args) -> None:
    """Damping and allocation grid: the figure a default is chosen by (on ``--split``, validation by default)."""
    task, recipe, dense, weights = load_run(args.run, args.weights)
    metric = task.metric
    calib = calibration_windows(task, args.calib_windows)
    dense_metrics = test_metrics(dense, task, args.split, limit=args.test_windows)
    byname = {v[0]: v for v in VARIANTS}
    result = {"command": " ".join(["python", "benchmarks/bench_calibration.py", *sys.argv[1:]]),
              "machine": machine(), "run": str(args.run), "weights": weights.name, "recipe": recipe["meta"]["name"],
              "metric": metric, "split": args.split, "test_windows": args.test_windows,
              "dense": dense_metrics[metric], "rows": []}
    print(f"dense {args.split} {metric} {dense_metrics[metric]:.4f}", flush=True)
    for ratio in args.ratios:
        plain = None
        for name in args.variants:
            fit, choice = byname[name][1:3]
            dampings = args.dampings if fit == "white" else [None]
            allocations = args.allocations if choice == "budget" else [None]
            for damping, allocation in itertools.product(dampings, allocations):
                options = {k: v for k, v in (("damping", damping), ("allocation", allocation)) if v is not None}
                model, report, wall = convert(dense, byname[name], ratio, calib, **options)
                value = test_metrics(model, task, args.split, limit=args.test_windows)[metric]
                row = {"ratio": ratio, "variant": name, "damping": damping, "allocation": allocation,
                       "ranks": {r.name: r.rank for r in report.targets}, "output_error": report.output_error,
                       "value": value, "increase": value - dense_metrics[metric]}
                if name == "plain-uniform-LR":
                    plain = row["increase"]
                row["cut_vs_plain_uniform_LR"] = None if plain is None else 1 - row["increase"] / plain
                result["rows"].append(row)
                print(f"  {ratio:g}x {name:<18} damping {damping!s:<5} {allocation or '':<8} ranks "
                      f"{','.join(map(str, row['ranks'].values())):<8} +{row['increase']:.4f}"
                      + ("" if plain is None else f"  cut {row['cut_vs_plain_uniform_LR']:+.0%}"), flush=True)
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


def cmd_finetune(args) -> None:
    """Fine-tune two variants at one ratio with the same settings; updates the second needs to
    reach the first's best validation figure (``updates_to_match``)."""
    task, recipe, dense, weights = load_run(args.run, args.weights)
    metric, calib = task.metric, calibration_windows(task, args.calib_windows)
    byname = {v[0]: v for v in VARIANTS}
    train = {"optimizer": "adam", "lr": args.lr, "batch_size": 32, "steps": args.steps,
             "eval_every": max(1, args.steps // 20), "clip": "norm", "clip_value": 1.0, "seed": 0}
    result = {"command": " ".join(["python", "benchmarks/bench_calibration.py", *sys.argv[1:]]),
              "machine": machine(), "load_before": os.getloadavg(), "run": str(args.run), "weights": weights.name,
              "metric": metric, "ratio": args.ratio, "defaults": DEFAULTS, "train": train,
              "val_windows": args.val_windows * EVAL_BATCH,
              "runs": {}}
    for name in (args.baseline, args.candidate):
        model, report, _ = convert(dense, byname[name], args.ratio, calib)
        model.train()
        before = test_metrics(model, task, "valid", limit=args.val_windows)
        fitted = engine.fit(model, lambda epoch: task.batches("train", 32, seed=0, epoch=epoch), task=task,
                            recipe=train, val_loader=lambda: itertools.islice(
                                task.batches("valid", EVAL_BATCH, seed=0, shuffle=False), args.val_windows),
                            steps_per_epoch=task.steps_per_epoch(32), progress=False, restore_best=False)
        curve = [(0, before[metric])] + [(h["step"], h["val"][metric]) for h in fitted.history if "val" in h]
        result["runs"][name] = {"params": report.params_after, "val_curve": curve,
                                "test_after": test_metrics(model, task, limit=args.test_windows),
                                "wall_time": fitted.wall_time}
        print(f"{name}: {report.params_after:,} params, val {metric} " +
              " ".join(f"{s}:{v:.4f}" for s, v in curve), flush=True)
    result.update(updates_to_match(result["runs"][args.baseline]["val_curve"],
                                   result["runs"][args.candidate]["val_curve"]))
    result["load_after"] = os.getloadavg()
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)
    reached = result["candidate_updates_to_reach_best"]
    print(f"{args.baseline} reaches its best val {metric} {result['baseline_best']:.4f} after "
          f"{result['baseline_updates_to_best']} updates; {args.candidate} after "
          f"{'never (within ' + str(args.steps) + ')' if reached is None else reached}; wrote {args.out}")


def updates_to_match(baseline: list, candidate: list) -> dict:
    """How fast the candidate matches the baseline's fine-tuned quality (lower is better).

    The target is the baseline's best validation figure over its whole run (its fine-tuned
    quality; a late drift does not move it), reached after ``baseline_updates_to_best`` updates.
    ``candidate_updates_to_reach_best`` is the first evaluated step at which the candidate is at
    least as good (None: never within the run; resolution: the evaluation interval), and
    ``fraction`` their ratio: the issue's goal is ``fraction <= 0.5``. The same for the
    baseline's final figure, as the issue words it."""
    best_step, best = min(baseline, key=lambda point: (point[1], point[0]))
    final = baseline[-1][1]
    first = lambda target: next((step for step, value in candidate if value <= target), None)  # noqa: E731
    reached = first(best)
    return {"baseline_best": best, "baseline_updates_to_best": best_step,
            "candidate_updates_to_reach_best": reached,
            "fraction": None if reached is None or not best_step else reached / best_step,
            "baseline_final": final, "candidate_updates_to_reach_final": first(final)}


def cmd_timing(args) -> None:
    """Calibration + fit of the whole model (``lrc.compress`` with ``calibration=``), timed and profiled."""
    import cProfile
    import io
    import pstats

    task, recipe, dense, weights = load_run(args.run, args.weights)
    calib = calibration_windows(task, args.calib_windows)
    result = {"command": " ".join(["python", "benchmarks/bench_calibration.py", *sys.argv[1:]]),
              "machine": machine(), "threads": torch.get_num_threads(), "load_before": os.getloadavg(),
              "run": str(args.run), "calibration_windows": sum(len(x) for x in calib), "cases": {}}
    for diag in (False, True, "auto"):
        model = copy.deepcopy(dense)
        profile = cProfile.Profile()
        wall, cpu, _ = timed(lambda: profile.runcall(lrc.compress, model, ratio=args.ratio, include_input=True,
                                                     diag=diag, calibration=calib))
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(12)
        result["cases"][str(diag)] = {"wall_seconds": wall, "cpu_seconds": cpu, "profile": text.getvalue()}
        print(f"ratio {args.ratio} diag={diag}: {wall:.1f}s wall, {cpu:.1f}s CPU", flush=True)
    result["load_after"] = os.getloadavg()
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


def cmd_plot(args) -> None:
    """Test metric against parameters, one line per variant, one panel per ``measure`` summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrcompress.train.plots import save_figure

    summaries = [json.loads(Path(p).read_text()) for p in args.summaries]
    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.5), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        metric = s["metric"]
        for name, *_ in VARIANTS:
            points = sorted((b["variants"][name]["params"], b["variants"][name]["test"][metric])
                            for b in s["budgets"] if name in b["variants"])
            if points:
                ax.plot(*zip(*points), marker="o" if name.startswith("white") else "s",
                        linestyle="-" if name.startswith("white") else "--", label=name)
        ax.axhline(s["dense"]["test"][metric], color="black", linewidth=0.8, label=f"dense ({s['params']:,} params)")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (whole model)")
        ax.set_ylabel(f"test {metric} (before fine-tuning)")
        ax.set_title(s["recipe"])
        ax.legend(fontsize=7)
    save_figure(fig, args.out, force=True)
    print(f"wrote {args.out}")


def cmd_table(args) -> None:
    """A ``measure`` summary as the markdown table of docs/results.md."""
    s = json.loads(args.summary.read_text())
    metric = s["metric"]
    s["budgets"].sort(key=lambda b: b["ratio"])
    print("| variant | " + " | ".join(f"{b['ratio']:g}x (budget {b['budget']:,})" for b in s["budgets"]) + " |")
    print("|---|" + "---|" * len(s["budgets"]))
    for name, *_ in VARIANTS:
        cells = []
        for b in s["budgets"]:
            row = b["variants"].get(name)
            if row is None:
                cells.append("")
                continue
            cut = "" if name == "plain-uniform-LR" else f", cut {row['cut_vs_plain_uniform_LR']:+.0%}"
            cells.append(f"{row['test'][metric]:.3f} ({row['increase']:+.3f}{cut}); {row['params']:,}; "
                         f"r {'/'.join(map(str, row['ranks'].values()))}")
        if any(cells):  # a variant left out of the run (measure --only) gets no row
            print(f"| {name} | " + " | ".join(cells) + " |")


# -- entry point ----------------------------------------------------------------------------

def main(argv=None) -> None:
    parser, sub = study_parser(__doc__)
    p = sub.add_parser("train-text", help="train the second model (LSTM char LM on pydoc_data text)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--set", action="append", default=[], help="recipe override SECTION.KEY=VALUE")
    p.set_defaults(run_command=cmd_train_text)
    p = sub.add_parser("measure", help="every variant at every ratio, before fine-tuning")
    p.add_argument("run", type=Path, help="run directory (recipe.toml + weights)")
    p.add_argument("--weights", help="weights file in the run (default: model.safetensors, else best.safetensors)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--calib-windows", type=int, default=256, help="training windows for calibration (default 256)")
    p.add_argument("--test-windows", type=int, help="only the first N test batches (default: the whole split)")
    p.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    p.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    p.set_defaults(run_command=cmd_measure)
    p = sub.add_parser("sweep", help="damping x allocation grid on the validation split (choosing defaults)")
    p.add_argument("run", type=Path)
    p.add_argument("--weights")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--dampings", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    p.add_argument("--allocations", nargs="+", default=["absolute", "relative"])
    p.add_argument("--variants", nargs="+", default=["plain-uniform-LR", "white-uniform-LR", "plain-budget-LR",
                                                       "white-budget-LR"])
    p.add_argument("--split", default="valid")
    p.add_argument("--calib-windows", type=int, default=256)
    p.add_argument("--test-windows", type=int)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run_command=cmd_sweep)
    p = sub.add_parser("finetune", help="fine-tune two variants the same way; updates to reach the baseline")
    p.add_argument("run", type=Path)
    p.add_argument("--weights")
    p.add_argument("--ratio", type=float, default=4)
    p.add_argument("--baseline", default="plain-uniform-LR")
    p.add_argument("--candidate", default="white-budget-auto")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib-windows", type=int, default=256)
    p.add_argument("--val-windows", type=int, default=10, help="validation batches (of 32 windows) per evaluation")
    p.add_argument("--test-windows", type=int)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run_command=cmd_finetune)
    p = sub.add_parser("timing", help="time calibration + fit of the whole model (with a profile)")
    p.add_argument("run", type=Path)
    p.add_argument("--weights")
    p.add_argument("--ratio", type=float, default=4)
    p.add_argument("--calib-windows", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run_command=cmd_timing)
    p = sub.add_parser("plot", help="test metric against parameters from measure summaries")
    p.add_argument("summaries", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="image file (PNG)")
    p.set_defaults(run_command=cmd_plot)
    add_table_command(sub, cmd_table)
    run_study(parser, argv)


if __name__ == "__main__":
    main()
