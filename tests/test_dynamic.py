"""Dynamic evaluation (Krause et al. 2018): the model passed in never changes, zero steps equal
static evaluation exactly, static evaluation is the LM cross-entropy, the update rules are the
documented ones in the documented order, adaptation helps on repetitive text, and the
``lrcompress evaluate`` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcompress.errors import ConfigError
from lrcompress.nn import LowRankGRU
from lrcompress.train import evaluate
from lrcompress.train.dynamic import (DynamicUpdate, as_sequences, dynamic_evaluate, first_predictions,
                                      gradient_statistics, static_evaluate, stream_batches)
from lrcompress.train.models import SequenceModel
from lrcompress.train.tasks import build_task
from conftest import train_char_lm

pytestmark = pytest.mark.usefixtures("one_thread")

V = 8  # vocabulary of the synthetic streams


def lm(kind: str = "gru", hidden: int = 16, dtype=torch.float32, **kwargs) -> SequenceModel:
    """A one-hot character LM as the recipes build it: ``nn.GRU``/``nn.LSTM`` or a low-rank GRU."""
    rnn = {"gru": lambda: nn.GRU(V, hidden, batch_first=True),
           "lstm": lambda: nn.LSTM(V, hidden, batch_first=True),
           "lowrank": lambda: LowRankGRU(V, hidden, rank=3, diag=True, batch_first=True)}[kind]()
    return SequenceModel(rnn, V, "sequence", vocab_size=V, **kwargs).to(dtype)


def stream(n: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_bit_equal(before: dict, model: nn.Module) -> None:
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), name


def statistics(model: nn.Module) -> dict:
    return gradient_statistics(model, stream_batches(stream(400, seed=9), 10, streams=4))


# -- the model passed in ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gru", "lstm", "lowrank"])
@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_the_given_model_is_never_changed(kind, method):
    model = lm(kind, input_dropout=0.1)
    model.train()  # its mode, too, stays as the caller left it
    grads = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    before = state_of(model)
    stats = statistics(model) if method == "rms" else None
    result = dynamic_evaluate(model, stream(), lr=0.5, decay=0.1, segment=7, method=method, grad_stats=stats)
    assert result["dynamic"]["ce"] != result["static"]["ce"]  # the copy did adapt
    assert_bit_equal(before, model)
    assert model.training and model.rnn.training
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gru", "lstm", "lowrank"])
@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_zero_lr_and_decay_give_the_static_figures_exactly(kind, method):
    model = lm(kind)
    stats = statistics(model) if method == "rms" else None
    result = dynamic_evaluate(model, stream(), lr=0.0, decay=0.0, segment=9, method=method, grad_stats=stats)
    static, dyn = result["static"], result["dynamic"]
    assert dyn["skipped"] == 0
    for key in ("ce", "bpc", "ppl", "count"):
        assert dyn[key] == static[key], key
    assert static == static_evaluate(model, stream(), segment=9)


def reference_nll(model: SequenceModel, ids: torch.Tensor) -> float:
    """Summed -log p(next symbol) in float64: one pass of the recurrent layer over the whole
    stream, log-softmax written out, no segments."""
    m = SequenceModel(nn.GRU(V, model.rnn.hidden_size, batch_first=True), V, "sequence", vocab_size=V).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x = F.one_hot(ids[:-1], V).double().unsqueeze(0)
    out, _ = m.rnn(x)
    logits = m.head(out)[0]
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()
    return float(-log_p[torch.arange(len(ids) - 1), ids[1:]].sum().detach())


@pytest.mark.parametrize("segment", [1, 7, 500])
def test_static_equals_an_independent_cross_entropy(segment):
    model, ids = lm("gru"), stream(150, seed=3)
    got = static_evaluate(model, ids, segment=segment)
    nll = reference_nll(model, ids)
    assert got["count"] == 149
    assert got["ce"] == pytest.approx(nll / 149, rel=1e-6)
    assert got["bpc"] == pytest.approx(nll / 149 / math.log(2), rel=1e-6)
    assert got["ppl"] == pytest.approx(2 ** got["bpc"], rel=1e-12)
    assert static_evaluate(model.double(), ids, segment=segment)["ce"] == pytest.approx(nll / 149, rel=1e-12)


def test_a_list_of_sequences_starts_each_from_a_zero_state():
    model, a, b = lm("gru", dtype=torch.float64), stream(40, seed=1), stream(30, seed=2)
    got = static_evaluate(model, [a, b], segment=6)
    assert got["count"] == 39 + 29
    assert got["ce"] == pytest.approx((reference_nll(model, a) + reference_nll(model, b)) / 68, rel=1e-12)
    assert first_predictions([a, b], 50)[1].tolist() == b[:12].tolist()  # 39 + 11 predictions


# -- the update rules ---------------------------------------------------------------------------

def test_sgd_rule_is_the_documented_one():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    theta0 = p.detach().clone()
    update = DynamicUpdate({"w": p}, lr=0.3, decay=0.2)
    g1, g2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    p.grad = g1.clone()
    update.step()
    theta1 = theta0 - 0.3 * g1  # the decay term is 0 on the first step: theta == theta_0
    assert torch.allclose(p.detach(), theta1, rtol=0, atol=1e-15) and p.grad is None
    p.grad = g2.clone()
    update.step()
    assert torch.allclose(p.detach(), theta1 - 0.3 * g2 + 0.2 * (theta0 - theta1), rtol=0, atol=1e-15)


def test_rms_rule_is_the_documented_one_with_its_clipped_decay():
    torch.manual_seed(2)
    params = {"a": nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
              "b": nn.Parameter(torch.randn(6, dtype=torch.float64))}
    stats = {"a": torch.rand(4, 3, dtype=torch.float64) * 1e-2, "b": torch.rand(6, dtype=torch.float64) * 4.0}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    lr, decay, eps = 0.05, 0.4, 1e-5
    update = DynamicUpdate(params, lr=lr, decay=decay, method="rms", grad_stats=stats, eps=eps)
    rms = {n: s.sqrt() for n, s in stats.items()}
    mean = torch.cat([r.reshape(-1) for r in rms.values()]).mean()
    rate = {n: torch.clamp(decay * r / mean, max=1.0) for n, r in rms.items()}
    assert (rate["b"] == 1.0).any() and (rate["a"] < 1.0).all()  # the clip is exercised
    # a first step moves theta off theta_0, a second shows the decay
    thetas = {n: t.clone() for n, t in theta0.items()}
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        update.step()
        for n in params:
            thetas[n] = thetas[n] - lr * grads[n] / (rms[n] + eps) + rate[n] * (theta0[n] - thetas[n])
            assert torch.allclose(params[n].detach(), thetas[n], rtol=0, atol=1e-13), n


def test_a_segment_is_scored_before_its_step():
    """Two segments, by hand in float64: segment 1 with theta_0, a step on its mean loss, then
    segment 2 with theta_1 from the state segment 1 left."""
    model, ids, lr = lm("gru", dtype=torch.float64), stream(21, seed=4), 0.7
    got = dynamic_evaluate(model, ids, lr=lr, decay=0.5, segment=10)["dynamic"]
    work = lm("gru", dtype=torch.float64)
    work.load_state_dict(model.state_dict())
    logits, state = work.forward_stateful(ids[:10].unsqueeze(0))
    first = F.cross_entropy(logits[0], ids[1:11], reduction="sum")
    grads = torch.autograd.grad(first / 10, list(work.parameters()))
    with torch.no_grad():
        for p, g in zip(work.parameters(), grads):
            p -= lr * g  # + 0.5 (theta_0 - theta_0) = 0
        logits, _ = work.forward_stateful(ids[10:20].unsqueeze(0), state.detach())
        second = F.cross_entropy(logits[0], ids[11:21], reduction="sum")
    assert got["count"] == 20
    assert got["ce"] == pytest.approx(float((first + second).detach()) / 20, rel=1e-12)


def test_non_finite_gradients_skip_the_step():
    p = nn.Parameter(torch.ones(3))
    update = DynamicUpdate({"w": p}, lr=1.0, decay=0.0)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    update.step()
    assert update.skipped == 1 and torch.equal(p.detach(), torch.ones(3)) and p.grad is None


# -- gradient statistics --------------------------------------------------------------------------

def test_gradient_statistics_are_mean_squared_batch_gradients_and_reach_every_factor():
    model = lm("lowrank")
    before = state_of(model)
    batches = stream_batches(stream(200, seed=5), 12, streams=3)
    stats = gradient_statistics(model, batches, max_batches=4)
    assert_bit_equal(before, model)
    names = {n for n, _ in model.named_parameters()}
    assert set(stats) == names and any("original" in n for n in names)  # the factors L, R, D
    assert all(bool((s > 0).any()) for s in stats.values())
    # by hand, state carried from batch to batch
    work = lm("lowrank")
    work.load_state_dict(model.state_dict())
    work.eval()
    sums, state = {n: torch.zeros_like(p) for n, p in work.named_parameters()}, None
    for batch in batches[:4]:
        logits, state = work.forward_stateful(batch.x, state)
        loss = F.cross_entropy(logits.reshape(-1, V), batch.y.reshape(-1))
        for (n, _), g in zip(work.named_parameters(), torch.autograd.grad(loss, list(work.parameters()))):
            sums[n] += g ** 2
        state = state.detach()
    for n, s in stats.items():
        assert torch.allclose(s, sums[n] / 4, rtol=1e-5, atol=1e-12), n
    fresh = gradient_statistics(model, batches, carry=False, max_batches=4)
    assert not torch.equal(fresh["head.weight"], stats["head.weight"])  # batch 2 on starts from zeros


def test_stream_batches_cover_the_stream_in_order():
    ids = torch.arange(23) % V
    batches = stream_batches(ids, 4, streams=2)  # 2 streams of 11 symbols, 10 predictions each
    x = torch.cat([b.x for b in batches], dim=1)
    y = torch.cat([b.y for b in batches], dim=1)
    assert x.tolist() == [ids[:10].tolist(), ids[11:21].tolist()]
    assert y.tolist() == [ids[1:11].tolist(), ids[12:22].tolist()]


# -- adaptation helps ---------------------------------------------------------------------------------

def test_dynamic_evaluation_beats_static_on_repetitive_text():
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, V, (24,), generator=g).repeat(40)
    model = lm("gru", hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):  # a few steps: the phrase is far from learnt
        starts = torch.randint(0, len(text) - 33, (8,), generator=g)
        x = torch.stack([text[s:s + 32] for s in starts])
        y = torch.stack([text[s + 1:s + 33] for s in starts])
        loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = text[:480]
    sgd = dynamic_evaluate(model, test, lr=1.0, decay=0.0, segment=12)
    assert sgd["static"]["bpc"] > 2.3
    assert sgd["dynamic"]["bpc"] < sgd["static"]["bpc"] - 0.5  # measured: 2.64 -> 1.88 bits
    stats = gradient_statistics(model, stream_batches(text, 12, streams=4))
    rms = dynamic_evaluate(model, test, lr=3e-3, decay=0.0, segment=12, method="rms", grad_stats=stats)
    assert rms["dynamic"]["bpc"] < rms["static"]["bpc"] - 0.3  # measured: 2.64 -> 2.16 bits
    # the decay pulls towards the trained weights: on a text that keeps repeating, the gain
    # shrinks as the decay grows (measured: 1.97, 2.12, 2.47 bits)
    held = [dynamic_evaluate(model, test, lr=1.0, decay=d, segment=12)["dynamic"]["bpc"] for d in (0.01, 0.03, 0.1)]
    assert sgd["dynamic"]["bpc"] < held[0] < held[1] < held[2] < sgd["static"]["bpc"]


# -- tasks ---------------------------------------------------------------------------------------------

def write_ptb(folder, lines: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (folder / f"ptb.char.{split}.txt").write_text("\n".join(" ".join(r) for r in rows) + "\n")


def test_task_streams_match_the_tasks_own_evaluation(tmp_path):
    """Static figures equal the engine's evaluation of the same split: the text task as one
    stream (batch 1, windows = segments), PTB sentence mode line by line from the EOL symbol."""
    text = tmp_path / "t.txt"
    text.write_text("abcd efg hij abcd " * 30)
    task = build_task({"name": "text", "text_file": str(text), "seq_len": 9, "valid_fraction": 0.2,
                       "test_fraction": 0.2})
    model = SequenceModel(nn.GRU(task.input_size, 12, batch_first=True), task.output_size, "sequence",
                          vocab_size=task.input_size)
    ours = static_evaluate(model, task, split="valid", segment=9)
    theirs = evaluate(model, lambda: task.batches("valid", 1, seed=0, shuffle=False), task=task)
    assert ours["count"] == task.num_examples("valid") - 1
    assert ours["bpc"] == pytest.approx(theirs["bpc"], rel=1e-6)

    rng = torch.Generator().manual_seed(0)
    words = ["a_b", "cd", "e_f_g", "hh"]
    lines = {s: [" ".join(words[int(i)] for i in torch.randint(0, 4, (5,), generator=rng)) for _ in range(n)]
             for s, n in (("train", 20), ("valid", 6), ("test", 6))}
    write_ptb(tmp_path / "ptb", lines)
    ptb = build_task({"name": "ptb_char", "data_dir": str(tmp_path), "mode": "sentences"})
    sequences = as_sequences(ptb, "test")
    assert len(sequences) == 6 and all(int(s[0]) == ptb.vocab.ids["\n"] for s in sequences)
    model = SequenceModel(nn.GRU(ptb.input_size, 12, batch_first=True), ptb.output_size, "sequence",
                          vocab_size=ptb.input_size)
    ours = static_evaluate(model, ptb, split="test", segment=4)
    theirs = evaluate(model, lambda: ptb.batches("test", 3, seed=0, shuffle=False), task=ptb)
    assert ours["count"] == ptb.num_examples("test")
    assert ours["bpc"] == pytest.approx(theirs["bpc"], rel=1e-6)


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -0.1}, "lr must be a finite number >= 0, got -0.1"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0, got inf"),
    ({"decay": 1.5}, "decay must be in [0, 1], got 1.5"),
    ({"segment": 0}, "segment must be a positive int (symbols per step), got 0"),
    ({"segment": 2.5}, "got 2.5"),
    ({"method": "adam"}, "method must be one of 'sgd', 'rms', got 'adam'"),
    ({"method": "rms"}, "method 'rms' needs grad_stats"),
    ({"method": "rms", "grad_stats": {}}, "grad_stats has no entry for parameter 'rnn.weight_ih_l0'"),
    ({"method": "rms", "eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
])
def test_bad_settings_are_one_config_error(kwargs, message):
    settings = {"lr": 0.1, "decay": 0.0, **kwargs}
    with pytest.raises(ConfigError) as info:
        dynamic_evaluate(lm(), stream(), **settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_grad_stats_and_streams_and_models_are_named():
    model = lm()
    stats = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="zero for every parameter"):
        dynamic_evaluate(model, stream(), lr=0.1, decay=0.0, method="rms", grad_stats=stats)
    stats["head.bias"] = torch.zeros(3)
    with pytest.raises(ConfigError, match=r"grad_stats\['head.bias'\] is \(3,\), the parameter \(8,\)"):
        dynamic_evaluate(model, stream(), lr=0.1, decay=0.0, method="rms", grad_stats=stats)
    for bad, message in ((stream().reshape(2, -1), "1-D tensor of integer symbol ids, got torch.int64 of shape"),
                         (stream().float(), "got torch.float32"), (torch.tensor([3]), "holds 1 symbol"),
                         (torch.tensor([1, 2, V]), f"symbol id {V} is outside the model's vocabulary of {V}"),
                         ("abc", "got str"), ([], "empty list")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
            dynamic_evaluate(model, bad, lr=0.1, decay=0.0)
    with pytest.raises(ConfigError, match="needs a language model .* not GRU"):
        static_evaluate(nn.GRU(V, 4, batch_first=True), stream())
    with pytest.raises(ConfigError, match="language-model tasks .* not task 'addition'"):
        static_evaluate(model, build_task({"name": "addition", "length": 5}))


# -- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny character LM trained through ``lrcompress train``."""
    run_dir = train_char_lm(tmp_path_factory.mktemp("lm"), steps=6)
    return run_dir


def test_evaluate_prints_static_and_dynamic_side_by_side(run, lm_run):
    from cli_runner import snapshot

    before = snapshot(lm_run)
    plain = run("evaluate", lm_run)
    assert plain.code == 0, plain.err
    assert "static bpc" in plain.out and "dynamic" not in plain.out
    both = run("evaluate", lm_run, "--dynamic", "--lr", "0.5", "--segment", "10")
    assert both.code == 0, both.err
    lines = both.out.splitlines()
    assert any(line.startswith("static ") for line in lines) and any(line.startswith("dynamic ") for line in lines)
    assert "dynamic - static" in both.out
    as_json = run("evaluate", lm_run, "--dynamic", "--lr", "0.5", "--segment", "10", "--json")
    assert as_json.code == 0, as_json.err
    doc = json.loads(as_json.out)
    assert doc["task"] == "text" and doc["split"] == "test" and doc["settings"]["lr"] == 0.5
    assert doc["static"]["count"] == doc["dynamic"]["count"] == 143  # the test tenth of 1,440 characters, less one
    assert doc["dynamic"]["bpc"] < doc["static"]["bpc"]
    assert f"{doc['static']['bpc']:.4f}" in both.out and f"{doc['dynamic']['bpc']:.4f}" in both.out
    rms = json.loads(run("evaluate", lm_run, "--dynamic", "--method", "rms", "--grad-batches", "3", "--split",
                         "valid", "--symbols", "50", "--json").out)
    assert rms["settings"]["method"] == "rms" and rms["static"]["count"] == 50 and rms["split"] == "valid"
    assert snapshot(lm_run) == before  # evaluation writes nothing


@pytest.mark.parametrize("args, message", [
    (["--dynamic", "--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
    (["--dynamic", "--segment", "0"], "segment must be a positive int (symbols per step), got 0"),
    (["--decay", "2"], "decay must be in [0, 1], got 2.0"),
    (["--split", "dev"], "split must be one of train, valid, test, got 'dev'"),
    (["--method", "adam"], "method must be one of 'sgd', 'rms', got 'adam'"),
])
def test_evaluate_bad_values_exit_2_with_one_line(run, lm_run, args, message):
    result = run("evaluate", lm_run, *args)
    assert result.code == 2 and result.out == ""
    assert result.err.strip() == f"error: {message}"


def test_evaluate_refuses_runs_that_are_not_language_models(run, tmp_path):
    from typer.testing import CliRunner

    from lrcompress.cli import app

    (tmp_path / "add.toml").write_text('[task]\nname = "addition"\nlength = 5\ntrain_size = 32\nvalid_size = 16\n'
                                       'test_size = 16\n[model]\nhidden_size = 4\n[train]\nbatch_size = 16\n'
                                       'steps = 2\neval_every = 2\ndevice = "cpu"\n')
    assert CliRunner().invoke(app, ["train", str(tmp_path / "add.toml"), "--out", str(tmp_path / "add"),
                                    "--no-progress"]).exit_code == 0
    result = run("evaluate", tmp_path / "add", "--dynamic")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "'addition'" in result.err and "language-model" in result.err
    missing = run("evaluate", tmp_path / "nowhere")
    assert missing.code == 2 and "no such run directory" in missing.err


def test_a_caller_under_no_grad_still_adapts():
    model, ids = lm("lstm"), stream()
    with torch.no_grad():
        result = dynamic_evaluate(model, ids, lr=0.5, decay=0.0, segment=7)
    assert result["dynamic"]["ce"] != result["static"]["ce"]
    assert result["static"] == static_evaluate(model, ids, segment=7)


def test_evaluate_a_fine_tuned_low_rank_run(run, lm_run, tmp_path):
    """A converted run's model loads factored; its factors adapt (dynamic differs from static)."""
    from typer.testing import CliRunner

    from lrcompress.cli import app

    out = tmp_path / "r2"
    done = CliRunner().invoke(app, ["finetune", str(lm_run), "--rank", "2", "--diag", "--out", str(out), "--steps",
                                    "2", "--no-progress"])
    assert done.exit_code == 0, done.output
    doc = json.loads(run("evaluate", out, "--dynamic", "--lr", "0.5", "--segment", "10", "--json").out)
    summary = json.loads((out / "summary.json").read_text())
    assert doc["static"]["bpc"] == pytest.approx(summary["test"]["bpc"], rel=0.05)  # one stream vs 4: close
    assert doc["dynamic"]["bpc"] != doc["static"]["bpc"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_evaluate_on_a_missing_device_is_one_line(run, lm_run):
    result = run("evaluate", lm_run, "--device", "cuda")
    assert result.code == 2 and result.err.strip() == "error: device 'cuda' was asked for but this machine has no CUDA"
