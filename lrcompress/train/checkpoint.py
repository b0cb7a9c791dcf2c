"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One safetensors file, written atomically (temporary file + rename), holds the model's state
dict (``model.*``), the optimiser's state tensors (``optim.<index>.<key>``), the random-number
generators (``rng.*``: now, and at the start of the current epoch, so the epoch's data order can
be replayed) and any carried recurrent state (``carry.<i>``); the metadata holds the rest as
JSON (step, epoch, the learning-rate scheduler's ``state_dict``, scaler, counters, the
optimiser's parameter groups: hyper-parameters, OneCycleLR's lr bounds, RMSProp's accumulator start).

    >>> save_checkpoint(path, model, optimizer, trainer={"step": 10})   # doctest: +SKIP
    >>> ckpt = load_checkpoint(path); ckpt.restore(model, optimizer)     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FormatError
from ..io import read_safetensors, write_safetensors
from ..validate import load_json

FORMAT = "lrcompress-train"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``model`` tensors, ``trainer`` JSON state and the rest."""

    model: dict[str, Tensor]
    trainer: dict
    optimizer: dict | None = None  # a torch optimizer state dict
    rng: dict | None = None  # as from ``rng_state()``
    rng_epoch: dict | None = None
    carry: list[Tensor] = field(default_factory=list)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load the weights (strictly) and, when given and saved, the optimiser state.

        Raises ``FormatError`` (one line) when the checkpoint's tensors are not the model's: the
        missing and unexpected keys and the first shape mismatches are named."""
        try:
            model.load_state_dict(self.model)
        except RuntimeError as exc:  # torch's message spans lines, its first says nothing: name the keys
            problem = state_mismatch(self.model, model.state_dict()) or str(exc).splitlines()[0]
            raise FormatError(f"checkpoint does not match the model: {problem}") from None
        if optimizer is not None and self.optimizer is not None:
            try:
                optimizer.load_state_dict(self.optimizer)
            except (ValueError, KeyError) as exc:
                raise FormatError(f"checkpoint optimiser state does not match: {exc}") from None


def state_mismatch(saved: dict[str, Tensor], expected: dict[str, Tensor], shown: int = 5) -> str:
    """How a saved state dict differs from a model's, in one line ("" when the keys and shapes
    agree): missing keys, unexpected keys, then shape mismatches, at most ``shown`` of each."""
    def listed(keys: list[str], sep: str = ", ") -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return sep.join(keys[:shown]) + more

    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
              for k in sorted(set(saved) & set(expected)) if tuple(saved[k].shape) != tuple(expected[k].shape)]
    parts = ([f"missing {listed(missing)}"] if missing else []) + \
        ([f"unexpected {listed(unexpected)}"] if unexpected else []) + \
        ([f"shapes differ: {listed(shapes, '; ')}"] if shapes else [])
    return "; ".join(parts)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    trainer: dict | None = None, rng: dict | None = None, rng_epoch: dict | None = None,
                    carry: list[Tensor] = ()) -> Path:
    """Write model (+ optimiser, RNG, carried state) and ``trainer`` JSON to ``path`` atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict = {"trainer": trainer or {}}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _split_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    for prefix, state in (("rng", rng), ("rng_epoch", rng_epoch)):
        if state is not None:
            rng_tensors, meta[prefix] = _split_rng(state, prefix)
            tensors.update(rng_tensors)
    tensors.update({f"carry.{i}": t for i, t in enumerate(carry)})
    meta["carry"] = len(carry)
    return write_safetensors(tensors, path, force=True,
                             metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                       "state": json.dumps(meta)})


def load_checkpoint(path: str | os.PathLike, *, resume: bool = False) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (or ``save_weights``).

    The whole file is checked while it is read -- metadata JSON (bounded size and depth), every
    tensor it names, the random-generator states -- so a damaged or foreign file raises
    ``FormatError`` naming it here, never ``KeyError`` halfway into a resumed run. With
    ``resume``, the trainer state must also hold every field a resumed run reads
    (``RESUME_FIELDS``).
    """
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path} is not an lrcompress training checkpoint")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise FormatError(f"{path}: damaged checkpoint metadata (format_version "
                          f"{str(meta.get('format_version'))[:40]!r})") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{path} uses checkpoint format {version}; upgrade lrcompress")
    if "state" not in meta:
        raise FormatError(f"{path}: damaged checkpoint metadata (no 'state')")
    state = load_json(meta["state"], f"{path}: checkpoint metadata", max_depth=MAX_STATE_DEPTH)
    try:
        ckpt = _parse(tensors, state)
        if resume:
            _check_resume_fields(ckpt.trainer)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:160]
        raise FormatError(f"{path}: damaged checkpoint metadata ({detail})") from None
    return ckpt


# What a resumed run reads from the trainer state (engine.Trainer._load), with its JSON type.
_INT, _NUMBER = (int,), (int, float)
RESUME_FIELDS = {"step": _INT, "epoch": _INT, "batch_in_epoch": _INT, "best_score": _NUMBER + (type(None),),
                 "best_step": _INT + (type(None),), "best_metrics": (dict, type(None)), "bad_evals": _INT,
                 "nan_events": _INT, "amp_overflows": _INT, "wall_time": _NUMBER, "schedule": (dict,),
                 "loss_sum": _NUMBER, "loss_count": _NUMBER}
MAX_STATE_DEPTH = 16  # optimiser param groups and RNG states nest ~5 deep


def _parse(tensors: dict[str, Tensor], state) -> Checkpoint:
    if not isinstance(state, dict) or not isinstance(state.get("trainer"), dict):
        raise ValueError("no trainer state")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = _join_optimizer(tensors, state["optimizer"]) if "optimizer" in state else None
    rngs = [_join_rng(tensors, state[p], p) if p in state else None for p in ("rng", "rng_epoch")]
    count = state.get("carry", 0)
    if type(count) is not int or count < 0:
        raise ValueError(f"carry count {count!r}")
    carry = [tensors[f"carry.{i}"] for i in range(count)]
    return Checkpoint(model, state["trainer"], optimizer, rngs[0], rngs[1], carry)


def _check_resume_fields(trainer: dict) -> None:
    for name, types in RESUME_FIELDS.items():
        if name not in trainer:
            raise KeyError(f"trainer.{name}")
        value = trainer[name]
        if isinstance(value, bool) or not isinstance(value, types) or (types is _INT and value < 0):
            raise ValueError(f"trainer.{name} is {str(value)[:40]!r}")
        if isinstance(value, float) and math.isnan(value):  # a NaN best score would never be beaten
            raise ValueError(f"trainer.{name} is NaN")
    if trainer["best_step"] is not None and trainer["best_step"] > trainer["step"]:
        raise ValueError(f"trainer.best_step {trainer['best_step']} is after trainer.step {trainer['step']}")


def save_weights(path: str | os.PathLike, model: nn.Module, metadata: dict | None = None) -> Path:
    """Only the model's state dict (the ``best`` checkpoint), atomically."""
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "state": json.dumps({"trainer": metadata or {}, "carry": 0})}
    return write_safetensors({f"model.{k}": v for k, v in model.state_dict().items()}, path, force=True,
                             metadata=meta)


def rng_state() -> dict:
    """Every random generator a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _split_optimizer(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    keys = {str(i): [k for k, v in e.items() if isinstance(v, Tensor)] for i, e in state_dict["state"].items()}
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars, "tensor_keys": keys}


def _join_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    """The optimiser state dict; a missing tensor or malformed entry raises KeyError/TypeError/ValueError."""
    state: dict[int, dict] = {}
    for index, keys in meta["tensor_keys"].items():
        state[int(index)] = {k: tensors[f"optim.{index}.{k}"] for k in keys}
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ValueError("optimizer param_groups is not a list of groups")
    return {"state": state, "param_groups": groups}


def _split_rng(state: dict, prefix: str) -> tuple[dict[str, Tensor], dict]:
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {f"{prefix}.torch": state["torch"], f"{prefix}.numpy": torch.from_numpy(keys.astype(np.int64))}
    for i, s in enumerate(state.get("cuda", ())):
        tensors[f"{prefix}.cuda.{i}"] = s
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "cuda": len(state.get("cuda", ()))}
    return tensors, meta


def _join_rng(tensors: dict[str, Tensor], meta: dict, prefix: str) -> dict:
    version, internal, gauss = meta["python"]
    kind, pos, has_gauss, cached = meta["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (kind, tensors[f"{prefix}.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": tensors[f"{prefix}.torch"]}
    if meta.get("cuda"):
        state["cuda"] = [tensors[f"{prefix}.cuda.{i}"] for i in range(meta["cuda"])]
    # Try each state on a scratch generator now: a damaged one fails here, not mid-resume.
    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    torch.Generator().set_state(state["torch"])
    return state
