"""Training through the factors (execution.bptt): gradients equal the dense path's.

The reference is the rebuilt dense module (PyTorch's own GRU/LSTM/RNN kernels and autograd), or
for the paper's GRU (eq. 6) a hand-written float64 loop; ``gradcheck`` checks the autograd
functions against finite differences.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lrcompress as lrc
from lrcompress.execution import bptt
from lrcompress.execution.dispatch import prepare_all
from lrcompress.nn import LowRankGRU, LowRankLSTM, LowRankRNN
from lrcompress.train.models import LowRankPaperGRU, PaperGRU, run_with_recurrent_dropout

pytestmark = [pytest.mark.filterwarnings("ignore:.*is no smaller than dense"),
              pytest.mark.filterwarnings("ignore:LSTM with projections")]
F64 = torch.float64
KINDS = {
    "gru": (LowRankGRU, {}),
    "lstm": (LowRankLSTM, {}),
    "lstm-proj": (LowRankLSTM, {"proj_size": 3, "include_projection": True}),
    "lstm-proj-dense": (LowRankLSTM, {"proj_size": 3}),
    "rnn-tanh": (LowRankRNN, {"nonlinearity": "tanh"}),
    "rnn-relu": (LowRankRNN, {"nonlinearity": "relu"}),
    "paper-gru": (LowRankPaperGRU, {}),
}


def build(kind, dtype=F64, seed=0, inputs=4, hidden=6, rank=2, **options):
    torch.manual_seed(seed)
    cls, extra = KINDS[kind]
    return cls(inputs, hidden, rank=rank, **extra, **options).to(dtype)


def grads(model, x, hx=None, *, packed_lengths=None, weights=None):
    """Outputs and the gradients of a fixed nonlinear function of them w.r.t. the input, the
    initial state and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    states = None
    if hx is not None:
        states = tuple(t.detach().clone().requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,)))
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=model.batch_first, enforce_sorted=False)
    out, h = model(inp, None if states is None else (states if len(states) > 1 else states[0]))
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    finals = h if isinstance(h, tuple) else (h,)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sin().sum()
    loss = loss + sum((f * f.flip(-1)).sum() for f in finals)
    loss.backward()
    named = [(f"param {n}", p.grad) for n, p in model.named_parameters()]
    return [("output", out.detach()), ("input", x.grad)] + \
        [(f"state {i}", s.grad) for i, s in enumerate(states or ())] + named


def compare(got, want, tol):
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a is not None and b is not None, name
        error = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        assert error <= tol, f"{name}: relative error {error:.2e}"


def factored_and_dense(model):
    dense = copy.deepcopy(model)
    return lrc.accelerate(model, "factored", training=True), dense


OPTIONS = list(itertools.product(["gru", "lstm", "rnn-tanh", "rnn-relu", "paper-gru"], [False, True], [False, True],
                                 [1, 2], [False, True]))


@pytest.mark.parametrize("kind,diag,tied,layers,bidirectional", OPTIONS)
def test_gradients_equal_the_dense_path_float64(kind, diag, tied, layers, bidirectional):
    model = build(kind, diag=diag, tied=tied, num_layers=layers, bidirectional=bidirectional)
    fast, dense = factored_and_dense(model)
    x = torch.randn(5, 3, 4, dtype=F64)
    stacks = layers * (2 if bidirectional else 1)
    hx = torch.randn(stacks, 3, 6, dtype=F64)
    if kind == "lstm":
        hx = (hx, torch.randn(stacks, 3, 6, dtype=F64))
    compare(grads(fast, x, hx), grads(dense, x, hx), 1e-10)


@pytest.mark.parametrize("kind", ["gru", "lstm", "lstm-proj", "lstm-proj-dense", "rnn-tanh", "paper-gru"])
@pytest.mark.parametrize("batch_first,bias,include_input", [(True, True, True), (False, False, False),
                                                           (True, False, True)])
def test_gradients_equal_the_dense_path_float32(kind, batch_first, bias, include_input):
    model = build(kind, dtype=torch.float32, hidden=24, inputs=5, rank=3, diag=not kind.startswith("lstm-proj"),
                  batch_first=batch_first, bias=bias, include_input=include_input)
    fast, dense = factored_and_dense(model)
    x = torch.randn(3, 9, 5) if batch_first else torch.randn(9, 3, 5)
    compare(grads(fast, x), grads(dense, x), 1e-5)


@pytest.mark.parametrize("kind", ["gru", "lstm", "lstm-proj", "rnn-relu", "paper-gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences(kind, bidirectional):
    model = build(kind, diag=not kind.startswith("lstm-proj"), batch_first=True, bidirectional=bidirectional,
                  num_layers=2)
    fast, dense = factored_and_dense(model)
    x = torch.randn(4, 7, 4, dtype=F64)
    lengths = torch.tensor([3, 7, 1, 5])
    compare(grads(fast, x, packed_lengths=lengths), grads(dense, x, packed_lengths=lengths), 1e-10)


def test_unbatched_input():
    fast, dense = factored_and_dense(build("gru", diag=True))
    x, h = torch.randn(6, 4, dtype=F64), torch.randn(1, 6, dtype=F64)
    compare(grads(fast, x, h), grads(dense, x, h), 1e-10)


@pytest.mark.parametrize("kind", ["gru", "lstm", "paper-gru"])
def test_truncated_bptt_state_carry_over(kind):
    """Windows of a stream with the state carried (detached) between them: each window's
    gradients, including the one reaching the carried-in state, equal the dense path's."""
    fast, dense = factored_and_dense(build(kind, diag=True, batch_first=True, num_layers=2))
    stream = torch.randn(2, 12, 4, dtype=F64)
    states = {"fast": None, "dense": None}
    for window in stream.split(4, dim=1):
        results = {}
        for name, model in (("fast", fast), ("dense", dense)):
            results[name] = grads(model, window, states[name])
            with torch.no_grad():
                _, h = model(window, states[name])
            states[name] = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
        compare(results["fast"], results["dense"], 1e-10)


def test_dropout_between_layers_uses_the_same_masks():
    model = build("gru", diag=True, num_layers=3, dropout=0.3).train()
    fast, dense = factored_and_dense(model)
    x = torch.randn(6, 3, 4, dtype=F64)
    torch.manual_seed(7)
    got = grads(fast, x)
    torch.manual_seed(7)
    want = grads(dense, x)
    compare(got, want, 1e-10)


@pytest.mark.parametrize("kind", ["gru", "paper-gru", "lstm"])
def test_recurrent_dropout_on_the_factors_equals_column_dropped_dense(kind):
    """Gal's column mask applied to the factors (R and D columns) equals the dense path's
    column-dropped W, with the same draws."""
    model = build(kind, diag=True, tied=kind == "gru", batch_first=True, num_layers=2).train()
    fast, dense = factored_and_dense(model)
    x = torch.randn(3, 6, 4, dtype=F64)
    results = []
    for m in (fast, dense):
        torch.manual_seed(3)
        m.zero_grad()
        out, _ = run_with_recurrent_dropout(m, x, None, 0.4)
        out.sin().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert lrc.execution.acceleration(fast).last[0] == "factored"


def paper_reference(model, x, h):
    """eq. 6 as written in the paper, one float64 step at a time (one layer, batch first)."""
    with torch.nn.utils.parametrize.cached():
        w_ih, w_hh = model.weight_ih_l0, model.weight_hh_l0
        b_ih, b_hh = model.bias_ih_l0, model.bias_hh_l0
        n = h.shape[-1]
        outs = []
        for t in range(x.shape[1]):
            gi = x[:, t] @ w_ih.T + b_ih
            r = torch.sigmoid(gi[:, :n] + h @ w_hh[:n].T + b_hh[:n])
            z = torch.sigmoid(gi[:, n:2 * n] + h @ w_hh[n:2 * n].T + b_hh[n:2 * n])
            candidate = torch.tanh(gi[:, 2 * n:] + (r * h) @ w_hh[2 * n:].T + b_hh[2 * n:])
            h = (1 - z) * candidate + z * h
            outs.append(h)
    return torch.stack(outs, 1), h.unsqueeze(0)


class Reference(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, hx=None):
        h = torch.zeros(1, x.shape[0], self.model.hidden_size, dtype=x.dtype) if hx is None else hx
        return paper_reference(self.model, x, h[0])


@pytest.mark.parametrize("factored,diag,tied,accelerated", [(False, False, False, False)] + [
    (True, diag, tied, accelerated) for diag, tied, accelerated in itertools.product([False, True], repeat=3)])
def test_paper_gru_equals_eq6_written_out(factored, diag, tied, accelerated):
    torch.manual_seed(0)
    if factored:
        model = LowRankPaperGRU(3, 5, rank=2, diag=diag, tied=tied, batch_first=True).to(F64)
    else:
        model = PaperGRU(3, 5, batch_first=True).to(F64)
    reference = Reference(copy.deepcopy(model))
    if accelerated:
        lrc.accelerate(model, "factored", training=True)
    x, h = torch.randn(4, 7, 3, dtype=F64), torch.randn(1, 4, 5, dtype=F64)
    got = grads(model, x, h)
    want = grads(reference, x, h)
    compare(got, [(n.replace("param model.", "param "), g) for n, g in want], 1e-12)


def test_paper_gru_no_grad_and_bidirectional_match_autograd_paths():
    torch.manual_seed(0)
    model = LowRankPaperGRU(3, 5, rank=2, diag=True, bidirectional=True, num_layers=2).to(F64)
    fast, dense = factored_and_dense(model)
    x = torch.randn(6, 2, 3, dtype=F64)
    with torch.no_grad():
        a, b = fast.eval()(x), dense.eval()(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    compare(grads(fast.train(), x), grads(dense.train(), x), 1e-10)


GRADCHECK = [("gru", False, False), ("gru", True, True), ("gru", True, False), ("paper-gru", True, True),
             ("paper-gru", False, False), ("lstm", True, False), ("lstm-proj", False, True), ("rnn-tanh", True, True),
             ("rnn-relu", False, False)]


@pytest.mark.parametrize("kind,diag,tied", GRADCHECK)
def test_autograd_functions_pass_gradcheck(kind, diag, tied):
    """Finite differences of each function over its tensor inputs (input projections, states,
    prepared factors, diagonal, biases), with a packed-style shrinking batch."""
    model = build(kind, diag=diag, tied=tied, hidden=4, inputs=3)
    cell = prepare_all(model)[0]
    sizes = [3, 3, 2, 1]
    rows = sum(sizes)
    gates = {"gru": 3, "paper-gru": 3, "lstm": 4, "lstm-proj": 4, "rnn-tanh": 1, "rnn-relu": 1}[kind]
    torch.manual_seed(1)
    gi = torch.randn(gates, rows, 4, dtype=F64, requires_grad=True)
    out_size = 3 if kind == "lstm-proj" else 4
    h0 = torch.randn(3, out_size, dtype=F64, requires_grad=True)
    c0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    hh = [None if t is None else t.detach().clone().requires_grad_() for t in cell.hh[1:]]
    if kind.startswith("lstm"):
        hr = [None, None, None] if cell.hr is None else \
            [None if t is None else t.detach().clone().requires_grad_() for t in cell.hr[1:4]]

        def fn(gi, h0, c0, *ws):
            return bptt.LOOPS.lstm(gi, h0, c0, sizes, False, *ws[:5], *ws[5:], cell.hr is not None)

        inputs = (gi, h0, c0, *hh, *hr)
    elif kind.startswith("rnn"):
        def fn(gi, h0, *ws):
            return bptt.LOOPS.rnn(gi, h0, sizes, True, kind == "rnn-relu", *ws)

        inputs = (gi, h0, *hh)
    else:
        loop = bptt.LOOPS.paper_gru if kind == "paper-gru" else bptt.LOOPS.gru

        def fn(gi, h0, *ws):
            return loop(gi, h0, sizes, False, *ws)

        inputs = (gi, h0, *hh)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_no_n_by_n_intermediate_is_saved():
    """What a factored training step keeps for the backward grows with B T n, never n^2: at
    n = 512, d = 8 every saved tensor is far smaller than one 512 x 512 matrix."""
    model = lrc.accelerate(LowRankGRU(4, 512, rank=8, diag=True, tied=True), "factored", training=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = model(torch.randn(6, 2, 4))
    out.sum().backward()
    assert sizes and max(sizes) < 512 * 512 / 4, max(sizes)


def test_training_path_ends_at_the_same_loss_as_the_rebuilt_path():
    """A few hundred Adam updates on a small copy task: the factored backward and the rebuilt
    dense path follow the same trajectory (float64, so rounding cannot make them part)."""
    torch.manual_seed(0)
    base = nn.ModuleDict({"rnn": LowRankGRU(3, 16, rank=4, diag=True, batch_first=True), "head": nn.Linear(16, 3)})
    base = base.to(F64)
    runs = {}
    for name in ("factored", "rebuilt"):
        model = copy.deepcopy(base)
        if name == "factored":
            lrc.accelerate(model["rnn"], "factored", training=True)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(300):
            seq = torch.randint(0, 3, (8, 6), generator=g)
            x = nn.functional.one_hot(seq, 3).to(F64)
            out, _ = model["rnn"](x)
            loss = nn.functional.cross_entropy(model["head"](out[:, 1:]).reshape(-1, 3), seq[:, :-1].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs[name] = losses
    assert runs["factored"][-1] < 0.5 * runs["factored"][0]  # it learned the task
    assert abs(runs["factored"][-1] - runs["rebuilt"][-1]) < 1e-8 * runs["rebuilt"][-1]


def test_fit_picks_the_path_and_logs_it(tmp_path):
    """``fit`` attaches the training-time choice to factored layers (auto: the cost model) and
    records what ran; ``execution = "dense"`` leaves the model alone (and says so)."""
    from lrcompress.train import fit

    def loader():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 64, generator=g)) for _ in range(3)]

    for execution, expected in (("factored", "factored"), ("auto", None), ("dense", None)):
        model = LowRankGRU(3, 64, rank=4, batch_first=True)
        result = fit(model, loader(), lambda out, y: nn.functional.mse_loss(out[0], y),
                     recipe={"steps": 3, "optimizer": "adam", "execution": execution}, progress=False)
        if execution == "dense":
            assert lrc.execution.acceleration(model) is None  # nothing attached, and the log says why
            assert result.execution == {"model": "dense rebuild (train.execution = dense)"}
        else:
            assert list(result.execution) == ["model"]
            if expected:
                assert result.execution["model"].startswith("factored")
            else:  # auto: the cost model's words, with its estimate
                assert "cost model" in result.execution["model"]


@pytest.mark.parametrize("kind", ["gru", "paper-gru", "lstm", "lstm-proj", "rnn-tanh"])
@pytest.mark.parametrize("chunk", [1, 13, 40])
def test_backward_chunks_give_the_same_gradients(monkeypatch, kind, chunk):
    """The backward loops compute their coefficients a chunk of steps at a time: a chunk of one
    step, of a few steps (boundaries inside a packed batch's shrinking steps) and of all steps
    give the same gradients."""
    model = build(kind, diag=kind != "lstm-proj", tied=False, batch_first=True, bidirectional=True)
    fast, dense = factored_and_dense(model)
    x = torch.randn(4, 7, 4, dtype=F64)
    lengths = torch.tensor([3, 7, 1, 5])
    monkeypatch.setattr(bptt, "CHUNK", chunk * 6)  # hidden size 6: `chunk` rows per chunk
    compare(grads(fast, x, packed_lengths=lengths), grads(dense, x, packed_lengths=lengths), 1e-10)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn-tanh", "paper-gru"])
def test_outputs_can_be_changed_in_place_as_with_nn_gru(kind):
    """A residual ``out += x`` or an in-place activation on the outputs works as on the dense
    module, with the same gradients (the functions' outputs are not views of what they keep)."""
    fast, dense = factored_and_dense(build(kind, diag=True, inputs=6, hidden=6))
    x = torch.randn(5, 2, 6, dtype=F64)
    results = []
    for model in (fast, dense):
        model.zero_grad()
        out, _ = model(x)
        out += x
        out.tanh_()
        out.sum().backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gru", "paper-gru", "lstm", "lstm-proj", "rnn-tanh", "rnn-relu"])
def test_plain_python_kernels_equal_the_scripted_ones(monkeypatch, kind):
    """The step loops run as plain Python on CUDA and without TorchScript: same gradients."""
    monkeypatch.setattr(bptt, "_kernels_for", lambda t: bptt.kernels(False))
    fast, dense = factored_and_dense(build(kind, diag=not kind.startswith("lstm-proj"), batch_first=True,
                                           bidirectional=True))
    x = torch.randn(4, 7, 4, dtype=F64)
    lengths = torch.tensor([3, 7, 1, 5])
    compare(grads(fast, x, packed_lengths=lengths), grads(dense, x, packed_lengths=lengths), 1e-10)


@pytest.mark.parametrize("factored", [False, True])
def test_paper_gru_checks_its_call_as_nn_gru_does(factored):
    torch.manual_seed(0)
    model = LowRankPaperGRU(3, 8, rank=2) if factored else PaperGRU(3, 8)
    reference = nn.GRU(3, 8)
    x = torch.randn(6, 2, 3)
    for bad in (torch.randn(1, 3, 8), torch.randn(1, 1, 8), torch.randn(2, 2, 8)):
        with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 8\)"):
            reference(x, bad)
        with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 8\)"):
            model(x, bad)
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 4"):
        model(torch.randn(6, 2, 4))
    with pytest.raises(ValueError, match="input must have the type torch.float32"):
        model(x.double())
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        model(torch.randn(6))


def test_paper_gru_runs_under_autocast_in_its_weights_precision():
    torch.manual_seed(0)
    model = PaperGRU(3, 16, batch_first=True)
    x = torch.randn(2, 10, 3)
    want, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, h = model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_fit_keeps_a_callers_dense_choice():
    from lrcompress.train import fit

    data = [(torch.randn(4, 5, 3), torch.randn(4, 5, 64))]
    model = lrc.accelerate(LowRankGRU(3, 64, rank=4, batch_first=True), "dense")
    result = fit(model, data, lambda out, y: nn.functional.mse_loss(out[0], y),
                 recipe={"steps": 1, "optimizer": "adam"}, progress=False)
    assert lrc.execution.acceleration(model) is None and result.execution == {}
    fit(model, data, lambda out, y: nn.functional.mse_loss(out[0], y),
        recipe={"steps": 1, "optimizer": "adam", "execution": "factored"}, progress=False)
    assert lrc.execution.acceleration(model).last == ("factored", None)  # forcing still forces
