"""What a conversion did: one row per factored weight plus whole-model totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import TargetSpec
from .jsonout import dumps


@dataclass
class TargetReport:
    name: str
    layer: str
    role: str
    shape: tuple[int, int]  # dense weight shape
    gates: int
    rank: int
    diag: bool
    tied: bool
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_hat||_F / ||W||_F
    note: str = ""  # e.g. why no diagonal, or that the factors are larger than the dense matrix
    # How the diagonal fit ended (factorize.Factors; None/"" without a diagonal fit): iterations
    # after the first diagonal fit, the relative error decrease of the last one, and why it
    # stopped (factorize.DIAG_STOPS: converged, max_iter, stalled, exact).
    diag_iterations: int | None = None
    diag_last_change: float | None = None
    diag_stop: str = ""
    # With calibration data: ||(W - W_hat) v|| / ||W v|| over every input v the weight met there
    # (whitening.weighted_error), the relative error of this weight's output; None without data.
    output_error: float | None = None
    # The structure (lrcompress.structures) and its options: low rank's are rank, diag, tied.
    structure: str = "lowrank"
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, spec: TargetSpec, rel_error: float, note: str = "", *, fit=None) -> "TargetReport":
        """``fit``: the ``factorize.Factors`` of the target, for how its diagonal fit ended and,
        when fitted to calibration data, its output error."""
        options = {"rank": spec.rank, "diag": spec.diag, "tied": spec.tied} if spec.lowrank else dict(spec.options)
        return cls(spec.name, spec.layer, spec.role, (spec.gates * spec.rows, spec.cols), spec.gates, spec.rank,
                   spec.diag, spec.tied, spec.dense_params, spec.factored_params, rel_error, note,
                   getattr(fit, "diag_iterations", None), getattr(fit, "diag_last_change", None),
                   getattr(fit, "diag_stop", ""), getattr(fit, "weighted_error", None), spec.structure, options)

    @property
    def diag_fit(self) -> str:
        """How the diagonal fit ended, e.g. ``"4 it, converged"``; ``"-"`` without one."""
        return f"{self.diag_iterations} it, {self.diag_stop}" if self.diag_stop else "-"


@dataclass
class Report:
    """Per-target rows and totals; ``str()`` is a table, ``to_dict()``/``to_json()`` for scripts."""

    targets: list[TargetReport]
    params_before: int  # whole model
    params_after: int
    config: dict = field(default_factory=dict)
    # With calibration data: ||Y - Y_dense||_F / ||Y_dense||_F of the whole model's outputs on it.
    output_error: float | None = None

    @property
    def ratio(self) -> float:
        """Whole-model compression ratio, params before / after."""
        return self.params_before / self.params_after if self.params_after else float("inf")

    def to_dict(self) -> dict:
        return {"targets": [asdict(t) for t in self.targets], "params_before": self.params_before,
                "params_after": self.params_after, "ratio": self.ratio, "output_error": self.output_error,
                "config": self.config}

    def to_json(self, **kwargs) -> str:
        return dumps(self.to_dict(), **kwargs)  # strict JSON: a NaN/Inf is null

    def __str__(self) -> str:
        calibrated = any(t.output_error is not None for t in self.targets)
        if any(t.structure != "lowrank" for t in self.targets):
            return "\n".join(self._structure_table() + self._footer())
        header = ("target", "kind", "shape", "rank", "diag", "params", "factored", "rel.err",
                  *(("out.err",) if calibrated else ()), "diag fit")
        rows = [(t.name, kind_label(t.layer, t.role) + ("/tied" if t.tied else ""), f"{t.shape[0]}x{t.shape[1]}",
                 str(t.rank), "yes" if t.diag else "no", f"{t.params_before:,}", f"{t.params_after:,}",
                 f"{t.rel_error:.4g}", *((_number(t.output_error),) if calibrated else ()), t.diag_fit)
                for t in self.targets]
        lines = format_table(header, rows, right={2, 3, 5, 6, 7, 8} if calibrated else {2, 3, 5, 6, 7})
        return "\n".join(lines + self._footer())

    def _structure_table(self) -> list[str]:
        """The table of a conversion to another structure: its options instead of rank and diagonal."""
        from .structures import describe

        header = ("target", "kind", "shape", "structure", "options", "params", "factored", "rel.err")
        rows = [(t.name, kind_label(t.layer, t.role), f"{t.shape[0]}x{t.shape[1]}", t.structure,
                 describe(t.structure, t.options), f"{t.params_before:,}", f"{t.params_after:,}", f"{t.rel_error:.4g}")
                for t in self.targets]
        return format_table(header, rows, right={2, 5, 6, 7})

    def _footer(self) -> list[str]:
        notes = [f"  note: {t.name}: {t.note}" for t in self.targets if t.note]
        total = (f"model parameters: {self.params_before:,} -> {self.params_after:,} "
                 f"({self.ratio:.2f}x smaller)" if self.params_after <= self.params_before else
                 f"model parameters: {self.params_before:,} -> {self.params_after:,} (larger)")
        output = ([f"model output error on the calibration data: {self.output_error:.4g}"]
                  if self.output_error is not None else [])
        return notes + [total] + output


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_metric(name: str | None, value: float | None) -> str:
    """A metric for people: accuracies (names ending in ``accuracy``, kept as fractions in JSON
    and ``metrics.jsonl``) as percentages with two decimals (``0.93512`` -> ``93.51%``), as the
    paper quotes them; anything else with 4 significant digits; ``-`` for a missing value.

    >>> format_metric("accuracy", 0.93512), format_metric("ce", 0.0123456), format_metric("mse", None)
    ('93.51%', '0.01235', '-')
    """
    if value is None:
        return "-"
    if str(name or "").endswith("accuracy"):
        return f"{100.0 * value:.2f}%"
    return f"{value:.4g}"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> list[str]:
    """Plain-text table with aligned columns (``right``: indices of right-aligned columns)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]


def kind_label(layer: str, role: str) -> str:
    """The table's "kind" column: ``gru/recurrent``, and a plain Linear once (``linear``, not
    ``linear/linear``). The JSON keeps ``layer`` and ``role`` apart."""
    return layer if role == layer else f"{layer}/{role}"
