"""Adapters on disk, in Hugging Face PEFT's format.

:func:`save_adapter` writes only what fine-tuning changed, as PEFT's
``save_pretrained`` does for LoRA:

* ``adapter_model.safetensors``: for each ``LoRALinear`` at module path ``P``,
  ``base_model.model.P.lora_A.weight`` ``(r, in)`` and
  ``base_model.model.P.lora_B.weight`` ``(out, r)``; with ``bias="lora_only"``
  also ``base_model.model.P.base_layer.bias``; with ``bias="all"`` every other
  bias ``B`` as ``base_model.model.B``; for each module ``M`` trained whole
  (``modules_to_save``), its state as ``base_model.model.M.<name>``;
* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``use_rslora``, ``target_modules``, ``bias``,
  ``modules_to_save`` and the other keys PEFT reads.

:func:`load_adapter` reads such a directory (one written here or by PEFT) into
the ``LoRALinear`` layers of a matching model. It never unpickles anything
(safetensors only), checks every key, shape, dtype, value and setting first,
and changes the model only if all of them fit; otherwise it raises an
:class:`AdapterFormatError` naming the key.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_choice
from .inject import (
    BIAS_ATTR,
    MODULES_TO_SAVE_ATTR,
    _match_modules_to_save,
    lora_layers,
    recorded_bias,
    saved_modules,
)
from .layers import LoRALinear
from .params import BIAS_MODES

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
    "layers_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "eva_config",
}
# Settings this library honours (see load_adapter).
_HONOURED = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
             "init_lora_weights", "fan_in_fan_out", "modules_to_save"}
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


def _config_for(layers: list[tuple[str, LoRALinear]], bias: str,
                saved_names: list[str] | None) -> dict[str, Any]:
    first_name, first = layers[0]
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
        "target_modules": [name for name, _ in layers],
        "bias": bias,
        "init_lora_weights": init,
        # PEFT sets it when it adapts a Conv1D (GPT-2); the tensors are the same either way.
        "fan_in_fan_out": any(_is_conv1d(layer) for _, layer in layers),
        "use_dora": False,
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


def _bias_tensors(model: nn.Module, layers: list[tuple[str, LoRALinear]],
                  bias: str) -> dict[str, torch.Tensor]:
    """The bias entries of the adapter file, by PEFT key, pointing at the model's tensors."""
    out: dict[str, torch.Tensor] = {}
    if bias == "none":
        return out
    for name, layer in layers:
        if layer.base.bias is not None:
            out[f"{PREFIX}{name}.base_layer.bias"] = layer.base.bias
    if bias == "all":
        inside = {f"{name}.base.bias" for name, _ in layers}
        for name, p in model.named_parameters():
            if name.endswith("bias") and name not in inside:
                out[f"{PREFIX}{name}"] = p
    return out


def _saved_tensors(modules: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """PEFT's keys for modules trained whole: ``base_model.model.<module>.<state name>``."""
    out: dict[str, torch.Tensor] = {}
    for path, module in modules:
        for key, value in module.state_dict(keep_vars=True).items():
            out[f"{PREFIX}{path}.{key}"] = value
    return out


def _adapter_tensors(model: nn.Module, layers: list[tuple[str, LoRALinear]], bias: str,
                     saved: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
    tensors.update(_bias_tensors(model, layers, bias))
    tensors.update(_saved_tensors(saved))
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, bias: str | None = None) -> Path:
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
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers: nothing to save")
    if bias is None:
        bias = recorded_bias(model) or "none"
    bias = check_choice("bias", bias, BIAS_MODES)
    saved = saved_modules(model)
    names = _recorded_names(model) if saved else None
    config = _config_for(layers, bias, names)
    tensors = {key: t.detach().to("cpu", copy=True).contiguous()
               for key, t in _adapter_tensors(model, layers, bias, saved).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    (directory / ADAPTER_CONFIG).write_text(text + "\n")
    return directory


def _recorded_names(model: nn.Module) -> list[str] | None:
    for module in model.modules():
        if MODULES_TO_SAVE_ATTR in vars(module):
            return vars(module)[MODULES_TO_SAVE_ATTR]
    return None


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
            "plain LoRA: no DoRA, LoRA bias, pattern ranks or similar)"
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


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an adapter directory in PEFT's format into ``model``'s ``LoRALinear`` layers.

    Every layer receives ``lora_A``, ``lora_B`` (and biases, by the config's
    ``bias``) and takes the config's ``lora_alpha``, ``use_rslora`` and
    ``lora_dropout``; ``r`` must equal each layer's rank. Modules the config
    lists in ``modules_to_save`` (matched by PEFT's rule) receive their saved
    state whole. The bias mode and ``modules_to_save`` are recorded on the
    model, so saving it again writes the same kind of adapter. Nothing is
    changed unless everything fits.

    Returns:
        ``model``.

    Raises:
        AdapterFormatError: (a ``ValueError``) naming the key, for: a config
            that is not a JSON object of the right types and ranges (a string
            where a boolean or number belongs, ``lora_alpha`` not finite in the
            model's dtype, ...) or asks for what this library cannot honour
            (DoRA, pattern ranks, an initialisation that rewrites the base,
            ...); a file that is not safetensors (pickle is never read); a
            missing, unexpected or mis-shaped tensor, a wrong rank; an integer
            or boolean tensor where the model holds floating point; a value
            that is not finite once cast to the model's dtype, or an update
            that is not; merged layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    settings = _read_config(directory)
    loaded = _read_weights(directory)

    layers = list(lora_layers(model))
    if not layers:
        raise AdapterFormatError("model has no LoRALinear layers to load an adapter into")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise AdapterFormatError(
            f"layers {merged} are merged: call unmerge_weights_() before loading an adapter")
    names = settings["modules_to_save"]
    saved = _match_modules_to_save(model, names) if names else []
    lora_names = [name for name, _ in layers]
    for path, module in saved:
        if any(path == n or path.startswith(n + ".") for n in lora_names) or any(
                isinstance(m, LoRALinear) for m in module.modules()):
            raise AdapterFormatError(
                f"modules_to_save={names!r} matches {path!r}, which is or holds a LoRALinear")
    expected = _adapter_tensors(model, layers, settings["bias"], saved)

    unexpected = sorted(set(loaded) - set(expected))
    if unexpected:
        key = unexpected[0]
        module = key[len(PREFIX):].rsplit(".", 2)[0] if key.startswith(PREFIX) else key
        raise AdapterFormatError(
            f"{key}: the model has no LoRALinear, adapter bias or module to save at this "
            f"path ({module!r}); its LoRA layers are {lora_names}"
        )
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

    # Everything fits: now change the model.
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(cast[key])
    for _, layer in layers:
        layer.alpha, layer.rslora = settings["alpha"], settings["rslora"]
        layer.dropout_p = settings["dropout"]
    setattr(model, BIAS_ATTR, settings["bias"])
    setattr(model, MODULES_TO_SAVE_ATTR, names)
    return model
