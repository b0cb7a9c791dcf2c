"""Factored execution of compressed recurrent layers: faster inference than the dense weights.

A low-rank recurrent step costs ``2 n d`` multiply-adds per gate instead of ``n^2``.
``accelerate(model)`` makes every factored GRU/LSTM/RNN compute ``h R^T``, then ``L``, plus the
diagonal, each step (never forming ``L R``) whenever the cost model expects that to be faster
than rebuilding the dense weight for cuDNN/oneDNN. See docs/acceleration.md.

    >>> import lrcompress as lrc
    >>> model = lrc.load_model(MyModel(), "small.safetensors").eval()  # doctest: +SKIP
    >>> lrc.accelerate(model)                                          # doctest: +SKIP
"""

from __future__ import annotations

from .cost import PROFILES, Estimate, Profile, WeightShape, estimate, measure_profile
from .dispatch import MODES, Acceleration, LayerPlan, accelerate, acceleration, plan

__all__ = ["MODES", "PROFILES", "Acceleration", "Estimate", "LayerPlan", "Profile", "WeightShape", "accelerate",
           "acceleration", "estimate", "measure_profile", "plan"]
