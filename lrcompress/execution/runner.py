"""The factored forward of a whole recurrent module: every layer and direction, every input form.

``forward`` takes what ``nn.GRU``/``nn.LSTM``/``nn.RNN`` take (a padded batch, time- or
batch-major, an unbatched sequence, or a PackedSequence; an optional initial state) and returns
what they return. Input projections of all steps are one matmul per layer and direction
(``x W_ih^T``, or ``(x R^T) L^T`` when factored); only the recurrence runs step by step, in
``loops``. Inputs are assumed valid: ``dispatch`` sends anything unusual to the dense path.

    >>> out, h = forward(gru, x, None, cells, loops.scripted())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .loops import Loops, gates
from .ops import Cell

# (x rows, sizes, h0, c0 or None) -> (output rows, h_n, c_n or None)
Recurrence = Callable[[Tensor, list, Tensor, Optional[Tensor]], tuple]


def forward(module: nn.RNNBase, input, hx, cells: list[Cell], loops: Loops,
            recur: Recurrence | None = None):
    """``module(input, hx)`` computed from ``cells`` without forming any factored matrix.

    ``recur`` replaces the layer loop for padded input (the CUDA-graph replay uses this).
    """
    lstm = module.mode == "LSTM"
    packed = isinstance(input, PackedSequence)
    batched, batch_dim = True, 0 if module.batch_first else 1
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        sizes = batch_sizes.tolist()
        batch = sizes[0]
    else:
        x = input
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(batch_dim)
        if module.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        sizes = [batch] * steps
        x = x.reshape(steps * batch, x.shape[2])
    h0, c0 = initial_state(module, hx, batch, x, lstm, batched)
    if packed and sorted_indices is not None:
        h0 = h0.index_select(1, sorted_indices)
        c0 = None if c0 is None else c0.index_select(1, sorted_indices)
    if recur is None or packed:
        out, hn, cn = layers(module, cells, loops, x, sizes, h0, c0)
    else:
        out, hn, cn = recur(x, sizes, h0, c0)
    hidden = (hn, cn) if lstm else hn
    if packed:
        if unsorted_indices is not None:
            hidden = (hn.index_select(1, unsorted_indices), cn.index_select(1, unsorted_indices)) if lstm \
                else hn.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), hidden
    out = out.view(len(sizes), batch, -1)
    if module.batch_first:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(batch_dim)
        hidden = (hn.squeeze(1), cn.squeeze(1)) if lstm else hn.squeeze(1)
    return out, hidden


def initial_state(module: nn.RNNBase, hx, batch: int, x: Tensor, lstm: bool,
                  batched: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(h0, c0) as 3-D tensors; zeros where ``hx`` is None, like ``nn.RNNBase``."""
    stacks = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    if hx is None:
        h0 = x.new_zeros(stacks, batch, out_size)
        return h0, (x.new_zeros(stacks, batch, module.hidden_size) if lstm else None)
    h0, c0 = hx if lstm else (hx, None)
    if not batched:
        h0, c0 = h0.unsqueeze(1), (None if c0 is None else c0.unsqueeze(1))
    return h0, c0


def layers(module: nn.RNNBase, cells: list[Cell], loops: Loops, x: Tensor, sizes: list[int], h0: Tensor,
           c0: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Every layer and direction over rows ``x``; returns output rows and the stacked final states."""
    directions = 2 if module.bidirectional else 1
    relu = module.mode == "RNN_RELU"
    hs, cs = [], []
    for layer in range(module.num_layers):
        outs = []
        for direction in range(directions):
            k = layer * directions + direction
            cell = cells[k]
            gi = gates(x, *cell.ih)
            reverse = direction == 1
            if module.mode == "GRU":
                gru = loops.paper_gru if getattr(module, "gru_form", "cudnn") == "paper" else loops.gru
                out, h = gru(gi, h0[k], sizes, reverse, *cell.hh[1:])
            elif module.mode == "LSTM":
                hr = cell.hr
                p = (None, None, None) if hr is None else hr[1:4]
                out, h, c = loops.lstm(gi, h0[k], c0[k], sizes, reverse, *cell.hh[1:], *p,
                                       hr is not None)
                cs.append(c)
            else:
                out, h = loops.rnn(gi, h0[k], sizes, reverse, relu, *cell.hh[1:])
            outs.append(out)
            hs.append(h)
        x = outs[0] if directions == 1 else torch.cat(outs, 1)
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    return x, torch.stack(hs), (torch.stack(cs) if cs else None)
