"""Files that lie, degenerate and hostile inputs, and no data loss.

Every reader of a compressed file (``merge``, ``inspect``, ``bench`` and ``load_model``) must
refuse every class of lying file with one ``error:`` line and exit code 2 (``FormatError`` from
the API), and write nothing. Degenerate weights, damaged training files and unsafe output
folders are one line and exit 2 as well; outputs are created exclusively and atomically.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrcompress as lrc
from lrcompress import io, validate
from lrcompress.errors import FormatError, LRCompressError, OutputExistsError

from cli_runner import Run, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error(result: Run, *fragments: str) -> None:
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err


# -- 1. files that lie ---------------------------------------------------------------------

def compressed_gru() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a valid file: nn.GRU(5, 16), weight_hh_l0 at rank 4 + diagonal."""
    torch.manual_seed(0)
    gru = nn.GRU(5, 16)
    lrc.compress(gru, rank=4, diag=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in io.factored_state_dict(gru).items()}
    meta = {"format": "lrcompress", "format_version": "1", "lrcompress_version": lrc.__version__,
            "targets": json.dumps([s.to_dict() for s in io.factored_specs(gru)])}
    return tensors, meta


def _record(change):
    def lie(tensors, meta):
        records = json.loads(meta["targets"])
        change(records)
        meta["targets"] = json.dumps(records)
    return lie


def _both(records, tensors):
    """A lie told consistently: the record and the stored factors changed together."""
    def lie(t, meta):
        _record(records)(t, meta)
        tensors(t)
    return lie


def _tensor(change):
    def lie(tensors, meta):
        change(tensors)
    return lie


def _set(key, value):
    def lie(tensors, meta):
        meta[key] = value
    return lie


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


H = "weight_hh_l0"
LIES = {  # class of lie -> (how to make it, a fragment the one-line error must hold)
    "deeply nested targets": (_set("targets", "[" * 100_000 + "]" * 100_000), "nests 100000 levels"),
    "targets not JSON": (_set("targets", '[{"module": '), "not valid JSON"),
    "targets not a list": (_set("targets", '{"module": ""}'), "not a list"),
    "huge integer": (_set("targets", '[{"rank": ' + "9" * 5000 + "}]"), "not valid JSON"),
    "newer format": (_set("format_version", "3"), "upgrade lrcompress"),
    "bad format version": (_set("format_version", "one"), "bad format_version"),
    "no targets": (lambda t, m: m.pop("targets"), "no 'targets'"),
    "record not an object": (_record(lambda r: r.append([1, 2])), "must be a JSON object"),
    "unknown field": (_record(lambda r: r[0].update(scale=2.0)), "unknown fields ['scale']"),
    "missing field": (_record(lambda r: r[0].pop("rank")), "missing fields ['rank']"),
    "bool as int": (_record(lambda r: r[0].update(rank=True)), "rank must be a positive integer"),
    "int as bool": (_record(lambda r: r[0].update(diag=1)), "diag must be true or false"),
    "zero rank": (_record(lambda r: r[0].update(rank=0)), "rank must be a positive integer"),
    "string rows": (_record(lambda r: r[0].update(rows="16")), "rows must be a positive integer"),
    "unknown layer": (_record(lambda r: r[0].update(layer="transformer")), "unknown layer"),
    "gru with 4 gates": (_record(lambda r: r[0].update(gates=4)), "has 3 gate block(s), the record says 4"),
    "gru projection": (_record(lambda r: r[0].update(role="projection", gates=1)), "has no projection weight"),
    "role against name": (_record(lambda r: r[0].update(role="input")), "does not match the weight name"),
    "not a weight name": (_record(lambda r: r[0].update(weight="bias_hh_l0")), "is not a gru weight name"),
    "diag on non-square": (_record(lambda r: r[0].update(cols=5)), "diag=true needs square blocks"),
    "duplicate record": (_record(lambda r: r.append(dict(r[0]))), "recorded twice"),
    "two layer kinds": (_record(lambda r: r.append({**r[0], "weight": "weight_ih_l0", "role": "input",
                                                    "layer": "lstm", "gates": 4, "diag": False})),
                        "recorded both as gru and as lstm"),
    "rows lie": (_record(lambda r: r[0].update(rows=48, cols=48)), "implies (3, 48, 4)"),
    "rank lie": (_record(lambda r: r[0].update(rank=8)), "implies (3, 16, 8)"),
    "tied lie": (_record(lambda r: r[0].update(tied=True)), "implies (4, 16)"),
    "diag false, D stored": (_record(lambda r: r[0].update(diag=False)), "says diag=false"),
    "diag true, D missing": (_tensor(lambda t: t.pop(f"{H}.D")), f"factor {H}.D is missing"),
    "R missing": (_tensor(lambda t: t.pop(f"{H}.R")), f"factor {H}.R is missing"),
    "L transposed": (_tensor(lambda t: t.update({f"{H}.L": t[f"{H}.L"].mT.contiguous()})), f"{H}.L has shape"),
    "dense key too": (_tensor(lambda t: t.update({H: torch.zeros(48, 16)})), "stored dense"),
    "integer factor": (_tensor(lambda t: t.update({f"{H}.L": t[f"{H}.L"].to(torch.int32)})), "floating point"),
    "mixed dtypes": (_tensor(lambda t: t.update({f"{H}.R": t[f"{H}.R"].double()})), "mix dtypes"),
    "NaN factor": (_tensor(lambda t: t.update({f"{H}.D": _nan(t[f"{H}.D"])})), "NaN or Inf"),
    "bias rows": (_tensor(lambda t: t.update({"bias_hh_l0": torch.zeros(47)})), "bias_hh_l0 has shape (47,)"),
    "record dropped": (_record(lambda r: r.clear()), f"{H}.D looks like a factor of {H}, but 'targets' has no record"),
    "factors of no record": (_tensor(lambda t: t.update({"ghost.weight.L": torch.zeros(1, 3, 2),
                                                         "ghost.weight.R": torch.zeros(1, 2, 3)})),
                             "ghost.weight.L looks like a factor of ghost.weight"),
    "rectangular recurrent weight": (_both(lambda r: r[0].update(cols=30, diag=False),
                                           lambda t: t.update({f"{H}.R": torch.zeros(3, 4, 30)}) or t.pop(f"{H}.D")),
                                     "recorded with 30 columns, but a recurrent weight has the hidden size (16)"),
    "unknown factor part": (_tensor(lambda t: t.update({f"{H}.Q": torch.zeros(3)})),
                            f"{H}.Q is not a factor of the format"),
}


def _reader_merge(run, path, tmp):
    return run("merge", path, "-o", tmp / "merged.safetensors")


def _reader_inspect(run, path, tmp):
    return run("inspect", path)


def _reader_bench(run, path, tmp):
    return run("bench", path, "--seq", "2", "--rounds", "1")


READERS = {"merge": _reader_merge, "inspect": _reader_inspect, "bench": _reader_bench}


@pytest.mark.parametrize("reader", [*READERS, "load_model"])
@pytest.mark.parametrize("lie", list(LIES))
def test_every_reader_refuses_every_lying_file(lie, reader, run, tmp_path):
    tensors, meta = compressed_gru()
    make, fragment = LIES[lie]
    make(tensors, meta)
    path = tmp_path / "model.lr.safetensors"
    save_file(tensors, path, metadata=meta)
    before = snapshot(tmp_path)
    if reader == "load_model":
        torch.manual_seed(1)
        skeleton = nn.GRU(5, 16)
        weights = {k: v.clone() for k, v in skeleton.state_dict().items()}
        with pytest.raises(FormatError) as info:
            lrc.load_model(skeleton, path)
        assert fragment in str(info.value) and "\n" not in str(info.value)
        assert type(skeleton) is nn.GRU  # nothing registered, nothing loaded
        for k, v in skeleton.state_dict().items():
            assert torch.equal(v, weights[k]), k
    else:
        one_error(READERS[reader](run, path, tmp_path), fragment)
    assert snapshot(tmp_path) == before  # nothing written, the input untouched


def test_honest_file_merges_to_the_float64_product(run, tmp_path):
    """Control for the test above: the unaltered file passes every reader with the right values."""
    tensors, meta = compressed_gru()
    path = tmp_path / "model.lr.safetensors"
    save_file(tensors, path, metadata=meta)
    assert run("merge", path, "-o", tmp_path / "dense.safetensors").code == 0
    L, R, D = (tensors[f"{H}.{k}"].double() for k in "LRD")
    expected = (L @ R + torch.diag_embed(D)).flatten(0, 1)
    merged = load_file(tmp_path / "dense.safetensors")
    torch.testing.assert_close(merged[H].double(), expected, rtol=1e-6, atol=1e-7)
    assert run("inspect", path).code == 0
    gru = lrc.load_model(nn.GRU(5, 16), path)
    torch.testing.assert_close(gru.weight_hh_l0.double(), expected, rtol=1e-6, atol=1e-7)


def test_json_limits_hold_without_recursion(monkeypatch):
    assert validate.json_depth('[{"a": "[[[[[[[[[[[[\\"]]"}]') == 2  # brackets in strings do not nest
    monkeypatch.setattr(validate, "MAX_JSON_BYTES", 100)
    with pytest.raises(FormatError, match="over the 100-byte limit"):
        validate.targets_from_metadata({"format": "lrcompress", "format_version": "1", "targets": " " * 101})


# -- 2. degenerate weights -------------------------------------------------------------------

def _gru_state(change) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in nn.GRU(4, 16).state_dict().items()}
    change(state)
    return state


DEGENERATE = {
    "empty input weight (48, 0)": (lambda s: s.update(weight_ih_l0=torch.zeros(48, 0)), "is empty (shape (48, 0))"),
    "integer": (lambda s: s.update(weight_hh_l0=(s["weight_hh_l0"] * 100).to(torch.int64)), "dtype torch.int64"),
    "bool": (lambda s: s.update(weight_hh_l0=s["weight_hh_l0"] > 0), "dtype torch.bool"),
    "complex": (lambda s: s.update(weight_hh_l0=s["weight_hh_l0"].to(torch.complex64)), "dtype torch.complex64"),
    "sparse": (lambda s: s.update(weight_hh_l0=s["weight_hh_l0"].to_sparse()), "sparse tensor"),
    "NaN": (lambda s: s.update(weight_hh_l0=_nan(s["weight_hh_l0"])), "NaN or Inf"),
    "empty recurrent weight (0, 0)": (lambda s: s.update(weight_hh_l0=torch.zeros(0, 0)), "of shape (0, 0) is not a GRU"),
    "empty recurrent weight (48, 0)": (lambda s: s.update(weight_hh_l0=torch.zeros(48, 0)),
                                       "of shape (48, 0) is not a GRU"),
    "empty cell weight (48, 0)": (lambda s: s.update({"cell.weight_hh": torch.zeros(48, 0),
                                                      "cell.weight_ih": torch.zeros(48, 4)}),
                                  "cell.weight_hh of shape (48, 0)"),
}


@pytest.mark.parametrize("command", ["convert", "inspect"])
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_weights_are_one_line(case, command, run, tmp_path):
    change, fragment = DEGENERATE[case]
    torch.save(_gru_state(change), tmp_path / "model.pt")
    before = snapshot(tmp_path)
    extra = ("--rank", "2") if command == "convert" else ()
    one_error(run(command, tmp_path / "model.pt", "--include-input", *extra), fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_linear_in_a_model_is_refused_before_any_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(4, 8), nn.Linear(0, 0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LRCompressError, match=r"^1\.weight is empty \(shape \(0, 0\)\)"):
        lrc.compress(model, rank=2, targets=["1"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- 3. outputs: exclusive, atomic, swept -----------------------------------------------------

def test_two_writers_racing_to_one_name_exactly_one_wins(tmp_path, monkeypatch):
    """Both pass the 'exists?' check, then publish at once: os.link lets exactly one through."""
    path = tmp_path / "out.safetensors"
    barrier = threading.Barrier(2)
    real = io.save_file

    def save_then_wait(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        barrier.wait(timeout=10)  # both temporaries written, neither published yet

    monkeypatch.setattr(io, "save_file", save_then_wait)
    results: dict[int, object] = {}

    def writer(i):
        try:
            results[i] = io.write_safetensors({"w": torch.full((3,), float(i))}, path)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == path]
    losers = [r for r in results.values() if isinstance(r, OutputExistsError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert torch.equal(load_file(path)["w"], torch.full((3,), float(winners[0])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left


def test_force_replaces_and_permissions_follow_the_umask(tmp_path):
    path = tmp_path / "out.safetensors"
    io.write_safetensors({"w": torch.zeros(2)}, path)
    with pytest.raises(OutputExistsError):
        io.write_safetensors({"w": torch.ones(2)}, path)
    io.write_safetensors({"w": torch.ones(2)}, path, force=True)
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_killed_writers_temporary_is_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID now names no process (reuse within the test is vanishingly unlikely)
    host = io._host()
    stale = tmp_path / f".out.safetensors.{host}-{dead.pid}-0123abcd{io.TEMP_SUFFIX}"
    live = tmp_path / f".out.safetensors.{host}-{os.getpid()}-0123abcd{io.TEMP_SUFFIX}"
    elsewhere = tmp_path / f".out.safetensors.otherhost-{dead.pid}-0123abcd{io.TEMP_SUFFIX}"
    users = tmp_path / f".notes-{dead.pid}.tmp"  # not lrcompress's pattern: never touched
    for p in (stale, live, elsewhere, users):
        p.write_bytes(b"partial")
    io.write_safetensors({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and users.exists()
    assert socket.gethostname()  # the host part is what tells a shared folder's writers apart


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_file(run, tmp_path, monkeypatch):
    tensors, meta = compressed_gru()
    path = tmp_path / "model.lr.safetensors"
    save_file(tensors, path, metadata=meta)
    before = snapshot(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", interrupted)  # Ctrl-C in the middle of writing
    result = run("merge", path, "-o", tmp_path / "dense.safetensors")
    assert (result.code, result.err.strip()) == (130, "interrupted")
    assert snapshot(tmp_path) == before


# -- 4. training-side files ------------------------------------------------------------------

RECIPE = """
[meta]
name = "tiny"
[task]
name = "addition"
length = 6
train_size = 64
valid_size = 32
test_size = 32
[model]
cell = "gru"
hidden_size = 4
[train]
optimizer = "adam"
lr = 0.01
batch_size = 16
steps = 2
eval_every = 1
device = "cpu"
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.toml").write_text(RECIPE)
    from lrcompress.train.run import train_recipe

    train_recipe(root / "tiny.toml", root / "dense", progress=False)
    return root


def _damage_state(change):
    def damage(path: Path) -> None:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        state = json.loads(meta["state"])
        result = change(state, tensors)
        meta["state"] = result if isinstance(result, str) else json.dumps(state)
        save_file(tensors, path, metadata=meta)
    return damage


CHECKPOINT_DAMAGE = {
    "not JSON": (_damage_state(lambda s, t: "{"), "not valid JSON"),
    "deep": (_damage_state(lambda s, t: "[" * 50_000 + "]" * 50_000), "nests 50000 levels"),
    "no step": (_damage_state(lambda s, t: s["trainer"].pop("step")), "trainer.step"),
    "step a string": (_damage_state(lambda s, t: s["trainer"].update(step="7")), "trainer.step is '7'"),
    "python rng": (_damage_state(lambda s, t: s["rng"].update(python=[3, [1, 2], None])), "damaged checkpoint"),
    "optimiser tensor gone": (_damage_state(lambda s, t: [t.pop(k) for k in list(t) if k.startswith("optim.")]),
                              "damaged checkpoint"),
    "no trainer": (_damage_state(lambda s, t: s.pop("trainer")), "no trainer state"),
    "best score NaN": (_damage_state(lambda s, t: s["trainer"].update(best_score=float("nan"))),
                       "trainer.best_score is NaN"),  # would never be beaten: no later best weights
    "best step ahead": (_damage_state(lambda s, t: s["trainer"].update(best_step=99)),
                        "trainer.best_step 99 is after trainer.step 2"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_one_line(damage, tiny_run, run, tmp_path):
    out = tmp_path / "dense"
    out.mkdir()
    for p in (tiny_run / "dense").iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    change, fragment = CHECKPOINT_DAMAGE[damage]
    change(out / "last.safetensors")
    before = snapshot(out)
    one_error(run("train", tiny_run / "tiny.toml", "--out", out, "--resume", "--steps", "3"), fragment)
    assert snapshot(out) == before


SUMMARY_DAMAGE = {
    "not JSON": ("{", "not valid JSON"),
    "deep": ("[" * 50_000 + "]" * 50_000, "nests 50000 levels"),
    "a list": ("[1, 2]", "not a run summary"),
    "no metric": (json.dumps({"params": 3}), "no 'metric'"),
    "params text": (json.dumps({"metric": "mse", "params": "many"}), "params is 'many', not a number"),
    "diag number": (json.dumps({"metric": "mse", "diag": 1}), "diag is '1', not true/false"),
    "metric value text": (json.dumps({"metric": "mse", "test": {"mse": "low"}}), "after is 'low'"),
}


@pytest.mark.parametrize("damage", list(SUMMARY_DAMAGE))
def test_report_on_a_damaged_summary_is_one_line(damage, run, tmp_path):
    text, fragment = SUMMARY_DAMAGE[damage]
    (tmp_path / "sweep" / "rank2").mkdir(parents=True)
    (tmp_path / "sweep" / "rank2" / "summary.json").write_text(text)
    one_error(run("report", tmp_path / "sweep"), "summary.json", fragment)


def test_report_outputs_are_never_clobbered(tiny_run, run, tmp_path):
    dense = tiny_run / "dense"
    one_error(run("report", dense, "--csv", tmp_path), "is a directory")
    (tmp_path / "file").write_text("mine")
    one_error(run("report", dense, "--csv", tmp_path / "file" / "r.csv"), "cannot write")
    one_error(run("report", dense, "--csv", tmp_path / "file"), "exists; pass --force")
    assert (tmp_path / "file").read_text() == "mine"
    assert run("report", dense, "--csv", tmp_path / "file", "--force").code == 0
    summary = json.loads((dense / "summary.json").read_text())
    header, values = (tmp_path / "file").read_text().splitlines()
    row = dict(zip(header.split(","), values.split(",")))
    assert float(row["after"]) == summary["test"]["mse"] and int(row["params"]) == summary["params"]


def test_run_outputs_refuse_places_lrcompress_did_not_make(tiny_run, run, tmp_path):
    recipe = tiny_run / "tiny.toml"
    (tmp_path / "file").write_text("mine")
    one_error(run("train", recipe, "--out", tmp_path / "file" / "run"), "is not a directory")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "summary.json").write_text("my notes")
    one_error(run("train", recipe, "--out", tmp_path / "project"), "lrcompress did not create it")
    one_error(run("finetune", tiny_run / "dense", "--rank", "2", "--out", tmp_path / "project"),
              "lrcompress did not create it")
    assert (tmp_path / "project" / "summary.json").read_text() == "my notes"
    before = snapshot(tmp_path)
    # sweep: a bad source is refused before the sweep folder (and its sweep.json) exists
    one_error(run("sweep", tmp_path / "nowhere", "--ranks", "2", "--out", tmp_path / "s"), "no such run")
    one_error(run("sweep", tmp_path / "project", "--ranks", "2", "--out", tmp_path / "s"), "not a finished run")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "recipe.toml").write_text(RECIPE)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    one_error(run("sweep", broken, "--ranks", "2", "--out", tmp_path / "s"), "not a readable safetensors")
    assert not (tmp_path / "s").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("broken")} == before


# -- 5. the demo never deletes what it did not write -------------------------------------------

def test_demo_refuses_a_file_and_a_foreign_folder(run, tmp_path):
    (tmp_path / "file").write_text("mine")
    one_error(run("demo", "--out", tmp_path / "file"), "is a file")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    one_error(run("demo", "--out", tmp_path / "work"), "did not make")
    assert snapshot(tmp_path) == before


def test_demo_replaces_only_its_own_runs(tmp_path):
    from lrcompress.demo import MARKER, prepare_folder

    out = tmp_path / "demo"
    prepare_folder(out)  # new: created and marked
    assert (out / MARKER).is_file()
    for name in ("dense/model.safetensors", "dense/.lrcompress-run", "sweep/.lrcompress-run",
                 "sweep/rank2/summary.json", "sweep/rank2/.lrcompress-run"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old run")
    (out / "notes.txt").write_text("mine")
    prepare_folder(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("foreign", ["dense/notes.txt", "sweep/rank2/my-finetune.safetensors", "dense/unmarked"])
def test_demo_never_deletes_a_users_file_inside_its_runs(tmp_path, foreign):
    """Runs are replaced only when they hold nothing but what lrcompress writes; else nothing changes."""
    from lrcompress.demo import MARKER, prepare_folder
    from lrcompress.errors import OutputExistsError

    out = tmp_path / "demo"
    prepare_folder(out)
    for name in ("dense/.lrcompress-run", "dense/summary.json", "sweep/.lrcompress-run", "sweep/rank2/.lrcompress-run"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old run")
    if foreign == "dense/unmarked":  # a folder of the user's that happens to be called dense
        (out / "dense" / ".lrcompress-run").unlink()
    else:
        (out / foreign).write_text("mine")
    (out / MARKER).write_text("")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="cannot be replaced"):
        prepare_folder(out)
    assert snapshot(tmp_path) == before  # not even the marker was rewritten


def test_report_checks_both_outputs_before_writing_either(tiny_run, run, tmp_path):
    dense = tiny_run / "dense"
    one_error(run("report", dense, "--csv", tmp_path / "same.out", "--plot", tmp_path / "same.out"), "both name")
    (tmp_path / "taken.png").write_text("mine")
    one_error(run("report", dense, "--csv", tmp_path / "r.csv", "--plot", tmp_path / "taken.png"),
              "exists; pass --force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]  # no CSV written first


@pytest.mark.parametrize("command", ["finetune", "sweep"])
@pytest.mark.parametrize("inside", [False, True])
def test_the_source_run_is_never_the_output(tiny_run, run, command, inside):
    dense = tiny_run / "dense"
    before = snapshot(dense)
    out = dense / "converted" if inside else dense
    args = ("--rank", "2") if command == "finetune" else ("--ranks", "2")
    for resume in ((), ("--resume",)) if command == "finetune" else ((),):
        one_error(run(command, dense, *args, "--out", out, "--steps", "1", *resume), "source run")
    assert snapshot(dense) == before
