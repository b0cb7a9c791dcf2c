"""``StabiliserCallback``: the paper's training stabilisers inside a Hugging Face ``Trainer``.

The Trainer's update, as ``transformers`` 5 runs it: backward, ``max_grad_norm`` clipping
(``args.max_grad_norm``, by global norm), ``on_pre_optimizer_step``, ``optimizer.step()``,
``on_optimizer_step``, the lr scheduler, ``on_step_end``, logging. The callback uses:

- ``on_init_end``/``on_train_begin``: weight normalisation of the factor matrices
  (``lrcompress.train.weight_norm``, appendix A.2), installed once; an optimiser that already
  exists (``Trainer(optimizers=...)``) gets the new scale and direction parameters in place of
  the matrices they replace;
- ``on_pre_optimizer_step``: a non-finite gradient norm is counted and handled by
  ``nan_policy``: ``skip`` sets every gradient to ``None`` so the optimiser leaves parameters
  and state alone (torch optimisers skip parameters without a gradient); ``decay`` replaces
  every gradient by 0.1 x the parameter, as the authors' code does; then optional element clipping;
- ``on_optimizer_step``: the row max-norm constraint (``lrcompress.train.max_row_norm_``);
- ``on_log``: compression figures (``lrcompress/params``, ``lrcompress/ratio``, ...) and
  ``lrcompress/nan_events`` added to each log record.

Needs ``transformers`` (``pip install lrcompress[hf]``). See docs/trainer.md.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # the core never needs transformers; this module does
    raise ImportError("lrcompress.integrations.StabiliserCallback needs transformers: "
                      "pip install lrcompress[hf]") from exc

from torch import nn

from ..convert import count_params, factored_specs
from ..errors import ConfigError
from ..train.stabilisers import Stabiliser, has_weight_norm, remove_weight_norm, weight_norm

NAN_POLICIES = ("skip", "decay", "none")
PREFIX = "lrcompress/"


def compression_figures(model: nn.Module) -> dict[str, float]:
    """What a compressed ``model`` saves: ``params`` (now), ``dense_params`` (the same model with
    every factored weight dense), ``ratio`` (dense / now) and ``factored_<role>``, the number of
    factored weights per role (recurrent, input, projection, linear). Keys carry the
    ``lrcompress/`` prefix, which TensorBoard shows as one group.

    >>> compression_figures(model)   # doctest: +SKIP
    {'lrcompress/params': 1234, 'lrcompress/dense_params': 5678, 'lrcompress/ratio': 4.6, ...}
    """
    specs = factored_specs(model)
    params = count_params(model)
    dense = params + sum(s.dense_params - s.factored_params for s in specs)
    figures = {"params": params, "dense_params": dense, "ratio": round(dense / params, 4) if params else 1.0}
    for spec in specs:
        key = f"factored_{spec.role}"
        figures[key] = figures.get(key, 0) + 1
    return {PREFIX + k: v for k, v in figures.items()}


class StabiliserCallback(TrainerCallback):
    """The paper's stabilisers for ``transformers.Trainer``.

    - ``nan_policy``: ``"skip"`` (default), ``"decay"`` or ``"none"``, on a NaN/Inf gradient norm
      (the Trainer's own ``max_grad_norm`` clipping runs before and spreads a NaN to every
      gradient: ``skip`` drops them all). Events are counted in ``nan_events``.
    - ``max_norm``: clip the row norms of the factor matrices (and the input matrices of
      factored recurrent layers) to this after every update (the paper: 10; 0 = off).
    - ``weight_norm``: weight-normalise those matrices when training begins; ``fold_at_end``
      folds the normalisation back when it ends (so ``lrcompress.save_model`` works).
    - ``clip``/``clip_value``: ``"element"`` clamps each gradient entry to ±``clip_value``
      after the non-finite check (the paper's clipping; set ``max_grad_norm=0`` in the
      ``TrainingArguments`` to use it alone); ``"none"`` (default) leaves clipping to the Trainer.
    - ``log_figures``: add ``compression_figures`` and ``lrcompress/nan_events`` to each log.

    Raises ``ConfigError`` on a bad value.

    >>> Trainer(model=model, args=args, callbacks=[StabiliserCallback(nan_policy="skip", max_norm=10)])  # doctest: +SKIP
    """

    def __init__(self, nan_policy: str = "skip", max_norm: float = 0.0, *, weight_norm: bool = False,
                 fold_at_end: bool = True, clip: str = "none", clip_value: float = 1.0, log_figures: bool = True):
        if nan_policy not in NAN_POLICIES:
            hint = " ('restore' needs the engine's checkpoints: use lrcompress.train.fit)" if nan_policy == "restore" else ""
            raise ConfigError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}{hint}")
        if clip not in ("none", "element"):
            raise ConfigError(f"clip must be 'none' or 'element' (the Trainer's max_grad_norm clips by norm), "
                              f"got {clip!r}")
        Stabiliser(nn.Module(), clip=clip, clip_value=clip_value, nan_policy=nan_policy, max_row_norm=max_norm)
        self.nan_policy, self.max_norm, self.clip, self.clip_value = nan_policy, max_norm, clip, clip_value
        self.weight_norm, self.fold_at_end, self.log_figures = weight_norm, fold_at_end, log_figures
        self.figures: dict[str, float] = {}
        self._stabiliser: Stabiliser | None = None

    @property
    def nan_events(self) -> int:
        """Non-finite gradient norms seen so far."""
        return self._stabiliser.nan_events if self._stabiliser is not None else 0

    # -- events ------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._setup(model, optimizer)  # before the Trainer builds its optimiser: it sees the final parameters

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._setup(model, optimizer)  # a callback added after the Trainer was built

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._stabiliser is not None:
            self._stabiliser.before_step()  # on "skip", sets every gradient to None: the step changes nothing

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._stabiliser is not None:
            self._stabiliser.after_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_figures or logs is None:
            return
        extra = {**self.figures, PREFIX + "nan_events": self.nan_events}
        logs.update(extra)  # seen by the callbacks after this one (reporters listed before it are not)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer stored the record before calling on_log

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.weight_norm and self.fold_at_end and model is not None:
            remove_weight_norm(model)

    # -- set-up ------------------------------------------------------------------------------
    def _setup(self, model: nn.Module | None, optimizer) -> None:
        if model is None or (self._stabiliser is not None and self._stabiliser.model is model):
            if model is not None and self.weight_norm and not has_weight_norm(model):
                _install_weight_norm(model, optimizer)  # folded by a previous train() call
            return
        self.figures = compression_figures(model)
        if self.weight_norm and not has_weight_norm(model):
            _install_weight_norm(model, optimizer)
        self._stabiliser = Stabiliser(model, clip=self.clip, clip_value=self.clip_value, nan_policy=self.nan_policy,
                                      max_row_norm=self.max_norm)


def _install_weight_norm(model: nn.Module, optimizer) -> list[str]:
    """``weight_norm(model)``, and the optimiser (if built) updated: the parameters weight norm
    replaced leave their groups, the new scales and directions join the group they were in."""
    before = {id(p) for p in model.parameters()}
    names = weight_norm(model)
    if optimizer is None:
        return names
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimiser
    now = list(model.parameters())
    gone = before - {id(p) for p in now}
    new = [p for p in now if id(p) not in before]
    home = None
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in gone]
        if len(kept) != len(group["params"]):
            home = home or group
            for p in group["params"]:
                if id(p) in gone:
                    optimizer.state.pop(p, None)
        group["params"] = kept
    (home or optimizer.param_groups[0])["params"].extend(new)
    return names
