"""Factored execution of recurrent cells (``nn.GRUCell``/``nn.LSTMCell``/``nn.RNNCell``): one step per call.

A decoder or streaming detector calls its cell once per time step, so per-call overhead is what
matters: the weights are prepared once per weight version (factors in the layouts of ``ops``,
or, when the cost model picks dense, the rebuilt dense weights), and each call is a few cheap
checks plus one TorchScript step (``h R^T``, then ``L``, plus the diagonal; never ``L R``) or
PyTorch's own fused cell kernel (``torch.gru_cell`` ...) on the cached dense weights.

    >>> cell = lrc.accelerate(LowRankGRUCell(128, 1024, rank=64).eval())  # doctest: +SKIP
    >>> with torch.inference_mode():                                      # doctest: +SKIP
    ...     h = cell(x, h)
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..targets import cell_kind
from .cost import PROFILES, Estimate, Profile, WeightShape, estimate_cell
from .dispatch import _autocast, _compiling, _shape
from .loops import gates
from .ops import Op, prepare_op

GATES = {"gru": 3, "lstm": 4, "rnn": 1}
# threads="auto": one thread when batch x recurrent multiply-adds is below this. A cell call is
# one step of ~15 small ops; on the shared 2-core benchmark machine an LSTM cell at n=2048, d=256
# (4.2M) took 2.9 ms on one thread and 25 ms on two (docs/cells.md). Layers use 2M.
SMALL_STEP = 8_000_000
STOCK = (nn.GRUCell, nn.LSTMCell, nn.RNNCell)


def gru_step(x: Tensor, h: Tensor,
             i_dense: Optional[Tensor], i_right: Optional[Tensor], i_left: Optional[Tensor],
             i_diag: Optional[Tensor], i_bias: Optional[Tensor],
             h_dense: Optional[Tensor], h_right: Optional[Tensor], h_left: Optional[Tensor],
             h_diag: Optional[Tensor], h_bias: Optional[Tensor]) -> Tensor:
    """nn.GRUCell on (B, in) and (B, h): ``n = tanh(gi_n + r * (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``."""
    gi = gates(x, 3, i_dense, i_right, i_left, i_diag, i_bias)
    gh = gates(h, 3, h_dense, h_right, h_left, h_diag, h_bias)
    rz = torch.sigmoid(gi[:2] + gh[:2])  # r and z in one op each
    return torch.lerp(torch.tanh(torch.addcmul(gi[2], rz[0], gh[2])), h, rz[1])


def lstm_step(x: Tensor, h: Tensor, c: Tensor,
              i_dense: Optional[Tensor], i_right: Optional[Tensor], i_left: Optional[Tensor],
              i_diag: Optional[Tensor], i_bias: Optional[Tensor],
              h_dense: Optional[Tensor], h_right: Optional[Tensor], h_left: Optional[Tensor],
              h_diag: Optional[Tensor], h_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """nn.LSTMCell, gates i, f, g, o: ``c' = f c + i g``, ``h' = o tanh(c')``."""
    pre = gates(x, 4, i_dense, i_right, i_left, i_diag, i_bias) + gates(h, 4, h_dense, h_right, h_left, h_diag, h_bias)
    s = torch.sigmoid(pre)  # the g slot is wasted: cheaper than three calls
    cell = torch.addcmul(s[1] * c, s[0], torch.tanh(pre[2]))
    return s[3] * torch.tanh(cell), cell


def rnn_step(x: Tensor, h: Tensor, relu: bool,
             i_dense: Optional[Tensor], i_right: Optional[Tensor], i_left: Optional[Tensor],
             i_diag: Optional[Tensor], i_bias: Optional[Tensor],
             h_dense: Optional[Tensor], h_right: Optional[Tensor], h_left: Optional[Tensor],
             h_diag: Optional[Tensor], h_bias: Optional[Tensor]) -> Tensor:
    """nn.RNNCell: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, tanh or relu."""
    pre = gates(x, 1, i_dense, i_right, i_left, i_diag, i_bias)[0] + gates(h, 1, h_dense, h_right, h_left, h_diag,
                                                                          h_bias)[0]
    return torch.relu(pre) if relu else torch.tanh(pre)


@functools.lru_cache(maxsize=None)
def scripted_steps() -> tuple:
    """(gru_step, lstm_step, rnn_step) compiled by TorchScript once per process (about half the
    per-op overhead of Python); plain Python when that fails or with ``LRCOMPRESS_JIT=0``."""
    plain = (gru_step, lstm_step, rnn_step)
    if os.environ.get("LRCOMPRESS_JIT", "1") == "0":
        return plain
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice says nothing to act on
            return tuple(torch.jit.script(f) for f in plain)
    except Exception:  # TorchScript missing, or unable to compile on this PyTorch
        return plain


@dataclass
class Prepared:
    """One weight version of a cell: its sources, factored ops and (when used) dense weights."""

    key: tuple
    sources: list[Tensor]
    ih: Op
    hh: Op
    macs: int  # multiply-adds per sample of the factored recurrent product
    args: tuple  # the ops' tensors in the order the step functions take them
    dtype: torch.dtype
    device: torch.device
    dense: Optional[tuple] = None  # (w_ih, w_hh), rebuilt on first use of the dense path


def weight_key(cell: nn.Module) -> tuple[tuple, list[Tensor]]:
    """A key that changes when any weight of ``cell`` is replaced, moved or modified in place, and
    the weights it covers.

    ``ops.version`` read without ``named_parameters`` (which alone costs 8 us, a tenth of a step
    at n=512): storage address and version counter of each parameter and factor. Moving or casting
    a weight allocates a new storage, so its address changes. Inference tensors have no version
    counter and ``torch.inference_mode`` code may change them in place unseen: then the key is new
    at every call, so the preparation is rebuilt per call (as ``Acceleration`` refreshes layers).
    """
    sources = [t for t in cell._parameters.values() if t is not None]
    plists = cell._modules.get("parametrizations")
    if plists is not None:
        for plist in plists._modules.values():
            sources.extend(t for t in plist._parameters.values() if t is not None)
    try:
        return tuple([(t.data_ptr(), t._version) for t in sources]), sources
    except RuntimeError:  # an inference tensor
        return (object(),), sources


def prepare_cell(cell: nn.Module, kind: str) -> tuple[Op, Op]:
    """The input and recurrent ``Op`` of ``cell`` (differentiable when grad is on)."""
    g = GATES[kind]
    return prepare_op(cell, "weight_ih", g, "bias_ih"), prepare_op(cell, "weight_hh", g, "bias_hh")


def cell_shapes(ih: Op, hh: Op) -> list[WeightShape]:
    """The cost model's view of a cell's weights (the input one read at every call too)."""
    return [_shape(ih, False), _shape(hh, True)]


def estimate_for(ih: Op, hh: Op, batch: int, device: str, itemsize: int = 4,
                 profile: Profile | None = None) -> Estimate:
    name = "cpu" if device == "cpu" else "cuda-eager"  # no CUDA graph for a single step
    return estimate_cell(cell_shapes(ih, hh), batch=batch, itemsize=itemsize,
                         profile=profile or PROFILES.get(name, PROFILES["cpu"]))


class CellAcceleration:
    """A cell's execution choice and its weights prepared per weight version.

    ``run`` answers None whenever the cell's own (parametrized, dense) forward should run:
    ``mode="dense"``, training mode or autograd (unless ``training``), unusual input, or when
    ``auto`` estimates dense faster *and* autograd is on (the cached dense weights carry no graph).
    Each call is on the critical path of a step loop, so ``run`` does only the checks it must.
    """

    def __init__(self, mode: str = "auto", *, training: bool = False, cuda_graphs: bool = True,
                 threads: int | str | None = "auto", profile: Profile | None = None):
        self.mode, self.training, self.cuda_graphs, self.profile = mode, training, cuda_graphs, profile
        self.threads = threads
        self._prepared: Prepared | None = None
        self._choices: dict[tuple, str] = {}
        self._kind: str | None = None  # "gru", "lstm", "rnn"; "" for a cell whose forward is its own

    def __repr__(self) -> str:
        return f"CellAcceleration(mode={self.mode!r}, training={self.training})"

    def settings(self) -> dict:
        return {"training": self.training, "cuda_graphs": self.cuda_graphs, "threads": self.threads,
                "profile": self.profile}

    def __getstate__(self) -> dict:  # the cache is rebuilt on first use
        return {"mode": self.mode, **self.settings()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __deepcopy__(self, memo) -> "CellAcceleration":
        return CellAcceleration(self.mode, **self.settings())

    def forget(self) -> None:
        """Drop the prepared weights: the next call prepares them from the cell's current ones.

        Called on every trainable call, since the optimizer step that may follow can leave the
        version counters alone (fused Adam/SGD kernels do not bump them). Call it (or
        ``accelerate`` again) after changing weights through ``.data``, which no counter records.
        """
        self._prepared = None

    def prepared(self, cell: nn.Module, kind: str) -> Prepared:
        """The cached preparation, rebuilt only when a weight changed since the last call."""
        key, sources = weight_key(cell)
        p = self._prepared
        if p is None or p.key != key:
            with torch.no_grad():
                ih, hh = prepare_cell(cell, kind)
            # As for layers, threads="auto" looks at the recurrent product only: at batch 1 even a
            # large input matvec loses more to thread hand-offs on a busy machine than it gains.
            macs = cell_shapes(ih, hh)[1].factored_macs()
            ref = sources[0]
            if p is not None and p.device != ref.device:  # choices are keyed per device
                self._choices.clear()
            p = self._prepared = Prepared(key, sources, ih, hh, macs, (*ih[1:], *hh[1:]), ref.dtype, ref.device)
        return p

    def run(self, cell: nn.RNNCellBase, input, hx):
        """``cell(input, hx)`` by the chosen path, or None when the cell's own forward should run."""
        if self.mode == "dense":
            return None
        if cell.training and not self.training:
            self.forget()
            return None
        if self._kind is None:
            self._kind = _stock_kind(cell) or ""
        kind = self._kind
        if not kind:
            return None
        p = self.prepared(cell, kind)
        if not supported(cell, kind, input, hx, p):
            return None
        grad = torch.is_grad_enabled() and (input.requires_grad or _requires_grad(hx)
                                            or any(t.requires_grad for t in p.sources))
        if grad:
            self.forget()
            if not self.training:
                return None
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        choice = self.mode
        if choice == "auto":
            choice = self._choices.get((x.shape[0], x.dtype)) or self._choose(p, x)
        if choice == "dense" and grad:
            return None
        h, c = _state(cell, kind, hx, x, batched)
        if choice == "dense":
            out = dense_step(cell, kind, x, h, c, self._dense(cell, p))
        else:
            args = p.args
            if grad:  # ops built from the parameters themselves, so that gradients reach the factors
                ih, hh = prepare_cell(cell, kind)
                args = (*ih[1:], *hh[1:])
            out = self._factored(cell, kind, x, h, c, args, p.macs)
        if batched:
            return out
        return (out[0].squeeze(0), out[1].squeeze(0)) if kind == "lstm" else out.squeeze(0)

    def _choose(self, p: Prepared, x: Tensor) -> str:
        # Keyed by batch and dtype only: the device is the weights' (checked), and a move clears them.
        if len(self._choices) > 1024:  # ever new batch sizes: stay bounded
            self._choices.clear()
        choice = estimate_for(p.ih, p.hh, x.shape[0], x.device.type, x.element_size(), self.profile).choice
        self._choices[(x.shape[0], x.dtype)] = choice
        return choice

    def _dense(self, cell: nn.Module, p: Prepared) -> tuple:
        if p.dense is None:  # rebuilt once per weight version, not per call
            with torch.no_grad():
                p.dense = (cell.weight_ih.contiguous(), cell.weight_hh.contiguous())
        return p.dense

    def _factored(self, cell, kind: str, x: Tensor, h: Tensor, c: Optional[Tensor], args: tuple, macs: int):
        cuda = x.is_cuda
        gru, lstm, rnn = (gru_step, lstm_step, rnn_step) if cuda else scripted_steps()
        previous, threads = torch.get_num_threads(), self.threads
        if threads == "auto":
            threads = 1 if x.shape[0] * macs < SMALL_STEP else None
        if threads and threads != previous and not cuda:
            torch.set_num_threads(threads)
        try:
            if kind == "gru":
                return gru(x, h, *args)
            if kind == "lstm":
                return lstm(x, h, c, *args)
            return rnn(x, h, cell.nonlinearity == "relu", *args)
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)


def dense_step(cell: nn.Module, kind: str, x: Tensor, h: Tensor, c: Optional[Tensor], dense: tuple):
    """PyTorch's own cell kernel (what nn.GRUCell etc. call) on the cached dense weights."""
    w_ih, w_hh = dense
    b_ih, b_hh = cell.bias_ih, cell.bias_hh
    if kind == "gru":
        return torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    if kind == "lstm":
        return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    step = torch.rnn_relu_cell if cell.nonlinearity == "relu" else torch.rnn_tanh_cell
    return step(x, h, w_ih, w_hh, b_ih, b_hh)


def supported(cell: nn.Module, kind: str, input, hx, p: Prepared) -> bool:
    """Whether the accelerated step handles this call; anything else runs (or fails) in the cell's forward."""
    if not isinstance(input, Tensor) or input.dtype is not p.dtype or input.device != p.device:
        return False
    dims = input.dim()
    if dims not in (1, 2) or input.shape[-1] != cell.input_size or input.numel() == 0:
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or _compiling() or _autocast(p.device.type):
        return False
    if kind == "rnn" and cell.nonlinearity not in ("tanh", "relu"):
        return False
    if hx is None:
        return True
    shape = (input.shape[0], cell.hidden_size) if dims == 2 else (cell.hidden_size,)
    if kind != "lstm":
        return isinstance(hx, Tensor) and hx.shape == shape and hx.dtype is p.dtype and hx.device == p.device
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        return False
    return all(isinstance(t, Tensor) and t.shape == shape and t.dtype is p.dtype and t.device == p.device
               for t in hx)


def cell_plan(cell: nn.Module, batch: int, steps: int, device: str,
              profile: Profile | None = None) -> tuple[list[WeightShape], Estimate] | None:
    """The cost model's shapes and estimate for ``steps`` calls of ``cell`` (None: not accelerated)."""
    kind = _stock_kind(cell)
    if kind is None:
        return None
    with torch.no_grad():
        ih, hh = prepare_cell(cell, kind)
    e = estimate_for(ih, hh, batch, device, profile=profile)
    return cell_shapes(ih, hh), Estimate(steps * e.dense, steps * e.factored)


def accelerate_cells(cells: list[nn.Module], mode: str, settings: dict, attribute: str) -> int:
    """Attach a ``CellAcceleration`` to each cell (or remove it for ``mode="dense"``); returns how
    many can run accelerated."""
    count = 0
    for cell in cells:
        if mode == "dense" or _stock_kind(cell) is None:
            cell.__dict__.pop(attribute, None)
            continue
        setattr(cell, attribute, CellAcceleration(mode, **settings))
        count += 1
    return count


def _stock_kind(cell: nn.Module) -> str | None:
    # A user subclass with its own forward computes something else: leave it to that forward.
    dense = getattr(type(cell), "_dense_class", type(cell))
    if not issubclass(dense, STOCK) or dense.forward not in (k.forward for k in STOCK):
        return None
    return cell_kind(cell)[0]


def _state(cell: nn.Module, kind: str, hx, x: Tensor, batched: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(h, c) as (B, h) tensors; zeros where ``hx`` is None, like nn.GRUCell."""
    if hx is None:
        zeros = x.new_zeros(x.shape[0], cell.hidden_size)
        return zeros, (zeros if kind == "lstm" else None)
    h, c = hx if kind == "lstm" else (hx, None)
    if not batched:
        h, c = h.unsqueeze(0), (None if c is None else c.unsqueeze(0))
    return h, c


def _requires_grad(hx) -> bool:
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    return any(isinstance(t, Tensor) and t.requires_grad for t in states)

