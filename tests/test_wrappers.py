"""Wrapped models (DataParallel, ``torch.compile``), key prefixes on load, and live weight norm.

Every check compares values: a wrapped model compressed, saved and reloaded must give the plain
compressed model's output; a weight-normed model converted at full rank must give the
weight-normed model's output.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

import lrcompress as lrc
from lrcompress.convert import unwrap

INPUT, HIDDEN, RANK = 8, 64, 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(INPUT, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


class Lit(nn.Module):
    """A LightningModule-like holder: its state-dict keys carry a ``model.`` prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Net()


def compiled(net: nn.Module) -> nn.Module:
    return torch.compile(net, backend="eager")  # the eager backend keeps compiling fast


WRAPPERS = {"compile": (compiled, "_orig_mod."), "DataParallel": (nn.DataParallel, "module.")}


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 7, INPUT)


def keys_and_meta(path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata()


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_wrapped_model_compresses_saves_and_loads_plain_or_wrapped(tmp_path, x, wrapper) -> None:
    wrap, prefix = WRAPPERS[wrapper]
    net = Net()
    plain = copy.deepcopy(net)
    model = wrap(net)
    with torch.no_grad():
        model(x)  # a compiled model has already traced the dense GRU: compress must still take effect
    report = lrc.compress(model, rank=RANK)
    lrc.compress(plain, rank=RANK)
    assert [t.name for t in report.targets] == ["rnn.weight_hh_l0"]  # the inner module's names
    assert report.params_before == lrc.count_params(Net()) and report.params_after == lrc.count_params(plain)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)

    path = lrc.save_model(model, tmp_path / "net.safetensors")
    keys, meta = keys_and_meta(path)
    assert meta["wrapper_prefix"] == prefix and "rnn.weight_hh_l0.L" in keys
    assert not any(k.startswith(prefix) for k in keys)
    for skeleton in (Net(), wrap(Net())):
        loaded = lrc.load_model(skeleton, path)
        assert loaded is skeleton
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)


def test_nested_wrappers_unwrap_to_the_inner_module() -> None:
    net = Net()
    assert unwrap(compiled(nn.DataParallel(net))) == (net, "_orig_mod.module.")
    assert unwrap(net) == (net, "")


def test_patterns_may_name_wrapped_or_inner_modules() -> None:
    model = nn.DataParallel(Net())
    report = lrc.compress(model, rank=RANK, ranks={"module.rnn": 4, "module.head": 2}, targets=["module.head"])
    assert {t.name: t.rank for t in report.targets} == {"rnn.weight_hh_l0": 4, "head.weight": 2}


def test_a_prefixed_file_loads_into_the_inner_net_and_says_so(tmp_path, x, caplog) -> None:
    lit = Lit()
    lrc.compress(lit, rank=RANK)
    path = lrc.save_model(lit, tmp_path / "lit.safetensors")  # keys model.rnn..., model.head...
    with torch.no_grad():
        expected = lit.model(x)
    with caplog.at_level(logging.INFO, logger="lrcompress"):
        found = lrc.load_model(Net(), path)
    assert "prefix 'model.' removed" in caplog.text
    given = lrc.load_model(Net(), path, prefix="model.")
    with torch.no_grad():
        torch.testing.assert_close(found(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(given(x), expected, atol=1e-6, rtol=0)
    with pytest.raises(lrc.FormatError, match="'model.head.bias' does not start with it"):
        lrc.load_model(Net(), path, prefix="net.")


def test_a_plain_file_loads_into_a_container_of_the_net(tmp_path, x, caplog) -> None:
    net = Net()
    lrc.compress(net, rank=RANK)
    path = lrc.save_model(net, tmp_path / "net.safetensors")
    lit = Lit()
    with caplog.at_level(logging.INFO, logger="lrcompress"):
        lrc.load_model(lit, path)
    assert "into submodule 'model'" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(lit.model(x), net(x), atol=1e-6, rtol=0)


def test_two_fitting_prefixes_or_none_are_refused_and_nothing_changes(tmp_path) -> None:
    gru = nn.GRU(INPUT, HIDDEN)
    lrc.compress(gru, rank=RANK)
    path = lrc.save_model(gru, tmp_path / "gru.safetensors")
    two = nn.ModuleDict({"enc": nn.GRU(INPUT, HIDDEN), "dec": nn.GRU(INPUT, HIDDEN)})
    before = copy.deepcopy(two.state_dict())
    with pytest.raises(lrc.FormatError, match="prefixes 'dec.', 'enc.' all align"):
        lrc.load_model(two, path, strict=False)
    assert not parametrize.is_parametrized(two["enc"]) and not parametrize.is_parametrized(two["dec"])
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())

    lit = Lit()
    lrc.compress(lit, rank=RANK)
    lit_path = lrc.save_model(lit, tmp_path / "lit.safetensors")
    other = Net()
    other.out = other.head  # keys rnn.*, head.*, out.*: "model." removed still leaves out.* missing
    with pytest.raises(lrc.FormatError, match=r"no key prefix aligns them \(tried 'model.'\)"):
        lrc.load_model(other, lit_path)


def test_serving_loads_and_runs_inside_inference_mode(tmp_path, x) -> None:
    net = Net()
    lrc.compress(net, rank=RANK, diag=True)
    path = lrc.save_model(compiled(net), tmp_path / "net.safetensors")
    with torch.no_grad():
        expected, h_expected = net.rnn(x)
    with torch.inference_mode():
        m = lrc.accelerate(lrc.load_model(Net(), path).eval())
        y, h = m.rnn(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_expected, atol=1e-5, rtol=0)


# --- weight norm on live recurrent weights -------------------------------------------------------

def weight_normed(kind: str, dim: int | None) -> nn.GRU:
    """A float64 two-layer GRU whose weight_hh_l0 is weight-normalised by PyTorch, ``kind`` style."""
    gru = nn.GRU(INPUT, 16, num_layers=2).double()
    if kind == "parametrization":
        torch.nn.utils.parametrizations.weight_norm(gru, "weight_hh_l0", dim=dim)
        v = gru.parametrizations.weight_hh_l0.original1
    else:
        with pytest.warns(FutureWarning):  # torch.nn.utils.weight_norm is deprecated, still in use
            torch.nn.utils.weight_norm(gru, "weight_hh_l0", dim=dim)
        v = gru.weight_hh_l0_v
    with torch.no_grad():
        v.mul_(torch.rand_like(v) + 0.5)  # an update since the last forward: the hook's cached weight is stale
    return gru


@pytest.mark.parametrize("dim", [0, None], ids=["dim0", "whole"])
@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_weight_norm_is_folded_then_factored_exactly_at_full_rank(kind, dim) -> None:
    gru = weight_normed(kind, dim)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    with torch.no_grad():
        expected = gru(x)[0]
    with pytest.warns(UserWarning, match="no smaller than dense"):
        report = lrc.compress(gru, rank=16)
    notes = {t.name: t.note for t in report.targets}
    assert notes["weight_hh_l0"].endswith("weight norm folded") and "weight norm" not in notes["weight_hh_l1"]
    assert not any(n.endswith(("_g", "_v")) for n, _ in gru.named_parameters())
    assert lrc.parametrizations.factorization(gru, "weight_hh_l0") is not None
    with torch.no_grad():
        torch.testing.assert_close(gru(x)[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_a_failed_check_leaves_weight_norm_in_place(kind) -> None:
    gru = weight_normed(kind, 0)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    names = [n for n, _ in gru.named_parameters()]
    with torch.no_grad():
        expected = gru(x)[0]
    with pytest.raises(lrc.RankError, match="rank 99"):
        lrc.compress(gru, rank=99)
    assert [n for n, _ in gru.named_parameters()] == names and type(gru).__name__.endswith("GRU")
    assert lrc.targets.weight_norm_kind(gru, "weight_hh_l0") == kind
    with torch.no_grad():
        torch.testing.assert_close(gru(x)[0], expected, atol=0, rtol=0)


def test_weight_norm_on_a_weight_left_dense_is_refused() -> None:
    gru = nn.GRU(INPUT, 16)
    torch.nn.utils.parametrizations.weight_norm(gru, "weight_ih_l0")  # an input matrix: not a target
    with pytest.raises(lrc.TargetError, match="weight_ih_l0"):
        lrc.compress(gru, rank=4)
    assert lrc.targets.weight_norm_kind(gru, "weight_ih_l0") == "parametrization"
    assert not parametrize.is_parametrized(gru, "weight_hh_l0")


def test_a_weight_normed_model_saves_and_reloads_into_a_plain_skeleton(tmp_path) -> None:
    gru = weight_normed("parametrization", 0)
    lrc.compress(gru, rank=4, diag=True)
    path = lrc.save_model(gru, tmp_path / "wn.safetensors")
    keys, meta = keys_and_meta(path)
    assert "weight_hh_l0.L" in keys and not any("original" in k for k in keys)
    assert json.loads(meta["targets"])[0]["weight"] == "weight_hh_l0"
    loaded = lrc.load_model(nn.GRU(INPUT, 16, num_layers=2).double(), path)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], gru(x)[0], atol=1e-12, rtol=0)
