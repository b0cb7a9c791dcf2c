"""Compress a model in place, and merge it back: validate every target, fit, then apply.

Nothing touches the model until every target is found, checked (finite weights, a possible
rank) and fitted, so a bad input never leaves a model half converted. Recurrent layers get the
factored classes of ``lrcompress.nn`` in place (still ``nn.GRU`` etc. for ``isinstance``);
``merge`` restores plain dense modules.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Collection
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from .config import CompressionConfig, RankValue, Selection, TargetSpec, name_matches
from .errors import ConfigError, FormatError, RankError, TargetError
from .factorize import Factors, compose, fit_low_rank, fit_low_rank_plus_diagonal, weighted_spectrum
from .nn.cells import FactoredCell, factored_cell_class
from .nn.rnn import FactoredRNN, factored_class
from .progress import bar as progress_bar
from .parametrizations import LowRank, factorization, low_rank, max_rank, own_class, random_factors
from .report import Report, TargetReport, kind_label
from . import structures
from .structures import Fitted
from .targets import (Candidate, find_state_dict_targets, find_targets, recurrent_kind,
                      weight_norm_kind)
from .validate import check_weight
from .whitening import CALIBRATION_DAMPING


@dataclass
class Fit:
    """A decided target and its fitted factors (``Fitted``: module and originals, other structures)."""

    spec: TargetSpec
    factors: Factors | Fitted
    note: str = ""
    rel_error: float | None = None  # ||W - W_hat||_F / ||W||_F (low rank: factors.rel_error)

    @property
    def error(self) -> float:
        return self.factors.rel_error if self.rel_error is None else self.rel_error


def compress(model: nn.Module, rank: RankValue | None = None, *, energy: float | None = None,
             ratio: float | None = None, params: int | None = None, energy_scope: str = "matrix",
             diag: bool | str = False, tied: bool = False, include_input: bool = False, include_projection: bool = False,
             targets: Selection | list[str] = (), exclude: Selection | list[str] = (),
             ranks: dict[str, RankValue] | None = None, svd: str = "auto", diag_iters: int | None = None,
             seed: int = 0, config: CompressionConfig | None = None, progress: bool | None = False,
             calibration=None, forward=None, damping: float = CALIBRATION_DAMPING,
             allocation: str = "relative", structure: str = "lowrank", kron_factors=None, terms: int | None = None,
             tt_ranks=None, tt_shape=None, joint: bool = False, negatives: int | None = None) -> Report:
    """Replace the recurrent (and selected Linear) weights of ``model`` by SVD-fitted factors.

    In place; returns a ``Report``. Either pass the options or a ready ``config``.

    ``structure``: ``"lowrank"`` (default, the options below), or another structure of
    ``lrcompress.structures`` with its own options (docs/structures.md): ``"kronecker"``
    (``kron_factors=(64, 64)``, ``terms``), ``"tt"`` (``tt_ranks``, ``tt_shape``, ``joint``),
    ``"orthogonal"`` (every square recurrent gate block; ``negatives``). Every target is checked
    by the structure's ``check`` (shapes that factor, ranks that fit), then all are fitted
    (nearest Kronecker product, TT-SVD, polar factor), then registered: a bad option never
    leaves the model half converted. Each report row gives the structure, its options, the
    parameters and ``rel_error``. Budgets, calibration and per-target ranks are low rank only.

    The size: one of ``rank`` (per matrix: an int, a fraction of full rank or ``"energy=F"``),
    ``energy`` (``energy_scope="matrix"``: per matrix; ``"model"``: the largest singular values of
    all targets together), or a whole-model budget, ``ratio`` (parameters before / after at
    least this) or ``params`` (at most this many), for which ``lrcompress.budget`` chooses every
    target's rank, and with ``diag="auto"`` whether it takes a diagonal (docs/calibration.md).
    ``ranks`` overrides win everywhere; under a budget their cost is taken off it first.

    ``calibration``: inputs the model is run on (eval mode, no grad) before anything changes:
    a tensor, an iterable of batches or a ``DataLoader``; ``forward(model, batch)`` when
    ``model(batch)`` is not the call. Every fit then minimises the error of the target's output
    over that data (``lrcompress.calibration``), budgets and energies weigh errors the same way,
    and the report gives each target's and the whole model's ``output_error``. The model's
    outputs on all of the calibration data are kept (on CPU) to compare the compressed model's
    against: memory as large as those outputs. ``damping`` (``lambda >= 0``): every fit uses
    ``C + lambda mean(diag C) I`` for the second moment ``C``; 0 is the exact weighted optimum,
    large values tend to the plain fit (``whitening.whitening``; the default's evidence:
    docs/calibration.md). ``allocation`` (budgets): ``"relative"`` minimises the sum of every
    target's squared error relative to its own (weighted) norm, ``"absolute"`` the summed
    squared error itself (``lrcompress.budget``; docs/calibration.md says why relative is the default).

    A wrapper (``nn.DataParallel``/``DistributedDataParallel`` ``.module``, ``torch.compile``'s
    ``._orig_mod``, nested) is compressed through the module it wraps: report names are that
    module's names, and patterns may be given with or without the wrapper prefix. A weight
    reachable under several names (tied weights, a module registered twice) is refused
    (``TargetError`` naming every owner) rather than silently untied. PyTorch weight norm on a
    target is folded into its dense weight, once every check has passed, and then factored.
    ``targets``/``exclude`` follow peft's conventions (docs/targets.md): a list of exact names,
    dotted suffixes or globs; one string is a ``re.fullmatch`` regex; ``targets="all-linear"``
    selects every ``nn.Linear`` except the output layer (``targets.all_linear_names``).
    ``progress``: a bar over the targets on stderr (``None``: only when stderr is a terminal;
    see ``lrcompress.progress``).

    >>> model = torch.nn.GRU(8, 32)
    >>> print(compress(model, rank=4, diag=True).ratio > 1)
    True
    """
    if config is None:
        config = CompressionConfig(rank=rank, energy=energy, ratio=ratio, params=params, energy_scope=energy_scope,
                                   diag=diag, tied=tied, include_input=include_input,
                                   include_projection=include_projection, targets=targets,
                                   exclude=exclude, ranks=dict(ranks or {}), svd=svd,
                                   diag_iters=diag_iters, seed=seed, damping=damping, allocation=allocation,
                                   structure=structure, kron_factors=kron_factors, terms=terms, tt_ranks=tt_ranks,
                                   tt_shape=tt_shape, joint=joint, negatives=negatives)
    if forward is not None and calibration is None:  # forward= alone would be ignored without a word
        raise ConfigError("forward= says how to call the model on calibration batches: give calibration= too")
    model, prefix = unwrap(model)
    config = _without_prefix(config, prefix)
    before = count_params(model)
    modules = dict(model.named_modules())
    candidates = find_targets(model, config, prefix=prefix)
    _check_unshared(_owners(model.named_parameters(remove_duplicate=False), id), candidates)
    normed = {c.name: (modules[c.module], c.weight) for c in candidates
              if weight_norm_kind(modules[c.module], c.weight)}
    for c in candidates:
        _check_adoptable_but_weight_norm(modules[c.module], c.module, normed)
    if config.structure != structures.LOWRANK:
        if calibration is not None:
            raise ConfigError(f"calibration fits are low rank only; structure {config.structure!r} is fitted to the "
                              "weights alone (drop calibration=)")
        candidates = structure_candidates(candidates, config.structure)
    moments, reference = None, None
    if calibration is not None:  # measured on the untouched model
        from .calibration import collect_second_moments
        from .whitening import whitening

        calibration, reference = calibration_batches(calibration), []
        found = collect_second_moments(model, calibration, [c.name for c in candidates], progress=progress,
                                       forward=_recording(forward, reference))  # the dense outputs, same pass
        # factored once, used by spectra and fits
        moments = {name: whitening(m.C, damping=config.damping) for name, m in found.items()}
    weights = _current_weights(model, candidates)
    fits = fit_targets(candidates, weights, config, progress=progress, moments=moments, params_before=before)
    for module, weight in normed.values():  # every check passed: only now change the model
        _fold_weight_norm(module, weight)
    for f in fits:
        if f.spec.name in normed:
            f.note = "; ".join(filter(None, [f.note, "weight norm folded"]))
    apply(model, [f.spec for f in fits], {f.spec.name: f.factors for f in fits})
    from .pretrained import record_config

    record_config(model, config)  # for save_pretrained's lrcompress_config.json
    rows = [TargetReport.of(f.spec, f.error, f.note, fit=f.factors) for f in fits]
    report = Report(rows, before, count_params(model), config.to_dict())
    if reference is not None:
        report.output_error = output_error(reference, model_outputs(model, calibration, forward))
    return report


def calibration_batches(data) -> list:
    """The calibration batches as a list: the same batches, in the same order, at every pass.

    ``compress`` runs the data twice (statistics and the dense outputs, then the compressed
    outputs): a one-shot iterator would be empty the second time, and a shuffling ``DataLoader``
    would compare outputs of different inputs. A tensor, ``PackedSequence`` or dict is one batch.
    """
    from .calibration import as_batches  # the one place that tells a batch from an iterable of batches

    return list(as_batches(data))


def model_outputs(model: nn.Module, batches: list, forward=None) -> list[Tensor]:
    """The model's output on every batch (eval mode, no grad; modes restored), kept on CPU.

    The output is ``forward(model, batch)``, else ``model(batch)`` called as
    ``calibration.collect_second_moments`` calls it; a tuple gives its first tensor, a
    ``PackedSequence`` its data, a transformers ``ModelOutput`` its ``logits``.
    """
    modes = {m: m.training for m in model.modules()}
    outputs: list[Tensor] = []
    run = _recording(forward, outputs)
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return outputs


def _recording(forward, outputs: list[Tensor]):
    """A ``forward(model, batch)`` that runs the batch as calibration does and appends its output (CPU) to ``outputs``."""
    from .calibration import run_batch

    def run(model: nn.Module, batch):
        out = run_batch(model, batch, forward)
        outputs.append(_output_tensor(out).detach().cpu())
        return out

    return run


def output_error(reference: list[Tensor], outputs: list[Tensor]) -> float:
    """Relative Frobenius error ``||Y - Y_ref||_F / ||Y_ref||_F`` over all batches, in float64."""
    num = den = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        if out.shape != ref.shape:
            raise ConfigError(f"the compressed model's output has shape {tuple(out.shape)}, the dense model's "
                              f"{tuple(ref.shape)}: cannot compare them")
        ref64 = ref.double()
        num += float(((out.double() - ref64) ** 2).sum())
        den += float((ref64 ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _output_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, PackedSequence):
        return out.data
    if isinstance(getattr(out, "logits", None), Tensor):  # transformers' ModelOutput
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return _output_tensor(out[0])
    raise ConfigError(f"cannot measure the output error of a model returning {type(out).__name__}: "
                      "pass forward= returning a tensor")


def decide(candidates: list[Candidate], weights: dict[str, Tensor], config: CompressionConfig, *,
           moments: dict[str, Tensor] | None = None, params_before: int | None = None) -> list[tuple[TargetSpec, str]]:
    """Check every candidate and fix its rank, diagonal and tying; raises before any fitting.

    ``moments``: each target's input second moment (calibration), which weighs the spectra an
    energy rank or a budget reads. ``params_before``: the whole model's parameter count, which a
    ``ratio``/``params`` budget needs (the parameters outside the targets count in it).
    """
    decided = []
    for c in candidates:  # sparse, integer/bool/complex, empty, NaN/Inf: one line before any SVD
        check_weight(c.name, weights[c.name])
    for pattern in config.ranks:  # a mistyped override would silently become the global rank
        if not any(name_matches(pattern, n) for c in candidates for n in c.scopes):
            raise TargetError(f"rank pattern {pattern!r} matches no target (targets: "
                              f"{', '.join(c.name for c in candidates[:5])}{', ...' if len(candidates) > 5 else ''})")
    moments = moments or {}
    model_wide = config.budgeted or config.energy_scope == "model"
    fixed = {}  # rank per target from a per-matrix rule: every target, or the overrides under a model-wide rule
    for c in candidates:
        rule = config.override_for(*c.scopes) if model_wide else config.rule_for(*c.scopes)
        if rule is None:
            continue
        tied = config.tied and c.gates > 1
        full = max_rank(c.gates, c.rows, c.cols, tied)
        blocks = _blocks(weights[c.name], c.gates)
        s = weighted_spectrum(blocks, moments.get(c.name), tied=tied) if rule.kind == "energy" else None
        fixed[c.name] = rank = rule.resolve(full, s)
        where = f"{c.name} ({c.layer} {c.role}, {c.gates} block(s) of {c.rows}x{c.cols}{', tied' if tied else ''})"
        if not 1 <= rank <= full:
            raise RankError(f"rank {rule} is impossible for {where}: must be 1..{full}")
    # Under a budget even fully overridden ranks go through it: it checks they fit and picks diagonals.
    planned = _plan(candidates, weights, config, moments, fixed, params_before) if model_wide else {}
    for c in candidates:
        tied = config.tied and c.gates > 1
        rank, diag = planned.get(c.name) or (fixed[c.name], config.diag is True and c.rows == c.cols)
        notes = []
        if config.diag is True and not diag:
            notes.append(f"no diagonal: {c.rows}x{c.cols} blocks are not square")
        spec = TargetSpec(c.module, c.weight, c.layer, c.role, c.gates, c.rows, c.cols, rank, diag, tied)
        if spec.factored_params >= spec.dense_params:
            msg = f"rank {rank} is no smaller than dense ({spec.factored_params:,} >= {spec.dense_params:,} params)"
            warnings.warn(f"{spec.name}: {msg}", UserWarning, stacklevel=4)
            notes.append(msg)
        decided.append((spec, "; ".join(notes)))
    return decided


def _plan(candidates: list[Candidate], weights: dict[str, Tensor], config: CompressionConfig,
          moments: dict[str, Tensor], fixed: dict[str, int], params_before: int | None) -> dict[str, tuple[int, bool]]:
    """Rank and diagonal of every target under a model-wide rule: a ratio/params budget or energy over all targets.

    Each target's error curve is its (weighted) spectrum; with a diagonal, the spectrum of
    ``W - diag(W)`` (``lrcompress.budget`` says why). Overrides (``fixed``) keep their rank.
    """
    from .budget import Target, allocate, budget_for, energy_ranks, options, relative, step_gains

    targets = []
    for c in candidates:
        tied = config.tied and c.gates > 1
        blocks = _blocks(weights[c.name], c.gates)
        C = moments.get(c.name)
        gains = step_gains(weighted_spectrum(blocks, C, tied=tied))
        diag_gains = None
        if config.diag is not False and c.rows == c.cols and config.budgeted:
            hollow = blocks - torch.diag_embed(torch.diagonal(blocks, dim1=-2, dim2=-1))
            diag_gains = step_gains(weighted_spectrum(hollow, C, tied=tied))
        if config.budgeted and config.allocation == "relative":  # each target's error relative to ||W S||^2
            gains, diag_gains = relative(gains, diag_gains)
        targets.append(Target(c.name, c.gates, c.rows, c.cols, tied, options(gains, diag_gains, config.diag),
                              fixed.get(c.name)))
    if not config.budgeted:  # energy_scope="model"
        ranks = energy_ranks(targets, config.rule().value)
        return {c.name: (ranks[c.name], config.diag is True and c.rows == c.cols) for c in candidates}
    if params_before is None:
        raise ConfigError("a ratio or params budget needs the whole model's parameter count")
    budget = budget_for(params_before, ratio=config.ratio, params=config.params)
    asked = f"ratio {config.ratio:g}" if config.ratio is not None else f"params={config.params:,}"
    untouched = params_before - sum(c.gates * c.rows * c.cols for c in candidates)
    choices = allocate(targets, budget, untouched=untouched, asked=asked)
    return {name: (choice.rank, choice.diag) for name, choice in choices.items()}


def fit_targets(candidates: list[Candidate], weights: dict[str, Tensor], config: CompressionConfig, *,
                progress: bool | None = False, moments: dict[str, Tensor] | None = None,
                params_before: int | None = None) -> list[Fit]:
    """Decide every target, then fit its factors (a pure step: nothing is modified).

    ``moments``: input second moments by target name; a target with one gets the fit weighted by
    it (``factorize``'s ``C``). ``params_before``: see ``decide``.
    """
    if config.structure != structures.LOWRANK:
        return fit_structured(decide_structured(candidates, weights, config), weights, progress=progress,
                              options=config.structure_options())
    decided = decide(candidates, weights, config, moments=moments, params_before=params_before)
    moments = moments or {}
    fits = []
    for spec, note in progress_bar(decided, progress=progress, desc="factoring", unit="weight"):
        blocks = _blocks(weights[spec.name], spec.gates)
        C = moments.get(spec.name)
        if spec.diag:
            f = fit_low_rank_plus_diagonal(blocks, spec.rank, tied=spec.tied, method=config.svd,
                                           max_iter=config.diag_iters, seed=config.seed, C=C)
        else:
            f = fit_low_rank(blocks, spec.rank, tied=spec.tied, method=config.svd, seed=config.seed, C=C)
        fits.append(Fit(spec, f, note))
    return fits


def structure_candidates(candidates: list[Candidate], structure: str) -> list[Candidate]:
    """The candidates a structure takes by default: a square-only structure (orthogonal) leaves
    out recurrent weights whose blocks are not square (an LSTM's ``proj_size``), with a warning;
    ``TargetError`` when nothing is left."""
    if not structures.get(structure).square:
        return candidates
    skipped = [c for c in candidates if c.role == "recurrent" and c.rows != c.cols]
    if skipped:
        warnings.warn(f"structure {structure!r} needs square blocks: left out {', '.join(c.name for c in skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''} ({skipped[0].rows}x{skipped[0].cols} blocks)",
                      UserWarning, stacklevel=3)
    kept = [c for c in candidates if c not in skipped]
    if not kept:
        raise TargetError(f"no targets found: structure {structure!r} needs square gate blocks, and every recurrent "
                          f"weight found has non-square ones ({candidates[0].name}: {candidates[0].rows}x"
                          f"{candidates[0].cols})")
    return kept


def decide_structured(candidates: list[Candidate], weights: dict[str, Tensor],
                      config: CompressionConfig) -> list[tuple[TargetSpec, str]]:
    """Check every candidate against a non-low-rank structure's options (its class's ``check``:
    shapes that factor, ranks that fit) before anything is fitted; raises on the first misfit,
    naming the target and its block shape. A structure no smaller than dense is allowed, with a
    warning, as a rank is."""
    for c in candidates:
        check_weight(c.name, weights[c.name])
    options = config.structure_options()
    decided = []
    for c in candidates:
        where = f"{c.name} ({kind_label(c.layer, c.role)}, {c.gates} block(s) of {c.rows}x{c.cols})"
        normalised, notes = structures.check_options(config.structure, c.gates, c.rows, c.cols, options, where=where)
        spec = TargetSpec(c.module, c.weight, c.layer, c.role, c.gates, c.rows, c.cols, structure=config.structure,
                          options=normalised)
        if spec.factored_params >= spec.dense_params and not notes:  # (a class may have said so itself)
            msg = (f"{config.structure} {spec.describe()} is no smaller than dense "
                   f"({spec.factored_params:,} >= {spec.dense_params:,} params)")
            warnings.warn(f"{spec.name}: {msg}", UserWarning, stacklevel=4)
            notes.append(msg)
        decided.append((spec, "; ".join(notes)))
    return decided


def fit_structured(decided: list[tuple[TargetSpec, str]], weights: dict[str, Tensor], *,
                   progress: bool | None = False, options: dict | None = None) -> list[Fit]:
    """Fit every decided non-low-rank target (a pure step: nothing is modified). A fit may settle
    options of its own (the orthogonal fit's sign count): the spec records the fitted module's.
    ``options``: the options as the user gave them (default: each spec's normalised ones), so a
    fit can tell an option asked for from a default (an orthogonal fit's ``negatives``)."""
    fits = []
    for spec, note in progress_bar(decided, progress=progress, desc="fitting", unit="weight"):
        fitted, error = structures.fit(spec.structure, spec.gates, spec.rows, spec.cols,
                                       spec.options if options is None else options, weights[spec.name])
        fits.append(Fit(replace(spec, options=fitted.param.options()), fitted, note, error))
    return fits


def apply(model: nn.Module, specs: list[TargetSpec], factors: dict[str, Factors | Fitted]) -> nn.Module:
    """Register the factorizations ``specs`` on ``model`` with the given factors (``Fitted`` for
    structures other than low rank).

    Checks that every spec fits the model first; if registration still fails midway, the
    weights done so far are restored, so the model is never left half converted.
    """
    modules = dict(model.named_modules())
    for spec in specs:
        module = modules.get(spec.module)
        if module is None:
            raise FormatError(f"the model has no module {spec.module!r} (for {spec.name})")
        weight = getattr(module, spec.weight, None)
        if not isinstance(weight, Tensor):
            raise FormatError(f"the model has no weight {spec.name}")
        if tuple(weight.shape) != (spec.gates * spec.rows, spec.cols):
            raise FormatError(f"{spec.name} has shape {tuple(weight.shape)} in the model but "
                              f"{(spec.gates * spec.rows, spec.cols)} in the file")
        if parametrize.is_parametrized(module, spec.weight):
            raise TargetError(f"{spec.name} is already parametrized (already compressed?)")
        _check_adoptable(module, spec.module)
    done: list[tuple[nn.Module, str, Tensor, type]] = []
    try:
        for spec in specs:
            module = modules[spec.module]
            original, cls = getattr(module, spec.weight), type(module)
            if isinstance(module, nn.RNNBase) and not isinstance(module, FactoredRNN):
                module.__class__ = factored_class(type(module))
            elif isinstance(module, nn.RNNCellBase) and not isinstance(module, FactoredCell):
                module.__class__ = factored_cell_class(type(module))
            own_class(module)  # already parametrized (say, a deepcopy of a converted model): not the original's class
            done.append((module, spec.weight, original, cls))
            if spec.lowrank:
                low_rank(module, spec.weight, spec.rank, gates=spec.gates, diag=spec.diag, tied=spec.tied,
                         factors=factors[spec.name])
            else:
                structures.register(module, spec.weight, factors[spec.name])
    except Exception:
        for module, name, original, cls in reversed(done):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                module._parameters[name] = original
            module.__class__ = cls
        raise
    from .pretrained import guard  # local: pretrained imports io, which imports this module

    guard(model)  # a Hugging Face model's own save_pretrained would drop the factors
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every factored weight by its dense product, restoring plain modules. In place."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        own_class(module)  # a deepcopy shares the parametrized class: merging it must leave the original alone
        for name in list(module.parametrizations):
            if structures.parametrization(module, name) is not None:
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        if isinstance(module, FactoredRNN) and not parametrize.is_parametrized(module):
            module.__class__ = module._dense_class
            module._init_flat_weights()
        elif isinstance(module, FactoredCell) and not parametrize.is_parametrized(module):
            module.__class__ = module._dense_class
            module.__dict__.pop("_lrc_acceleration", None)  # a plain cell has nothing to accelerate
    from .pretrained import release

    release(model)  # dense again: transformers' own save_pretrained is right again
    return model


def factored_specs(model: nn.Module) -> list[TargetSpec]:
    """The spec of every weight of ``model`` that carries an lrcompress factorization."""
    specs = []
    for mod_name, module in model.named_modules():
        for weight in list(getattr(module, "parametrizations", {})):
            p = structures.parametrization(module, weight)
            if p is None:
                continue
            layer, role = recurrent_kind(module, weight)
            if isinstance(p, LowRank):
                L, R = module.parametrizations[weight].original0, module.parametrizations[weight].original1
                specs.append(TargetSpec(mod_name, weight, layer, role, p.gates, L.shape[1], R.shape[-1], p.rank,
                                        p.diag, p.tied))
            else:
                rows, cols = structures.weight_shape(module, weight, p)
                specs.append(TargetSpec(mod_name, weight, layer, role, p.gates, rows, cols,
                                        structure=structures.structure_of(p), options=p.options()))
    return specs


def factored_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with factor keys renamed to the file format's ``<name>.L/.R/.D``
    (other structures: ``<name>.original<i>`` and the parametrization's buffers ``<name>.<buffer>``)."""
    renames = {}
    for spec in factored_specs(model):
        prefix = f"{spec.module}.parametrizations.{spec.weight}" if spec.module else f"parametrizations.{spec.weight}"
        originals = spec.original_count()
        for i, (part, key) in enumerate(spec.factor_keys().items()):
            renames[f"{prefix}.original{i}" if i < originals else f"{prefix}.0.{part}"] = key
    return {renames.get(k, k): v for k, v in model.state_dict().items()}


def compress_state_dict(tensors: dict[str, Tensor], config: CompressionConfig, *,
                        progress: bool | None = False, linear: Collection[str] | None = None,
                        calibration=None) -> tuple[dict[str, Tensor], list[TargetSpec], Report]:
    """Compress a bare state dict (no model class): factors replace the selected weights.

    Report totals count every stored value, since a state dict does not tell parameters from
    buffers, except the buffers the conversion itself adds (scaled Cayley ``signs``: fixed, not
    trained); keys sharing one storage (tied weights) count once. A selected weight that shares
    its storage with another key raises ``TargetError``. ``linear``: the model's ``nn.Linear``
    names for ``targets="all-linear"`` (``targets.all_linear_names``; a state dict cannot tell).
    A ``ratio``/``params`` budget counts every stored value too. ``calibration`` is refused
    (``ConfigError``): without the model's code nothing can run the data.
    """
    if calibration is not None:
        raise ConfigError("bare state dicts cannot be calibrated: load the model class and use the Python API "
                          "(lrcompress.compress(model, ..., calibration=...))")
    candidates = find_state_dict_targets(tensors, config, linear=linear)
    # torch.load keeps tied weights as two keys over one storage: never untie them either.
    _check_unshared(_owners(tensors.items(), storage_key), candidates)
    if config.structure != structures.LOWRANK:
        candidates = structure_candidates(candidates, config.structure)
    fits = fit_targets(candidates, {c.name: tensors[c.name] for c in candidates}, config, progress=progress,
                       params_before=_numel(tensors))
    done = {f.spec.name for f in fits}
    out = {k: v for k, v in tensors.items() if k not in done}
    for f in fits:
        for key, t in zip(f.spec.factor_keys().values(), _stored_parts(f.factors)):
            out[key] = t.detach().contiguous()
    rows = [TargetReport.of(f.spec, f.error, f.note, fit=f.factors) for f in fits]
    specs = [f.spec for f in fits]
    # Buffers of the new structured weights (scaled Cayley signs) are stored but are not parameters:
    # left out, so this count equals compress()'s count_params of the same model.
    report = Report(rows, _numel(tensors), _numel(out) - structures.buffer_values(specs), config.to_dict())
    return out, specs, report


def _stored_parts(factors: Factors | Fitted) -> tuple[Tensor, ...]:
    """What a file stores for one weight, in ``TargetSpec.factor_keys`` order."""
    if isinstance(factors, Fitted):
        return (*factors.originals, *structures.persistent_buffers(factors.param).values())
    return tuple(t for t in (factors.L, factors.R, factors.D) if t is not None)


def merge_state_dict(tensors: dict[str, Tensor], specs: list[TargetSpec]) -> dict[str, Tensor]:
    """Rebuild the dense weight of every spec from its factors in a file-format state dict."""
    out = dict(tensors)
    for spec in specs:
        keys = spec.factor_keys()
        if spec.lowrank:
            parts = [out.pop(keys[k]) for k in keys]
            W = compose(*parts).flatten(0, 1).contiguous()
        else:
            fitted = structures.from_parts(spec.structure, spec.gates, spec.rows, spec.cols, spec.options,
                                           {k: out.pop(key) for k, key in keys.items()})
            with torch.no_grad():
                W = fitted.param(*fitted.originals).contiguous()
        # Broadcasting in compose could turn lying factor shapes into a wrong-sized weight: refuse it
        # (readers run validate.check_compressed first, which names the bad tensor).
        if tuple(W.shape) != (spec.gates * spec.rows, spec.cols):
            raise FormatError(f"{spec.name}: factors compose to {tuple(W.shape)}, the record says "
                              f"{(spec.gates * spec.rows, spec.cols)}")
        out[spec.name] = W
    return out


def factor_from_scratch(module: nn.Module, *, rank: RankValue | None = None, diag: bool = False,
                        tied: bool = False, include_input: bool = False, include_projection: bool = False,
                        structure: str = "lowrank", **options) -> None:
    """Factor a freshly built layer with random factors (no SVD): for training from scratch.

    ``structure`` other than ``"lowrank"`` takes that structure's config options instead of a rank
    (``kron_factors``, ``terms``; ``tt_ranks``, ``tt_shape``, ``joint``; ``negatives``: see
    ``CompressionConfig``); the originals come from the structure's ``random_originals`` at the
    scale of PyTorch's ``U(-1/sqrt(hidden), 1/sqrt(hidden))`` init.

    >>> gru = torch.nn.GRU(8, 16)
    >>> factor_from_scratch(gru, structure="kronecker", kron_factors=(4, 4))  # doctest: +SKIP
    """
    config = CompressionConfig(rank=rank, diag=diag, tied=tied, include_input=include_input,
                               include_projection=include_projection, structure=structure, **options)
    if config.structure == structures.LOWRANK and config.rule().kind == "energy":
        raise ConfigError(f"rank {rank!r}: an energy rank needs trained weights; give an int or a fraction")
    candidates = find_targets(module, config)
    if config.structure != structures.LOWRANK:
        candidates = structure_candidates(candidates, config.structure)
        specs = [spec for spec, _ in decide_structured(candidates, _current_weights(module, candidates), config)]
        modules = dict(module.named_modules())
        fitted = {s.name: structures.random_fitted(s.structure, s.gates, s.rows, s.cols, s.options,
                                                   bound=_default_bound(module, s.rows),
                                                   like=getattr(modules[s.module], s.weight)) for s in specs}
        apply(module, specs, fitted)
        return
    specs = [spec for spec, _ in decide(candidates, _current_weights(module, candidates), config)]
    apply(module, specs, {s.name: _random(s, module) for s in specs})


def reset_factors(module: nn.Module) -> None:
    """Re-draw the random factors of every factored weight of ``module`` (not its children)."""
    with torch.no_grad():
        for name in list(getattr(module, "parametrizations", {})):
            s = structures.structured(module, name)
            if s is not None:
                params = module.parametrizations[name]
                like = params.original0
                rows, cols = structures.weight_shape(module, name, s)
                drawn = structures.get(structures.structure_of(s)).code.random_originals(
                    s.gates, rows, cols, options=s.options(), bound=_default_bound(module, rows), dtype=like.dtype,
                    device=like.device)
                for i, t in enumerate(drawn):
                    getattr(params, f"original{i}").copy_(t)
                continue
            p = factorization(module, name)
            if p is None:
                continue
            params = module.parametrizations[name]
            L = params.original0
            rows = L.shape[1]
            cols = params.original1.shape[-1]
            f = random_factors(p.gates, rows, cols, p.rank, diag=p.diag, tied=p.tied,
                               bound=_default_bound(module, rows), dtype=L.dtype, device=L.device)
            for i, t in enumerate((f.L, f.R, f.D)[: 3 if p.diag else 2]):
                getattr(params, f"original{i}").copy_(t)


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _random(spec: TargetSpec, module: nn.Module) -> Factors:
    weight = getattr(dict(module.named_modules())[spec.module], spec.weight)
    return random_factors(spec.gates, spec.rows, spec.cols, spec.rank, diag=spec.diag, tied=spec.tied,
                          bound=_default_bound(module, spec.rows), dtype=weight.dtype, device=weight.device)


def _default_bound(module: nn.Module, rows: int) -> float:
    # nn.GRU/LSTM/RNN draw U(-1/sqrt(hidden), 1/sqrt(hidden)); nn.Linear about U(-1/sqrt(in), ...).
    return 1.0 / math.sqrt(getattr(module, "hidden_size", rows))


def _numel(tensors: dict[str, Tensor]) -> int:
    """Values stored in a state dict, counting keys that view the same storage once (tied weights)."""
    return sum(group[0][1].numel() for group in _owners(tensors.items(), storage_key).values())


def _current_weights(module: nn.Module, candidates: list[Candidate]) -> dict[str, Tensor]:
    modules = dict(module.named_modules())
    return {c.name: _effective_weight(modules[c.module], c.weight).detach() for c in candidates}


def _effective_weight(module: nn.Module, name: str) -> Tensor:
    # The old weight-norm hook refreshes the attribute only in forward: recompute g v / ||v||
    # so that an update since the last forward is not lost.
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
    return getattr(module, name)


def _fold_weight_norm(module: nn.Module, name: str) -> None:
    """Replace PyTorch weight norm on ``module.<name>`` by the plain weight ``g v / ||v||`` it computes."""
    if weight_norm_kind(module, name) == "hook":
        torch.nn.utils.remove_weight_norm(module, name)  # re-sets the weight: RNNs refresh their flat weights
        return
    own_class(module)  # a deepcopy may share the parametrized class: leave the copy's weights alone
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _check_adoptable_but_weight_norm(module: nn.Module, name: str, normed: dict[str, tuple[nn.Module, str]]) -> None:
    """``_check_adoptable``, except that weight norm on a target (folded later) is allowed."""
    others = [w for w in getattr(module, "parametrizations", {}) if normed.get(_join(name, w)) != (module, w)]
    if others or not parametrize.is_parametrized(module):
        _check_adoptable(module, name)


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside DataParallel/DistributedDataParallel/``torch.compile`` wrappers, and their key prefix.

    ``unwrap(torch.compile(nn.DataParallel(net)))`` is ``(net, "_orig_mod.module.")``: the prefix
    the wrappers add to every state-dict key.
    """
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        elif _is_compiled(model):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def _is_compiled(model: nn.Module) -> bool:
    # torch.compile's OptimizedModule; torch._dynamo is only imported if something compiled a model.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, getattr(dynamo, "OptimizedModule", ()))


def _without_prefix(config: CompressionConfig, prefix: str) -> CompressionConfig:
    """``config`` with ``prefix`` removed from its name patterns, so wrapped names select inner modules."""
    if not prefix:
        return config

    def strip(pattern: str) -> str:
        return pattern[len(prefix):] if pattern.startswith(prefix) and len(pattern) > len(prefix) else pattern

    def strip_all(selection):  # a regex (or "all-linear") stays: find_targets tries it with the prefix too
        return selection if isinstance(selection, str) else tuple(map(strip, selection))

    return replace(config, targets=strip_all(config.targets), exclude=strip_all(config.exclude),
                   ranks={strip(k): v for k, v in config.ranks.items()})


def _owners(named, identity) -> dict[object, list[tuple[str, object]]]:
    """Group ``(name, value)`` pairs by ``identity(value)`` (pairs whose identity is None stay alone)."""
    groups: dict[object, list[tuple[str, object]]] = {}
    for name, value in named:
        key = identity(value)
        groups.setdefault(("alone", name) if key is None else key, []).append((name, value))
    return groups


def storage_key(t: Tensor) -> tuple | None:
    """Equal for two tensors exactly when they are the same view of the same memory (None: no storage)."""
    try:
        if not t.numel():
            return None
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


def _check_unshared(groups: dict[object, list[tuple[str, object]]], candidates: list[Candidate]) -> None:
    """Refuse to factor a weight that other names share: factoring one owner would untie it."""
    owners = {name: [n for n, _ in group] for group in groups.values() for name, _ in group}
    selected = {c.name for c in candidates}
    for c in candidates:
        others = [n for n in owners.get(c.name, [c.name]) if n != c.name]
        if others:
            # Every selected owner must be skipped (one module under two names is two candidates).
            skip = [n for n in (c.name, *others) if n in selected]
            raise TargetError(f"{c.name} is shared with {', '.join(others)}; lrcompress will not untie shared "
                              f"weights: pass {' '.join(f'--exclude {n}' for n in skip)} (exclude={skip!r}) "
                              "to skip it")


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _blocks(W: Tensor, gates: int) -> Tensor:
    return W.reshape(gates, W.shape[0] // gates, W.shape[1])


def _check_adoptable(module: nn.Module, name: str) -> None:
    if (isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and not isinstance(module, (FactoredRNN, FactoredCell))
            and parametrize.is_parametrized(module)):
        raise TargetError(f"{name or '<root>'} already carries other parametrizations "
                          f"({', '.join(module.parametrizations)}); remove them before compressing")
