"""Start-up time of whole commands: ``lrcompress --help`` against ``python -c "import torch"``.

Runs each command as a fresh process ``--runs`` times, in turn (A B A B ...), after one
uncounted warm-up each, and records the wall time and the CPU time (user + system, of the child
process) of every run. The figure to quote is the median; the paired ratio A/B is taken run by run.

    python benchmarks/bench_startup.py --runs 7 --json benchmarks/results/cli-startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_name  # this folder: see _common.py

COMMANDS = {
    "lrcompress --help": ["lrcompress", "--help"],
    "lrcompress convert --help": ["lrcompress", "convert", "--help"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``argv``; its output is discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(runs: int) -> dict:
    for argv in COMMANDS.values():  # warm-up: file caches, .pyc files
        run_once(argv)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, argv in COMMANDS.items():
            times[name].append(run_once(argv))
    rows = []
    for name, samples in times.items():
        walls, cpus = [w for w, _ in samples], [c for _, c in samples]
        rows.append({"command": name, "runs": runs, "median_wall_s": statistics.median(walls),
                     "min_wall_s": min(walls), "median_cpu_s": statistics.median(cpus), "wall_s": walls,
                     "cpu_s": cpus})
    help_walls, torch_walls = times["lrcompress --help"], times['python -c "import torch"']
    ratio = statistics.median(a[0] / b[0] for a, b in zip(help_walls, torch_walls))
    return {"rows": rows, "help_over_import_torch_wall": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="counted runs of each command (default 7)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = measure(args.runs)
    summary = {"command": "python benchmarks/bench_startup.py " + shlex.join(sys.argv[1:]),
               "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "load_before": load_before,
               "load_after": os.getloadavg()[0], **result}
    for row in result["rows"]:
        print(f"{row['command']:30s} median {row['median_wall_s']:.2f} s wall ({row['median_cpu_s']:.2f} s CPU), "
              f"fastest {row['min_wall_s']:.2f} s")
    print(f"lrcompress --help / import torch (median of the paired wall ratios): "
          f"{result['help_over_import_torch_wall']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
