"""docs/results.md against the stored summaries it cites (issue 12: every figure traceable).

Every table in docs/results.md (outside the converter section, which
tests/test_study_converter_ptb.py checks) and every code block of printed output carries a
marker comment naming its kind and its stored source in benchmarks/results/:

    <!-- table: main results-table.json -->            the summary table, rendered from its templates
    <!-- table: curve copy-50-cpu.json val_ce:.3g ... --> validation curve points of a run summary
    <!-- table: points copy-20-sweep.json ... -->       per-point figures of a conversion sweep
    <!-- table: finetune calibration-ptb-finetune.json --> fine-tuning curves of bench_calibration
    <!-- table: calibration calibration-text.json -->   bench_calibration.py table
    <!-- table: structures structures-ptb-gru-512.json --> bench_structures.py table
    <!-- block: lines demo-text-clean-clone.txt -->     every line of the block is a line of the file

Each table is re-derived from its file here (formatting the stored floats again) and compared
cell by cell, so a figure edited by hand, a table with no marker and a marker whose file is
missing all fail. No torch import: the file reads JSON and markdown only.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import summarize_run as sr  # noqa: E402  (benchmarks/ is not a package)

CONVERTER = "## The converter on real text (PTB, GRU n = 512)"  # another file's tests own it
MARKER = re.compile(r"^<!-- (table|block): (\S+) (\S+)(.*?) -->$")
NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?")  # 12,500  0.003  1e-3


# -- reading the doc ---------------------------------------------------------------------------

def doc_lines() -> list[str]:
    """docs/results.md without the converter section (from its heading to the next ``## ``)."""
    lines = DOC.read_text().splitlines()
    if CONVERTER in lines:
        start = lines.index(CONVERTER)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
    return lines


def parse(lines: list[str]) -> tuple[list[dict], list[int]]:
    """(marked items, line numbers of tables with no marker). An item: kind, name, file, args and
    the table's rows (lists of cells) or the code block's lines."""
    items, unmarked, pending, i = [], [], None, 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line.strip())
        if m:
            pending = {"what": m.group(1), "kind": m.group(2), "file": m.group(3), "args": m.group(4).split(),
                       "line": i + 1}
        elif line.startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            rows = [cells(row) for row in lines[start:i]]
            if pending and pending["what"] == "table":
                items.append({**pending, "rows": rows, "text": lines[start:i]})
            else:
                unmarked.append(start + 1)
            pending = None
            continue
        elif line.startswith("```"):
            start = i + 1
            i = start
            while not lines[i].startswith("```"):
                i += 1
            if pending and pending["what"] == "block":
                items.append({**pending, "lines": lines[start:i]})
            pending = None
        elif line.strip() and pending:
            pending = None  # a marker applies to the table or block right below it only
        i += 1
    return items, unmarked


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def plain(cell: str) -> str:
    return cell.replace("**", "").strip()


def load(name: str):
    return json.loads((RESULTS / name).read_text())


ITEMS, UNMARKED = parse(doc_lines())


def items(kind: str) -> list[dict]:
    return [it for it in ITEMS if it["kind"] == kind]


def test_every_table_is_marked_and_every_source_is_stored():
    assert not UNMARKED, f"tables with no source marker at lines {UNMARKED} of docs/results.md"
    assert items("main"), "the main table is missing"
    for it in ITEMS:
        assert (RESULTS / it["file"]).is_file(), f"line {it['line']}: {it['file']} is not stored"
    known = {"main", "curve", "points", "finetune", "calibration", "structures", "lines"}
    assert {it["kind"] for it in ITEMS} <= known


# -- the main table ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def main_table():
    (it,) = items("main")
    return it, load(it["file"])


def test_main_table_is_the_rendered_summary(main_table):
    it, table = main_table
    rendered = sr.render_table(table).splitlines()
    assert len(it["text"]) == len(rendered), "rows added to or removed from the doc's main table"
    for doc_row, row in zip(it["text"], rendered):
        assert doc_row.strip() == row, f"doc:\n{doc_row}\nstored:\n{row}"


def test_main_table_numbers_have_sources(main_table):
    # a number typed into a measured column (ours, updates, wall time, status) must be a
    # {field} filled from a stored file, unless it is a setting or target the row states
    # (in its experiment, paper or command cell): "lag 50", "CE < 1e-3 not reached"
    _, table = main_table
    measured = ("ours", "updates", "wall", "status")
    for row in table["rows"]:
        given = " ".join(row[c] for c in ("experiment", "paper", "command"))
        for column in measured:
            literal = re.sub(r"\{\w+\}", " ", row[column])
            for number in NUMBER.findall(literal):
                assert number in given, f"{row['experiment']}: {column} has {number} with no source"
        for field in re.findall(r"\{(\w+)\}", " ".join(row[c] for c in table["columns"])):
            assert field in row.get("values", {}), f"{row['experiment']}: no value for {{{field}}}"


def test_main_table_paper_figures_are_the_recipes(main_table):
    # the paper column quotes the recipe's [meta] paper_result (itself from the paper's text)
    _, table = main_table
    for row in table["rows"]:
        numbers = NUMBER.findall(row["paper"])
        if not row.get("recipe"):
            assert not numbers, f"{row['experiment']}: a paper figure with no recipe"
            continue
        meta = tomllib.loads((ROOT / "recipes" / f"{row['recipe']}.toml").read_text())["meta"]
        source = " ".join(str(meta.get(k, "")) for k in ("paper_result", "paper_params", "source"))
        for number in numbers:
            assert number in source, f"{row['experiment']}: paper figure {number} not in {row['recipe']}'s [meta]"
        assert f"`{row['recipe']}`" in row["command"], f"{row['experiment']}: the command names another recipe"


def test_main_table_commands_are_the_stored_commands(main_table):
    # a row measured from a stored summary shows that summary's recipe and every --set override
    _, table = main_table
    for row in table["rows"]:
        if "source" not in row:
            continue
        command = load(row["source"])["command"]
        for override in re.findall(r"--set (\S+)", command):
            assert override in row["command"], f"{row['experiment']}: {override} missing from the command cell"
        recipe = re.search(r"recipes/([\w.-]+)\.toml", command).group(1)
        assert f"`{recipe}`" in row["command"]


# -- the other tables --------------------------------------------------------------------------

def _steps(header: list[str]) -> list[tuple[int, bool]]:
    out = []
    for cell in header[1:]:
        m = re.fullmatch(r"([\d,]+)( \(best\))?", plain(cell))
        assert m, cell
        out.append((int(m.group(1).replace(",", "")), bool(m.group(2))))
    return out


@pytest.mark.parametrize("it", items("curve"), ids=lambda it: it["file"])
def test_curve_tables(it):
    # header: updates; one row per "key:format" of the marker, each point from the summary's
    # validation curve at that update ("(best)": the summary's best step)
    stored = load(it["file"])
    curve = {p["step"]: p for p in stored["validation"]}
    steps = _steps(it["rows"][0])
    specs = [a.split(":", 1) for a in it["args"]]
    body = it["rows"][2:]
    assert len(body) == len(specs)
    for (key, spec), row in zip(specs, body):
        assert len(row) == len(steps) + 1
        for (step, best), cell in zip(steps, row[1:]):
            assert plain(cell) == sr.fmt(curve[step][key], spec), (it["file"], key, step)
            if best:
                assert stored["summary"]["best_step"] == step


@pytest.mark.parametrize("it", items("points"), ids=lambda it: it["file"])
def test_point_tables(it):
    # header: point labels ("4", "4 + diag" -> rank4, rank4-diag); one row per "path:format"
    stored = load(it["file"])["points"]
    names = [("rank" + plain(c).replace(" + diag", "-diag")) for c in it["rows"][0][1:]]
    specs = [a.split(":", 1) for a in it["args"]]
    for (path, spec), row in zip(specs, it["rows"][2:], strict=True):
        for name, cell in zip(names, row[1:], strict=True):
            value = stored[name]
            for key in path.split("."):
                value = value[key]
            assert plain(cell) == sr.fmt(value, spec), (name, path)


@pytest.mark.parametrize("it", items("finetune"), ids=lambda it: it["file"])
def test_finetune_tables(it):
    # rows "model, VARIANT": the variant's validation curve at the header's updates, 3 decimals
    stored = load(it["file"])["runs"]
    steps = [int(plain(c).replace(",", "")) for c in it["rows"][0][1:]]
    for row in it["rows"][2:]:
        curve = dict(map(tuple, stored[row[0].split(", ")[-1]]["val_curve"]))
        assert [plain(c) for c in row[1:]] == [f"{curve[s]:.3f}" for s in steps], row[0]


def calibration_rows(s: dict) -> list[str]:
    """benchmarks/bench_calibration.py's cmd_table, written again (that script imports torch)."""
    budgets = sorted(s["budgets"], key=lambda b: b["ratio"])
    out = ["| variant | " + " | ".join(f"{b['ratio']:g}x (budget {b['budget']:,})" for b in budgets) + " |"]
    names = list(dict.fromkeys(n for b in budgets for n in b["variants"]))
    for name in names:
        parts = []
        for b in budgets:
            row = b["variants"][name]
            cut = "" if name == "plain-uniform-LR" else f", cut {row['cut_vs_plain_uniform_LR']:+.0%}"
            parts.append(f"{row['test'][s['metric']]:.3f} ({row['increase']:+.3f}{cut}); {row['params']:,}; "
                         f"r {'/'.join(map(str, row['ranks'].values()))}")
        out.append(f"| {name} | " + " | ".join(parts) + " |")
    return out


@pytest.mark.parametrize("it", items("calibration"), ids=lambda it: it["file"])
def test_calibration_tables(it):
    expected = calibration_rows(load(it["file"]))
    text = [it["text"][0]] + it["text"][2:]
    assert text[0] == expected[0]
    assert sorted(text[1:]) == sorted(expected[1:])  # the script orders rows by its variant list


LABELS = {"lowrank": "low rank", "lrd": "low rank + diagonal", "kronecker": "Kronecker", "tt": "TT",
          "tt-joint": "TT joint (all gates)"}


def structure_rows(s: dict) -> list[str]:
    """benchmarks/bench_structures.py's table(), written again (that script imports torch)."""
    metric, dense, rec = s["metric"], s["dense"]["test"][s["metric"]], s["recurrent"]
    out = [f"| dense | dense | | {len(rec['names']) * rec['gates'] * rec['rows'] * rec['cols']:,} | "
           f"{s['params']:,} | 0 | 1 | {dense:.3f} |"]
    if "zero_recurrent" in s:
        z = s["zero_recurrent"]
        out.append(f"| 0 | W_hh = 0 | | 0 | {z['params']:,} | 1 | 0 | {z['test'][metric]:.3f} "
                   f"({z['test'][metric] - dense:+.3f}) |")
    for p in sorted(s["points"], key=lambda p: (p["fraction"], not p["matched"], p.get("test", {}).get(metric, math.inf))):
        kind, _, shape = p["family"].partition(":")
        o = p["options"]
        size = f"rank {o['rank']}" if "rank" in o else f"terms {o['terms']}" if "terms" in o else \
            "TT-ranks " + ",".join(map(str, o["tt_ranks"]))
        head = f"| 1/{p['fraction']:g} ({p['budget']:,}) | {LABELS[kind]}{' ' + shape if shape else ''} | {size} | "
        kept = "/".join(f"{v:.2f}" for v in p["top_singular_kept"])
        out.append(head + f"{p['recurrent_params']:,} ({p['gap']:+.1%}) | {p['params']:,} | {p['rel_error']:.3f} | "
                   f"{kept} | {p['test'][metric]:.3f} ({p['increase']:+.3f}) |")
    return out


@pytest.mark.parametrize("it", items("structures"), ids=lambda it: it["file"])
def test_structure_tables(it):
    assert it["text"][2:] == structure_rows(load(it["file"]))


@pytest.mark.parametrize("it", items("lines"), ids=lambda it: it["file"])
def test_printed_output_blocks(it):
    stored = {line.rstrip() for line in (RESULTS / it["file"]).read_text().splitlines()}
    for line in it["lines"]:
        assert line.rstrip() in stored, f"not in {it['file']}: {line!r}"


# -- docs/benchmarks.md and docs/recipes.md ---------------------------------------------------
# The benchmark tables rerun with a stored summary carry the same markers, the first file after the
# kind and any further files (rows in file order) as its arguments; the scripts' own formats.

BENCH_ITEMS, _ = parse((ROOT / "docs" / "benchmarks.md").read_text().splitlines())
FIT_WEIGHTS = {"trained": "trained-looking", "trained+diag": "trained-looking + diagonal", "init": "default init"}


def bench_items(kind: str) -> list[dict]:
    return [it for it in BENCH_ITEMS if it["kind"] == kind]


def test_benchmark_table_sources_are_stored():
    assert {it["kind"] for it in BENCH_ITEMS} == {"train-step", "inference", "fit-quality", "fit-cost", "lines"}
    for it in BENCH_ITEMS:
        for name in [it["file"], *it["args"]]:
            assert (RESULTS / name).is_file(), f"docs/benchmarks.md line {it['line']}: {name} is not stored"


@pytest.mark.parametrize("it", bench_items("train-step"), ids=lambda it: it["file"])
def test_train_step_tables(it):
    # | case | summary | repeats | dense ms | LRD ms | ratio | pairs | cpu |, rows in file order
    rows = [(name, s["repeats"], r) for name in [it["file"], *it["args"]] for s in [load(name)] for r in s["results"]]
    for cells_, (name, repeats, r) in zip(it["rows"][2:], rows, strict=True):
        assert plain(cells_[1]) == f"`{name}`" and cells_[2] == str(repeats)
        assert [plain(c) for c in cells_[3:]] == [f"{r['dense_ms']:.1f}", f"{r['lrd_ms']:.1f}", f"{r['ratio']:.3f}x",
                                                  f"{r['pair_ratio']:.3f}x", f"{r['cpu_ratio']:.3f}x"], r["case"]


@pytest.mark.parametrize("it", bench_items("inference"), ids=lambda it: it["file"])
def test_inference_tables(it):
    # the rows bench_inference.py --markdown printed, kept in its --json summary
    assert [[plain(c) for c in row] for row in it["rows"][2:]] == [r["markdown"] for r in load(it["file"])["results"]]


@pytest.mark.parametrize("it", bench_items("fit-quality"), ids=lambda it: it["file"])
def test_fit_quality_tables(it):
    for row, r in zip(it["rows"][2:], load(it["file"])["results"], strict=True):
        expected = [str(r["rank"]), r["method"], f"{r['iterations']}, {r['stop']}", f"{r['error']:.5f}",
                    f"{r['reference']:.5f}", f"{r['error'] / r['reference']:.4f}", f"{r['wall_s']:.2f} s"]
        if "classic" in r:
            expected += [f"{r['classic']:.5f}", f"{r['classic'] / r['reference']:.4f}"]
        assert [plain(c) for c in row] == expected


@pytest.mark.parametrize("it", bench_items("fit-cost"), ids=lambda it: it["file"])
def test_fit_cost_tables(it):
    for row, r in zip(it["rows"][2:], load(it["file"])["results"], strict=True):
        assert [plain(c) for c in row] == [
            FIT_WEIGHTS[r["weights"]], f"{r['fit_wall_s']:.2f} s", f"{r['fit_cpu_s']:.2f} s",
            f"{r['svd_lowrank_wall_s']:.2f} s", f"{r['svd_lowrank_cpu_s']:.2f} s",
            f"{r['fit_wall_s'] / r['svd_lowrank_wall_s']:.2f}x", f"{r['fit_cpu_s'] / r['svd_lowrank_cpu_s']:.2f}x",
            f"{r['iterations']}, {r['stop']}", f"{r['error']:.5f}"]


@pytest.mark.parametrize("it", bench_items("lines"), ids=lambda it: it["file"])
def test_benchmark_tables_printed_as_stored(it):
    stored = {line.rstrip() for line in (RESULTS / it["file"]).read_text().splitlines()}
    for line in it["text"]:
        assert line.rstrip() in stored, f"not in {it['file']}: {line!r}"


@pytest.mark.parametrize("name, metric", [("addition-gru-small", "mse"), ("copy-small", "accuracy")])
def test_recipe_demo_figures(name, metric):
    # docs/recipes.md's demo rows quote their stored run summary: wall time and validation metric
    row = next(line for line in (ROOT / "docs" / "recipes.md").read_text().splitlines()
               if line.startswith(f"| `{name}` |"))
    stored = load(f"recipe-{name}.json")
    value = stored["summary"]["val"][metric]
    shown = f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.1e}".replace("e-0", "e-")
    assert f"`benchmarks/results/recipe-{name}.json`" in row
    assert f"{stored['wall_time']:.0f} s" in row and shown in row, (row, shown)


# -- the summary script itself -----------------------------------------------------------------

def test_lookup_selectors_and_expressions(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "RESULTS", tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(
        {"summary": {"test": {"mse": 0.000281}}, "validation": [
            {"step": 500, "val_mse": 0.16}, {"step": 1000, "val_mse": 0.0029}, {"step": 1500, "val_mse": 0.001}]}))
    assert sr.resolve({"ref": "r.json#summary.test.mse", "fmt": ".2g"}) == "0.00028"
    assert sr.resolve({"ref": "r.json#validation[val_mse<0.003].step", "fmt": ",d"}) == "1,000"
    assert sr.resolve({"ref": "r.json#validation[step=1500].val_mse", "fmt": ".1%"}) == "0.1%"
    assert sr.resolve({"ref": "r.json#validation[-1].step", "fmt": "d"}) == "1500"
    spec = {"expr": "ceil(a / 7) * 2", "args": {"a": "r.json#validation[1].step"}, "fmt": ",d"}
    assert sr.resolve(spec) == f"{math.ceil(1000 / 7) * 2:,d}"
    with pytest.raises(ValueError):
        sr.evaluate("__import__('os').getcwd()", {})
    with pytest.raises(ValueError):
        sr.evaluate("a.real", {"a": 1.0})


def test_durations():
    assert [sr.duration(s) for s in (48, 654, 5774, 3 * 86400 + 5000, 400 * 86400)] == \
        ["48 s", "11 min", "1 h 36 min", "3.1 days", "400 days"]


def test_summarize_a_partial_and_a_finished_run(tmp_path):
    run = tmp_path / "copy-500"
    run.mkdir()
    recipe = tomllib.loads((ROOT / "recipes" / "copy-500-lrd-gru-128-50.toml").read_text())
    (run / "recipe.toml").write_text(
        "[meta]\nname = \"copy-500-lrd-gru-128-50\"\n[task]\nlag = 400\n[train]\nlr = 0.001\n"
        f"steps = {recipe['train']['steps']}\n")
    rows = [{"step": 500, "val": {"ce": 0.04, "accuracy": 0.12}, "nan_events": 0, "wall_time": 99.0},
            {"step": 1000, "val": {"ce": 0.03, "accuracy": 0.2}, "nan_events": 2, "wall_time": 201.0},
            {"step": 1500, "val": {"ce": 0.035, "accuracy": 0.25}, "nan_events": 3, "wall_time": 300.0}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    out = sr.summarize(run, machine_line="test machine")
    assert out["partial"] and out["steps"] == 1500 and out["wall_time"] == 300.0
    assert out["summary"]["best_step"] == 1000 and out["summary"]["best"]["ce"] == 0.03
    assert out["summary"]["val"]["ce"] == 0.035 and out["summary"]["nan_events"] == 3
    assert out["overrides"] == ["task.lag=400"]  # lr and steps agree with the recipe file
    assert "model.rank" in out["keys_newer_than_run"] and "task.lag" not in out["keys_newer_than_run"]
    assert "--set task.lag=400" in out["command"] and [p["val_ce"] for p in out["validation"]] == [0.04, 0.03, 0.035]
    (run / "summary.json").write_text(json.dumps({"steps": 1500, "best_step": 1000, "test": {"ce": 0.031},
                                                  "wall_time": 310.0, "run_dir": "x"}))
    done = sr.summarize(run, command="cmd", machine_line="m")
    assert not done["partial"] and done["summary"]["test"]["ce"] == 0.031 and "run_dir" not in done["summary"]
    assert done["command"] == "cmd" and done["wall_time"] == 310.0


def test_lookup_in_printed_output(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "RESULTS", tmp_path)
    (tmp_path / "out.txt").write_text("dense: 102,759 parameters, test bpc 1.993 (96s)\n")
    assert sr.resolve({"ref": r"out.txt#^dense: ([\d,]+) parameters", "fmt": ",.0f"}) == "102,759"
    assert sr.resolve({"ref": r"out.txt#test bpc ([\d.]+)", "fmt": ".3f"}) == "1.993"


def test_summarize_a_sweep(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "recipe.toml").write_text("[meta]\nname = \"copy-20-gru-128-cpu\"\n[train]\nlr = 0.003\n")
    (dense / "summary.json").write_text(json.dumps({"steps": 60, "test": {"ce": 0.08}, "wall_time": 6.0, "params": 9}))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"source": str(dense), "ranks": [4, 8]}))
    for name, rank, wall in (("rank4", 4, 2.0), ("rank8", 8, 3.0), ("rank8-diag", 8, None)):
        (sweep / name).mkdir()
        (sweep / name / "finetune.json").write_text(json.dumps(
            {"rank": rank, "diag": name.endswith("diag"), "tied": False, "converted": {"test": {"ce": 1.0 / rank}},
             "conversion": {"params_after": 100 * rank, "ratio": 9 / rank}}))
        if wall is not None:  # rank8-diag is still fine-tuning
            (sweep / name / "summary.json").write_text(json.dumps({"test": {"ce": 0.1 / rank}, "wall_time": wall,
                                                                   "steps": 5, "best_step": 5}))
    out = sr.summarize_sweep(sweep, machine_line="m")
    assert sorted(out["points"]) == ["rank4", "rank8"] and out["unfinished"] == ["rank8-diag"]
    assert out["points"]["rank8"]["before"]["ce"] == 0.125 and out["points"]["rank8"]["after"]["ce"] == 0.0125
    assert out["points"]["rank4"]["params"] == 400 and out["points_wall_time"] == 5.0
    assert out["dense"]["test"]["ce"] == 0.08 and out["dense"]["steps"] == 60


def test_training_choice_table():
    # docs/benchmarks.md "Which path execution = auto picks for training": every row from the stored run
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text.split('### Which path `execution = "auto"` picks for training', 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    stored = load("training-choice-cpu.json")
    assert len(rows) == len(stored["rows"])
    for line, r in zip(rows, stored["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:6] == [f"`{r['layer']}`", str(r["batch"]), f"{r['rebuilt_ms']:.1f}", f"{r['factored_ms']:.1f}",
                             f"{r['measured_ratio']:.2f}", f"{r['model_ratio']:.2f} ({r['model_choice']})"]
        assert cells[6].startswith(f"{r['previous_model_ratio']:.2f} ({r['previous_model_choice']}")
    assert f"{stored['right']} of {len(stored['rows'])} cases, the previous model in {stored['previous_right']}" in \
        " ".join(section.split())
