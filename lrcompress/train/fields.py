"""Typed settings: merge a section of user values onto its defaults and check every value.

The type of each key is the type of its default (an int default takes ints, a float default
takes ints or floats, ...); keys whose default is ``None`` name their types in ``types``.
Every error is a ``ConfigError`` naming the key and the bad value.

    >>> check_fields("train", {"lr": 1}, {"lr": 1e-3, "optimizer": "adam"})
    {'lr': 1.0, 'optimizer': 'adam'}
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError

TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string", list: "a list"}


def check_fields(where: str, values: dict, defaults: dict, *, types: dict[str, tuple[type, ...]] | None = None,
                 choices: dict[str, tuple] | None = None) -> dict:
    """``defaults`` updated with ``values``, each value checked; unknown keys are errors."""
    types, choices = types or {}, choices or {}
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table of settings, got {values!r}")
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known keys: {', '.join(sorted(defaults))})")
    out = dict(defaults)
    for key, value in values.items():
        allowed = types.get(key) or (type(defaults[key]),)
        out[key] = _typed(f"{where}.{key}", value, allowed)
        if key in choices and out[key] not in choices[key]:
            raise ConfigError(f"{where}.{key} must be one of {', '.join(map(repr, choices[key]))}, got {value!r}")
    return out


def _typed(name: str, value: Any, allowed: tuple[type, ...]) -> Any:
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (str, list) and isinstance(value, kind):
            return value
    wanted = " or ".join(TYPE_NAMES.get(k, k.__name__) for k in allowed if k is not type(None))
    raise ConfigError(f"{name} must be {wanted}, got {value!r}")


def check_range(where: str, values: dict, key: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise unless ``values[key]`` is finite and lies in the interval (``None`` values pass)."""
    value = values[key]
    if value is None:
        return
    bad = isinstance(value, float) and not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        left = "(" if low_open or low is None else "["  # infinities are never allowed: open there
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{where}.{key} must be in {span}, got {value!r}")
