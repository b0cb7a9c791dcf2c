"""Serving code: converted and accelerated models under ``torch.inference_mode()`` and ``no_grad``.

Tensors made under inference mode keep no version counter, so the accelerated path must neither
read one nor trust a cache it cannot invalidate. Every check compares against the same model on
the dense-rebuild path (not accelerated) under ``no_grad``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.nn import LowRankGRU, LowRankLSTM, LowRankRNN

INPUT, HIDDEN, RANK = 5, 16, 4
pytestmark = [pytest.mark.filterwarnings("ignore:.*is no smaller than dense")]
CLASSES = {"gru": LowRankGRU, "lstm": LowRankLSTM, "rnn": LowRankRNN}


def build(kind: str, **options) -> nn.RNNBase:
    torch.manual_seed(0)
    return CLASSES[kind](INPUT, HIDDEN, rank=RANK, num_layers=2, **options).eval()


def outputs(result) -> list[torch.Tensor]:
    out, hidden = result
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def assert_close(got, want) -> None:
    for a, b in zip(outputs(got), outputs(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def dense_reference(module: nn.RNNBase, x: torch.Tensor):
    reference = copy.deepcopy(module)
    lrc.accelerate(reference, "dense")
    with torch.no_grad():
        return reference(x)


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("diag,tied", [(False, False), (True, False), (True, True)])
def test_accelerated_outside_called_inside(kind, diag, tied):
    module = build(kind, diag=diag, tied=tied)
    x = torch.randn(6, 2, INPUT)
    want = dense_reference(module, x)
    lrc.accelerate(module, "factored")
    with torch.no_grad():
        assert_close(module(x), want)  # caches prepared weights outside inference mode
    with torch.inference_mode():
        got = module(x)
    assert all(t.is_inference() for t in outputs(got))
    assert_close(got, want)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_built_accelerated_and_called_inside_then_outside(kind):
    source = build(kind, diag=True)
    x = torch.randn(6, 2, INPUT)
    want = dense_reference(source, x)
    with torch.inference_mode():
        module = CLASSES[kind](INPUT, HIDDEN, rank=RANK, num_layers=2, diag=True).eval()
        module.load_state_dict(source.state_dict())
        assert next(module.parameters()).is_inference()
        lrc.accelerate(module, "factored")
        assert_close(module(x), want)
    with torch.no_grad():  # called outside: inference tensors are read-only there, still exact
        assert_close(module(x), want)


def test_in_place_change_under_inference_mode_is_seen():
    module = lrc.accelerate(build("gru", diag=True), "factored")
    x = torch.randn(6, 2, INPUT)
    with torch.inference_mode():
        fresh = build("gru", diag=True)
        fresh.load_state_dict(module.state_dict())
        lrc.accelerate(fresh, "factored")
        before = fresh(x)
        # No version counter records this: the accelerated path must still see it.
        fresh.parametrizations.weight_hh_l0.original0.mul_(2)
        fresh.parametrizations.weight_hh_l0.original2.add_(0.5)
        after = fresh(x)
    assert not torch.allclose(after[0], before[0])
    assert_close(after, dense_reference(fresh, x))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_compressed_and_accelerated_inside_inference_mode(kind):
    x = torch.randn(6, 2, INPUT)
    with torch.inference_mode():
        torch.manual_seed(0)
        dense = (nn.GRU if kind == "gru" else nn.LSTM)(INPUT, HIDDEN, num_layers=2).eval()
        want = dense(x)
        lrc.compress(dense, rank=HIDDEN)  # full rank: the same function
        assert_close(dense(x), want)
        lrc.accelerate(dense, "factored")
        assert_close(dense(x), want)


def test_no_grad_and_inference_mode_agree_in_auto_mode():
    module = lrc.accelerate(build("lstm", diag=True))
    x = torch.randn(6, 2, INPUT)
    with torch.no_grad():
        want = module(x)
    with torch.inference_mode():
        assert_close(module(x), want)


def _first(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("make,mode", [
    (lambda: nn.GRU(INPUT, HIDDEN), "factored"),
    (lambda: nn.LSTM(INPUT, HIDDEN), "auto"),
    (lambda: nn.GRUCell(INPUT, HIDDEN), "auto"),
    (lambda: nn.LSTMCell(INPUT, HIDDEN), "factored"),
])
@pytest.mark.parametrize("optimizer", ["adam-fused", "sgd-fused", "adam"])
def test_an_optimizer_step_is_seen_even_when_it_bumps_no_version(make, mode, optimizer):
    """Fused optimizers write through kernels that leave version counters alone: the trainable
    call before the step must drop the prepared weights, or the next inference call is stale."""
    torch.manual_seed(0)
    module = make()
    lrc.compress(module, rank=RANK, diag=True)
    lrc.accelerate(module, mode)
    x = torch.randn(3, INPUT) if isinstance(module, nn.RNNCellBase) else torch.randn(6, 3, INPUT)
    module.eval()
    with torch.no_grad():
        before = _first(module(x))  # fills the cache
    name, _, fused = optimizer.partition("-")
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    try:
        opt = cls(module.parameters(), lr=0.1, **({"fused": True} if fused else {}))
        module.train()
        _first(module(x)).pow(2).sum().backward()
        opt.step()
    except RuntimeError as exc:  # fused kernels need a recent PyTorch on CPU
        pytest.skip(f"{optimizer} unavailable here: {exc}")
    module.eval()
    with torch.no_grad():
        got = _first(module(x))
        module.__dict__.pop("_lrc_acceleration")  # the plain (parametrized) path as reference
        want = _first(module(x))
    assert not torch.allclose(want, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forget_after_a_data_update():
    """``.data`` changes are invisible to version counters: ``forget`` (documented) refreshes."""
    from lrcompress.execution import acceleration

    module = lrc.accelerate(build("gru", diag=True), "factored")
    x = torch.randn(6, 2, INPUT)
    with torch.no_grad():
        module(x)
        module.parametrizations.weight_hh_l0.original0.data.mul_(2)
        acceleration(module).forget()
        assert_close(module(x), dense_reference(module, x))
