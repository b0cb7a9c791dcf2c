"""Conversion speed and quality: one large GRU layer to low rank plus diagonal.

Converts the recurrent weight of ``nn.GRU(51, n)`` (three n x n gate blocks) at rank 64 with a
diagonal through ``lrc.compress(..., svd="auto")`` and puts, side by side in one run:

* the conversion time (best of ``--repeats`` after a warm-up run), against the time of the
  exact singular values of the same three blocks (the cheapest exact-SVD step);
* its relative Frobenius error, against exact optima computed from exact singular values:
  the Eckart-Young rank-64 optimum of W (no diagonal), and the optimum of the low-rank part
  for the diagonal the fit chose, ``min ||W - diag(D) - L R||`` (Eckart-Young on W - diag(D)).

Three weights: "trained-looking" (random orthogonal U, V, a decaying spectrum, plus noise), the
same plus a diagonal (where the diagonal term matters), and the default ``nn.GRU``
initialisation (a flat spectrum, the hardest case for a low-rank fit). ``--exact-fit`` also
times the same conversion with ``svd="exact"`` and reports its error.
Targets: conversion under 3 s on a 2-core CPU, error within 2% of the exact optimum.

    python benchmarks/bench_convert.py            # n = 4096 (exact SVDs take minutes on 2 cores)
    python benchmarks/bench_convert.py --quick    # n = 2048
    python benchmarks/bench_convert.py --quick --exact-fit
    python benchmarks/bench_convert.py --quality --n 1024 --threads 1   # fit quality at every rank
    python benchmarks/bench_convert.py --fit-cost --threads 1           # fit time / svd_lowrank time
    python benchmarks/bench_convert.py --fit-cost --threads 1 --json benchmarks/results/convert-fit-cost-threads1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import lrcompress as lrc
from lrcompress.factorize import Factors, fit_low_rank, fit_low_rank_plus_diagonal

from _common import machine, timed  # this folder: see _common.py

INPUTS = 51
GATES = 3
KINDS = {
    "trained": "trained-looking weights (orthogonal U, V; s_i = 4 exp(-i/48); noise)",
    "trained+diag": "trained-looking weights plus a diagonal U(0, 1)",
    "init": "default nn.GRU initialisation",
}


def trained_looking(n: int, *, diagonal: bool = False, seed: int = 0, width: int = 512) -> Tensor:
    """Per gate: U diag(s) V^T with orthonormal U, V (n x width), s_i = 4 exp(-i/48), plus noise.

    The noise has entries N(0, 0.1^2 / n) (spectral norm ~0.2, 5% of the top singular value).
    ``diagonal`` adds diag(u), u ~ U(0, 1): self-connections, which a low rank captures badly.
    """
    gen = torch.Generator().manual_seed(seed)
    width = min(width, n)
    s = 4.0 * torch.exp(-torch.arange(width, dtype=torch.float32) / 48.0)
    blocks = []
    for _ in range(GATES):
        U = torch.linalg.qr(torch.randn(n, width, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(n, width, generator=gen)).Q
        block = (U * s) @ V.T + torch.randn(n, n, generator=gen) * (0.1 / math.sqrt(n))
        if diagonal:
            block += torch.diag(torch.rand(n, generator=gen))
        blocks.append(block)
    return torch.cat(blocks)


def make_gru(n: int, weight: Tensor | None, seed: int = 0) -> nn.GRU:
    torch.manual_seed(seed)
    model = nn.GRU(INPUTS, n)
    if weight is not None:
        with torch.no_grad():
            model.weight_hh_l0.copy_(weight)
    return model


def timed_convert(model: nn.GRU, rank: int, svd: str, repeats: int, *,
                  warmup: bool = True) -> tuple[float, float, nn.GRU, lrc.Report]:
    """Best wall and CPU seconds of ``repeats`` conversions (after a warm-up one), the last model, report.

    On a machine shared with other jobs the wall time also holds the waiting; with ``--threads 1``
    the CPU time is what the work itself costs (with more threads it also counts their spinning).
    """
    if warmup:
        lrc.compress(copy.deepcopy(model), rank=rank, diag=True, svd=svd)
    wall = cpu = math.inf
    for _ in range(repeats):
        m = copy.deepcopy(model)  # compress works in place: a fresh copy per run, outside the timer
        run_wall, run_cpu, report = timed(lambda: lrc.compress(m, rank=rank, diag=True, svd=svd))
        wall, cpu = min(wall, run_wall), min(cpu, run_cpu)
    return wall, cpu, m, report


def time_fit_and_svd_lowrank(blocks: Tensor, rank: int, repeats: int) -> tuple[float, float, float, float, Factors]:
    """Best wall and CPU seconds of the default diagonal fit and of one plain randomized SVD of the same blocks.

    The reference is ``torch.svd_lowrank(A, q=rank + 10, niter=4)`` on the (G, n, n) blocks: a
    low-rank fit at its usual setting. Timed alternately, so machine load hits both alike.
    """
    fit_low_rank_plus_diagonal(blocks, rank)  # warm-up
    t_fit = t_svd = cpu_fit = cpu_svd = math.inf
    for _ in range(repeats):
        wall, cpu, fit = timed(lambda: fit_low_rank_plus_diagonal(blocks, rank))
        t_fit, cpu_fit = min(t_fit, wall), min(cpu_fit, cpu)
        wall, cpu, _ = timed(lambda: torch.svd_lowrank(blocks, q=rank + 10, niter=4))
        t_svd, cpu_svd = min(t_svd, wall), min(cpu_svd, cpu)
    return t_fit, t_svd, cpu_fit, cpu_svd, fit


def eckart_young(s: Tensor, rank: int) -> float:
    """sqrt(sum over all blocks of the discarded s_i^2), in float64."""
    return float((s.double()[..., rank:] ** 2).sum().sqrt())


def bench(label: str, model: nn.GRU, rank: int, repeats: int, exact_fit: bool) -> dict:
    n = model.hidden_size
    blocks = model.weight_hh_l0.detach().reshape(GATES, n, n)
    norm = float(torch.linalg.vector_norm(blocks, dtype=torch.float64))
    r = dict(label=label, n=n)
    r["t_convert"], r["cpu_convert"], converted, report = timed_convert(model, rank, "auto", repeats)
    r["err_lrd"] = report.targets[0].rel_error
    r["t_fit"], r["t_svd_lowrank"], r["cpu_fit"], r["cpu_svd_lowrank"], fit = time_fit_and_svd_lowrank(
        blocks, rank, repeats)
    r["fit_end"] = f"{fit.diag_iterations} iterations, {fit.diag_stop}, last change {fit.diag_last_change:.1e}"
    D = converted.parametrizations.weight_hh_l0.original2.detach()

    lowrank = fit_low_rank(blocks, rank, method="auto")  # the plain low-rank fit, same SVD path
    r["err_lowrank"], r["method"] = lowrank.rel_error, lowrank.method

    start = time.perf_counter()
    s_W = torch.linalg.svdvals(blocks)
    r["t_svdvals"] = time.perf_counter() - start
    r["opt_W"] = eckart_young(s_W, rank) / norm
    r["opt_given_D"] = eckart_young(torch.linalg.svdvals(blocks - torch.diag_embed(D)), rank) / norm
    if exact_fit:  # the same alternating fit with exact SVDs (its default: up to 50 iterations)
        r["t_exact_fit"], _, _, exact = timed_convert(model, rank, "exact", 1, warmup=False)
        r["err_exact_fit"] = exact.targets[0].rel_error
    return r


def show(r: dict, rank: int) -> None:
    def line(label: str, value: str, note: str = "") -> None:
        print(f"  {label:<54}{value:>10}   {note}".rstrip())

    def verdict(good: bool) -> str:
        return "met" if good else "MISSED"

    q_lrd, q_lr = r["err_lrd"] / r["opt_given_D"], r["err_lowrank"] / r["opt_W"]
    print(f"\n== {r['label']}\n   nn.GRU({INPUTS}, {r['n']}).weight_hh_l0 = 3 blocks {r['n']}x{r['n']}, rank {rank}")
    line(f"time, lrc.compress(rank={rank}, diag=True, svd='auto')", f"{r['t_convert']:.2f} s",
         f"target < 3 s: {verdict(r['t_convert'] < 3)}")
    line("CPU time of that conversion (all threads)", f"{r['cpu_convert']:.2f} s")
    ratio = r["t_fit"] / r["t_svd_lowrank"]
    line("time, fit_low_rank_plus_diagonal (the fit alone)", f"{r['t_fit']:.2f} s",
         f"CPU {r['cpu_fit']:.2f} s; {r['fit_end']}")
    line(f"time, torch.svd_lowrank(q={rank + 10}, niter=4), same blocks", f"{r['t_svd_lowrank']:.2f} s",
         f"CPU {r['cpu_svd_lowrank']:.2f} s; fit / svd_lowrank {ratio:.2f}x wall, "
         f"{r['cpu_fit'] / r['cpu_svd_lowrank']:.2f}x CPU, target <= 2.5x: {verdict(ratio <= 2.5)}")
    line("time, exact svdvals of the 3 blocks (values only)", f"{r['t_svdvals']:.2f} s",
         f"{r['t_svdvals'] / r['t_convert']:.1f}x the conversion")
    if "t_exact_fit" in r:
        line("time, the same conversion with svd='exact'", f"{r['t_exact_fit']:.2f} s",
             f"{r['t_exact_fit'] / r['t_convert']:.1f}x the conversion")
    line("rel. error, low rank + diagonal (auto)", f"{r['err_lrd']:.5f}")
    line("exact optimum of L R for the fitted diagonal", f"{r['opt_given_D']:.5f}",
         f"auto / optimum {q_lrd:.4f}, target <= 1.02: {verdict(q_lrd <= 1.02)}")
    if "err_exact_fit" in r:
        line("rel. error, low rank + diagonal (svd='exact')", f"{r['err_exact_fit']:.5f}",
             f"auto / exact {r['err_lrd'] / r['err_exact_fit']:.4f}")
    line(f"rel. error, low rank only ({r['method']} SVD)", f"{r['err_lowrank']:.5f}")
    line(f"exact rank-{rank} optimum without diagonal (Eckart-Young)", f"{r['opt_W']:.5f}",
         f"low rank / optimum {q_lr:.4f}, target <= 1.02: {verdict(q_lr <= 1.02)}")
    line("error removed by the diagonal, vs the best low rank", f"{100 * (1 - r['err_lrd'] / r['opt_W']):.1f} %")


def classic_alternation(W: Tensor, rank: int, iters: int) -> float:
    """Relative error of the textbook alternation (exact SVD of W - diag(D), then D = diag(W - L R))."""
    D = torch.zeros(W.shape[:-1], dtype=W.dtype)
    for _ in range(iters):
        U, S, Vh = torch.linalg.svd(W - torch.diag_embed(D), full_matrices=False)
        LR = (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]
        D = torch.diagonal(W - LR, dim1=-2, dim2=-1).clone()
    return float(torch.linalg.norm(W - LR - torch.diag_embed(D)) / torch.linalg.norm(W))


def quality_sweep(n: int, reference_iters: int, classic_iters: int) -> list[dict]:
    """Default fit (auto, default iterations) against a long exact fit at ranks n/8, n/4, n/4+1, n/2.

    Weights: trained-looking blocks (s_i = 4 exp(-i/48), width n/2) plus noise plus a strong
    diagonal 1 + U(0, 1). ``auto`` switches from randomized to exact SVD between n/4 and n/4+1
    when n >= factorize.RANDOMIZED_MIN_DIM. The reference is the exact fit in float64 with
    ``reference_iters`` iterations and no tolerance; ``classic_iters`` > 0 adds the textbook
    alternation (the fit before the fixed-subspace step) for comparison. Returns the rows as dicts.
    """
    W = trained_looking(n, diagonal=False, width=n // 2).reshape(GATES, n, n)
    gen = torch.Generator().manual_seed(1)
    W = W + torch.diag_embed(1 + torch.rand(GATES, n, generator=gen))
    print(f"\n== fit quality, 3 blocks {n}x{n}: trained-looking + noise + diagonal 1 + U(0, 1)")
    print("| rank | method | iterations, end | error (default) | reference | default / reference | time |"
          + (" classic | classic / reference |" if classic_iters else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if classic_iters else ""))
    rows = []
    for rank in (n // 8, n // 4, n // 4 + 1, n // 2):
        wall, _, f = timed(lambda: fit_low_rank_plus_diagonal(W, rank))
        ref = fit_low_rank_plus_diagonal(W.double(), rank, method="exact", max_iter=reference_iters, tol=0.0)
        row = (f"| {rank} | {f.method} | {f.diag_iterations}, {f.diag_stop} | {f.rel_error:.5f} | "
               f"{ref.rel_error:.5f} | {f.rel_error / ref.rel_error:.4f} | {wall:.2f} s |")
        rows.append({"rank": rank, "method": f.method, "iterations": f.diag_iterations, "stop": f.diag_stop,
                     "error": f.rel_error, "reference": ref.rel_error, "wall_s": wall})
        if classic_iters:
            c = classic_alternation(W.double(), rank, classic_iters)
            row += f" {c:.5f} | {c / ref.rel_error:.4f} |"
            rows[-1]["classic"] = c
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="hidden size (default 4096)")
    parser.add_argument("--quick", action="store_true", help="n = 2048")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (best is shown)")
    parser.add_argument("--weights", choices=[*KINDS, "all"], default="all")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--exact-fit", action="store_true",
                        help="also time the same conversion with svd='exact' (minutes at n=4096)")
    parser.add_argument("--fit-cost", action="store_true",
                        help="only time the diagonal fit against torch.svd_lowrank of the same blocks")
    parser.add_argument("--quality", action="store_true",
                        help="only the fit-quality sweep over ranks n/8, n/4, n/4+1, n/2 (n from --n)")
    parser.add_argument("--reference-iters", type=int, default=30, help="iterations of the --quality reference")
    parser.add_argument("--classic-iters", type=int, default=0,
                        help="--quality: also run the textbook alternation this many iterations")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    n = 2048 if args.quick else args.n
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    load_before = os.getloadavg()[0]
    rows = run(args, n)
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "machine": machine(), "n": n, "rank": args.rank,
            "repeats": args.repeats, "load_average": [load_before, os.getloadavg()[0]], "results": rows}, indent=1) + "\n")


def run(args: argparse.Namespace, n: int) -> list[dict]:
    """The mode ``args`` asks for (quality sweep, fit cost or conversion); its rows as dicts."""
    if args.quality:
        return quality_sweep(n, args.reference_iters, args.classic_iters)
    rows = []
    if args.fit_cost:
        for kind in KINDS if args.weights == "all" else [args.weights]:
            weight = None if kind == "init" else trained_looking(n, diagonal=kind == "trained+diag")
            blocks = make_gru(n, weight).weight_hh_l0.detach().reshape(GATES, n, n)
            t_fit, t_svd, cpu_fit, cpu_svd, fit = time_fit_and_svd_lowrank(blocks, args.rank, args.repeats)
            print(f"| {kind} | {t_fit:.2f} s | {cpu_fit:.2f} s | {t_svd:.2f} s | {cpu_svd:.2f} s | "
                  f"{t_fit / t_svd:.2f}x | {cpu_fit / cpu_svd:.2f}x | {fit.diag_iterations}, {fit.diag_stop} | "
                  f"{fit.rel_error:.5f} |", flush=True)
            rows.append({"weights": kind, "fit_wall_s": t_fit, "fit_cpu_s": cpu_fit, "svd_lowrank_wall_s": t_svd,
                         "svd_lowrank_cpu_s": cpu_svd, "iterations": fit.diag_iterations, "stop": fit.diag_stop,
                         "error": fit.rel_error})
        return rows
    for kind in KINDS if args.weights == "all" else [args.weights]:
        weight = None if kind == "init" else trained_looking(n, diagonal=kind == "trained+diag")
        result = bench(KINDS[kind], make_gru(n, weight), args.rank, args.repeats, args.exact_fit)
        show(result, args.rank)
        rows.append({"weights": kind, **result})
    return rows

if __name__ == "__main__":
    main()
