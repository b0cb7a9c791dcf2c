"""Seconds per update of a recipe's real training loop: the factored backward against the rebuilt path.

Builds the recipe's task and model (seeded as ``lrcompress train`` does) and runs ``fit`` for a
few updates with ``train.execution`` set to ``factored`` (backward through the factors,
``execution.bptt``) and to ``dense`` (rebuild ``W = L R + D`` each update, then PyTorch's kernel),
on the same batches, in one process, so both see the same machine. Everything the recipe does per
update is included: dropout masks, the loss, gradient clipping, the optimiser step. The first
update of each path (TorchScript compilation, allocator warm-up) is reported apart; the figure is
the median of the others. No evaluation runs.

    python benchmarks/bench_recipe_update.py recipes/ptb-lrd-gru-tied-6985-64-dropout.toml \
        --updates 5 --dense-updates 2 --threads 1 --json benchmarks/results/recipe-update-6985.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lrcompress.train.engine import TrainConfig, fit
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build

from _common import machine  # this folder: see _common.py


def time_updates(recipe: dict, execution: str, updates: int) -> dict:
    task, model = build(recipe)
    config = TrainConfig.from_dict({**recipe["train"], "steps": updates, "eval_every": 0, "execution": execution,
                                    "device": "cpu"})
    stamps = [time.perf_counter()]
    seed, size = config.seed, config.batch_size
    result = fit(model, lambda epoch: task.batches("train", size, seed=seed, epoch=epoch), task=task, recipe=config,
                 steps_per_epoch=task.steps_per_epoch(size), progress=False,
                 on_step=lambda loop: stamps.append(time.perf_counter()))
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"execution": execution, "updates": len(seconds), "first_s": seconds[0],
            "median_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "seconds": seconds, "path": result.execution}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--updates", type=int, default=5, help="updates timed on the factored path")
    parser.add_argument("--dense-updates", type=int, default=2, help="updates timed on the rebuilt path")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="recipe override SECTION.KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.set)
    rows = [time_updates(recipe, "factored", args.updates)]
    if args.dense_updates:
        rows.append(time_updates(recipe, "dense", args.dense_updates))
    summary = {"recipe": args.recipe, "overrides": args.set, "machine": machine(), "batch_size":
               recipe["train"]["batch_size"], "results": rows}
    if len(rows) == 2:
        summary["speedup"] = rows[1]["median_s"] / rows[0]["median_s"]
    print(f"{args.recipe} on {summary['machine']}, batch {summary['batch_size']}")
    for r in rows:
        print(f"  {r['execution']:9s} {r['median_s']:8.2f} s/update (median of {max(r['updates'] - 1, 1)}; "
              f"first {r['first_s']:.2f} s)  {r['path']}")
    if "speedup" in summary:
        print(f"  rebuilt / factored: {summary['speedup']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
