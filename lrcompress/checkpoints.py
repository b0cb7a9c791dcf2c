"""Reading trained checkpoints the way users have them, without running code from the file.

``read_checkpoint`` recognises the file by its CONTENT (extensions lie): safetensors, a torch zip
(``torch.save``), a legacy torch pickle, a NumPy ``.npz``, a TorchScript archive. It then finds
the state dict inside (Lightning ``.ckpt``, ``{"model": ...}``, ``{step, model_state, ...}``),
and normalises the keys before target recognition, in this order:

1. non-tensor entries of the state dict are dropped (with a warning);
2. wrapper prefixes present on every key (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
   ``torch.compile``) are stripped; the removed prefix is reported as ``wrapper_prefix``;
3. the user's ``rename`` rules (``re.sub`` on each full key, in order) are applied;
4. weight-normalised weights (``<w>_g``/``<w>_v`` or ``parametrizations.<w>.original0/1``) are
   folded into the plain ``<w>`` the model computes with.

What each load can execute: safetensors and ``.npz`` (``allow_pickle=False``) run nothing;
torch files are read with ``torch.load(weights_only=True)``, which rebuilds only tensors and
plain containers. Classes a training framework pickled next to the weights (Lightning's
``AttributeDict`` hyper-parameters, callback states, ``argparse.Namespace``) are replaced by
inert placeholders (never imported, never called), and only when they lie outside the chosen
state dict. ``trust_pickle=True`` alone runs code: full unpickling (``weights_only=False``) or
``torch.jit.load`` of a TorchScript archive. See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, FormatError
from .io import existing_file, read_safetensors, specs_from_metadata

COMMON_NESTING = ("state_dict", "model_state_dict", "model")  # checked in this order
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
# Metadata keys ``read_checkpoint`` adds that belong in a converted file (``convert`` records them).
READ_METADATA_KEYS = ("source_format", "wrapper_prefix", "weight_norm_folded")
_PLACEHOLDER = "_lrcompress_placeholder_for"  # marks an inert stand-in for a pickled class
_MAX_GLOBALS = 64
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_WN_PARAM = re.compile(r"^(?:(?P<module>.+)\.)?parametrizations\.(?P<weight>[^.]+)\.original0$")


# ----------------------------------------------------------------------------- public entry point


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False, key: str | None = None,
                    rename: Iterable[str | tuple[str, str]] = ()
                    ) -> tuple[dict[str, Tensor] | nn.Module, dict[str, str]]:
    """A state dict (or, with ``trust_pickle``, a whole pickled module) and metadata about it.

    ``path`` is a file or a Hugging Face model directory (``read_model_directory``: one weights
    file, a sharded index, or ``pytorch_model.bin``).
    ``key`` names the entry of a checkpoint dict holding the state dict (found automatically
    otherwise, see ``select_state_dict``). ``rename``: rules ``"REGEX=REPLACEMENT"`` or
    ``(regex, replacement)`` applied in order to every key (``rename_keys``).

    The metadata holds a safetensors file's own metadata plus ``source_format`` (``safetensors``,
    ``torch-zip``, ``torch-pickle``, ``numpy-npz``, ``torchscript``), ``wrapper_prefix`` (the
    removed ``module.``/``_orig_mod.`` prefix, when one was) and ``weight_norm_folded`` (JSON list
    of the weights folded from weight norm, when any). A compressed lrcompress file is returned
    as stored. Raises ``FormatError`` (one line naming the file) for anything unreadable,
    ``ConfigError`` for a bad rename rule, ``FileNotFoundError`` for a missing file.
    """
    path = Path(path)
    rules = [parse_rename(r) if isinstance(r, str) else _compiled(*r) for r in rename]
    if path.is_dir():
        obj, meta, kind = read_model_directory(path, trust_pickle=trust_pickle)
    else:
        path = existing_file(path)
        obj, meta, kind = read_file(path, trust_pickle)
    if specs_from_metadata(meta, path):  # already compressed: the names are the file format's
        if rules:
            raise ConfigError(f"--rename applies to dense checkpoints; {path} is already compressed")
        return obj, meta
    meta = {**{k: v for k, v in meta.items() if k not in READ_METADATA_KEYS}, "source_format": kind}  # no stale notes
    if isinstance(obj, nn.Module) and not rules:
        return obj, meta  # a trusted whole module: compressed as a module
    state = select_state_dict(obj.state_dict() if isinstance(obj, nn.Module) else obj, key, path)
    state, prefix = strip_wrapper_prefixes(state)
    if prefix:
        meta["wrapper_prefix"] = prefix
    state = _renamed(state, rules, path)
    state, folded = fold_weight_norm(state, path)
    if folded:
        meta["weight_norm_folded"] = json.dumps(folded)
    return state, meta


def read_file(path: Path, trust_pickle: bool) -> tuple[object, dict[str, str], str]:
    """What one checkpoint file holds, its safetensors metadata ({} for other kinds) and its kind."""
    kind = sniff(path)
    if kind == "safetensors":
        return (*read_safetensors(path), kind)
    if kind == "numpy-npz":
        return _read_npz(path), {}, kind
    if kind == "torchscript":
        return _read_torchscript(path, trust_pickle), {}, kind
    return _read_torch(path, trust_pickle), {}, kind


# The weights of a Hugging Face model directory, in the order transformers looks for them.
DIRECTORY_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def read_model_directory(path: str | os.PathLike, *, trust_pickle: bool = False
                         ) -> tuple[object, dict[str, str], str]:
    """The weights of a Hugging Face model directory: what it holds, its metadata and its kind.

    The first of ``DIRECTORY_WEIGHTS`` present is read: one file (by content, as ``read_checkpoint``
    reads files), or an index's ``weight_map`` with every shard (each must exist inside the
    directory and hold exactly the keys the index maps to it; shards are read weights-only).
    The kind is ``hf-directory/<file kind>`` or ``hf-directory/sharded``. Raises ``FormatError``
    for a directory with no weights, a broken index or a missing or disagreeing shard.
    """
    path = Path(path)
    found = next((path / name for name in DIRECTORY_WEIGHTS if (path / name).is_file()), None)
    if found is None:
        raise FormatError(f"{path} is a directory with no model weights (looked for {', '.join(DIRECTORY_WEIGHTS)})")
    if found.name.endswith(".index.json"):
        return _read_sharded(found), {}, "hf-directory/sharded"
    obj, meta, kind = read_file(found, trust_pickle)
    return obj, meta, f"hf-directory/{kind}"


def _read_sharded(index: Path) -> dict[str, Tensor]:
    from .validate import load_json  # validate is light; imported here to keep this module's imports as they were

    data = load_json(index.read_text(encoding="utf-8", errors="replace"), str(index), max_depth=8)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FormatError(f"{index} is a broken index: it needs a 'weight_map' object of tensor name -> shard file")
    state: dict[str, Tensor] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # every shard checked before any is read
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise FormatError(f"{index}: shard {shard[:80]!r} is not a file name inside {index.parent}")
        if not (index.parent / shard).is_file():
            raise FormatError(f"{index} maps tensors to shard {shard}, which is missing from {index.parent}")
    for shard in shards:
        obj, _, kind = read_file(index.parent / shard, trust_pickle=False)
        tensors = obj if kind == "safetensors" else select_state_dict(obj, None, index.parent / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        if extra or missing:
            raise FormatError(f"{index.parent / shard} disagrees with {index.name}: "
                              + "; ".join(filter(None, [missing and f"lacks {missing[:3]} the index maps to it",
                                                        extra and f"holds {extra[:3]} the index does not map"])))
        state.update(tensors)
    return state


def reading_metadata(meta: dict[str, str]) -> dict[str, str]:
    """The part of ``read_checkpoint``'s metadata a converted file records (see READ_METADATA_KEYS)."""
    return {k: meta[k] for k in READ_METADATA_KEYS if k in meta}


# ----------------------------------------------------------------------------- what the file is


def sniff(path: str | os.PathLike) -> str:
    """The checkpoint kind from the file's first bytes (and zip member names), never its extension.

    Returns ``safetensors``, ``torch-zip``, ``torchscript``, ``numpy-npz`` or ``torch-pickle``;
    raises ``FormatError`` saying what the file looks like otherwise.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    size = path.stat().st_size
    if len(head) > 8 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= min(size, 100_000_000):
        return "safetensors"  # 8-byte little-endian header length, then a JSON header
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head.startswith(b"\x80"):  # pickle protocol >= 2: what torch.save writes without zip
        return "torch-pickle"
    raise _not_readable(path, _looks_like(head))


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise _not_readable(path, f"a truncated or corrupt zip archive ({exc})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "numpy-npz"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise _not_readable(path, f"a zip archive that is no PyTorch, TorchScript or NumPy checkpoint "
                              f"(members: {shown or 'none'})")


def _looks_like(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"
    known = {b"\x93NUMPY": "a single NumPy array (.npy), not named weights", b"\x89HDF": "an HDF5 file (Keras?)",
             b"\x1f\x8b": "gzip-compressed data (decompress it first)", b"\x08": "protocol buffers (ONNX/TensorFlow?)"}
    for magic, what in known.items():
        if head.startswith(magic):
            return what
    text = head.decode("utf-8", errors="replace")
    if "\ufffd" not in text and all(c.isprintable() or c.isspace() for c in text):
        if text.lstrip().lower().startswith(("<!doctype", "<html")):
            return "an HTML page (a failed download?)"
        return f"text starting {text.strip().splitlines()[0][:40]!r}" if text.strip() else "blank text"
    return f"unrecognised binary data (starts {head[:8].hex(' ')})"


def _not_readable(path: Path, what: str) -> FormatError:
    kind = "safetensors file" if path.suffix == ".safetensors" else "PyTorch file or other known checkpoint"
    return FormatError(f"{path} is not a readable {kind}: it looks like {what}")


# ----------------------------------------------------------------------------- loaders


def _read_npz(path: Path) -> dict[str, object]:
    """Arrays of a NumPy ``.npz`` as tensors; no pickle (object arrays are refused)."""
    out: dict[str, object] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                try:
                    array = npz[name]
                except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
                    if "allow_pickle" not in str(exc):
                        raise FormatError(f"{path}: array {name!r} is unreadable ({_first_line(exc)})") from None
                    raise FormatError(f"{path}: array {name!r} is an object array (pickled Python objects), "
                                      "which lrcompress never unpickles") from None
                out[name] = _as_tensor(array)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise FormatError(f"{path} is not a readable NumPy .npz file ({_first_line(exc)})") from None
    return out


def _as_tensor(array: np.ndarray) -> object:
    """A tensor copy of ``array`` (native byte order), or the array itself when torch has no such dtype."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(array)).clone()
    except TypeError:  # strings, structured records: dropped later as non-tensor entries
        return array


def _read_torchscript(path: Path, trust_pickle: bool) -> dict[str, Tensor]:
    if not trust_pickle:
        raise FormatError(f"{path} is a TorchScript archive (torch.jit.save); loading it deserializes TorchScript "
                          "code; pass --trust-pickle if you trust the file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates torch.jit.*
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # RuntimeError from the TorchScript deserializer, among others
        raise FormatError(f"{path} is not a readable TorchScript archive ({_first_line(exc)})") from None
    # A ScriptModule is no nn.GRU: its parameters are read as a bare state dict, as inspect shows them.
    return {k: v.detach() for k, v in scripted.state_dict().items()}


def _read_torch(path: Path, trust_pickle: bool) -> object:
    """``torch.load``: full unpickling only with ``trust_pickle``, else weights only (+ inert placeholders)."""
    if trust_pickle:
        return _quiet_load(path, weights_only=False)
    try:
        return _quiet_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if _unsupported_global(exc) is None:  # corrupt, or a pickle that would call code: say both
            raise FormatError(f"{path} is not a readable PyTorch file: the safe loader refused it "
                              f"({_first_line(exc)}); it is corrupt, another format, or a pickle that runs code "
                              "(--trust-pickle loads it fully, only if you trust the file)") from None
        return _load_with_placeholders(path, exc)


def _quiet_load(path: Path, *, weights_only: bool) -> object:
    """``torch.load`` on CPU; a corrupt file can make torch warn before it fails, so warnings are
    held back until the load works. Unpickling errors propagate; anything else is a FormatError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # An open file, not the path: torch picks its reader by the name's suffix (a torch file
            # named .safetensors would be read as safetensors); the kind here comes from content.
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError:
            if weights_only:
                raise
            raise FormatError(f"{path} is not a readable PyTorch file (corrupt or another format)") from None
        except Exception as exc:  # garbage bytes surface as IndexError, KeyError, EOFError, ... from the unpickler
            raise FormatError(f"{path} is not a readable PyTorch file ({_first_line(exc)})") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def _load_with_placeholders(path: Path, first: pickle.UnpicklingError) -> object:
    """Weights-only load with an inert placeholder registered for every class the file names.

    Uses ``torch.serialization.safe_globals`` with ``(object, "module.Name")`` pairs (torch >= 2.5):
    the weights-only unpickler then builds the placeholder instead of importing the class.
    """
    name = _unsupported_global(first)
    if torch.__version__ < "2.5":  # no (object, name) pairs, no get_unsafe_globals_in_checkpoint
        raise _needs_code(path, name)
    names = {name}
    if zipfile.is_zipfile(path):  # every class name in one pass over data.pkl
        names.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    for _ in range(_MAX_GLOBALS):  # a legacy pickle reveals its classes one failed load at a time
        with torch.serialization.safe_globals([(_placeholder(n), n) for n in sorted(names)]):
            try:
                return _quiet_load(path, weights_only=True)
            except pickle.UnpicklingError as exc:  # e.g. a blocked module (os, sys, ...)
                name = _unsupported_global(exc)
                if name is None or name in names:
                    raise _needs_code(path, name or _first_line(exc)) from None
                names.add(name)
    raise _needs_code(path, name)


def _placeholder(name: str) -> type:
    """An inert stand-in for the class ``name``: whatever the pickle constructs becomes an empty
    ``OrderedDict`` (the only non-dict type the weights-only unpickler fills both by items and by
    attributes) marked with ``name``. Nothing of the real class is imported or run."""
    def __new__(cls, *args, **kwargs):
        stub: OrderedDict = OrderedDict()
        stub.__dict__[_PLACEHOLDER] = name
        return stub

    module, _, qualname = name.rpartition(".")
    return type(qualname or name, (), {"__new__": __new__, "__module__": module or "builtins"})


def _placeholder_name(obj: object) -> str | None:
    return getattr(obj, "__dict__", {}).get(_PLACEHOLDER) if isinstance(obj, OrderedDict) else None


def _unsupported_global(exc: BaseException) -> str | None:
    match = _UNSUPPORTED_GLOBAL.search(str(exc))
    return match.group(1) if match else None


def _needs_code(path: Path, name: str | None) -> FormatError:
    return FormatError(f"{path} holds pickled {name or 'objects'} (a whole model?), not just tensors, which cannot be "
                       "read without running code; if you trust it, pass --trust-pickle (unpickling runs code from "
                       "the file)")


# ----------------------------------------------------------------------------- finding the state dict


def select_state_dict(obj: object, key: str | None = None, path: str | os.PathLike = "checkpoint"
                      ) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint ``obj``.

    ``key`` picks a top-level entry. Otherwise: a dict whose entries are tensors is the state dict;
    a dict holding state dicts picks ``state_dict``, ``model_state_dict`` or ``model`` (in that
    order), else its only entry that holds tensors; several candidates -> ``FormatError`` listing
    them. The search continues inside the chosen entry. Non-tensor values of the state dict are
    dropped with a warning; a placeholder for a pickled class inside it is refused.
    """
    trail = ""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            top = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
            raise FormatError(f"{path} has no key {key!r} (top-level keys: {top})")
        obj, trail = obj[key], key
    for _ in range(8):  # nesting depth
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if _placeholder_name(obj):
            raise _needs_code(Path(path), _placeholder_name(obj))
        if not isinstance(obj, dict):
            raise FormatError(f"{path}{_at(trail)} holds a {type(obj).__name__}, not a state dict or module")
        nested = [k for k, v in obj.items() if _holds_tensors(v) or isinstance(v, nn.Module)]
        if not nested:
            return _tensors_only(obj, path, trail)
        common = [k for k in COMMON_NESTING if k in nested]
        if not common and len(nested) > 1:
            listed = ", ".join(map(repr, nested))
            raise FormatError(f"{path}{_at(trail)} holds several entries with tensors ({listed}); "
                              "name the state dict with --key")
        chosen = common[0] if common else nested[0]
        obj, trail = obj[chosen], f"{trail}.{chosen}" if trail else str(chosen)
    raise FormatError(f"{path}: state dict nested too deeply; name it with --key")


def _any_tensor(value: object, depth: int = 8) -> bool:
    """Whether a tensor sits anywhere in ``value`` (dicts, lists and tuples, ``depth`` levels)."""
    if isinstance(value, Tensor):
        return True
    if depth and isinstance(value, dict):
        return any(_any_tensor(v, depth - 1) for v in value.values())
    if depth and isinstance(value, (list, tuple)):
        return any(_any_tensor(v, depth - 1) for v in value)
    return False


def _holds_tensors(value: object) -> bool:
    return isinstance(value, dict) and any(isinstance(v, Tensor) for v in value.values())


def _tensors_only(obj: dict, path, trail: str) -> dict[str, Tensor]:
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        if not _any_tensor(obj):
            raise FormatError(f"{path}{_at(trail)} holds no tensors (an empty state dict?): nothing to convert")
        raise FormatError(f"{path}{_at(trail)} is not a state dict of tensors; name the entry that is with --key")
    for k, v in obj.items():
        if _placeholder_name(v):
            raise FormatError(f"{path}: state dict entry {k!r} is a pickled {_placeholder_name(v)}, which cannot be "
                              "read without running code; if you trust the file, pass --trust-pickle")
    dropped = [repr(k) for k in obj if k not in state]
    if dropped:
        warnings.warn(f"{path}: ignored {len(dropped)} non-tensor state dict entries "
                      f"({', '.join(dropped[:5])}{', ...' if len(dropped) > 5 else ''})", UserWarning, stacklevel=3)
    return state


def _at(trail: str) -> str:
    return f" (entry {trail!r})" if trail else ""


# ----------------------------------------------------------------------------- key normalisation


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Remove ``module.``/``_orig_mod.`` while EVERY key starts with one (repeats and mixes too).

    Returns the new dict and the removed prefix (``""`` if none), e.g. ``"_orig_mod.module."``.
    """
    removed = ""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) and len(k) > len(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        removed += prefix
    return state, removed


def parse_rename(rule: str) -> tuple[re.Pattern, str]:
    """``"REGEX=REPLACEMENT"`` split at the first unescaped ``=`` outside a ``(?=``, ``(?<=``,
    ``(?P=`` group opener; write a literal ``=`` in the regex as ``\\=``. Raises ``ConfigError``."""
    for i, c in enumerate(rule):
        if c == "=" and not _escaped(rule, i) and not re.search(r"\(\?(<|P)?$", rule[:i]):
            return _compiled(rule[:i], rule[i + 1:], rule)
    raise ConfigError(f"--rename needs REGEX=REPLACEMENT, got {rule!r}")


def _escaped(text: str, i: int) -> bool:
    slashes = len(text[:i]) - len(text[:i].rstrip("\\"))
    return slashes % 2 == 1


def _compiled(pattern: str, replacement: str, rule: str | None = None) -> tuple[re.Pattern, str]:
    if not pattern:
        raise ConfigError(f"--rename needs REGEX=REPLACEMENT, got {rule or '=' + replacement!r}")
    try:
        return re.compile(pattern), replacement
    except re.error as exc:
        raise ConfigError(f"--rename: bad regular expression {pattern!r} ({exc})") from None


def rename_keys(state: dict[str, Tensor], rules: Iterable[str | tuple[str, str]]) -> dict[str, Tensor]:
    """Apply ``rules`` in order to every key with ``re.sub(regex, replacement, key)``.

    Each rule is ``"REGEX=REPLACEMENT"`` (``parse_rename``) or ``(regex, replacement)``. The regex
    is searched anywhere in the full key and every match is replaced (anchor with ``^``/``$``);
    the replacement may use ``\\1`` or ``\\g<name>``. Raises ``ConfigError`` for a bad rule,
    ``FormatError`` when two keys end up with one name.

    >>> list(rename_keys({"enc_w_hh": torch.zeros(1)}, [r"^enc_w_(hh|ih)$=enc.weight_\\1_l0"]))
    ['enc.weight_hh_l0']
    """
    compiled = [parse_rename(r) if isinstance(r, str) else _compiled(*r) for r in rules]
    return _renamed(state, compiled, "state dict")


def _renamed(state: dict[str, Tensor], rules: list[tuple[re.Pattern, str]], path) -> dict[str, Tensor]:
    if not rules:
        return state
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in rules:
            try:
                new = pattern.sub(replacement, new)
            except (re.error, IndexError) as exc:
                raise ConfigError(f"--rename: bad replacement {replacement!r} for {pattern.pattern!r} "
                                  f"({exc})") from None
        if new in out:
            raise FormatError(f"{path}: renaming maps both {source[new]!r} and {key!r} to {new!r}")
        out[new], source[new] = value, key
    return out


def fold_weight_norm(state: dict[str, Tensor], path: str | os.PathLike = "state dict"
                     ) -> tuple[dict[str, Tensor], list[str]]:
    """Replace weight-norm pairs by the weight they define, ``w = g * v / ||v||``.

    Pairs: ``<w>_g`` + ``<w>_v`` (``torch.nn.utils.weight_norm``) and
    ``<m>.parametrizations.<w>.original0`` (g) + ``.original1`` (v)
    (``torch.nn.utils.parametrizations.weight_norm``). The norm runs over every dim of ``v``
    except ``dim``, read off ``g``'s shape (size 1 everywhere but ``dim``; a scalar ``g`` means
    ``dim=None``, the whole tensor), computed by ``torch._weight_norm`` as torch does. Returns
    the new dict (key order kept, the weight where ``g`` was) and the folded weight names.
    Raises ``FormatError`` naming the keys of a pair that is no weight norm.
    """
    pairs = {}  # g key -> (weight name, v key)
    for key in state:
        match = _WN_PARAM.match(key)
        if match:
            base = key[: -len("original0")]
            module, weight = match["module"], match["weight"]
            pairs[key] = (f"{module}.{weight}" if module else weight, base + "original1")
            extra = sorted(k for k in state if k.startswith(base) and k not in (key, base + "original1"))
            if extra or base + "original1" not in state:
                raise FormatError(f"{path}: {key} is not part of a plain weight norm "
                                  f"(next to {extra[:3] or 'no original1'}); lrcompress folds only weight norm")
        elif key.endswith("_g") and key[:-2] + "_v" in state:
            pairs[key] = (key[:-2], key[:-2] + "_v")
    if not pairs:
        return state, []
    out: dict[str, Tensor] = {}
    v_keys = {v for _, v in pairs.values()}
    for key, value in state.items():
        if key in pairs:
            name, v_key = pairs[key]
            if name in state:
                raise FormatError(f"{path}: holds both {name} and its weight-norm pair {key}, {v_key}")
            out[name] = _fold(value, state[v_key], key, v_key, path)
        elif key not in v_keys:
            out[key] = value
    return out, [name for name, _ in pairs.values()]


def _fold(g: Tensor, v: Tensor, g_key: str, v_key: str, path) -> Tensor:
    dim = _norm_dim(g, v)
    if dim is None:
        raise FormatError(f"{path}: cannot fold weight norm {g_key} {tuple(g.shape)} with {v_key} {tuple(v.shape)}: "
                          "g must be a scalar or match v along one dim and be 1 elsewhere")
    with torch.no_grad():
        return torch._weight_norm(v, g, dim).contiguous()


def _norm_dim(g: Tensor, v: Tensor) -> int | None:
    """The ``dim`` of ``torch._weight_norm`` for this g/v pair (-1: the whole tensor), None if none fits."""
    if g.dim() == 0:
        return -1
    if g.dim() != v.dim():
        return None
    kept = [d for d in range(g.dim()) if g.shape[d] != 1]
    if not kept:  # all ones: the kept dim has size 1 in v too (any such dim gives the same norm)
        ones = [d for d in range(v.dim()) if v.shape[d] == 1]
        return ones[0] if ones else None
    if len(kept) == 1 and g.shape[kept[0]] == v.shape[kept[0]]:
        return kept[0]
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].split(" (Could this error message be improved?")[0] if text else ""  # torch's plea, not ours
    return line[:200] or type(exc).__name__
