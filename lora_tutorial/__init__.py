"""lora_tutorial: the small LoRA library that the book *LoRA from Scratch* builds and uses.

One concept per module, all re-exported here:

* :mod:`~lora_tutorial.layers`: :class:`LoRALayer` (chapter 1, naive) and :class:`LoRALinear`.
* :mod:`~lora_tutorial.models`: :class:`TinyAdapter`.
* :mod:`~lora_tutorial.data`: the toy data sets.
* :mod:`~lora_tutorial.params`: counting and freezing parameters.
* :mod:`~lora_tutorial.training`: full-batch :func:`train` and :func:`evaluate`.
* :mod:`~lora_tutorial.pretraining`: chapter 3's pretraining and its shipped checkpoint.
* :mod:`~lora_tutorial.digits`: chapter 5's real data (scikit-learn's digits) and its MLP.
* :mod:`~lora_tutorial.source_replay`: a faithful replay of the second source's run
  (its own classes and loops, on the global RNG, isolated); import it explicitly.
* :mod:`~lora_tutorial.frozen_features`: best low-rank updates and fast training on frozen features.
* :mod:`~lora_tutorial.efficiency`: measuring optimizer state and activations.
* :mod:`~lora_tutorial.inject`: :func:`add_lora` and :func:`unload_lora` for any model,
  :func:`quantize_model` and :func:`dequantize_model` (QLoRA's 4-bit base).
* :mod:`~lora_tutorial.quant`: 4-bit NormalFloat (NF4), double quantisation, :class:`NF4Linear`.
* :mod:`~lora_tutorial.module_to_save`: :class:`ModuleToSave`, a module trained whole
  beside the adapter (PEFT's ``modules_to_save``).
* :mod:`~lora_tutorial.dora`: :class:`DoRALinear`, DoRA's magnitude and direction.
* :mod:`~lora_tutorial.named_adapters`: many adapters on one model: switching, combining,
  merging one, mixed batches.
* :mod:`~lora_tutorial.adapter_io`: adapters on disk in PEFT's format.
* :mod:`~lora_tutorial.analysis`: measurements on layers and updates.
* :mod:`~lora_tutorial.device`: :func:`default_device`.

The book's own machinery (plot style, glue, the rank/alpha explorer) lives in
:mod:`lora_tutorial.book`, which this package does not import.
"""

from .adapter_io import AdapterFormatError, load_adapter, save_adapter
from .analysis import relative_update_norm, singular_values
from .data import (
    AdaptationTask,
    create_toy_dataset,
    forward_with_mats,
    make_adaptation_task,
    make_task_matrices,
    synth_data,
)
from .device import default_device
from .dora import DoRALinear
from .digits import DigitsMLP, load_digit_tasks, pretrain_digits, pretrained_digits_mlp
from .efficiency import activation_bytes, format_bytes, optimizer_state_bytes
from .frozen_features import (
    FeatureStats,
    LowRankFit,
    best_low_rank_update,
    fit_lora_on_stats,
    fit_many_on_stats,
)
from .inject import (
    add_lora,
    base_modules,
    dequantize_model,
    disable_adapter,
    lora_layers,
    quantize_model,
    recorded_bias,
    saved_modules,
    unload_lora,
)
from .layers import INIT_MODES, LoRALayer, LoRALinear, make_linear, mirror_init_
from .models import TinyAdapter
from .module_to_save import ModuleToSave
from .named_adapters import (
    active_adapter,
    adapter_names,
    combine_adapters,
    delete_adapter,
    merge_adapter,
    mixed_batch,
    set_adapter,
    unmerge_adapter,
)
from .params import BIAS_MODES, ParamCount, count_parameters, mark_only_lora_as_trainable
from .pretraining import pretrain, pretrained_tiny_adapter, source_setup
from .quant import (
    NF4Linear,
    NF4Tensor,
    bits_per_parameter,
    dequantize_blocks,
    dynamic_map,
    fake_quantize,
    fp4_levels,
    int4_levels,
    nf4_levels,
    quantization_errors,
    quantize_blocks,
    quantize_nf4,
)
from .training import OPTIMIZERS, evaluate, isolated_rng, train, train_together

__version__ = "0.1.0"

__all__ = [
    "activation_bytes",
    "active_adapter",
    "AdaptationTask",
    "adapter_names",
    "AdapterFormatError",
    "add_lora",
    "base_modules",
    "best_low_rank_update",
    "BIAS_MODES",
    "bits_per_parameter",
    "combine_adapters",
    "count_parameters",
    "create_toy_dataset",
    "default_device",
    "delete_adapter",
    "dequantize_blocks",
    "dequantize_model",
    "DigitsMLP",
    "disable_adapter",
    "DoRALinear",
    "dynamic_map",
    "evaluate",
    "fake_quantize",
    "FeatureStats",
    "fit_lora_on_stats",
    "fit_many_on_stats",
    "format_bytes",
    "forward_with_mats",
    "fp4_levels",
    "INIT_MODES",
    "int4_levels",
    "isolated_rng",
    "load_adapter",
    "load_digit_tasks",
    "lora_layers",
    "LoRALayer",
    "LoRALinear",
    "LowRankFit",
    "make_adaptation_task",
    "make_linear",
    "make_task_matrices",
    "mark_only_lora_as_trainable",
    "merge_adapter",
    "mirror_init_",
    "mixed_batch",
    "ModuleToSave",
    "nf4_levels",
    "NF4Linear",
    "NF4Tensor",
    "optimizer_state_bytes",
    "OPTIMIZERS",
    "ParamCount",
    "pretrain",
    "pretrain_digits",
    "pretrained_digits_mlp",
    "pretrained_tiny_adapter",
    "quantization_errors",
    "quantize_blocks",
    "quantize_model",
    "quantize_nf4",
    "recorded_bias",
    "relative_update_norm",
    "save_adapter",
    "saved_modules",
    "set_adapter",
    "singular_values",
    "source_setup",
    "synth_data",
    "TinyAdapter",
    "train",
    "train_together",
    "unload_lora",
    "unmerge_adapter",
]
