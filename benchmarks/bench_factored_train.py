"""Training steps through the factors (execution.bptt) against the rebuilt path and dense cuDNN/oneDNN.

Each case is a randomly initialised low-rank-plus-diagonal GRU timed three ways by
``lrcompress.execution.timing.time_layer(train=True)`` in interleaved rounds (median reported):
``dense`` a plain ``nn.GRU`` with the merged weights, ``rebuilt`` the converter's default (``W = L R
+ D`` rebuilt each step, then the same kernel), ``factored`` ``accelerate(training=True)``, whose
backward runs through ``L``, ``R`` and ``D``. A step is: zero the gradients, forward, backward of a
fixed linear function of the output. Memory: MB autograd keeps for the backward, and the step's
peak tensor memory beyond the parameters (torch's MemTracker). Targets (issue 10):

- CPU, B=32: n=4096, d=64 factored >= 20x faster than rebuilt; n=1024, d=64 >= 4x;
  n=128, d=24 (B=20, T=784) no slower than rebuilt.
- GPU: n=6985, d=64 tied >= 10x faster than rebuilt cuDNN; psMNIST n=128, d=24, B=128, T=784
  within 1.05x of dense cuDNN.

    python benchmarks/bench_factored_train.py --threads 1 --json benchmarks/results/factored-train-cpu.json
    python benchmarks/bench_factored_train.py --device cuda --json benchmarks/results/factored-train-cuda.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lrcompress.execution.timing import synthetic_layer, time_layer

from _common import machine  # this folder: see _common.py


@dataclass(frozen=True)
class Case:
    spec: str  # KIND:HIDDEN:RANK[:diag][:tied]
    batch: int
    steps: int
    inputs: int
    goal: str  # "rebuilt>=X": rebuilt/factored at least X; "dense<=X": factored/dense at most X
    rounds: int = 3


CPU = [
    Case("gru:4096:64:diag", 32, 20, 50, "rebuilt>=20"),
    Case("gru:4096:64:diag", 32, 100, 50, "rebuilt>=20", rounds=2),
    Case("gru:1024:64:diag", 32, 20, 51, "rebuilt>=4"),
    Case("gru:1024:64:diag", 32, 100, 51, "rebuilt>=4"),
    Case("gru:128:24:diag", 20, 784, 1, "rebuilt>=1"),
]
GPU = [
    Case("gru:6985:64:diag:tied", 32, 100, 50, "rebuilt>=10", rounds=10),
    Case("gru:128:24:diag", 128, 784, 1, "dense<=1.05", rounds=20),
]


def verdict(case: Case, t) -> tuple[float, bool]:
    kind, bound = case.goal.split(">=") if ">=" in case.goal else case.goal.split("<=")
    if kind == "rebuilt":
        ratio = t.rebuilt_ms / t.factored_ms
        return ratio, ratio >= float(bound)
    ratio = t.factored_ms / t.dense_ms
    return ratio, ratio <= float(bound)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--case", type=int, action="append", help="run only these cases (0-based; repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; the GPU figures are still to be measured")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = GPU if device.type == "cuda" else CPU
    print(f"machine: {machine(device)}")
    header = (f"{'case':<40}{'dense ms':>11}{'rebuilt ms':>12}{'factored ms':>13}{'ratio':>9}  goal"
              f"{'':<14}{'saved MB d/r/f':>16}{'peak MB d/r/f':>16}")
    print(header)
    print("-" * len(header))
    rows = []
    for i, case in enumerate(cases):
        if args.case and i not in args.case:
            continue
        module = synthetic_layer(case.spec, case.inputs)
        t = time_layer(module, batch=case.batch, steps=case.steps, device=device, rounds=case.rounds, train=True,
                       threads=args.threads)
        ratio, met = verdict(case, t)
        label = f"{case.spec} B={case.batch} T={case.steps}"
        saved = "/".join(f"{t.saved_mb[k]:.0f}" for k in ("dense", "rebuilt", "factored"))
        peak = "/".join("-" if t.peak_mb[k] is None else f"{t.peak_mb[k]:.0f}" for k in ("dense", "rebuilt", "factored"))
        print(f"{label:<40}{t.dense_ms:>11.1f}{t.rebuilt_ms:>12.1f}{t.factored_ms:>13.1f}{ratio:>8.2f}x  "
              f"{case.goal:<12}{'met' if met else 'MISSED':<6}{saved:>16}{peak:>16}", flush=True)
        rows.append({**t.to_dict(), "case": label, "goal": case.goal, "ratio": ratio, "met": met})
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
