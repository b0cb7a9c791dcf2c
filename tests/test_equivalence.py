"""At full rank a converted layer computes what the dense layer did: outputs and final states.

Swept over the product of every ``nn.GRU``/``nn.LSTM``/``nn.RNN`` option that changes how the
weights are used (layers, directions, batch layout, bias, LSTM projections, packed input, initial
state), in float64 (1e-10 relative) and float32 (1e-5), plain, with a diagonal, and tied.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

import lrcompress as lrc
from lrcompress.nn import FactoredRNN

from conftest import GATES, HIDDEN, make_inputs, make_rnn, relative_difference, run_rnn

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Options fixed when a layer is built; packed input and initial state vary per call, inside a test.
LAYERS = [
    case for case in itertools.product(
        ("gru", "lstm", "rnn"),  # kind
        (1, 2, 3),  # num_layers
        (False, True),  # bidirectional
        (False, True),  # batch_first
        (False, True),  # bias
        (0, 3),  # proj_size
    ) if case[5] == 0 or case[0] == "lstm"
]
CALLS = list(itertools.product((False, True), (False, True)))  # (packed input, initial state given)


def layer_id(case: tuple) -> str:
    kind, layers, bidir, batch_first, bias, proj = case
    flags = [f"L{layers}", "bi" if bidir else "", "bf" if batch_first else "", "bias" if bias else "nobias",
             f"proj{proj}" if proj else ""]
    return "-".join([kind, *filter(None, flags)])


def compress_quietly(model: nn.Module, **options) -> lrc.Report:
    # Full rank is never smaller than dense, which lrcompress (rightly) warns about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lrc.compress(model, **options)


def assert_outputs_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float,
                         what: str) -> None:
    """Output, final h (and c) agree to ``tolerance`` relative."""
    assert len(actual) == len(expected), what
    for name, a, e in zip(("output", "h", "c"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: {name}"
        err = relative_difference(a, e)
        assert err <= tolerance, f"{what}: {name} differs by {err:.3g} relative"


def assert_equivalent(dense: nn.Module, converted: nn.Module, tolerance: float, what: str) -> None:
    """Same outputs and final states for every kind of call: packed or padded, with or without hx."""
    for packed, initial_state in CALLS:
        x, hx = make_inputs(dense, packed=packed, initial_state=initial_state)
        assert_outputs_close(run_rnn(converted, x, hx), run_rnn(dense, x, hx), tolerance,
                             f"{what}, packed={packed}, initial state={initial_state}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", LAYERS, ids=[layer_id(c) for c in LAYERS])
def test_full_rank_conversion_matches_dense(case: tuple, dtype: torch.dtype) -> None:
    kind, layers, bidir, batch_first, bias, proj = case
    extra = {"proj_size": proj} if proj else {}
    dense = make_rnn(kind, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias,
                     dtype=dtype, **extra)
    rows, cols = HIDDEN, proj or HIDDEN  # one gate block of weight_hh: hidden x (proj or hidden)
    full, tied_full = min(rows, cols), min(GATES[kind] * rows, cols)
    variants = {"plain": dict(rank=full), "diag": dict(rank=full, diag=True), "tied": dict(rank=tied_full, tied=True)}
    for variant, options in variants.items():
        converted = copy.deepcopy(dense)
        report = compress_quietly(converted, **options)
        assert len(report.targets) == layers * (2 if bidir else 1)
        assert isinstance(converted, type(dense)) and isinstance(converted, FactoredRNN)
        assert_equivalent(dense, converted, TOLERANCE[dtype], variant)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("diag,tied", [(False, False), (True, False), (False, True)], ids=["plain", "diag", "tied"])
def test_full_rank_with_input_and_projection_matches_dense(kind: str, dtype: torch.dtype, diag: bool,
                                                           tied: bool) -> None:
    # Blocks differ in shape (input 8x5 and 8x16, or 8x6 after an LSTM projection to 3; projection
    # 3x8): a fraction of 1.0 is full rank for each, and min(G*rows, cols) when tied.
    extra = {"proj_size": 3} if kind == "lstm" else {}
    dense = make_rnn(kind, input_size=5, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    converted = copy.deepcopy(dense)
    report = compress_quietly(converted, rank=1.0, diag=diag, tied=tied, include_input=True,
                              include_projection=True)
    roles = {t.role for t in report.targets}
    assert roles == ({"recurrent", "input", "projection"} if kind == "lstm" else {"recurrent", "input"})
    for t in report.targets:
        rows = t.shape[0] // t.gates
        expected = min(t.gates * rows, t.shape[1]) if t.tied else min(rows, t.shape[1])
        assert t.rank == expected, t.name
        assert t.tied == (tied and t.gates > 1)
    assert_equivalent(dense, converted, TOLERANCE[dtype], "input+projection")
