"""The README's Python examples run as written: each ```python block, in a fresh namespace, in an
empty folder. A block that cannot run here (it needs a GPU, the network or files the reader
has) is preceded by ``<!-- skip-test: why -->`` and reported as skipped with that reason; a
block that imports an optional extra (transformers, matplotlib, ...) is skipped where that
extra is not installed."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip-test\b:?\s*(.*?)\s*-->\s*$", re.S)

OPTIONAL = {"transformers", "matplotlib", "tensorboard", "accelerate"}  # extras, not core dependencies

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, skip reason or None) of every ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip()
        skip = SKIP.search(before[before.rfind("\n") + 1:] if "\n" in before else before)
        blocks.append((line, match.group(1), (skip.group(1) or "marked skip-test") if skip else None))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_examples_and_the_extractor_finds_them():
    assert len(BLOCKS) >= 5
    sample = "text\n\n<!-- skip-test: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert python_blocks(sample) == [(4, "x = 1\n", "needs a GPU"), (8, "y = 2\n", None)]


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_python_block_runs(line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # files the example writes land in a fresh folder
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"needs the optional package {exc.name}")
