"""Variational (Gal) dropout with one mask per *sequence*, held over all its time steps.

``SequenceModel``'s default scheme (``dropout_masks = "batch"``) drops whole columns of the
recurrent matrices, one mask for the whole mini-batch, so cuDNN and the factored backward still
run. The paper's authors drew masks per sequence (Gal 2015, section 4; Sennrich et al. 2016
for the GRU), which no fused kernel takes: this module runs the recurrence step by step with
autograd, with the masks below (eq. 7 GRU and LSTM layers: ``execution.masked``'s written-out
backward instead, see ``run_variational``).

Schemes (``scheme``):

- ``"per_gate"`` (Gal's LSTM language model, yaringal/BayesianRNN ``LM_code``
  ``main_new_dropout_SOTA.lua``: ``noise_i``/``noise_h`` hold one mask per gate): every gate
  has its own mask on the recurrent state and its own mask on the layer input, per sequence.
- ``"dl4mt"`` (the authors' GRU language model, Avmb/dl4mt-lm ``lm/small_lm_dr.py``): one mask
  per sequence for each *product* of the state with a recurrent matrix, as that code groups
  them: a dense GRU has two (the reset and update gates share ``U``, the proposal has ``Ux``),
  an untied low-rank GRU three (one per gate), a tied one a single mask (its gates share the
  projection). The input dropout drops a whole input step: one mask per time step and
  sequence, multiplying the input projection *with its bias* of every gate.

Layers after the first take, as input, the previous layer's output with one mask per sequence
(rate ``rnn.dropout``) shared by the gates. Kept entries are scaled by ``1 / keep`` (inverted
dropout), so evaluation (no masks) needs no rescaling. Factored recurrent matrices
(``lrcompress.parametrizations.LowRank``) are applied through their factors,
``((h m) R^T) L^T + (h m) D``, never rebuilt; other parametrizations are rebuilt once per call.

    >>> gru = torch.nn.GRU(5, 8, batch_first=True)
    >>> masks = draw_masks(gru, 3, 4, scheme="dl4mt", recurrent=0.5, inputs=0.1)
    >>> out, h = run_variational(gru, torch.randn(3, 4, 5), None, masks)
    >>> out.shape, len(masks.recurrent[0])
    (torch.Size([3, 4, 8]), 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..parametrizations import factorization

SCHEMES = ("batch", "per_gate", "dl4mt")  # "batch": models.run_with_recurrent_dropout, not this module
GATES = {"GRU": 3, "LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass
class LayerMasks:
    """The masks of one layer, entries 0 or ``1 / keep``, None where nothing is dropped.

    ``groups``: the gate indices sharing each recurrent mask; ``recurrent``: one (B, n) mask per
    group. ``inputs``: (G_in, B, 1, input_size) masks on the input vector (G_in = 1: shared by
    the gates; G_in = G: one per gate), or, with ``input_kind = "projection"``, a (B, T, 1) mask
    on each step's input projection including its bias (dl4mt-lm's ``word_dropout``).
    """

    groups: tuple[tuple[int, ...], ...]
    recurrent: list[Tensor] | None
    inputs: Tensor | None
    input_kind: str = "vector"


@dataclass
class VariationalMasks:
    """One ``LayerMasks`` per layer of a recurrent stack."""

    layers: list[LayerMasks]


def check_scheme(rnn: nn.Module, scheme: str) -> None:
    """Raise ``ConfigError`` unless ``rnn`` can run the per-sequence scheme ``scheme``."""
    if scheme not in SCHEMES:
        raise ConfigError(f"dropout_masks must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")
    if scheme == "batch":
        return
    if not isinstance(rnn, nn.RNNBase) or rnn.mode not in GATES:
        raise ConfigError(f"dropout_masks = {scheme!r} is for GRU/LSTM/RNN layers, not {type(rnn).__name__}")
    if rnn.bidirectional or getattr(rnn, "proj_size", 0) or not rnn.batch_first:
        raise ConfigError(f"dropout_masks = {scheme!r} needs a unidirectional batch-first layer without "
                          f"proj_size, not {rnn}")
    if scheme == "dl4mt" and rnn.mode != "GRU":
        raise ConfigError(f"dropout_masks = 'dl4mt' is the authors' GRU scheme (dl4mt-lm); use 'per_gate' "
                          f"for a {rnn.mode} layer")


def mask_groups(rnn: nn.RNNBase, layer: int, scheme: str) -> tuple[tuple[int, ...], ...]:
    """Gate indices (PyTorch order: GRU r, z, n; LSTM i, f, g, o) sharing each recurrent mask."""
    gates = GATES[rnn.mode]
    if scheme == "per_gate" or gates == 1:
        return tuple((g,) for g in range(gates))
    low_rank = factorization(rnn, f"weight_hh_l{layer}")
    if low_rank is None:  # dl4mt-lm's dense GRU: h U with U = [U_r U_u], and h Ux
        return ((0, 1), (2,))
    return ((0, 1, 2),) if low_rank.tied else ((0,), (1,), (2,))


def sequence_masks(count: int, batch: int, size: int, p: float, like: Tensor) -> Tensor | None:
    """(count, batch, size) Bernoulli(1 - p) masks scaled by 1 / (1 - p); None when p = 0."""
    if p <= 0:
        return None
    keep = 1.0 - p
    return torch.empty(count, batch, size, dtype=like.dtype, device=like.device).bernoulli_(keep) / keep


def draw_masks(rnn: nn.RNNBase, batch: int, steps: int, *, scheme: str, recurrent: float = 0.0,
               inputs: float = 0.0) -> VariationalMasks:
    """Fresh masks for one call of ``rnn`` on ``batch`` sequences of ``steps`` steps.

    ``recurrent``: rate on the state; ``inputs``: rate on the first layer's input (later layers
    use ``rnn.dropout``). Drawn in a fixed order from the default generator, so a seed fixes them.
    """
    check_scheme(rnn, scheme)
    if scheme == "batch":
        raise ConfigError("draw_masks is for the per-sequence schemes 'per_gate' and 'dl4mt'")
    like = next(rnn.parameters())  # dtype and device only: no rebuild of a parametrized weight
    layers = []
    for layer in range(rnn.num_layers):
        groups = mask_groups(rnn, layer, scheme)
        rec = sequence_masks(len(groups), batch, rnn.hidden_size, recurrent, like)
        width = rnn.input_size if layer == 0 else rnn.hidden_size
        kind = "vector"
        if layer == 0 and scheme == "dl4mt":
            kind, drop = "projection", sequence_masks(1, batch, steps, inputs, like)
            drop = None if drop is None else drop[0].unsqueeze(-1)  # (B, T, 1): one per step and sequence
        elif layer == 0:
            drop = sequence_masks(GATES[rnn.mode], batch, width, inputs, like)
        else:
            drop = sequence_masks(1, batch, width, rnn.dropout, like)
        drop = drop.unsqueeze(2) if drop is not None and kind == "vector" else drop  # (G_in, B, 1, width)
        layers.append(LayerMasks(groups, None if rec is None else list(rec), drop, kind))
    return VariationalMasks(layers)


def run_variational(rnn: nn.RNNBase, x: Tensor, hx, masks: VariationalMasks, *, backward: str = "auto"):
    """``rnn(x, hx)`` with ``masks`` applied: (output, final state).

    ``x``: (B, T, input_size), batch first; ``hx``: None, (L, B, n), or an LSTM's (h, c).
    Returns what ``rnn`` returns: (B, T, n) and (L, B, n) (LSTM: a pair). GRU layers follow
    ``rnn.gru_form`` (``"paper"``: eq. 6, reset before the product; else eq. 7, PyTorch's).

    ``backward="auto"``: an eq. 7 GRU or an LSTM layer (low-rank or dense weights, masks on
    consecutive gates) runs ``execution.masked``'s written-out backward through the factors; every
    other layer, or ``backward="autograd"``, a step loop recorded by autograd (the reference the
    tests compare with).
    """
    if backward not in ("auto", "autograd"):
        raise ConfigError(f"backward must be 'auto' or 'autograd', got {backward!r}")
    if len(masks.layers) != rnn.num_layers:
        raise ConfigError(f"masks for {len(masks.layers)} layers given to a {rnn.num_layers}-layer {rnn.mode}")
    lstm = rnn.mode == "LSTM"
    batch, n = x.shape[0], rnn.hidden_size
    if hx is None:
        zeros = x.new_zeros(rnn.num_layers, batch, n)
        hx = (zeros, zeros) if lstm else zeros
    h0, c0 = hx if lstm else (hx, None)
    finals_h, finals_c = [], []
    with parametrize.cached():  # one rebuild of any non-low-rank parametrized weight per call
        for layer, lm in enumerate(masks.layers):
            gi = _input_projection(rnn, layer, x, lm)
            if backward == "auto" and masked_backward(rnn) and _consecutive(lm.groups, GATES[rnn.mode]):
                if lstm:
                    x, h, c = _run_masked_lstm(rnn, layer, gi, h0[layer], c0[layer], lm)
                else:
                    x, h = _run_masked_gru(rnn, layer, gi, h0[layer], lm)
                    c = None
                finals_h.append(h)
                finals_c.append(c)
                continue
            recur = _Recurrence(rnn, layer, lm)
            h = h0[layer]
            c = c0[layer] if lstm else None
            outputs = []
            for t in range(x.shape[1]):
                if lstm:
                    h, c = recur.lstm_step(gi[:, t], h, c)
                elif rnn.mode == "GRU":
                    h = recur.gru_step(gi[:, t], h)
                else:
                    h = recur.rnn_step(gi[:, t], h)
                outputs.append(h)
            x = torch.stack(outputs, 1) if outputs else x.new_zeros(batch, 0, n)
            finals_h.append(h)
            finals_c.append(c)
    h_n = torch.stack(finals_h)
    return x, ((h_n, torch.stack(finals_c)) if lstm else h_n)


def masked_backward(rnn: nn.RNNBase) -> bool:
    """Whether ``run_variational`` takes ``execution.masked``'s backward for ``rnn``: eq. 7 GRU
    and LSTM (no ``proj_size``) layers whose recurrent weights are low-rank or plain (a
    Kronecker/TT weight is not)."""
    if rnn.mode == "LSTM":
        if getattr(rnn, "proj_size", 0) or rnn.bidirectional:
            return False
    elif rnn.mode != "GRU" or getattr(rnn, "gru_form", "cudnn") == "paper":
        return False
    for layer in range(rnn.num_layers):
        name = f"weight_hh_l{layer}"
        if parametrize.is_parametrized(rnn, name) and factorization(rnn, name) is None:
            return False
    return True


def _run_masked_gru(rnn: nn.RNNBase, layer: int, gi: Tensor, h0: Tensor, lm: LayerMasks) -> tuple[Tensor, Tensor]:
    """One eq. 7 GRU layer through ``execution.masked``: gi (B, T, 3n) -> (B, T, n), h_n (B, n)."""
    from ..execution import bptt, masked, ops  # execution imports nn: import here, not at the top

    batch, steps, n = gi.shape[0], gi.shape[1], rnn.hidden_size
    rows = gi.transpose(0, 1).reshape(steps * batch, 3 * n).view(steps * batch, 3, n).transpose(0, 1)
    op = ops.prepare(rnn, layer, 0).hh
    if lm.recurrent is None:  # no recurrent dropout: the plain factored backward
        out, h = bptt.LOOPS.gru(rows, h0, [batch] * steps, False, *op[1:])
    else:
        groups = [(group[0], len(group)) for group in lm.groups]
        out, h = masked.masked_gru(rows, h0, steps, torch.stack(lm.recurrent), groups, *op[1:])
    return out.view(steps, batch, n).transpose(0, 1), h


def _run_masked_lstm(rnn: nn.RNNBase, layer: int, gi: Tensor, h0: Tensor, c0: Tensor,
                     lm: LayerMasks) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer through ``execution.masked``: gi (B, T, 4n) -> (B, T, n), h_n, c_n (B, n)."""
    from ..execution import bptt, masked, ops  # execution imports nn: import here, not at the top

    batch, steps, n = gi.shape[0], gi.shape[1], rnn.hidden_size
    rows = gi.transpose(0, 1).reshape(steps * batch, 4 * n).view(steps * batch, 4, n).transpose(0, 1)
    op = ops.prepare(rnn, layer, 0).hh
    if lm.recurrent is None:  # no recurrent dropout: the plain factored backward
        out, h, c = bptt.LOOPS.lstm(rows, h0, c0, [batch] * steps, False, *op[1:], None, None, None, False)
    else:
        groups = [(group[0], len(group)) for group in lm.groups]
        out, h, c = masked.masked_lstm(rows, h0, c0, steps, torch.stack(lm.recurrent), groups, *op[1:])
    return out.view(steps, batch, n).transpose(0, 1), h, c


def _consecutive(groups: tuple[tuple[int, ...], ...], gates: int) -> bool:
    """Whether the mask groups are runs of consecutive gates covering all ``gates``, in gate order
    (what ``execution.masked`` takes as ``(first, count)``); ``draw_masks`` makes only such groups."""
    flat = [g for group in groups for g in group]
    return flat == list(range(gates)) and all(len(group) > 0 for group in groups)


def _input_projection(rnn: nn.RNNBase, layer: int, x: Tensor, lm: LayerMasks) -> Tensor:
    """(B, T, G n): the input term of every gate, masks applied (bias kept unless "projection")."""
    weight = getattr(rnn, f"weight_ih_l{layer}")
    bias = getattr(rnn, f"bias_ih_l{layer}") if rnn.bias else None
    if lm.inputs is None or lm.input_kind == "projection":
        gi = nn.functional.linear(x, weight, bias)
        return gi if lm.inputs is None else gi * lm.inputs
    if lm.inputs.shape[0] == 1:
        return nn.functional.linear(x * lm.inputs[0], weight, bias)
    gates, n = lm.inputs.shape[0], rnn.hidden_size
    blocks = [nn.functional.linear(x * lm.inputs[g], weight[g * n:(g + 1) * n],
                                   None if bias is None else bias[g * n:(g + 1) * n]) for g in range(gates)]
    return torch.cat(blocks, -1)


class _Recurrence:
    """The recurrent term of one layer, per gate, from its (masked) previous state."""

    def __init__(self, rnn: nn.RNNBase, layer: int, lm: LayerMasks):
        name = f"weight_hh_l{layer}"
        self.n, self.gates = rnn.hidden_size, GATES[rnn.mode]
        self.paper = getattr(rnn, "gru_form", "cudnn") == "paper"
        self.nonlinearity = torch.relu if rnn.mode == "RNN_RELU" else torch.tanh
        self.bias = getattr(rnn, f"bias_hh_l{layer}") if rnn.bias else None
        self.groups, self.masks = lm.groups, lm.recurrent
        self.group_of = {g: k for k, group in enumerate(lm.groups) for g in group}
        self._operators: dict[tuple[int, ...], tuple] = {}
        low_rank = factorization(rnn, name)
        if low_rank is not None:
            plist = rnn.parametrizations[name]
            self.L, self.R = plist.original0, plist.original1  # (G, n, d); (d, n) tied or (G, d, n)
            self.D = plist.original2 if low_rank.diag else None  # (G, n)
            self.W = None
        else:
            self.W = getattr(rnn, name)  # (G n, n), rebuilt once per call when parametrized

    def _operator(self, gates: tuple[int, ...]) -> tuple:
        """The stacked weights of ``gates`` (made once per call): one GEMM per group and step."""
        if gates not in self._operators:
            n, index = self.n, list(gates)
            rows = torch.cat([torch.arange(g * n, (g + 1) * n) for g in gates])
            bias = None if self.bias is None else self.bias[rows.to(self.bias.device)]
            if self.W is not None:
                op = (self.W[rows.to(self.W.device)].t(), None, None, bias)
            else:
                L = self.L[index]  # (k, n, d)
                R = self.R.t() if self.R.dim() == 2 else self.R[index].flatten(0, 1).t()  # (n, d) or (n, k d)
                D = None if self.D is None else self.D[index].flatten()
                op = (R, L, D, bias)
            self._operators[gates] = op
        return self._operators[gates]

    def term(self, h: Tensor, gates: tuple[int, ...], group: int) -> list[Tensor]:
        """``(h m) W_g^T + b_g`` for each gate g in ``gates``, all masked by mask ``group``."""
        if self.masks is not None:
            h = h * self.masks[group]
        first, L, D, bias = self._operator(gates)
        k = len(gates)
        out = h @ first  # dense: (B, k n); factored: the projection, (B, d) tied or (B, k d)
        if L is not None:
            if self.R.dim() == 2:
                out = out @ L.flatten(0, 1).t()
            else:
                out = torch.einsum("bkd,knd->bkn", out.view(h.shape[0], k, -1), L).flatten(1)
            if D is not None:
                out = out + h.repeat(1, k) * D
        if bias is not None:
            out = out + bias
        return list(out.split(self.n, -1))

    def terms(self, h: Tensor, gates: range | tuple[int, ...]) -> dict[int, Tensor]:
        """The recurrent terms of ``gates``, one product per mask group."""
        out: dict[int, Tensor] = {}
        for k, group in enumerate(self.groups):
            wanted = tuple(g for g in group if g in gates)
            if wanted:
                out.update(zip(wanted, self.term(h, wanted, k)))
        return out

    def gru_step(self, gi: Tensor, h: Tensor) -> Tensor:
        i_r, i_z, i_n = gi.chunk(3, -1)
        if not self.paper:  # eq. 7: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
            t = self.terms(h, range(3))
            r, z = torch.sigmoid(i_r + t[0]), torch.sigmoid(i_z + t[1])
            cand = torch.tanh(i_n + r * t[2])
        else:  # eq. 6: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
            t = self.terms(h, (0, 1))
            r, z = torch.sigmoid(i_r + t[0]), torch.sigmoid(i_z + t[1])
            cand = torch.tanh(i_n + self.term(r * h, (2,), self.group_of[2])[0])
        return (1 - z) * cand + z * h

    def lstm_step(self, gi: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        t = self.terms(h, range(4))
        i_i, i_f, i_g, i_o = gi.chunk(4, -1)
        c = torch.sigmoid(i_f + t[1]) * c + torch.sigmoid(i_i + t[0]) * torch.tanh(i_g + t[2])
        return torch.sigmoid(i_o + t[3]) * torch.tanh(c), c

    def rnn_step(self, gi: Tensor, h: Tensor) -> Tensor:
        return self.nonlinearity(gi + self.terms(h, (0,))[0])


# Which path a layer ran in training with per-sequence masks, dense or factored (read by the
# training engine's execution log, engine.describe_execution): neither cuDNN nor the fused
# factored kernels take one mask per sequence, so only eq. 7 GRUs and LSTMs have a fast backward
# for them (execution.masked).
FALLBACK_NOTE = ("autograd step loop (per-sequence dropout masks: no fused kernel takes one mask per "
                 "sequence for this layer kind)")
MASKED_NOTE = "factored backward with per-sequence dropout masks (execution.masked)"
AUTOGRAD_NOTE = "autograd step loop (per-sequence dropout masks; backward = 'autograd' asked)"


def run_sequence(rnn: nn.RNNBase, x: Tensor, hx, *, scheme: str, recurrent: float = 0.0, inputs: float = 0.0,
                 output: float = 0.0, backward: str = "auto"):
    """A training call with per-sequence masks: ``draw_masks``, ``run_variational`` (with
    ``backward``), then the output multiplied by one (B, 1, n) mask per sequence (rate
    ``output``), the same at every step (dl4mt-lm's ``readout_dropout``, Gal's ``noise_o``).
    Returns (output, final state)."""
    masks = draw_masks(rnn, x.shape[0], x.shape[1], scheme=scheme, recurrent=recurrent, inputs=inputs)
    note = AUTOGRAD_NOTE if backward == "autograd" else MASKED_NOTE if masked_backward(rnn) else FALLBACK_NOTE
    rnn.__dict__["_lrc_variational_note"] = note
    out, state = run_variational(rnn, x, hx, masks, backward=backward)
    keep = sequence_masks(1, x.shape[0], out.shape[-1], output, out)
    return (out if keep is None else out * keep[0].unsqueeze(1)), state
