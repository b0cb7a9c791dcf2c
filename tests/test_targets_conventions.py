"""Target selection in peft's conventions: lists of names/suffixes/globs, one full-match regex,
``"all-linear"``; Linear layers of a tiny Bert compressed and checked against the dense model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.config import ALL_LINEAR
from lrcompress.targets import all_linear_names, find_state_dict_targets

transformers = pytest.importorskip("transformers")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.a, self.b = nn.Module(), nn.Module()
        self.a.gate, self.b.gate = nn.Linear(8, 8), nn.Linear(8, 8)
        self.agate = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.rnn(x)[0]
        return self.head(self.agate(self.b.gate(self.a.gate(h))))


def selected(**options) -> list[str]:
    report = lrc.compress(Net(), rank=2, **options)
    return sorted(t.name for t in report.targets)


REC = ["rnn.weight_hh_l0"]


@pytest.mark.parametrize("targets, linear", [
    (["a.gate"], ["a.gate"]),                           # exact name
    (["gate"], ["a.gate", "b.gate"]),                   # dotted suffix: not "agate"
    (["*gate"], ["a.gate", "agate", "b.gate"]),         # glob
    (r"a\.gate", ["a.gate"]),                           # one string: a full-match regex
    (r"(a|b)\.gate|head", ["a.gate", "b.gate", "head"]),
    (ALL_LINEAR, ["a.gate", "agate", "b.gate"]),         # every Linear but the last (the output layer)
    ([ALL_LINEAR], ["a.gate", "agate", "b.gate"]),       # the CLI's list form
])
def test_target_selection(targets, linear):
    assert selected(targets=targets) == sorted(REC + [f"{n}.weight" for n in linear])


def test_regex_is_full_match_not_suffix():
    with pytest.raises(lrc.TargetError, match="target regex 'gate' matches no module"):
        selected(targets="gate")  # a list ["gate"] would match as a suffix; a regex must match whole names


def test_exclude_regex_and_list():
    assert selected(targets=ALL_LINEAR, exclude=r"a\..*") == sorted(REC + ["agate.weight", "b.gate.weight"])
    assert selected(targets=ALL_LINEAR, exclude=["gate"]) == sorted(REC + ["agate.weight"])
    with pytest.raises(lrc.TargetError, match="exclude regex 'nothing' matches no module or weight"):
        selected(targets=ALL_LINEAR, exclude="nothing")


@pytest.mark.parametrize("options, message", [
    (dict(targets="(unclosed"), "targets regex '(unclosed' is invalid"),
    (dict(exclude="*.gate"), "exclude regex '*.gate' is invalid"),  # a glob given as a string
    (dict(targets=[ALL_LINEAR, "head"]), "'all-linear' stands alone"),
    (dict(exclude=ALL_LINEAR), "exclude='all-linear' is not allowed"),
    (dict(targets=""), "targets regex must not be empty"),
])
def test_bad_selection_is_one_config_error(options, message):
    with pytest.raises(lrc.ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        lrc.CompressionConfig(rank=2, **options)


@pytest.mark.parametrize("targets, exclude", [
    (r"enc\..*", ["head"]), (["*.gate", "head"], r"x|y"), (ALL_LINEAR, ()), ((), ()),
])
def test_config_round_trips_the_kind_of_selection(targets, exclude, tmp_path):
    config = lrc.CompressionConfig(rank=4, targets=targets, exclude=exclude)
    data = json.loads(config.to_json())
    assert isinstance(data["targets"], str) == isinstance(targets, str)  # a regex stays a JSON string
    assert isinstance(data["exclude"], str) == isinstance(exclude, str)
    again = lrc.CompressionConfig.from_json(config.to_json())
    assert again == config
    config.save(tmp_path / "c.json")
    assert lrc.CompressionConfig.load(tmp_path / "c.json") == config


def test_regex_through_a_wrapper_with_or_without_its_prefix():
    for regex in (r"module\.a\.gate", r"a\.gate"):
        report = lrc.compress(nn.DataParallel(Net()), rank=2, targets=regex)
        assert sorted(t.name for t in report.targets) == sorted(REC + ["a.gate.weight"])


def test_state_dict_all_linear_needs_the_layer_names():
    net = Net()
    sd = net.state_dict()
    with pytest.raises(lrc.TargetError, match="bare state dict"):
        find_state_dict_targets(sd, lrc.CompressionConfig(rank=2, targets=ALL_LINEAR))
    found = find_state_dict_targets(sd, lrc.CompressionConfig(rank=2, targets=ALL_LINEAR),
                                    linear=all_linear_names(net))
    assert sorted(c.name for c in found) == sorted(REC + ["a.gate.weight", "agate.weight", "b.gate.weight"])
    found = find_state_dict_targets(sd, lrc.CompressionConfig(rank=2, targets=r"(a|b)\.gate"))
    assert sorted(c.name for c in found) == sorted(REC + ["a.gate.weight", "b.gate.weight"])


# -- Hugging Face models ---------------------------------------------------------------------

def tiny_bert_config():
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, vocab_size=99)


def test_all_linear_leaves_out_the_classifier_and_the_lm_head():
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification(tiny_bert_config())
    names = all_linear_names(cls)
    assert "classifier" not in names and len(names) == 2 * 6 + 1  # q k v o, intermediate, output; pooler
    mlm = transformers.BertForMaskedLM(tiny_bert_config())
    names = all_linear_names(mlm)
    assert "cls.predictions.decoder" not in names  # the output embeddings (tied to the input ones)
    assert "cls.predictions.transform.dense" in names
    report = lrc.compress(mlm, rank=4, targets=ALL_LINEAR)  # no tied-weight error: the LM head is left out
    assert len(report.targets) == len(names)


class BlockHead(transformers.PreTrainedModel):
    """A PreTrainedModel whose classifier is a block (RoBERTa style): only its last Linear is the output."""

    config_class = transformers.BertConfig

    def __init__(self, config):
        super().__init__(config)
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        self.post_init()


def test_all_linear_block_head_keeps_its_inner_dense_layer():
    assert all_linear_names(BlockHead(tiny_bert_config())) == ["body", "classifier.0"]


@pytest.mark.parametrize("rank", [32, 8])
def test_tiny_bert_linear_layers_compress_and_compute_right(rank):
    """Logits of the compressed Bert equal those of a dense Bert whose Linear weights are their
    truncated SVDs (float64 reference); at full rank, the dense model itself."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config()).double().eval()
    reference = transformers.BertForSequenceClassification(tiny_bert_config()).double().eval()
    reference.load_state_dict(model.state_dict())
    names = all_linear_names(model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in names:
            W = modules[name].weight
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            W.copy_((U[:, :rank] * S[:rank]) @ Vh[:rank])
    x = torch.randint(0, 99, (3, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank is no smaller than dense: a warning, not an error
        report = lrc.compress(model, rank=rank, targets=ALL_LINEAR, exclude=["pooler"], svd="exact")
    assert len(report.targets) == len(names) - 1
    assert all(getattr(modules[n], "parametrizations", None) is None for n in names)  # reference stays dense
    if rank < 32:
        dict(reference.named_modules())["bert.pooler.dense"].weight.data = (
            dict(model.named_modules())["bert.pooler.dense"].weight.data.clone())
    with torch.no_grad():
        got, want = model(input_ids=x).logits, reference(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert report.params_after < report.params_before or rank == 32


def test_gpt2_conv1d_is_refused_by_name():
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(lrc.TargetError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D"):
        lrc.compress(model, rank=2, targets=ALL_LINEAR)
    with pytest.raises(lrc.TargetError, match=r"matches transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        lrc.compress(model, rank=2, targets=["c_attn"])


# -- the command line ------------------------------------------------------------------------

@pytest.fixture
def state_dict_file(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(Net().state_dict(), path)
    return path


def test_cli_targets_regex(run, state_dict_file, tmp_path):
    out = tmp_path / "o.safetensors"
    result = run("convert", state_dict_file, "--rank", 2, "--targets-regex", r"(a|b)\.gate", "-o", out, "--json")
    assert result.code == 0, result.err
    assert sorted(t["name"] for t in json.loads(result.out)["targets"]) == sorted(
        REC + ["a.gate.weight", "b.gate.weight"])


@pytest.mark.parametrize("args, message", [
    (["--targets", "gate", "--targets-regex", "x"], "give --targets or --targets-regex, not both"),
    (["--targets-regex", "("], "targets regex '(' is invalid"),
    (["--targets", "all-linear"], "bare state dict"),
])
def test_cli_selection_errors(run, state_dict_file, tmp_path, args, message):
    result = run("convert", state_dict_file, "--rank", 2, "-o", tmp_path / "o.safetensors", *args)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "o.safetensors").exists()


class NamedHead(transformers.PreTrainedModel):
    """A custom PreTrainedModel: no LM head, its output layer called neither classifier nor score."""

    config_class = transformers.BertConfig

    def __init__(self, config):
        super().__init__(config)
        self.rnn = nn.GRU(4, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.post_init()


def test_all_linear_of_a_custom_pretrained_model_leaves_out_its_last_linear():
    model = NamedHead(tiny_bert_config())
    assert model.get_output_embeddings() is None
    assert all_linear_names(model) == ["proj"]
    report = lrc.compress(model, rank=1, targets=ALL_LINEAR)
    assert "head" not in {t.name.rpartition(".")[0] for t in report.targets}


def test_a_state_dict_weight_whose_bias_is_not_one_per_row_is_refused():
    conv1d = {"h.c_attn.weight": torch.randn(4, 12), "h.c_attn.bias": torch.randn(12)}  # GPT-2: in x out
    with pytest.raises(lrc.TargetError, match=r"h\.c_attn: its bias has 12 entries.*4 rows.*Conv1D"):
        find_state_dict_targets(conv1d, lrc.CompressionConfig(rank=2, targets=["c_attn"]))
    odd = {"m.weight": torch.randn(4, 6), "m.bias": torch.randn(5)}
    with pytest.raises(lrc.TargetError, match=r"m: its bias has 5 entries") as info:
        find_state_dict_targets(odd, lrc.CompressionConfig(rank=2, targets=["m"]))
    assert "Conv1D" not in str(info.value)
    linear = nn.Linear(6, 4).state_dict()  # bias of `rows` entries: accepted
    found = find_state_dict_targets({f"m.{k}": v for k, v in linear.items()},
                                    lrc.CompressionConfig(rank=2, targets=["m"]))
    assert [(c.name, c.rows, c.cols) for c in found] == [("m.weight", 4, 6)]


def test_a_target_named_with_weight_gets_a_hint():
    model = transformers.BertForSequenceClassification(tiny_bert_config())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    with pytest.raises(lrc.TargetError, match=r"matches no module; targets name modules: drop '\.weight'"):
        lrc.compress(model, rank=2, targets=[name])
    with pytest.raises(lrc.TargetError, match=r"drop '\.weight'"):
        find_state_dict_targets(model.state_dict(), lrc.CompressionConfig(rank=2, targets=[name]))
    with pytest.raises(lrc.TargetError) as info:
        lrc.compress(model, rank=2, targets=["nothing"])
    assert "drop" not in str(info.value)
