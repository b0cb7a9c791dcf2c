"""Files: safetensors with the factorization in the metadata; a safe loading policy.

A compressed file holds the model's state dict with each factored weight ``<name>`` replaced by
``<name>.L``, ``<name>.R`` (and ``<name>.D``), or for another structure (Kronecker, tensor train,
orthogonal) by ``<name>.original0``, ``.original1``, ... and its buffers (``<name>.signs``), and
in its metadata ``format=lrcompress``, ``format_version``, ``lrcompress_version`` and ``targets``
(JSON list of ``TargetSpec``): enough to rebuild the factorization on a dense skeleton. A file
whose targets are all low rank is written as format 1, readable by every lrcompress; one with
another structure as format 2. See docs/format.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import structures
from .config import TargetSpec
from .convert import apply, factored_specs, factored_state_dict, storage_key, unwrap
from .errors import FormatError, LRCompressError, OutputExistsError
from .factorize import Factors
from .validate import SHARED_KEY, check_compressed, targets_from_metadata
from .version import __version__

FORMAT = "lrcompress"
# 2: records of structures other than low rank (``structure`` + ``options``, originals and buffers
# as tensors). Writers use the lowest version that holds the file's records (``format_version``).
FORMAT_VERSION = 2
_log = logging.getLogger(__name__)  # "lrcompress.io"


def save_model(model: nn.Module, path: str | os.PathLike, *, force: bool = False,
               metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (factors + dense rest) and its factorization to a safetensors file.

    No pickle: reload with ``load_model(skeleton, path)``. Written atomically. An existing file
    at ``path`` is replaced only with ``force=True``; otherwise ``OutputExistsError`` and
    nothing is written. A wrapped model (DataParallel/DDP, ``torch.compile``) is saved under the
    names of the module it wraps, so the file loads into the plain class; the removed prefix is
    recorded as metadata ``wrapper_prefix``.
    """
    inner, prefix = unwrap(model)
    meta = dict(metadata or {})
    if prefix:
        meta.setdefault("wrapper_prefix", prefix)
    return write_compressed(factored_state_dict(inner), factored_specs(inner), path, force=force, metadata=meta)


def write_compressed(tensors: dict[str, Tensor], specs: list[TargetSpec], path: str | os.PathLike, *,
                     force: bool = False, metadata: dict[str, str] | None = None) -> Path:
    meta = dict(metadata or {})
    meta.update(format=FORMAT, format_version=str(format_version(specs)), lrcompress_version=__version__,
                targets=json.dumps([s.to_dict() for s in specs]))
    return write_safetensors(tensors, path, metadata=meta, force=force)


def format_version(specs: list[TargetSpec]) -> int:
    """The lowest format version that records ``specs``: 1 when every target is low rank (so older
    lrcompress reads the file), 2 with any other structure."""
    return 1 if all(s.lowrank for s in specs) else 2


def load_model(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
               prefix: str | None = None) -> nn.Module:
    """Load a file written by ``save_model`` (or ``lrcompress convert``) into a dense skeleton.

    The factorizations recorded in the file are registered on ``model`` (no SVD is run), then
    every tensor is loaded. Everything is checked first: on a mismatch nothing is changed.
    A plain (dense) safetensors file is loaded as an ordinary state dict. Returns ``model``.

    A wrapped ``model`` (DataParallel/DDP, ``torch.compile``) is loaded through the module it
    wraps. When the file's keys and the model's differ by a prefix, ``prefix=None`` finds it:
    the file's keys under a prefix (a Lightning-style ``model.``), which is removed, or the
    model's keys under one (a container around the saved net), whose submodule is loaded. The
    match is logged on the ``lrcompress`` logger (INFO). Two fitting prefixes, or a mismatch no
    prefix mends, raise ``FormatError`` naming the candidates. ``prefix="model."`` removes that
    prefix from the file's keys; ``prefix=""`` takes the keys as they are.
    """
    tensors, meta = read_safetensors(path)
    specs = check_compressed(tensors, meta, path)  # metadata against tensors, before anything is computed
    factors = {spec.name: stored_factors(spec, {part: tensors.pop(key) for part, key in spec.factor_keys().items()})
               for spec in specs}  # low-rank Factors, or another structure's module and originals
    target, tensors, specs, factors = _align_keys(model, tensors, specs, factors, prefix, strict, path)
    # A skeleton built factored (e.g. LowRankGRU) already carries some factorizations: they
    # must be the recorded ones, and then only their values are loaded.
    existing = {s.name: s for s in factored_specs(target)}
    for spec in specs:
        if spec.name in existing and existing[spec.name] != spec:
            raise FormatError(f"{path}: {spec.name} is factored as {_describe(existing[spec.name])} in the model "
                              f"but as {_describe(spec)} in the file")
    factor_keys = {k for s in existing.values() for k in s.factor_keys().values()}
    _check_rest(target, tensors, {s.name for s in specs} | factor_keys, strict, path)
    apply(target, [s for s in specs if s.name not in existing], factors)
    target.load_state_dict(tensors, strict=False)
    modules = dict(target.named_modules())
    with torch.no_grad():
        for spec in (s for s in specs if s.name in existing):
            originals = modules[spec.module].parametrizations[spec.weight]
            for i, t in enumerate(_parts(factors[spec.name])):
                getattr(originals, f"original{i}").copy_(t)
            if isinstance(factors[spec.name], structures.Fitted):  # buffers too (an orthogonal weight's signs)
                live = structures.persistent_buffers(originals[0])
                for key, t in structures.persistent_buffers(factors[spec.name].param).items():
                    live[key].copy_(t)
    return model


def stored_factors(spec: TargetSpec, parts: dict[str, Tensor]) -> Factors | structures.Fitted:
    """One weight's tensors from a file, ``{part: tensor}`` keyed as ``spec.factor_shapes()``, as
    ``convert.apply`` takes them: low-rank ``Factors``, or another structure's ``Fitted`` (its
    module with the buffers loaded, and its originals). The tensors were checked by
    ``validate.check_compressed``."""
    if spec.lowrank:
        return Factors(*parts.values())
    return structures.from_parts(spec.structure, spec.gates, spec.rows, spec.cols, spec.options, parts)


def _parts(f: Factors | structures.Fitted) -> tuple[Tensor, ...]:
    if isinstance(f, structures.Fitted):
        return f.originals
    return (f.L, f.R) if f.D is None else (f.L, f.R, f.D)


def _describe(spec: TargetSpec) -> str:
    if not spec.lowrank:
        return f"{spec.structure} ({spec.describe()})"
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


def _align_keys(model: nn.Module, tensors: dict[str, Tensor], specs: list[TargetSpec], factors: dict[str, Factors],
                prefix: str | None, strict: bool, path) -> tuple[nn.Module, dict[str, Tensor], list[TargetSpec],
                                                             dict[str, Factors]]:
    """The module to load into and the file's contents renamed to its keys (see ``load_model``).

    Keys are compared as "logical" names: a factored weight counts as ``<module>.<weight>``, in
    the file (``.L``/``.R``/``.D``) as in the model (``parametrizations.<weight>.original*``).
    """
    inner, wrapper = unwrap(model)
    file_keys = set(tensors) | {s.name for s in specs}
    if prefix is None:
        strip, into = _find_prefix(inner, file_keys, {s.name for s in specs}, strict, path)
    else:
        outside = sorted(k for k in file_keys if not k.startswith(prefix))
        if outside:
            raise FormatError(f"{path}: prefix {prefix!r} given, but key {outside[0]!r} does not start with it")
        strip, into = prefix, ""
    if wrapper or strip or into:
        _log.info("%s: loaded%s%s%s", path, f" into the module wrapped as {wrapper!r}" if wrapper else "",
                  f" with prefix {strip!r} removed from the file's keys" if strip else "",
                  f" into submodule {into!r} (prefix {into + '.'!r} added to the file's keys)" if into else "")
    if not strip:
        return inner.get_submodule(into), tensors, specs, factors
    n = len(strip)
    tensors = {k[n:]: t for k, t in tensors.items() if k.startswith(strip)}
    factors = {name[n:]: f for name, f in factors.items()}
    specs = [replace(s, module=s.module[n:] if s.module.startswith(strip) else "") for s in specs]
    return inner, tensors, specs, factors


def _find_prefix(model: nn.Module, file_keys: set[str], spec_names: set[str], strict: bool, path) -> tuple[str, str]:
    """``(prefix to remove from the file's keys, submodule to load into)``; ``("", "")`` when none is needed.

    Strict: the renamed keys must equal the model's exactly. Lenient: the most keys must match
    and every factored weight must land on one of the model's weights.
    """
    model_keys = _logical_keys(model)
    if file_keys == model_keys or (not strict and file_keys <= model_keys):
        return "", ""
    options = {}  # (strip, into) -> (file keys renamed, keys they must match)
    for p in _dotted_prefixes(file_keys, common=strict):
        options[p, ""] = ({k[len(p):] for k in file_keys if k.startswith(p)}, model_keys)
    for p in _dotted_prefixes(model_keys, common=strict):
        options["", p[:-1]] = (file_keys, {k[len(p):] for k in model_keys if k.startswith(p)})
    if strict:
        fits = [o for o, (renamed, keys) in options.items() if renamed == keys]
    else:
        def score(o):
            renamed, keys = options[o]
            lands = {s[len(o[0]):] for s in spec_names if s.startswith(o[0])} <= keys
            return len(renamed & keys) if lands else 0

        best = max(map(score, options), default=0)
        fits = [o for o in options if best > len(file_keys & model_keys) and score(o) == best]
    if len(fits) == 1:
        return fits[0]
    shown = ", ".join(repr(s or f"{i}.") for s, i in (fits or options))
    if len(fits) > 1:
        raise FormatError(f"{path}: key prefixes {shown} all align the file with the model; pass prefix= to choose")
    if options and strict:
        missing, unexpected = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
        raise FormatError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                          f"and no key prefix aligns them (tried {shown})")
    return "", ""


def _logical_keys(model: nn.Module) -> set[str]:
    """The model's state-dict keys, each factored weight named ``<module>.<weight>`` once."""
    existing = factored_specs(model)
    factor_keys = {k for s in existing for k in s.factor_keys().values()}
    return {k for k in factored_state_dict(model) if k not in factor_keys} | {s.name for s in existing}


def _dotted_prefixes(keys: set[str], *, common: bool) -> list[str]:
    """Module-path prefixes (``"a."``, ``"a.b."``) of the keys: shared by all of them, or of any of them."""
    per_key = [{".".join(k.split(".")[:i]) + "." for i in range(1, k.count(".") + 1)} for k in keys]
    found = set.intersection(*per_key) if common and per_key else set().union(*per_key)
    return sorted(found)


def specs_from_metadata(meta: dict[str, str] | None, path="file") -> list[TargetSpec]:
    """The factorized targets a file records ([] for a plain safetensors file), each record checked.

    Metadata only; ``validate.check_compressed`` also checks the tensors (see there).
    """
    return targets_from_metadata(meta, path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                      force: bool = False) -> Path:
    """Write ``tensors`` (+ string ``metadata``) to ``path`` atomically; never overwrite unless ``force``.

    See ``write_atomic``: of two writers racing to one new name exactly one succeeds, the other
    gets ``OutputExistsError``. Raises ``LRCompressError`` when the folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise LRCompressError(f"cannot write {path}: it is a directory")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    views: dict[tuple, str] = {}  # the same view of the same memory -> its first key
    shared: dict[str, str] = {}
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        view = storage_key(t)
        if view is not None:
            if view in views:
                shared[k] = views[view]  # a tied weight: stored twice, recorded once
            else:
                views[view] = k
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t  # safetensors refuses shared storage
        seen.add(ptr)
    if shared:
        metadata = {**(metadata or {}), SHARED_KEY: json.dumps(shared)}
    return write_atomic(path, lambda tmp: save_file(out, tmp, metadata=metadata), force=force)


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    """``write_atomic`` for a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), force=force)


# Temporary files: ".<name>.<host>-<pid>-<random>.lrc-tmp" beside the output. The host and PID
# of the writer let a later writer tell a temporary left by a killed run from one being written.
TEMP_SUFFIX = ".lrc-tmp"
_TEMP_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def write_atomic(path: str | os.PathLike, write, *, force: bool = False) -> Path:
    """Create ``path`` through ``write(temporary_path)``: readers see the old file or the whole new one.

    The temporary file lies in the same folder (created with the usual umask permissions), then
    is published: without ``force`` by ``os.link``, which fails when the name exists, so the
    file is created exclusively (``OutputExistsError``: another writer won); with ``force`` by
    ``os.replace``. The temporary is removed on every exit path; one left by a process killed
    with SIGKILL is removed by the next write into that folder (``sweep_temporaries``).
    Raises ``LRCompressError`` on an OS error (read-only folder, disk full, ...).
    """
    path = Path(path)
    folder = path.parent
    sweep_temporaries(folder)
    tmp = folder / f".{path.name[:80]}.{_writer_tag()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    created = False
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        created = True
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 less the umask, as for any new file
        write(str(tmp))
        os.chmod(tmp, mode)  # the writer may have re-created it 0o600 (safetensors does)
        _publish(tmp, path, force)
    except OSError as exc:
        raise LRCompressError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return path


def _publish(tmp: Path, path: Path, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists: an exclusive create of the whole file
        return
    except FileExistsError:
        raise OutputExistsError(f"{path} exists; pass --force (force=True from Python) to overwrite it") \
            from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    # No hard links on this filesystem (FAT, some network mounts): reserve the name exclusively,
    # then rename the finished file over the reservation.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise OutputExistsError(f"{path} exists; pass --force (force=True from Python) to overwrite it") \
            from None
    os.replace(tmp, path)


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed lrcompress writers on this host left in ``folder``.

    Only names of lrcompress's own pattern whose writer PID no longer runs are removed; a
    temporary of a live writer, or of another host (a shared network folder), is kept. Returns
    the removed paths.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when that cannot be told)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a file; a directory is an ``LRCompressError``, nothing a
    ``FileNotFoundError`` (both one line in the CLI)."""
    path = Path(path)
    if path.is_dir():
        raise LRCompressError(f"{path} is a directory; give a model file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
