"""Faults a new-user trial found: a diverging dynamic evaluation reports ppl = inf instead of a
traceback; ``evaluate``'s dynamic-only options are refused without ``--dynamic``; ``--terms 0``
and ``--negatives 0`` reach the structure's check; and compress, convert and inspect count the
same parameters for a scaled Cayley (orthogonal) model, its fixed ``signs`` buffers left out."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lrcompress as lrc
from lrcompress.errors import ConfigError
from lrcompress.structures import cli_options
from lrcompress.train.dynamic import _difference, _figures, dynamic_evaluate, format_evaluation
from lrcompress.train.models import SequenceModel
from lrcompress.train.tasks_data import LN2
from conftest import train_char_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def lm(vocab: int = 8) -> SequenceModel:
    return SequenceModel(nn.GRU(vocab, 16, batch_first=True), vocab, "sequence", vocab_size=vocab)


# -- 1. dynamic evaluation ------------------------------------------------------------------------

def test_perplexity_overflow_is_inf_not_an_error():
    big = _figures(2000.0 * LN2, 1)  # 2000 bits per symbol: 2 ** 2000 is past a float
    assert big["bpc"] == pytest.approx(2000.0) and big["ppl"] == math.inf
    assert math.isnan(_figures(math.nan, 3)["ppl"]) and _figures(math.inf, 3)["ppl"] == math.inf
    assert _figures(3 * LN2, 1)["ppl"] == pytest.approx(8.0)  # finite figures unchanged: 2 ** bpc


@pytest.mark.parametrize("lr", [1e3, 1e6])
def test_a_diverging_dynamic_evaluation_returns_figures_and_says_so(lr):
    ids = torch.randint(0, 8, (300,), generator=torch.Generator().manual_seed(0))
    result = dynamic_evaluate(lm(), ids, lr=lr, decay=0.0, segment=10)
    static, dyn = result["static"], result["dynamic"]
    assert math.isfinite(static["ppl"]) and dyn["count"] == static["count"] == 299
    assert not math.isfinite(dyn["ppl"])  # inf (overflow) or nan (weights gone non-finite)
    text = format_evaluation({"run": "r", "task": "text", "split": "test", **result})
    assert "dynamic evaluation diverged" in text and f"smaller lr than {lr:g}" in text


def test_a_bpc_difference_never_reads_minus_zero():
    assert _difference(-3e-6) == "-3.0e-06" and _difference(2e-5) == "+2.0e-05"
    assert _difference(-0.01234) == "-0.0123" and _difference(0.0) == "0"
    assert _difference(math.inf) == "+inf" and _difference(math.nan) == "nan"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run_dir = train_char_lm(tmp_path_factory.mktemp("lmb"), steps=2)
    return run_dir.parent


def test_evaluate_a_diverging_run_is_exit_0_with_a_note(run, lm_run):
    result = run("evaluate", lm_run / "run", "--dynamic", "--lr", "1e6", "--symbols", "60", "--segment", "5")
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and "dynamic evaluation diverged" in result.out
    row = next(line for line in result.out.splitlines() if line.startswith("dynamic "))
    assert len(row.split()) == 3  # name, bpc, ce: wide figures stay apart
    text = run("evaluate", lm_run / "run", "--dynamic", "--lr", "1e6", "--symbols", "60", "--segment", "5",
               "--json").out
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))  # strict JSON
    assert doc["dynamic"]["ppl"] is None and math.isfinite(doc["static"]["ppl"])  # overflowed: null


def test_evaluate_says_one_symbol_not_one_symbols(run, lm_run):
    result = run("evaluate", lm_run / "run", "--symbols", "1")
    assert result.code == 0, result.err
    assert "1 symbol predicted" in result.out and "1 symbols" not in result.out


@pytest.mark.parametrize("args, flags", [
    (["--lr", "0.1"], "--lr sets"),
    (["--decay", "0.5"], "--decay sets"),
    (["--method", "rms"], "--method sets"),
    (["--grad-batches", "3"], "--grad-batches sets"),
    (["--segment", "10"], "--segment sets"),
    (["--lr", "0.1", "--segment", "10"], "--lr, --segment set"),
])
def test_dynamic_options_without_dynamic_are_refused(run, lm_run, args, flags):
    result = run("evaluate", lm_run / "run", *args)
    assert result.code == 2 and result.out == ""
    assert result.err.startswith(f"error: {flags} the dynamic steps: add --dynamic") and result.err.count("\n") == 1


def test_evaluate_run_refuses_dynamic_settings_without_dynamic(lm_run):
    from lrcompress.train.dynamic import evaluate_run

    with pytest.raises(ConfigError, match=r"^lr, segment set the dynamic steps"):
        evaluate_run(lm_run / "run", lr=0.1, segment=10)


def test_evaluate_on_a_file_says_it_is_not_a_run_directory(run, lm_run):
    result = run("evaluate", lm_run / "lm.toml")
    assert result.code == 2 and result.err.count("\n") == 1
    assert "is a file, not a run directory" in result.err and "no such" not in result.err


# -- 2. --terms 0 / --negatives 0 ----------------------------------------------------------------

OTHERS = dict(kron_factors=None, terms=None, tt_ranks=None, tt_shape=None, joint=False, negatives=None)


def test_zero_is_passed_on_not_dropped():
    assert cli_options("kronecker", **{**OTHERS, "kron_factors": "8x8", "terms": 0})["terms"] == 0
    assert cli_options("orthogonal", **{**OTHERS, "negatives": 0})["negatives"] == 0
    with pytest.raises(ConfigError, match=r"^--negatives is an option of --structure orthogonal, not of kronecker$"):
        cli_options("kronecker", **{**OTHERS, "kron_factors": "8x8", "negatives": 0})
    with pytest.raises(ConfigError, match=r"^--terms is an option of --structure kronecker, not of lowrank$"):
        cli_options(None, **{**OTHERS, "terms": 0})


@pytest.fixture
def gru_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "g.pt"
    torch.save(nn.GRU(16, 64).state_dict(), path)
    return path


def test_cli_terms_0_is_refused_with_one_line(run, gru_file):
    result = run("convert", gru_file, "--structure", "kronecker", "--kron-factors", "8x8", "--terms", "0")
    assert result.code == 2 and result.out == "" and result.err == "error: terms must be an int >= 1, got 0\n"
    other = run("convert", gru_file, "--rank", "4", "--negatives", "0")
    assert other.code == 2 and "--negatives is an option of --structure orthogonal" in other.err


def test_cli_negatives_0_is_accepted_for_orthogonal(run, gru_file, tmp_path):
    result = run("convert", gru_file, "--structure", "orthogonal", "--negatives", "0", "-o", tmp_path / "o.safetensors")
    assert result.code == 0, result.err


# -- 3. one parameter count for an orthogonal model ------------------------------------------------

def test_compress_convert_and_inspect_count_the_same_parameters(run, tmp_path):
    torch.manual_seed(0)
    dense = nn.GRU(16, 64, num_layers=2)
    torch.save(dense.state_dict(), tmp_path / "g.pt")
    # independent: every parameter of the dense GRU, less each recurrent matrix (3 gates of 64x64),
    # plus its scaled Cayley parameters 3 * 64 * 63 / 2 (the skew upper triangles; signs are fixed)
    before = sum(p.numel() for p in dense.parameters())
    after = before - 2 * 3 * 64 * 64 + 2 * 3 * 64 * 63 // 2
    assert (before, after) == (40_704, 28_224)

    report = lrc.compress(dense, structure="orthogonal")
    assert (report.params_before, report.params_after) == (before, after) == (40_704, lrc.count_params(dense))

    out = tmp_path / "g.lr.safetensors"
    converted = run("convert", tmp_path / "g.pt", "--structure", "orthogonal", "-o", out, "--json")
    assert converted.code == 0, converted.err
    doc = json.loads(converted.out)
    assert (doc["params_before"], doc["params_after"]) == (before, after)
    assert f"model parameters: {before:,} -> {after:,}" in run("convert", tmp_path / "g.pt", "--structure",
                                                               "orthogonal", "-o", tmp_path / "h.safetensors").out

    stored = sum(t.numel() for t in load_file(out).values())
    signs = 2 * 3 * 64  # one +-1 per row of each gate block of each layer
    assert stored == after + signs
    info = json.loads(run("inspect", out, "--json").out)
    assert (info["parameters"], info["dense_values"], info["stored_values"], info["buffer_values"]) == \
        (after, before, stored, signs)
    assert info["ratio"] == pytest.approx(before / after)
    table = run("inspect", out).out
    assert f"file: {after:,} parameters for a dense model of {before:,} ({before / after:.2f}x smaller)" in table
    assert f"{signs:,} values of fixed buffers" in table
