"""Character-level language modelling on any UTF-8 text: the paper's Table 2 task (section
3.0.4) on data every machine has.

By default the text is the English prose that ships inside CPython, ``pydoc_data.topics``
(the help pages of ``help("topics")``: 79 documents, about 465,000 characters, 103 distinct
characters), joined in sorted key order so the stream is the same on every machine; with
``text_file`` it is a file of the user's (UTF-8, optionally gzipped). Nothing is downloaded.

The text is cut, in order, into contiguous training, validation and test parts (90/5/5 by
default: ``valid_fraction`` and ``test_fraction``). The vocabulary is the set of characters of
the training part that occur there at least ``min_count`` times, sorted; when some character of
the whole text falls outside it (rare, or absent from the training part), one unknown symbol
``UNK`` (U+FFFD, the Unicode replacement character) joins the vocabulary and stands for all of
them. Batches are ``PtbCharTask``'s stream mode: each split is cut into ``batch_size``
contiguous streams read in windows of ``seq_len`` characters, x = characters t, y = t + 1, the
state carried from window to window. Metric: bits per character (``bpc``), with ``ppl``,
``ce`` (nats) and ``ppl_paper`` (in stream mode equal to ``ppl``: ``PtbCharTask.finalize``).

    >>> task = TextTask({"seq_len": 50})
    >>> task.input_size, task.metric
    (103, 'bpc')
"""

from __future__ import annotations

import hashlib
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, FormatError
from .fields import check_range
from .tasks_base import Task, check_split
from .tasks_data import PtbCharTask, Vocabulary, read_bytes

UNK = "\ufffd"  # stands for every character outside the vocabulary
DEFAULT_SOURCE = "pydoc_data.topics"


def default_text() -> str:
    """CPython's ``pydoc_data.topics`` help texts, joined in sorted key order (about 465 KB).

    Raises ``ConfigError`` when this Python lacks the module (some distributions strip it).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ConfigError("this Python has no pydoc_data module (its distribution strips it), so there is no "
                          "default text: pass your own UTF-8 text (--text FILE, or task.text_file)") from None
    return "".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (gzipped or not) as a string; ``FormatError`` when it is not UTF-8."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text: {exc}") from None


def split_text(text: str, valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """Contiguous ``train``/``valid``/``test`` parts, in this order: the last ``test_fraction``
    of the characters is the test part, the ``valid_fraction`` before it the validation part."""
    n = len(text)
    test_start = n - round(n * test_fraction)
    valid_start = test_start - round(n * valid_fraction)
    return {"train": text[:valid_start], "valid": text[valid_start:test_start], "test": text[test_start:]}


def text_vocabulary(parts: dict[str, str], min_count: int = 1) -> Vocabulary:
    """Characters of the training part seen at least ``min_count`` times, plus ``UNK`` when
    any character of any part falls outside them."""
    counts = Counter(parts["train"])
    kept = {c for c, k in counts.items() if k >= min_count}
    outside = any(set(part) - kept for part in parts.values())
    return Vocabulary(kept | ({UNK} if outside else set()))


class TextTask(PtbCharTask):
    """Character-level language modelling on a UTF-8 text (see the module docstring).

    Settings: ``text_file`` ("" = CPython's ``pydoc_data.topics``), ``seq_len`` (window length
    of truncated backpropagation through time), ``valid_fraction``/``test_fraction`` (share of
    the characters in each contiguous split), ``min_count`` (rarer training characters become
    ``UNK``), ``sha256`` (when set, the text must have this digest: a fine-tuning run then
    refuses a text that changed since the dense model was trained).
    """

    name = "text"
    DEFAULTS: ClassVar[dict] = {"text_file": "", "seq_len": 100, "valid_fraction": 0.05, "test_fraction": 0.05,
                                "min_count": 1, "sha256": ""}
    CHOICES: ClassVar[dict] = {}

    @classmethod
    def check(cls, spec: dict) -> None:
        check_range("task", spec, "seq_len", 1)
        check_range("task", spec, "min_count", 1)
        for key in ("valid_fraction", "test_fraction"):
            check_range("task", spec, key, 0.0, 0.5, low_open=True)

    def __init__(self, spec: dict):
        Task.__init__(self, spec)  # not PtbCharTask's: its settings (data_dir, mode, eol) do not apply
        self.stateful = True
        self._vocab: Vocabulary | None = None
        self._parts: dict[str, str] | None = None
        self._streams: dict[str, np.ndarray] = {}

    def text(self) -> str:
        """The whole text, checked against ``sha256`` when that is set."""
        return _load_text(self.spec["text_file"], self.spec["sha256"])

    def parts(self) -> dict[str, str]:
        """The text's ``train``/``valid``/``test`` parts (``split_text``), read on first use."""
        if self._parts is None:
            text = self.text()
            parts = split_text(text, self.spec["valid_fraction"], self.spec["test_fraction"])
            for split, part in parts.items():
                if len(part) < 2:
                    raise ConfigError(f"the {split} part of {self.spec['text_file'] or DEFAULT_SOURCE} holds "
                                      f"{len(part)} character{'s' * (len(part) != 1)}; the text ({len(text)} characters) is too short")
            self._parts = parts
        return self._parts

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = text_vocabulary(self.parts(), self.spec["min_count"])
        return self._vocab

    def stream(self, split: str) -> np.ndarray:
        """The symbol ids of ``split``, characters outside the vocabulary as ``UNK``."""
        check_split(split, 1)
        if split not in self._streams:
            ids = self.vocab.ids
            unk = ids.get(UNK, -1)
            part = self.parts()[split]
            self._streams[split] = np.fromiter((ids.get(c, unk) for c in part), dtype=np.int64, count=len(part))
        return self._streams[split]

    def lines(self, split: str) -> list[np.ndarray]:
        return [self.stream(split)]  # one contiguous stream per split

    def num_examples(self, split: str) -> int:
        return len(self.stream(split))


def text_digest(text: str) -> str:
    """SHA-256 of the text's UTF-8 bytes (what ``task.sha256`` holds)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_text(text_file: str, sha256: str) -> str:
    if text_file:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        info = path.stat()  # part of the cache key, so a file rewritten in place is read again
        text = _read_cached(path.resolve(), info.st_mtime_ns, info.st_size)
    else:
        text = _default_cached()
    if sha256 and text_digest(text) != sha256:
        source = text_file or DEFAULT_SOURCE
        raise ConfigError(f"{source} is not the text this run was made with (task.sha256 = {sha256[:12]}..., "
                          f"the text's is {text_digest(text)[:12]}...)")
    return text


@lru_cache(maxsize=4)
def _read_cached(path: Path, *stamp) -> str:
    return read_text(path)


@lru_cache(maxsize=1)
def _default_cached() -> str:
    return default_text()
