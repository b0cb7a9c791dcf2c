"""Does ``execution = "auto"`` pick the faster training path? Measured against the cost model.

For each case (a random factored GRU layer, a batch size, 100 steps) one training step
(forward and backward) is timed on the rebuilt path (``W = L R (+ D)`` then PyTorch's kernel)
and on the factored backward (``execution.bptt``), side by side in one process
(``execution.timing.time_layer``); the cost model's estimate of both for the same shapes is printed
beside them, and whether its choice is the faster path (a tie within 15% counts as either).

    python benchmarks/bench_training_choice.py --threads 1 --json benchmarks/results/training-choice-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dataclasses import replace

from lrcompress.execution.cost import PROFILES, WeightShape, estimate
from lrcompress.execution.timing import synthetic_layer, time_layer

from _common import machine  # this folder: see _common.py

# (layer, input size, batch): small batches, where the dense kernel's per-step overhead shows,
# and larger ones, near the tie.
CASES = [("gru:128:24:diag", 1, 1), ("gru:128:24:diag", 1, 4), ("gru:256:32:diag", 50, 1),
         ("gru:256:32:diag", 50, 4), ("gru:512:64:diag", 50, 1), ("gru:512:64:diag", 50, 4),
         ("gru:1024:64:diag", 50, 1), ("gru:1024:64:diag", 50, 4), ("gru:128:24:diag", 1, 64),
         ("gru:256:32:diag", 50, 64), ("gru:512:64:diag", 50, 32)]
STEPS = 100
TIE = 1.15


def shapes(spec: str, inputs: int) -> list[WeightShape]:
    _, hidden, rank, *flags = spec.split(":")
    n, d = int(hidden), int(rank)
    return [WeightShape(3, n, inputs, recurrent=False), WeightShape(3, n, n, d, diag="diag" in flags)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for spec, inputs, batch in CASES:
        layer = synthetic_layer(spec, inputs)
        t = time_layer(layer, batch=batch, steps=STEPS, train=True, rounds=args.rounds)
        e = estimate(shapes(spec, inputs), batch=batch, steps=STEPS, training=True)
        # the model before it had a training overhead of its own for the dense kernel
        old = estimate(shapes(spec, inputs), batch=batch, steps=STEPS, training=True,
                       profile=replace(PROFILES["cpu"], dense_train_step=None))
        measured = t.rebuilt_ms / t.factored_ms
        faster = "factored" if measured > 1 else "dense"
        tie = 1 / TIE <= measured <= TIE
        right, right_before = e.choice == faster or tie, old.choice == faster or tie
        rows.append({"layer": spec, "batch": batch, "steps": STEPS, "rebuilt_ms": t.rebuilt_ms,
                     "factored_ms": t.factored_ms, "measured_ratio": measured, "model_ratio": e.speedup,
                     "model_choice": e.choice, "right": right, "previous_model_ratio": old.speedup,
                     "previous_model_choice": old.choice, "previous_right": right_before})
        print(f"{spec:18s} B={batch:<3d} rebuilt {t.rebuilt_ms:7.1f} ms  factored {t.factored_ms:7.1f} ms  "
              f"ratio {measured:5.2f} (model {e.speedup:5.2f}, picks {e.choice}{'' if right else ': WRONG'}; "
              f"previous model {old.speedup:5.2f}, {old.choice}{'' if right_before else ': WRONG'})",
              flush=True)
    summary = {"command": "python benchmarks/bench_training_choice.py --threads " + str(args.threads),
               "machine": machine(), "threads": args.threads, "load_before": load_before,
               "load_after": os.getloadavg()[0], "rows": rows, "right": sum(r["right"] for r in rows),
               "previous_right": sum(r["previous_right"] for r in rows)}
    print(f"auto picks the faster path (or a tie within {TIE:.2f}x) in {summary['right']} of {len(rows)} cases "
          f"(previous model: {summary['previous_right']})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
