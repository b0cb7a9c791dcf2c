"""Scaled Cayley orthogonal weights (``lrcompress.structured.orthogonal``) and the scoRNN layer, in float64.

References are computed independently: the polar factor from the eigendecomposition of
``W^T W`` (``W (W^T W)^{-1/2}``), the Cayley transform with an explicit inverse, the paper's
closed-form gradient (Helfrich et al. 2018, Theorem 3.3) and a hand-written recurrence.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lrcompress.errors import ConfigError, WeightError
from lrcompress.nn.scornn import ScoRNN, modrelu, scornn_optimizer
from lrcompress.structured.orthogonal import (ScaledCayley, _elimination_signs, cayley_signs, polar_error, random_originals,
                                   scaled_cayley, skew)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(n: int, seed: int, det: int = 1) -> Tensor:
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64)).Q
    if torch.linalg.det(Q).sign() != det:
        Q[:, 0] = -Q[:, 0]
    return Q


def rotation_blocks(n: int, angles: list[float]) -> Tensor:
    """Block-diagonal 2x2 rotations (an odd n ends with a 1); angle pi gives eigenvalue -1 twice."""
    Q = torch.eye(n, dtype=F64)
    for i, t in enumerate(angles):
        c, s = math.cos(t), math.sin(t)
        Q[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, -s], [s, c]], dtype=F64)
    return Q


def householder(n: int, seed: int) -> Tensor:
    v = torch.randn(n, 1, generator=gen(seed), dtype=F64)
    return torch.eye(n, dtype=F64) - 2 * v @ v.T / (v.T @ v)


ORTHOGONAL = {
    "random det +1": lambda: random_orthogonal(10, 0, det=1),
    "random det -1": lambda: random_orthogonal(10, 1, det=-1),
    "random odd det -1": lambda: random_orthogonal(9, 2, det=-1),
    "minus identity": lambda: -torch.eye(7, dtype=F64),
    "identity": lambda: torch.eye(6, dtype=F64),
    "rotations by pi": lambda: rotation_blocks(8, [math.pi, 0.3, math.pi, 2.0]),
    "reflection (det -1)": lambda: householder(11, 3),
    "permutation": lambda: torch.eye(9, dtype=F64)[torch.randperm(9, generator=gen(4))],
    "1x1 of -1": lambda: -torch.ones(1, 1, dtype=F64),
}


def explicit_cayley(A: Tensor, d: Tensor) -> Tensor:
    """``(I + A)^{-1} (I - A) diag(d)`` with an explicit inverse."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    return torch.linalg.inv(eye + A) @ (eye - A) @ torch.diag_embed(d)


def reference_polar(W: Tensor) -> Tensor:
    """``W (W^T W)^{-1/2}`` from the eigendecomposition of ``W^T W`` (W of full rank)."""
    lam, V = torch.linalg.eigh(W.mT @ W)
    return W @ V @ torch.diag_embed(lam.rsqrt()) @ V.mT


def fitted(W: Tensor, gates: int = 1, **options) -> tuple[ScaledCayley, Tensor, Tensor]:
    n = W.shape[1]
    p = ScaledCayley(gates, n, n, **options).double()
    (a,) = p.fit(W)
    return p, a, p(a)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("case", list(ORTHOGONAL))
def test_an_orthogonal_matrix_is_recovered_exactly(case: str) -> None:
    Q = ORTHOGONAL[case]()
    n = Q.shape[0]
    p, a, W_hat = fitted(Q)
    assert a.shape == (1, n * (n - 1) // 2)
    assert torch.linalg.matrix_norm(W_hat - Q) < 1e-10
    assert torch.linalg.matrix_norm(W_hat.T @ W_hat - torch.eye(n, dtype=F64)) < 1e-10
    # the reported error is the polar distance, zero here
    assert float(polar_error(Q)) < 1e-12
    # the same from an explicit inverse, with the chosen signs
    torch.testing.assert_close(explicit_cayley(skew(a, n)[0], p.signs[0]), Q, rtol=0, atol=1e-10)


def test_gate_blocks_are_a_batch_each_with_its_own_signs() -> None:
    blocks = [random_orthogonal(12, 5, det=-1), -torch.eye(12, dtype=F64), rotation_blocks(12, [math.pi] * 6)]
    W = torch.cat(blocks)
    p, a, W_hat = fitted(W, gates=3)
    assert torch.linalg.matrix_norm(W_hat - W) < 1e-10
    for g in range(3):
        Wg = W_hat[12 * g:12 * (g + 1)]
        assert torch.linalg.matrix_norm(Wg.T @ Wg - torch.eye(12, dtype=F64)) < 1e-10
    counts = (p.signs < 0).sum(-1).tolist()
    assert counts[1] == 12  # -I needs D = -I (A = 0)
    assert p.options() == {"negatives": counts if len(set(counts)) > 1 else counts[0]}


def test_a_random_matrix_is_fitted_by_its_polar_factor_and_the_error_is_reported() -> None:
    gates, n = 3, 16
    W = torch.randn(gates * n, n, generator=gen(6), dtype=F64)
    W[n:2 * n] *= 5.0  # blocks of different scales
    p, a, W_hat = fitted(W, gates=gates)
    blocks, blocks_hat = W.reshape(gates, n, n), W_hat.reshape(gates, n, n)
    Q = reference_polar(blocks)
    torch.testing.assert_close(blocks_hat, Q, rtol=0, atol=1e-10)
    eye = torch.eye(n, dtype=F64)
    assert torch.linalg.matrix_norm(blocks_hat.mT @ blocks_hat - eye).max() < 1e-10
    errors = polar_error(W, gates)
    expected = torch.linalg.matrix_norm(blocks - Q) / torch.linalg.matrix_norm(blocks)
    torch.testing.assert_close(errors, expected, rtol=1e-10, atol=0)
    assert errors.min() > 0.1  # a random matrix is far from orthogonal: the report says so
    # no orthogonal matrix does better (polar factor optimality, against random orthogonal ones)
    for seed in range(5):
        R = random_orthogonal(n, 100 + seed)
        assert torch.linalg.matrix_norm(blocks[0] - R) > torch.linalg.matrix_norm(blocks[0] - blocks_hat[0])


def test_a_float32_weight_is_fitted_in_its_dtype() -> None:
    W = random_orthogonal(20, 7).float()
    p = ScaledCayley(1, 20, 20)
    (a,) = p.fit(W)
    assert a.dtype == torch.float32
    W_hat = p(a)
    assert W_hat.dtype == torch.float32 and torch.linalg.matrix_norm(W_hat - W) < 1e-5


# ---------------------------------------------------------------- the sign choice and A


@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (40, 2), (130, 3)])  # 130 spans three panels
def test_signs_make_i_plus_qd_invertible_and_a_small(n: int, seed: int) -> None:
    Q = random_orthogonal(n, seed, det=-1 if seed % 2 else 1)
    eye = torch.eye(n, dtype=F64)
    # elimination alone: every pivot 1 + |c_k| >= 1, so |det(I + QD)| >= 1
    d0 = _elimination_signs(Q.clone().unsqueeze(0))[0]
    det0 = torch.linalg.det(eye + Q * d0).abs()
    assert det0 >= 1 - 1e-9
    # unblocked reference: the same rule, one column at a time
    F, ref = Q.clone(), torch.empty(n, dtype=F64)
    for k in range(n):
        ref[k] = 1.0 if F[k, k] >= 0 else -1.0
        m = ref[k] * F[k + 1:, k] / (1 + F[k, k].abs())
        F[k + 1:, k + 1:] -= torch.outer(m, F[k, k + 1:])
    assert torch.equal(d0, ref)
    # after the pair flips: |det| only grew, every |a_jk| <= 1, D has det(Q)'s sign
    d = cayley_signs(Q)
    S = eye + Q * d
    assert torch.linalg.det(S).abs() >= det0 * (1 - 1e-9)
    A = torch.linalg.solve(S, eye - Q * d)
    assert A.abs().max() <= 1 + 1e-8
    assert torch.linalg.cond(S) <= math.sqrt(1 + (n - 1) ** 2)
    assert torch.prod(d) == torch.linalg.det(Q).sign()


def test_a_is_exactly_skew() -> None:
    n = 9
    a = torch.randn(2, n * (n - 1) // 2, generator=gen(8), dtype=F64)
    A = skew(a, n)
    assert torch.equal(A, -A.mT) and torch.equal(torch.diagonal(A, dim1=-2, dim2=-1), torch.zeros(2, n, dtype=F64))
    i, j = torch.triu_indices(n, n, 1)
    assert torch.equal(A[:, i, j], a)
    # the fitted A of a random weight: skew, with entries at most 1
    _, a_fit, _ = fitted(torch.randn(n, n, generator=gen(9), dtype=F64))
    A_fit = skew(a_fit, n)
    assert torch.equal(A_fit, -A_fit.mT) and A_fit.abs().max() <= 1 + 1e-8


# ---------------------------------------------------------------- training


def test_gradients_reach_a_and_equal_the_papers_closed_form() -> None:
    n = 8
    p = ScaledCayley(1, n, n, negatives=3).double()
    (a,) = random_originals(1, n, n, options={"negatives": 3}, dtype=F64)
    a = (a + 0.1 * torch.randn(a.shape, generator=gen(10), dtype=F64)).requires_grad_()
    target = torch.randn(n, n, generator=gen(11), dtype=F64)
    W = p(a)
    loss = ((W - target) ** 2).sum() + W.sum() ** 3
    loss.backward()
    assert a.grad is not None and a.grad.abs().max() > 0
    # Theorem 3.3: dL/dA = V^T - V, V = (I + A)^{-T} dL/dW (D + W^T)
    with torch.no_grad():
        G = 2 * (W - target) + 3 * W.sum() ** 2
        A, D, eye = skew(a.detach(), n)[0], torch.diag(p.signs[0]), torch.eye(n, dtype=F64)
        V = torch.linalg.solve((eye + A).T, G @ (D + W.T))
        i, j = torch.triu_indices(n, n, 1)
        torch.testing.assert_close(a.grad[0], (V.T - V)[i, j], rtol=1e-10, atol=1e-12)


def test_w_stays_orthogonal_after_optimiser_steps() -> None:
    torch.manual_seed(12)
    rnn = ScoRNN(3, 12, negatives=4, batch_first=True).double()
    head = nn.Linear(12, 2).double()
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = scornn_optimizer(model, lr=1e-2, lr_orthogonal=1e-2)
    x = torch.randn(5, 7, 3, dtype=F64)
    y = torch.randn(5, 2, dtype=F64)
    a0 = rnn.parametrizations.weight_hh_l0.original0.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        out, h = rnn(x)
        loss = ((head(h[0]) - y) ** 2).mean()
        loss.backward()
        opt.step()
    W = rnn.weight_hh_l0.detach()
    assert torch.linalg.matrix_norm(W.T @ W - torch.eye(12, dtype=F64)) < 1e-10
    assert (rnn.parametrizations.weight_hh_l0.original0 - a0).abs().max() > 1e-4
    assert torch.equal((rnn.parametrizations.weight_hh_l0[0].signs < 0).sum(), torch.tensor(4))


def test_scornn_optimizer_gives_a_its_own_learning_rate() -> None:
    model = nn.Sequential(ScoRNN(2, 6))
    opt = scornn_optimizer(model, lr=1e-3, lr_orthogonal=1e-4)
    assert isinstance(opt, torch.optim.RMSprop)
    rest, skew_group = opt.param_groups
    assert skew_group["lr"] == 1e-4 and rest["lr"] == 1e-3 and rest["alpha"] == 0.9
    assert skew_group["params"] == [model[0].parametrizations.weight_hh_l0.original0]
    assert len(rest["params"]) == 3  # V, its bias, the modReLU bias
    assert isinstance(scornn_optimizer(model, optimizer="adam"), torch.optim.Adam)
    with pytest.raises(ConfigError, match="no scaled Cayley weight"):
        scornn_optimizer(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="'lbfgs'"):
        scornn_optimizer(model, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="lr_orthogonal must be a positive number, got 0"):
        scornn_optimizer(model, lr_orthogonal=0)


# ---------------------------------------------------------------- the scoRNN layer


def hand_loop(rnn: ScoRNN, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence written out for one sequence ``x`` ``(L, input)``, ``h0`` ``(n,)``."""
    plist = rnn.parametrizations.weight_hh_l0
    n = rnn.hidden_size
    W = explicit_cayley(skew(plist.original0.detach(), n)[0], plist[0].signs[0].double())
    V, c, b = rnn.weight_ih_l0.detach(), rnn.bias_ih_l0.detach(), rnn.modrelu_bias_l0.detach()
    h, hs = h0.clone(), []
    for t in range(x.shape[0]):
        z = W @ h + V @ x[t] + c
        h = torch.tensor([math.copysign(max(abs(float(v)) + float(bi), 0.0), float(v)) if v != 0 else 0.0
                          for v, bi in zip(z, b)], dtype=F64)
        hs.append(h)
    return torch.stack(hs), h


def test_scornn_output_equals_a_hand_written_loop() -> None:
    torch.manual_seed(13)
    rnn = ScoRNN(4, 10, negatives=2, batch_first=True).double()
    with torch.no_grad():
        rnn.modrelu_bias_l0.uniform_(-0.3, 0.1)  # some units switched off
    x = torch.randn(3, 6, 4, dtype=F64)
    hx = torch.randn(1, 3, 10, dtype=F64)
    out, h_n = rnn(x, hx)
    assert out.shape == (3, 6, 10) and h_n.shape == (1, 3, 10)
    for i in range(3):
        ref_out, ref_h = hand_loop(rnn, x[i], hx[0, i])
        torch.testing.assert_close(out[i], ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[0, i], ref_h, rtol=1e-12, atol=1e-12)
    assert (out == 0).any()  # the modReLU bias did switch units off
    # unbatched input, zero initial state
    out1, h1 = rnn(x[1])
    ref_out, ref_h = hand_loop(rnn, x[1], torch.zeros(10, dtype=F64))
    torch.testing.assert_close(out1, ref_out, rtol=1e-12, atol=1e-12)
    assert h1.shape == (1, 10)


def test_scornn_starts_orthogonal_with_its_negatives_and_checks_shapes() -> None:
    rnn = ScoRNN(3, 20).double()
    W = rnn.weight_hh_l0.detach()
    assert torch.linalg.matrix_norm(W.T @ W - torch.eye(20, dtype=F64)) < 1e-12
    signs = rnn.parametrizations.weight_hh_l0[0].signs
    assert signs[0, -2:].tolist() == [-1.0, -1.0] and (signs[0, :-2] == 1).all()  # n // 10 = 2, last entries
    assert "parametrizations.weight_hh_l0.0.signs" in rnn.state_dict()
    with pytest.raises(ConfigError, match=r"\(2, 5, 4\)"):
        rnn(torch.zeros(2, 5, 4, dtype=F64))
    with pytest.raises(ConfigError, match=r"hx of shape \(2, 20\)"):
        rnn(torch.zeros(5, 2, 3, dtype=F64), torch.zeros(2, 20, dtype=F64))


def test_modrelu() -> None:
    z = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=F64)
    torch.testing.assert_close(modrelu(z, torch.full((5,), -1.0, dtype=F64)),
                               torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0], dtype=F64))


# ---------------------------------------------------------------- the structure contract


def test_check_rejects_non_square_blocks_naming_the_shape() -> None:
    with pytest.raises(ConfigError, match=r"square gate blocks, got 4 block\(s\) of 8x6"):
        ScaledCayley.check(4, 8, 6)
    lstm = nn.LSTM(3, 8, proj_size=6)  # weight_hh_l0 is 4 blocks of 8x6
    with pytest.raises(ConfigError, match="8x6"):
        scaled_cayley(lstm, "weight_hh_l0", gates=4)
    assert not parametrize.is_parametrized(lstm)
    with pytest.raises(ConfigError, match=r"negatives=9 is impossible for 1 block\(s\) of 8x8"):
        ScaledCayley.check(1, 8, 8, negatives=9)
    with pytest.raises(ConfigError, match="one count per gate"):
        ScaledCayley.check(3, 8, 8, negatives=[1, 2])
    with pytest.raises(TypeError):
        ScaledCayley.check(1, 8, 8, rank=3)
    assert ScaledCayley.check(3, 8, 8, negatives=[2, 2, 2]) == {"negatives": 2}
    assert ScaledCayley.check(3, 8, 8, negatives=(1, 2, 0)) == {"negatives": [1, 2, 0]}


def test_apply_equals_the_rebuilt_weight() -> None:
    p = ScaledCayley(3, 10, 10, negatives=[1, 4, 0]).double()
    (a,) = random_originals(3, 10, 10, options=p.options(), dtype=F64)
    a = a + 0.2 * torch.randn(a.shape, generator=gen(14), dtype=F64)
    x = torch.randn(2, 5, 10, generator=gen(15), dtype=F64)
    y = p.apply(x, a)
    assert y.shape == (2, 5, 30)
    torch.testing.assert_close(y, x @ p(a).T, rtol=1e-12, atol=1e-12)


def test_registered_weight_keeps_the_model_and_round_trips_through_options_and_state_dict() -> None:
    torch.manual_seed(16)
    gru = nn.GRU(4, 8).double()
    with torch.no_grad():  # orthogonal recurrent blocks: the conversion is exact
        gru.weight_hh_l0.copy_(torch.cat([random_orthogonal(8, 20 + g, det=(-1) ** g) for g in range(3)]))
    x = torch.randn(5, 2, 4, dtype=F64)
    dense_out, _ = gru(x)
    scaled_cayley(gru, "weight_hh_l0", gates=3)
    out, _ = gru(x)
    torch.testing.assert_close(out, dense_out, rtol=0, atol=1e-10)
    p = gru.parametrizations.weight_hh_l0[0]
    assert p.parameter_count() == gru.parametrizations.weight_hh_l0.original0.numel() == 3 * 28
    options = json.loads(json.dumps(p.options()))
    state = gru.state_dict()
    assert "parametrizations.weight_hh_l0.0.signs" in state
    # rebuild from options + state dict (as a file would)
    other = nn.GRU(4, 8).double()
    q = ScaledCayley(3, 8, 8, **options).double()
    q._pending = random_originals(3, 8, 8, options=options, dtype=F64)
    parametrize.register_parametrization(other, "weight_hh_l0", q)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x)[0], out, rtol=0, atol=0)
    assert q.options() == p.options()
    assert "negatives=" in repr(q)


def test_random_originals_give_scornn_rotations() -> None:
    torch.manual_seed(17)
    (a,) = random_originals(2, 9, 9, options={"negatives": None}, bound=0.1, dtype=F64)
    A = skew(a, 9)
    # 2x2 blocks on the diagonal only, s = -tan(t/2), t in (0, pi/2)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    for i in range(0, 8, 2):
        mask[i, i + 1] = mask[i + 1, i] = True
    assert torch.equal(A[:, ~mask], torch.zeros(2, int((~mask).sum()), dtype=F64))
    s = A[:, 0, 1]
    assert ((s < 0) & (s > -1)).all()  # tan(pi/4) = 1
    W = explicit_cayley(A, torch.ones(2, 9, dtype=F64))
    angles = torch.linalg.eigvals(W).angle().abs()
    assert angles.max() <= math.pi / 2 + 1e-12
    with torch.device("meta"):  # the file format's layout is computed on the meta device
        (m,) = random_originals(3, 8, 8, options={"negatives": 2}, bound=1.0)
    assert m.shape == (3, 28)


def test_the_fit_chooses_the_negatives_and_rejects_bad_weights() -> None:
    p = ScaledCayley(1, 6, 6, negatives=0).double()
    p.fit(-torch.eye(6, dtype=F64))  # -I is reachable only with D = -I
    assert p.options() == {"negatives": 6}
    with pytest.raises(WeightError, match="NaN or Inf"):
        p.fit(torch.full((6, 6), float("nan"), dtype=F64))
    with pytest.raises(ConfigError, match=r"\(6, 5\)"):
        p.fit(torch.zeros(6, 5, dtype=F64))
    with pytest.raises(ConfigError, match="already parametrized"):
        rnn = nn.RNN(2, 6)
        scaled_cayley(rnn, "weight_hh_l0")
        scaled_cayley(rnn, "weight_hh_l0")
    assert math.isinf(float(polar_error(torch.zeros(4, 4))))
