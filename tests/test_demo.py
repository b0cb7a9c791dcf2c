"""The README's main job, shortened: it trains, compresses with and without diagonal, reports."""

from lrcompress.demo import run_demo


def test_demo_reports_every_point_with_closed_form_params(tmp_path):
    lines = []
    rows = run_demo(tmp_path / "demo", steps=60, finetune_steps=20, ranks=(2, 4), echo=lines.append)
    assert [r["run"] for r in rows] == ["dense", "rank2", "rank2-diag", "rank4", "rank4-diag"]
    dense = rows[0]["params"]
    n = 32
    for r in rows[1:]:
        d = r["rank"]
        # The recurrent part 3n^2 becomes 3*2nd (+3n with the diagonal); nothing else changes.
        assert dense - r["params"] == 3 * n * n - (3 * 2 * n * d + (3 * n if r["diag"] else 0))
        assert r["dense"] == rows[0]["after"]
        assert r["before"] is not None and r["after"] is not None
    assert any("test mse" in line for line in lines)
