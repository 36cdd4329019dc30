"""Adapters on disk, in Hugging Face PEFT's format.

:func:`save_adapter` writes only what fine-tuning changed, as PEFT's
``save_pretrained`` does for LoRA:

* ``adapter_model.safetensors``: for each ``LoRALinear`` at module path ``P``,
  ``base_model.model.P.lora_A.weight`` ``(r, in)`` and
  ``base_model.model.P.lora_B.weight`` ``(out, r)``; with ``bias="lora_only"``
  also ``base_model.model.P.base_layer.bias``; with ``bias="all"`` every other
  bias ``B`` as ``base_model.model.B``;
* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``use_rslora``, ``target_modules``, ``bias`` and the other
  keys PEFT reads.

:func:`load_adapter` reads such a directory (one written here or by PEFT) into
the ``LoRALinear`` layers of a matching model. It never unpickles anything
(safetensors only), checks every key, shape and setting first, and changes the
model only if all of them fit; otherwise it raises an error naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_choice
from .inject import lora_layers
from .layers import LoRALinear, _check_hparams
from .params import BIAS_MODES

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterFormatError", "load_adapter", "save_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# Settings PEFT writes that only describe where or how adapters were injected, or
# which software wrote the file: they do not change what the adapter computes.
_DESCRIPTIVE = {
    "auto_mapping", "base_model_name_or_path", "revision", "peft_version", "task_type", "inference_mode",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
}
# Settings this library honours (see load_adapter).
_HONOURED = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "init_lora_weights"}
# Initialisations that leave the base weights alone, so an adapter trained from them can be
# loaded onto the untouched base model (PiSSA, OLoRA, CorDA, LoftQ... rewrite the base).
_LOADABLE_INITS = (True, False, "gaussian")


class AdapterFormatError(ValueError):
    """An adapter directory that this library cannot load (the message names the key)."""


def _is_default(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _settings(layer: LoRALinear) -> tuple[int, float, bool, float]:
    return layer.r, layer.alpha, layer.rslora, _dropout_p(layer)


def _config_for(layers: list[tuple[str, LoRALinear]], bias: str) -> dict[str, Any]:
    first_name, first = layers[0]
    for name, layer in layers[1:]:
        if _settings(layer) != _settings(first):
            raise ValueError(
                "save_adapter writes one config for all layers, but "
                f"{first_name!r} has (r, alpha, rslora, dropout) = {_settings(first)} "
                f"and {name!r} has {_settings(layer)}"
            )
    # PEFT's names for the initialisations; PEFT has no N(0, init_scale²) draw, and once trained the
    # adapter's values no longer depend on how it started, so "normal" is written as PEFT's default.
    init = {"kaiming": True, "gaussian": "gaussian"}.get(first.init, True)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": _dropout_p(first),
        "use_rslora": first.rslora,
        "target_modules": [name for name, _ in layers],
        "bias": bias,
        "init_lora_weights": init,
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }


def _dropout_p(layer: LoRALinear) -> float:
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


def _infer_bias(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> str:
    lora_bias_ids = {id(layer.base.bias) for _, layer in layers if layer.base.bias is not None}
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad and name.endswith("bias")]
    if any(id(p) not in lora_bias_ids for _, p in trained):
        return "all"
    return "lora_only" if trained else "none"


def _bias_tensors(model: nn.Module, layers: list[tuple[str, LoRALinear]], bias: str) -> dict[str, torch.Tensor]:
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


def _adapter_tensors(model: nn.Module, layers: list[tuple[str, LoRALinear]], bias: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
    tensors.update(_bias_tensors(model, layers, bias))
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, bias: str | None = None) -> Path:
    """Write ``model``'s LoRA adapters to ``directory`` in PEFT's format; returns the directory.

    Args:
        model: a model holding one or more :class:`~lora_tutorial.layers.LoRALinear` layers,
            all with the same ``r``, ``alpha``, scaling rule and dropout.
        directory: created if needed; ``adapter_model.safetensors`` and
            ``adapter_config.json`` are written into it.
        bias: which biases belong to the adapter (``"none"``, ``"lora_only"``, ``"all"``, as
            in PEFT). By default it is read off the model: whichever biases are trainable.
            Merged layers are saved with their adapters (the merge is not part of the file).
    """
    from safetensors.torch import save_file

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers: nothing to save")
    bias = _infer_bias(model, layers) if bias is None else check_choice("bias", bias, BIAS_MODES)
    config = _config_for(layers, bias)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in _adapter_tensors(model, layers, bias).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterFormatError(f"{path} is missing: an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("init_lora_weights", True) not in _LOADABLE_INITS:
        raise AdapterFormatError(
            f"init_lora_weights={config['init_lora_weights']!r} is not supported: this library loads adapters "
            f"whose base model is unchanged, initialised with one of {list(_LOADABLE_INITS)}"
        )
    for key, value in config.items():
        if key in _DESCRIPTIVE or key in _HONOURED or _is_default(value):
            continue
        raise AdapterFormatError(
            f"{key}={value!r} is a feature this library cannot honour (it supports plain LoRA: "
            "no DoRA, LoRA bias, pattern ranks, modules_to_save, fan_in_fan_out or similar)"
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterFormatError(f"{ADAPTER_CONFIG} has no {key!r}")
    try:
        _check_hparams(config["r"], float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                       "kaiming", 1e-4)
        check_choice("bias", config.get("bias", "none"), BIAS_MODES)
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: {err}") from None
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an adapter directory in PEFT's format into ``model``'s ``LoRALinear`` layers.

    Every layer receives ``lora_A``, ``lora_B`` (and biases, by the config's
    ``bias``) and takes the config's ``lora_alpha``, ``use_rslora`` and
    ``lora_dropout``; ``r`` must equal each layer's rank. Nothing is changed
    unless everything fits.

    Returns:
        ``model``.

    Raises:
        AdapterFormatError: (a ``ValueError``) for a missing, unexpected or
            mismatched tensor, a wrong rank, a module path that is not a
            ``LoRALinear`` of the model, or a config this library cannot honour;
            the message names the key.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS
    config = _read_config(directory)
    if not weights.is_file():
        other = sorted(p.name for p in directory.glob("adapter_model.*"))
        hint = f" (found {other}: only safetensors is read, never pickle)" if other else ""
        raise AdapterFormatError(f"{weights} is missing{hint}")
    try:
        loaded = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise AdapterFormatError(f"{weights} is not a readable safetensors file: {err}") from None

    layers = list(lora_layers(model))
    if not layers:
        raise AdapterFormatError("model has no LoRALinear layers to load an adapter into")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise AdapterFormatError(f"layers {merged} are merged: call unmerge_weights_() before loading an adapter")
    bias = config.get("bias", "none")
    expected = _adapter_tensors(model, layers, bias)

    unexpected = sorted(set(loaded) - set(expected))
    if unexpected:
        key = unexpected[0]
        module = key[len(PREFIX):].rsplit(".", 2)[0] if key.startswith(PREFIX) else key
        raise AdapterFormatError(
            f"{key}: the model has no LoRALinear (or trainable bias) at this path ({module!r}); "
            f"its LoRA layers are {[name for name, _ in layers]}"
        )
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise AdapterFormatError(f"{missing[0]} is missing from {weights.name} ({len(missing)} key(s) missing)")
    r = int(config["r"])
    for name, layer in layers:
        if layer.r != r:
            raise AdapterFormatError(f"r={r} in {ADAPTER_CONFIG}, but the LoRALinear at {name!r} has r={layer.r}")
    for key, target in expected.items():
        tensor = loaded[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise AdapterFormatError(f"{key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{key} holds non-finite values")

    # Everything fits: now change the model.
    alpha = float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))
    p = float(config.get("lora_dropout", 0.0))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(loaded[key].to(dtype=target.dtype, device=target.device))
    for _, layer in layers:
        layer.alpha, layer.rslora = alpha, rslora  # the scaling follows from them
        if p != _dropout_p(layer):
            layer.dropout = (nn.Dropout(p) if p > 0 else nn.Identity()).train(layer.training)
    return model
