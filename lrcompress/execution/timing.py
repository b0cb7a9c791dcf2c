"""Time one factored recurrent layer three ways: dense module, dense rebuild, factored loop.

``dense`` is a plain ``nn.GRU``/``nn.LSTM``/``nn.RNN`` holding the merged weights (cuDNN on GPU,
oneDNN/MKL on CPU): the speed of the uncompressed model. ``rebuilt`` is the converter's default
(rebuild W from the factors each call, then the same kernel). ``factored`` is ``accelerate(...,
mode="factored")``. The three are timed in interleaved rounds, so a load change on a shared
machine shifts all of them alike, and the median of the rounds is reported.

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
from ..factorize import Factors
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

    @property
    def speedup(self) -> float:
        """Dense module time over factored time."""
        return self.dense_ms / self.factored_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def time_layer(module: nn.RNNBase, *, batch: int, steps: int, device: str | torch.device = "cpu",
               rounds: int = 5, name: str = "", threads: int | None = None) -> Timing:
    """Time ``module`` (a factored recurrent layer, left unchanged) on random input, no grad, eval."""
    device = torch.device(device)
    base = copy.deepcopy(module).to(device).eval()
    accelerate(base, "dense")
    runs = {
        "dense": merge(copy.deepcopy(base)),
        "rebuilt": base,
        "factored": accelerate(copy.deepcopy(base), "factored"),
    }
    gen = torch.Generator().manual_seed(0)
    shape = (batch, steps) if module.batch_first else (steps, batch)
    x = torch.randn(*shape, module.input_size, generator=gen).to(device)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for f in runs.values():  # warm-up: kernels, TorchScript, CUDA-graph capture
                f(x)
                f(x)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(rounds):
                for k, f in runs.items():
                    times[k].append(wall_seconds(lambda: f(x), device))
    finally:
        torch.set_num_threads(previous)
    choice = plan(base, batch=batch, steps=steps, device=device.type)[0].choice
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return Timing(name or type(module).__name__, describe(module), batch, steps, str(device), ms["dense"],
                  ms["rebuilt"], ms["factored"], choice)


def describe(module: nn.RNNBase) -> str:
    """A short shape label, e.g. ``gru 51->4096 x1 rank 64 +diag``."""
    from ..parametrizations import factorization

    kind = {"GRU": "gru", "LSTM": "lstm", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}[module.mode]
    p = factorization(module, "weight_hh_l0")
    parts = [f"{kind} {module.input_size}->{module.hidden_size}"]
    if module.num_layers > 1 or module.bidirectional:
        parts.append(f"x{module.num_layers}{' bidir' if module.bidirectional else ''}")
    if p is not None:
        parts.append(f"rank {p.rank}{' +diag' if p.diag else ''}{' tied' if p.tied else ''}")
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
    """Standalone factored layers for every recurrent module of a compressed state dict.

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
        keys = list(s.factor_keys().values())
        if not all(k in local for k in keys):
            raise FormatError(f"factors of {start}{s.weight} are missing from the file")
        factors[s.name] = Factors(*(local.pop(k) for k in keys))
    apply(module, specs, factors)
    missing, unexpected = module.load_state_dict(local, strict=False)
    if unexpected or [k for k in missing if "parametrizations" not in k]:
        raise FormatError(f"layer {prefix or '<root>'!r} does not match a {dense_cls.__name__}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module
