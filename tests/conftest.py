"""Shared helpers for the converter tests: small recurrent layers, their inputs, and checks.

>>> rnn = make_rnn("gru", num_layers=2)
>>> x, hx = make_inputs(rnn, packed=True, initial_state=True)
>>> len(run_rnn(rnn, x, hx))  # output, final h
2
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
GATES = {"gru": 3, "lstm": 4, "rnn": 1}
INPUT, HIDDEN, STEPS, BATCH = 4, 8, 5, 3
LENGTHS = [5, 2, 4]  # unsorted on purpose: packing must handle enforce_sorted=False

# The tests use tiny tensors, where handing work to a second thread costs ~100x the work itself
# on a busy 2-core machine; one thread keeps the suite fast and its timings steady.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module, whatever an earlier test left, restored afterwards.

    >>> pytestmark = pytest.mark.usefixtures("one_thread")  # at the top of a test module
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_rnn(kind: str, input_size: int = INPUT, hidden_size: int = HIDDEN, *,
             dtype: torch.dtype = torch.float32, **kwargs) -> nn.RNNBase:
    """A freshly initialised ``nn.GRU``/``nn.LSTM``/``nn.RNN`` (``kind``), in ``dtype``."""
    return RNN_CLASSES[kind](input_size, hidden_size, dtype=dtype, **kwargs)


def make_inputs(rnn: nn.RNNBase, *, packed: bool = False, initial_state: bool = False,
                steps: int = STEPS, batch: int = BATCH) -> tuple[Tensor | PackedSequence, object]:
    """A random input for ``rnn`` (padded then packed if ``packed``) and an initial state or None."""
    dtype = rnn.weight_ih_l0.dtype
    shape = (batch, steps, rnn.input_size) if rnn.batch_first else (steps, batch, rnn.input_size)
    x = torch.randn(shape, dtype=dtype)
    if packed:
        x = pack_padded_sequence(x, torch.tensor(LENGTHS[:batch]), batch_first=rnn.batch_first, enforce_sorted=False)
    if not initial_state:
        return x, None
    directions = 2 if rnn.bidirectional else 1
    out_size = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    h0 = torch.randn(rnn.num_layers * directions, batch, out_size, dtype=dtype)
    if isinstance(rnn, nn.LSTM):
        return x, (h0, torch.randn(rnn.num_layers * directions, batch, rnn.hidden_size, dtype=dtype))
    return x, h0


def run_rnn(rnn: nn.Module, x, hx=None) -> list[Tensor]:
    """Every output of ``rnn(x, hx)`` as a flat list: the output (packed data), h, and c for an LSTM."""
    out, state = rnn(x, hx)
    if isinstance(out, PackedSequence):
        out = out.data
    return [out, *(state if isinstance(state, tuple) else (state,))]


def relative_difference(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def snapshot(model: nn.Module) -> dict:
    """What ``assert_unchanged`` compares: parameter values by name and every module's class."""
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "types": {k: type(m) for k, m in model.named_modules()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """The model has the same parameters, classes, and no parametrizations."""
    assert {k: type(m) for k, m in model.named_modules()} == before["types"]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    for k, v in before["params"].items():  # NaN == NaN here: a rejected NaN weight is still "unchanged"
        torch.testing.assert_close(params[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


def factored_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{dotted weight name: (module, weight name)}`` for every weight carrying a parametrization."""
    found = {}
    for path, module in model.named_modules():
        for weight in getattr(module, "parametrizations", {}):
            found[f"{path}.{weight}" if path else weight] = (module, weight)
    return found


def assert_factor_gradients(model: nn.Module, dense: nn.Module, loss: Callable[[nn.Module], Tensor]) -> None:
    """Every factor of ``model`` gets the chain-rule gradient of the same weight in ``dense``.

    ``dense`` must compute what ``model`` does with plain weights (a merged copy). With
    ``W_g = L_g R_g + diag(D_g)``: dL_g = dW_g R_g^T, dR_g = L_g^T dW_g (summed over g when R is
    shared), dD_g = diag(dW_g). Gradients that never reach the factors (pytorch/pytorch#65688)
    leave ``.grad`` None or zero.
    """
    loss(model).backward()
    loss(dense).backward()
    weights = factored_weights(model)
    assert weights, "no factored weights"
    for name, (module, weight) in weights.items():
        plist = module.parametrizations[weight]
        factorization = plist[0]
        gW = dense.get_parameter(name).grad
        assert gW is not None and gW.abs().sum() > 0, name
        gW = gW.reshape(factorization.gates, -1, gW.shape[-1])
        L, R = plist.original0, plist.original1
        dR = L.detach().mT @ gW
        expected = {"original0": gW @ R.detach().mT, "original1": dR.sum(0) if R.dim() == 2 else dR}
        if factorization.diag:
            expected["original2"] = torch.diagonal(gW, dim1=-2, dim2=-1)
        assert {n for n, _ in plist.named_parameters()} == set(expected), name
        for factor, grad in expected.items():
            actual = getattr(plist, factor).grad
            assert actual is not None and actual.abs().sum() > 0, f"{name}.{factor} got no gradient"
            torch.testing.assert_close(actual, grad, rtol=1e-7, atol=1e-10, msg=f"{name}.{factor}")


class HighwayLike(nn.Module):
    """A user-written highway layer: lrcompress finds its Linears only through name patterns."""

    def __init__(self, features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proposal = nn.Linear(features, features, dtype=dtype)
        self.gate = nn.Linear(features, features, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.sigmoid(self.gate(x))
        return torch.relu(self.proposal(x)) * t + x * (1 - t)


class Net(nn.Module):
    """Every kind of target, nested: a GRU two Sequentials deep, a Highway, a user highway, a head.

    Names: ``body.1.0`` (GRU, 2 layers, bidirectional), ``highway`` (``lrcompress.nn.Highway``),
    ``mix.proposal``/``mix.gate`` (user Linears), ``head``.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        from lrcompress.nn import Highway

        self.body = nn.Sequential(nn.Linear(INPUT, 5, dtype=dtype),
                                  nn.Sequential(nn.GRU(5, HIDDEN, num_layers=2, bidirectional=True, dtype=dtype)))
        self.highway = Highway(2 * HIDDEN, dtype=dtype)
        self.mix = HighwayLike(2 * HIDDEN, dtype=dtype)
        self.head = nn.Linear(2 * HIDDEN, 3, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.body[1][0](self.body[0](x))
        return self.head(self.mix(self.highway(h)))

    def example_input(self) -> Tensor:
        return torch.randn(STEPS, BATCH, INPUT, dtype=self.head.weight.dtype)


@pytest.fixture
def run(monkeypatch, capsys):
    """``run("convert", path, "--rank", 4)`` -> Run(exit code, stdout, stderr), via ``cli.main``."""
    from cli_runner import invoke

    monkeypatch.setenv("COLUMNS", "200")  # tables and help unwrapped
    return lambda *args: invoke(monkeypatch, capsys, *args)


# The project's shared data folder (MNIST, PTB), when the checkout sits beside one.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def data_env(monkeypatch):
    """Point LRCOMPRESS_DATA at the shared data when it is not set; None when there is none."""
    if os.environ.get("LRCOMPRESS_DATA"):
        return os.environ["LRCOMPRESS_DATA"]
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("LRCOMPRESS_DATA", str(SHARED_DATA))
        return str(SHARED_DATA)
    return None


CHAR_LM_RECIPE = """
[task]
name = "text"
text_file = "{text}"
seq_len = 20
valid_fraction = 0.1
test_fraction = 0.1

[model]
cell = "gru"
hidden_size = 16

[train]
optimizer = "adam"
lr = 0.01
batch_size = 4
steps = {steps}
eval_every = {steps}
device = "cpu"
"""


def train_char_lm(root: Path, steps: int) -> Path:
    """A tiny character LM (GRU, 16 units, on a repeated sentence) trained through the
    ``lrcompress train`` command into ``root/run``; returns that run directory."""
    from typer.testing import CliRunner

    from lrcompress.cli import app

    (root / "t.txt").write_text("the cat sat on the mat. " * 60)
    (root / "lm.toml").write_text(CHAR_LM_RECIPE.format(text=root / "t.txt", steps=steps))
    result = CliRunner().invoke(app, ["train", str(root / "lm.toml"), "--out", str(root / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "run"


def addition_recipe(hidden_size: int, steps: int, eval_every: int, *, length: int = 6, train_size: int = 160,
                    eval_size: int = 48) -> str:
    """A small dense GRU recipe on the addition task, as ``lrcompress train`` reads it
    (validation and test sets of ``eval_size`` sequences each)."""
    return f"""
[task]
name = "addition"
length = {length}
train_size = {train_size}
valid_size = {eval_size}
test_size = {eval_size}

[model]
cell = "gru"
hidden_size = {hidden_size}
update_gate_bias = 4.0

[train]
optimizer = "adam"
lr = 0.01
batch_size = 16
steps = {steps}
eval_every = {eval_every}
clip = "norm"
device = "cpu"
"""
