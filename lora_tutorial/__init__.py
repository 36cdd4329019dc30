"""lora_tutorial: the small LoRA library that the book *LoRA from Scratch* builds and uses.

One concept per module, all re-exported here:

* :mod:`~lora_tutorial.layers`: :class:`LoRALayer` (chapter 1, naive) and :class:`LoRALinear`.
* :mod:`~lora_tutorial.models`: :class:`TinyAdapter`.
* :mod:`~lora_tutorial.data`: the toy data sets.
* :mod:`~lora_tutorial.params`: counting and freezing parameters.
* :mod:`~lora_tutorial.training`: full-batch :func:`train` and :func:`evaluate`.
* :mod:`~lora_tutorial.frozen_features`: best low-rank updates and fast training on frozen features.
* :mod:`~lora_tutorial.analysis`: measurements on layers and updates.
"""

from .analysis import relative_update_norm, singular_values
from .data import (
    AdaptationTask,
    create_toy_dataset,
    forward_with_mats,
    make_adaptation_task,
    make_task_matrices,
    synth_data,
)
from .frozen_features import FeatureStats, LowRankFit, best_low_rank_update, fit_lora_on_stats
from .layers import INIT_MODES, LoRALayer, LoRALinear, make_linear
from .models import TinyAdapter
from .params import BIAS_MODES, ParamCount, count_parameters, mark_only_lora_as_trainable
from .training import OPTIMIZERS, evaluate, isolated_rng, train

__version__ = "0.1.0"

__all__ = [
    "AdaptationTask",
    "BIAS_MODES",
    "FeatureStats",
    "INIT_MODES",
    "LoRALayer",
    "LoRALinear",
    "LowRankFit",
    "OPTIMIZERS",
    "ParamCount",
    "TinyAdapter",
    "best_low_rank_update",
    "count_parameters",
    "create_toy_dataset",
    "evaluate",
    "fit_lora_on_stats",
    "forward_with_mats",
    "isolated_rng",
    "make_adaptation_task",
    "make_linear",
    "make_task_matrices",
    "mark_only_lora_as_trainable",
    "relative_update_norm",
    "singular_values",
    "synth_data",
    "train",
]
