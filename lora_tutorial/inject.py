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
* ``"all-linear"``: every linear layer except the output head of a
  ``transformers`` model (the module its ``get_output_embeddings()``
  returns), as in PEFT. One choice differs from PEFT's, on purpose: the
  ``out_proj`` of ``nn.MultiheadAttention`` (inside
  ``nn.TransformerEncoderLayer``, for instance) is left out, because that
  module reads ``out_proj.weight`` and never calls ``out_proj``: PEFT adapts
  it, and its adapter changes nothing until merged.

A target that matches nothing, or matches a module that cannot be adapted,
raises :class:`ValueError` saying which and why, before the model changes.

``modules_to_save`` are matched as PEFT matches them (the module's full name
ends with the given name) and wrapped in a
:class:`~lora_tutorial.module_to_save.ModuleToSave`: the original is kept,
frozen, and a copy trains. Weight tying is found by parameter identity: an
adapted layer whose base weight another module also holds (GPT-2's
``lm_head`` is its input embedding) refuses to merge, since merging would
change the other module too.

For QLoRA, :func:`quantize_model` first replaces the targets by 4-bit
:class:`~lora_tutorial.quant.NF4Linear` layers (same target syntax), which
:func:`add_lora` then adapts; :func:`dequantize_model` turns them back into
``nn.Linear`` layers, so that adapters can be merged into a dequantised copy.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._checks import as_generator, check_bool, check_choice, check_positive_int
from .dora import DoRALinear
from .layers import (
    LoRALinear,
    _ParkedAdapter,
    _base_weight,
    _check_hparams,
    _conv1d_type,
    _refuse_quantized_merge,
    _same_tensor,
)
from .module_to_save import ModuleToSave
from .params import BIAS_MODES, mark_only_lora_as_trainable
from .quant import BLOCK_SIZE, NF4Linear, _check_weight

__all__ = [
    "ALL_LINEAR",
    "add_lora",
    "base_modules",
    "dequantize_model",
    "disable_adapter",
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


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every :class:`~lora_tutorial.layers.LoRALinear` in ``model``, with its name."""
    _check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules of ``model`` as the base model (and PEFT) names them, with those names.

    A :class:`~lora_tutorial.layers.LoRALinear` at ``P`` is given as itself at
    ``P`` (its insides are not listed); a
    :class:`~lora_tutorial.module_to_save.ModuleToSave` at ``W`` as itself at
    ``W``, followed by the modules inside its original module (``W.x``).
    Shared modules are listed once, as ``named_modules()`` does.
    """
    _check_model(model)
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        if isinstance(module, LoRALinear):
            return
        inner = module.original_module if isinstance(module, ModuleToSave) else module
        for name, child in inner.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def recorded_bias(model: nn.Module) -> str | None:
    """The bias mode recorded when LoRA was added to ``model`` (or ``None``).

    :func:`add_lora` (and :func:`~lora_tutorial.params.mark_only_lora_as_trainable`)
    record it; :func:`~lora_tutorial.adapter_io.save_adapter` saves biases by it.
    """
    return _recorded(_check_model(model), BIAS_ATTR)


def saved_modules(model: nn.Module) -> list[tuple[str, ModuleToSave]]:
    """The modules trained whole (``add_lora(..., modules_to_save=...)``), with their names.

    Returns ``(name, wrapper)`` pairs: each
    :class:`~lora_tutorial.module_to_save.ModuleToSave` keeps the original
    module (``original_module``) and the copy that trains (``trained``).
    """
    return [(name, module) for name, module in _check_model(model).named_modules()
            if isinstance(module, ModuleToSave)]


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context ``model`` computes what its base model does (PEFT's ``disable_adapter``).

    Every :class:`~lora_tutorial.layers.LoRALinear` computes only its base, and
    every module trained whole uses its original. Merged layers are refused
    (:class:`RuntimeError`, before anything is switched off): their update is
    in the base weight.
    """
    layers = list(lora_layers(model))
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable the adapter of merged layers {merged}: "
                           "call unmerge_weights_() on them first")
    with contextlib.ExitStack() as stack:
        for _, layer in layers:
            stack.enter_context(layer.disable_adapter())
        for _, wrapper in saved_modules(model):
            stack.enter_context(wrapper.disable_adapter())
        yield model


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


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (never imports transformers)."""
    module = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(module, "PreTrainedModel", None)
    return pretrained is not None and isinstance(model, pretrained)


def _check_initialised(model: nn.Module) -> None:
    """Refuse a model with uninitialised (lazy) parameters, whose sizes are not known yet."""
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if is_lazy(p):
            raise ValueError(
                f"model has an uninitialised lazy parameter {name!r} (an nn.LazyLinear or "
                "similar, whose sizes are unknown until its first forward pass): run one "
                "batch through the model first; nothing was changed")


def _holders(model: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every parameter of ``model`` as ``(name, module, attribute, tensor)``, shared ones at each path."""
    out = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                out.append((f"{module_name}.{attr}" if module_name else attr, module, attr, p))
    return out


def _ties(holders: list[tuple[str, nn.Module, str, torch.Tensor]], path: str,
          weight: torch.Tensor | None) -> tuple[tuple[str, nn.Module, str], ...]:
    """The holders of ``weight`` other than the layer at ``path`` itself (weight tying)."""
    if weight is None:
        return ()
    own = (f"{path}.weight", f"{path}.base.weight")
    return tuple((name, module, attr) for name, module, attr, p in holders
                 if name not in own and _same_tensor(p, weight))


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
    ``str.endswith``: ``"classifier"`` also matches ``"pre_classifier"``), named as
    in the base model; a module already trained whole is given as its wrapper."""
    return [(name, module) for name, module in base_modules(model)
            if name and any(name.endswith(n) for n in names) and module.state_dict()]


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_modules_to_save(model: nn.Module, names: list[str], lora_names: list[str],
                           earlier: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules ``names`` select; each name but the ``earlier`` ones (recorded, perhaps
    from a PEFT file naming modules this model lacks) must select one."""
    found = _match_modules_to_save(model, names)
    matched = {n for n in names if any(name.endswith(n) for name, _ in found)}
    unmatched = [n for n in names if n not in matched and n not in earlier]
    if unmatched:
        raise ValueError(
            f"modules_to_save names {unmatched} match no module with parameters "
            "(PEFT's rule: the module's full name ends with the given name)")
    _check_saved_matches(model, found, lora_names, ValueError)
    return found


def _check_saved_matches(model: nn.Module, found: list[tuple[str, nn.Module]],
                        lora_names: list[str], error: type[Exception]) -> None:
    """Refuse modules to train whole that hold a LoRALinear, nest, are containers, or sit at two paths."""
    paths = [name for name, _ in found]
    for name, module in found:
        if _inside(name, lora_names) or any(isinstance(m, LoRALinear) for m in module.modules()):
            raise error(
                f"modules_to_save matches {name!r}, which is or holds a LoRALinear: "
                "a module is either adapted or saved whole, not both")
        if any(isinstance(m, NF4Linear) for m in module.modules()):
            raise error(
                f"modules_to_save matches {name!r}, which is or holds an NF4Linear: its "
                "4-bit weight cannot be trained whole (dequantize_model first, or adapt it)")
        nested = [p for p in paths if p != name and p.startswith(name + ".")]
        if nested:
            raise error(
                f"modules_to_save matches both {name!r} and {nested[0]!r} inside it; "
                "name only the outer module")
        target = module.original_module if isinstance(module, ModuleToSave) else module
        if isinstance(target, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise error(
                f"modules_to_save matches {name!r}, a {type(target).__name__}, which has no "
                "forward pass of its own to train a copy of (PEFT refuses it too)")
        shared = [other for other, m in model.named_modules(remove_duplicate=False)
                  if m is target and other != name and not other.endswith(".original_module")]
        if shared:
            raise error(
                f"modules_to_save matches {name!r}, a module that is also at {shared[0]!r} "
                "(one module at two paths): a trained copy would replace it at one path "
                "only; nothing was changed")


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
    if match is None:  # "all-linear": every linear layer but a transformers model's head
        head = model.get_output_embeddings() if _is_transformers_model(model) else None
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
    use_dora: bool = False,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap every matching linear layer of ``model`` in a ``LoRALinear``, in place.

    Everything else is frozen, except the biases ``bias`` names and the
    copies of the ``modules_to_save``, which train whole. Everything is
    checked before the model changes: a refused call leaves it as it was.

    Args:
        model: any module (with every lazy module initialised).
        target_modules: which layers to adapt: a list of names (or name
            suffixes), a regular expression for the full name, or
            ``"all-linear"`` (see the module docstring, which says where it
            differs from PEFT's). Matches may be ``nn.Linear``, a subclass of
            it, or GPT-2's ``Conv1D``.
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
            module's full name ends with the name). As in PEFT each is
            wrapped in a :class:`~lora_tutorial.module_to_save.ModuleToSave`
            that keeps the original, frozen, and trains a copy; recorded and
            saved by ``save_adapter`` in PEFT's format. They are never adapted.
        seed: an ``int`` or a ``torch.Generator`` the adapters' initial values
            are drawn from, layer by layer in the order of
            ``model.named_modules()``.
        use_dora: DoRA instead of LoRA: each layer is a
            :class:`~lora_tutorial.dora.DoRALinear` (PEFT's ``use_dora=True``).
        adapter_name: the adapter's name (PEFT's ``"default"`` unless given).
            A model that already holds adapters gets one more under a new
            name, on exactly the layers they adapt (``target_modules`` must
            select those), of the same kind (LoRA or DoRA), without
            ``modules_to_save`` or a ``bias`` mode; it is added, not
            activated (:func:`~lora_tutorial.named_adapters.set_adapter`),
            as in PEFT. See :mod:`~lora_tutorial.named_adapters`.

    An adapted layer whose base weight another module also holds (weight
    tying, found by parameter identity: GPT-2's ``lm_head`` is its input
    embedding) trains and runs as any other, but refuses to merge
    (:meth:`~lora_tutorial.layers.LoRALinear.tied_to`); PEFT merges into it
    and so changes the embedding too.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: for arguments of the wrong kind.
        ValueError: for a target that matches nothing, a match that cannot be
            adapted (saying why), a model that is already adapted there, or an
            uninitialised lazy module.
    """
    from .named_adapters import check_adapter_name

    _check_model(model)
    hparams = _check_hparams(r, alpha, dropout, init, init_scale)
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be a bool, got {rslora!r}")
    check_choice("bias", bias, BIAS_MODES)
    use_dora = check_bool("use_dora", use_dora)
    adapter_name = check_adapter_name(adapter_name)
    saved_names = [] if modules_to_save is None else _check_names("modules_to_save", modules_to_save)
    existing = list(lora_layers(model))
    names = existing[0][1].adapter_names() if existing else ()
    if existing and (adapter_name not in names or len(names) > 1):
        return _add_named(model, existing, target_modules, hparams, rslora, bias, saved_names,
                          as_generator(seed), use_dora, adapter_name)
    kinds = {isinstance(layer, DoRALinear) for _, layer in existing}
    if existing and kinds != {use_dora}:
        raise ValueError(
            f"use_dora={use_dora} but the model's adapter {adapter_name!r} is "
            f"{'DoRA' if not use_dora else 'LoRA'}: one adapter is all DoRA or all LoRA; "
            "nothing was changed")
    earlier = _recorded(model, MODULES_TO_SAVE_ATTR) or []  # from an earlier add_lora
    saved_names = list(earlier) + [n for n in saved_names if n not in earlier]
    gen = as_generator(seed)
    _check_initialised(model)
    lora_names = [name for name, _ in lora_layers(model)]
    saved = _check_modules_to_save(model, saved_names, lora_names, earlier) if saved_names else []
    wrapped = [name for name, _ in saved_modules(model)]
    chosen = _choose(model, target_modules, [name for name, _ in saved] + wrapped)

    # Everything is checked: build every adapter and copy, then change the model.
    r, alpha, dropout, init, init_scale = hparams
    holders = _holders(model)
    cls = DoRALinear if use_dora else LoRALinear
    new = {
        name: cls.from_linear(
            model.get_submodule(name), r=r, alpha=alpha, dropout=dropout, init=init,
            init_scale=init_scale, rslora=rslora, seed=gen)
        for name in chosen
    }
    for name, layer in new.items():
        layer._ties = _ties(holders, name, _base_weight(layer))
        if adapter_name != LoRALinear._adapter_name:
            layer._adapter_name = adapter_name
    copies = {name: ModuleToSave(module) for name, module in saved
              if not isinstance(module, ModuleToSave)}
    for name, module in [*new.items(), *copies.items()]:
        _replace(model, name, module)
    mark_only_lora_as_trainable(model, bias=bias)
    setattr(model, BIAS_ATTR, bias)
    setattr(model, MODULES_TO_SAVE_ATTR, saved_names or None)
    return model


def _adapted_by(model: nn.Module, target_modules: object) -> list[str]:
    """The modules ``target_modules`` selects, named as in the base model (a LoRALinear as itself)."""
    match, targets = _target_matcher(target_modules)
    modules = dict(base_modules(model))
    if match is None:  # "all-linear"
        head = model.get_output_embeddings() if _is_transformers_model(model) else None
        return [name for name, m in modules.items()
                if (isinstance(m, LoRALinear) or _adaptable(m)) and m is not head
                and not _read_not_called(modules, name)]
    return [name for name in modules if name and match(name)]


def _add_named(model: nn.Module, existing: list[tuple[str, LoRALinear]], target_modules: object,
               hparams: tuple, rslora: bool, bias: str, saved_names: list[str],
               gen: torch.Generator, use_dora: bool, adapter_name: str) -> nn.Module:
    """add_lora's second path: one more named adapter on the layers the model's adapters adapt."""
    from .named_adapters import _layers, _park

    layers = _layers(model)
    names = list(layers[0][1].adapter_names())
    if adapter_name in names:
        raise ValueError(
            f"adapter_name={adapter_name!r} is already an adapter of the model ({names}): a "
            "model with several adapters cannot extend one to more layers; delete_adapter "
            "it first, or pick another name; nothing was changed")
    if bias != "none" or saved_names or saved_modules(model) or (recorded_bias(model) or "none") != "none":
        raise ValueError(
            f"a second adapter (adapter_name={adapter_name!r}) cannot come with "
            f"modules_to_save or a bias mode other than 'none' (got bias={bias!r}, "
            f"modules_to_save={saved_names or [n for n, _ in saved_modules(model)]}, recorded "
            f"bias={recorded_bias(model)!r}): PEFT keeps one trained copy per adapter, this "
            "library one; nothing was changed")
    lora_paths = [name for name, _ in existing]
    selected = _adapted_by(model, target_modules)
    extra = [n for n in selected if n not in lora_paths]
    lacking = [n for n in lora_paths if n not in selected]
    if extra or lacking:
        raise ValueError(
            f"a new adapter (adapter_name={adapter_name!r}) must adapt exactly the layers the "
            f"model's adapters {names} adapt, {lora_paths[:4]}{' ...' if len(lora_paths) > 4 else ''}; "
            f"target_modules={target_modules!r} also selects {extra[:3]} and misses "
            f"{lacking[:3]}; nothing was changed")
    kind = isinstance(existing[0][1], DoRALinear)
    if use_dora != kind:
        raise ValueError(
            f"use_dora={use_dora}, but the model's adapters {names} are "
            f"{'DoRA' if kind else 'LoRA'}: a layer holds adapters of one kind; nothing was "
            "changed")
    merged = [name for name, layer in existing if layer.merged]
    if merged:
        raise RuntimeError(f"cannot add an adapter while {merged[:3]} are merged: "
                           "unmerge_adapter(model) first; nothing was changed")
    r, alpha, dropout, init, init_scale = hparams
    cls = DoRALinear if use_dora else LoRALinear
    parked = [
        _ParkedAdapter.take(cls.from_linear(
            layer.base, r=r, alpha=alpha, dropout=dropout, init=init, init_scale=init_scale,
            rslora=rslora, seed=gen))
        for _, layer in existing
    ]
    for (_, layer), adapter in zip(existing, parked):
        adapter.requires_grad_(False)
        _park(layer, adapter_name, adapter)
    mark_only_lora_as_trainable(model, bias="none")
    return model


def _refuse_tied_merges(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    holders = _holders(model)
    for name, layer in layers:
        tied = [other for other, _, _ in _ties(holders, name, _base_weight(layer))]
        if tied and not layer.merged:
            raise RuntimeError(
                f"refusing to merge: the base weight of {name!r} is tied to {tied} (the "
                "same parameter), so merging would silently change that too. Call "
                f"model.get_submodule({name!r}).untie_weights_() first to give the layer "
                "its own copy, or unload with merge=False; no layer was changed")


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Take the adapter out of ``model``, in place: every ``LoRALinear`` becomes its base layer.

    With ``merge=True`` (PEFT's ``merge_and_unload``) each update is merged into
    its base weight first, and each module trained whole is replaced by its
    trained copy, so the plain model computes what the adapted one did (in
    evaluation mode). Every layer is checked first: if any merged weight would
    not be finite, any base weight is tied to another parameter (merging
    would change that too, see
    :meth:`~lora_tutorial.layers.LoRALinear.untie_weights_`), or any base is an
    :class:`~lora_tutorial.quant.NF4Linear` (:class:`TypeError`: merge into a
    dequantised copy, :func:`dequantize_model`), nothing changes.
    With ``merge=False`` the adapters are dropped, the base weights restored
    and each module trained whole replaced by its original: the base model
    comes back. (PEFT's ``unload`` keeps the trained copies instead; here
    ``merge=False`` means the model without its adapter, copies included.)
    With several named adapters, ``merge=True`` merges the active one, as
    PEFT's ``merge_and_unload`` does, and the others are dropped.
    Returns ``model`` (a bare ``LoRALinear`` cannot replace itself: unload
    its parent).
    """
    if isinstance(model, LoRALinear):
        raise TypeError("unload_lora needs the model that holds the LoRALinear layers, "
                        "not a LoRALinear itself")
    _check_model(model)
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool, got {merge!r}")
    layers = list(lora_layers(model))
    wrappers = saved_modules(model)
    if merge:
        for name, layer in layers:
            _refuse_quantized_merge(layer.base, name)
        _refuse_tied_merges(model, layers)
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
    for name, wrapper in wrappers:
        _replace(model, name, wrapper.trained if merge else wrapper.original_module)
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
    quantising the merged weight again. The weights come back in each layer's
    ``weight_dtype`` (the quantised weight's dtype, or float64 after
    ``model.double()``), ``(out, in)`` as an ``nn.Linear`` stores them (a layer
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
