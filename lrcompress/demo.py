"""The main job on data every machine has: train a small dense GRU, compress it at several ranks
with and without the diagonal, fine-tune each, and report the metric against parameters.

``task="text"`` (the default) is the paper's Table 2 task at CPU size: a character-level GRU
language model on the English prose that ships inside CPython (``pydoc_data.topics``, about
465,000 characters, 103 symbols; see ``lrcompress.train.tasks_text``) or on the user's own
UTF-8 text, reported in bits per character. ``task="addition"`` is the addition task of the
paper's section 3.0.2, scaled down. Both run in a few minutes on a CPU and download nothing:

    >>> rows = run_demo("runs/demo")                                  # doctest: +SKIP
    >>> rows = run_demo("runs/demo-mine", text="my_novel.txt")        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, LRCompressError, OutputExistsError
from .train.recipe import apply_overrides, check_recipe
from .convert import compress
from .train.run import build, collect, format_report, plot, sweep, train_recipe
from .train.rundir import foreign_entry
from .train.tasks_text import DEFAULT_SOURCE, default_text, read_text, text_digest

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

# Character-level language modelling (paper section 3.0.4, Table 2) at CPU size: one-hot inputs
# as in appendix A.2, a GRU of 128 units, Adam, truncated backpropagation through windows of 100
# characters with the state carried across windows. 1,000 updates of 32 x 100 characters are
# about 8 passes over the default text; the rank-32 points keep half of the 3n^2 recurrent weights.
TEXT_RECIPE = {
    "meta": {"name": "demo-text-gru-128",
             "description": "lrcompress demo: character-level language model, GRU n = 128"},
    "task": {"name": "text", "text_file": "", "seq_len": 100},
    "model": {"cell": "gru", "hidden_size": 128, "embedding": "none"},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "steps": 1000, "eval_every": 200,
              "clip": "norm", "clip_value": 1.0, "device": "cpu", "seed": 0},
}
TEXT_RANKS = (4, 16, 32)


@dataclass(frozen=True)
class Demo:
    """One demo: its recipe and the defaults of ``run_demo``'s knobs."""

    recipe: dict
    steps: int  # updates of the dense model
    finetune_steps: int  # updates per compressed model
    ranks: tuple[int, ...]
    finetune_eval_every: int  # at most: a shorter fine-tuning evaluates at its end


DEMOS = {"text": Demo(TEXT_RECIPE, steps=1000, finetune_steps=150, ranks=TEXT_RANKS, finetune_eval_every=50),
         "addition": Demo(DEMO_RECIPE, steps=2000, finetune_steps=400, ranks=DEMO_RANKS, finetune_eval_every=100)}

# The demo writes this file into a folder it creates (or finds empty): a later demo run may
# then replace the runs and the plot it wrote there, and never touches a folder without it.
MARKER = ".lrcompress-demo"
RUNS = ("dense", "sweep")
PLOT = "demo.png"


def run_demo(out: str | os.PathLike = "runs/demo", *, task: str = "text", text: str | os.PathLike | None = None,
             steps: int | None = None, finetune_steps: int | None = None, ranks: tuple[int, ...] | None = None,
             overrides: list[str] | tuple[str, ...] = (), fresh: bool = True, progress: bool | None = None,
             echo=print) -> list[dict]:
    """Train the dense model, sweep ranks with and without diagonal, and return the report rows.

    ``task``: ``"text"`` (character-level language model on ``text``, a UTF-8 file, default
    CPython's ``pydoc_data.topics``; metric: test bits per character) or ``"addition"`` (metric:
    test mean squared error). ``steps``, ``finetune_steps`` and ``ranks`` default to the demo's
    (text: 1,000 / 150 / 4, 16, 32; addition: 2,000 / 400 / 2, 4, 8); ``overrides``
    (``"model.hidden_size=64"``) change the dense recipe, and so the fine-tuning too.

    The rows are ``lrcompress.train.run.collect``'s, the dense run first (parameters, metric
    ``after``). Besides the run folders, ``out/demo.png`` plots the metric against parameters
    when matplotlib is installed (``pip install 'lrcompress[plot]'``; else a note says so).

    ``out`` must be a new or empty folder, or one an earlier demo made (it holds the
    ``MARKER`` file): then, with ``fresh``, only the demo's own runs in it (``dense/``,
    ``sweep/``) and its plot are replaced; anything else in it is kept. Any other folder, or a
    file, raises ``OutputExistsError`` before anything is written or deleted. A bad ``task``,
    rank or step count raises ``ConfigError``; an unreadable ``text`` ``FileNotFoundError`` or
    ``FormatError``.
    """
    if task not in DEMOS:
        raise ConfigError(f"--task must be one of {', '.join(DEMOS)}, got {task!r}")
    if text is not None and task != "text":
        raise ConfigError(f"--text is for --task text, not --task {task}")
    demo = DEMOS[task]
    steps = demo.steps if steps is None else steps
    finetune_steps = demo.finetune_steps if finetune_steps is None else finetune_steps
    ranks = tuple(demo.ranks if ranks is None else ranks)
    for name, value in (("--steps", steps), ("--finetune-steps", finetune_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ConfigError(f"--ranks must be positive ints, got {ranks!r}")
    recipe = copy.deepcopy(demo.recipe)
    if task == "text":
        what = _use_text(recipe, text)
    # Every setting checked before any folder is touched: a bad file or override changes nothing.
    recipe = check_recipe(apply_overrides(recipe, [*overrides, f"train.steps={steps}"]))
    n = recipe["model"]["hidden_size"]
    out = Path(out)
    # Tiny matrices run faster on one thread than split across several.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_data_and_ranks(recipe, ranks)  # a second now rather than an error after the dense training
        prepare_folder(out, fresh=fresh)
        start = time.perf_counter()
        if task == "text":
            echo(f"training a dense character-level GRU language model (n={n}) on {what}, {steps} updates ...")
        else:
            echo(f"training a dense GRU (n={n}) on the addition task, {steps} updates ...")
        dense = train_recipe(recipe, out / "dense", progress=progress)
        metric = dense["metric"]
        echo(f"dense: {dense['params']:,} parameters, test {metric} {dense['test'][metric]:{_FORMATS[metric]}} "
             f"({dense['wall_time']:.0f}s)")  # fit's own measure, as the table below shows it
        echo(f"compressing at ranks {', '.join(map(str, ranks))}, with and without diagonal, "
             f"fine-tuning each for {finetune_steps} updates ...")
        eval_every = min(demo.finetune_eval_every, finetune_steps)
        sweep(out / "dense", out / "sweep", ranks=list(ranks), both_diag=True,
              overrides=[f"train.steps={finetune_steps}", f"train.eval_every={eval_every}"], progress=progress,
              echo=echo)
    finally:
        torch.set_num_threads(threads)
    rows = collect(out / "dense") + collect(out / "sweep")
    echo("")
    echo(format_report(rows))
    figure = _plot(rows, out / PLOT, echo)
    echo(f"total {time.perf_counter() - start:.0f}s; runs in {out}" + (f", plot {figure}" if figure else ""))
    return rows


_FORMATS = {"bpc": ".3f", "mse": ".2e"}


def check_data_and_ranks(recipe: dict, ranks: tuple[int, ...]) -> None:
    """Fail in a second what would otherwise fail after minutes of training: build the task
    and the dense model (reads and splits the text: ``ConfigError`` when a split is too short),
    cut every split into batches (too short for ``batch_size`` streams: ``ConfigError``), and
    compress a throwaway copy at the largest rank (``RankError`` naming the weight and the
    ranks it allows)."""
    task, model = build(recipe)
    size = recipe["train"]["batch_size"]
    for split in ("train", "valid", "test"):
        task.batches(split, size, seed=0, shuffle=False)
    with warnings.catch_warnings():  # "no smaller than dense" is the report's to say, after the sweep
        warnings.simplefilter("ignore")
        compress(model, max(ranks))  # the rank limits are the same with or without the diagonal


def _use_text(recipe: dict, text: str | os.PathLike | None) -> str:
    """Point the recipe's task at ``text`` (absolute, so the fine-tuning runs find it from any
    folder) and pin the text's digest, so a text changed mid-demo is refused, not misread.
    Returns a phrase naming the text for the narration."""
    if text is None:
        content, name = default_text(), f"CPython's {DEFAULT_SOURCE}"
    else:
        path = Path(text).expanduser().resolve()
        content, name = read_text(path), str(text)
        recipe["task"]["text_file"] = str(path)
    recipe["task"]["sha256"] = text_digest(content)
    return f"{name} ({len(content):,} characters, {len(set(content))} distinct)"


def _plot(rows: list[dict], path: Path, echo) -> Path | None:
    """The PNG of the rows, or None (and a note) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        echo(f"no plot: matplotlib is not installed (pip install 'lrcompress[plot]' draws {path})")
        return None
    return plot(rows, path, force=True)  # the demo's own folder (prepare_folder checked it)


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
    if (out / PLOT).is_dir() or (out / PLOT).is_symlink():
        raise OutputExistsError(f"{out / PLOT} is not the demo's plot; move it away first")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by `lrcompress demo`; a later demo run replaces dense/, sweep/ and "
                                  f"{PLOT} here\n")
        for run in replaced:
            shutil.rmtree(run)
    except OSError as exc:
        raise LRCompressError(f"cannot prepare demo folder {out}: {exc.strerror or exc}") from None
