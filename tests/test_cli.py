"""The ``lrcompress`` command, run in-process through ``cli.main`` (the console entry point).

Every conversion is checked against the library API on an identical model (same options, same
seed): the command, given only a state dict, must write exactly what ``lrc.compress`` +
``lrc.save_model`` would. Every user error must be one ``error:`` line and exit code 2, and no
run -- successful or not -- may touch the input or leave temporary files behind.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lrcompress as lrc

from cli_runner import Run, snapshot


def gru(seed: int = 0, layers: int = 1) -> nn.GRU:
    torch.manual_seed(seed)
    return nn.GRU(5, 16, num_layers=layers)


class Tagger(nn.Module):
    """A GRU and a Linear head: a model class the command never sees."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(5, 16)
        self.head = nn.Linear(16, 12)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def tagger(seed: int = 0) -> Tagger:
    torch.manual_seed(seed)
    return Tagger()


X = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(1))


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        y = model(X)
    return y[0] if isinstance(y, tuple) else y


def converted_ok(run, tmp_path: Path, src: Path, *args) -> tuple[Run, Path]:
    """Run ``convert src *args`` expecting success: checks exit code, the input and the folder."""
    before = snapshot(tmp_path)
    result = run("convert", src, *args)
    assert result.code == 0, result.err
    out = Path(json.loads(result.out)["output"]) if "--json" in args else tmp_path / f"{src.stem}.lr.safetensors"
    if "-o" in args:
        out = Path(args[args.index("-o") + 1])
    after = snapshot(tmp_path)
    assert after.pop(str(out.relative_to(tmp_path))), "no output written"
    assert after == {k: v for k, v in before.items() if k != str(out.relative_to(tmp_path))}, \
        "input changed or stray files left"
    return result, out


def assert_same_as_api(file: Path, fresh: nn.Module, api_model: nn.Module) -> None:
    """The file, loaded into a plain skeleton, behaves bit for bit like the API-compressed model."""
    loaded = lrc.load_model(fresh, file)
    assert torch.equal(output(loaded), output(api_model))
    assert lrc.count_params(loaded) == lrc.count_params(api_model)


def energy_rank(blocks: torch.Tensor, energy: float) -> int:
    """Independent reference: smallest k keeping ``energy`` of sum s^2 in every block."""
    ranks = []
    for block in blocks.double():
        s2 = torch.linalg.svdvals(block) ** 2
        kept = s2.cumsum(0) / s2.sum()
        ranks.append(int((kept < energy).sum()) + 1)
    return max(ranks)


# ----------------------------------------------------------------------------- convert, inputs


@pytest.mark.parametrize("kind", ["pt", "safetensors", "nested-model", "custom-key"])
def test_convert_without_class_equals_api(run, tmp_path, kind):
    model = gru()
    sd = model.state_dict()
    src = tmp_path / ("m.safetensors" if kind == "safetensors" else "m.pt")
    extra = []
    if kind == "pt":
        torch.save(sd, src)
    elif kind == "safetensors":
        save_file(sd, src)
    elif kind == "nested-model":
        torch.save({"model": sd, "epoch": 3, "lr": 0.1}, src)
    else:
        torch.save({"weights": sd, "epoch": 3}, src)
        extra = ["--key", "weights"]
    result, out = converted_ok(run, tmp_path, src, "--rank", "4", "--diag", *extra)
    assert out.name == "m.lr.safetensors"
    assert "weight_hh_l0" in result.out and "rel.err" in result.out and f"wrote {out}" in result.out
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, diag=True, seed=0)
    assert_same_as_api(out, gru(seed=99), api)


def test_custom_key_is_needed_when_several_entries_could_be_the_model(run, tmp_path):
    src = tmp_path / "ckpt.pt"
    torch.save({"weights": gru().state_dict(), "ema": gru().state_dict(), "epoch": 3}, src)
    result = run("convert", src, "--rank", "4")
    assert result.code == 2 and "--key" in result.err
    assert "'weights'" in result.err and "'ema'" in result.err
    result = run("convert", src, "--rank", "4", "--key", "nope")
    assert result.code == 2 and "'nope'" in result.err


def test_json_report(run, tmp_path):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--diag", "--json")
    report = json.loads(result.out)
    assert {"targets", "params_before", "params_after", "ratio", "output"} <= set(report)
    assert Path(report["output"]) == out
    dense = sum(t.numel() for t in model.state_dict().values())
    stored = sum(t.numel() for t in load_file(out).values())
    assert report["params_before"] == dense and report["params_after"] == stored
    assert report["ratio"] == pytest.approx(dense / stored)
    (target,) = report["targets"]
    assert (target["name"], target["rank"], target["diag"]) == ("weight_hh_l0", 4, True)
    W = model.weight_hh_l0.detach().reshape(3, 16, 16)
    # With a diagonal the fit beats the plain rank-4 optimum (Eckart-Young) on every block.
    s = torch.linalg.svdvals(W.double())
    eckart_young = float((s[:, 4:] ** 2).sum().sqrt() / W.double().norm())
    assert 0 < target["rel_error"] < eckart_young


def test_energy(run, tmp_path):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--energy", "0.9", "--json")
    (target,) = json.loads(result.out)["targets"]
    assert target["rank"] == energy_rank(model.weight_hh_l0.detach().reshape(3, 16, 16), 0.9)
    api = copy.deepcopy(model)
    lrc.compress(api, energy=0.9)
    assert_same_as_api(out, gru(seed=5), api)


def test_tied(run, tmp_path):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "6", "--tied", "--json")
    (target,) = json.loads(result.out)["targets"]
    assert target["tied"] and target["params_after"] == 3 * 16 * 6 + 6 * 16
    assert load_file(out)["weight_hh_l0.R"].shape == (6, 16)  # one R shared by the 3 gates
    api = copy.deepcopy(model)
    lrc.compress(api, rank=6, tied=True)
    assert_same_as_api(out, gru(seed=5), api)


def test_include_input(run, tmp_path):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "3", "--diag", "--include-input",
                               "--json")
    targets = {t["name"]: t for t in json.loads(result.out)["targets"]}
    assert set(targets) == {"weight_hh_l0", "weight_ih_l0"}
    assert targets["weight_ih_l0"]["role"] == "input" and not targets["weight_ih_l0"]["diag"]  # 16x5 blocks
    api = copy.deepcopy(model)
    lrc.compress(api, rank=3, diag=True, include_input=True)
    assert_same_as_api(out, gru(seed=5), api)


def test_include_projection_on_lstm(run, tmp_path):
    torch.manual_seed(0)
    model = nn.LSTM(5, 16, proj_size=8)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--diag", "--include-projection",
                               "--json")
    targets = {t["name"]: t for t in json.loads(result.out)["targets"]}
    assert set(targets) == {"weight_hh_l0", "weight_hr_l0"}
    assert targets["weight_hr_l0"]["role"] == "projection" and targets["weight_hr_l0"]["gates"] == 1
    assert targets["weight_hh_l0"]["shape"] == [64, 8] and not targets["weight_hh_l0"]["diag"]
    assert "not square" in targets["weight_hh_l0"]["note"]
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, diag=True, include_projection=True)
    torch.manual_seed(5)
    assert_same_as_api(out, nn.LSTM(5, 16, proj_size=8), api)


def test_linear_targets_in_a_bare_file(run, tmp_path):
    model = tagger()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--targets", "head", "--json")
    names = {t["name"]: t["layer"] for t in json.loads(result.out)["targets"]}
    assert names == {"rnn.weight_hh_l0": "gru", "head.weight": "linear"}
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, targets=["head"])
    assert_same_as_api(out, tagger(seed=5), api)


def test_exclude(run, tmp_path):
    model = gru(layers=2)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--exclude", "weight_hh_l1",
                               "--json")
    assert [t["name"] for t in json.loads(result.out)["targets"]] == ["weight_hh_l0"]
    assert torch.equal(load_file(out)["weight_hh_l1"], model.weight_hh_l1.detach())  # kept dense
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, exclude=["weight_hh_l1"])
    assert_same_as_api(out, gru(seed=5, layers=2), api)


@pytest.mark.parametrize("override", ["*weight_hh_l1=2", "*weight_hh_l1=energy=0.9"])
def test_rank_for(run, tmp_path, override):
    model = gru(layers=2)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--rank-for", override, "--json")
    ranks = {t["name"]: t["rank"] for t in json.loads(result.out)["targets"]}
    expected = 2 if override.endswith("=2") else energy_rank(model.weight_hh_l1.detach().reshape(3, 16, 16), 0.9)
    assert ranks == {"weight_hh_l0": 4, "weight_hh_l1": expected}
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, ranks={"*weight_hh_l1": override.split("=", 1)[1]})
    assert_same_as_api(out, gru(seed=5, layers=2), api)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_svd_method(run, tmp_path, method):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--svd", method, "--json")
    report = json.loads(result.out)
    assert report["config"]["svd"] == method
    W = model.weight_hh_l0.detach().reshape(3, 16, 16).double()
    s = torch.linalg.svdvals(W)
    optimum = float((s[:, 4:] ** 2).sum().sqrt() / W.norm())
    err = report["targets"][0]["rel_error"]
    if method == "exact":  # Eckart-Young: the exact truncated SVD reaches the optimum
        assert err == pytest.approx(optimum, rel=1e-5)
    else:
        assert optimum * (1 - 1e-5) <= err < 1.1 * optimum
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, svd=method)
    assert_same_as_api(out, gru(seed=5), api)


def test_output_option_and_force_overwrites(run, tmp_path):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    target = tmp_path / "small.safetensors"
    target.write_bytes(b"old contents")
    converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "-o", str(target), "--force")
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4)
    assert_same_as_api(target, gru(seed=5), api)


def test_trusted_pickled_module(run, tmp_path):
    model = gru()
    torch.save(model, tmp_path / "whole.pt")
    result, out = converted_ok(run, tmp_path, tmp_path / "whole.pt", "--rank", "4", "--diag", "--trust-pickle")
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, diag=True)
    assert_same_as_api(out, gru(seed=5), api)


# ----------------------------------------------------------------------------- inspect, merge


def test_inspect_dense_spectra(run, tmp_path):
    model = gru()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    before = snapshot(tmp_path)
    table = run("inspect", tmp_path / "m.safetensors", "--ranks", "2,4,8")
    assert table.code == 0, table.err
    rows = [line.split() for line in table.out.splitlines() if line.startswith("weight_hh_l0")]
    assert [r[1] for r in rows] == ["r", "z", "n"]
    result = run("inspect", tmp_path / "m.safetensors", "--ranks", "2,4,8", "--json")
    assert result.code == 0, result.err
    matrices = json.loads(result.out)["matrices"]
    assert [m["gate"] for m in matrices] == ["r", "z", "n"]
    blocks = model.weight_hh_l0.detach().double().reshape(3, 16, 16)
    for m, block in zip(matrices, blocks):
        s2 = torch.linalg.svdvals(block) ** 2
        for k in (2, 4, 8):
            assert m["energy_at_rank"][str(k)] == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-9)
        for level in ("0.5", "0.9", "0.99"):
            assert m["rank_for_energy"][level] == energy_rank(block[None], float(level))
        assert f"{100 * m['energy_at_rank']['4']:.1f}%" in table.out
    assert snapshot(tmp_path) == before


def test_inspect_compressed(run, tmp_path):
    model = gru(layers=2)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    _, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--diag", "--rank-for", "*l1=2")
    result = run("inspect", out, "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert [(t["name"], t["rank"], t["diag"]) for t in info["targets"]] == [("weight_hh_l0", 4, True),
                                                                           ("weight_hh_l1", 2, True)]
    for t in info["targets"]:
        assert t["dense_params"] == 3 * 16 * 16
        assert t["factored_params"] == 3 * 16 * t["rank"] * 2 + 3 * 16
    stored = sum(t.numel() for t in load_file(out).values())
    dense = sum(t.numel() for t in model.state_dict().values())
    assert (info["stored_values"], info["dense_values"]) == (stored, dense)
    assert info["ratio"] == pytest.approx(dense / stored)
    table = run("inspect", out)
    assert table.code == 0 and f"{dense / stored:.2f}x smaller" in table.out
    assert any(line.split()[:4] == ["weight_hh_l1", "gru/recurrent", "48x16", "2"] for line in table.out.splitlines())


def test_merge_gives_a_plain_dense_state_dict(run, tmp_path):
    model = gru()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    _, out = converted_ok(run, tmp_path, tmp_path / "m.pt", "--rank", "4", "--diag")
    before = snapshot(tmp_path)
    result = run("merge", out)
    assert result.code == 0, result.err
    dense_file = tmp_path / "m.dense.safetensors"
    assert set(snapshot(tmp_path)) - set(before) == {dense_file.name}
    api = copy.deepcopy(model)
    lrc.compress(api, rank=4, diag=True)
    expected = output(api)
    merged = lrc.merge(api).state_dict()
    tensors = load_file(dense_file)
    assert set(tensors) == set(merged)
    assert all(torch.equal(tensors[k], merged[k]) for k in merged)
    plain = nn.GRU(5, 16)
    plain.load_state_dict(tensors)  # strict: a plain nn.GRU needs nothing from lrcompress
    assert torch.equal(output(plain), expected)


# ----------------------------------------------------------------------------- user errors


def _state_dict_file(d: Path, name: str = "m.pt", **changes) -> Path:
    sd = gru().state_dict()
    for key, value in changes.items():
        sd[key][0, 0] = value
    torch.save(sd, d / name)
    return d / name


def _compressed_file(d: Path) -> Path:
    model = gru()
    lrc.compress(model, rank=4)
    return lrc.save_model(model, d / "m.lr.safetensors")


def _write(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


def _existing_output(d: Path) -> list:
    _write(d, "m.lr.safetensors", b"precious")
    return ["convert", _state_dict_file(d), "--rank", "4"]


def _output_is_dir(d: Path) -> list:
    (d / "out.safetensors").mkdir()
    return ["convert", _state_dict_file(d), "--rank", "4", "-o", d / "out.safetensors"]


ERRORS = {  # case -> (arguments built in a folder, a fragment the message must hold)
    "missing file": (lambda d: ["convert", d / "nope.pt", "--rank", "4"], "no such file"),
    "inspect missing file": (lambda d: ["inspect", d / "nope.safetensors"], "no such file"),
    "garbage .pt": (lambda d: ["convert", _write(d, "m.pt", b"\x80garbage\x00\x01" * 9), "--rank", "4"],
                    "not a readable PyTorch file"),
    "truncated .pt": (lambda d: ["convert", _write(d, "t.pt", _state_dict_file(d).read_bytes()[:700]), "--rank", "4"],
                      "not a readable PyTorch file"),
    "empty .pt": (lambda d: ["convert", _write(d, "m.pt", b""), "--rank", "4"], "not a readable PyTorch file"),
    "garbage .safetensors": (lambda d: ["convert", _write(d, "m.safetensors", b"garbage" * 9), "--rank", "4"],
                             "not a readable safetensors file"),
    "truncated compressed file": (
        lambda d: ["merge", _write(d, "t.lr.safetensors", _compressed_file(d).read_bytes()[:100])],
        "not a readable safetensors file"),
    "list in .pt": (lambda d: (torch.save([1, 2], d / "l.pt"), ["convert", d / "l.pt", "--rank", "4"])[1],
                    "holds a list"),
    "no targets": (lambda d: (torch.save(nn.Linear(4, 4).state_dict(), d / "lin.pt"),
                              ["convert", d / "lin.pt", "--rank", "2"])[1], "no targets found"),
    "rank 0": (lambda d: ["convert", _state_dict_file(d), "--rank", "0"], "got 0"),
    "rank -1": (lambda d: ["convert", _state_dict_file(d), "--rank", "-1"], "got -1"),
    "rank 1000": (lambda d: ["convert", _state_dict_file(d), "--rank", "1000"], "rank 1000 is impossible"),
    "rank abc": (lambda d: ["convert", _state_dict_file(d), "--rank", "abc"], "'abc'"),
    "rank energy=2": (lambda d: ["convert", _state_dict_file(d), "--rank", "energy=2"], "energy=2"),
    "rank-for without =": (lambda d: ["convert", _state_dict_file(d), "--rank", "4", "--rank-for", "l1"],
                           "PATTERN=RANK"),
    "rank and energy": (lambda d: ["convert", _state_dict_file(d), "--rank", "4", "--energy", "0.9"],
                        "exactly one of rank and energy"),
    "neither rank nor energy": (lambda d: ["convert", _state_dict_file(d)], "exactly one of rank and energy"),
    "bad svd method": (lambda d: ["convert", _state_dict_file(d), "--rank", "4", "--svd", "fast"], "'fast'"),
    "bad inspect ranks": (lambda d: ["inspect", _state_dict_file(d), "--ranks", "0,4"], "--ranks"),
    "exclude matches nothing": (lambda d: ["convert", _state_dict_file(d), "--rank", "4", "-x", "decoder"],
                                "'decoder'"),
    "NaN weight": (lambda d: ["convert", _state_dict_file(d, weight_hh_l0=float("nan")), "--rank", "4"], "NaN"),
    "Inf weight": (lambda d: ["convert", _state_dict_file(d, weight_hh_l0=float("inf")), "--rank", "4"], "Inf"),
    "output exists": (_existing_output, "pass --force"),
    "output directory missing": (
        lambda d: ["convert", _state_dict_file(d), "--rank", "4", "-o", d / "no" / "x.safetensors"], "does not exist"),
    "output is a directory": (_output_is_dir, "directory"),
    "output is a directory, forced": (lambda d: [*_output_is_dir(d), "--force"], "directory"),
    "output is the input": (lambda d: ["convert", _state_dict_file(d), "--rank", "4", "-o", d / "m.pt", "-f"],
                            "is the input"),
    "pickled module": (lambda d: (torch.save(gru(), d / "whole.pt"), ["convert", d / "whole.pt", "--rank", "4"])[1],
                       "--trust-pickle"),
    "already compressed": (lambda d: ["convert", _compressed_file(d), "--rank", "2", "-o", d / "again.safetensors"],
                           "already compressed"),
    "merge a dense file": (lambda d: (save_file(gru().state_dict(), d / "m.safetensors"),
                                      ["merge", d / "m.safetensors"])[1], "not an lrcompress file"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_error_is_one_line_and_exit_2(run, tmp_path, case):
    build, fragment = ERRORS[case]
    args = build(tmp_path)
    before = snapshot(tmp_path)
    result = run(*args)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert fragment in lines[0]
    assert result.out == ""
    assert snapshot(tmp_path) == before  # input untouched, nothing written, no temp files


def test_unknown_option_is_one_line_naming_it_and_the_help(run, tmp_path):
    result = run("convert", _state_dict_file(tmp_path), "--rank", "4", "--bogus")
    assert result.code == 2 and result.out == ""
    line = result.err.strip()  # the program name in the hint is the runner's
    assert "\n" not in line and line.startswith("error: No such option: --bogus (see: ")
    assert line.endswith("convert --help)")
    result = run("convert")
    assert result.code == 2 and result.err.strip().startswith("error: Missing argument 'path'. (see: ")
    assert "\n" not in result.err.strip()
    assert not (tmp_path / "m.lr.safetensors").exists()


def test_version(run):
    result = run("--version")
    assert (result.code, result.out.strip()) == (0, f"lrcompress {lrc.__version__}")


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "lrcompress", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, f"lrcompress {lrc.__version__}")


@pytest.mark.parametrize("command, fragments", [
    ("convert", ["lrcompress convert model.pt --rank 24 --diag", "--energy 0.9 --json", "<stem>.lr.safetensors"]),
    ("inspect", ["lrcompress inspect model.lr.safetensors --json"]),
    ("merge", ["lrcompress merge model.lr.safetensors -o dense.safetensors", "<stem>.dense.safetensors"]),
])
def test_help_shows_examples(run, command, fragments):
    result = run(command, "--help")
    assert result.code == 0
    text = " ".join(result.out.split())  # undo line wrapping
    for fragment in fragments:
        assert fragment in text


def test_merge_refuses_a_non_safetensors_input(run, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.GRU(3, 4).state_dict(), path)
    result = run("merge", path)
    assert result.code == 2 and result.err.startswith("error:")
    assert "merge takes a compressed .safetensors" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_rank_override_that_matches_nothing_is_an_error(run, tmp_path):
    """Like --exclude: a mistyped --rank-for would silently become the global rank."""
    torch.save(gru().state_dict(), tmp_path / "m.pt")
    result = run("convert", tmp_path / "m.pt", "--rank", "4", "--rank-for", "nomatch=2")
    assert result.code == 2 and result.err.strip().startswith("error: rank pattern 'nomatch' matches no target")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    with pytest.raises(lrc.TargetError, match="rank pattern 'nomatch\\*' matches no target"):
        lrc.compress(nn.GRUCell(10, 32), rank=4, ranks={"nomatch*": 2})


def test_bench_says_which_cells_it_does_not_time(run, tmp_path):
    model = nn.Module()
    model.rnn, model.cell = nn.GRU(4, 16), nn.LSTMCell(4, 16)
    lrc.compress(model, rank=2)
    lrc.save_model(model, tmp_path / "mixed.lr.safetensors")
    result = run("bench", tmp_path / "mixed.lr.safetensors", "--seq", "2", "--rounds", "1", "--json")
    assert result.code == 0, result.err
    assert [layer["name"] for layer in json.loads(result.out)["layers"]] == ["rnn"]
    assert "not timed here: cell" in result.err


def test_convert_config_file_equals_the_same_flags(run, tmp_path):
    torch.save(gru(layers=2).state_dict(), tmp_path / "m.pt")
    config = lrc.CompressionConfig(rank=3, diag=True, ranks={"*weight_hh_l1": 2})
    config.save(tmp_path / "lrd.json")
    assert lrc.CompressionConfig.load(tmp_path / "lrd.json") == config
    with pytest.raises(lrc.OutputExistsError):
        config.save(tmp_path / "lrd.json")  # never overwritten without force
    by_file = run("convert", tmp_path / "m.pt", "--config", tmp_path / "lrd.json", "-o", tmp_path / "a.safetensors",
                  "--json")
    by_flags = run("convert", tmp_path / "m.pt", "--rank", "3", "--diag", "--rank-for", "*weight_hh_l1=2",
                   "-o", tmp_path / "b.safetensors", "--json")
    assert by_file.code == by_flags.code == 0, (by_file.err, by_flags.err)
    one, two = json.loads(by_file.out), json.loads(by_flags.out)
    assert one["targets"] == two["targets"] and one["config"] == two["config"]
    assert [t["rank"] for t in one["targets"]] == [3, 2]
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("content,extra,fragment", [
    (None, ("--rank", "3"), "holds every compression option; drop --rank"),
    ("[1", (), "not a valid JSON compression config"),
    ('{"rank": 2, "zzz": 1}', (), "unknown config fields: zzz"),
    ('["rank"]', (), "a compression config is a JSON object"),
    ('{"rank": 0}', (), "rank must be positive"),
])
def test_bad_config_files_are_one_line(run, tmp_path, content, extra, fragment):
    torch.save(gru().state_dict(), tmp_path / "m.pt")
    config = tmp_path / "c.json"
    if content is None:
        lrc.CompressionConfig(rank=2).save(config)
    else:
        config.write_text(content)
    result = run("convert", tmp_path / "m.pt", "--config", config, *extra)
    assert result.code == 2 and fragment in result.err and len(result.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "m.pt"]
