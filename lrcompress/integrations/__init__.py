"""Hooks into the tools people already train with: Hugging Face ``transformers.Trainer``.

- ``StabiliserCallback``: the paper's stabilisers (non-finite gradient policy, row max-norm,
  weight normalisation, optional element clipping) and compression figures in the Trainer's logs;
- ``paper_optimizer(model, lr=...)``: the authors' RMSProp and a learning-rate schedule, as the
  ``(optimizer, scheduler)`` pair ``Trainer(optimizers=...)`` takes.

Nothing here is imported by ``import lrcompress``; ``lrcompress.integrations`` loads on first
use, and ``StabiliserCallback`` needs ``transformers`` (``pip install lrcompress[hf]``).
See docs/trainer.md.

    >>> from lrcompress.integrations import StabiliserCallback, paper_optimizer   # doctest: +SKIP
"""

from importlib import import_module

_LAZY = {"StabiliserCallback": "hf", "compression_figures": "hf", "paper_optimizer": "optim"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrcompress.integrations' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
