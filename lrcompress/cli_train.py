"""The training commands of ``lrcompress``: train, finetune, sweep, report, evaluate.

Thin typer wrappers over ``lrcompress.train.run``; ``cli.py`` registers them. Under
``torchrun`` the same commands train on every process and only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import ConfigError
from .jsonout import dumps as _json  # --json: strict JSON, a NaN/Inf metric as null

Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Recipe override SECTION.KEY=VALUE, e.g. train.lr=1e-3 (repeatable).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Updates to run (sets train.steps).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Mini-batch size (sets train.batch_size).")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (sets train.device).")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
Recipe = Annotated[Optional[Path], typer.Option(
    "--recipe", help="Recipe building the model, when SOURCE is a weights file rather than a run directory.")]
Progress = Annotated[Optional[bool], typer.Option(
    "--progress/--no-progress", help="Progress bars on stderr (default: only on a terminal; lrcompress --quiet "
                                     "silences them).")]
Structure = Annotated[Optional[str], typer.Option(
    "--structure", help="lowrank (default), kronecker (--kron-factors, --terms), tt (--tt-ranks, --tt-shape, --joint) "
                        "or orthogonal (docs/structures.md).")]
KronFactors = Annotated[Optional[str], typer.Option(
    "--kron-factors", help="kronecker: square factor sizes AxB[xC...] (64x64: 64x64 kron 64x64) or block shapes "
                           "m1xn1,m2xn2.")]
Terms = Annotated[Optional[int], typer.Option("--terms", help="kronecker: Kronecker products summed (default 1).")]
TTRanks = Annotated[Optional[str], typer.Option(
    "--tt-ranks", help="tt: one TT-rank for every bond (8) or one per bond (4,8,4); capped to each bond's maximal "
                       "rank, with a note.")]
TTShape = Annotated[Optional[str], typer.Option(
    "--tt-shape", help="tt: mode sizes m1xm2x... (8x8x8x8 for 4096x4096 blocks) or pairs m1xn1,m2xn2,...")]
Joint = Annotated[bool, typer.Option(
    "--joint", help="tt: one tensor train for all gate blocks of a weight (the fully tensorized RNN).")]
Negatives = Annotated[Optional[int], typer.Option(
    "--negatives", help="orthogonal: -1 entries of the scaling diagonal D (scoRNN's rho).")]
TensorBoard = Annotated[Optional[Path], typer.Option(
    "--tensorboard", help="Also log train loss, lr and metrics to TensorBoard event files in this folder "
                          "(needs: pip install 'lrcompress[tensorboard]').")]


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (see recipes/).")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Run directory (default: runs/<recipe name>).")] = None,
    sets: Sets = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    device: Device = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    progress: Progress = None,
    tensorboard: TensorBoard = None,
    as_json: Json = False,
) -> None:
    """Train the model of a recipe; writes a run directory (recipe, metrics, checkpoints, model)."""
    from .train.run import train_recipe

    overrides = _overrides(sets, steps=steps, batch_size=batch_size, device=device)
    with stdout_to_stderr(as_json):
        summary = train_recipe(recipe, out, overrides=overrides, resume=resume, progress=progress,
                               tensorboard=tensorboard)
    _report_run(summary, as_json, _resume_command())


def finetune(
    source: Annotated[Path, typer.Argument(help="A run directory (or a weights file with --recipe).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory of the fine-tuned model.")],
    rank: Annotated[Optional[str], typer.Option(
        "--rank", "-r", help="Rank: an int, a fraction of full rank, or energy=F.")] = None,
    energy: Annotated[Optional[float], typer.Option(
        help="Per matrix, the smallest rank keeping this share of energy.")] = None,
    diag: Annotated[bool, typer.Option("--diag", help="Low-rank plus diagonal.")] = False,
    tied: Annotated[bool, typer.Option("--tied", help="Share one R factor across the gates of a weight.")] = False,
    recipe: Recipe = None,
    sets: Sets = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    device: Device = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fine-tuning in --out.")] = False,
    progress: Progress = None,
    tensorboard: TensorBoard = None,
    as_json: Json = False,
    structure: Structure = None,
    kron_factors: KronFactors = None,
    terms: Terms = None,
    tt_ranks: TTRanks = None,
    tt_shape: TTShape = None,
    joint: Joint = False,
    negatives: Negatives = None,
) -> None:
    """Convert a trained model, evaluate it, fine-tune it with its recipe, evaluate again."""
    from .structures import cli_options
    from .train.run import finetune as run_finetune

    overrides = _overrides(sets, steps=steps, batch_size=batch_size, device=device)
    options = cli_options(structure, kron_factors=kron_factors, terms=terms, tt_ranks=tt_ranks, tt_shape=tt_shape,
                          joint=joint, negatives=negatives)
    with stdout_to_stderr(as_json):
        summary = run_finetune(source, out, rank=_rank(rank), energy=energy, diag=diag, tied=tied, recipe=recipe,
                               overrides=overrides, resume=resume, progress=progress, tensorboard=tensorboard,
                               **options)
    _report_run(summary, as_json, _resume_command())


def sweep(
    source: Annotated[Path, typer.Argument(help="A run directory (or a weights file with --recipe).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep directory: one run directory per point.")],
    ranks: Annotated[str, typer.Option("--ranks", help="Comma list of ranks, e.g. 4,8,16,24,48.")],
    diag: Annotated[bool, typer.Option("--diag", help="Low-rank plus diagonal.")] = False,
    both_diag: Annotated[bool, typer.Option("--both-diag", help="Every rank with and without the diagonal.")] = False,
    tied: Annotated[bool, typer.Option("--tied", help="Share one R factor across the gates of a weight.")] = False,
    recipe: Recipe = None,
    sets: Sets = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    device: Device = None,
    progress: Progress = None,
    tensorboard: Annotated[Optional[Path], typer.Option(
        "--tensorboard", help="Also log each point to TensorBoard, in DIR/<point name> (needs: pip install "
                              "'lrcompress[tensorboard]').")] = None,
    as_json: Json = False,
    structure: Annotated[Optional[str], typer.Option(
        "--structure", help="lowrank (default: --ranks are ranks), tt (--ranks are TT-ranks; --tt-shape) or "
                            "kronecker (--ranks are numbers of terms; --kron-factors).")] = None,
    kron_factors: KronFactors = None,
    tt_shape: TTShape = None,
    joint: Joint = False,
) -> None:
    """Fine-tune at each rank; resumable (finished points are reused only if made with the same options,
    overrides and steps, else exit 2). Then: lrcompress report OUT."""
    from .config import int_list
    from .structures import cli_options
    from .train.run import sweep as run_sweep

    overrides = _overrides(sets, steps=steps, batch_size=batch_size, device=device)
    options = cli_options(structure, kron_factors=kron_factors, tt_shape=tt_shape, joint=joint)
    # With --json, stdout carries only the final document: the per-point lines go to stderr.
    echo = _echo_err if as_json else _echo
    with stdout_to_stderr(as_json):
        points = run_sweep(source, out, ranks=int_list(ranks, "--ranks"), diag=diag, both_diag=both_diag, tied=tied,
                           recipe=recipe, overrides=overrides, progress=progress, echo=echo, tensorboard=tensorboard,
                           **options)
    if points and points[-1].get("stopped") == "interrupted":
        echo(f"interrupted; run the same command again to continue the sweep in {out}")
        sys.exit(130)  # typer.Exit codes are lost by cli.main (standalone_mode=False)
    if as_json:
        _echo(_json({"out": str(out), "points": points}))
    else:
        _echo(f"{len(points)} points in {out}; table: lrcompress report {out}")
    unsound = [p.get("run_dir") for p in points if p.get("warnings")]
    if unsound:  # every point ran; the exit code still tells a script that some did not end well
        _echo_err(f"{len(unsound)} point(s) diverged or ended with NaN/Inf metrics: {', '.join(map(str, unsound))}")
        sys.exit(UNSOUND_EXIT)


def report(
    path: Annotated[Path, typer.Argument(help="A sweep directory or a run directory.")],
    as_json: Json = False,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the table as CSV here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Also draw parameters vs. metric, the dense model as a point (PNG; needs matplotlib).")] = None,
    curves: Annotated[Optional[Path], typer.Option(
        "--curves", help="Also draw learning curves of the runs, --metric per update (PNG; needs matplotlib).")] = None,
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="Metric of --curves: a validation metric (mse, ce, bpc, accuracy, ...), train_loss or lr "
                         "(default: the runs' headline metric).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", "-f", help="Overwrite existing --csv / --plot / --curves files.")] = False,
) -> None:
    """Parameters, compression ratio, metric before/after fine-tuning and wall time, per run."""
    from .train import run

    rows = run.collect(path)
    if metric is not None and curves is None:
        raise ConfigError("--metric chooses what --curves draws; add --curves FILE.png")
    outputs = {"--csv": csv, "--plot": plot, "--curves": curves}
    named = [(flag, p) for flag, p in outputs.items() if p is not None]
    for i, (flag, p) in enumerate(named):  # every output checked before any is written: no half-done report
        for other, q in named[i + 1:]:
            if p.resolve() == q.resolve():
                raise ConfigError(f"{flag} and {other} both name {p}; give separate files")
        run.check_report_output(p, force)
    # Figures are drawn before anything is written: an unknown --metric, or nothing to plot,
    # then leaves no CSV behind.
    figures = {}
    if plot is not None or curves is not None:
        from .train import plots
    if plot is not None:
        figures[plot] = plots.sweep_figure(rows)
    if curves is not None:
        figures[curves] = run.curves_figure(path, metric)
    if csv is not None:
        run.write_csv(rows, csv, force=force)
    for target, figure in figures.items():
        plots.save_figure(figure, target, force=force)
    typer.echo(_json(rows) if as_json else run.format_report(rows))
    pending = run.unfinished(path)
    if pending:  # on stderr: --json stays one document
        _echo_err(f"not shown, not finished yet (no summary.json): {', '.join(pending)}")
    if not as_json:
        for _, written in named:
            typer.echo(f"wrote {written}")


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished language-model run directory (task ptb_char or text).")],
    dynamic: Annotated[bool, typer.Option(
        "--dynamic", help="Also dynamic evaluation: a gradient step on each segment after scoring it "
                          "(Krause et al. 2018; docs/dynamic.md).")] = False,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="Step size of the dynamic updates (default: sgd 0.01, rms 3e-5).")] = None,
    decay: Annotated[Optional[float], typer.Option(
        "--decay", help="Pull toward the trained weights per step, in [0, 1], rms: scaled per weight "
                        "(default: sgd 0, rms 0.001).")] = None,
    segment: Annotated[Optional[int], typer.Option(
        "--segment", help="Symbols scored per dynamic step (default 50).")] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="sgd (default), or rms: steps scaled by training-set gradient statistics.")] = None,
    split: Annotated[str, typer.Option("--split", help="train, valid or test.")] = "test",
    symbols: Annotated[Optional[int], typer.Option(
        "--symbols", help="Only the first N predictions of the split (a quick look).")] = None,
    grad_batches: Annotated[Optional[int], typer.Option(
        "--grad-batches", help="Training batches for --method rms's gradient statistics (default 100).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto (default), cpu or cuda.")] = None,
    progress: Progress = None,
    as_json: Json = False,
) -> None:
    """Bits per character of a language-model run on a split, static and (--dynamic) dynamic side by side."""
    from .train.dynamic import check_settings, evaluate_run, format_evaluation

    flags = {"--lr": lr, "--decay": decay, "--method": method, "--grad-batches": grad_batches, "--segment": segment}
    given = [flag for flag, value in flags.items() if value is not None]
    if given and not dynamic:
        check_settings(lr=lr, decay=decay, segment=segment, method=method)  # a bad value is named as such first
        one = len(given) == 1
        raise ConfigError(f"{', '.join(given)} set{'s' if one else ''} the dynamic steps: add --dynamic, or drop "
                          f"{'it' if one else 'them'}")
    result = evaluate_run(run_dir, dynamic=dynamic, lr=lr, decay=decay, segment=segment, method=method,
                          split=split, symbols=symbols, grad_batches=grad_batches, device=device or "auto",
                          progress=progress)
    _echo(_json(result) if as_json else format_evaluation(result))
    if not all(math.isfinite(v) for v in result["static"].values() if isinstance(v, float)):
        _echo_err("warning: the static evaluation is not finite (NaN/Inf): the model's outputs are not usable")
        sys.exit(UNSOUND_EXIT)  # as train/finetune do for a diverged run; a dynamic divergence alone is noted only


@contextlib.contextmanager
def stdout_to_stderr(active: bool):
    """While ``active`` (``--json``), send what a run prints on stdout to stderr instead.

    The training loop writes a line per evaluation with ``tqdm.write`` (stdout); under
    ``--json`` stdout must hold the one JSON document printed after the run, and nothing else.
    """
    if not active:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _overrides(sets: Optional[list[str]], **flags) -> list[str]:
    out = list(sets or ())
    for key, value in flags.items():
        if value is not None:
            out.append(f"train.{key}={json.dumps(value)}")
    return out


def _rank(text: Optional[str]):
    """``"24"`` -> 24, ``"0.25"`` -> 0.25, ``"energy=0.9"`` stays text (checked by the converter)."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return text


def _resume_command() -> str:
    """This very command with ``--resume``: the same recipe, options and ``--set`` overrides are
    what a resume must name again (``run._own_recipe`` refuses anything else)."""
    argv = ["lrcompress", *sys.argv[1:]]
    return shlex.join(argv if "--resume" in argv else [*argv, "--resume"])


def _report_run(summary: dict, as_json: bool, resume_command: str) -> None:
    """The run summary as one JSON document (``--json``) or one line of text; exit 130 if interrupted."""
    if summary["stopped"] == "interrupted":  # no JSON document then: exit 130 and a note on stderr
        (_echo_err if as_json else _echo)(f"interrupted at update {summary['steps']}; continue with: {resume_command}")
        sys.exit(130)  # typer.Exit codes are lost by cli.main (standalone_mode=False)
    if as_json:
        _echo(_json(summary))
        _exit_if_unsound(summary)
        return
    metric = summary["metric"]
    parts = [f"{summary['run_dir']}: {summary['steps']} updates ({summary['stopped']}), {summary['wall_time']:.0f}s"]
    if summary.get("converted"):
        split = "test" if summary.get("test") else "val"
        parts.append(f"{split} {metric}: dense {_fmt(summary['dense'][split].get(metric), metric)}, converted "
                     f"{_fmt(summary['converted'][split].get(metric), metric)}, fine-tuned "
                     f"{_fmt(summary[split].get(metric), metric)}; params {summary['params_dense']:,} -> "
                     f"{summary['params']:,} ({summary['ratio']:.2f}x smaller)")
        if metric != "accuracy" and "accuracy" in summary[split]:  # e.g. selected on CE: the paper's %
            parts.append(f"{split} accuracy: dense {_fmt(summary['dense'][split].get('accuracy'), 'accuracy')}, "
                         f"converted {_fmt(summary['converted'][split].get('accuracy'), 'accuracy')}, fine-tuned "
                         f"{_fmt(summary[split]['accuracy'], 'accuracy')}")
    else:
        for split in ("val", "test"):
            if summary.get(split):
                text = f"{split} {metric} {_fmt(summary[split].get(metric), metric)}"
                if metric != "accuracy" and "accuracy" in summary[split]:  # e.g. selected on CE: the paper's %
                    text += f" (accuracy {_fmt(summary[split]['accuracy'], 'accuracy')})"
                parts.append(text)
        parts.append(f"params {summary['params']:,}")
    if summary.get("nan_events"):
        parts.append(f"{summary['nan_events']} non-finite gradient(s) recovered")
    _echo("; ".join(parts))
    _exit_if_unsound(summary)


UNSOUND_EXIT = 3  # the run finished, but diverged or ended with NaN/Inf metrics (docs/training.md)


def _exit_if_unsound(summary: dict) -> None:
    """Exit with ``UNSOUND_EXIT`` when the run's summary carries warnings (``FitResult.warnings``,
    already shown on stderr as they arose): a script must not take a diverged run for a result."""
    if summary.get("warnings"):
        sys.exit(UNSOUND_EXIT)  # typer.Exit codes are lost by cli.main (standalone_mode=False)


def _fmt(x, metric: str | None = None) -> str:
    from .report import format_metric  # here: --help must not import torch (report imports config)

    return format_metric(metric, x)  # accuracies as percentages


def _echo(text: str, err: bool = False) -> None:
    """Print on the main process only (under torchrun every process runs the command)."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(text, err=err)


def _echo_err(text: str) -> None:
    _echo(text, err=True)
