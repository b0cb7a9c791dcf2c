"""What ``lrcompress inspect`` shows: spectra of dense weights, or a compressed file's layers."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CompressionConfig, TargetSpec
from .factorize import rank_for_energy
from .progress import bar as progress_bar
from .report import format_table, kind_label
from .structures import buffer_values, describe
from .targets import find_state_dict_targets
from .validate import check_weight

GATE_NAMES = {("gru", 3): "rzn", ("lstm", 4): "ifgo"}
ENERGY_LEVELS = (0.5, 0.9, 0.95, 0.99)


@dataclass
class Spectra:
    """Per matrix (gate block): the rank reaching each energy level, and energy kept per rank."""

    rows: list[dict]
    ranks: list[int]

    def to_dict(self) -> dict:
        return {"matrices": self.rows, "ranks": self.ranks, "energy_levels": list(ENERGY_LEVELS)}

    def __str__(self) -> str:
        header = ("matrix", "gate", "shape", *(f"r@{e:g}" for e in ENERGY_LEVELS), *(f"E@{r}" for r in self.ranks))
        body = [(r["name"], r["gate"], f"{r['shape'][0]}x{r['shape'][1]}",
                 *(str(r["rank_for_energy"][f"{e:g}"]) for e in ENERGY_LEVELS),
                 *(_pct(r["energy_at_rank"].get(str(k))) for k in self.ranks)) for r in self.rows]
        lines = format_table(header, body, right=set(range(2, len(header))))
        return "\n".join(lines + ["r@F: smallest rank keeping share F of the squared singular values; "
                                  "E@k: share kept at rank k"])


def spectra(tensors: dict[str, Tensor], ranks: list[int], *, include_input: bool = False,
            targets: tuple[str, ...] = (), progress: bool | None = False,
            linear: Collection[str] | None = None) -> Spectra:
    """Singular-value energy of every recurrent (and selected) matrix of a dense state dict.

    ``progress``: a bar over the matrices (exact SVDs, slow for large ones) on stderr; ``None``
    draws it when stderr is a terminal (``lrcompress.progress``). ``linear``: the model's
    ``nn.Linear`` names, which ``targets=("all-linear",)`` needs (``find_state_dict_targets``).

    Raises ``WeightError`` (one line) for a sparse, non-floating, empty or non-finite matrix: an
    SVD of those either fails deep inside LAPACK or returns meaningless numbers.
    """
    config = CompressionConfig(rank=1, include_input=include_input, include_projection=True, targets=targets)
    candidates = find_state_dict_targets(tensors, config, linear=linear)
    for c in candidates:  # every matrix checked before any SVD
        check_weight(c.name, tensors[c.name], action="analyse")
    rows = []
    for c in progress_bar(candidates, progress=progress, desc="spectra", unit="matrix"):
        blocks = tensors[c.name].detach().double().reshape(c.gates, c.rows, c.cols)
        s = torch.linalg.svdvals(blocks)
        names = GATE_NAMES.get((c.layer, c.gates), "-" * c.gates) if c.role != "projection" else "-"
        for g in range(c.gates):
            s2 = s[g] ** 2
            if not s2.sum() > 0:  # an all-zero block: rank 0 represents it exactly, every rank keeps all of it
                needed, kept = {f"{e:g}": 0 for e in ENERGY_LEVELS}, [1.0] * len(s2)
            else:
                needed = {f"{e:g}": rank_for_energy(s[g:g + 1], e) for e in ENERGY_LEVELS}
                kept = (s2.cumsum(0) / s2.sum()).tolist()
            rows.append({
                "name": c.name, "gate": names[g], "shape": [c.rows, c.cols],
                "rank_for_energy": needed,
                "energy_at_rank": {str(k): kept[min(k, len(kept)) - 1] for k in ranks},
            })
    return Spectra(rows, ranks)


@dataclass
class CompressedSummary:
    rows: list[dict]
    stored: int  # values stored in the file
    dense: int  # values the dense model would store
    buffers: int = 0  # of ``stored``: the structured weights' fixed buffers (scaled Cayley signs), not parameters

    @property
    def parameters(self) -> int:
        """Trainable values: ``stored`` less the structured weights' buffers (convert's count)."""
        return self.stored - self.buffers

    def to_dict(self) -> dict:
        return {"targets": self.rows, "stored_values": self.stored, "parameters": self.parameters,
                "buffer_values": self.buffers, "dense_values": self.dense,
                "ratio": self.dense / self.parameters if self.parameters else None}

    def __str__(self) -> str:
        errors = any(r["rel_error"] is not None for r in self.rows)
        structured = any(r["structure"] != "lowrank" for r in self.rows)
        if structured:  # the structure and its options in words instead of rank / diag / tied
            header = ("target", "kind", "shape", "structure", "options", "dense", "factored", "ratio")
            right = {2, 5, 6, 7}
        else:
            header = ("target", "kind", "shape", "rank", "diag", "tied", "dense", "factored", "ratio")
            right = {2, 3, 6, 7, 8}
        body = []
        for r in self.rows:
            what = ((r["structure"], describe(r["structure"], r["options"])) if structured else
                    (str(r["rank"]), "yes" if r["diag"] else "no", "yes" if r["tied"] else "no"))
            body.append((r["name"], kind_label(r["layer"], r["role"]), f"{r['shape'][0]}x{r['shape'][1]}", *what,
                         f"{r['dense_params']:,}", f"{r['factored_params']:,}",
                         f"{r['dense_params'] / r['factored_params']:.2f}x",
                         *((_number(r["rel_error"]),) if errors else ())))
        if errors:
            header += ("rel.err",)
            right |= {len(header) - 1}
        ratio = f"{self.dense / self.parameters:.2f}x smaller" if self.parameters else "no parameters"
        if self.buffers:
            total = (f"file: {self.parameters:,} parameters for a dense model of {self.dense:,} ({ratio}); it also "
                     f"stores {self.buffers:,} values of fixed buffers (the scaled Cayley signs), not parameters")
        else:
            total = f"file: {self.stored:,} stored values for a dense model of {self.dense:,} ({ratio})"
        note = ["rel.err: ||W - W_hat||_F / ||W||_F when converted (recorded by lrcompress convert)"] if errors else []
        return "\n".join(format_table(header, body, right=right) + [total] + note)


def compressed_summary(tensors: dict[str, Tensor], specs: list[TargetSpec],
                       shared: dict[str, str] | None = None,
                       errors: dict[str, float] | None = None) -> CompressedSummary:
    """Rows per factored weight and the file's totals; ``shared`` keys (tied weights stored twice,
    see ``validate.shared_tensors``) are counted once, as the conversion counted them. ``errors``:
    each target's relative error when it was converted (``validate.recorded_errors``), if recorded.

    ``stored`` counts every value in the file, ``parameters`` leaves out the structured weights'
    fixed buffers (scaled Cayley ``signs``), and ``dense`` is the dense model's parameters: the
    counts ``lrcompress convert`` and ``compress`` report.

    A row holds the file's record (``structure`` and ``options``: low rank's are ``rank``, ``diag``,
    ``tied``), the dense and factored parameter counts and ``rel_error`` (None when not recorded).
    """
    shared, errors = shared or {}, errors or {}
    stored = sum(t.numel() for k, t in tensors.items() if k not in shared)
    buffers = buffer_values(specs)  # stored, not parameters: in neither the compressed nor the dense count
    rows = [{**s.to_dict(), "name": s.name, "structure": s.structure,
             "options": {"rank": s.rank, "diag": s.diag, "tied": s.tied} if s.lowrank else s.options,
             "shape": [s.gates * s.rows, s.cols], "dense_params": s.dense_params,
             "factored_params": s.factored_params, "rel_error": errors.get(s.name)} for s in specs]
    dense = stored - buffers + sum(s.dense_params - s.factored_params for s in specs)
    return CompressedSummary(rows, stored, dense, buffers)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"
