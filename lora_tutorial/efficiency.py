"""Measuring what training keeps in memory, and printing byte counts.

The counting formulas themselves (an adapter's ``r·(d_in + d_out)``
parameters, a checkpoint's bytes, the break-even rank) are one line each and
are written out in chapter 4, where they are the lesson. What is here is what
is not one line: reading the bytes an optimizer holds, measuring the
activations autograd keeps for the backward pass, and formatting bytes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["activation_bytes", "format_bytes", "optimizer_state_bytes"]


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in decimal units, three significant digits: ``"37.7 MB"``."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes!r}")
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n_bytes < 999.5 or unit == "PB":
            digits = ".0f" if unit == "B" else ".3g"
            return f"{n_bytes:{digits}} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state tensors (Adam: two moments, steps)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def activation_bytes(
    model: nn.Module, forward: Callable[[], torch.Tensor]
) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``forward``.

    These are the activations training must keep between the forward and the
    backward pass (inputs of layers with trainable weights, dropout masks,
    what nonlinearities need for their derivative). The model's own
    parameters, which autograd also saves, are not counted: they are in
    memory anyway. Each storage is counted once. ``forward`` runs with
    gradients enabled and its result is discarded.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.enable_grad(), keep:
        forward()
    return sum(saved.values())
