"""``accelerate``: attach the factored execution to every factored recurrent layer of a model.

An accelerated layer decides at each call whether to run the factored loop or the dense
rebuild (the converter's default: rebuild W, then cuDNN/oneDNN): ``mode="auto"`` asks the cost
model for this batch, length and device, ``"factored"`` and ``"dense"`` force one. Layers in
training mode keep the dense rebuild (training speed is that of cuDNN) unless
``training=True``. Any input the factored loop does not handle goes to the dense path, which
then computes (or rejects) it exactly as before.

    >>> model = lrc.load_model(MyModel(), "small.safetensors").eval()  # doctest: +SKIP
    >>> lrc.accelerate(model)                                          # doctest: +SKIP
    >>> out, h = model.rnn(x)                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError, TargetError
from ..nn.cells import FactoredCell
from ..nn.rnn import FactoredRNN
from ..parametrizations import factorization
from . import bptt, cuda, loops, structured
from .cost import PROFILES, Estimate, Profile, WeightShape, estimate
from .ops import Cell, Op, prepare, tracked, version
from .runner import forward, layers

MODES = ("auto", "factored", "dense")
# Multiply-adds per step below which threads="auto" runs the CPU loop on one thread.
SMALL_STEP = 2_000_000
ATTRIBUTE = "_lrc_acceleration"
DENSE_CHOSEN = "_lrc_dense_chosen"  # set by accelerate(mode="dense"): the caller chose the rebuild


def accelerate(model: nn.Module, mode: str = "auto", *, training: bool = False, cuda_graphs: bool = True,
               threads: int | str | None = "auto", profile: Profile | None = None) -> nn.Module:
    """Give every factored GRU/LSTM/RNN layer and cell of ``model`` the factored execution path. In place.

    Cells (``nn.GRUCell``/``nn.LSTMCell``/``nn.RNNCell``) run one step per call: ``auto`` picks
    the factored step or PyTorch's cell kernel on a dense weight rebuilt once per weight version;
    with autograd they keep their own forward unless ``training=True`` (see ``execution.cells``).
    Layers with Kronecker or tensor-train weights multiply by them through the structure's own
    product, never forming ``W``, in a plain-Python loop with autograd (``execution.structured``).

    ``mode``: ``"auto"`` (the cost model picks per layer and per call), ``"factored"`` or
    ``"dense"`` (the plain rebuild-then-cuDNN path, as if never accelerated). ``training=True``
    also uses the chosen path in training mode (default: dense there). ``cuda_graphs`` replays
    the factored loop as CUDA graphs on GPU. ``threads``: intra-op threads of the factored loop on
    CPU. An int sets them, None keeps PyTorch's setting, ``"auto"`` uses 1 when a step is small
    (below ``SMALL_STEP`` multiply-adds, e.g. batch 1 at n=4096, d=64), where a thread hand-off
    per op costs more than the op and on a busy machine far more. PyTorch's setting is restored
    after each call (it is process-wide: other Python threads see it meanwhile). ``profile`` replaces the device speeds of the cost
    model (see ``measure_profile``). Returns ``model``.

    >>> gru = accelerate(LowRankGRU(51, 1024, rank=64).eval())
    >>> out, h = gru(torch.zeros(50, 1, 51))
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if threads not in (None, "auto") and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive int, 'auto' or None, got {threads!r}")
    from .cells import accelerate_cells  # cells imports this module

    layers_found = [m for m in model.modules() if isinstance(m, FactoredRNN)]
    cells_found = [m for m in model.modules() if isinstance(m, FactoredCell)]
    if not layers_found and not cells_found:
        raise TargetError(f"{type(model).__name__} has no factored recurrent layer or cell to accelerate "
                          "(compress it or load a compressed file first)")
    accelerate_cells(cells_found, mode, {"training": training, "cuda_graphs": cuda_graphs, "threads": threads,
                                         "profile": profile}, ATTRIBUTE)
    for module in layers_found:
        module.__dict__.pop(DENSE_CHOSEN, None)
        if mode == "dense":
            module.__dict__.pop(ATTRIBUTE, None)
            module.__dict__[DENSE_CHOSEN] = True  # lrcompress.train.fit keeps this choice under execution="auto"
            continue
        setattr(module, ATTRIBUTE, Acceleration(mode, training=training, cuda_graphs=cuda_graphs, threads=threads,
                                                  profile=profile))
        release_dense_copies(module)
    return model


def acceleration(module: nn.Module) -> "Acceleration | None":
    """The acceleration attached to a layer by ``accelerate``, or None."""
    return module.__dict__.get(ATTRIBUTE)


@dataclass
class LayerPlan:
    """What ``auto`` picks for one layer at a given batch, length and device."""

    name: str
    shapes: list[WeightShape]
    estimate: Estimate

    @property
    def choice(self) -> str:
        return self.estimate.choice


def plan(model: nn.Module, *, batch: int, steps: int, device: str = "cpu", graphs: bool = True,
         profile: Profile | None = None, training: bool = False) -> list[LayerPlan]:
    """The cost model's estimate and choice for every factored recurrent layer and cell of ``model``
    (for a cell, ``steps`` calls); ``training``: for a training step (forward and backward) of
    each layer (cells are estimated for inference)."""
    from .cells import cell_plan  # cells imports this module

    out = []
    for name, module in model.named_modules():
        if isinstance(module, FactoredRNN):
            with torch.no_grad():
                cells = prepare_all(module)
            out.append(LayerPlan(name, weight_shapes(cells),
                                 estimate_module(module, cells, batch, steps, device, graphs and not training, profile,
                                                 training=training)))
        elif isinstance(module, FactoredCell) and (planned := cell_plan(module, batch, steps, device, profile)):
            out.append(LayerPlan(name, *planned))
    return out


class Acceleration:
    """A layer's execution choice, its prepared weights (per weight version) and CUDA graphs."""

    def __init__(self, mode: str = "auto", *, training: bool = False, cuda_graphs: bool = True,
                 threads: int | str | None = "auto", profile: Profile | None = None):
        self.mode, self.training, self.cuda_graphs, self.profile = mode, training, cuda_graphs, profile
        self.threads = threads
        self._cells: list[Cell] | None = None
        self._macs = 0  # step_macs of _cells
        self._version: tuple | None = None
        self._choices: dict[tuple, Estimate | None] = {}
        self._graphs = cuda.Graphs()
        # What the last call ran: "factored" or "dense", and the cost model's estimate (None when
        # the mode forced the path). Training loops log it.
        self.last: tuple[str, Estimate | None] | None = None

    def __repr__(self) -> str:
        return f"Acceleration(mode={self.mode!r}, training={self.training}, cuda_graphs={self.cuda_graphs})"

    def settings(self) -> dict:
        return {"training": self.training, "cuda_graphs": self.cuda_graphs, "threads": self.threads,
                "profile": self.profile}

    def __getstate__(self) -> dict:  # caches hold CUDA graphs, which neither copy nor pickle
        return {"mode": self.mode, **self.settings()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __deepcopy__(self, memo) -> "Acceleration":
        return Acceleration(self.mode, **self.settings())

    def run(self, module: nn.RNNBase, input, hx, keep: list[Tensor] | None = None):
        """The factored ``module(input, hx)``, or None when the dense path should run instead.

        ``keep``: per layer and direction (in ``_flat_weights_names`` order), a column scale of
        the recurrent matrix, ``W diag(keep)`` (Gal's recurrent dropout with one mask per call,
        ``models.run_with_recurrent_dropout``): applied to the factors, ``L (R diag(keep)) +
        diag(D keep)``, never forming ``W``."""
        if self.mode == "dense":
            return None
        if module.training and not self.training:
            self.forget()
            return None
        if not supported(module, input, hx):
            self.last = ("dense", None)
            return None
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        grad = torch.is_grad_enabled() and (_requires_grad(input, hx) or any(
            p.requires_grad for p in module.parameters()))
        if grad:
            # The optimizer step that may follow a trainable call can leave the version counters
            # alone (fused Adam/SGD kernels do not bump them): rebuild from the weights next time.
            self.forget()
        cells = prepare_all(module) if grad else self.cells(module)
        if keep is not None:
            cells = [scale_columns(cell, k) for cell, k in zip(cells, keep)]
        # Kronecker/TT weights: the plain loop multiplies by them (execution.structured) and
        # autograd runs through it; neither TorchScript, bptt nor graph capture take them.
        plain = structured.uses_structured(cells)
        use_graph = (self.cuda_graphs and not grad and not packed and not module.training and not plain
                     and cuda.usable(x))
        if self.mode == "auto" and plain and grad:
            # Kronecker/TT layers have no written-out backward: autograd through their step loop
            # records dozens of small ops per step (measured 139 s against 2.4 s for the rebuild
            # on a psMNIST TT-GRU update), so training keeps the rebuild unless forced.
            self.last = ("dense", None)
            return None
        if self.mode == "auto":
            batch, steps = _batch_steps(module, input)
            key = (batch, steps, x.device.type, use_graph, x.dtype, grad)
            if key not in self._choices:
                if len(self._choices) > 1024:  # streaming with ever new chunk lengths: stay bounded
                    self._choices.clear()
                self._choices[key] = estimate_module(module, cells, batch, steps, x.device.type, use_graph,
                                                     self.profile, x.element_size(), training=grad)
            self.last = (self._choices[key].choice, self._choices[key])
            if self._choices[key].choice == "dense":
                return None
        else:
            self.last = ("factored", None)
        release_dense_copies(module)
        recur = self._graph_recurrence(module, cells) if use_graph else None
        # With autograd, each layer and direction is one autograd function whose backward runs
        # through the factors (bptt); without, the plain step loops.
        if x.is_cuda or recur is not None:  # graph capture needs the plain loop (no TorchScript fusers)
            return forward(module, input, hx, cells, loops.PLAIN if plain or not grad else bptt.LOOPS, recur)
        previous, threads = torch.get_num_threads(), self.threads
        if threads == "auto":
            macs = self._macs if cells is self._cells else step_macs(cells)
            threads = 1 if _batch_steps(module, input)[0] * macs < SMALL_STEP else None
        if threads and threads != previous:
            torch.set_num_threads(threads)
        try:
            return forward(module, input, hx, cells,
                           loops.PLAIN if plain else (bptt.LOOPS if grad else loops.scripted()))
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    def forget(self) -> None:
        """Drop the prepared weights and graphs: the next call prepares them from the module's
        current weights. Done on every trainable call; call it (or ``accelerate`` again) after
        changing weights through ``.data``, which no version counter records."""
        if self._cells is not None:
            self._cells, self._version = None, None
            self._graphs.clear()

    def cells(self, module: nn.RNNBase) -> list[Cell]:
        """Prepared weights, rebuilt only when a weight changed since the last call."""
        key = version(module)
        if key != self._version:
            with torch.no_grad():
                self._cells = prepare_all(module)
            self._macs = step_macs(self._cells)
            self._version = key
            self._graphs.clear()  # they read the previous cells
        elif not tracked(key):
            self._refresh(module)
        return self._cells

    def _refresh(self, module: nn.Module) -> None:
        """Re-derive the prepared copies of weights whose in-place changes cannot be seen.

        Inference tensors have no version counter, and ``torch.inference_mode`` lets code change
        them in place unseen, so their copies (the transposed ``L``) are rebuilt every call: O(G m d),
        against O(T G m d) for the loop itself. The copies are written in place when allowed, so
        captured CUDA graphs stay valid; an inference tensor cannot be written outside inference
        mode, and then the cells are replaced instead.
        """
        with torch.no_grad():
            fresh = prepare_all(module)
        pairs = [(old, new) for old, new in zip(_tensors(self._cells), _tensors(fresh))
                 if old.data_ptr() != new.data_ptr()]
        if any(old.is_inference() and not torch.is_inference_mode_enabled() for old, _ in pairs):
            self._cells = fresh
            self._graphs.clear()
            return
        with torch.no_grad():
            for old, new in pairs:
                old.copy_(new)

    def _graph_recurrence(self, module: nn.RNNBase, cells: list[Cell]):
        def recur(x: Tensor, sizes: list[int], h0: Tensor, c0: Tensor | None):
            def run(*t):
                return layers(module, cells, loops.PLAIN, t[0], sizes, t[1], t[2] if len(t) > 2 else None)

            inputs = (x, h0) if c0 is None else (x, h0, c0)
            key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs) + (len(sizes),)
            return self._graphs.run(key, run, inputs, keep=cells)

        return recur


def scale_columns(cell: Cell, keep: Tensor) -> Cell:
    """``cell`` with its recurrent matrix ``W`` replaced by ``W diag(keep)`` (autograd ops on the
    prepared factors: ``R^T`` rows and the diagonal are scaled, or the dense ``W^T`` rows)."""
    op = cell.hh
    if isinstance(op.dense, structured.StructuredWeight):  # W diag(keep): x is scaled before the product
        return cell._replace(hh=op._replace(dense=op.dense.scaled(keep)))
    if op.factored:
        op = op._replace(right=op.right * keep.unsqueeze(1),
                         diag=None if op.diag is None else op.diag * keep)
    else:
        op = op._replace(dense=op.dense * keep.unsqueeze(1))
    return cell._replace(hh=op)


def prepare_all(module: nn.RNNBase) -> list[Cell]:
    directions = 2 if module.bidirectional else 1
    # A layer with a Kronecker or TT weight gets its product instead of W (execution.structured).
    make = structured.prepare if structured.has_fast_weights(module) else prepare
    return [make(module, layer, d) for layer in range(module.num_layers) for d in range(directions)]


def step_macs(cells: list[Cell]) -> int:
    """Multiply-adds of one step of the factored loop, per sequence, over all layers and directions."""
    return sum(w.factored_macs() for w in weight_shapes(cells) if w.recurrent)


def weight_shapes(cells: list[Cell]) -> list[WeightShape]:
    """The cost model's view of every weight of the prepared cells."""
    shapes = []
    for cell in cells:
        for op, recurrent in ((cell.ih, False), (cell.hh, True), (cell.hr, True)):
            if op is not None:
                shapes.append(_shape(op, recurrent))
    return shapes


def _shape(op: Op, recurrent: bool) -> WeightShape:
    if isinstance(op.dense, structured.StructuredWeight):
        return op.dense.weight_shape(recurrent)
    g = op.gates
    if not op.factored:
        cols, total = op.dense.shape
        return WeightShape(g, total // g, cols, recurrent=recurrent)
    tied = op.left.dim() == 2
    rank = op.left.shape[0] if tied else op.left.shape[1]
    rows = op.left.shape[1] // g if tied else op.left.shape[2]
    return WeightShape(g, rows, op.right.shape[0], rank, tied, op.diag is not None, recurrent)


def estimate_module(module: nn.RNNBase, cells: list[Cell], batch: int, steps: int, device: str, graphs: bool,
                    profile: Profile | None = None, itemsize: int = 4, training: bool = False) -> Estimate:
    name = "cpu" if device == "cpu" else ("cuda" if graphs else "cuda-eager")
    return estimate(weight_shapes(cells), batch=batch, steps=steps, itemsize=itemsize, directions=len(cells),
                    profile=profile or PROFILES.get(name, PROFILES["cpu"]), training=training)


def _tensors(tree) -> list[Tensor]:
    """Every tensor in nested tuples (``Cell``s of ``Op``s), in a fixed order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def release_dense_copies(module: nn.RNNBase) -> None:
    """Drop the dense rebuilds ``nn.RNNBase`` keeps in ``_flat_weights``: the factored path never
    reads them and the dense path rebuilds them per call. At n=4096 they hold 200 MB per layer."""
    names = module._flat_weights_names
    if any(w is not None and factorization(module, n) is not None for w, n in zip(module._flat_weights, names)):
        module._flat_weights = [None if factorization(module, n) is not None else w
                                for w, n in zip(module._flat_weights, names)]


def supported(module: nn.RNNBase, input, hx) -> bool:
    """Whether the factored loop handles this call; anything else runs (or fails) on the dense path."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or _compiling():
        return False
    if getattr(module, "gru_form", "cudnn") not in ("cudnn", "paper"):  # the loops know eq. 7 and eq. 6
        return False
    packed = isinstance(input, PackedSequence)
    x = input.data if packed else input
    if not isinstance(x, Tensor) or x.dim() not in ((2,) if packed else (2, 3)):
        return False
    weight = next(module.parameters())
    if x.dtype != weight.dtype or x.device != weight.device or x.numel() == 0 or x.shape[-1] != module.input_size:
        return False
    if _autocast(x.device.type):
        return False
    return hx is None or _state_matches(module, input, hx, weight)


def _state_matches(module: nn.RNNBase, input, hx, weight: Tensor) -> bool:
    batch, _ = _batch_steps(module, input)
    stacks = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    batched = isinstance(input, PackedSequence) or input.dim() == 3
    expected = [(stacks, batch, out_size)]
    if module.mode == "LSTM":
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            return False
        expected.append((stacks, batch, module.hidden_size))
        states = list(hx)
    else:
        states = [hx]
    for t, shape in zip(states, expected):
        if not isinstance(t, Tensor) or t.dtype != weight.dtype or t.device != weight.device:
            return False
        if tuple(t.shape) != (shape if batched else (shape[0], shape[2])):
            return False
    return True


def _batch_steps(module: nn.RNNBase, input) -> tuple[int, int]:
    if isinstance(input, PackedSequence):
        return int(input.batch_sizes[0]), len(input.batch_sizes)
    if input.dim() == 2:
        return 1, input.shape[0]
    return (input.shape[0], input.shape[1]) if module.batch_first else (input.shape[1], input.shape[0])


def _requires_grad(input, hx) -> bool:
    x = input.data if isinstance(input, PackedSequence) else input
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    return x.requires_grad or any(isinstance(t, Tensor) and t.requires_grad for t in states)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
