"""What to compress and how: rank rules, the compression config and the per-target spec.

``CompressionConfig`` checks itself on construction and round-trips through JSON;
``TargetSpec`` is what a saved file records for each factored weight, enough to rebuild the
factorization on a dense skeleton without the config.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase

from torch import Tensor

from .errors import ConfigError, FormatError, RankError
from .factorize import SVD_METHODS, factored_params, fraction_rank, rank_for_energy
from .jsonout import dumps
from .structures import LOWRANK, OPTION_FIELDS, get as get_structure
from .whitening import CALIBRATION_DAMPING, check_damping

ALLOCATIONS = ("absolute", "relative")  # see lrcompress.budget

RankValue = int | float | str
ROLES = ("recurrent", "input", "projection", "linear")
LAYERS = ("gru", "lstm", "rnn", "linear")


@dataclass(frozen=True)
class RankRule:
    """A rank: ``absolute`` (int), ``fraction`` of full rank, or ``energy`` kept (both in (0, 1])."""

    kind: str
    value: float

    @classmethod
    def parse(cls, value: RankValue, *, where: str = "rank") -> "RankRule":
        """``24`` -> absolute, ``0.25`` -> fraction, ``"energy=0.9"`` -> energy; strings of either too."""
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(value, str):
            text = value.strip().lower()
            if text.startswith("energy"):
                number = text[len("energy"):].lstrip("=:").strip()
                return cls._checked("energy", _number(number, value, where), value, where)
            value = _number(text, value, where)
        if isinstance(value, (int, float)) and value <= 0:
            raise RankError(f"{where} must be positive, got {value!r}")
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 1):
            return cls("absolute", int(value))
        if isinstance(value, float):
            return cls._checked("fraction", value, value, where)
        raise ConfigError(f"{where} must be an int, a fraction or 'energy=F', got {value!r}")

    @classmethod
    def _checked(cls, kind: str, number: float, shown: RankValue, where: str) -> "RankRule":
        if not (0.0 < number <= 1.0) or math.isnan(number):
            what = where if where == kind else f"{where} {kind}"  # "energy", not "energy energy"
            raise ConfigError(f"{what} must be in (0, 1], got {shown!r}")
        return cls(kind, float(number))

    def resolve(self, full_rank: int, spectrum: Tensor | None = None) -> int:
        """The integer rank for a target of this full rank (energy needs its spectrum)."""
        if self.kind == "absolute":
            return int(self.value)
        if self.kind == "fraction":
            return fraction_rank(self.value, full_rank)
        if spectrum is None:
            raise ValueError("an energy rank needs the target's singular values")
        return rank_for_energy(spectrum, self.value)

    def __str__(self) -> str:
        return {"absolute": f"{int(self.value)}", "fraction": f"{self.value:g}"}.get(
            self.kind, f"energy={self.value:g}")


def _number(text: str, shown: RankValue, where: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where} must be an int, a fraction or 'energy=F', got {shown!r}") from None


def int_list(text: str, option: str) -> list[int]:
    """``"4,8,16"`` -> ``[4, 8, 16]``; anything but a comma list of positive ints is a ConfigError."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{option} must be a comma list of positive ints, got {text!r}")
    return values


def _modes(value, name: str, parse) -> tuple:
    """Factor / mode shapes: the CLI text (``"64x64"``, parsed by the structure module's parser) or
    a sequence of positive ints or of ``(m, n)`` pairs, as nested tuples."""
    if isinstance(value, str):
        if parse is None:
            raise ConfigError(f"{name} must be a list of sizes, got {value!r}")
        value = parse(value)
    try:
        items = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
    except TypeError:
        items = ()

    def size(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not items or not all(size(v) or (isinstance(v, tuple) and len(v) == 2 and all(map(size, v)))
                            for v in items):
        raise ConfigError(f"{name} must be positive sizes (a, b, ...) or (m, n) pairs, got {value!r}")
    return items


def _ranks(value, parse=None) -> int | tuple[int, ...]:
    """``tt_ranks``: one positive int, or one per bond (a sequence, or the text ``"4,8,4"``)."""
    if isinstance(value, str):
        if parse is not None:
            value = parse(value)
        else:
            values = int_list(value, "tt_ranks")
            value = values[0] if len(values) == 1 else tuple(values)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return tuple(value)
    raise ConfigError(f"tt_ranks must be a positive int or one per bond, got {value!r}")


def name_matches(pattern: str, name: str) -> bool:
    """Glob match on a dotted name; a pattern without wildcards also matches as a dotted suffix."""
    if any(c in pattern for c in "*?["):
        return fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


ALL_LINEAR = "all-linear"  # peft's shorthand: every nn.Linear except the output layer
Selection = tuple[str, ...] | str  # a list of names/suffixes/globs, or one full-match regex


def selects(selection: Selection, name: str, prefix: str = "") -> bool:
    """Whether a ``targets``/``exclude`` value selects ``name``, in peft's conventions: a tuple
    of exact names, dotted suffixes or globs (``name_matches``), or one string matched with
    ``re.fullmatch`` against ``name`` (or ``prefix + name``, a wrapper's prefix).
    ``"all-linear"`` is resolved by type in ``targets.find_targets``, never matched here."""
    if isinstance(selection, str):
        if selection == ALL_LINEAR:
            return False
        return any(re.fullmatch(selection, n) for n in ((name, prefix + name) if prefix else (name,)))
    return any(name_matches(p, name) for p in selection)


def _selection(name: str, value) -> Selection:
    """Check and normalise a ``targets``/``exclude`` value: a list becomes a tuple, a string stays
    a regex (compiled here, so a bad one fails at once), ``["all-linear"]`` becomes ``"all-linear"``."""
    if isinstance(value, str):
        if value == ALL_LINEAR and name == "exclude":
            raise ConfigError(f"exclude={ALL_LINEAR!r} is not allowed (it selects targets); "
                              "to factor recurrent layers only, give no targets")
        if value != ALL_LINEAR:
            if not value.strip():
                raise ConfigError(f"{name} regex must not be empty")
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"{name} regex {value!r} is invalid: {exc}") from None
        return value
    try:
        value = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a list of name patterns or one regex string, got {value!r}") from None
    if not all(isinstance(p, str) and p.strip() for p in value):
        raise ConfigError(f"{name} must be non-empty name patterns, got {value!r}")
    if ALL_LINEAR in value:
        if name == "exclude" or len(value) > 1:
            raise ConfigError(f"{ALL_LINEAR!r} stands alone as {name} (use exclude to leave layers out), "
                              f"got {list(value)!r}")
        return ALL_LINEAR
    return value


@dataclass
class CompressionConfig:
    """How to compress a model.

    >>> CompressionConfig(rank=24, diag=True).to_json()  # doctest: +ELLIPSIS
    '{"rank": 24, ...'
    """

    rank: RankValue | None = None  # int, fraction of full rank, or "energy=F"
    energy: float | None = None  # shorthand for rank="energy=F": keep this share of s_i^2
    # A whole-model budget instead of a rank (lrcompress.budget chooses every target's rank):
    ratio: float | None = None  # parameters before / after at least this (>= 1)
    params: int | None = None  # at most this many parameters in the whole model
    energy_scope: str = "matrix"  # energy per "matrix", or over all targets together ("model")
    # What a budget minimises: the summed squared (output) error of all targets ("absolute"), or
    # the sum of each target's squared error relative to its own ||W S||^2 ("relative").
    allocation: str = "relative"
    diag: bool | str = False  # add a trainable diagonal where a block is square (paper eq. 5); "auto": where it pays (budgets)
    tied: bool = False  # one R shared by the gates of a weight (the paper's tied variant)
    include_input: bool = False  # also factor input-to-hidden matrices (paper: recurrent only)
    include_projection: bool = False  # also factor LSTM proj_size matrices weight_hr
    # Name selections in peft's conventions (docs/targets.md): a list of exact names, dotted
    # suffixes or globs; one string is a full-match regex; "all-linear" every Linear but the output layer.
    targets: Selection = ()  # extra nn.Linear modules (e.g. ["*.gate"], "all-linear")
    exclude: Selection = ()  # modules or weights never to factor
    ranks: dict[str, RankValue] = field(default_factory=dict)  # per-target overrides, first match wins
    svd: str = "auto"  # "exact", "randomized", or "auto" (randomized for large matrices)
    diag_iters: int | None = None  # most diagonal-fit iterations (None: stop below 0.1% gain; cap 50 exact, 20 randomized)
    seed: int = 0  # randomized-SVD seed, for reproducible fits
    # With calibration data: the relative ridge C + damping * mean(diag C) * I of every fit (docs/calibration.md).
    damping: float = CALIBRATION_DAMPING
    # The structure of every target (lrcompress.structures): "lowrank" (the options above), or
    # "kronecker", "tt", "orthogonal" with their own options below (docs/structures.md).
    structure: str = LOWRANK
    kron_factors: tuple | str | None = None  # kronecker: (a, b, ...) square factors or ((m1, n1), ...); "64x64"
    terms: int | None = None  # kronecker: a sum of this many Kronecker products (default 1)
    tt_ranks: int | tuple[int, ...] | str | None = None  # tt: one TT-rank for every bond, or one per bond
    tt_shape: tuple | str | None = None  # tt: mode sizes (m1, m2, ...) or ((m1, n1), ...); "8x8x8x8"
    joint: bool = False  # tt: one tensor train for all gate blocks of a weight (paper 002's fully tensorized RNN)
    negatives: int | None = None  # orthogonal: -1 entries of the scaling diagonal D (scoRNN's rho)

    def __post_init__(self) -> None:
        if self.structure != LOWRANK:
            self._check_structure()
            return
        stray = [f for f in OPTION_FIELDS if getattr(self, f) not in (None, False)]
        if stray:
            raise ConfigError(f"{stray[0]} is an option of structure {OPTION_FIELDS[stray[0]]!r}, not of "
                              f"'lowrank' (give structure={OPTION_FIELDS[stray[0]]!r})")
        given = [n for n in ("rank", "energy", "ratio", "params") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of rank and energy (or a ratio or params budget), got "
                              f"{' and '.join(given) if given else 'none'}")
        self._check_budget()
        if not self.budgeted:
            self.rule()  # validates rank / energy
        for pattern, value in self.ranks.items():
            RankRule.parse(value, where=f"rank for {pattern!r}")
        for name in ("targets", "exclude"):
            setattr(self, name, _selection(name, getattr(self, name)))
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")
        if self.diag_iters is not None and (isinstance(self.diag_iters, bool) or not isinstance(self.diag_iters, int)
                                            or self.diag_iters < 0):
            raise ConfigError(f"diag_iters must be a non-negative int, got {self.diag_iters!r}")
        self.damping = check_damping(self.damping)

    def _check_structure(self) -> None:
        """A non-low-rank structure: its own options only, each of the right kind (normalised to
        tuples, so a config equals itself read back from JSON); the shapes they must fit are
        checked per target by the structure's ``check`` when compressing."""
        entry = get_structure(self.structure)
        lowrank = {"rank": None, "energy": None, "ratio": None, "params": None, "energy_scope": "matrix",
                   "allocation": "relative", "diag": False, "tied": False, "ranks": {}, "svd": "auto",
                   "diag_iters": None, "damping": CALIBRATION_DAMPING}
        for name, default in lowrank.items():
            if getattr(self, name) != default:
                raise ConfigError(f"{name} is a low-rank option; structure {self.structure!r} takes "
                                  f"{', '.join(entry.field_names) or 'no options'}")
        for name, owner in OPTION_FIELDS.items():
            if owner != self.structure and getattr(self, name) not in (None, False):
                raise ConfigError(f"{name} is an option of structure {owner!r}, not of {self.structure!r}")
        missing = [f for f in entry.required if getattr(self, f) is None]
        if missing:
            raise ConfigError(f"structure {self.structure!r} needs {' and '.join(missing)}")
        code = entry.code if self.structure in ("kronecker", "tt") else None
        if self.kron_factors is not None:
            self.kron_factors = _modes(self.kron_factors, "kron_factors", getattr(code, "parse_factors", None))
        if self.tt_shape is not None:
            self.tt_shape = _modes(self.tt_shape, "tt_shape", getattr(code, "parse_shape", None))
        if self.tt_ranks is not None:
            self.tt_ranks = _ranks(self.tt_ranks, getattr(code, "parse_ranks", None))
        for name, low in (("terms", 1), ("negatives", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.joint, bool):
            raise ConfigError(f"joint must be true or false, got {self.joint!r}")
        for name in ("targets", "exclude"):
            setattr(self, name, _selection(name, getattr(self, name)))

    def structure_options(self) -> dict:
        """The keyword options of the structure's class (``Kronecker(..., factors=, terms=)``, ...)."""
        return get_structure(self.structure).options_of(self)

    @property
    def budgeted(self) -> bool:
        """Whether a whole-model budget (``ratio`` or ``params``) chooses the ranks."""
        return self.ratio is not None or self.params is not None

    def _check_budget(self) -> None:
        ratio, params = self.ratio, self.params
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not math.isfinite(ratio) or ratio < 1):
            raise ConfigError(f"ratio must be a number >= 1 (parameters before / after), got {ratio!r}")
        if params is not None and (isinstance(params, bool) or not isinstance(params, int) or params < 1):
            raise ConfigError(f"params must be a positive int (the whole model's parameter budget), got {params!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.energy_scope not in ("matrix", "model"):
            raise ConfigError(f"energy_scope must be 'matrix' or 'model', got {self.energy_scope!r}")
        if self.energy_scope == "model" and (self.budgeted or self.rule().kind != "energy"):
            raise ConfigError("energy_scope='model' needs an energy rank (energy=F), "
                              f"got {'a budget' if self.budgeted else f'rank {self.rank!r}'}")
        if self.diag not in (True, False, "auto"):
            raise ConfigError(f"diag must be true, false or 'auto', got {self.diag!r}")
        if self.diag == "auto" and not self.budgeted:
            raise ConfigError("diag='auto' chooses diagonals within a budget: give ratio= or params= with it")

    def rule(self) -> RankRule:
        if self.budgeted:
            raise ConfigError("a ratio or params budget chooses the ranks: there is no single rank rule")
        if self.energy is not None:
            return RankRule.parse(f"energy={self.energy}", where="energy")
        return RankRule.parse(self.rank, where="rank")

    def rule_for(self, *names: str) -> RankRule:
        """The rank rule of a target known by ``names`` (weight name, module name)."""
        return self.override_for(*names) or self.rule()

    def override_for(self, *names: str) -> RankRule | None:
        """The per-pattern rank of a target known by ``names`` (first match), or None."""
        for pattern, value in self.ranks.items():
            if any(name_matches(pattern, n) for n in names):
                return RankRule.parse(value, where=f"rank for {pattern!r}")
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        # a list stays a JSON list, a regex (or "all-linear") a JSON string: the kinds round-trip
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            d[name] = value if isinstance(value, str) else list(value)
        if self.structure == LOWRANK:  # a low-rank config reads as before (and older lrcompress reads it)
            for name in ("structure", *OPTION_FIELDS):
                d.pop(name)
        return d

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        if not isinstance(data.get("ranks", {}), dict):
            raise ConfigError(f"ranks must be an object of pattern: rank, got {data['ranks']!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "CompressionConfig":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"not a valid JSON compression config ({str(exc)[:120]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"a compression config is a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def save(self, path, *, force: bool = False):
        """Write this config as a JSON file (atomically; an existing file only with ``force``).

        >>> CompressionConfig(rank=24, diag=True).save("lrd24.json")  # doctest: +SKIP
        """
        from .io import write_text_atomic  # io imports this module: a local import keeps one direction

        return write_text_atomic(path, dumps(self.to_dict(), indent=2) + "\n", force=force)

    @classmethod
    def load(cls, path) -> "CompressionConfig":
        """Read a config written by ``save`` (or by hand); a bad file is one ``ConfigError`` naming it."""
        from pathlib import Path

        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a config file")
        if not path.is_file():
            raise ConfigError(f"no such config file: {path}")
        if path.stat().st_size > 2**20:  # a real config is a few hundred bytes
            raise ConfigError(f"{path} is too large ({path.stat().st_size:,} bytes) for a compression config")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class TargetSpec:
    """One factored weight as recorded in a saved file: ``<module>.<weight>``, its shape and structure.

    Low rank (``structure="lowrank"``) is described by ``rank``, ``diag``, ``tied``; every other
    structure by its class's normalised ``options`` (JSON values), with ``rank`` 0.
    """

    module: str  # dotted module path ("" for the root)
    weight: str  # parameter name, e.g. "weight_hh_l0"
    layer: str  # "gru", "lstm", "rnn" or "linear"
    role: str  # "recurrent", "input", "projection" or "linear"
    gates: int  # stacked gate blocks: 3 GRU, 4 LSTM, 1 RNN/Linear/projection
    rows: int  # rows of one block
    cols: int
    rank: int = 0  # low rank only
    diag: bool = False
    tied: bool = False
    structure: str = LOWRANK  # lrcompress.structures name
    options: dict = field(default_factory=dict, hash=False)  # the structure's options (not low rank)

    def __post_init__(self) -> None:
        from .structures import json_options

        object.__setattr__(self, "options", json_options(self.options))  # lists, as read from a file

    @property
    def name(self) -> str:
        return f"{self.module}.{self.weight}" if self.module else self.weight

    @property
    def lowrank(self) -> bool:
        return self.structure == LOWRANK

    @property
    def dense_params(self) -> int:
        return self.gates * self.rows * self.cols

    @property
    def factored_params(self) -> int:
        if not self.lowrank:
            return self._layout()[2]
        return factored_params(self.gates, self.rows, self.cols, self.rank, diag=self.diag, tied=self.tied)

    def describe(self) -> str:
        """The structure's options in words, e.g. ``rank 24, diag`` or ``factors 16x16, terms 2``."""
        from .structures import describe

        if self.lowrank:
            return describe(LOWRANK, {"rank": self.rank, "diag": self.diag, "tied": self.tied})
        return describe(self.structure, self.options)

    def factor_keys(self) -> dict[str, str]:
        """State-dict keys of the factors in a saved file: ``<name>.L``, ``.R`` (and ``.D``); for
        other structures ``<name>.original0``, ``.original1``, ... then the buffers (``<name>.signs``)."""
        return {k: f"{self.name}.{k}" for k in self.factor_shapes()}

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        if not self.lowrank:
            originals, buffers, _ = self._layout()
            return {**{f"original{i}": s for i, s in enumerate(originals)}, **buffers}
        shapes = {"L": (self.gates, self.rows, self.rank),
                  "R": (self.rank, self.cols) if self.tied else (self.gates, self.rank, self.cols)}
        if self.diag:
            shapes["D"] = (self.gates, self.rows)
        return shapes

    def original_count(self) -> int:
        """How many of ``factor_keys`` are the parametrization's originals (the rest are buffers)."""
        return len(self._layout()[0]) if not self.lowrank else 2 + self.diag

    def _layout(self) -> tuple:
        from .structures import layout

        return layout(self.structure, self.gates, self.rows, self.cols, self.options)

    def to_dict(self) -> dict:
        """The file's record: version 1's fields for low rank; ``structure`` + ``options`` otherwise."""
        d = asdict(self)
        if self.lowrank:
            del d["structure"], d["options"]
        else:
            del d["rank"], d["diag"], d["tied"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TargetSpec":
        """A record read from a file: exactly the known fields, each of its type (``true`` is not
        ``1``), a known layer and role with their gate count, ``diag`` only on square blocks; a
        non-low-rank record's options accepted by its structure's ``check`` for the record's shape.

        Raises ``FormatError`` naming the first bad field and its value (file input is untrusted).
        """
        if not isinstance(data, dict):
            raise FormatError(f"a target record must be a JSON object, got {type(data).__name__}")
        structure = data.get("structure", LOWRANK)
        if structure == LOWRANK:
            names = [n for n in _RECORD_TYPES if n != "options"]
            optional = {"structure"}
        else:
            names = [n for n in _RECORD_TYPES if n not in ("rank", "diag", "tied")]
            optional = set()
        known = set(names)
        unknown = sorted(set(map(str, data)) - known)
        missing = [n for n in names if n not in data and n not in optional]
        if unknown or missing:
            raise FormatError(f"target record {_short(data)}: " + "; ".join(
                filter(None, [unknown and f"unknown fields {unknown[:5]}", missing and f"missing fields {missing}"])))
        for name in names:
            if name not in data:
                continue
            kind = _RECORD_TYPES[name]
            value = data[name]
            # bool is an int subclass in Python: a 'true' rank or a '1' diag is a lie, not a value.
            if type(value) is not kind or (kind is int and value <= 0):
                want = {str: "a string", int: "a positive integer", bool: "true or false", dict: "an object"}[kind]
                raise FormatError(f"target record {_short(data)}: {name} must be {want}, got {_short(value)}")
        spec = cls(**{n: data[n] for n in names if n in data})
        if spec.layer not in LAYERS or spec.role not in ROLES:
            raise FormatError(f"{spec.name}: unknown layer {_short(spec.layer)} or role {_short(spec.role)} "
                              f"(layers {', '.join(LAYERS)}; roles {', '.join(ROLES)})")
        gates = RECORD_GATES.get((spec.layer, spec.role))
        if gates is None:
            raise FormatError(f"{spec.name}: a {spec.layer} layer has no {spec.role} weight")
        if spec.gates != gates:
            raise FormatError(f"{spec.name}: a {spec.layer} {spec.role} weight has {gates} gate block(s), "
                              f"the record says {spec.gates}")
        if spec.diag and spec.rows != spec.cols:
            raise FormatError(f"{spec.name}: diag=true needs square blocks, the record says {spec.rows}x{spec.cols}")
        if not spec.lowrank:
            spec._check_options()
        return spec

    def _check_options(self) -> None:
        """A file's structure and options: a known structure whose ``check`` accepts the options
        for this shape unchanged (a writer stores them normalised)."""
        import warnings

        from .structures import STRUCTURES, get, json_options

        if self.structure not in STRUCTURES:
            raise FormatError(f"{self.name}: unknown structure {_short(self.structure)} "
                              f"(known: {', '.join(STRUCTURES)})")
        where = f"{self.name} ({self.structure}, {self.gates} block(s) of {self.rows}x{self.cols})"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a note such as a capped TT-rank shows as unnormalised options below
                normalised = json_options(get(self.structure).cls.check(self.gates, self.rows, self.cols,
                                                                        **self.options))
        except Exception as exc:  # any refusal of untrusted options is one line, never a traceback
            raise FormatError(f"{where}: options {_short(self.options)} are invalid "
                              f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
        if normalised != self.options:
            raise FormatError(f"{where}: options {_short(self.options)} are not in normal form "
                              f"({_short(normalised)})")


# Field types of a file's target record, and the gate blocks each (layer, role) stacks.
_RECORD_TYPES = {"module": str, "weight": str, "layer": str, "role": str, "gates": int, "rows": int, "cols": int,
                 "rank": int, "diag": bool, "tied": bool, "structure": str, "options": dict}
RECORD_GATES = {("gru", "recurrent"): 3, ("gru", "input"): 3, ("lstm", "recurrent"): 4, ("lstm", "input"): 4,
                ("lstm", "projection"): 1, ("rnn", "recurrent"): 1, ("rnn", "input"): 1, ("linear", "linear"): 1}


def _short(value, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: values from a hostile file may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
