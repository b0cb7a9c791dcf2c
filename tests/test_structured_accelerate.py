"""``accelerate`` on layers with Kronecker and tensor-train weights: the structured loop.

The reference is the same layer on the rebuilt-dense path (``W`` formed by the parametrization,
then PyTorch's kernel, or ``PaperGRU``'s loops): outputs and gradients must agree to 1e-10 in
float64, while the accelerated call never forms ``W`` (the parametrizations' ``forward`` is made
to raise while it runs).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lrcompress as lrc
from lrcompress.errors import ConfigError
from lrcompress.execution import acceleration, plan
from lrcompress.execution.structured import StructuredWeight, prepare, rebuild_macs
from lrcompress.nn.rnn import factored_class
from lrcompress.nn.structured import structured_rnn
from lrcompress.parametrizations import low_rank
from lrcompress.structured.kronecker import Kronecker, kronecker
from lrcompress.structured.orthogonal import scaled_cayley
from lrcompress.structured.tensor_train import TensorTrain, tensor_train
from lrcompress.train.models import PaperGRU, run_with_recurrent_dropout

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT, HIDDEN, STEPS, BATCH = 4, 8, 5, 3
LENGTHS = [5, 2, 4]  # unsorted: the packed path must restore the batch order
KINDS = {"gru": (nn.GRU, {}), "paper-gru": (PaperGRU, {}), "lstm": (nn.LSTM, {}),
         "rnn-relu": (nn.RNN, {"nonlinearity": "relu"})}
GATES = {"GRU": 3, "LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1}


def structure(module: nn.Module, name: str, how: str, gates: int) -> None:
    """Give ``module.<name>`` the structure ``how``, fitted to its weight (factor shapes follow
    the block shape, so a bidirectional layer's wider inputs work too)."""
    if how == "dense":
        return
    w = getattr(module, name)
    rows, cols = w.shape[0] // gates, w.shape[1]
    with warnings.catch_warnings():  # small blocks: structures larger than dense, capped ranks
        warnings.simplefilter("ignore")
        if how == "kron2":
            kronecker(module, name, factors=((2, cols // 2), (rows // 2, 2)), terms=2, gates=gates)
        elif how == "kron3":
            kronecker(module, name, factors=((2, 2), (2, cols // 4), (rows // 4, 2)), terms=2, gates=gates)
        elif how == "tt":
            tensor_train(module, name, ranks=3, shape=((2, cols // 2), (rows // 2, 2)), gates=gates)
        elif how == "tt-joint":
            tensor_train(module, name, ranks=3, shape=((2, cols // 2), (rows // 2, 2)), gates=gates, joint=True)
        elif how == "lowrank":
            low_rank(module, name, 2, gates=gates, diag=rows == cols)
        elif how == "orthogonal":
            scaled_cayley(module, name, gates=gates)
        else:
            raise AssertionError(how)


def build(kind: str, how: str, *, inputs: str | None = None, **options) -> nn.RNNBase:
    """A float64 layer of ``kind`` whose recurrent (and projection) weights have structure
    ``how`` and whose input weights have ``inputs`` (default: the same), as the converter makes it."""
    cls, extra = KINDS[kind]
    module = cls(INPUT, HIDDEN, dtype=torch.float64, **extra, **options).eval()
    module.__class__ = factored_class(type(module))  # what convert.apply does
    for name in module._flat_weights_names:
        if name.startswith("weight"):
            role = (inputs or how) if name.startswith("weight_ih") else how
            structure(module, name, role, 1 if name.startswith("weight_hr") else GATES[module.mode])
    return module


@contextlib.contextmanager
def no_dense_weight(monkeypatch):
    """While active, forming a Kronecker or TT weight raises."""
    def refuse(self, *originals):
        raise AssertionError(f"{type(self).__name__} formed its dense weight")

    with monkeypatch.context() as patch:
        patch.setattr(Kronecker, "forward", refuse)
        patch.setattr(TensorTrain, "forward", refuse)
        yield


def inputs(module: nn.RNNBase, form: str):
    """(input, initial state) in float64, requiring grad: ``padded`` (with a state), ``packed``
    (unsorted lengths, no state) or ``unbatched``."""
    directions = 2 if module.bidirectional else 1
    out = module.proj_size if getattr(module, "proj_size", 0) else HIDDEN
    stacks = module.num_layers * directions
    if form == "unbatched":
        return torch.randn(STEPS, INPUT, dtype=torch.float64, requires_grad=True), None
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64, requires_grad=True)
    if form == "packed":
        return pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False), None
    h0 = torch.randn(stacks, BATCH, out, dtype=torch.float64, requires_grad=True)
    if module.mode == "LSTM":
        return x, (h0, torch.randn(stacks, BATCH, HIDDEN, dtype=torch.float64, requires_grad=True))
    return x, h0


def outputs(result) -> list[torch.Tensor]:
    out, hidden = result
    out = out.data if isinstance(out, PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def run_and_grads(module: nn.Module, x, hx) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of ``module(x, hx)`` and the gradients of a fixed random function of them with
    respect to every parameter and every input that requires grad."""
    module.zero_grad(set_to_none=True)
    got = outputs(module(x, hx))
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in got)
    leaves = {n: p for n, p in module.named_parameters()}
    leaves["x"] = x.data if isinstance(x, PackedSequence) else x
    states = hx if isinstance(hx, tuple) else (hx,)
    leaves.update({f"h{i}": s for i, s in enumerate(states) if s is not None})
    names = [n for n, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return [t.detach() for t in got], dict(zip(names, grads))


def assert_same(got, want, tol: float = 1e-10) -> None:
    for a, b in zip(got, want, strict=True):
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def check_against_rebuilt(module: nn.RNNBase, form: str, monkeypatch, **accelerate) -> None:
    reference = copy.deepcopy(module)
    lrc.accelerate(module, "factored", **accelerate)
    x, hx = inputs(module, form)
    want, want_grads = run_and_grads(reference, x, hx)
    with no_dense_weight(monkeypatch):
        got, got_grads = run_and_grads(module, x, hx)
    assert acceleration(module).last[0] == "factored"
    assert_same(got, want)
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        assert got_grads[name] is not None, name
        assert_same([got_grads[name]], [grad])


# ------------------------------------------------------------------ equal to the rebuilt path


@pytest.mark.parametrize("how", ["kron2", "kron3", "tt", "tt-joint"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_outputs_and_gradients_equal_the_rebuilt_path(kind: str, how: str, form: str, monkeypatch) -> None:
    # Two bidirectional layers: the second layer's inputs are 2H wide (non-square factors).
    module = build(kind, how, num_layers=2, bidirectional=True)
    check_against_rebuilt(module, form, monkeypatch)


@pytest.mark.parametrize("how", ["kron2", "tt"])
def test_lstm_with_projection_and_unbatched_input(how: str, monkeypatch) -> None:
    module = build("lstm", how, proj_size=4)  # weight_hr (4 x 8) structured too
    assert isinstance(prepare(module, 0, 0).hr.dense, StructuredWeight)
    check_against_rebuilt(module, "unbatched", monkeypatch)


@pytest.mark.parametrize("kind", ["gru", "paper-gru"])
@pytest.mark.parametrize("recurrent,input_", [("lowrank", "kron2"), ("kron3", "lowrank"), ("orthogonal", "tt"),
                                              ("tt-joint", None)])
def test_mixed_structures_in_one_layer(kind: str, recurrent: str, input_: str | None, monkeypatch) -> None:
    # Low-rank ops run in the same plain loop; an orthogonal W is rebuilt (n x n anyway);
    # input_=None: the input weights stay dense.
    check_against_rebuilt(build(kind, recurrent, inputs=input_ or "dense"), "padded", monkeypatch)


def test_a_paper_gru_uses_block_slices_of_the_factors() -> None:
    # Eq. 6 multiplies r * h by the n block alone: the weight is cut into whole gate blocks,
    # each with its own factors (no product of all three blocks thrown away).
    for how in ("kron2", "tt", "tt-joint"):
        module = build("paper-gru", how)
        w = prepare(module, 0, 0).hh.dense
        part = w.narrow(1, 2 * HIDDEN, HIDDEN)
        assert part is w.narrow(1, 2 * HIDDEN, HIDDEN)  # made once, reused every step
        h = torch.randn(3, HIDDEN, dtype=torch.float64)
        with torch.no_grad():
            W = module.weight_hh_l0
            assert_same([torch.mm(h, part)], [h @ W[2 * HIDDEN:].t()])
            assert_same([torch.mm(h, w.narrow(1, 0, 2 * HIDDEN))], [h @ W[:2 * HIDDEN].t()])
        with pytest.raises(ConfigError, match="whole gate blocks"):
            w.narrow(1, 1, HIDDEN)


def test_the_stand_in_refuses_other_torch_functions() -> None:
    w = prepare(build("gru", "kron2"), 0, 0).hh.dense
    with pytest.raises(TypeError):
        torch.bmm(torch.zeros(1, 1, HIDDEN, dtype=torch.float64), w)


def test_cached_weights_follow_in_place_changes(monkeypatch) -> None:
    module = build("gru", "kron2")
    reference = copy.deepcopy(module)
    lrc.accelerate(module, "factored")
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    with torch.no_grad():
        module(x)  # prepares and caches the ops
        for m in (module, reference):
            m.parametrizations.weight_hh_l0.original0.mul_(1.5)
        with no_dense_weight(monkeypatch):
            got = outputs(module(x))
        assert_same(got, outputs(reference(x)))


def test_recurrent_dropout_scales_the_input_of_the_product(monkeypatch) -> None:
    # Gal's dropout multiplies W by diag(keep): the structured product runs on h * keep.
    module = build("gru", "kron2").train()
    reference = copy.deepcopy(module)
    lrc.accelerate(module, "factored", training=True)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    torch.manual_seed(3)
    want = outputs(run_with_recurrent_dropout(reference, x, None, 0.5))
    torch.manual_seed(3)
    with no_dense_weight(monkeypatch):
        got = outputs(run_with_recurrent_dropout(module, x, None, 0.5))
    assert acceleration(module).last[0] == "factored"
    assert_same(got, want)


# ------------------------------------------------------------------ cost model


def test_the_cost_model_sees_the_structured_product() -> None:
    module = build("gru", "kron2")
    shapes = plan(module, batch=2, steps=10)[0].shapes
    hh = shapes[1]
    p = module.parametrizations.weight_hh_l0[0]
    assert (hh.apply_macs, hh.params, hh.calls) == (p.apply_macs(1), p.parameter_count(), 2)
    assert hh.factored_macs() == p.apply_macs(1) and hh.recurrent and not shapes[0].recurrent
    # Two factors: the dense W is one (gates*terms) batch of outer products, rows*cols each.
    assert rebuild_macs(p) == 3 * 2 * HIDDEN * HIDDEN
    tt = build("gru", "tt").parametrizations.weight_hh_l0[0]  # cores (3,1,2,4,3), (3,3,4,2,1)
    assert rebuild_macs(tt) == 3 * (2 * 4 * 1 * 3 + HIDDEN * HIDDEN * 3 * 1)


def test_auto_picks_the_structured_loop_for_a_large_kronecker_weight_and_dense_for_a_tiny_one() -> None:
    torch.manual_seed(0)
    large = structured_rnn(nn.GRU, 8, 1024, structure="kronecker", kron_factors=(32, 32), terms=2).eval()
    tiny = structured_rnn(nn.GRU, 8, 16, structure="kronecker", kron_factors=(4, 4), terms=2).eval()
    (big,) = plan(large, batch=1, steps=50)
    (small,) = plan(tiny, batch=1, steps=50)
    assert big.choice == "factored" and big.estimate.speedup > 2
    assert small.choice == "dense"
    # At run time too: auto answers dense for the tiny layer, which then runs the rebuild.
    lrc.accelerate(tiny)
    with torch.no_grad():
        tiny(torch.randn(50, 1, 8))
    assert acceleration(tiny).last[0] == "dense"


def test_an_orthogonal_layer_keeps_the_dense_path() -> None:
    module = build("rnn-relu", "orthogonal", inputs="dense")
    (row,) = plan(module, batch=1, steps=50)
    assert row.choice == "dense" and not any(s.apply_macs for s in row.shapes)
    reference = copy.deepcopy(module)
    lrc.accelerate(module)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    with torch.no_grad():
        assert_same(outputs(module(x)), outputs(reference(x)))


# ------------------------------------------------------------------ lrcompress bench on a file


@pytest.mark.parametrize("options", [dict(structure="kronecker", kron_factors=(4, 4), terms=2),
                                     dict(structure="tt", tt_ranks=3, tt_shape=(4, 4)),
                                     dict(structure="orthogonal")], ids=["kronecker", "tt", "orthogonal"])
def test_bench_times_a_structured_file(run, tmp_path, options) -> None:
    from lrcompress.execution.timing import recurrent_layers
    from lrcompress.io import read_safetensors, specs_from_metadata

    model = nn.ModuleDict({"enc": nn.GRU(16, 16), "head": nn.Linear(16, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrc.compress(model, **options)
    path = lrc.save_model(model, tmp_path / "m.lr.safetensors")
    tensors, meta = read_safetensors(path)
    (layer,) = recurrent_layers(tensors, specs_from_metadata(meta)).values()
    x = torch.randn(6, 2, 16)
    with torch.no_grad():  # the standalone layer computes what the model's layer computes
        for a, b in zip(outputs(layer(x)), outputs(model["enc"](x))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    code, out, err = run("bench", path, "--seq", 4, "--rounds", 1)
    assert code == 0, err
    lines = out.splitlines()
    assert "dense ms" in lines[1] and "factored ms" in lines[1]
    (row,) = lines[2:]
    assert row.split()[0] == "enc" and row.split()[-1] in ("dense", "factored")


def test_auto_keeps_the_rebuild_for_training_a_structured_layer():
    """Kronecker/TT layers have no written-out backward: with autograd, ``auto`` keeps the
    rebuilt path (the eager loop's autograd is far slower), and says so; ``factored`` still forces it."""
    torch.manual_seed(0)
    gru = nn.GRU(4, 64, batch_first=True)
    lrc.compress(gru, structure="kronecker", kron_factors=(8, 8), terms=2)
    lrc.accelerate(gru, training=True)
    gru(torch.randn(2, 5, 4))[0].sum().backward()
    assert lrc.execution.acceleration(gru).last == ("dense", None)
    lrc.accelerate(gru, "factored", training=True)
    gru(torch.randn(2, 5, 4))[0].sum().backward()
    assert lrc.execution.acceleration(gru).last == ("factored", None)
