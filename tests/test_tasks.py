"""Tasks: generators recomputed independently from their inputs, determinism, the MNIST and
PTB readers on tiny files written here, metrics against direct formulas, and the real data
files when present."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lrcompress.errors import ConfigError, FormatError
from lrcompress.train.tasks import IGNORE, MissingDataError, build_task, read_idx
from lrcompress.train.tasks_base import squared_hinge

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_data_dir() -> Path:
    root = Path(os.environ["LRCOMPRESS_DATA"]) if os.environ.get("LRCOMPRESS_DATA") else SHARED_DATA
    if not root.is_dir():
        pytest.skip(f"benchmark data not found (set LRCOMPRESS_DATA or provide {SHARED_DATA})")
    return root


def all_batches(task, split, batch_size, **kw):
    kw.setdefault("seed", 0)
    return list(task.batches(split, batch_size, **kw))


# -- copy task ---------------------------------------------------------------------------------

def decode_copy(x: torch.Tensor, lag: int, size: int):
    """Expected target of one copy example, recomputed from its one-hot input alone."""
    symbols = x.argmax(-1).tolist()
    assert torch.equal(x.sum(-1), torch.ones(len(symbols)))  # one-hot
    run = symbols.index(9)
    assert symbols.count(9) == 1
    data = []
    for s in symbols:
        if s >= 8:
            break
        data.append(s)
    L, g = len(data), run - len(data) + 1
    assert all(s == 8 for i, s in enumerate(symbols) if L <= i < run or i > run)
    target = [8] * len(symbols)
    target[run + 1:run + 1 + L] = data
    assert len(symbols) == lag + 2 * size
    return target, L, g


@pytest.mark.parametrize("variant", ["fixed", "variable_length", "variable_lag"])
def test_copy_targets_follow_from_inputs(variant):
    lag, size = 12, 10
    task = build_task({"name": "copy", "lag": lag, "variant": variant, "train_size": 64})
    batch = all_batches(task, "train", 64)[0]
    assert batch.x.shape == (64, lag + 20, 10) and batch.x.dtype == torch.float32
    assert batch.y.shape == (64, lag + 20) and batch.y.dtype == torch.int64
    lengths, gaps = set(), set()
    for x, y in zip(batch.x, batch.y):
        target, L, g = decode_copy(x, lag, size)
        assert y.tolist() == target
        lengths.add(L)
        gaps.add(g)
    if variant == "fixed":
        assert lengths == {10} and gaps == {lag}
    elif variant == "variable_length":
        assert gaps == {lag} and min(lengths) >= 1 and max(lengths) <= 10 and len(lengths) > 3
    else:
        assert lengths == {10} and min(gaps) >= 1 and max(gaps) <= lag and len(gaps) > 3


def test_copy_fixed_layout_matches_the_paper():
    # T = N + 20: 10 data symbols, N - 1 blanks, run, 10 blanks; target N + 10 blanks then the data.
    N = 7
    batch = all_batches(build_task({"name": "copy", "lag": N, "valid_size": 3}), "valid", 3)[0]
    x, y = batch.x[0].argmax(-1), batch.y[0]
    assert len(x) == N + 20
    assert (x[:10] < 8).all() and (x[10:10 + N - 1] == 8).all() and x[N + 9] == 9 and (x[N + 10:] == 8).all()
    assert (y[:N + 10] == 8).all() and torch.equal(y[N + 10:], x[:10])


def test_synthetic_sets_are_fixed_by_the_data_seed():
    spec = {"name": "copy", "lag": 5, "train_size": 30, "valid_size": 20}
    a, b = build_task(spec), build_task(spec)
    first = all_batches(a, "train", 8, seed=3, epoch=1)
    assert all(torch.equal(p.x, q.x) and torch.equal(p.y, q.y)
               for p, q in zip(first, all_batches(b, "train", 8, seed=3, epoch=1)))
    # Another epoch or training seed reorders the same 30 examples.
    other = all_batches(a, "train", 8, seed=4, epoch=1)
    rows = lambda bs: sorted(map(tuple, torch.cat([q.y for q in bs]).tolist()))  # noqa: E731
    assert rows(first) == rows(other)
    assert not torch.equal(torch.cat([q.y for q in first]), torch.cat([q.y for q in other]))
    # Example i does not depend on the batch size, and validation not on the training seed.
    v7 = torch.cat([q.x for q in all_batches(a, "valid", 7, seed=1, shuffle=False)])
    v13 = torch.cat([q.x for q in all_batches(a, "valid", 13, seed=2, shuffle=False)])
    assert torch.equal(v7, v13) and len(v7) == 20
    # A different data seed gives different data; valid and train differ.
    c = build_task({**spec, "seed": 1})
    assert not torch.equal(v7, torch.cat([q.x for q in all_batches(c, "valid", 7, shuffle=False)]))
    assert not torch.equal(v7[:8], all_batches(a, "train", 8, shuffle=False)[0].x)


def test_batches_are_a_dataloader_in_the_seeded_order():
    """batches() is a DataLoader over the split's Dataset; its order is the permutation drawn
    from (seed, epoch, split), recomputed here with numpy; the Dataset also serves a user's
    own DataLoader, whose (x, y) pairs fit() accepts."""
    from torch.utils.data import DataLoader

    from lrcompress.train import fit

    task = build_task({"name": "addition", "length": 6, "train_size": 10, "valid_size": 3, "test_size": 3})
    loader = task.batches("train", 4, seed=3, epoch=2)
    assert isinstance(loader, DataLoader) and len(loader) == 3
    order = np.random.default_rng([3, 2, 1]).permutation(10)  # split code 1: train
    data = task.dataset("train")
    expected = torch.stack([data[int(i)][0] for i in order])
    assert torch.equal(torch.cat([b.x for b in loader]), expected)
    assert torch.equal(torch.cat([b.x for b in loader]), expected)  # re-iterable: the same pass again
    state = torch.get_rng_state()
    list(task.batches("train", 4, seed=3, epoch=2))
    assert torch.equal(torch.get_rng_state(), state)  # reading data leaves dropout's random draws alone
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    result = fit(model, DataLoader(data, batch_size=5, shuffle=True), torch.nn.functional.mse_loss,
                 recipe={"epochs": 2}, progress=False)
    assert result.steps == 4 and math.isfinite(result.best["loss"])


def test_endless_stream():
    task = build_task({"name": "addition", "length": 10, "train_size": 0, "steps_per_epoch": 3})
    assert task.steps_per_epoch(4) == 3 and task.num_examples("train") == 0
    e0, e1 = all_batches(task, "train", 4, epoch=0), all_batches(task, "train", 4, epoch=1)
    assert len(e0) == 3 and all(b.x.shape == (4, 10, 2) for b in e0)
    assert not torch.equal(e0[0].x, e1[0].x)
    assert torch.equal(e0[0].x, all_batches(task, "train", 4, epoch=0)[0].x)


def test_copy_metrics():
    task = build_task({"name": "copy", "lag": 5, "valid_size": 10})
    batches = all_batches(task, "valid", 4, shuffle=False)
    perfect, uniform, half = {}, {}, {}
    for b in batches:
        good = torch.nn.functional.one_hot(b.y, 10).float() * 50.0
        wrong = good.clone()
        wrong[:, -1] = 0.0
        wrong[:, -1, 8] = 50.0  # last data step answered "blank": 1 of 10 data steps wrong
        for sums, logits in ((perfect, good), (uniform, torch.zeros_like(good)), (half, wrong)):
            for k, v in task.evaluate(logits, b).items():
                sums[k] = sums.get(k, 0.0) + v
    assert task.finalize(perfect)["accuracy"] == 1.0 and task.finalize(perfect)["ce"] < 1e-12
    assert task.finalize(uniform)["ce"] == pytest.approx(math.log(10), rel=1e-6)
    assert task.finalize(half)["accuracy"] == pytest.approx(0.9)
    assert task.finalize(half)["sequence_accuracy"] == 0.0
    assert float(task.loss(torch.zeros(*batches[0].y.shape, 10), batches[0])) == pytest.approx(math.log(10), rel=1e-6)


# -- addition task -----------------------------------------------------------------------------

def test_addition_targets_and_baseline():
    T = 21
    task = build_task({"name": "addition", "length": T, "valid_size": 4000})
    batch = all_batches(task, "valid", 4000)[0]
    assert batch.x.shape == (4000, T, 2) and batch.y.shape == (4000, 1)
    values, markers = batch.x[..., 0].double(), batch.x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert (markers.sum(1) == 2).all() and ((markers == 0) | (markers == 1)).all()
    assert (markers[:, :T // 2].sum(1) == 1).all() and (markers[:, T // 2:].sum(1) == 1).all()
    expected = (values * markers.double()).sum(1, keepdim=True)
    assert torch.allclose(batch.y.double(), expected, atol=1e-6)
    # Always answering 1 scores the variance of a sum of two U(0, 1): 1/6.
    ones = torch.ones(4000, 1)
    mse = task.finalize(task.evaluate(ones, batch))["mse"]
    assert mse == pytest.approx(1 / 6, abs=0.01)
    assert float(task.loss(ones, batch)) == pytest.approx(mse, rel=1e-5)


# -- MNIST -------------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist"
    folder.mkdir()
    train_x, train_y = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    test_x, test_y = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    write_idx(folder / "train-images-idx3-ubyte.gz", train_x, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    write_idx(folder / "t10k-images-idx3-ubyte", test_x, gz=False)  # plain files work too
    write_idx(folder / "t10k-labels-idx1-ubyte", test_y, gz=False)
    return tmp_path, (train_x, train_y, test_x, test_y)


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "a.gz", array, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(FormatError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(FormatError, match="5 bytes"):
        read_idx(tmp_path / "short")


def test_mnist_splits_and_inputs(tiny_mnist):
    root, (train_x, train_y, test_x, test_y) = tiny_mnist
    task = build_task({"name": "mnist", "data_dir": str(root), "valid_size": 4})
    assert task.input_size == 1 and task.output_size == 10 and task.output == "last"
    train = all_batches(task, "train", 5, shuffle=False)
    valid = all_batches(task, "valid", 5, shuffle=False)
    test = all_batches(task, "test", 5, shuffle=False)
    assert [len(b) for b in train] == [5, 3] and len(valid[0]) == 4 and len(test[0]) == 5
    x = torch.cat([b.x for b in train])
    assert x.shape == (8, 784, 1)
    assert torch.allclose(x[..., 0], torch.from_numpy(train_x[:8].reshape(8, -1)).float() / 255)
    assert torch.equal(valid[0].y, torch.from_numpy(train_y[8:]))  # the last images validate
    assert torch.equal(test[0].y, torch.from_numpy(test_y))
    assert task.steps_per_epoch(5) == 2
    # Shuffled order: the same examples.
    shuffled = torch.cat([b.y for b in all_batches(task, "train", 5, seed=7)])
    assert sorted(shuffled.tolist()) == sorted(train_y[:8].tolist())

    permuted = build_task({"name": "mnist", "data_dir": str(root), "valid_size": 4, "permute": True,
                           "permutation_seed": 3})
    px = all_batches(permuted, "train", 8, shuffle=False)[0].x[..., 0]
    perm = torch.from_numpy(permuted.permutation)
    assert sorted(perm.tolist()) == list(range(784)) and not torch.equal(perm, torch.arange(784))
    assert torch.equal(px, x[..., 0][:, perm])
    again = build_task({"name": "mnist", "data_dir": str(root), "permute": True, "permutation_seed": 3,
                        "valid_size": 4})
    assert np.array_equal(again.permutation, permuted.permutation)

    flat = build_task({"name": "mnist", "data_dir": str(root), "valid_size": 4, "layout": "flat"})
    assert flat.input_size == 784 and not flat.sequential
    assert all_batches(flat, "test", 5)[0].x.shape == (5, 784)


def test_mnist_data_location(tiny_mnist, tmp_path, monkeypatch):
    root, _ = tiny_mnist
    monkeypatch.setenv("LRCOMPRESS_DATA", str(root))  # the variable, with a mnist/ subfolder
    assert len(all_batches(build_task({"name": "mnist", "valid_size": 4}), "test", 10)[0]) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LRCOMPRESS_DATA", str(empty))
    task = build_task({"name": "mnist"})  # building reads nothing
    with pytest.raises(MissingDataError, match="train-images-idx3-ubyte.*LRCOMPRESS_DATA"):
        all_batches(task, "train", 10)
    monkeypatch.delenv("LRCOMPRESS_DATA")
    with pytest.raises(MissingDataError, match="no data folder is set.*LRCOMPRESS_DATA"):
        all_batches(build_task({"name": "mnist"}), "test", 10)
    with pytest.raises(ConfigError):  # MissingDataError is a ConfigError (CLI: one line, exit 2)
        all_batches(build_task({"name": "mnist", "data_dir": str(empty)}), "test", 10)


def test_squared_hinge_and_classification_metrics():
    logits = torch.tensor([[2.0, -0.5, 0.3], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    expected = [max(0, 1 - 2.0) ** 2 + max(0, 1 - 0.5) ** 2 + max(0, 1 + 0.3) ** 2, 1 + 1 + 1]
    assert squared_hinge(logits, y).tolist() == pytest.approx(expected)
    task = build_task({"name": "mnist", "loss": "hinge2", "layout": "flat"})
    from lrcompress.train.tasks import Batch
    batch = Batch(torch.zeros(2, 784), y)
    logits10 = torch.zeros(2, 10)
    logits10[0, 0] = 3.0
    out = task.finalize(task.evaluate(logits10, batch))
    assert out["accuracy"] == 0.5 and out["hinge"] == pytest.approx((9 + 10) / 2)
    assert float(task.loss(logits10, batch)) == pytest.approx(out["hinge"])


def test_mnist_real_files():
    root = real_data_dir()
    task = build_task({"name": "mnist", "data_dir": str(root)})
    from lrcompress.train.tasks import read_mnist
    train_x, train_y = read_mnist("train", str(root))
    test_x, test_y = read_mnist("test", str(root))
    assert train_x.shape == (60000, 784) and test_x.shape == (10000, 784)
    assert np.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert task.steps_per_epoch(20) == 2750 and task.num_examples("valid") == 5000


# -- character-level PTB -----------------------------------------------------------------------

def write_char_file(path: Path, lines: list[str], *, gz: bool = False) -> None:
    # The simple-examples layout: every character, the newline included, followed by a space.
    text = "".join(" ".join(line.replace(" ", "_") + "\n") + " " for line in lines)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def tiny_ptb(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    train = ["the cat sat", "on the mat", "a dog", "cats and dogs sat on mats", "the end"]
    write_char_file(folder / "ptb.char.train.txt.gz", train, gz=True)
    write_char_file(folder / "ptb.char.valid.txt", ["the cat", "a mat on a dog"])
    write_char_file(folder / "ptb.char.test.txt", ["dogs sat"])
    return tmp_path, train


def test_ptb_vocabulary_and_streams(tiny_ptb):
    root, train = tiny_ptb
    task = build_task({"name": "ptb_char", "data_dir": str(root), "seq_len": 4})
    symbols = sorted(set("".join(train).replace(" ", "_")) | {"\n"})
    assert task.vocab.symbols == symbols and task.input_size == task.output_size == len(symbols)
    assert task.stateful and task.tokens and task.output == "sequence"
    ids = [task.vocab.ids[c] for line in train for c in line.replace(" ", "_") + "\n"]
    assert task.num_examples("train") == len(ids)
    B = 3
    windows = all_batches(task, "train", B, shuffle=False)
    per = len(ids) // B
    streams = torch.tensor(ids[:per * B]).view(B, per)
    assert torch.equal(torch.cat([w.x for w in windows], 1), streams[:, :-1])
    assert torch.equal(torch.cat([w.y for w in windows], 1), streams[:, 1:])
    assert all(w.x.shape[1] <= 4 for w in windows) and len(windows) == task.steps_per_epoch(B)
    # Shuffled epochs start at an offset below seq_len but keep the streams contiguous.
    shifted = all_batches(task, "train", B, seed=5, epoch=2)
    joined = torch.cat([w.x for w in shifted], 1)
    offset = per - 1 - joined.shape[1]
    assert 0 <= offset < 4 and torch.equal(joined, streams[:, offset:-1])


def test_ptb_sentences(tiny_ptb):
    root, _ = tiny_ptb
    task = build_task({"name": "ptb_char", "data_dir": str(root), "mode": "sentences"})
    assert not task.stateful
    eol = task.vocab.ids["\n"]
    lines = {tuple(line.tolist()) for line in task.lines("valid")}
    seen = set()
    for batch in all_batches(task, "valid", 2, seed=1):
        for x, y, n in zip(batch.x, batch.y, batch.lengths):
            n = int(n)
            assert x[0] == eol and torch.equal(x[1:n], y[:n - 1]) and (y[n:] == IGNORE).all()
            assert y[n - 1] == eol
            seen.add(tuple(y[:n].tolist()))
    assert seen == lines


def test_ptb_metrics_and_errors(tiny_ptb, tmp_path):
    root, _ = tiny_ptb
    task = build_task({"name": "ptb_char", "data_dir": str(root), "mode": "sentences"})
    V = task.output_size
    sums = {}
    for batch in all_batches(task, "test", 4):
        for k, v in task.evaluate(torch.zeros(*batch.y.shape, V), batch).items():
            sums[k] = sums.get(k, 0.0) + v
    out = task.finalize(sums)
    assert sums["count"] == len("dogs_sat\n")
    assert out["bpc"] == pytest.approx(math.log2(V)) and out["ppl"] == pytest.approx(V)
    assert out["ce"] == pytest.approx(math.log(V))
    no_eol = build_task({"name": "ptb_char", "data_dir": str(root), "eol": False})
    assert no_eol.input_size == V - 1
    write_char_file(root / "ptb" / "ptb.char.test.txt", ["dogs sat!"])
    with pytest.raises(FormatError, match="'!'"):
        build_task({"name": "ptb_char", "data_dir": str(root)}).lines("test")
    with pytest.raises(MissingDataError, match="ptb.char.train.txt"):
        build_task({"name": "ptb_char", "data_dir": str(tmp_path / "nowhere")}).input_size


def test_ptb_real_files():
    root = real_data_dir()
    task = build_task({"name": "ptb_char", "data_dir": str(root)})
    assert [len(task.lines(s)) for s in ("train", "valid", "test")] == [42068, 3370, 3761]
    assert task.input_size == 50
    assert build_task({"name": "ptb_char", "data_dir": str(root), "eol": False}).input_size == 49


# -- building tasks ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"name": "sorting"}, "task.name must be one of"),
    ({}, "task.name must be one of"),
    ({"name": "copy", "lagg": 5}, "unknown key task.lagg"),
    ({"name": "copy", "lag": "long"}, "task.lag must be an int, got 'long'"),
    ({"name": "copy", "lag": 0}, r"task.lag must be in \[1"),
    ({"name": "copy", "variant": "random"}, "task.variant must be one of"),
    ({"name": "addition", "length": 1}, r"task.length must be in \[2"),
    ({"name": "addition", "valid_size": 0}, "task.valid_size"),
    ({"name": "mnist", "valid_size": 60000}, "task.valid_size"),
    ({"name": "mnist", "permute": 1}, "task.permute must be a bool, got 1"),
    ({"name": "ptb_char", "mode": "sentences", "eol": False}, "needs task.eol = true"),
])
def test_bad_task_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_task(spec)


def test_bad_split_and_batch_size():
    task = build_task({"name": "copy", "lag": 3, "train_size": 4})
    with pytest.raises(ConfigError, match="split must be one of"):
        next(task.batches("dev", 2, seed=0))
    with pytest.raises(ConfigError, match="batch_size must be a positive int, got 0"):
        next(task.batches("train", 0, seed=0))


def test_the_authors_pixel_permutation_replays_their_script(tiny_mnist):
    """``task.permutation = "lowrank-gru"``: the P of the authors' RNN_mnist.py, rebuilt here
    the way their script draws it (numpy's global generator, Python lists shuffled in place)."""
    root, (train_x, _, _, _) = tiny_mnist
    state = np.random.get_state()
    try:
        np.random.seed(1234)
        for size in (50_000, 10_000):  # their training and validation index shuffles
            np.random.shuffle(list(range(size)))
        theirs = np.random.permutation(784)
    finally:
        np.random.set_state(state)
    task = build_task({"name": "mnist", "data_dir": str(root), "valid_size": 4, "permute": True,
                       "permutation": "lowrank-gru"})
    assert np.array_equal(task.permutation, theirs)
    x = all_batches(task, "train", 8, shuffle=False)[0].x[..., 0]
    pixels = torch.from_numpy(train_x[:8].reshape(8, -1)).float() / 255
    assert torch.equal(x, pixels[:, torch.from_numpy(theirs)])  # step t reads pixel P[t]
    with pytest.raises(ConfigError, match="task.permute = true"):
        build_task({"name": "mnist", "data_dir": str(root), "permutation": "lowrank-gru"})
    with pytest.raises(ConfigError, match="permutation"):
        build_task({"name": "mnist", "data_dir": str(root), "permute": True, "permutation": "authors"})
