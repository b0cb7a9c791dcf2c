"""The training engine: loss goes down, resume is bit-exact, NaN recovery, checkpoints, the
optimisers against hand-written references, clipping, weight norm and the max-norm hook."""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrcompress import load_model, save_model
from lrcompress.errors import ConfigError, OutputExistsError
from lrcompress.nn import LowRankGRU
from lrcompress.train import (Batch, Stabiliser, TrainConfig, build_optimizer, build_rmsprop, evaluate, fit,
                              load_checkpoint, max_row_norm_, remove_weight_norm, save_checkpoint, weight_norm)
from lrcompress.train.models import SequenceModel
from lrcompress.train.recipe import RECIPE_DEFAULTS
from lrcompress.train.stabilisers import WeightNorm, constrained_matrices, row_norms
from lrcompress.train.tasks import Task, build_task


# Tiny models: one thread avoids oversubscription on shared CI machines.
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """Low-rank-plus-diagonal GRU, dropout (so resume must restore the RNG), linear head."""

    def __init__(self, inputs: int = 2, hidden: int = 8, outputs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.rnn = LowRankGRU(inputs, hidden, rank=2, diag=True, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x, lengths=None):
        return self.head(self.drop(self.rnn(x)[0][:, -1]))


def addition_loader(n: int, seed: int, *, batch: int = 16, shuffle: bool = True) -> DataLoader:
    """The addition problem (length 6) as a user would bring it: a shuffling DataLoader."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, 6, generator=g)
    marks = torch.zeros(n, 6)
    marks[torch.arange(n), torch.randint(0, 3, (n,), generator=g)] = 1
    marks[torch.arange(n), torch.randint(3, 6, (n,), generator=g)] = 1
    x, y = torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


def model_tensors(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the loop ---------------------------------------------------------------------------------

def test_training_on_a_task_lowers_the_validation_error():
    task = build_task({"name": "addition", "length": 8, "train_size": 512, "valid_size": 128, "test_size": 128})
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    valid = lambda: task.batches("valid", 64, seed=0, shuffle=False)  # noqa: E731
    before = evaluate(model, valid, task=task)["mse"]
    result = fit(model, lambda epoch: task.batches("train", 16, seed=0, epoch=epoch), task=task,
                 recipe={"steps": 160, "eval_every": 40, "lr": 3e-3, "clip": "norm"}, val_loader=valid,
                 test_loader=lambda: task.batches("test", 64, seed=0, shuffle=False), progress=False)
    assert result.metric == "mse" and not result.higher_is_better
    assert result.steps == 160 and result.stopped == "steps" and result.epochs == 5
    assert result.val["mse"] < 0.5 * before, (before, result.val)
    assert result.val["mse"] == min(r["val"]["mse"] for r in result.history)  # best weights returned
    assert math.isfinite(result.test["mse"]) and result.nan_events == 0


@pytest.mark.parametrize("interrupt_at", [22, 30])  # mid-epoch between evaluations (13 batches per epoch); at one
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, interrupt_at):
    cfg = {"steps": 40, "eval_every": 15, "lr": 2e-3, "clip": "norm", "lr_schedule": "onecycle",
           "weight_norm": True, "max_row_norm": 10.0, "seed": 3}

    def run(run_dir, *, resume=False, interrupt_at=None):
        torch.manual_seed(0)
        model = TinyNet()

        def on_step(loop):
            if loop.step == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the run stops at this update

        return model, fit(model, addition_loader(200, 0), nn.functional.mse_loss, recipe=cfg,
                          val_loader=addition_loader(64, 1, shuffle=False), run_dir=run_dir, resume=resume,
                          on_step=on_step, progress=False)

    full_model, full = run(tmp_path / "full")
    _, cut = run(tmp_path / "cut", interrupt_at=interrupt_at)
    assert cut.stopped == "interrupted" and cut.steps == interrupt_at
    with pytest.raises(OutputExistsError):
        run(tmp_path / "cut")
    resumed_model, resumed = run(tmp_path / "cut", resume=True)
    assert resumed.steps == full.steps == 40 and resumed.stopped == "steps"
    a, b = (load_checkpoint(tmp_path / name / "last.safetensors") for name in ("full", "cut"))
    assert a.model.keys() == b.model.keys() and a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for i, state in a.optimizer["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b.optimizer["state"][i][k]), (i, k)
    for (k, v), (k2, v2) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert [_no_time(r) for r in full.history] == [_no_time(r) for r in resumed.history]
    assert resumed.val == full.val and resumed.best_step == full.best_step


def _no_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "wall_time"}


class StreamTask(Task):
    """A stateful language-modelling stand-in: 4 random token streams read in windows of 8."""

    name, input_size, output_size, output, tokens = "stream", 5, 5, "sequence", True
    metric, higher_is_better, stateful = "ce", False, True

    def __init__(self):
        self.spec = {}

    def batches(self, split, batch_size, *, seed, epoch=0, shuffle=True):
        g = torch.Generator().manual_seed(1000 * seed + 10 * epoch + (split != "train"))
        data = torch.randint(0, 5, (batch_size, 41), generator=g)
        for start in range(0, 40, 8):
            yield Batch(data[:, start:start + 8], data[:, start + 1:start + 9])

    def loss(self, logits, batch):
        return nn.functional.cross_entropy(logits.reshape(-1, 5), batch.y.reshape(-1))

    def evaluate(self, logits, batch):
        return {"count": float(batch.y.numel()), "nll": float(self.loss(logits, batch)) * batch.y.numel()}

    def finalize(self, sums):
        return {"ce": sums["nll"] / sums["count"]}


def test_stateful_task_carries_the_state_and_resumes_exactly(tmp_path):
    task = StreamTask()
    cfg = {"steps": 12, "eval_every": 4, "batch_size": 4, "optimizer": "adam", "lr": 1e-2, "recurrent_dropout": 0.2}

    def run(run_dir, *, resume=False, interrupt_at=None):
        torch.manual_seed(0)
        model = SequenceModel(nn.GRU(5, 8, batch_first=True), 5, "sequence", vocab_size=5)
        seen = []
        real = model.forward_stateful

        def spy(x, state=None, lengths=None):
            out, new = real(x, state, lengths)
            if model.training:
                seen.append((state, new.detach().clone()))
            return out, new

        model.forward_stateful = spy

        def on_step(loop):
            if loop.step == interrupt_at:
                loop.stop()

        result = fit(model, lambda epoch: task.batches("train", 4, seed=0, epoch=epoch), task=task, recipe=cfg,
                     val_loader=lambda: task.batches("valid", 4, seed=0), run_dir=run_dir, resume=resume,
                     on_step=on_step, progress=False)
        return model, result, seen

    _, full, seen = run(tmp_path / "full")
    assert [s is None for s, _ in seen] == [True, False, False, False, False] * 2 + [True, False]  # epochs of 5
    for (_, previous), (state, _) in zip(seen, seen[1:]):
        if state is not None:
            assert torch.equal(state, previous) and not state.requires_grad
    run(tmp_path / "cut", interrupt_at=7)  # window 3 of epoch 2: a carried state is in the checkpoint
    assert load_checkpoint(tmp_path / "cut" / "last.safetensors").carry
    _, resumed, _ = run(tmp_path / "cut", resume=True)
    a, b = (load_checkpoint(tmp_path / name / "last.safetensors") for name in ("full", "cut"))
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert resumed.val == full.val


def test_amp_on_cpu_warns_and_trains_in_float32():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="amp='bf16' needs a CUDA device"):
        result = fit(TinyNet(), addition_loader(32, 0), nn.functional.mse_loss, recipe={"steps": 2, "amp": "bf16",
                                                                                      "device": "cpu"},
                     progress=False)
    assert result.steps == 2 and result.amp_overflows == 0


@pytest.mark.parametrize("policy", ["skip", "decay", "restore"])
def test_nan_gradient_is_recovered_and_counted(policy, tmp_path):
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    bad_steps = {6, 9}  # 0-based index of the update whose gradient is poisoned
    seen = {"step": 0}
    model.head.weight.register_hook(lambda g: g * float("nan") if seen["step"] in bad_steps else g)
    snapshots = {}

    def on_step(loop):
        seen["step"] = loop.step
        for p in loop.model.parameters():
            assert torch.isfinite(p).all()
        snapshots[loop.step] = (model_tensors(loop.model), _optimizer_tensors(loop.optimizer))

    result = fit(model, addition_loader(160, 0), nn.functional.mse_loss, on_step=on_step, progress=False,
                 recipe={"steps": 12, "eval_every": 4, "nan_policy": policy, "lr": 1e-2}, run_dir=tmp_path,
                 val_loader=addition_loader(32, 1, shuffle=False))
    assert result.nan_events == 2
    assert [r["nan_events"] for r in result.history] == [0, 1, 2]
    after, (before, opt_before) = snapshots[7][0], snapshots[6]
    if policy == "skip":
        assert all(torch.equal(after[k], before[k]) for k in after)
    elif policy == "restore":  # back to the state remembered at the evaluation after update 4
        remembered = snapshots[4][0]
        assert all(torch.equal(after[k], remembered[k]) for k in after)
    else:  # one RMSProp step on the pseudo-gradient 0.1 * parameter, for every parameter
        for i, (k, p) in enumerate(before.items()):
            g = 0.1 * p
            acc = 0.9 * opt_before[i]["square_avg"] + 0.1 * g * g
            assert torch.allclose(after[k], p - 1e-2 * g / (torch.sqrt(acc) + 1e-8), atol=1e-7), k


def _optimizer_tensors(optimizer) -> list[dict]:
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.param_groups[0]["params"]]


def test_no_nan_policy_lets_nan_reach_the_weights():
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    model.head.weight.register_hook(lambda g: g * float("nan"))
    result = fit(model, addition_loader(32, 0), nn.functional.mse_loss, recipe={"steps": 1, "nan_policy": "none"},
                 progress=False, restore_best=False)
    assert result.nan_events == 0 and torch.isnan(model.head.weight).all()


def test_early_stopping_and_plateau_halving():
    torch.manual_seed(0)
    model = TinyNet()
    result = fit(model, addition_loader(160, 0), nn.functional.mse_loss, metric_fn=lambda out, y: {"flat": 1.0},
                 recipe={"steps": 100, "eval_every": 5, "early_stopping_patience": 3, "lr_schedule": "plateau",
                         "plateau_patience": 2}, val_loader=addition_loader(32, 1, shuffle=False), progress=False)
    assert result.metric == "flat" and result.higher_is_better  # first metric_fn value; not a loss name
    assert result.stopped == "early_stopping" and result.steps == 20 and result.best_step == 5
    assert [r["lr"] for r in result.history] == [1e-3, 1e-3, 5e-4, 5e-4]  # the lr the next update uses


def test_plateau_scheduler_state_survives_resume(tmp_path):
    """ReduceLROnPlateau's state (best score, evaluations without improvement) is in the
    checkpoint: a run cut between two halvings and resumed lowers the lr at the same steps."""
    cfg = {"steps": 12, "eval_every": 2, "lr_schedule": "plateau", "plateau_patience": 2, "lr": 1e-2}

    def run(run_dir, *, resume=False, cut=None):
        torch.manual_seed(0)
        return fit(TinyNet(dropout=0.0), addition_loader(96, 0), nn.functional.mse_loss, recipe=cfg,
                   metric_fn=lambda out, y: {"flat": 1.0}, val_loader=addition_loader(16, 1, shuffle=False),
                   run_dir=run_dir, resume=resume, progress=False,
                   on_step=(lambda loop: loop.stop() if loop.step == cut else None))

    full = run(tmp_path / "full")
    assert [r["lr"] for r in full.history] == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3]  # two bad evaluations: x0.5 (recorded: the next update's lr)
    run(tmp_path / "cut", cut=5)  # after the 2nd evaluation (step 4): one bad evaluation counted
    state = load_checkpoint(tmp_path / "cut" / "last.safetensors").trainer["schedule"]
    assert state["num_bad_epochs"] == 1 and state["best"] == 1.0
    resumed = run(tmp_path / "cut", resume=True)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]


def test_train_config_defaults_are_the_recipe_defaults():
    assert TrainConfig.defaults() == RECIPE_DEFAULTS
    assert TrainConfig.from_dict({"steps": 5}).to_dict() == {**RECIPE_DEFAULTS, "steps": 5}


def test_recipe_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="train.optimizer"):
        TrainConfig.from_dict({"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="unknown key train.learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="train.lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="train.steps and train.epochs are both 0"):
        fit(TinyNet(), addition_loader(16, 0), nn.functional.mse_loss, recipe={"steps": 0}, progress=False)


# -- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model, fresh = TinyNet(dropout=0.0), TinyNet(dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = next(iter(addition_loader(16, 0)))
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, trainer={"step": 3})
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    ckpt.restore(fresh, opt2)
    assert ckpt.trainer == {"step": 3}
    for m in (model, fresh):  # one more identical step on both
        o = opt if m is model else opt2
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


# -- optimisers -------------------------------------------------------------------------------

def _authors_rmsprop(w, grads, *, lr, eps, acc0=1e-3):
    """The authors' Theano RMSProp in float64: acc from 1e-3, decay 0.9, step g / sqrt(acc + eps)."""
    acc = torch.full_like(w, acc0)
    for g in grads:
        acc = 0.9 * acc + 0.1 * g * g
        w = w - lr * g / torch.sqrt(acc + eps)
    return w


@pytest.mark.parametrize("foreach", [False, True])
def test_rmsprop_equals_the_papers_update(foreach):
    torch.manual_seed(0)
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(5)]
    start = torch.randn(4, 3, dtype=torch.float64)
    for eps in (0.0, 1e-8):  # the paper's two settings (1e-8: the memory task)
        p = nn.Parameter(start.clone())
        opt = build_rmsprop([p], lr=0.01, eps=eps)
        opt.param_groups[0]["foreach"] = foreach
        for g in grads:
            p.grad = g.clone()
            opt.step()
        assert type(opt) is torch.optim.RMSprop
        reference = _authors_rmsprop(start, grads, lr=0.01, eps=eps)
        if eps == 0:  # the same formula
            assert torch.allclose(p.detach(), reference, rtol=0, atol=1e-14)
        else:  # torch's sqrt(acc) + eps against their sqrt(acc + eps): a relative ~eps/sqrt(acc) per step
            step = (reference - start).abs().max()
            assert 0 < (p.detach() - reference).abs().max() < 1e-5 * step


def test_rmsprop_start_survives_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))
    opt = build_rmsprop([a, b], lr=0.01)
    a.grad = torch.randn(3, 2)  # b has no gradient yet: no state, as in torch
    opt.step()
    assert torch.allclose(opt.state[a]["square_avg"], 0.9e-3 + 0.1 * a.grad ** 2) and b not in opt.state
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    again = build_rmsprop([a2, b2], lr=0.5)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # lr and accumulator start come with the groups
    assert again.param_groups[0]["lr"] == 0.01 and again.param_groups[0]["initial_accumulator"] == 1e-3
    for p, q in ((a, a2), (b, b2)):
        p.grad = q.grad = torch.ones_like(p)
    opt.step()
    again.step()
    for p, q in ((a, a2), (b, b2)):
        assert torch.equal(p, q)
    assert torch.allclose(again.state[b2]["square_avg"], torch.full((2,), 0.9e-3 + 0.1))  # started at 1e-3


def _shazeer_stern(w, grads, *, max_step=1e-2, eps1=1e-30, eps2=1e-3):
    """Adafactor, algorithms 4 and 5 with relative step and update clipping at 1, in float64,
    factored over the last two dimensions of a 3-d tensor (batch of matrices)."""
    row, col = torch.zeros(w.shape[:-1], dtype=w.dtype), torch.zeros(w.shape[:-2] + w.shape[-1:], dtype=w.dtype)
    for t, g in enumerate(grads, 1):
        beta = 1 - t ** -0.8
        sq = g * g + eps1
        row = beta * row + (1 - beta) * sq.sum(-1)
        col = beta * col + (1 - beta) * sq.sum(-2)
        v = row.unsqueeze(-1) * col.unsqueeze(-2) / row.sum(-1, keepdim=True).unsqueeze(-1)
        u = g / v.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()))
        alpha = min(max_step, t ** -0.5) * max(eps2, float(w.pow(2).mean().sqrt()))
        w = w - alpha * u
    return w, row


def test_adafactor_follows_shazeer_and_stern():
    torch.manual_seed(0)
    start = torch.randn(2, 5, 3, dtype=torch.float64)  # two stacked gate blocks: factored per block
    grads = [torch.randn(2, 5, 3, dtype=torch.float64) for _ in range(4)]
    p = nn.Parameter(start.clone())
    opt = build_optimizer([p], "adafactor", lr=0.0)  # 0: the paper's relative step, capped at 1e-2
    for g in grads:
        p.grad = g.clone()
        opt.step()
    reference, row = _shazeer_stern(start, grads)
    assert type(opt) is torch.optim.Adafactor
    assert torch.allclose(p.detach(), reference, rtol=0, atol=1e-12)
    assert torch.allclose(opt.state[p]["row_var"].squeeze(-1) * 3, row)  # torch keeps row means, not sums


@pytest.mark.parametrize("lr", [0.0, 0.05])  # 0: the paper's cap 1e-2 of the relative step; 0.05: a larger cap
def test_adafactor_decreases_a_quadratic(lr):
    torch.manual_seed(0)
    target = torch.randn(6, 4)
    p, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))  # factored, and not
    opt = build_optimizer([p, b], "adafactor", lr=lr)
    losses = []
    for _ in range(200):
        loss = (p - target).pow(2).sum() + (b - 1).pow(2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.25 * losses[0]
    assert "row_var" in opt.state[p] and "variance" in opt.state[b]


def test_onecycle_schedule_follows_the_cosine_formula():
    """The lr of each update under fit's onecycle: cosine warm-up from lr/25 to lr over the first
    30% of the updates, then cosine decay to lr/25e4 (OneCycleLR's phase ends at 0.3 T - 1, T - 1)."""
    seen = []
    fit(TinyNet(dropout=0.0), addition_loader(160, 0), nn.functional.mse_loss, progress=False,
        recipe={"steps": 20, "eval_every": 0, "epochs": 2, "lr": 0.02, "lr_schedule": "onecycle"},
        on_step=lambda loop: seen.append(loop.optimizer.param_groups[0]["lr"]))

    def cosine(start, end, fraction):
        return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2

    total, peak, last = 20, 0.3 * 20 - 1, 20 - 1
    expected = [0.02 * (cosine(1 / 25, 1.0, s / peak) if s <= peak
                        else cosine(1.0, 1 / 25e4, (s - peak) / (last - peak))) for s in range(1, total)]
    # after update s, on_step sees the lr of update s + 1
    assert len(seen) == total and seen[:-1] == pytest.approx(expected, rel=1e-9)


# -- stabilisers ------------------------------------------------------------------------------

def test_clipping_modes():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    holder = nn.ParameterList([a, b])

    def clipped(mode, ga, gb):
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        assert Stabiliser(holder, clip=mode, clip_value=1.0).before_step()
        return a.grad.tolist(), b.grad.tolist()

    assert clipped("element", [3.0, -0.5, 0.25], [0.0, -4.0]) == ([1.0, -0.5, 0.25], [0.0, -1.0])
    ga, gb = clipped("norm", [3.0, 0.0, 0.0], [0.0, 4.0])  # norm 5 -> 1 (torch: 1 / (5 + 1e-6))
    assert ga == pytest.approx([0.6, 0.0, 0.0], rel=1e-6) and gb == pytest.approx([0.0, 0.8], rel=1e-6)
    assert clipped("norm", [0.3, 0.0, 0.0], [0.0, 0.4]) == (pytest.approx([0.3, 0.0, 0.0]), pytest.approx([0.0, 0.4]))
    a.grad, b.grad = torch.tensor([float("inf"), 0.0, 0.0]), torch.tensor([0.0, 1.0])  # clamping would hide it
    stab = Stabiliser(holder, clip="element", clip_value=1.0, nan_policy="skip")
    assert not stab.before_step() and stab.nan_events == 1
    with pytest.raises(ConfigError, match="clip"):
        Stabiliser(holder, clip="value")


def test_stabiliser_skips_non_finite_gradients_in_a_users_loop():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stab = Stabiliser(model, opt, clip="norm", clip_value=1.0, nan_policy="skip")
    before = model_tensors(model)
    model(torch.full((1, 3), float("inf"))).sum().backward()
    assert not stab.before_step() and stab.nan_events == 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_weight_norm_keeps_the_function_and_max_norm_bounds_rows(tmp_path):
    torch.manual_seed(0)
    gru = LowRankGRU(3, 8, rank=2, diag=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    dense_out = gru(x)[0]
    assert weight_norm(gru) == ["weight_hh_l0.L", "weight_hh_l0.R", "weight_ih_l0"]
    assert torch.allclose(gru(x)[0], dense_out, atol=1e-6)
    names = {n for n, _ in gru.named_parameters()}
    assert "parametrizations.weight_hh_l0.parametrizations.original0.original0" in names  # L's trainable scale
    assert "parametrizations.weight_hh_l0.parametrizations.original1.original" in names  # R: direction only,
    assert not any("original1.original0" in n for n in names)  # its scale is fixed
    assert "parametrizations.weight_ih_l0.original0" in names  # the input matrix: trainable scale
    assert "parametrizations.weight_hh_l0.original2" in names  # the diagonal: not normalised
    # Blow the rows up, then the hook brings every row back to norm <= 10.
    with torch.no_grad():
        for _, owner, attr, _ in constrained_matrices(gru):
            wn = owner.parametrizations[attr]
            (wn[0].scale if wn[0].fixed else wn.original0).mul_(100.0)
    matrices = [getattr(owner, attr) for _, owner, attr, _ in constrained_matrices(gru)]
    assert all(row_norms(m).max() > 10 for m in matrices)
    max_row_norm_(gru, 10.0)
    matrices = [getattr(owner, attr) for _, owner, attr, _ in constrained_matrices(gru)]
    assert all(row_norms(m).max() <= 10 * (1 + 1e-5) for m in matrices)
    out = gru(x)[0]
    remove_weight_norm(gru)  # folds back to plain tensors: the function is unchanged, saving works
    assert torch.allclose(gru(x)[0], out, atol=1e-6)
    assert not any(isinstance(m, WeightNorm) for m in gru.modules())
    save_model(gru, tmp_path / "g.safetensors")
    loaded = load_model(torch.nn.GRU(3, 8, batch_first=True), tmp_path / "g.safetensors")
    assert torch.allclose(loaded(x)[0], out, atol=1e-6)


def test_max_norm_on_plain_factors():
    torch.manual_seed(0)
    gru = LowRankGRU(3, 8, rank=2, batch_first=True)
    with torch.no_grad():
        gru.parametrizations.weight_hh_l0.original1.mul_(1000.0)
    max_row_norm_(gru, 10.0)
    norms = row_norms(gru.parametrizations.weight_hh_l0.original1)
    assert norms.max() <= 10 * (1 + 1e-6) and norms.min() > 9.0


def test_fit_never_deletes_files_it_did_not_write(tmp_path):
    """A user folder holding a summary.json of its own is refused, untouched; an empty one is claimed."""
    from lrcompress.errors import OutputExistsError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("the user's own notes\n")
    recipe = {"steps": 2, "eval_every": 2, "lr": 1e-2}
    with pytest.raises(OutputExistsError, match="did not create it"):
        fit(TinyNet(dropout=0.0), addition_loader(16, 0), nn.functional.mse_loss, recipe=recipe, run_dir=mine,
            progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["summary.json"]
    assert (mine / "summary.json").read_text() == "the user's own notes\n"
    fresh = tmp_path / "fresh"
    fit(TinyNet(dropout=0.0), addition_loader(16, 0), nn.functional.mse_loss, recipe=recipe, run_dir=fresh,
        progress=False)
    assert (fresh / ".lrcompress-run").is_file() and (fresh / "last.safetensors").is_file()
    assert not [p.name for p in fresh.iterdir() if p.name.endswith(".lrc-tmp")]
