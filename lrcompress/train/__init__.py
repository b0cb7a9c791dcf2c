"""Training: the engine, the paper's optimisers and stabilisers, checkpoints, and runs.

    >>> from lrcompress.train import fit
    >>> result = fit(model, loader, torch.nn.functional.cross_entropy, recipe={"steps": 500})  # doctest: +SKIP
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .engine import FitResult, TrainConfig, evaluate, fit
from .optim import Adafactor, RMSProp, Schedule, build_optimizer
from .stabilisers import (Stabiliser, clip_gradients_, decay_gradients_, grad_norm, max_row_norm_, remove_weight_norm,
                          weight_norm)
from .models import (HighwayClassifier, LowRankPaperGRU, PaperGRU, SequenceModel, build_model, set_dropout,
                     set_update_gate_bias)
from .recipe import RECIPE_DEFAULTS, dump_recipe, load_recipe
from .tasks import TASKS, MissingDataError, Task, build_task
from .tasks_base import Batch

__all__ = [
    "Adafactor", "Batch", "Checkpoint", "FitResult", "RMSProp", "Schedule", "Stabiliser", "TrainConfig",
    "build_optimizer", "clip_gradients_", "decay_gradients_", "evaluate", "fit", "grad_norm", "load_checkpoint",
    "max_row_norm_", "remove_weight_norm", "save_checkpoint", "weight_norm",
    # tasks, models, recipes
    "HighwayClassifier", "LowRankPaperGRU", "MissingDataError", "PaperGRU", "RECIPE_DEFAULTS", "SequenceModel",
    "TASKS", "Task", "build_model", "build_task", "dump_recipe", "load_recipe", "set_dropout",
    "set_update_gate_bias",
]
