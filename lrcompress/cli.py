"""The ``lrcompress`` command: a thin typer layer over the library.

Every user error is one line on stderr and exit code 2; nothing here holds logic of its own.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import json
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import progress as progress_bars
from .cli_bench import EPILOG as BENCH_EPILOG, bench
from .cli_train import (Joint, KronFactors, Negatives, Progress, Structure, Terms, TTRanks, TTShape, evaluate,
                        finetune, report, stdout_to_stderr, sweep, train)
from .errors import ConfigError, FormatError, LRCompressError, OutputExistsError
from .jsonout import dumps as _json  # --json: strict JSON, a NaN/Inf metric as null
from .version import __version__

if TYPE_CHECKING:
    from .config import RankValue

# No module that imports torch is imported here: `lrcompress --help` and `--version` answer
# without loading PyTorch (seconds). Each command imports what it needs in its body
# (tests/test_cli_fast.py holds this).

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Shrink trained recurrent networks with low-rank (+ diagonal) factorizations.")

Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow a pickled whole model or classes (full unpickling) and TorchScript archives "
                           "(torch.jit.load). Both RUN CODE from the file: only for files you trust.")]
Key = Annotated[Optional[str], typer.Option("--key", help="Entry of a checkpoint dict that holds the state dict.")]
Patterns = Annotated[Optional[list[str]], typer.Option(
    "--targets", "-t", help="Also factor nn.Linear layers with this name, dotted suffix or glob (repeatable, or "
                            "comma list); 'all-linear': every nn.Linear except the output layer.")]
Rename = Annotated[Optional[list[str]], typer.Option(
    "--rename", help="Rename checkpoint keys REGEX=REPLACEMENT (Python re.sub on each full key; the first unescaped "
                     "'=' splits; repeatable, applied in order), e.g. '^enc_w_(ih|hh)$=enc.weight_\\1_l0'.")]


@app.command(epilog="Examples:  lrcompress convert model.pt --rank 24 --diag  |  "
                    "lrcompress convert model.pt --energy 0.9 --json  |  "
                    "lrcompress convert ckpt.pt --key model --rank 0.25 -o small.safetensors  |  "
                    "lrcompress convert model.pt --structure kronecker --kron-factors 64x64  |  "
                    "lrcompress convert model.pt --structure tt --tt-ranks 8 --tt-shape 8x8x8x8  |  "
                    "lrcompress convert model.pt --structure orthogonal")
def convert(
    path: Annotated[Path, typer.Argument(
        help="Trained model: a state dict or checkpoint (torch, Lightning .ckpt, safetensors, .npz; by content), "
             "or a Hugging Face model directory (single or sharded).")],
    rank: Annotated[Optional[str], typer.Option(
        "--rank", "-r", help="Rank: an int, a fraction of full rank (0.25) or energy=F.")] = None,
    energy: Annotated[Optional[float], typer.Option(
        help="Per matrix, the smallest rank keeping this share of the squared singular values.")] = None,
    ratio: Annotated[Optional[float], typer.Option(
        "--ratio", help="Whole-model budget: parameters before / after at least this; every target's rank is "
                        "chosen for the least summed (relative) error (docs/calibration.md).")] = None,
    params: Annotated[Optional[str], typer.Option(
        "--params", help="Whole-model budget: at most this many parameters (200000, 200k, 1.5M).")] = None,
    energy_scope: Annotated[Optional[str], typer.Option(
        "--energy-scope", help="With --energy: 'matrix' (each matrix keeps the share, default) or 'model' "
                               "(the largest singular values of all targets together).")] = None,
    allocation: Annotated[Optional[str], typer.Option(
        "--allocation", help="With --ratio/--params: minimise the summed squared error relative to each target's "
                             "size ('relative', default) or the absolute summed error ('absolute').")] = None,
    diag: Annotated[bool, typer.Option("--diag", help="Low-rank plus diagonal (where blocks are square).")] = False,
    diag_auto: Annotated[bool, typer.Option(
        "--diag-auto", help="With --ratio/--params: a diagonal only where it pays for its parameters.")] = False,
    tied: Annotated[bool, typer.Option("--tied", help="Share one R factor across the gates of a weight.")] = False,
    include_input: Annotated[bool, typer.Option("--include-input", help="Also factor input matrices.")] = False,
    include_projection: Annotated[bool, typer.Option(
        "--include-projection", help="Also factor LSTM proj_size matrices (weight_hr).")] = False,
    targets: Patterns = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", "-x", help="Never factor modules/weights matching this pattern (repeatable).")] = None,
    targets_regex: Annotated[Optional[str], typer.Option(
        "--targets-regex", help="Also factor nn.Linear layers whose full name matches this regex (re.fullmatch); "
                                "instead of --targets.")] = None,
    exclude_regex: Annotated[Optional[str], typer.Option(
        "--exclude-regex", help="Never factor modules/weights whose full name matches this regex; "
                                "instead of --exclude.")] = None,
    rank_for: Annotated[Optional[list[str]], typer.Option(
        "--rank-for", help="Per-target rank override PATTERN=RANK, e.g. '*weight_hh_l1=16' (repeatable).")] = None,
    svd: Annotated[str, typer.Option(help="SVD method: auto, exact or randomized.")] = "auto",
    diag_iters: Annotated[Optional[int], typer.Option(help="Most diagonal-fit iterations (default: until an iteration gains < 0.1%, at most 50 exact, 20 randomized).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
        "Output file (default: <stem>.lr.safetensors); for a model directory, a directory (default: <dir>.lr)."))] = None,
    force: Force = False,
    as_json: Json = False,
    trust_pickle: TrustPickle = False,
    key: Key = None,
    rename: Rename = None,
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", help="A JSON compression config (CompressionConfig.save) instead of the options above.")] = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="Calibration inputs (safetensors or torch file: a tensor, or a dict with --calib-key): "
                        "data-aware fits and output errors. Runs the model, so it needs a pickled whole model "
                        "(--trust-pickle).")] = None,
    calib_key: Annotated[Optional[str], typer.Option(
        "--calib-key", help="The entry of a --calib dict of tensors that holds the inputs.")] = None,
    calib_damping: Annotated[Optional[float], typer.Option(
        "--calib-damping", help="With --calib: relative ridge lambda >= 0 on each second moment, "
                                "C + lambda mean(diag C) I (0: exact weighted fit; default 0.01; "
                                "docs/calibration.md).")] = None,
    structure: Structure = None,
    kron_factors: KronFactors = None,
    terms: Terms = None,
    tt_ranks: TTRanks = None,
    tt_shape: TTShape = None,
    joint: Joint = False,
    negatives: Negatives = None,
) -> None:
    """Factor the recurrent weights of a trained model and write a compressed safetensors file."""
    from .checkpoints import read_checkpoint, reading_metadata
    from .config import CompressionConfig
    from .convert import compress, compress_state_dict
    from .io import existing_file, specs_from_metadata, write_compressed

    if diag and diag_auto:
        raise ConfigError("give --diag or --diag-auto, not both")
    if diag_auto and ratio is None and params is None:
        raise ConfigError("--diag-auto chooses diagonals within a budget: give --ratio or --params with it")
    if calib_key is not None and calib is None:
        raise ConfigError("--calib-key names an entry of the --calib file: give --calib too")
    if calib_damping is not None and calib is None:
        raise ConfigError("--calib-damping damps the --calib statistics: give --calib too")
    if calib_damping is not None:
        from .whitening import check_damping

        check_damping(calib_damping, "--calib-damping")
    options = dict(rank=None if rank is None else _rank_value(rank), energy=energy, ratio=ratio,
                   params=None if params is None else _count(params, "--params"), energy_scope=energy_scope,
                   allocation=allocation,
                   diag="auto" if diag_auto else diag, tied=tied,
                   include_input=include_input, include_projection=include_projection, targets=_selection(targets, targets_regex, "targets"),
                   exclude=_selection(exclude, exclude_regex, "exclude"), ranks=_overrides(rank_for), svd=svd, diag_iters=diag_iters,
                   damping=calib_damping)
    from .structures import cli_options

    options.update(cli_options(structure, kron_factors=kron_factors, terms=terms, tt_ranks=tt_ranks,
                               tt_shape=tt_shape, joint=joint, negatives=negatives))
    if config_file is not None:
        given = [name for name, value in options.items()
                 if (value is not None if name == "damping" else value not in (None, False, (), {}))
                 and not (name == "svd" and value == "auto")]
        if given:  # one source of truth: a file plus flags would leave the result ambiguous
            flags = ("--" + {"damping": "calib_damping"}.get(n, n).replace("_", "-") for n in given)
            raise ConfigError(f"--config {config_file} holds every compression option; drop "
                              f"{', '.join(flags)} or --config")
        config = CompressionConfig.load(config_file)
    else:  # an option not given keeps the config's default
        config = CompressionConfig(**{name: value for name, value in options.items() if value is not None})
    progress = None  # a bar on stderr when it is a terminal (stdout stays pure JSON with --json)
    if path.is_dir():  # a Hugging Face model directory in, a model directory out (docs/huggingface.md)
        from .pretrained import convert_directory

        if calib is not None:
            raise ConfigError(_NO_CALIBRATION.format(what=f"{path} (a model directory)"))

        report, meta, output = convert_directory(path, output, config, force=force, progress=progress,
                                                 trust_pickle=trust_pickle, key=key, rename=rename or ())
    else:
        output = output or existing_file(path).with_name(f"{_stem(path)}.lr.safetensors")
        _check_output(path, output, force)
        loaded, meta = read_checkpoint(path, trust_pickle=trust_pickle, key=key, rename=rename or ())
        if specs_from_metadata(meta, path):
            raise FormatError(f"{path} is already compressed by lrcompress")
        if isinstance(loaded, dict):
            if calib is not None:
                raise ConfigError(_NO_CALIBRATION.format(what=f"{path} (a state dict)"))
            tensors, specs, report = compress_state_dict(loaded, config, progress=progress)
            write_compressed(tensors, specs, output, force=force,
                             metadata={**reading_metadata(meta), **_errors_metadata(report)})
        else:  # a trusted, pickled whole module
            from .io import save_model

            data = None if calib is None else read_calibration(calib, calib_key)
            report = compress(loaded, config=config, progress=progress, calibration=data)
            save_model(loaded, output, force=force, metadata={**reading_metadata(meta), **_errors_metadata(report)})
    folded = set(json.loads(meta.get("weight_norm_folded", "[]")))
    for row in report.targets:
        if row.name in folded:
            row.note = "; ".join(filter(None, [row.note, "weight norm folded"]))
    if as_json:
        typer.echo(_json({**report.to_dict(), "output": str(output)}))
    else:
        typer.echo(str(report))
        typer.echo(f"wrote {output}")


@app.command(epilog="Examples:  lrcompress inspect model.pt  |  lrcompress inspect model.lr.safetensors --json")
def inspect(
    path: Annotated[Path, typer.Argument(
        help="A dense state dict, a compressed .safetensors file, or a Hugging Face model directory.")],
    ranks: Annotated[str, typer.Option(help="Ranks at which to show the energy kept (dense files).")] = "8,16,32,64",
    include_input: Annotated[bool, typer.Option("--include-input", help="Also show input matrices.")] = False,
    targets: Patterns = None,
    as_json: Json = False,
    trust_pickle: TrustPickle = False,
    key: Key = None,
    rename: Rename = None,
) -> None:
    """Dense file: singular-value energy kept per rank, per matrix. Compressed file: its layers."""
    from . import summary
    from .checkpoints import read_checkpoint
    from .config import ALL_LINEAR, int_list
    from .convert import unwrap
    from .errors import TargetError
    from .validate import check_compressed, recorded_errors, shared_tensors

    loaded, meta = read_checkpoint(path, trust_pickle=trust_pickle, key=key, rename=rename or ())
    # A trusted whole module: the names of the module it wraps, as convert (compress) sees them.
    tensors = loaded if isinstance(loaded, dict) else unwrap(loaded)[0].state_dict()
    specs = check_compressed(tensors, meta, path)  # a lying file is refused, not tabulated
    if specs:
        result = summary.compressed_summary(tensors, specs, shared_tensors(tensors, meta, path),
                                            recorded_errors(meta, specs, path))
    else:
        at = int_list(ranks, "--ranks")
        linear = None
        if path.is_dir() and ALL_LINEAR in _split(targets):  # the same Linear names convert uses
            from .pretrained import linear_names, read_hf_config

            linear = linear_names(path, read_hf_config(path))
        try:
            result = summary.spectra(tensors, at, include_input=include_input, targets=_split(targets),
                                     progress=None, linear=linear)
        except TargetError as exc:
            if targets or not str(exc).startswith("no targets found"):
                raise
            raise TargetError(f"no recurrent weights found in {path}; add --targets all-linear (or names) "
                              "to inspect Linear layers") from None
    typer.echo(_json(result.to_dict()) if as_json else str(result))


@app.command(epilog="Examples:  lrcompress merge model.lr.safetensors -o dense.safetensors  |  "
                    "lrcompress merge model.lr.safetensors --json")
def merge(
    path: Annotated[Path, typer.Argument(help="A compressed .safetensors file or model directory.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
        "Output file (default: <stem>.dense.safetensors); for a model directory, a directory (default: "
        "<dir>.dense)."))] = None,
    force: Force = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")] = False,
) -> None:
    """Rebuild dense weights from a compressed file: a plain state dict any PyTorch code loads."""
    from .convert import merge_state_dict
    from .io import existing_file, read_safetensors, write_safetensors
    from .validate import check_compressed

    if path.is_dir():  # a compressed model directory: a dense one transformers loads (docs/huggingface.md)
        from .pretrained import merge_model_directory

        output, specs, merged = merge_model_directory(path, output, force=force)
    else:
        output = output or existing_file(path).with_name(f"{_stem(path).removesuffix('.lr')}.dense.safetensors")
        _check_output(path, output, force)
        if path.suffix != ".safetensors":
            raise FormatError(f"{path}: merge takes a compressed .safetensors file (from lrcompress convert)")
        tensors, meta = read_safetensors(path)
        specs = check_compressed(tensors, meta, path)  # every factor present, of the recorded shape, finite
        if not specs:
            raise FormatError(f"{path} is not an lrcompress file (no factorization in its metadata)")
        merged = merge_state_dict(tensors, specs)
        write_safetensors(merged, output, force=force,
                          metadata={"merged_from": "lrcompress", "lrcompress_version": __version__})
    if as_json:
        typer.echo(_json({"output": str(output), "rebuilt": [s.name for s in specs], "tensors": len(merged)}))
    else:
        typer.echo(f"wrote {output} ({len(specs)} weight{'s' if len(specs) != 1 else ''} rebuilt dense)")


app.command(epilog=BENCH_EPILOG)(bench)


QUIET_HELP = "No progress bars or per-evaluation lines (bars are drawn only on a terminal anyway)."
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help=QUIET_HELP + " Also accepted after the command.")] = False,
) -> None:
    if version:
        typer.echo(f"lrcompress {__version__}")
        raise typer.Exit()
    progress_bars.set_quiet(quiet)
    ctx.call_on_close(lambda: progress_bars.set_quiet(False))  # a later in-process call starts loud


def _with_quiet(command):
    """The command with a ``--quiet``/``-q`` option of its own, so it may follow the command name
    (``lrcompress train r.toml -q``) as well as precede it (``lrcompress -q train r.toml``)."""
    signature = pyinspect.signature(command, eval_str=True)  # typer reads the Annotated options off it

    @functools.wraps(command)
    def quietly(*args, quiet: bool = False, **kwargs):
        if quiet:
            progress_bars.set_quiet(True)  # the root callback's close hook makes it loud again
        return command(*args, **kwargs)

    extra = pyinspect.Parameter("quiet", pyinspect.Parameter.KEYWORD_ONLY, default=False, annotation=Quiet)
    quietly.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    quietly.__annotations__ = {**{n: p.annotation for n, p in signature.parameters.items()}, "quiet": Quiet}
    return quietly


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    warnings.showwarning = _one_line_warning
    try:
        code = app(standalone_mode=False)  # a typer.Exit(n) inside a command comes back as n
    except LRCompressError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a file the user named cannot be read or written (missing, permissions, ...)
        where = f": {exc.filename}" if exc.filename and str(exc.filename) not in str(exc.strerror) else ""
        typer.echo(f"error: {exc.strerror or exc}{where}" if exc.strerror else f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's body
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors (unknown option, bad value) come as click exceptions when standalone_mode
        # is off, with exit code 2: one line like every other user error, not click's usage block.
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        raise
    if code == 130:  # typer turns a Ctrl-C (KeyboardInterrupt) inside a command into exit code 130
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


def _rank_value(text: str) -> RankValue:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _errors_metadata(report) -> dict[str, str]:
    """Each target's conversion error, for ``inspect`` to show (``validate.recorded_errors``)."""
    from .validate import ERRORS_KEY

    # Only finite errors: recorded_errors refuses anything else, and a target left out is "not recorded".
    return {ERRORS_KEY: _json({t.name: t.rel_error for t in report.targets if math.isfinite(t.rel_error)})}


def _split(values: Optional[list[str]]) -> tuple[str, ...]:
    return tuple(p.strip() for v in values or () for p in v.split(",") if p.strip())


def _selection(values: Optional[list[str]], regex: Optional[str], name: str) -> tuple[str, ...] | str:
    """``--targets`` (a list: names, suffixes, globs, or ``all-linear``) or ``--targets-regex`` (one regex)."""
    if regex is not None and values:
        raise ConfigError(f"give --{name} or --{name}-regex, not both")
    return regex if regex is not None else _split(values)


def _overrides(values: Optional[list[str]]) -> dict[str, RankValue]:
    out = {}
    for v in values or ():
        pattern, sep, rank = v.rpartition("=")
        if pattern.endswith("energy") and sep:  # "PATTERN=energy=0.9"
            pattern, _, head = pattern.rpartition("=")
            rank = f"{head}={rank}"
        if not sep or not pattern or not rank:
            raise ConfigError(f"--rank-for needs PATTERN=RANK, got {v!r}")
        out[pattern] = _rank_value(rank)
    return out


_NO_CALIBRATION = ("--calib runs the model, which {what} cannot do without the model's code: bare state dicts "
                   "cannot be calibrated; load the model class and use the Python API "
                   "(lrcompress.compress(model, ..., calibration=...)), or pass a pickled whole model you trust "
                   "with --trust-pickle")


def read_calibration(path: Path, key: str | None = None):
    """The calibration inputs in ``path``: a tensor, or the tensor ``key`` of a dict of tensors.

    Read as checkpoints are, never running code (safetensors, or ``torch.load(weights_only=True)``);
    one batch for ``compress(calibration=...)``. Raises ``FormatError`` naming the file and what it holds.
    """
    from torch import Tensor

    from .checkpoints import read_file
    from .io import existing_file

    obj = read_file(existing_file(path), False)[0]
    if isinstance(obj, Tensor):
        if key is not None:
            raise FormatError(f"--calib-key {key!r}: {path} holds one tensor, not a dict")
        return obj
    if not isinstance(obj, dict):
        raise FormatError(f"{path} holds a {type(obj).__name__}; --calib needs a tensor or a dict of tensors")
    names = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
    if key is None:
        if any(str(k).endswith((".weight", ".bias")) or str(k).startswith(("weight_", "bias_")) for k in obj):
            raise FormatError(f"{path} holds model weights ({names}), not inputs: --calib takes a tensor of input "
                              "batches (or a dict of them with --calib-key)")
        raise FormatError(f"{path} holds a dict ({names}): name the inputs with --calib-key")
    if key not in obj:
        raise FormatError(f"--calib-key {key!r} is not in {path} (it holds {names})")
    if not isinstance(obj[key], Tensor):
        raise FormatError(f"--calib-key {key!r} in {path} is a {type(obj[key]).__name__}, not a tensor")
    return obj[key]


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def _count(text: str, option: str) -> int:
    """``"200000"``, ``"200k"``, ``"1.5M"`` -> a positive int; anything else is a ConfigError."""
    from fractions import Fraction

    body, suffix = (text.strip()[:-1], text.strip()[-1].lower()) if text.strip()[-1:].isalpha() else (text.strip(), "")
    try:
        value = Fraction(body.replace("_", "")) * _SUFFIXES[suffix]
    except (ValueError, KeyError, ZeroDivisionError):
        value = None
    if value is None or value.denominator != 1 or value < 1:
        raise ConfigError(f"{option} must be a positive whole number such as 200000, 200k or 1.5M, got {text!r}")
    return int(value)


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _check_output(source: Path, output: Path, force: bool) -> None:
    from .io import existing_file

    existing_file(source)
    if output.resolve() == source.resolve():
        raise LRCompressError(f"output {output} is the input file; the input is never modified")
    if output.is_dir():  # checked first: --force cannot help here
        raise LRCompressError(f"cannot write {output}: it is a directory")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        problem = "is not a directory" if output.parent.exists() else "does not exist"
        raise LRCompressError(f"cannot write {output}: {output.parent} {problem}")


app.command(epilog="Example:  lrcompress train recipes/addition-gru-small.toml --out runs/add --steps 500")(train)
app.command(epilog="Example:  lrcompress finetune runs/dense --rank 24 --diag --out runs/lrd24 --steps 2000")(finetune)
app.command(epilog="Example:  lrcompress sweep runs/dense --ranks 4,8,16,24,48 --both-diag --out runs/sweep")(sweep)
app.command(epilog="Example:  lrcompress report runs/sweep --csv sweep.csv --plot sweep.png")(report)
app.command(epilog="Example:  lrcompress evaluate runs/ptb-gru-512 --dynamic --lr 0.01 --symbols 20000")(evaluate)


@app.command(epilog="Examples:  lrcompress demo  |  lrcompress demo --text my_novel.txt --out runs/mine  |  "
                    "lrcompress demo --task addition --json")
def demo(
    out: Annotated[Path, typer.Option(
        "--out", help="Demo folder: new, empty, or one an earlier demo made (its runs and plot are replaced; other "
                      "files are kept). Any other folder is refused.")] = Path("runs/demo"),
    task: Annotated[str, typer.Option(
        help="text: a character-level GRU language model, in bits per character (the paper's Table 2 task); "
             "addition: the synthetic addition task, in mean squared error.")] = "text",
    text: Annotated[Optional[Path], typer.Option(
        "--text", help="Your own UTF-8 text for --task text (default: the English help texts inside CPython, "
                       "pydoc_data.topics, ~465,000 characters).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Training updates of the dense model (default: text 1000, addition 2000).")] = None,
    finetune_steps: Annotated[Optional[int], typer.Option(
        help="Fine-tuning updates per compressed model (default: text 150, addition 400).")] = None,
    ranks: Annotated[Optional[str], typer.Option(
        help="Ranks to compress at, comma-separated (default: text 4,16,32; addition 2,4,8).")] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="Override of the dense recipe SECTION.KEY=VALUE, e.g. model.hidden_size=64 "
                            "(repeatable).")] = None,
    progress: Progress = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the folder, the plot and the report rows as JSON; progress lines go to stderr.")] = False,
) -> None:
    """Train a small GRU (default: a character-level language model on text inside CPython), compress it at
    several ranks with and without diagonal, fine-tune each, and report the metric against parameters."""
    from .config import int_list
    from .demo import PLOT, run_demo

    chosen = None if ranks is None else tuple(int_list(ranks, "--ranks"))
    with stdout_to_stderr(as_json):  # with --json, the demo's narration goes to stderr
        rows = run_demo(out, task=task, text=text, steps=steps, finetune_steps=finetune_steps, ranks=chosen,
                        overrides=sets or (), progress=progress, echo=typer.echo)
    if as_json:
        figure = out / PLOT
        typer.echo(_json({"out": str(out), "plot": str(figure) if figure.is_file() else None, "rows": rows}))


for _info in app.registered_commands:  # every command, once all are registered
    _info.callback = _with_quiet(_info.callback)
