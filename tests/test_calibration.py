"""Calibration statistics against a brute-force reference.

The reference runs every sequence alone, one step at a time, with the gate equations written
out from the module's weights in float64, records each vector a weight multiplies, and averages
the outer products. The hooks instead recompute whole layers with PyTorch's fused kernels on the
packed (or padded) batch; both must give the same moments to ~1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from lrcompress.calibration import collect_second_moments
from lrcompress.errors import ConfigError, TargetError


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def step(m: nn.RNNBase, layer: int, s: str, x: Tensor, h: Tensor, c: Tensor | None):
    """One step of layer/direction ``layer``/``s``: (new h, new c, the pre-projection output)."""
    w = lambda k: getattr(m, f"{k}_l{layer}{s}")  # noqa: E731
    gi = w("weight_ih") @ x + w("bias_ih")
    gh = w("weight_hh") @ h + w("bias_hh")
    if m.mode == "GRU":
        (ri, zi, ni), (rh, zh, nh) = gi.chunk(3), gh.chunk(3)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        h = (1 - z) * torch.tanh(ni + r * nh) + z * h
        return h, None, None
    if m.mode == "RNN_TANH":
        return torch.tanh(gi + gh), None, None
    i, f, g, o = (gi + gh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    pre = torch.sigmoid(o) * torch.tanh(c)
    return (w("weight_hr") @ pre if m.proj_size else pre), c, pre


def brute_force(m: nn.RNNBase, seqs: list[Tensor], h0: Tensor, c0: Tensor | None = None) -> dict[str, Tensor]:
    """Moments from states recorded step by step, each sequence alone (``h0``: (layers*dirs, B, h))."""
    dirs = 2 if m.bidirectional else 1
    seen: dict[str, list[Tensor]] = {}
    for b, seq in enumerate(seqs):
        inp = seq
        for layer in range(m.num_layers):
            outs = []
            for d, s in enumerate(["", "_reverse"][:dirs]):
                k = layer * dirs + d
                h, c = h0[k, b], None if c0 is None else c0[k, b]
                out = [None] * len(inp)
                for t in (reversed(range(len(inp))) if d else range(len(inp))):
                    seen.setdefault(f"weight_ih_l{layer}{s}", []).append(inp[t])
                    seen.setdefault(f"weight_hh_l{layer}{s}", []).append(h)
                    h, c, pre = step(m, layer, s, inp[t], h, c)
                    if m.proj_size:
                        seen.setdefault(f"weight_hr_l{layer}{s}", []).append(pre)
                    out[t] = h
                outs.append(torch.stack(out))
            inp = torch.cat(outs, -1)
    return {name: (torch.stack(v).T @ torch.stack(v)) / len(v) for name, v in seen.items()}


def assert_moments(got, expected: dict[str, Tensor], prefix: str, counts: int) -> None:
    assert set(got) == {f"{prefix}.{n}" for n in expected}
    for name, C in expected.items():
        moment = got[f"{prefix}.{name}"]
        assert moment.C.dtype == torch.float64 and moment.count == counts
        torch.testing.assert_close(moment.C, C, rtol=0, atol=1e-10, msg=name)


class Wrapped(nn.Module):
    def __init__(self, rnn: nn.RNNBase, state):
        super().__init__()
        self.rnn, self.state = rnn, state

    def forward(self, x):
        return self.rnn(x, self.state)[0]


def names_of(m: nn.RNNBase, prefix: str = "rnn") -> list[str]:
    return [f"{prefix}.{n}" for n in m._flat_weights_names if n.startswith("weight")]


def test_bidirectional_two_layer_gru_batch_first_with_initial_state() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True, dropout=0.5).double()
    h0 = randn(4, 2, 5, seed=1)
    model = Wrapped(gru, h0).train()
    x = randn(2, 6, 3, seed=2)  # (B, T, in)
    got = collect_second_moments(model, x, names_of(gru))
    assert_moments(got, brute_force(gru, list(x), h0), "rnn", counts=12)
    assert model.training and gru.training  # modes restored; dropout was off (the reference has none)


def test_lstm_with_projection_on_packed_sequences_of_unequal_length() -> None:
    torch.manual_seed(1)
    lstm = nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4).double()
    lengths = [3, 7, 5]
    seqs = [randn(n, 3, seed=10 + i) for i, n in enumerate(lengths)]
    h0, c0 = randn(4, 3, 4, seed=3), randn(4, 3, 6, seed=4)
    packed = pack_padded_sequence(pad_sequence(seqs), torch.tensor(lengths), enforce_sorted=False)
    got = collect_second_moments(Wrapped(lstm, (h0, c0)), [packed], names_of(lstm))
    assert "rnn.weight_hr_l1_reverse" in got and got["rnn.weight_hr_l0"].C.shape == (6, 6)
    assert_moments(got, brute_force(lstm, seqs, h0, c0), "rnn", counts=sum(lengths))


def test_batches_pool_and_zero_initial_state_counts() -> None:
    torch.manual_seed(2)
    rnn = nn.RNN(4, 5).double()
    xs = [randn(6, 2, 4, seed=5), randn(3, 3, 4, seed=6)]  # (T, B, in), two batches
    loader = [(x, torch.zeros(1)) for x in xs]  # (inputs, targets): the targets are ignored
    got = collect_second_moments(Wrapped(rnn, None), loader, ["rnn.weight_hh_l0", "rnn.weight_ih_l0"])
    zeros = torch.zeros(1, 5, 5, dtype=torch.float64)
    parts = [brute_force(rnn, list(x.transpose(0, 1)), zeros) for x in xs]
    n = [12, 9]
    for name in ("weight_hh_l0", "weight_ih_l0"):
        pooled = (parts[0][name] * n[0] + parts[1][name] * n[1]) / sum(n)
        torch.testing.assert_close(got[f"rnn.{name}"].C, pooled, rtol=0, atol=1e-10)
    assert got["rnn.weight_hh_l0"].count == 21  # the zero initial states count as steps


def test_unbatched_input_and_only_the_first_layer_input() -> None:
    torch.manual_seed(3)
    gru = nn.GRU(3, 4, num_layers=2).double()
    x, h0 = randn(5, 3, seed=7), randn(2, 4, seed=8)
    got = collect_second_moments(Wrapped(gru, h0), x, ["rnn.weight_ih_l0", "rnn.weight_hh_l1"])
    ref = brute_force(gru, [x], h0.unsqueeze(1))
    torch.testing.assert_close(got["rnn.weight_ih_l0"].C, ref["weight_ih_l0"], rtol=0, atol=1e-10)
    torch.testing.assert_close(got["rnn.weight_hh_l1"].C, ref["weight_hh_l1"], rtol=0, atol=1e-10)


class Decoder(nn.Module):
    """A cell stepped in a loop, then a Linear head: dict batches, called as model(**batch)."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(3, 4).double(), nn.Linear(4, 2).double()

    def forward(self, x, h=None):
        state, outs = h, []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(self.head(state[0]))
        return torch.stack(outs)


def test_cell_in_a_loop_and_linear() -> None:
    torch.manual_seed(4)
    model = Decoder()
    x = randn(4, 2, 3, seed=9)
    got = collect_second_moments(model, {"x": x}, ["cell.weight_hh", "cell.weight_ih", "head.weight"])
    hs, h, c = [], torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        for t in range(4):
            hs.append(h)
            h, c = model.cell(x[t], (h, c))
        inputs = {"cell.weight_hh": torch.cat(hs), "cell.weight_ih": x.reshape(-1, 3),
                  "head.weight": torch.cat(hs[1:] + [h])}
    for name, v in inputs.items():
        torch.testing.assert_close(got[name].C, v.T @ v / len(v), rtol=0, atol=1e-12)
        torch.testing.assert_close(got[name].mean, v.mean(0), rtol=0, atol=1e-12)
        assert got[name].count == 8


def test_factored_layer_uses_its_factored_weights() -> None:
    from lrcompress.nn import LowRankGRU

    torch.manual_seed(5)
    gru = LowRankGRU(3, 6, rank=2, diag=True).double()
    x = randn(5, 2, 3, seed=11)
    before = {k: v.clone() for k, v in gru.state_dict().items()}
    got = collect_second_moments(Wrapped(gru, None), x, ["rnn.weight_hh_l0"])
    with torch.no_grad():
        ref = brute_force(gru, list(x.transpose(0, 1)), torch.zeros(1, 2, 6, dtype=torch.float64))
    torch.testing.assert_close(got["rnn.weight_hh_l0"].C, ref["weight_hh_l0"], rtol=0, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in gru.state_dict().items())


def test_bad_calls_are_refused_with_the_name() -> None:
    model = Wrapped(nn.GRU(3, 4), None)
    x = torch.randn(5, 2, 3)
    with pytest.raises(TargetError, match="rnn.weight_hh_l3"):
        collect_second_moments(model, x, ["rnn.weight_hh_l3"])
    with pytest.raises(TargetError, match="no module 'enc'"):
        collect_second_moments(model, x, ["enc.weight"])
    with pytest.raises(ConfigError, match="no batch"):
        collect_second_moments(model, [], ["rnn.weight_hh_l0"])
    with pytest.raises(ConfigError, match="forward="):
        collect_second_moments(model, [3], ["rnn.weight_hh_l0"])
    unused = nn.ModuleDict({"a": model, "b": nn.Linear(3, 3)})
    with pytest.raises(TargetError, match="never reached b.weight"):
        collect_second_moments(unused, x, ["b.weight"], forward=lambda m, b: m["a"](b))


def test_a_failing_forward_leaves_the_model_as_it_was() -> None:
    model = Wrapped(nn.GRU(3, 4), None).train()

    def broken(m, batch):
        m(batch)
        raise RuntimeError("user code failed")

    with pytest.raises(ConfigError, match=r"calibration batch 0: the model's call failed \(RuntimeError: user code failed\)") as raised:
        collect_second_moments(model, torch.randn(5, 2, 3), ["rnn.weight_hh_l0"], forward=broken)
    assert isinstance(raised.value.__cause__, RuntimeError)  # the user's error stays reachable
    assert model.training and model.rnn.training and not model.rnn._forward_hooks
    with torch.no_grad():
        model.rnn.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="rnn.weight_hh_l0 hold NaN"):
        collect_second_moments(model, torch.randn(5, 2, 3), ["rnn.weight_hh_l0"])
