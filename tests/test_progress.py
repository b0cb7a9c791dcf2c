"""Feedback on long jobs: progress bars on stderr only on a terminal (or asked for), silenced by
``--quiet``, never on stdout (``--json`` stays parseable); TensorBoard event files."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from lrcompress import progress
from lrcompress.errors import ConfigError
from lrcompress.train import fit
from test_json_output import RECIPE  # the tiny addition-task recipe: each run well under a second

pytestmark = pytest.mark.usefixtures("one_thread")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def terminal(monkeypatch) -> None:
    """Make the stderr that ``run`` captures claim to be a terminal (pytest's capture is not one).

    Called in the test body: pytest swaps in its capturing stderr only when the test starts."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


def tiny_data(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def test_enabled_follows_the_terminal_the_flag_and_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled() and progress.enabled(True) and not progress.enabled(False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.enabled() and not progress.enabled(False)
    with progress.quiet():
        assert not progress.enabled() and not progress.enabled(True)  # quiet wins over everything
    assert progress.enabled() and not progress.is_quiet()  # restored after the block


def test_fit_draws_train_and_evaluation_bars_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", Terminal())
    fit(torch.nn.Linear(3, 1), tiny_data(), torch.nn.functional.mse_loss, recipe={"steps": 4, "eval_every": 2},
        val_loader=tiny_data(seed=1))
    drawn = sys.stderr.getvalue()
    assert "train" in drawn and "4/4" in drawn and "evaluate" in drawn
    out = capsys.readouterr().out
    assert "step 2" in out and "step 4" in out  # the evaluation lines stay on stdout, not in the bar
    assert "update/s" not in out and "\r" not in out  # no bar on stdout


def test_fit_is_silent_when_quiet_even_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress.quiet():
        fit(torch.nn.Linear(3, 1), tiny_data(), torch.nn.functional.mse_loss, recipe={"steps": 4, "eval_every": 2},
            val_loader=tiny_data(seed=1))
    assert sys.stderr.getvalue() == "" and capsys.readouterr().out == ""


def test_fit_draws_nothing_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    fit(torch.nn.Linear(3, 1), tiny_data(), torch.nn.functional.mse_loss, recipe={"steps": 4, "eval_every": 2},
        val_loader=tiny_data(seed=1))
    assert sys.stderr.getvalue() == ""
    assert "step 4" in capsys.readouterr().out  # logs still get one line per evaluation


def test_train_json_on_a_terminal_bars_on_stderr_document_on_stdout(run, monkeypatch, tmp_path):
    terminal(monkeypatch)
    (tmp_path / "tiny.toml").write_text(RECIPE)
    result = run("train", tmp_path / "tiny.toml", "--out", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)  # stdout: exactly one document
    assert summary["steps"] == 4
    assert "train" in result.err and "4/4" in result.err and "evaluate" in result.err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_silences_every_bar_and_line(run, monkeypatch, tmp_path, where):
    terminal(monkeypatch)
    (tmp_path / "tiny.toml").write_text(RECIPE)
    args = ("train", tmp_path / "tiny.toml", "--out", tmp_path / "run")
    result = run("--quiet", *args) if where == "before" else run(*args, "-q")  # either side of the command
    assert result.code == 0 and result.err == ""
    assert len(result.out.splitlines()) == 1 and result.out.startswith(str(tmp_path / "run"))  # the summary only
    # a later call in the same process is not quiet any more
    result = run("train", tmp_path / "tiny.toml", "--out", tmp_path / "again", "--json")
    assert "train" in result.err


def test_sweep_counts_points_and_convert_counts_weights(run, monkeypatch, tmp_path):
    terminal(monkeypatch)
    (tmp_path / "tiny.toml").write_text(RECIPE)
    assert run("-q", "train", tmp_path / "tiny.toml", "--out", tmp_path / "dense").code == 0
    result = run("sweep", tmp_path / "dense", "--out", tmp_path / "sweep", "--ranks", "1,2", "--steps", "2",
                 "--json")
    assert [p["rank"] for p in json.loads(result.out)["points"]] == [1, 2]
    assert "point 1 of 2 (rank1)" in result.err and "point 2 of 2 (rank2)" in result.err
    assert "factoring" in result.err  # each point's conversion

    torch.save(torch.nn.GRU(3, 6, num_layers=2).state_dict(), tmp_path / "gru.pt")
    result = run("convert", tmp_path / "gru.pt", "--rank", "2", "--json")
    assert json.loads(result.out)["output"] and "factoring" in result.err
    result = run("inspect", tmp_path / "gru.pt", "--json")
    assert json.loads(result.out)["matrices"] and "spectra" in result.err
    result = run("-q", "convert", tmp_path / "gru.pt", "--rank", "2", "--json", "--force")
    assert result.err == "" and json.loads(result.out)["output"]


def test_no_bars_off_a_terminal(run, tmp_path):
    torch.save(torch.nn.GRU(3, 6).state_dict(), tmp_path / "gru.pt")
    result = run("convert", tmp_path / "gru.pt", "--rank", "2", "--json")
    assert result.code == 0 and result.err == ""


# -- TensorBoard ------------------------------------------------------------------------------

def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_logs_loss_lr_and_metrics_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    data = tiny_data()
    model = torch.nn.Linear(3, 1)
    result = fit(model, data, torch.nn.functional.mse_loss, recipe={"steps": 6, "eval_every": 3, "lr": 0.01,
                                                                    "optimizer": "adam"},
                 val_loader=tiny_data(seed=1), test_loader=tiny_data(seed=2), tensorboard=tmp_path / "tb",
                 progress=False)
    logged = scalars(tmp_path / "tb")
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged["train/lr"]] == pytest.approx([0.01] * 6)
    for record in result.history:  # per evaluation: the mean of the batch losses since the last one
        step = record["step"]
        window = [v for s, v in logged["train/loss"] if step - 3 < s <= step]
        assert dict(logged["train/loss_mean"])[step] == pytest.approx(sum(window) / 3, rel=1e-5)
        assert dict(logged["train/loss_mean"])[step] == pytest.approx(record["train_loss"], rel=1e-6)
        assert dict(logged["val/loss"])[step] == pytest.approx(record["val"]["loss"], rel=1e-6)
    # the test metric of the returned weights, recomputed independently in float64
    x = torch.cat([b[0] for b in tiny_data(seed=2)]).double()
    y = torch.cat([b[1] for b in tiny_data(seed=2)]).double()
    with torch.no_grad():
        expected = float(((model.double()(x) - y) ** 2).mean())
    assert logged["test/loss"] == [(6, pytest.approx(expected, rel=1e-5))]


def test_tensorboard_missing_is_one_clear_error(run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"lrcompress\[tensorboard\]"):
        fit(torch.nn.Linear(3, 1), tiny_data(), torch.nn.functional.mse_loss, recipe={"steps": 1},
            tensorboard=tmp_path / "tb")
    (tmp_path / "tiny.toml").write_text(RECIPE)
    result = run("train", tmp_path / "tiny.toml", "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb")
    assert result.code == 2 and result.out == "" and not (tmp_path / "run").exists()
    assert result.err.splitlines() == ["error: --tensorboard needs the tensorboard package: "
                                       "pip install 'lrcompress[tensorboard]'"]


def test_train_and_sweep_write_event_files(run, tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "tiny.toml").write_text(RECIPE)
    assert run("-q", "train", tmp_path / "tiny.toml", "--out", tmp_path / "dense",
               "--tensorboard", tmp_path / "tb").code == 0
    metrics = [json.loads(line) for line in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(tmp_path / "tb")
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4]
    assert logged["val/mse"] == [(r["step"], pytest.approx(r["val"]["mse"], rel=1e-6)) for r in metrics]
    assert run("-q", "sweep", tmp_path / "dense", "--out", tmp_path / "sweep", "--ranks", "1", "--both-diag",
               "--steps", "2", "--tensorboard", tmp_path / "tbs").code == 0
    assert sorted(p.name for p in (tmp_path / "tbs").iterdir()) == ["rank1", "rank1-diag"]
    assert [s for s, _ in scalars(tmp_path / "tbs" / "rank1-diag")["train/loss"]] == [1, 2]


class ZeroSizeTerminal(Terminal):
    """A terminal with a file descriptor, as tqdm asks ``os.get_terminal_size(fd)`` for its size."""

    def fileno(self) -> int:
        return 2


@pytest.mark.parametrize("size, ncols", [((0, 0), 80), ((0, 40), 80), ((120, 0), 120)])
def test_a_terminal_reporting_zero_size_still_gets_a_whole_bar(monkeypatch, size, ncols):
    # `script -qc CMD /dev/null`, CI ptys: tqdm's dynamic size would be -1 columns, trimming the bar to nothing
    fake = ZeroSizeTerminal()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setattr("os.get_terminal_size", lambda fd=None: __import__("os").terminal_size(size))
    with progress.bar(range(3), desc="train", unit="update", leave=True) as b:
        assert b.ncols == ncols and b.nrows > 0
        for _ in b:
            pass
    text = fake.getvalue().rsplit("\r", 1)[-1]
    assert text.startswith("train: 100%") and "3/3" in text and len(text.rstrip("\n")) <= ncols


def test_a_terminal_with_a_size_keeps_following_it(monkeypatch):
    fake = ZeroSizeTerminal()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setattr("os.get_terminal_size", lambda fd=None: __import__("os").terminal_size((100, 30)))
    with progress.bar(range(3), leave=True) as b:
        assert b.ncols == 99 and b.dynamic_ncols  # tqdm's own: columns - 1, re-read on every refresh
