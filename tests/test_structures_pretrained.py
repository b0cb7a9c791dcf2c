"""Model directories, model cards and labels for the non-low-rank structures (issue 11).

``save_pretrained`` -> ``from_pretrained`` must give identical outputs (``torch.equal``) for a
Kronecker, tensor-train and scaled Cayley orthogonal recurrent weight, including the orthogonal
weight's ``signs`` buffer (stored as ``<name>.signs``, live as ``parametrizations.<w>.0.signs``),
through every path that renames keys: ``lrc.save_pretrained``, a Hugging Face model's own
``save_pretrained(state_dict=...)`` (Trainer), Trainer's resume (``load_state_dict`` of a file)
and the CLI's ``convert``/``inspect``/``merge`` of single-file and sharded model directories.
The card's table, ``structures.describe`` and ``lrcompress bench``'s shape column name each
structure and its options in the CLI's own spelling.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lrcompress as lrc
from lrcompress import structures
from lrcompress.structured import kronecker, tensor_train

# (python options, CLI flags, the card's options cell) for a 16x16 recurrent gate block.
CASES = {
    "kronecker": (dict(structure="kronecker", kron_factors=(4, 4), terms=2),
                  ["--structure", "kronecker", "--kron-factors", "4x4", "--terms", "2"], "factors 4x4, terms 2"),
    "tt": (dict(structure="tt", tt_ranks=(3, 2), tt_shape=(4, 2, 2)),
           ["--structure", "tt", "--tt-ranks", "3,2", "--tt-shape", "4x2x2"], "shape 4x2x2, ranks 3,2"),
    "orthogonal": (dict(structure="orthogonal"), ["--structure", "orthogonal"], None),  # fitted signs: per gate
}
TAGS = {"kronecker": "kronecker", "tt": "tensor-train", "orthogonal": "orthogonal"}


def compress(model: nn.Module, options: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # structures larger than the tiny dense weights warn
        return lrc.compress(model, **options)


class Net(nn.Module):
    """A plain model (no Hugging Face config): built again from its class and keyword arguments."""

    def __init__(self, kind: str = "GRU", hidden: int = 16):
        super().__init__()
        self.rnn = getattr(nn, kind)(5, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def signs(model: nn.Module) -> torch.Tensor:
    return model.rnn.parametrizations.weight_hh_l0[0].signs


# ----------------------------------------------------------------------------- structures.describe


@pytest.mark.parametrize("structure, options, text", [
    ("lowrank", {"rank": 24, "diag": True, "tied": False}, "rank 24, diag"),
    ("kronecker", {"factors": [64, 64], "terms": 2}, "factors 64x64, terms 2"),
    ("kronecker", {"factors": [[4, 8], [8, 4]], "terms": 1, "svd": "full", "sweeps": 5},
     "factors 4x8,8x4, terms 1, svd full, sweeps 5"),
    ("tt", {"shape": [[8, 8], [8, 8], [8, 8]], "ranks": [8, 4], "joint": True}, "shape 8x8x8, ranks 8,4, joint"),
    ("tt", {"shape": [[4, 2], [8, 8]], "ranks": [3], "joint": False}, "shape 4x2,8x8, ranks 3"),
    ("orthogonal", {"negatives": [6, 2, 7]}, "negatives 6,2,7"),
    ("orthogonal", {"negatives": 0}, "negatives 0"),
    ("orthogonal", {"negatives": None}, "-"),  # not asked for: nothing to show
    ("kronecker", {"damping": 0.1, "scale": 1e-05}, "damping 0.1, scale 1e-05"),
])
def test_describe_writes_every_option_kind_as_the_cli_takes_it(structure, options, text):
    assert structures.describe(structure, options) == text


def test_described_sizes_and_ranks_parse_back_to_the_options():
    # The cell is the CLI's spelling: --kron-factors, --tt-shape and --tt-ranks read it back.
    for factors in ([16, 16], [[4, 8], [8, 4]], [2, 2, 2]):
        cell = structures.describe("kronecker", {"factors": factors})
        assert structures.json_options({"f": kronecker.parse_factors(cell.removeprefix("factors "))})["f"] == factors
    for ranks in ([8, 4, 8], [5]):
        cell = structures.describe("tt", {"ranks": ranks})
        parsed = tensor_train.parse_ranks(cell.removeprefix("ranks "))
        assert (list(parsed) if isinstance(parsed, tuple) else [parsed]) == ranks
    shape = [[4, 2], [2, 4]]
    cell = structures.describe("tt", {"shape": shape})
    assert tensor_train.parse_shape(cell.removeprefix("shape ")) == ((4, 2), (2, 4))


# ----------------------------------------------------------------------------- save_pretrained / from_pretrained


@pytest.mark.parametrize("name", list(CASES))
def test_plain_model_round_trips_every_structure_exactly_and_the_card_names_it(tmp_path, name):
    options, _, cell = CASES[name]
    torch.manual_seed(0)
    model = Net().eval()
    report = compress(model, options)
    x = torch.randn(4, 2, 5)
    lrc.save_pretrained(model, tmp_path / "d")
    again = lrc.from_pretrained(Net, tmp_path / "d", kind="GRU", hidden=16)
    assert torch.equal(again(x), model(x))
    assert torch.equal(lrc.from_pretrained(Net(), tmp_path / "d")(x), model(x))
    card = (tmp_path / "d" / "README.md").read_text()
    (row,) = report.targets
    cell = cell or structures.describe(name, row.options)
    assert f"| `rnn.weight_hh_l0` | gru/recurrent | 48x16 | {name} | {cell} | 768 | {row.params_after:,} |" in card
    assert "## Ranks" not in card and "| rank |" not in card and "| 0 |" not in card
    assert f"- {TAGS[name]}\n---" in card  # the front matter's tags
    assert f"compressed ({structures.get(name).label})" in card and "low-rank" not in card.split("## Loading")[0]


@pytest.mark.parametrize("kind", ["RNN", "GRU"])
def test_an_orthogonal_recurrent_weight_round_trips_with_its_signs(tmp_path, kind):
    torch.manual_seed(1)
    model = Net(kind, hidden=12).eval()
    report = compress(model, dict(structure="orthogonal"))
    assert signs(model).lt(0).any()  # the fit chose some -1 entries: a loss of them would show
    lrc.save_pretrained(model, tmp_path / "d")
    stored = load_file(tmp_path / "d" / "model.safetensors")
    assert torch.equal(stored["rnn.weight_hh_l0.signs"], signs(model))
    again = lrc.from_pretrained(Net, tmp_path / "d", kind=kind, hidden=12)
    assert torch.equal(signs(again), signs(model))
    x = torch.randn(6, 3, 5)
    assert torch.equal(again(x), model(x))
    negatives = report.targets[0].options["negatives"]
    text = ",".join(map(str, negatives)) if isinstance(negatives, list) else str(negatives)
    assert f"| orthogonal | negatives {text} |" in (tmp_path / "d" / "README.md").read_text()


def test_a_low_rank_card_keeps_its_rank_table(tmp_path):
    model = Net()
    compress(model, dict(rank=3, diag=True))
    lrc.save_pretrained(model, tmp_path / "d")
    card = (tmp_path / "d" / "README.md").read_text()
    assert "# d: low-rank compressed" in card and "## Structures" not in card
    assert "| `rnn.weight_hh_l0` | gru/recurrent | 48x16 | 3 | yes | no |" in card


# ----------------------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def hf():
    """A tiny custom PreTrainedModel holding an nn.GRU, registered with the Auto classes."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")

    class Config(transformers.PretrainedConfig):
        model_type = "lrc-test-structured-gru"

        def __init__(self, input_size=5, hidden_size=16, **kwargs):
            self.input_size, self.hidden_size = input_size, hidden_size
            super().__init__(**kwargs)

    class Model(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.rnn = nn.GRU(config.input_size, config.hidden_size, batch_first=True)
            self.head = nn.Linear(config.hidden_size, 2)
            self.post_init()

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    transformers.AutoConfig.register(Config.model_type, Config, exist_ok=True)
    transformers.AutoModel.register(Config, Model, exist_ok=True)
    return transformers, Config, Model


def hf_model(hf, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return hf[2](hf[1]()).eval()


X = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_round_trips_through_every_save_path(tmp_path, hf, name):
    transformers, _, Model = hf
    options = CASES[name][0]
    model = hf_model(hf)
    compress(model, options)
    want = model(X)
    lrc.save_pretrained(model, tmp_path / "lrc")
    for cls in (transformers.AutoModel, Model):
        assert torch.equal(lrc.from_pretrained(cls, tmp_path / "lrc")(X), want)
    # What Trainer calls with a state dict in hand (accelerate, FSDP): the live keys must become the file's.
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    stored = load_file(tmp_path / "given" / "model.safetensors")
    assert not [k for k in stored if "parametrizations" in k]
    assert stored.keys() == load_file(tmp_path / "lrc" / "model.safetensors").keys()
    assert torch.equal(lrc.from_pretrained(Model, tmp_path / "given")(X), want)
    # Trainer's resume: load_state_dict of the file (file keys) into a model factored alike.
    other = hf_model(hf, seed=1)
    compress(other, options)
    assert not torch.equal(other(X), want)
    result = other.load_state_dict(stored, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other(X), want)
    if name == "orthogonal":
        assert torch.equal(signs(other), signs(model))


def dense_hf_directory(tmp_path, hf, *, shards: int) -> tuple:
    model = hf_model(hf, seed=3)
    folder = tmp_path / "gru"
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    if shards:  # split by hand, as transformers does for large models
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        keys, weight_map = sorted(state), {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in keys[i::shards]}, folder / shard, metadata={"format": "pt"})
            weight_map.update({k: shard for k in keys[i::shards]})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, model


@pytest.mark.parametrize("shards", [0, 2], ids=["single", "sharded"])
@pytest.mark.parametrize("name", list(CASES))
def test_cli_convert_inspect_merge_of_a_model_directory(tmp_path, hf, run, name, shards):
    transformers, _, Model = hf
    options, flags, _ = CASES[name]
    folder, model = dense_hf_directory(tmp_path, hf, shards=shards)
    result = run("convert", folder, *flags, "-o", tmp_path / "small", "--json")
    assert result.code == 0, result.err
    small = lrc.from_pretrained(Model, tmp_path / "small")
    compress(model, options)  # the same conversion in Python
    assert torch.equal(small(X), model(X))
    record = json.loads((tmp_path / "small" / "lrcompress_config.json").read_text())
    assert [t["structure"] for t in record["targets"]] == [name] and record["format_version"] == 2
    assert f"| {name} | {structures.describe(name, record['targets'][0]['options'])} |" in \
        (tmp_path / "small" / "README.md").read_text()
    inspected = run("inspect", tmp_path / "small")
    assert inspected.code == 0, inspected.err
    assert name in inspected.out
    merged = run("merge", tmp_path / "small", "-o", tmp_path / "dense")
    assert merged.code == 0, merged.err
    dense = transformers.AutoModel.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(dense(X), small(X), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- lrcompress bench


@pytest.mark.parametrize("name", list(CASES))
def test_bench_shape_column_names_the_structure_and_its_options(tmp_path, run, name):
    from lrcompress.execution.timing import describe

    options, _, cell = CASES[name]
    model = nn.ModuleDict({"enc": nn.GRU(16, 16), "head": nn.Linear(16, 3)})
    report = compress(model, options)
    cell = cell or structures.describe(name, report.targets[0].options)
    assert describe(model["enc"]) == f"gru 16->16 {name} {cell}"
    path = lrc.save_model(model, tmp_path / "m.lr.safetensors")
    result = run("bench", path, "--seq", 2, "--rounds", 1, "--json")
    assert result.code == 0, result.err
    (row,) = json.loads(result.out)["layers"]
    assert row["shape"] == f"gru 16->16 {name} {cell}"


def test_bench_label_of_a_factored_input_weight_and_of_low_rank():
    from lrcompress.execution.timing import describe

    rnn = nn.LSTM(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrc.kronecker(rnn, "weight_ih_l0", factors=(4, 4), gates=4)
    assert describe(rnn) == "lstm 16->16 ih kronecker factors 4x4, terms 1"
    low = nn.GRU(6, 32)
    compress(low, dict(rank=4, diag=True))
    assert describe(low) == "gru 6->32 rank 4 +diag"
