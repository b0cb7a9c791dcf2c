"""Fidelity of the character-level PTB and highway recipes to the paper's code (issue 12).

- Per-sequence dropout masks (``lrcompress.nn.variational``, ``model.dropout_masks``): the step
  loop without masks equals the layers themselves; with masks it equals, sequence by sequence,
  PyTorch's own kernel run on weights whose columns carry that sequence's masks (an
  independent reference); masks are held over time, differ across sequences and gates, keep
  the right fraction, and evaluation drops nothing.
- ``ppl_paper`` (dl4mt-lm's average) against a hand-computed example.
- The stream mode separates joined sentences by the end-of-line symbol, as Zaremba's
  ``data.lua`` (the loader of Gal's LSTM code) does.
- The highway bottleneck dropout: one (B, d) mask shared by both matrices, between R and L.
- The recipes: the authors' settings, and the paper's parameter convention computed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lrcompress.errors import ConfigError
from lrcompress.nn import Highway, LowRankGRU, LowRankLSTM
from lrcompress.nn.variational import FALLBACK_NOTE, MASKED_NOTE, LayerMasks, VariationalMasks, draw_masks, run_variational
from lrcompress.train.models import PaperGRU, SequenceModel, build_model, check_model
from lrcompress.train.recipe import load_recipe
from lrcompress.train.tasks import build_task
from lrcompress.train.tasks_base import IGNORE, Batch
from lrcompress.train.tasks_data import EOL, PtbCharTask

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GRU_ROWS = sorted(p.stem for p in RECIPES.glob("ptb-*gru-*.toml") if not p.stem.endswith("-cpu"))
LSTM_ROWS = sorted(p.stem for p in RECIPES.glob("ptb-*lstm-*.toml"))
B, T, IN, N = 5, 6, 4, 7


def layers(dtype=torch.float64):
    """Small batch-first layers of every kind the step loop supports."""
    torch.manual_seed(1)
    return {"gru": nn.GRU(IN, N, batch_first=True, dtype=dtype),
            "gru-2-layers": nn.GRU(IN, N, num_layers=2, batch_first=True, dtype=dtype),
            "paper-gru": PaperGRU(IN, N, batch_first=True, dtype=dtype),
            "lstm": nn.LSTM(IN, N, batch_first=True, dtype=dtype),
            "rnn-relu": nn.RNN(IN, N, nonlinearity="relu", batch_first=True, dtype=dtype),
            "lrd-gru": LowRankGRU(IN, N, rank=2, diag=True, batch_first=True).to(dtype),
            "lrd-gru-tied": LowRankGRU(IN, N, rank=2, diag=True, tied=True, batch_first=True).to(dtype),
            "lr-lstm": LowRankLSTM(IN, N, rank=2, batch_first=True).to(dtype)}


@pytest.mark.parametrize("kind", list(layers()))
def test_the_step_loop_without_masks_is_the_layer(kind):
    rnn = layers()[kind]
    x = torch.randn(B, T, IN, dtype=torch.float64)
    zeros = torch.zeros(rnn.num_layers, B, N, dtype=torch.float64)
    state = (torch.randn_like(zeros), torch.randn_like(zeros)) if rnn.mode == "LSTM" else torch.randn_like(zeros)
    schemes = ("per_gate", "dl4mt") if rnn.mode == "GRU" else ("per_gate",)
    for scheme in schemes:
        out, final = run_variational(rnn, x, state, draw_masks(rnn, B, T, scheme=scheme))
        ref, ref_final = rnn(x, state)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for a, b in zip(final if isinstance(final, tuple) else (final,),
                        ref_final if isinstance(ref_final, tuple) else (ref_final,)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def dense_copy(rnn: nn.RNNBase) -> nn.RNNBase:
    """A plain nn.GRU/nn.LSTM (PaperGRU for eq. 6, on lrcompress's own loops) holding ``rnn``'s
    (rebuilt) weights."""
    cls = PaperGRU if getattr(rnn, "gru_form", "") == "paper" else (nn.GRU if rnn.mode == "GRU" else nn.LSTM)
    plain = cls(rnn.input_size, rnn.hidden_size, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for name in plain._flat_weights_names:
            getattr(plain, name).copy_(getattr(rnn, name))
    return plain


def per_sequence_reference(rnn, x, masks: LayerMasks) -> torch.Tensor:
    """Each sequence b through PyTorch's kernel, its masks moved into the weights: the columns
    of gate g's recurrent block times that gate's mask, of its input block times the input mask
    (a dl4mt "projection" mask scales an extra constant input that carries the bias)."""
    gates = {"GRU": 3, "LSTM": 4}[rnn.mode]
    n, outs = rnn.hidden_size, []
    for b in range(x.shape[0]):
        plain, xb = dense_copy(rnn), x[b:b + 1]
        with torch.no_grad():
            if masks.recurrent is not None:
                for k, group in enumerate(masks.groups):
                    for g in group:
                        plain.weight_hh_l0[g * n:(g + 1) * n] *= masks.recurrent[k][b]
            if masks.input_kind == "vector" and masks.inputs is not None:
                for g in range(gates):
                    plain.weight_ih_l0[g * n:(g + 1) * n] *= masks.inputs[g if len(masks.inputs) > 1 else 0, b, 0]
        if masks.input_kind == "projection":  # (W x + b) m_t == [W b] ([x 1] m_t)
            wide = type(plain)(rnn.input_size + 1, n, batch_first=True, dtype=torch.float64)
            with torch.no_grad():
                wide.weight_ih_l0.copy_(torch.cat([plain.weight_ih_l0, plain.bias_ih_l0[:, None]], 1))
                wide.bias_ih_l0.zero_()
                for name in ("weight_hh_l0", "bias_hh_l0"):
                    getattr(wide, name).copy_(getattr(plain, name))
            plain = wide
            xb = torch.cat([xb, torch.ones_like(xb[..., :1])], -1) * masks.inputs[b:b + 1]
        outs.append(plain(xb)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("kind,scheme", [("gru", "dl4mt"), ("gru", "per_gate"), ("paper-gru", "dl4mt"),
                                         ("lrd-gru", "dl4mt"), ("lrd-gru-tied", "dl4mt"), ("lrd-gru-tied", "per_gate"),
                                         ("lstm", "per_gate"), ("lr-lstm", "per_gate")])
def test_masked_step_loop_matches_pytorch_on_masked_weights(kind, scheme):
    rnn = layers()[kind]
    x = torch.randn(B, T, IN, dtype=torch.float64)
    masks = draw_masks(rnn, B, T, scheme=scheme, recurrent=0.5, inputs=0.4)
    out, _ = run_variational(rnn, x, None, masks)
    torch.testing.assert_close(out, per_sequence_reference(rnn, x, masks.layers[0]), rtol=0, atol=1e-12)
    assert not torch.allclose(out, rnn(x)[0])  # the masks changed something


def test_mask_groups_follow_dl4mt_lm_and_gal():
    rnns = layers()
    groups = {k: draw_masks(rnns[k], 2, 3, scheme="dl4mt", recurrent=0.5).layers[0].groups
              for k in ("gru", "lrd-gru", "lrd-gru-tied")}
    # dl4mt-lm: dense h U (r, z) and h Ux; untied U_proj_u/r/x; tied one U_proj
    assert groups == {"gru": ((0, 1), (2,)), "lrd-gru": ((0,), (1,), (2,)), "lrd-gru-tied": ((0, 1, 2),)}
    per_gate = draw_masks(rnns["lstm"], 2, 3, scheme="per_gate", recurrent=0.5, inputs=0.5).layers[0]
    assert per_gate.groups == ((0,), (1,), (2,), (3,)) and per_gate.inputs.shape == (4, 2, 1, IN)
    dl4mt = draw_masks(rnns["gru-2-layers"], 2, 3, scheme="dl4mt", recurrent=0.5, inputs=0.5)
    assert dl4mt.layers[0].input_kind == "projection" and dl4mt.layers[0].inputs.shape == (2, 3, 1)
    assert dl4mt.layers[1].inputs is None  # the stack's own between-layer rate is 0


def test_masks_keep_the_right_fraction_and_differ_across_sequences_gates_and_steps():
    rnn = nn.GRU(40, 64, batch_first=True)
    p, batch = 0.3, 2000
    masks = draw_masks(rnn, batch, 50, scheme="per_gate", recurrent=p, inputs=p)
    layer = masks.layers[0]
    for m in [*layer.recurrent, *layer.inputs]:
        assert torch.all((m == 0) | torch.isclose(m, torch.tensor(1 / (1 - p))))  # 0 or 1 / keep
        kept = float((m > 0).double().mean())
        sigma = math.sqrt(p * (1 - p) / m.numel())
        assert abs(kept - (1 - p)) < 5 * sigma  # binomial: 5 standard deviations
        assert m.shape[-2] == 1 or m.dim() == 2  # no time axis: one mask for all steps
        rows = m.reshape(batch, -1)
        assert len({tuple(r.tolist()) for r in rows[:50]}) == 50  # every sequence its own mask
    assert not torch.equal(layer.recurrent[0], layer.recurrent[1])  # gates differ
    step = draw_masks(rnn, batch, 50, scheme="dl4mt", inputs=p).layers[0].inputs  # (B, T, 1): per step
    assert not torch.equal(step[:, 0], step[:, 1])
    assert abs(float((step > 0).double().mean()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / step.numel())


def test_a_recurrent_mask_is_held_over_time():
    """h_t = relu(W (m * h_{t-1})) with W = I, no input: a unit survives T steps iff its mask
    keeps it at every step. One mask held over time keeps a fraction keep; masks redrawn each
    step would keep keep^T."""
    n, batch, steps, keep = 64, 50, 10, 0.5
    rnn = nn.RNN(1, n, nonlinearity="relu", batch_first=True, bias=False, dtype=torch.float64)
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
        rnn.weight_hh_l0.copy_(torch.eye(n))
    masks = draw_masks(rnn, batch, steps, scheme="per_gate", recurrent=1 - keep)
    ones = torch.ones(1, batch, n, dtype=torch.float64)
    out, _ = run_variational(rnn, torch.zeros(batch, steps, 1, dtype=torch.float64), ones, masks)
    alive = out[:, -1] > 0
    assert abs(float(alive.double().mean()) - keep) < 0.05  # keep^T would be 0.001
    torch.testing.assert_close(alive, masks.layers[0].recurrent[0] > 0)
    torch.testing.assert_close(out[:, -1][alive], torch.full_like(out[:, -1][alive], (1 / keep) ** steps))


def lm_model(scheme: str, *, recurrent=0.5, inputs=0.1, output=0.5, rank=0, tied=False, cell="gru"):
    task = PtbCharTask({"mode": "sentences"})
    task._vocab = type("V", (), {"__len__": lambda self: 11})()  # no data files: 11 symbols
    spec = {"cell": cell, "hidden_size": N, "rank": rank, "diag": bool(rank), "tied": tied, "input_dropout": inputs,
            "output_dropout": output, "dropout_masks": scheme}
    torch.manual_seed(3)
    model = build_model(spec, task)
    model.recurrent_dropout = recurrent
    return model


def test_the_model_draws_its_masks_once_per_call_and_drops_the_output_per_sequence():
    model = lm_model("dl4mt", rank=2, tied=True)
    x = torch.randint(0, 11, (B, T))
    model.train()
    torch.manual_seed(9)
    logits = model(x)
    torch.manual_seed(9)  # the same draws, made by hand in the model's order
    inputs = model.embed(x)
    masks = draw_masks(model.rnn, B, T, scheme="dl4mt", recurrent=0.5, inputs=0.1)
    out, _ = run_variational(model.rnn, inputs, None, masks)
    keep = torch.empty(1, B, N).bernoulli_(0.5) / 0.5
    torch.testing.assert_close(logits, model.head(out * keep[0].unsqueeze(1)))
    # output dropout alone: zeros of the readout are the same at every step of a sequence
    only_output = lm_model("per_gate", recurrent=0.0, inputs=0.0, output=0.5)
    only_output.head = nn.Linear(N, N)  # the identity: the logits are the dropped readout
    with torch.no_grad():
        only_output.head.weight.copy_(torch.eye(N))
        only_output.head.bias.zero_()
    only_output.train()
    dropped = only_output(x) == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped)) and dropped.any()
    assert len({tuple(r.tolist()) for r in dropped[:, 0]}) > 1  # and differ across sequences


@pytest.mark.parametrize("scheme", ["per_gate", "dl4mt"])
def test_evaluation_applies_no_dropout(scheme):
    model = lm_model(scheme)
    plain = lm_model(scheme, recurrent=0.0, inputs=0.0, output=0.0)
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 11, (B, T))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    torch.testing.assert_close(model(x), plain.eval()(x))
    plain.train()  # training with every rate 0: the fused layer, the same numbers
    torch.testing.assert_close(plain(x), model(x))


def test_accelerated_layers_say_which_path_the_masks_took():
    from lrcompress.execution import accelerate
    from lrcompress.train.engine import describe_execution

    model = lm_model("dl4mt", rank=2)  # an eq. 7 GRU: execution.masked's backward
    accelerate(model.rnn, mode="factored", training=True)
    model.train()
    model(torch.randint(0, 11, (B, T))).sum().backward()
    assert describe_execution({"rnn": model.rnn}) == {"rnn": MASKED_NOTE}
    assert model.rnn.parametrizations.weight_hh_l0.original0.grad is not None
    rnn = lm_model("per_gate", rank=2, cell="rnn")  # no masked backward for nn.RNN: the step loop
    accelerate(rnn.rnn, mode="factored", training=True)
    rnn.train()
    rnn(torch.randint(0, 11, (B, T))).sum().backward()
    assert describe_execution({"rnn": rnn.rnn}) == {"rnn": FALLBACK_NOTE}


def test_dense_layers_with_per_sequence_masks_are_named_in_the_training_log(capsys):
    """A dense nn.GRU/nn.LSTM is never accelerated, yet per-sequence masks still change its path
    (execution.masked, or the step loop): FitResult.execution (summary.json) and the log say which."""
    from lrcompress.train import fit

    x = torch.randint(0, 11, (B, T))
    for scheme, cell, note in (("dl4mt", "gru", MASKED_NOTE), ("per_gate", "lstm", MASKED_NOTE),
                               ("per_gate", "rnn", FALLBACK_NOTE)):
        model = lm_model(scheme, cell=cell)  # rank 0: dense
        result = fit(model, [(x, x)], lambda out, y: out.float().mean(), recipe={"steps": 2, "lr": 1e-3},
                     progress=True)
        assert result.execution == {"rnn": note}
        assert f"execution: rnn: {note}" in capsys.readouterr().out
    plain = lm_model("batch")  # one mask per mini-batch: cuDNN, nothing to name
    assert fit(plain, [(x, x)], lambda out, y: out.float().mean(), recipe={"steps": 1}).execution == {}


def test_dropout_masks_settings_are_checked():
    with pytest.raises(ConfigError, match="dropout_masks"):
        check_model({"cell": "gru", "dropout_masks": "per_time"})
    with pytest.raises(ConfigError, match="per_gate"):
        check_model({"cell": "lstm", "dropout_masks": "dl4mt"})
    with pytest.raises(ConfigError, match="highway"):
        check_model({"cell": "highway", "dropout_masks": "per_gate"})
    with pytest.raises(ConfigError, match="bidirectional|unidirectional"):
        SequenceModel(nn.GRU(2, 3, batch_first=True, bidirectional=True), 2, "sequence", dropout_masks="per_gate")
    with pytest.raises(ConfigError, match="layers"):
        run_variational(nn.GRU(2, 3, batch_first=True), torch.zeros(1, 2, 2), None, VariationalMasks([]))


# -- perplexity as the paper averages it --------------------------------------------------------

def test_ppl_paper_is_dl4mt_lms_mean_of_sentence_costs():
    """Two sentences, probabilities chosen by hand: sentence A predicts 1/2 and 1/4 (mean NLL
    1.5 ln 2), sentence B (padded) 1/2 (ln 2). dl4mt-lm: exp(mean(1.5 ln 2, ln 2)) = 2^1.25;
    over all symbols: 2^(4/3)."""
    task = PtbCharTask({"mode": "sentences"})
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]],
                          [[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    y = torch.tensor([[0, 1], [1, IGNORE]])
    sums = task.evaluate(probs.log(), Batch(torch.zeros(2, 2, dtype=torch.long), y))
    metrics = task.finalize(sums)
    assert metrics["ppl_paper"] == pytest.approx(2 ** 1.25, rel=1e-6)
    assert metrics["ce_paper"] == pytest.approx(1.25 * math.log(2), rel=1e-6)
    assert metrics["ppl"] == pytest.approx(2 ** (4 / 3), rel=1e-6)
    assert metrics["bpc"] == pytest.approx(4 / 3, rel=1e-6)
    # a second batch adds up: the mean is over all sentences, not over batches
    more = task.evaluate(torch.tensor([[[0.125, 0.5, 0.375]]]).log(), Batch(torch.zeros(1, 1, dtype=torch.long),
                                                                             torch.tensor([[0]])))
    total = task.finalize({k: sums[k] + more[k] for k in sums})
    assert total["ppl_paper"] == pytest.approx(math.exp((1.5 * math.log(2) + math.log(2) + math.log(8)) / 3))
    stream = PtbCharTask({"mode": "stream"})
    streamed = stream.finalize(stream.evaluate(probs.log(), Batch(torch.zeros(2, 2, dtype=torch.long), y)))
    assert streamed["ppl_paper"] == streamed["ppl"]  # Gal's and Zaremba's test: total / total


def test_the_sentence_loss_average_is_dl4mt_lms_cost():
    """The same two sentences: dl4mt-lm's training cost is mean(1.5 ln 2, ln 2) = 1.25 ln 2;
    the default, every symbol alike, (3 ln 2 + ln 2) / 3."""
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]],
                          [[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    batch = Batch(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 1], [1, IGNORE]]))
    by_sentence = PtbCharTask({"mode": "sentences", "loss_average": "sentences"}).loss(probs.log(), batch)
    by_symbol = PtbCharTask({"mode": "sentences"}).loss(probs.log(), batch)
    assert float(by_sentence) == pytest.approx(1.25 * math.log(2), rel=1e-6)
    assert float(by_symbol) == pytest.approx(4 / 3 * math.log(2), rel=1e-6)
    with pytest.raises(ConfigError, match="loss_average"):
        PtbCharTask({"mode": "stream", "loss_average": "sentences"})


# -- the stream separator -------------------------------------------------------------------------

def write_char_files(folder: Path, lines: dict[str, list[str]]) -> None:
    """Mikolov's ptb.char format: every character then a space, the newline included."""
    for split, text in lines.items():
        body = "".join(" ".join(line.replace(" ", "_")) + " \n " for line in text)
        (folder / f"ptb.char.{split}.txt").write_text(body)


def test_stream_mode_separates_joined_sentences_as_zarembas_loader(tmp_path):
    sentences = {"train": ["the cat", "a dog ran", "we go ok it is so"], "valid": ["we go", "ok"],
                 "test": ["it is", "so"]}
    write_char_files(tmp_path, sentences)
    task = build_task({"name": "ptb_char", "data_dir": str(tmp_path), "mode": "stream", "eol": True})
    for split in sentences:
        raw = (tmp_path / f"ptb.char.{split}.txt").read_text()
        tokens = raw.replace("\n", "<eos>").split()  # data.lua: stringx.replace(data, '\n', '<eos>'); split
        expected = [task.vocab.ids[EOL if t == "<eos>" else t] for t in tokens]
        assert task.stream(split).tolist() == expected
    stream = task.stream("train").tolist()
    eol = task.vocab.ids[EOL]
    assert stream.count(eol) == len(sentences["train"])  # one separator after each sentence
    ends = [i for i, s in enumerate(stream) if s == eol]
    assert [b - a - 1 for a, b in zip([-1, *ends], ends)] == [len(s) for s in sentences["train"]]
    batch = next(iter(task.batches("train", 1, seed=0, shuffle=False)))
    assert eol in batch.x.tolist()[0]  # the model sees the separator
    joined = build_task({"name": "ptb_char", "data_dir": str(tmp_path), "mode": "stream", "eol": False})
    assert len(joined.stream("train")) == len(stream) - len(sentences["train"])


# -- the highway bottleneck dropout ---------------------------------------------------------------

def test_highway_bottleneck_dropout_is_one_mask_between_r_and_l_for_both_matrices():
    n, d, batch, p = 32, 8, 4000, 0.3
    torch.manual_seed(0)
    layer = Highway(n, rank=d, diag=True, bottleneck_dropout=p).double()
    with torch.no_grad():  # L with orthonormal columns: the mask can be read back from the output
        for linear in (layer.gate, layer.proposal):
            orthonormal = torch.linalg.qr(torch.randn(1, n, d, dtype=torch.float64))[0]
            linear.parametrizations.weight.original0.copy_(orthonormal)
    x = torch.randn(batch, n, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer.transforms(x), (layer.gate(x), layer.proposal(x)))
    layer.train()
    gate, proposal = layer.transforms(x)
    found = []
    for out, linear in ((gate, layer.gate), (proposal, layer.proposal)):
        plist = linear.parametrizations.weight
        code = x @ plist.original1[0].t()
        rest = out - linear.bias - x * plist.original2[0]
        found.append((rest @ plist.original0[0]) / code)  # L^T L = I: the masked code / the code
    torch.testing.assert_close(found[0], found[1], rtol=0, atol=1e-9)  # one mask for both matrices
    mask = found[0]
    assert torch.allclose(mask, (mask > 0.5).double() / (1 - p))  # entries 0 or 1 / keep
    kept = float((mask > 0.5).double().mean())
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / mask.numel())
    assert len({tuple(r.tolist()) for r in (mask > 0.5)}) > 200  # one mask per example (256 patterns of 8)
    with pytest.raises(ConfigError, match="rank"):
        Highway(n, bottleneck_dropout=0.3)
    with pytest.raises(ConfigError, match="bottleneck_dropout"):
        check_model({"cell": "gru", "bottleneck_dropout": 0.3})


# -- the recipes ----------------------------------------------------------------------------------

def test_highway_recipes_use_the_authors_dropout():
    for name in ("mnist-lr-highway-1024-256", "mnist-lrd-highway-1024-256"):
        model = load_recipe(RECIPES / f"{name}.toml")["model"]
        assert (model["input_dropout"], model["dropout"], model["bottleneck_dropout"], model["output_dropout"]) == \
            (0.2, 0.3, 0.3, 0.5)


def test_gru_recipes_follow_dl4mt_lm():
    assert len(GRU_ROWS) == 11  # Table 2's GRU rows
    for name in GRU_ROWS:
        recipe = load_recipe(RECIPES / f"{name}.toml")
        train, model, task = recipe["train"], recipe["model"], recipe["task"]
        assert (train["optimizer"], train["lr"], train["batch_size"], train["clip"], train["clip_value"]) == \
            ("adam", 1e-3, 32, "norm", 1.0)
        assert (train["eval_every"], train["early_stopping_patience"], train["select"]) == (5000, 11, "ppl_paper")
        assert task["mode"] == "sentences" and task["eol"] and task["loss_average"] == "sentences"
        dropout = name.endswith("-dropout")
        assert model["dropout_masks"] == ("dl4mt" if dropout else "batch")
        rates = (model["input_dropout"], train["recurrent_dropout"], model["output_dropout"] or 0.0)
        assert rates == ((0.1, 0.5, 0.5) if dropout else (0.0, 0.0, 0.0))


def test_lstm_recipes_separate_sentences_and_drop_per_gate():
    assert len(LSTM_ROWS) == 2
    for name in LSTM_ROWS:
        recipe = load_recipe(RECIPES / f"{name}.toml")
        assert recipe["task"]["mode"] == "stream" and recipe["task"]["eol"]
        assert recipe["model"]["dropout_masks"] == "per_gate"


def paper_convention(model: dict, vocab: int = 51) -> int:
    """Table 2's GRU counts: recurrent + 2 n V + 3 n + V (one n x V input block, one bias per gate)."""
    n, d = model["hidden_size"], model["rank"]
    recurrent = 3 * n * n if not d else (4 * n * d + 3 * n if model["tied"] else 3 * (2 * n * d + n))
    return recurrent + 2 * n * vocab + 3 * n + vocab


@pytest.mark.parametrize("name", GRU_ROWS)
def test_gru_recipes_state_the_paper_convention_count(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    count = paper_convention(recipe["model"])
    meta = recipe["meta"]
    text = " ".join(meta["deviations"].split())
    assert f"Table 2 convention {count:,}" in text and f"ours {meta['params']:,}" in text
    digits = len(meta["paper_params"].split()[0].split(".")[1])
    matches = f"{count / 1e6:.{digits}f} M" == meta["paper_params"]
    assert matches != (name == "ptb-lrd-gru-tied-1000-64")  # the one row off the paper's own rule
    if not matches:
        assert "coincidence" in text


def test_a_dl4mt_recipe_trains_a_few_updates(tmp_path):
    from lrcompress.train.run import train_recipe

    data = tmp_path / "data"
    data.mkdir()
    write_char_files(data, {"train": ["the cat sat", "a dog ran off", "ok we go", "yes it is so"] * 4,
                            "valid": ["we go", "ok then"], "test": ["it is", "so it is"]})
    summary = train_recipe(RECIPES / "ptb-lrd-gru-tied-6985-64-dropout.toml", tmp_path / "run", progress=False,
                           overrides=[f"task.data_dir='{data}'", "model.hidden_size=16", "model.rank=4",
                                      "train.steps=3", "train.eval_every=3", "train.batch_size=4",
                                      "train.device='cpu'", "train.execution='factored'"])
    assert summary["steps"] == 3 and math.isfinite(summary["test"]["ppl_paper"])
    assert summary["execution"] == {"rnn": MASKED_NOTE}
