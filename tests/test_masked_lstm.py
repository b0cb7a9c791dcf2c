"""The LSTM backward with per-sequence dropout masks (``lrcompress.execution.masked.masked_lstm``).

Reference: autograd through ``nn.variational``'s step loop (``backward="autograd"``), the same
masks, float64. Dense, low-rank, low-rank plus diagonal and tied weights, one and two layers;
Gal's per-gate masks and other groupings of the four gates; outputs, the final h and c and the
gradients of every parameter, of the input and of the initial h and c must agree to 1e-10
relative. Also: no recurrent dropout, a grouping the kernel does not take (the step loop), the
first-order guard, and a PTB-style LSTM language model training through the new path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.errors import SecondOrderError
from lrcompress.execution import masked
from lrcompress.nn import LowRankLSTM
from lrcompress.nn import variational
from lrcompress.nn.variational import FALLBACK_NOTE, MASKED_NOTE, LayerMasks, VariationalMasks, draw_masks, \
    masked_backward, run_variational, sequence_masks

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, IN, N = 4, 7, 3, 6


def make(kind: str) -> nn.LSTM:
    torch.manual_seed(3)
    layers = 2 if "2-layers" in kind else 1
    if kind.startswith("dense"):
        return nn.LSTM(IN, N, num_layers=layers, bias="no-bias" not in kind, batch_first=True, dtype=torch.float64)
    return LowRankLSTM(IN, N, rank=2, diag="lrd" in kind, tied="tied" in kind, num_layers=layers,
                       bias="no-bias" not in kind, batch_first=True).double()


KINDS = ["dense", "dense-2-layers-no-bias", "lr", "lrd", "lr-tied", "lrd-tied", "lrd-no-bias", "lrd-2-layers",
         "lrd-tied-2-layers"]
# Groupings of the gates i, f, g, o besides Gal's one mask per gate: pairs, uneven runs, one shared mask.
GROUPINGS = {"pairs": ((0, 1), (2, 3)), "uneven": ((0,), (1, 2, 3)), "shared": ((0, 1, 2, 3),)}


def regroup(masks: VariationalMasks, groups: tuple[tuple[int, ...], ...]) -> VariationalMasks:
    """``masks`` with fresh recurrent masks, one per group of ``groups``, in every layer."""
    layers = []
    for lm in masks.layers:
        rec = sequence_masks(len(groups), B, N, 0.5, lm.recurrent[0])
        layers.append(LayerMasks(groups, list(rec), lm.inputs, lm.input_kind))
    return VariationalMasks(layers)


def functions(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced ``t`` (which path ran)."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def grads(rnn, x, h0, c0, masks, backward):
    rnn.zero_grad(set_to_none=True)
    x, h0, c0 = (t.clone().requires_grad_() for t in (x, h0, c0))
    out, (h, c) = run_variational(rnn, x, (h0, c0), masks, backward=backward)
    path = functions(out)
    torch.manual_seed(9)
    # (torch.randn, not randn_like: randn_like follows the strides, and the outputs' differ by path)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype)).sum() for t in (out, h, c))
    loss.backward()
    named = {name: p.grad.clone() for name, p in rnn.named_parameters()}
    return (out.detach(), h.detach(), c.detach(), x.grad, h0.grad, c0.grad), named, path


def check_equal(rnn, masks, fast_node):
    torch.manual_seed(4)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    h0 = torch.randn(rnn.num_layers, B, N, dtype=torch.float64)
    c0 = torch.randn(rnn.num_layers, B, N, dtype=torch.float64)
    fast, fast_named, path = grads(rnn, x, h0, c0, masks, "auto")
    ref, ref_named, ref_path = grads(rnn, x, h0, c0, masks, "autograd")
    assert fast_node in path and fast_node not in ref_path  # the two paths really differ
    for what, a, b in zip(("out", "h_n", "c_n", "d input", "d h0", "d c0"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=what)
    assert fast_named.keys() == ref_named.keys()
    for name in ref_named:
        torch.testing.assert_close(fast_named[name], ref_named[name], rtol=1e-10, atol=1e-12, msg=name)
    return x, h0, c0, ref_named


@pytest.mark.parametrize("kind", KINDS)
def test_per_gate_masks_equal_autograd_through_the_step_loop(kind):
    rnn = make(kind)
    assert masked_backward(rnn)
    torch.manual_seed(5)
    masks = draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.5, inputs=0.3)
    assert masks.layers[0].groups == ((0,), (1,), (2,), (3,))
    x, h0, c0, ref = check_equal(rnn, masks, "MaskedLSTMFunctionBackward")
    # the masks matter: without them the gradients differ
    _, plain, _ = grads(rnn, x, h0, c0, draw_masks(rnn, B, T, scheme="per_gate"), "autograd")
    name = next(n for n in ref if "hh" in n)
    assert not torch.allclose(plain[name], ref[name])


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("kind", ["dense", "lrd", "lrd-tied-2-layers"])
def test_other_groupings_equal_autograd(kind, grouping):
    rnn = make(kind)
    torch.manual_seed(5)
    masks = regroup(draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.5, inputs=0.3), GROUPINGS[grouping])
    check_equal(rnn, masks, "MaskedLSTMFunctionBackward")


@pytest.mark.parametrize("kind", ["dense", "lrd-tied-2-layers"])
def test_without_recurrent_dropout_the_plain_factored_backward_runs(kind):
    rnn = make(kind)
    torch.manual_seed(5)
    masks = draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.0, inputs=0.3)
    assert masks.layers[0].recurrent is None
    check_equal(rnn, masks, "LSTMFunctionBackward")


def test_a_grouping_of_non_consecutive_gates_takes_the_step_loop():
    rnn = make("lrd")
    torch.manual_seed(5)
    masks = regroup(draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.5), ((0, 2), (1, 3)))
    x = torch.randn(B, T, IN, dtype=torch.float64)
    zeros = torch.zeros(1, B, N, dtype=torch.float64)
    _, _, path = grads(rnn, x, zeros, zeros, masks, "auto")
    assert "MaskedLSTMFunctionBackward" not in path


@pytest.mark.parametrize("factored", [True, False])
def test_gradcheck_on_the_function(factored):
    torch.manual_seed(0)
    m, d, batch, steps = 5, 2, 3, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    gi = torch.randn(4, steps * batch, m, **f64)
    h0, c0 = torch.randn(batch, m, **f64), torch.randn(batch, m, **f64)
    masks = torch.bernoulli(torch.full((2, batch, m), 0.6, dtype=torch.float64)) / 0.6
    groups = [(0, 1), (1, 3)]
    if factored:
        weights = (None, torch.randn(m, 4 * d, **f64), torch.randn(4, d, m, **f64), torch.randn(4, 1, m, **f64),
                   torch.randn(4, 1, m, **f64))
    else:
        weights = (torch.randn(m, 4 * m, **f64), None, None, None, torch.randn(4 * m, **f64))
    live = [w for w in weights if w is not None]

    def f(gi, h0, c0, *ws):
        it = iter(ws)
        op = [None if w is None else next(it) for w in weights]
        return masked.masked_lstm(gi, h0, c0, steps, masks, groups, *op)

    assert torch.autograd.gradcheck(f, (gi, h0, c0, *live))


def test_plain_python_kernels_agree_with_torchscript(monkeypatch):
    rnn = make("lrd-tied")
    torch.manual_seed(5)
    masks = draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.5)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    zeros = torch.zeros(1, B, N, dtype=torch.float64)
    scripted = grads(rnn, x, zeros, zeros, masks, "auto")[1]
    monkeypatch.setattr(masked, "masked_kernels", lambda script=True: masked.MaskedKernels(False))
    plain = grads(rnn, x, zeros, zeros, masks, "auto")[1]
    for name in scripted:
        torch.testing.assert_close(plain[name], scripted[name], rtol=1e-12, atol=1e-14)


def test_which_lstms_take_it():
    assert masked_backward(nn.LSTM(IN, N, batch_first=True))
    assert masked_backward(make("lrd-tied-2-layers"))
    assert not masked_backward(nn.LSTM(IN, N, proj_size=2, batch_first=True))  # out of scope: the step loop
    kron = nn.Sequential(nn.LSTM(4, 16, batch_first=True))
    lrc.compress(kron, structure="kronecker", kron_factors=(4, 4))  # in place
    assert not masked_backward(kron[0])  # a Kronecker W: the autograd loop


def test_a_second_derivative_raises_instead_of_going_missing():
    rnn = make("lrd")
    masks = draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.5)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    params = list(rnn.parameters())
    with pytest.raises(SecondOrderError, match="first-order"):
        torch.autograd.grad(run_variational(rnn, x, None, masks)[0].square().sum(), params, create_graph=True)
    first = torch.autograd.grad(run_variational(rnn, x, None, masks)[0].square().sum(), params)
    assert all(g is not None and torch.isfinite(g).all() for g in first)


def lstm_lm(rank: int):
    """A PTB-style character LSTM language model (Gal's per-gate masks, stream mode), float64."""
    from lrcompress.train.models import build_model
    from lrcompress.train.tasks_data import PtbCharTask

    task = PtbCharTask({"mode": "stream"})
    task._vocab = type("V", (), {"__len__": lambda self: 11})()  # no data files: 11 symbols
    torch.manual_seed(3)
    model = build_model({"cell": "lstm", "hidden_size": N, "rank": rank, "diag": bool(rank), "input_dropout": 0.1,
                         "output_dropout": 0.25, "dropout_masks": "per_gate"}, task)
    model.recurrent_dropout = 0.25
    return model.double()


@pytest.mark.parametrize("rank", [0, 2])
def test_a_ptb_style_lstm_trains_through_it(rank, monkeypatch):
    """Two stateful windows (the second starts from the first's (h, c)): gradients equal the step
    loop's for the same masks, and the training log names the masked path."""
    from lrcompress.train.engine import describe_execution

    x = torch.randint(0, 11, (B, T))

    def run(model):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        logits, state = model.forward_stateful(x)
        logits2, _ = model.forward_stateful(x.flip(1), tuple(s.detach() for s in state))
        (logits.square().mean() + logits2.sin().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model = lstm_lm(rank)
    if rank:
        lrc.accelerate(model.rnn, mode="factored", training=True)
    fast = run(model)
    assert describe_execution({"rnn": model.rnn}) == {"rnn": MASKED_NOTE}
    monkeypatch.setattr(variational, "masked_backward", lambda rnn: False)
    ref = run(model)
    assert describe_execution({"rnn": model.rnn}) == {"rnn": FALLBACK_NOTE}
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
