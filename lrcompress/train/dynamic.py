"""Dynamic evaluation of language models (Krause, Kahembwe, Murray and Renals, "Dynamic
Evaluation of Neural Sequence Models", ICML 2018).

The test text is read as one stream (a sentence-mode task: line by line, ``as_sequences``),
cut into segments of ``segment`` symbols. Each segment is scored with the current weights (the
recurrent state carried over from the previous segment, detached), *then* the weights take one
gradient step on that segment's loss, so the model adapts to the recent history before it
scores the next segment. Static evaluation is the same scoring without the steps. Both run on
a deep copy: the model passed in is never changed.

Update rules, with ``g`` the gradient of the segment's mean cross-entropy (nats per symbol)
and ``theta_0`` the trained weights:

- ``method="sgd"`` (the paper's SGD with a global decay prior)::

      theta <- theta - lr * g + decay * (theta_0 - theta)

- ``method="rms"`` (the paper's proposed "RMS with an RMS global prior"): ``MS`` is the mean
  squared gradient of training batches (``gradient_statistics``)::

      theta <- theta - lr * g / (sqrt(MS) + eps) + min(decay * sqrt(MS) / mean(sqrt(MS)), 1) * (theta_0 - theta)

  the mean taken over every adapted parameter entry; the per-entry decay rate is clipped at 1
  (the paper clips ``sqrt(MS) / mean`` at ``1 / decay``) so no entry overshoots ``theta_0``.

Every parameter that requires a gradient adapts: in a factored (low-rank) model those are the
factors ``L``, ``R`` (and ``D``), not a rebuilt dense matrix.

    >>> result = dynamic_evaluate(model, task, split="test", lr=0.01, decay=0.0)   # doctest: +SKIP
    >>> result["static"]["bpc"], result["dynamic"]["bpc"]                         # doctest: +SKIP
    (1.6650, 1.6282)

(runs/ptb-gru-512, the PTB character GRU; docs/dynamic.md has the measurements.)
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, LRCompressError
from ..progress import bar as progress_bar
from .models import detach_state
from .tasks_base import IGNORE, SPLITS, Batch, Task
from .tasks_data import EOL, LN2, PtbCharTask

DEFAULT_SEGMENT = 50  # symbols per adaptation step (ours; the paper tunes it with lr and decay)
METHODS = ("sgd", "rms")
DEFAULT_EPS = 1e-5  # added to sqrt(MS) in the RMS rule, so entries that never had a gradient stay finite
# evaluate_run's (the CLI's) defaults, from a small grid on the first 20,000 validation characters
# of the PTB GRU (runs/ptb-gru-512; docs/dynamic.md): the best RMS point at segment 50; for SGD a
# safe step (lr 0.03 scored 0.0008 bpc better, 0.1 much worse). Other models may want others.
DEFAULT_LR = {"sgd": 0.01, "rms": 3e-5}
DEFAULT_DECAY = {"sgd": 0.0, "rms": 1e-3}


def dynamic_evaluate(model: nn.Module, stream, *, lr: float, decay: float, segment: int = DEFAULT_SEGMENT,
                     method: str = "sgd", grad_stats: Mapping[str, Tensor] | None = None, eps: float = DEFAULT_EPS,
                     split: str = "test", progress: bool | None = False) -> dict:
    """Static and dynamic evaluation of a language model on a symbol stream.

    ``model``: a token language model as the recipes build it (``SequenceModel`` with
    ``output = "sequence"``: ``forward_stateful(x (1, T) ids, state) -> (logits (1, T, V), state)``).
    ``stream``: a 1-D integer tensor (or array) of symbol ids, read as one stream from a zero
    state; a list of them (independent sequences, each from a zero state, the weights adapting
    across them); or a language-model task (``ptb_char``, ``text``) whose ``split`` is read as
    the task reads it (``as_sequences``). In each sequence symbol ``t`` predicts ``t + 1``: N
    symbols give N - 1 predictions. ``lr`` >= 0 and ``decay`` in
    [0, 1] as in the module docstring; ``method="rms"`` needs ``grad_stats``
    (``gradient_statistics``, keyed like ``model.named_parameters()``).

    Returns ``{"static": m, "dynamic": m, "settings": {...}}``, each ``m`` holding ``ce`` (nats
    per symbol), ``bpc`` (bits per symbol: per character for character models), ``ppl``
    (``2 ** bpc``) and ``count`` (symbols predicted); ``dynamic`` also ``skipped``, the
    segments whose gradient was not finite (no step taken). ``lr = decay = 0`` gives dynamic
    figures equal to the static ones. Raises ``ConfigError`` naming a bad value.
    """
    check_settings(lr=lr, decay=decay, segment=segment, method=method, eps=eps)
    sequences = as_sequences(stream, split)
    check_model(model, sequences)
    static = _score(_frozen_copy(model), sequences, segment, None, progress, "static")
    adapted = _frozen_copy(model)
    params = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("dynamic evaluation needs parameters that require gradients; the model has none")
    update = DynamicUpdate(params, lr=lr, decay=decay, method=method, grad_stats=grad_stats, eps=eps)
    dynamic = _score(adapted, sequences, segment, update, progress, "dynamic")
    settings = {"method": method, "lr": float(lr), "decay": float(decay), "segment": segment}
    if method == "rms":
        settings["eps"] = float(eps)
    return {"static": static, "dynamic": {**dynamic, "skipped": update.skipped}, "settings": settings}


def static_evaluate(model: nn.Module, stream, *, segment: int = DEFAULT_SEGMENT, split: str = "test",
                    progress: bool | None = False) -> dict:
    """``dynamic_evaluate``'s static figures alone (``ce``, ``bpc``, ``ppl``, ``count``): the
    stream scored in segments, state carried, weights fixed. The model is not changed."""
    check_settings(segment=segment)
    sequences = as_sequences(stream, split)
    check_model(model, sequences)
    return _score(_frozen_copy(model), sequences, segment, None, progress, "static")


class DynamicUpdate:
    """One dynamic-evaluation step on ``params`` (name -> parameter), from their ``.grad``.

    ``theta_0`` is the parameters' value when this object is made. ``step()`` applies the rule
    of ``method`` (module docstring) in place and clears the gradients; a step whose gradient
    holds NaN or Inf is not taken (``skipped`` counts them). Raises ``ConfigError`` when
    ``grad_stats`` is missing (rms), lacks a parameter, has the wrong shape, or is not finite.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], *, lr: float, decay: float, method: str = "sgd",
                 grad_stats: Mapping[str, Tensor] | None = None, eps: float = DEFAULT_EPS):
        check_settings(lr=lr, decay=decay, method=method, eps=eps)
        self.params, self.lr, self.decay, self.method = dict(params), float(lr), float(decay), method
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.skipped = 0
        self.scale: dict[str, Tensor] = {}  # rms: 1 / (sqrt(MS) + eps)
        self.rate: dict[str, Tensor | float] = {n: self.decay for n in self.params}  # per-entry decay rate
        if method == "rms":
            rms = {n: s.sqrt() for n, s in _checked_stats(grad_stats, self.params).items()}
            mean = float(sum(r.double().sum() for r in rms.values()) / sum(r.numel() for r in rms.values()))
            if mean <= 0:
                raise ConfigError("grad_stats are zero for every parameter: gather them on training batches "
                                  "whose loss depends on the weights (gradient_statistics)")
            self.scale = {n: 1.0 / (r + eps) for n, r in rms.items()}
            self.rate = {n: (self.decay * r / mean).clamp(max=1.0) for n, r in rms.items()}

    @torch.no_grad()
    def step(self) -> None:
        grads = {n: p.grad for n, p in self.params.items()}
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads.values()):
            self.skipped += 1
        else:
            for name, p in self.params.items():
                g = grads[name] if grads[name] is not None else torch.zeros_like(p)
                if self.method == "rms":
                    g = g * self.scale[name]
                # theta_i = theta_{i-1} - lr g + rate (theta_0 - theta_{i-1}): both terms from the old theta
                p.add_(self.rate[name] * (self.theta0[name] - p) - self.lr * g)
        for p in self.params.values():
            p.grad = None


def gradient_statistics(model: nn.Module, batches: Iterable, *, carry: bool = True, max_batches: int | None = None,
                        progress: bool | None = False) -> dict[str, Tensor]:
    """Mean squared gradient ``MS`` of each parameter over training batches (Krause et al.'s
    ``MS_g = (1 / N_b) sum_k (grad L_k)^2``), for ``dynamic_evaluate(method="rms")``.

    ``batches``: an iterable of ``Batch`` or ``(x, y)`` pairs (x (B, T) ids, y (B, T) next
    symbols, ``IGNORE`` at padding), e.g. ``task.batches("train", 32, seed=0)`` or
    ``stream_batches(ids, 50, streams=32)``. With ``carry`` (stream-mode data) the state runs on
    from a batch to the next of the same batch size; without (independent sentences) every
    batch starts from a zero state. ``L_k`` is batch k's mean cross-entropy over its targets.
    At most ``max_batches`` batches are used. Returns name ->
    tensor shaped as the parameter, keyed like ``model.named_parameters()`` (parameters that
    require gradients). The model is not changed (a copy is run, in eval mode).
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ConfigError(f"max_batches must be a positive int, got {max_batches!r}")
    work = _frozen_copy(model)
    params = {n: p for n, p in work.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    state, width, count = None, None, 0
    total = max_batches if max_batches is not None else _length(batches)
    with torch.enable_grad(), progress_bar(total=total, progress=progress, desc="gradient statistics",
                                           unit="batch") as shown:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            x, y = (batch.x, batch.y) if isinstance(batch, Batch) else batch
            x, y = x.to(_device(work)), y.to(_device(work))
            check_model(work, [x.reshape(-1)])
            if not carry or x.shape[0] != width:  # a new batch size cannot continue the old streams
                state, width = None, x.shape[0]
            logits, state = work.forward_stateful(x, state)
            loss = F.cross_entropy(_wide(logits.reshape(-1, logits.shape[-1])), y.reshape(-1), ignore_index=IGNORE)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, p), g in zip(params.items(), grads):
                if g is not None:
                    sums[name] += g.detach() ** 2
            state = detach_state(state)
            count += 1
            shown.update(1)
    if count == 0:
        raise ConfigError("gradient_statistics got no batches")
    return {name: s / count for name, s in sums.items()}


def stream_batches(stream, segment: int = DEFAULT_SEGMENT, *, streams: int = 1) -> list[Batch]:
    """A 1-D stream of ids as ``Batch``es: cut into ``streams`` contiguous parallel streams
    (the tail that does not divide evenly is dropped), read in windows of ``segment`` inputs,
    y = x one symbol later. Raises ``ConfigError`` when the stream is too short."""
    check_settings(segment=segment)
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise ConfigError(f"streams must be a positive int, got {streams!r}")
    ids = _one_sequence(stream)
    per = len(ids) // streams
    if per < 2:
        raise ConfigError(f"a stream of {len(ids)} symbols is too short for {streams} parallel streams")
    rows = ids[:per * streams].reshape(streams, per)
    return [Batch(rows[:, t:min(t + segment, per - 1)], rows[:, t + 1:min(t + segment, per - 1) + 1])
            for t in range(0, per - 1, segment)]


# -- checks ---------------------------------------------------------------------------------

def check_settings(*, lr: float | None = None, decay: float | None = None, segment: int | None = None,
                   method: str | None = None, eps: float | None = None) -> None:
    """Raise ``ConfigError`` naming the first bad value (``None``: not checked)."""
    for name, value, low, high in (("lr", lr, 0.0, math.inf), ("decay", decay, 0.0, 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            span = "a finite number >= 0" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise ConfigError(f"{name} must be {span}, got {value!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf):
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
        raise ConfigError(f"segment must be a positive int (symbols per step), got {segment!r}")
    if method is not None and method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


def as_sequences(stream, split: str = "test") -> list[Tensor]:
    """The sequences to score, each a 1-D int64 tensor of at least 2 symbols read from a zero state.

    ``stream``: a 1-D integer tensor or array (one sequence); a list of them (independent
    sequences); or a language-model task, whose ``split`` is read as the task reads it: one
    stream in stream mode, each line from the end-of-line symbol in sentence mode (the low-rank
    paper's PTB scheme: a model trained so has never seen a state carried across lines). Raises
    ``ConfigError`` for another task, an unknown split, or a sequence of the wrong shape or dtype.
    """
    if isinstance(stream, Task):
        if not isinstance(stream, PtbCharTask):
            raise ConfigError(f"dynamic evaluation is for language-model tasks (ptb_char, text), not task "
                              f"{stream.name!r}")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if stream.stateful:
            stream = stream.stream(split)
        else:  # sentence mode: x = EOL, line[:-1]; y = line (tasks_data.Sentences)
            start = np.array([stream.vocab.ids[EOL]], dtype=np.int64)
            stream = [np.concatenate([start, line]) for line in stream.lines(split)]
    if isinstance(stream, (list, tuple)):
        if not stream:
            raise ConfigError("stream is an empty list of sequences")
        return [_one_sequence(s) for s in stream]
    return [_one_sequence(stream)]


def _one_sequence(stream) -> Tensor:
    if isinstance(stream, np.ndarray):
        stream = torch.from_numpy(stream)
    if not isinstance(stream, Tensor):
        raise ConfigError(f"stream must be a 1-D tensor of symbol ids, a list of them, or a language-model task, "
                          f"got {type(stream).__name__}")
    if stream.dim() != 1 or stream.dtype.is_floating_point or stream.dtype.is_complex or stream.dtype == torch.bool:
        raise ConfigError(f"stream must be a 1-D tensor of integer symbol ids, got {stream.dtype} of shape "
                          f"{tuple(stream.shape)}")
    if len(stream) < 2:
        raise ConfigError(f"a stream holds {len(stream)} symbol(s); at least 2 are needed (one predicts the next)")
    return stream.long()


def check_model(model: nn.Module, sequences: list[Tensor]) -> None:
    """A token language model (``forward_stateful``, ``output = "sequence"``) whose vocabulary
    holds every id of ``sequences``; else ``ConfigError``."""
    if not callable(getattr(model, "forward_stateful", None)) or getattr(model, "output", None) != "sequence":
        raise ConfigError(f"dynamic evaluation needs a language model (a SequenceModel with output 'sequence'), "
                          f"not {type(model).__name__}")
    embedding = getattr(model, "embedding", None)
    vocab = getattr(model, "vocab_size", None) or getattr(embedding, "num_embeddings", None)
    if vocab is None:
        raise ConfigError(f"dynamic evaluation needs a model with token inputs; {type(model).__name__} has no "
                          "vocabulary (vocab_size or embedding)")
    low, high = min(int(s.min()) for s in sequences), max(int(s.max()) for s in sequences)
    if low < 0 or high >= vocab:
        raise ConfigError(f"symbol id {low if low < 0 else high} is outside the model's vocabulary of {vocab}")


def _checked_stats(stats: Mapping[str, Tensor] | None, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    if stats is None:
        raise ConfigError("method 'rms' needs grad_stats: gradient_statistics(model, training batches)")
    if not isinstance(stats, Mapping):
        raise ConfigError(f"grad_stats must be a dict of name -> tensor, got {type(stats).__name__}")
    out = {}
    for name, p in params.items():
        if name not in stats:
            raise ConfigError(f"grad_stats has no entry for parameter {name!r} (gather them on this model)")
        s = stats[name]
        if not isinstance(s, Tensor) or s.shape != p.shape:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ConfigError(f"grad_stats[{name!r}] is {shape}, the parameter {tuple(p.shape)}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ConfigError(f"grad_stats[{name!r}] must be finite and >= 0 (mean squared gradients)")
        out[name] = s.detach().to(device=p.device, dtype=p.dtype)
    return out


# -- scoring --------------------------------------------------------------------------------

def _score(model: nn.Module, sequences: list[Tensor], segment: int, update: DynamicUpdate | None, progress,
           desc: str) -> dict:
    """Sum of -log p over every prediction, segment by segment, each sequence from a zero state;
    after each segment is scored, ``update`` (if any) steps on that segment's mean loss.

    Autograd is on for static scoring too: PyTorch's CPU LSTM runs another kernel under
    ``no_grad`` (equal up to rounding), and static figures must be the ones a step-free dynamic
    run gives, bit for bit."""
    device = _device(model)
    total, count = 0.0, sum(len(s) - 1 for s in sequences)
    with torch.enable_grad(), progress_bar(total=count, progress=progress, desc=desc, unit="symbol") as shown:
        for ids in sequences:
            ids, state = ids.to(device), None
            for start in range(0, len(ids) - 1, segment):
                x, y = ids[start:start + segment].unsqueeze(0), ids[start + 1:start + segment + 1]
                x = x[:, :len(y)]
                logits, state = model.forward_stateful(x, state)
                nll = F.cross_entropy(_wide(logits[0]), y, reduction="sum")
                total += float(nll.detach().double())
                if update is not None:
                    (nll / len(y)).backward()  # the paper's step: on the mean loss of the segment just scored
                    update.step()
                state = detach_state(state)
                shown.update(len(y))
    return _figures(total, count)


def _wide(logits: Tensor) -> Tensor:
    """Half-precision logits in float32 for the loss; float32 and float64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _figures(nll_sum: float, count: int) -> dict:
    ce = nll_sum / count
    try:
        ppl = 2.0 ** (ce / LN2)
    except OverflowError:  # bpc past ~1024 (diverged dynamic steps): the perplexity is beyond a float
        ppl = math.inf
    return {"ce": ce, "bpc": ce / LN2, "ppl": float(ppl), "count": count}


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode (no dropout) without gradients: the caller's model stays as it is."""
    work = copy.deepcopy(model)
    work.eval()
    for p in work.parameters():
        p.grad = None
    return work


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


# -- run directories (lrcompress evaluate) ------------------------------------------------

DYNAMIC_ONLY = ("lr", "decay", "segment", "method", "grad_batches")  # evaluate_run's settings of the dynamic steps


def evaluate_run(run_dir: str | os.PathLike, *, dynamic: bool = False, lr: float | None = None,
                 decay: float | None = None, segment: int | None = None, method: str | None = None,
                 split: str = "test", symbols: int | None = None, grad_batches: int | None = None,
                 device: str = "auto", progress: bool | None = None) -> dict:
    """Static (and, with ``dynamic``, dynamic) bits per character of a finished run's model on
    its task's ``split``, read as the task reads it (``as_sequences``) (``lrcompress evaluate``).

    ``run_dir`` holds ``recipe.toml`` and ``model.safetensors`` (a trained or fine-tuned run).
    ``symbols``: only the first this many predictions of the split. ``lr``, ``decay`` ``None``:
    the method's defaults (``DEFAULT_LR``, ``DEFAULT_DECAY``); ``segment`` ``None``:
    ``DEFAULT_SEGMENT``; ``method`` ``None``: ``"sgd"``. ``method="rms"`` gathers
    ``gradient_statistics`` on ``grad_batches`` (``None``: 100) training batches of the recipe
    (its batch size and window length). ``lr``, ``decay``, ``segment``, ``method`` and
    ``grad_batches`` set the dynamic steps: given without ``dynamic`` they are a ``ConfigError``,
    not silently ignored. Returns ``{"run", "task", "split", "static"[, "dynamic",
    "settings"]}``. Raises ``ConfigError`` for a bad value or a task that is not a language model
    (before reading any data), ``FileNotFoundError`` for a missing ``run_dir``,
    ``LRCompressError`` for a path that is not a run directory or one without its files.
    """
    from ..io import load_model
    from .recipe import load_recipe
    from .run import MODEL_FILE, RECIPE_FILE, build
    from .tasks import task_class

    given = [name for name, value in zip(DYNAMIC_ONLY, (lr, decay, segment, method, grad_batches))
             if value is not None]
    check_settings(lr=lr, decay=decay, segment=segment, method=method)  # bad values first, named as such
    method = "sgd" if method is None else method
    lr = DEFAULT_LR[method] if lr is None else lr
    decay = DEFAULT_DECAY[method] if decay is None else decay
    segment = DEFAULT_SEGMENT if segment is None else segment
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name, value in (("symbols", symbols), ("grad_batches", grad_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    grad_batches = 100 if grad_batches is None else grad_batches
    if given and not dynamic:
        raise ConfigError(f"{', '.join(given)} set the dynamic steps and were given without dynamic=True; "
                          "ask for dynamic evaluation or drop them")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LRCompressError(f"{run_dir} is a file, not a run directory (the folder lrcompress train or "
                              "finetune wrote)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run directory: {run_dir}")
    for name in (RECIPE_FILE, MODEL_FILE):
        if not (run_dir / name).is_file():
            raise LRCompressError(f"{run_dir} is not a finished run: it has no {name}")
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if not issubclass(task_class(recipe["task"]), PtbCharTask):
        raise ConfigError(f"evaluate is for language-model runs (tasks ptb_char, text); {run_dir} is a "
                          f"{recipe['task']['name']!r} run")
    target = _resolve_device(device)
    task, model = build(recipe)
    load_model(model, run_dir / MODEL_FILE)
    model.to(target)
    sequences = first_predictions(as_sequences(task, split), symbols)
    out = {"run": str(run_dir), "task": task.name, "split": split}
    if not dynamic:
        return {**out, "static": static_evaluate(model, sequences, segment=segment, progress=progress)}
    stats = None
    if method == "rms":
        batches = task.batches("train", recipe["train"]["batch_size"], seed=recipe["train"]["seed"])
        stats = gradient_statistics(model, batches, carry=task.stateful, max_batches=grad_batches,
                                    progress=progress)
    return {**out, **dynamic_evaluate(model, sequences, lr=lr, decay=decay, segment=segment, method=method,
                                      grad_stats=stats, progress=progress)}


def first_predictions(sequences: list[Tensor], symbols: int | None) -> list[Tensor]:
    """The leading sequences holding the first ``symbols`` predictions (the last one cut short);
    all of them when ``symbols`` is None."""
    if symbols is None:
        return sequences
    out, left = [], symbols
    for ids in sequences:
        if left <= 0:
            break
        out.append(ids[:left + 1])
        left -= len(out[-1]) - 1
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but this machine has no CUDA")
    return resolved


def format_evaluation(result: dict) -> str:
    """``evaluate_run``'s result as a few lines of text: static and dynamic side by side."""
    static, dyn = result["static"], result.get("dynamic")
    count = static["count"]
    head = f"{result['run']} ({result['task']}, {result['split']}, {count:,} symbol{'' if count == 1 else 's'} " \
           "predicted)"
    if dyn is None:
        lines = [head, f"static bpc {static['bpc']:.4f} (ce {static['ce']:.4f} nats)"]
        if not math.isfinite(static["ppl"]):
            lines.append("the model's own predictions are not finite (perplexity overflows or is NaN)")
        return "\n".join(lines)
    s = result["settings"]
    # a space between the columns, so a diverged run's wide figures stay apart
    lines = [head, f"{'':8}{'bpc':>8} {'ce':>8}", f"{'static':8}{static['bpc']:8.4f} {static['ce']:8.4f}",
             f"{'dynamic':8}{dyn['bpc']:8.4f} {dyn['ce']:8.4f}",
             f"dynamic - static: {_difference(dyn['bpc'] - static['bpc'])} bpc ({s['method']}, lr {s['lr']:g}, "
             f"decay {s['decay']:g}, segment {s['segment']})"]
    if dyn.get("skipped"):
        lines.append(f"{dyn['skipped']} segment(s) with a non-finite gradient were not stepped on")
    if not math.isfinite(static["ppl"]):
        lines.append("the model's own (static) predictions are not finite (perplexity overflows or is NaN)")
    elif not math.isfinite(dyn["ppl"]):
        lines.append(f"dynamic evaluation diverged (perplexity {dyn['ppl']}): the steps are too large, try a "
                     f"smaller lr than {s['lr']:g}")
    return "\n".join(lines)


def _difference(value: float) -> str:
    """A bpc difference with enough digits to show its sign: 4 decimals, or 2 significant
    figures when it rounds to 0.0000 (never "-0.0000")."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else ("+inf" if value > 0 else str(value))  # -inf, nan
    return f"{value:+.4f}" if abs(value) >= 5e-5 else f"{value:+.1e}"


__all__ = ["DEFAULT_SEGMENT", "DynamicUpdate", "METHODS", "as_sequences", "check_settings", "dynamic_evaluate",
           "evaluate_run", "first_predictions", "format_evaluation", "gradient_statistics", "static_evaluate",
           "stream_batches"]
