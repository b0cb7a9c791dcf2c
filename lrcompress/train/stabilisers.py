"""The paper's training stabilisers, as plain functions and one hook object for any loop.

- gradient clipping, element-wise (``torch.nn.utils.clip_grad_value_``: ``clamp(g, -c, c)``) or
  by global norm (``clip_grads_with_norm_``: ``g * min(1, c / (|g| + 1e-6))``), optionally
  leaving named parameters, or one gate's block of them, unclipped (``clip_exempt``: the
  authors' psMNIST script clips all but its first seven parameters);
- non-finite detection *before* the update, from the global gradient norm
  (``torch.nn.utils.get_total_norm``, one ``.item()``, reused by norm clipping),
  with a recovery policy: ``skip`` the update, ``decay`` (the authors' code: every gradient
  becomes ``0.1 * parameter``, a weight-decay step), or ``restore`` the last good state;
- weight normalisation (Salimans & Kingma) of the factor matrices and of the input matrices
  of factored recurrent layers: trainable row scales, except fixed ones on the ``R``
  projections (appendix A.2);
- the row max-norm constraint on the same matrices (10 in the paper), after each update
  (``Tensor.renorm_``).

In your own loop::

    stab = Stabiliser(model, optimizer, clip="norm", clip_value=1.0, nan_policy="skip", max_row_norm=10)
    loss.backward()
    if stab.before_step():
        optimizer.step()
    stab.after_step()
    optimizer.zero_grad()
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm, parametrize

from ..errors import ConfigError
from ..nn.rnn import FactoredRNN
from ..parametrizations import LowRank, factorization, own_class

CLIP_MODES = ("none", "element", "norm")
NAN_POLICIES = ("skip", "decay", "restore", "none")
DECAY_FACTOR = 0.1  # the authors' pseudo-gradient: 0.1 * parameter
GATE_LETTERS = {"GRU": "rzn", "LSTM": "ifgo"}  # PyTorch's gate order along a stacked first dimension


def clip_exemptions(model: nn.Module, names: Sequence[str]) -> dict[int, list[tuple[int, int]]]:
    """Resolve ``clip_exempt`` names: ``{id(parameter): row spans still clipped}``.

    A name is one of ``model.named_parameters()`` (after weight normalisation, if any), whose
    gradient is then not clipped at all, or ``"name:gate"`` with a gate letter of the recurrent
    layer owning it (GRU ``r``, ``z``, ``n``; LSTM ``i``, ``f``, ``g``, ``o``): only that gate's
    block of the first dimension is left unclipped, for tensors stacking the gates there
    (``weight_ih_l0`` and biases: ``gates * hidden`` rows; factors ``L``, ``R``, ``D``: one slice
    per gate). E.g. the authors' psMNIST exemption, in a low-rank GRU's names:
    ``["rnn.weight_ih_l0", "rnn.parametrizations.weight_hh_l0.original1",
    "rnn.parametrizations.weight_hh_l0.original0:n"]``. Raises ``ConfigError`` naming an
    unknown parameter, gate, or a tensor that does not stack gates.

    >>> clip_exemptions(torch.nn.GRU(2, 4), ["bias_hh_l0:n"])   # doctest: +SKIP
    """
    check_exempt_names(names)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    exempt: dict[int, set[int] | None] = {}  # id -> gate indices left unclipped (None: all)
    shapes: dict[int, tuple[int, int]] = {}  # id -> (rows of the first dimension, gates)
    for entry in names:
        name, _, gate = entry.partition(":")
        p = params.get(name)
        if p is None:
            raise ConfigError(f"clip_exempt: {type(model).__name__} has no parameter {name!r} "
                              f"(its parameters: {', '.join(params)})")
        if not gate:
            exempt[id(p)] = None
            continue
        layer = _recurrent_owner(modules, name)
        letters = GATE_LETTERS.get(getattr(layer, "mode", None), "")
        if not letters:
            raise ConfigError(f"clip_exempt: {entry!r}: a gate suffix needs a parameter of a GRU or LSTM layer")
        if len(gate) != 1 or gate not in letters:
            raise ConfigError(f"clip_exempt: {entry!r}: unknown gate {gate!r} (a {layer.mode}'s gates: "
                              f"{', '.join(letters)})")
        rows = p.shape[0] if p.dim() else 0
        if not _stacks_gates(modules, name) or not rows or rows % len(letters) or \
                rows // len(letters) not in (1, layer.hidden_size):
            raise ConfigError(f"clip_exempt: {entry!r}: {name} of shape {tuple(p.shape)} does not stack the "
                              f"{len(letters)} gates along its first dimension")
        shapes[id(p)] = (rows, len(letters))
        if id(p) not in exempt or exempt[id(p)] is not None:
            exempt[id(p)] = (exempt.get(id(p)) or set()) | {letters.index(gate)}
    out = {}
    for key, gates in exempt.items():
        if gates is None:
            out[key] = []
            continue
        rows, count = shapes[key]
        size = rows // count
        spans = [[k * size, (k + 1) * size] for k in range(count) if k not in gates]
        merged = [spans[0]] if spans else []
        for a, b in spans[1:]:  # adjacent clipped gates: one span
            if a == merged[-1][1]:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        out[key] = [tuple(s) for s in merged]
    return out


def check_exempt_names(names: Sequence[str]) -> None:
    """``clip_exempt`` entries, checked without a model: a name, or ``name:gate`` with a gate
    letter after the colon; each at most once, and not a parameter together with one of its
    gates (the parameter alone already leaves every gate unclipped). Raises ``ConfigError``."""
    seen = set()
    for entry in names:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"clip_exempt must list parameter names, got {entry!r}")
        name, colon, gate = entry.partition(":")
        if not name or (colon and not gate):
            raise ConfigError(f"clip_exempt: {entry!r}: give a parameter name, or name:gate with a gate letter "
                              "after the colon")
        if entry in seen:
            raise ConfigError(f"clip_exempt lists {entry!r} twice")
        seen.add(entry)
    for entry in names:
        name, colon, _ = entry.partition(":")
        if colon and name in seen:
            raise ConfigError(f"clip_exempt lists both {name!r} and {entry!r}: {name!r} alone already leaves "
                              "every gate unclipped")


# A factor's place in a parameter name: parametrizations.<weight>.original<k>, weight-normalised or not.
_FACTOR = re.compile(r"(?:^|\.)parametrizations\.(?P<weight>\w+?)\.(?:parametrizations\.)?original(?P<k>\d)")


def _stacks_gates(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether parameter ``name`` stacks a recurrent layer's gates along its first dimension, as
    far as its place says (the shape is checked apart): not an LSTM's projection ``weight_hr``
    (one matrix, no gates), nor a tied low-rank ``R`` (one for all gates); dense weights, biases,
    ``L``, ``D`` and untied ``R`` do."""
    if any(re.fullmatch(r"weight_hr_l\d+(_reverse)?", part) for part in name.split(".")):
        return False
    found = _FACTOR.search(name)
    if found is None:
        return True
    owner = modules.get(name[:found.start()])
    low_rank = factorization(owner, found["weight"]) if owner is not None else None
    return not (low_rank is not None and low_rank.tied and found["k"] == "1")


def _recurrent_owner(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The innermost ``nn.RNNBase`` among the modules on the path of parameter ``name``."""
    parts = name.split(".")[:-1]
    for end in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:end]))
        if isinstance(module, nn.RNNBase):
            return module
    return None


def decay_gradients_(params: Iterable[Tensor], factor: float = DECAY_FACTOR) -> None:
    """Replace every gradient by ``factor * parameter``: the authors' recovery from a bad step."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.copy_(p.detach() * factor)


class Stabiliser:
    """Clipping, non-finite recovery and the max-norm constraint around ``optimizer.step()``.

    ``before_step()`` returns whether to step; ``after_step()`` applies the row max-norm;
    ``remember()`` records the state ``restore`` goes back to (call it after a good evaluation).
    ``nan_events`` counts non-finite gradient norms seen. ``clip_exempt``: parameters whose
    gradients are not clipped (``clip_exemptions``); they still count in the non-finite check.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, clip: str = "none",
                 clip_value: float = 1.0, nan_policy: str = "skip", max_row_norm: float = 0.0,
                 clip_exempt: Sequence[str] = ()):
        if clip not in CLIP_MODES:
            raise ConfigError(f"clip must be one of {', '.join(CLIP_MODES)}, got {clip!r}")
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
        if clip != "none" and not clip_value > 0:
            raise ConfigError(f"clip_value must be positive, got {clip_value!r}")
        if max_row_norm < 0:
            raise ConfigError(f"max_row_norm must be >= 0 (0 = off), got {max_row_norm!r}")
        if nan_policy == "restore" and optimizer is None:
            raise ConfigError("nan_policy 'restore' needs the optimizer (its state is restored too)")
        if clip_exempt and clip == "none":
            raise ConfigError("clip_exempt names parameters to leave unclipped, but clip = 'none'")
        # id(parameter) -> the row spans (first dimension) that ARE clipped; [] = not clipped at all
        self.clipped_rows = clip_exemptions(model, clip_exempt)
        self.model, self.optimizer = model, optimizer
        self.clip, self.clip_value, self.nan_policy, self.max_row_norm = clip, clip_value, nan_policy, max_row_norm
        self.nan_events = 0
        self.last_norm: Tensor | None = None
        self._good: dict | None = None

    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def check(self) -> bool:
        """Whether the gradients are finite (computes the global norm; one host sync)."""
        grads = [p.grad for p in self.params() if p.grad is not None]
        self.last_norm = get_total_norm(grads) if grads else torch.zeros(())
        return math.isfinite(self.last_norm.item())

    def before_step(self) -> bool:
        """Check, recover or clip the gradients; ``False`` means: do not call ``optimizer.step()``."""
        if self.nan_policy != "none":
            if not self.check():
                self.nan_events += 1
                return self.recover(self.params())
        else:
            self.last_norm = None
        self.clip_()
        return True

    def clip_(self) -> None:
        """Clip the gradients (by global norm: reusing the norm ``check`` computed)."""
        params = [p for p in self.params() if p.grad is not None]
        if self.clip == "none" or not params:
            return
        if self.clipped_rows:
            self._clip_parts(params)
            return
        if self.clip == "element":
            clip_grad_value_(params, self.clip_value)
        elif self.last_norm is not None:
            clip_grads_with_norm_(params, self.clip_value, self.last_norm)
        else:  # nan_policy "none": no check computed the norm
            clip_grad_norm_(params, self.clip_value)

    def _clip_parts(self, params: list[Tensor]) -> None:
        """Clip the gradients but the exempt ones (or their exempt gate blocks): element-wise, or
        by the global norm of the clipped parts only (the authors' exempt gradients count in no norm)."""
        parts = []
        for p in params:
            spans = self.clipped_rows.get(id(p))
            parts += [p.grad] if spans is None else [p.grad[a:b] for a, b in spans]  # views: in place below
        if not parts:
            return
        if self.clip == "element":
            for g in parts:
                g.clamp_(-self.clip_value, self.clip_value)
            return
        factor = (self.clip_value / (get_total_norm(parts) + 1e-6)).clamp(max=1.0)  # clip_grads_with_norm_'s
        for g in parts:
            g.mul_(factor.to(g.device))

    def recover(self, params: list[Tensor]) -> bool:
        if self.nan_policy == "decay":
            decay_gradients_(params)  # not clipped, as in the authors' code
            return True
        if self.nan_policy == "restore" and self._good is not None:
            self.model.load_state_dict(self._good["model"])
            lrs = [g["lr"] for g in self.optimizer.param_groups]  # the schedule's, not part of the state
            self.optimizer.load_state_dict(copy.deepcopy(self._good["optimizer"]))
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
        for p in params:
            p.grad = None
        return False

    def after_step(self) -> None:
        if self.max_row_norm:
            max_row_norm_(self.model, self.max_row_norm)

    def remember(self) -> None:
        """Record the current model and optimiser state as the one ``restore`` returns to."""
        if self.nan_policy != "restore":
            return
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._good = {"model": model, "optimizer": copy.deepcopy(self.optimizer.state_dict())}


class WeightNorm(nn.Module):
    """Parametrization ``w = g * v / |v|`` row by row (last dimension), Salimans & Kingma.

    With ``scale`` given the row scales are a fixed buffer (the paper's projections);
    otherwise ``g`` is trainable. Registration keeps ``w`` unchanged (``g = |w|``, ``v = w``).
    """

    def __init__(self, scale: Tensor | None = None):
        super().__init__()
        self.fixed = scale is not None
        if self.fixed:
            self.register_buffer("scale", scale.detach().clone())

    def forward(self, *tensors: Tensor) -> Tensor:
        g, v = (self.scale, tensors[0]) if self.fixed else tensors
        return g.unsqueeze(-1) * v / row_norms(v).unsqueeze(-1)

    def right_inverse(self, w: Tensor):
        return w if self.fixed else (row_norms(w), w)


def row_norms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=-1).clamp_min(torch.finfo(t.dtype).tiny)


def factor_lists(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, ParametrizationList)`` of every lrcompress-factored weight of ``model``."""
    for mod_name, module in model.named_modules():
        for weight, plist in getattr(module, "parametrizations", {}).items():
            if isinstance(plist[0], LowRank):
                yield (f"{mod_name}.{weight}" if mod_name else weight), plist


def constrained_matrices(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """The matrices appendix A.2 normalises and max-norms: ``(name, owner, attribute,
    trainable_scale)`` for each factor ``L`` (trainable scale), each factor ``R`` (a projection:
    fixed scale) and, in factored recurrent layers, each dense input matrix (trainable scale).
    Diagonals, biases and the output layer are left alone."""
    for name, plist in factor_lists(model):
        yield f"{name}.L", plist, "original0", True
        yield f"{name}.R", plist, "original1", False
    for mod_name, module in model.named_modules():
        if isinstance(module, FactoredRNN):
            for weight in module._flat_weights_names:
                factored = parametrize.is_parametrized(module, weight) and isinstance(
                    module.parametrizations[weight][0], LowRank)
                if weight.startswith("weight_ih") and not factored:
                    yield (f"{mod_name}.{weight}" if mod_name else weight), module, weight, True


def weight_norm(model: nn.Module) -> list[str]:
    """Weight-normalise the matrices of ``constrained_matrices`` (appendix A.2): ``w = g v/|v|``
    per row, ``g`` trainable except on the ``R`` projections. The model's function is
    unchanged. Returns the matrices' names; ``remove_weight_norm`` folds them back (needed
    before ``lrcompress.save_model``).

    >>> weight_norm(LowRankGRU(4, 8, rank=2))  # doctest: +SKIP
    ['weight_hh_l0.L', 'weight_hh_l0.R', 'weight_ih_l0']
    """
    names = []
    for name, owner, attr, trainable in list(constrained_matrices(model)):
        if _normalised(owner, attr):
            continue
        scale = None if trainable else row_norms(getattr(owner, attr).detach())
        own_class(owner)  # a deepcopy shares the parametrized class: leave the original alone
        parametrize.register_parametrization(owner, attr, WeightNorm(scale))
        names.append(name)
    return names


def remove_weight_norm(model: nn.Module) -> nn.Module:
    """Fold weight normalisation back into plain tensors (values unchanged). In place."""
    for _, owner, attr, _ in list(constrained_matrices(model)):
        if _normalised(owner, attr):
            own_class(owner)  # a deepcopy shares the parametrized class: leave the original alone
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
    return model


def has_weight_norm(model: nn.Module) -> bool:
    return any(_normalised(owner, attr) for _, owner, attr, _ in constrained_matrices(model))


def _normalised(owner: nn.Module, attr: str) -> bool:
    return parametrize.is_parametrized(owner, attr) and isinstance(owner.parametrizations[attr][0], WeightNorm)


@torch.no_grad()
def max_row_norm_(model: nn.Module, max_norm: float = 10.0) -> None:
    """Clip the row norms of the matrices of ``constrained_matrices`` at ``max_norm``, in place.

    A row (last dimension) longer than ``max_norm`` is scaled by ``max_norm / (norm + 1e-7)``,
    as ``Tensor.renorm_(2, 0, max_norm)`` does on the matrix seen as (rows, last dimension);
    written without ``.view`` so that any memory layout works (a factor a user or an older
    version made from a transposed SVD view, say). For a weight-normalised matrix the row
    norm is its scale, which is clamped instead.
    """
    for _, owner, attr, _ in constrained_matrices(model):
        if _normalised(owner, attr):
            wn = owner.parametrizations[attr]
            scale = wn[0].scale if wn[0].fixed else wn.original0
            scale.clamp_(-max_norm, max_norm)
        else:
            renorm_rows_(getattr(owner, attr), max_norm)


def renorm_rows_(t: Tensor, max_norm: float) -> Tensor:
    """Scale each row (last dimension) of ``t`` longer than ``max_norm`` to ``max_norm``, in place,
    for any layout: ``Tensor.renorm_``'s rule (factor ``max_norm / (norm + 1e-7)``). Returns ``t``."""
    norms = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    t.mul_(torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms)))
    return t
