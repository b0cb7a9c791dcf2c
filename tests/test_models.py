"""Models: the eq. 6 GRU against a hand-written float64 loop, the update-gate bias by its
effect, parameter counts against the paper's formulas, recurrent dropout against masked
dense weights, stateful windows, and compressing a built dense model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.errors import ConfigError
from lrcompress.nn import LowRankGRU
from lrcompress.train import models
from lrcompress.train.models import (HighwayClassifier, LowRankPaperGRU, PaperGRU, SequenceModel, build_model,
                                     set_dropout, set_update_gate_bias)
from lrcompress.train.tasks import build_task

PSMNIST = {"name": "mnist", "permute": True}


def recurrent_params(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "weight_hh" in name)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def reference_paper_gru(x, h0, layers):
    """Eq. 6 by hand, per example and per step, in float64 numpy (gate order r, z, n)."""
    x, B, T = x.astype(np.float64), x.shape[0], x.shape[1]
    finals = []
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        n = w_hh.shape[1]
        W_ir, W_iz, W_in = np.split(w_ih, 3)
        W_hr, W_hz, W_hn = np.split(w_hh, 3)
        b_ir, b_iz, b_in = np.split(b_ih, 3)
        b_hr, b_hz, b_hn = np.split(b_hh, 3)
        out = np.zeros((B, T, n))
        last = np.zeros((B, n))
        for b in range(B):
            h = h0[k, b].astype(np.float64)
            for t in range(T):
                u = x[b, t]
                r = sigmoid(W_ir @ u + b_ir + W_hr @ h + b_hr)
                z = sigmoid(W_iz @ u + b_iz + W_hz @ h + b_hz)
                cand = np.tanh(W_in @ u + b_in + W_hn @ (h * r) + b_hn)  # reset before the product
                h = (1 - z) * cand + z * h
                out[b, t] = h
            last[b] = h
        finals.append(last)
        x = out
    return x, np.stack(finals)


def layer_weights(gru: nn.GRU):
    return [tuple(getattr(gru, f"{w}_l{k}").detach().double().numpy()
                  for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for k in range(gru.num_layers)]


@pytest.mark.parametrize("batch_first", [True, False])
def test_paper_gru_matches_hand_written_eq6(batch_first):
    torch.manual_seed(0)
    gru = PaperGRU(3, 5, num_layers=2, batch_first=batch_first).double()
    with torch.no_grad():
        for p in gru.parameters():
            p.uniform_(-0.8, 0.8)  # large enough that r is far from 1 and the forms differ
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    h0 = torch.randn(2, 4, 5, dtype=torch.float64)
    out, h = gru(x if batch_first else x.transpose(0, 1), h0)
    out = out if batch_first else out.transpose(0, 1)
    ref_out, ref_h = reference_paper_gru(x.numpy(), h0.numpy(), layer_weights(gru))
    np.testing.assert_allclose(out.detach().numpy(), ref_out, atol=1e-12)
    np.testing.assert_allclose(h.detach().numpy(), ref_h, atol=1e-12)
    # The eq. 7 nn.GRU with the same weights computes something else.
    dense = nn.GRU(3, 5, num_layers=2, batch_first=batch_first).double()
    dense.load_state_dict(gru.state_dict())
    assert not torch.allclose(dense(x if batch_first else x.transpose(0, 1), h0)[1], h)


def test_paper_gru_equals_nn_gru_when_reset_is_open():
    # With r = 1 the two forms coincide: eq. 6 W (h * 1) = eq. 7 (W h) * 1.
    torch.manual_seed(1)
    gru = PaperGRU(2, 4, batch_first=True).double()
    with torch.no_grad():
        gru.bias_ih_l0[:4] = 60.0  # sigmoid(60) == 1 in float64
    dense = nn.GRU(2, 4, batch_first=True).double()
    dense.load_state_dict(gru.state_dict())
    x = torch.randn(3, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(gru(x)[0], dense(x)[0], rtol=0, atol=1e-12)
    # Unbatched input, as nn.GRU accepts it.
    torch.testing.assert_close(gru(x[0])[0], dense(x[0])[0], rtol=0, atol=1e-12)


def test_low_rank_paper_gru_is_eq6_with_the_factored_matrix():
    torch.manual_seed(2)
    gru = LowRankPaperGRU(3, 8, rank=2, diag=True, batch_first=True).double()
    assert isinstance(gru, PaperGRU) and isinstance(gru, nn.GRU)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    factored_out = gru(x)[0]
    p = gru.parametrizations.weight_hh_l0
    L, R, D = p.original0, p.original1, p.original2
    W = torch.cat([L[g] @ R[g] + torch.diag(D[g]) for g in range(3)])
    torch.testing.assert_close(gru.weight_hh_l0, W)
    ref, _ = reference_paper_gru(x.numpy(), np.zeros((1, 2, 8)), layer_weights(gru))
    np.testing.assert_allclose(factored_out.detach().numpy(), ref, atol=1e-12)
    factored_out.sum().backward()
    assert L.grad is not None and R.grad.abs().sum() > 0
    lrc.merge(gru)  # back to a dense PaperGRU with the same function
    assert type(gru) is PaperGRU
    torch.testing.assert_close(gru(x)[0], factored_out.detach())


def test_update_gate_bias_gru_by_its_effect():
    gru = nn.GRU(2, 3, batch_first=True)
    before = {n: p.detach().clone() for n, p in gru.named_parameters()}
    set_update_gate_bias(gru, 4.0)
    assert torch.equal(gru.bias_ih_l0[3:6], torch.full((3,), 4.0)) and torch.equal(gru.bias_hh_l0[3:6], torch.zeros(3))
    for name in ("bias_ih_l0", "bias_hh_l0"):  # reset and candidate blocks untouched
        assert torch.equal(getattr(gru, name)[[0, 1, 2, 6, 7, 8]], before[name][[0, 1, 2, 6, 7, 8]])
    # Zero every other parameter: the candidate is tanh(0) = 0, so h_t = z^t h_0 with z = sigmoid(4).
    with torch.no_grad():
        for name, p in gru.named_parameters():
            if name.startswith("weight"):
                p.zero_()
        gru.bias_ih_l0[[0, 1, 2, 6, 7, 8]] = 0.0
        gru.bias_hh_l0.zero_()
    out, _ = gru(torch.randn(1, 5, 2), torch.ones(1, 1, 3))
    z = 1 / (1 + math.exp(-4.0))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([z ** t for t in range(1, 6)]))


def test_update_gate_bias_lstm_forget_gate_and_models():
    lstm = nn.LSTM(1, 2, batch_first=True)
    set_update_gate_bias(lstm, 5.0)
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("weight"):
                p.zero_()
        lstm.bias_ih_l0[[0, 1, 4, 5, 6, 7]] = 0.0
        lstm.bias_hh_l0.zero_()
    c0 = torch.ones(1, 1, 2)
    out, (h, c) = lstm(torch.zeros(1, 3, 1), (torch.zeros(1, 1, 2), c0))
    f = 1 / (1 + math.exp(-5.0))
    torch.testing.assert_close(c[0, 0], torch.full((2,), f ** 3))  # c_t = f c_{t-1} + i * tanh(0)
    # Every layer of a built (factored) model gets it; an RNN has no such gate.
    model = build_model({"cell": "gru", "hidden_size": 6, "num_layers": 2, "rank": 2, "diag": True,
                         "update_gate_bias": 5.0}, build_task(PSMNIST))
    for k in range(2):
        assert torch.equal(getattr(model.rnn, f"bias_ih_l{k}")[6:12], torch.full((6,), 5.0))
    with pytest.raises(ConfigError, match="gru and lstm"):
        build_model({"cell": "rnn", "update_gate_bias": 1.0}, build_task(PSMNIST))


# Table 1: recurrent parameters per the paper's formulas, and its totals 3 * rec + 14 n + 10.
TABLE1 = [  # (n, d, diag, paper's total in thousands)
    (128, 0, False, 51.0), (128, 24, False, 20.2), (512, 4, False, 19.5),
    (64, 24, True, 10.3), (128, 24, True, 20.6), (256, 24, True, 41.2)]


@pytest.mark.parametrize("n, d, diag, paper_k", TABLE1)
def test_table1_parameter_counts(n, d, diag, paper_k):
    model = build_model({"cell": "gru", "hidden_size": n, "rank": d, "diag": diag, "update_gate_bias": 5.0},
                        build_task(PSMNIST))
    rec = recurrent_params(model)
    expected = 3 * n * n if not d else 3 * (2 * n * d + (n if diag else 0))
    assert rec == expected
    assert round((rec + 14 * n + 10) / 1000, 1) == paper_k  # the paper's counting
    # PyTorch: input 1 x 3n, two biases per gate, head n x 10 + 10.
    assert lrc.count_params(model) == rec + 3 * n + 6 * n + 10 * n + 10


def test_tied_and_lstm_counts():
    task = build_task({"name": "copy", "lag": 3})
    n, d = 40, 6
    tied = build_model({"cell": "gru", "hidden_size": n, "rank": d, "diag": True, "tied": True}, task)
    assert recurrent_params(tied) == 3 * n * d + d * n + 3 * n
    lstm = build_model({"cell": "lstm", "hidden_size": n, "rank": d, "diag": True}, task)
    assert recurrent_params(lstm) == 4 * (2 * n * d + n)
    net = build_model({"cell": "highway", "hidden_size": 32, "rank": 4, "highway_layers": 3},
                      build_task({"name": "mnist", "layout": "flat"}))
    factored = sum(p.numel() for name, p in net.named_parameters() if "parametrizations" in name)
    assert factored == 3 * 2 * (2 * 32 * 4)  # 3 layers x (proposal, gate) x (L, R)


def test_model_shapes_and_token_inputs():
    copy_task = build_task({"name": "copy", "lag": 3})
    model = build_model({"cell": "lstm", "hidden_size": 8, "num_layers": 2}, copy_task)
    assert isinstance(model.rnn, nn.LSTM) and type(model.rnn) is nn.LSTM
    assert model(torch.zeros(4, 23, 10)).shape == (4, 23, 10)
    add = build_model({"cell": "rnn", "hidden_size": 8}, build_task({"name": "addition", "length": 9}))
    x = torch.randn(3, 9, 2)
    lengths = torch.tensor([9, 4, 1])
    with torch.no_grad():
        out = add(x, lengths)
        for i, n in enumerate(lengths.tolist()):  # the output at each sequence's true end
            torch.testing.assert_close(out[i], add(x[i:i + 1, :n])[0])
    # Token inputs: one-hot by default (same as feeding the one-hot floats), or embedded.
    lm = SequenceModel(nn.GRU(5, 6, batch_first=True), 5, "sequence", vocab_size=5)
    ids = torch.randint(0, 5, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), lm(nn.functional.one_hot(ids, 5).float()))
    embedded = SequenceModel(nn.GRU(3, 6, batch_first=True), 5, "sequence", embedding=nn.Embedding(5, 3))
    assert embedded(ids).shape == (2, 7, 5)


def test_stateful_windows_equal_one_long_run():
    torch.manual_seed(3)
    model = SequenceModel(LowRankGRU(4, 10, rank=3, diag=True, batch_first=True), 4, "sequence", vocab_size=4)
    model.eval()
    ids = torch.randint(0, 4, (2, 12))
    with torch.no_grad():
        whole = model(ids)
        first, state = model.forward_stateful(ids[:, :5])
        second, _ = model.forward_stateful(ids[:, 5:], models.detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


@pytest.mark.parametrize("factored", [False, True])
def test_recurrent_dropout_is_column_masked_weights(factored, monkeypatch):
    torch.manual_seed(4)
    rnn = LowRankGRU(3, 6, rank=2, diag=True, batch_first=True) if factored else nn.GRU(3, 6, batch_first=True)
    model = SequenceModel(rnn, 2, "last", recurrent_dropout=0.5)
    x = torch.randn(5, 8, 3)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]) * 2.0
    monkeypatch.setattr(models, "dropped_columns", lambda w, p: w * mask)
    model.train()
    dropped = model(x)
    # Reference: a plain nn.GRU whose recurrent matrix has those columns zeroed (and scaled).
    reference = nn.GRU(3, 6, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(reference, name).copy_(getattr(rnn, name))
        reference.weight_hh_l0.copy_(rnn.weight_hh_l0 * mask)
        expected = model.head(reference(x)[0][:, -1])
    torch.testing.assert_close(dropped, expected)
    assert not torch.allclose(dropped, plain)
    dropped.sum().backward()
    grads = [p.grad for name, p in model.rnn.named_parameters() if "hh" in name and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():  # the layer is left as it was
        torch.testing.assert_close(model(x), plain)


def test_set_dropout():
    model = build_model({"cell": "gru", "hidden_size": 4, "num_layers": 2, "dropout": 0.1},
                        build_task({"name": "copy", "lag": 2}))
    assert model.rnn.dropout == 0.1 and model.output_dropout.p == 0.1
    set_dropout(model, dropout=0.3, recurrent_dropout=0.25)
    assert model.rnn.dropout == 0.3 and model.output_dropout.p == 0.3 and model.recurrent_dropout == 0.25
    set_dropout(model)  # None: unchanged
    assert model.recurrent_dropout == 0.25
    net = HighwayClassifier(10, 8, 3, layers=1)
    with pytest.raises(ConfigError, match="recurrent model"):
        set_dropout(net, recurrent_dropout=0.5)


def test_highway_classifier_initialisation_and_penalty():
    torch.manual_seed(5)
    net = build_model({"cell": "highway", "hidden_size": 16, "highway_layers": 2, "rank": 4, "batch_norm": True,
                       "output_l2": 1e-3}, build_task({"name": "mnist", "layout": "flat"}))
    assert isinstance(net, HighwayClassifier) and len(net.layers) == 2
    layer = net.layers[0]
    assert isinstance(layer, lrc.nn.Highway) and torch.equal(layer.gate_norm.bias, torch.full((16,), -1.0))
    assert torch.equal(layer.proposal.bias, torch.zeros(16))
    plain = HighwayClassifier(20, 8, 3, layers=1, transform_bias=-2.0)
    assert torch.equal(plain.layers[0].gate.bias, torch.full((8,), -2.0))
    assert float(net.penalty().detach()) == pytest.approx(1e-3 * float(net.head.weight.detach().pow(2).sum()))
    assert float(plain.penalty()) == 0.0
    assert net(torch.rand(6, 784)).shape == (6, 10)
    report = lrc.compress(copy.deepcopy(plain), rank=2)  # the layers are found as highway layers
    assert {t.name for t in report.targets} == {"layers.0.proposal.weight", "layers.0.gate.weight"}


def test_dense_built_model_compresses_at_full_rank():
    torch.manual_seed(6)
    model = build_model({"cell": "gru", "hidden_size": 12, "update_gate_bias": 4.0},
                        build_task({"name": "addition", "length": 6}))
    x = torch.randn(3, 6, 2)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match="no smaller than dense"):
        lrc.compress(model, rank=12, diag=False)
    assert isinstance(model.rnn, nn.GRU) and hasattr(model.rnn, "parametrizations")
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, task, message", [
    ({"cell": "gru", "diag": True}, PSMNIST, "need model.rank > 0"),
    ({"cell": "lstm", "gru_form": "paper"}, PSMNIST, "for cell = 'gru'"),
    ({"cell": "gru", "embedding": 8}, PSMNIST, "token inputs"),
    ({"cell": "gru", "embedding": "learned"}, PSMNIST, "'none' or a size"),
    ({"cell": "highway"}, PSMNIST, "flat inputs"),
    ({"cell": "gru"}, {"name": "mnist", "layout": "flat"}, "sequence inputs"),
    ({"cell": "gru", "batch_norm": True}, PSMNIST, "batch_norm is for cell = 'highway'"),
    ({"cell": "transformer"}, PSMNIST, "model.cell must be one of"),
    ({"cell": "gru", "hidden_size": 0}, PSMNIST, r"model.hidden_size must be in \[1"),
    ({"cell": "gru", "dropout": 1.0}, PSMNIST, "model.dropout must be in"),
    ({"cell": "gru", "hiden_size": 8}, PSMNIST, "unknown key model.hiden_size"),
    ({"cell": "gru", "rank": 2.5}, PSMNIST, "model.rank must be an int, got 2.5"),
])
def test_bad_model_specs(spec, task, message):
    with pytest.raises(ConfigError, match=message):
        build_model(spec, build_task(task))


def test_paper_form_model_builds_factored_and_dense():
    task = build_task({"name": "copy", "lag": 2})
    dense = build_model({"cell": "gru", "hidden_size": 6, "gru_form": "paper"}, task)
    factored = build_model({"cell": "gru", "hidden_size": 6, "gru_form": "paper", "rank": 2, "diag": True}, task)
    assert type(dense.rnn) is PaperGRU and isinstance(factored.rnn, LowRankPaperGRU)
    assert factored(torch.zeros(2, 22, 10)).shape == (2, 22, 10)


def test_converted_paper_gru_stays_eq6():
    torch.manual_seed(7)
    model = nn.Sequential()
    model.rnn = PaperGRU(2, 6, batch_first=True)
    with torch.no_grad():
        for p in model.rnn.parameters():
            p.uniform_(-1.0, 1.0)
    model.eval()
    x = torch.randn(3, 5, 2)
    with torch.no_grad():
        before = model.rnn(x)[0]
    with pytest.warns(UserWarning, match="no smaller than dense"):
        lrc.compress(model, rank=6)  # full rank: the same function
    assert isinstance(model.rnn, LowRankPaperGRU)
    with torch.no_grad():
        torch.testing.assert_close(model.rnn(x)[0], before, atol=1e-5, rtol=1e-5)
    execution = pytest.importorskip("lrcompress.execution")
    execution.accelerate(model, mode="factored")  # its kernels compute eq. 7: must not be used here
    with torch.no_grad():
        torch.testing.assert_close(model.rnn(x)[0], before, atol=1e-5, rtol=1e-5)
