"""The factored execution path: same results as the dense rebuild, fall-backs, modes, cost model."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lrcompress as lrc
from lrcompress.errors import ConfigError, TargetError
from lrcompress.execution import WeightShape, dispatch, estimate, loops, plan
from lrcompress.nn import LowRankGRU, LowRankLSTM, LowRankRNN

INPUT, HIDDEN, PROJ, RANK = 5, 12, 7, 3
# Ranks near full on purpose (the cost model must pick dense), and oneDNN's note on projections.
pytestmark = [pytest.mark.filterwarnings("ignore:.*is no smaller than dense"),
              pytest.mark.filterwarnings("ignore:LSTM with projections")]
KINDS = {  # name -> (class, extra constructor arguments)
    "gru": (LowRankGRU, {}),
    "lstm": (LowRankLSTM, {}),
    "lstm-proj": (LowRankLSTM, {"proj_size": PROJ, "include_projection": True}),
    "rnn-tanh": (LowRankRNN, {"nonlinearity": "tanh"}),
    "rnn-relu": (LowRankRNN, {"nonlinearity": "relu"}),
}


def build(kind: str, *, seed: int = 0, **options) -> nn.RNNBase:
    torch.manual_seed(seed)
    cls, extra = KINDS[kind]
    return cls(INPUT, HIDDEN, rank=RANK, **extra, **options).eval()


def pair(module: nn.Module, mode: str = "factored", **options) -> tuple[nn.Module, nn.Module]:
    """(accelerated, reference): the reference keeps the dense-rebuild path."""
    reference = copy.deepcopy(module)
    return lrc.accelerate(module, mode, **options), reference


def flat(result) -> list[torch.Tensor]:
    out, hidden = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def assert_close(got, want, rtol: float = 1e-5) -> None:
    for a, b in zip(flat(got), flat(want), strict=True):
        assert a.shape == b.shape
        error = float((a - b).abs().max().detach() / b.abs().max().detach().clamp_min(1e-6))
        assert error <= rtol, error


def assert_equal(got, want) -> None:
    for a, b in zip(flat(got), flat(want), strict=True):
        assert torch.equal(a, b)


def inputs(module: nn.RNNBase, batch_first: bool, packed: bool, given_hx: bool, gen: torch.Generator):
    steps, batch = 6, 3
    x = torch.randn(steps, batch, INPUT, generator=gen)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    if packed:  # unsorted lengths, so the sorted/unsorted permutations are exercised
        x = pack_padded_sequence(x, torch.tensor([4, 6, 2]), batch_first=batch_first, enforce_sorted=False)
    if not given_hx:
        return x, None
    stacks = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size or module.hidden_size
    h = torch.randn(stacks, batch, out_size, generator=gen)
    if module.mode == "LSTM":
        return x, (h, torch.randn(stacks, batch, module.hidden_size, generator=gen))
    return x, h


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("diag,tied", [(False, False), (True, False), (False, True), (True, True)])
def test_factored_matches_dense_rebuild(kind, diag, tied):
    gen = torch.Generator().manual_seed(1)
    for layers, bidirectional, batch_first, bias in itertools.product((1, 2), (False, True), (False, True),
                                                                       (False, True)):
        module = build(kind, diag=diag, tied=tied, num_layers=layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias)
        fast, reference = pair(module)
        for packed, given_hx in itertools.product((False, True), (False, True)):
            x, hx = inputs(reference, batch_first, packed, given_hx, gen)
            with torch.no_grad():
                assert_close(fast(x, hx), reference(x, hx))


@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched_input(kind):
    fast, reference = pair(build(kind, diag=True, num_layers=2, bidirectional=True))
    x = torch.randn(5, INPUT)
    with torch.no_grad():
        assert_close(fast(x), reference(x))
        _, hidden = reference(x)
        assert_close(fast(x, hidden), reference(x, hidden))


def test_matches_float64_dense_module():
    # An independent reference: plain nn.LSTM in float64 with the merged (dense) weights.
    module = build("lstm-proj", diag=False, num_layers=2, bidirectional=True).double()
    dense = lrc.merge(copy.deepcopy(module))
    assert type(dense) is nn.LSTM
    lrc.accelerate(module, "factored")
    x = torch.randn(8, 2, INPUT, dtype=torch.float64)
    with torch.no_grad():
        assert_close(module(x), dense(x), rtol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch", [1, 3])
def test_streaming_in_chunks_matches_one_call(kind, batch):
    fast = lrc.accelerate(build(kind, diag=True, num_layers=2, batch_first=True), "factored")
    x = torch.randn(batch, 12, INPUT)
    with torch.no_grad():
        whole, final = fast(x)
        state, pieces = None, []
        for chunk in torch.split(x, [3, 1, 5, 3], dim=1):
            y, state = fast(chunk, state)
            pieces.append(y)
    assert_close((torch.cat(pieces, 1), state), (whole, final))


def test_converted_model_with_dense_weights_in_factored_layers():
    torch.manual_seed(3)
    model = nn.Sequential(nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=PROJ, bidirectional=True))
    # Input weights factored too, the second layer's recurrent weights left dense.
    lrc.compress(model, rank=RANK, include_input=True, exclude=["*weight_hh_l1*"])
    lstm = model[0]
    assert lrc.parametrizations.factorization(lstm, "weight_ih_l0") is not None
    assert lrc.parametrizations.factorization(lstm, "weight_hh_l1") is None
    fast, reference = pair(model.eval())
    x = torch.randn(7, 2, INPUT)
    with torch.no_grad():
        assert_close(fast[0](x), reference[0](x))


def test_loaded_model_accelerates(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.GRU(INPUT, HIDDEN, batch_first=True))
    lrc.compress(model, rank=RANK, diag=True, tied=True)
    path = lrc.save_model(model, tmp_path / "small.safetensors")
    loaded = lrc.load_model(nn.Sequential(nn.GRU(INPUT, HIDDEN, batch_first=True)), path).eval()
    lrc.accelerate(loaded, "factored")
    x = torch.randn(2, 9, INPUT)
    with torch.no_grad():
        assert_close(loaded[0](x), model.eval()[0](x))


def test_plain_python_loops_match_scripted(monkeypatch):
    module = build("gru", diag=True, num_layers=2, bidirectional=True)
    fast, reference = pair(module)
    x = torch.randn(6, 2, INPUT)
    with torch.no_grad():
        want = reference(x)
        scripted = fast(x)
        monkeypatch.setattr(loops, "scripted", lambda: loops.PLAIN)
        plain = fast(x)
    assert_close(scripted, want)
    assert_close(plain, want)


class Spy:
    """Counts calls of the factored forward."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = dispatch.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(dispatch, "forward", counted)


def test_mode_override_is_respected(monkeypatch):
    spy = Spy(monkeypatch)
    short = torch.randn(4, 1, 51)  # batch 1, 4 steps
    long = torch.randn(50, 64, 51)  # batch 64, 50 steps
    big = LowRankGRU(51, 1024, rank=16).eval()  # auto: factored (d << n)
    near_full = LowRankGRU(51, 128, rank=120).eval()  # auto: dense at batch 64 (d ~ n)
    with torch.no_grad():
        for module, x, mode, expected in [(big, short, "auto", 1), (near_full, long, "auto", 0),
                                          (near_full, long, "factored", 1), (big, short, "dense", 0)]:
            reference = lrc.accelerate(copy.deepcopy(module), "dense")  # the copy kept any earlier mode
            before = spy.calls
            lrc.accelerate(module, mode)
            result = module(x)
            assert spy.calls - before == expected, (mode, module.hidden_size)
            if expected:
                assert_close(result, reference(x))
            else:
                assert_equal(result, reference(x))


def test_dense_mode_removes_acceleration():
    module = lrc.accelerate(build("gru"), "factored")
    assert dispatch.acceleration(module) is not None
    lrc.accelerate(module, "dense")
    assert dispatch.acceleration(module) is None


def test_training_mode_uses_dense_path_unless_forced(monkeypatch):
    spy = Spy(monkeypatch)
    module = build("gru", diag=True, num_layers=2).train()
    fast, reference = pair(module)
    x = torch.randn(5, 2, INPUT)
    assert_equal(fast(x), reference(x))
    assert spy.calls == 0
    lrc.accelerate(fast, "factored", training=True)
    out, h = fast(x)
    assert spy.calls == 1
    # Differentiable: the gradients of every factor match the dense path's.
    ref_out, ref_h = reference(x)
    (out.square().sum() + h.sum()).backward()
    (ref_out.square().sum() + ref_h.sum()).backward()
    assert_close((out, h), (ref_out, ref_h))
    grads = dict(fast.named_parameters())
    for name, p in reference.named_parameters():
        assert grads[name].grad is not None
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6)


def test_falls_back_identically(monkeypatch):
    spy = Spy(monkeypatch)
    fast, reference = pair(build("lstm", diag=True))
    x = torch.randn(5, 2, INPUT)
    with torch.no_grad():
        # Wrong dtype: the dense path's own error.
        with pytest.raises(ValueError, match="dtype") as want:
            reference(x.double())
        with pytest.raises(ValueError, match="dtype") as got:
            fast(x.double())
        assert str(got.value) == str(want.value)
        # Wrong initial state shape and wrong input size: the dense path's errors.
        bad = (torch.zeros(1, 3, HIDDEN), torch.zeros(1, 3, HIDDEN))
        for args in [(x, bad), (torch.randn(5, 2, INPUT + 1), None)]:
            with pytest.raises(RuntimeError) as want:
                reference(*args)
            with pytest.raises(RuntimeError) as got:
                fast(*args)
            assert str(got.value) == str(want.value)
        # Autocast: left to the dense path, which knows its casting rules. Whether this CPU has
        # bfloat16 RNN kernels at all is probed, not assumed: without them (e.g. no AVX-512 BF16)
        # plain nn.LSTM raises under bf16 autocast, and the fast layer must raise the same.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                want = reference(x)
            except RuntimeError as exc:
                with pytest.raises(RuntimeError) as got:
                    fast(x)
                assert str(got.value) == str(exc)
            else:
                assert_equal(fast(x), want)
    assert spy.calls == 0


def test_cache_follows_weight_changes():
    fast, reference = pair(build("gru", diag=True))
    x = torch.randn(4, 1, INPUT)
    with torch.no_grad():
        fast(x)
        for module in (fast, reference):
            module.parametrizations.weight_hh_l0.original0.mul_(2)
            module.parametrizations.weight_hh_l0.original2.add_(0.5)
        assert_close(fast(x), reference(x))


def test_deepcopy_keeps_acceleration():
    fast = lrc.accelerate(build("gru"), "factored")
    with torch.no_grad():
        fast(torch.randn(3, 1, INPUT))
        clone = copy.deepcopy(fast)
    assert dispatch.acceleration(clone).mode == "factored"
    assert dispatch.acceleration(clone) is not dispatch.acceleration(fast)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="'fast'"):
        lrc.accelerate(build("gru"), "fast")
    with pytest.raises(TargetError, match="no factored recurrent layer"):
        lrc.accelerate(nn.Sequential(nn.GRU(4, 8)))


def test_cost_model_choices():
    big = WeightShape(3, 4096, 4096, 64, diag=True)
    assert estimate(big, batch=1, steps=50, device="cpu").choice == "factored"
    assert estimate(big, batch=1, steps=200, device="cuda").choice == "factored"
    # Rank near full: dense wins once the per-call rebuild is spread over enough work.
    near_full = WeightShape(3, 256, 256, 240)
    assert estimate(near_full, batch=64, steps=50, device="cpu").choice == "dense"
    assert estimate(near_full, batch=1, steps=500, device="cpu").choice == "dense"
    assert estimate(WeightShape(3, 1024, 1024, 1000), batch=64, steps=50, device="cpu").choice == "dense"
    # Streaming in short chunks: the rebuild at every call makes the factored loop win even so.
    assert estimate(near_full, batch=1, steps=2, device="cpu").choice == "factored"
    # The factored estimate grows with the rank, the dense one does not depend on it per step.
    low, high = (estimate(WeightShape(3, 1024, 1024, d), batch=8, steps=50) for d in (16, 256))
    assert low.factored < high.factored


def test_plan_reports_every_factored_layer():
    model = nn.Sequential(LowRankGRU(51, 1024, rank=64), nn.Linear(1024, 2), LowRankLSTM(4, 32, rank=30))
    rows = plan(model, batch=1, steps=50)
    assert [r.name for r in rows] == ["0", "2"]
    assert rows[0].choice == "factored"
    assert rows[1].choice == "dense"


def test_graph_cache_logic_with_a_cpu_stand_in(monkeypatch):
    # The CUDA-graph bookkeeping (static buffers, output copies, one capture per shape, invalidation
    # on weight changes) run on CPU with a stand-in capture that recomputes in place on replay.
    monkeypatch.setattr(dispatch.cuda, "usable", lambda x: True)
    captures = []

    def capture(fn, static_in):
        captures.append(tuple(t.shape for t in static_in))
        static_out = fn(*static_in)

        def replay():
            for buffer, value in zip(static_out, fn(*static_in)):
                if buffer is not None:
                    buffer.copy_(value)

        return replay, static_out

    fast, reference = pair(build("lstm-proj", diag=True, num_layers=2, batch_first=True))
    dispatch.acceleration(fast)._graphs.capture = capture
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x1, x2, x3 = (torch.randn(b, 6, INPUT, generator=gen) for b in (2, 2, 3))
        first = fast(x1)
        kept = [t.clone() for t in flat(first)]
        assert_close(fast(x2), reference(x2))
        assert len(captures) == 1  # same shapes: replayed
        assert all(torch.equal(a, b) for a, b in zip(flat(first), kept))  # outputs are copies
        assert_close(first, reference(x1))
        assert_close(fast(x3), reference(x3))
        assert len(captures) == 2
        state, pieces = None, []  # streaming: the carried state goes through the static buffers
        for chunk in torch.split(x2, 2, dim=1):
            y, state = fast(chunk, state)
            pieces.append(y)
        assert_close((torch.cat(pieces, 1), state), reference(x2))
        for module in (fast, reference):
            module.parametrizations.weight_hh_l1.original1.mul_(1.5)
        assert_close(fast(x1), reference(x1))  # weights changed: graphs dropped, captured again
        assert len(dispatch.acceleration(fast)._graphs) == 1
        packed = pack_padded_sequence(x3, torch.tensor([6, 3, 5]), batch_first=True, enforce_sorted=False)
        count = len(captures)
        assert_close(fast(packed), reference(packed))
        assert len(captures) == count  # PackedSequence runs the eager loop


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA-graph replay)")
def test_cuda_graph_replay_matches_dense(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a float32 reference
    module = build("lstm-proj", diag=True, num_layers=2, bidirectional=True).cuda()
    fast, reference = pair(module)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for batch in (1, 4, 1):  # a second shape, then a cache hit
            x = torch.randn(20, batch, INPUT, device="cuda")
            assert_close(fast(x), reference(x))
        assert len(dispatch.acceleration(fast)._graphs) == 2
        # Streaming replays the graph of the chunk's shape with the carried state.
        x = torch.randn(12, 1, INPUT, device="cuda")
        state, pieces = None, []
        for chunk in torch.split(x, 4):
            y, state = fast(chunk, state)
            pieces.append(y)
        assert_close((torch.cat(pieces), state), reference(x))
        # PackedSequence runs the eager factored loop on the GPU.
        x, hx = inputs(reference.cpu(), False, True, True, gen)
        reference.cuda()
        x, hx = x.to("cuda"), tuple(t.cuda() for t in hx)
        assert_close(fast(x, hx), reference(x, hx))


def test_threads_option_is_restored_after_each_call(monkeypatch):
    seen = []
    real = dispatch.forward
    monkeypatch.setattr(dispatch, "forward", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(4, 2, INPUT)
        for threads, expected in [(1, 1), ("auto", 1), (None, 2)]:  # "auto": tiny steps run on 1 thread
            fast, reference = pair(build("gru", diag=True), threads=threads)
            with torch.no_grad():
                assert_close(fast(x), reference(x))
            assert seen[-1] == expected
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ConfigError, match="threads"):
        lrc.accelerate(build("gru"), threads=0)


# --- lrcompress bench ---------------------------------------------------------------------------

def test_bench_synthetic_json(run):
    import json

    code, out, _ = run("bench", "--synthetic", "lstm:32:4:diag", "--input", 6, "--batch", 2,
                          "--seq", 5, "--rounds", 1, "--json")
    assert code == 0
    result = json.loads(out)
    (row,) = result["layers"]
    assert row["shape"] == "lstm 6->32 rank 4 +diag"
    assert (row["batch"], row["steps"], row["device"]) == (2, 5, "cpu")
    assert min(row["dense_ms"], row["rebuilt_ms"], row["factored_ms"]) > 0
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factored_ms"], rel=1e-2)
    assert row["auto"] in ("dense", "factored")


def test_bench_file_rebuilds_every_recurrent_layer(run, tmp_path):
    from lrcompress.execution.timing import recurrent_layers
    from lrcompress.io import read_safetensors, specs_from_metadata

    torch.manual_seed(5)
    model = nn.ModuleDict({"enc": nn.GRU(INPUT, HIDDEN, num_layers=2, bias=False),
                           "dec": nn.LSTM(HIDDEN, HIDDEN, proj_size=PROJ, bidirectional=True),
                           "head": nn.Linear(2 * PROJ, 3)})
    lrc.compress(model, rank=RANK, diag=True, include_input=True, exclude=["dec.weight_hh_l0_reverse"])
    path = lrc.save_model(model, tmp_path / "m.lr.safetensors")
    tensors, meta = read_safetensors(path)
    layers = recurrent_layers(tensors, specs_from_metadata(meta))
    assert sorted(layers) == ["dec", "enc"]
    x = torch.randn(6, 2, INPUT)
    with torch.no_grad():  # the standalone layers compute what the model's layers compute
        assert_equal(layers["enc"](x), model["enc"](x))
        y = torch.randn(6, 2, HIDDEN)
        assert_equal(layers["dec"](y), model["dec"](y))
    code, out, err = run("bench", path, "--seq", 4, "--rounds", 1)
    assert code == 0, err
    lines = out.splitlines()
    assert "dense ms" in lines[1] and "factored ms" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["dec", "enc"]


@pytest.mark.parametrize("args,message", [
    ((), "either a compressed file or --synthetic"),
    (("--synthetic", "gru:64"), "KIND:HIDDEN:RANK"),
    (("--synthetic", "gru:64:128"), "RANK <= HIDDEN"),
    (("--synthetic", "gru:64:8", "--seq", 0), "--seq must be a positive integer"),
    (("--synthetic", "gru:64:8", "--device", "tpu"), "--device"),
    (("missing.lr.safetensors",), "no such file"),
])
def test_bench_errors_are_one_line(run, args, message):
    code, out, err = run("bench", *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bench_rejects_dense_file(run, tmp_path):
    from safetensors.torch import save_file

    save_file({"weight_hh_l0": torch.zeros(24, 8)}, tmp_path / "dense.safetensors")
    code, _, err = run("bench", tmp_path / "dense.safetensors")
    assert code == 2 and "not an lrcompress file" in err
