"""Hugging Face model directories: lrc.save_pretrained / from_pretrained, model.save_pretrained, and the CLI.

Tiny models built from configs (no network): a BERT classifier and a custom PreTrainedModel holding
an nn.GRU. Round trips must give identical outputs (torch.equal), transformers' own loader must
refuse a compressed directory, and the CLI reads single-file, sharded and .bin directories.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lrcompress as lrc
from cli_runner import snapshot
from lrcompress.errors import FormatError, OutputExistsError

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig,  # noqa: E402
                          PretrainedConfig, PreTrainedModel)

LINEAR = ["*.intermediate.dense", "*.output.dense"]  # explicit globs (attention output dense included)


def tiny_bert() -> nn.Module:
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99)
    return AutoModelForSequenceClassification.from_config(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


class GRUConfig(PretrainedConfig):
    model_type = "lrc-test-gru"

    def __init__(self, input_size=5, hidden_size=16, **kwargs):
        self.input_size, self.hidden_size = input_size, hidden_size
        super().__init__(**kwargs)


class GRUModel(PreTrainedModel):
    config_class = GRUConfig

    def __init__(self, config):
        super().__init__(config)
        self.rnn = nn.GRU(config.input_size, config.hidden_size, batch_first=True)
        self.head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.fixture(scope="module", autouse=True)
def _registered():
    AutoConfig.register(GRUConfig.model_type, GRUConfig, exist_ok=True)
    AutoModel.register(GRUConfig, GRUModel, exist_ok=True)


def test_bert_round_trip_is_identical_and_the_card_tells_the_figures(tmp_path):
    model = tiny_bert()
    report = lrc.compress(model, rank=4, targets=LINEAR)
    want = logits(model)
    out = tmp_path / "small"
    metrics = {"dense": {"accuracy": 0.91}, "fine-tuned": {"accuracy": 0.9, "loss": 0.25}}
    lrc.save_pretrained(model, out, metrics=metrics, source="tiny-bert")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "lrcompress_config.json",
                                                     "model.safetensors"]
    again = lrc.from_pretrained(AutoModelForSequenceClassification, out)
    assert torch.equal(logits(again), want)
    assert not again.training
    record = json.loads((out / "lrcompress_config.json").read_text())
    assert record["format_version"] == 1 and record["config"]["rank"] == 4 and record["source"] == "tiny-bert"
    assert len(record["targets"]) == len(report.targets) == 6
    assert record["params_before"] == report.params_before and record["params_after"] == report.params_after
    card = (out / "README.md").read_text()
    assert "source: tiny-bert" in card
    assert f"{report.params_before:,} before, {report.params_after:,} after ({report.ratio:.2f}x smaller)" in card
    assert "| `bert.encoder.layer.1.output.dense.weight` | linear/linear | 32x37 | 4 |" in card
    assert "| accuracy | 0.91 | 0.9 |" in card and "| loss | - | 0.25 |" in card
    assert "BertForSequenceClassification" in card  # how to load it


def test_transformers_refuses_a_compressed_directory_loudly(tmp_path):
    model = tiny_bert()
    lrc.compress(model, rank=4, targets=LINEAR)
    lrc.save_pretrained(model, tmp_path / "small")
    with pytest.raises(ValueError, match="lrcompress.from_pretrained"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "small")
    # Older transformers (< 4.51) ignore that entry and check the file's metadata "format" instead.
    from safetensors import safe_open
    with safe_open(tmp_path / "small" / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "lrcompress"


def test_model_save_pretrained_of_a_compressed_model_writes_ours_and_merge_restores_transformers(tmp_path):
    model = tiny_bert()
    lrc.compress(model, rank=4, targets=LINEAR)
    want = logits(model)
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.model is copied  # the override follows a copy, not the original
    model.save_pretrained(tmp_path / "hf")  # transformers' method name, lrcompress's directory
    with pytest.raises(ValueError, match="lrcompress.from_pretrained"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert torch.equal(logits(lrc.from_pretrained(AutoModelForSequenceClassification, tmp_path / "hf")), want)
    lrc.merge(model)
    model.save_pretrained(tmp_path / "dense")  # transformers' own again: a dense directory it loads
    assert not (tmp_path / "dense" / "lrcompress_config.json").exists()
    dense = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    assert torch.equal(logits(dense), logits(model))
    torch.testing.assert_close(logits(dense), want, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_in_our_format_loads_into_a_compressed_model_as_trainer_resumes(tmp_path):
    model = tiny_bert()
    lrc.compress(model, rank=4, targets=LINEAR)
    model.save_pretrained(tmp_path / "checkpoint-1")
    other = tiny_bert()  # other random weights, same factorization
    lrc.compress(other, rank=4, targets=LINEAR)
    assert not torch.equal(logits(other), logits(model))
    result = other.load_state_dict(load_file(tmp_path / "checkpoint-1" / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys  # Trainer._load_from_checkpoint's call
    assert torch.equal(logits(other), logits(model))


def test_custom_pretrained_gru_model_round_trips_through_auto_and_own_class(tmp_path):
    model = GRUModel(GRUConfig()).eval()
    lrc.compress(model, rank=3, diag=True)
    x = torch.randn(2, 6, 5)
    want = model(x)
    lrc.save_pretrained(model, tmp_path / "gru")
    for cls in (AutoModel, GRUModel):
        again = lrc.from_pretrained(cls, tmp_path / "gru")
        assert isinstance(again, GRUModel) and isinstance(again.rnn, nn.GRU)
        assert torch.equal(again(x), want)
    assert "| `rnn.weight_hh_l0` | gru/recurrent | 48x16 | 3 | yes |" in (tmp_path / "gru" / "README.md").read_text()


class Plain(nn.Module):
    def __init__(self, hidden=12):
        super().__init__()
        self.rnn = nn.LSTM(4, hidden)

    def forward(self, x):
        return self.rnn(x)[0]


def test_plain_module_from_a_class_with_kwargs_or_an_instance(tmp_path):
    model = Plain(hidden=12)
    lrc.compress(model, rank=2)
    x = torch.randn(5, 2, 4)
    lrc.save_pretrained(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / "config.json").exists()  # no Hugging Face config to write
    assert torch.equal(lrc.from_pretrained(Plain, tmp_path / "plain", hidden=12)(x), model(x))
    assert torch.equal(lrc.from_pretrained(Plain(hidden=12), tmp_path / "plain")(x), model(x))
    with pytest.raises(FormatError, match="has shape"):
        lrc.from_pretrained(Plain, tmp_path / "plain", hidden=8)


def test_an_existing_directory_needs_force_unless_ours_and_other_files_stay(tmp_path):
    model = Plain()
    lrc.compress(model, rank=2)
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by lrcompress"):
        lrc.save_pretrained(model, out)
    lrc.save_pretrained(model, out, force=True)
    lrc.save_pretrained(model, out)  # ours now: written again without force
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(lrc.LRCompressError, match="is a file"):
        lrc.save_pretrained(model, out / "notes.txt")


def test_a_crash_while_saving_leaves_no_directory_that_looks_complete(tmp_path, monkeypatch):
    model = Plain()
    lrc.compress(model, rank=2)
    lrc.save_pretrained(model, tmp_path / "d")
    import lrcompress.pretrained as pretrained

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "write_compressed", crash)
    with pytest.raises(OSError):
        lrc.save_pretrained(model, tmp_path / "d")
    with pytest.raises(FormatError, match="has no model.safetensors"):
        lrc.from_pretrained(Plain, tmp_path / "d")


# ----------------------------------------------------------------------------- the command line


def hf_directory(tmp_path, name="bert", *, shards=0, bin=False):
    """A dense transformers directory of tiny_bert (seeded), single-file, sharded by hand, or .bin."""
    torch.manual_seed(3)
    model = tiny_bert()
    folder = tmp_path / name
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    state = load_file(folder / "model.safetensors")
    if shards:
        (folder / "model.safetensors").unlink()
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            part = keys[i::shards]
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, folder / shard, metadata={"format": "pt"})
            weight_map.update({k: shard for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if bin:
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    return folder, model


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_convert_a_model_directory_gives_one_from_pretrained_reads(tmp_path, run, layout):
    folder, model = hf_directory(tmp_path, shards=2 if layout == "sharded" else 0, bin=layout == "bin")
    before = snapshot(folder)
    result = run("convert", folder, "--rank", 4, "--targets", ",".join(LINEAR), "--json")
    assert result.code == 0, result.err
    out = tmp_path / "bert.lr"
    assert json.loads(result.out)["output"] == str(out)
    assert snapshot(folder) == before  # the input is never modified
    assert {"config.json", "model.safetensors", "lrcompress_config.json", "README.md",
            "tokenizer_config.json"} == {p.name for p in out.iterdir()}
    again = lrc.from_pretrained(AutoModelForSequenceClassification, out)
    lrc.compress(model, rank=4, targets=LINEAR)  # the same conversion in Python
    assert torch.equal(logits(again), logits(model))
    assert str(folder) in (out / "README.md").read_text()


def test_merge_of_a_compressed_directory_is_a_dense_directory_transformers_loads(tmp_path, run):
    folder, _ = hf_directory(tmp_path)
    assert run("convert", folder, "--rank", 4, "--targets", "all-linear", "-o", tmp_path / "small").code == 0
    small = lrc.from_pretrained(AutoModelForSequenceClassification, tmp_path / "small")
    assert len(json.loads((tmp_path / "small" / "lrcompress_config.json").read_text())["targets"]) == 13
    before = snapshot(tmp_path / "small")
    result = run("merge", tmp_path / "small", "--json")
    assert result.code == 0, result.err
    dense_dir = tmp_path / "small.dense"
    assert json.loads(result.out)["output"] == str(dense_dir)
    assert snapshot(tmp_path / "small") == before
    assert not (dense_dir / "lrcompress_config.json").exists() and (dense_dir / "tokenizer_config.json").exists()
    dense = AutoModelForSequenceClassification.from_pretrained(dense_dir).eval()
    torch.testing.assert_close(logits(dense), logits(small), rtol=1e-5, atol=1e-6)
    assert run("inspect", tmp_path / "small").code == 0


def test_directory_errors_are_one_line(tmp_path, run):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    folder, _ = hf_directory(tmp_path, "sharded", shards=2)
    index = folder / "model.safetensors.index.json"
    good = index.read_text()
    results = []
    for text in ["{not json", json.dumps({"weight_map": []})]:
        index.write_text(text)
        results.append(run("inspect", folder))
    mapping = json.loads(good)["weight_map"]
    index.write_text(json.dumps({"weight_map": {**mapping, "extra.weight": "model-00009-of-00009.safetensors"}}))
    results.append(run("inspect", folder))
    index.write_text(json.dumps({"weight_map": {**mapping, "extra.weight": "model-00001-of-00002.safetensors"}}))
    results.append(run("inspect", folder))
    index.write_text(good)
    results.append(run("convert", empty, "--rank", 2))
    results.append(run("convert", folder, "--rank", 2, "--targets", "*.intermediate.dense", "-o", folder / "out"))
    messages = ["not valid JSON", "broken index", "model-00009-of-00009.safetensors, which is missing",
                "lacks ['extra.weight'] the index maps to it", "no model weights", "lies inside the input"]
    for result, message in zip(results, messages):
        assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1, result
        assert result.out == ""


# ----------------------------------------------------------------------------- fixes from a new-user trial


def test_merge_rerun_rewrites_its_own_directory_and_force_keeps_other_files(tmp_path, run):
    folder, _ = hf_directory(tmp_path)
    assert run("convert", folder, "--rank", 4, "--targets", "all-linear", "-o", tmp_path / "small").code == 0
    first = run("merge", tmp_path / "small")
    assert first.code == 0, first.err
    dense = tmp_path / "small.dense"
    again = run("merge", tmp_path / "small")  # ours (merged_from=lrcompress): a rerun rewrites it
    assert again.code == 0, again.err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = run("merge", tmp_path / "small", "-o", foreign)
    assert refused.code == 2 and "not written by lrcompress; pass --force" in refused.err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert run("merge", tmp_path / "small", "-o", foreign, "--force").code == 0
    assert (foreign / "notes.txt").read_text() == "mine"
    assert load_file(foreign / "model.safetensors").keys() == load_file(dense / "model.safetensors").keys()


def test_inspect_a_directory_with_all_linear_and_a_hint_without_targets(tmp_path, run):
    folder, model = hf_directory(tmp_path)
    result = run("inspect", folder, "--targets", "all-linear", "--json")
    assert result.code == 0, result.err
    names = {row["name"] for row in json.loads(result.out)["matrices"]}
    assert names == {f"{n}.weight" for n in lrc.targets.all_linear_names(model)}  # as convert selects
    bare = run("inspect", folder)
    assert bare.code == 2 and len(bare.err.strip().splitlines()) == 1
    assert "no recurrent weights found" in bare.err and "--targets all-linear" in bare.err


def test_base_model_from_a_head_directory_and_head_from_base_as_transformers(tmp_path):
    torch.manual_seed(0)
    head = tiny_bert()
    lrc.compress(head, rank=4, targets=LINEAR)
    lrc.save_pretrained(head, tmp_path / "head")
    base = lrc.from_pretrained(AutoModel, tmp_path / "head")
    assert type(base).__name__ == "BertModel" and not base.training
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids()).last_hidden_state, head.bert(input_ids=ids()).last_hidden_state)
    lrc.save_pretrained(head.bert, tmp_path / "base")
    again = lrc.from_pretrained(AutoModelForSequenceClassification, tmp_path / "base")
    with torch.no_grad():  # the base part loaded; the head stays freshly initialised, as in transformers
        assert torch.equal(again.bert(input_ids=ids()).last_hidden_state, head.bert(input_ids=ids()).last_hidden_state)
    again.save_pretrained(tmp_path / "resaved")  # still lrcompress's save_pretrained: the factors are kept
    assert torch.equal(logits(lrc.from_pretrained(AutoModelForSequenceClassification, tmp_path / "resaved")),
                       logits(again))


def test_from_pretrained_config_keywords_update_the_config_and_others_are_named(tmp_path):
    model = tiny_bert()
    lrc.compress(model, rank=4, targets=LINEAR)
    lrc.save_pretrained(model, tmp_path / "d")
    again = lrc.from_pretrained(AutoModelForSequenceClassification, tmp_path / "d", output_hidden_states=True)
    assert again.config.output_hidden_states is True
    assert torch.equal(logits(again), logits(model))
    with pytest.raises(lrc.ConfigError, match="'num_labelz' is neither an attribute of BertConfig"):
        lrc.from_pretrained(AutoModelForSequenceClassification, tmp_path / "d", num_labelz=5)


def test_model_save_pretrained_warns_of_ignored_options_and_removes_stale_hf_shards(tmp_path):
    folder, _ = hf_directory(tmp_path, "sharded", shards=2)
    (folder / "model-00001-of-00002.bin.keep").write_text("not a shard name")
    model = tiny_bert()
    lrc.compress(model, rank=4, targets=LINEAR)
    with pytest.warns(UserWarning, match=r"ignored: max_shard_size='20KB', safe_serialization=False"):
        model.save_pretrained(folder, max_shard_size="20KB", safe_serialization=False)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "lrcompress_config.json",
                                                  "README.md", "tokenizer_config.json",
                                                  "model-00001-of-00002.bin.keep"}
    assert torch.equal(logits(lrc.from_pretrained(AutoModelForSequenceClassification, folder)), logits(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what Trainer passes is no cause for a warning
        model.save_pretrained(folder, safe_serialization=True, state_dict=None)


def test_convert_refuses_gpt2_conv1d_targets_before_writing(tmp_path, run):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    for target in ("c_attn", "c_proj"):  # c_proj is square: only the model built on the meta device tells
        result = run("convert", folder, "--rank", 2, "--targets", target, "-o", tmp_path / "out")
        assert result.code == 2 and "(Conv1D)" in result.err and len(result.err.strip().splitlines()) == 1, result
        assert not (tmp_path / "out").exists()
    sd = tmp_path / "gpt2.safetensors"  # a bare state dict: the bias length tells the non-square ones
    save_file(load_file(folder / "model.safetensors"), sd)
    result = run("convert", sd, "--rank", 2, "--targets", "c_attn")
    assert result.code == 2 and "looks like a transformers Conv1D" in result.err, result
    assert not (tmp_path / "gpt2.lr.safetensors").exists()
