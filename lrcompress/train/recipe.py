"""Recipes: one TOML file per experiment, with sections ``[meta]``, ``[task]``, ``[model]``
and ``[train]``. ``load_recipe`` reads one, applies command-line style overrides
(``"train.lr=1e-3"``), checks every key and value, and fills in the defaults, so the result
is complete; ``dump_recipe`` writes it back as TOML.

    >>> recipe = load_recipe("recipes/addition-gru-small.toml", ["train.lr=3e-3"])  # doctest: +SKIP
    >>> recipe["train"]["lr"], recipe["model"]["hidden_size"]                      # doctest: +SKIP
    (0.003, 32)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import tomli_w

from ..errors import ConfigError
from .fields import check_fields, check_range
from .models import check_model
from .optim import check_zero_eps
from .stabilisers import check_exempt_names
from .tasks import check_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SECTIONS = ("meta", "task", "model", "train")

# The [train] keys. Their behaviour is the engine's (lrcompress.train.engine.TrainConfig, which
# must keep these names and defaults; a test checks that they agree).
RECIPE_DEFAULTS: dict = {
    "optimizer": "rmsprop",  # rmsprop (the paper's), adam or adafactor
    "lr": 1e-3,  # adafactor: 0 selects its relative step size
    "batch_size": 20,
    "steps": 0,  # updates to run (0: no limit, epochs decides)
    "epochs": 0,  # passes over the training set (0: no limit, steps decides); a recipe sets one
    "eval_every": 500,  # updates between evaluations and checkpoints (0: once per epoch)
    "clip": "element",  # gradient clipping: none, element (each component) or norm (global norm)
    "clip_value": 1.0,
    "nan_policy": "skip",  # on a NaN/Inf gradient: skip the update, decay (step on 0.1 * params),
    #                        restore the last good state, or none (apply it)
    "weight_norm": False,  # weight normalisation of the factor matrices (appendix A.2)
    "max_row_norm": 0.0,  # clip matrix row norms to this after each update (paper: 10; 0: off)
    "recurrent_dropout": 0.0,  # variational dropout of the recurrent state (Gal), see models.set_dropout
    "dropout": 0.0,  # if > 0, replaces the model's dropout rates
    "lr_schedule": "constant",  # constant, plateau (multiply by plateau_factor) or onecycle (peak lr)
    "plateau_patience": 3,  # evaluations without improvement before a plateau decay
    "plateau_factor": 0.5,
    "early_stopping_patience": 0,  # evaluations without improvement before stopping (0: never)
    "amp": "none",  # mixed precision on CUDA: none, bf16 or fp16
    "seed": 0,  # initialisation and data order
    "device": "auto",  # auto, cpu or cuda
    "rmsprop_alpha": 0.9,  # RMSProp decay of the squared-gradient average (paper: 0.9)
    "rmsprop_eps": 1e-8,
    "rmsprop_eps_inside": False,  # true: lr g / sqrt(acc + eps) (the authors' Theano code); false: torch's
    #                               lr g / (sqrt(acc) + eps); one formula when rmsprop_eps = 0
    "rmsprop_initial_accumulator": 1e-3,  # start of RMSProp's squared-gradient average (the authors': 1e-3)
    "clip_exempt": [],  # parameters left unclipped: names as model.named_parameters() gives them,
    #                     "name:gate" for one gate's block (GRU r, z, n; LSTM i, f, g, o)
    "select": "",  # metric that picks the best checkpoint (and drives plateau, early stopping); "": the task's
    "weight_decay": 0.0,
    "lr_orthogonal": 0.0,  # > 0: the learning rate of scaled Cayley skew originals (scoRNN's A); 0: lr
    "unitary_penalty": 0.0,  # > 0: KRU soft unitary penalty weight, times sum ||F^T F - I||^2 over Kronecker factors
    "execution": "auto",  # factored recurrent layers in training: auto (the cost model picks per
    #                       layer), factored (backward through the factors) or dense (rebuild W)
}
TRAIN_CHOICES: dict = {"execution": ("auto", "factored", "dense"), "optimizer": ("rmsprop", "adam", "adafactor"), "clip": ("none", "element", "norm"),
                       "nan_policy": ("skip", "decay", "restore", "none"),
                       "lr_schedule": ("constant", "plateau", "onecycle"), "amp": ("none", "bf16", "fp16"),
                       "device": ("auto", "cpu", "cuda")}

META_DEFAULTS: dict = {
    "name": "",  # the recipe's name (its file stem)
    "description": "",
    "source": "",  # where in the paper the experiment comes from
    "paper_result": "",  # the result the paper reports
    "paper_params": "",  # the parameter count the paper reports
    "params": 0,  # parameters of the model this recipe builds (0: not recorded)
    "recurrent_params": 0,  # of which in the recurrent (state-to-state) matrices
    "deviations": "",  # deliberate differences from the paper's setup, and why
    "notes": "",
}


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a TOML recipe, apply ``overrides`` ("section.key=value"), check and complete it.

    Override values are TOML literals (``3``, ``1e-3``, ``true``, ``"adam"``, ``[1, 2]``); a
    value that is not one is taken as a plain string (``train.optimizer=adam``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    recipe = apply_overrides(recipe, overrides)
    recipe.setdefault("meta", {}).setdefault("name", path.stem)
    return check_recipe(recipe)


def apply_overrides(recipe: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of ``recipe`` with each "section.key=value" override set (values not checked)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recipe.items()}
    for item in overrides:
        target, sep, text = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot or not key or "." in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in override {item!r} (sections: {', '.join(SECTIONS)})")
        out.setdefault(section, {})[key.strip()] = parse_value(text.strip())
    return out


def parse_value(text: str):
    """A TOML literal (int, float, bool, string, list), or the text itself as a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def check_recipe(recipe: dict) -> dict:
    """A recipe dict with every section checked and completed; raises ``ConfigError``."""
    if not isinstance(recipe, dict):
        raise ConfigError(f"a recipe must be a table of sections, got {recipe!r}")
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown recipe section [{unknown[0]}] (sections: {', '.join(SECTIONS)})")
    if not isinstance(recipe.get("task"), dict) or "name" not in recipe["task"]:
        raise ConfigError("a recipe needs a [task] section with a name")
    out = {"meta": check_meta(recipe.get("meta", {})), "task": check_task(recipe["task"]),
           "model": check_model(recipe.get("model", {})), "train": check_train(recipe.get("train", {}))}
    _note_idle_masks(out["model"], out["train"])
    return out


# Every dropout rate that per-sequence masks (model.dropout_masks) would draw masks for.
DROPOUT_RATES = ("model.input_dropout", "model.dropout", "model.output_dropout", "train.dropout",
                 "train.recurrent_dropout")


def _note_idle_masks(model: dict, train: dict) -> None:
    """A note (UserWarning) when ``model.dropout_masks`` chooses how to draw masks but every
    dropout rate is 0: there is nothing to mask, the setting changes nothing."""
    if model["dropout_masks"] == "batch":
        return
    sections = {"model": model, "train": train}
    if any(sections[s].get(k) for s, _, k in (name.partition(".") for name in DROPOUT_RATES)):
        return
    warnings.warn(f"model.dropout_masks = {model['dropout_masks']!r} changes nothing: every dropout rate is 0 "
                  f"({', '.join(DROPOUT_RATES)})", UserWarning, stacklevel=3)


def check_meta(meta: dict) -> dict:
    out = check_fields("meta", meta, META_DEFAULTS)
    check_range("meta", out, "params", 0)
    check_range("meta", out, "recurrent_params", 0)
    return out


def check_train(train: dict) -> dict:
    """The ``[train]`` section with defaults (``RECIPE_DEFAULTS``) filled in, every value checked."""
    out = check_fields("train", train, RECIPE_DEFAULTS, choices=TRAIN_CHOICES)
    check_range("train", out, "lr", 0.0, low_open=out["optimizer"] != "adafactor")
    check_range("train", out, "batch_size", 1)
    for key in ("steps", "epochs", "eval_every", "early_stopping_patience", "seed"):
        check_range("train", out, key, 0)
    if not out["steps"] and not out["epochs"]:
        raise ConfigError("train.steps and train.epochs are both 0: set at least one limit")
    check_range("train", out, "clip_value", 0.0, low_open=True)
    for key in ("max_row_norm", "rmsprop_eps", "rmsprop_initial_accumulator", "weight_decay", "lr_orthogonal",
                "unitary_penalty"):
        check_range("train", out, key, 0.0)
    out["clip_exempt"] = list(out["clip_exempt"])  # never the defaults' list itself
    try:
        check_exempt_names(out["clip_exempt"])
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}") from None
    if out["clip_exempt"] and out["clip"] == "none":
        raise ConfigError("train.clip_exempt names parameters to leave unclipped, but train.clip = 'none'")
    if out["clip"] == "none" and out["clip_value"] != RECIPE_DEFAULTS["clip_value"]:  # it would be ignored
        raise ConfigError(f"train.clip_value = {_toml(out['clip_value'])} sets a clipping threshold, but train.clip "
                          f"= 'none' clips nothing: remove it (or set train.clip = 'element' or 'norm')")
    for key in ("recurrent_dropout", "dropout", "rmsprop_alpha"):
        check_range("train", out, key, 0.0, 1.0, high_open=True)
    check_range("train", out, "plateau_patience", 1)
    check_range("train", out, "plateau_factor", 0.0, 1.0, low_open=True, high_open=True)
    if out["optimizer"] == "rmsprop":
        check_zero_eps(out["rmsprop_eps"], out["rmsprop_initial_accumulator"], out["rmsprop_alpha"],
                       prefix="train.rmsprop_")
    else:  # adam and adafactor have no such setting: a value set for them would be silently ignored
        for key in RMSPROP_KEYS:
            if out[key] != RECIPE_DEFAULTS[key]:
                raise ConfigError(f"train.{key} = {_toml(out[key])} is an RMSProp setting and train.optimizer = "
                                  f"{out['optimizer']!r} has none: remove it (or set it back to "
                                  f"{_toml(RECIPE_DEFAULTS[key])})")
    return out


RMSPROP_KEYS = ("rmsprop_alpha", "rmsprop_eps", "rmsprop_eps_inside", "rmsprop_initial_accumulator")


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def dump_recipe(recipe: dict) -> str:
    """TOML text of a recipe (``tomli_w``; sections in the usual order, ``None`` values left out).
    Raises ``ConfigError`` for a section that is not a table or a value TOML cannot hold.

    >>> print(dump_recipe({"task": {"name": "copy", "lag": 5}}))
    [task]
    name = "copy"
    lag = 5
    <BLANKLINE>
    """
    order = [s for s in SECTIONS if s in recipe] + [s for s in recipe if s not in SECTIONS]
    tables = {}
    for section in order:
        values = recipe[section]
        if not isinstance(values, dict):
            raise ConfigError(f"recipe section {section!r} must be a table, got {values!r}")
        tables[section] = {k: v for k, v in values.items() if v is not None}
    try:
        return tomli_w.dumps(tables)
    except TypeError:
        for section, values in tables.items():  # name the value tomli_w refused
            for key, value in values.items():
                try:
                    tomli_w.dumps({"value": value})
                except TypeError:
                    raise ConfigError(f"{section}.{key}: cannot write {type(value).__name__} value {value!r} "
                                      "as TOML") from None
        raise
