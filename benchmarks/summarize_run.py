"""A run directory's result as a small, committable summary JSON (the source docs/results.md cites),
and the main table of docs/results.md rendered from such summaries.

Run directories (``runs/``) are not committed; the figures a document quotes from one are kept in
``benchmarks/results/<name>.json``: the command that made the run, the recipe and the overrides
it was run with, machine and device, updates, wall time, the final ``summary.json`` (test and
validation at the best weights) and the validation curve from ``metrics.jsonl``. A run still in
progress (no ``summary.json`` yet) is summarised as ``"partial": true`` with the step it reached
and the best validation figure so far.

    python benchmarks/summarize_run.py runs/copy-50-cpu --out benchmarks/results/copy-50-cpu.json \\
        --command "OMP_NUM_THREADS=1 lrcompress train recipes/copy-50-lrd-gru-128-50-cpu.toml ..."

``overrides`` is computed, not typed: every recipe key where the run's ``recipe.toml`` differs from
``recipes/<name>.toml`` as it is now, as ``SECTION.KEY=VALUE``; ``keys_newer_than_run`` lists the
keys the recipe sets now that the run's ``recipe.toml`` lacks (added after the run: it ran the
code's behaviour of its day there, which ``--command`` should spell out).

The main table of docs/results.md is ``benchmarks/results/results-table.json`` rendered: each cell
a template whose ``{name}`` fields are values read from stored files (``file#path``, or an
arithmetic ``expr`` over such references) and formatted (see ``resolve``)::

    python benchmarks/summarize_run.py --table benchmarks/results/results-table.json

No torch import: the script reads files only, so tests/test_results_doc.py can render the table.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

from _common import cpu_name  # benchmarks/ is first on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# -- one run directory -> summary JSON ---------------------------------------------------------

def machine() -> str:
    """CPU model, core count and torch version of this machine (the one the run is summarised on:
    pass ``--machine`` when the run was made elsewhere)."""
    cpu = cpu_name()
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "?"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch}"


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else repr(value)


def _settings(recipe: dict) -> dict:
    # [meta] is documentation, not a setting
    return _flat({k: v for k, v in recipe.items() if k != "meta"})


def overrides(run_recipe: dict, recipe_file: Path) -> list[str]:
    """``SECTION.KEY=VALUE`` for every key both the run's recipe and the recipe file set, where
    the run's value differs from the file's now."""
    if not recipe_file.is_file():
        return []
    now, ran = _settings(tomllib.loads(recipe_file.read_text())), _settings(run_recipe)
    return [f"{key}={_toml_value(value)}" for key, value in sorted(ran.items()) if key in now and now[key] != value]


def newer_keys(run_recipe: dict, recipe_file: Path) -> list[str]:
    """Keys the recipe file sets now that the run's ``recipe.toml`` does not have at all."""
    if not recipe_file.is_file():
        return []
    now, ran = _settings(tomllib.loads(recipe_file.read_text())), _settings(run_recipe)
    return sorted(key for key in now if key not in ran)


def validation_curve(metrics: list[dict]) -> list[dict]:
    """One point per evaluation: ``step``, ``val_<metric>`` for each validation metric,
    ``train_loss``, ``nan_events`` and cumulative ``wall_time`` (seconds, across resumes)."""
    points = []
    for row in metrics:
        if "val" not in row:
            continue
        point = {"step": row["step"]}
        point.update({f"val_{k}": v for k, v in row["val"].items()})
        for key in ("train_loss", "nan_events", "wall_time"):
            if key in row:
                point[key] = row[key]
        points.append(point)
    return points


def partial_summary(recipe: dict, curve: list[dict]) -> dict:
    """What ``summary.json`` would say so far: the last step and the best validation point (by
    the first validation metric; lower is better unless it is an accuracy)."""
    if not curve:
        return {"steps": 0}
    metric = next(k[4:] for k in curve[-1] if k.startswith("val_"))
    higher = "accuracy" in metric
    best = (max if higher else min)(curve, key=lambda p: p[f"val_{metric}"])
    last = curve[-1]
    return {"steps": last["step"], "metric": metric, "higher_is_better": higher, "best_step": best["step"],
            "best": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
            "val": {k[4:]: v for k, v in last.items() if k.startswith("val_")},
            "nan_events": last.get("nan_events"), "wall_time": last.get("wall_time"),
            "recipe": recipe.get("meta", {}).get("name")}


def summarize(run: Path, command: str | None = None, machine_line: str | None = None,
              note: str | None = None) -> dict:
    """The summary dict of one run directory (see the module docstring).

    Raises FileNotFoundError when ``run`` holds no ``recipe.toml`` (not a run directory).
    """
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    name = recipe.get("meta", {}).get("name", run.name)
    metrics_file = run / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else []
    curve = validation_curve(metrics)
    done = (run / "summary.json").is_file()
    summary = json.loads((run / "summary.json").read_text()) if done else partial_summary(recipe, curve)
    summary.pop("run_dir", None)
    recipe_file = ROOT / "recipes" / f"{name}.toml"
    extra = overrides(recipe, recipe_file)
    try:
        rel = run.resolve().relative_to(ROOT)
    except ValueError:
        rel = run
    if command is None:
        command = " ".join([f"OMP_NUM_THREADS=1 lrcompress train recipes/{name}.toml --out {rel}"]
                           + [f"--set {o}" for o in extra])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    out = {"command": command, "recipe": name, "overrides": extra,
           "keys_newer_than_run": newer_keys(recipe, recipe_file), "run": str(rel),
           "machine": machine_line or machine(), "device": recipe.get("train", {}).get("device", "auto"),
           "commit_when_summarised": commit, "partial": not done,
           "steps": summary.get("steps"), "wall_time": summary.get("wall_time"),
           "summary": summary, "validation": curve}
    if note:
        out["note"] = note
    return out


def summarize_sweep(sweep: Path, command: str | None = None, machine_line: str | None = None,
                    note: str | None = None) -> dict:
    """The summary of an ``lrcompress sweep`` directory (``sweep.json`` and one run directory per
    point): the source run summarised as ``dense``, and per point its rank, diagonal, parameters,
    compression ratio, test figures converted (``before``) and fine-tuned at the best validation
    weights (``after``), updates and wall time; ``points_wall_time`` sums the points' wall times.
    A point not finished yet is left out and counted in ``unfinished``."""
    spec = json.loads((sweep / "sweep.json").read_text())
    source = Path(spec["source"])
    dense = summarize(source if source.is_absolute() else ROOT / source, machine_line=machine_line)
    points, unfinished = {}, []
    for point in sorted(p for p in sweep.iterdir() if (p / "finetune.json").is_file()):
        if not (point / "summary.json").is_file():
            unfinished.append(point.name)
            continue
        fine = json.loads((point / "finetune.json").read_text())
        done = json.loads((point / "summary.json").read_text())
        points[point.name] = {"rank": fine["rank"], "diag": fine["diag"], "tied": fine["tied"],
                              "params": fine["conversion"]["params_after"], "ratio": fine["conversion"]["ratio"],
                              "before": fine["converted"]["test"], "after": done["test"], "best_step": done.get("best_step"),
                              "steps": done.get("steps"), "wall_time": done.get("wall_time")}
    out = {"command": command or f"lrcompress sweep {spec['source']} --ranks {','.join(map(str, spec['ranks']))}",
           "sweep": spec, "machine": machine_line or machine(),
           "dense": {k: dense["summary"].get(k) for k in ("test", "val", "best_step", "steps", "wall_time", "params")}
           | {"command": dense["command"]},
           "points": points, "unfinished": unfinished,
           "points_wall_time": sum(p["wall_time"] or 0.0 for p in points.values())}
    if note:
        out["note"] = note
    return out


# -- the main table: templates filled from stored files ----------------------------------------

_PART = re.compile(r"([^.\[\]]+|(?<![^.])(?=\[))(?:\[([^\]]+)\])?")  # key[selector], split at dots outside []


def load_source(ref: str):
    """The parsed file of a ``file#path`` reference: ``recipes/*.toml`` from the repository root,
    anything else from ``benchmarks/results/``."""
    name = ref.split("#", 1)[0]
    path = ROOT / name if name.startswith("recipes/") else RESULTS / name
    if path.suffix == ".txt":
        return path.read_text()
    return tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())


_TESTS = {"=": lambda a, b: a == b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def _select(items: list, sel: str):
    """``items[sel]``: a position, or the first item meeting every ``key=value`` / ``key<value`` /
    ``key>value`` condition (comma-separated; numbers compare as numbers)."""
    if re.fullmatch(r"-?\d+", sel):
        return items[int(sel)]
    conditions = []
    for part in sel.split(","):
        key, op, value = re.fullmatch(r"\s*(\w+)\s*(=|<|>)\s*(\S+)\s*", part).groups()
        conditions.append((key, _TESTS[op], float(value) if re.fullmatch(r"[-+\d.e]+", value) else value))
    return next(item for item in items if all(k in item and test(item[k], v) for k, test, v in conditions))


def lookup(ref: str, cache: dict | None = None):
    """The value at ``file#a.b[sel].c``: dotted keys into the file (list indices as numbers), and
    ``name[sel]`` picks from a list: ``[3]`` / ``[-1]`` by position, ``[step=2000]`` the first
    element whose ``step`` equals 2000, ``[val_mse<0.003]`` the first below 0.003. In a printed
    output (``.txt``) the path is a regular expression: the number its first group matches."""
    cache = {} if cache is None else cache
    name, _, path = ref.partition("#")
    if name not in cache:
        cache[name] = load_source(ref)
    value = cache[name]
    if isinstance(value, str):
        return float(re.search(path, value, re.MULTILINE).group(1).replace(",", ""))
    for key, sel in _PART.findall(path):
        if key:
            value = value[int(key)] if isinstance(value, list) else value[key]
        if sel:
            value = _select(value, sel)
    return value


_FUNCS = {"ceil": math.ceil, "floor": math.floor, "min": min, "max": max, "round": round, "abs": abs}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}


def evaluate(expr: str, names: dict) -> float:
    """Arithmetic over ``names``: numbers, + - * / //, unary minus, and ceil/floor/min/max/round/abs.
    Anything else raises ValueError (the table file holds data, not code)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not allowed in a table expression: {ast.dump(node)[:60]}")
    return ev(ast.parse(expr, mode="eval"))


def duration(seconds: float) -> str:
    """Seconds in words: ``48 s``, ``11 min``, ``1 h 36 min``, ``5.2 days``, ``290 days``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes} min"
    days = seconds / 86400
    return f"{days:.1f} days" if days < 10 else f"{days:,.0f} days"


def fmt(value, spec: str) -> str:
    """``spec`` a format spec (``.3g``, ``.1%``, ``,.0f``, ...) or ``dur`` (``duration``)."""
    return duration(value) if spec == "dur" else format(value, spec)


def resolve(spec: dict, cache: dict | None = None) -> str:
    """One template field: ``{"ref": "file#path", "fmt": ".2g"}``, or ``{"expr": "a * b / 3600",
    "args": {"a": "file#path", ...}, "fmt": ...}``; ``scale`` multiplies the value first."""
    cache = {} if cache is None else cache
    refs = {"value": spec["ref"]} if "ref" in spec else spec["args"]
    found = {}
    for name, ref in refs.items():
        try:
            found[name] = lookup(ref, cache)
        except (KeyError, IndexError, StopIteration, AttributeError, ValueError) as e:
            raise LookupError(f"{ref}: nothing there ({type(e).__name__}: {e})") from e
    value = found["value"] if "ref" in spec else evaluate(spec["expr"], found)
    if "scale" in spec:
        value = value * spec["scale"]
    return fmt(value, spec.get("fmt", "g"))


def render_row(row: dict, columns: list[str], cache: dict | None = None) -> list[str]:
    """The cells of one row: each column's template with its ``{name}`` fields filled from
    ``row["values"]`` (a field with no value raises KeyError)."""
    cache = {} if cache is None else cache
    values = {name: resolve(spec, cache) for name, spec in row.get("values", {}).items()}
    return [row[c].format_map(values) for c in columns]


def render_table(table: dict) -> str:
    """The markdown of ``results-table.json``: header, rule and one line per row."""
    cache: dict = {}
    lines = ["| " + " | ".join(table["header"]) + " |", "|" + "---|" * len(table["header"])]
    lines += ["| " + " | ".join(render_row(row, table["columns"], cache)) + " |" for row in table["rows"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="a run directory (recipe.toml, metrics.jsonl, "
                                                          "summary.json) or an lrcompress sweep directory")
    parser.add_argument("--out", type=Path, help="the summary JSON to write")
    parser.add_argument("--command", help="the command that made the run (default: rebuilt from the "
                                          "recipe name and the overrides)")
    parser.add_argument("--machine", help="the machine the run was made on (default: this one)")
    parser.add_argument("--note", help="a line to keep with the figures")
    parser.add_argument("--table", type=Path, help="print this results-table.json as markdown instead")
    args = parser.parse_args(argv)
    if args.table:
        print(render_table(json.loads(args.table.read_text())))
        return
    if args.run is None or args.out is None:
        parser.error("give a run directory and --out (or --table)")
    if (args.run / "sweep.json").is_file():
        out = summarize_sweep(args.run, args.command, args.machine, args.note)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out} ({len(out['points'])} points; unfinished: {out['unfinished'] or 'none'})")
        return
    out = summarize(args.run, args.command, args.machine, args.note)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    state = f"partial, step {out['steps']}" if out["partial"] else f"{out['steps']} steps"
    print(f"wrote {args.out} ({state}; {len(out['validation'])} validation points)")


if __name__ == "__main__":
    main()
