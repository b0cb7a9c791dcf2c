"""``lrcompress --help``, ``CMD --help`` and ``--version`` answer without importing PyTorch.

Each check runs in a fresh interpreter (this one has torch loaded already) and asserts on
``sys.modules``, not on timings: deterministic on a loaded machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lrcompress.version import __version__

COMMANDS = ("convert", "inspect", "merge", "bench", "train", "finetune", "sweep", "report", "evaluate", "demo")

# Runs `lrcompress ARGS` for each ARGS through cli.main in one fresh interpreter and prints, as
# JSON, each exit code and output, and which heavy modules got imported by the end.
PROBE = """
import contextlib, io, json, sys
from lrcompress import cli
results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["lrcompress", *args]
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code or 0
    results.append({"code": code, "out": out.getvalue()})
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "safetensors", "tqdm", "matplotlib"})
print(json.dumps({"results": results, "heavy": heavy}))
"""


def probe(*calls: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)], capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": ""})
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    return answer["results"], answer["heavy"]


def test_every_help_and_version_without_torch():
    results, heavy = probe(("--help",), *((c, "--help") for c in COMMANDS), ("--version",))
    assert heavy == [], f"--help/--version imported {heavy}"
    top, *commands, version = results
    assert top["code"] == 0
    for command in COMMANDS:
        assert command in top["out"]
    assert "--quiet" in top["out"] and "--version" in top["out"]
    for command, result in zip(COMMANDS, commands):
        assert result["code"] == 0, result
        assert f"lrcompress {command}" in result["out"]  # the usage line of that command
    assert version == {"code": 0, "out": f"lrcompress {__version__}\n"}


def test_version_in_process(run):
    result = run("--version")
    assert result.code == 0 and result.out == f"lrcompress {__version__}\n" and result.err == ""


def test_package_import_is_lazy_but_complete():
    """``import lrcompress`` defers torch; every public name still resolves on first use."""
    done = subprocess.run([sys.executable, "-c", "import sys, lrcompress; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "False\n", done.stderr
    import lrcompress

    assert [name for name in lrcompress.__all__ if getattr(lrcompress, name, None) is None] == []
    with pytest.raises(AttributeError, match="no_such_name"):
        lrcompress.no_such_name


def test_tables_name_a_plain_linear_once_and_json_keeps_layer_and_role():
    import torch

    import lrcompress as lrc

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GRU(8, 8))
    report = lrc.compress(model, rank=2, targets=["0", "1"])
    kinds = {line.split()[0]: line.split()[1] for line in str(report).splitlines() if line.startswith(("0.", "1."))}
    assert kinds == {"0.weight": "linear", "1.weight_hh_l0": "gru/recurrent"}
    assert {(t["layer"], t["role"]) for t in report.to_dict()["targets"]} == {("linear", "linear"), ("gru", "recurrent")}
