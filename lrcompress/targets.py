"""Which weights a config selects: in a live model, or in a bare state dict by key and shape.

Recurrent layers (``nn.GRU``/``nn.LSTM``/``nn.RNN``), recurrent cells (``nn.GRUCell``/
``nn.LSTMCell``/``nn.RNNCell``) and ``lrcompress.nn.Highway`` layers are found by type; other
``nn.Linear`` layers by name (``config.targets``: names, suffixes or globs; one regex; or
``"all-linear"``, every Linear but the output layer, see ``all_linear_names``). In a bare state dict a recurrent layer is recognised from
its ``<prefix>.weight_hh_l<k>[_reverse]`` keys, a cell from ``<prefix>.weight_hh`` next to
``<prefix>.weight_ih``: the gate count (3 GRU, 4 LSTM, 1 RNN) follows from the shapes, an LSTM
with ``proj_size`` from ``weight_hr_l<k>``.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm as _TorchWeightNorm
from torch.nn.utils.weight_norm import WeightNorm as _WeightNormHook

from .config import ALL_LINEAR, CompressionConfig, selects
from .errors import FormatError, TargetError
from .nn.highway import Highway

RNN_GATES = {"GRU": ("gru", 3), "LSTM": ("lstm", 4), "RNN_TANH": ("rnn", 1), "RNN_RELU": ("rnn", 1)}
GATES_LAYER = {3: "gru", 4: "lstm", 1: "rnn"}
RNN_WEIGHT = re.compile(r"^weight_(?P<kind>hh|ih|hr)_l(?P<layer>\d+)(?P<rev>_reverse)?$")
HH_KEY = re.compile(r"^(?:(?P<prefix>.+)\.)?weight_hh_l\d+(_reverse)?$")
# Cells (nn.GRUCell, ...) name their weights without a layer suffix.
CELL_WEIGHT = re.compile(r"^weight_(?P<kind>hh|ih)$")
CELL_HH_KEY = re.compile(r"^(?:(?P<prefix>.+)\.)?weight_hh$")
ROLE = {"hh": "recurrent", "ih": "input", "hr": "projection"}
CELL_GATES = ((nn.GRUCell, ("gru", 3)), (nn.LSTMCell, ("lstm", 4)), (nn.RNNCell, ("rnn", 1)))


@dataclass(frozen=True)
class Candidate:
    """A weight selected for factoring, before its rank is decided."""

    module: str
    weight: str
    layer: str
    role: str
    gates: int
    rows: int
    cols: int

    @property
    def name(self) -> str:
        return f"{self.module}.{self.weight}" if self.module else self.weight

    @property
    def scopes(self) -> list[str]:
        """Names a pattern selects this weight by: itself, its module, then each enclosing module."""
        parts = self.module.split(".") if self.module else []
        return [self.name] + [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def find_targets(model: nn.Module, config: CompressionConfig, *, prefix: str = "") -> list[Candidate]:
    """Candidates in ``model``; raises ``TargetError`` when none, or a pattern matches nothing.

    ``prefix``: a wrapper's key prefix (``"module."``) that a regex in ``targets``/``exclude``
    may also be written with (list patterns are stripped of it by the caller).
    """
    modules = dict(model.named_modules())
    _check_patterns(config, modules, prefix)
    if config.targets == ALL_LINEAR:
        linear = set(all_linear_names(model))
    else:
        linear = {name for name, m in modules.items() if name and isinstance(m, nn.Linear)
                  and selects(config.targets, name, prefix)}
    for name, m in modules.items():
        if isinstance(m, Highway):
            linear |= {_join(name, "proposal"), _join(name, "gate")}
    found: list[Candidate] = []
    for name, m in modules.items():
        if isinstance(m, nn.RNNBase):
            layer, gates = RNN_GATES[m.mode]
            shapes = {w: tuple(getattr(m, w).shape) for w in m._flat_weights_names if w.startswith("weight")}
            found += _rnn_candidates(name, layer, gates, shapes, config)
        elif isinstance(m, nn.RNNCellBase):
            layer, gates = cell_kind(m)
            shapes = {w: tuple(getattr(m, w).shape) for w in ("weight_ih", "weight_hh")}
            found += _rnn_candidates(name, layer, gates, shapes, config)
        elif name in linear:
            found.append(Candidate(name, "weight", "linear", "linear", 1, *m.weight.shape))
    found = [c for c in found if not _excluded(c, config, prefix)]
    for c in found:  # weight norm is allowed: compress folds it
        owner = modules[c.module]
        if parametrize.is_parametrized(owner, c.weight) and not weight_norm_kind(owner, c.weight):
            raise TargetError(f"{c.name} is already parametrized (already compressed?)")
    if not found:
        raise TargetError(_none_found(config))
    return found


def all_linear_names(model: nn.Module) -> list[str]:
    """What ``targets="all-linear"`` selects (peft's shorthand): every ``nn.Linear`` of ``model``
    except its output layer, in module order.

    The output layer of a Hugging Face ``PreTrainedModel`` (any model with
    ``get_output_embeddings``) is the module that method returns (the LM head) and the
    ``classifier``/``score`` head (its last Linear when the head is a block), as peft decides;
    of any other model, or a ``PreTrainedModel`` where those rules find no head (a custom model
    whose head has another name), the last ``nn.Linear`` in module order. GPT-2-style
    ``transformers.pytorch_utils.Conv1D`` layers (a transposed Linear) are not supported:
    a model holding them raises ``TargetError`` naming them.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    conv1d = [n for n, m in named if type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")]
    if conv1d:
        raise TargetError(f"targets={ALL_LINEAR!r}: {', '.join(conv1d[:3])}{', ...' if len(conv1d) > 3 else ''} "
                          f"are transformers Conv1D layers (GPT-2 style), which lrcompress does not factor")
    linear = [n for n, m in named if isinstance(m, nn.Linear)]
    return [n for n in linear if n not in _output_layers(model, named, linear)]


def _output_layers(model: nn.Module, named: list[tuple[str, nn.Module]], linear: list[str]) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):  # a plain module: its last Linear
        return set(linear[-1:])
    heads = [get_output()] + [getattr(model, attr, None) for attr in ("classifier", "score")]
    out = set()
    for head in heads:
        if not isinstance(head, nn.Module):
            continue
        names = [n for n, m in named if m is head]
        inner = [n for n in linear if names and (n in names or n.startswith(names[0] + "."))]
        out |= set(inner[-1:])  # a Linear head itself, or the last Linear of a head block
    # A custom PreTrainedModel (no LM head, head not called classifier/score): its last Linear, as for any model.
    return out or set(linear[-1:])


def weight_norm_kind(module: nn.Module, name: str) -> str | None:
    """How PyTorch weight norm (``w = g v / ||v||``) drives ``module.<name>``, if it does.

    ``"parametrization"``: ``torch.nn.utils.parametrizations.weight_norm`` and nothing else on that
    weight; ``"hook"``: the deprecated ``torch.nn.utils.weight_norm`` (``<name>_g``/``<name>_v``
    parameters and a forward pre-hook); otherwise None. ``compress`` folds either into the dense
    weight before factoring it.
    """
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        return "parametrization" if len(plist) == 1 and isinstance(plist[0], _TorchWeightNorm) else None
    hooks = module._forward_pre_hooks.values()
    return "hook" if any(isinstance(h, _WeightNormHook) and h.name == name for h in hooks) else None


def find_state_dict_targets(tensors: dict[str, Tensor], config: CompressionConfig, *,
                            linear: Collection[str] | None = None) -> list[Candidate]:
    """Candidates in a bare state dict, recognised by key names and shapes.

    A state dict does not tell an ``nn.Linear`` from an ``nn.Embedding``: ``targets="all-linear"``
    needs ``linear``, the module names ``all_linear_names`` gives for the model (e.g. built on
    the meta device from its config); without it, it raises ``TargetError``.
    """
    prefixes = sorted({m.group("prefix") or "" for k in tensors if (m := HH_KEY.match(k))})
    found: list[Candidate] = []
    for prefix in prefixes:
        shapes = {}
        for key, t in tensors.items():
            mod, _, weight = key.rpartition(".")
            if mod == prefix and RNN_WEIGHT.match(weight):
                shapes[weight] = tuple(t.shape)
        layer, gates = _infer_rnn(prefix, shapes)
        found += _rnn_candidates(prefix, layer, gates, shapes, config)
    cells = sorted({m.group("prefix") or "" for k in tensors if (m := CELL_HH_KEY.match(k))
                    and _join(m.group("prefix") or "", "weight_ih") in tensors})
    for prefix in cells:
        shapes = {w: tuple(tensors[_join(prefix, w)].shape) for w in ("weight_ih", "weight_hh")}
        layer, gates = _infer_cell(prefix, shapes)
        found += _rnn_candidates(prefix, layer, gates, shapes, config)
    linear_modules = {k.rpartition(".")[0] for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2}
    if config.targets == ALL_LINEAR:
        if linear is None:
            raise TargetError(f"targets={ALL_LINEAR!r} needs the model's layer types: a bare state dict does not "
                              "tell nn.Linear from nn.Embedding; name the layers (targets list or regex)")
        selected = linear_modules & set(linear)
    else:
        for pattern in _patterns(config.targets):
            if not any(selects(pattern, m) for m in linear_modules):
                raise TargetError(f"{_what('target', pattern)} matches no 2-D '<module>.weight' key"
                                  + _weight_hint(pattern))
        selected = {m for m in linear_modules if selects(config.targets, m)}
    for mod in sorted(selected):
        rows, cols = tensors[_join(mod, "weight")].shape
        _check_bias(mod, rows, cols, tensors.get(_join(mod, "bias")))
        found.append(Candidate(mod, "weight", "linear", "linear", 1, rows, cols))
    for pattern in _patterns(config.exclude):
        if not any(selects(pattern, n) for c in found for n in c.scopes):
            raise TargetError(f"{_what('exclude', pattern)} matches no target")
    found = [c for c in found if not _excluded(c, config)]
    if not found:
        raise TargetError(_none_found(config))
    return found


def _check_bias(module: str, rows: int, cols: int, bias: Tensor | None) -> None:
    """Refuse a selected weight whose bias does not have one entry per row: not an ``nn.Linear``
    (``out x in``) weight, e.g. a transformers ``Conv1D`` (GPT-2), which stores ``in x out``."""
    if bias is None or (bias.dim() == 1 and bias.shape[0] == rows):
        return
    n = bias.shape[0] if bias.dim() == 1 else tuple(bias.shape)
    kind = ("; it looks like a transformers Conv1D (GPT-2 style, weight stored in x out), which lrcompress "
            "does not factor" if n == cols else "")
    raise TargetError(f"{module}: its bias has {n} entries but its weight {rows}x{cols} has {rows} rows, so it "
                      f"is no nn.Linear (out x in) weight{kind}; leave it out of the targets")


def check_target_types(model: nn.Module, config: CompressionConfig) -> None:
    """Raise ``TargetError`` when a target pattern selects a module of ``model`` that lrcompress does
    not factor (a transformers ``Conv1D``, an embedding, ...). Patterns that select nothing pass:
    for checking a state dict's targets against its model built on the meta device."""
    if config.targets == ALL_LINEAR:
        all_linear_names(model)  # refuses Conv1D layers by name
        return
    modules = dict(model.named_modules())
    for pattern in _patterns(config.targets):
        _check_types(pattern, [n for n in modules if n and selects(pattern, n)], modules)


def _check_types(pattern, hits: list[str], modules: dict[str, nn.Module]) -> None:
    for n in hits:
        if not isinstance(modules[n], (nn.Linear, nn.RNNBase, nn.RNNCellBase, Highway)):
            raise TargetError(f"{_what('target', pattern)} matches {n} ({type(modules[n]).__name__}), "
                              "which is not an nn.Linear, RNN layer or cell, or Highway layer")


def _weight_hint(pattern) -> str:
    text = pattern if isinstance(pattern, str) else pattern[0]
    return "; targets name modules: drop '.weight'" if text.endswith(".weight") else ""


def _infer_rnn(prefix: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, int]:
    where = prefix or "<root>"
    hh = shapes.get("weight_hh_l0")
    if hh is None or len(hh) != 2:
        raise FormatError(f"{where}: recurrent weights found but no 2-D weight_hh_l0")
    hr = shapes.get("weight_hr_l0")
    if hr is not None:  # LSTM with proj_size: weight_hh is (4 h, p), weight_hr (p, h)
        if len(hr) == 2 and hh == (4 * hr[1], hr[0]):
            return "lstm", 4
        raise FormatError(f"{where}: weight_hr_l0 {hr} does not fit weight_hh_l0 {hh} of an LSTM")
    gates = gate_count(*hh)
    if gates is None:
        raise FormatError(f"{where}: weight_hh_l0 of shape {hh} is not a GRU (3h x h), LSTM (4h x h) or RNN (h x h)")
    return GATES_LAYER[gates], gates


def gate_count(rows: int, hidden: int) -> int | None:
    """Gate blocks of a ``(rows, hidden)`` recurrent weight (3 GRU, 4 LSTM, 1 RNN), or None for
    a shape no recurrent layer has (an empty one included)."""
    if hidden <= 0 or rows % hidden or rows // hidden not in GATES_LAYER:
        return None
    return rows // hidden


def cell_kind(cell: nn.RNNCellBase) -> tuple[str, int]:
    """``(layer, gates)`` of a recurrent cell: by class, else from the shape of its ``weight_hh``."""
    for cls, kind in CELL_GATES:
        if isinstance(cell, cls):
            return kind
    rows, hidden = cell.weight_hh.shape
    gates = gate_count(rows, hidden)
    if gates is None:
        raise TargetError(f"{type(cell).__name__}: weight_hh of shape {(rows, hidden)} is not a GRU, LSTM or RNN cell")
    return GATES_LAYER[gates], gates


def recurrent_kind(module: nn.Module, weight: str) -> tuple[str, str]:
    """``(layer, role)`` of ``module.<weight>`` as a file records them (``"linear"`` for others)."""
    if isinstance(module, nn.RNNBase) and (m := RNN_WEIGHT.match(weight)):
        return RNN_GATES[module.mode][0], ROLE[m.group("kind")]
    if isinstance(module, nn.RNNCellBase) and (m := CELL_WEIGHT.match(weight)):
        return cell_kind(module)[0], ROLE[m.group("kind")]
    return "linear", "linear"


def _infer_cell(prefix: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, int]:
    hh, ih = shapes["weight_hh"], shapes["weight_ih"]
    gates = gate_count(*hh) if len(hh) == 2 else None
    if gates is None or len(ih) != 2 or ih[0] != hh[0]:
        raise FormatError(f"{_join(prefix, 'weight_hh')} of shape {hh} (weight_ih {ih}) is not a GRU cell (3h x h), "
                          "LSTM cell (4h x h) or RNN cell (h x h)")
    return GATES_LAYER[gates], gates


def _rnn_candidates(module: str, layer: str, gates: int, shapes: dict[str, tuple[int, ...]],
                    config: CompressionConfig) -> list[Candidate]:
    out = []
    for weight, shape in shapes.items():
        m = RNN_WEIGHT.match(weight) or CELL_WEIGHT.match(weight)
        if m is None:
            continue
        role = ROLE[m.group("kind")]
        if (role == "input" and not config.include_input) or (role == "projection" and not config.include_projection):
            continue
        g = 1 if role == "projection" else gates
        if len(shape) != 2 or shape[0] % g:
            raise FormatError(f"{_join(module, weight)} of shape {shape} does not split into {g} gate blocks")
        out.append(Candidate(module, weight, layer, role, g, shape[0] // g, shape[1]))
    return out


def _patterns(selection) -> list:
    """The parts of a selection checked one by one: each list pattern, or the one regex."""
    if selection == ALL_LINEAR:
        return []
    return [selection] if isinstance(selection, str) else [(p,) for p in selection]


def _what(kind: str, pattern) -> str:
    return f"{kind} regex {pattern!r}" if isinstance(pattern, str) else f"{kind} pattern {pattern[0]!r}"


def _check_patterns(config: CompressionConfig, modules: dict[str, nn.Module], prefix: str = "") -> None:
    for pattern in _patterns(config.targets):
        hits = [n for n in modules if n and selects(pattern, n, prefix)]
        if not hits:
            raise TargetError(f"{_what('target', pattern)} matches no module" + _weight_hint(pattern))
        _check_types(pattern, hits, modules)
    weights = {_join(n, w) for n, m in modules.items() for w, _ in m.named_parameters(recurse=False)}
    weights |= {_join(n, w) for n, m in modules.items() if parametrize.is_parametrized(m) for w in m.parametrizations}
    for pattern in _patterns(config.exclude):
        if not any(n and selects(pattern, n, prefix) for n in modules) and not any(
                selects(pattern, w, prefix) for w in weights):
            raise TargetError(f"{_what('exclude', pattern)} matches no module or weight")


def _excluded(c: Candidate, config: CompressionConfig, prefix: str = "") -> bool:
    # Excluding a module excludes everything in it (a Highway's Linears, a wrapper's RNN).
    return any(selects(config.exclude, n, prefix) for n in c.scopes)


def _none_found(config: CompressionConfig) -> str:
    shown = config.targets if isinstance(config.targets, str) else list(config.targets)
    extra = f" and no nn.Linear matching {shown!r}" if config.targets else ""
    return (f"no targets found: no nn.GRU/nn.LSTM/nn.RNN layer, GRU/LSTM/RNN cell or Highway layer{extra}"
            f" (after exclusions {config.exclude if isinstance(config.exclude, str) else list(config.exclude)!r})")


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name
