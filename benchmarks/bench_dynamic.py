"""Dynamic evaluation of the trained character language models (docs/dynamic.md, "Measured").

For a finished language-model run (a run directory: ``recipe.toml`` and ``model.safetensors``)
``measure`` scores a split, or its first ``--symbols`` predictions, statically and with
``lrcompress.train.dynamic_evaluate`` at every point ``METHOD:SEGMENT:LR:DECAY`` given (``--point``,
or a named list with ``--points``), for the dense model and, with ``--models``, for converted
copies (``lrd:64``: ``lrcompress.compress(model, rank=64, diag=True)``, not fine-tuned). The
split is read as ``lrcompress evaluate`` reads it (``evaluate_run``): the task's own reading
(``as_sequences``: one stream in stream mode, line by line in sentence mode), the first
``symbols`` predictions (``first_predictions``), and for the RMS rule ``gradient_statistics`` on
``--grad-batches`` training batches of the recipe (its batch size and seed), gathered once per
model (on the converted model for a converted one) and shared by its RMS points. ``--as-stream``
reads the split as one stream whatever the task's mode (the meaningless reading of a
sentence-mode model that docs/dynamic.md warns about); with no points only the static figure
is taken.

Each model's summary keeps the static and dynamic figures of every point (``ce``, ``bpc``,
``ppl``, ``count``, ``skipped``), the wall and process CPU seconds, and the machine; the JSON
is rewritten after every point, so a run stopped early keeps what finished.

    LRCOMPRESS_DATA=<ptb folder> python benchmarks/bench_dynamic.py measure runs/ptb-gru-512 --split valid \\
        --symbols 20000 --points ptb-grid --out benchmarks/results/dynamic-ptb-valid-grid.json   # ~40 s a point
    LRCOMPRESS_DATA=<ptb folder> python benchmarks/bench_dynamic.py measure runs/ptb-gru-512 --split test \\
        --points defaults --out benchmarks/results/dynamic-ptb-test.json                         # ~10 min a point
    python benchmarks/bench_dynamic.py measure runs/text-lstm-256 --split test --points text \\
        --models dense lrd:64 --out benchmarks/results/dynamic-text-test.json                    # seconds
    python benchmarks/bench_dynamic.py table benchmarks/results/dynamic-ptb-test.json

The PTB run needs ``$LRCOMPRESS_DATA`` pointing at the folder with ``ptb.char.*.txt``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import lrcompress as lrc
from lrcompress.io import load_model, write_text_atomic
from lrcompress.train.dynamic import (DEFAULT_DECAY, DEFAULT_LR, DEFAULT_SEGMENT, as_sequences, dynamic_evaluate,
                                      first_predictions, gradient_statistics, static_evaluate)
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import MODEL_FILE, RECIPE_FILE, build

from _common import add_table_command, machine, run_study, study_parser  # this folder: see _common.py

DEFAULTS = [("sgd", DEFAULT_SEGMENT, DEFAULT_LR["sgd"], DEFAULT_DECAY["sgd"]),
            ("rms", DEFAULT_SEGMENT, DEFAULT_LR["rms"], DEFAULT_DECAY["rms"])]
# The grid the defaults (DEFAULT_LR, DEFAULT_DECAY) were chosen on: the PTB GRU's first 20,000
# validation characters. lr first along each rule, then decay and segment around the best.
PTB_GRID = [("sgd", 50, lr, 0.0) for lr in (0.003, 0.01, 0.03, 0.1, 0.3)] + [("sgd", 20, 0.01, 0.0)] + \
    [("rms", 50, lr, 0.0) for lr in (1e-5, 3e-5, 1e-4, 1e-3)] + \
    [("rms", 50, lr, 1e-3) for lr in (2e-5, 3e-5, 5e-5)] + [("rms", 50, 3e-5, d) for d in (3e-3, 1e-2)] + \
    [("rms", 20, 1e-5, 0.0), ("rms", 20, 1e-5, 1e-3), ("rms", 100, 5e-5, 0.0)]
# The text LSTM: the PTB grid plus RMS with segment 20 around lr 1e-4 (its validation text repeats
# more than PTB's sentences: larger steps pay).
TEXT_GRID = PTB_GRID + [("rms", 20, lr, 1e-3) for lr in (3e-5, 5e-5, 1e-4, 2e-4)] + \
    [("rms", 20, 1e-4, d) for d in (0.0, 3e-3)]
TEXT_POINTS = DEFAULTS + [("rms", 20, 1e-4, 1e-3)]  # the defaults and the text grid's best
POINTS = {"defaults": DEFAULTS, "ptb-grid": PTB_GRID, "text-grid": TEXT_GRID, "text": TEXT_POINTS}
DIVERGED = 2.0  # a dynamic figure above this many times the static one is marked as diverged


def parse_point(text: str) -> tuple[str, int, float, float]:
    """``METHOD:SEGMENT:LR:DECAY`` (``rms:20:1e-4:0.001``) as a tuple; SystemExit naming it otherwise."""
    parts = text.split(":")
    try:
        method, segment, lr, decay = parts
        point = (method, int(segment), float(lr), float(decay))
    except ValueError:
        raise SystemExit(f"point {text!r} is not METHOD:SEGMENT:LR:DECAY (e.g. rms:20:1e-4:0.001)") from None
    if method not in ("sgd", "rms"):
        raise SystemExit(f"point {text!r}: method must be sgd or rms")
    return point


def parse_model(text: str) -> dict | None:
    """``dense`` (None) or ``lowrank:R`` / ``lrd:R`` (compress at rank R, with the diagonal for lrd)."""
    if text == "dense":
        return None
    kind, _, rank = text.partition(":")
    if kind not in ("lowrank", "lrd") or not rank.isdigit() or int(rank) < 1:
        raise SystemExit(f"model {text!r} is not dense, lowrank:RANK or lrd:RANK")
    return {"rank": int(rank), "diag": kind == "lrd"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - start, time.process_time() - start_cpu


def cmd_measure(args) -> None:
    points = [p for name in args.points for p in POINTS[name]] + [parse_point(p) for p in args.point]
    models = [(name, parse_model(name)) for name in args.models]
    if not points and not args.as_stream:
        raise SystemExit("no points: give --points or --point (only --as-stream may go without)")
    recipe = load_recipe(args.run / RECIPE_FILE)
    task, dense = build(recipe)
    load_model(dense, args.run / MODEL_FILE)
    if args.as_stream:
        sequences = first_predictions([torch.from_numpy(task.stream(args.split))], args.symbols)
    else:
        sequences = first_predictions(as_sequences(task, args.split), args.symbols)
    summary_file = args.run / "summary.json"
    run_summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    result = {"command": " ".join(["python", "benchmarks/bench_dynamic.py", *sys.argv[1:]]),
              "machine": machine(), "load_before": os.getloadavg(), "run": str(args.run),
              "recipe": recipe["meta"]["name"], "weights_sha256": sha256(args.run / MODEL_FILE),
              "task": task.name, "mode": "stream" if task.stateful else "sentences",
              "read": "one stream" if args.as_stream else "as the task reads it", "split": args.split,
              "symbols": args.symbols, "sequences": len(sequences), "grad_batches": args.grad_batches,
              "run_summary": {"test": run_summary.get("test"), "params": run_summary.get("params")}, "models": []}

    def save():
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)

    for name, convert in models:
        model = copy.deepcopy(dense)
        entry = {"name": name, "convert": convert, "params": lrc.count_params(model), "points": []}
        if convert is not None:
            entry["params_before"] = entry["params"]
            lrc.compress(model, **convert)
            entry["params"] = lrc.count_params(model)
        model.eval()
        result["models"].append(entry)
        if not points:  # --as-stream alone: the static figure
            entry["static"], entry["static_seconds"], _ = _timed(lambda: static_evaluate(model, sequences))
            print(f"{name}: static bpc {entry['static']['bpc']:.4f} over {entry['static']['count']:,} symbols "
                  f"({entry['static_seconds']:.0f}s)", flush=True)
            save()
            continue
        stats = None
        if any(p[0] == "rms" for p in points):  # evaluate_run's statistics: the recipe's training batches
            batches = task.batches("train", recipe["train"]["batch_size"], seed=recipe["train"]["seed"])
            stats, entry["stats_seconds"], _ = _timed(lambda: gradient_statistics(
                model, batches, carry=task.stateful, max_batches=args.grad_batches))
        for method, segment, lr, decay in points:
            out, wall, cpu = _timed(lambda: dynamic_evaluate(
                model, sequences, lr=lr, decay=decay, segment=segment, method=method,
                grad_stats=stats if method == "rms" else None))
            entry["static"] = out["static"]
            entry["points"].append({**out["settings"], "static": out["static"], "dynamic": out["dynamic"],
                                    "wall_seconds": wall, "cpu_seconds": cpu})
            print(f"{name} {method} segment {segment} lr {lr:g} decay {decay:g}: static {out['static']['bpc']:.4f} "
                  f"dynamic {out['dynamic']['bpc']:.4f} ({wall:.0f}s wall, {cpu:.0f}s CPU)", flush=True)
            save()
    result["load_after"] = os.getloadavg()
    save()
    print(f"wrote {args.out}")


# -- the table ---------------------------------------------------------------------------------

def number(value: float) -> str:
    """A step size or decay as the docs write it: 0.01, 0.001, 1e-4, 3e-5, 0."""
    if 0 < value < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def table(summary: dict) -> str:
    """The markdown table of a ``measure`` summary: a row per point (a column for the model when
    there are several), the lowest dynamic figure of each model in bold, a dynamic figure above
    ``DIVERGED`` times the static one marked as diverged. A summary without points (``--as-stream``
    alone) gives one row per model with its static figure."""
    models = summary["models"]
    several = len(models) > 1
    lead = ["model"] if several else []
    if not any(m["points"] for m in models):
        head = lead + ["symbols", "static bpc"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(lead)) + "---:|---:|"]
        for m in models:
            cells = ([_label(m)] if several else []) + [f"{m['static']['count']:,}", f"{m['static']['bpc']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    head = lead + ["method", "segment", "lr", "decay", "static bpc", "dynamic bpc", "gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(lead) + 1) + "---:|" * 6]
    for m in models:
        figures = [p["dynamic"]["bpc"] for p in m["points"]]
        best = min(figures) if figures else None
        for p in m["points"]:
            static, dyn = p["static"]["bpc"], p["dynamic"]["bpc"]
            if dyn > DIVERGED * static:
                shown = f"{dyn:.2f} (diverged)"
            else:
                shown = f"**{dyn:.4f}**" if dyn == best and len(m["points"]) > 1 else f"{dyn:.4f}"
            cells = ([_label(m)] if several else []) + [p["method"], str(p["segment"]), number(p["lr"]),
                                                        number(p["decay"]), f"{static:.4f}", shown,
                                                        f"{dyn - static:+.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(model: dict) -> str:
    c = model["convert"]
    if c is None:
        return "dense"
    return f"rank {c['rank']}{' + diag' if c['diag'] else ''}, converted, not fine-tuned"


def cmd_table(args) -> None:
    for path in args.summary:
        summary = json.loads(path.read_text())
        if len(args.summary) > 1:
            print(f"{path}: {summary['run']}, {summary['split']}, {summary['read']}\n")
        print(table(summary) + "\n")


def main(argv=None) -> None:
    parser, sub = study_parser(__doc__)
    p = sub.add_parser("measure", help="static and dynamic bits per character at every point")
    p.add_argument("run", type=Path, help="run directory (recipe.toml + model.safetensors)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--symbols", type=int, help="only the first N predictions of the split (default: all)")
    p.add_argument("--points", nargs="+", default=[], choices=sorted(POINTS),
                   help="named point lists (defaults: the CLI's sgd and rms defaults)")
    p.add_argument("--point", action="append", default=[], help="one more point METHOD:SEGMENT:LR:DECAY")
    p.add_argument("--models", nargs="+", default=["dense"],
                   help="dense, lowrank:RANK, lrd:RANK (converted copies, not fine-tuned; default dense)")
    p.add_argument("--grad-batches", type=int, default=100, help="training batches for the RMS statistics")
    p.add_argument("--as-stream", action="store_true", help="read the split as one stream whatever the mode")
    p.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    p.set_defaults(run_command=cmd_measure)
    add_table_command(sub, cmd_table, many=True)
    run_study(parser, argv)


if __name__ == "__main__":
    main()
