"""Recurrent cells (nn.GRUCell / nn.LSTMCell / nn.RNNCell): conversion, files, CLI, training, acceleration.

References are the dense cells themselves (float32 outputs, or the float64 chain rule for
gradients); every case is small and built here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lrcompress as lrc
from lrcompress.config import CompressionConfig
from lrcompress.errors import FormatError
from lrcompress.execution import WeightShape, acceleration, plan
from lrcompress.execution.cells import CellAcceleration
from lrcompress.execution.cost import estimate_cell
from lrcompress.nn import FactoredCell, LowRankGRUCell, LowRankLSTMCell, LowRankRNNCell
from lrcompress.targets import find_state_dict_targets

from conftest import assert_factor_gradients, relative_difference

INPUT, HIDDEN, BATCH = 5, 8, 3
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*is no smaller than dense")]
CELLS = {  # name -> (dense class, factored class, extra constructor arguments)
    "gru": (nn.GRUCell, LowRankGRUCell, {}),
    "lstm": (nn.LSTMCell, LowRankLSTMCell, {}),
    "rnn-tanh": (nn.RNNCell, LowRankRNNCell, {"nonlinearity": "tanh"}),
    "rnn-relu": (nn.RNNCell, LowRankRNNCell, {"nonlinearity": "relu"}),
}


def states(kind: str, batched: bool, given: bool, gen: torch.Generator):
    """An initial state for a cell of ``kind`` (None when not ``given``)."""
    if not given:
        return None
    shape = (BATCH, HIDDEN) if batched else (HIDDEN,)
    if kind == "lstm":
        return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen)


def calls(kind: str, gen: torch.Generator):
    """(input, hx) for every input form: batched or not, state given or None."""
    for batched in (True, False):
        x = torch.randn((BATCH, INPUT) if batched else (INPUT,), generator=gen)
        for given in (True, False):
            yield x, states(kind, batched, given, gen)


def outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def assert_close(got, want, rtol: float = 1e-5) -> None:
    got, want = outputs(got), outputs(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        error = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        assert error <= rtol, error


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_conversion_equals_dense_cell(kind, bias):
    dense_cls, _, extra = CELLS[kind]
    cell = dense_cls(INPUT, HIDDEN, bias=bias, **extra)
    dense = copy.deepcopy(cell)
    report = lrc.compress(cell, rank=1.0, diag=True, include_input=True)  # full rank
    assert isinstance(cell, dense_cls) and isinstance(cell, FactoredCell)
    assert {r.name for r in report.targets} == {"weight_hh", "weight_ih"}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for x, hx in calls(kind, gen):
            assert_close(cell(x, hx), dense(x, hx))
    lrc.merge(cell)
    assert type(cell) is dense_cls  # a plain cell again


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("diag,tied", [(False, False), (True, False), (False, True), (True, True)])
def test_accelerated_step_equals_parametrized_step(kind, diag, tied, monkeypatch):
    ran = []
    factored = CellAcceleration._factored
    monkeypatch.setattr(CellAcceleration, "_factored", lambda self, *a: ran.append(1) or factored(self, *a))
    _, cls, extra = CELLS[kind]
    torch.manual_seed(0)
    cell = cls(INPUT, HIDDEN, rank=3, diag=diag, tied=tied, **extra).eval()
    reference = copy.deepcopy(cell)
    lrc.accelerate(cell, "factored")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for x, hx in calls(kind, gen):
            assert_close(cell(x, hx), reference(x, hx))
    assert len(ran) == 4  # every call ran the factored step, none fell back


def test_factored_input_weight_and_inference_mode():
    torch.manual_seed(0)
    cell = LowRankLSTMCell(INPUT, HIDDEN, rank=2, diag=True, include_input=True).eval()
    reference = copy.deepcopy(cell)
    lrc.accelerate(cell, "factored")
    x, hx = torch.randn(BATCH, INPUT), (torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN))
    with torch.inference_mode():
        got = cell(x, hx)
    with torch.no_grad():
        assert_close(got, reference(x, hx))


def test_auto_uses_cached_dense_weight_when_dense_is_faster():
    torch.manual_seed(0)
    cell = LowRankGRUCell(INPUT, HIDDEN, rank=6, diag=True).eval()  # tiny: the cost model picks dense
    reference = copy.deepcopy(cell)
    lrc.accelerate(cell)
    x, h = torch.randn(BATCH, INPUT), torch.randn(BATCH, HIDDEN)
    with torch.no_grad():
        assert_close(cell(x, h), reference(x, h))
        acc = acceleration(cell)
        assert acc._choices == {(BATCH, torch.float32): "dense"}
        dense = acc._prepared.dense
        assert dense is not None
        cell(x, h)
        assert acc._prepared.dense is dense  # rebuilt once, not per call
        cell.parametrizations.weight_hh.original0.mul_(2)  # an in-place update invalidates the cache
        reference.parametrizations.weight_hh.original0.mul_(2)
        assert_close(cell(x, h), reference(x, h))
        assert acc._prepared.dense is not dense


def test_cost_model_picks_factored_for_decoder_sizes():
    def shapes(n: int, d: int, gates: int = 3) -> list[WeightShape]:
        return [WeightShape(gates, n, n // 4, recurrent=False), WeightShape(gates, n, n, d, diag=True)]

    for n in (512, 1024, 2048):
        for d in (n // 8, 64):
            assert estimate_cell(shapes(n, d), batch=1).choice == "factored", (n, d)
            assert estimate_cell(shapes(n, d, 4), batch=1).choice == "factored", (n, d)
    assert estimate_cell(shapes(64, 8), batch=1).choice == "dense"  # per-call overhead dominates
    assert estimate_cell(shapes(512, 448), batch=1).choice == "dense"  # rank near full


def test_autograd_falls_back_unless_training_is_forced():
    torch.manual_seed(0)
    cell = LowRankGRUCell(INPUT, HIDDEN, rank=3, diag=True, dtype=torch.float64)
    dense = lrc.merge(copy.deepcopy(cell))
    x, h = torch.randn(BATCH, INPUT, dtype=torch.float64), torch.randn(BATCH, HIDDEN, dtype=torch.float64)

    def loss(module: nn.Module) -> torch.Tensor:
        return module(x, h).square().sum()

    forced = lrc.accelerate(copy.deepcopy(cell), "factored", training=True)
    lrc.accelerate(cell, "factored")  # training mode and autograd: the parametrized path
    steps = []
    for module in (cell, forced):
        spied = acceleration(module)
        spied._factored = (lambda f, m: lambda *a: steps.append(m) or f(*a))(spied._factored, module)
    assert_factor_gradients(cell, dense, loss)
    assert steps == [] and acceleration(cell)._prepared is None
    dense.zero_grad()
    assert_factor_gradients(forced, dense, loss)  # the factored step's own gradients
    assert steps and all(m is forced for m in steps)
    # A trainable call keeps no preparation: the optimizer step that follows may not bump versions.
    assert acceleration(forced)._prepared is None


class Decoder(nn.Module):
    """A Tacotron-like decoder: prenet, an LSTM cell run one step per call, an output projection."""

    def __init__(self, frames: int = 6, hidden: int = HIDDEN):
        super().__init__()
        self.prenet = nn.Linear(frames, 4)
        self.cell = nn.LSTMCell(4, hidden)
        self.proj = nn.Linear(hidden, frames)

    def forward(self, start: torch.Tensor, steps: int = 4) -> torch.Tensor:
        frame, state, out = start, None, []
        for _ in range(steps):
            state = self.cell(torch.relu(self.prenet(frame)), state)
            frame = self.proj(state[0])
            out.append(frame)
        return torch.stack(out)


def test_cell_inside_a_decoder_is_found_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    decoder = Decoder().eval()
    dense = copy.deepcopy(decoder)
    start = torch.randn(2, 6)
    report = lrc.compress(decoder, rank=HIDDEN, diag=True)
    assert [r.name for r in report.targets] == ["cell.weight_hh"]
    assert isinstance(decoder.cell, nn.LSTMCell)
    with torch.no_grad():
        want = dense(start)
        assert relative_difference(decoder(start), want) < 1e-5
        path = lrc.save_model(decoder, tmp_path / "decoder.safetensors")
        loaded = lrc.load_model(Decoder().eval(), path)
        assert isinstance(loaded.cell, FactoredCell)
        assert relative_difference(loaded(start), want) < 1e-5
        assert relative_difference(lrc.accelerate(loaded, "factored")(start), want) < 1e-5
    with safe_open(str(path), framework="pt") as f:
        assert '"layer": "lstm", "role": "recurrent"' in f.metadata()["targets"]
    lrc.merge(loaded)
    assert type(loaded.cell) is nn.LSTMCell and acceleration(loaded.cell) is None
    assert [p.name for p in plan(decoder, batch=1, steps=4)] == ["cell"]


def test_bare_state_dict_cells_by_gate_count():
    tensors = {}
    for name, cls in (("a", nn.GRUCell), ("b.c", nn.LSTMCell), ("d", nn.RNNCell)):
        tensors.update({f"{name}.{k}": v for k, v in cls(INPUT, HIDDEN).state_dict().items()})
    found = find_state_dict_targets(tensors, CompressionConfig(rank=2, include_input=True))
    kinds = {c.name: (c.layer, c.role, c.gates, c.rows, c.cols) for c in found}
    assert kinds == {
        "a.weight_hh": ("gru", "recurrent", 3, HIDDEN, HIDDEN), "a.weight_ih": ("gru", "input", 3, HIDDEN, INPUT),
        "b.c.weight_hh": ("lstm", "recurrent", 4, HIDDEN, HIDDEN), "b.c.weight_ih": ("lstm", "input", 4, HIDDEN, INPUT),
        "d.weight_hh": ("rnn", "recurrent", 1, HIDDEN, HIDDEN), "d.weight_ih": ("rnn", "input", 1, HIDDEN, INPUT)}
    bad = {"x.weight_hh": torch.zeros(10, 5), "x.weight_ih": torch.zeros(10, 3)}
    with pytest.raises(FormatError, match="x.weight_hh of shape"):
        find_state_dict_targets(bad, CompressionConfig(rank=2))


def test_cli_converts_bare_state_dict_cells(tmp_path, run):
    torch.manual_seed(0)
    decoder = Decoder().eval()
    torch.save(decoder.state_dict(), tmp_path / "decoder.pt")
    code, out, err = run("inspect", tmp_path / "decoder.pt", "--json")
    assert code == 0, err
    assert {(m["name"], m["gate"]) for m in json.loads(out)["matrices"]} == {
        ("cell.weight_hh", g) for g in "ifgo"}
    code, out, err = run("convert", tmp_path / "decoder.pt", "--rank", HIDDEN, "--diag")
    assert code == 0, err
    loaded = lrc.load_model(Decoder().eval(), tmp_path / "decoder.lr.safetensors")
    start = torch.randn(2, 6)
    with torch.no_grad():
        assert relative_difference(loaded(start), decoder(start)) < 1e-5
        assert relative_difference(lrc.accelerate(loaded, "factored")(start), decoder(start)) < 1e-5


def test_low_rank_cells_from_scratch():
    torch.manual_seed(0)
    cell = LowRankGRUCell(INPUT, 64, rank=4, diag=True, tied=True, bias=False)
    assert isinstance(cell, nn.GRUCell) and cell.bias_ih is None
    L = cell.parametrizations.weight_hh.original0
    assert L.shape == (3, 64, 4) and cell.parametrizations.weight_hh.original1.shape == (4, 64)
    # The product, not each factor, has the spread of nn.GRUCell's U(-1/8, 1/8): std 1/(8 sqrt(3)).
    std = float(cell.weight_hh.detach().std())
    assert 0.5 / (8 * 3 ** 0.5) < std < 1.5 / (8 * 3 ** 0.5)
    cell.reset_parameters()
    assert 0.5 / (8 * 3 ** 0.5) < float(cell.weight_hh.detach().std()) < 1.5 / (8 * 3 ** 0.5)
    dense = lrc.merge(copy.deepcopy(LowRankRNNCell(INPUT, HIDDEN, rank=2, include_input=True)))
    assert type(dense) is nn.RNNCell


def test_unusual_input_falls_back_to_the_cells_own_forward():
    torch.manual_seed(0)
    cell = lrc.accelerate(LowRankGRUCell(INPUT, HIDDEN, rank=3).eval(), "factored")
    plain = nn.GRUCell(INPUT, HIDDEN)
    x = torch.randn(BATCH, INPUT)
    for bad in ((x, torch.zeros(1, HIDDEN)), (x.double(), None), (torch.randn(BATCH, INPUT + 1), None)):
        with pytest.raises(RuntimeError) as accelerated, torch.no_grad():
            cell(*bad)
        with pytest.raises(RuntimeError) as dense, torch.no_grad():
            plain(*bad)
        assert str(accelerated.value).split(",")[0] == str(dense.value).split(",")[0]  # nn's own message


def test_a_subclass_with_its_own_forward_is_left_to_it():
    class Scaled(nn.GRUCell):
        def forward(self, input, hx=None):
            return 2 * super().forward(input, hx)

    torch.manual_seed(0)
    cell = Scaled(INPUT, HIDDEN).eval()
    dense = copy.deepcopy(cell)
    lrc.compress(cell, rank=1.0)
    lrc.accelerate(cell, "factored")
    x = torch.randn(BATCH, INPUT)
    with torch.no_grad():
        assert_close(cell(x), dense(x))
    assert acceleration(cell) is None and isinstance(cell, Scaled)


def test_weights_made_under_inference_mode_are_reprepared_each_call():
    torch.manual_seed(0)
    with torch.inference_mode():  # parameters are inference tensors: no version counter
        cell = LowRankGRUCell(INPUT, HIDDEN, rank=3, diag=True).eval()
        reference = copy.deepcopy(cell)
        lrc.accelerate(cell, "factored")
        x = torch.randn(BATCH, INPUT)
        assert_close(cell(x), reference(x))
        for module in (cell, reference):  # an in-place change no key can see
            module.parametrizations.weight_hh.original1.mul_(3)
        assert_close(cell(x), reference(x))


def test_rank_overrides_tying_and_exclusion_apply_to_cells():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.GRUCell(INPUT, HIDDEN), nn.LSTMCell(INPUT, HIDDEN)

    torch.manual_seed(0)
    model = Two()
    report = lrc.compress(model, rank=4, tied=True, ranks={"b": 2}, exclude=["a.weight_ih"], include_input=True)
    got = {(r.name, r.rank, r.tied) for r in report.targets}
    assert got == {("a.weight_hh", 4, True), ("b.weight_hh", 2, True), ("b.weight_ih", 2, True)}
    assert model.b.parametrizations.weight_hh.original1.shape == (2, HIDDEN)  # one R shared by the 4 gates
