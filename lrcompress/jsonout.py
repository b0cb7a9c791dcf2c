"""Strict JSON for everything lrcompress writes: files (``summary.json``, ``metrics.jsonl``,
``sweep.json``, ``finetune.json``, configs) and the ``--json`` output of every command.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which RFC 8259 JSON
(``jq``, JavaScript, most other parsers) rejects. A metric of a diverged run is such a value, so
every writer goes through ``dumps``: a non-finite float becomes ``null`` (the run's ``warnings``
say which metrics were not finite; the text output shows a missing value as ``-``).
"""

from __future__ import annotations

import json
import math


def finite(data):
    """``data`` with each non-finite float (NaN, +-Inf) in it, at any depth of dicts, lists and
    tuples, replaced by None; everything else as it is (tuples become lists, as JSON has them)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def dumps(data, **kwargs) -> str:
    """``json.dumps(finite(data), **kwargs)`` with ``allow_nan=False``: always strict JSON.

    >>> dumps({"val": {"mse": float("inf")}, "steps": [1.5, float("nan")]})
    '{"val": {"mse": null}, "steps": [1.5, null]}'
    """
    return json.dumps(finite(data), allow_nan=False, **kwargs)
