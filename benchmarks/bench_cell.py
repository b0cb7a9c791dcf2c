"""Per-step speed of factored recurrent cells: dense cell vs converted cell vs accelerated cell.

The decoder / streaming case: one ``cell(x, h)`` call per step, batch 1, eval mode, no autograd.
For each kind (GRUCell, LSTMCell), hidden size n in (512, 1024, 2048) and rank d in (n/8, 64),
it times, in interleaved rounds (so a load change on a shared machine shifts all alike):

- ``dense``: a plain ``nn.GRUCell``/``nn.LSTMCell`` holding the merged weights;
- ``converted``: the compressed cell as ``compress`` leaves it (rebuilds W = L R + D per call);
- ``accelerated``: the same cell after ``lrcompress.accelerate`` (mode auto; its pick is shown),

and prints microseconds per step (median of the rounds) with the ratios dense/converted and
dense/accelerated, once with 1 torch thread and once with PyTorch's default.

    python benchmarks/bench_cell.py                    # all cases, threads 1 and default
    python benchmarks/bench_cell.py --sizes 512 --inference-mode --steps 200
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch
from torch import nn
from _common import machine

import lrcompress as lrc
from lrcompress.execution import acceleration

KINDS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}


def builds(kind: str, n: int, d: int, inputs: int) -> dict[str, nn.Module]:
    """The three cells of one case, from one random dense cell (diagonal on, as the paper's best)."""
    torch.manual_seed(0)
    dense = KINDS[kind](inputs, n).eval()
    converted = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrc.compress(converted, rank=d, diag=True, svd="randomized")
    merged = lrc.merge(copy.deepcopy(converted))  # same weights as the factors, dense
    return {"dense": merged, "converted": converted, "accelerated": lrc.accelerate(copy.deepcopy(converted))}


def time_steps(cell: nn.Module, x: torch.Tensor, state, steps: int) -> float:
    """Seconds per step of ``steps`` chained calls (the state of one step feeds the next)."""
    start = time.perf_counter()
    for _ in range(steps):
        state = cell(x, state)
    return (time.perf_counter() - start) / steps


def run_case(kind: str, n: int, d: int, inputs: int, steps: int, rounds: int, grad_off) -> dict:
    cells = builds(kind, n, d, inputs)
    x = torch.randn(1, inputs)
    h = torch.zeros(1, n)
    state = (h, h) if kind == "lstm" else h
    times: dict[str, list[float]] = {k: [] for k in cells}
    with grad_off():
        for cell in cells.values():  # warm-up: TorchScript profiling runs, caches, allocator
            time_steps(cell, x, state, 20)
        for _ in range(rounds):
            for name, cell in cells.items():
                times[name].append(time_steps(cell, x, state, steps))
    us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
    acc = acceleration(cells["accelerated"])
    pick = next(iter(acc._choices.values()), "?") if acc is not None else "?"
    return {"kind": kind, "n": n, "d": d, **us, "pick": pick}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048", help="hidden sizes n")
    parser.add_argument("--inputs", type=int, default=0, help="input size [default: n/4]")
    parser.add_argument("--steps", type=int, default=100, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inference-mode", action="store_true", help="time under torch.inference_mode()")
    parser.add_argument("--threads", default="1,default", help="thread settings to run, e.g. 1,default")
    args = parser.parse_args()
    grad_off = torch.inference_mode if args.inference_mode else torch.no_grad
    default_threads = torch.get_num_threads()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    header = ["threads", "cell", "n", "d", "dense us", "converted us", "accel us", "dense/conv", "dense/accel", "pick"]
    rows = []
    for setting in args.threads.split(","):
        threads = default_threads if setting == "default" else int(setting)
        torch.set_num_threads(threads)
        for kind in KINDS:
            for n in (int(s) for s in args.sizes.split(",")):
                for d in sorted({n // 8, 64}):
                    r = run_case(kind, n, d, args.inputs or n // 4, args.steps, args.rounds, grad_off)
                    rows.append([threads, f"{kind}cell", n, d, f"{r['dense']:.1f}", f"{r['converted']:.1f}",
                                 f"{r['accelerated']:.1f}", f"{r['dense'] / r['converted']:.2f}x",
                                 f"{r['dense'] / r['accelerated']:.2f}x", r["pick"]])
    torch.set_num_threads(default_threads)
    mode = "inference_mode" if args.inference_mode else "no_grad"
    print(f"{machine()}{load}; batch 1, eval, {mode}, input n/4 unless --inputs; median of {args.rounds} rounds")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
