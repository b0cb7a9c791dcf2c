"""TT-matrix parametrization (lrcompress.structured.tensor_train): TT-SVD exactness and error bounds checked
against independent numpy SVDs of the unfoldings (Oseledets 2011, Theorem 2.2), core-by-core
``apply`` against ``x @ W.T``, gradients through ``register_parametrization``, options and errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lrcompress.errors import ConfigError, RankError
from lrcompress.structured.tensor_train import (TensorTrain, max_ranks, parse_ranks, parse_shape, random_originals,
                                     tensor_train, tt_dense)

FULL = 10 ** 6  # a rank above every bond's maximal rank: capped to full TT-rank

# (gates, rows, cols, shape, joint): square modes, non-square pairs, gate batches, the joint train
# with the automatic gate mode and with the stacked shape given explicitly.
CASES = [
    (1, 64, 64, (4, 4, 4), False),
    (1, 16, 12, ((2, 3), (4, 2), (2, 2)), False),
    (3, 16, 12, ((2, 3), (4, 2), (2, 2)), False),
    (3, 16, 16, (2, 4, 2), True),
    (2, 8, 6, ((4, 2), (4, 3)), True),
]


def full_tt(gates, rows, cols, shape, joint) -> TensorTrain:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cap to full TT-rank is the point here
        return TensorTrain(gates, rows, cols, ranks=FULL, shape=shape, joint=joint)


def unfolding_tails(W: np.ndarray, modes, ranks) -> list[float]:
    """Per bond k: the best rank-r_k error^2 of the k-th unfolding of the (m1 n1, ..., md nd) tensor of W.

    Independent of the fit: numpy SVDs of the ORIGINAL tensor's unfoldings, as in Theorem 2.2.
    """
    d = len(modes)
    T = W.reshape(*(m for m, _ in modes), *(n for _, n in modes))
    T = T.transpose(*(i for k in range(d) for i in (k, d + k)))
    sizes = [m * n for m, n in modes]
    tails = []
    for k, r in enumerate(ranks):
        s = np.linalg.svd(T.reshape(math.prod(sizes[:k + 1]), -1), compute_uv=False)
        tails.append(float((s[r:] ** 2).sum()))
    return tails


@pytest.mark.parametrize("gates, rows, cols, shape, joint", CASES)
def test_full_tt_rank_reproduces_any_matrix(gates, rows, cols, shape, joint):
    W = torch.randn(gates * rows, cols, dtype=torch.float64)
    tt = full_tt(gates, rows, cols, shape, joint)
    assert tt.ranks == tuple(max_ranks(tt.modes))
    cores, bound = tt.fit_with_bound(W)
    assert [tuple(c.shape) for c in cores] == tt.core_shapes()
    assert all(c.dtype == torch.float64 for c in cores)
    err = (tt(*cores) - W).norm() / W.norm()
    assert err < 1e-10 and bound < 1e-10 * W.norm()


def test_truncated_tt_svd_meets_its_bound():
    gates, rows, cols, modes, ranks = 3, 16, 16, ((2, 2), (4, 4), (2, 2)), [3, 2]
    W = torch.randn(gates * rows, cols, dtype=torch.float64)
    tt = TensorTrain(gates, rows, cols, ranks=ranks, shape=modes)
    cores, own_bound = tt.fit_with_bound(W)
    R = tt(*cores)
    total_tail = 0.0
    for g in range(gates):
        block = slice(g * rows, (g + 1) * rows)
        err = float((R[block] - W[block]).norm())
        tails = unfolding_tails(W[block].numpy(), modes, ranks)
        total_tail += sum(tails)
        # Theorem 2.2 upper bound; every unfolding of a TT of ranks r has rank <= r_k: lower bound.
        assert math.sqrt(max(tails)) - 1e-12 <= err <= math.sqrt(sum(tails)) + 1e-12
        assert err > 0.1 * math.sqrt(sum(tails)) > 0
    total_err = float((R - W).norm())
    # The fit's own bound (singular values it dropped) lies between its error and Theorem 2.2's.
    assert total_err - 1e-12 <= own_bound <= math.sqrt(total_tail) + 1e-12


def test_known_tt_ranks_recovered_exactly():
    # W built from random cores by an explicit einsum (not tt_dense): its TT-ranks are (2, 3, 2).
    modes, ranks = ((2, 3), (3, 2), (2, 2), (2, 3)), [2, 3, 2]
    r = [1, *ranks, 1]
    G = [torch.randn(r[k], m, n, r[k + 1], dtype=torch.float64) for k, (m, n) in enumerate(modes)]
    W = torch.einsum("aiAb,bjBc,ckCd,dlDe->ijklABCD", *G).reshape(2 * 3 * 2 * 2, 3 * 2 * 2 * 3)
    tt = TensorTrain(1, *W.shape, ranks=ranks, shape=modes)
    cores = tt.fit(W)
    assert (tt(*cores) - W).norm() / W.norm() < 1e-10
    # One less on any bond loses something: those are the TT-ranks, not just upper bounds.
    for k in range(3):
        lower = [ranks[j] - (j == k) for j in range(3)]
        low = TensorTrain(1, *W.shape, ranks=lower, shape=modes)
        assert (low(*low.fit(W)) - W).norm() / W.norm() > 1e-3


def test_rank_cap_warns_and_caps():
    with pytest.warns(UserWarning, match=r"bond 1 8 -> 4, bond 3 8 -> 4") as record:
        opts = TensorTrain.check(1, 16, 16, ranks=8, shape=(2, 2, 2, 2))
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert opts["ranks"] == [4, 8, 4]
    # A neighbour's rank caps a bond too: r_2 <= r_1 m_2 n_2 = 1 * 4.
    with pytest.warns(UserWarning, match=r"bond 2 16 -> 4"):
        assert TensorTrain.check(1, 16, 16, ranks=[1, 16, 4], shape=(2, 2, 2, 2))["ranks"] == [1, 4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ranks that fit: no note
        assert TensorTrain.check(1, 16, 16, ranks=[4, 16, 4], shape=(2, 2, 2, 2))["ranks"] == [4, 16, 4]


@pytest.mark.parametrize("gates, rows, cols, shape, joint", CASES)
def test_apply_equals_dense_product_without_forming_w(gates, rows, cols, shape, joint, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt = TensorTrain(gates, rows, cols, ranks=3, shape=shape, joint=joint)
    cores = random_originals(gates, rows, cols, options=tt.options(), bound=0.5, dtype=torch.float64)
    x = torch.randn(2, 5, cols, dtype=torch.float64)
    expected = x @ tt(*cores).T
    monkeypatch.setattr("lrcompress.structured.tensor_train.tt_dense", None)  # apply must not rebuild W
    y = tt.apply(x, *cores)
    assert y.shape == (2, 5, gates * rows)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gates, rows, cols, shape, joint", CASES)
def test_apply_macs_counts_the_matmuls(gates, rows, cols, shape, joint):
    from torch.utils.flop_counter import FlopCounterMode

    tt = TensorTrain(gates, rows, cols, ranks=2, shape=shape, joint=joint)
    cores = tuple(torch.randn(s) for s in tt.core_shapes())
    with FlopCounterMode(display=False) as counter:
        tt.apply(torch.randn(5, 7, cols), *cores)
    assert counter.get_total_flops() == 2 * tt.apply_macs(35)


@pytest.mark.parametrize("joint", [False, True])
def test_gradients_reach_every_core_and_weight_is_kept(joint):
    lin = nn.Linear(12, 3 * 16, dtype=torch.float64)
    x = torch.randn(7, 12, dtype=torch.float64)
    before = lin(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor_train(lin, "weight", ranks=FULL, shape=((2, 3), (4, 2), (2, 2)), gates=3, joint=joint)
    plist = lin.parametrizations.weight
    originals = [getattr(plist, f"original{i}") for i in range(len(plist[0].modes))]
    assert len(originals) == (4 if joint else 3)  # joint: the gate mode is a core of its own
    torch.testing.assert_close(lin(x), before, rtol=1e-10, atol=1e-10)  # fitted, not re-sampled
    lin(x).pow(2).sum().backward()
    for i, p in enumerate(originals):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"original{i} got no gradient"


def test_parameter_count_right_inverse_pending_and_dtype():
    tt = TensorTrain(3, 16, 16, ranks=[2, 3], shape=(2, 4, 2))
    W = torch.randn(48, 16)
    W0 = W.clone()
    cores = tt.fit(W)
    assert torch.equal(W, W0) and all(c.dtype == torch.float32 for c in cores)
    assert tt.parameter_count() == sum(c.numel() for c in cores) == 3 * (1 * 4 * 2 + 2 * 16 * 3 + 3 * 4 * 1)
    # Truncated float32 fit matches the float64 fit to float32 precision.
    cores64 = tt.fit(W.double())
    torch.testing.assert_close(tt(*cores).double(), tt(*cores64), rtol=1e-4, atol=1e-5)
    # Cores fitted ahead are taken once, then right_inverse fits again.
    given = tuple(torch.zeros(s) for s in tt.core_shapes())
    tt._pending = given
    assert all(torch.equal(a, b) for a, b in zip(tt.right_inverse(W), given))
    assert tt._pending is None and tt.right_inverse(W)[0].abs().sum() > 0


def test_random_originals_have_dense_init_scale():
    bound = 0.1
    opts = TensorTrain.check(1, 64, 64, ranks=4, shape=(4, 4, 4))
    stds = [float(tt_dense(random_originals(1, 64, 64, options=opts, bound=bound, dtype=torch.float64)).std())
            for _ in range(20)]
    assert abs(np.mean(stds) / (bound / math.sqrt(3)) - 1) < 0.25


def test_options_round_trip_through_json():
    with pytest.warns(UserWarning, match=r"shape 3x1,2x2,4x4,2x2: bond 3 8 -> 4$"):  # gate bond: no note
        opts = TensorTrain.check(3, 16, 16, ranks=8, shape="2x4x2", joint=True)
    assert opts == {"shape": [[3, 1], [2, 2], [4, 4], [2, 2]], "ranks": [3, 8, 4], "joint": True}
    with pytest.warns(UserWarning, match=r"bond 1 8 -> 3, bond 3 8 -> 4"):  # a bond the user named
        assert TensorTrain.check(3, 16, 16, ranks=[8, 8, 8], shape="2x4x2", joint=True) == opts
    loaded = json.loads(json.dumps(opts))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normalised options need no further cap
        tt = TensorTrain(3, 16, 16, **loaded)
    assert tt.options() == opts and TensorTrain.check(3, 16, 16, **tt.options()) == opts
    assert "shape=3x1,2x2,4x4,2x2" in repr(tt) and "ranks=[3, 8, 4]" in repr(tt) and "joint=True" in repr(tt)


def test_parsers():
    assert parse_shape("8x8x8x8") == (8, 8, 8, 8)
    assert parse_shape("4x2,8x8") == ((4, 2), (8, 8))
    assert parse_shape("3X1, 8, 8") == ((3, 1), (8, 8), (8, 8))
    assert parse_ranks("8") == 8 and parse_ranks("4,8,4") == (4, 8, 4)
    for junk in ("", "8x", "x8", "8*8", "4x2x1,8"):
        with pytest.raises(ConfigError, match="TT shape"):
            parse_shape(junk)
    with pytest.raises(ConfigError, match="TT-ranks '4;8'"):
        parse_ranks("4;8")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(ranks=2, shape=(4, 4)), ConfigError, ["4x4 is 16x16", "32x32", "1 block(s) of 32x32"]),
    (dict(ranks=2, shape=(4, 0, 2)), ConfigError, ["mode 0"]),
    (dict(ranks=2, shape=(32,)), ConfigError, ["1 mode(s)"]),
    (dict(ranks=2, shape="4by8"), ConfigError, ["'4by8'"]),
    (dict(ranks=[2, 2], shape=(4, 8)), ConfigError, ["[2, 2]", "1 ints", "32x32"]),
    (dict(ranks=0, shape=(4, 8)), RankError, ["TT-ranks 0", "32x32"]),
    (dict(ranks=2.5, shape=(4, 8)), ConfigError, ["TT-ranks 2.5"]),
    (dict(ranks=2, shape=(4, 8), joint="yes"), ConfigError, ["joint='yes'"]),
])
def test_check_errors_name_the_bad_value(kwargs, error, words):
    with pytest.raises(error) as info:
        TensorTrain.check(1, 32, 32, **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_stacked_shape_without_joint_hints_joint():
    with pytest.raises(ConfigError, match="use joint=True"):
        TensorTrain.check(3, 8, 8, ranks=2, shape=((6, 2), (4, 4)))


def test_verb_rejects_before_touching_the_module():
    lin = nn.Linear(16, 48)
    with pytest.raises(ConfigError, match=r"gates=5"):
        tensor_train(lin, ranks=2, shape=(4, 4), gates=5)
    with pytest.raises(ConfigError, match="bias is not a 2-D weight"):
        tensor_train(lin, "bias", ranks=2, shape=(4, 4))
    with pytest.raises(ConfigError, match="TT shape"):
        tensor_train(lin, ranks=2, shape=(4, 8), gates=3)
    assert not parametrize.is_parametrized(lin)
    tensor_train(lin, ranks=2, shape=(4, 4), gates=3)
    with pytest.raises(ConfigError, match="already parametrized"):
        tensor_train(lin, ranks=2, shape=(4, 4), gates=3)
