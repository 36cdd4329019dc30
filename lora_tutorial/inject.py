"""Putting LoRA into any model, and taking it out again.

:func:`add_lora` does what PEFT's ``inject_adapter_in_model`` does for plain
LoRA: every ``nn.Linear`` whose name matches ``target_modules`` is replaced by
a :class:`~lora_tutorial.layers.LoRALinear` wrapping it, and everything but the
adapters is frozen. :func:`unload_lora` undoes it, merging the updates or not.

Names match as in PEFT: a module matches a target if its full name equals the
target or ends with ``"." + target`` (so ``"q_proj"`` matches
``"model.layers.0.self_attn.q_proj"``).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from ._checks import check_choice
from .layers import LoRALinear, _check_hparams
from .params import BIAS_MODES, mark_only_lora_as_trainable

__all__ = ["add_lora", "lora_layers", "unload_lora"]


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every :class:`~lora_tutorial.layers.LoRALinear` in ``model``, with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_lora(
    model: nn.Module,
    target_modules: Iterable[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str = "kaiming",
    init_scale: float = 1e-4,
    rslora: bool = False,
    bias: str = "none",
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Wrap every matching ``nn.Linear`` of ``model`` in a ``LoRALinear``, in place, and freeze the rest.

    Args:
        model: any module.
        target_modules: module names (or name suffixes) to adapt, e.g. ``["q_proj", "v_proj"]``.
        r, alpha, dropout, init, init_scale, rslora: the adapters' settings (defaults follow PEFT).
        bias: which biases stay trainable, as in :func:`~lora_tutorial.params.mark_only_lora_as_trainable`.
        generator: draw the adapters' initial values from this generator, layer by layer in
            the order of ``model.named_modules()``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if no ``nn.Linear`` matches, naming the linear layers that exist.
    """
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    _check_hparams(r, alpha, dropout, init, init_scale)
    check_choice("bias", bias, BIAS_MODES)
    chosen = [
        name for name, module in model.named_modules()
        if _matches(name, targets) and type(module) is nn.Linear
    ]
    if not chosen:
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(
            f"target_modules {list(targets)} matched no nn.Linear in the model; "
            f"its linear layers are: {linears[:12]}{' ...' if len(linears) > 12 else ''}"
        )
    for name in chosen:
        linear = model.get_submodule(name)
        layer = LoRALinear.from_linear(
            linear, r=r, alpha=alpha, dropout=dropout, init=init, init_scale=init_scale,
            rslora=rslora, generator=generator,
        )
        _replace(model, name, layer)
    mark_only_lora_as_trainable(model, bias=bias)
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every ``LoRALinear`` in ``model`` by its base ``nn.Linear``, in place.

    With ``merge=True`` (PEFT's ``merge_and_unload``) each update is merged into
    its base weight first, so the plain model computes what the adapted one did
    (in evaluation mode); with ``merge=False`` (PEFT's ``unload``) the adapters are
    dropped and the base weights restored. Returns ``model`` (a bare
    ``LoRALinear`` cannot replace itself: unload its parent).
    """
    if isinstance(model, LoRALinear):
        raise TypeError("unload_lora needs the model that holds the LoRALinear layers, not a LoRALinear itself")
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge_weights_()
        else:
            layer.unmerge_weights_()
        _replace(model, name, layer.base)
    return model
