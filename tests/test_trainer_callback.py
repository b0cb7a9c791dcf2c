"""``StabiliserCallback`` and ``paper_optimizer`` in a real ``transformers.Trainer`` run (CPU, a
few steps): a NaN gradient is skipped, row norms stay bounded, compression figures are logged."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.train.stabilisers import constrained_matrices, has_weight_norm, row_norms

transformers = pytest.importorskip("transformers")
from lrcompress.integrations import StabiliserCallback, compression_figures, paper_optimizer  # noqa: E402

STEPS, NAN_STEP, BATCH = 4, 2, 4


class GRUConfig(transformers.PretrainedConfig):
    model_type = "lrc-test-gru"

    def __init__(self, input_size=5, hidden_size=16, num_labels=3, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.input_size, self.hidden_size = input_size, hidden_size


class GRUClassifier(transformers.PreTrainedModel):
    """A custom PreTrainedModel holding an nn.GRU; returns a dict with the loss, as HF models do."""

    config_class = GRUConfig

    def __init__(self, config):
        super().__init__(config)
        self.rnn = nn.GRU(config.input_size, config.hidden_size, batch_first=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, inputs, labels=None):
        logits = self.classifier(self.rnn(inputs)[0][:, -1])
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def gru_model():
    torch.manual_seed(0)
    model = GRUClassifier(GRUConfig())
    data = [{"inputs": torch.randn(6, 5), "labels": torch.tensor(i % 3)} for i in range(BATCH * STEPS)]
    return model, data


def bert_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=99, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    data = [{"input_ids": torch.randint(0, 99, (7,)), "labels": torch.tensor(i % 2)} for i in range(BATCH * STEPS)]
    return model, data


def args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                  report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                  learning_rate=1e-2, dataloader_num_workers=0, seed=0)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


class Recorder(transformers.TrainerCallback):
    """Parameters before and after every update; poisons one gradient with NaN at ``NAN_STEP``."""

    def __init__(self, model):
        self.victim = next(p for p in model.parameters() if p.requires_grad)
        self.victim.register_hook(self._poison)
        self.calls = 0
        self.changed: list[bool] = []
        self._before = None

    def _poison(self, grad):
        self.calls += 1
        return grad * float("nan") if self.calls == NAN_STEP + 1 else grad

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self._before, model.parameters())))


@pytest.mark.parametrize("build, options", [
    (gru_model, dict(rank=4, diag=True)),
    (bert_model, dict(rank=4, targets="all-linear")),
])
def test_nan_gradient_is_skipped_row_norms_bounded_figures_logged(tmp_path, build, options):
    model, data = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lrc.compress(model, **options)
    max_norm = 0.2
    assert max(float(row_norms(getattr(o, a).detach()).max()) for _, o, a, _ in constrained_matrices(model)) > max_norm
    optimizer, scheduler = paper_optimizer(model, lr=1e-2)
    callback = StabiliserCallback(nan_policy="skip", max_norm=max_norm)
    recorder = Recorder(model)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=data,
                                   optimizers=(optimizer, scheduler), callbacks=[callback, recorder])
    trainer.train()
    # the poisoned update changed nothing; every other one did
    assert recorder.changed == [True] * NAN_STEP + [False] + [True] * (STEPS - NAN_STEP - 1)
    assert callback.nan_events == 1
    # the optimiser's state skipped it too: three RMSProp steps, not four
    assert {int(s["step"]) for s in optimizer.state.values()} == {STEPS - 1}
    # row max-norm after every update
    assert max(float(row_norms(getattr(o, a).detach()).max()) for _, o, a, _ in constrained_matrices(model)) <= max_norm + 1e-6
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == STEPS
    assert [r["lrcompress/nan_events"] for r in logs] == [0] * NAN_STEP + [1] * (STEPS - NAN_STEP)
    last = logs[-1]
    assert last["lrcompress/params"] == report.params_after
    assert last["lrcompress/dense_params"] == report.params_before
    assert last["lrcompress/ratio"] == pytest.approx(report.params_before / report.params_after, rel=1e-4)
    roles = {}
    for t in report.targets:
        roles[t.role] = roles.get(t.role, 0) + 1
    assert {k.removeprefix("lrcompress/factored_"): v for k, v in last.items() if "factored_" in k} == roles


def test_decay_policy_steps_towards_zero(tmp_path):
    model, data = gru_model()
    lrc.compress(model, rank=4)
    callback = StabiliserCallback(nan_policy="decay")
    recorder = Recorder(model)
    transformers.Trainer(model=model, args=args(tmp_path, max_grad_norm=0.0, max_steps=NAN_STEP + 1),
                         train_dataset=data, optimizers=paper_optimizer(model, lr=1e-2, optimizer="adam"),
                         callbacks=[callback, recorder]).train()
    assert callback.nan_events == 1 and recorder.changed[-1]  # the decay step is taken
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weight_norm_with_a_ready_optimizer(tmp_path):
    """Weight norm installed at train begin joins an optimiser built before; folded at the end."""
    model, data = gru_model()
    lrc.compress(model, rank=4, diag=True)
    x = torch.stack([d["inputs"] for d in data[:4]])
    optimizer, scheduler = paper_optimizer(model, lr=1e-2)
    callback = StabiliserCallback(weight_norm=True, max_norm=10)
    seen = {}

    class Check(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            seen["all_held"] = all(id(p) in held for p in model.parameters())
            seen["normed"] = has_weight_norm(model)

    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=data,
                                   optimizers=(optimizer, scheduler), callbacks=[callback, Check()])
    trainer.train()
    assert seen == {"all_held": True, "normed": True}
    assert not has_weight_norm(model)  # folded back: saves as a plain compressed model
    path = tmp_path / "m.safetensors"
    lrc.save_model(model, path)
    again = lrc.load_model(GRUClassifier(GRUConfig()), path)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["logits"], model(x)["logits"])


def test_figures_of_a_dense_model():
    figures = compression_figures(nn.GRU(4, 8))
    assert figures["lrcompress/ratio"] == 1.0 and figures["lrcompress/params"] == figures["lrcompress/dense_params"]


@pytest.mark.parametrize("options, message", [
    (dict(nan_policy="restore"), "use lrcompress.train.fit"), (dict(nan_policy="maybe"), "nan_policy"),
    (dict(max_norm=-1), "max_row_norm"), (dict(clip="norm"), "max_grad_norm"),
])
def test_bad_options(options, message):
    with pytest.raises(lrc.ConfigError, match=message):
        StabiliserCallback(**options)


@pytest.mark.parametrize("options, kind", [
    (dict(), "ConstantLR"), (dict(schedule="plateau"), "ReduceLROnPlateau"),
    (dict(schedule="onecycle", total_steps=10), "OneCycleLR"),
])
def test_paper_optimizer_schedules(options, kind):
    opt, sched = paper_optimizer(nn.Linear(3, 3), lr=0.1, **options)
    assert type(opt).__name__ == "RMSprop" and type(sched).__name__ == kind
    with pytest.raises(lrc.ConfigError, match="total_steps"):
        paper_optimizer(nn.Linear(3, 3), schedule="onecycle")


def test_integrations_is_lazy_and_names_the_extra():
    code = ("import sys, lrcompress as lrc; lrc.integrations; assert 'transformers' not in sys.modules; "
            "sys.modules['transformers'] = None\n"
            "try:\n from lrcompress.integrations import StabiliserCallback\n"
            "except ImportError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install lrcompress[hf]" in out.stdout
