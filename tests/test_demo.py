"""The README's main job, shortened: the text task it runs on, and the demo end to end (text and
addition), through the library and through the command line."""

import json
import math
import sys
import time

import pytest
import torch

from lrcompress.demo import MARKER, PLOT, run_demo
from lrcompress.errors import ConfigError, FormatError, RankError
from lrcompress.train import tasks_text
from lrcompress.train.tasks import build_task
from lrcompress.train.tasks_base import Batch
from lrcompress.train.tasks_text import UNK, split_text, text_digest

pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path, text, name="t.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the text task ------------------------------------------------------------------------------

def test_splits_are_contiguous_in_order_and_sized_by_fraction():
    text = "".join(chr(ord("a") + i % 26) for i in range(200))
    parts = split_text(text, 0.1, 0.05)
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [170, 20, 10]
    assert parts["train"] + parts["valid"] + parts["test"] == text
    assert parts["test"] == text[-10:] and parts["valid"] == text[170:190]


def test_vocabulary_comes_from_training_part_with_one_unknown_symbol(tmp_path):
    # 20 characters, 10% each for validation and test: train "aabbaabbaabbaabb", valid "ab",
    # test "cd" (never seen in training: both become UNK).
    path = write(tmp_path, "aabb" * 4 + "ab" + "cd")
    task = build_task({"name": "text", "text_file": str(path), "valid_fraction": 0.1, "test_fraction": 0.1,
                       "seq_len": 3})
    assert task.vocab.symbols == ["a", "b", UNK]
    assert task.input_size == task.output_size == 3
    assert task.stream("test").tolist() == [2, 2]
    assert task.stream("valid").tolist() == [0, 1]
    assert task.num_examples("train") == 16
    # min_count: a character seen fewer times in training is unknown too, everywhere.
    rare = write(tmp_path, "aaaaaaaab" + "aa" + "aa" + "a", "rare.txt")
    task = build_task({"name": "text", "text_file": str(rare), "min_count": 2, "valid_fraction": 0.15,
                       "test_fraction": 0.15})
    assert task.vocab.symbols == ["a", UNK]
    assert task.stream("train").tolist() == [0] * 8 + [1, 0]  # "aaaaaaaaba"


def test_no_unknown_symbol_when_every_character_is_in_training(tmp_path):
    path = write(tmp_path, "abcabcabcabcabcabcab" + "ca" + "bc")
    task = build_task({"name": "text", "text_file": str(path), "valid_fraction": 0.08, "test_fraction": 0.08})
    assert task.vocab.symbols == ["a", "b", "c"]


def test_stream_windows_continue_the_text_and_targets_are_the_next_character(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 13) for i in range(400))
    task = build_task({"name": "text", "text_file": str(write(tmp_path, text)), "seq_len": 7})
    assert task.stateful and task.tokens and task.output == "sequence"
    batches = list(task.batches("train", 3, seed=0, shuffle=False))
    x = torch.cat([b.x for b in batches], dim=1)
    y = torch.cat([b.y for b in batches], dim=1)
    train = task.stream("train")
    per_stream = len(train) // 3
    for i in range(3):  # stream i is the i-th contiguous third of the training part
        expected = train[i * per_stream:(i + 1) * per_stream]
        assert x[i].tolist() == expected[:-1].tolist()
        assert y[i].tolist() == expected[1:].tolist()
    assert all(b.x.shape[1] <= 7 for b in batches)


def test_bpc_equals_a_hand_computation_in_float64(tmp_path):
    task = build_task({"name": "text", "text_file": str(write(tmp_path, "abcab" * 40)), "seq_len": 4})
    assert task.metric == "bpc" and not task.higher_is_better
    vocab = task.input_size
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, vocab, generator=gen)
    y = torch.randint(0, vocab, (2, 4), generator=gen)
    sums = task.evaluate(logits, Batch(torch.zeros(2, 4, dtype=torch.long), y))
    result = task.finalize(sums)
    bits = 0.0
    for b in range(2):
        for t in range(4):
            row = [float(v) for v in logits[b, t].double()]
            log_z = math.log(sum(math.exp(v) for v in row))
            bits += (log_z - row[int(y[b, t])]) / math.log(2)
    assert result["bpc"] == pytest.approx(bits / 8, rel=1e-6)
    assert result["ppl"] == pytest.approx(2 ** (bits / 8), rel=1e-6)
    # Uniform predictions cost log2(V) bits per character, whatever the text.
    uniform = task.finalize(task.evaluate(torch.zeros(2, 4, vocab), Batch(torch.zeros(2, 4, dtype=torch.long), y)))
    assert uniform["bpc"] == pytest.approx(math.log2(vocab), rel=1e-6)  # float32 logits


def test_default_text_is_cpython_prose_joined_in_sorted_order():
    from pydoc_data.topics import topics

    text = tasks_text.default_text()
    assert text == "".join(topics[k] for k in sorted(topics))
    train = set(split_text(text, 0.05, 0.05)["train"])
    task = build_task({"name": "text"})
    assert task.input_size == len(train) + (1 if set(text) - train else 0)
    assert 10 ** 5 < task.num_examples("train") < 10 ** 7


def test_missing_pydoc_data_says_to_pass_a_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import fails as on a stripped Python
    with pytest.raises(ConfigError, match="--text"):
        tasks_text.default_text()


def test_changed_text_and_bad_settings_are_refused(tmp_path):
    path = write(tmp_path, "hello world, " * 20)
    digest = text_digest(path.read_text())
    assert build_task({"name": "text", "text_file": str(path), "sha256": digest}).input_size > 0
    path.write_text("goodbye world " * 20)
    with pytest.raises(ConfigError, match="not the text this run was made with"):
        build_task({"name": "text", "text_file": str(path), "sha256": digest}).vocab
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café ".encode("latin-1") * 20)
    with pytest.raises(FormatError, match="not UTF-8"):
        build_task({"name": "text", "text_file": str(latin1)}).vocab
    with pytest.raises(FileNotFoundError, match="no such text file"):
        build_task({"name": "text", "text_file": str(tmp_path / "nope.txt")}).vocab
    with pytest.raises(ConfigError, match="valid_fraction"):
        build_task({"name": "text", "valid_fraction": 0.0})
    with pytest.raises(ConfigError, match="too short"):
        build_task({"name": "text", "text_file": str(write(tmp_path, "abcdefghij", "short.txt"))}).vocab


# -- the demo ---------------------------------------------------------------------------------

TINY = ["--steps", "12", "--finetune-steps", "3", "--ranks", "2,4", "--set", "model.hidden_size=16",
        "--set", "task.seq_len=16", "--set", "train.batch_size=4", "--set", "train.eval_every=6"]


def test_demo_on_a_users_text_end_to_end(run, tmp_path):
    text = write(tmp_path, "The quick brown fox jumps over the lazy dog. " * 80)
    out = tmp_path / "demo"
    code, stdout, stderr = run("demo", "--text", text, "--out", out, *TINY)
    assert code == 0, stderr
    assert "training a dense character-level GRU" in stdout and str(text) in stdout
    assert "test bpc" in stdout and "rank4-diag" in stdout and f"plot {out / PLOT}" in stdout
    assert (out / MARKER).is_file()
    (out / "mine.txt").write_text("keep me")
    # Again, in the folder the first run made: its runs and plot are replaced, the rest is kept.
    code, stdout, stderr = run("demo", "--text", text, "--out", out, "--json", "--progress", *TINY)
    assert code == 0, stderr
    assert (out / "mine.txt").read_text() == "keep me"
    doc = json.loads(stdout)
    rows = doc["rows"]
    assert [r["run"] for r in rows] == ["dense", "rank2", "rank2-diag", "rank4", "rank4-diag"]
    assert all(r["metric"] == "bpc" and r["split"] == "test" and math.isfinite(r["after"]) for r in rows)
    dense = rows[0]
    assert dense["rank"] is None and dense["params"] > max(r["params"] for r in rows[1:])
    by_run = {r["run"]: r for r in rows}
    assert by_run["rank2"]["params"] < by_run["rank4"]["params"]
    assert by_run["rank2"]["params"] < by_run["rank2-diag"]["params"] < by_run["rank4-diag"]["params"]
    n = 16  # the recurrent part 3n^2 becomes 3 (2nd) (+ 3n with the diagonal); nothing else changes
    for r in rows[1:]:
        assert dense["params"] - r["params"] == 3 * n * n - 3 * (2 * n * r["rank"] + (n if r["diag"] else 0))
        assert r["dense"] == dense["after"] and math.isfinite(r["before"])
    assert doc["plot"] == str(out / PLOT) and (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "training a dense character-level GRU" in stderr  # narration on stderr under --json
    assert "train: 100%" in stderr and "point 4 of 4" in stderr  # the bars, asked for, on stderr too


def test_demo_refuses_bad_input_before_writing(run, tmp_path):
    out = tmp_path / "demo"
    for args, message in ((["--text", tmp_path / "missing.txt"], "no such text file"),
                          (["--task", "poetry"], "--task must be one of text, addition"),
                          (["--task", "addition", "--text", __file__], "--text is for --task text"),
                          (["--ranks", "0"], "--ranks must be a comma list"),
                          (["--steps", "0"], "--steps must be a positive int"),
                          (["--set", "model.hidden_size=-1"], "model.hidden_size must be in")):
        code, stdout, stderr = run("demo", "--out", out, *map(str, args))
        assert code == 2 and stdout == "" and message in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_addition_demo_reports_every_point_with_closed_form_params(tmp_path):
    lines = []
    rows = run_demo(tmp_path / "demo", task="addition", steps=30, finetune_steps=10, ranks=(2, 4),
                    echo=lines.append)
    assert [r["run"] for r in rows] == ["dense", "rank2", "rank2-diag", "rank4", "rank4-diag"]
    dense = rows[0]["params"]
    n = 32
    for r in rows[1:]:
        d = r["rank"]
        # The recurrent part 3n^2 becomes 3*2nd (+3n with the diagonal); nothing else changes.
        assert dense - r["params"] == 3 * n * n - (3 * 2 * n * d + (3 * n if r["diag"] else 0))
        assert r["dense"] == rows[0]["after"]
        assert r["before"] is not None and r["after"] is not None
        assert r["metric"] == "mse"
    assert any("test mse" in line for line in lines)
    assert any("on the addition task" in line for line in lines)
    assert (tmp_path / "demo" / PLOT).is_file()
    # one measured time for the dense run: the narration's and the table's are the same figure
    said = next(line for line in lines if line.startswith("dense:")).rsplit("(", 1)[1].rstrip(")")
    table = next(line for block in lines for line in block.splitlines() if line.startswith("dense "))
    assert said == table.split()[-1] == f"{rows[0]['wall_time']:.0f}s"


def test_without_matplotlib_the_demo_says_so_instead_of_plotting(monkeypatch, tmp_path):
    import importlib.util

    from lrcompress import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    lines = []
    assert demo._plot([], tmp_path / PLOT, lines.append) is None
    assert "pip install 'lrcompress[plot]'" in lines[0] and not (tmp_path / PLOT).exists()


@pytest.mark.parametrize("text, overrides, ranks, error, message", [
    ("ab", (), None, ConfigError, "the valid part of .* holds 0 characters; the text \\(2 characters\\) is too short"),
    ("abcdefghijklmnopqrst", (), None, ConfigError, "the valid part of .* holds 1 character;"),
    ("abcd" * 30, (), None, ConfigError, "the valid text \\(6 symbols\\) is too short for batch_size 32"),
    ("The quick brown fox. " * 40, ("model.hidden_size=16", "train.batch_size=4"), (4, 64), RankError,
     "rank 64 is impossible for rnn.weight_hh_l0 .*: must be 1..16"),
], ids=["no-valid-part", "one-character", "short-for-batch", "rank-above-hidden"])
def test_demo_fails_on_data_and_ranks_before_training_or_writing(tmp_path, text, overrides, ranks, error, message):
    # each of these used to fail only after the dense model's 1,000 updates
    path, out, lines = write(tmp_path, text), tmp_path / "demo", []
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        run_demo(out, text=path, ranks=ranks, overrides=overrides, echo=lines.append)
    assert time.perf_counter() - start < 1.5
    assert lines == [] and not out.exists()
