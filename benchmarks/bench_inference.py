"""Inference speed of factored recurrent layers: dense module vs dense rebuild vs factored loop.

Runs the cases the acceleration targets are stated for (docs/acceleration.md) and prints, per
case, the median time of each path (interleaved rounds), the dense/factored ratio against its
target, and whether the cost model's automatic pick is within 10% of the faster path.

    python benchmarks/bench_inference.py                        # CPU cases
    python benchmarks/bench_inference.py --threads 1 --markdown # table for docs/benchmarks.md
    python benchmarks/bench_inference.py --cost                 # + rank sweep at batch 64 (cost model)
    python benchmarks/bench_inference.py --threads 1 --cost --json benchmarks/results/inference-cost-threads1.json
    python benchmarks/bench_inference.py --device cuda          # GPU cases (H100/H200 targets)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lrcompress.execution.timing import synthetic_layer, time_layer

from _common import cpu_name  # this folder: see _common.py


@dataclass
class Case:
    layer: str  # KIND:HIDDEN:RANK[:diag][:tied]
    batch: int
    steps: int
    target: float | None  # dense/factored speedup asked for (None: only the auto pick is checked)
    inputs: int = 51


CPU_CASES = [
    Case("gru:4096:64:diag", 1, 50, 20.0),
    Case("gru:1000:64:diag", 1, 50, 4.0),
    Case("gru:1024:64:diag", 64, 50, None),
    Case("lstm:1024:64:diag", 1, 50, None),
    Case("gru:1024:64:tied", 1, 50, None),
    Case("gru:256:240", 1, 50, None),  # rank near full: dense should win
]
# Batch 64, n=1024: the cost model's pick must be within 10% of the faster path at every rank.
COST_CASES = [Case(f"gru:1024:{d}:diag", 64, 50, None) for d in (64, 256, 512, 768, 1024)]
CUDA_CASES = [
    Case("gru:2048:64:diag", 1, 200, None),
    Case("gru:4096:64:diag", 1, 200, 3.0),
    Case("gru:8192:64:diag", 1, 200, 8.0),
    Case("gru:1024:64:diag", 64, 200, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads [default: PyTorch's]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--cost", action="store_true", help="also sweep the rank at batch 64 (CPU, slow)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = CUDA_CASES if device.type == "cuda" else CPU_CASES + (COST_CASES if args.cost else [])
    threads = args.threads or torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    load = "" if load_before is None else f", load average {load_before:.1f}"
    print(f"device {device} ({name}), {threads} threads, torch {torch.__version__}, median of {args.rounds}{load}")
    header = ["layer", "batch", "T", "dense ms", "rebuilt ms", "factored ms", "dense/factored", "target", "auto",
              "auto ok"]
    rows, results = [], []
    for case in cases:
        with warnings.catch_warnings():  # "rank no smaller than dense" is the point of some cases
            warnings.simplefilter("ignore")
            module = synthetic_layer(case.layer, case.inputs)
        t = time_layer(module, batch=case.batch, steps=case.steps, device=device, rounds=args.rounds,
                       threads=args.threads)
        best = min(t.rebuilt_ms, t.factored_ms)
        picked = t.factored_ms if t.auto == "factored" else t.rebuilt_ms
        target = "-" if case.target is None else f">= {case.target:g}x {'met' if t.speedup >= case.target else 'MISSED'}"
        rows.append([case.layer, case.batch, case.steps, f"{t.dense_ms:.2f}", f"{t.rebuilt_ms:.2f}",
                     f"{t.factored_ms:.2f}", f"{t.speedup:.1f}x", target, t.auto,
                     "yes" if picked <= 1.1 * best else f"NO ({picked / best:.2f}x slower)"])
        results.append({**t.to_dict(), "layer": case.layer, "target": case.target, "auto_ok": picked <= 1.1 * best,
                        "auto_over_best": picked / best, "markdown": [str(c) for c in rows[-1]]})
    if args.json:
        where = name if device.type == "cuda" else cpu_name()  # platform.processor() is often just "x86_64"
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "machine": f"{where}, {threads} threads, torch {torch.__version__}",
            "rounds": args.rounds, "load_average": [load_before, os.getloadavg()[0] if load else None],
            "results": results}, indent=1) + "\n")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
    else:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
