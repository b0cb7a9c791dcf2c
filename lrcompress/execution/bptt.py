"""Backpropagation through time at the cost of the factors: recurrent autograd functions.

Autograd through the step loop of ``loops`` records about a dozen small ops per step and keeps
every intermediate; the rebuilt-dense path pays ``n x n`` products per step. Here each layer and
direction is one ``torch.autograd.Function``:

- the forward runs the step loop without recording anything and keeps, per step, only what the
  backward needs (the state before the step and the gate activations: ``O(B m)`` per step, never
  an ``n x n`` intermediate);
- the backward first turns those into per-step coefficients in a few large element-wise ops (a
  GRU's gate gradients are linear in the state gradient once the forward is fixed), then runs the
  only sequential part: per step, the gate gradients and the state gradient through the
  transposed factors, ``((dG L) R)`` plus the diagonal, with small matrix products;
- every weight gradient (``L``, ``R``, ``D``, biases, a dense recurrent matrix, an LSTM
  projection) comes after the loop, as a few large matrix products over all steps and the whole
  batch at once, as cuDNN does for dense weights. The input weights' gradients follow from the
  returned gradient of the input projections, outside, by ordinary autograd.

The step loops are TorchScript functions (``kernels()``), plain Python when TorchScript is missing
or switched off (``LRCOMPRESS_JIT=0``). Layouts are those of ``ops`` and ``loops``: rows layout
(the rows of step ``t`` are ``start[t] : start[t] + sizes[t]``), gate blocks ``(G, rows, m)``.

Forms: ``nn.GRU`` (eq. 7 of the paper: ``n = tanh(W_in x + r * (W_hn h + b_hn))``), the paper's
own GRU (eq. 6: ``n = tanh(W_in x + W_hn (r * h) + b_hn)``), ``nn.LSTM`` (with ``proj_size``) and
``nn.RNN`` (tanh, relu). Derivations: the chain rule through each step, written out beside the code.

    >>> out, h = LOOPS.gru(gi, h0, [B] * T, False, None, right, left, diag, bias)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import SecondOrderError

from .loops import Loops, _part, carry, compile_or_plain, compiler, factored_gates, gates, order_of


# ----------------------------------------------------------------------------- shared pieces

def back(p: Tensor, dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
         add: Optional[Tensor]) -> Tensor:
    """``add + p W`` for gate gradients ``p`` ``(b, G, m)`` of a weight ``W`` ``(G m, n)`` (no diagonal).

    Factored, ``p W = sum_g (p_g L_g) R_g``: two thin products, never ``L R``. ``p`` may be a
    strided view of a wider buffer (its gate dimension contiguous with ``m``).
    """
    b = p.shape[0]
    if dense is not None:  # dense holds W^T, (n, G m)
        flat = p.reshape(b, -1)
        return torch.mm(flat, dense.t()) if add is None else torch.addmm(add, flat, dense.t())
    assert right is not None and left is not None
    if left.dim() == 2:  # tied: left (d, G m), right (n, d)
        v = torch.mm(p.reshape(b, -1), left.t())
    else:  # untied: left (G, d, m), right (n, G d)
        v = torch.bmm(p.transpose(0, 1), left.transpose(1, 2)).transpose(0, 1).reshape(b, -1)
    return torch.mm(v, right.t()) if add is None else torch.addmm(add, v, right.t())


def weight_grads(dg: Tensor, x: Tensor, dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                 diag: Optional[Tensor], bias: Optional[Tensor], u: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """Gradients of ``(dense, right, left, diag, bias)`` of the op ``x -> blocks(x W^T + b)``, given
    the gradients ``dg`` ``(rows, G, m)`` of its output at every step and its inputs ``x`` ``(rows, n)``:
    a few products over all steps and rows at once (``dW = dG^T x``; ``dL_g = dG_g^T (x R_g^T)``,
    ``dR_g = (dG_g L_g)^T x``; ``dD_g = sum_rows dG_g * x``; ``db = sum_rows dG``). ``u``: ``x R^T``
    when the forward kept it."""
    rows, count, m = dg.shape
    flat = dg.reshape(rows, count * m)
    g_dense: Optional[Tensor] = None
    g_right: Optional[Tensor] = None
    g_left: Optional[Tensor] = None
    g_diag: Optional[Tensor] = None
    g_bias: Optional[Tensor] = None
    if dense is not None:
        g_dense = torch.mm(x.t(), flat)
    elif right is not None and left is not None:
        if u is None or u.numel() == 0:
            u = torch.mm(x, right)
        if left.dim() == 2:  # tied
            g_left = torch.mm(u.t(), flat)
            g_right = torch.mm(x.t(), torch.mm(flat, left.t()))
        else:
            d = left.shape[1]
            per_gate = dg.transpose(0, 1)  # (G, rows, m)
            g_left = torch.bmm(u.view(rows, count, d).permute(1, 2, 0), per_gate)
            du = torch.bmm(per_gate, left.transpose(1, 2))  # (G, rows, d)
            g_right = torch.mm(x.t(), du.transpose(0, 1).reshape(rows, count * d))
    if diag is not None:
        # A block of rows at a time, so the product is summed while in cache instead of written
        # out whole (rows x G x m) and read back (einsum would make m tiny batched products).
        g_diag = dg.new_zeros(count, m)
        block = max(1, (1 << 18) // (count * m))
        for lo in range(0, rows, block):
            hi = min(rows, lo + block)
            g_diag += (dg[lo:hi] * x[lo:hi].unsqueeze(1)).sum(0)
        g_diag = g_diag.unsqueeze(1)
    if bias is not None:
        g_bias = dg.sum(0).view(bias.shape)
    return [g_dense, g_right, g_left, g_diag, g_bias]


def split_op(dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
             bias: Optional[Tensor], first: int, count: int, m: int) -> Tuple[Tuple[Optional[Tensor], Optional[Tensor],
                                                                                 Optional[Tensor], Optional[Tensor],
                                                                                 Optional[Tensor]],
                                                                           Tuple[Optional[Tensor], Optional[Tensor],
                                                                                 Optional[Tensor], Optional[Tensor],
                                                                                 Optional[Tensor]]]:
    """The first ``first`` gates of an op of ``count`` gates of ``m`` rows, and the rest, as two
    ops (dense, right, left, diag, bias) of views; a tied ``right`` is shared by both."""
    return (_part(dense, right, left, diag, bias, 0, first, m),
            _part(dense, right, left, diag, bias, first, count - first, m))


def join_grads(a: List[Optional[Tensor]], b: List[Optional[Tensor]], tied: bool) -> List[Optional[Tensor]]:
    """Gradients of a split op's two parts, as gradients of the whole op (see ``split_op``)."""
    dims = [1, 0 if tied else 1, 1 if tied else 0, 0, 0]  # dense, right, left, diag, bias
    out: List[Optional[Tensor]] = []
    for k, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            out.append(None)
        elif k == 1 and tied:
            out.append(x + y)  # one R for every gate
        else:
            out.append(torch.cat([x, y], dims[k]))
    return out


# ----------------------------------------------------------------------------- step loops

def gru_forward(gi: Tensor, h: Tensor, sizes: List[int], reverse: bool, dense: Optional[Tensor],
                right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """nn.GRU (eq. 7) over one layer and direction, keeping for the backward: the state before
    each step, r and z ``(2, rows, m)``, the candidate n, ``W_hn h + b_hn`` and, when factored,
    ``h R^T`` (the weight gradients need it; keeping it saves one large product). Each step
    writes into buffers allocated once (no per-step pieces to join at the end: at paper scale
    every ``(rows, m)`` tensor is hundreds of MB)."""
    rows, m = gi.shape[1], h.shape[1]
    out, prev, cand, hn = gi.new_empty(rows, m), gi.new_empty(rows, m), gi.new_empty(rows, m), gi.new_empty(rows, m)
    rz = gi.new_empty(2, rows, m)
    us = gi.new_empty(rows, right.shape[1]) if right is not None and left is not None else gi.new_empty(0)
    for s, b in order_of(sizes, reverse):
        hb = h if b == h.shape[0] else h[:b]
        g = gi.narrow(1, s, b)
        prev.narrow(0, s, b).copy_(hb)
        if right is not None and left is not None:
            u = torch.mm(hb, right, out=us.narrow(0, s, b))
            gh = factored_gates(hb, u, 3, left, diag, bias)
        else:
            gh = gates(hb, 3, dense, right, left, diag, bias)
        step_rz = torch.add(g[:2], gh[:2], out=rz.narrow(1, s, b)).sigmoid_()
        hn.narrow(0, s, b).copy_(gh[2])
        n = torch.addcmul(g[2], step_rz[0], gh[2], out=cand.narrow(0, s, b)).tanh_()
        new = torch.lerp(n, hb, step_rz[1], out=out.narrow(0, s, b))
        h = carry(new, h)
    return out, h.clone(), prev, rz, cand, hn, us


def gru_backward(gout: Tensor, dh: Tensor, prev: Tensor, rz: Tensor, cand: Tensor, hn: Tensor, sizes: List[int],
                 reverse: bool, dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                 diag: Optional[Tensor], budget: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The eq. 7 backward loop. Returns the gate gradients [dpre_r, dpre_z, dpre_n] ``(rows, 3, m)``
    (laid out as the input projections, so their gradient needs no copy), the gradient of
    ``W_hn h + b_hn`` ``(rows, m)`` and the gradient of h0.

    Each is the state gradient times a coefficient fixed by the forward. The coefficients
    [dpre_r, dpre_z, dpre_n, d(W_hn h), direct] per unit state gradient are computed for a chunk of
    consecutive steps at a time (``budget`` values per slot, written in place into one scratch
    buffer, so a chunk stays in cache), then the steps of the chunk run: the gradients are
    ``g_t * K_t`` and ``g_{t-1} = g_t direct_t + W_h^T [dpre_r, dpre_z, dpre_n r]_t``, ``direct``
    being what reaches the previous state other than through the low-rank product.
    """
    rows, m = prev.shape
    big = gout.new_empty(rows, 3, m)
    dhn = gout.new_empty(rows, m)
    d_r, d_z, d_n = (None, None, None) if diag is None else (diag[0, 0], diag[1, 0], diag[2, 0])
    spans = order_of(sizes, reverse)
    plan = chunks(spans, m, budget)
    scratch = gout.new_empty(_most_rows(plan), 5, m)
    for i, j, lo, hi in plan:
        r, z, n = rz[0, lo:hi], rz[1, lo:hi], cand[lo:hi]
        k = scratch.narrow(0, 0, hi - lo)
        a = torch.mul(n, n, out=k[:, 2]).neg_().add_(1).mul_(1 - z)  # dpre_n: (1 - z)(1 - n^2)
        torch.mul(a, r, out=k[:, 3])
        torch.mul(k[:, 3], hn[lo:hi], out=k[:, 0]).mul_(1 - r)
        torch.sub(prev[lo:hi], n, out=k[:, 1]).mul_(z).mul_(1 - z)
        k[:, 4].copy_(z)
        if d_r is not None and d_z is not None and d_n is not None:  # the diagonal's share of W_h^T
            k[:, 4].addcmul_(k[:, 0], d_r).addcmul_(k[:, 1], d_z).addcmul_(k[:, 3], d_n)
        for q in range(i, j - 1, -1):
            s, b = spans[q]
            g = (dh if b == dh.shape[0] else dh[:b]) + gout.narrow(0, s, b)
            kk = k.narrow(0, s - lo, b)
            p = torch.mul(g.unsqueeze(1), kk[:, :3], out=big.narrow(0, s, b))
            pn = torch.mul(g, kk[:, 3], out=dhn.narrow(0, s, b))
            dh = carry(back_rzn(p, pn, g * kk[:, 4], dense, right, left), dh)
    return big, dhn, dh


def back_rzn(p: Tensor, pn: Tensor, direct: Tensor, dense: Optional[Tensor], right: Optional[Tensor],
             left: Optional[Tensor]) -> Tensor:
    """``direct + W_h^T`` of the recurrent gate gradients: r and z in slots 0, 1 of ``p``
    ``(b, 3, m)`` and the gradient of ``W_hn h`` in ``pn`` ``(b, m)`` (``gru_backward``'s layout)."""
    b, m = p.shape[0], p.shape[2]
    rz = p[:, :2].reshape(b, 2 * m)
    if dense is not None:
        out = torch.addmm(direct, rz, dense[:, :2 * m].t())
        return torch.addmm(out, pn, dense[:, 2 * m:].t())
    assert right is not None and left is not None
    if left.dim() == 2:  # tied: left (d, 3m)
        v = torch.addmm(torch.mm(pn, left[:, 2 * m:].t()), rz, left[:, :2 * m].t())
    else:  # untied: left (3, d, m)
        v_rz = torch.bmm(p[:, :2].transpose(0, 1), left[:2].transpose(1, 2))
        v = torch.cat([v_rz[0], v_rz[1], torch.mm(pn, left[2].t())], 1)
    return torch.addmm(direct, v, right.t())


def paper_gru_forward(gi: Tensor, h: Tensor, sizes: List[int], reverse: bool, dense: Optional[Tensor],
                      right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                      bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The paper's GRU (eq. 6) over one layer and direction, keeping the state before each step,
    r and z ``(2, rows, m)`` and the candidate n (written into buffers, as ``gru_forward``)."""
    rows, m = gi.shape[1], h.shape[1]
    rz_op, n_op = split_op(dense, right, left, diag, bias, 2, 3, m)
    out, prev, cand = gi.new_empty(rows, m), gi.new_empty(rows, m), gi.new_empty(rows, m)
    rz = gi.new_empty(2, rows, m)
    for s, b in order_of(sizes, reverse):
        hb = h if b == h.shape[0] else h[:b]
        g = gi.narrow(1, s, b)
        prev.narrow(0, s, b).copy_(hb)
        step_rz = torch.sigmoid(g[:2] + gates(hb, 2, rz_op[0], rz_op[1], rz_op[2], rz_op[3], rz_op[4]),
                                out=rz.narrow(1, s, b))
        hn = gates(step_rz[0] * hb, 1, n_op[0], n_op[1], n_op[2], n_op[3], n_op[4])[0]
        n = torch.tanh(g[2] + hn, out=cand.narrow(0, s, b))
        new = torch.lerp(n, hb, step_rz[1], out=out.narrow(0, s, b))
        h = carry(new, h)
    return out, h.clone(), prev, rz, cand


def paper_gru_backward(gout: Tensor, dh: Tensor, prev: Tensor, rz: Tensor, cand: Tensor, sizes: List[int],
                       reverse: bool, dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                       diag: Optional[Tensor], budget: int) -> Tuple[Tensor, Tensor]:
    """The eq. 6 backward loop. Returns [dpre_r, dpre_z, dpre_n] ``(rows, 3, m)`` and the gradient
    of h0. Per chunk of steps (``budget`` values per slot) the coefficients [(h - n) z (1 - z),
    (1 - z)(1 - n^2), h r (1 - r)], written into one scratch buffer; per step ``dpre_z`` and
    ``dpre_n`` are the state gradient times the first two and the pass-through is it times z,
    ``q = W_hn^T dpre_n`` (+ its diagonal) is the gradient of ``r * h``, whence
    ``dpre_r = q h r (1 - r)`` and the state term ``q r`` (z and r read from the forward's buffer)."""
    rows, m = prev.shape
    rz_op, n_op = split_op(dense, right, left, diag, None, 2, 3, m)
    diag_rz, diag_n = rz_op[3], n_op[3]
    d_rz = None if diag_rz is None else diag_rz.transpose(0, 1)
    d_n = None if diag_n is None else diag_n[0]
    big = gout.new_empty(rows, 3, m)
    spans = order_of(sizes, reverse)
    plan = chunks(spans, m, budget)
    scratch = gout.new_empty(_most_rows(plan), 3, m)
    for i, j, lo, hi in plan:
        r, z, n, hp = rz[0, lo:hi], rz[1, lo:hi], cand[lo:hi], prev[lo:hi]
        k = scratch.narrow(0, 0, hi - lo)  # written in place: no per-chunk tensors to stack
        torch.sub(hp, n, out=k[:, 0]).mul_(z).mul_(1 - z)
        torch.mul(n, n, out=k[:, 1]).neg_().add_(1).mul_(1 - z)
        torch.mul(hp, r, out=k[:, 2]).mul_(1 - r)
        for q_ in range(i, j - 1, -1):
            s, b = spans[q_]
            g = (dh if b == dh.shape[0] else dh[:b]) + gout.narrow(0, s, b)
            kk = k.narrow(0, s - lo, b)
            p = big.narrow(0, s, b)
            torch.mul(g.unsqueeze(1), kk[:, :2], out=p[:, 1:])  # dpre_z, dpre_n
            dn = p[:, 2]
            q = back(p[:, 2:], n_op[0], n_op[1], n_op[2], None if d_n is None else d_n * dn)
            r_s = rz[0].narrow(0, s, b)
            torch.mul(q, kk[:, 2], out=p[:, 0])  # dpre_r
            direct = torch.addcmul(g * rz[1].narrow(0, s, b), q, r_s)
            if d_rz is not None:
                direct = direct + (p[:, :2] * d_rz).sum(1)
            dh = carry(back(p[:, :2], rz_op[0], rz_op[1], rz_op[2], direct), dh)
    return big, dh


def rnn_forward(gi: Tensor, h: Tensor, sizes: List[int], reverse: bool, relu: bool, dense: Optional[Tensor],
                right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """nn.RNN over one layer and direction, keeping the state before each step and the
    activations (a copy apart from the returned outputs, which the caller may change in place)."""
    rows, m = gi.shape[1], h.shape[1]
    out, prev, act = gi.new_empty(rows, m), gi.new_empty(rows, m), gi.new_empty(rows, m)
    for s, b in order_of(sizes, reverse):
        hb = h if b == h.shape[0] else h[:b]
        prev.narrow(0, s, b).copy_(hb)
        pre = gi[0].narrow(0, s, b) + gates(hb, 1, dense, right, left, diag, bias)[0]
        new = torch.clamp(pre, min=0.0, out=act.narrow(0, s, b)) if relu else torch.tanh(pre, out=act.narrow(0, s, b))
        out.narrow(0, s, b).copy_(new)
        h = carry(new, h)
    return out, h.clone(), prev, act


def rnn_backward(gout: Tensor, dh: Tensor, out: Tensor, relu: bool, sizes: List[int], reverse: bool,
                 dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor],
                 budget: int) -> Tuple[Tensor, Tensor]:
    """The nn.RNN backward loop: dpre = state gradient times the activation's slope (from the
    outputs, per chunk of steps). Returns dpre ``(rows, 1, m)`` and the gradient of h0."""
    rows, m = out.shape
    big = gout.new_empty(rows, 1, m)
    spans = order_of(sizes, reverse)
    for i, j, lo, hi in chunks(spans, m, budget):
        o = out[lo:hi]
        k = (o > 0).to(o.dtype) if relu else 1 - o * o
        for q in range(i, j - 1, -1):
            s, b = spans[q]
            g = (dh if b == dh.shape[0] else dh[:b]) + gout.narrow(0, s, b)
            p = torch.mul(g, k.narrow(0, s - lo, b), out=big.narrow(0, s, b)[:, 0]).unsqueeze(1)
            dh = carry(back(p, dense, right, left, None if diag is None else p[:, 0] * diag[0]), dh)
    return big, dh


def lstm_forward(gi: Tensor, h: Tensor, c: Tensor, sizes: List[int], reverse: bool, dense: Optional[Tensor],
                 right: Optional[Tensor], left: Optional[Tensor], diag: Optional[Tensor], bias: Optional[Tensor],
                 p_dense: Optional[Tensor], p_right: Optional[Tensor], p_left: Optional[Tensor],
                 projected: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """nn.LSTM over one layer and direction, keeping the states before each step, the gate
    activations ``(4, rows, m)`` (i, f, o sigmoid; the g slot holds tanh) and tanh of the new cell."""
    rows, m, width = gi.shape[1], c.shape[1], h.shape[1]
    out, prev = gi.new_empty(rows, width), gi.new_empty(rows, width)
    cprev, tcs = gi.new_empty(rows, m), gi.new_empty(rows, m)
    act = gi.new_empty(4, rows, m)
    for s, b in order_of(sizes, reverse):
        hb = h if b == h.shape[0] else h[:b]
        cb = c if b == c.shape[0] else c[:b]
        prev.narrow(0, s, b).copy_(hb)
        cprev.narrow(0, s, b).copy_(cb)
        pre = gi.narrow(1, s, b) + gates(hb, 4, dense, right, left, diag, bias)
        a = torch.sigmoid(pre, out=act.narrow(1, s, b))
        torch.tanh(pre[2], out=a[2])
        cell = torch.addcmul(a[1] * cb, a[0], a[2])
        tc = torch.tanh(cell, out=tcs.narrow(0, s, b))
        if projected:
            new = out.narrow(0, s, b).copy_(gates(a[3] * tc, 1, p_dense, p_right, p_left, None, None)[0])
        else:
            new = torch.mul(a[3], tc, out=out.narrow(0, s, b))
        h = carry(new, h)
        c = carry(cell, c)
    return out, h.clone(), c, prev, cprev, act, tcs


def lstm_coefficients(act: Tensor, cprev: Tensor, tcs: Tensor, lo: int, hi: int, scratch: Tensor) -> Tensor:
    """The LSTM backward's per-step coefficients for rows ``lo .. hi``, written in place into
    ``scratch[:hi - lo]`` (no per-chunk tensors to stack) and returned ``(hi - lo, 5, m)``:
    ``[g i(1-i), c f(1-f), i(1-g^2), tanh(c') o(1-o), o(1-tanh^2 c')]`` from the gate
    activations ``act`` ``(4, rows, m)`` (i, f, g, o), the previous cells and ``tanh`` of the new ones."""
    a = act[:, lo:hi]
    ig, fg, gg, og = a[0], a[1], a[2], a[3]
    tc = tcs[lo:hi]
    k = scratch.narrow(0, 0, hi - lo)
    torch.mul(gg, ig, out=k[:, 0]).mul_(1 - ig)
    torch.mul(cprev[lo:hi], fg, out=k[:, 1]).mul_(1 - fg)
    torch.mul(gg, gg, out=k[:, 2]).neg_().add_(1).mul_(ig)
    torch.mul(tc, og, out=k[:, 3]).mul_(1 - og)
    torch.mul(tc, tc, out=k[:, 4]).neg_().add_(1).mul_(og)
    return k


def lstm_backward(gout: Tensor, dh: Tensor, dc: Tensor, act: Tensor, cprev: Tensor, tcs: Tensor, sizes: List[int],
                  reverse: bool, dense: Optional[Tensor], right: Optional[Tensor], left: Optional[Tensor],
                  diag: Optional[Tensor], p_dense: Optional[Tensor], p_right: Optional[Tensor],
                  p_left: Optional[Tensor], projected: bool, budget: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The nn.LSTM backward loop. Per chunk of steps the coefficients [g i(1-i), c_prev f(1-f),
    i (1-g^2), tanh(c) o(1-o), o (1 - tanh(c)^2)], written into one scratch buffer; per step ``dc' = dc + dh o (1 - tanh^2 c')``,
    ``dpre_{i,f,g} = dc' * ...``, ``dpre_o = dh * ...``, ``dc = dc' f``. Returns dpre
    ``(rows, 4, m)``, the gradients of the projected outputs ``(rows, p)`` (empty when not
    projected), of h0 and of c0."""
    rows, m = cprev.shape
    big = gout.new_empty(rows, 4, m)
    outs = gout.new_empty(rows, gout.shape[1]) if projected else gout.new_empty(0)
    d4 = None if diag is None else diag.transpose(0, 1)
    spans = order_of(sizes, reverse)
    plan = chunks(spans, m, budget)
    scratch = gout.new_empty(_most_rows(plan), 5, m)
    for i, j, lo, hi in plan:
        k = lstm_coefficients(act, cprev, tcs, lo, hi, scratch)
        for q in range(i, j - 1, -1):
            s, b = spans[q]
            g = (dh if b == dh.shape[0] else dh[:b]) + gout.narrow(0, s, b)
            if projected:
                outs.narrow(0, s, b).copy_(g)
                g = back(g.unsqueeze(1), p_dense, p_right, p_left, None)
            kk = k.narrow(0, s - lo, b)
            cell = torch.addcmul(dc if b == dc.shape[0] else dc[:b], g, kk[:, 4])
            p = big.narrow(0, s, b)
            torch.mul(cell.unsqueeze(1), kk[:, :3], out=p[:, :3])
            torch.mul(g, kk[:, 3], out=p[:, 3])
            dh = carry(back(p, dense, right, left, None if d4 is None else (p * d4).sum(1)), dh)
            dc = carry(cell * act[1].narrow(0, s, b), dc)
    return big, outs, dh, dc


def chunks(spans: List[Tuple[int, int]], m: int, budget: int) -> List[Tuple[int, int, int, int]]:
    """The backward's chunks, last processed step first: ``(i, j, lo, hi)`` covers processing
    steps ``i`` down to ``j``, rows ``lo:hi``, with at most ``budget`` values per coefficient slot
    (at least one step). Coefficients computed a chunk at a time stay in cache."""
    out: List[Tuple[int, int, int, int]] = []
    i = len(spans) - 1
    while i >= 0:
        j, total = i, spans[i][1]
        while j > 0 and (total + spans[j - 1][1]) * m <= budget:
            j -= 1
            total += spans[j][1]
        lo = min(spans[i][0], spans[j][0])
        hi = max(spans[i][0] + spans[i][1], spans[j][0] + spans[j][1])
        out.append((i, j, lo, hi))
        i = j - 1
    return out


def _most_rows(plan: List[Tuple[int, int, int, int]]) -> int:
    """The most rows any chunk of ``plan`` covers (the size of the coefficient scratch buffer)."""
    most = 0
    for i, j, lo, hi in plan:
        most = max(most, hi - lo)
    return most


class Kernels:
    """The step loops, compiled by TorchScript or plain."""

    def __init__(self, script: bool):
        compile_ = compiler(script)
        self.gru_forward = compile_(gru_forward)
        self.gru_backward = compile_(gru_backward)
        self.paper_gru_forward = compile_(paper_gru_forward)
        self.paper_gru_backward = compile_(paper_gru_backward)
        self.rnn_forward = compile_(rnn_forward)
        self.rnn_backward = compile_(rnn_backward)
        self.lstm_forward = compile_(lstm_forward)
        self.lstm_backward = compile_(lstm_backward)
        self.weight_grads = compile_(weight_grads)


@functools.lru_cache(maxsize=None)
def kernels(script: bool = True) -> Kernels:
    """The step loops compiled by TorchScript once per process (``script=False`` or
    ``LRCOMPRESS_JIT=0``: plain Python, as on CUDA, where graph capture wants no fusers)."""
    return compile_or_plain(Kernels) if script else Kernels(False)


# ----------------------------------------------------------------------------- autograd functions

SECOND_ORDER = ("the factored training path (lrcompress.execution.bptt) has a first-order backward: for a "
                "second derivative (create_graph=True) use accelerate(model, mode='dense') or "
                "[train] execution = 'dense', under per-sequence dropout masks a SequenceModel's "
                "variational_backward = 'autograd' (the paper-form PaperGRU has no dense kernel: first-order only)")


def first_order(message: str):
    """Decorate an autograd backward that is first-order only: when autograd asks for a graph of
    the gradients (``create_graph=True``, so grad mode is on inside the backward) it raises
    ``SecondOrderError(message)``, instead of returning gradients whose own derivatives would
    be silently missing (``once_differentiable`` leaves them to a later call that may never
    come); otherwise it runs the backward without recording."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise SecondOrderError(message)
            return backward(ctx, *grads)

        return wrapper

    return decorate


def _kernels_for(t: Tensor) -> Kernels:
    return kernels(not t.is_cuda)


def _op_grads(ctx, first: int, grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``grads`` of an op whose tensors are inputs ``first ..`` of the function, None where unneeded."""
    return [g if ctx.needs_input_grad[first + i] else None for i, g in enumerate(grads)]


# Values per coefficient slot in one chunk of the GRU backward (~1 MB in float32): small steps
# share a chunk, a paper-scale step (B n ~ 200k) is a chunk of its own.
CHUNK = 1 << 18


class GRUFunction(torch.autograd.Function):
    """One nn.GRU (eq. 7) layer and direction: ``(gi, h0, sizes, reverse, dense, right, left, diag,
    bias) -> (out rows, h_n)``, backward through the factors.

    With ``h' = (1 - z) n + z h``, ``n = tanh(gi_n + r * a_n)``, ``a_n = W_hn h + b_hn`` and r, z
    sigmoids: ``dpre_n = dh (1 - z)(1 - n^2)``, ``dpre_r = dpre_n a_n r (1 - r)``,
    ``dpre_z = dh (h - n) z (1 - z)``, the gradient of ``a_n`` is ``dpre_n r``, and
    ``dh_prev = dh z + W_h^T [dpre_r, dpre_z, dpre_n r]``.
    """

    @staticmethod
    def forward(ctx, gi, h0, sizes, reverse, dense, right, left, diag, bias):
        k = _kernels_for(gi)
        out, hn, prev, rz, cand, hn_part, u = k.gru_forward(gi, h0, sizes, reverse, dense, right, left, diag, bias)
        ctx.sizes, ctx.reverse = sizes, reverse
        ctx.save_for_backward(prev, rz, cand, hn_part, u, dense, right, left, diag, bias)
        return out, hn

    @staticmethod
    @first_order(SECOND_ORDER)
    def backward(ctx, g_out, g_hn):
        prev, rz, cand, hn_part, u, dense, right, left, diag, bias = ctx.saved_tensors
        k = _kernels_for(prev)
        p, pn, dh0 = k.gru_backward(g_out.contiguous(), g_hn.contiguous(), prev, rz, cand, hn_part, ctx.sizes,
                                    ctx.reverse, dense, right, left, diag, CHUNK)
        grads = [None] * 5
        if any(ctx.needs_input_grad[4:]):
            m = prev.shape[1]
            rz_op, n_op = split_op(dense, right, left, diag, bias, 2, 3, m)
            tied = left is not None and left.dim() == 2
            u_rz = u_n = u
            if u.numel() and not tied:
                d = u.shape[1] // 3
                u_rz, u_n = u[:, :2 * d], u[:, 2 * d:]
            grads = join_grads(k.weight_grads(p[:, :2], prev, *rz_op, u_rz),
                               k.weight_grads(pn.unsqueeze(1), prev, *n_op, u_n), tied)
        return (p.transpose(0, 1), dh0, None, None, *_op_grads(ctx, 4, grads))


class PaperGRUFunction(torch.autograd.Function):
    """One paper-form GRU (eq. 6) layer and direction; same arguments as ``GRUFunction``."""

    @staticmethod
    def forward(ctx, gi, h0, sizes, reverse, dense, right, left, diag, bias):
        k = _kernels_for(gi)
        out, hn, prev, rz, cand = k.paper_gru_forward(gi, h0, sizes, reverse, dense, right, left, diag, bias)
        ctx.sizes, ctx.reverse = sizes, reverse
        ctx.save_for_backward(prev, rz, cand, dense, right, left, diag, bias)
        return out, hn

    @staticmethod
    @first_order(SECOND_ORDER)
    def backward(ctx, g_out, g_hn):
        prev, rz, cand, dense, right, left, diag, bias = ctx.saved_tensors
        k = _kernels_for(prev)
        p, dh0 = k.paper_gru_backward(g_out.contiguous(), g_hn.contiguous(), prev, rz, cand, ctx.sizes, ctx.reverse,
                                      dense, right, left, diag, CHUNK)
        grads = [None] * 5
        if any(ctx.needs_input_grad[4:]):
            rz_op, n_op = split_op(dense, right, left, diag, bias, 2, 3, prev.shape[1])
            a = k.weight_grads(p[:, :2], prev, *rz_op)
            b = k.weight_grads(p[:, 2:], rz[0] * prev, *n_op)  # W_hn multiplies r * h
            grads = join_grads(a, b, left is not None and left.dim() == 2)
        return (p.transpose(0, 1), dh0, None, None, *_op_grads(ctx, 4, grads))


class RNNFunction(torch.autograd.Function):
    """One nn.RNN layer and direction: ``(gi, h0, sizes, reverse, relu, dense, right, left, diag,
    bias) -> (out rows, h_n)``."""

    @staticmethod
    def forward(ctx, gi, h0, sizes, reverse, relu, dense, right, left, diag, bias):
        k = _kernels_for(gi)
        out, hn, prev, act = k.rnn_forward(gi, h0, sizes, reverse, relu, dense, right, left, diag, bias)
        ctx.sizes, ctx.reverse, ctx.relu = sizes, reverse, relu
        ctx.save_for_backward(act, prev, dense, right, left, diag, bias)
        return out, hn

    @staticmethod
    @first_order(SECOND_ORDER)
    def backward(ctx, g_out, g_hn):
        out, prev, dense, right, left, diag, bias = ctx.saved_tensors
        k = _kernels_for(out)
        p, dh0 = k.rnn_backward(g_out.contiguous(), g_hn.contiguous(), out, ctx.relu, ctx.sizes, ctx.reverse, dense,
                                right, left, diag, CHUNK)
        grads = k.weight_grads(p, prev, dense, right, left, diag, bias) \
            if any(ctx.needs_input_grad[5:]) else [None] * 5
        return (p.transpose(0, 1), dh0, None, None, None, *_op_grads(ctx, 5, grads))


class LSTMFunction(torch.autograd.Function):
    """One nn.LSTM layer and direction: ``(gi, h0, c0, sizes, reverse, dense, right, left, diag, bias,
    p_dense, p_right, p_left, projected) -> (out rows, h_n, c_n)``.

    With ``c' = f c + i g`` and ``h = o tanh(c')`` (then ``W_hr h`` when projected):
    ``dc' = dc + dh o (1 - tanh^2 c')``, ``dpre_i = dc' g i (1 - i)``, ``dpre_f = dc' c f (1 - f)``,
    ``dpre_g = dc' i (1 - g^2)``, ``dpre_o = dh tanh(c') o (1 - o)``, ``dc = dc' f``.
    """

    @staticmethod
    def forward(ctx, gi, h0, c0, sizes, reverse, dense, right, left, diag, bias, p_dense, p_right, p_left, projected):
        k = _kernels_for(gi)
        out, hn, cn, prev, cprev, act, tc = k.lstm_forward(gi, h0, c0, sizes, reverse, dense, right, left, diag,
                                                           bias, p_dense, p_right, p_left, projected)
        ctx.sizes, ctx.reverse, ctx.projected = sizes, reverse, projected
        ctx.save_for_backward(prev, cprev, act, tc, dense, right, left, diag, bias, p_dense, p_right, p_left)
        return out, hn, cn

    @staticmethod
    @first_order(SECOND_ORDER)
    def backward(ctx, g_out, g_hn, g_cn):
        prev, cprev, act, tc, dense, right, left, diag, bias, p_dense, p_right, p_left = ctx.saved_tensors
        k = _kernels_for(prev)
        p, d_out, dh0, dc0 = k.lstm_backward(g_out.contiguous(), g_hn.contiguous(), g_cn.contiguous(), act, cprev, tc,
                                             ctx.sizes, ctx.reverse, dense, right, left, diag, p_dense, p_right,
                                             p_left, ctx.projected, CHUNK)
        grads = k.weight_grads(p, prev, dense, right, left, diag, bias) \
            if any(ctx.needs_input_grad[5:10]) else [None] * 5
        p_grads: List[Optional[Tensor]] = [None] * 3
        if ctx.projected and any(ctx.needs_input_grad[10:13]):
            p_grads = k.weight_grads(d_out.unsqueeze(1), act[3] * tc, p_dense, p_right, p_left, None, None)[:3]
        return (p.transpose(0, 1), dh0, dc0, None, None, *_op_grads(ctx, 5, grads), *_op_grads(ctx, 10, p_grads),
                None)


def gru_layer(gi, h, sizes, reverse, dense, right, left, diag, bias):
    """``loops.gru_layer`` with the factored backward."""
    return GRUFunction.apply(gi, h, sizes, reverse, dense, right, left, diag, bias)


def paper_gru_layer(gi, h, sizes, reverse, dense, right, left, diag, bias):
    """``loops.paper_gru_layer`` with the factored backward."""
    return PaperGRUFunction.apply(gi, h, sizes, reverse, dense, right, left, diag, bias)


def lstm_layer(gi, h, c, sizes, reverse, dense, right, left, diag, bias, p_dense, p_right, p_left, projected):
    """``loops.lstm_layer`` with the factored backward."""
    return LSTMFunction.apply(gi, h, c, sizes, reverse, dense, right, left, diag, bias, p_dense, p_right, p_left,
                              projected)


def rnn_layer(gi, h, sizes, reverse, relu, dense, right, left, diag, bias):
    """``loops.rnn_layer`` with the factored backward."""
    return RNNFunction.apply(gi, h, sizes, reverse, relu, dense, right, left, diag, bias)


LOOPS = Loops(gru_layer, lstm_layer, rnn_layer, paper_gru_layer)
