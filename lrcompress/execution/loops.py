"""The recurrence, one step at a time, on precomputed input projections.

Sequences are in *rows* layout: the rows of step ``t`` are ``start[t] : start[t] + sizes[t]`` of a
``(rows, features)`` tensor (time-major padded batches have ``sizes = [B] * T``; a PackedSequence
has decreasing sizes). Gate pre-activations are ``(G, rows, m)`` views. Each step multiplies the
hidden state by the recurrent ``Op`` (``h R^T``, then ``L``, plus the diagonal) and applies the
gates; only the rows still active move, so the final state of every sequence is its own last
step, in either direction. The functions are TorchScript-compatible: ``scripted()`` compiles them
once (less interpreter overhead per step) and falls back to plain Python if that fails.

    >>> out, h = gru_layer(gi, h0, [1] * 5, False, None, right, left, None, bias)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def gates(x: Tensor, count: int, dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
          diag: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``blocks(x W^T + b)`` as a (G, rows, m) view, from ``W^T`` or from the factors."""
    rows = x.shape[0]
    if dense is not None:
        out = torch.mm(x, dense) if bias is None else torch.addmm(bias, x, dense)
        return out.view(rows, count, -1).transpose(0, 1)
    assert right is not None and left is not None
    return factored_gates(x, torch.mm(x, right), count, left, diag, bias)


def factored_gates(x: Tensor, u: Tensor, count: int, left: Tensor, diag: Optional[Tensor],
                   bias: Optional[Tensor]) -> Tensor:
    """``gates`` of a factored op given ``u = x R^T`` (the training loops keep ``u``)."""
    rows = x.shape[0]
    if left.dim() == 2:  # tied: one (rows, d) product feeds every gate
        out = torch.mm(u, left) if bias is None else torch.addmm(bias, u, left)
        out = out.view(rows, count, -1).transpose(0, 1)
    else:
        u3 = u.view(rows, count, -1).transpose(0, 1)
        out = torch.bmm(u3, left) if bias is None else torch.baddbmm(bias, u3, left)
    if diag is not None:
        out.addcmul_(diag, x)  # in place: ``out`` is this function's own fresh tensor
    return out


def order_of(sizes: List[int], reverse: bool) -> List[Tuple[int, int]]:
    """``(start, size)`` of each step's rows, in processing order (last step first if ``reverse``):
    worked out once per layer, so the step loops do no index arithmetic."""
    spans: List[Tuple[int, int]] = []
    total = 0
    for s in sizes:
        spans.append((total, s))
        total += s
    if reverse:
        spans.reverse()
    return spans


def carry(new: Tensor, old: Tensor) -> Tensor:
    """The state after a step in which only the first ``len(new)`` rows moved."""
    return new if new.shape[0] == old.shape[0] else torch.cat([new, old[new.shape[0]:]], 0)


def collect(pieces: List[Tensor], reverse: bool) -> Tensor:
    """Per-step outputs (in processing order) as rows in time order: one copy at the end, cheaper
    than a copy per step, and it keeps the autograd graph."""
    if reverse:
        pieces = [pieces[len(pieces) - 1 - i] for i in range(len(pieces))]
    return torch.cat(pieces, 0)


def gru_layer(gi: Tensor, h: Tensor, sizes: List[int], reverse: bool,
              dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
              diag: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """nn.GRU over one layer and direction: r and z gate, ``n = tanh(gi_n + r * (W_hn h + b_hn))``."""
    pieces: List[Tensor] = []
    for s, b in order_of(sizes, reverse):
        hb = h if b == h.shape[0] else h[:b]
        g = gi.narrow(1, s, b)
        g_r, g_z, g_n = g.unbind(0)
        h_r, h_z, h_n = gates(hb, 3, dense, right, left, diag, bias).unbind(0)
        r = torch.sigmoid(g_r + h_r)
        z = torch.sigmoid(g_z + h_z)
        new = torch.lerp(torch.tanh(torch.addcmul(g_n, r, h_n)), hb, z)
        pieces.append(new)
        h = carry(new, h)
    return collect(pieces, reverse), h


def lstm_layer(gi: Tensor, h: Tensor, c: Tensor, sizes: List[int], reverse: bool,
               dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
               diag: Optional[Tensor], bias: Optional[Tensor],
               p_dense: Optional[Tensor], p_right: Optional[Tensor], p_left: Optional[Tensor],
               projected: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """nn.LSTM over one layer and direction, gates i, f, g, o; ``h = W_hr (o * tanh(c))`` if projected."""
    pieces: List[Tensor] = []
    for s, b in order_of(sizes, reverse):
        pre = gi.narrow(1, s, b) + gates(h if b == h.shape[0] else h[:b], 4, dense, right, left, diag, bias)
        i, f, _, o = torch.sigmoid(pre).unbind(0)  # the g slot is wasted: cheaper than 3 calls
        cell = torch.addcmul(f * (c if b == c.shape[0] else c[:b]), i, torch.tanh(pre[2]))
        new = o * torch.tanh(cell)
        if projected:
            new = gates(new, 1, p_dense, p_right, p_left, None, None)[0]
        pieces.append(new)
        h = carry(new, h)
        c = carry(cell, c)
    return collect(pieces, reverse), h, c


def rnn_layer(gi: Tensor, h: Tensor, sizes: List[int], reverse: bool, relu: bool,
              dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
              diag: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """nn.RNN over one layer and direction: ``h = act(gi + W_hh h + b_hh)``, tanh or relu."""
    pieces: List[Tensor] = []
    for s, b in order_of(sizes, reverse):
        pre = gi[0].narrow(0, s, b) + gates(h if b == h.shape[0] else h[:b], 1, dense, right, left, diag, bias)[0]
        new = torch.relu(pre) if relu else torch.tanh(pre)
        pieces.append(new)
        h = carry(new, h)
    return collect(pieces, reverse), h


def paper_gru_layer(gi: Tensor, h: Tensor, sizes: List[int], reverse: bool,
                    dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                    diag: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The paper's GRU (eq. 6) over one layer and direction: ``n = tanh(gi_n + W_hn (r * h) + b_hn)``."""
    pieces: List[Tensor] = []
    m = h.shape[1]
    for s, b in order_of(sizes, reverse):
        hb = h if b == h.shape[0] else h[:b]
        g = gi.narrow(1, s, b)
        # The r and z rows of the recurrent product, then the n rows on r * h: the op is cut per
        # call (views, no copies) so one Op serves both forms.
        rz = torch.sigmoid(g[:2] + gates(hb, 2, *_part(dense, right, left, diag, bias, 0, 2, m)))
        hn = gates(rz[0] * hb, 1, *_part(dense, right, left, diag, bias, 2, 1, m))[0]
        new = torch.lerp(torch.tanh(g[2] + hn), hb, rz[1])
        pieces.append(new)
        h = carry(new, h)
    return collect(pieces, reverse), h


def _part(dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
          bias: Optional[Tensor], first: int, count: int, m: int) -> Tuple[Optional[Tensor], Optional[Tensor],
                                                                          Optional[Tensor], Optional[Tensor],
                                                                          Optional[Tensor]]:
    """Gates ``first .. first + count`` of a 3-gate op whose blocks have ``m`` rows."""
    if dense is not None:
        dense = dense.narrow(1, first * m, count * m)
    elif left is not None and right is not None:
        if left.dim() == 2:  # tied: R shared
            left = left.narrow(1, first * m, count * m)
        else:
            d = left.shape[1]
            left = left.narrow(0, first, count)
            right = right.narrow(1, first * d, count * d)
    if diag is not None:
        diag = diag.narrow(0, first, count)
    if bias is not None:
        bias = bias.narrow(0, first * m, count * m) if bias.dim() == 1 else bias.narrow(0, first, count)
    return dense, right, left, diag, bias


class Loops(NamedTuple):
    gru: Callable
    lstm: Callable
    rnn: Callable
    paper_gru: Callable


PLAIN = Loops(gru_layer, lstm_layer, rnn_layer, paper_gru_layer)


@functools.lru_cache(maxsize=None)
def compiler(script: bool) -> Callable:
    """``torch.jit.script`` when ``script``, else the function as it is (``compile_or_plain``'s makers)."""
    return torch.jit.script if script else (lambda f: f)


def compile_or_plain(make: Callable[[bool], T]) -> T:
    """``make(True)`` (its functions compiled by TorchScript), or ``make(False)`` (plain Python)
    when that fails (TorchScript missing, or unable to compile on this PyTorch) or is switched off
    with ``LRCOMPRESS_JIT=0``."""
    if os.environ.get("LRCOMPRESS_JIT", "1") != "0":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice says nothing to act on
                return make(True)
        except Exception:
            pass
    return make(False)


def scripted() -> Loops:
    """The loops compiled by TorchScript (once per process); plain Python when that fails or is
    switched off with ``LRCOMPRESS_JIT=0``. TorchScript runs each step's ~10 small ops with about
    half the per-op overhead of the Python interpreter, which matters for n ~ 1000 at batch 1."""
    return compile_or_plain(lambda script: Loops(*(torch.jit.script(f) for f in PLAIN)) if script else PLAIN)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice says nothing to act on
            return Loops(*(torch.jit.script(f) for f in PLAIN))  # type: ignore[arg-type]
    except Exception:  # TorchScript missing, or unable to compile on this PyTorch: run them in Python
        return PLAIN
