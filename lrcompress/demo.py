"""The main job on an embedded default: train a small dense GRU, compress it, fine-tune, report.

Everything is generated locally (the addition task of the paper's section 3.0.2, scaled down),
so it runs anywhere in a few minutes on a CPU:

    >>> rows = run_demo("runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .train.run import collect, format_report, sweep, train_recipe

# The addition task with T = 30 and a dense GRU of 32 units (recipes/addition-gru-small.toml,
# embedded so the demo needs no files).
DEMO_RECIPE = {
    "meta": {"name": "demo-addition-gru-32", "description": "lrcompress demo: addition task, T = 30, GRU n = 32"},
    "task": {"name": "addition", "length": 30, "train_size": 20000, "valid_size": 1000, "test_size": 1000,
             "seed": 0},
    "model": {"cell": "gru", "hidden_size": 32, "update_gate_bias": 4.0},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 50, "steps": 2000, "eval_every": 200,
              "clip": "norm", "clip_value": 1.0, "device": "cpu", "seed": 0},
}
DEMO_RANKS = (2, 4, 8)


def run_demo(out: str | os.PathLike = "runs/demo", *, steps: int = 2000, finetune_steps: int = 400,
             ranks: tuple[int, ...] = DEMO_RANKS, fresh: bool = True, echo=print) -> list[dict]:
    """Train the dense model, sweep ranks with and without diagonal, and return the report rows."""
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    # Tiny matrices run faster on one thread than split across several.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        echo(f"training a dense GRU (n=32) on the addition task, {steps} updates ...")
        dense = train_recipe(DEMO_RECIPE, out / "dense", overrides=[f"train.steps={steps}"], progress=False)
        echo(f"dense: {dense['params']:,} parameters, test mse {dense['test']['mse']:.2e} "
             f"({time.perf_counter() - start:.0f}s)")
        echo(f"compressing at ranks {', '.join(map(str, ranks))}, with and without diagonal, "
             f"fine-tuning each for {finetune_steps} updates ...")
        sweep(out / "dense", out / "sweep", ranks=list(ranks), both_diag=True,
              overrides=[f"train.steps={finetune_steps}", "train.eval_every=100"], progress=False, echo=echo)
    finally:
        torch.set_num_threads(threads)
    rows = collect(out / "dense") + collect(out / "sweep")
    echo("")
    echo(format_report(rows))
    echo(f"total {time.perf_counter() - start:.0f}s; runs in {out}")
    return rows
