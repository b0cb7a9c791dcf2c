"""``save_model`` / ``load_model``: the safetensors layout, bit-identical round trips, safe failures."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import lrcompress as lrc
from lrcompress.convert import factored_specs
from lrcompress.nn import FactoredRNN, Highway

from conftest import BATCH, HIDDEN, INPUT, STEPS, HighwayLike, assert_unchanged, snapshot


class Tagger(nn.Module):
    """A GRU (2 layers, bidirectional), a Highway, a user highway found by patterns, and a head."""

    def __init__(self, dtype: torch.dtype = torch.float32, hidden: int = HIDDEN, user_highway: bool = True):
        super().__init__()
        self.rnn = nn.GRU(INPUT, hidden, num_layers=2, bidirectional=True, dtype=dtype)
        self.highway = Highway(2 * hidden, dtype=dtype)
        self.mix = HighwayLike(2 * hidden, dtype=dtype) if user_highway else nn.Identity()
        self.head = nn.Linear(2 * hidden, 3, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mix(self.highway(self.rnn(x)[0])))


VARIANTS = {
    "plain": dict(rank=3),
    "diag": dict(rank=3, diag=True),
    "tied+diag": dict(rank=4, tied=True, diag=True),
    "per-target": dict(rank=3, diag=True, ranks={"*weight_hh_l1*": 2, "highway": 5, "mix.gate": 1}),
}


def saved(tmp_path: Path, dtype: torch.dtype = torch.float32, **options) -> tuple[Tagger, Path]:
    """A compressed ``Tagger`` (Linear targets ``mix.*``) and the file it was saved to."""
    model = Tagger(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lrc.compress(model, targets=["mix.*"], **options)
    return model, lrc.save_model(model, tmp_path / "model.safetensors")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_save_then_load_into_a_fresh_skeleton_is_bit_identical(tmp_path: Path, variant: str,
                                                               dtype: torch.dtype) -> None:
    model, path = saved(tmp_path, dtype, **VARIANTS[variant])
    skeleton = Tagger(dtype)  # freshly initialised: every value must come from the file
    assert lrc.load_model(skeleton, path) is skeleton
    assert isinstance(skeleton.rnn, nn.GRU) and isinstance(skeleton.rnn, FactoredRNN)
    assert factored_specs(skeleton) == factored_specs(model)
    expected, loaded = model.state_dict(), skeleton.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == dtype and torch.equal(loaded[key], value), key
    x = torch.randn(STEPS, BATCH, INPUT, dtype=dtype)
    assert torch.equal(skeleton(x), model(x))


def test_the_file_names_factors_and_records_the_factorization(tmp_path: Path) -> None:
    model, path = saved(tmp_path, rank=4, tied=True, diag=True)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        R = f.get_tensor("rnn.weight_hh_l0.R")
    for name in ("rnn.weight_hh_l0", "rnn.weight_hh_l1_reverse", "highway.gate.weight", "mix.proposal.weight"):
        assert name not in keys
        assert {f"{name}.L", f"{name}.R", f"{name}.D"} <= keys
    assert {"rnn.weight_ih_l0", "rnn.bias_hh_l1", "head.weight", "highway.gate.bias"} <= keys
    assert R.shape == (4, HIDDEN)  # tied: one R shared by the three gates
    assert meta["format"] == "lrcompress" and meta["format_version"] == "1"
    assert meta["lrcompress_version"] == lrc.__version__
    records = json.loads(meta["targets"])
    assert {(r["module"], r["weight"]) for r in records} == {
        ("rnn", f"weight_hh_l{k}{d}") for k in (0, 1) for d in ("", "_reverse")} | {
        (m, "weight") for m in ("highway.gate", "highway.proposal", "mix.gate", "mix.proposal")}
    gru = next(r for r in records if r["weight"] == "weight_hh_l0")
    assert gru == {"module": "rnn", "weight": "weight_hh_l0", "layer": "gru", "role": "recurrent", "gates": 3,
                   "rows": HIDDEN, "cols": HIDDEN, "rank": 4, "diag": True, "tied": True}


WRONG_SKELETONS = {
    "missing module": lambda: Tagger(user_highway=False),
    "wrong shape": lambda: Tagger(hidden=HIDDEN - 2),
    "LSTM for GRU": lambda: _with_lstm(Tagger()),
}


def _with_lstm(model: Tagger) -> Tagger:
    model.rnn = nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True)
    return model


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("case", list(WRONG_SKELETONS))
def test_a_wrong_skeleton_is_refused_and_left_unchanged(tmp_path: Path, case: str, strict: bool) -> None:
    _, path = saved(tmp_path, rank=3, diag=True)
    skeleton = WRONG_SKELETONS[case]()
    before = snapshot(skeleton)
    with pytest.raises(lrc.FormatError):
        lrc.load_model(skeleton, path, strict=strict)
    assert_unchanged(skeleton, before)


def rewrite(path: Path, *, drop: str | None = None, **metadata: str) -> Path:
    """Copy the file at ``path`` with one tensor dropped and/or metadata entries replaced."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        meta = {**f.metadata(), **metadata}
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("edit", [dict(format_version="3"), dict(format_version="one"),
                                  dict(drop="rnn.weight_hh_l1.R"), dict(targets="[{\"module\": \"rnn\"}]")],
                         ids=["future version", "bad version", "missing factor", "bad target record"])
def test_an_unreadable_file_is_refused_and_the_skeleton_left_unchanged(tmp_path: Path, edit: dict) -> None:
    _, path = saved(tmp_path, rank=3)
    skeleton = Tagger()
    before = snapshot(skeleton)
    with pytest.raises(lrc.FormatError):
        lrc.load_model(skeleton, rewrite(path, **edit))
    assert_unchanged(skeleton, before)


def test_a_future_format_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    _, path = saved(tmp_path, rank=3)
    with pytest.raises(lrc.FormatError, match="upgrade"):
        lrc.load_model(Tagger(), rewrite(path, format_version="99"))


def test_a_plain_dense_safetensors_file_loads_as_a_state_dict(tmp_path: Path) -> None:
    dense = Tagger()
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    skeleton = Tagger()
    lrc.load_model(skeleton, path)
    assert type(skeleton.rnn) is nn.GRU and factored_specs(skeleton) == []
    x = torch.randn(STEPS, BATCH, INPUT)
    assert torch.equal(skeleton(x), dense(x))


def test_saving_a_merged_copy_writes_a_dense_file(tmp_path: Path) -> None:
    model, _ = saved(tmp_path, rank=3, diag=True)
    merged = lrc.merge(copy.deepcopy(model))
    path = lrc.save_model(merged, tmp_path / "merged.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["targets"]) == []
        assert "rnn.weight_hh_l0" in f.keys() and "rnn.weight_hh_l0.L" not in f.keys()
    skeleton = lrc.load_model(Tagger(), path)
    x = torch.randn(STEPS, BATCH, INPUT)
    torch.testing.assert_close(skeleton(x), model(x), rtol=1e-6, atol=1e-7)


def test_load_into_skeleton_built_factored(tmp_path):
    from lrcompress.nn import LowRankGRU

    torch.manual_seed(1)
    saved = nn.Sequential(LowRankGRU(3, 16, rank=4, diag=True), nn.Linear(16, 2))
    path = tmp_path / "scratch.safetensors"
    lrc.save_model(saved, path)
    x = torch.randn(5, 2, 3)
    for skeleton in (nn.Sequential(LowRankGRU(3, 16, rank=4, diag=True), nn.Linear(16, 2)),
                     nn.Sequential(nn.GRU(3, 16), nn.Linear(16, 2))):
        lrc.load_model(skeleton, path)
        assert torch.equal(skeleton[0](x)[0], saved[0](x)[0])
        assert torch.equal(skeleton[1].weight, saved[1].weight)
    wrong = nn.Sequential(LowRankGRU(3, 16, rank=5, diag=True), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(lrc.FormatError, match="rank 5"):
        lrc.load_model(wrong, path)
    assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items())
