"""Files: safetensors with the factorization in the metadata; a safe loading policy.

A compressed file holds the model's state dict with each factored weight ``<name>`` replaced by
``<name>.L``, ``<name>.R`` (and ``<name>.D``), and in its metadata ``format=lrcompress``,
``format_version``, ``lrcompress_version`` and ``targets`` (JSON list of ``TargetSpec``): enough
to rebuild the factorization on a dense skeleton. See docs/format.md.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import TargetSpec
from .convert import apply, factored_specs, factored_state_dict
from .errors import FormatError, LRCompressError, OutputExistsError
from .factorize import Factors
from .version import __version__

FORMAT = "lrcompress"
FORMAT_VERSION = 1
COMMON_NESTING = ("state_dict", "model_state_dict", "model")


def save_model(model: nn.Module, path: str | os.PathLike, *, force: bool = True,
               metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (factors + dense rest) and its factorization to a safetensors file.

    No pickle: reload with ``load_model(skeleton, path)``. Written atomically.
    """
    return write_compressed(factored_state_dict(model), factored_specs(model), path, force=force,
                            metadata=metadata)


def write_compressed(tensors: dict[str, Tensor], specs: list[TargetSpec], path: str | os.PathLike, *,
                     force: bool = False, metadata: dict[str, str] | None = None) -> Path:
    meta = dict(metadata or {})
    meta.update(format=FORMAT, format_version=str(FORMAT_VERSION), lrcompress_version=__version__,
                targets=json.dumps([s.to_dict() for s in specs]))
    return write_safetensors(tensors, path, metadata=meta, force=force)


def load_model(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a file written by ``save_model`` (or ``lrcompress convert``) into a dense skeleton.

    The factorizations recorded in the file are registered on ``model`` (no SVD is run), then
    every tensor is loaded. Everything is checked first: on a mismatch nothing is changed.
    A plain (dense) safetensors file is loaded as an ordinary state dict. Returns ``model``.
    """
    tensors, meta = read_safetensors(path)
    specs = specs_from_metadata(meta, path)
    factors = {}
    for spec in specs:
        parts = []
        for key, shape in zip(spec.factor_keys().values(), spec.factor_shapes().values()):
            if key not in tensors:
                raise FormatError(f"{path}: factor {key} is missing")
            if tuple(tensors[key].shape) != shape:
                raise FormatError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
            parts.append(tensors.pop(key))
        factors[spec.name] = Factors(*parts)
    # A skeleton built factored (e.g. LowRankGRU) already carries some factorizations: they
    # must be the recorded ones, and then only their values are loaded.
    existing = {s.name: s for s in factored_specs(model)}
    for spec in specs:
        if spec.name in existing and existing[spec.name] != spec:
            raise FormatError(f"{path}: {spec.name} is factored as {_describe(existing[spec.name])} in the model "
                              f"but as {_describe(spec)} in the file")
    factor_keys = {k for s in existing.values() for k in s.factor_keys().values()}
    _check_rest(model, tensors, {s.name for s in specs} | factor_keys, strict, path)
    apply(model, [s for s in specs if s.name not in existing], factors)
    model.load_state_dict(tensors, strict=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for spec in (s for s in specs if s.name in existing):
            originals = modules[spec.module].parametrizations[spec.weight]
            for i, t in enumerate(_parts(factors[spec.name])):
                getattr(originals, f"original{i}").copy_(t)
    return model


def _parts(f: Factors) -> tuple[Tensor, ...]:
    return (f.L, f.R) if f.D is None else (f.L, f.R, f.D)


def _describe(spec: TargetSpec) -> str:
    return f"rank {spec.rank}{' + diagonal' if spec.diag else ''}{' tied' if spec.tied else ''}"


def _check_rest(model: nn.Module, tensors: dict[str, Tensor], factored: set[str], strict: bool, path) -> None:
    expected = {k: tuple(v.shape) for k, v in factored_state_dict(model).items() if k not in factored}
    for key, t in tensors.items():
        if key in expected and tuple(t.shape) != expected[key]:
            raise FormatError(f"{path}: {key} has shape {tuple(t.shape)}, the model has {expected[key]}")
    if strict:
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise FormatError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def specs_from_metadata(meta: dict[str, str] | None, path="file") -> list[TargetSpec]:
    """The factorized targets a file records ([] for a plain safetensors file)."""
    if not meta or meta.get("format") != FORMAT:
        return []
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise FormatError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{path} uses lrcompress format {version}; this lrcompress {__version__} reads up to "
                          f"{FORMAT_VERSION}: upgrade lrcompress")
    try:
        records = json.loads(meta["targets"])
    except (KeyError, json.JSONDecodeError):
        raise FormatError(f"{path}: lrcompress metadata has no readable 'targets'") from None
    if not isinstance(records, list):
        raise FormatError(f"{path}: 'targets' metadata is not a list")
    return [TargetSpec.from_dict(r) for r in records]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                    key: str | None = None) -> tuple[dict[str, Tensor] | nn.Module, dict[str, str]]:
    """A state dict (or, with ``trust_pickle``, a whole pickled module) and any metadata.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` unless ``trust_pickle`` (which runs the file's code).
    A checkpoint nesting its state dict under ``key`` (or ``state_dict``/``model_state_dict``/
    ``model``) is unwrapped.
    """
    path = _existing(path)
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        return _select(tensors, key, path), meta
    # A corrupt file can make torch warn before it fails: hold warnings back until the load works.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            if not trust_pickle and "Unsupported global" in str(exc):
                name = str(exc).split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in str(exc) else "objects"
                raise FormatError(f"{path} holds pickled {name} (a whole model?), not just tensors; if you trust "
                                  "it, pass --trust-pickle (unpickling runs code from the file)") from None
            raise FormatError(f"{path} is not a readable PyTorch file (corrupt or another format)") from None
        except Exception as exc:  # garbage bytes surface as IndexError, KeyError, EOFError, ... from the unpickler
            raise FormatError(f"{path} is not a readable PyTorch file ({_first_line(exc)})") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if isinstance(obj, nn.Module):
        return obj, {}
    if not isinstance(obj, dict):
        raise FormatError(f"{path} holds a {type(obj).__name__}, not a state dict or module")
    return _select(obj, key, path), {}


def _select(obj: dict, key: str | None, path) -> dict[str, Tensor]:
    if key is not None:
        if key not in obj:
            raise FormatError(f"{path} has no key {key!r} (top-level keys: {sorted(map(str, obj))[:10]})")
        obj = obj[key]
    elif not _is_state_dict(obj):
        nested = [k for k in COMMON_NESTING if isinstance(obj.get(k), dict) and _is_state_dict(obj[k])]
        if nested:
            obj = obj[nested[0]]
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise FormatError(f"{path} is not a state dict of tensors; name the entry that is with --key")
    return dict(obj)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                     for k, v in obj.items())


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                      force: bool = False) -> Path:
    """Write atomically (temporary file + rename); refuse to overwrite unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    if path.is_dir():
        raise LRCompressError(f"{path} is a directory")
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():  # safetensors refuses shared storage: copy repeats
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        os.close(fd)
        save_file(out, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        raise LRCompressError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
