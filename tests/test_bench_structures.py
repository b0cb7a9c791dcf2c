"""benchmarks/bench_structures.py: budget matching, conversion records and the table, on a tiny GRU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_structures as bs  # noqa: E402

FAMILIES = ["lowrank", "lrd", "kronecker:8x8", "kronecker:4x16", "kronecker:4x4x4", "tt:4x4x4", "tt:2x8x4",
            "tt-joint:4x4x4"]
TOL = 0.10  # the script's default: one LRD rank step of a 64 x 64 block is 3 * 128 values


@pytest.fixture(scope="module")
def gru():
    torch.manual_seed(0)
    return torch.nn.GRU(8, 64).double()


@pytest.fixture(scope="module")
def points(gru):
    return bs.plan(gru, FAMILIES, [4, 2], TOL)


def test_every_point_is_matched_within_tolerance(points):
    assert len(points) == 2 * len(FAMILIES)
    dense = 3 * 64 * 64
    for p in points:
        assert p["budget"] == round(dense / p["fraction"])
        assert p["matched"] and abs(p["recurrent_params"] / p["budget"] - 1) <= TOL, p


def test_a_point_beyond_the_tolerance_is_unmatched(gru):
    # 1/8 of 12,288 = 1,536; LRD costs 384 r + 192: r = 3 -> 1,344, r = 4 -> 1,728, both 12.5% off.
    (p,) = bs.plan(gru, ["lrd"], [8], TOL)
    assert not p["matched"] and p["options"]["rank"] == 3 and p["gap"] == pytest.approx(-0.125)
    (p,) = bs.plan(gru, ["lrd"], [8], 0.13)
    assert p["matched"]


def test_closed_forms_by_hand(points):
    byname = {(p["fraction"], p["family"]): p for p in points}
    # 1/4 of 12,288 = 3,072: low rank 3 * r * (64 + 64) -> r = 8 exactly; LRD + 3 * 64 -> r = 7 (2,880)
    # or 8 (3,264), equally far: the smaller wins. Kronecker 8x8: 3 * t * 128 -> t = 8.
    assert byname[4, "lowrank"]["options"]["rank"] == 8 and byname[4, "lowrank"]["recurrent_params"] == 3072
    assert byname[4, "lrd"]["options"]["rank"] == 7 and byname[4, "lrd"]["recurrent_params"] == 2880
    assert byname[4, "kronecker:8x8"]["options"]["terms"] == 8
    # TT 4x4x4 (p = 16 each), ranks (r1, r2): 48 (r1 + r1 r2 + r2) = 48 ((r1 + 1)(r2 + 1) - 1); 3,072 / 48
    # = 64 wants (r1 + 1)(r2 + 1) = 65 = 5 * 13, not near-uniform; (7, 7) -> 3,024 beats (7, 8) -> 3,408.
    assert byname[4, "tt:4x4x4"]["options"]["tt_ranks"] == [7, 7]
    assert byname[4, "tt:4x4x4"]["recurrent_params"] == 3024


def test_tt_ranks_are_near_uniform_and_capped(points):
    # every bond at r or r + 1 for one r, each capped at its bond's maximal rank
    for p in points:
        if p["family"].startswith("tt"):
            ranks, joint = p["options"]["tt_ranks"], p["options"]["joint"]
            modes = [(3, 1)] * joint + [(m, m) for m in map(int, p["family"].split(":")[1].split("x"))]
            sizes = [m * n for m, n in modes]
            caps = bs.tt_caps(sizes, [10**6] * len(ranks))
            assert any(all(rk in (min(r, c), min(r + 1, c)) for rk, c in zip(ranks, caps))
                       for r in range(1, max(caps) + 1)), p
            assert ranks == bs.tt_caps(sizes, ranks)
    assert bs.tt_caps([16, 16, 16], [99, 99]) == [16, 16]
    assert bs.tt_caps([3, 16, 16, 16], [99, 99, 99]) == [3, 48, 16]


def test_conversion_records_match_the_model(gru, points):
    for p in points[: len(FAMILIES)]:  # the 1/4 budget
        model, row = bs.convert(gru, p)  # raises when the report's count is not the closed form's
        W = gru.weight_hh_l0.detach()
        W_hat = bs._weight(model, "weight_hh_l0")
        assert row["recurrent_params"] == p["recurrent_params"]
        assert row["params"] == bs.lrc.count_params(gru) - W.numel() + p["recurrent_params"]
        assert row["rel_error"] == pytest.approx(((W - W_hat).norm() / W.norm()).item(), rel=1e-6)
        kept = torch.linalg.matrix_norm(W_hat.reshape(3, 64, 64), 2) / torch.linalg.matrix_norm(W.reshape(3, 64, 64), 2)
        assert row["top_singular_kept"] == pytest.approx(kept.tolist(), rel=1e-9)
        if p["family"] == "lowrank":  # Eckart-Young per gate block: the discarded singular values
            s = torch.linalg.svdvals(W.reshape(3, 64, 64))
            bound = (s[:, 8:] ** 2).sum().sqrt() / W.norm()
            assert row["rel_error"] == pytest.approx(bound.item(), rel=1e-9)
            assert row["top_singular_kept"] == pytest.approx([1.0] * 3, rel=1e-9)


def test_full_size_reproduces_the_dense_weight(gru):
    for spec in ("kronecker:8x8", "tt:4x4x4"):  # the largest size: 64 terms; full TT-ranks (16, 16)
        family = bs.Family.parse(spec)
        options, count = max(bs.candidates(family, 3, 64, 64), key=lambda c: c[1])
        point = {"family": spec, "options": options, "recurrent_params": count, "gates": 3}
        with pytest.warns(UserWarning, match="dense"):  # larger than dense: allowed, with a warning
            model, row = bs.convert(gru, point)
        assert row["rel_error"] < 1e-10


def test_table_orders_by_metric_and_marks_unmatched():
    base = {"params": 100, "recurrent_params": 40, "gap": 0.01, "matched": True, "budget": 40,
            "top_singular_kept": [1.0, 0.5], "rel_error": 0.5}
    summary = {"metric": "bpc", "params": 1000, "dense": {"test": {"bpc": 1.5}},
               "zero_recurrent": {"params": 600, "test": {"bpc": 6.0}},
               "recurrent": {"names": ["w"], "gates": 2, "rows": 10, "cols": 20},
               "points": [{**base, "fraction": 4, "family": "lowrank", "options": {"rank": 1},
                           "test": {"bpc": 2.5}, "increase": 1.0},
                          {**base, "fraction": 4, "family": "tt:4x5", "options": {"tt_ranks": [3]},
                           "test": {"bpc": 2.0}, "increase": 0.5},
                          {**base, "fraction": 2, "family": "kronecker:2x5", "options": {"terms": 2},
                           "matched": False, "gap": 0.3}]}
    lines = bs.table(summary).splitlines()
    assert "| 400 |" in lines[2] and "1.500" in lines[2]
    assert "W_hh = 0" in lines[3] and "| 600 |" in lines[3] and "6.000 (+4.500)" in lines[3]
    assert "1/2" in lines[4] and "unmatched" in lines[4]
    assert "TT 4x5" in lines[5] and "TT-ranks 3" in lines[5] and "2.000 (+0.500)" in lines[5]
    assert "low rank" in lines[6] and "rank 1" in lines[6] and "1.00/0.50" in lines[6]
    assert len(lines) == 7
    with pytest.raises(SystemExit, match="not lowrank"):
        bs.Family.parse("kronecker")
