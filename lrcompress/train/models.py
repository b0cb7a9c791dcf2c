"""Models of the paper's experiments, built from a recipe's ``[model]`` section.

``SequenceModel``: optional one-hot/embedding of token inputs, a recurrent stack in
``model.rnn`` (``nn.GRU``/``nn.LSTM``/``nn.RNN``, or the factored ``lrcompress.nn`` layers
when ``rank`` is set, so dense models can later be given to ``lrcompress.compress``), and a
dense head on the final state (``output = "last"``) or on every step (``"sequence"``).
``HighwayClassifier``: the feed-forward highway network of appendix A.1.

``gru_form = "paper"`` selects ``PaperGRU``, the GRU of the paper's eq. 6 (reset gate applied
to the state *before* the recurrent product), run on lrcompress's step loops with a written-out
backward (``execution.bptt``): on a CPU about as fast as the fused kernel; on a GPU it runs
eagerly, step by step, far slower than cuDNN. The default ``"cudnn"`` is PyTorch's ``nn.GRU``
(eq. 7, reset after the product).

    >>> from lrcompress.train.tasks import build_task
    >>> task = build_task({"name": "addition", "length": 20})
    >>> model = build_model({"cell": "gru", "hidden_size": 32, "rank": 4, "diag": True}, task)
    >>> model(torch.zeros(2, 20, 2)).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from ..convert import factor_from_scratch
from ..errors import ConfigError
from ..nn import Highway, LowRankGRU, LowRankLSTM, LowRankRNN, ScoRNN
from ..nn.highway import ACTIVATIONS
from ..nn.rnn import _FACTORED, FactoredRNN
from ..nn.variational import SCHEMES, check_scheme, run_sequence
from .fields import check_fields, check_range
from .tasks_base import Task

MODEL_DEFAULTS: dict = {
    "cell": "gru",  # gru, lstm, rnn (tanh), scornn (lrcompress.nn.ScoRNN) or highway (feed-forward, A.1)
    "hidden_size": 128,  # state size n (highway: features per layer)
    "num_layers": 1,  # stacked recurrent layers
    "rank": 0,  # 0: dense recurrent matrices; d > 0: low-rank L R (paper eq. 4)
    "diag": False,  # low-rank plus diagonal L R + D (eq. 5)
    "tied": False,  # one R shared by the gates of a layer
    "include_input": False,  # also factor the input matrices (the paper factors recurrent ones only)
    # Another structure than low rank (lrcompress.structures; rank stays 0): "kronecker", "tt" or
    # "orthogonal", with the options of CompressionConfig below (None: not given).
    "structure": None,
    "kron_factors": None,  # kronecker: [a, b, ...] square factors, [[m1, n1], ...], or "16x16"
    "terms": None,  # kronecker: a sum of this many Kronecker products
    "tt_ranks": None,  # tt: one TT-rank, or one per bond
    "tt_shape": None,  # tt: [m1, m2, ...] modes, [[m1, n1], ...], or "4x4x4"
    "joint": None,  # tt: one train for all gates of a weight (fully tensorized RNN)
    "negatives": None,  # orthogonal and cell = "scornn": -1 entries of the scaling diagonal D
    "gru_form": "cudnn",  # "cudnn": nn.GRU, eq. 7; "paper": eq. 6 (PaperGRU; step loops, slow on GPUs)
    "update_gate_bias": None,  # total bias of the GRU update (LSTM forget) gate; None: PyTorch's init
    "embedding": 0,  # token inputs: 0 or "none" = one-hot, d > 0 = a learned d-dim embedding
    "input_dropout": 0.0,  # dropout on the model's inputs
    "dropout": 0.0,  # between layers (and inside highway layers)
    "output_dropout": None,  # before the head; None: same as dropout
    # "batch": one recurrent column mask per mini-batch (cuDNN runs); "per_gate" / "dl4mt": every
    # mask per sequence, held over time (Gal; the authors' dl4mt-lm), a step loop (nn.variational)
    "dropout_masks": "batch",
    "output_l2": 0.0,  # L2 coefficient on the head's weight matrix, added by penalty()
    "highway_layers": 5,
    "activation": "relu",  # highway proposal activation
    "transform_bias": -1.0,  # highway transform-gate bias (gate starts mostly closed)
    "batch_norm": False,  # highway: batch norm after the input matrix and each layer matrix
    "bottleneck_dropout": 0.0,  # highway with rank: dropout on the rank-d codes R x (the authors' d_1)
    # "pytorch": PyTorch's U(-1/sqrt(n), 1/sqrt(n)) (factors: random_factors' matching scale);
    # "glorot": the authors' code (glorot_init_): Glorot-uniform matrices and factors, zero biases
    "init": "pytorch",
    "learn_initial_state": False,  # a trainable initial state h0 (and c0), zeros at the start (the authors' h_0)
}
MODEL_TYPES: dict = {"update_gate_bias": (float, type(None)), "embedding": (int, str),
                     "output_dropout": (float, type(None)), "structure": (str, type(None)),
                     "kron_factors": (str, list, type(None)), "terms": (int, type(None)),
                     "tt_ranks": (int, str, list, type(None)), "tt_shape": (str, list, type(None)),
                     "joint": (bool, type(None)), "negatives": (int, type(None))}
STRUCTURE_KEYS = ("kron_factors", "terms", "tt_ranks", "tt_shape", "joint", "negatives")
MODEL_CHOICES: dict = {"cell": ("gru", "lstm", "rnn", "scornn", "highway"), "gru_form": ("cudnn", "paper"),
                       "activation": tuple(ACTIVATIONS), "init": ("pytorch", "glorot"), "dropout_masks": SCHEMES}
GATE_BLOCK = {"GRU": (1, 3), "LSTM": (1, 4)}  # (index, count) of the update / forget gate block


def check_model(spec: dict) -> dict:
    """The ``[model]`` section with defaults filled in; raises ``ConfigError`` on bad values.

    A key that may be unset (default ``None``: ``update_gate_bias``, ``output_dropout``, the
    structure options) takes the string ``"none"`` (or ``""``) for ``None``: TOML has no null,
    and ``--set model.update_gate_bias=none`` must be able to undo a recipe's value."""
    if isinstance(spec, dict):
        spec = {k: None if _means_none(k, v) else v for k, v in spec.items()}
    out = check_fields("model", spec, MODEL_DEFAULTS, types=MODEL_TYPES, choices=MODEL_CHOICES)
    if isinstance(out["embedding"], str):
        if out["embedding"] != "none":
            raise ConfigError(f"model.embedding must be 'none' or a size, got {out['embedding']!r}")
        out["embedding"] = 0
    for key in ("hidden_size", "num_layers", "highway_layers"):
        check_range("model", out, key, 1)
    for key in ("rank", "embedding", "output_l2"):
        check_range("model", out, key, 0)
    for key in ("input_dropout", "dropout", "output_dropout", "bottleneck_dropout"):
        check_range("model", out, key, 0.0, 1.0, high_open=True)
    if out["bottleneck_dropout"] and (out["cell"] != "highway" or not out["rank"]):
        raise ConfigError("model.bottleneck_dropout is for cell = 'highway' with a rank (its rank-d bottleneck)")
    check_range("model", out, "update_gate_bias", None, None)
    check_range("model", out, "transform_bias", None, None)
    if out["cell"] == "scornn":
        check_scornn(out)
    elif out["structure"] not in (None, "lowrank"):
        if out["rank"] or out["diag"] or out["tied"] or out["cell"] == "highway":
            raise ConfigError(f"model.structure = {out['structure']!r} takes no rank, diag or tied, and a recurrent "
                              "cell (its options: kron_factors, terms; tt_ranks, tt_shape, joint; negatives)")
        structure_config(out)  # the options, checked as the converter checks them
    elif any(out[k] is not None for k in STRUCTURE_KEYS):
        key = next(k for k in STRUCTURE_KEYS if out[k] is not None)
        raise ConfigError(f"model.{key} is an option of another structure: set model.structure")
    elif not out["rank"] and (out["diag"] or out["tied"] or out["include_input"]):
        raise ConfigError("model.diag, model.tied and model.include_input need model.rank > 0")
    if out["gru_form"] == "paper" and out["cell"] != "gru":
        raise ConfigError(f"model.gru_form = 'paper' is for cell = 'gru', not {out['cell']!r}")
    if out["update_gate_bias"] is not None and out["cell"] not in ("gru", "lstm"):
        raise ConfigError(f"model.update_gate_bias is for gru and lstm cells, not {out['cell']!r}")
    if out["cell"] == "highway" and (out["tied"] or out["num_layers"] != 1 or out["embedding"]):
        raise ConfigError("a highway model has no tied/num_layers/embedding settings (use highway_layers)")
    if out["batch_norm"] and out["cell"] != "highway":
        raise ConfigError("model.batch_norm is for cell = 'highway'")
    if out["dropout_masks"] != "batch" and out["cell"] not in ("gru", "lstm", "rnn"):
        raise ConfigError(f"model.dropout_masks = {out['dropout_masks']!r} is for gru, lstm and rnn cells, "
                          f"not {out['cell']!r}")
    if out["dropout_masks"] == "dl4mt" and out["cell"] != "gru":
        raise ConfigError(f"model.dropout_masks = 'dl4mt' is the authors' GRU scheme; use 'per_gate' for "
                          f"cell = {out['cell']!r}")
    for key, value in (("init", out["init"] == "glorot"), ("learn_initial_state", out["learn_initial_state"])):
        if value and out["cell"] not in ("gru", "lstm", "rnn"):
            raise ConfigError(f"model.{key} = {out[key]!r} is for gru, lstm and rnn cells, not {out['cell']!r}")
    if out["init"] == "glorot" and out["structure"] not in (None, "lowrank"):
        raise ConfigError(f"model.init = 'glorot' is for dense and low-rank layers, not structure {out['structure']!r}")
    return out


def _means_none(key: str, value) -> bool:
    return type(None) in MODEL_TYPES.get(key, ()) and isinstance(value, str) and value.strip().lower() in ("none", "")


def check_scornn(spec: dict) -> None:
    """``cell = "scornn"`` (Helfrich et al. 2018) is one ``ScoRNN`` layer: its recurrent matrix is
    already scaled Cayley orthogonal, so it takes only ``negatives`` (default ``n // 10``)."""
    taken = [k for k in ("rank", "diag", "tied", "include_input", "structure") if spec[k] not in (0, False, None)]
    taken += [k for k in STRUCTURE_KEYS if k != "negatives" and spec[k] is not None]
    if taken or spec["num_layers"] != 1:
        what = taken[0] if taken else f"num_layers = {spec['num_layers']}"
        raise ConfigError(f"model.cell = 'scornn' is one orthogonal layer: {what} does not apply "
                          "(its option: negatives)")
    n, neg = spec["hidden_size"], spec["negatives"]
    if neg is not None and not 0 <= neg <= n:
        raise ConfigError(f"model.negatives must be in 0..hidden_size = {n}, got {neg}")


def structure_config(spec: dict) -> dict:
    """``factor_from_scratch`` options of a ``[model]`` section with another structure than low rank."""
    from ..config import CompressionConfig

    options = {k: spec[k] for k in STRUCTURE_KEYS if spec[k] is not None}
    try:
        CompressionConfig(structure=spec["structure"], **options)
    except ConfigError as exc:
        raise ConfigError(f"model: {exc}") from None
    return {"structure": spec["structure"], "include_input": spec["include_input"], **options}


def build_model(spec: dict, task: Task) -> nn.Module:
    """The model of a recipe's ``[model]`` section for ``task`` (input/output sizes, output kind)."""
    spec = check_model(spec)
    sequential = getattr(task, "sequential", True)
    if spec["cell"] == "highway":
        if sequential or task.output != "last":
            raise ConfigError(f"cell = 'highway' needs flat inputs (e.g. task.layout = 'flat'), not {task!r}")
        return HighwayClassifier(task.input_size, spec["hidden_size"], task.output_size,
                                 layers=spec["highway_layers"], rank=spec["rank"] or None, diag=spec["diag"],
                                 activation=spec["activation"], transform_bias=spec["transform_bias"],
                                 batch_norm=spec["batch_norm"], input_dropout=spec["input_dropout"],
                                 dropout=spec["dropout"], output_dropout=_output_dropout(spec),
                                 output_l2=spec["output_l2"], bottleneck_dropout=spec["bottleneck_dropout"])
    if not sequential:
        raise ConfigError(f"a recurrent cell needs sequence inputs, not {task!r}")
    tokens = getattr(task, "tokens", False)
    if spec["embedding"] and not tokens:
        raise ConfigError(f"model.embedding needs a task with token inputs, not {task!r}")
    embedding = nn.Embedding(task.input_size, spec["embedding"]) if spec["embedding"] else None
    rnn = build_rnn(spec, spec["embedding"] or task.input_size)
    model = SequenceModel(rnn, task.output_size, task.output, vocab_size=task.input_size if tokens else None,
                          embedding=embedding, input_dropout=spec["input_dropout"],
                          output_dropout=_output_dropout(spec), output_l2=spec["output_l2"],
                          learn_initial_state=spec["learn_initial_state"], dropout_masks=spec["dropout_masks"])
    if spec["init"] == "glorot":  # the output matrix too: the authors' out_mat, out_bias
        glorot_linear_(model.head)
    return model


def _output_dropout(spec: dict) -> float:
    return spec["dropout"] if spec["output_dropout"] is None else spec["output_dropout"]


def build_rnn(spec: dict, input_size: int) -> nn.RNNBase:
    """The recurrent stack of a checked model spec (batch first), gate bias initialised."""
    kwargs = dict(num_layers=spec["num_layers"], batch_first=True,
                  dropout=spec["dropout"] if spec["num_layers"] > 1 else 0.0)
    cell, rank = spec["cell"], spec["rank"]
    if cell == "scornn":  # no input bias: the authors' cell has only modReLU's bias
        return ScoRNN(input_size, spec["hidden_size"], negatives=spec["negatives"], batch_first=True, bias=False)
    if cell == "gru" and spec["gru_form"] == "paper":
        dense, factored = PaperGRU, LowRankPaperGRU
    else:
        dense, factored = {"gru": (nn.GRU, LowRankGRU), "lstm": (nn.LSTM, LowRankLSTM),
                           "rnn": (nn.RNN, LowRankRNN)}[cell]
    if spec["structure"] not in (None, "lowrank"):
        rnn = dense(input_size, spec["hidden_size"], **kwargs)
        factor_from_scratch(rnn, **structure_config(spec))
    elif rank:
        rnn = factored(input_size, spec["hidden_size"], rank=rank, diag=spec["diag"], tied=spec["tied"],
                       include_input=spec["include_input"], **kwargs)
    else:
        rnn = dense(input_size, spec["hidden_size"], **kwargs)
    if spec["init"] == "glorot":
        glorot_init_(rnn)
    if spec["update_gate_bias"] is not None:
        set_update_gate_bias(rnn, spec["update_gate_bias"])
    return rnn


def glorot_bound(rows: int, cols: int) -> float:
    """Glorot and Bengio (2010) uniform bound ``sqrt(6 / (fan_in + fan_out))`` of a rows x cols matrix."""
    return (6.0 / (rows + cols)) ** 0.5


@torch.no_grad()
def glorot_init_(rnn: nn.RNNBase) -> nn.RNNBase:
    """The authors' initialisation (``models.py`` of github.com/Avmb/lowrank-gru,
    ``initialize_matrix``, ``GRU_LR``, ``GRU_LRDiag``), in place: every matrix of every gate
    ``U(-b, b)`` with ``b = sqrt(6 / (rows + cols))`` of that gate's own matrix (input matrices
    ``n x input``, dense recurrent ``n x n``, factors ``L`` ``n x d`` and ``R`` ``d x cols``),
    diagonals ``U(-0.01, 0.01)``, biases 0 (``set_update_gate_bias`` then sets the update
    gate's). For ``nn.GRU``/``nn.LSTM``/``nn.RNN`` and their low-rank versions; another
    structure raises ``ConfigError``. Returns ``rnn``.

    >>> gru = glorot_init_(torch.nn.GRU(1, 128))
    >>> float(gru.weight_hh_l0.detach().abs().max()) <= (6 / 256) ** 0.5
    True
    """
    from ..parametrizations import factorization

    gates = {"GRU": 3, "LSTM": 4}.get(rnn.mode, 1)
    for name in rnn._flat_weights_names:
        if name.startswith("bias"):
            getattr(rnn, name).zero_()
            continue
        blocks = 1 if name.startswith("weight_hr") else gates  # an LSTM's projection has no gates
        low_rank = factorization(rnn, name)
        if low_rank is not None:
            originals = rnn.parametrizations[name]
            if parametrize.is_parametrized(originals):  # weight-normalised: uniform_ would fill a throwaway copy
                raise ConfigError(f"glorot init: the factors of {name} are weight-normalised; initialise first, "
                                  "then weight_norm")
            for factor in (originals.original0, originals.original1):  # L (gates, n, d), R (gates, d, cols)
                factor.uniform_(-glorot_bound(*factor.shape[-2:]), glorot_bound(*factor.shape[-2:]))
            if low_rank.diag:
                originals.original2.uniform_(-0.01, 0.01)
        elif parametrize.is_parametrized(rnn, name):
            from .stabilisers import WeightNorm  # stabilisers is the trainer's, not the model's

            if isinstance(rnn.parametrizations[name][0], WeightNorm):
                raise ConfigError(f"glorot init: {name} is weight-normalised; initialise first, then weight_norm")
            raise ConfigError(f"glorot init: {name} has another structure than low rank")
        else:
            weight = getattr(rnn, name)
            bound = glorot_bound(weight.shape[0] // blocks, weight.shape[1])
            weight.uniform_(-bound, bound)
    return rnn


@torch.no_grad()
def glorot_linear_(linear: nn.Linear) -> nn.Linear:
    """A dense layer as the authors' output layer: weight Glorot-uniform, bias 0. In place."""
    bound = glorot_bound(*linear.weight.shape)
    linear.weight.uniform_(-bound, bound)
    if linear.bias is not None:
        linear.bias.zero_()
    return linear


def set_update_gate_bias(rnn: nn.RNNBase, value: float) -> None:
    """Make the total bias of the GRU update gate z (LSTM forget gate f) equal ``value``.

    In PyTorch's gate order (GRU r, z, n; LSTM i, f, g, o) that gate is the second block of
    ``bias_ih`` and ``bias_hh``; the first gets ``value``, the second 0. A high value keeps the
    state passing through at the start of training (paper: 4 memory/addition, 5 MNIST).
    """
    if rnn.mode not in GATE_BLOCK:
        raise ConfigError(f"update_gate_bias needs a GRU or LSTM, not {rnn.mode}")
    if not rnn.bias:
        raise ConfigError("update_gate_bias needs a recurrent layer with biases (bias=True)")
    index, count = GATE_BLOCK[rnn.mode]
    with torch.no_grad():
        for name in rnn._flat_weights_names:
            if name.startswith("bias_"):
                bias = getattr(rnn, name)
                size = bias.shape[0] // count
                bias[index * size:(index + 1) * size] = value if name.startswith("bias_ih") else 0.0


class PaperGRU(nn.GRU):
    """``nn.GRU`` whose candidate follows the paper's eq. 6: ``n = tanh(W_in x + b_in +
    W_hn (r * h) + b_hn)`` (PyTorch, eq. 7: ``r * (W_hn h + b_hn)``). Same parameters, gate
    order (r, z, n) and inputs as ``nn.GRU`` (padded or packed, batch first or not, layers,
    directions); ``h' = (1 - z) * n + z * h``. Runs on lrcompress's step loops: TorchScript
    without autograd, and with autograd one function per layer whose backward is written out
    (``execution.bptt``), so it trains at about the speed of the fused kernels.

    >>> gru = PaperGRU(3, 8, batch_first=True)
    >>> out, h = gru(torch.zeros(2, 5, 3))
    """

    gru_form = "paper"  # marks the eq. 6 form for code that runs GRUs its own way

    def forward(self, input, hx: Tensor | None = None):
        from ..execution import bptt, loops, runner
        from ..execution.dispatch import _autocast
        from ..execution.ops import Cell, Op

        self._update_flat_weights()
        x = input.data if isinstance(input, PackedSequence) else input
        dtype = self.weight_ih_l0.dtype
        if isinstance(x, Tensor) and _autocast(x.device.type):
            # No fused kernel to autocast: run in the weights' precision, as the loops need one dtype.
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(input.to(dtype), None if hx is None else hx.to(dtype))
        self._check_call(input, hx, dtype)
        # _flat_weights holds the dense parameters, or tensors set for one call (factored or
        # column-dropped weights); None entries are factored weights to rebuild.
        weights = dict(zip(self._flat_weights_names, [w if w is not None else getattr(self, n) for w, n in
                                                      zip(self._flat_weights, self._flat_weights_names)]))
        cells = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = f"l{layer}{'_reverse' if direction else ''}"
                ops = [Op(3, weights[f"weight_{kind}_{suffix}"].t(), None, None, None,
                          weights.get(f"bias_{kind}_{suffix}")) for kind in ("ih", "hh")]
                cells.append(Cell(ops[0], ops[1], None))
        grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights.values())
                                            or (hx is not None and hx.requires_grad))
        return runner.forward(self, input, hx, cells, bptt.LOOPS if grad else
                              (loops.PLAIN if x.is_cuda else loops.scripted()))

    def _check_call(self, input, hx, dtype) -> None:
        """nn.GRU's checks of a call, with its messages: input rank, size and dtype, state shape."""
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        if not isinstance(x, Tensor) or (not packed and x.dim() not in (2, 3)):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {getattr(x, 'dim', lambda: '?')()}D instead")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        if x.dtype != dtype:
            raise ValueError(f"input must have the type {dtype}, got type {x.dtype}")
        stacks = self.num_layers * (2 if self.bidirectional else 1)
        if packed:
            expected = (stacks, int(input.batch_sizes[0]), self.hidden_size)
        elif x.dim() == 3:
            expected = (stacks, x.shape[0 if self.batch_first else 1], self.hidden_size)
        else:
            expected = (stacks, self.hidden_size)
        if hx is not None and tuple(hx.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")
        if hx is not None and hx.dtype != dtype:
            raise ValueError(f"hx must have the type {dtype}, got type {hx.dtype}")


class LowRankPaperGRU(FactoredRNN, PaperGRU):
    """``PaperGRU`` with factored recurrent matrices (``LowRankGRU``'s options).

    >>> gru = LowRankPaperGRU(1, 64, rank=8, diag=True, batch_first=True)
    """

    _dense_class = PaperGRU

    def __init__(self, *args, rank, diag: bool = False, tied: bool = False, include_input: bool = False,
                 **kwargs):
        PaperGRU.__init__(self, *args, **kwargs)
        factor_from_scratch(self, rank=rank, diag=diag, tied=tied, include_input=include_input)

    def forward(self, input, hx: Tensor | None = None):
        # An attached acceleration runs the factored eq. 6 loops (or answers None); otherwise
        # rebuild the factored weights once and run PaperGRU's loops on them.
        accelerated = self.__dict__.get("_lrc_acceleration")
        if accelerated is not None:
            result = accelerated.run(self, input, hx)
            if result is not None:
                return result
        with parametrize.cached():
            self._flat_weights = [getattr(self, n) if hasattr(self, n) else None for n in self._flat_weights_names]
            try:
                return PaperGRU.forward(self, input, hx)
            finally:
                self._init_flat_weights()


# Converting a trained PaperGRU (lrcompress.compress) gives this class, not a generic subclass.
_FACTORED[PaperGRU] = LowRankPaperGRU


def dropped_columns(weight: Tensor, p: float) -> Tensor:
    """``weight`` with whole columns zeroed with probability p (kept ones scaled by 1/(1-p))."""
    keep = torch.empty(weight.shape[1], device=weight.device, dtype=weight.dtype).bernoulli_(1.0 - p)
    return weight * (keep / (1.0 - p))


def run_with_recurrent_dropout(rnn: nn.RNNBase, x: Tensor, state, p: float):
    """Run ``rnn`` with its recurrent matrices column-dropped (rate ``p``, one mask per call).

    Dropping column j of ``W_hh`` drops state unit j from every recurrent product, with one mask
    for all steps: Gal's variational recurrent dropout, with the mask shared by the mini-batch,
    so the fused cuDNN kernel still runs.
    """
    names = rnn._flat_weights_names
    # One column scale per recurrent matrix, drawn in the same order whichever path runs.
    ones = next(rnn.parameters()).new_ones(1, rnn.proj_size if getattr(rnn, "proj_size", 0) > 0 else rnn.hidden_size)
    keep = {n: dropped_columns(ones, p)[0] for n in names if n.startswith("weight_hh")}
    accelerated = rnn.__dict__.get("_lrc_acceleration")
    if accelerated is not None:  # the factored path scales the factors' columns, never forming W
        result = accelerated.run(rnn, x, state, list(keep.values()))
        if result is not None:
            return result
    with parametrize.cached():
        weights = [getattr(rnn, n) if hasattr(rnn, n) else None for n in names]
        dense_class = rnn._dense_class if isinstance(rnn, FactoredRNN) else type(rnn)
        saved = rnn._flat_weights, rnn._flat_weight_refs
        rnn._flat_weights = [w * keep[n] if n in keep else w for n, w in zip(names, weights)]
        rnn._flat_weight_refs = [None] * len(names)  # "unchanged": the forward keeps our tensors
        try:
            return dense_class.forward(rnn, x, state)
        finally:
            rnn._flat_weights, rnn._flat_weight_refs = saved


class SequenceModel(nn.Module):
    """Inputs -> recurrent stack ``rnn`` -> dense ``head`` (final state, or every step).

    Token inputs ((B, T) ids) are one-hot encoded, or embedded when ``embedding`` is given.
    ``recurrent_dropout`` (set by a trainer) applies ``run_with_recurrent_dropout`` in training;
    ``dropout_masks = "per_gate"`` or ``"dl4mt"`` instead draws every mask (input, recurrent,
    output) per sequence and holds it over time (``lrcompress.nn.variational.run_sequence``).
    ``variational_backward`` (an attribute too): ``"auto"`` runs those masks through the
    first-order factored backward where there is one (``execution.masked``), ``"autograd"``
    through autograd's step loop, which supports a second derivative (``create_graph=True``).
    ``forward_stateful`` also takes and returns the recurrent state, for windows of a stream.
    ``learn_initial_state``: the state a sequence starts from is the trainable ``initial_state``
    ((layers * directions, n), zeros at first; an LSTM adds ``initial_cell``), as the authors'
    ``h_0``; otherwise zeros. A stream's later windows start from the carried state instead.

    >>> model = SequenceModel(nn.GRU(2, 16, batch_first=True), 1, "last")
    >>> model(torch.zeros(3, 7, 2)).shape
    torch.Size([3, 1])
    """

    def __init__(self, rnn: nn.RNNBase, output_size: int, output: str, *, vocab_size: int | None = None,
                 embedding: nn.Embedding | None = None, input_dropout: float = 0.0, output_dropout: float = 0.0,
                 output_l2: float = 0.0, recurrent_dropout: float = 0.0, learn_initial_state: bool = False,
                 dropout_masks: str = "batch", variational_backward: str = "auto"):
        super().__init__()
        if output not in ("last", "sequence"):
            raise ConfigError(f"output must be 'last' or 'sequence', got {output!r}")
        if not rnn.batch_first:
            raise ConfigError("SequenceModel needs a batch_first recurrent layer")
        self.output, self.vocab_size, self.output_l2 = output, vocab_size, output_l2
        self.recurrent_dropout = recurrent_dropout
        if dropout_masks != "batch":
            check_scheme(rnn, dropout_masks)
        self.dropout_masks = dropout_masks
        if variational_backward not in ("auto", "autograd"):
            raise ConfigError(f"variational_backward must be 'auto' or 'autograd', got {variational_backward!r}")
        self.variational_backward = variational_backward
        self.embedding = embedding
        self.rnn = rnn
        self.input_dropout = nn.Dropout(input_dropout)
        self.output_dropout = nn.Dropout(output_dropout)
        features = getattr(rnn, "proj_size", 0) or rnn.hidden_size  # ScoRNN has no projection
        self.head = nn.Linear(features * (2 if getattr(rnn, "bidirectional", False) else 1), output_size)
        self.initial_state = self.initial_cell = None
        if learn_initial_state:
            if not isinstance(rnn, nn.RNNBase):
                raise ConfigError(f"learn_initial_state needs a GRU/LSTM/RNN layer, not {type(rnn).__name__}")
            stacks = rnn.num_layers * (2 if rnn.bidirectional else 1)
            weight = next(rnn.parameters())
            self.initial_state = nn.Parameter(weight.new_zeros(stacks, features))
            if rnn.mode == "LSTM":
                self.initial_cell = nn.Parameter(weight.new_zeros(stacks, rnn.hidden_size))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.forward_stateful(x, None, lengths)[0]

    def forward_stateful(self, x: Tensor, state=None, lengths: Tensor | None = None):
        """(logits, final state); ``state`` is the previous window's (detach it between windows)."""
        p_in, p_out = self.input_dropout.p, self.output_dropout.p
        variational = self.training and self.dropout_masks != "batch" and bool(p_in or p_out or self.recurrent_dropout)
        inputs = self.embed(x) if variational else self.input_dropout(self.embed(x))
        if state is None and self.initial_state is not None:
            state = self.start_state(inputs.shape[0])
        if variational:  # every mask per sequence, held over time; the output one already applied
            out, state = run_sequence(self.rnn, inputs, state, scheme=self.dropout_masks,
                                      recurrent=self.recurrent_dropout, inputs=p_in, output=p_out,
                                      backward=self.variational_backward)
        elif self.training and self.recurrent_dropout > 0:
            out, state = run_with_recurrent_dropout(self.rnn, inputs, state, self.recurrent_dropout)
        else:
            out, state = self.rnn(inputs, state)
        if self.output == "last":
            if lengths is None:
                out = out[:, -1]
            else:
                out = out[torch.arange(out.shape[0], device=out.device), lengths.to(out.device) - 1]
        return self.head(out if variational else self.output_dropout(out)), state

    def start_state(self, batch: int):
        """The learned initial state for ``batch`` sequences: (layers * directions, batch, n), or an
        LSTM's ``(h0, c0)``; gradients flow back to ``initial_state`` (and ``initial_cell``)."""
        h = self.initial_state.unsqueeze(1).expand(-1, batch, -1).contiguous()
        if self.initial_cell is None:
            return h
        return h, self.initial_cell.unsqueeze(1).expand(-1, batch, -1).contiguous()

    def embed(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.int64, torch.int32):
            if self.embedding is not None:
                return self.embedding(x)
            if self.vocab_size is None:
                raise ConfigError("token inputs need a vocabulary size (a language-modelling task)")
            return F.one_hot(x.long(), self.vocab_size).to(self.head.weight.dtype)
        return x

    def penalty(self) -> Tensor:
        """``output_l2 * ||head.weight||^2``, to add to the task loss (0 when unset)."""
        if not self.output_l2:
            return self.head.weight.new_zeros(())
        return self.output_l2 * self.head.weight.pow(2).sum()


class HighwayBlock(Highway):
    """A ``Highway`` layer with dropout on the input of its two matrices (the carried state is
    not dropped) and optional batch normalisation after each matrix (appendix A.1; the
    transform bias then sits in the gate's batch-norm shift)."""

    def __init__(self, features: int, activation: str = "relu", transform_bias: float = -1.0, *,
                 rank: int | None = None, diag: bool = False, batch_norm: bool = False, dropout: float = 0.0,
                 bottleneck_dropout: float = 0.0):
        super().__init__(features, activation, 0.0 if batch_norm else transform_bias, rank=rank, diag=diag,
                         bottleneck_dropout=bottleneck_dropout)
        self.dropout = nn.Dropout(dropout)
        self.proposal_norm = nn.BatchNorm1d(features) if batch_norm else nn.Identity()
        self.gate_norm = nn.BatchNorm1d(features) if batch_norm else nn.Identity()
        if batch_norm:
            nn.init.constant_(self.gate_norm.bias, transform_bias)
        with torch.no_grad():
            self.proposal.bias.zero_()  # the paper starts every bias at 0 but the transform gate's
            if batch_norm:
                self.gate.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        gate, proposal = self.transforms(self.dropout(x))  # Highway.transforms: the bottleneck mask
        t = torch.sigmoid(self.gate_norm(gate))
        return ACTIVATIONS[self.activation](self.proposal_norm(proposal)) * t + x * (1 - t)


class HighwayClassifier(nn.Module):
    """Feed-forward highway network (appendix A.1): dense input matrix (+ batch norm) and ReLU,
    ``layers`` highway layers (low-rank when ``rank``), dense output matrix.

    >>> net = HighwayClassifier(784, 64, 10, layers=2, rank=8)
    >>> net(torch.zeros(5, 784)).shape
    torch.Size([5, 10])
    """

    output: ClassVar[str] = "last"

    def __init__(self, input_size: int, hidden_size: int, output_size: int, *, layers: int = 5,
                 rank: int | None = None, diag: bool = False, activation: str = "relu",
                 transform_bias: float = -1.0, batch_norm: bool = False, input_dropout: float = 0.0,
                 dropout: float = 0.0, output_dropout: float = 0.0, output_l2: float = 0.0,
                 bottleneck_dropout: float = 0.0):
        super().__init__()
        self.output_l2 = output_l2
        self.input_dropout = nn.Dropout(input_dropout)
        self.input = nn.Linear(input_size, hidden_size, bias=not batch_norm)
        self.input_norm = nn.BatchNorm1d(hidden_size) if batch_norm else nn.Identity()
        self.layers = nn.ModuleList(
            HighwayBlock(hidden_size, activation, transform_bias, rank=rank, diag=diag, batch_norm=batch_norm,
                         dropout=dropout, bottleneck_dropout=bottleneck_dropout) for _ in range(layers))
        self.output_dropout = nn.Dropout(output_dropout)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        h = torch.relu(self.input_norm(self.input(self.input_dropout(x))))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.output_dropout(h))

    penalty = SequenceModel.penalty


def set_dropout(model: nn.Module, *, dropout: float | None = None, recurrent_dropout: float | None = None) -> None:
    """Set a built model's dropout rates from a recipe's ``[train]`` section (None: unchanged).

    ``dropout`` replaces every ``nn.Dropout`` rate and a stacked RNN's between-layer rate;
    ``recurrent_dropout`` is read by ``SequenceModel`` in training mode.
    """
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
            elif isinstance(module, nn.RNNBase) and module.num_layers > 1:
                module.dropout = dropout
    if recurrent_dropout is not None:
        if not isinstance(model, SequenceModel) and recurrent_dropout > 0:
            raise ConfigError(f"recurrent_dropout needs a recurrent model, not {type(model).__name__}")
        if recurrent_dropout > 0 and not isinstance(model.rnn, nn.RNNBase):  # it drops nn.RNNBase weight columns
            raise ConfigError(f"recurrent_dropout is for GRU/LSTM/RNN layers, not {type(model.rnn).__name__}")
        if isinstance(model, SequenceModel):
            model.recurrent_dropout = recurrent_dropout


def detach_state(state):
    """A recurrent state (tensor, or LSTM (h, c) tuple) cut from its graph, for the next window."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
