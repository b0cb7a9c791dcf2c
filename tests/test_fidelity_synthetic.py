"""The memory, addition and permuted-MNIST recipes against the authors' code
(github.com/Avmb/lowrank-gru): RMSProp with eps inside the square root and the accumulator from
1e-3 (optimizations.py), psMNIST's unclipped first seven parameters and selection by validation
cross-entropy (RNN_mnist.py), Glorot initialisation and a trainable initial state (models.py),
and the addition task's test markers anywhere (RNN_adding.py).

References: RMSProp steps written out in float64 Python arithmetic; clipping against
hand-computed clamps and norms; initialisation against the Glorot bound sqrt(6 / (rows + cols))
and uniform moments; marker placement against exact ranges and the uniform law."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.cli_train import _report_run
from lrcompress.errors import ConfigError
from lrcompress.report import format_metric
from lrcompress.train import fit
from lrcompress.train.engine import _log_line, check_select
from lrcompress.train.models import build_model, glorot_bound
from lrcompress.train.optim import PaperRMSprop, build_optimizer, build_rmsprop
from lrcompress.train.recipe import check_train, load_recipe
from lrcompress.train.run import format_report
from lrcompress.train.stabilisers import Stabiliser, clip_exemptions
from lrcompress.train.tasks import build_task

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
pytestmark = pytest.mark.usefixtures("one_thread")

COPY = ["copy-500-lrd-gru-128-50", "copy-500-lrd-gru-wn-128-50", "copy-varlag-100-lrd-gru-128-50",
        "copy-varlag-100-lrd-gru-wn-128-50", "copy-varlen-100-lrd-gru-128-50", "copy-varlen-100-lrd-gru-wn-128-50",
        "copy-50-lrd-gru-128-50-cpu"]
ADDITION = ["addition-750-lr-gru-128-24", "addition-100-lr-gru-128-24-cpu"]
PSMNIST = ["psmnist-gru-128", "psmnist-lr-gru-128-24", "psmnist-lr-gru-512-4", "psmnist-lrd-gru-64-24",
           "psmnist-lrd-gru-128-24", "psmnist-lrd-gru-256-24"]


def built(name: str):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    task = build_task(recipe["task"])  # MNIST tasks read nothing here
    return recipe, task, build_model(recipe["model"], task)


# -- 1. RMSProp as the authors' rms_prop -------------------------------------------------------

def rmsprop_reference(p0: float, grads: list[float], *, lr: float, eps: float, inside: bool,
                      acc0: float = 1e-3, alpha: float = 0.9) -> list[float]:
    """optimizations.py rms_prop, one scalar, in float64: acc first, then the step."""
    p, acc, out = p0, acc0, []
    for g in grads:
        acc = alpha * acc + (1 - alpha) * g * g
        p -= lr * g / (math.sqrt(acc + eps) if inside else math.sqrt(acc) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("eps,inside,cls", [(1e-2, True, "PaperRMSprop"), (1e-2, False, "RMSprop"),
                                            (0.0, True, "RMSprop"), (1e-8, True, "PaperRMSprop")])
def test_rmsprop_steps_equal_the_hand_computed_float64_updates(eps, inside, cls):
    p = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    grads = [[0.3, -0.02, 4.0], [-0.1, 0.0, 1.0], [0.25, 0.05, -3.0]]
    opt = build_rmsprop([p], lr=0.01, eps=eps, eps_inside=inside)
    assert type(opt).__name__ == cls
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    for i, p0 in enumerate((0.5, -1.0, 2.0)):
        expected = rmsprop_reference(p0, [g[i] for g in grads], lr=0.01, eps=eps, inside=inside)[-1]
        assert p[i].item() == pytest.approx(expected, rel=1e-14, abs=1e-15)
    if eps and inside:  # the two places of eps really differ at this eps: the test can fail
        outside = rmsprop_reference(0.5, [g[0] for g in grads], lr=0.01, eps=eps, inside=False)[-1]
        assert abs(p[0].item() - outside) > 1e-3 * eps  # far above float64 rounding (1e-16)


def test_paper_rmsprop_state_round_trips_and_zero_denominator_steps_nowhere():
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = PaperRMSprop([p], lr=0.1, eps=1e-8, initial_accumulator=1e-3)
    p.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()
    clone = nn.Parameter(p.detach().clone())
    other = PaperRMSprop([clone], lr=0.1, eps=1e-8)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's state_dict shares the tensors
    for q, o in ((p, opt), (clone, other)):
        q.grad = torch.tensor([0.5, 0.0], dtype=torch.float64)
        o.step()
    assert torch.equal(p, clone)
    assert opt.state[p]["square_avg"][1].item() == pytest.approx(1e-3 * 0.81)
    zero = nn.Parameter(torch.ones(1, dtype=torch.float64))
    guarded = PaperRMSprop([zero], lr=0.1, eps=0.0, initial_accumulator=0.0)
    zero.grad = torch.zeros(1, dtype=torch.float64)
    guarded.step()  # sqrt(0 + 0): 0/0 in the formula, a zero step here
    assert zero.item() == 1.0


def test_rmsprop_settings_are_checked_and_reach_the_optimizer():
    with pytest.raises(ConfigError, match="rmsprop_initial_accumulator"):
        check_train({"steps": 1, "rmsprop_initial_accumulator": -1.0})
    with pytest.raises(ConfigError, match="rmsprop_eps_inside"):
        check_train({"steps": 1, "rmsprop_eps_inside": "yes"})
    with pytest.raises(ConfigError, match="initial_accumulator"):
        PaperRMSprop([nn.Parameter(torch.ones(1))], initial_accumulator=-1.0)
    opt = build_optimizer([nn.Parameter(torch.ones(1))], "rmsprop", lr=1e-3, rmsprop_eps=1e-8,
                          rmsprop_eps_inside=True, rmsprop_initial_accumulator=2e-3)
    assert isinstance(opt, PaperRMSprop) and opt.param_groups[0]["initial_accumulator"] == 2e-3


# -- 2. psMNIST: unclipped parameters, selection by CE, percentages ----------------------------

def gru_with_grads(rank: int = 2, value: float = 5.0):
    torch.manual_seed(0)
    model = build_model({"cell": "gru", "hidden_size": 8, "rank": rank, "diag": bool(rank)},
                        build_task({"name": "addition", "length": 5}))
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return model


LR_EXEMPT = ["rnn.parametrizations.weight_hh_l0.original1", "rnn.weight_ih_l0",
             "rnn.parametrizations.weight_hh_l0.original0:n"]


def test_element_clipping_leaves_the_exempt_parameters_and_gate_block_alone():
    model = gru_with_grads()
    stab = Stabiliser(model, clip="element", clip_value=1.0, nan_policy="none", clip_exempt=LR_EXEMPT)
    stab.clip_()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert torch.all(grads["rnn.weight_ih_l0"] == 5.0)
    assert torch.all(grads["rnn.parametrizations.weight_hh_l0.original1"] == 5.0)
    L = grads["rnn.parametrizations.weight_hh_l0.original0"]
    assert torch.all(L[2] == 5.0) and torch.all(L[:2] == 1.0)  # gate n exempt; r and z clipped
    for name in ("rnn.bias_ih_l0", "rnn.bias_hh_l0", "rnn.parametrizations.weight_hh_l0.original2", "head.weight"):
        assert torch.all(grads[name] == 1.0)


def test_norm_clipping_scales_only_the_clipped_parts_by_their_own_norm():
    model = gru_with_grads()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3
    before = {n: p.grad.clone().double() for n, p in model.named_parameters()}
    exempt = ["rnn.weight_ih_l0", "rnn.bias_hh_l0:z"]
    Stabiliser(model, clip="norm", clip_value=1.0, nan_policy="none", clip_exempt=exempt).clip_()
    n = 8
    clipped = [g for k, g in before.items() if k not in ("rnn.weight_ih_l0", "rnn.bias_hh_l0")]
    clipped += [before["rnn.bias_hh_l0"][:n], before["rnn.bias_hh_l0"][2 * n:]]
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in clipped))
    factor = min(1.0, 1.0 / (norm + 1e-6))
    assert factor < 0.5  # a real scaling
    after = {k: p.grad.double() for k, p in model.named_parameters()}
    assert torch.equal(after["rnn.weight_ih_l0"], before["rnn.weight_ih_l0"])
    assert torch.allclose(after["rnn.bias_hh_l0"][n:2 * n], before["rnn.bias_hh_l0"][n:2 * n], rtol=0, atol=0)
    assert torch.allclose(after["rnn.bias_hh_l0"][:n], factor * before["rnn.bias_hh_l0"][:n], rtol=1e-6)
    assert torch.allclose(after["head.weight"], factor * before["head.weight"], rtol=1e-6)


@pytest.mark.parametrize("names,match", [(["rnn.weight_hh"], "no parameter 'rnn.weight_hh'"),
                                         (["rnn.bias_ih_l0:x"], "unknown gate 'x'"),
                                         (["head.weight:n"], "GRU or LSTM"),
                                         (["rnn.parametrizations.weight_hh_l0.original1:zz"], "unknown gate")])
def test_bad_exemptions_raise_config_errors_naming_them(names, match):
    with pytest.raises(ConfigError, match=match):
        clip_exemptions(gru_with_grads(), names)


def test_exemptions_are_checked_in_recipes_and_before_training():
    with pytest.raises(ConfigError, match="clip = 'none'"):
        check_train({"steps": 1, "clip": "none", "clip_exempt": ["rnn.weight_ih_l0"]})
    with pytest.raises(ConfigError, match="parameter names"):
        check_train({"steps": 1, "clip_exempt": [3]})
    model = gru_with_grads()
    data = [(torch.randn(2, 5, 2), torch.randn(2, 1))]
    with pytest.raises(ConfigError, match="'rnn.nope'"):
        fit(model, data, nn.functional.mse_loss, recipe={"steps": 1, "clip_exempt": ["rnn.nope"]})


AUTHORS_FIRST_SEVEN = {  # element counts of RNN_mnist.py's unclipped gradients, models.py's shapes (input 1)
    "psmnist-gru-128": 3 * 128 + 3 * 128 * 128 + 128,  # W_m/u/r, U_m/u/r, b_m
    "psmnist-lr-gru-128-24": 3 * 128 * 24 + 3 * 128 + 24 * 128,  # U_proj_m/u/r, W_m/u/r, U_m
    "psmnist-lr-gru-512-4": 3 * 512 * 4 + 3 * 512 + 4 * 512,
    "psmnist-lrd-gru-64-24": 3 * 64 * 24 + 3 * 64 + 24 * 64,
    "psmnist-lrd-gru-128-24": 3 * 128 * 24 + 3 * 128 + 24 * 128,
    "psmnist-lrd-gru-256-24": 3 * 256 * 24 + 3 * 256 + 24 * 256,
}


@pytest.mark.parametrize("name", PSMNIST)
def test_psmnist_recipes_exempt_exactly_the_authors_first_seven_and_select_on_ce(name):
    recipe, task, model = built(name)
    train = recipe["train"]
    spans = clip_exemptions(model, train["clip_exempt"])
    params = {id(p): p for p in model.parameters()}
    rows = {k: sum(b - a for a, b in s) for k, s in spans.items()}
    unclipped = sum(p.numel() - rows[k] * (p.numel() // p.shape[0]) for k, p in params.items() if k in spans)
    n = recipe["model"]["hidden_size"]
    extra = n if name == "psmnist-gru-128" else 0  # their one b_m is our bias_ih and bias_hh candidate blocks
    assert unclipped == AUTHORS_FIRST_SEVEN[name] + extra
    assert train["eval_every"] == 300 and train["select"] == "ce" and train["clip"] == "element"
    assert check_select("ce", task) == "ce"


def test_select_is_checked_against_the_task_and_picks_the_lowest_validation_ce():
    task = build_task({"name": "mnist", "permute": True})
    with pytest.raises(ConfigError, match=r"train.select = 'bpc'.*accuracy, ce"):
        check_select("bpc", task)
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 10, (64,))
    model = nn.Sequential(nn.Linear(6, 10))
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    result = fit(model, train, task=task, val_loader=[(x, y)], progress=False,
                 recipe={"optimizer": "adam", "lr": 0.3, "steps": 12, "eval_every": 1, "select": "ce"})
    assert result.metric == "ce" and result.higher_is_better is False
    ces = [r["val"]["ce"] for r in result.history]
    assert result.best_step == result.history[int(np.argmin(ces))]["step"]
    assert result.best["ce"] == min(ces)


def test_accuracy_prints_as_a_percentage_and_stays_a_fraction_in_json(capsys):
    assert format_metric("accuracy", 0.93512) == "93.51%" and format_metric("sequence_accuracy", 1.0) == "100.00%"
    assert format_metric("ce", 0.0123456) == "0.01235" and format_metric(None, None) == "-"
    record = {"step": 300, "train_loss": 0.5, "val": {"accuracy": 0.9351, "ce": 0.21}, "lr": 5e-4, "nan_events": 0}
    assert "val accuracy 93.51%" in _log_line(record) and "val ce 0.21" in _log_line(record)
    summary = {"run_dir": "runs/x", "steps": 300, "stopped": "steps", "wall_time": 1.0, "metric": "ce",
               "val": {"accuracy": 0.9351, "ce": 0.21}, "test": {"accuracy": 0.9299, "ce": 0.25}, "params": 10}
    _report_run(summary, False, "")
    out = capsys.readouterr().out
    assert "val ce 0.21 (accuracy 93.51%)" in out and "test ce 0.25 (accuracy 92.99%)" in out
    _report_run(summary, True, "")
    assert '"accuracy": 0.9351' in capsys.readouterr().out  # JSON keeps the fraction
    row = {"run": "r", "rank": 4, "diag": False, "params": 10, "ratio": 2.0, "metric": "accuracy", "split": "test",
           "dense": 0.95, "before": 0.5, "after": 0.935, "wall_time": 3.0}
    assert "93.50%" in format_report([row]) and "95.00%" in format_report([row])


# -- 3. Glorot initialisation and the trainable initial state ----------------------------------

def assert_uniform(t: torch.Tensor, bound: float) -> None:
    """Entries in [-bound, bound], reaching near it, with U(-b, b)'s variance b^2/3 (loose, n >= 384)."""
    t = t.detach().double().flatten()
    assert t.abs().max() <= bound + 1e-7 and t.abs().max() > 0.9 * bound
    var = float(t.var())
    assert abs(var - bound ** 2 / 3) < 5 * (bound ** 2 / 3) * math.sqrt(0.8 / t.numel()) + 1e-12


@pytest.mark.parametrize("name", ["psmnist-lrd-gru-128-24", "psmnist-gru-128", "copy-500-lrd-gru-128-50",
                                  "addition-750-lr-gru-128-24"])
def test_glorot_init_bounds_zero_biases_and_diagonals(name):
    recipe, task, model = built(name)
    n, d, spec = recipe["model"]["hidden_size"], recipe["model"]["rank"], recipe["model"]
    rnn = model.rnn
    assert_uniform(rnn.weight_ih_l0, glorot_bound(n, task.input_size))  # per gate: n x input
    if d:
        originals = rnn.parametrizations.weight_hh_l0
        assert_uniform(originals.original0, glorot_bound(n, d))  # L, their U_m: d x n
        assert_uniform(originals.original1, glorot_bound(d, n))  # R, their U_proj: n x d
        if spec["diag"]:
            D = originals.original2
            assert D.abs().max() <= 0.01 and D.abs().max() > 0.009
    else:
        assert_uniform(rnn.weight_hh_l0, glorot_bound(n, n))
    assert_uniform(model.head.weight, glorot_bound(task.output_size, n))
    assert torch.all(model.head.bias == 0) and torch.all(rnn.bias_hh_l0 == 0)
    b = rnn.bias_ih_l0
    assert torch.all(b[n:2 * n] == spec["update_gate_bias"]) and torch.all(b[:n] == 0) and torch.all(b[2 * n:] == 0)
    assert torch.all(model.initial_state == 0) and model.initial_state.shape == (1, n)


def test_default_init_is_pytorchs_and_glorot_is_checked():
    task = build_task({"name": "addition", "length": 5})
    torch.manual_seed(3)
    default = build_model({"cell": "gru", "hidden_size": 8}, task)
    torch.manual_seed(3)
    plain = nn.GRU(2, 8, batch_first=True)
    assert torch.equal(default.rnn.weight_hh_l0, plain.weight_hh_l0)  # today's models still reproduce
    assert default.initial_state is None and lrc.count_params(default) == lrc.count_params(
        build_model({"cell": "gru", "hidden_size": 8, "learn_initial_state": True}, task)) - 8
    with pytest.raises(ConfigError, match="model.init = 'glorot' is for gru, lstm and rnn cells"):
        build_model({"cell": "scornn", "hidden_size": 8, "init": "glorot"}, task)
    with pytest.raises(ConfigError, match="not structure 'kronecker'"):
        build_model({"cell": "gru", "hidden_size": 8, "init": "glorot", "structure": "kronecker",
                     "kron_factors": "2x2x2"}, task)
    with pytest.raises(ConfigError, match="model.init must be one of"):
        build_model({"cell": "gru", "init": "xavier"}, task)


@pytest.mark.parametrize("cell,rank", [("gru", 2), ("lstm", 0)])
def test_initial_state_gets_gradients_trains_and_is_saved_and_loaded(cell, rank, tmp_path):
    task = build_task({"name": "addition", "length": 6, "train_size": 40, "valid_size": 8, "test_size": 8})
    spec = {"cell": cell, "hidden_size": 8, "rank": rank, "diag": bool(rank), "init": "glorot",
            "learn_initial_state": True, "gru_form": "paper" if cell == "gru" else "cudnn"}
    torch.manual_seed(0)
    model = build_model(spec, task)
    batch = next(iter(task.batches("train", 8, seed=0)))
    task.loss(model(batch.x), batch).backward()
    assert model.initial_state.grad.abs().sum() > 0
    if cell == "lstm":
        assert model.initial_cell.grad.abs().sum() > 0
    before = model.initial_state.detach().clone()
    fit(model, lambda epoch: task.batches("train", 8, seed=0, epoch=epoch), task=task, progress=False,
        recipe={"steps": 3, "eval_every": 0, "lr": 0.01})
    assert not torch.equal(model.initial_state, before)  # RMSProp moved it
    lrc.save_model(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    fresh = build_model(spec, task)
    lrc.load_model(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh.initial_state, model.initial_state)
    # fit left the model its training-time path (factored or rebuilt, as the cost model chose); the
    # fresh copy runs the plain module: the same weights, float32 rounding apart
    torch.testing.assert_close(fresh(batch.x), model(batch.x), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


# -- 4. The addition task's markers ------------------------------------------------------------

def markers(task, split: str, n: int) -> tuple[np.ndarray, torch.Tensor]:
    batch = task.dataset(split).batch(range(n))
    m = batch.x[..., 1].numpy()
    assert np.all(m.sum(1) == 2)  # exactly two markers, at two distinct steps
    pos = np.sort(np.nonzero(m)[1].reshape(n, 2), axis=1)
    values = batch.x[..., 0].numpy()
    assert np.allclose(values[np.arange(n)[:, None], pos].sum(1), batch.y[:, 0].numpy(), atol=1e-6)
    return pos, batch


def test_training_markers_sit_one_in_each_half_and_eval_markers_anywhere():
    T, n = 20, 3000
    task = build_task({"name": "addition", "length": T, "train_size": n, "valid_size": n, "test_size": n,
                       "eval_markers": "anywhere"})
    train, _ = markers(task, "train", n)
    assert np.all(train[:, 0] < T // 2) and np.all(train[:, 1] >= T // 2)
    for split in ("valid", "test"):
        pos, _ = markers(task, split, n)
        same_half = np.mean((pos[:, 0] < T // 2) == (pos[:, 1] < T // 2))
        expected = (T // 2 - 1) / (T - 1)  # both of two distinct uniform steps in one half: 9/19
        assert abs(same_half - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
        counts = np.bincount(pos.ravel(), minlength=T)
        chi2 = float(((counts - 2 * n / T) ** 2 / (2 * n / T)).sum())  # uniform marginal, 19 dof
        assert chi2 < 50  # p ~ 1e-4 for 19 degrees of freedom
    halves = build_task({"name": "addition", "length": T, "train_size": n, "valid_size": 200, "test_size": 200})
    assert torch.equal(halves.dataset("train").batch(range(50)).x, task.dataset("train").batch(range(50)).x)
    pos, _ = markers(halves, "test", 200)
    assert np.all(pos[:, 0] < T // 2) and np.all(pos[:, 1] >= T // 2)
    with pytest.raises(ConfigError, match="task.eval_markers must be one of"):
        build_task({"name": "addition", "eval_markers": "middle"})


# -- the recipes take the authors' settings ----------------------------------------------------

@pytest.mark.parametrize("name", COPY + ADDITION + PSMNIST)
def test_recipes_take_the_authors_settings(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    model, train = recipe["model"], recipe["train"]
    assert model["init"] == "glorot" and model["learn_initial_state"]
    assert train["optimizer"] == "rmsprop" and train["rmsprop_alpha"] == 0.9
    assert train["rmsprop_initial_accumulator"] == 1e-3 and train["rmsprop_eps_inside"]
    assert train["rmsprop_eps"] == (1e-8 if name in COPY else 0.0)
    assert "github.com/Avmb/lowrank-gru" in recipe["meta"]["deviations"]
    if name in ADDITION:
        assert recipe["task"]["eval_markers"] == "anywhere" and train["clip"] == "element"
    optimizer = build_optimizer([nn.Parameter(torch.ones(1))], "rmsprop", lr=train["lr"],
                                rmsprop_eps=train["rmsprop_eps"], rmsprop_eps_inside=True)
    assert isinstance(optimizer, PaperRMSprop) == (name in COPY)
