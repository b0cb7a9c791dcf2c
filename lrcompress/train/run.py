"""Runs: train a recipe, fine-tune a converted model, sweep ranks, and report the results.

A run directory holds ``recipe.toml`` (the resolved recipe), ``metrics.jsonl`` (one line per
evaluation), ``last.safetensors`` (everything needed to resume), ``best.safetensors`` (best
validation weights), ``model.safetensors`` (the final model, in the ``lrcompress.save_model``
format: ``load_model(skeleton, path)`` reads it) and ``summary.json``. A fine-tuning run adds
``finetune.json``: the source, the conversion and the metrics before fine-tuning.

    >>> train_recipe("recipes/addition-gru-small.toml", "runs/add", overrides=["train.steps=200"])  # doctest: +SKIP
    >>> finetune("runs/add", "runs/add-r4", rank=4, diag=True)                                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import CompressionConfig
from ..convert import compress, count_params
from ..errors import ConfigError, FormatError, LRCompressError, OutputExistsError
from ..io import load_model, read_safetensors, save_model, write_text_atomic
from ..validate import check_compressed, load_json
from .checkpoint import load_checkpoint
from ..report import format_metric, format_table
from .engine import FitResult, TrainConfig, evaluate, fit, write_json
from .models import build_model
from .rundir import check_run_dir, claim_run_dir
from .recipe import apply_overrides, check_recipe, dump_recipe, load_recipe
from .stabilisers import remove_weight_norm
from ..structures import json_options
from .tasks import build_task
from .tensorboard import require as require_tensorboard
from ..progress import bar as progress_bar

MODEL_FILE, RECIPE_FILE, SUMMARY_FILE = "model.safetensors", "recipe.toml", "summary.json"
FINETUNE_FILE = "finetune.json"


def train_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike | None = None, *,
                 overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
                 progress: bool | None = None, tensorboard: str | os.PathLike | None = None) -> dict:
    """Train the model of a recipe (a path or a recipe dict) into run directory ``out``.

    With ``resume`` and an existing run in ``out``, the run's own ``recipe.toml`` is used
    (``overrides`` still apply, e.g. more steps). Returns the summary (also in summary.json).
    ``progress``: bars on stderr (``None``: on a terminal); ``tensorboard``: a folder for
    TensorBoard event files (``fit``'s argument).
    """
    if tensorboard is not None:
        require_tensorboard()
    recipe = _recipe(recipe, overrides)
    out = Path(out) if out is not None else Path("runs") / (recipe["meta"]["name"] or "run")
    _check_out(out, resume)
    if resume:
        recipe = _own_recipe(out, recipe, overrides)
    task, model = build(recipe)
    task.check_batch_size(recipe["train"]["batch_size"])  # training only: before any work
    text = dump_recipe(recipe)

    def start() -> None:  # once the model, optimiser and (resuming) checkpoint are in place: a refusal writes nothing
        _claim(out)
        _write_text(out / RECIPE_FILE, text)

    extra = {"kind": "train", "recipe": recipe["meta"]["name"], "params": count_params(model)}
    result = _fit(model, task, recipe, out, resume=resume, progress=progress, summary=extra, tensorboard=tensorboard,
                  on_start=start)
    return _finish(model, result, out, extra)


def finetune(source: str | os.PathLike, out: str | os.PathLike, *, rank=None, energy: float | None = None,
             diag: bool = False, tied: bool = False, recipe: str | os.PathLike | None = None,
             overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
             progress: bool | None = None, tensorboard: str | os.PathLike | None = None,
             structure: str = "lowrank", **structure_options) -> dict:
    """Convert a trained model at ``rank`` (or ``energy``), evaluate it, fine-tune it, evaluate again.

    ``structure`` other than ``"lowrank"`` converts to that structure instead, with its options
    as ``compress`` takes them (``kron_factors=(16, 16)``, ``tt_ranks=8, tt_shape=...``, ...); the
    summary records ``structure`` and ``options``.

    ``source`` is a run directory (its ``recipe.toml`` and ``model.safetensors``), or a state
    dict file with ``recipe`` naming the recipe that builds its model. The fine-tuning follows
    the recipe's ``[train]`` section with ``overrides`` (e.g. ``train.steps=2000``). The summary
    holds the metrics of the dense model, of the converted one before fine-tuning, and after.
    ``progress`` and ``tensorboard`` as in ``train_recipe``.
    """
    if tensorboard is not None:
        require_tensorboard()
    source, out = Path(source), Path(out)
    _check_apart(source, out)
    _check_out(out, resume)
    weights, base = _source(source, recipe)
    if resume:  # first: a point converted from another model would fail every later check less clearly
        _check_same_source(out, weights, "fine-tune into another --out")
    recipe = _recipe(base, overrides)
    if resume:  # the run's own recipe, as train_recipe
        recipe = _own_recipe(out, recipe, overrides)
    _check_dense(source, recipe["model"], "finetune")
    if isinstance(rank, str) and rank.replace(" ", "").startswith("energy="):  # --rank energy=F: an energy
        if energy is not None:
            raise ConfigError(f"give exactly one of rank and energy, got --rank {rank} and --energy {energy}")
        rank, energy = None, _energy_value(rank)
    config = CompressionConfig(rank=rank, energy=energy, diag=diag, tied=tied, structure=structure,
                               **structure_options)  # refuses a rank and an energy both given
    if resume:  # the run continued must be this conversion, not another one made into the same folder
        _check_point(out, _definition(rank, energy, diag, tied, config), None, "fine-tune into another --out")
    task, model = build(recipe)
    task.check_batch_size(recipe["train"]["batch_size"])  # training only: before any work
    load_model(model, weights)
    state = _read_json(out / FINETUNE_FILE) if resume and (out / "last.safetensors").is_file() else None
    eval_data = _eval_data(task, recipe)
    if state is None:
        state = {"source": str(source), "weights": str(weights), "rank": rank, "energy": energy, "diag": diag,
                 "tied": tied, **_structure_record(config), "dense": _metrics(model, task, eval_data, progress)}
    conversion = compress(model, config=config, progress=progress)
    if "converted" not in state:
        state["converted"] = _metrics(model, task, eval_data, progress)
        state["conversion"] = conversion.to_dict()
    text = dump_recipe(recipe)

    def start() -> None:  # as in train_recipe: nothing written before the run really starts
        _claim(out)
        _write_text(out / RECIPE_FILE, text)
        _save_json(out / FINETUNE_FILE, state)

    extra = {"kind": "finetune", "recipe": recipe["meta"]["name"], "source": str(source), "rank": rank,
             "energy": energy, "diag": diag, "tied": tied, **_structure_record(config),
             **_ranks_used(conversion, rank), "params_dense": conversion.params_before,
             "params": conversion.params_after, "ratio": conversion.ratio, "dense": state["dense"],
             "converted": state["converted"]}
    result = _fit(model, task, recipe, out, resume=resume, progress=progress, summary=extra, tensorboard=tensorboard,
                  on_start=start)
    return _finish(model, result, out, extra)


def sweep(source: str | os.PathLike, out: str | os.PathLike, *, ranks: list[int], diag: bool = False,
          both_diag: bool = False, tied: bool = False, recipe: str | os.PathLike | None = None,
          overrides: list[str] | tuple[str, ...] = (), progress: bool | None = None, echo=print,
          tensorboard: str | os.PathLike | None = None, structure: str = "lowrank", **structure_options) -> list[dict]:
    """``finetune`` at every rank (with and without diagonal when ``both_diag``), one run
    directory per point under ``out``. Resumable: finished points are skipped, an interrupted
    one continues, but only when made as asked now (structure, options, rank, diag, tied, the
    recipe with ``overrides``); a point made otherwise, or another structure's point in ``out``,
    raises ``ConfigError`` naming the point and the option before anything runs. ``echo`` gets one line per point; a bar counts the points ("point 3 of 8").
    With ``tensorboard``, each point logs to ``tensorboard/<point name>``. Returns the points'
    summaries.

    ``structure``: ``"tt"`` sweeps the TT-rank (``tt_ranks``), ``"kronecker"`` the number of
    Kronecker ``terms``, each point with the other ``structure_options`` (``tt_shape``,
    ``kron_factors``, ...); every point is checked against the model before the first trains."""
    if tensorboard is not None:
        require_tensorboard()
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ConfigError(f"ranks must be positive ints, got {ranks!r}")
    repeated = sorted({r for r in ranks if list(ranks).count(r) > 1})
    if repeated:  # one run directory per rank: a repeat would run once but be counted (and reported) twice
        raise ConfigError(f"ranks {','.join(map(str, ranks))} list {', '.join(map(str, repeated))} more than once; "
                          "give each rank once")
    if diag and both_diag:
        raise ConfigError("diag (--diag) and both_diag (--both-diag) are alternatives: both_diag already runs "
                          "every rank with the diagonal and without it; give one")
    if structure != "lowrank":
        if structure not in SWEPT:
            raise ConfigError(f"structure {structure!r} has no size to sweep (a sweep varies low-rank ranks, "
                              f"TT-ranks or Kronecker terms): use finetune")
        if diag or both_diag or tied:
            raise ConfigError("diag, both_diag and tied are low-rank options; a structure sweep takes none of them")
        if SWEPT[structure] in structure_options:
            raise ConfigError(f"{SWEPT[structure]} is what the sweep varies (ranks=...); leave it out")
    out = Path(out)
    _check_apart(Path(source), Path(out))
    _check_out(out, resume=True, sweep=True)
    _check_source(Path(source), recipe, overrides)  # a bad source: one error, and no sweep.json left behind
    if structure == "lowrank":
        _check_ranks(Path(source), recipe, overrides, ranks, tied)  # before the first point trains, not after it
    else:
        _check_structure_points(Path(source), recipe, overrides, ranks, structure, structure_options)
    _check_points(out, Path(source), recipe, overrides, ranks, diag, both_diag, tied, structure, structure_options)
    for rank in ranks:  # every point's folder, before the first point trains (a user's file or folder there)
        for d in ((False, True) if both_diag else (diag,)):
            _check_out(out / point_name(rank, d, tied, structure), resume=True)
    _claim(out)
    record = {} if structure == "lowrank" else {"structure": structure, "options": dict(structure_options)}
    _save_json(out / "sweep.json", {"source": str(source), "ranks": list(ranks), "diag": diag,
                                     "both_diag": both_diag, "tied": tied, **record, "overrides": list(overrides)})
    plan = [(r, d) for r in ranks for d in ((False, True) if both_diag else (diag,))]
    points = []
    with progress_bar(total=len(plan), progress=progress, desc="sweep", unit="point") as bar:
        for i, (rank, d) in enumerate(plan, 1):
            where = out / point_name(rank, d, tied, structure)
            bar.set_description(f"point {i} of {len(plan)} ({where.name})")
            summary = _read_json(where / SUMMARY_FILE)
            if summary is not None and summary.get("stopped") != "interrupted":
                echo(f"{where.name}: done earlier, skipped; " + point_line(summary))
            else:
                board = None if tensorboard is None else Path(tensorboard) / where.name
                size = {"rank": rank} if structure == "lowrank" else {SWEPT[structure]: rank}
                summary = finetune(source, where, diag=d, tied=tied, recipe=recipe, overrides=overrides,
                                   resume=True, progress=progress, tensorboard=board, structure=structure,
                                   **structure_options, **size)
                echo(f"{where.name}: " + point_line(summary))
            points.append(summary)
            bar.update(1)
            if summary.get("stopped") == "interrupted":
                break
    return points


# What a sweep varies for each structure: the low-rank rank, the TT-rank, the Kronecker terms.
SWEPT = {"tt": "tt_ranks", "kronecker": "terms"}


def point_name(rank: int, diag: bool, tied: bool = False, structure: str = "lowrank") -> str:
    if structure != "lowrank":
        return {"tt": f"tt-rank{rank}", "kronecker": f"kronecker-terms{rank}"}[structure]
    return f"rank{rank}" + ("-diag" if diag else "") + ("-tied" if tied else "")


def _structure_record(config) -> dict:
    """A conversion's structure and its options (as ``compress`` takes them) for a run's summary;
    nothing extra for low rank."""
    from ..structures import get, json_options

    if config.structure == "lowrank":
        return {}
    fields = get(config.structure).field_names
    given = {f: getattr(config, f) for f in fields if getattr(config, f) not in (None, False)}
    return {"structure": config.structure, "options": json_options(given)}


def _energy_value(text: str) -> float:
    """``"energy=0.9"`` -> 0.9 (``ConfigError`` naming the text when it is not a number)."""
    try:
        return float(text.split("=", 1)[1])
    except ValueError:
        raise ConfigError(f"--rank {text}: energy=F needs a number F in (0, 1]") from None


def _ranks_used(conversion, asked) -> dict:
    """The rank a low-rank conversion used, for the summary and ``report``: the one rank every
    target got (``--rank 0.5`` or an energy resolved per matrix), with the rank as asked beside it
    when that differs; ``None`` and the per-target ranks when the targets differ."""
    ranks = [t.rank for t in conversion.targets if t.structure == "lowrank"]
    if not ranks:
        return {}
    used = ranks[0] if len(set(ranks)) == 1 else None
    out = {"rank": used}
    if used != asked:
        out["rank_asked"] = asked
    if used is None:
        out["ranks"] = {t.name: t.rank for t in conversion.targets if t.structure == "lowrank"}
    return out


def _definition(rank, energy, diag, tied, config) -> dict:
    """What defines a converted point, flat (``option tt_shape``: one structure option), in the
    JSON form ``finetune.json`` holds it: a point is reused only when all of it matches."""
    record = _structure_record(config)
    flat = {"structure": record.get("structure", "lowrank"), "rank": rank, "energy": energy, "diag": bool(diag),
            "tied": bool(tied)}
    flat.update({f"option {k}": v for k, v in record.get("options", {}).items()})
    return json_options(flat)


def _started(where: Path) -> bool:
    """Whether a run in ``where`` got as far as a checkpoint or a summary. A start refused at its
    first update (``train.lr = 1e38``, a device torch cannot see) leaves only its recipe and
    conversion record: nothing to resume, so the next command starts it afresh as asked then."""
    return (where / "last.safetensors").is_file() or (where / SUMMARY_FILE).is_file()


def _made_with(where: Path) -> dict | None:
    """``_definition`` of the point an earlier command made in ``where`` (None: nothing made yet)."""
    if not _started(where):
        return None
    state = _read_json(where / FINETUNE_FILE) or _read_json(where / SUMMARY_FILE)
    if state is None:
        return None
    options = state.get("options") if isinstance(state.get("options"), dict) else {}
    flat = {"structure": state.get("structure") or "lowrank", "rank": state.get("rank"),
            "energy": state.get("energy"), "diag": bool(state.get("diag")), "tied": bool(state.get("tied"))}
    flat.update({f"option {k}": v for k, v in options.items()})
    return flat


# Recipe keys that say how a run is executed, not what it computes: a point may be resumed or
# reused on another device or execution path.
HOW_NOT_WHAT = ("meta.", "train.device", "train.execution")


def _flat_recipe(recipe: dict) -> dict:
    flat = {f"{section}.{key}": value for section, table in recipe.items() if isinstance(table, dict)
            for key, value in table.items()}
    return {k: v for k, v in json_options(flat).items() if not k.startswith(HOW_NOT_WHAT)}


def _check_point(where: Path, wanted: dict, recipe: dict | None, hint: str, vary: tuple[str, ...] = ()) -> None:
    """Refuse (``ConfigError``, one line) to reuse or resume the point in ``where`` when what made
    it (structure, options, rank, diag, tied; with ``recipe``, the resolved recipe: overrides,
    steps) differs from ``wanted``; keys in ``vary`` may differ (the size a sweep varies)."""
    have = _made_with(where)
    if have is None:
        return
    if recipe is not None and (where / RECIPE_FILE).is_file():
        try:
            have.update(_flat_recipe(load_recipe(where / RECIPE_FILE)))
            wanted = {**wanted, **_flat_recipe(recipe)}
        except (OSError, LRCompressError):
            pass  # a damaged recipe.toml: resuming the point reports it
    for key in sorted(set(have) | set(wanted), key=_key_order):
        if key in vary or key.startswith(tuple(v + " " for v in vary)):
            continue
        if have.get(key) != wanted.get(key):
            name = "--" + key[7:].replace("_", "-") if key.startswith("option ") else key
            raise ConfigError(f"{where} was made with {name} = {_show(have.get(key))}, not {_show(wanted.get(key))} "
                              f"as asked now; {hint}")


def _check_same_source(where: Path, weights: Path, hint: str) -> None:
    """Refuse to resume or reuse the converted point in ``where`` when it was converted from
    another weights file: its stored dense and converted metrics are that model's."""
    if not _started(where):
        return
    state = _read_json(where / FINETUNE_FILE)
    made = state.get("weights") if isinstance(state, dict) else None
    if isinstance(made, str) and Path(made).resolve() != Path(weights).resolve():
        raise ConfigError(f"{where} was converted from {made}, not {weights} as asked now; {hint}")


def _key_order(key: str) -> tuple:
    """Structure first (its options differ with it), then its options, rank, diag, tied, energy, recipe keys."""
    first = ("structure", "option", "rank", "diag", "tied", "energy")
    head = key.split(" ")[0]
    return (first.index(head) if head in first else len(first), key)


def _show(value) -> str:
    return "(not set)" if value is None else json.dumps(value)


def _check_points(out: Path, source: Path, recipe, overrides, ranks, diag, both_diag, tied, structure,
                  options) -> None:
    """Before a sweep into an existing folder: every point already there must have been made like
    this sweep makes its points (the report tables them together), and a point the sweep would
    reuse must match in everything, its size included."""
    if not out.is_dir():
        return
    weights, base = _source(source, recipe)
    resolved = _recipe(base, overrides)
    hint = "sweep into another --out"
    planned = {}
    for rank in ranks:
        for d in ((False, True) if both_diag else (diag,)):
            size = {"rank": rank} if structure == "lowrank" else {SWEPT[structure]: rank}
            config = CompressionConfig(structure=structure, diag=d, tied=tied, **options, **size)
            planned[point_name(rank, d, tied, structure)] = _definition(size.get("rank"), None, d, tied, config)
    any_point = next(iter(planned.values()))
    vary = ("rank", "diag") if structure == "lowrank" else ("option " + SWEPT[structure],)
    for where in sorted(p for p in out.iterdir() if p.is_dir()):
        _check_same_source(where, weights, hint)
        if where.name in planned:
            _check_point(where, planned[where.name], resolved, hint)
        else:
            _check_point(where, any_point, resolved, hint, vary=vary)


def _check_dense(source, model: dict, command: str) -> None:
    """``finetune``/``sweep`` convert dense models: not one trained low-rank or structured."""
    if model["rank"]:
        raise ConfigError(f"{source} holds a model trained low-rank (model.rank = {model['rank']}); "
                          f"{command} converts dense models")
    if model.get("structure") not in (None, "lowrank"):
        raise ConfigError(f"{source} holds a model trained with structure {model['structure']!r}; "
                          f"{command} converts dense models")


def point_line(summary: dict) -> str:
    metric, split = summary["metric"], "test" if summary.get("test") else "val"
    before = summary.get("converted", {}).get(split, {}).get(metric)
    after = summary.get(split, {}).get(metric)
    line = (f"params {summary['params']:,} ({summary.get('ratio', 1.0):.2f}x smaller), {split} {metric} "
            f"{_fmt(before, metric)} -> {_fmt(after, metric)}")
    if metric != "accuracy" and "accuracy" in summary.get(split, {}):  # selected on CE: the paper's accuracy too
        line += (f" (accuracy {_fmt(summary.get('converted', {}).get(split, {}).get('accuracy'), 'accuracy')} -> "
                 f"{_fmt(summary[split]['accuracy'], 'accuracy')})")
    if summary.get("stopped") == "diverged" or summary.get("warnings"):
        line += ", DIVERGED" if summary.get("stopped") == "diverged" else ", NaN/Inf metrics"
    return line + f", {summary['wall_time']:.0f}s"


# -- building and running ------------------------------------------------------------------

def build(recipe: dict) -> tuple:
    """The task and freshly initialised model of a checked recipe (seeded by ``train.seed``)."""
    task = build_task(recipe["task"])
    torch.manual_seed(recipe["train"]["seed"])
    return task, build_model(recipe["model"], task)


def _fit(model: nn.Module, task, recipe: dict, out: Path, *, resume: bool, progress, summary: dict,
         tensorboard=None, on_start=None) -> FitResult:
    config = TrainConfig.from_dict(recipe["train"])
    seed, size = config.seed, config.batch_size
    return fit(model, lambda epoch: task.batches("train", size, seed=seed, epoch=epoch), task=task, recipe=config,
               val_loader=_split(task, "valid", _eval_size(task, size)),
               test_loader=_split(task, "test", _eval_size(task, size)), run_dir=out, resume=resume,
               steps_per_epoch=task.steps_per_epoch(size), progress=progress, summary=summary,
               tensorboard=tensorboard, on_start=on_start)


def _finish(model: nn.Module, result: FitResult, out: Path, extra: dict) -> dict:
    summary = {**result.to_dict(), **extra}
    if result.stopped != "interrupted" and _is_main():
        remove_weight_norm(model)  # plain factors: the saved model loads with lrcompress.load_model
        save_model(model, out / MODEL_FILE, force=True)  # the run directory's own file (claimed): a resume replaces it
    return summary


def _eval_data(task, recipe: dict) -> dict:
    size = _eval_size(task, recipe["train"]["batch_size"])
    return {"val": _split(task, "valid", size), "test": _split(task, "test", size)}


def _metrics(model: nn.Module, task, data: dict, progress: bool | None = False) -> dict:
    return {name: evaluate(model, batches, task=task, progress=progress) for name, batches in data.items()}


def _split(task, split: str, size: int):
    return lambda: task.batches(split, size, seed=0, shuffle=False)


def _eval_size(task, batch_size: int) -> int:
    # Stream tasks (language modelling) cut a split into batch_size streams: keep that layout.
    return batch_size if task.stateful else max(batch_size, 256)


# Settings a resume takes from the recipe it names when they differ from the run's own: how long
# to train and where to run it. Every other difference is refused (``_own_recipe``); ``--set`` changes [train]
# settings on a resume, where the engine applies, or refuses, each one.
RESUMABLE = ("train.steps", "train.epochs", "train.eval_every", "train.early_stopping_patience",
             "train.device", "train.execution", "task.data_dir")


def _own_recipe(out: Path, asked: dict, overrides) -> dict:
    """The recipe a resume continues with: the run's own ``recipe.toml`` with ``overrides``.

    ``asked`` (the recipe the command names, with the same overrides) must describe the same
    run: a different task, model or training setting there would otherwise be ignored without a
    word (another recipe file, an edited one, or a ``--set task.lag=5`` that would re-evaluate a
    finished run on another task). Raises ``ConfigError`` naming the first differing key. A run
    that never got to a checkpoint (``_started``), or has no recipe file, continues as ``asked``."""
    if not _started(out) or not (out / RECIPE_FILE).is_file():
        return asked
    base = load_recipe(out / RECIPE_FILE)
    own = _recipe(copy.deepcopy(base), overrides)
    made, have, want = _flat_recipe(base), _flat_recipe(own), _flat_recipe(asked)
    for key in sorted(set(made) | set(have)):  # --set on a resume: [train] only (the engine checks those)
        if key.startswith(("task.", "model.")) and not key.startswith(RESUMABLE) and made.get(key) != have.get(key):
            raise ConfigError(f"--set {key}={_show(have.get(key))} on a resume of {out}, which was trained with "
                              f"{key} = {_show(made.get(key))}: a resume cannot change the task or the model; "
                              f"train into another folder")
    for key in sorted(set(have) | set(want)):
        if have.get(key) == want.get(key):
            continue
        if key.startswith(RESUMABLE):  # how long and where: as the named recipe says now
            section, name = key.split(".", 1)
            own[section][name] = asked[section][name]
            continue
        raise ConfigError(f"{out} was trained with {key} = {_show(have.get(key))}, but the recipe asks "
                          f"{_show(want.get(key))}; --resume continues a run as it was made: name its own "
                          f"{out / RECIPE_FILE} (or the same recipe) and change [train] settings with --set")
    return own


def _recipe(recipe, overrides) -> dict:
    if isinstance(recipe, dict):
        return check_recipe(apply_overrides(recipe, overrides))
    return load_recipe(recipe, overrides)


def _source(source: Path, recipe) -> tuple[Path, object]:
    if source.is_dir():
        for name in (RECIPE_FILE, MODEL_FILE):
            if not (source / name).is_file():
                raise LRCompressError(f"{source} is not a finished run: it has no {name}")
        return source / MODEL_FILE, recipe if recipe is not None else source / RECIPE_FILE
    if not source.exists():
        raise FileNotFoundError(f"no such run directory or file: {source}")
    if recipe is None:
        raise ConfigError(f"{source} is a weights file: pass the recipe that builds its model (--recipe)")
    return source, recipe


def _check_source(source: Path, recipe, overrides) -> None:
    """What ``finetune`` will need from ``source``, checked without writing: a finished dense
    run (or weights + recipe) whose weights file is a readable, consistent safetensors file."""
    weights, base = _source(source, recipe)
    checked = _recipe(base, overrides)
    _check_dense(source, checked["model"], "sweep")
    if weights.suffix == ".safetensors":
        tensors, meta = read_safetensors(weights)
        check_compressed(tensors, meta, weights)


def _check_ranks(source: Path, recipe, overrides, ranks: list[int], tied: bool) -> None:
    """Every rank of a sweep is possible for every target of the source's model (built, not
    loaded: only shapes matter), so a bad rank fails before any point is fine-tuned."""
    from ..config import CompressionConfig
    from ..errors import RankError
    from ..parametrizations import max_rank
    from ..targets import find_targets

    _, base = _source(source, recipe)
    _, model = build(_recipe(base, overrides))
    config = CompressionConfig(rank=max(ranks), tied=tied)
    for c in find_targets(model, config):
        full = max_rank(c.gates, c.rows, c.cols, config.tied and c.gates > 1)
        bad = sorted(r for r in set(ranks) if r > full)
        if bad:
            what = f"rank {bad[0]} is" if len(bad) == 1 else f"ranks {', '.join(map(str, bad))} are"
            raise RankError(f"{what} impossible for {c.name} ({c.layer} {c.role}, "
                            f"{c.gates} block(s) of {c.rows}x{c.cols}): ranks must be 1..{full}")


def _check_structure_points(source: Path, recipe, overrides, sizes: list[int], structure: str, options: dict) -> None:
    """Every point of a structure sweep fits every target of the source's model (built, not
    loaded: only shapes matter; the structure's ``check``), before any point is fine-tuned."""
    import warnings

    from ..config import CompressionConfig
    from ..convert import decide_structured, structure_candidates
    from ..targets import find_targets

    _, base = _source(source, recipe)
    _, model = build(_recipe(base, overrides))
    for size in sizes:
        config = CompressionConfig(structure=structure, **options, **{SWEPT[structure]: size})
        candidates = structure_candidates(find_targets(model, config), structure)
        with warnings.catch_warnings():  # notes (a capped TT-rank) come again when the point converts
            warnings.simplefilter("ignore")
            decide_structured(candidates, {c.name: getattr(model.get_submodule(c.module), c.weight)
                                           for c in candidates}, config)


def _check_apart(source: Path, out: Path) -> None:
    """The output may not be the source run or lie inside it: its model and summary stay as trained."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise ConfigError(f"--out {out} is {'the source run' if dst == src else 'inside the source run'} {source}; "
                          "write the converted runs elsewhere")


def _check_out(out: Path, resume: bool, *, sweep: bool = False) -> None:
    """Refuse, before any work, an output that would replace or delete files lrcompress did not
    write, or mix a run and a sweep in one folder (``report`` would then show only one of them)."""
    if not sweep and (out / "sweep.json").is_file():
        raise ConfigError(f"{out} is a sweep directory (it holds sweep.json): train or fine-tune into another --out")
    if sweep and ((out / SUMMARY_FILE).is_file() or (out / RECIPE_FILE).is_file()):
        raise ConfigError(f"{out} is a run directory (it holds {RECIPE_FILE}): sweep into another --out")
    check_run_dir(out, resume)
    if resume and (out / "last.safetensors").is_file():
        load_checkpoint(out / "last.safetensors", resume=True)  # damaged: one FormatError before any work


def _claim(out: Path) -> None:
    """Create the run directory (if needed) and mark it as lrcompress's."""
    if _is_main():
        claim_run_dir(out)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write_text(path: Path, text: str) -> None:
    """Replace a file of a run directory lrcompress made (``_claim``), atomically."""
    if _is_main():
        write_text_atomic(path, text, force=True)


def _save_json(path: Path, data: dict) -> None:
    if _is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)


def _read_json(path: Path) -> dict | None:
    """A JSON object lrcompress wrote earlier, or None when it is missing or damaged (then redone)."""
    try:
        data = load_json(path.read_text(), str(path), max_depth=MAX_JSON_DEPTH)
    except (OSError, UnicodeDecodeError, FormatError):
        return None
    return data if isinstance(data, dict) else None


MAX_JSON_DEPTH = 32  # summaries nest ~4 deep


def _fmt(x, metric: str | None = None) -> str:
    return format_metric(metric, x)  # accuracies as percentages


# -- reports -------------------------------------------------------------------------------

REPORT_COLUMNS = ("run", "rank", "diag", "tied", "structure", "options", "params", "ratio", "metric", "split", "dense", "before", "after",
                  "wall_time", "accuracy_dense", "accuracy_before", "accuracy_after")
# Beside a selection metric that is not accuracy (psMNIST selects on CE), the accuracy the paper
# compares, when the task reports it: these row keys, fractions like the metric columns.
ACCURACY_KEYS = ("accuracy_dense", "accuracy_before", "accuracy_after")


def collect(path: str | os.PathLike) -> list[dict]:
    """One row per run: a sweep directory's points, or a single run directory.

    Raises ``FormatError`` naming the file when a ``summary.json`` is damaged (not JSON, too
    deep, not a run summary, a value of the wrong type).
    """
    rows = [_trained_structure(row(p.name, _read_summary(p / SUMMARY_FILE), p / SUMMARY_FILE), p) for p in run_dirs(path)]
    if len(rows) > 1:
        rows.sort(key=lambda r: (r["structure"] is not None, r["structure"] or "",
                                 options_label(r["structure"], r["options"], size=False), point_size(r) or 0,
                                 bool(r["diag"]), r["run"]))
    return rows


def _trained_structure(r: dict, where: Path) -> dict:
    """A run trained (not converted) with a low-rank or structured model: its rank, diag, tied
    or structure and options from its ``recipe.toml`` (the summary of a trained run has none).
    A missing or damaged recipe leaves the row as it is."""
    if r["rank"] is not None or r["structure"] is not None or r.get("kind") == "finetune":
        return r
    try:
        with warnings.catch_warnings():  # the recipe's notes were shown when it ran
            warnings.simplefilter("ignore")
            model = load_recipe(where / RECIPE_FILE)["model"]
    except (OSError, LRCompressError):
        return r
    if model.get("structure") not in (None, "lowrank"):
        from .models import STRUCTURE_KEYS

        return {**r, "structure": model["structure"],
                "options": {k: model[k] for k in STRUCTURE_KEYS if model.get(k) is not None}}
    if model.get("rank"):
        return {**r, "rank": model["rank"], "diag": bool(model.get("diag")), "tied": bool(model.get("tied"))}
    return r


def point_size(r: dict):
    """What a sweep varies, of a report row: the rank, the TT-rank, the Kronecker terms (None: a dense run)."""
    if r.get("structure") in SWEPT:
        size = (r.get("options") or {}).get(SWEPT[r["structure"]])
        return size if isinstance(size, int) and not isinstance(size, bool) else None
    return r.get("rank")


def options_label(structure: str | None, options: dict | None, *, size: bool = True) -> str:
    """A row's structure options in the CLI's spelling (``shape 4x4x4, ranks 2``); low rank's
    as ``rank 4, diag``; without ``size``, leaving out what a sweep varies (a family's label)."""
    from ..structures import describe

    options = dict(options or {})
    if not size and structure in SWEPT:
        options.pop(SWEPT[structure], None)
    return describe(structure or "lowrank", {OPTION_NAMES.get(k, k): v for k, v in options.items()})


# CompressionConfig's field names as the structure modules (and docs) call the options.
OPTION_NAMES = {"tt_shape": "shape", "tt_ranks": "ranks", "kron_factors": "factors"}


def family_label(r: dict) -> str:
    """The family of a report row in a figure or table: ``low-rank + diagonal``, ``tt (shape 4x4x4)``."""
    structure = r.get("structure")
    if structure is None and r.get("rank") is None:
        return "dense"
    if structure in (None, "lowrank"):
        return "low-rank" + (" + diagonal" if r.get("diag") else "") + (", tied" if r.get("tied") else "")
    rest = options_label(structure, r.get("options"), size=False)
    return STRUCTURE_NAMES.get(structure, structure) + ("" if rest == "-" else f" ({rest})")


STRUCTURE_NAMES = {"tt": "TT", "kronecker": "Kronecker"}


def run_dirs(path: str | os.PathLike) -> list[Path]:
    """The finished runs (folders with a ``summary.json``) of a run or sweep directory, by name."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise LRCompressError(f"{path} is a file, not a run or sweep directory")
        raise FileNotFoundError(f"no such run or sweep directory: {path}")
    runs = [path] if (path / SUMMARY_FILE).is_file() else \
        sorted(p for p in path.iterdir() if (p / SUMMARY_FILE).is_file())
    if not runs:
        raise LRCompressError(f"{path} holds no finished run (no summary.json in it or its subdirectories)")
    return runs


def unfinished(path: str | os.PathLike) -> list[str]:
    """The run folders under a sweep directory that have started but hold no ``summary.json`` yet
    (``report`` lists only finished runs and names these apart)."""
    path = Path(path)
    if not path.is_dir() or (path / SUMMARY_FILE).is_file():
        return []
    return sorted(p.name for p in path.iterdir()
                  if p.is_dir() and (p / RECIPE_FILE).is_file() and not (p / SUMMARY_FILE).is_file())


def _read_summary(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    data = load_json(text, str(path), max_depth=MAX_JSON_DEPTH)
    if not isinstance(data, dict):
        raise FormatError(f"{path} is not a run summary (a JSON {type(data).__name__}, not an object)")
    return data


def row(name: str, s: dict, where: str | os.PathLike = "summary") -> dict:
    """The report row of one run summary; ``FormatError`` naming ``where`` when a field is damaged."""
    if not isinstance(s, dict) or not isinstance(s.get("metric"), str):
        raise FormatError(f"{where} is not a run summary (no 'metric' name)")
    split = "test" if s.get("test") else "val"
    metric = s["metric"]
    # A converted run's structure ("lowrank" unless it says another); None for a trained run (the reference).
    structure = s.get("structure") or ("lowrank" if s.get("kind") == "finetune" or s.get("rank") is not None else None)
    options = s.get("options") if structure not in (None, "lowrank") else ({} if structure else None)
    out = {"run": name, "rank": s.get("rank"), "diag": s.get("diag"), "tied": s.get("tied"), "structure": structure,
           "options": options, "params": s.get("params"), "ratio": s.get("ratio"), "metric": metric, "split": split,
           "dense": _dig(s, "dense", split, metric), "before": _dig(s, "converted", split, metric),
           "after": _dig(s, split, metric), "wall_time": s.get("wall_time")}
    also = metric != "accuracy"  # a headline accuracy is in the metric columns already
    out["accuracy_dense"] = _dig(s, "dense", split, "accuracy") if also else None
    out["accuracy_before"] = _dig(s, "converted", split, "accuracy") if also else None
    out["accuracy_after"] = _dig(s, split, "accuracy") if also else None
    out["kind"] = s.get("kind")  # "train" or "finetune" (not a CSV column)
    for key in ("rank", "params", "ratio", "dense", "before", "after", "wall_time", *ACCURACY_KEYS):
        value = out[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FormatError(f"{where}: {key} is {str(value)[:40]!r}, not a number")
    for key in ("diag", "tied"):
        if out[key] is not None and not isinstance(out[key], bool):
            raise FormatError(f"{where}: {key} is {str(out[key])[:40]!r}, not true/false")
    if not isinstance(structure, (str, type(None))) or not isinstance(options, (dict, type(None))):
        raise FormatError(f"{where}: structure {str(structure)[:40]!r} / options {str(options)[:40]!r} "
                          "are not a name and an object")
    return out


def _dig(data: dict, *keys):
    """``data[k1][k2]...``, or None where a level is missing or is not an object."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def format_report(rows: list[dict]) -> str:
    """A plain-text table of ``collect``'s rows."""
    structured = any(r.get("structure") not in (None, "lowrank") for r in rows)
    if structured:  # rank and diagonal say nothing of a TT or Kronecker point: its structure and options
        header = ("run", "structure", "options", "params", "ratio", "metric", "dense", "before", "after", "time")
        first = [(r.get("structure") or "dense", _row_options(r)) for r in rows]
    else:
        header = ("run", "rank", "diag", "params", "ratio", "metric", "dense", "before", "after", "time")
        first = [("-" if r["rank"] is None else str(r["rank"]), "yes" if r["diag"] else "no") for r in rows]
        if any(r.get("tied") for r in rows):  # tied and untied points of one rank differ only here
            header = header[:3] + ("tied",) + header[3:]
            first = [(*lead, "yes" if r.get("tied") else "no") for r, lead in zip(rows, first)]
    # The accuracy beside another selection metric (psMNIST's CE): the columns some row has.
    extra = [k for k in ACCURACY_KEYS if any(r.get(k) is not None for r in rows)]
    header = header[:-1] + tuple(ACCURACY_HEADERS[k] for k in extra) + header[-1:]
    body = [(r["run"], *lead, f"{r['params']:,}" if r["params"] else "-", f"{r['ratio']:.2f}x" if r["ratio"] else "-",
             f"{r['split']} {r['metric']}", *(_fmt(r[k], r["metric"]) for k in ("dense", "before", "after")),
             *(_fmt(r.get(k), "accuracy") for k in extra),
             f"{r['wall_time']:.0f}s" if r["wall_time"] is not None else "-") for r, lead in zip(rows, first)]
    note = "before: converted, not yet fine-tuned; after: fine-tuned (best validation weights)"
    if all(r.get("kind") == "train" for r in rows):
        note = "after: the trained model (best validation weights)"
    metric_column = header.index("metric")
    right = set(range(header.index("params"), len(header))) - {metric_column} | (set() if structured else {1})
    return "\n".join(format_table(header, body, right=right) + [note])


ACCURACY_HEADERS = {"accuracy_dense": "dense acc", "accuracy_before": "before acc", "accuracy_after": "after acc"}


def _row_options(r: dict) -> str:
    if r.get("structure") in (None, "lowrank"):
        if r.get("rank") is None:
            return "-"
        return f"rank {r['rank']}" + (", diag" if r.get("diag") else "") + (", tied" if r.get("tied") else "")
    return options_label(r["structure"], r.get("options"))


def write_csv(rows: list[dict], path: str | os.PathLike, *, force: bool = False) -> Path:
    """The rows as CSV, written atomically; an existing file is replaced only with ``force``."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "options": None if r.get("options") is None else json.dumps(r["options"])} for r in rows)
    return write_text_atomic(check_report_output(path, force), buffer.getvalue(), force=force)


def check_report_output(path: str | os.PathLike, force: bool) -> Path:
    """A report file to write: never a directory, and an existing file only with ``force``."""
    path = Path(path)
    if path.is_dir():
        raise LRCompressError(f"cannot write {path}: it is a directory")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    return path


def plot(rows: list[dict], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Parameters against the metric, before and after fine-tuning, the dense model as a point
    (``plots.sweep_figure``; needs matplotlib). Written atomically in the format of the file's
    extension (PNG without one); an existing file is replaced only with ``force``."""
    from . import plots

    path = check_report_output(path, force)
    return plots.save_figure(plots.sweep_figure(rows), path, force=force)


def curves_figure(path: str | os.PathLike, metric: str | None = None):
    """The learning-curve figure (``metric`` per update, one line per run) of a run or sweep
    directory's runs, from their ``metrics.jsonl`` (``plots.curves_figure``; default metric: the
    runs' headline metric on validation data). Raises before anything is written."""
    from . import plots

    dirs = run_dirs(path)
    runs = {d.name: _read_records(d / "metrics.jsonl") for d in dirs}
    if metric is None:
        headline = [_read_summary(d / SUMMARY_FILE).get("metric") for d in dirs]
        metric = next((m for m in headline if isinstance(m, str)), None)
    return plots.curves_figure(runs, metric)


def curves(path: str | os.PathLike, output: str | os.PathLike, *, metric: str | None = None,
           force: bool = False) -> Path:
    """``curves_figure`` written atomically to ``output`` (replaced only with ``force``)."""
    from . import plots

    output = check_report_output(output, force)
    return plots.save_figure(curves_figure(path, metric), output, force=force)


def _read_records(path: Path) -> list[dict]:
    """The evaluation records of ``metrics.jsonl`` (a line cut short by a kill ends them)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            record = load_json(line, str(path), max_depth=MAX_JSON_DEPTH)
        except FormatError:
            break
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


__all__ = ["build", "collect", "curves", "finetune", "format_report", "plot", "point_name", "row", "run_dirs", "sweep",
           "train_recipe", "write_csv"]
