"""Shared (tied) weights: never silently untied, counted once.

A language model ties ``decoder.weight`` to ``encoder.weight``: in a live model the two names hold
one Parameter, in a saved state dict two keys view one storage. Factoring either owner would
untie them; every parameter count must count the shared tensor once. Counts are checked against
closed forms.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lrcompress as lrc
from lrcompress.convert import compress_state_dict

VOCAB, WIDTH, RANK = 50, 32, 8


class LM(nn.Module):
    """Embedding -> GRU -> Linear with the output matrix tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, WIDTH)
        self.rnn = nn.GRU(WIDTH, WIDTH)
        self.decoder = nn.Linear(WIDTH, VOCAB)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.encoder(tokens))[0])


# Closed forms: the embedding once, the GRU's 3 gate blocks of each matrix plus 2 bias vectors,
# the decoder's bias only (its weight is the embedding).
DENSE = VOCAB * WIDTH + 3 * WIDTH * WIDTH * 2 + 2 * 3 * WIDTH + VOCAB
FACTORED = DENSE - 3 * WIDTH * WIDTH + 3 * (WIDTH * RANK + RANK * WIDTH)


def test_the_counts_count_a_tied_weight_once() -> None:
    lm = LM()
    assert lrc.count_params(lm) == DENSE
    report = lrc.compress(lm, rank=RANK)
    assert (report.params_before, report.params_after) == (DENSE, FACTORED)
    assert report.ratio == DENSE / FACTORED
    assert lm.decoder.weight is lm.encoder.weight  # still tied
    assert f"{DENSE:,} -> {FACTORED:,} ({DENSE / FACTORED:.2f}x smaller)" in str(report)


def test_factoring_a_tied_weight_is_refused_naming_every_owner() -> None:
    lm = LM()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(lrc.TargetError, match=r"decoder\.weight is shared with encoder\.weight; .*--exclude decoder"):
        lrc.compress(lm, rank=RANK, targets=["decoder"])
    assert not any(parametrize.is_parametrized(m) for m in lm.modules())
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())


def test_one_module_under_two_names_is_refused() -> None:
    model = nn.Module()
    model.enc = nn.GRU(4, 8)
    model.dec = model.enc
    with pytest.raises(lrc.TargetError, match=r"enc\.weight_hh_l0 is shared with dec\.weight_hh_l0") as info:
        lrc.compress(model, rank=2)
    assert not parametrize.is_parametrized(model.enc)
    # Following the advice works: nothing is left to factor.
    advice = ast.literal_eval(str(info.value).split("(exclude=", 1)[1].split(")", 1)[0])
    with pytest.raises(lrc.TargetError, match="no targets found"):
        lrc.compress(model, rank=2, exclude=advice)


def test_a_saved_module_under_two_names_gets_advice_that_works(run, tmp_path) -> None:
    """In a state dict both names are targets: the advice must name both, or it goes in circles."""
    gru = nn.GRU(4, 8)
    state = {f"{owner}.{k}": v for owner in ("a", "b") for k, v in gru.state_dict().items()}
    torch.save(state, tmp_path / "m.pt")
    code, _, err = run("convert", tmp_path / "m.pt", "--rank", "2")
    assert code == 2 and "--exclude a.weight_hh_l0 --exclude b.weight_hh_l0" in err
    code, _, err = run("convert", tmp_path / "m.pt", "--rank", "2", "--exclude", "a.weight_hh_l0",
                       "--exclude", "b.weight_hh_l0")
    assert code == 2 and "no targets found" in err


@pytest.fixture
def saved_lm(tmp_path):
    lm = LM()
    path = tmp_path / "lm.pt"
    torch.save(lm.state_dict(), path)
    loaded = torch.load(path, weights_only=True)  # torch.load keeps the two keys on one storage
    storage = {k: loaded[k].untyped_storage().data_ptr() for k in ("decoder.weight", "encoder.weight")}
    assert storage["decoder.weight"] == storage["encoder.weight"]
    return lm, path


def test_the_cli_refuses_to_untie_a_saved_tied_weight(run, saved_lm) -> None:
    _, path = saved_lm
    code, out, err = run("convert", path, "--rank", RANK, "--targets", "decoder")
    assert code == 2 and out == ""
    assert err.startswith("error: decoder.weight is shared with encoder.weight;") and err.count("\n") == 1
    assert not path.with_name("lm.lr.safetensors").exists()


def test_the_cli_counts_a_saved_tied_weight_once_and_matches_the_api(run, saved_lm, tmp_path) -> None:
    lm, path = saved_lm
    code, out, err = run("convert", path, "--rank", RANK, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["params_before"], result["params_after"]) == (DENSE, FACTORED)
    assert result["ratio"] == pytest.approx(DENSE / FACTORED)
    # inspect of the written file (the tie stored twice, recorded once) agrees with convert
    code, out, err = run("inspect", result["output"], "--json")
    assert code == 0, err
    assert (json.loads(out)["stored_values"], json.loads(out)["dense_values"]) == (FACTORED, DENSE)
    fresh = lrc.load_model(LM(), result["output"])  # both keys load into the one tied Parameter
    assert fresh.decoder.weight is fresh.encoder.weight
    lrc.compress(lm, rank=RANK)
    tokens = torch.randint(0, VOCAB, (6, 2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), lm(tokens), atol=1e-6, rtol=0)


def test_distinct_views_of_one_storage_are_counted_apart() -> None:
    gru = nn.GRU(4, 8).state_dict()
    base = torch.randn(2, 3, 5)
    tensors = {**gru, "a.weight": base[0], "b.weight": base[1], "c.weight": base[1]}  # c ties b
    _, _, report = compress_state_dict(tensors, lrc.CompressionConfig(rank=2))
    dense = sum(t.numel() for t in gru.values())
    assert report.params_before == dense + 2 * 15
    assert report.params_after == dense - 3 * 8 * 8 + 3 * (8 * 2 + 2 * 8) + 2 * 15


def test_a_file_that_lies_about_a_tie_is_refused(run, saved_lm, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, path = saved_lm
    assert run("convert", path, "--rank", RANK, "-o", tmp_path / "lm.lr.safetensors").code == 0
    with safe_open(str(tmp_path / "lm.lr.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["shared_tensors"]) == {"decoder.weight": "encoder.weight"}
    tensors = load_file(tmp_path / "lm.lr.safetensors")
    tensors["decoder.weight"] = tensors["decoder.weight"] + 1  # "tied", yet different
    save_file(tensors, tmp_path / "lie.lr.safetensors", metadata=meta)
    for command in ("inspect", "merge"):
        code, _, err = run(command, tmp_path / "lie.lr.safetensors")
        assert code == 2 and "their values differ" in err and len(err.strip().splitlines()) == 1
