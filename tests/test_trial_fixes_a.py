"""Faults a new-user trial found: the row max-norm on factors with a transposed layout, and a
parametrization registered on a deep copy leaking into the original (shared injected class)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.train import fit, max_row_norm_, remove_weight_norm, weight_norm
from lrcompress.train.stabilisers import constrained_matrices, has_weight_norm, renorm_rows_


def _factor_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{m}.{w}.{i}": t for m, mod in model.named_modules()
            for w, plist in getattr(mod, "parametrizations", {}).items()
            for i, t in enumerate(plist.parameters())}


# ---- 1. layout: stored factors are contiguous, the max-norm works on any layout -------------------

@pytest.mark.parametrize("options", [{}, {"tied": True}, {"include_input": True}, {"diag": True}],
                         ids=["plain", "tied", "include_input", "diag"])
def test_compressed_and_loaded_factors_are_contiguous(options, tmp_path):
    torch.manual_seed(0)
    gru = nn.GRU(7, 32)
    lrc.compress(gru, rank=4, **options)
    factors = _factor_tensors(gru)
    assert len(factors) >= 2
    assert all(t.is_contiguous() for t in factors.values()), {k: t.stride() for k, t in factors.items()}
    lrc.save_model(gru, tmp_path / "g.safetensors")
    loaded = lrc.load_model(nn.GRU(7, 32), tmp_path / "g.safetensors")
    assert all(t.is_contiguous() for t in _factor_tensors(loaded).values())
    scratch = nn.GRU(7, 32)
    lrc.convert.factor_from_scratch(scratch, rank=4, **options)
    assert all(t.is_contiguous() for t in _factor_tensors(scratch).values())


def test_low_rank_verb_stores_contiguous_factors_from_transposed_ones():
    lin = nn.Linear(12, 10)
    f = lrc.fit_low_rank(lin.weight.detach().reshape(1, 10, 12), 3)
    given = lrc.factorize.Factors(f.L.transpose(1, 2).contiguous().transpose(1, 2), f.R)  # (.., rank) column-major
    assert not given.L.is_contiguous()
    lrc.low_rank(lin, "weight", rank=3, factors=given)
    L = lin.parametrizations.weight.original0
    assert L.is_contiguous() and torch.equal(L, f.L)


def test_renorm_rows_matches_the_closed_form_on_any_layout():
    torch.manual_seed(1)
    base = torch.randn(3, 6, 5, dtype=torch.float64) * 2
    base[0, 0] *= 1e-3  # a short row: untouched
    expected = base.clone()
    norms = expected.norm(dim=-1, keepdim=True)
    expected *= torch.where(norms > 1.5, 1.5 / (norms + 1e-7), torch.ones_like(norms))
    for layout in (base.clone(), base.transpose(1, 2).contiguous().transpose(1, 2), base.permute(2, 0, 1).contiguous().permute(1, 2, 0)):
        t = layout.clone() if layout.is_contiguous() else layout
        assert renorm_rows_(t, 1.5) is t
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-12)
        assert torch.equal(t[0, 0], base[0, 0])
    # and the same rule as Tensor.renorm_ on a contiguous matrix
    flat = base.reshape(-1, 5).clone()
    torch.testing.assert_close(renorm_rows_(flat.clone(), 1.5), flat.renorm(2, 0, 1.5), rtol=0, atol=1e-12)


def test_max_row_norm_on_non_contiguous_factors_clips_every_row():
    torch.manual_seed(2)
    gru = nn.GRU(7, 32)
    lrc.compress(gru, rank=4, include_input=True)
    plist = gru.parametrizations.weight_hh_l0
    with torch.no_grad():  # a layout the old code could not .view (what compress used to store)
        plist.original0.data = (plist.original0 * 50).transpose(1, 2).contiguous().transpose(1, 2)
    assert not plist.original0.is_contiguous()
    before = {name: getattr(o, a).detach().double().clone() for name, o, a, _ in constrained_matrices(gru)}
    max_row_norm_(gru, 1.0)
    for name, owner, attr, _ in constrained_matrices(gru):
        t, old = getattr(owner, attr).detach().double(), before[name]
        n = old.norm(dim=-1, keepdim=True)
        want = old * torch.where(n > 1.0, 1.0 / (n + 1e-7), torch.ones_like(n))
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7, msg=name)
        assert t.norm(dim=-1).max() <= 1.0 + 1e-5
    assert (before["weight_hh_l0.L"].norm(dim=-1) > 1).any()  # the check clipped something


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(5, 24, batch_first=True), nn.Linear(24, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def test_fit_with_max_row_norm_on_a_model_converted_without_a_diagonal():
    torch.manual_seed(3)
    model = _Tiny()
    lrc.compress(model, rank=4, include_input=True)
    data = [(torch.randn(4, 6, 5), torch.randn(4, 1)) for _ in range(3)]
    fit(model, data, nn.functional.mse_loss, recipe={"steps": 3, "max_row_norm": 1.0}, progress=False)
    for name, owner, attr, _ in constrained_matrices(model):
        assert getattr(owner, attr).detach().norm(dim=-1).max() <= 1.0 + 1e-5, name


# ---- 2. a deep copy's new parametrization leaves the original alone ------------------------------

def _gru():
    torch.manual_seed(4)
    base = nn.GRU(16, 16)
    lrc.compress(base, rank=4)
    return base


VERBS = {
    "weight_norm": weight_norm,
    "low_rank": lambda c: lrc.low_rank(c, "weight_ih_l0", rank=2, gates=3),
    "kronecker": lambda c: lrc.kronecker(c, "weight_ih_l0", factors=(4, 4), gates=3),
    "tensor_train": lambda c: lrc.tensor_train(c, "weight_ih_l0", ranks=2, shape=(4, 4), gates=3),
    "scaled_cayley": lambda c: lrc.scaled_cayley(c, "weight_ih_l0", gates=3),
    "compress": lambda c: lrc.compress(c, rank=2, include_input=True, exclude=["weight_hh_l0"]),
    "merge": lrc.merge,
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_registering_on_a_deepcopy_leaves_the_original_working(verb):
    base = _gru()
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        y0 = base(x)[0]
        c = copy.deepcopy(base)
        VERBS[verb](c)
        assert torch.equal(base(x)[0], y0)
        c(x)  # the copy runs too
        VERBS[verb](base)  # and the other way round: the copy is not disturbed by the original
        c(x), base(x)
    assert type(c) is not type(base) or verb == "merge"  # merge leaves both plain nn.GRU


def test_removing_weight_norm_on_a_deepcopy_leaves_the_original_normalised():
    base = _gru()
    weight_norm(base)
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        y0 = base(x)[0]
        c = remove_weight_norm(copy.deepcopy(base))
        torch.testing.assert_close(c(x)[0], y0)
        assert torch.equal(base(x)[0], y0)
    assert has_weight_norm(base) and not has_weight_norm(c)
