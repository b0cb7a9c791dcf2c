"""When to draw a progress bar: one rule for every long job (training, evaluation, sweeps,
conversion, spectra, benchmarks), so that all bars behave alike.

A bar is drawn on stderr, never stdout (``--json`` keeps stdout for its one document), and only

- when asked for (``progress=True``, e.g. ``--progress``), or
- by default (``progress=None``) when stderr is a terminal: logs, pipes and CI stay clean;

and never while quiet (``lrcompress --quiet``, or ``quiet()`` in library code), which also
silences the per-evaluation lines of the training loop.

    >>> for item in bar(items, desc="factoring", unit="weight"):   # doctest: +SKIP
    ...     work(item)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

_quiet = False


def set_quiet(value: bool) -> None:
    """Silence (``True``) or allow (``False``) every progress bar and evaluation line."""
    global _quiet
    _quiet = bool(value)


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def quiet(value: bool = True) -> Iterator[None]:
    """``set_quiet(value)`` for the duration of a ``with`` block (restored after it)."""
    before = _quiet
    set_quiet(value)
    try:
        yield
    finally:
        set_quiet(before)


def enabled(progress: bool | None = None) -> bool:
    """Whether to draw a bar: never when quiet; else ``progress``, or (``None``) whether stderr
    is a terminal (checked now, so a redirected or replaced ``sys.stderr`` counts)."""
    if _quiet:
        return False
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def bar(iterable: Iterable | None = None, *, progress: bool | None = None, desc: str | None = None,
        total: int | float | None = None, unit: str = "it", leave: bool = False, **kwargs):
    """A ``tqdm`` bar on stderr, drawn or disabled by ``enabled(progress)``.

    Use it as tqdm: iterate over it, or ``update``/``set_postfix_str``/``write``/``close``;
    a disabled bar still accepts every call. ``kwargs`` go to ``tqdm``.
    """
    from tqdm.auto import tqdm  # here, not at import: `lrcompress --help` stays light

    disable = not enabled(progress)
    if not disable and "ncols" not in kwargs:
        kwargs.update(_fixed_size(sys.stderr))
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=disable, **{"dynamic_ncols": True, **kwargs})


def _fixed_size(stream) -> dict:
    """A fixed 80 x 24 for a terminal that reports 0 columns or rows (``script``, CI ptys, some
    IDE consoles): tqdm (which asks ``os.get_terminal_size`` for the stream) would otherwise
    trim every bar to nothing, or hide it as an overflowing row. ``{}`` when the size is usable
    or unknown (tqdm then follows the terminal as it is resized)."""
    try:
        columns, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # not a terminal, a replaced or closed stream
        return {}
    if columns > 0 and rows > 0:
        return {}
    return {"dynamic_ncols": False, "ncols": columns if columns > 0 else 80, "nrows": rows if rows > 0 else 24}
