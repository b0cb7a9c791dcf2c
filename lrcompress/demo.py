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

from .errors import LRCompressError, OutputExistsError
from .train.run import collect, format_report, sweep, train_recipe
from .train.rundir import foreign_entry

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
# The demo writes this file into a folder it creates (or finds empty): a later demo run may
# then replace the runs it wrote there, and never touches a folder without it.
MARKER = ".lrcompress-demo"
RUNS = ("dense", "sweep")


def run_demo(out: str | os.PathLike = "runs/demo", *, steps: int = 2000, finetune_steps: int = 400,
             ranks: tuple[int, ...] = DEMO_RANKS, fresh: bool = True, echo=print) -> list[dict]:
    """Train the dense model, sweep ranks with and without diagonal, and return the report rows.

    ``out`` must be a new or empty folder, or one an earlier demo made (it holds the
    ``MARKER`` file): then, with ``fresh``, only the demo's own runs in it (``dense/``,
    ``sweep/``) are replaced; anything else in it is kept. Any other folder, or a file, raises
    ``OutputExistsError`` before anything is written or deleted.
    """
    out = Path(out)
    prepare_folder(out, fresh=fresh)
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


def prepare_folder(out: Path, *, fresh: bool = True) -> None:
    """Make ``out`` ready for the demo without deleting anything the demo did not write.

    New or empty folder: created and marked. Marked folder: with ``fresh``, its ``dense/`` and
    ``sweep/`` runs are removed. A file, or a non-empty folder without the marker (``--out .``,
    a home directory, someone's project): ``OutputExistsError``.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; the demo needs a folder")
    if out.is_dir() and not (out / MARKER).is_file():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise OutputExistsError(f"--out {out} is a folder the demo did not make and holds {len(entries)} "
                                    f"entries (e.g. {entries[0]!r}); choose a new or empty folder")
    # Every check before any change: a run folder is replaced only if it holds nothing but what
    # lrcompress writes there (a user's notes or fine-tuned model inside it are never deleted).
    replaced = []
    for name in RUNS if fresh else ():
        run = out / name
        if run.exists() or run.is_symlink():
            foreign = foreign_entry(run)
            if foreign is not None:
                what = "it is not a run folder lrcompress wrote" if foreign == run else f"it holds {foreign}"
                raise OutputExistsError(f"{run} cannot be replaced: {what}; move it away first")
            replaced.append(run)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by `lrcompress demo`; a later demo run replaces dense/ and sweep/ here\n")
        for run in replaced:
            shutil.rmtree(run)
    except OSError as exc:
        raise LRCompressError(f"cannot prepare demo folder {out}: {exc.strerror or exc}") from None

