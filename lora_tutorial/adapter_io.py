"""Adapters on disk, in Hugging Face PEFT's format.

:func:`save_adapter` writes only what fine-tuning changed, as PEFT's
``save_pretrained`` does for LoRA:

* ``adapter_model.safetensors``: for each ``LoRALinear`` at module path ``P``,
  ``base_model.model.P.lora_A.weight`` ``(r, in)`` and
  ``base_model.model.P.lora_B.weight`` ``(out, r)`` (and for DoRA
  ``base_model.model.P.lora_magnitude_vector`` ``(out,)``); with ``bias="lora_only"``
  also ``base_model.model.P.base_layer.bias``; with ``bias="all"`` every bias
  of the model by PEFT's name for it (``base_model.model.B``, and for a module
  trained whole also ``...original_module.bias`` and ``...modules_to_save.bias``,
  as PEFT writes them); for each module ``M`` trained whole
  (``modules_to_save``), its trained copy's state as ``base_model.model.M.<name>``;
* ``adapter_config.json``: ``peft_type: "LORA"``, ``r`` (the factors' rank),
  ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``, ``target_modules``,
  ``bias``, ``modules_to_save`` and the other keys PEFT reads.
  ``target_modules`` selects in PEFT exactly the adapted modules: the list of
  their names when PEFT's suffix rule selects just those, otherwise a regular
  expression that does (a list ``["0"]`` would also select ``"1.0"``).

:func:`load_adapter` reads such a directory (one written here or by PEFT) into
the ``LoRALinear`` layers of a matching model. It never unpickles anything
(safetensors only), checks every key, shape, dtype, value and setting first,
and changes the model only if all of them fit; otherwise it raises an
:class:`AdapterFormatError` naming the key. A file may also hold copies of
base tensors, which an adapter does not change (PEFT's default save of an
adapted ``lm_head`` tied to the input embedding includes
``lm_head.base_layer.weight``): they load if they equal the model's, and are
refused otherwise, since the adapter was then made for another base model.
After a load the model is what the file describes: its modules trained whole
are the file's ``modules_to_save`` (wrapped or unwrapped to match), and what
trains is exactly the adapter the file holds.

A model with several named adapters (:mod:`~lora_tutorial.named_adapters`)
is saved in PEFT's layout: the adapter named ``"default"`` in the directory
itself, every other one in a subdirectory of its name, each with its own two
files (what ``save_pretrained`` writes); ``save_adapter(..., adapter_name=)``
writes one of them, and ``load_adapter(..., adapter_name=)`` reads one
adapter's directory into the adapter of that name.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ._checks import check_choice
from .inject import (
    BIAS_ATTR,
    MODULES_TO_SAVE_ATTR,
    _check_initialised,
    _check_model,
    _match_modules_to_save,
    _read_not_called,
    _recorded,
    _replace,
    base_modules,
    _check_saved_matches,
    lora_layers,
    recorded_bias,
    saved_modules,
)
from .dora import DoRALinear
from .layers import LoRALinear
from .module_to_save import ModuleToSave
from .params import BIAS_MODES, mark_only_lora_as_trainable

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterFormatError", "load_adapter",
           "save_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# Settings PEFT writes that only describe where or how adapters were injected, or
# which software wrote the file: they do not change what the adapter computes.
_DESCRIPTIVE = {
    "auto_mapping", "base_model_name_or_path", "revision", "peft_version", "task_type",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "megatron_core", "qalora_group_size", "eva_config",
}
# Settings this library honours (see load_adapter).
_HONOURED = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
             "init_lora_weights", "fan_in_fan_out", "modules_to_save", "use_dora"}
# Initialisations that leave the base weights alone and need nothing at load time, so an
# adapter trained from them loads onto the untouched base model (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA... rewrite the base). True is PEFT's Kaiming-uniform default.
_LOADABLE_INITS = (True, False, "gaussian", "orthogonal", "eva")


class AdapterFormatError(ValueError):
    """An adapter directory that this library cannot load (the message names the key)."""


# ------------------------------------------------------------------ saving
def _is_conv1d(layer: LoRALinear) -> bool:
    return bool(getattr(layer, "fan_in_fan_out", False))


def _settings(layer: LoRALinear) -> tuple[int, float, bool, float]:
    return layer.r, layer.alpha, layer.rslora, layer.dropout_p


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_factors(layers: list[tuple[str, LoRALinear]]) -> None:
    """Refuse factors whose shapes contradict each other or the base (so the config's r would)."""
    for name, layer in layers:
        a, b = tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)
        if a != (layer.r, layer.in_features) or b != (layer.out_features, layer.r):
            raise ValueError(
                f"the LoRALinear at {name!r} holds lora_A {a} and lora_B {b}, which do not "
                f"fit a rank-r update of {layer.in_features} -> {layer.out_features} features "
                "((r, in) and (out, r)); no config can describe them")


def _peft_targets(model: nn.Module, adapted: list[str],
                  saved_names: list[str] | None) -> list[str] | str:
    """A ``target_modules`` with which PEFT selects, in the base model, exactly ``adapted``."""
    keys = [name for name, _ in base_modules(model) if name]

    def selected(targets: list[str] | str) -> set[str]:
        out = set()
        for key in keys:
            try:  # PEFT never adapts inside modules_to_save, by this (regex) rule
                if saved_names and any(re.match(rf"(^|.*\.){m}($|\..*)", key)
                                       for m in saved_names):
                    continue
            except re.error as err:
                raise ValueError(f"modules_to_save {saved_names} cannot be read by PEFT, which "
                                 f"uses each name in a regular expression: {err}") from None
            if isinstance(targets, str):
                hit = re.fullmatch(targets, key) is not None
            else:
                hit = key in targets or any(key.endswith("." + t) for t in targets)
            if hit:
                out.add(key)
        return out

    if selected(adapted) == set(adapted):
        return list(adapted)
    pattern = "|".join(re.escape(name) for name in adapted)
    if selected(pattern) != set(adapted):
        raise ValueError(f"PEFT cannot be told to adapt exactly the modules {adapted} of "
                         "this model; no adapter file was written")
    return pattern


def _saved_names(model: nn.Module, wrappers: dict[str, ModuleToSave]) -> list[str] | None:
    """The ``modules_to_save`` to write: names with which PEFT selects exactly ``wrappers``."""
    if not wrappers:
        return None
    recorded = _recorded(model, MODULES_TO_SAVE_ATTR)
    for names in ([list(recorded)] if recorded else []) + [sorted(wrappers)]:
        if sorted(name for name, _ in _match_modules_to_save(model, names)) == sorted(wrappers):
            return names
    raise ValueError(
        f"the modules trained whole {sorted(wrappers)} cannot be named so that PEFT selects "
        "exactly them (PEFT's rule: a module whose full name ends with a given name); no "
        "adapter file was written")


def _config_for(model: nn.Module, layers: list[tuple[str, LoRALinear]], bias: str,
                saved_names: list[str] | None) -> dict[str, Any]:
    first_name, first = layers[0]
    dora = [name for name, layer in layers if isinstance(layer, DoRALinear)]
    if dora and len(dora) != len(layers):
        plain = next(name for name, _ in layers if name not in dora)
        raise ValueError(
            f"save_adapter writes one config for all layers, but {dora[0]!r} is DoRA and "
            f"{plain!r} is not (PEFT's use_dora is one setting)")
    for name, layer in layers[1:]:
        if _settings(layer) != _settings(first):
            raise ValueError(
                "save_adapter writes one config for all layers, but "
                f"{first_name!r} has (r, alpha, rslora, dropout) = {_settings(first)} "
                f"and {name!r} has {_settings(layer)}"
            )
    # PEFT's names for the initialisations; PEFT has no N(0, init_scale²) draw, and once
    # trained the adapter's values no longer depend on how it started, so "normal" is
    # written as PEFT's default.
    init = {"kaiming": True, "gaussian": "gaussian"}.get(first.init, True)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p,
        "use_rslora": first.rslora,
        "target_modules": _peft_targets(model, [name for name, _ in layers], saved_names),
        "bias": bias,
        "init_lora_weights": init,
        # PEFT sets it when it adapts a Conv1D (GPT-2); the tensors are the same either way.
        "fan_in_fan_out": any(_is_conv1d(layer) for _, layer in layers),
        "use_dora": bool(dora),
        "lora_bias": False,
        "modules_to_save": saved_names,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }


def _peft_state(model: nn.Module, wrappers: dict[str, ModuleToSave]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` under the key PEFT's state dict gives it (adapter name removed).

    ``wrappers`` are the modules trained whole, by base-model path (those the
    model has, or is about to have); any other wrapper counts as its original.
    """
    out: dict[str, torch.Tensor] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if prefix in wrappers:
            wrapper = wrappers[prefix]
            for key, t in wrapper.original_module.state_dict(keep_vars=True).items():
                out[f"{prefix}.original_module.{key}"] = t
            for key, t in wrapper.trained.state_dict(keep_vars=True).items():
                out[f"{prefix}.modules_to_save.{key}"] = t
            return
        if isinstance(module, ModuleToSave):
            module = module.original_module
        if isinstance(module, LoRALinear):
            for key, t in module.base.state_dict(keep_vars=True).items():
                out[_join(prefix, f"base_layer.{key}")] = t
            out[_join(prefix, "lora_A.weight")] = module.lora_A
            out[_join(prefix, "lora_B.weight")] = module.lora_B
            if isinstance(module, DoRALinear):
                out[_join(prefix, "lora_magnitude_vector")] = module.lora_magnitude_vector
            return
        for key, t in module._parameters.items():
            if t is not None:
                out[_join(prefix, key)] = t
        for key, t in module._buffers.items():
            if t is not None and key not in module._non_persistent_buffers_set:
                out[_join(prefix, key)] = t
        for name, child in module._modules.items():
            if child is not None:
                walk(child, _join(prefix, name))

    walk(model, "")
    return out


def _adapter_tensors(state: dict[str, torch.Tensor], layers: list[tuple[str, LoRALinear]],
                     bias: str, wrappers: dict[str, ModuleToSave],
                     peft_extras: bool) -> dict[str, torch.Tensor]:
    """The adapter's entries of the file, by PEFT key, pointing at the model's tensors.

    ``peft_extras`` adds what PEFT also writes with ``bias="all"``: the biases
    inside a module trained whole, under ``original_module`` and
    ``modules_to_save`` (copies of a base bias and of the trained copy's bias).
    """
    inner = tuple(f"{w}.{part}." for w in wrappers for part in ("original_module", "modules_to_save"))
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        keys = ("lora_A.weight", "lora_B.weight") + (
            ("lora_magnitude_vector",) if isinstance(layer, DoRALinear) else ())
        for key in keys:
            out[PREFIX + _join(name, key)] = state[_join(name, key)]
    if bias == "lora_only":
        for name, _ in layers:
            if _join(name, "base_layer.bias") in state:
                out[PREFIX + _join(name, "base_layer.bias")] = state[_join(name, "base_layer.bias")]
    elif bias == "all":
        for key, t in state.items():
            if (key == "bias" or key.endswith(".bias")) and (peft_extras or not key.startswith(inner)):
                out[PREFIX + key] = t
    for path, wrapper in wrappers.items():
        for key, t in wrapper.trained.state_dict(keep_vars=True).items():
            out[f"{PREFIX}{path}.{key}"] = t
    return out


@contextlib.contextmanager
def _using(model: nn.Module, name: str | None, action: str) -> Iterator[str]:
    """Within this context adapter ``name`` (default: the active one) is in every layer's slots."""
    from .named_adapters import _check_known, _layers

    layers = _layers(model)
    previous = layers[0][1].adapter_name
    name = previous if name is None else _check_known(model, name)
    merged = [path for path, layer in layers if layer.merged]
    if merged and name != previous:
        raise RuntimeError(
            f"cannot {action} adapter {name!r} while adapter {previous!r} is merged into "
            f"{merged[:3]}: unmerge_adapter(model) first; nothing was changed")
    for _, layer in layers:
        layer._switch_to(name)
    try:
        yield name
    finally:
        for _, layer in layers:
            layer._switch_to(previous)


def save_adapter(model: nn.Module, directory: str | Path, bias: str | None = None, *,
                 adapter_name: str | None = None) -> Path:
    """Write ``model``'s LoRA adapters to ``directory`` in PEFT's format; returns the directory.

    Args:
        model: a model holding one or more :class:`~lora_tutorial.layers.LoRALinear`
            layers, all with the same ``r``, ``alpha``, scaling rule and dropout.
        directory: created if needed; ``adapter_model.safetensors`` and
            ``adapter_config.json`` are written into it.
        bias: which biases belong to the adapter (``"none"``, ``"lora_only"``,
            ``"all"``, as in PEFT). By default the mode recorded when LoRA was
            added (:func:`~lora_tutorial.inject.add_lora`'s ``bias``), whatever
            is trainable now; ``"none"`` if none was recorded (a model built
            with ``LoRALinear`` layers directly, such as ``TinyAdapter``).
            Modules trained whole (``add_lora``'s ``modules_to_save``) are saved too.
            Merged layers are saved with their adapters (the merge is not part of the file).

        adapter_name: with several named adapters, write only this one (at its
            place in PEFT's layout: ``directory`` for ``"default"``, else
            ``directory/<adapter_name>``); by default every adapter is written.

    The config's ``r`` is the factors' rank, and factors whose shapes do not
    fit together are refused (:class:`ValueError`), so the file never
    contradicts itself; so is a model PEFT could not be told to select exactly.
    Every adapter's files are made before any is written.
    """
    from safetensors.torch import save_file

    from .named_adapters import _check_known

    _check_model(model)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers: nothing to save")
    if isinstance(model, LoRALinear):
        raise TypeError("save_adapter needs the model that holds the LoRALinear layers, not a "
                        "LoRALinear itself (PEFT adapts the modules of a model)")
    if bias is None:
        bias = recorded_bias(model) or "none"
    bias = check_choice("bias", bias, BIAS_MODES)
    names = ([_check_known(model, adapter_name)] if adapter_name is not None
             else list(layers[0][1].adapter_names()))
    files = {}
    for name in names:
        with _using(model, name, "save"):
            _check_factors(layers)
            wrappers = dict(saved_modules(model))
            config = _config_for(model, layers, bias, _saved_names(model, wrappers))
            state = _peft_state(model, wrappers)
            tensors = {key: t.detach().to("cpu", copy=True).contiguous()
                       for key, t in _adapter_tensors(state, layers, bias, wrappers, True).items()}
        files[name] = config, tensors
    directory = Path(directory)
    for name, (config, tensors) in files.items():
        target = directory if name == "default" else directory / name
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
        (target / ADAPTER_CONFIG).write_text(text + "\n")
    return directory


# ------------------------------------------------------------------ loading
def _is_default(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _real(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: {key} must be a JSON number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        return math.copysign(math.inf, value)


def _boolean(config: dict[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: {key} must be true or false, got {value!r}")
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    """The config's settings, each checked for its JSON type and range."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterFormatError(
            f"{path} is missing: an adapter directory holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS}")
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and init in _LOADABLE_INITS)):
        raise AdapterFormatError(
            f"init_lora_weights={init!r} is not supported: this library loads adapters "
            f"whose base model is unchanged, initialised with one of {list(_LOADABLE_INITS)}"
        )
    for key, value in config.items():
        if key in _DESCRIPTIVE or key in _HONOURED or _is_default(value):
            continue
        raise AdapterFormatError(
            f"{key}={value!r} is a feature this library cannot honour (it supports "
            "LoRA and DoRA: no LoRA bias, pattern ranks or similar)"
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterFormatError(f"{ADAPTER_CONFIG} has no {key!r}")
    r = config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: r must be a positive integer, got {r!r}")
    alpha = _real("lora_alpha", config["lora_alpha"])
    if not (math.isfinite(alpha) and alpha > 0):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: lora_alpha must be a positive finite number, got {alpha!r}")
    dropout = _real("lora_dropout", config.get("lora_dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: lora_dropout must be in [0, 1), got {dropout!r}")
    bias = config.get("bias", "none")
    if not isinstance(bias, str) or bias not in BIAS_MODES:
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: bias must be one of {list(BIAS_MODES)}, got {bias!r}")
    names = config.get("modules_to_save")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) and n for n in names)):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: modules_to_save must be null or a list of module names, "
            f"got {names!r}")
    return {"r": r, "alpha": alpha, "dropout": dropout, "bias": bias,
            "rslora": _boolean(config, "use_rslora"),
            "use_dora": _boolean(config, "use_dora"),
            "fan_in_fan_out": _boolean(config, "fan_in_fan_out"),
            "modules_to_save": names or None}


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        other = sorted(p.name for p in directory.glob("adapter_model.*"))
        hint = f" (found {other}: only safetensors is read, never pickle)" if other else ""
        raise AdapterFormatError(f"{weights} is missing{hint}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise AdapterFormatError(
            f"{weights} is not a readable safetensors file: {err}") from None


def _cast(key: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``target``'s dtype and device, refused if it is not a fitting value."""
    if tuple(tensor.shape) != tuple(target.shape):
        raise AdapterFormatError(
            f"{key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    if target.is_floating_point():
        if not tensor.is_floating_point():
            raise AdapterFormatError(
                f"{key} holds {tensor.dtype} values; the model's tensor is "
                f"{target.dtype}, and only floating-point values are loaded into it")
        cast = tensor.to(dtype=target.dtype, device=target.device)
        bad = int((~torch.isfinite(cast)).sum())
        if bad:
            raise AdapterFormatError(
                f"{key} holds {bad} value(s) that are not finite in the model's "
                f"{target.dtype} (NaN, inf, or too large for {target.dtype})")
        return cast
    if tensor.dtype != target.dtype:
        raise AdapterFormatError(f"{key} is {tensor.dtype}, the model's tensor is {target.dtype}")
    return tensor.to(device=target.device)


def _check_scaling(layers: list[tuple[str, LoRALinear]], settings: dict[str, Any],
                   loaded: dict[str, torch.Tensor]) -> None:
    """Refuse an alpha, or an update, that is not finite in a layer's dtype."""
    r = settings["r"]
    scaling = settings["alpha"] / (math.sqrt(r) if settings["rslora"] else r)
    for name, layer in layers:
        dtype = layer.lora_A.dtype
        limit = torch.finfo(dtype).max
        if settings["alpha"] > limit or scaling > limit:
            raise AdapterFormatError(
                f"{ADAPTER_CONFIG}: lora_alpha={settings['alpha']!r} is not finite in "
                f"{dtype}, the dtype of the LoRALinear at {name!r}")
        a, b = loaded[f"{PREFIX}{name}.lora_A.weight"], loaded[f"{PREFIX}{name}.lora_B.weight"]
        with torch.no_grad():
            bad = int((~torch.isfinite((scaling * b) @ a)).sum())
        if bad:
            raise AdapterFormatError(
                f"the update scaling * B @ A of {name!r} would have {bad} non-finite "
                f"value(s) in {dtype} (lora_alpha={settings['alpha']!r})")


def _plan_wrappers(model: nn.Module, names: list[str] | None,
                   lora_names: list[str]) -> dict[str, ModuleToSave]:
    """The modules trained whole the file describes, by path: the model's wrappers, or new ones."""
    found = _match_modules_to_save(model, names) if names else []
    _check_saved_matches(model, found, lora_names, AdapterFormatError)
    return {path: module if isinstance(module, ModuleToSave) else ModuleToSave(module)
            for path, module in found}


def _unexpected(model: nn.Module, key: str, lora_names: list[str]) -> AdapterFormatError:
    """The error for a file entry that names nothing of the model's, saying what is there."""
    path = key[len(PREFIX):] if key.startswith(PREFIX) else key
    modules = dict(base_modules(model))
    owner = max((name for name in modules if not name or path.startswith(name + ".")), key=len)
    if isinstance(modules[owner], LoRALinear):
        return AdapterFormatError(
            f"{key}: the LoRALinear at {owner!r} has no tensor {path[len(owner) + 1:]!r} (an "
            "adapter there holds lora_A.weight and lora_B.weight, and base_layer.* only as "
            "bias or a copy of the base)")
    module = path.rsplit(".", 2)[0]
    why = ""
    if _read_not_called(dict(model.named_modules()), module):
        why = (": it is the out_proj of nn.MultiheadAttention, which this library does not "
               "adapt (the attention reads out_proj.weight without calling out_proj, so "
               "PEFT's adapter there changes nothing until merged)")
    elif owner and path.count(".") == owner.count(".") + 1:
        why = (f": it is a tensor of the base module {owner!r}; if that module was trained "
               "whole, the config's modules_to_save must name it")
    return AdapterFormatError(
        f"{key}: the model has no LoRALinear, adapter bias or module to save at this path "
        f"({module!r}){why}; its LoRA layers are {lora_names}")


def load_adapter(model: nn.Module, directory: str | Path, *,
                 adapter_name: str | None = None) -> nn.Module:
    """Load an adapter directory in PEFT's format into ``model``'s ``LoRALinear`` layers.

    Every layer receives ``lora_A``, ``lora_B`` (and biases, by the config's
    ``bias``) and takes the config's ``lora_alpha``, ``use_rslora`` and
    ``lora_dropout``; ``r`` must equal each layer's rank. Modules the config
    lists in ``modules_to_save`` (matched by PEFT's rule) are trained whole as
    in PEFT: each becomes a :class:`~lora_tutorial.module_to_save.ModuleToSave`
    (if it is not one already) whose trained copy receives the saved state,
    and a module the model trains whole that the file does not list gets its
    original back. Entries that copy a base tensor must equal the model's.
    Then what trains is exactly the adapter the file describes (the factors,
    the config's biases, the trained copies;
    :func:`~lora_tutorial.params.mark_only_lora_as_trainable`), and the bias
    mode and ``modules_to_save`` are recorded on the model, so saving it again
    writes the same kind of adapter. Nothing is changed unless everything fits.

    ``adapter_name`` (default: the active adapter) is the model's adapter
    that receives the file, one adapter's directory (PEFT's ``dir/<name>`` for
    a non-default adapter); it must exist already
    (``add_lora(..., adapter_name=)``), as every layer must. A DoRA file
    (``use_dora``) loads into DoRA layers only, a LoRA file into LoRA layers.

    Returns:
        ``model``.

    Raises:
        AdapterFormatError: (a ``ValueError``) naming the key, for: a config
            that is not a JSON object of the right types and ranges (a string
            where a boolean or number belongs, ``lora_alpha`` not finite in the
            model's dtype, ...) or asks for what this library cannot honour
            (DoRA, pattern ranks, tied adapters (``ensure_weight_tying``), an
            initialisation that rewrites the base, ...); a file that is not
            safetensors (pickle is never read); a missing, unexpected or
            mis-shaped tensor, a wrong rank; a copy of a base tensor that
            differs from the model's; an integer or boolean tensor where the
            model holds floating point; a value that is not finite once cast
            to the model's dtype, or an update that is not; merged layers.
    """
    _check_model(model)
    _check_initialised(model)  # (ValueError) what trains is set at the end, by what it is
    directory = Path(directory)
    settings = _read_config(directory)
    loaded = _read_weights(directory)

    layers = list(lora_layers(model))
    if not layers:
        raise AdapterFormatError("model has no LoRALinear layers to load an adapter into")
    with _using(model, adapter_name, "load into") as name:
        _load(model, directory, settings, loaded, layers, name)
    mark_only_lora_as_trainable(model, bias=settings["bias"])
    return model


def _load(model: nn.Module, directory: Path, settings: dict[str, Any],
          loaded: dict[str, torch.Tensor], layers: list[tuple[str, LoRALinear]],
          adapter_name: str) -> None:
    """load_adapter with ``adapter_name`` in the layers' slots."""
    several = len(layers[0][1].adapter_names()) > 1
    if several and (settings["bias"] != "none" or settings["modules_to_save"]):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: bias={settings['bias']!r} and modules_to_save="
            f"{settings['modules_to_save']} cannot be loaded into a model with several adapters "
            f"{list(layers[0][1].adapter_names())} (one trained copy or bias for all of them)")
    kinds = {isinstance(layer, DoRALinear) for _, layer in layers}
    if kinds != {settings["use_dora"]}:
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: use_dora={str(settings['use_dora']).lower()}, but the model's "
            f"adapter {adapter_name!r} is {'DoRA' if True in kinds else 'LoRA'}"
            f"{' in part' if len(kinds) > 1 else ''}: add_lora(..., use_dora="
            f"{settings['use_dora']}) to load this file")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise AdapterFormatError(
            f"layers {merged} are merged: call unmerge_weights_() before loading an adapter")
    names = settings["modules_to_save"]
    lora_names = [name for name, _ in layers]
    plan = _plan_wrappers(model, names, lora_names)
    state = _peft_state(model, plan)
    expected = _adapter_tensors(state, layers, settings["bias"], plan, False)

    # Beyond the adapter, a file may copy the base inside an adapted layer or a module
    # trained whole (PEFT saves an adapted, tied lm_head's base_layer.weight, and biases
    # under original_module and modules_to_save with bias="all").
    inner = tuple(f"{PREFIX}{_join(name, 'base_layer')}." for name in lora_names) + tuple(
        f"{PREFIX}{path}.{part}." for path in plan for part in ("original_module", "modules_to_save"))
    others = sorted(set(loaded) - set(expected))
    for key in others:
        if not (key.startswith(inner) and key[len(PREFIX):] in state):
            raise _unexpected(model, key, lora_names)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise AdapterFormatError(
            f"{missing[0]} is missing from {ADAPTER_WEIGHTS} ({len(missing)} key(s) missing)")
    for name, layer in layers:
        if layer.r != settings["r"]:
            raise AdapterFormatError(
                f"r={settings['r']} in {ADAPTER_CONFIG}, but the LoRALinear at {name!r} "
                f"has r={layer.r}")
    cast = {key: _cast(key, loaded[key], target) for key, target in expected.items()}
    _check_scaling(layers, settings, cast)
    # Entries beyond the adapter copy a tensor of the model: they must hold what it will hold.
    after = {id(target): key for key, target in expected.items()}
    for key in others:
        target = state[key[len(PREFIX):]]
        value = _cast(key, loaded[key], target)
        if id(target) in after:
            if not torch.equal(value, cast[after[id(target)]]):
                raise AdapterFormatError(
                    f"{key} and {after[id(target)]} are the same tensor of the model, but the "
                    "file holds different values for them")
        elif not torch.equal(value, target.detach()):
            raise AdapterFormatError(
                f"{key} is a copy of a base tensor of the model, which an adapter does not "
                "change, but its value differs from the model's: the adapter was saved with "
                "another base model (load_adapter never overwrites a base tensor)")

    # Everything fits: now change the model.
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(cast[key])
    current = dict(saved_modules(model))
    for path, wrapper in current.items():
        if path not in plan:
            _replace(model, path, wrapper.original_module)
    for path, wrapper in plan.items():
        if path not in current:
            _replace(model, path, wrapper)
    for _, layer in layers:
        layer.alpha, layer.rslora = settings["alpha"], settings["rslora"]
        layer.dropout_p = settings["dropout"]
    setattr(model, BIAS_ATTR, settings["bias"])
    setattr(model, MODULES_TO_SAVE_ATTR, names)
