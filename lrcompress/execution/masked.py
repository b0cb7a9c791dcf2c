"""The eq. 7 GRU and the LSTM backward through the factors with per-sequence recurrent dropout masks.

``execution.bptt`` takes Gal's dropout as one column mask per call (``dispatch.scale_columns``:
``W diag(keep)``). The paper's authors drew one mask per *sequence*, held over its steps, and
grouped the gates by the recurrent product they share (dl4mt-lm; ``nn.variational``): the state
of sequence ``b`` enters the gates of group ``k`` as ``h_b * m_kb``. A column scale cannot say
that, so this module runs the same recurrence as ``bptt.GRUFunction`` with the masks inside:

- forward, per step and group ``k`` (gates ``first .. first + count``): ``x_k = h * m_k``, then
  ``((x_k R_k^T) L_k^T) + x_k D_k + b_k`` (or ``x_k W_k^T + b_k`` when dense);
- backward, per step: the gate gradients as in ``bptt.gru_backward``, and
  ``dh_prev = dh z + sum_k m_k * (W_k^T dG_k + D_k dG_k)`` (the mask multiplies what returns
  through the product it entered);
- weight gradients after the loop, over all steps at once, with the masked states
  ``prev * m_k`` as the product's inputs (``bptt.weight_grads``).

The LSTM (``masked_lstm``, gates i, f, g, o, no ``proj_size``) is the same construction on
``bptt.LSTMFunction``'s recurrence: per step ``dh_prev = sum_k m_k * (W_k^T dG_k + D_k dG_k)``
(no direct term: the state reaches the next step only through the products), the cell gradient
as in ``bptt.lstm_backward``.

Only whole padded batches (every sequence all ``steps`` long, rows step-major), as
``nn.variational`` runs them. Gradients equal autograd through ``nn.variational``'s step loop
(``tests/test_masked.py``, ``tests/test_masked_lstm.py``, float64).

    >>> out, h = masked_gru(gi, h0, steps, masks, [(0, 3)], None, right, left, diag, bias)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .bptt import CHUNK, lstm_coefficients, _most_rows, first_order, _op_grads, back, back_rzn, chunks, join_grads, weight_grads
from .loops import _part, compile_or_plain, compiler, factored_gates, gates, order_of


def group_parts(gi: Tensor, groups: List[Tuple[int, int]], dense: Optional[Tensor], right: Optional[Tensor],
                left: Optional[Tensor], diag: Optional[Tensor], bias: Optional[Tensor],
                m: int) -> Tuple[List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                            Optional[Tensor]]], List[Tensor]]:
    """Each group's slice of the weights (``loops._part``) and, factored, a buffer ``(rows, d)``
    for its ``x_k R_k^T`` at every step (empty when dense)."""
    rows = gi.shape[1]
    factored = right is not None and left is not None
    parts: List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = []
    us: List[Tensor] = []
    for group in groups:
        part = _part(dense, right, left, diag, bias, group[0], group[1], m)
        parts.append(part)
        r_k = part[1]
        us.append(gi.new_empty(rows, r_k.shape[1]) if factored and r_k is not None else gi.new_empty(0))
    return parts, us


def masked_gates(h: Tensor, masks: Tensor, groups: List[Tuple[int, int]],
                 parts: List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                  Optional[Tensor]]],
                 factored: bool, us: List[Tensor], s: int, joined: Tensor) -> Tensor:
    """One step's recurrent gate terms ``(G, B, m)``: group ``k`` (gates ``first .. first +
    count``, weights ``parts[k]``) takes the masked state ``h * masks[k]``; factored, its
    ``x_k R_k^T`` is kept in ``us[k]`` at rows ``s ..`` for the weight gradients. Several groups
    are written side by side into ``joined`` (reused by every step), one is returned as it is."""
    batch = h.shape[0]
    gh = joined
    for k in range(len(groups)):
        x = h * masks[k]
        d_k, r_k, l_k, dg_k, b_k = parts[k]
        if factored and r_k is not None and l_k is not None:
            u = torch.mm(x, r_k, out=us[k].narrow(0, s, batch))
            piece = factored_gates(x, u, groups[k][1], l_k, dg_k, b_k)
        else:
            piece = gates(x, groups[k][1], d_k, None, None, None, b_k)
        if len(groups) == 1:
            gh = piece
        else:
            joined.narrow(0, groups[k][0], groups[k][1]).copy_(piece)
    return gh


def masked_gru_forward(gi: Tensor, h: Tensor, steps: int, masks: Tensor, groups: List[Tuple[int, int]],
                       dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                       diag: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                Tensor, Tensor, List[Tensor]]:
    """The eq. 7 forward with mask ``masks[k]`` ``(B, m)`` on the state entering group ``k``'s
    product. Keeps the (unmasked) state before each step, r and z, the candidate, ``W_hn x + b_hn``
    and, factored, each group's ``x_k R_k^T`` (rows, count d) or (rows, d) tied."""
    rows, m, batch = gi.shape[1], h.shape[1], h.shape[0]
    out, prev, cand, hn = gi.new_empty(rows, m), gi.new_empty(rows, m), gi.new_empty(rows, m), gi.new_empty(rows, m)
    rz = gi.new_empty(2, rows, m)
    factored = right is not None and left is not None
    parts, us = group_parts(gi, groups, dense, right, left, diag, bias, m)
    joined = gi.new_empty(3, batch, m)  # the groups' gates side by side, reused by every step
    for t in range(steps):
        s = t * batch
        g = gi.narrow(1, s, batch)
        prev.narrow(0, s, batch).copy_(h)
        gh = masked_gates(h, masks, groups, parts, factored, us, s, joined)
        step_rz = torch.add(g[:2], gh[:2], out=rz.narrow(1, s, batch)).sigmoid_()
        hn.narrow(0, s, batch).copy_(gh[2])
        n = torch.addcmul(g[2], step_rz[0], gh[2], out=cand.narrow(0, s, batch)).tanh_()
        h = torch.lerp(n, h, step_rz[1], out=out.narrow(0, s, batch))
    return out, h.clone(), prev, rz, cand, hn, us


def masked_gru_backward(gout: Tensor, dh: Tensor, prev: Tensor, rz: Tensor, cand: Tensor, hn: Tensor, steps: int,
                        masks: Tensor, groups: List[Tuple[int, int]], dense: Optional[Tensor],
                        right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                        budget: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward loop of ``masked_gru_forward``: the gate gradients ``(rows, 3, m)``, the
    gradient of ``W_hn x + b_hn`` ``(rows, m)`` and of h0 (coefficients as ``bptt.gru_backward``)."""
    rows, m = prev.shape
    batch = dh.shape[0]
    big = gout.new_empty(rows, 3, m)
    dhn = gout.new_empty(rows, m)
    parts: List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = []
    for group in groups:
        parts.append(_part(dense, right, left, diag, None, group[0], group[1], m))
    spans = order_of([batch] * steps, False)
    plan = chunks(spans, m, budget)
    scratch = gout.new_empty(_most_rows(plan), 4, m)
    zero = gout.new_zeros(batch, m)  # the direct term of back_rzn when there is no diagonal (read only)
    for i, j, lo, hi in plan:
        r, z, n = rz[0, lo:hi], rz[1, lo:hi], cand[lo:hi]
        k = scratch.narrow(0, 0, hi - lo)
        a = torch.mul(n, n, out=k[:, 2]).neg_().add_(1).mul_(1 - z)
        torch.mul(a, r, out=k[:, 3])
        torch.mul(k[:, 3], hn[lo:hi], out=k[:, 0]).mul_(1 - r)
        torch.sub(prev[lo:hi], n, out=k[:, 1]).mul_(z).mul_(1 - z)
        for q in range(i, j - 1, -1):
            s, b = spans[q]
            g = dh + gout.narrow(0, s, b)
            kk = k.narrow(0, s - lo, b)
            p = torch.mul(g.unsqueeze(1), kk[:, :3], out=big.narrow(0, s, b))
            pn = torch.mul(g, kk[:, 3], out=dhn.narrow(0, s, b))
            new = g * rz[1].narrow(0, s, b)
            for c in range(len(groups)):
                first, count = groups[c]
                d_k, r_k, l_k, dg_k, b_k = parts[c]
                if first == 0 and count == 3:  # every gate: r, z in p, the n product's gradient in pn
                    add = None if dg_k is None else (p[:, :2] * dg_k[:2].transpose(0, 1)).sum(1) + pn * dg_k[2, 0]
                    through = back_rzn(p, pn, zero if add is None else add, d_k, r_k, l_k)
                else:
                    pg = pn.unsqueeze(1) if first == 2 else p.narrow(1, first, count)
                    add = None if dg_k is None else (pg * dg_k.transpose(0, 1)).sum(1)
                    through = back(pg, d_k, r_k, l_k, add)
                new = torch.addcmul(new, through, masks[c])
            dh = new
    return big, dhn, dh


def masked_weight_grads(big: Tensor, dhn: Tensor, prev: Tensor, us: List[Tensor], steps: int, masks: Tensor,
                        groups: List[Tuple[int, int]], dense: Optional[Tensor], right: Optional[Tensor],
                        left: Optional[Tensor], diag: Optional[Tensor],
                        bias: Optional[Tensor]) -> List[Optional[Tensor]]:
    """Gradients of ``(dense, right, left, diag, bias)``: per group, ``bptt.weight_grads`` with the
    masked states as inputs, r/z and n in separate pieces (their gradients live apart), joined
    in gate order (a tied R's gradient summed)."""
    rows, m = prev.shape
    tied = left is not None and left.dim() == 2
    out: List[Optional[Tensor]] = []
    started = False
    for c in range(len(groups)):
        first, count = groups[c]
        x = prev * masks[c].repeat(steps, 1)
        u = us[c]
        d = 0 if u.numel() == 0 or tied else u.shape[1] // count
        last = first + count
        if first < 2:  # the r/z piece
            hi = min(last, 2)
            op = _part(dense, right, left, diag, bias, first, hi - first, m)
            u_piece = u if tied or u.numel() == 0 else u.narrow(1, 0, (hi - first) * d)
            grads = weight_grads(big.narrow(1, first, hi - first), x, op[0], op[1], op[2], op[3], op[4], u_piece)
            out = join_grads(out, grads, tied) if started else grads
            started = True
        if last == 3:  # the n piece
            op = _part(dense, right, left, diag, bias, 2, 1, m)
            u_piece = u if tied or u.numel() == 0 else u.narrow(1, (2 - first) * d, d)
            grads = weight_grads(dhn.unsqueeze(1), x, op[0], op[1], op[2], op[3], op[4], u_piece)
            out = join_grads(out, grads, tied) if started else grads
            started = True
    return out


def masked_lstm_forward(gi: Tensor, h: Tensor, c: Tensor, steps: int, masks: Tensor, groups: List[Tuple[int, int]],
                        dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                        diag: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                 Tensor, Tensor, Tensor,
                                                                                 List[Tensor]]:
    """The nn.LSTM forward (gates i, f, g, o) with mask ``masks[k]`` ``(B, m)`` on the state
    entering group ``k``'s product. Keeps the (unmasked) states before each step, h and c
    ``(rows, m)``, the activations ``(4, rows, m)`` (the g slot holds tanh), tanh of the new cell
    and, factored, each group's ``x_k R_k^T`` (as ``masked_gru_forward``)."""
    rows, m, batch = gi.shape[1], h.shape[1], h.shape[0]
    out, prev = gi.new_empty(rows, m), gi.new_empty(rows, m)
    cprev, tcs = gi.new_empty(rows, m), gi.new_empty(rows, m)
    act = gi.new_empty(4, rows, m)
    factored = right is not None and left is not None
    parts, us = group_parts(gi, groups, dense, right, left, diag, bias, m)
    joined = gi.new_empty(4, batch, m)  # the groups' gates side by side, reused by every step
    for t in range(steps):
        s = t * batch
        prev.narrow(0, s, batch).copy_(h)
        cprev.narrow(0, s, batch).copy_(c)
        gh = masked_gates(h, masks, groups, parts, factored, us, s, joined)
        pre = gi.narrow(1, s, batch) + gh
        a = torch.sigmoid(pre, out=act.narrow(1, s, batch))
        torch.tanh(pre[2], out=a[2])
        c = torch.addcmul(a[1] * c, a[0], a[2])
        tc = torch.tanh(c, out=tcs.narrow(0, s, batch))
        h = torch.mul(a[3], tc, out=out.narrow(0, s, batch))
    return out, h.clone(), c.clone(), prev, cprev, act, tcs, us


def masked_lstm_backward(gout: Tensor, dh: Tensor, dc: Tensor, act: Tensor, cprev: Tensor, tcs: Tensor, steps: int,
                         masks: Tensor, groups: List[Tuple[int, int]], dense: Optional[Tensor],
                         right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                         budget: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward loop of ``masked_lstm_forward``: the gate gradients ``(rows, 4, m)`` and the
    gradients of h0 and c0. Coefficients and cell recursion as ``bptt.lstm_backward``; the state
    gradient is ``dh_prev = sum_k m_k * (W_k^T dG_k + D_k dG_k)`` (an LSTM's state reaches the
    next step only through the products, each of which saw ``h * m_k``)."""
    rows, m = cprev.shape
    batch = dh.shape[0]
    big = gout.new_empty(rows, 4, m)
    parts: List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = []
    for group in groups:
        parts.append(_part(dense, right, left, diag, None, group[0], group[1], m))
    spans = order_of([batch] * steps, False)
    plan = chunks(spans, m, budget)
    scratch = gout.new_empty(_most_rows(plan), 5, m)
    for i, j, lo, hi in plan:
        k = lstm_coefficients(act, cprev, tcs, lo, hi, scratch)
        for q in range(i, j - 1, -1):
            s, b = spans[q]
            g = dh + gout.narrow(0, s, b)
            kk = k.narrow(0, s - lo, b)
            cell = torch.addcmul(dc, g, kk[:, 4])
            p = big.narrow(0, s, b)
            torch.mul(cell.unsqueeze(1), kk[:, :3], out=p[:, :3])
            torch.mul(g, kk[:, 3], out=p[:, 3])
            new = dh  # replaced by the first group's term below (groups is never empty)
            for c in range(len(groups)):
                first, count = groups[c]
                d_k, r_k, l_k, dg_k, b_k = parts[c]
                pg = p.narrow(1, first, count)
                add = None if dg_k is None else (pg * dg_k.transpose(0, 1)).sum(1)
                through = back(pg, d_k, r_k, l_k, add)
                new = through.mul_(masks[c]) if c == 0 else torch.addcmul(new, through, masks[c])
            dh = new
            dc = cell * act[1].narrow(0, s, b)
    return big, dh, dc


def masked_lstm_weight_grads(big: Tensor, prev: Tensor, us: List[Tensor], steps: int, masks: Tensor,
                             groups: List[Tuple[int, int]], dense: Optional[Tensor], right: Optional[Tensor],
                             left: Optional[Tensor], diag: Optional[Tensor],
                             bias: Optional[Tensor]) -> List[Optional[Tensor]]:
    """Gradients of ``(dense, right, left, diag, bias)``: per group, ``bptt.weight_grads`` of its
    gates with the masked states ``prev * m_k`` as inputs, joined in gate order (a tied R's
    gradient summed over the groups)."""
    m = prev.shape[1]
    tied = left is not None and left.dim() == 2
    out: List[Optional[Tensor]] = []
    for c in range(len(groups)):
        first, count = groups[c]
        x = prev * masks[c].repeat(steps, 1)
        op = _part(dense, right, left, diag, bias, first, count, m)
        grads = weight_grads(big.narrow(1, first, count), x, op[0], op[1], op[2], op[3], op[4], us[c])
        out = join_grads(out, grads, tied) if c > 0 else grads
    return out


class MaskedKernels:
    """The loops above, compiled by TorchScript or plain (as ``bptt.Kernels``)."""

    def __init__(self, script: bool):
        compile_ = compiler(script)
        self.forward = compile_(masked_gru_forward)
        self.backward = compile_(masked_gru_backward)
        self.weight_grads = compile_(masked_weight_grads)
        self.lstm_forward = compile_(masked_lstm_forward)
        self.lstm_backward = compile_(masked_lstm_backward)
        self.lstm_weight_grads = compile_(masked_lstm_weight_grads)


@functools.lru_cache(maxsize=None)
def masked_kernels(script: bool = True) -> MaskedKernels:
    """Compiled once per process; plain Python on CUDA or with ``LRCOMPRESS_JIT=0``."""
    return compile_or_plain(MaskedKernels) if script else MaskedKernels(False)


# Both remedies a user can apply: a direct run_variational caller passes backward, a
# SequenceModel (lrcompress.train.models, model.dropout_masks "dl4mt"/"per_gate") sets its attribute.
SECOND_ORDER_MASKED = ("the factored backward with per-sequence masks (lrcompress.execution.masked) is first-order: "
                       "for a second derivative (create_graph=True) set model.variational_backward = 'autograd' on "
                       "a SequenceModel, or pass run_variational(..., backward='autograd')")


class MaskedGRUFunction(torch.autograd.Function):
    """``(gi (3, rows, m), h0 (B, m), steps, masks (K, B, m), groups, dense, right, left, diag,
    bias) -> (out rows, h_n)``; ``groups[k] = (first, count)``: the gates mask ``k`` feeds. The
    masks are constants (no gradient)."""

    @staticmethod
    def forward(ctx, gi, h0, steps, masks, groups, dense, right, left, diag, bias):
        k = masked_kernels(not gi.is_cuda)
        out, hn, prev, rz, cand, hn_part, us = k.forward(gi, h0, steps, masks, groups, dense, right, left, diag, bias)
        ctx.steps, ctx.groups, ctx.count = steps, groups, len(us)
        ctx.save_for_backward(prev, rz, cand, hn_part, masks, dense, right, left, diag, bias, *us)
        return out, hn

    @staticmethod
    @first_order(SECOND_ORDER_MASKED)
    def backward(ctx, g_out, g_hn):
        prev, rz, cand, hn_part, masks, dense, right, left, diag, bias, *us = ctx.saved_tensors
        k = masked_kernels(not prev.is_cuda)
        big, dhn, dh0 = k.backward(g_out.contiguous(), g_hn.contiguous(), prev, rz, cand, hn_part, ctx.steps, masks,
                                   ctx.groups, dense, right, left, diag, CHUNK)
        grads = [None] * 5
        if any(ctx.needs_input_grad[5:]):
            grads = k.weight_grads(big, dhn, prev, list(us), ctx.steps, masks, ctx.groups, dense, right, left, diag,
                                   bias)
        return (big.transpose(0, 1), dh0, None, None, None, *_op_grads(ctx, 5, grads))


def masked_gru(gi: Tensor, h0: Tensor, steps: int, masks: Tensor, groups: List[Tuple[int, int]],
               dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
               bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """One eq. 7 GRU layer over ``steps`` whole steps of ``B = h0.shape[0]`` sequences (rows
    step-major), mask ``masks[k]`` on the state entering gates ``groups[k]``; weights as
    ``execution.ops.Op`` (``(out (steps B, m), h_n (B, m))``)."""
    return MaskedGRUFunction.apply(gi, h0, steps, masks, groups, dense, right, left, diag, bias)


class MaskedLSTMFunction(torch.autograd.Function):
    """``(gi (4, rows, m), h0 (B, m), c0 (B, m), steps, masks (K, B, m), groups, dense, right, left,
    diag, bias) -> (out rows, h_n, c_n)``; ``groups[k] = (first, count)``: the gates mask ``k``
    feeds. The masks are constants (no gradient).

    With ``c' = f c + i g``, ``h' = o tanh(c')`` and the gates' recurrent term
    ``sum_k blocks_k((h m_k) W_k^T + b_k)``: ``dc' = dc + dh o (1 - tanh^2 c')``,
    ``dpre_i = dc' g i (1 - i)``, ``dpre_f = dc' c f (1 - f)``, ``dpre_g = dc' i (1 - g^2)``,
    ``dpre_o = dh tanh(c') o (1 - o)``, ``dc = dc' f``, ``dh_prev = sum_k m_k (dG_k W_k + dG_k D_k)``.
    """

    @staticmethod
    def forward(ctx, gi, h0, c0, steps, masks, groups, dense, right, left, diag, bias):
        k = masked_kernels(not gi.is_cuda)
        out, hn, cn, prev, cprev, act, tcs, us = k.lstm_forward(gi, h0, c0, steps, masks, groups, dense, right, left,
                                                                diag, bias)
        ctx.steps, ctx.groups = steps, groups
        ctx.save_for_backward(prev, cprev, act, tcs, masks, dense, right, left, diag, bias, *us)
        return out, hn, cn

    @staticmethod
    @first_order(SECOND_ORDER_MASKED)
    def backward(ctx, g_out, g_hn, g_cn):
        prev, cprev, act, tcs, masks, dense, right, left, diag, bias, *us = ctx.saved_tensors
        k = masked_kernels(not prev.is_cuda)
        big, dh0, dc0 = k.lstm_backward(g_out.contiguous(), g_hn.contiguous(), g_cn.contiguous(), act, cprev, tcs,
                                        ctx.steps, masks, ctx.groups, dense, right, left, diag, CHUNK)
        grads = [None] * 5
        if any(ctx.needs_input_grad[6:]):
            grads = k.lstm_weight_grads(big, prev, list(us), ctx.steps, masks, ctx.groups, dense, right, left, diag,
                                        bias)
        return (big.transpose(0, 1), dh0, dc0, None, None, None, *_op_grads(ctx, 6, grads))


def masked_lstm(gi: Tensor, h0: Tensor, c0: Tensor, steps: int, masks: Tensor, groups: List[Tuple[int, int]],
                dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """One nn.LSTM layer (no ``proj_size``) over ``steps`` whole steps of ``B = h0.shape[0]``
    sequences (rows step-major), mask ``masks[k]`` on the state entering gates ``groups[k]``
    (Gal's per-gate masks: ``[(0, 1), (1, 1), (2, 1), (3, 1)]``); weights as ``execution.ops.Op``
    (``(out (steps B, m), h_n (B, m), c_n (B, m))``)."""
    return MaskedLSTMFunction.apply(gi, h0, c0, steps, masks, groups, dense, right, left, diag, bias)
