"""Full-batch training and evaluation, as the book's sources do it.

Both functions run their random parts (dropout) under their own ``seed`` inside
a forked RNG, so they are reproducible and leave PyTorch's global RNG exactly
as they found it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from ._checks import check_choice, check_positive_finite, check_positive_int

__all__ = ["OPTIMIZERS", "evaluate", "isolated_rng", "train"]

#: Optimizers :func:`train` knows, by name.
OPTIMIZERS = ("adamw", "adam", "sgd")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with PyTorch's RNG seeded by ``seed``, then restore the global state."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_batch(x: object, y: object) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adamw",
    loss_fn: LossFn | None = None,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters on the full batch ``(x, y)``.

    Each step is one full-batch forward and backward pass and one optimizer
    step, in training mode (dropout on). The model is put back in the mode it
    was in.

    Args:
        model: maps ``x (n, ...)`` to predictions shaped like ``y (n, ...)``.
        steps: number of optimizer steps.
        lr: learning rate.
        optimizer: ``"adamw"`` (PyTorch defaults, weight decay 0.01), ``"adam"`` or ``"sgd"``.
        loss_fn: defaults to mean squared error.
        seed: seeds dropout; the global RNG is left untouched.
        callback: called as ``callback(step, loss)`` after each step (steps count from 1).

    Returns:
        The training loss of every step, before that step's update.

    Raises:
        ValueError: if the model has no trainable parameters.
        FloatingPointError: if the loss stops being finite (lower ``lr`` or alpha).
    """
    _check_batch(x, y)
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: nothing to train (did you freeze everything?)")
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr)
    loss_fn = loss_fn or nn.functional.mse_loss

    history: list[float] = []
    was_training = model.training
    model.train()
    try:
        with isolated_rng(seed, x.device):
            for step in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the training loss became {value} at step {step} (lr={lr}); "
                        "lower the learning rate or alpha"
                    )
                loss.backward()
                opt.step()
                history.append(value)
                if callback is not None:
                    callback(step, value)
    finally:
        model.train(was_training)
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    train_mode: bool = False,
    seed: int = 0,
) -> float:
    """The loss of ``model`` on ``(x, y)``, without gradients.

    Runs in evaluation mode (dropout off) unless ``train_mode=True``, which
    reproduces the mistake of validating with dropout on (seeded by ``seed``).
    Either way the model is put back in the mode it was in.
    """
    _check_batch(x, y)
    loss_fn = loss_fn or nn.functional.mse_loss
    was_training = model.training
    model.train(train_mode)
    try:
        with isolated_rng(seed, x.device):
            return loss_fn(model(x), y).item()
    finally:
        model.train(was_training)
