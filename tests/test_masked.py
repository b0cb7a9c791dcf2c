"""The eq. 7 GRU backward with per-sequence dropout masks (``lrcompress.execution.masked``).

Reference: autograd through ``nn.variational``'s step loop (``backward="autograd"``), the same
masks, float64. Every mask grouping the schemes make (dl4mt-lm: dense two groups, untied three,
tied one; Gal's per gate: three on a tied R too), with and without the diagonal, bias, two layers,
an initial state; outputs, final states and the gradients of every parameter, of the input and of
the initial state must agree to 1e-10 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.errors import ConfigError
from lrcompress.execution import masked
from lrcompress.nn import LowRankGRU
from lrcompress.nn.variational import FALLBACK_NOTE, MASKED_NOTE, draw_masks, masked_backward, run_sequence, \
    run_variational
from lrcompress.train.models import PaperGRU

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, IN, N = 4, 7, 3, 6


def make(kind: str) -> nn.GRU:
    torch.manual_seed(3)
    if kind == "dense":
        return nn.GRU(IN, N, batch_first=True, dtype=torch.float64)
    if kind == "dense-2-layers-no-bias":
        return nn.GRU(IN, N, num_layers=2, bias=False, batch_first=True, dtype=torch.float64)
    diag = "diag" in kind
    tied = "tied" in kind
    layers = 2 if "2-layers" in kind else 1
    return LowRankGRU(IN, N, rank=2, diag=diag, tied=tied, num_layers=layers, batch_first=True).double()


KINDS = ["dense", "dense-2-layers-no-bias", "lr", "lrd", "lrd-tied", "lr-tied", "lrd-2-layers", "lrd-tied-2-layers"]


def grads(rnn, x, h0, masks, backward):
    rnn.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    h0 = h0.clone().requires_grad_()
    out, h = run_variational(rnn, x, h0, masks, backward=backward)
    torch.manual_seed(9)
    # (torch.randn, not randn_like: randn_like follows the strides, and the outputs' differ by path)
    loss = (out * torch.randn(out.shape, dtype=out.dtype)).sum() + (h * torch.randn(h.shape, dtype=h.dtype)).sum()
    loss.backward()
    named = {name: p.grad.clone() for name, p in rnn.named_parameters()}
    return out.detach(), h.detach(), x.grad, h0.grad, named


@pytest.mark.parametrize("scheme", ["dl4mt", "per_gate"])
@pytest.mark.parametrize("kind", KINDS)
def test_masked_backward_equals_autograd_through_the_step_loop(kind, scheme):
    rnn = make(kind)
    assert masked_backward(rnn)
    torch.manual_seed(5)
    masks = draw_masks(rnn, B, T, scheme=scheme, recurrent=0.5, inputs=0.3)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    h0 = torch.randn(rnn.num_layers, B, N, dtype=torch.float64)
    fast = grads(rnn, x, h0, masks, "auto")
    ref = grads(rnn, x, h0, masks, "autograd")
    for a, b in zip(fast[:4], ref[:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fast[4].keys() == ref[4].keys()
    for name in ref[4]:
        torch.testing.assert_close(fast[4][name], ref[4][name], rtol=1e-10, atol=1e-12, msg=name)
    # the masks matter: without them the gradients differ
    plain = grads(rnn, x, h0, draw_masks(rnn, B, T, scheme=scheme), "autograd")
    assert not torch.allclose(plain[4][next(iter(ref[4]))], ref[4][next(iter(ref[4]))])


def test_gradcheck_on_the_function():
    torch.manual_seed(0)
    m, d, batch, steps = 5, 2, 3, 4
    gi = torch.randn(3, steps * batch, m, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, m, dtype=torch.float64, requires_grad=True)
    right = torch.randn(m, 3 * d, dtype=torch.float64, requires_grad=True)
    left = torch.randn(3, d, m, dtype=torch.float64, requires_grad=True)
    diag = torch.randn(3, 1, m, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 1, m, dtype=torch.float64, requires_grad=True)
    masks = torch.bernoulli(torch.full((2, batch, m), 0.6, dtype=torch.float64)) / 0.6

    def f(gi, h0, right, left, diag, bias):
        return masked.masked_gru(gi, h0, steps, masks, [(0, 2), (2, 1)], None, right, left, diag, bias)

    assert torch.autograd.gradcheck(f, (gi, h0, right, left, diag, bias))


def test_plain_python_kernels_agree_with_torchscript(monkeypatch):
    rnn = make("lrd-tied")
    masks = draw_masks(rnn, B, T, scheme="per_gate", recurrent=0.5)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    h0 = torch.zeros(1, B, N, dtype=torch.float64)
    scripted = grads(rnn, x, h0, masks, "auto")
    monkeypatch.setattr(masked, "masked_kernels", lambda script=True: masked.MaskedKernels(False))
    plain = grads(rnn, x, h0, masks, "auto")
    for name in scripted[4]:
        torch.testing.assert_close(plain[4][name], scripted[4][name], rtol=1e-12, atol=1e-14)


def test_which_layers_take_it():
    assert masked_backward(make("lrd"))
    assert not masked_backward(PaperGRU(IN, N, batch_first=True))  # eq. 6: the autograd loop
    assert not masked_backward(nn.RNN(IN, N, batch_first=True))  # no masked kernel for nn.RNN: the loop
    assert masked_backward(nn.LSTM(IN, N, batch_first=True))  # tests/test_masked_lstm.py
    kron = nn.Sequential(nn.GRU(4, 16, batch_first=True))
    lrc.compress(kron, structure="kronecker", kron_factors=(4, 4))  # in place
    assert not masked_backward(kron[0])  # a Kronecker W: the autograd loop
    with pytest.raises(ConfigError, match="backward"):
        run_variational(make("lr"), torch.randn(B, T, IN, dtype=torch.float64), None,
                        draw_masks(make("lr"), B, T, scheme="dl4mt"), backward="fast")


def test_the_training_note_names_the_path():
    rnn = lrc.accelerate(make("lrd-tied").float(), training=True)
    run_sequence(rnn, torch.randn(B, T, IN), None, scheme="dl4mt", recurrent=0.5)
    assert rnn.__dict__["_lrc_variational_note"] == MASKED_NOTE
    lstm = lrc.accelerate(lrc.nn.LowRankLSTM(IN, N, rank=2, batch_first=True), training=True)
    run_sequence(lstm, torch.randn(B, T, IN), None, scheme="per_gate", recurrent=0.5)
    assert lstm.__dict__["_lrc_variational_note"] == MASKED_NOTE
    plain = lrc.accelerate(lrc.nn.LowRankRNN(IN, N, rank=2, batch_first=True), training=True)
    run_sequence(plain, torch.randn(B, T, IN), None, scheme="per_gate", recurrent=0.5)
    assert plain.__dict__["_lrc_variational_note"] == FALLBACK_NOTE


def test_no_state_matrix_is_saved():
    """The saved tensors are O(B T n) and O(n d): nothing n x n, as in execution.bptt."""
    n, d = 256, 8
    rnn = LowRankGRU(IN, n, rank=d, diag=True, batch_first=True)
    masks = draw_masks(rnn, 2, 3, scheme="dl4mt", recurrent=0.5)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = run_variational(rnn, torch.randn(2, 3, IN), None, masks)
    assert sizes and max(sizes) < n * n // 4


@pytest.mark.parametrize("path", ["bptt-gru", "bptt-lstm", "paper-gru", "masked"])
def test_a_second_derivative_raises_instead_of_going_missing(path):
    """The written-out backwards are first-order: create_graph=True must fail loudly (a
    SecondOrderError naming the path that supports it), never return gradients whose own
    derivatives are silently absent; first-order gradients still work afterwards."""
    from lrcompress.errors import SecondOrderError

    torch.manual_seed(0)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    if path == "masked":
        rnn = make("lrd")
        masks = draw_masks(rnn, B, T, scheme="dl4mt", recurrent=0.5)
        forward = lambda: run_variational(rnn, x, None, masks)[0]  # noqa: E731
    else:
        if path == "bptt-gru":
            rnn = LowRankGRU(IN, N, rank=2, diag=True, batch_first=True).double()
        elif path == "bptt-lstm":
            rnn = lrc.nn.LowRankLSTM(IN, N, rank=2, batch_first=True).double()
        else:
            rnn = PaperGRU(IN, N, batch_first=True, dtype=torch.float64)
        if path != "paper-gru":
            lrc.accelerate(rnn, mode="factored", training=True)
        forward = lambda: rnn(x)[0]  # noqa: E731
    params = [p for p in rnn.parameters() if p.requires_grad]
    with pytest.raises(SecondOrderError, match="first-order"):
        torch.autograd.grad(forward().square().sum(), params, create_graph=True)
    first = torch.autograd.grad(forward().square().sum(), params)
    assert all(g is not None and torch.isfinite(g).all() for g in first)
