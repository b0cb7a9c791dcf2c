"""Training-step speed: a converted low-rank-plus-diagonal GRU against the dense nn.GRU.

One step is forward + backward of ``MSE(output, target)`` through the whole sequence, with
gradients cleared before each step. The LRD model is the dense one after
``lrc.compress(rank=d, diag=True)``: same state size, the weight rebuilt as L R + diag(D) once
per forward, then the same dense kernel (cuDNN on GPU). The two models are timed alternately
in one run, so machine noise hits both alike; the table shows the median ms per step, their
ratio LRD / dense, the median of the per-pair ratios and, on CPU, the process CPU time.

Targets: LRD within 1.10x of dense cuDNN on GPU, within 1.15x of dense on CPU.

    python benchmarks/bench_train_step.py --device cpu --quick
    python benchmarks/bench_train_step.py --device cpu --threads 1 --json benchmarks/results/train-step-cpu-threads1.json
    python benchmarks/bench_train_step.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import lrcompress as lrc

from _common import machine, timed  # this folder: see _common.py


@dataclass(frozen=True)
class Case:
    hidden: int
    steps: int  # sequence length T
    batch: int
    inputs: int
    rank: int

    def __str__(self) -> str:
        return f"n={self.hidden} T={self.steps} B={self.batch} in={self.inputs} d={self.rank}"


CASES = [Case(128, 784, 20, 1, 24), Case(1000, 100, 128, 51, 64)]
QUICK_STEPS = {784: 196, 100: 25}  # --quick: shorter sequences for a CPU


class Timer:
    """(wall ms, CPU ms) of a callable: CUDA events on GPU (CPU ms = nan), perf_counter on CPU.

    On a CPU shared with other jobs, wall time also holds waiting for a core; the process CPU
    time does not (with one thread it is the work itself; more threads add their spinning).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> tuple[float, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), math.nan
        wall, cpu, _ = timed(fn)
        return 1e3 * wall, 1e3 * cpu


def step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out, _ = model(x)
        nn.functional.mse_loss(out, target).backward()

    return step


def bench(case: Case, device: torch.device, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    dense = nn.GRU(case.inputs, case.hidden).to(device)
    lrd = copy.deepcopy(dense)
    lrc.compress(lrd, rank=case.rank, diag=True)
    x = torch.randn(case.steps, case.batch, case.inputs, device=device)
    target = torch.randn(case.steps, case.batch, case.hidden, device=device)
    steps = {"dense": step_fn(dense, x, target), "lrd": step_fn(lrd, x, target)}
    timer = Timer(device)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for i in range(repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))  # neither always goes first
        for name in order:
            times[name].append(timer(steps[name]))
    median = {name: [statistics.median(t[k] for t in times[name]) for k in (0, 1)] for name in steps}
    pairs = [a[0] / b[0] for a, b in zip(times["lrd"], times["dense"])]
    return {"dense": median["dense"], "lrd": median["lrd"], "pair_ratio": statistics.median(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="shorter sequences (T/4), for a CPU")
    parser.add_argument("--warmup", type=int, help="untimed steps per model (default 2 CPU, 10 GPU)")
    parser.add_argument("--repeats", type=int, help="timed steps per model (default 7 CPU, 50 GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--case", type=int, choices=range(len(CASES)), help="run only this case (0 or 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    repeats = args.repeats if args.repeats is not None else (50 if gpu else 7)
    target = 1.10 if gpu else 1.15
    print(f"machine: {machine(device)}")
    print(f"train step = zero_grad + forward + MSE backward; median of {repeats} alternating steps "
          f"after {warmup} warm-up")
    print("ratio = LRD / dense of the median wall times; pairs = median of the per-pair wall ratios"
          + ("" if gpu else "; cpu = of the median process CPU times"))
    print()
    header = (f"{'case':<32}{'dense ms':>10}{'LRD ms':>10}{'ratio':>8}{'pairs':>8}"
              + ("" if gpu else f"{'dense cpu':>11}{'LRD cpu':>10}{'cpu':>7}") + f"   target <= {target:.2f}x")
    print(header)
    print("-" * len(header))
    load_before, rows = os.getloadavg()[0], []
    for i, case in enumerate(CASES):
        if args.case is not None and i != args.case:
            continue
        if args.quick:
            case = Case(case.hidden, QUICK_STEPS[case.steps], case.batch, case.inputs, case.rank)
        r = bench(case, device, warmup, repeats)
        (dense, dense_cpu), (lrd, lrd_cpu) = r["dense"], r["lrd"]
        ratio = lrd / dense
        row = f"{str(case):<32}{dense:>10.1f}{lrd:>10.1f}{ratio:>7.3f}x{r['pair_ratio']:>7.3f}x"
        if not gpu:
            row += f"{dense_cpu:>11.1f}{lrd_cpu:>10.1f}{lrd_cpu / dense_cpu:>6.3f}x"
        print(f"{row}   {'met' if ratio <= target else 'MISSED'}", flush=True)
        rows.append({**asdict(case), "case": str(case), "dense_ms": dense, "lrd_ms": lrd, "ratio": ratio,
                     "pair_ratio": r["pair_ratio"], "dense_cpu_ms": dense_cpu, "lrd_cpu_ms": lrd_cpu,
                     "cpu_ratio": lrd_cpu / dense_cpu, "target": target, "met": ratio <= target})
    if args.json:  # NaN (no CPU time on GPU) is written as NaN, which json.loads reads back
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "machine": machine(device), "warmup": warmup,
            "repeats": repeats, "load_average": [load_before, os.getloadavg()[0]], "results": rows}, indent=1) + "\n")

if __name__ == "__main__":
    main()
