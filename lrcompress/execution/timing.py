"""Time one factored recurrent layer three ways: dense module, dense rebuild, factored loop.

``dense`` is a plain ``nn.GRU``/``nn.LSTM``/``nn.RNN`` holding the merged weights (cuDNN on GPU,
oneDNN/MKL on CPU): the speed of the uncompressed model. ``rebuilt`` is the converter's default
(rebuild W from the factors each call, then the same kernel). ``factored`` is ``accelerate(...,
mode="factored")``. The three are timed in interleaved rounds, so a load change on a shared
machine shifts all of them alike, and the median of the rounds is reported.

``train=True`` times a training step instead (zero the gradients, forward, backward of a fixed
linear function of the output; the factored path is ``execution.bptt``) and measures its
memory: the tensors autograd keeps between forward and backward, and the tensor memory of the
step at its peak.

    >>> t = time_layer(LowRankGRU(51, 1024, rank=64), batch=1, steps=50)
    >>> t.speedup > 1  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import dataclasses
import re
import statistics
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..config import TargetSpec
from ..convert import apply, merge
from ..errors import ConfigError, FormatError, TargetError
from ..io import stored_factors
from ..nn.rnn import LowRankGRU, LowRankLSTM, LowRankRNN
from ..targets import RNN_WEIGHT
from .cost import wall_seconds
from .dispatch import accelerate, plan

RNN_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l\d+(_reverse)?$")
KINDS = {"gru": (nn.GRU, LowRankGRU, 3), "lstm": (nn.LSTM, LowRankLSTM, 4), "rnn": (nn.RNN, LowRankRNN, 1)}


@dataclass
class Timing:
    """Median milliseconds per call of each execution, and the cost model's pick."""

    name: str
    shape: str
    batch: int
    steps: int
    device: str
    dense_ms: float
    rebuilt_ms: float
    factored_ms: float
    auto: str
    train: bool = False  # times of a training step (forward + backward), not of inference
    saved_mb: dict | None = None  # per path: MB autograd keeps for the backward (train only)
    peak_mb: dict | None = None  # per path: MB a training step adds at its peak (train only, when measured)

    @property
    def speedup(self) -> float:
        """Dense module time over factored time."""
        return self.dense_ms / self.factored_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def time_layer(module: nn.RNNBase, *, batch: int, steps: int, device: str | torch.device = "cpu",
               rounds: int = 5, name: str = "", threads: int | None = None, train: bool = False) -> Timing:
    """Time ``module`` (a factored recurrent layer, left unchanged) on random input: inference (no
    grad, eval) or, with ``train``, a training step, with its memory (``saved_megabytes``,
    ``peak_megabytes``)."""
    device = torch.device(device)
    runs = paths(module, device, train)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, steps) if module.batch_first else (steps, batch)
    x = torch.randn(*shape, module.input_size, generator=gen).to(device)
    calls = {k: (training_step(f, x) if train else _no_grad(f, x)) for k, f in runs.items()}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for call in calls.values():  # warm-up: kernels, TorchScript, CUDA-graph capture
            call()
            call()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, call in calls.items():
                times[k].append(wall_seconds(call, device))
        saved = peak = None
        if train:
            saved = {k: saved_megabytes(f, x) for k, f in runs.items()}
            peak = {k: peak_megabytes(runs[k], call) for k, call in calls.items()}
    finally:
        torch.set_num_threads(previous)
    choice = plan(runs["rebuilt"], batch=batch, steps=steps, device=device.type, training=train)[0].choice
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return Timing(name or type(module).__name__, describe(module), batch, steps, str(device), ms["dense"],
                  ms["rebuilt"], ms["factored"], choice, train, saved, peak)


def paths(module: nn.RNNBase, device: torch.device, train: bool) -> dict[str, nn.Module]:
    """The three executions of ``module`` (copies): dense (merged), rebuilt, factored."""
    base = copy.deepcopy(module).to(device).train(train)
    accelerate(base, "dense")
    return {
        "dense": merge(copy.deepcopy(base)),
        "rebuilt": base,
        "factored": accelerate(copy.deepcopy(base), "factored", training=train),
    }


def _no_grad(f: nn.Module, x: Tensor):
    def call() -> None:
        with torch.no_grad():
            f(x)

    return call


def training_step(f: nn.Module, x: Tensor):
    """A training step's work: clear gradients, forward, backward of a fixed function of the output."""
    target = None

    def call() -> None:
        nonlocal target
        f.zero_grad(set_to_none=True)
        out = f(x)[0]
        if target is None:
            target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        (out * target).sum().backward()

    return call


def saved_megabytes(f: nn.Module, x: Tensor) -> float:
    """MB of the distinct storages autograd keeps for the backward of one forward of ``f``
    (parameters excluded: they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in f.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f(x)[0]
    del out
    f.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def peak_megabytes(f: nn.Module, call) -> float | None:
    """MB of tensor memory one training step of ``f`` holds at its peak beyond the parameters
    (activations kept for the backward, temporaries, gradients), by torch's ``MemTracker``, which
    counts every tensor storage by device through a dispatch mode; None where torch lacks it."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a torch without the distributed tools
        return None
    tracker = MemTracker()
    tracker.track_external(f)
    with tracker:
        call()
    peak = 0.0
    for stats in tracker.get_tracker_snapshot("peak").values():
        params = sum(v for k, v in stats.items() if str(k).endswith(("PARAM", "BUFFER")))
        peak = max(peak, stats["Total"] - params)
    return peak / 2**20


def describe(module: nn.RNNBase) -> str:
    """A short shape label: ``gru 51->4096 x1 rank 64 +diag``, or for another structure its name
    and options (``structures.describe``): ``gru 16->16 kronecker factors 4x4, terms 2``,
    ``lstm 8->64 tt shape 4x4x4, ranks 4,4``, ``rnn 16->16 orthogonal negatives 3``.

    The recurrent weight of the first layer is described; when it is dense but the input weight is
    factored, that one is, marked ``ih``.
    """
    from .. import structures
    from ..parametrizations import factorization

    kind = {"GRU": "gru", "LSTM": "lstm", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}[module.mode]
    parts = [f"{kind} {module.input_size}->{module.hidden_size}"]
    if module.num_layers > 1 or module.bidirectional:
        parts.append(f"x{module.num_layers}{' bidir' if module.bidirectional else ''}")
    for name in ("weight_hh_l0", "weight_ih_l0"):
        p = structures.parametrization(module, name)
        if p is None:
            continue
        if name == "weight_ih_l0":
            parts.append("ih")
        low = factorization(module, name)
        if low is not None:
            parts.append(f"rank {low.rank}{' +diag' if low.diag else ''}{' tied' if low.tied else ''}")
        else:
            structure = structures.structure_of(p)
            parts.append(f"{structure} {structures.describe(structure, structures.json_options(p.options()))}")
        break
    return " ".join(parts)


def synthetic_layer(text: str, input_size: int) -> nn.RNNBase:
    """A randomly initialised factored layer from ``KIND:HIDDEN:RANK[:diag][:tied]``, e.g. ``gru:4096:64:diag``."""
    parts = [p.strip().lower() for p in text.split(":")]
    flags = set(parts[3:])
    if len(parts) < 3 or parts[0] not in KINDS or not flags <= {"diag", "tied"}:
        raise ConfigError(f"--synthetic must be KIND:HIDDEN:RANK[:diag][:tied] with KIND gru, lstm or rnn, "
                          f"got {text!r}")
    try:
        hidden, rank = int(parts[1]), int(parts[2])
    except ValueError:
        raise ConfigError(f"--synthetic needs integer HIDDEN and RANK, got {text!r}") from None
    if hidden < 1 or not 1 <= rank <= hidden or input_size < 1:
        raise ConfigError(f"--synthetic {text!r} with --input {input_size}: need 1 <= RANK <= HIDDEN and input >= 1")
    torch.manual_seed(0)
    return KINDS[parts[0]][1](input_size, hidden, rank=rank, diag="diag" in flags, tied="tied" in flags)


def recurrent_layers(tensors: dict[str, Tensor], specs: list[TargetSpec]) -> dict[str, nn.RNNBase]:
    """Standalone factored layers for every recurrent module of a compressed state dict, whatever
    the structure of its weights (low rank, Kronecker, tensor train, orthogonal).

    The file does not record ``batch_first`` or an RNN's nonlinearity; neither changes the
    cost, so the layers are time-major and tanh.
    """
    modules = sorted({s.module for s in specs if s.layer in KINDS and RNN_WEIGHT.match(s.weight)})
    if not modules:
        cells = any(s.layer in KINDS for s in specs)  # cells name their weights weight_hh, not weight_hh_l0
        raise TargetError("the file's factored recurrent weights are cells (nn.GRUCell ...): time them with "
                          "benchmarks/bench_cell.py" if cells else
                          "the file has no factored GRU, LSTM or RNN weights to benchmark")
    return {name: _rebuild_layer(name, tensors, [s for s in specs if s.module == name]) for name in modules}


def _rebuild_layer(prefix: str, tensors: dict[str, Tensor], specs: list[TargetSpec]) -> nn.RNNBase:
    start = f"{prefix}." if prefix else ""
    local = {k[len(start):]: t for k, t in tensors.items()
             if k.startswith(start) and RNN_KEY.match(k[len(start):].split(".")[0])}
    specs = [dataclasses.replace(s, module="") for s in specs]
    shapes = {k: tuple(t.shape) for k, t in local.items() if RNN_WEIGHT.match(k)}
    shapes.update({s.weight: (s.gates * s.rows, s.cols) for s in specs})
    dense_cls, _, gates = KINDS[specs[0].layer]
    try:
        hidden = shapes["weight_hh_l0"][0] // gates
        layers = 1 + max(int(RNN_WEIGHT.match(k).group("layer")) for k in shapes)
        options = dict(num_layers=layers, bias="bias_ih_l0" in local,
                       bidirectional=any(k.endswith("_reverse") for k in shapes))
        if "weight_hr_l0" in shapes:
            options["proj_size"] = shapes["weight_hr_l0"][0]
        module = dense_cls(shapes["weight_ih_l0"][1], hidden, **options)
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"cannot rebuild recurrent layer {prefix or '<root>'!r} from the file ({exc})") from None
    factors = {}
    for s in specs:
        keys = s.factor_keys()  # low-rank L, R (D), or another structure's originals and buffers
        if not all(k in local for k in keys.values()):
            raise FormatError(f"factors of {start}{s.weight} are missing from the file")
        factors[s.name] = stored_factors(s, {part: local.pop(k) for part, k in keys.items()})
    apply(module, specs, factors)
    missing, unexpected = module.load_state_dict(local, strict=False)
    if unexpected or [k for k in missing if "parametrizations" not in k]:
        raise FormatError(f"layer {prefix or '<root>'!r} does not match a {dense_cls.__name__}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module

