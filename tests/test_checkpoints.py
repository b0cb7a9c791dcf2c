"""Reading checkpoints as users have them (lrcompress.checkpoints), through the API and the command.

Every reading is checked by value: the tensors read equal the ones saved, and a full-rank
conversion, loaded back into a plain skeleton, reproduces the dense float64 reference model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lrcompress as lrc
from lrcompress.checkpoints import fold_weight_norm, parse_rename, read_checkpoint, rename_keys, sniff

X = torch.randn(6, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))




class Net(nn.Module):
    """The user's model class: a GRU under an attribute, as in most projects."""

    def __init__(self, layers: int = 1):
        super().__init__()
        self.rnn = nn.GRU(3, 4, num_layers=layers, dtype=torch.float64)

    def forward(self, x):
        return self.rnn(x)[0]


def net(seed: int = 0, layers: int = 1) -> Net:
    torch.manual_seed(seed)
    return Net(layers)


def reference(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def convert_full_rank(run, src: Path, *args) -> Path:
    """``convert`` at full rank (4: square 4x4 blocks); returns the output file."""
    out = src.with_name("out.lr.safetensors")
    code, _, err = run("convert", src, "--rank", "4", "-o", out, *args)
    assert code == 0, err
    return out


def assert_reproduces(out: Path, model: nn.Module) -> None:
    """The converted file, loaded into a fresh skeleton, computes what ``model`` computes."""
    loaded = lrc.load_model(net(seed=99, layers=model.rnn.num_layers), out)
    torch.testing.assert_close(reference(loaded), reference(model), rtol=0, atol=1e-10)


def assert_one_line_error(result, *fragments: str) -> None:
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- 1. format by content


def _as(kind: str, sd: dict, path: Path) -> None:
    if kind == "safetensors":
        save_file(sd, path)
    elif kind == "torch-zip":
        torch.save(sd, path)
    elif kind == "torch-pickle":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        np.savez(path.with_suffix(".tmp"), **{k: v.numpy() for k, v in sd.items()})
        path.with_suffix(".tmp.npz").rename(path)


@pytest.mark.parametrize("kind, name", [("safetensors", "model.pt"), ("torch-zip", "model"),
                                        ("torch-pickle", "model.bin"), ("numpy-npz", "weights.pt")])
def test_the_format_is_read_from_the_content_not_the_extension(tmp_path, kind, name):
    sd = net().state_dict()
    _as(kind, sd, tmp_path / name)
    assert sniff(tmp_path / name) == kind
    state, meta = read_checkpoint(tmp_path / name)
    assert meta["source_format"] == kind and state.keys() == sd.keys()
    assert all(torch.equal(state[k], v) for k, v in sd.items())


@pytest.mark.parametrize("content, looks_like", [
    (b"", "an empty file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html>Not found</html>", "HTML page"),
    (gzip.compress(b"weights"), "gzip"),
    (b"\x93NUMPY\x01\x00v\x00{'descr'", "single NumPy array"),
])
def test_another_kind_of_file_is_named_in_one_line(run, tmp_path, content, looks_like):
    (tmp_path / "m.pt").write_bytes(content)
    assert_one_line_error(run("convert", tmp_path / "m.pt", "--rank", "2"), "m.pt is not a readable PyTorch file",
                          looks_like)


def test_a_zip_of_something_else_lists_its_members(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(lrc.FormatError, match=r"a zip archive .*members: readme\.txt"):
        read_checkpoint(tmp_path / "m.pt")


# ----------------------------------------------------------------------------- 2. Lightning .ckpt


@pytest.fixture
def throwaway_module():
    """Classes of a training framework the reader has never heard of (and cannot import)."""
    package, name = types.ModuleType("lrc_throwaway"), "lrc_throwaway.utilities.parsing"
    module = types.ModuleType(name)

    class AttributeDict(dict):
        def __getattr__(self, key):
            return self[key]

    class EarlyStopping:
        def __init__(self):
            self.patience, self.best = 3, torch.tensor(0.25)

    for cls in (AttributeDict, EarlyStopping):
        cls.__module__, cls.__qualname__ = name, cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules.update({"lrc_throwaway": package, "lrc_throwaway.utilities": package, name: module})
    yield module
    for key in ("lrc_throwaway", "lrc_throwaway.utilities", name):
        sys.modules.pop(key, None)


def lightning_checkpoint(module, model: nn.Module, **state_extra) -> dict:
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters())
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
            "state_dict": {**sd, **state_extra}, "loops": {"fit_loop": {"state_dict": {}}},
            "callbacks": {"EarlyStopping{'monitor': 'val_loss'}": module.EarlyStopping()},
            "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": module.AttributeDict(hidden=4, cfg=argparse.Namespace(lr=0.1))}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_lightning_checkpoint_loads_without_running_its_code(run, tmp_path, throwaway_module, legacy):
    model = net()
    torch.save(lightning_checkpoint(throwaway_module, model), tmp_path / "last.ckpt",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(Exception, match="Unsupported global"):  # what plain weights-only loading says
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    for key in list(sys.modules):  # the framework is not installed where the file is converted
        if key.startswith("lrc_throwaway"):
            del sys.modules[key]
    out = convert_full_rank(run, tmp_path / "last.ckpt", "--rename", "^model\\.=")
    assert not any(key.startswith("lrc_throwaway") for key in sys.modules), "the framework was imported"
    assert_reproduces(out, model)


def test_a_pickled_class_inside_the_state_dict_is_refused(run, tmp_path, throwaway_module):
    ckpt = lightning_checkpoint(throwaway_module, net(), **{"model.tracker": throwaway_module.EarlyStopping()})
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert_one_line_error(run("convert", tmp_path / "last.ckpt", "--rank", "2"),
                          "'model.tracker'", "lrc_throwaway.utilities.parsing.EarlyStopping", "--trust-pickle")


# ----------------------------------------------------------------------------- 3. wrapper prefixes


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped_and_recorded(run, tmp_path, prefix):
    model = net()
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    state, meta = read_checkpoint(tmp_path / "ddp.pt")
    assert meta["wrapper_prefix"] == prefix and set(state) == set(model.state_dict())
    out = convert_full_rank(run, tmp_path / "ddp.pt")
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["wrapper_prefix"] == prefix and "rnn.weight_hh_l0.L" in f.keys()
    assert_reproduces(out, model)


def test_a_prefix_on_only_some_keys_is_kept(tmp_path):
    sd = {"module.rnn.weight_hh_l0": torch.ones(3, 1), "head.weight": torch.ones(1)}
    torch.save(sd, tmp_path / "m.pt")
    state, meta = read_checkpoint(tmp_path / "m.pt")
    assert set(state) == set(sd) and "wrapper_prefix" not in meta


# ----------------------------------------------------------------------------- 4. nested state dicts


def test_the_only_entry_holding_tensors_is_chosen(run, tmp_path):
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    model(X).sum().backward()
    optimizer.step()  # a real optimizer state: tensors, but nested one level deeper
    torch.save({"step": 500, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict()},
               tmp_path / "encoder.pt")
    assert_reproduces(convert_full_rank(run, tmp_path / "encoder.pt"), model)


def test_a_common_name_wins_and_several_candidates_ask_for_key(run, tmp_path):
    model, other = net(), net(seed=1)
    torch.save({"model": model.state_dict(), "ema": other.state_dict()}, tmp_path / "a.pt")
    state, _ = read_checkpoint(tmp_path / "a.pt")
    assert torch.equal(state["rnn.weight_hh_l0"], model.rnn.weight_hh_l0)
    torch.save({"encoder": model.state_dict(), "ema": other.state_dict(), "step": 3}, tmp_path / "b.pt")
    assert_one_line_error(run("inspect", tmp_path / "b.pt"), "'encoder', 'ema'", "--key")
    state, _ = read_checkpoint(tmp_path / "b.pt", key="ema")
    assert torch.equal(state["rnn.weight_hh_l0"], other.rnn.weight_hh_l0)


def test_non_tensor_values_are_dropped_with_a_note(tmp_path):
    sd = net().state_dict()
    torch.save({**sd, "_metadata": {"": {"version": 1}}, "num_batches": 7}, tmp_path / "m.pt")
    with pytest.warns(UserWarning, match=r"ignored 2 non-tensor .*'_metadata', 'num_batches'"):
        state, _ = read_checkpoint(tmp_path / "m.pt")
    assert state.keys() == sd.keys()


# ----------------------------------------------------------------------------- 5, 6. renames and .npz


def g2p_npz(path: Path) -> nn.GRU:
    """A g2p-style NumPy GRU encoder (PyTorch's r, z, n gate order) and the same dense nn.GRU."""
    rng = np.random.default_rng(0)
    arrays = {"enc_emb": rng.normal(size=(10, 3)), "enc_w_ih": rng.normal(size=(12, 3)) / 2,
              "enc_w_hh": rng.normal(size=(12, 4)) / 2, "enc_b_ih": rng.normal(size=12) / 2,
              "enc_b_hh": rng.normal(size=12) / 2}
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    dense = nn.GRU(3, 4)
    with torch.no_grad():
        for ours, theirs in [("weight_ih_l0", "enc_w_ih"), ("weight_hh_l0", "enc_w_hh"),
                             ("bias_ih_l0", "enc_b_ih"), ("bias_hh_l0", "enc_b_hh")]:
            getattr(dense, ours).copy_(torch.from_numpy(arrays[theirs]))
    return dense


def test_a_numpy_g2p_gru_converted_with_renames_equals_the_dense_gru(run, tmp_path):
    dense = g2p_npz(tmp_path / "g2p.npz")
    out = convert_full_rank(run, tmp_path / "g2p.npz", "--rename", r"^enc_w_=rnn.weight_",
                            "--rename", r"^enc_b_=rnn.bias_", "--rename", r"^(rnn\.\w+_[ih]h)$=\1_l0")
    skeleton = nn.Module()
    skeleton.rnn, skeleton.enc_emb = nn.GRU(3, 4), nn.Parameter(torch.zeros(10, 3))
    loaded = lrc.load_model(skeleton, out)
    x = X.float()
    torch.testing.assert_close(loaded.rnn(x)[0], dense(x)[0], rtol=0, atol=1e-5)
    assert loaded.rnn.parametrizations.weight_hh_l0.original0.shape[-1] == 4  # factored, full rank


def test_rename_rules(tmp_path):
    sd = {"a.w": torch.zeros(1), "b.w": torch.ones(1)}
    assert list(rename_keys(sd, [r"^(\w)\.w$=\1.weight", ("weight", "kernel")])) == ["a.kernel", "b.kernel"]
    pattern, replacement = parse_rename(r"x\=y=z")  # an escaped '=' belongs to the regex
    assert (pattern.pattern, replacement) == (r"x\=y", "z")
    assert parse_rename(r"a(?=b)=c")[0].pattern == "a(?=b)" and parse_rename("^a=")[1] == ""
    with pytest.raises(lrc.ConfigError, match=r"'\(unclosed'"):
        rename_keys(sd, ["(unclosed=x"])
    with pytest.raises(lrc.ConfigError, match="REGEX=REPLACEMENT"):
        rename_keys(sd, ["no-separator"])
    with pytest.raises(lrc.FormatError, match=r"both 'a.w' and 'b.w' to 'x'"):
        rename_keys(sd, [r"^\w\.w$=x"])


def test_bad_rename_is_one_line_on_the_command_line(run, tmp_path):
    torch.save(net().state_dict(), tmp_path / "m.pt")
    assert_one_line_error(run("inspect", tmp_path / "m.pt", "--rename", "[a-=b"), "'[a-'")


def test_an_npz_object_array_is_refused(run, tmp_path):
    np.savez(tmp_path / "m.npz", w=np.zeros((2, 2), np.float32), meta=np.array([{"a": 1}], dtype=object))
    assert_one_line_error(run("convert", tmp_path / "m.npz", "--rank", "2"), "'meta'", "object array")


# ----------------------------------------------------------------------------- 7. TorchScript


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save, to build the archive
def test_torchscript_needs_trust_and_then_inspect_and_convert_agree(run, tmp_path):
    model = net()
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    assert_one_line_error(run("convert", tmp_path / "scripted.pt", "--rank", "2"), "TorchScript archive",
                          "--trust-pickle")
    code, out, err = run("inspect", tmp_path / "scripted.pt", "--trust-pickle", "--json")
    assert code == 0, err
    assert {m["name"] for m in json.loads(out)["matrices"]} == {"rnn.weight_hh_l0"}
    assert_reproduces(convert_full_rank(run, tmp_path / "scripted.pt", "--trust-pickle"), model)


def test_trusted_whole_wrapped_module_inspect_and_convert_agree(run, tmp_path):
    """A pickled DataParallel model: both commands see the wrapped module's names."""
    model = net()
    torch.save(nn.DataParallel(model), tmp_path / "whole.pt")
    code, out, err = run("inspect", tmp_path / "whole.pt", "--trust-pickle", "--json")
    assert code == 0, err
    assert {m["name"] for m in json.loads(out)["matrices"]} == {"rnn.weight_hh_l0"}
    code, out, err = run("convert", tmp_path / "whole.pt", "--trust-pickle", "--rank", "4", "--json",
                         "-o", tmp_path / "out.lr.safetensors")
    assert code == 0, err
    assert [t["name"] for t in json.loads(out)["targets"]] == ["rnn.weight_hh_l0"]
    assert_reproduces(tmp_path / "out.lr.safetensors", model)


# ----------------------------------------------------------------------------- 8. weight norm


def weight_normed() -> Net:
    """Both torch weight-norm APIs on a 2-layer GRU, with dim 0, None (scalar g) and 1."""
    model = net(layers=2)
    nn.utils.parametrizations.weight_norm(model.rnn, "weight_hh_l0")  # dim=0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old hook is deprecated, still in checkpoints
        nn.utils.weight_norm(model.rnn, "weight_ih_l0", dim=None)
        nn.utils.weight_norm(model.rnn, "weight_hh_l1", dim=1)
    with torch.no_grad():  # move g away from ||v|| so folding matters
        model.rnn.parametrizations.weight_hh_l0.original0.mul_(1.7)
        model.rnn.weight_ih_l0_g.mul_(0.6)
        model.rnn.weight_hh_l1_g.mul_(torch.linspace(0.5, 2, 4, dtype=torch.float64))
    return model


def test_weight_norm_folds_to_the_live_effective_weights():
    model = weight_normed()
    sd = model.state_dict()
    assert {"rnn.weight_ih_l0_g", "rnn.parametrizations.weight_hh_l0.original1"} <= set(sd)
    folded, names = fold_weight_norm(sd)
    assert sorted(names) == ["rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0"]
    model(X)  # the old hook recomputes its weight in a forward pre-hook
    for name in names:
        torch.testing.assert_close(folded[name], getattr(model.rnn, name.split(".")[1]), rtol=0, atol=1e-6)
    assert not any(k.endswith(("_g", "_v")) or "parametrizations" in k for k in folded)


def test_weight_normed_checkpoint_converts_and_reproduces_the_gru(run, tmp_path):
    model = weight_normed()
    torch.save(model.state_dict(), tmp_path / "wn.pt")
    out = tmp_path / "out.lr.safetensors"
    code, result, err = run("convert", tmp_path / "wn.pt", "--rank", "4", "--json", "--include-input",
                            "--rank-for", "rnn.weight_ih_l0=3", "-o", out)  # full rank of 4x3 blocks: 3
    assert code == 0, err
    notes = {t["name"]: t["note"] for t in json.loads(result)["targets"]}
    assert "weight norm folded" in notes["rnn.weight_hh_l1"] and "weight norm folded" in notes["rnn.weight_ih_l0"]
    assert "weight norm folded" not in notes["rnn.weight_ih_l1"]
    assert_reproduces(out, model)


def test_a_mismatched_weight_norm_pair_names_its_keys(tmp_path):
    torch.save({"rnn.weight_hh_l0_g": torch.ones(5), "rnn.weight_hh_l0_v": torch.ones(12, 4)}, tmp_path / "m.pt")
    with pytest.raises(lrc.FormatError, match=r"rnn\.weight_hh_l0_g \(5,\) with rnn\.weight_hh_l0_v \(12, 4\)"):
        read_checkpoint(tmp_path / "m.pt")


@pytest.mark.parametrize("zipped", [True, False])
def test_a_torch_file_named_safetensors_is_read_as_torch(run, tmp_path, zipped):
    """torch.load picks its reader by suffix; the kind here comes from the content."""
    model = net()
    torch.save(model.state_dict(), tmp_path / "model.safetensors", _use_new_zipfile_serialization=zipped)
    state, meta = read_checkpoint(tmp_path / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_reproduces(convert_full_rank(run, tmp_path / "model.safetensors"), model)


@pytest.mark.parametrize("command, message", [
    (("convert", "--rank", "2"), "error: . is a directory with no model weights (looked for model.safetensors"),
    (("inspect",), "error: . is a directory with no model weights (looked for model.safetensors"),
    (("merge",), "error: . has no model.safetensors (an incomplete save, or not a model directory)"),
    (("bench",), "error: . is a directory; give a model file")])
def test_a_directory_without_model_weights_is_one_line(run, tmp_path, monkeypatch, command, message):
    # Model directories (Hugging Face layout) are valid input; an empty one is refused in one line.
    monkeypatch.chdir(tmp_path)
    code, out, err = run(command[0], ".", *command[1:])
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.strip().startswith(message)
    assert list(tmp_path.iterdir()) == []
