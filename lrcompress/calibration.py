"""Second moments of what each target weight multiplies, gathered by running calibration data.

A data-aware fit (``lrcompress.whitening``) needs, for a target weight ``W``, the second moment
``C = E[v v^T]`` of the vectors ``v`` it multiplies, pooled over every sample and time step:

- ``weight_hh`` (recurrent weight): the previous state ``h_{t-1}`` at every step, the initial
  state ``h_0`` (given, or zeros) included; for an LSTM with ``proj_size`` the projected state.
- ``weight_ih`` (input weight): the layer input ``x_t``; above layer 0, the previous layer's
  output, both directions concatenated.
- ``weight_hr`` (LSTM projection): the cell's output before projection, ``o_t * tanh(c_t)``.
- ``nn.Linear.weight``: the layer's input.

``nn.GRU``/``nn.LSTM``/``nn.RNN`` are fused kernels, so a hook sees only the module's input and
output: it recomputes every layer's and direction's state sequence from the module's own weights
on the same input (one single-layer kernel call per layer, as ``nn.RNNBase.forward`` makes),
honouring ``batch_first``, unbatched input, the initial state and packed sequences (only the
valid steps of each sequence count). Cells (``nn.GRUCell``/``LSTMCell``/``RNNCell``) and the
factored ``lrcompress.nn`` layers are hooked alike. Sums are kept in float64 on the device the
vectors live on: memory O(n^2) per target, whatever the amount of data.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from .errors import ConfigError, LRCompressError, TargetError
from .progress import bar

_KERNELS = {"GRU": _VF.gru, "LSTM": _VF.lstm, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
_RNN_WEIGHT = re.compile(r"^weight_(?P<kind>hh|ih|hr)_l(?P<layer>\d+)(?P<rev>_reverse)?$")


@dataclass
class SecondMoment:
    """``C = E[v v^T]`` (``n x n``, float64) of the ``count`` vectors ``v`` a weight multiplied,
    and their mean ``E[v]`` (``n``, float64). Uncentred: ``W v`` is what the fit must keep."""

    C: Tensor
    count: int
    mean: Tensor


class _Accumulator:
    """Running float64 sums of ``v v^T`` and ``v``; created on the device of the first vectors."""

    def __init__(self) -> None:
        self.outer: Tensor | None = None
        self.total: Tensor | None = None
        self.count = 0

    def add(self, v: Tensor) -> None:
        v = v.reshape(-1, v.shape[-1]).to(torch.float64)
        if self.outer is None:
            self.outer = v.new_zeros(v.shape[1], v.shape[1])
            self.total = v.new_zeros(v.shape[1])
        self.outer.addmm_(v.mT, v)
        self.total += v.sum(0)
        self.count += v.shape[0]

    def moment(self) -> SecondMoment:
        return SecondMoment(self.outer / self.count, self.count, self.total / self.count)


def collect_second_moments(model: nn.Module, data: Any, names: Iterable[str], *,
                           forward: Callable[[nn.Module, Any], Any] | None = None,
                           progress: bool | None = False) -> dict[str, SecondMoment]:
    """Run ``data`` through ``model`` and return the second moment of each named weight's input.

    ``names``: target weights as ``targets.Candidate.name`` gives them (``rnn.weight_hh_l0``,
    ``rnn.weight_ih_l1_reverse``, ``lstm.weight_hr_l0``, ``cell.weight_hh``, ``fc.weight``).
    ``data``: one batch (a Tensor, a PackedSequence or a dict of tensors), or an iterable of
    batches such as a ``DataLoader``. Each batch goes to ``forward(model, batch)`` when given;
    otherwise it is moved to the model's device and called as ``model(batch)`` (Tensor or
    PackedSequence), ``model(**batch)`` (dict) or ``model(batch[0])`` (tuple or list: the
    ``(inputs, targets)`` batches of a supervised loader; targets are ignored). The model runs
    in eval mode under ``no_grad``; every module's mode is restored after and nothing in the
    model changes. Every call of a hooked module counts, so a cell stepped in a loop pools all
    its steps. ``progress``: a bar per batch (``lrcompress.progress.bar`` rules).

    Returns ``{name: SecondMoment}`` with ``C`` of shape ``(n, n)``, ``n`` the weight's columns.
    Raises ``TargetError`` for a name that is not a recurrent, cell or Linear weight of
    ``model``, or that the data never reached; ``ConfigError`` for empty data, a batch it cannot
    call the model with, or non-finite activations.

    >>> gru = nn.GRU(4, 8, num_layers=2)
    >>> moments = collect_second_moments(gru, torch.randn(20, 3, 4), ["weight_hh_l1"])
    >>> moments["weight_hh_l1"].C.shape, moments["weight_hh_l1"].count
    (torch.Size([8, 8]), 60)
    """
    names = list(dict.fromkeys(names))
    wanted = _resolve(model, names)
    sums = {name: _Accumulator() for name in names}
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        model.eval()
        for module_name, weights in wanted.items():
            module = model.get_submodule(module_name)
            hook = partial(_hook, {w: sums[_join(module_name, w)] for w in weights})
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        batches = 0
        with torch.no_grad():
            for batch in bar(as_batches(data), progress=progress, desc="calibrating", unit="batch"):
                try:
                    run_batch(model, batch, forward)
                except LRCompressError:
                    raise
                except Exception as exc:  # torch's shape errors, a user's forward: say it was the calibration
                    detail = (str(exc).strip().splitlines() or [""])[0]
                    raise ConfigError(f"calibration batch {batches}: the model's call failed "
                                      f"({type(exc).__name__}: {detail}); check the batch's shape and keys, "
                                      "or pass forward=") from exc
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if not batches:
        raise ConfigError("calibration data holds no batch")
    for name, acc in sums.items():
        if not acc.count:
            raise TargetError(f"calibration data never reached {name} (is its module called by the model's forward?)")
        if not bool(torch.isfinite(acc.outer).all()):
            raise ConfigError(f"calibration statistics of {name} hold NaN or Inf: the model's activations are "
                              "not finite")
    return {name: acc.moment() for name, acc in sums.items()}


def _resolve(model: nn.Module, names: list[str]) -> dict[str, set[str]]:
    """``{module name: weight names}``; each name checked to be a weight the hooks can follow."""
    wanted: dict[str, set[str]] = {}
    for name in names:
        module_name, _, weight = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise TargetError(f"calibration target {name!r}: the model has no module {module_name!r}") from None
        if isinstance(module, nn.RNNBase):
            ok = _RNN_WEIGHT.match(weight) is not None and weight in module._flat_weights_names
        elif isinstance(module, nn.RNNCellBase):
            ok = weight in ("weight_ih", "weight_hh")
        else:
            ok = isinstance(module, nn.Linear) and weight == "weight"
        if not ok:
            raise TargetError(f"calibration target {name!r} is not a weight of an RNN layer, cell or nn.Linear "
                              f"({type(module).__name__})")
        wanted.setdefault(module_name, set()).add(weight)
    return wanted


def as_batches(data: Any) -> Iterable[Any]:
    """``data`` as an iterable of batches: one Tensor, PackedSequence or dict is one batch."""
    if isinstance(data, (Tensor, PackedSequence, Mapping)):
        return [data]
    if not isinstance(data, Iterable):
        raise ConfigError(f"calibration data must be a Tensor, a dict of tensors or an iterable of batches, "
                          f"got {type(data).__name__}")
    return data


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (Tensor, PackedSequence)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def run_batch(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None) -> Any:
    """The model's output on one calibration batch, called as ``collect_second_moments`` calls it:
    ``forward(model, batch)`` when given, else the batch moved to the model's device and passed
    as ``model(batch)``, ``model(**batch)`` (dict) or ``model(batch[0])`` (tuple or list)."""
    if forward is not None:
        return forward(model, batch)
    batch = _to(batch, next((p.device for p in model.parameters()), torch.device("cpu")))
    if isinstance(batch, (Tensor, PackedSequence)):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise ConfigError(f"cannot call the model with a calibration batch of type {type(batch).__name__}: "
                      "pass forward=")


def _hook(sums: dict[str, _Accumulator], module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    with parametrize.cached():  # a factored weight is rebuilt once per call, not once per use
        if isinstance(module, nn.RNNBase):
            y = output[0] if isinstance(output, (tuple, list)) and output else None
            for weight, v in _rnn_vectors(module, x, hx, y, set(sums)):
                sums[weight].add(v)
        elif isinstance(module, nn.RNNCellBase):
            if "weight_ih" in sums:
                sums["weight_ih"].add(x)
            if "weight_hh" in sums:
                h = hx[0] if isinstance(hx, (tuple, list)) else hx
                sums["weight_hh"].add(x.new_zeros(*x.shape[:-1], module.hidden_size) if h is None else h)
        else:
            sums["weight"].add(x)


def _rnn_vectors(m: nn.RNNBase, x: Tensor | PackedSequence, hx: Any, y: Any, wanted: set[str]):
    """Yield ``(weight name, vectors it multiplies)`` for an RNN layer's call, layer by layer.

    Works on the packed layout (rows of step 0, then step 1, ...; ``batch_sizes[t]`` rows at step
    t, longest sequences first): a padded input is a packed one with equal lengths. ``y``, the
    module's output, is the last layer's output sequence, so a one-layer module needs no rerun.
    """
    lstm, dirs = m.mode == "LSTM", 2 if m.bidirectional else 1
    h_size = m.proj_size or m.hidden_size
    if isinstance(x, PackedSequence):
        data, batch_sizes, order = x.data, x.batch_sizes, x.sorted_indices
    else:
        unbatched = x.dim() == 2
        seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if m.batch_first else x)
        data, order = seq.reshape(-1, seq.shape[-1]), None
        batch_sizes = torch.full((seq.shape[0],), seq.shape[1], dtype=torch.long)
        if unbatched and hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    B = int(batch_sizes[0])
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    if h0 is None:
        h0 = data.new_zeros(m.num_layers * dirs, B, h_size)
        c0 = data.new_zeros(m.num_layers * dirs, B, m.hidden_size) if lstm else None
    elif order is not None:  # the module sorts the given state the same way
        h0 = h0.index_select(1, order)
        c0 = c0.index_select(1, order) if lstm else None
    last = max(int(_RNN_WEIGHT.match(w).group("layer")) for w in wanted)
    for layer in range(last + 1):
        sfx = ["", "_reverse"][:dirs]
        for s in sfx:
            if f"weight_ih_l{layer}{s}" in wanted:
                yield f"weight_ih_l{layer}{s}", data
        if layer == last and not any(f"weight_{k}_l{layer}{s}" in wanted for k in ("hh", "hr") for s in sfx):
            break  # the outputs of this layer are not needed
        h_layer = h0[layer * dirs:(layer + 1) * dirs]
        out = _packed_rows(y, m.batch_first) if layer == m.num_layers - 1 else None
        if out is None or out.shape != (data.shape[0], dirs * h_size):  # a subclass may return other things
            names = [n for n in m._flat_weights_names if re.fullmatch(rf"\w+_l{layer}(_reverse)?", n)]
            state = (h_layer, c0[layer * dirs:(layer + 1) * dirs]) if lstm else h_layer
            with warnings.catch_warnings():  # cuDNN warns that these weights are not one flat buffer
                warnings.simplefilter("ignore")
                out = _KERNELS[m.mode](data, batch_sizes, state, [getattr(m, n) for n in names], m.bias, 1, 0.0,
                                       False, m.bidirectional)[0]
        for d, s in enumerate(sfx):
            hh, hr = f"weight_hh_l{layer}{s}", f"weight_hr_l{layer}{s}"
            if hh not in wanted and hr not in wanted:
                continue
            rows = _previous_rows(batch_sizes, reverse=d == 1).to(data.device)
            prev = torch.cat([h_layer[d], out[:, d * h_size:(d + 1) * h_size]])[rows]
            if hh in wanted:
                yield hh, prev
            if hr in wanted:
                yield hr, _lstm_cell_output(m, layer, s, data, prev, c0[layer * dirs + d], batch_sizes,
                                            reverse=d == 1)
        data = out


def _packed_rows(y: Any, batch_first: bool) -> Tensor | None:
    """A module output in the packed row layout of its input: (steps x batch, features)."""
    if isinstance(y, PackedSequence):
        return y.data
    if not isinstance(y, Tensor) or y.dim() not in (2, 3):
        return None
    if y.dim() == 2:  # unbatched
        return y
    return (y.transpose(0, 1) if batch_first else y).reshape(-1, y.shape[-1])


def _previous_rows(batch_sizes: Tensor, *, reverse: bool) -> Tensor:
    """For each packed row (step t, sequence i), the row of ``cat([h0, out])`` holding the state
    that step multiplies by ``weight_hh``: ``h0[i]`` at a sequence's first step in its direction
    (t = 0 forward, its last valid step in reverse), else the output of the step before it."""
    bs = batch_sizes.to(torch.long)
    B, N = int(bs[0]), int(bs.sum())
    start = torch.cat([bs.new_zeros(1), bs.cumsum(0)])  # start[t] = first row of step t; start[T] = N
    step = torch.repeat_interleave(torch.arange(len(bs)), bs)
    seq = torch.arange(N) - start[step]
    if not reverse:
        return torch.where(step == 0, seq, B + start[(step - 1).clamp_min(0)] + seq)
    after = torch.cat([bs, bs.new_zeros(1)])[step + 1]  # sequences still running at step t + 1
    return torch.where(seq < after, B + start[step + 1] + seq, seq)


def _lstm_cell_output(m: nn.LSTM, layer: int, s: str, x: Tensor, prev: Tensor, c0: Tensor, batch_sizes: Tensor, *,
                      reverse: bool) -> Tensor:
    """``o_t * tanh(c_t)`` at every packed row: what ``weight_hr`` projects. The kernel returns
    only the projected outputs, so the gates are recomputed from them (``prev``) in one product
    and the cell state by its elementwise recurrence."""
    w = {k: getattr(m, f"{k}_l{layer}{s}") for k in ("weight_ih", "weight_hh")}
    gates = x @ w["weight_ih"].mT + prev @ w["weight_hh"].mT
    if m.bias:
        gates = gates + getattr(m, f"bias_ih_l{layer}{s}") + getattr(m, f"bias_hh_l{layer}{s}")
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    bs = batch_sizes.tolist()
    start = [0]
    for b in bs:
        start.append(start[-1] + b)
    c = torch.empty_like(i)
    steps = range(len(bs) - 1, -1, -1) if reverse else range(len(bs))
    for t in steps:
        rows = slice(start[t], start[t + 1])
        if not reverse:
            c_prev = c0[:bs[t]] if t == 0 else c[start[t - 1]:start[t - 1] + bs[t]]
        else:
            kept = bs[t + 1] if t + 1 < len(bs) else 0
            c_prev = torch.cat([c[start[t + 1]:start[t + 1] + kept], c0[kept:bs[t]]])
        c[rows] = f[rows] * c_prev + i[rows] * g[rows]
    return o * c.tanh()


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name
