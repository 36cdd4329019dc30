"""Counting what LoRA trains, stores and keeps in memory, from toy layers to GPT-3.

Conventions: a linear layer maps ``d_in`` to ``d_out`` features, so its weight
has ``d_out·d_in`` entries; a rank-``r`` adapter trains ``r·(d_in + d_out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_positive_int

__all__ = [
    "GPT3_175B",
    "TransformerShape",
    "adam_training_bytes",
    "adapter_parameter_count",
    "break_even_rank",
    "checkpoint_bytes",
    "format_bytes",
    "full_parameter_count",
    "lora_parameter_count",
    "optimizer_state_bytes",
]


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters of a rank-``r`` adapter on a ``d_in → d_out`` layer: ``r·(d_in + d_out)``."""
    d_in, d_out, r = (check_positive_int(n, v) for n, v in (("d_in", d_in), ("d_out", d_out), ("r", r)))
    return r * (d_in + d_out)


def full_parameter_count(d_in: int, d_out: int, bias: bool = False) -> int:
    """Parameters full fine-tuning trains in a ``d_in → d_out`` layer: ``d_in·d_out`` (+ ``d_out``)."""
    d_in, d_out = check_positive_int("d_in", d_in), check_positive_int("d_out", d_out)
    return d_in * d_out + (d_out if bias else 0)


def break_even_rank(d_in: int, d_out: int) -> float:
    """The rank at which an adapter trains as many parameters as the weight has: ``d_in·d_out/(d_in+d_out)``."""
    return d_in * d_out / (d_in + d_out)


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that matter for adapting a transformer's attention projections.

    Attributes:
        name: for printing.
        n_layers: number of transformer blocks.
        d_model: width of the residual stream (each projection is ``d_model × d_model``).
        n_params: total parameter count of the model.
    """

    name: str
    n_layers: int
    d_model: int
    n_params: int


#: GPT-3 175B (96 layers, d_model 12288; Brown et al. 2020), as the LoRA paper adapts it.
GPT3_175B = TransformerShape(name="GPT-3 175B", n_layers=96, d_model=12288, n_params=175_000_000_000)


def adapter_parameter_count(shape: TransformerShape, r: int, n_matrices: int = 2) -> int:
    """Parameters of rank-``r`` adapters on ``n_matrices`` square projections in every layer.

    The LoRA paper adapts two (``W_q`` and ``W_v``): ``n_layers · n_matrices · r · 2·d_model``.
    """
    r, n_matrices = check_positive_int("r", r), check_positive_int("n_matrices", n_matrices)
    return shape.n_layers * n_matrices * lora_parameter_count(shape.d_model, shape.d_model, r)


def checkpoint_bytes(n_params: int, bytes_per_param: int = 2) -> int:
    """Bytes to store ``n_params`` values (2 for fp16/bf16, 4 for fp32)."""
    return n_params * bytes_per_param


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in decimal units with three significant digits: ``"37.7 MB"``, ``"2.80 TB"``."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes!r}")
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n_bytes < 999.5 or unit == "PB":
            return f"{n_bytes:.3g} {unit}" if unit != "B" else f"{n_bytes:.0f} B"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def adam_training_bytes(n_trainable: int, bytes_per_value: int = 4) -> int:
    """Memory for training ``n_trainable`` parameters with Adam(W) in one precision.

    Four values per trainable parameter: the parameter, its gradient and Adam's
    two moment estimates. Frozen weights (needed either way) are not included.
    """
    return 4 * n_trainable * bytes_per_value


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors, measured (e.g. Adam's two moments and step counts)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
