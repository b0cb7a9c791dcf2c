"""``lrcompress bench``: dense module vs dense rebuild vs factored loop, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .errors import ConfigError, FormatError, LRCompressError
from .jsonout import dumps  # strict JSON
from .progress import bar as progress_bar

if TYPE_CHECKING:
    import torch

# torch loads inside the command (see cli.py): `lrcompress bench --help` stays fast.

EPILOG = ("Examples:  lrcompress bench model.lr.safetensors --batch 1 --seq 200 --device cuda  |  "
          "lrcompress bench --synthetic gru:4096:64:diag --input 51 --seq 50  |  "
          "lrcompress bench --synthetic gru:4096:64:diag --train --batch 32 --seq 100")


def bench(
    path: Annotated[Optional[Path], typer.Argument(help="A compressed .safetensors file (or use --synthetic).")] = None,
    synthetic: Annotated[Optional[str], typer.Option(
        "--synthetic", help="Benchmark a random layer KIND:HIDDEN:RANK[:diag][:tied] instead of a file, "
                            "e.g. gru:4096:64:diag.")] = None,
    input_size: Annotated[int, typer.Option("--input", help="Input features of a --synthetic layer.")] = 51,
    batch: Annotated[int, typer.Option("--batch", "-b", help="Sequences per call.")] = 1,
    seq: Annotated[int, typer.Option("--seq", "-T", help="Time steps per call.")] = 200,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    rounds: Annotated[int, typer.Option(help="Timed calls of each path (median reported).")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads while timing (default: PyTorch's setting).")] = None,
    train: Annotated[bool, typer.Option("--train", help="Time training steps (forward + backward) and report "
                                                        "their memory, instead of inference calls.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")] = False,
) -> None:
    """Time each factored recurrent layer: dense nn module, rebuilt weights, factored loop (with
    --train: training steps, the factored one backpropagating through the factors, and memory)."""
    import torch

    from .execution.timing import recurrent_layers, synthetic_layer, time_layer
    from .io import read_safetensors
    from .validate import check_compressed

    if (path is None) == (synthetic is None):
        raise ConfigError("give either a compressed file or --synthetic KIND:HIDDEN:RANK")
    for name, value in (("--batch", batch), ("--seq", seq), ("--rounds", rounds), ("--threads", threads or 1)):
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    target = _device(device)
    if synthetic is not None:
        layers = {"synthetic": synthetic_layer(synthetic, input_size)}
    else:
        tensors, meta = read_safetensors(path)
        specs = check_compressed(tensors, meta, path)  # nothing is built from a file that lies
        if not specs:
            raise FormatError(f"{path} is not an lrcompress file (no factorization in its metadata)")
        layers = recurrent_layers(tensors, specs)
        skipped = sorted({s.module or "<root>" for s in specs if s.layer != "linear" and s.module not in layers})
        if skipped:  # cells (one step per call) have their own benchmark
            typer.echo(f"note: not timed here: {', '.join(skipped)} (recurrent cells: use benchmarks/bench_cell.py)",
                       err=True)
    results = [time_layer(m, batch=batch, steps=seq, device=target, rounds=rounds, name=n or "<root>",
                          threads=threads, train=train)
               for n, m in progress_bar(layers.items(), desc="timing", unit="layer", total=len(layers))]
    if as_json:
        typer.echo(dumps({"device": _device_name(target), "threads": threads or torch.get_num_threads(),
                          "layers": [r.to_dict() for r in results]}))
        return
    what = "training steps (forward + backward)" if train else "inference calls"
    typer.echo(f"device {_device_name(target)}, {what}, batch {batch}, {seq} steps, median of {rounds} rounds, "
               f"{threads or torch.get_num_threads()} CPU threads")
    header = ("layer", "shape", "dense ms", "rebuilt ms", "factored ms", "dense/fact", "rebuilt/fact", "auto")
    rows = [(r.name, r.shape, f"{r.dense_ms:.2f}", f"{r.rebuilt_ms:.2f}", f"{r.factored_ms:.2f}",
             f"{r.speedup:.1f}x", f"{r.rebuilt_ms / r.factored_ms:.1f}x", r.auto) for r in results]
    if train:  # memory: kept for the backward, and the step's peak beyond the parameters (MB)
        header += ("saved MB d/r/f", "peak MB d/r/f")
        rows = [row + ("/".join(f"{r.saved_mb[k]:.0f}" for k in ("dense", "rebuilt", "factored")),
                       "/".join("-" if r.peak_mb[k] is None else f"{r.peak_mb[k]:.0f}"
                                for k in ("dense", "rebuilt", "factored")))
                for row, r in zip(rows, results)]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _device(text: str) -> torch.device:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LRCompressError(f"--device {text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    return device


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
