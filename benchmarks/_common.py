"""What the benchmark scripts share: the line that describes the machine, CPU-side timing, and
the command line of the study scripts (subcommands, ``--threads``, a ``table`` command).

The scripts run as ``python benchmarks/<script>.py``; Python then puts this folder first on
``sys.path``, so ``from _common import machine`` works from any working directory.

    >>> wall, cpu, value = timed(lambda: sum(range(1000)))
    >>> value
    499500
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:  # torch only where a function needs it: summarize_run reads files only
    import torch

T = TypeVar("T")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name, else ``platform.processor()``)."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def machine(device: torch.device | None = None) -> str:
    """The GPU name with torch and cuDNN versions for a CUDA ``device``; else the CPU model, the
    torch thread count and the torch version."""
    import torch

    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def timed(fn: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, process CPU seconds, result) of one call of ``fn``.

    On a machine shared with other jobs the wall time also holds waiting for a core; the CPU time
    does not (with one thread it is the work itself; more threads add their spinning).
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def study_parser(doc: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser of a study script (its docstring's first paragraph as description) with
    ``--threads`` (default 1: the machine is shared) and required subcommands."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    return parser, parser.add_subparsers(dest="command", required=True)


def add_table_command(sub: argparse._SubParsersAction, handler: Callable, *, many: bool = False) -> None:
    """``table SUMMARY`` (``many``: one or more) calling ``handler(args)``: a summary as markdown."""
    p = sub.add_parser("table", help="measure summaries as markdown tables" if many else
                       "a measure summary as a markdown table")
    p.add_argument("summary", type=Path, **({"nargs": "+"} if many else {}))
    p.set_defaults(run_command=handler)


def run_study(parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse ``argv``, set torch's threads, run the chosen subcommand's ``run_command``."""
    import torch

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run_command(args)
