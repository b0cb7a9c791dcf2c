"""Model directories in the Hugging Face layout: ``save_pretrained`` / ``from_pretrained`` and the CLI's directories.

A compressed model directory holds

- ``config.json``: the model's Hugging Face config (when it has one), plus a ``transformers_weights``
  entry that makes ``transformers``' own ``from_pretrained`` refuse the directory loudly instead of
  loading random weights where the factors are (transformers >= 4.51 reads that entry; older
  versions refuse the safetensors file, whose metadata ``format`` is ``lrcompress``, not ``pt``);
- ``model.safetensors``: the lrcompress format (docs/format.md): factors, dense rest, records;
- ``lrcompress_config.json``: the compression config, the target records and the counts;
- ``README.md``: a model card (source, the rank -- or structure and options -- of every factored
  weight, parameters before/after, metrics).

``model.safetensors`` is written last, after the old one is removed, so a crash never leaves a
directory that looks complete. transformers is never imported here: models are duck-typed
(a ``.config`` with ``to_dict``), and Hugging Face classes come from the caller. See docs/huggingface.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from . import structures
from .config import ALL_LINEAR, CompressionConfig, TargetSpec
from .convert import count_params, factored_specs, factored_state_dict, merge_state_dict, unwrap
from .errors import ConfigError, FormatError, LRCompressError, OutputExistsError, TargetError
from .io import (FORMAT, FORMAT_VERSION, format_version, load_model, read_safetensors, specs_from_metadata,
                 write_compressed, write_safetensors, write_text_atomic)
from .jsonout import dumps  # strict JSON
from .report import Report
from .structures import LOWRANK
from .validate import check_compressed, load_json
from .version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LRC_CONFIG_NAME = "lrcompress_config.json"
CARD_NAME = "README.md"
OUR_FILES = (CONFIG_NAME, LRC_CONFIG_NAME, CARD_NAME, WEIGHTS_NAME)
# transformers >= 4.51 loads the file a config's "transformers_weights" names and refuses any name
# that is no *.safetensors: the refusal quotes this text, so the user learns what to call instead.
HF_REFUSAL = ("lrcompress factored weights -- load this directory with lrcompress.from_pretrained(cls, directory); "
              "transformers would fill the factored weights with random values")
_CARD_MARK = "<!-- lrcompress model card -->"
_log = logging.getLogger(__name__)
_ATTR_CONFIG = "_lrcompress_config"  # the CompressionConfig (dict) compress() used, recorded on the model


# ----------------------------------------------------------------------------- public API


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, force: bool = False,
                    metrics: dict[str, dict[str, float]] | None = None, source: str | None = None,
                    config: CompressionConfig | dict | None = None) -> Path:
    """Write ``model`` as a model directory that ``from_pretrained`` reads back exactly.

    ``directory`` gets ``config.json`` (when ``model.config`` is a Hugging Face config),
    ``model.safetensors`` (lrcompress format), ``lrcompress_config.json`` and a model card
    ``README.md``. ``metrics``: ``{stage: {metric: value}}``, e.g. ``{"dense": {"accuracy": 0.91},
    "fine-tuned": {"accuracy": 0.90}}``, shown in the card as a table. ``source``: where the
    model came from (a hub name, a path), shown in the card. ``config``: the compression config,
    by default the one ``compress`` recorded on the model.

    An existing directory is used only when it is empty or was written by lrcompress, or with
    ``force`` (then only these four files are replaced; other files stay). Raises
    ``OutputExistsError`` otherwise, ``LRCompressError`` when it cannot be written.

    >>> lrc.save_pretrained(model, "small-dir")   # doctest: +SKIP
    """
    inner, prefix = unwrap(model)
    specs = factored_specs(inner)
    after = count_params(inner)
    before = after + sum(s.dense_params - s.factored_params for s in specs)
    if config is None:
        config = getattr(inner, _ATTR_CONFIG, None)
    write_directory(directory, factored_state_dict(inner), specs, hf_config=hf_config_dict(inner),
                    config=config, params_before=before, params_after=after, source=source, metrics=metrics,
                    force=force, metadata={"wrapper_prefix": prefix} if prefix else None,
                    architecture=type(inner).__name__)
    return Path(directory)


def from_pretrained(cls_or_model: type | nn.Module, directory: str | os.PathLike, **kwargs) -> nn.Module:
    """Build a model and load a directory written by ``save_pretrained`` (or ``lrcompress convert``).

    ``cls_or_model``:

    - a Hugging Face class (``AutoModelForSequenceClassification``, a ``PreTrainedModel``
      subclass): the model is built from ``config.json`` (``from_config``, ``_from_config`` or
      ``cls(config)``; nothing is downloaded). ``kwargs`` that are config attributes
      (``num_labels=5``) update the config, as transformers' ``from_pretrained`` does;
      ``dtype``/``torch_dtype``/``attn_implementation`` go to that call; any other raises
      ``ConfigError``. As in transformers, a base model class (``AutoModel``) loads from a head
      model's directory (its ``base_model_prefix`` part; the head weights are left unused) and a
      head class from a base model's directory (the head keeps its fresh initial values);
    - any other ``nn.Module`` class: built as ``cls(**kwargs)``;
    - a model instance: loaded in place (no ``kwargs``).

    The factorizations recorded in ``model.safetensors`` are registered (no SVD) and every tensor
    loaded, so outputs equal the saved model's. Returned in eval mode, as transformers does.
    Raises ``FormatError`` for a directory without ``model.safetensors``, a file that does not
    match the model or a newer format.

    >>> again = lrc.from_pretrained(AutoModelForSequenceClassification, "small-dir")   # doctest: +SKIP
    """
    directory = Path(directory)
    weights = _weights_file(directory)
    _check_lrc_config(directory)
    if isinstance(cls_or_model, nn.Module):
        if kwargs:
            raise LRCompressError(f"from_pretrained: keyword arguments {sorted(kwargs)} need a class, not a model")
        model = cls_or_model
    elif isinstance(cls_or_model, type) or hasattr(cls_or_model, "from_config"):
        model = _build(cls_or_model, directory, kwargs)
        base = _base_model_from_head(model, directory, weights, kwargs)
        if base is not None:
            return base.eval()
    else:
        raise LRCompressError(f"from_pretrained needs a model class or an nn.Module, got {type(cls_or_model).__name__}")
    base = _base_part_for(model, weights)
    if base is None:
        load_model(model, weights)
    else:  # a head model from a base model's directory: its base part loaded, as transformers does
        load_model(base, weights)
        guard(model)  # the head model's save_pretrained must write the factors too
        _log.warning("%s: loaded a base model into the %r part of %s; its head keeps freshly initialised values",
                     directory, model.base_model_prefix, type(model).__name__)
    return model.eval()


# ----------------------------------------------------------------------------- the directory writer


def write_directory(directory: str | os.PathLike, tensors: dict[str, Tensor], specs: list[TargetSpec], *,
                    hf_config: dict | None, config: CompressionConfig | dict | None, params_before: int,
                    params_after: int, source: str | None = None, metrics: dict | None = None,
                    force: bool = False, metadata: dict[str, str] | None = None, architecture: str | None = None,
                    keep_card: bool = False) -> Path:
    """Write a compressed model directory (see the module docstring) from a file-format state dict.

    ``hf_config``: the Hugging Face config as a dict (``config.json``), or None. ``keep_card``:
    leave a ``README.md`` lrcompress did not write (``model.save_pretrained`` keeps a hub card).
    """
    directory = Path(directory)
    _prepare(directory, force)
    if isinstance(config, CompressionConfig):
        config = config.to_dict()
    ratio = params_before / params_after if params_after else float("inf")
    record = {"format": FORMAT, "format_version": format_version(specs), "lrcompress_version": __version__,
              "weights": WEIGHTS_NAME, "source": source, "config": config,
              "targets": [s.to_dict() for s in specs], "params_before": params_before,
              "params_after": params_after, "ratio": ratio, "metrics": metrics or {}}
    weights = directory / WEIGHTS_NAME
    if weights.exists():  # gone first: a crash below leaves no directory that looks complete
        weights.unlink()
    hf = None
    if hf_config is not None:
        hf = dict(hf_config)
        if architecture and not hf.get("architectures"):
            hf["architectures"] = [architecture]
        if specs:  # a model without factors loads fine in transformers
            hf["transformers_weights"] = HF_REFUSAL
        write_text_atomic(directory / CONFIG_NAME, dumps(hf, indent=2, sort_keys=True) + "\n", force=True)
    write_text_atomic(directory / LRC_CONFIG_NAME, dumps(record, indent=2) + "\n", force=True)
    card = directory / CARD_NAME
    if not (keep_card and card.exists() and not _ours(card)):
        write_text_atomic(card, model_card(record, directory.name, hf), force=True)
    write_compressed(tensors, specs, weights, force=True, metadata=metadata)
    return directory


def _prepare(directory: Path, force: bool) -> None:
    """Create ``directory``, or accept it: empty, written by lrcompress, or ``force``."""
    if directory.exists() and not directory.is_dir():
        raise LRCompressError(f"cannot write the model directory {directory}: it is a file")
    if directory.is_dir():
        if not force and any(directory.iterdir()) and not written_by_lrcompress(directory):
            raise OutputExistsError(f"{directory} exists and was not written by lrcompress; pass --force "
                                    f"(force=True) to write {', '.join(OUR_FILES)} into it")
        return
    if not directory.parent.is_dir():
        raise LRCompressError(f"cannot write {directory}: {directory.parent} does not exist")
    try:
        directory.mkdir()
    except FileExistsError:
        pass  # made meanwhile: an empty folder is fine
    except OSError as exc:
        raise LRCompressError(f"cannot write {directory}: {exc.strerror or exc}") from None


def written_by_lrcompress(directory: Path) -> bool:
    """Whether lrcompress wrote ``directory``: a compressed model directory (``lrcompress_config.json``)
    or a dense one from ``merge`` (``model.safetensors`` whose metadata says ``merged_from=lrcompress``).
    Such a directory is rewritten without ``force``, as a rerun of the same command expects."""
    if (directory / LRC_CONFIG_NAME).is_file():
        return True
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return (f.metadata() or {}).get("merged_from") == "lrcompress"
    except Exception:  # noqa: BLE001 -- any unreadable file is simply not ours
        return False


def model_card(record: dict, name: str, hf_config: dict | None) -> str:
    """The ``README.md`` of a compressed model directory, from its ``lrcompress_config.json`` record."""
    arch = (hf_config or {}).get("architectures") or []
    specs = [TargetSpec.from_dict(t) for t in record["targets"]]
    used = list(dict.fromkeys(s.structure for s in specs)) or [LOWRANK]
    lines = ["---", "library_name: lrcompress", "tags:", "- lrcompress", *(f"- {_TAGS[u]}" for u in used), "---",
             _CARD_MARK, "", (f"# {name}: low-rank compressed" if used == [LOWRANK] else
              f"# {name}: compressed ({', '.join(structures.get(u).label for u in used)})"), "",
             "Weights replaced with lrcompress by " + "; ".join(_CARD_METHODS[u] for u in used) + ".", "",
             f"- source: {record['source'] or 'not recorded'}",
             f"- parameters: {record['params_before']:,} before, {record['params_after']:,} after "
             f"({record['ratio']:.2f}x smaller)" if record["params_after"] <= record["params_before"] else
             f"- parameters: {record['params_before']:,} before, {record['params_after']:,} after (larger)",
             f"- factored weights: {len(record['targets'])}",
             f"- lrcompress {record['lrcompress_version']}, format {record['format_version']}", ""]
    if specs and used == [LOWRANK]:  # the version-1 card: low rank alone
        lines += ["## Ranks", "", "| weight | kind | dense shape | rank | diag | tied | params before | after |",
                  "|---|---|---|---:|---|---|---:|---:|"]
        for spec in specs:
            lines.append(f"| `{spec.name}` | {spec.layer}/{spec.role} | {spec.gates * spec.rows}x{spec.cols} | "
                         f"{spec.rank} | {'yes' if spec.diag else 'no'} | {'yes' if spec.tied else 'no'} | "
                         f"{spec.dense_params:,} | {spec.factored_params:,} |")
        lines.append("")
    elif specs:  # other structures have no rank: each row names its structure and options (registry's describe)
        lines += ["## Structures", "", "| weight | kind | dense shape | structure | options | params before | after |",
                  "|---|---|---|---|---|---:|---:|"]
        for spec in specs:
            lines.append(f"| `{spec.name}` | {spec.layer}/{spec.role} | {spec.gates * spec.rows}x{spec.cols} | "
                         f"{spec.structure} | {spec.describe()} | {spec.dense_params:,} | {spec.factored_params:,} |")
        lines.append("")
    metrics = record["metrics"] or {}
    if metrics:
        stages = list(metrics)
        names = list(dict.fromkeys(k for stage in stages for k in metrics[stage]))
        lines += ["## Metrics", "", "| metric | " + " | ".join(stages) + " |",
                  "|---|" + "---:|" * len(stages)]
        for metric in names:
            cells = [_number(metrics[s].get(metric)) for s in stages]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    cls = arch[0] if arch else "ModelClass"
    lines += ["## Loading", "", "Load it with lrcompress (transformers' own `from_pretrained` refuses this directory, "
              "which it would load with random values where the factors are):", "", "```python",
              "import lrcompress as lrc", "",
              f"model = lrc.from_pretrained({cls}, \"{name}\")  # {cls}: the model's class" +
              (", or an Auto class for it" if hf_config is not None else ""), "```", "",
              "`lrcompress merge` turns it back into a dense directory that any loader reads.", ""]
    if record["config"]:
        lines += ["## Compression config", "", "```json", dumps(record["config"], indent=2), "```", ""]
    return "\n".join(lines)


# The card's tag and one-line description of each structure (the method and its source).
_TAGS = {LOWRANK: "low-rank", "kronecker": "kronecker", "tt": "tensor-train", "orthogonal": "orthogonal"}
_CARD_METHODS = {
    LOWRANK: "low-rank (`W = L R`) or low-rank plus diagonal (`W = L R + D`) factors (Miceli Barone, 2016, "
             "*Low-rank passthrough neural networks*)",
    "kronecker": "sums of Kronecker products of small factors (Jose, Cisse and Fleuret, 2018, *Kronecker "
                 "recurrent units*), fitted by the nearest Kronecker product (Van Loan and Pitsianis, 1993)",
    "tt": "tensor-train matrices (Oseledets, 2011, *Tensor-train decomposition*, fitted by TT-SVD; the "
          "\"fully tensorized\" RNN of Onu, Miller and Precup, 2020)",
    "orthogonal": "scaled Cayley orthogonal matrices `W = (I + A)^-1 (I - A) D` (Helfrich, Willmott and Ye, "
                  "2018, *Orthogonal recurrent neural networks with scaled Cayley transform*)",
}


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ours(card: Path) -> bool:
    try:
        with open(card, encoding="utf-8", errors="replace") as f:
            return _CARD_MARK in f.read(4096)
    except OSError:
        return False


def hf_config_dict(model: nn.Module) -> dict | None:
    """``model.config`` as the dict ``config.json`` holds, or None when it is no Hugging Face config."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    if hasattr(cfg, "to_json_string"):  # converts dtypes and other values JSON lacks, as transformers writes them
        return json.loads(cfg.to_json_string(use_diff=False))
    return json.loads(json.dumps(cfg.to_dict(), default=str))


# ----------------------------------------------------------------------------- reading


def _weights_file(directory: Path) -> Path:
    if not directory.is_dir():
        if directory.exists():
            raise LRCompressError(f"{directory} is a file; from_pretrained reads a model directory "
                                  "(use lrc.load_model for a file)")
        raise FileNotFoundError(f"no such directory: {directory}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FormatError(f"{directory} has no {WEIGHTS_NAME} (an incomplete save, or not a model directory)")
    return weights


def _check_lrc_config(directory: Path) -> None:
    path = directory / LRC_CONFIG_NAME
    if not path.is_file():
        return  # a dense directory (e.g. from lrcompress merge) loads as a plain state dict
    record = load_json(path.read_text(encoding="utf-8", errors="replace"), str(path), max_depth=16)
    if not isinstance(record, dict):
        raise FormatError(f"{path} is not a JSON object")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {str(version)[:20]}; this lrcompress {__version__} reads up to "
                          f"{FORMAT_VERSION}: upgrade lrcompress")


def _build(cls, directory: Path, kwargs: dict) -> nn.Module:
    """``cls`` built from the directory's ``config.json`` (Hugging Face) or from ``kwargs`` alone."""
    has_config = (directory / CONFIG_NAME).is_file()
    hf_class = any(hasattr(cls, a) for a in ("from_config", "_from_config", "config_class"))
    if not (hf_class and has_config):
        if hf_class:
            raise FormatError(f"{directory} has no {CONFIG_NAME} to build {cls.__name__} from")
        return cls(**kwargs)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:  # an Auto class: transformers is imported already (the caller holds one of its classes)
        import importlib

        config_class = importlib.import_module("transformers").AutoConfig
    # As transformers' from_pretrained: keyword arguments naming config attributes update the config.
    config, unused = config_class.from_pretrained(str(directory), return_unused_kwargs=True, **kwargs)
    kwargs = {k: v for k, v in unused.items() if k in _MODEL_KWARGS}
    other = sorted(set(unused) - set(kwargs))
    if other:
        raise ConfigError(f"from_pretrained: {other[0]!r} is neither an attribute of {type(config).__name__} "
                          f"nor a model-building argument ({', '.join(_MODEL_KWARGS)})")
    if hasattr(config, "transformers_weights"):  # our refusal marker: not part of the live model's config
        delattr(config, "transformers_weights")
    if hasattr(cls, "from_config"):
        return cls.from_config(config, **kwargs)
    if hasattr(cls, "_from_config"):
        return cls._from_config(config, **kwargs)
    return cls(config, **kwargs)


_MODEL_KWARGS = ("dtype", "torch_dtype", "attn_implementation")


def _base_part_for(model: nn.Module, weights: Path) -> nn.Module | None:
    """The ``base_model_prefix`` part of a head model when the file holds a base model (no key
    under that prefix); None otherwise."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or not is_hf_model(model):
        return None
    from safetensors import safe_open

    tops = {k.split(".")[0] for k in base.state_dict()}
    with safe_open(str(weights), framework="pt") as f:  # every key in the base part's top-level modules
        return base if all(k.split(".")[0] in tops for k in f.keys()) else None


def _base_model_from_head(model: nn.Module, directory: Path, weights: Path, kwargs: dict) -> nn.Module | None:
    """A base model (``BertModel``) asked for from a head model's directory: the head model the
    directory's config names, loaded, then its ``base_model_prefix`` part; None when ``model`` is
    not such a base model (transformers' rule: file keys under the prefix, the model has no such part)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or hasattr(model, prefix):
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        if not any(k.startswith(prefix + ".") for k in f.keys()):
            return None
    arch = ((read_hf_config(directory) or {}).get("architectures") or [None])[0]
    import importlib

    head_cls = getattr(importlib.import_module("transformers"), arch, None) if isinstance(arch, str) else None
    if head_cls is None:
        raise FormatError(f"{directory} holds a head model ({arch or 'class not recorded'}) with the base model "
                          f"under {prefix!r}: load it with the head model's class")
    head = _build(head_cls, directory, kwargs)
    load_model(head, weights)
    base = getattr(head, prefix, None)
    if not isinstance(base, type(model)):
        raise FormatError(f"{directory} holds a {arch} whose {prefix!r} part is a {type(base).__name__}, not a "
                          f"{type(model).__name__}: load it with {arch}")
    _log.warning("%s: loaded the %r part of its %s into %s; the head weights are not used", directory, prefix,
                 arch, type(model).__name__)
    return base


# ----------------------------------------------------------------------------- model.save_pretrained


class _SavePretrained:
    """A compressed Hugging Face model's ``save_pretrained`` (set on the instance by ``guard``).

    transformers' own would write the live keys (``...parametrizations.weight.original0``) that its
    loader does not know, so a reload would put random values where the factors are. This writes
    the lrcompress directory instead, with transformers' semantics: into an existing directory
    (``Trainer`` creates it first), replacing what it writes, keeping another ``README.md``.
    A callable object, not a bound method, so ``copy.deepcopy`` and pickling follow the model.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *, is_main_process: bool = True, state_dict: dict | None = None,
                 push_to_hub: bool = False, **ignored):
        if push_to_hub:
            raise LRCompressError("push_to_hub is not supported for a compressed model: save the directory, then "
                                  "upload it with huggingface_hub's upload_folder")
        if not is_main_process:
            return None
        # transformers' sharding, pickle and variant options do not apply to the one lrcompress file.
        dropped = sorted(k for k, v in ignored.items() if k != "token" and _HF_DEFAULTS.get(k, object()) != v)
        if dropped:
            warnings.warn(f"save_pretrained of a compressed model writes one {WEIGHTS_NAME} in the lrcompress "
                          f"format; ignored: {', '.join(f'{k}={ignored[k]!r}' for k in dropped)}", stacklevel=2)
        model = self.model
        specs = factored_specs(model)
        tensors = factored_state_dict(model) if state_dict is None else _file_keys(state_dict, specs)
        after = count_params(model)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_directory(directory, tensors, specs, hf_config=hf_config_dict(model),
                        config=getattr(model, _ATTR_CONFIG, None),
                        params_before=after + sum(s.dense_params - s.factored_params for s in specs),
                        params_after=after, force=True, architecture=type(model).__name__, keep_card=True)
        remove_stale_shards(directory)
        return None


# The values transformers' save_pretrained takes by default (or Trainer passes): nothing to warn about.
_HF_DEFAULTS = {"safe_serialization": True, "max_shard_size": None, "variant": None, "save_peft_format": True,
                "save_original_format": True, "distributed_checkpoint": False}
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def remove_stale_shards(directory: Path) -> list[str]:
    """Delete a sharded Hugging Face checkpoint (``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json``) that an earlier dense ``save_pretrained`` left in
    ``directory``, as transformers' own ``save_pretrained`` cleans old shards: they would sit
    beside ``model.safetensors`` holding stale dense weights. Only files of exactly those names."""
    removed = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and (_HF_SHARD.fullmatch(path.name) or path.name == "model.safetensors.index.json"):
            path.unlink()
            removed.append(path.name)
    return removed


def _file_keys(state_dict: dict[str, Tensor], specs: list[TargetSpec]) -> dict[str, Tensor]:
    """A live state dict (``<m>.parametrizations.<w>.original<i>``, ``...<w>.0.<buffer>``) renamed
    to the file format's keys, as ``convert.factored_state_dict`` writes them."""
    renames = {live: key for spec in specs for key, live in _live_keys(spec).items()}
    return {renames.get(k, k): v for k, v in state_dict.items()}


def _live_keys(spec: TargetSpec) -> dict[str, str]:
    """``{file key: live state-dict key}`` of one factored weight, relative to the module holding it.

    The first ``original_count`` parts are torch's originals (``parametrizations.<w>.original<i>``);
    the rest are the parametrization's persistent buffers, which torch keeps on the
    parametrization module, the first of the list (``parametrizations.<w>.0.<buffer>``, e.g. an
    orthogonal weight's ``signs``): the same mapping as ``convert.factored_state_dict``.
    """
    head = f"{spec.module}.parametrizations.{spec.weight}" if spec.module else f"parametrizations.{spec.weight}"
    originals = spec.original_count()
    return {key: f"{head}.original{i}" if i < originals else f"{head}.0.{part}"
            for i, (part, key) in enumerate(spec.factor_keys().items())}


def _file_keys_pre_hook(module, state_dict, prefix, *args) -> None:
    # Trainer resumes a checkpoint with model.load_state_dict(load_file(...), strict=False): file-format
    # factor keys (<name>.L/.R/.D, <name>.original<i>, <name>.signs) are renamed to the live ones so
    # the factors (and buffers) really load.
    for spec in factored_specs(module):
        for key, live in _live_keys(spec).items():
            if prefix + key in state_dict:
                state_dict[prefix + live] = state_dict.pop(prefix + key)


def is_hf_model(module: nn.Module) -> bool:
    """Duck-typed ``PreTrainedModel``: a ``save_pretrained`` method and a config with ``to_dict``."""
    return callable(getattr(type(module), "save_pretrained", None)) and hasattr(getattr(module, "config", None),
                                                                                "to_dict")


def guard(model: nn.Module) -> None:
    """Give every Hugging Face model inside ``model`` that holds factors lrcompress's ``save_pretrained``.

    Called whenever factorizations are registered (``convert.apply``); ``release`` undoes it
    after ``merge``. Also lets ``load_state_dict`` take file-format factor keys (Trainer resume).
    """
    for module in model.modules():
        if is_hf_model(module) and "save_pretrained" not in vars(module) and factored_specs(module):
            module.__dict__["save_pretrained"] = _SavePretrained(module)
            module.__dict__["_lrcompress_hook"] = module.register_load_state_dict_pre_hook(_file_keys_pre_hook)


def release(model: nn.Module) -> None:
    """Undo ``guard`` on modules that hold no factors any more (after ``merge``)."""
    for module in model.modules():
        if isinstance(vars(module).get("save_pretrained"), _SavePretrained) and not factored_specs(module):
            del module.__dict__["save_pretrained"]
            hook = module.__dict__.pop("_lrcompress_hook", None)
            if hook is not None:
                hook.remove()


def record_config(model: nn.Module, config: CompressionConfig) -> None:
    """Remember on ``model`` the config ``compress`` used, for ``save_pretrained``'s config file."""
    model.__dict__[_ATTR_CONFIG] = config.to_dict()


# ----------------------------------------------------------------------------- the CLI's directories


def convert_directory(source: Path, output: Path | None, config: CompressionConfig, *, force: bool = False,
                      progress: bool | None = False, trust_pickle: bool = False, key: str | None = None,
                      rename=()) -> tuple[Report, dict[str, str], Path]:
    """``lrcompress convert`` of a Hugging Face model directory: a compressed model directory.

    ``output`` defaults to ``<source>.lr`` beside it. The source's ``config.json`` is carried over
    (with the refusal marker), its other non-weight files (tokenizer, ...) copied. Returns the
    report, what ``read_checkpoint`` said about the source and the output directory.
    """
    from .checkpoints import read_checkpoint, reading_metadata
    from .convert import compress_state_dict

    output = output or sibling(source, ".lr")
    check_output_directory(source, output, force)
    hf = read_hf_config(source)
    loaded, meta = read_checkpoint(source, trust_pickle=trust_pickle, key=key, rename=rename)
    if specs_from_metadata(meta, source):
        raise FormatError(f"{source} is already compressed by lrcompress")
    if not isinstance(loaded, dict):
        raise FormatError(f"{source}: a pickled whole module in a model directory is not supported")
    linear = linear_names(source, hf) if config.targets == ALL_LINEAR else None
    if config.targets and config.targets != ALL_LINEAR:
        check_directory_targets(source, hf, config)
    tensors, specs, report = compress_state_dict(loaded, config, progress=progress, linear=linear)
    write_directory(output, tensors, specs, hf_config=hf, config=config, params_before=report.params_before,
                    params_after=report.params_after, source=str(source), force=force,
                    metadata=reading_metadata(meta))
    convert_output_files(source, output)
    return report, meta, output


def merge_model_directory(source: Path, output: Path | None, *, force: bool = False
                          ) -> tuple[Path, list[TargetSpec], dict[str, Tensor]]:
    """``lrcompress merge`` of a compressed model directory: a dense one transformers loads.

    ``output`` defaults to ``<source without .lr>.dense``. Returns it, the rebuilt targets and the
    dense tensors.
    """
    weights = _weights_file(source)
    output = output or sibling(source, ".dense", strip=".lr")
    check_output_directory(source, output, force)
    tensors, meta = read_safetensors(weights)
    specs = check_compressed(tensors, meta, weights)
    if not specs:
        raise FormatError(f"{weights} is not an lrcompress file (no factorization in its metadata)")
    return output, specs, merge_directory(source, output, tensors, specs, force=force)


def sibling(source: Path, suffix: str, *, strip: str = "") -> Path:
    """``<source><suffix>`` beside ``source`` (``strip`` removed from its name first)."""
    source = source if source.name else source.resolve()  # "." has no name
    return source.with_name(source.name.removesuffix(strip) + suffix)


def check_output_directory(source: Path, output: Path, force: bool) -> None:
    """Refuse an output directory that is, or lies inside, the input, or that we may not write."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise LRCompressError(f"output {output} {'is' if out == src else 'lies inside'} the input directory "
                              f"{source}; the input is never modified")
    if output.exists() and not output.is_dir():
        raise LRCompressError(f"cannot write the model directory {output}: it is a file")
    if output.is_dir() and not force and any(output.iterdir()) and not written_by_lrcompress(output):
        raise OutputExistsError(f"{output} exists and was not written by lrcompress; pass --force to write into it")
    if not output.parent.is_dir():
        raise LRCompressError(f"cannot write {output}: {output.parent} does not exist")


def linear_names(directory: Path, hf: dict | None) -> list[str]:
    """``targets.all_linear_names`` of the model ``config.json`` describes, built on the meta device.

    A state dict cannot tell an ``nn.Linear`` from an embedding, so the architecture is built
    (no weights, no download) from the transformers class ``config.json`` names.
    """
    from .targets import all_linear_names

    arch = ((hf or {}).get("architectures") or [None])[0]
    if not arch:
        raise TargetError(f"--targets {ALL_LINEAR} on {directory} needs the model's class: its config.json names "
                          "no architectures; list the layers with --targets instead")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise TargetError(f"--targets {ALL_LINEAR} on a model directory builds the model with transformers, "
                          "which is not installed (pip install 'lrcompress[hf]')") from None
    model = meta_model(directory, hf)
    if model is None:
        raise TargetError(f"--targets {ALL_LINEAR}: transformers has no class {arch!r} (custom code?); "
                          "list the layers with --targets instead")
    return all_linear_names(model)


def meta_model(directory: Path, hf: dict | None) -> nn.Module | None:
    """The model ``config.json`` describes, built on the meta device (no weights, no download), or
    None when it cannot be built here (no architectures, transformers missing, custom code)."""
    arch = ((hf or {}).get("architectures") or [None])[0]
    try:
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "_from_config"):
        return None
    config = transformers.AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        return cls._from_config(config)


def check_directory_targets(directory: Path, hf: dict | None, config: CompressionConfig) -> None:
    """Refuse named targets that are no ``nn.Linear`` in the model ``config.json`` describes (a
    transformers ``Conv1D``, whose weight a state dict cannot tell from a Linear one when square).
    Nothing to check when the model cannot be built here: the state-dict checks still apply."""
    from .targets import check_target_types

    try:
        model = meta_model(directory, hf)
    except (OSError, ValueError, TypeError, KeyError, ImportError):  # a config transformers cannot build
        return
    if model is not None:
        check_target_types(model, config)


def merge_directory(source: Path, output: Path, tensors: dict[str, Tensor], specs: list[TargetSpec], *,
                    force: bool = False) -> dict[str, Tensor]:
    """Write the dense model directory of a compressed one: what transformers' ``from_pretrained`` reads.

    ``config.json`` without the refusal marker, ``model.safetensors`` with metadata ``format=pt``,
    the source's other files (tokenizer, ...) copied; no lrcompress files. Returns the dense tensors.
    """
    merged = merge_state_dict(tensors, specs)
    _prepare(output, force)
    weights = output / WEIGHTS_NAME
    if weights.exists():
        weights.unlink()
    for path in extra_files(source, skip=(LRC_CONFIG_NAME, CARD_NAME)):
        if path.name == CONFIG_NAME:
            hf = load_json(path.read_text(encoding="utf-8"), str(path), max_depth=64)
            if isinstance(hf, dict):
                hf.pop("transformers_weights", None)
                write_text_atomic(output / CONFIG_NAME, dumps(hf, indent=2, sort_keys=True) + "\n", force=True)
                continue
        _copy(path, output / path.name)
    write_safetensors(merged, weights, force=True,
                      metadata={"format": "pt", "merged_from": "lrcompress", "lrcompress_version": __version__})
    return merged


def convert_output_files(source: Path, output: Path) -> list[str]:
    """Copy the source directory's non-weight files (tokenizer, generation config, ...) into ``output``."""
    copied = []
    for path in extra_files(source, skip=OUR_FILES):
        _copy(path, output / path.name)
        copied.append(path.name)
    return copied


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")


def extra_files(source: Path, *, skip: tuple[str, ...]) -> list[Path]:
    """Top-level files of a model directory that are not weights (nor hidden, nor in ``skip``)."""
    return sorted(p for p in source.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in skip
                  and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"))


def _copy(src: Path, dst: Path) -> None:
    import shutil

    from .io import write_atomic

    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp), force=True)


def read_hf_config(directory: Path) -> dict | None:
    """A directory's ``config.json`` as a dict (None without one); bad JSON is a ``FormatError``."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    hf = load_json(path.read_text(encoding="utf-8", errors="replace"), str(path), max_depth=64)
    if not isinstance(hf, dict):
        raise FormatError(f"{path} is not a JSON object")
    return hf
