"""Training: the engine, the paper's optimisers and stabilisers, checkpoints, and runs.

    >>> from lrcompress.train import fit
    >>> result = fit(model, loader, torch.nn.functional.cross_entropy, recipe={"steps": 500})  # doctest: +SKIP
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .dynamic import dynamic_evaluate, gradient_statistics, static_evaluate
from .engine import FitResult, TrainConfig, evaluate, fit
from .optim import build_adafactor, build_optimizer, build_rmsprop, build_scheduler, start_accumulator
from .stabilisers import Stabiliser, decay_gradients_, max_row_norm_, remove_weight_norm, weight_norm
from .models import (HighwayClassifier, LowRankPaperGRU, PaperGRU, SequenceModel, build_model, set_dropout,
                     set_update_gate_bias)
from .recipe import RECIPE_DEFAULTS, dump_recipe, load_recipe
from .tasks import TASKS, MissingDataError, Task, build_task
from .tasks_base import Batch

__all__ = [
    "Batch", "Checkpoint", "FitResult", "Stabiliser", "TrainConfig", "build_adafactor", "build_optimizer",
    "build_rmsprop", "build_scheduler", "decay_gradients_", "evaluate", "fit", "load_checkpoint", "max_row_norm_",
    "remove_weight_norm", "save_checkpoint", "start_accumulator", "weight_norm",
    # tasks, models, recipes
    "HighwayClassifier", "LowRankPaperGRU", "MissingDataError", "PaperGRU", "RECIPE_DEFAULTS", "SequenceModel",
    "TASKS", "Task", "build_model", "build_task", "dump_recipe", "load_recipe", "set_dropout",
    "set_update_gate_bias",
    # dynamic evaluation (Krause et al. 2018)
    "dynamic_evaluate", "gradient_statistics", "static_evaluate",
]
