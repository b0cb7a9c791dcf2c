"""Check untrusted input before anything is computed from it: compressed files and weights.

A compressed file (docs/format.md) is only trusted once its metadata and its tensors agree:
``check_compressed`` is the one validator every reader uses (``load_model``, ``merge``,
``inspect``, ``bench``). It checks, in this order, and raises ``FormatError`` (one line naming the
file, the record and the bad value) on the first problem:

1. the ``targets`` JSON: bounded size and nesting depth *before* parsing (a deeply nested value
   makes Python's ``json`` raise ``RecursionError``), then a list of records, each with exactly
   the known fields and types (``TargetSpec.from_dict``);
2. records against each other: no two for one weight, layer/role/gate count and weight name
   consistent (GRU 3 gates, LSTM 4, RNN / projection / Linear 1; layers ``weight_hh_l0``, cells
   ``weight_hh``), one layer kind per module;
3. records against tensors: each factor present with exactly the shape the record implies
   (``L`` (G, m, d), ``R`` (G, d, n) or (d, n) tied, ``D`` (G, m) iff ``diag``; for another
   structure its originals ``original<i>`` and buffers, shaped as its class lays them out for
   the recorded options), the dense key absent, floating dtypes, one dtype per target, finite
   values; a bias next to a factored weight has the weight's row count.

A record of a structure other than low rank (format 2) names a known structure whose ``check``
accepts its options, in normal form, for the recorded block shape (``TargetSpec.from_dict``).

``check_weight`` is the matching check for a dense weight about to be factored or analysed.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from torch import Tensor

from .config import TargetSpec
from .errors import DegenerateWeightError, FormatError, WeightError

MAX_JSON_BYTES = 16 * 2**20  # ~100,000 target records; a real file holds a few dozen
MAX_TARGETS_DEPTH = 8  # a target list nests 2 deep (list of flat objects): room for a readable error
RNN_LAYERS = ("gru", "lstm", "rnn")
# Weight names of recurrent layers (weight_hh_l0, weight_ih_l1_reverse, weight_hr_l0) and of
# cells (nn.GRUCell etc.: weight_hh, weight_ih); the kind fixes the role.
RNN_WEIGHT_NAME = re.compile(r"^weight_(?P<kind>hh|ih|hr)(_l\d+(_reverse)?)?$")
KIND_ROLE = {"hh": "recurrent", "ih": "input", "hr": "projection"}
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def load_json(text: str, what: str, *, max_depth: int, max_bytes: int | None = None):
    """``json.loads(text)`` for untrusted text, size (default ``MAX_JSON_BYTES``) and nesting depth
    checked before parsing.

    Raises ``FormatError`` naming ``what`` when the text is too large, nests deeper than
    ``max_depth``, or is not JSON; never ``RecursionError``.
    """
    if not isinstance(text, str):
        raise FormatError(f"{what} is not text")
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise FormatError(f"{what} is {size:,} bytes, over the {max_bytes:,}-byte limit")
    depth = json_depth(text)
    if depth > max_depth:
        raise FormatError(f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:  # ValueError: e.g. a 5,000-digit int
        raise FormatError(f"{what} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text``, brackets inside strings ignored (vectorised: O(n))."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def targets_from_metadata(meta: dict[str, str] | None, path="file") -> list[TargetSpec]:
    """The factorized targets a file's metadata records, each record checked; [] for a plain file.

    Raises ``FormatError`` for a newer or unreadable format version, unreadable or oversized
    ``targets`` JSON, a malformed record, duplicate records or inconsistent layer/role/gates.
    """
    from .io import FORMAT, FORMAT_VERSION  # here: io imports this module's checks
    from .version import __version__

    if not meta or meta.get("format") != FORMAT:
        return []
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise FormatError(f"{path}: bad format_version {str(meta.get('format_version'))[:40]!r}") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{path} uses lrcompress format {version}; this lrcompress {__version__} reads up to "
                          f"{FORMAT_VERSION}: upgrade lrcompress")
    if "targets" not in meta:
        raise FormatError(f"{path}: lrcompress metadata has no 'targets'")
    records = load_json(meta["targets"], f"{path}: 'targets' metadata", max_depth=MAX_TARGETS_DEPTH)
    if not isinstance(records, list):
        raise FormatError(f"{path}: 'targets' metadata is a JSON {type(records).__name__}, not a list")
    specs = []
    for i, record in enumerate(records):
        try:
            spec = TargetSpec.from_dict(record)
            _check_name(spec)
        except FormatError as exc:
            raise FormatError(f"{path}: target record {i}: {exc}") from None
        if version < 2 and isinstance(record, dict) and "structure" in record:
            raise FormatError(f"{path}: target record {i} names a structure, which format {version} files do not "
                              "record (format 2 does)")
        specs.append(spec)
    _check_together(specs, path)
    return specs


def check_compressed(tensors: dict[str, Tensor], meta: dict[str, str] | None, path="file") -> list[TargetSpec]:
    """Validate a compressed file's metadata against its tensors; returns its specs ([] if plain).

    Nothing is computed from a file before this passes. Raises ``FormatError``.
    """
    specs = targets_from_metadata(meta, path)
    for spec in specs:
        _check_factors(spec, tensors, path)
        _check_recurrent_shape(spec, specs, tensors, path)
    if (meta or {}).get("format") == "lrcompress":
        _check_unrecorded(specs, tensors, path)
    shared_tensors(tensors, meta, path)
    recorded_errors(meta, specs, path)
    return specs


ERRORS_KEY = "rel_errors"  # optional: {target: ||W - W_hat||_F / ||W||_F when converted}, written by convert


def recorded_errors(meta: dict[str, str] | None, specs: list[TargetSpec], path="file") -> dict[str, float]:
    """The relative error of each target when it was converted, if the file records them
    (``lrcompress convert`` does): ``{name: error}`` of recorded targets, each finite and >= 0."""
    text = (meta or {}).get(ERRORS_KEY)
    if text is None:
        return {}
    errors = load_json(text, f"{path}: '{ERRORS_KEY}' metadata", max_depth=2)
    names = {s.name for s in specs}
    if not isinstance(errors, dict):
        raise FormatError(f"{path}: '{ERRORS_KEY}' metadata is not an object of target: error")
    for name, value in errors.items():
        if name not in names:
            raise FormatError(f"{path}: '{ERRORS_KEY}' names {name[:80]!r}, which 'targets' does not record")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise FormatError(f"{path}: '{ERRORS_KEY}' gives {name} the error {str(value)[:40]!r}, not a finite "
                              "number >= 0")
    return {k: float(v) for k, v in errors.items()}


SHARED_KEY = "shared_tensors"  # io writes it: {key: first key holding the same tensor}


def shared_tensors(tensors: dict[str, Tensor], meta: dict[str, str] | None, path="file") -> dict[str, str]:
    """The file's record of tied weights, ``{key: key it repeats}``, checked against the tensors:
    both stored, with equal shape, dtype and values (a tie that is not one would miscount)."""
    text = (meta or {}).get(SHARED_KEY)
    if text is None:
        return {}
    shared = load_json(text, f"{path}: '{SHARED_KEY}' metadata", max_depth=2)
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise FormatError(f"{path}: '{SHARED_KEY}' metadata is not an object of key: key")
    for key, first in shared.items():
        a, b = tensors.get(key), tensors.get(first)
        if a is None or b is None or key == first or first in shared:
            raise FormatError(f"{path}: '{SHARED_KEY}' names {key!r} -> {first!r}, which are not two stored tensors")
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            raise FormatError(f"{path}: '{SHARED_KEY}' says {key} repeats {first}, but their values differ")
    return shared


_ORIGINAL = re.compile(r"original\d+")  # a non-low-rank weight's stored originals: <name>.original<i>
# A key below a recurrent weight's name (``rnn.weight_hh_l0.L``): weights are never modules.
_BELOW_RNN_WEIGHT = re.compile(r"(?:^|\.)weight_(?:hh|ih|hr)_l\d+(?:_reverse)?\.")


def _check_unrecorded(specs: list[TargetSpec], tensors: dict[str, Tensor], path) -> None:
    """Factors with no record: a file whose ``targets`` lost a record would merge to factors
    stored as if they were weights. ``<w>.L`` beside ``<w>.R`` without ``<w>`` itself, or any key
    below a recurrent weight name, must belong to a record."""
    recorded = {key for spec in specs for key in spec.factor_keys().values()}
    for key in sorted(tensors):
        if key in recorded:
            continue
        base, _, part = key.rpartition(".")
        stray = bool(part in ("L", "R", "D") and base and base not in tensors and (
            f"{base}.L" in tensors and f"{base}.R" in tensors))
        stray |= bool(_ORIGINAL.fullmatch(part) and base and base not in tensors and f"{base}.original0" in tensors)
        if stray or _BELOW_RNN_WEIGHT.search(key):
            owner = next((spec for spec in specs if spec.name == base), None)
            parts = "only .L, .R, .D" if owner is None or owner.lowrank else \
                f"{owner.structure} stores {', '.join('.' + p for p in owner.factor_shapes())}"
            raise FormatError(f"{path}: {key} is not a factor of the format ({parts})" if owner is not None else
                              f"{path}: {key} looks like a factor of {base}, but 'targets' has no record of {base}")


def check_weight(name: str, W: Tensor, action: str = "factor") -> None:
    """A weight can be factored (or its spectrum taken): dense, real floating point, non-empty, finite.

    ``action`` names what is refused in the message ("factor", "analyse"). Raises
    ``DegenerateWeightError`` (sparse, integer/bool/complex, empty) or ``WeightError`` (NaN/Inf).
    """
    if W.layout != torch.strided:
        raise DegenerateWeightError(f"{name} is a sparse tensor ({W.layout}); cannot {action} it: only dense "
                                    "weights are supported")
    if not W.is_floating_point():
        raise DegenerateWeightError(f"{name} has dtype {W.dtype}; cannot {action} it: only real floating-point "
                                    "weights are supported")
    if W.numel() == 0:
        raise DegenerateWeightError(f"{name} is empty (shape {tuple(W.shape)}); there is nothing to {action}")
    if not torch.isfinite(W).all():
        raise WeightError(f"{name} holds NaN or Inf values; refusing to {action} it")


def _check_name(spec: TargetSpec) -> None:
    """A recurrent record's weight name must be a recurrent weight of the record's role."""
    if spec.layer not in RNN_LAYERS:
        return
    m = RNN_WEIGHT_NAME.match(spec.weight)
    if m is None:
        raise FormatError(f"{spec.name}: {spec.weight!r} is not a {spec.layer} weight name "
                          "(weight_hh_l<k>, weight_ih_l<k>, weight_hr_l<k>, or a cell's weight_hh / weight_ih)")
    if KIND_ROLE[m.group("kind")] != spec.role:
        raise FormatError(f"{spec.name}: role {spec.role!r} does not match the weight name (a "
                          f"{KIND_ROLE[m.group('kind')]} weight)")


def _check_together(specs: list[TargetSpec], path) -> None:
    """No weight recorded twice; every recurrent record of one module names the same layer kind."""
    seen: set[str] = set()
    kinds: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise FormatError(f"{path}: {spec.name} is recorded twice in 'targets'")
        seen.add(spec.name)
        if spec.layer in RNN_LAYERS:
            kind = kinds.setdefault(spec.module, spec.layer)
            if kind != spec.layer:
                raise FormatError(f"{path}: module {spec.module or '<root>'!r} is recorded both as {kind} and as "
                                  f"{spec.layer}")


def _check_factors(spec: TargetSpec, tensors: dict[str, Tensor], path) -> None:
    if spec.name in tensors:
        raise FormatError(f"{path}: {spec.name} is stored dense although 'targets' records it as factored")
    shapes = spec.factor_shapes()
    if spec.lowrank and not spec.diag and f"{spec.name}.D" in tensors:
        raise FormatError(f"{path}: {spec.name}.D (a diagonal) is stored but 'targets' says diag=false")
    originals = spec.original_count()  # the rest are a structure's buffers (orthogonal: signs)
    dtypes = set()
    for i, (part, shape) in enumerate(shapes.items()):
        key = f"{spec.name}.{part}"
        t = tensors.get(key)
        if t is None:
            raise FormatError(f"{path}: {'factor' if i < originals else 'buffer'} {key} is missing")
        if tuple(t.shape) != shape:
            raise FormatError(f"{path}: {key} has shape {tuple(t.shape)}, but its record ({_describe(spec)}) "
                              f"implies {shape}")
        if i < originals and not t.is_floating_point():
            raise FormatError(f"{path}: {key} has dtype {t.dtype}; factors must be floating point")
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise FormatError(f"{path}: {key} holds NaN or Inf values")
        if i < originals:
            dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise FormatError(f"{path}: the factors of {spec.name} mix dtypes {sorted(map(str, dtypes))}")
    if originals < len(shapes):  # a structure's buffers (signs) must say what its recorded options say
        from .structures import from_parts, json_options

        parts = {part: tensors[f"{spec.name}.{part}"] for part in shapes}
        found = json_options(from_parts(spec.structure, spec.gates, spec.rows, spec.cols, spec.options,
                                        parts).param.options())
        if found != spec.options:
            raise FormatError(f"{path}: the buffers of {spec.name} give options {found}, its record says "
                              f"{spec.options}")
    bias = _bias_key(spec)
    rows = spec.gates * spec.rows
    if bias in tensors and tuple(tensors[bias].shape) != (rows,):
        raise FormatError(f"{path}: {bias} has shape {tuple(tensors[bias].shape)}, but {spec.name} has {rows} rows")


def _check_recurrent_shape(spec: TargetSpec, specs: list[TargetSpec], tensors: dict[str, Tensor], path) -> None:
    """A recurrent weight maps the state to the gates: its blocks are ``h x h``, or ``h x p`` for
    an LSTM with ``proj_size`` p (whose ``weight_hr`` then has p rows)."""
    if spec.role != "recurrent" or spec.layer not in RNN_LAYERS:
        return
    expected, what = spec.rows, "the hidden size"
    hr = spec.weight.replace("weight_hh", "weight_hr", 1)
    hr_name = f"{spec.module}.{hr}" if spec.module else hr
    if spec.layer == "lstm" and hr != spec.weight:
        recorded = next((s for s in specs if s.name == hr_name), None)
        if recorded is not None:
            expected, what = recorded.rows, f"the projection size of {hr_name}"
        elif hr_name in tensors and tensors[hr_name].dim() == 2:
            expected, what = tensors[hr_name].shape[0], f"the projection size of {hr_name}"
    if spec.cols != expected:
        raise FormatError(f"{path}: {spec.name} is recorded with {spec.cols} columns, but a recurrent weight has "
                          f"{what} ({expected}) columns")


def _bias_key(spec: TargetSpec) -> str | None:
    """The bias added to this weight's output in the same module (None: an LSTM projection, or a
    Linear-like weight not named ``weight``, whose bias is unknown)."""
    if spec.role == "projection" or (spec.layer not in RNN_LAYERS and spec.weight != "weight"):
        return None
    weight = spec.weight.replace("weight", "bias", 1) if spec.layer in RNN_LAYERS else "bias"
    return f"{spec.module}.{weight}" if spec.module else weight


def _describe(spec: TargetSpec) -> str:
    if not spec.lowrank:
        return f"{spec.gates} gate(s) of {spec.rows}x{spec.cols}, {spec.structure} {spec.describe()}"
    return (f"{spec.gates} gate(s) of {spec.rows}x{spec.cols}, rank {spec.rank}"
            f"{', tied' if spec.tied else ''}{', diag' if spec.diag else ''}")
