"""The seed papers' own experiments as recipes (recipes/*-kru-*, *-scornn-*, *-tt-*): each builds
its model with the parameter counts its [meta] records (checked against each structure's own
formula), a few updates of a shrunk copy lower the training loss, scoRNN's recurrent matrix stays
orthogonal through training with its own learning rate, and train.unitary_penalty adds exactly
the KRU penalty to the loss."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lrcompress as lrc
from lrcompress.errors import ConfigError
from lrcompress.train.engine import TrainConfig, parameter_groups
from lrcompress.train.models import build_model
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build, train_recipe
from lrcompress.train.tasks import build_task

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SEEDS = sorted({p.stem for pattern in ("*-kru-*.toml", "*-scornn-*.toml", "*-tt-*.toml")
                for p in RECIPES.glob(pattern)})
# Overrides that shrink each recipe to a few seconds: small state, short sequences, one fixed
# batch of 8 (train_size = batch_size), so successive training losses are on the same examples.
SHRINK = {  # one validation example: an evaluation after every update only to log its training loss
    "copy": ["task.lag=5", "task.train_size=8", "task.valid_size=1", "task.test_size=1"],
    "addition": ["task.length=10", "task.train_size=8", "task.valid_size=1", "task.test_size=1"],
    "mnist": ["task.train_size=8", "task.valid_size=1"],
}
SMALL_MODEL = {  # per structure: a small model of the same kind
    "kronecker": ["model.hidden_size=16", "model.kron_factors='2x2x2x2'"],
    "scornn": ["model.hidden_size=8", "model.negatives=4"],
    "tt-gru": ["model.hidden_size=16", "model.tt_shape='6x4,8x4'", "model.tt_ranks=2"],  # 48 = 6*8, 16 = 4*4
    "tt-lstm": ["model.hidden_size=16", "model.tt_shape='8x4,8x4'", "model.tt_ranks=2"],  # 64 = 8*8
}
GATES = {"gru": 3, "lstm": 4, "rnn": 1}


def test_each_seed_paper_has_its_recipes():
    assert {"copy-1000-kru-rnn-128", "psmnist-kru-rnn-512", "copy-1000-scornn-190", "addition-200-scornn-170",
            "psmnist-scornn-170", "psmnist-tt-gru-256-r5"} <= set(SEEDS)


def recurrent_by_formula(model: dict) -> int:
    """Recurrent parameters from the structure's definition, read from the recipe's text only:
    Kronecker: sum of the factors' sizes per gate; scoRNN: A's upper triangle n (n - 1) / 2;
    joint TT: sum_k r_{k-1} m_k n_k r_k over the cores (r_0 = r_d = 1)."""
    n = model["hidden_size"]
    if model["cell"] == "scornn":
        return n * (n - 1) // 2
    gates = GATES[model["cell"]]
    if model["structure"] == "kronecker":
        sizes = [int(v) for v in model["kron_factors"].split("x")]
        assert np.prod(sizes) == n
        return gates * (model["terms"] or 1) * sum(a * a for a in sizes)
    assert model["structure"] == "tt" and model["joint"]
    modes = [tuple(int(v) for v in pair.split("x")) for pair in model["tt_shape"].split(",")]
    assert np.prod([m for m, _ in modes]) == gates * n and np.prod([c for _, c in modes]) == n
    ranks = [1] + [model["tt_ranks"]] * (len(modes) - 1) + [1]
    return sum(ranks[k] * m * c * ranks[k + 1] for k, (m, c) in enumerate(modes))


@pytest.mark.parametrize("name", SEEDS)
def test_seed_recipe_builds_with_its_recorded_counts(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    meta = recipe["meta"]
    for key in ("source", "paper_result", "paper_params", "deviations"):  # where each number comes from
        assert len(meta[key]) > 40, key
    torch.manual_seed(0)
    model = build_model(recipe["model"], build_task(recipe["task"]))
    recurrent = sum(p.numel() for n, p in model.named_parameters() if "weight_hh" in n)
    assert lrc.count_params(model) == meta["params"]
    assert recurrent == meta["recurrent_params"] == recurrent_by_formula(recipe["model"])


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory) -> Path:
    """Random images in the MNIST file layout: 16 training, 2 test."""
    root = tmp_path_factory.mktemp("data")
    (root / "mnist").mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 16), ("t10k", 2)):
        write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    return root


def shrunk(name: str, fake_mnist: Path, steps: int) -> list[str]:
    recipe = load_recipe(RECIPES / f"{name}.toml")
    task, model = recipe["task"]["name"], recipe["model"]
    kind = "scornn" if model["cell"] == "scornn" else (
        "kronecker" if model["structure"] == "kronecker" else f"tt-{model['cell']}")
    extra = [f"task.data_dir={str(fake_mnist)!r}"] if task == "mnist" else []
    return SHRINK[task] + SMALL_MODEL[kind] + extra + [
        "train.epochs=0", f"train.steps={steps}", "train.eval_every=1", "train.batch_size=8", "train.device='cpu'"]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", SEEDS)
def test_a_few_updates_of_each_seed_recipe_lower_its_loss(name, fake_mnist, tmp_path):
    summary = train_recipe(RECIPES / f"{name}.toml", tmp_path / "run", overrides=shrunk(name, fake_mnist, 8),
                           progress=False)
    losses = [r["train_loss"] for r in history(tmp_path / "run")]  # one fixed batch, before each update
    assert summary["steps"] == 8 and summary["nan_events"] == 0
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", [s for s in SEEDS if "scornn" in s])
def test_scornn_recipe_keeps_w_orthogonal_and_steps_a_at_its_own_rate(name, fake_mnist, tmp_path):
    overrides = shrunk(name, fake_mnist, 5)
    recipe = load_recipe(RECIPES / f"{name}.toml", overrides)
    assert 0 < recipe["train"]["lr_orthogonal"] < recipe["train"]["lr"]
    _, start = build(recipe)
    groups = parameter_groups(start, TrainConfig.from_dict(recipe["train"]))
    assert [p for g in groups if g.get("lr") == recipe["train"]["lr_orthogonal"] for p in g["params"]] == \
        [start.rnn.parametrizations.weight_hh_l0.original0]
    train_recipe(recipe, tmp_path / "run", progress=False)
    _, model = build(recipe)
    lrc.load_model(model, tmp_path / "run" / "model.safetensors")
    W = model.rnn.weight_hh_l0.detach().double()
    n = W.shape[0]
    assert torch.allclose(W.T @ W, torch.eye(n, dtype=torch.float64), atol=1e-5)  # orthogonal after updates
    moved = model.rnn.parametrizations.weight_hh_l0.original0 - start.rnn.parametrizations.weight_hh_l0.original0
    assert moved.abs().max() > 0  # A was trained
    signs = model.rnn.parametrizations.weight_hh_l0[0].signs  # D: fixed, `negatives` entries -1
    assert int((signs < 0).sum()) == recipe["model"]["negatives"]


def kru_penalty(model: torch.nn.Module) -> float:
    """sum ||F^T F - I||_F^2 over every Kronecker factor, in float64 from the raw originals."""
    total = 0.0
    for name, p in model.named_parameters():
        if re.search(r"weight_hh_l0\.original\d+$", name):
            F = p.detach().double()  # (gates, terms, a, b)
            eye = torch.eye(F.shape[-1], dtype=torch.float64)
            total += float(((F.mT @ F - eye) ** 2).sum())
    return total


@pytest.mark.parametrize("name", [s for s in SEEDS if "kru" in s])
def test_unitary_penalty_adds_exactly_the_kru_penalty_to_the_loss(name, fake_mnist, tmp_path):
    base = shrunk(name, fake_mnist, 1)
    assert load_recipe(RECIPES / f"{name}.toml")["train"]["unitary_penalty"] > 0  # the recipe uses it
    first = {}
    for weight in (0.0, 0.25):
        run = tmp_path / f"w{weight}"
        train_recipe(RECIPES / f"{name}.toml", run, overrides=base + [f"train.unitary_penalty={weight}"],
                     progress=False)
        first[weight] = history(run)[0]["train_loss"]  # the first update's loss: same data, same start
    _, model = build(load_recipe(RECIPES / f"{name}.toml", base))
    penalty = kru_penalty(model)
    assert penalty > 1.0  # random factors are far from orthogonal: the check below has teeth
    assert first[0.25] - first[0.0] == pytest.approx(0.25 * penalty, rel=1e-4)


def test_a_large_unitary_penalty_makes_the_factors_orthogonal(fake_mnist, tmp_path):
    name = "copy-1000-kru-rnn-128"
    overrides = shrunk(name, fake_mnist, 30) + ["train.unitary_penalty=1.0", "train.lr=0.01"]
    train_recipe(RECIPES / f"{name}.toml", tmp_path / "run", overrides=overrides, progress=False)
    recipe = load_recipe(RECIPES / f"{name}.toml", overrides)
    _, start = build(recipe)
    _, model = build(recipe)
    lrc.load_model(model, tmp_path / "run" / "model.safetensors")
    assert kru_penalty(model) < 0.2 * kru_penalty(start)


def test_structure_training_options_refuse_models_without_their_structure(tmp_path):
    task = build_task({"name": "addition", "length": 6})
    dense = build_model({"cell": "rnn", "hidden_size": 8}, task)
    with pytest.raises(ConfigError, match="lr_orthogonal"):
        parameter_groups(dense, TrainConfig(steps=1, lr_orthogonal=1e-4))
    recipe = {"task": {"name": "addition", "length": 6, "train_size": 8, "valid_size": 8, "test_size": 8},
              "model": {"cell": "rnn", "hidden_size": 8},
              "train": {"steps": 1, "batch_size": 8, "unitary_penalty": 0.1, "device": "cpu"}}
    with pytest.raises(ConfigError, match="Kronecker"):
        train_recipe(recipe, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="unitary_penalty"):
        TrainConfig(steps=1, unitary_penalty=-1.0)
    assert parameter_groups(dense, TrainConfig(steps=1)) == list(dense.parameters())


@pytest.mark.parametrize("bad, words", [
    ({"rank": 4}, "rank does not apply"), ({"num_layers": 2}, "num_layers"), ({"structure": "orthogonal"}, "structure"),
    ({"negatives": 9}, "0..hidden_size = 8"), ({"tt_ranks": 2}, "tt_ranks")])
def test_scornn_cell_takes_only_negatives(bad, words):
    task = build_task({"name": "addition", "length": 6})
    with pytest.raises(ConfigError, match=re.escape(words)):
        build_model({"cell": "scornn", "hidden_size": 8, **bad}, task)
