"""``lrcompress.train.fit`` on Hugging Face-style input: dict batches (``model(**batch)``), models
that return their loss, and a user ``scheduler=``; each checked against a hand-written loop."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.train import evaluate, fit

STEPS = 6


class Output(OrderedDict):
    """Stands in for ``transformers.ModelOutput``: a mapping whose entries are also attributes."""

    __getattr__ = OrderedDict.get


class HFStyleGRU(nn.Module):
    """``forward(inputs, labels=None)`` returning logits and, given labels, the loss, as HF models do."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(5, 16, batch_first=True)
        self.classifier = nn.Linear(16, 3)

    def forward(self, inputs, labels=None):
        logits = self.classifier(self.rnn(inputs)[0][:, -1])
        out = Output(logits=logits)
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"inputs": torch.randn(4, 6, 5, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def compressed_model():
    torch.manual_seed(0)
    model = HFStyleGRU()
    lrc.compress(model, rank=4, diag=True)
    return model


RECIPE = {"steps": STEPS, "clip": "none", "eval_every": 0}


def hand_loop(model, data, optimizer, scheduler, loss=lambda m, b: m(**b).loss):
    done = 0
    while done < STEPS:
        for batch in data:
            loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            if done == STEPS:
                break


def sgd_and_steps(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def assert_same_parameters(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_dict_batches_model_loss_and_scheduler_equal_a_hand_loop():
    data = batches(4, seed=1)
    model = compressed_model()
    mine = copy.deepcopy(model)
    opt, sched = sgd_and_steps(model)
    result = fit(model, data, recipe=RECIPE, optimizer=opt, scheduler=sched, progress=False)  # no loss_fn
    assert result.steps == STEPS
    opt2, sched2 = sgd_and_steps(mine)
    hand_loop(mine, data, opt2, sched2)
    assert_same_parameters(model, mine)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (STEPS // 2))  # stepped per update
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), compressed_model().parameters()))


def test_dict_batches_with_a_loss_fn():
    data = [{"inputs": b["inputs"], "labels": b["labels"]} for b in batches(3, seed=2)]

    def loss_fn(output, y):
        return nn.functional.cross_entropy(output.logits, y) * 2.0  # not the model's own loss

    class NoLabels(nn.Module):  # the model sees labels= too: it ignores them
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs, labels=None):
            return self.inner(inputs)

    model = compressed_model()
    mine = copy.deepcopy(model)
    opt, sched = sgd_and_steps(model)
    fit(NoLabels(model), data, loss_fn, recipe=RECIPE, optimizer=opt, scheduler=sched, progress=False)
    opt2, sched2 = sgd_and_steps(mine)
    hand_loop(mine, data, opt2, sched2, loss=lambda m, b: loss_fn(m(b["inputs"]), b["labels"]))
    assert_same_parameters(model, mine)


def test_reduce_on_plateau_steps_with_the_validation_metric():
    data, val = batches(4, seed=3), batches(2, seed=4)
    model = compressed_model()
    mine = copy.deepcopy(model)

    def setup(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)

    opt, sched = setup(model)
    result = fit(model, data, recipe={**RECIPE, "eval_every": 2}, val_loader=val, optimizer=opt, scheduler=sched,
                 progress=False, restore_best=False)
    opt2, sched2 = setup(mine)
    losses = []
    for step in range(1, STEPS + 1):
        mine(**data[(step - 1) % len(data)]).loss.backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
        if step % 2 == 0:
            with torch.no_grad():  # mean over examples, as evaluate computes it
                mine.eval()
                total = sum(float(mine(**b).loss) * len(b["labels"]) for b in val)
                mine.train()
            losses.append(total / sum(len(b["labels"]) for b in val))
            sched2.step(losses[-1])
    assert_same_parameters(model, mine)
    assert [r["val"]["loss"] for r in result.history] == pytest.approx(losses, abs=1e-6)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_evaluate_dict_batches_with_the_model_loss():
    model, val = compressed_model(), batches(3, seed=5)
    got = evaluate(model, val)
    with torch.no_grad():
        want = sum(float(model(**b).loss) * 4 for b in val) / 12
    assert got["loss"] == pytest.approx(want, abs=1e-6)


def test_no_loss_anywhere_is_one_config_error():
    data = [{"inputs": b["inputs"]} for b in batches(2, seed=6)]  # no labels: the model returns no loss
    with pytest.raises(lrc.ConfigError, match="loss_fn .*'loss' entry.*got a Output"):
        fit(compressed_model(), data, recipe=RECIPE, progress=False)


def test_scheduler_and_recipe_schedule_conflict():
    model = compressed_model()
    opt, sched = sgd_and_steps(model)
    with pytest.raises(lrc.ConfigError, match="not both"):
        fit(model, batches(2, seed=7), recipe={**RECIPE, "lr_schedule": "onecycle"}, optimizer=opt, scheduler=sched)


def test_a_scheduler_of_another_optimizer_is_refused():
    # without optimizer=, fit builds its own: a scheduler on some other optimiser would step nothing
    model = compressed_model()
    _, sched = sgd_and_steps(copy.deepcopy(model))
    with pytest.raises(lrc.ConfigError, match="scheduler belongs to another optimizer: pass that optimizer"):
        fit(model, batches(2, seed=7), recipe={"steps": 3}, scheduler=sched, progress=False)
    opt, _ = sgd_and_steps(model)
    with pytest.raises(lrc.ConfigError, match="scheduler belongs to another optimizer"):
        fit(model, batches(2, seed=7), recipe={"steps": 3}, optimizer=opt, scheduler=sched, progress=False)


@pytest.mark.parametrize("own", [False, True], ids=["user-plateau", "recipe-plateau"])
def test_evaluation_lr_is_the_next_updates_lr(own, capsys):
    """docs/training.md: the lr recorded at an evaluation is the one the next update uses, and the
    line announcing a lowered rate names the same value."""
    data, val = batches(2, seed=3), batches(1, seed=4)
    model = compressed_model()
    seen = []  # the lr each update ran with
    recipe = {"steps": 8, "clip": "none", "eval_every": 2, "optimizer": "adam", "lr": 0.1}
    kwargs = {}
    if own:  # patience 1: every evaluation without strict improvement halves the rate
        recipe.update(lr_schedule="plateau", plateau_patience=1, plateau_factor=0.5)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kwargs = {"optimizer": opt, "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=0.5, patience=0)}  # the validation loss rises here: lowered often
    result = fit(model, data, recipe=recipe, val_loader=val, progress=None, restore_best=False,
                 on_step=lambda loop: seen.append(loop.optimizer.param_groups[0]["lr"]), **kwargs)
    out = capsys.readouterr().out
    records = result.history
    for r in records[:-1]:  # on_step runs after update `step`: seen[step] is update step+1's lr
        assert r["lr"] == seen[r["step"]], r
    lowered = [line for line in out.splitlines() if "lowered" in line or "now " in line]
    assert lowered, out
    for line in lowered:
        step = int(line.split()[1].rstrip(":"))
        new = float(line.rsplit(" ", 1)[1])
        record = next(r for r in records if r["step"] == step)
        assert record["lr"] == pytest.approx(new, rel=1e-2)
        eval_line = next(x for x in out.splitlines() if x.startswith(f"step {step},"))
        assert eval_line.endswith(f"lr {new:.3g}")
