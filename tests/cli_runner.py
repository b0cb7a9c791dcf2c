"""The command-line tests' helpers: ``lrcompress`` run in-process as a user calls it, folder snapshots.

conftest.py turns ``invoke`` into the ``run`` fixture:

>>> code, out, err = run("convert", path, "--rank", 4)          # doctest: +SKIP
>>> run("inspect", path).code                                   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from lrcompress import cli


class Run(NamedTuple):
    code: int  # exit code: 0, 2 for a user error, 130 for Ctrl-C
    out: str
    err: str


def invoke(monkeypatch, capsys, *args) -> Run:
    """``lrcompress *args`` through ``cli.main``: its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["lrcompress", *map(str, args)])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    capsys.readouterr()
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return Run(code, out, err)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file under ``folder``, hidden and temporary ones included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
