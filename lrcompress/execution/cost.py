"""Which execution is faster for a layer: the dense rebuild (cuDNN/oneDNN) or the factored loop.

Per step, a weight of G blocks ``m x n`` costs the dense kernel ``B G m n`` multiply-adds and
``G m n`` weight reads; the factored loop ``B (G' d n + G m d)`` and ``G' d n + G m d`` reads
(``G' = 1`` when tied). A step takes the larger of its arithmetic time and its memory time, plus
a fixed per-step overhead; the dense path also rebuilds every factored weight once per call
(``G m d n`` multiply-adds), and the loop's unfused gate ops cost ``element`` per gate value.
A Kronecker or tensor-train weight (``execution.structured``) costs the loop its ``apply_macs``
and its parameter reads per step plus ``structured_call`` per contraction, and the dense path
its rebuild (``rebuild_macs``) once per call.
The speeds come from a ``Profile``: defaults are calibrated (see
docs/acceleration.md) and ``measure_profile`` re-measures them on the machine at hand.

    >>> estimate(WeightShape(3, 4096, 4096, 64), batch=1, steps=50, device="cpu").speedup > 20
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch


# A dense training step's recurrent products over their forward cost (forward, then a backward
# that measured 1.5x two forwards: bench --train, docs/benchmarks.md).
DENSE_TRAINING = 4.5
# The factored loop must be estimated this much faster to be picked: its many small ops make it
# the more load-sensitive path, and near a tie the dense kernel is the safer bet.
MARGIN = 0.85


@dataclass(frozen=True)
class Profile:
    """Speeds of one kind of device (rates in multiply-adds or bytes per second)."""

    flops: float  # multiply-adds/s of the factored loop's matmuls and of the dense rebuild
    dense_flops: float  # multiply-adds/s of the dense recurrent kernel (its gates included)
    bandwidth: float  # bytes/s streaming a weight that does not stay in cache
    cache_bandwidth: float  # bytes/s reading a weight that stays in cache
    cache_bytes: float  # weights up to this size per step stay in cache
    thin_bandwidth: float  # at most this many bytes/s for the rank-d products of a step
    dense_step: float  # fixed seconds per step and direction of the dense kernel
    factored_step: float  # fixed seconds per step and direction of the factored loop
    element: float  # seconds per gate value (B x G x m) per step of the factored loop's gate ops
    # seconds per contraction (Kronecker factor, TT core) of a structured product per step: its
    # einsum/matmul and reshapes, dispatched from Python, and the plain (unscripted) loop's share
    # (execution.structured; fitted to GRU steps at n=16 with 2 and 3 factors or cores, scaled to
    # this profile's factored_step: docs/acceleration.md)
    structured_call: float = 30e-6
    # fixed seconds per step, direction and pass (forward, backward) of the dense kernel in a
    # training step; None: dense_step. PyTorch's CPU RNN trains through many small per-step ops,
    # about 3x its inference step (fitted to the training steps of benchmarks/bench_training_choice.py,
    # n = 128-1024, batch 1-64; docs/benchmarks.md).
    dense_train_step: float | None = None


# CPU: measure_profile() with 1 thread on the 2-core benchmark machine of docs/benchmarks.md,
# rounded, with flops, dense_flops and element refitted to its batch-64 rank sweep. CUDA: fitted to H100 measurements (docs/acceleration.md) of
# dense cuDNN and of a factored step loop replayed as a CUDA graph; "cuda-eager" is that loop
# without a graph (PackedSequence input, autograd), whose ~12 launches per step cost ~10 us
# each: an estimate, not a measurement.
PROFILES = {
    "cpu": Profile(flops=30e9, dense_flops=22e9, bandwidth=12e9, cache_bandwidth=50e9, cache_bytes=24e6,
                   thin_bandwidth=50e9, dense_step=12e-6, factored_step=18e-6, element=7e-9,
                   dense_train_step=40e-6),
    "cuda": Profile(flops=25e12, dense_flops=20e12, bandwidth=3.0e12, cache_bandwidth=3.0e12, cache_bytes=0,
                    thin_bandwidth=0.4e12, dense_step=12e-6, factored_step=17e-6, element=4e-11),
}
PROFILES["cuda-eager"] = replace(PROFILES["cuda"], factored_step=120e-6)


@dataclass(frozen=True)
class WeightShape:
    """One weight as the cost model sees it: G blocks of ``rows x cols``, rank (0: dense)."""

    gates: int
    rows: int
    cols: int
    rank: int = 0
    tied: bool = False
    diag: bool = False
    recurrent: bool = True  # multiplied every step (else once per call, over all steps)
    # A Kronecker or TT weight (execution.structured; 0 otherwise): multiply-adds of its product
    # per input row (``apply_macs(1)``), its parameter count, the multiply-adds of rebuilding W
    # once, and the contractions (kernel calls) of one product.
    apply_macs: int = 0
    params: int = 0
    rebuild_macs: int = 0
    calls: int = 0

    def dense_macs(self) -> int:
        return self.gates * self.rows * self.cols

    def factored_macs(self) -> int:
        if self.apply_macs:
            return self.apply_macs
        if not self.rank:
            return self.dense_macs()
        right = (1 if self.tied else self.gates) * self.rank * self.cols
        return right + self.gates * self.rows * (self.rank + (1 if self.diag else 0))


@dataclass(frozen=True)
class Estimate:
    """Estimated seconds per call of each execution."""

    dense: float
    factored: float

    @property
    def speedup(self) -> float:
        return self.dense / self.factored

    @property
    def choice(self) -> str:
        return "factored" if self.factored < MARGIN * self.dense else "dense"


def estimate(weights: WeightShape | list[WeightShape], *, batch: int, steps: int, device: str = "cpu",
             itemsize: int = 4, directions: int = 1, profile: Profile | None = None,
             training: bool = False) -> Estimate:
    """Seconds per call of the dense rebuild and of the factored loop for these weights.

    ``directions`` counts the sequential recurrences (layers x directions) the weights belong to.
    ``training``: a training step (forward and backward). Each factored product then costs three
    times its forward (forward, input gradient, weight gradient: ``execution.bptt``'s weight
    gradients are large products after the loop); the dense kernel's recurrent products 4.5 times
    (its backward measured 1.5 times slower than two forwards on the CPU, n = 128 to 4096), the
    rebuild three times (``W = L R`` and the gradients of ``L`` and ``R``), the per-step
    overheads twice (a forward and a backward loop; the dense kernel's is ``dense_train_step``
    there) and the factored loop's element-wise work
    twice (the backward's coefficients, computed a cache-sized chunk of steps at a time, cost
    about what the forward's gate ops do). Checked against measured training steps in
    docs/benchmarks.md.
    """
    p = profile or PROFILES[device]
    weights = [weights] if isinstance(weights, WeightShape) else weights
    products, passes = (3, 2) if training else (1, 1)
    dense_products = DENSE_TRAINING if training else 1
    dense = factored = 0.0
    step_dense = step_factored = 0.0
    for w in weights:
        if w.rank or w.apply_macs:  # the dense path rebuilds it and writes the dense matrix, once per call
            rebuild = w.rebuild_macs if w.apply_macs else w.dense_macs() * w.rank
            dense += products * (rebuild / p.flops + w.dense_macs() * itemsize / p.bandwidth)
        if not w.recurrent:  # one matmul over all steps
            dense += products * batch * steps * w.dense_macs() / p.flops
            factored += products * (batch * steps * w.factored_macs() / p.flops + w.calls * p.structured_call)
            continue
        d, f = _product_seconds(w, batch, itemsize, p)
        step_dense += dense_products * d
        step_factored += products * (f + w.calls * p.structured_call) + passes * batch * w.gates * w.rows * p.element
    overhead = p.dense_train_step if training and p.dense_train_step is not None else p.dense_step
    dense += steps * (directions * passes * overhead + step_dense)
    factored += steps * (directions * passes * p.factored_step + step_factored)
    return Estimate(dense, factored)


def estimate_cell(weights: list[WeightShape], *, batch: int, device: str = "cpu", itemsize: int = 4,
                  profile: Profile | None = None) -> Estimate:
    """Seconds per call of a recurrent cell (one step): the dense kernel on a cached dense weight,
    or the factored step.

    Unlike a layer's input projection, a cell's input weight is read at every call, so every
    weight costs what a recurrent one does; the dense weight is rebuilt once per weight version,
    not per call, so no rebuild is charged. Gate ops are charged once, for the recurrent weight.

    >>> estimate_cell([WeightShape(3, 512, 128, recurrent=False), WeightShape(3, 512, 512, 64)], batch=1).choice
    'factored'
    """
    p = profile or PROFILES[device]
    dense, factored = p.dense_step, p.factored_step
    for w in weights:
        d, f = _product_seconds(w, batch, itemsize, p)
        dense += d
        factored += f + (batch * w.gates * w.rows * p.element if w.recurrent else 0.0)
    return Estimate(dense, factored)


def _product_seconds(w: WeightShape, batch: int, itemsize: int, p: Profile) -> tuple[float, float]:
    """Seconds of one step's product with ``w``: (dense, factored); arithmetic or memory, the larger."""
    size = w.dense_macs() * itemsize
    dense = max(batch * w.dense_macs() / p.dense_flops, size / _bandwidth(size, p))
    size = (w.params if w.apply_macs else w.factored_macs()) * itemsize  # a structured weight reads its params
    factored = max(batch * w.factored_macs() / p.flops, size / min(p.thin_bandwidth, _bandwidth(size, p)))
    return dense, factored


def _bandwidth(size: float, p: Profile) -> float:
    return p.cache_bandwidth if size <= p.cache_bytes else p.bandwidth


def measure_profile(device: str | torch.device = "cpu", *, seconds: float = 0.2) -> Profile:
    """Measure a ``Profile`` on this machine, with the current thread setting (a few seconds)."""
    from ..nn.rnn import LowRankGRU  # cost is imported by the layer dispatch
    from .dispatch import accelerate

    device = torch.device(device)
    base = PROFILES["cuda" if device.type == "cuda" else "cpu"]

    def per_call(f) -> float:
        with torch.no_grad():
            return _median_time(f, seconds, device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    # The two products of a factored step at batch 64, n=1024, d=256: h R^T, then L per gate.
    h, right, left, bias = randn(64, 1024), randn(768, 1024).t(), randn(3, 256, 1024), randn(3, 1, 1024)
    flops = 2 * 64 * 768 * 1024 / per_call(
        lambda: torch.baddbmm(bias, torch.mm(h, right).view(64, 3, 256).transpose(0, 1), left))
    big, v = randn(8192, 4096), randn(4096)  # 128 MiB: past any cache
    bandwidth = big.numel() * 4 / per_call(lambda: big @ v)
    small = randn(1024, 1024)
    cache_bandwidth = small.numel() * 4 / per_call(lambda: small @ v[:1024])
    thin = randn(192, 2048)
    thin_bandwidth = thin.numel() * 4 / per_call(lambda: thin @ v[:2048])

    def layers(hidden: int, rank: int):
        dense = torch.nn.GRU(8, hidden).to(device).eval()
        factored = accelerate(LowRankGRU(8, hidden, rank=rank).to(device).eval(), mode="factored",
                              cuda_graphs=False)
        return dense, factored

    dense, factored = layers(8, 2)
    x = randn(200, 1, 8)
    dense_step = per_call(lambda: dense(x)) / 200
    factored_step = per_call(lambda: factored(x)) / 200
    trained = torch.nn.GRU(8, 8).to(device)
    dense_train_step = per_call(lambda: trained(x)[0].sum().backward()) / (200 * 2)  # forward + backward
    dense, factored = layers(1024, 1)
    x = randn(10, 64, 8)
    dense_flops = 64 * 3 * 1024 * 1024 / max(per_call(lambda: dense(x)) / 10 - dense_step, 1e-9)
    element = max(per_call(lambda: factored(x)) / 10 - factored_step, 0.0) / (64 * 3 * 1024)
    return replace(base, flops=flops, dense_flops=dense_flops, bandwidth=bandwidth, cache_bandwidth=cache_bandwidth,
                   thin_bandwidth=thin_bandwidth, dense_step=dense_step, factored_step=factored_step,
                   element=element, dense_train_step=dense_train_step)


def _median_time(f, seconds: float, device: torch.device) -> float:
    f()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        times.append(wall_seconds(f, device))
    return sorted(times)[len(times) // 2]


def wall_seconds(f, device: torch.device) -> float:
    """Wall time of one call of ``f``, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    f()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
