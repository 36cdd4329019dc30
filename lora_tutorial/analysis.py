"""Measurements the chapters make on layers and updates."""

from __future__ import annotations

import torch

from ._checks import check_last_dim
from .layers import LoRALayer, LoRALinear

__all__ = ["relative_update_norm", "singular_values"]


@torch.no_grad()
def relative_update_norm(layer: LoRALayer | LoRALinear, x: torch.Tensor) -> float:
    """``‖update(x)‖ / ‖base(x)‖`` over a batch ``x (n, in_features)`` (Frobenius norms).

    How large the adapter's contribution to the output is, relative to what the
    frozen layer computes: 0 for a fresh :class:`~lora_tutorial.layers.LoRALinear` (``B = 0``).
    Dropout is not applied.
    """
    if isinstance(layer, (LoRALayer, LoRALinear)):
        check_last_dim("x", x, layer.in_features)
    if isinstance(layer, LoRALayer):
        base, update = layer.linear(x), layer.update(x)
    elif isinstance(layer, LoRALinear):
        if layer.merged:
            raise RuntimeError("the update of a merged layer is inside its weight: call unmerge_weights_() first")
        base = layer.base(x)
        update = x @ layer.delta_weight().T
    else:
        raise TypeError(f"layer must be a LoRALayer or a LoRALinear, got {type(layer).__name__}")
    return float(update.norm() / base.norm())


@torch.no_grad()
def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D ``matrix``, largest first (float64, shape ``(min(m, n),)``)."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().to("cpu", torch.float64))
