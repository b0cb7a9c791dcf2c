"""Recipes: parsing, overrides and their errors, the TOML writer, and every file in recipes/
(parses, builds its task and model, and its recorded parameter counts are the model's)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch

import lrcompress as lrc
from lrcompress.errors import ConfigError
from lrcompress.train.models import build_model
from lrcompress.train.recipe import RECIPE_DEFAULTS, check_recipe, dump_recipe, load_recipe, parse_value
from lrcompress.train.tasks import build_task

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

SMALL = """
[meta]
description = "a test"

[task]
name = "addition"
length = 12

[model]
cell = "gru"
hidden_size = 8

[train]
lr = 0.01
steps = 100
"""


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


def test_load_fills_defaults(small):
    recipe = load_recipe(small)
    assert list(recipe) == ["meta", "task", "model", "train"]
    assert recipe["meta"]["name"] == "small" and recipe["meta"]["description"] == "a test"
    assert recipe["task"]["length"] == 12 and recipe["task"]["train_size"] == 100_000
    assert recipe["model"]["hidden_size"] == 8 and recipe["model"]["rank"] == 0
    assert recipe["train"] == {**RECIPE_DEFAULTS, "lr": 0.01, "steps": 100}


def test_overrides(small):
    recipe = load_recipe(small, ["train.lr=1e-3", "model.rank=4", "model.diag=true", "task.length=30",
                                 "train.optimizer=adam", 'train.clip="norm"', "train.batch_size = 7",
                                 "meta.notes=two words", "model.update_gate_bias=4"])
    assert recipe["train"]["lr"] == 1e-3 and recipe["model"]["rank"] == 4 and recipe["model"]["diag"] is True
    assert recipe["task"]["length"] == 30 and recipe["train"]["optimizer"] == "adam"
    assert recipe["train"]["clip"] == "norm" and recipe["train"]["batch_size"] == 7
    assert recipe["meta"]["notes"] == "two words"
    assert recipe["model"]["update_gate_bias"] == 4.0 and isinstance(recipe["model"]["update_gate_bias"], float)
    # Changing the task's name switches to that task's keys.
    with pytest.raises(ConfigError, match="unknown key task.length"):
        load_recipe(small, ["task.name=copy"])
    assert parse_value("[1, 2]") == [1, 2] and parse_value("1e-3") == 1e-3 and parse_value("adam") == "adam"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key train.lrr"),
    ("model.hiden_size=8", "unknown key model.hiden_size"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("lr=1", "must look like section.key=value"),
    ("train.lr", "must look like section.key=value"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("train.steps=1.5", "train.steps must be an int, got 1.5"),
    ("train.amp=true", "train.amp must be a string, got True"),
    ("model.diag=1", "model.diag must be a bool, got 1"),
    ("train.lr=-1e-3", r"train.lr must be in \(0.0, inf\), got -0.001"),
    ("train.lr=nan", "train.lr must be in"),
    ("train.batch_size=0", r"train.batch_size must be in \[1"),
    ("train.clip=sometimes", "train.clip must be one of 'none', 'element', 'norm', got 'sometimes'"),
    ("train.device=tpu", "train.device must be one of"),
    ("train.plateau_factor=1.0", "train.plateau_factor must be in"),
    ("train.recurrent_dropout=1", "train.recurrent_dropout must be in"),
    ("train.steps=0", "set at least one limit"),
    ("model.cell=lstm", None),  # valid: no error
])
def test_override_errors(small, override, message):
    if message is None:
        assert load_recipe(small, [override])["model"]["cell"] == "lstm"
        return
    with pytest.raises(ConfigError, match=message):
        load_recipe(small, [override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[task\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    bad.write_text('[task]\nname = "copy"\n[optimizer]\nlr = 1\n')
    with pytest.raises(ConfigError, match=r"unknown recipe section \[optimizer\]"):
        load_recipe(bad)
    bad.write_text("[model]\ncell = 'gru'\n")
    with pytest.raises(ConfigError, match=r"needs a \[task\] section"):
        load_recipe(bad)
    bad.write_text("[task]\nname = 'copy'\n[train]\nsteps = 5\n[meta]\nauthor = 'me'\n")
    with pytest.raises(ConfigError, match="unknown key meta.author"):
        load_recipe(bad)


def test_adafactor_may_use_its_relative_step():
    recipe = check_recipe({"task": {"name": "copy"}, "train": {"optimizer": "adafactor", "lr": 0.0, "steps": 1}})
    assert recipe["train"]["lr"] == 0.0
    with pytest.raises(ConfigError, match="train.lr"):
        check_recipe({"task": {"name": "copy"}, "train": {"lr": 0.0, "steps": 1}})


def test_dump_round_trip(small):
    recipe = load_recipe(small, ['meta.notes="quote \\" backslash \\\\ tab \\t newline \\n ü"',
                                 "train.rmsprop_eps=1e-12", "model.update_gate_bias=5"])
    text = dump_recipe(recipe)
    assert "update_gate_bias = 5.0" in text and "output_dropout" not in text  # None is left out
    assert check_recipe(tomllib.loads(text)) == recipe
    odd = {"meta": {"x": math.inf, "y": -math.inf, "z": [1, 2.5, "a"], "key with space": "\x7f"}}
    back = tomllib.loads(dump_recipe(odd))["meta"]
    assert back == odd["meta"]
    with pytest.raises(ConfigError, match="cannot write"):
        dump_recipe({"meta": {"when": object()}})


def test_defaults_agree_with_the_engine():
    engine = pytest.importorskip("lrcompress.train.engine")
    assert RECIPE_DEFAULTS == engine.TrainConfig.defaults()


# -- the recipes in recipes/ -------------------------------------------------------------------

REQUIRED = ["psmnist-lrd-gru-128-24", "psmnist-gru-128", "addition-gru-small", "copy-small",
            "psmnist-lr-gru-128-24", "psmnist-lr-gru-512-4", "psmnist-lrd-gru-64-24", "psmnist-lrd-gru-256-24",
            "copy-500-lrd-gru-128-50", "copy-varlen-100-lrd-gru-128-50", "copy-varlag-100-lrd-gru-128-50",
            "addition-750-lr-gru-128-24", "ptb-gru-1000", "ptb-lrd-gru-tied-1000-64", "ptb-lstm-1000-dropout",
            "mnist-lr-highway-1024-256"]
ALL = sorted(p.stem for p in RECIPES.glob("*.toml"))


def test_required_recipes_exist():
    assert set(REQUIRED) <= set(ALL)


def count(model: torch.nn.Module, where: str) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if where in name)


@pytest.mark.parametrize("name", ALL)
def test_recipe_builds_with_its_recorded_counts(name, data_env):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    meta = recipe["meta"]
    assert meta["name"] == name and meta["description"] and meta["source"]
    assert check_recipe(tomllib.loads(dump_recipe(recipe))) == recipe
    if recipe["task"]["name"] == "ptb_char" and data_env is None:
        pytest.skip("char-level PTB files absent: the vocabulary size is unknown (set LRCOMPRESS_DATA)")
    task = build_task(recipe["task"])  # MNIST tasks read nothing here
    torch.manual_seed(0)
    model = build_model(recipe["model"], task)
    assert lrc.count_params(model) == meta["params"]
    matrices = "parametrizations" if recipe["model"]["cell"] == "highway" else "weight_hh"
    assert count(model, matrices) == meta["recurrent_params"]
    if recipe["model"]["update_gate_bias"] is not None:
        n = recipe["model"]["hidden_size"]
        assert torch.all(model.rnn.bias_ih_l0[n:2 * n] == recipe["model"]["update_gate_bias"])
