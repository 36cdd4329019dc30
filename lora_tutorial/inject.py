"""Putting LoRA into any model, and taking it out again.

:func:`add_lora` does what PEFT's ``inject_adapter_in_model`` does for plain
LoRA: every matching linear layer (``nn.Linear``, its subclasses, and GPT-2's
``transformers.pytorch_utils.Conv1D``) is replaced by a
:class:`~lora_tutorial.layers.LoRALinear` wrapping it, and everything but the
adapters (and any ``modules_to_save``) is frozen. :func:`unload_lora` undoes
it, merging the updates or not.

``target_modules`` is read as PEFT reads it:

* a list of names: a module matches if its full name equals one of them or
  ends with ``"." + name`` (``"q_proj"`` matches
  ``"model.layers.0.self_attn.q_proj"``);
* a single string: a regular expression the full name must match entirely
  (``re.fullmatch``), e.g. ``r".*\\.attn\\.c_attn"``;
* ``"all-linear"``: every linear layer except the output head (for a
  ``transformers`` model, the module ``get_output_embeddings()`` returns, as
  in PEFT).

A target that matches nothing, or matches a module that cannot be adapted,
raises :class:`ValueError` saying which and why, before the model changes.

For QLoRA, :func:`quantize_model` first replaces the targets by 4-bit
:class:`~lora_tutorial.quant.NF4Linear` layers (same target syntax), which
:func:`add_lora` then adapts; :func:`dequantize_model` turns them back into
``nn.Linear`` layers, so that adapters can be merged into a dequantised copy.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ._checks import as_generator, check_bool, check_choice, check_positive_int
from .layers import LoRALinear, _check_hparams, _conv1d_type, _refuse_quantized_merge
from .params import BIAS_MODES, mark_only_lora_as_trainable
from .quant import BLOCK_SIZE, NF4Linear, _check_weight

__all__ = [
    "ALL_LINEAR",
    "add_lora",
    "dequantize_model",
    "lora_layers",
    "quantize_model",
    "recorded_bias",
    "saved_modules",
    "unload_lora",
]

#: The ``target_modules`` value meaning every linear layer but the output head.
ALL_LINEAR = "all-linear"
# Attributes add_lora sets on the model: the choices save_adapter needs later
# (PEFT keeps them in its LoraConfig).
BIAS_ATTR = "lora_bias_mode"
MODULES_TO_SAVE_ATTR = "lora_modules_to_save"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every :class:`~lora_tutorial.layers.LoRALinear` in ``model``, with its name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def recorded_bias(model: nn.Module) -> str | None:
    """The bias mode recorded when LoRA was added to ``model`` (or ``None``).

    :func:`add_lora` (and :func:`~lora_tutorial.params.mark_only_lora_as_trainable`)
    record it; :func:`~lora_tutorial.adapter_io.save_adapter` saves biases by it.
    """
    return _recorded(model, BIAS_ATTR)


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fully trained modules recorded by ``add_lora(..., modules_to_save=...)``.

    Returns ``(name, module)`` pairs, matched by PEFT's rule (the module's
    name ends with one of the recorded names); empty if none were recorded.
    """
    names = _recorded(model, MODULES_TO_SAVE_ATTR)
    return _match_modules_to_save(model, names) if names else []


def _recorded(model: nn.Module, attribute: str) -> object:
    for module in model.modules():  # the model itself first
        if attribute in vars(module):
            return vars(module)[attribute]
    return None


def _quantizable(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _adaptable(module: nn.Module) -> bool:
    return _quantizable(module) or isinstance(module, NF4Linear)


def _read_not_called(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether ``name`` is the ``out_proj`` of an ``nn.MultiheadAttention`` (read, never called)."""
    parent, _, child = name.rpartition(".")
    return child == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention)


def _target_matcher(target_modules: object) -> tuple[Callable[[str], bool] | None, list[str]]:
    """``(match(name), targets)``; ``match`` is ``None`` for ``"all-linear"``."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return None, [target_modules]
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"target_modules={target_modules!r} is a single string, so a regular "
                f"expression, but it does not compile: {err}") from None
        return (lambda name: pattern.fullmatch(name) is not None), [target_modules]
    if isinstance(target_modules, (nn.Module, torch.Tensor, bytes, dict)) or not isinstance(
            target_modules, Iterable):
        raise TypeError(
            "target_modules must be a list of module names, a regular expression or "
            f"'all-linear', got {type(target_modules).__name__}")
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            "target_modules must be a non-empty list of non-empty module names, "
            f"got {targets!r}")
    return (lambda name: any(name == t or name.endswith("." + t) for t in targets)), targets


def _check_names(argument: str, names: object) -> list[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"{argument} must be a list of module names, got {names!r}")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{argument} must hold non-empty module names, got {list(names)!r}")
    return list(names)


def _match_modules_to_save(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """Modules with state whose name ends with one of ``names`` (PEFT's rule, plain
    ``str.endswith``: ``"classifier"`` also matches ``"pre_classifier"``)."""
    return [(name, module) for name, module in model.named_modules()
            if name and any(name.endswith(n) for n in names) and module.state_dict()]


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_modules_to_save(model: nn.Module, names: list[str],
                           lora_names: list[str]) -> list[tuple[str, nn.Module]]:
    found = _match_modules_to_save(model, names)
    matched = {n for n in names if any(name.endswith(n) for name, _ in found)}
    unmatched = [n for n in names if n not in matched]
    if unmatched:
        raise ValueError(
            f"modules_to_save names {unmatched} match no module with parameters "
            "(PEFT's rule: the module's full name ends with the given name)")
    paths = [name for name, _ in found]
    for name, module in found:
        if _inside(name, lora_names) or any(isinstance(m, LoRALinear) for m in module.modules()):
            raise ValueError(
                f"modules_to_save matches {name!r}, which is or holds a LoRALinear: "
                "a module is either adapted or saved whole, not both")
        if any(isinstance(m, NF4Linear) for m in module.modules()):
            raise ValueError(
                f"modules_to_save matches {name!r}, which is or holds an NF4Linear: its "
                "4-bit weight cannot be trained whole (dequantize_model first, or adapt it)")
        nested = [p for p in paths if p != name and p.startswith(name + ".")]
        if nested:
            raise ValueError(
                f"modules_to_save matches both {name!r} and {nested[0]!r} inside it; "
                "name only the outer module")
    return found


def _why_not(modules: dict[str, nn.Module], name: str, quantize: bool = False) -> str:
    if _read_not_called(modules, name):
        return ("the out_proj of nn.MultiheadAttention, which reads out_proj.weight "
                "directly and never calls out_proj, so "
                + ("it must keep a float weight" if quantize else
                   "an adapter there would never run (PEFT's would silently do nothing)"))
    if quantize and isinstance(modules[name], NF4Linear):
        return "an NF4Linear already"
    if quantize:
        return (f"a {type(modules[name]).__name__}; quantize_model quantises nn.Linear (and "
                "subclasses) and transformers' Conv1D")
    return (f"a {type(modules[name]).__name__}; LoRA adapts nn.Linear (and subclasses), "
            "transformers' Conv1D and NF4Linear")


def _choose(model: nn.Module, target_modules: object,
            saved: list[str], quantize: bool = False) -> list[str]:
    """The names of the modules to adapt (or, with ``quantize``, to quantise),
    or a ValueError saying why there are none."""
    match, targets = _target_matcher(target_modules)
    lora_names = [name for name, _ in lora_layers(model)]
    modules = dict(model.named_modules())
    if match is None:  # "all-linear": every linear layer but the output head
        head = getattr(model, "get_output_embeddings", None)
        head = head() if callable(head) else None
        excluded = {name for name, m in modules.items() if head is not None and m is head}
        matched = [name for name, m in modules.items()
                   if _adaptable(m) and name not in excluded
                   and not _read_not_called(modules, name)]
    else:
        matched = [name for name in modules if name and match(name)]
        if not isinstance(target_modules, str):  # a list: each name must match
            silent = [t for t in targets if not any(name == t or name.endswith("." + t)
                                                    for name in matched)]
            if silent and matched:
                raise ValueError(
                    f"target_modules {silent} match no module of the model (the other "
                    f"targets match {len(matched)}); remove them or fix their names")
    adapted = [name for name in matched
               if isinstance(modules[name], LoRALinear) or _inside(name, lora_names)]
    if adapted and quantize:
        raise ValueError(
            f"target_modules match {adapted[0]!r}, which is a LoRALinear or part of one: "
            "quantise the base before adding LoRA (quantize_model, then add_lora), or "
            "call unload_lora first; nothing was changed")
    if adapted:
        raise ValueError(
            f"target_modules match {adapted[0]!r}, which is a LoRALinear or part of one: "
            "the model is already adapted (call unload_lora first, or leave those "
            "layers out of target_modules); nothing was changed")
    chosen = [name for name in matched if not _inside(name, saved)]
    can = _quantizable if quantize else _adaptable
    wrong = [name for name in chosen
             if not can(modules[name]) or _read_not_called(modules, name)]
    if wrong:
        name = wrong[0]
        raise ValueError(
            f"target_modules match {name!r}, which cannot be "
            f"{'quantised' if quantize else 'adapted'}: it is "
            f"{_why_not(modules, name, quantize)}"
            + (f" ({len(wrong) - 1} more such module(s))" if len(wrong) > 1 else ""))
    if not chosen:
        linears = [name for name, m in modules.items() if _adaptable(m)]
        shown = f"{linears[:12]}{' ...' if len(linears) > 12 else ''}"
        why = (" (the matches are all in modules_to_save)" if matched else "")
        raise ValueError(
            f"target_modules {targets} matched no linear layer of the model{why}; "
            f"its linear layers are: {shown}")
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str = "kaiming",
    init_scale: float = 1e-4,
    rslora: bool = False,
    bias: str = "none",
    *,
    modules_to_save: Iterable[str] | None = None,
    seed: int | torch.Generator = 0,
) -> nn.Module:
    """Wrap every matching linear layer of ``model`` in a ``LoRALinear``, in place.

    Everything else is frozen, except the biases ``bias`` names and the
    ``modules_to_save``, which train whole. Everything is checked before the
    model changes: a refused call leaves it as it was.

    Args:
        model: any module.
        target_modules: which layers to adapt: a list of names (or name
            suffixes), a regular expression for the full name, or
            ``"all-linear"`` (see the module docstring). Matches may be
            ``nn.Linear``, a subclass of it, or GPT-2's ``Conv1D``.
        r: the adapters' rank (the defaults follow PEFT).
        alpha: the scale's numerator, ``alpha / r`` (``alpha / sqrt(r)``).
        dropout: dropout probability on each adapter's input.
        init: how ``lora_A`` is drawn (see :class:`~lora_tutorial.layers.LoRALinear`).
        init_scale: the standard deviation of ``init="normal"``.
        rslora: use rank-stabilised scaling, ``alpha / sqrt(r)``.
        bias: which biases train too: ``"none"``, ``"lora_only"`` (the
            adapted layers' own) or ``"all"``. Recorded on the model, so
            :func:`~lora_tutorial.adapter_io.save_adapter` saves those biases
            even after they are frozen again.
        modules_to_save: names of modules trained whole beside the adapter
            (a classification head, say), matched as PEFT matches them (the
            module's full name ends with the name); recorded and saved by
            ``save_adapter`` in PEFT's format. They are never adapted.
        seed: an ``int`` or a ``torch.Generator`` the adapters' initial values
            are drawn from, layer by layer in the order of
            ``model.named_modules()``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: for arguments of the wrong kind.
        ValueError: for a target that matches nothing, a match that cannot be
            adapted (saying why), or a model that is already adapted there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hparams = _check_hparams(r, alpha, dropout, init, init_scale)
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be a bool, got {rslora!r}")
    check_choice("bias", bias, BIAS_MODES)
    saved_names = [] if modules_to_save is None else _check_names("modules_to_save", modules_to_save)
    earlier = _recorded(model, MODULES_TO_SAVE_ATTR) or []  # from an earlier add_lora
    saved_names = list(earlier) + [n for n in saved_names if n not in earlier]
    gen = as_generator(seed)
    lora_names = [name for name, _ in lora_layers(model)]
    saved = _check_modules_to_save(model, saved_names, lora_names) if saved_names else []
    chosen = _choose(model, target_modules, [name for name, _ in saved])

    # Everything is checked: build every adapter, then change the model.
    r, alpha, dropout, init, init_scale = hparams
    new = {
        name: LoRALinear.from_linear(
            model.get_submodule(name), r=r, alpha=alpha, dropout=dropout, init=init,
            init_scale=init_scale, rslora=rslora, seed=gen)
        for name in chosen
    }
    for name, layer in new.items():
        _replace(model, name, layer)
    mark_only_lora_as_trainable(model, bias=bias)
    for _, module in saved:
        module.requires_grad_(True)
    setattr(model, BIAS_ATTR, bias)
    setattr(model, MODULES_TO_SAVE_ATTR, saved_names or None)
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every ``LoRALinear`` in ``model`` by its base layer, in place.

    With ``merge=True`` (PEFT's ``merge_and_unload``) each update is merged into
    its base weight first, so the plain model computes what the adapted one did
    (in evaluation mode); every layer is checked first, and if any merged
    weight would not be finite, or any base is an
    :class:`~lora_tutorial.quant.NF4Linear` (:class:`TypeError`: merge into a
    dequantised copy, :func:`dequantize_model`), nothing changes. With ``merge=False`` (PEFT's
    ``unload``) the adapters are dropped and the base weights restored.
    Returns ``model`` (a bare ``LoRALinear`` cannot replace itself: unload
    its parent). Modules trained whole (``modules_to_save``) stay as trained.
    """
    if isinstance(model, LoRALinear):
        raise TypeError("unload_lora needs the model that holds the LoRALinear layers, "
                        "not a LoRALinear itself")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool, got {merge!r}")
    layers = list(lora_layers(model))
    if merge:
        for name, layer in layers:
            _refuse_quantized_merge(layer.base, name)
        with torch.no_grad():
            for name, layer in layers:
                if layer.merged:
                    continue
                delta = layer.delta_weight()  # (out, in); Conv1D stores (in, out)
                weight = layer.base.weight + (delta.T if layer.fan_in_fan_out else delta)
                bad = int((~torch.isfinite(weight)).sum())
                if bad:
                    raise ValueError(
                        f"refusing to merge: the merged weight of {name!r} would have "
                        f"{bad} non-finite value(s); no layer was changed")
    for name, layer in layers:
        if merge:
            layer.merge_weights_()
        else:
            layer.unmerge_weights_()
    for name, layer in layers:
        _replace(model, name, layer.base)
    for attribute in (BIAS_ATTR, MODULES_TO_SAVE_ATTR):
        for module in model.modules():
            vars(module).pop(attribute, None)
    return model


def _tied_elsewhere(model: nn.Module, name: str) -> str | None:
    """The name of another module holding ``name``'s weight (a tied weight), if any."""
    weight = model.get_submodule(name).weight
    for other, module in model.named_modules(remove_duplicate=False):
        if other != name and any(p is weight for p in module.parameters(recurse=False)):
            return other
    return None


def quantize_model(
    model: nn.Module,
    target_modules: str | Iterable[str],
    *,
    double_quant: bool = True,
    blocksize: int = BLOCK_SIZE,
) -> nn.Module:
    """Replace every matching linear layer of ``model`` by an NF4Linear, in place.

    QLoRA's first step: the targets' weights are stored in 4-bit NF4
    (:class:`~lora_tutorial.quant.NF4Linear`, frozen, dequantised on the fly),
    and :func:`add_lora` then adapts them. ``target_modules`` is read as
    :func:`add_lora` reads it (a list of names, a regular expression, or
    ``"all-linear"``: every linear layer but the output head). Everything is
    checked before the model changes: a refused call leaves it as it was.

    Args:
        model: any module.
        target_modules: which ``nn.Linear`` (or subclass) and GPT-2 ``Conv1D``
            layers to quantise.
        double_quant: quantise the absmax constants too (QLoRA's default).
        blocksize: weights per absmax block.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: for arguments of the wrong kind, or a target weight that is
            not float32/bfloat16/float16.
        ValueError: for a target that matches nothing or matches a module that
            cannot be quantised (an NF4Linear already, part of a LoRALinear,
            a weight shared with another module, non-finite weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    double_quant = check_bool("double_quant", double_quant)
    blocksize = check_positive_int("blocksize", blocksize)
    chosen = _choose(model, target_modules, [], quantize=True)
    for name in chosen:
        tied = _tied_elsewhere(model, name)
        if tied is not None:
            raise ValueError(
                f"target_modules match {name!r}, whose weight is shared with {tied!r} (tied "
                "weights): quantising it would untie them and save nothing; leave it out")
        _check_weight(f"the weight of {name!r}", model.get_submodule(name).weight)
    new = {name: NF4Linear.from_linear(model.get_submodule(name), double_quant=double_quant,
                                       blocksize=blocksize)
           for name in chosen}
    for name, layer in new.items():
        _replace(model, name, layer)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every NF4Linear in ``model`` by an ``nn.Linear`` holding its dequantised weight.

    In place, including the bases of LoRALinear layers, which can then be
    merged (:func:`unload_lora`): merging into a dequantised copy, instead of
    quantising the merged weight again. The weights come back in their
    original dtype, ``(out, in)`` as an ``nn.Linear`` stores them (a layer
    quantised from a GPT-2 ``Conv1D`` comes back as an ``nn.Linear``, which
    computes the same). Returns ``model`` (an NF4Linear itself cannot
    replace itself: use its :meth:`~lora_tutorial.quant.NF4Linear.to_linear`).
    """
    if isinstance(model, NF4Linear):
        raise TypeError("dequantize_model needs the model that holds the NF4Linear layers, "
                        "not an NF4Linear itself (use its to_linear())")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name, layer in quantized:
        linear = layer.to_linear()
        linear.weight.requires_grad = False  # frozen, as it was
        if linear.bias is not None:
            linear.bias.requires_grad = layer.bias.requires_grad
        _replace(model, name, linear)
    return model
