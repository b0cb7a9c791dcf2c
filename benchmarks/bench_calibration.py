"""Data-aware fits and rank budgets on trained models, before and after fine-tuning (issue 9).

For a trained run (a run directory: its ``recipe.toml`` and weights) and budgets of 2x, 4x and
8x fewer parameters, the recurrent and input weights are replaced by

* plain SVD at one uniform rank (the largest that fits the budget), low rank (LR) and low
  rank plus diagonal (LRD);
* whitened SVD (``calibration=``: the input second moments of every weight, measured on
  windows of the training split) at the same uniform ranks, LR and LRD;
* budget allocation (``ratio=``), plain and whitened, LR, LRD and ``diag="auto"``;

and each is scored on the whole test split before any fine-tuning (bits per character for the
language models), next to the dense model. ``finetune`` then fine-tunes two of them for the same
number of updates with ``lrcompress.train.fit`` and reports how many updates the data-aware one
needs to reach the plain one's final validation figure; ``timing`` times calibration + fit.

Every subcommand writes a JSON summary (``--out``, under benchmarks/results/) and prints a table.

    python benchmarks/bench_calibration.py train-text --out runs/text-lstm-256          # the second model, ~10 min
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

import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

import lrcompress as lrc
from lrcompress.config import CompressionConfig
from lrcompress.factorize import factored_params
from lrcompress.io import load_model, write_text_atomic
from lrcompress.targets import find_targets
from lrcompress.train import engine
from lrcompress.train.checkpoint import load_checkpoint
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build, train_recipe

from _common import machine, timed  # this folder: see _common.py

RATIOS = (2, 4, 8)
EVAL_BATCH = 32  # streams the test split is cut into (the training batch size: run.py's layout)

# The second model: an LSTM character model on the prose that ships with CPython (no download).
TEXT_RECIPE = {
    "meta": {"name": "text-lstm-256", "description": "Char-level LM on pydoc_data.topics, dense LSTM n = 256",
             "source": "Not a paper row: the second trained model of the calibration benchmark"},
    "task": {"name": "text", "seq_len": 100},
    "model": {"cell": "lstm", "hidden_size": 256},
    "train": {"optimizer": "adam", "lr": 0.002, "batch_size": 32, "steps": 1200, "eval_every": 200,
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


# -- entry point ----------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-text", help="train the second model (LSTM char LM on pydoc_data text)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--set", action="append", default=[], help="recipe override SECTION.KEY=VALUE")
    p.set_defaults(run=cmd_train_text)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
