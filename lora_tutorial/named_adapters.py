"""Many adapters on one model: names, switching, combining, merging one, mixed batches.

One base model can hold several adapters, one per task or customer, as in
PEFT. :func:`~lora_tutorial.inject.add_lora` with ``adapter_name=`` adds one
(the first is PEFT's ``"default"`` unless named);
:func:`~lora_tutorial.adapter_io.save_adapter` and
:func:`~lora_tutorial.adapter_io.load_adapter` take ``adapter_name=`` too.

The design, and why
-------------------
Each :class:`~lora_tutorial.layers.LoRALinear` computes with the adapter in
its own slots: ``lora_A``, ``lora_B`` (and DoRA's ``lora_magnitude_vector``),
``alpha``, ``rslora``, ``dropout_p``. The model's other adapters wait, parked,
in the layer's ``lora_parked`` dictionary (by name; the same tensor objects,
frozen). :func:`set_adapter` swaps the named adapter into the slots of every
layer. So:

* a model with one adapter is exactly what it always was: the same class,
  state-dict keys ``lora_A`` and ``lora_B``, files, printed layer, and the
  forward pass is :class:`~lora_tutorial.layers.LoRALinear`'s own, so an
  adapter switched in computes bit for bit what a model holding only that
  adapter computes;
* an optimizer keeps working across switches (it holds the tensors, which
  move but are never copied);
* a state dict's ``lora_A`` is the *active* adapter's: a layer refuses a
  state dict taken with another adapter active (its parked names differ).

PEFT stores every adapter under its name (``lora_A.default.weight``); this
library keeps the one-adapter layout the book has used since chapter 2.

What every adapter of a model shares, and what is refused
---------------------------------------------------------
All adapters of a model adapt the same layers, and are all DoRA or all
LoRA (a layer is one class); their ranks, scales and dropouts may differ.
Several adapters are refused together with ``modules_to_save`` or a bias
mode other than ``"none"``: PEFT keeps one trained copy (or bias) per adapter,
this library one. Only the active adapter can be merged
(:func:`merge_adapter` makes the merged one active), and a merged model
refuses to switch, delete, combine or mix. Every function checks everything
first and changes nothing when it refuses.

Combining and mixing
--------------------
:func:`combine_adapters` is PEFT's ``add_weighted_adapter`` for ``"cat"``
(the exact weighted sum of the updates, by concatenating the factors),
``"svd"`` (the weighted sum re-compressed to ``svd_rank`` by a truncated SVD:
by Eckart and Young the closest rank-``svd_rank`` matrix, so no other
adapter of that rank is nearer) and ``"linear"`` (PEFT's weighted sum of
the factors, an approximation, for equal ranks).

:func:`mixed_batch` runs one batch in which every example uses its own
adapter, or none (``"__base__"``), as PEFT's ``model(..., adapter_names=...)``
and, at scale, S-LoRA and Punica: each layer computes its base once for the
whole batch, then adds ``s_e B_e A_e x_e`` for every example ``e`` with one
pair of batched matrix products (``torch.bmm``) over factors gathered per
example (smaller ranks padded with zeros, which add exactly nothing).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator, Sequence

import torch
from torch import nn

from ._checks import check_choice, check_positive_int
from .dora import DoRALinear
from .inject import _check_model, _refuse_tied_merges, lora_layers, recorded_bias
from .layers import LoRALinear, _ParkedAdapter, _refuse_quantized_merge
from .params import mark_only_lora_as_trainable

__all__ = [
    "BASE",
    "COMBINATIONS",
    "active_adapter",
    "adapter_names",
    "combine_adapters",
    "delete_adapter",
    "merge_adapter",
    "mixed_batch",
    "set_adapter",
    "unmerge_adapter",
]

#: The name that means "no adapter" in a mixed batch (PEFT's).
BASE = "__base__"
#: The ways :func:`combine_adapters` can combine adapters.
COMBINATIONS = ("cat", "svd", "linear")


def check_adapter_name(name: object, argument: str = "adapter_name") -> str:
    """A usable adapter name: a non-empty ``str`` without ``.``, ``/`` or ``\\``, not ``"__base__"``.

    (A name is a key of a module dictionary and, in a saved model, a directory.)
    """
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {name!r}")
    if not name or name == BASE or any(c in name for c in "./\\") or name != name.strip():
        raise ValueError(
            f"{argument} must be a non-empty name without '.', '/', '\\' or surrounding "
            f"spaces, and not {BASE!r} (a mixed batch's word for no adapter), got {name!r}")
    return name


def _layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The model's LoRA layers, checked to hold the same adapters with the same one active."""
    layers = list(lora_layers(_check_model(model)))
    if not layers:
        raise ValueError("model has no LoRALinear layers: add_lora first")
    first_name, first = layers[0]
    for name, layer in layers[1:]:
        if (sorted(layer.adapter_names()), layer.adapter_name) != (
                sorted(first.adapter_names()), first.adapter_name):
            raise ValueError(
                f"the LoRA layers disagree: {first_name!r} holds {list(first.adapter_names())} "
                f"with {first.adapter_name!r} active, {name!r} holds "
                f"{list(layer.adapter_names())} with {layer.adapter_name!r} active")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(_layers(model)[0][1].adapter_names())


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter the model computes with."""
    return _layers(model)[0][1].adapter_name


def _check_known(model: nn.Module, name: object, argument: str = "adapter_name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {name!r}")
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"{argument}={name!r} is not an adapter of the model; it has {names}")
    return name


def _refuse_merged(layers: list[tuple[str, LoRALinear]], action: str) -> None:
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"cannot {action}: adapter {layers[0][1].adapter_name!r} is merged into "
            f"{merged[:3]}{' ...' if len(merged) > 3 else ''}; call unmerge_adapter(model) "
            "first; nothing was changed")


def _retrain(model: nn.Module) -> None:
    """What trains: the active adapter (PEFT's set_adapter makes it trainable)."""
    mark_only_lora_as_trainable(model, bias=recorded_bias(model) or "none")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the adapter the model computes with (and trains), in place.

    Every layer swaps the named adapter into its slots; the model then
    computes exactly what a model holding only that adapter does. As in PEFT,
    the active adapter's tensors become trainable and the others frozen.
    Refused while an adapter is merged. Returns ``model``.
    """
    layers = _layers(model)
    name = _check_known(model, adapter_name)
    if name == layers[0][1].adapter_name:
        return model
    _refuse_merged(layers, f"switch to adapter {name!r}")
    for _, layer in layers:
        layer._switch_to(name)
    _retrain(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove the adapter ``adapter_name`` from every layer, in place.

    The active adapter is refused (:func:`set_adapter` to another first; to
    remove the last adapter, :func:`~lora_tutorial.inject.unload_lora`), and
    so is a merged model. With one adapter left, the model is again a
    one-adapter model (no ``lora_parked``). Returns ``model``.
    """
    layers = _layers(model)
    name = _check_known(model, adapter_name)
    if name == layers[0][1].adapter_name:
        raise ValueError(
            f"adapter_name={name!r} is the active adapter: set_adapter(model, other) first "
            "(or unload_lora to remove the last adapter); nothing was changed")
    _refuse_merged(layers, f"delete adapter {name!r}")
    for _, layer in layers:
        del layer.lora_parked[name]
        names = tuple(n for n in layer.adapter_names() if n != name)
        if len(names) == 1:
            del layer.lora_parked
            vars(layer).pop("_names", None)
        else:
            layer._names = names
    return model


def _parked_or_active(layer: LoRALinear, name: str) -> nn.Module:
    """The module holding adapter ``name``'s tensors: the layer itself, or its parked adapter."""
    return layer if name == layer.adapter_name else layer.lora_parked[name]


def _factors(layer: LoRALinear, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, scaling)`` of adapter ``name`` in ``layer``."""
    holder = _parked_or_active(layer, name)
    return holder.lora_A, holder.lora_B, holder.scaling


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Merge one adapter into the base weights while the others stay loaded, in place.

    ``adapter_name`` (default: the active one) becomes the active adapter and
    is merged into every layer; the other adapters stay parked, untouched,
    and :func:`unmerge_adapter` gives the base weights back. Everything is
    checked first (an NF4 base, a tied weight, a merged weight that would not
    be finite, an adapter merged already) and nothing changes if any fails.
    Returns ``model``.
    """
    layers = _layers(model)
    name = layers[0][1].adapter_name if adapter_name is None else _check_known(model, adapter_name)
    _refuse_merged(layers, f"merge adapter {name!r}")
    for path, layer in layers:
        _refuse_quantized_merge(layer.base, path)
    _refuse_tied_merges(model, layers)
    previous = layers[0][1].adapter_name
    for _, layer in layers:
        layer._switch_to(name)
    try:
        with torch.no_grad():
            for path, layer in layers:
                delta = layer.delta_weight()
                weight = layer.base.weight + (delta.T if layer.fan_in_fan_out else delta)
                if isinstance(layer, DoRALinear):
                    weight = torch.cat([weight.flatten(), layer.lora_magnitude_vector
                                        / layer.weight_norm()])
                bad = int((~torch.isfinite(weight)).sum())
                if bad:
                    raise ValueError(
                        f"refusing to merge adapter {name!r}: the merged weight of {path!r} "
                        f"would have {bad} non-finite value(s); nothing was changed")
    except BaseException:
        for _, layer in layers:
            layer._switch_to(previous)
        raise
    for _, layer in layers:
        layer.merge_weights_()
    _retrain(model)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take the merged adapter back out of every base weight (by its record), in place."""
    for _, layer in _layers(model):
        layer.unmerge_weights_()
    return model


def _check_weights(weights: object, n: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a list of numbers, got {weights!r}")
    values = list(weights)
    if len(values) != n or not all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
            for w in values):
        raise ValueError(f"weights must be {n} finite numbers (one per adapter), got {values!r}")
    return [float(w) for w in values]


def _check_adapter_list(model: nn.Module, adapters: object) -> list[str]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list of adapter names, got {adapters!r}")
    names = list(adapters)
    if not names:
        raise ValueError("adapters must name at least one adapter, got []")
    for n in names:
        _check_known(model, n, "adapters")
    if len(set(names)) != len(names):
        raise ValueError(f"adapters must name each adapter once, got {names}")
    return names


@torch.no_grad()
def _combined(layer: LoRALinear, names: list[str], weights: list[float], how: str,
              rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined adapter's ``(A, B)`` for one layer (its scaling is 1)."""
    parts = [_factors(layer, n) for n in names]
    if how == "cat":  # sum_i w_i s_i B_i A_i = [B_1 ... B_k] [w_1 s_1 A_1; ...; w_k s_k A_k]
        a = torch.cat([a * (w * s) for (a, _, s), w in zip(parts, weights)], dim=0)
        b = torch.cat([b for _, b, _ in parts], dim=1)
        return a.clone(), b.clone()
    if how == "linear":  # PEFT's: the factors' weighted sums (not the updates')
        a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a
                for (a, _, s), w in zip(parts, weights))
        b = sum(math.sqrt(abs(w * s)) * b for (_, b, s), w in zip(parts, weights))
        return a, b
    delta = sum(w * ((b @ a) * s) for (a, b, s), w in zip(parts, weights))
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    a, b = vh[:rank], u[:, :rank] @ torch.diag(sigma[:rank])
    if rank > a.shape[0]:  # beyond min(in, out) the SVD is exact: pad with zeros
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a.clone(), b.contiguous()


def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> nn.Module:
    """Add a new adapter ``adapter_name`` that combines ``adapters``, weighted (PEFT's
    ``add_weighted_adapter``), in place; it is added, not activated.

    ``combination_type``:

    * ``"cat"``: the update is exactly ``sum_i w_i s_i B_i A_i``, of rank
      ``sum_i r_i``: ``B = [B_1 ... B_k]``, ``A = [w_1 s_1 A_1; ...]``;
    * ``"svd"``: that sum re-compressed to rank ``svd_rank`` (default: the
      largest rank combined) by a truncated SVD, ``B = U_k S_k``, ``A = V_k^T``,
      the best rank-``svd_rank`` approximation (Eckart-Young); in a layer
      where ``svd_rank`` exceeds ``min(in, out)`` the SVD is exact and the
      factors are padded with zeros (PEFT would build factors that do not fit);
    * ``"linear"``: PEFT's weighted sum of the factors themselves
      (``A = sum_i sqrt(w_i s_i) A_i``, likewise ``B``), for adapters of
      equal rank; its update has cross terms ``B_i A_j`` and is not the
      weighted sum of the updates.

    The new adapter has ``alpha = r`` (scaling 1), no rsLoRA, and the first
    adapter's dropout, as PEFT makes it. PEFT switches a single adapter to
    ``"linear"``; here ``"svd"`` of one adapter truncates it to ``svd_rank``.
    DoRA adapters are refused (their magnitudes do not add), as are a merged
    model and a name in use. Returns ``model``.
    """
    layers = _layers(model)
    names = _check_adapter_list(model, adapters)
    w = _check_weights(weights, len(names))
    new = check_adapter_name(adapter_name)
    if new in adapter_names(model):
        raise ValueError(f"adapter_name={new!r} is already an adapter of the model; pick "
                         "another name or delete_adapter first")
    how = check_choice("combination_type", combination_type, COMBINATIONS)
    ranks = [_factors(layers[0][1], n)[0].shape[0] for n in names]
    if how != "svd" and svd_rank is not None:
        raise ValueError(f"svd_rank is for combination_type='svd', got svd_rank={svd_rank!r} "
                         f"with {how!r}")
    if how == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks "
                         f"{dict(zip(names, ranks))}; use 'cat' or 'svd'")
    rank = {"cat": sum(ranks), "linear": ranks[0]}.get(how)
    if how == "svd":
        rank = max(ranks) if svd_rank is None else check_positive_int("svd_rank", svd_rank)
        largest = max(min(layer.in_features, layer.out_features) for _, layer in layers)
        if rank > largest:
            raise ValueError(f"svd_rank must be at most {largest} (the largest min(in, out) "
                             f"of the adapted layers: beyond it nothing is left to keep), "
                             f"got {rank}")
    if isinstance(layers[0][1], DoRALinear):
        raise ValueError("combine_adapters refuses DoRA adapters: their magnitude vectors "
                         "do not combine as updates do (use LoRA adapters)")
    _refuse_merged(layers, "combine adapters")
    first = _parked_or_active(layers[0][1], names[0])
    built = []
    for _, layer in layers:
        a, b = _combined(layer, names, w, how, rank)
        parked = _ParkedAdapter()
        parked.lora_A = nn.Parameter(a.contiguous(), requires_grad=False)
        parked.lora_B = nn.Parameter(b.contiguous(), requires_grad=False)
        parked.alpha, parked.rslora = float(a.shape[0]), False
        parked.dropout_p = first.dropout_p
        parked.init, parked.init_scale = "kaiming", layer.init_scale
        built.append(parked)
    for (_, layer), parked in zip(layers, built):
        _park(layer, new, parked)
    return model


def _park(layer: LoRALinear, name: str, parked: _ParkedAdapter) -> None:
    """Add ``parked`` to ``layer``'s adapters under ``name``."""
    if "lora_parked" not in layer._modules:
        layer.lora_parked = nn.ModuleDict()
    names = layer.adapter_names()
    layer.lora_parked[name] = parked
    layer._names = (*names, name)


def _padded(names: list[str], layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors ``(k + 1, r_max, in)`` and ``(k + 1, out, r_max)`` of ``names``
    (index 0: none, zeros), ``B`` scaled, smaller ranks padded with zeros."""
    parts = [_factors(layer, n) for n in names]
    r_max = max(a.shape[0] for a, _, _ in parts)
    a_all = layer.lora_A.new_zeros((len(names) + 1, r_max, layer.in_features))
    b_all = layer.lora_B.new_zeros((len(names) + 1, layer.out_features, r_max))
    for i, (a, b, s) in enumerate(parts, start=1):
        a_all[i, : a.shape[0]] = a
        b_all[i, :, : b.shape[1]] = b * s
    return a_all, b_all


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within this context, example ``i`` of every batch uses adapter ``adapter_names[i]``.

    ``"__base__"`` means no adapter (PEFT's word). The model is called as
    usual: every layer computes its base for the whole batch, then adds each
    example's own update ``s_e B_e A_e x_e`` with ``torch.bmm`` over factors
    gathered per example (PEFT's ``model(..., adapter_names=...)``, the idea of
    S-LoRA and Punica). A batch must have ``len(adapter_names)`` examples
    along its first dimension.

    Refused, before anything is switched: unknown names (PEFT would quietly
    use the base), a merged model (the merged update is in every example's
    base weight), DoRA adapters (PEFT refuses them too). Refused at the call:
    a batch of another size, and training (a forward pass in training mode
    with gradients on and trainable factors: a mixed batch is for inference,
    and dropout would act per adapter).
    """
    layers = _layers(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names (or {BASE!r}), "
                        f"got {adapter_names!r}")
    chosen = list(adapter_names)
    known = layers[0][1].adapter_names()
    wrong = [n for n in chosen if not isinstance(n, str) or (n != BASE and n not in known)]
    if not chosen or wrong:
        raise ValueError(f"adapter_names must be a non-empty list of the model's adapters "
                         f"{list(known)} or {BASE!r}; got {wrong[:3] or chosen!r}")
    if isinstance(layers[0][1], DoRALinear):
        raise ValueError("mixed_batch refuses DoRA adapters (as PEFT does): each example's "
                         "magnitude would rescale the shared base output; run one adapter "
                         "at a time (set_adapter)")
    _refuse_merged(layers, "run a mixed batch")
    used = [n for n in known if n in chosen]
    index = torch.tensor([0 if n == BASE else 1 + used.index(n) for n in chosen])
    stacks: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}

    def check(layer: nn.Module, args: tuple) -> None:
        x = args[0]
        if layer.training and torch.is_grad_enabled() and any(
                p.requires_grad for p in layer.parameters()):
            raise RuntimeError(
                "refusing to train in a mixed batch: a mixed batch is for inference. Call "
                "model.eval() or use torch.no_grad(), or train one adapter at a time "
                "(set_adapter)")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != len(chosen):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"a mixed batch of {len(chosen)} examples (len(adapter_names)) needs inputs "
                f"with {len(chosen)} rows along the first dimension, got {shape}")

    def gathered(layer: LoRALinear, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # The stacked factors; without gradients, kept until a factor changes (its version).
        idx = index.to(device)
        if torch.is_grad_enabled():
            a_all, b_all = _padded(used, layer)
            return a_all[idx].transpose(1, 2), b_all[idx].transpose(1, 2)
        versions = (torch.is_inference_mode_enabled(),) + tuple(
            t._version for n in used for t in _factors(layer, n)[:2])
        cached = stacks.get(id(layer))
        if cached is None or cached[0] != versions:
            a_all, b_all = _padded(used, layer)
            cached = stacks[id(layer)] = (versions, a_all[idx].transpose(1, 2),
                                          b_all[idx].transpose(1, 2))
        return cached[1], cached[2]

    def add_updates(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a_e, b_e = gathered(layer, x.device)  # (n, in, r_max), (n, r_max, out)
        ax = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a_e.to(x.dtype))
        flat = out.reshape(ax.shape[0], ax.shape[1], -1)
        return torch.baddbmm(flat, ax, b_e.to(x.dtype)).reshape(out.shape)

    with contextlib.ExitStack() as stack:
        for _, layer in layers:
            stack.enter_context(layer.disable_adapter())  # the base, for the whole batch
            stack.callback(layer.register_forward_pre_hook(check).remove)
            stack.callback(layer.register_forward_hook(add_updates).remove)
        yield model
