"""The structures a weight can take, by name: the converter's ``structure=`` values.

One registry maps a structure's name to its parametrization class and to the
``CompressionConfig`` fields that carry its options, so the converter, the file format and
``merge`` handle every structure the same way (``lowrank`` keeps its own path: its class
predates the structure contract and takes ``rank``, not the block shape).

- ``lowrank``: ``LowRank`` (parametrizations); ``rank``/``energy``, ``diag``, ``tied`` (its own path)
- ``kronecker``: ``Kronecker`` (kronecker); ``kron_factors`` -> ``factors``, ``terms``
- ``tt``: ``TensorTrain`` (tensor_train); ``tt_ranks`` -> ``ranks``, ``tt_shape`` -> ``shape``, ``joint``
- ``orthogonal``: ``ScaledCayley`` (orthogonal); ``negatives`` (square blocks only)

Each module is imported on first use. Every non-low-rank class follows one contract:
``cls(gates, rows, cols, **options)``, ``cls.check(gates, rows, cols, **options)`` (validates and
normalises options against a block shape, touching no tensor; notes via ``warnings.warn``),
``options()``, ``fit(W)``, ``forward(*originals)``, ``parameter_count()``, ``right_inverse``
returning the originals fitted ahead (``_pending``) once, plus the module-level
``random_originals(gates, rows, cols, *, options, bound, dtype, device)``. A file stores such a
weight as its originals ``<name>.original<i>`` plus the parametrization's persistent buffers
``<name>.<buffer>`` (e.g. ``ScaledCayley``'s ``signs``), and its record as ``structure`` +
``options`` (docs/format.md).

    >>> get("kronecker").options_of(CompressionConfig(structure="kronecker", kron_factors=(4, 4)))  # doctest: +SKIP
    {'factors': (4, 4)}
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from importlib import import_module

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ConfigError
from .parametrizations import chained

LOWRANK = "lowrank"


@dataclass(frozen=True)
class Structure:
    """A registry entry: where the class lives and which config fields are its options."""

    name: str
    module: str  # relative to this package
    class_name: str
    verb: str  # the module's registering function, e.g. "kronecker"
    fields: tuple[tuple[str, str], ...]  # (config field, class keyword) pairs
    required: tuple[str, ...]  # config fields that must be given
    label: str  # what the structure is, for messages and tables
    # Only square blocks (scaled Cayley): the default recurrent targets leave out non-square ones
    # (an LSTM's proj_size blocks); a target selected explicitly is refused by the class's check.
    square: bool = False

    @property
    def cls(self) -> type[nn.Module]:
        """The parametrization class (its module is imported now, on first use)."""
        return getattr(self.code, self.class_name)

    @property
    def code(self):
        """The structure's module (its parsers, ``random_originals``, ...)."""
        return import_module(f".structured.{self.module}", __package__)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.fields)

    def options_of(self, config) -> dict:
        """The class keywords a ``CompressionConfig`` gives (fields left at None are not passed)."""
        out = {}
        for field, keyword in self.fields:
            value = getattr(config, field)
            if value is not None and not (field == "joint" and value is False):
                out[keyword] = value
        return out


STRUCTURES: dict[str, Structure] = {
    LOWRANK: Structure(LOWRANK, "parametrizations", "LowRank", "low_rank", (), (), "low rank (+ diagonal)"),
    "kronecker": Structure("kronecker", "kronecker", "Kronecker", "kronecker",
                           (("kron_factors", "factors"), ("terms", "terms")), ("kron_factors",),
                           "sum of Kronecker products"),
    "tt": Structure("tt", "tensor_train", "TensorTrain", "tensor_train",
                    (("tt_ranks", "ranks"), ("tt_shape", "shape"), ("joint", "joint")), ("tt_ranks", "tt_shape"),
                    "tensor train"),
    "orthogonal": Structure("orthogonal", "orthogonal", "ScaledCayley", "scaled_cayley",
                            (("negatives", "negatives"),), (), "scaled Cayley orthogonal", square=True),
}
# Every structure option field of CompressionConfig, and the structure it belongs to.
OPTION_FIELDS: dict[str, str] = {f: s.name for s in STRUCTURES.values() for f, _ in s.fields}


def get(name: str) -> Structure:
    """The registry entry of ``name``; ``ConfigError`` naming the known ones otherwise."""
    if not isinstance(name, str) or name not in STRUCTURES:
        raise ConfigError(f"structure must be one of {', '.join(STRUCTURES)}, got {name!r}")
    return STRUCTURES[name]


def cli_options(structure: str | None, **given) -> dict:
    """The CLI's ``--structure`` flags as ``CompressionConfig`` fields, parsed by the structure
    modules' own parsers (``kronecker.parse_factors``, ``tensor_train.parse_shape``/``parse_ranks``).
    A flag of another structure is refused (``ConfigError``, one line); flags not given are left out.

    >>> cli_options("tt", tt_ranks="8", tt_shape="8x8x8x8", kron_factors=None)  # doctest: +SKIP
    {'structure': 'tt', 'tt_ranks': 8, 'tt_shape': (8, 8, 8, 8)}
    """
    name = structure or LOWRANK
    entry = get(name)
    for field, value in given.items():
        if _given(value) and OPTION_FIELDS[field] != name:
            raise ConfigError(f"--{field.replace('_', '-')} is an option of --structure {OPTION_FIELDS[field]}, "
                              f"not of {name}")
    out = {"structure": structure} if structure is not None else {}
    parsers = {"kron_factors": "parse_factors", "tt_shape": "parse_shape", "tt_ranks": "parse_ranks"}
    for field, value in given.items():
        if _given(value):
            out[field] = getattr(entry.code, parsers[field])(value) if field in parsers else value
    return out


def _given(value) -> bool:
    """A CLI flag was given: not None and not an unset switch. By identity, not ``in (None, False)``:
    ``0 == False``, and ``--terms 0`` must reach the class's check, not vanish."""
    return value is not None and value is not False


def structure_of(p: nn.Module) -> str | None:
    """The registry name of a parametrization module (None: not one of lrcompress's)."""
    from .parametrizations import LowRank

    if isinstance(p, LowRank):
        return LOWRANK
    name = getattr(type(p), "structure", None)
    if name in STRUCTURES and name != LOWRANK and isinstance(p, get(name).cls):
        return name
    return None


def parametrization(module: nn.Module, name: str) -> nn.Module | None:
    """The lrcompress parametrization (any structure) alone on ``module.<name>``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    own = chained(module.parametrizations[name])
    return own[0] if len(own) == 1 and structure_of(own[0]) is not None else None


def structured(module: nn.Module, name: str) -> nn.Module | None:
    """The non-low-rank parametrization (Kronecker, tensor train, scaled Cayley) on ``module.<name>``, or None.

    >>> structured(gru, "weight_hh_l0")  # doctest: +SKIP
    Kronecker(gates=3, ...)
    """
    p = parametrization(module, name)
    return p if p is not None and structure_of(p) != LOWRANK else None


def json_options(options: dict) -> dict:
    """``options`` as JSON gives them back (tuples become lists): the form files and specs hold,
    so options from a live model and from a file compare equal."""
    return json.loads(json.dumps(options))


def check_options(structure: str, gates: int, rows: int, cols: int, options: dict, *,
                  where: str = "") -> tuple[dict, list[str]]:
    """``cls.check`` of ``structure`` for one weight: the normalised options and the notes it warned.

    A note (e.g. a TT-rank capped) is re-warned with ``where`` (the target's name) in front.
    Raises the class's ``ConfigError``/``RankError`` with ``where`` in front.
    """
    cls = get(structure).cls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            normalised = cls.check(gates, rows, cols, **options)
        except ConfigError as exc:
            raise type(exc)(f"{where}: {exc}" if where else str(exc)) from None
        except TypeError as exc:  # an option the class does not take
            raise ConfigError(f"{where + ': ' if where else ''}structure {structure!r}: {exc}") from None
    notes = [str(w.message) for w in caught]
    for note in notes:
        warnings.warn(f"{where}: {note}" if where else note, UserWarning, stacklevel=3)
    return dict(normalised), notes


def build(structure: str, gates: int, rows: int, cols: int, options: dict) -> nn.Module:
    """A fresh parametrization module for normalised ``options`` (no warnings: they were given at check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get(structure).cls(gates, rows, cols, **options)


@functools.lru_cache(maxsize=256)
def _layout(structure: str, gates: int, rows: int, cols: int, options_json: str) -> tuple:
    """(shapes of the originals, {persistent buffer: shape}, parameter count), from a module built
    on the meta device: no values are computed or stored, so any size is cheap (a file's record
    claiming a huge weight costs nothing before its tensors are compared with these shapes)."""
    options = json.loads(options_json)
    code = get(structure).code
    with torch.device("meta"):
        p = build(structure, gates, rows, cols, options)
        originals = code.random_originals(gates, rows, cols, options=options, bound=1.0)
    buffers = {n: tuple(b.shape) for n, b in p.named_buffers(recurse=False)
               if n not in p._non_persistent_buffers_set}
    return tuple(tuple(t.shape) for t in originals), buffers, int(p.parameter_count())


def layout(structure: str, gates: int, rows: int, cols: int, options: dict) -> tuple:
    """``(original shapes, {buffer: shape}, parameter count)`` of a structured weight."""
    return _layout(structure, gates, rows, cols, json.dumps(options, sort_keys=True))


def buffer_values(specs) -> int:
    """Values a file stores for ``specs`` (``TargetSpec``s) that are buffers, not parameters: the
    structured weights' persistent buffers (``ScaledCayley``'s fixed ``signs``; low rank has none).
    Stored, never trained: every parameter count (compress, convert, inspect) leaves them out,
    as ``count_params`` does for a live model."""
    total = 0
    for spec in specs:
        if spec.structure != LOWRANK:
            for shape in layout(spec.structure, spec.gates, spec.rows, spec.cols, spec.options)[1].values():
                total += math.prod(shape)
    return total


@dataclass
class Fitted:
    """A parametrization module and the originals to register it with (fitted, read from a
    file, or drawn at random): ``register`` consumes them once through ``right_inverse``."""

    param: nn.Module
    originals: tuple[Tensor, ...]


def fit(structure: str, gates: int, rows: int, cols: int, options: dict, W: Tensor) -> tuple[Fitted, float]:
    """Fit ``structure`` to the dense weight ``W`` (not modified): the fitted module and originals,
    and the relative error ``||W - W_hat||_F / ||W||_F`` (absolute when ``W`` is zero)."""
    p = build(structure, gates, rows, cols, options)
    W = W.detach()
    with torch.no_grad():
        originals = tuple(p.fit(W))
        approx = p(*originals)
        err = torch.linalg.matrix_norm((W - approx).double()).item()
        norm = torch.linalg.matrix_norm(W.double()).item()
    return Fitted(p, originals), err / norm if norm > 0 else err


def random_fitted(structure: str, gates: int, rows: int, cols: int, options: dict, *, bound: float,
                  like: Tensor) -> Fitted:
    """Random originals for training from scratch (the structure's ``random_originals``), in
    ``like``'s dtype and device."""
    p = build(structure, gates, rows, cols, options)
    originals = get(structure).code.random_originals(gates, rows, cols, options=p.options(), bound=bound,
                                                     dtype=like.dtype, device=like.device)
    return Fitted(p, tuple(originals))


def from_parts(structure: str, gates: int, rows: int, cols: int, options: dict, parts: dict[str, Tensor]) -> Fitted:
    """A stored weight (a file's ``<name>.original<i>`` and buffer tensors, keyed ``original<i>`` /
    buffer name) as a module with those buffers and its originals. Shapes were checked by
    ``validate.check_compressed``."""
    p = build(structure, gates, rows, cols, options)
    for key, value in persistent_buffers(p).items():
        with torch.no_grad():
            value.copy_(parts[key])
    count = sum(1 for k in parts if k.startswith("original") and k[len("original"):].isdigit())
    originals = tuple(parts[f"original{i}"] for i in range(count))
    if originals and originals[0].is_floating_point():
        p = p.to(dtype=originals[0].dtype)
    return Fitted(p, originals)


def register(module: nn.Module, name: str, fitted: Fitted) -> None:
    """Register ``fitted.param`` on ``module.<name>`` with ``fitted.originals`` (no refit).

    The originals take the dtype and device of the current weight; the parametrization module
    moves there too (its floating buffers take the dtype, e.g. signs).
    """
    weight = getattr(module, name)
    p = fitted.param.to(device=weight.device, dtype=weight.dtype)
    p._pending = tuple(t.detach().to(device=weight.device, dtype=weight.dtype) for t in fitted.originals)
    # Shapes were checked by the caller (fit, or validate.check_compressed): skip torch's rebuild check.
    parametrize.register_parametrization(module, name, p, unsafe=True)


def weight_shape(module: nn.Module, name: str, p: nn.Module) -> tuple[int, int]:
    """``(rows of one gate block, cols)`` of a structured weight, without rebuilding it when the
    module records its block shape."""
    rows, cols = getattr(p, "rows", None), getattr(p, "cols", None)
    if isinstance(rows, int) and isinstance(cols, int):
        return rows, cols
    with torch.no_grad():
        shape = getattr(module, name).shape
    return shape[0] // p.gates, shape[1]


def persistent_buffers(p: nn.Module) -> dict[str, Tensor]:
    """The parametrization's own persistent buffers (saved with the model, e.g. ``signs``)."""
    return {n: b for n, b in p.named_buffers(recurse=False) if n not in p._non_persistent_buffers_set}


def describe(structure: str, options: dict) -> str:
    """Options for a table cell, in the CLI's own spelling of each value: ``rank 24, diag`` /
    ``factors 64x64, terms 2`` / ``shape 8x8x8x8, ranks 8,4,8, joint`` / ``negatives 6,2,7``.

    Sizes (``factors``, ``shape``) are written as dimensions (``4x8,8x4`` for non-square ones);
    any other list (TT-ranks, per-gate ``negatives``) as a comma list, as ``--tt-ranks`` takes
    it; a true flag by its name; a false flag or an unset (None) option is left out.
    ``structure`` is accepted for symmetry with the registry (the spelling does not depend on it).
    """
    parts = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(key)
        elif key in _SIZE_OPTIONS:
            parts.append(f"{key} {_dims(value)}")
        else:
            parts.append(f"{key} {_value(value)}")
    return ", ".join(parts) or "-"


# Options that are sizes (Kronecker factor shapes, TT mode shapes): written as "64x64" like the CLI's
# --kron-factors/--tt-shape. Every other list is a list of counts (TT-ranks per bond, -1 entries per gate).
_SIZE_OPTIONS = frozenset({"factors", "shape"})


def _value(value) -> str:
    """A scalar as the CLI writes it (floats short), a list as ``8,4,8`` (nested lists by ``_dims``)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_dims(v) if isinstance(v, (list, tuple)) else _value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _dims(value) -> str:
    """Sizes as the CLI writes them: ``64x64``; ``(m, n)`` pairs ``4x8,8x4`` (all square: ``8x8x8``)."""
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return "x".join(map(str, value))
        if all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
            if all(v[0] == v[1] for v in value):
                return "x".join(str(v[0]) for v in value)
            return ",".join(f"{v[0]}x{v[1]}" for v in value)
        return ",".join(_dims(v) for v in value)
    return _value(value)
