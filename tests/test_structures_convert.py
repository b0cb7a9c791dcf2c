"""The converter and the whole pipeline for every structure: compress, report, save/load, merge,
the CLI, from-scratch layers and recipes, and the file format's version 2 (docs/format.md).

Exactness claims are checked in float64 against the dense module: a structure at full size
(every Kronecker term of the rearranged matrix, full TT-ranks, the orthogonal fit of an
orthogonal matrix) must reproduce the dense model's outputs.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import lrcompress as lrc
from conftest import assert_unchanged, make_inputs, make_rnn, run_rnn, snapshot
from lrcompress.config import CompressionConfig, TargetSpec
from lrcompress.errors import ConfigError, FormatError, RankError, TargetError
from lrcompress.structures import structured

pytestmark = pytest.mark.usefixtures("one_thread")

H = 16  # hidden size: 4 x 4 Kronecker factors / TT modes
# Full-size options for H x H blocks: the Kronecker rearrangement is 16 x 16 (16 terms span it),
# a 2-core TT has one bond of maximal rank 16, a 4-core TT is capped to its maximal ranks.
FULL = {
    "kronecker": dict(structure="kronecker", kron_factors=(4, 4), terms=16),
    "tt": dict(structure="tt", tt_ranks=16, tt_shape=(4, 4)),
    "tt-4-cores": dict(structure="tt", tt_ranks=64, tt_shape=(2, 2, 2, 2)),
    "tt-joint": dict(structure="tt", tt_ranks=64, tt_shape=(4, 4), joint=True),
}
SMALL = {  # smaller than dense: what a user converts to
    "kronecker": dict(structure="kronecker", kron_factors="4x4", terms=2),
    "tt": dict(structure="tt", tt_ranks=3, tt_shape="2x8"),
    "tt-joint": dict(structure="tt", tt_ranks=4, tt_shape=(4, 4), joint=True),
    "lowrank": dict(rank=3, diag=True),
}


def orthogonal_blocks(gates: int, n: int, *, dtype=torch.float64) -> torch.Tensor:
    """``gates`` random orthogonal ``n x n`` blocks stacked, one with determinant -1."""
    Q = torch.linalg.qr(torch.randn(gates, n, n, dtype=dtype)).Q
    Q[0, :, 0] *= -1  # det -1: D must take a -1 for the Cayley transform to reach it
    return Q.reshape(gates * n, n)


def quiet_compress(model, **options):
    with warnings.catch_warnings():  # a capped TT-rank or a structure larger than dense: notes, tested below
        warnings.simplefilter("ignore")
        return lrc.compress(model, **options)


# ------------------------------------------------------------------ full-structure conversions


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("name", list(FULL))
def test_a_full_size_structure_reproduces_the_dense_model(kind: str, name: str) -> None:
    dense = make_rnn(kind, hidden_size=H, num_layers=2, dtype=torch.float64)
    x, hx = make_inputs(dense, packed=True, initial_state=True)
    want = run_rnn(dense, x, hx)
    model = copy.deepcopy(dense)
    report = quiet_compress(model, **FULL[name])
    assert isinstance(model, type(dense)) and len(report.targets) == 2
    for row in report.targets:
        assert row.structure == FULL[name]["structure"] and row.rel_error < 1e-12
    for got, ref in zip(run_rnn(model, x, hx), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_orthogonal_recurrent_blocks_convert_exactly(kind: str) -> None:
    pytest.importorskip("lrcompress.structured.orthogonal")
    dense = make_rnn(kind, hidden_size=H, num_layers=2, dtype=torch.float64)
    gates = {"gru": 3, "lstm": 4, "rnn": 1}[kind]
    with torch.no_grad():
        for k in range(2):
            getattr(dense, f"weight_hh_l{k}").copy_(orthogonal_blocks(gates, H))
    x, hx = make_inputs(dense, initial_state=True)
    want = run_rnn(dense, x, hx)
    model = copy.deepcopy(dense)
    report = lrc.compress(model, structure="orthogonal")
    assert [r.name for r in report.targets] == ["weight_hh_l0", "weight_hh_l1"]  # recurrent only, by default
    assert all(r.rel_error < 1e-12 for r in report.targets)
    for got, ref in zip(run_rnn(model, x, hx), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    W = model.weight_hh_l0.detach().reshape(gates, H, H)
    torch.testing.assert_close(W.mT @ W, torch.eye(H, dtype=W.dtype).expand(gates, H, H), rtol=0, atol=1e-10)


def test_orthogonal_reports_the_polar_error_and_leaves_non_square_blocks_out() -> None:
    pytest.importorskip("lrcompress.structured.orthogonal")
    model = nn.LSTM(4, H, num_layers=2, proj_size=8, dtype=torch.float64)  # recurrent blocks 16 x 8: not square
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TargetError, match="square"):
        warnings.simplefilter("always")
        lrc.compress(model, structure="orthogonal")
    assert any("left out weight_hh_l0, weight_hh_l1" in str(w.message) for w in caught)
    assert not parametrize.is_parametrized(model)
    gru = nn.GRU(4, H, dtype=torch.float64)
    W = gru.weight_hh_l0.detach().clone()
    report = lrc.compress(gru, structure="orthogonal")
    blocks = W.reshape(3, H, H)
    U, _, Vh = torch.linalg.svd(blocks)
    polar = (U @ Vh).reshape(3 * H, H)  # the nearest orthogonal matrix of each block (independent of the fit)
    expected = float(torch.linalg.matrix_norm(W - polar) / torch.linalg.matrix_norm(W))
    assert report.targets[0].rel_error == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(gru.weight_hh_l0.detach(), polar, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ the report


def test_each_report_row_names_structure_options_parameters_and_error() -> None:
    dense = nn.GRU(4, H, dtype=torch.float64)
    W = dense.weight_hh_l0.detach().clone()
    model = copy.deepcopy(dense)
    report = lrc.compress(model, structure="kronecker", kron_factors=(4, 4), terms=2)
    row = report.to_dict()["targets"][0]
    assert row["structure"] == "kronecker" and row["options"] == {"factors": [4, 4], "terms": 2}
    assert (row["params_before"], row["params_after"]) == (3 * H * H, 3 * 2 * (16 + 16))
    W_hat = model.weight_hh_l0.detach()
    assert row["rel_error"] == pytest.approx(float(torch.linalg.matrix_norm(W - W_hat) / torch.linalg.matrix_norm(W)),
                                             rel=1e-9)
    assert report.params_after == lrc.count_params(model)
    text = str(report)
    assert "kronecker" in text and "factors 4x4, terms 2" in text and f"{row['rel_error']:.4g}" in text
    assert json.loads(report.to_json())["config"]["structure"] == "kronecker"


def test_a_structure_larger_than_dense_is_allowed_with_a_warning() -> None:
    model = nn.GRU(4, H)
    with pytest.warns(UserWarning, match="weight_hh_l0"):
        report = lrc.compress(model, structure="kronecker", kron_factors=(4, 4), terms=16)
    assert report.targets[0].params_after > report.targets[0].params_before and report.targets[0].note


def test_a_capped_tt_rank_is_a_note_naming_the_weight() -> None:
    with pytest.warns(UserWarning, match=r"weight_hh_l0.*bond 1 100 -> 16"):
        report = lrc.compress(nn.RNN(4, H), structure="tt", tt_ranks=100, tt_shape=(4, 4))
    assert "100 -> 16" in report.targets[0].note and report.targets[0].options["ranks"] == [16]


# ------------------------------------------------------------------ validation first


@pytest.mark.parametrize("options, error, match", [
    (dict(structure="kronecker", kron_factors=(4, 8)), ConfigError, r"weight_hh_l0 .*16x16"),
    (dict(structure="kronecker", kron_factors=(4, 4), terms=17), RankError, r"terms=17"),
    (dict(structure="tt", tt_ranks=4, tt_shape=(4, 8)), ConfigError, r"weight_hh_l0 .*16x16"),
    (dict(structure="tt", tt_ranks=(2, 2), tt_shape=(4, 4)), ConfigError, r"\(2, 2\)"),
    (dict(structure="orthogonal", include_input=True), ConfigError, r"weight_ih_l0"),
    (dict(structure="kronecker", kron_factors=(4, 4), targets=["head"]), ConfigError, r"head\.weight \(linear, .*3x16"),
], ids=["factors do not multiply", "too many terms", "tt shape", "one rank per bond", "orthogonal non-square",
        "non-square linear"])
def test_a_misfit_is_one_error_before_anything_changes(options, error, match) -> None:
    if options["structure"] == "orthogonal":
        pytest.importorskip("lrcompress.structured.orthogonal")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(5, H, num_layers=2)
            self.head = nn.Linear(H, 3)

    model = Model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lrc.compress(model, **options)
    assert_unchanged(model, before)


@pytest.mark.parametrize("options, match", [
    (dict(structure="kronecker", kron_factors=(4, 4), rank=3), "rank is a low-rank option"),
    (dict(structure="kronecker", kron_factors=(4, 4), diag=True), "diag is a low-rank option"),
    (dict(structure="kronecker", kron_factors=(4, 4), tt_ranks=3), "tt_ranks is an option of structure 'tt'"),
    (dict(rank=3, kron_factors=(4, 4)), "kron_factors is an option of structure 'kronecker'"),
    (dict(structure="tt", tt_ranks=3), "needs tt_shape"),
    (dict(structure="kronecker"), "needs kron_factors"),
    (dict(structure="kron", kron_factors=(4, 4)), "structure must be one of lowrank, kronecker, tt, orthogonal"),
    (dict(structure="kronecker", kron_factors="4xx4"), "4xx4"),
    (dict(structure="kronecker", kron_factors=(4, 0)), "kron_factors"),
    (dict(structure="kronecker", kron_factors=(4, 4), terms=0), "terms must be an int >= 1"),
    (dict(structure="tt", tt_ranks="8,x", tt_shape=(4, 4)), "8,x"),
    (dict(structure="orthogonal", joint=True), "joint is an option of structure 'tt'"),
])
def test_config_refuses_options_of_another_structure_in_one_line(options, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        CompressionConfig(**options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options", [FULL["tt-joint"], SMALL["kronecker"], SMALL["tt"],
                                     dict(structure="kronecker", kron_factors=((2, 4), (8, 4)), terms=3),
                                     dict(structure="tt", tt_ranks="2,3,2", tt_shape="2x2x2x2"),
                                     dict(structure="orthogonal", negatives=3)])
def test_config_round_trips_through_json(options) -> None:
    config = CompressionConfig(**options)
    assert CompressionConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["structure"] == options["structure"]


def test_a_low_rank_config_writes_the_json_it_wrote_before() -> None:
    # No structure keys: a config file from this version reads in an older lrcompress.
    assert not {"structure", "kron_factors", "tt_ranks", "joint"} & set(CompressionConfig(rank=4).to_dict())


# ------------------------------------------------------------------ files: save, load, merge


@pytest.mark.parametrize("name", [*SMALL, "orthogonal"])
def test_save_load_merge_round_trips_exactly(tmp_path: Path, name: str) -> None:
    options = dict(structure="orthogonal") if name == "orthogonal" else SMALL[name]
    if name == "orthogonal":
        pytest.importorskip("lrcompress.structured.orthogonal")
    dense = nn.GRU(5, H, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 5)
    model = copy.deepcopy(dense)
    quiet_compress(model, **options)
    want = model(x)[0]
    path = lrc.save_model(model, tmp_path / "m.lr.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == ("1" if name == "lowrank" else "2")  # version 1 while it suffices
    loaded = lrc.load_model(copy.deepcopy(dense), path)
    assert torch.equal(loaded(x)[0], want)
    assert (structured(loaded, "weight_hh_l0") is None) == (name == "lowrank")
    lrc.merge(loaded)
    assert type(loaded) is nn.GRU and not parametrize.is_parametrized(loaded)
    assert torch.equal(loaded(x)[0], want)
    from lrcompress.convert import merge_state_dict
    from lrcompress.io import read_safetensors
    from lrcompress.validate import check_compressed

    tensors, meta = read_safetensors(path)
    merged = merge_state_dict(tensors, check_compressed(tensors, meta, path))
    plain = copy.deepcopy(dense)
    plain.load_state_dict(merged)
    assert torch.equal(plain(x)[0], want)


def test_the_orthogonal_signs_are_stored_and_restored(tmp_path: Path) -> None:
    pytest.importorskip("lrcompress.structured.orthogonal")
    model = nn.RNN(4, H, dtype=torch.float64)
    with torch.no_grad():
        model.weight_hh_l0.copy_(-torch.eye(H, dtype=torch.float64))  # all eigenvalues -1: D must be -I
    lrc.compress(model, structure="orthogonal")
    path = lrc.save_model(model, tmp_path / "o.safetensors")
    with safe_open(str(path), "pt") as f:
        stored = sorted(k for k in f.keys() if k.startswith("weight_hh_l0."))
    assert stored == ["weight_hh_l0.original0", "weight_hh_l0.signs"]  # the parametrization's buffer too
    loaded = lrc.load_model(nn.RNN(4, H, dtype=torch.float64), path)
    torch.testing.assert_close(loaded.weight_hh_l0, -torch.eye(H, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_skeleton_built_structured_loads_the_values_in_place(tmp_path: Path) -> None:
    from lrcompress.nn import structured_rnn

    options = dict(structure="kronecker", kron_factors=(4, 4), terms=2)
    model = structured_rnn(nn.GRU, 5, H, batch_first=True, **options)
    path = lrc.save_model(model, tmp_path / "m.safetensors")
    skeleton = structured_rnn(nn.GRU, 5, H, batch_first=True, **options)
    x = torch.randn(2, 4, 5)
    assert not torch.equal(skeleton(x)[0], model(x)[0])
    lrc.load_model(skeleton, path)
    assert torch.equal(skeleton(x)[0], model(x)[0])
    other = structured_rnn(nn.GRU, 5, H, batch_first=True, structure="kronecker", kron_factors=(4, 4), terms=3)
    with pytest.raises(FormatError, match="terms 3"):
        lrc.load_model(other, path)


def test_a_version_1_file_written_by_hand_still_loads(tmp_path: Path) -> None:
    L, R = torch.randn(3, H, 2), torch.randn(3, 2, H)
    gru = nn.GRU(4, H)
    tensors = {k: v.detach().clone() for k, v in gru.state_dict().items() if k != "weight_hh_l0"}
    tensors |= {"weight_hh_l0.L": L, "weight_hh_l0.R": R}
    record = {"module": "", "weight": "weight_hh_l0", "layer": "gru", "role": "recurrent", "gates": 3, "rows": H,
              "cols": H, "rank": 2, "diag": False, "tied": False}
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"format": "lrcompress", "format_version": "1",
                                            "lrcompress_version": "0.1.0", "targets": json.dumps([record])})
    loaded = lrc.load_model(nn.GRU(4, H), path)
    torch.testing.assert_close(loaded.weight_hh_l0, (L @ R).flatten(0, 1), rtol=0, atol=0)


def structured_file(tmp_path: Path) -> tuple[Path, dict, dict]:
    model = nn.GRU(4, H)
    lrc.compress(model, structure="tt", tt_ranks=3, tt_shape=(4, 4))
    path = lrc.save_model(model, tmp_path / "tt.safetensors")
    with safe_open(str(path), "pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewritten(tmp_path: Path, tensors: dict, meta: dict, *, record=None, **changes) -> Path:
    meta = dict(meta)
    if record is not None:
        meta["targets"] = json.dumps([record])
    meta.update(changes)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda t, r: (t, {**r, "structure": "kron"}), "unknown structure 'kron'"),
    (lambda t, r: (t, {**r, "options": {**r["options"], "ranks": [99]}}), "not in normal form"),
    (lambda t, r: (t, {**r, "options": {"ranks": [3], "shape": [[4, 8]], "joint": False}}), "invalid"),
    (lambda t, r: (t, {**r, "options": {**r["options"], "__class__": 1}}), "invalid"),
    (lambda t, r: (t, {**r, "rank": 3}), "unknown fields"),
    (lambda t, r: (t, {k: v for k, v in r.items() if k != "options"}), "missing fields"),
    (lambda t, r: ({**t, "weight_hh_l0.original1": torch.zeros(3, 3, 4, 4, 2)}, r), r"original1 has shape"),
    (lambda t, r: ({k: v for k, v in t.items() if k != "weight_hh_l0.original0"}, r), "original0 is missing"),
    (lambda t, r: ({**t, "weight_hh_l0.original2": torch.zeros(1)}, r), "not a factor of the format"),
], ids=["unknown structure", "capped rank stored", "shape misfit", "bad keyword", "low-rank field", "no options",
        "wrong original shape", "missing original", "stray original"])
def test_a_lying_structured_file_is_refused_and_nothing_changes(tmp_path: Path, edit, match) -> None:
    path, tensors, meta = structured_file(tmp_path)
    tensors, record = edit(tensors, json.loads(meta["targets"])[0])
    bad = rewritten(tmp_path, tensors, meta, record=record)
    skeleton = nn.GRU(4, H)
    before = snapshot(skeleton)
    with pytest.raises(FormatError, match=match):
        lrc.load_model(skeleton, bad)
    assert_unchanged(skeleton, before)


def test_orthogonal_signs_that_disagree_with_the_record_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("lrcompress.structured.orthogonal")
    model = nn.RNN(4, H)
    with torch.no_grad():
        model.weight_hh_l0.copy_(-torch.eye(H))
    lrc.compress(model, structure="orthogonal")
    path = lrc.save_model(model, tmp_path / "o.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    record = json.loads(meta["targets"])[0]
    assert record["options"] == {"negatives": H}
    without = {k: v for k, v in tensors.items() if k != "weight_hh_l0.signs"}
    for broken, match in [({**tensors, "weight_hh_l0.signs": torch.ones(1, H)}, "give options"),
                          (without, "buffer .*signs is missing")]:
        with pytest.raises(FormatError, match=match):
            lrc.load_model(nn.RNN(4, H), rewritten(tmp_path, broken, meta))


def test_a_structure_record_in_a_version_1_file_is_refused(tmp_path: Path) -> None:
    path, tensors, meta = structured_file(tmp_path)
    with pytest.raises(FormatError, match="format 1 files do not"):
        lrc.load_model(nn.GRU(4, H), rewritten(tmp_path, tensors, meta, format_version="1"))


def test_target_spec_records_round_trip() -> None:
    spec = TargetSpec("rnn", "weight_hh_l0", "gru", "recurrent", 3, H, H, structure="kronecker",
                      options={"factors": (4, 4), "terms": 2})
    record = spec.to_dict()
    assert "rank" not in record and record["options"] == {"factors": [4, 4], "terms": 2}
    assert TargetSpec.from_dict(json.loads(json.dumps(record))) == spec
    assert spec.factored_params == 3 * 2 * 32 and spec.factor_shapes() == {
        "original0": (3, 2, 4, 4), "original1": (3, 2, 4, 4)}


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("flags, structure", [
    (["--structure", "kronecker", "--kron-factors", "4x4", "--terms", "2"], "kronecker"),
    (["--structure", "tt", "--tt-ranks", "4", "--tt-shape", "4x4"], "tt"),
    (["--structure", "tt", "--tt-ranks", "4", "--tt-shape", "4x4", "--joint"], "tt"),
    (["--structure", "orthogonal"], "orthogonal"),
], ids=["kronecker", "tt", "tt-joint", "orthogonal"])
def test_cli_convert_inspect_merge(tmp_path: Path, run, flags, structure) -> None:
    if structure == "orthogonal":
        pytest.importorskip("lrcompress.structured.orthogonal")
    dense = nn.GRU(4, H)
    torch.save(dense.state_dict(), tmp_path / "m.pt")
    code, out, err = run("convert", tmp_path / "m.pt", *flags, "--json")
    assert code == 0, err
    rows = json.loads(out)["targets"]
    assert [r["structure"] for r in rows] == [structure] and rows[0]["rel_error"] >= 0
    compressed = tmp_path / "m.lr.safetensors"
    code, out, err = run("inspect", compressed)
    assert code == 0 and structure in out and "rel.err" in out, err
    info = json.loads(run("inspect", compressed, "--json").out)["targets"][0]
    assert info["structure"] == structure and info["rel_error"] == pytest.approx(rows[0]["rel_error"])
    assert info["factored_params"] == rows[0]["params_after"]
    code, out, err = run("merge", compressed)
    assert code == 0, err
    model = lrc.load_model(nn.GRU(4, H), compressed)
    merged = nn.GRU(4, H)
    from lrcompress.io import read_safetensors

    merged.load_state_dict(read_safetensors(tmp_path / "m.dense.safetensors")[0])
    x = torch.randn(5, 2, 4)
    assert torch.equal(merged(x)[0], model(x)[0])


@pytest.mark.parametrize("flags, match", [
    (["--structure", "kronecker", "--kron-factors", "4x8"], "weight_hh_l0"),
    (["--structure", "kronecker", "--kron-factors", "4x4", "--tt-ranks", "2"], "--tt-ranks is an option of"),
    (["--structure", "tt", "--tt-ranks", "2"], "needs tt_shape"),
    (["--structure", "kronecker", "--kron-factors", "4x4", "--rank", "2"], "rank is a low-rank option"),
    (["--structure", "kronecker", "--kron-factors", "four"], "four"),
    (["--structure", "orthogonal", "--include-input"], "weight_ih_l0"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, run, flags, match) -> None:
    if "orthogonal" in flags:
        pytest.importorskip("lrcompress.structured.orthogonal")
    torch.save(nn.GRU(4, H).state_dict(), tmp_path / "m.pt")
    code, out, err = run("convert", tmp_path / "m.pt", *flags)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ------------------------------------------------------------------ from scratch


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM, nn.RNN, nn.GRUCell])
@pytest.mark.parametrize("options", [SMALL["kronecker"], SMALL["tt"], SMALL["tt-joint"], dict(structure="orthogonal")],
                         ids=["kronecker", "tt", "tt-joint", "orthogonal"])
def test_structured_rnn_trains_from_scratch_at_the_dense_init_scale(cls, options) -> None:
    from lrcompress.nn import structured_rnn

    if options["structure"] == "orthogonal":
        pytest.importorskip("lrcompress.structured.orthogonal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = structured_rnn(cls, 5, H, **options)
    assert isinstance(layer, cls) and structured(layer, "weight_hh" if cls is nn.GRUCell else "weight_hh_l0")
    W = layer.weight_hh if cls is nn.GRUCell else layer.weight_hh_l0
    assert 0.3 < float(W.detach().std()) * (3 * H) ** 0.5 < 3  # U(-1/sqrt(H), 1/sqrt(H)) has std 1/sqrt(3H)
    x = torch.randn(3, 5) if cls is nn.GRUCell else torch.randn(4, 3, 5)
    out = layer(x, torch.randn(3, H)) if cls is nn.GRUCell else layer(x)  # a zero state would get no gradient
    (out if cls is nn.GRUCell else out[0]).pow(2).sum().backward()
    plist = layer.parametrizations["weight_hh" if cls is nn.GRUCell else "weight_hh_l0"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plist.parameters())
    before = W.detach().clone()
    layer.reset_parameters()  # re-draws the originals, as for a dense layer
    after = layer.weight_hh if cls is nn.GRUCell else layer.weight_hh_l0
    assert not torch.equal(after.detach(), before)


def test_a_recipe_model_takes_a_structure() -> None:
    from lrcompress.train.models import build_model
    from lrcompress.train.tasks import build_task

    task = build_task({"name": "addition", "length": 10})
    model = build_model({"cell": "gru", "hidden_size": H, "structure": "kronecker", "kron_factors": "4x4",
                         "terms": 2, "update_gate_bias": 4.0}, task)
    assert structured(model.rnn, "weight_hh_l0").options() == {"factors": (4, 4), "terms": 2}
    assert model(torch.zeros(2, 10, 2)).shape == (2, 1)
    paper = build_model({"cell": "gru", "gru_form": "paper", "hidden_size": H, "structure": "tt", "tt_ranks": 4,
                         "tt_shape": [4, 4], "joint": True}, task)
    assert paper(torch.zeros(2, 10, 2)).shape == (2, 1)
    for bad, match in [({"structure": "tt"}, "needs tt_ranks"), ({"kron_factors": "4x4"}, "model.kron_factors"),
                       ({"structure": "kronecker", "kron_factors": "4x4", "rank": 2}, "takes no rank"),
                       ({"structure": "kronecker", "kron_factors": "3x4"}, "16x16")]:
        with pytest.raises(ConfigError, match=match):
            build_model({"cell": "gru", "hidden_size": H, **bad}, task)


# ------------------------------------------------------------------ finetune and sweep


def test_finetune_and_sweep_carry_the_structure(tmp_path: Path) -> None:
    from lrcompress.train.run import finetune, sweep, train_recipe

    tiny = ["task.train_size=200", "task.valid_size=50", "task.test_size=50", "train.eval_every=3",
            "model.hidden_size=16"]
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "addition-gru-small.toml"
    train_recipe(recipe, tmp_path / "dense", overrides=[*tiny, "train.steps=3"], progress=False)
    summary = finetune(tmp_path / "dense", tmp_path / "kron", overrides=["train.steps=2"], progress=False,
                       structure="kronecker", kron_factors="4x4", terms=2)
    assert summary["structure"] == "kronecker" and summary["options"] == {"kron_factors": [4, 4], "terms": 2}
    assert summary["params"] < summary["params_dense"]
    model = lrc.load_model(copy.deepcopy(_dense_model(tmp_path / "dense")), tmp_path / "kron" / "model.safetensors")
    assert structured(model.rnn, "weight_hh_l0").options()["terms"] == 2
    with pytest.raises(ConfigError, match="TT shape 4x8"):  # every point checked before the first trains
        sweep(tmp_path / "dense", tmp_path / "bad", ranks=[2, 4], structure="tt", tt_shape="4x8", progress=False)
    assert not (tmp_path / "bad").exists()
    points = sweep(tmp_path / "dense", tmp_path / "sweep", ranks=[2, 4], structure="tt", tt_shape="4x4",
                   overrides=["train.steps=2"], progress=False, echo=lambda line: None)
    assert [p["options"] for p in points] == [{"tt_ranks": r, "tt_shape": [4, 4]} for r in (2, 4)]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["tt-rank2", "tt-rank4"]
    with pytest.raises(ConfigError, match="no size to sweep"):
        sweep(tmp_path / "dense", tmp_path / "o", ranks=[2], structure="orthogonal", progress=False)


def _dense_model(run: Path) -> nn.Module:
    from lrcompress.train.recipe import load_recipe
    from lrcompress.train.run import build

    return build(load_recipe(run / "recipe.toml"))[1]
