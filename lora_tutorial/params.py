"""Counting and freezing parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.parameter import is_lazy

from ._checks import check_choice
from .layers import LoRALinear
from .module_to_save import ModuleToSave

__all__ = ["BIAS_MODES", "ParamCount", "count_parameters", "mark_only_lora_as_trainable"]

#: What :func:`mark_only_lora_as_trainable` may do with biases.
BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts; prints as ``2192/39312 (5.58%)``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters (0 for an empty model)."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable}/{self.total} ({self.percent:.2f}%)"


def count_parameters(model: nn.Module) -> ParamCount:
    """Count ``model``'s parameters that require a gradient, and all of them.

    Shared parameters are counted once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips duplicates
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParamCount(trainable, total)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> ParamCount:
    """Freeze everything but the adapter, in place.

    What trains is decided by what a parameter is, never by its name (a base
    module called ``explora_head`` is frozen like any other): the factors
    ``lora_A`` and ``lora_B`` of every
    :class:`~lora_tutorial.layers.LoRALinear` (and DoRA's ``lora_magnitude_vector``;
    of the adapter it computes with: other named adapters stay frozen), the trained copy of every
    module trained whole (a :class:`~lora_tutorial.module_to_save.ModuleToSave`,
    whose original stays frozen), and the biases ``bias`` names.

    Args:
        model: any module.
        bias: ``"none"`` freezes every other bias; ``"all"`` keeps every bias in
            the model trainable (but those of the originals kept beside a
            trained copy); ``"lora_only"`` keeps the bias of each
            :class:`~lora_tutorial.layers.LoRALinear`'s base layer trainable (what the source does when
            it trains "LoRA A/B and optional bias" of the head).

    The bias mode is recorded on the model as ``model.lora_bias_mode`` (as
    PEFT's config records it), so that :func:`~lora_tutorial.adapter_io.save_adapter`
    saves the biases that belong to the adapter even after everything has
    been frozen.

    Returns:
        The resulting :class:`ParamCount`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("bias", bias, BIAS_MODES)
    for name, p in model.named_parameters():
        if is_lazy(p):
            raise ValueError(f"model has an uninitialised lazy parameter {name!r}: run one "
                             "batch through the model first; nothing was changed")
    trainable: set[int] = set()
    originals: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            trainable.update(id(getattr(module, key)) for key in module._FACTORS)
            if bias == "lora_only" and module.base.bias is not None:
                trainable.add(id(module.base.bias))
        elif isinstance(module, ModuleToSave):
            trainable.update(id(p) for p in module.trained.parameters())
            originals.update(id(p) for p in module.original_module.parameters())
    for name, p in model.named_parameters():
        is_bias = name == "bias" or name.endswith(".bias")
        p.requires_grad = id(p) in trainable or (
            bias == "all" and is_bias and id(p) not in originals)
    model.lora_bias_mode = bias
    return count_parameters(model)
