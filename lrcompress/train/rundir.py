"""Run directories: lrcompress writes only into a folder it made, a new one, or an empty one.

A run or sweep directory lrcompress created holds ``RUN_MARKER``. Only such a directory (or a
new or empty one, or a run being resumed) is written into, so no file lrcompress did not write is
ever replaced or deleted: ``fit(run_dir=...)`` follows the same rule as ``lrcompress train``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LRCompressError, OutputExistsError

RUN_MARKER = ".lrcompress-run"


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse, before any work, a run directory whose files lrcompress did not write.

    Raises ``LRCompressError`` when ``out`` or a parent is a regular file, ``OutputExistsError``
    when it holds a finished run (without ``resume``) or files of someone else's.
    """
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise LRCompressError(f"cannot use {out} as a run directory: {folder} exists and is not a directory")
            break
    if not resume and (out / "last.safetensors").exists():
        raise OutputExistsError(f"{out} already holds a run; continue it with --resume (resume=True) "
                                "or choose another directory")
    if out.is_dir() and not (out / RUN_MARKER).is_file() and not (resume and (out / "last.safetensors").is_file()):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise OutputExistsError(f"{out} is not empty and lrcompress did not create it (it holds "
                                    f"{entries[0]!r}{' and more' if len(entries) > 1 else ''}); choose a new or "
                                    "empty directory")


def claim_run_dir(out: Path) -> None:
    """Create the run directory (if needed) and mark it as lrcompress's."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():
            (out / RUN_MARKER).write_text("written by lrcompress: its runs here may be replaced\n")
    except OSError as exc:
        raise LRCompressError(f"cannot create run directory {out}: {exc.strerror or exc}") from None


# Every name lrcompress writes into a run or sweep directory (and its temporaries' suffix).
RUN_FILES = frozenset({RUN_MARKER, "best.safetensors", "last.safetensors", "metrics.jsonl", "model.safetensors",
                       "recipe.toml", "summary.json", "finetune.json", "sweep.json"})
TEMP_SUFFIX = ".lrc-tmp"


def foreign_entry(folder: Path) -> Path | None:
    """The first entry of ``folder`` lrcompress did not write, or None when it holds only runs.

    A folder qualifies when it carries ``RUN_MARKER`` and every entry is a file of ``RUN_FILES``
    (or a temporary of lrcompress's), or a subfolder that qualifies in turn (a sweep's runs).
    Symlinks never qualify. Only such a folder may be replaced wholesale.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir() or not (folder / RUN_MARKER).is_file():
        return folder
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            return entry
        if entry.is_dir():
            inner = foreign_entry(entry)
            if inner is not None:
                return inner
        elif entry.name not in RUN_FILES and not entry.name.endswith(TEMP_SUFFIX):
            return entry
    return None
