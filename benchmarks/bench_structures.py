"""Low rank, low rank plus diagonal, Kronecker and tensor-train at matched parameter counts (issue 11).

For a trained run (a run directory: its ``recipe.toml`` and weights), the recurrent weight of
every recurrent layer (for a GRU ``weight_hh_l0``: 3 gate blocks of ``n x n``) is converted by
``lrcompress.compress(model, structure=...)`` at budgets of ``1/f`` of its dense values (default
``f`` = 4, 8, 16, 32), each structure with the option that brings its recurrent parameter count
closest to the budget (``match``), and scored on the test split before any fine-tuning. Input
weights and the output layer stay dense. Per point: the structure and its options, recurrent and
whole-model parameters, the gap to the budget, the recurrent weight's relative Frobenius error
``||W - W_hat|| / ||W||`` (the report's ``rel_error``), the largest singular value of each gate
block kept (fitted over dense) and the test metric; and for reference the dense model and the
model with every recurrent weight set to zero (the floor a conversion has to beat).

A structure family is ``KIND[:SHAPE]``; its size knob is chosen per budget:

* ``lowrank`` -- rank ``r`` (``G m r + G r n`` values for ``G`` gate blocks of ``m x n``);
* ``lrd`` -- low rank plus diagonal, rank ``r`` (plus ``G m``);
* ``kronecker:16x32`` -- a sum of ``terms`` Kronecker products of the given factors
  (``G terms sum_i m_i n_i``; any ``kronecker.parse_factors`` form);
* ``tt:8x8x8`` -- a TT-matrix with those modes (``tensor_train.parse_shape``), TT-ranks
  "near uniform": every bond at ``r`` or ``r + 1``, capped at the bond's maximal rank
  (``sum_k r_{k-1} m_k n_k r_k`` per block); ``tt-joint:8x8x8`` -- one train for all gates
  (the fully tensorized RNN), the gate index a leading ``(G, 1)`` mode.

Ties go to the smaller count (a structure never gets more than the budget for free); a family
whose closest count is more than ``--tolerance`` off the budget is recorded as unmatched and
not evaluated.

    python benchmarks/bench_structures.py measure runs/ptb-gru-512 --test-every 3 \\
        --out benchmarks/results/structures-ptb-gru-512.json        # ~30 min on a busy 2-core CPU
    python benchmarks/bench_structures.py table benchmarks/results/structures-ptb-gru-512.json

The PTB run needs ``$LRCOMPRESS_DATA`` pointing at the folder with ``ptb.char.*.txt``. Its
test split is 15 batches of 256 sentences sorted by length: ``--test-every 3`` scores batches 0,
3, 6, 9 and 12 (every length, a third of the time); the dense model is then scored on the whole
split as well.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lrcompress as lrc
from lrcompress.config import CompressionConfig
from lrcompress.io import load_model, write_text_atomic
from lrcompress.structured.kronecker import parse_factors
from lrcompress.structured.tensor_train import format_shape, parse_shape
from lrcompress.targets import find_targets
from lrcompress.train import engine
from lrcompress.train.checkpoint import load_checkpoint
from lrcompress.train.recipe import load_recipe
from lrcompress.train.run import build

from _common import add_table_command, machine, run_study, study_parser  # this folder: see _common.py

FRACTIONS = (4, 8, 16, 32)
FAMILIES = ("lowrank", "lrd", "kronecker:16x32", "kronecker:32x16", "kronecker:8x64", "kronecker:8x8x8",
            "tt:8x8x8", "tt:4x8x4x4", "tt-joint:8x8x8")
TOLERANCE = 0.10  # largest |count / budget - 1| evaluated: one rank step of LRD at 1/32 of n = 512 is 12.5%
EVAL_BATCH = 256  # run.py's evaluation batch for a non-stream task (PTB sentences); any size gives the same mean


# -- sizes: every family's candidate options and their closed-form parameter counts ------------

@dataclass(frozen=True)
class Family:
    """One structure with its fixed shape; ``kind`` in lowrank, lrd, kronecker, tt, tt-joint."""

    spec: str
    kind: str
    shape: tuple = ()  # ((m, n), ...) Kronecker factors or TT modes

    @classmethod
    def parse(cls, spec: str) -> "Family":
        kind, _, shape = spec.partition(":")
        if kind in ("lowrank", "lrd") and not shape:
            return cls(spec, kind)
        if kind == "kronecker" and shape:
            return cls(spec, kind, _pairs(parse_factors(shape)))
        if kind in ("tt", "tt-joint") and shape:
            return cls(spec, kind, _pairs(parse_shape(shape)))
        raise SystemExit(f"structure family {spec!r} is not lowrank, lrd, kronecker:SHAPE, tt:SHAPE or tt-joint:SHAPE")


def _pairs(shape) -> tuple:
    return tuple((s, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in shape)


def tt_caps(sizes: list[int], ranks: list[int]) -> list[int]:
    """``ranks`` capped at each bond's maximal rank given its neighbours (``sizes[k] = m_k n_k``):
    ``r_k <= r_{k-1} p_k`` (forward) and ``r_k <= p_{k+1} r_{k+1}`` (backward), ``r_0 = r_d = 1``."""
    out, left = list(ranks), 1
    for k in range(len(out)):
        out[k] = left = min(out[k], left * sizes[k])
    right = 1
    for k in reversed(range(len(out))):
        out[k] = right = min(out[k], right * sizes[k + 1])
    return out


def tt_count(sizes: list[int], ranks: list[int]) -> int:
    """Values of one train: ``sum_k r_{k-1} m_k n_k r_k``."""
    r = [1, *ranks, 1]
    return sum(r[k] * p * r[k + 1] for k, p in enumerate(sizes))


def candidates(family: Family, gates: int, rows: int, cols: int):
    """Every size of ``family`` for ``gates`` blocks of ``rows x cols``: ``(compress options, recurrent
    parameters)``, the count in closed form (checked against the report when converting)."""
    if family.kind in ("lowrank", "lrd"):
        diag = family.kind == "lrd"
        for r in range(1, min(rows, cols) + 1):
            yield {"rank": r, "diag": diag}, gates * r * (rows + cols) + (gates * rows if diag and rows == cols else 0)
    elif family.kind == "kronecker":
        p = [m * n for m, n in family.shape]
        factors = tuple(m for m, _ in family.shape) if all(m == n for m, n in family.shape) else family.shape
        for t in range(1, math.prod(p) // max(p) + 1):  # the most terms a fit can use (docs/structures.md)
            yield {"structure": "kronecker", "kron_factors": factors, "terms": t}, gates * t * sum(p)
    else:
        joint = family.kind == "tt-joint"
        modes = list(family.shape)
        if joint:  # the gate index as the leading row mode, as TensorTrain.check adds it
            modes = [(gates, 1), *modes]
        sizes = [m * n for m, n in modes]
        bonds, trains = len(sizes) - 1, 1 if joint else gates
        top = max(tt_caps(sizes, [math.prod(sizes)] * bonds))
        seen = set()
        for r in range(1, top + 1):
            for extra in itertools.product((0, 1), repeat=bonds):
                ranks = tuple(tt_caps(sizes, [r + e for e in extra]))
                if ranks not in seen:
                    seen.add(ranks)
                    yield ({"structure": "tt", "tt_shape": tuple(family.shape), "tt_ranks": list(ranks),
                            "joint": joint}, trains * tt_count(sizes, list(ranks)))


def match(family: Family, gates: int, rows: int, cols: int, budget: int) -> tuple[dict, int]:
    """The options whose recurrent count is closest to ``budget`` (ties: the smaller count, then the
    more uniform TT-ranks)."""
    def key(item):
        options, count = item
        ranks = options.get("tt_ranks", [0])
        return abs(count - budget), count > budget, max(ranks) - min(ranks)
    return min(candidates(family, gates, rows, cols), key=key)


def recurrent_shape(model: nn.Module) -> tuple[list[str], int, int, int]:
    """(target names, gates, rows, cols) of the model's recurrent weights (all of one shape)."""
    targets = find_targets(model, CompressionConfig(rank=1))
    shapes = {(t.gates, t.rows, t.cols) for t in targets}
    if len(shapes) != 1:
        raise SystemExit(f"recurrent weights of several shapes {sorted(shapes)}: one budget per shape is not supported")
    return [t.name for t in targets], *shapes.pop()


def plan(model: nn.Module, families: list[str], fractions: list[float], tolerance: float = TOLERANCE) -> list[dict]:
    """Every (fraction, family) point: budget, options, predicted recurrent count, gap, matched."""
    names, gates, rows, cols = recurrent_shape(model)
    dense = len(names) * gates * rows * cols
    points = []
    for fraction in fractions:
        budget = round(gates * rows * cols / fraction)
        for spec in families:
            options, count = match(Family.parse(spec), gates, rows, cols, budget)
            gap = count / budget - 1
            points.append({"fraction": fraction, "budget": budget * len(names), "family": spec, "gates": gates,
                           "options": options,
                           "recurrent_params": count * len(names), "dense_recurrent_params": dense,
                           "gap": gap, "matched": abs(gap) <= tolerance})
    return points


def convert(dense: nn.Module, point: dict) -> tuple[nn.Module, dict]:
    """A converted copy of ``dense`` at ``point`` and what the report says: recurrent and total
    parameters, the recurrent weights' relative error (over all targets: root of the summed squared
    errors over the root of the summed squared norms), the normalised options, fit seconds."""
    model = copy.deepcopy(dense)
    weights = {name: _weight(model, name).double().clone() for name in recurrent_shape(model)[0]}
    start = time.perf_counter()
    report = lrc.compress(model, **point["options"])
    seconds = time.perf_counter() - start
    rows = report.to_dict()["targets"]
    recurrent = sum(r["params_after"] for r in rows)
    if recurrent != point["recurrent_params"]:  # the closed form and the library disagree: a bug, not noise
        raise SystemExit(f"{point['family']} {point['options']}: report says {recurrent} recurrent parameters, "
                         f"the closed form {point['recurrent_params']}")
    norms = {name: w.norm().item() for name, w in weights.items()}
    error = math.sqrt(sum((r["rel_error"] * norms[r["name"]]) ** 2 for r in rows) / sum(v * v for v in norms.values()))
    # Why a fit keeps or loses the dynamics: the largest singular value of every gate block, fitted
    # over dense (low rank keeps it exactly: Eckart-Young keeps the top singular triplets).
    kept = [top_singular(_weight(model, name), point["gates"]) / top_singular(w, point["gates"])
            for name, w in weights.items()]
    return model, {"recurrent_params": recurrent, "params": report.params_after, "rel_error": error,
                   "top_singular_kept": torch.cat(kept).tolist(), "options_used": rows[0]["options"],
                   "fit_seconds": seconds}


def top_singular(weight: torch.Tensor, gates: int) -> torch.Tensor:
    """The spectral norm of each of the ``gates`` stacked blocks of ``weight`` (float64)."""
    blocks = weight.detach().double().reshape(gates, -1, weight.shape[-1])
    return torch.linalg.matrix_norm(blocks, ord=2)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight ``name`` (dotted) as the model uses it: a parametrized one is rebuilt."""
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr).detach()


# -- the trained model and its test metric -----------------------------------------------------

def load_run(run: Path, weights: str | None = None):
    """(task, recipe, dense model, weights path) of a run directory (``model.safetensors``, else
    the best checkpoint)."""
    recipe = load_recipe(run / "recipe.toml")
    task, model = build(recipe)
    path = run / (weights or ("model.safetensors" if (run / "model.safetensors").is_file() else "best.safetensors"))
    if path.name == "model.safetensors":
        load_model(model, path)
    else:
        load_checkpoint(path).restore(model)
    model.eval()
    return task, recipe, model, path


def test_metrics(model: nn.Module, task, every: int = 1) -> dict:
    """The task's metrics on the test split, or on every ``every``-th batch of it: PTB's batches run
    from the shortest sentences to the longest, so a stride keeps every length (a prefix would not)."""
    batch = EVAL_BATCH if not task.stateful else 32  # a stream task keeps its training layout (run.py)

    def data():
        return itertools.islice(task.batches("test", batch, seed=0, shuffle=False), 0, None, every)
    return engine.evaluate(model, data, task=task)


def _sentences(task, every: int) -> int:
    batch = EVAL_BATCH if not task.stateful else 32
    return sum(len(b.x) for b in itertools.islice(task.batches("test", batch, seed=0, shuffle=False), 0, None, every))


def cmd_measure(args) -> None:
    task, recipe, dense, weights = load_run(args.run, args.weights)
    metric = task.metric
    start = time.perf_counter()
    dense_metrics = test_metrics(dense, task, args.test_every)
    names, gates, rows, cols = recurrent_shape(dense)
    print(f"{args.run} ({weights.name}): {lrc.count_params(dense):,} params, recurrent {names} "
          f"{gates} x {rows}x{cols}; dense test {metric} {dense_metrics[metric]:.4f} "
          f"({time.perf_counter() - start:.0f}s per evaluation)", flush=True)
    result = {"command": " ".join(["python", "benchmarks/bench_structures.py", *sys.argv[1:]]),
              "machine": machine(), "load_before": os.getloadavg(), "run": str(args.run), "weights": weights.name,
              "recipe": recipe["meta"]["name"], "metric": metric, "params": lrc.count_params(dense),
              "recurrent": {"names": names, "gates": gates, "rows": rows, "cols": cols},
              "test_every": args.test_every, "test_sequences": _sentences(task, args.test_every),
              "test_sequences_all": _sentences(task, 1), "eval_batch": EVAL_BATCH if not task.stateful else 32,
              "tolerance": args.tolerance, "dense": {"test": dense_metrics}, "points": []}
    # The floor a conversion should beat: no recurrent matrix at all (every W_hh zero, biases kept).
    zero = copy.deepcopy(dense)
    with torch.no_grad():
        for name in names:
            zero.get_parameter(name).zero_()
    result["zero_recurrent"] = {"params": lrc.count_params(dense) - len(names) * gates * rows * cols,
                                "test": test_metrics(zero, task, args.test_every)}
    print(f"recurrent weights zero: test {metric} {result['zero_recurrent']['test'][metric]:.4f}", flush=True)
    if args.test_every > 1:  # the dense model on the whole split too, to compare the subset with
        result["dense"]["test_all"] = test_metrics(dense, task)
        print(f"dense on the whole test split: {metric} {result['dense']['test_all'][metric]:.4f}", flush=True)
    for point in plan(dense, args.families, args.fractions, args.tolerance):
        result["points"].append(point)
        if point["matched"]:
            model, row = convert(dense, point)
            metrics = test_metrics(model, task, args.test_every)
            point.update(row, test=metrics, increase=metrics[metric] - dense_metrics[metric])
            print(f"  1/{point['fraction']:g} {point['family']:<16} {_size(point):<22} {row['recurrent_params']:>8,} "
                  f"({point['gap']:+.1%})  rel error {row['rel_error']:.3f}  test {metric} {metrics[metric]:.4f} "
                  f"({point['increase']:+.4f})  fit {row['fit_seconds']:.1f}s", flush=True)
        else:
            print(f"  1/{point['fraction']:g} {point['family']:<16} unmatched: closest {point['recurrent_params']:,} "
                  f"({point['gap']:+.1%})", flush=True)
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)  # after every point
    result["load_after"] = os.getloadavg()
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


# -- the table ---------------------------------------------------------------------------------

def _size(point: dict) -> str:
    """The size knob a point chose: ``r 64``, ``terms 51``, ``TT-ranks 31,31``."""
    o = point["options"]
    if "rank" in o:
        return f"rank {o['rank']}"
    if "terms" in o:
        return f"terms {o['terms']}"
    return "TT-ranks " + ",".join(map(str, o["tt_ranks"]))


def _label(family: str) -> str:
    kind, _, shape = family.partition(":")
    names = {"lowrank": "low rank", "lrd": "low rank + diagonal", "kronecker": "Kronecker", "tt": "TT",
             "tt-joint": "TT joint (all gates)"}
    if not shape:
        return names[kind]
    return f"{names[kind]} {format_shape(_pairs(parse_factors(shape) if kind == 'kronecker' else parse_shape(shape)))}"


def table(summary: dict) -> str:
    """The markdown table of a ``measure`` summary: one row per point, by budget then by test metric."""
    metric = summary["metric"]
    dense = summary["dense"]["test"][metric]
    rec = summary["recurrent"]
    lines = [f"| budget | structure | size | recurrent params (gap) | total params | rel. error of W_hh | "
             f"top singular value kept (per gate) | test {metric} (+ over dense) |", "|---|---|---|---|---|---|---|---|",
             f"| dense | dense | | {len(rec['names']) * rec['gates'] * rec['rows'] * rec['cols']:,} | "
             f"{summary['params']:,} | 0 | 1 | {dense:.3f} |"]
    if "zero_recurrent" in summary:  # the floor: the recurrent weight left out (zero)
        z = summary["zero_recurrent"]
        lines.append(f"| 0 | W_hh = 0 | | 0 | {z['params']:,} | 1 | 0 | {z['test'][metric]:.3f} "
                     f"({z['test'][metric] - dense:+.3f}) |")
    order = sorted(summary["points"], key=lambda p: (p["fraction"], not p["matched"],
                                                     p.get("test", {}).get(metric, math.inf)))
    for p in order:
        head = f"| 1/{p['fraction']:g} ({p['budget']:,}) | {_label(p['family'])} | {_size(p)} | "
        if not p["matched"]:
            lines.append(head + f"{p['recurrent_params']:,} ({p['gap']:+.1%}) | unmatched | | | |")
            continue
        kept = "/".join(f"{v:.2f}" for v in p["top_singular_kept"])
        lines.append(head + f"{p['recurrent_params']:,} ({p['gap']:+.1%}) | {p['params']:,} | {p['rel_error']:.3f} | "
                     f"{kept} | {p['test'][metric]:.3f} ({p['increase']:+.3f}) |")
    return "\n".join(lines)


def cmd_table(args) -> None:
    print(table(json.loads(args.summary.read_text())))


def main(argv=None) -> None:
    parser, sub = study_parser(__doc__)
    p = sub.add_parser("measure", help="every family at every budget, before fine-tuning")
    p.add_argument("run", type=Path, help="run directory (recipe.toml + weights)")
    p.add_argument("--weights", help="weights file in the run (default: model.safetensors, else best.safetensors)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                   help="budgets as 1/f of the recurrent weight's dense values (default 4 8 16 32)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES),
                   help=f"structure families (default {' '.join(FAMILIES)})")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="largest |count/budget - 1| evaluated (default 0.10)")
    p.add_argument("--test-every", type=int, default=1,
                   help=f"score every K-th test batch of {EVAL_BATCH} sequences (default 1: the whole split)")
    p.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    p.set_defaults(run_command=cmd_measure)
    add_table_command(sub, cmd_table)
    run_study(parser, argv)


if __name__ == "__main__":
    main()
