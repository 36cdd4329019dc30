"""Full-batch training and evaluation, as the book's sources do it.

Both functions run their random parts (dropout) under their own ``seed`` inside
a forked RNG, so they are reproducible and leave PyTorch's global RNG exactly
as they found it. Both refuse empty data, data holding NaN or inf, and (with
the default mean squared error) predictions whose shape is not ``y``'s, and
both put every submodule back in the mode it was in.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from ._checks import as_generator, check_bool, check_choice, check_positive_finite, check_positive_int

__all__ = ["OPTIMIZERS", "evaluate", "isolated_rng", "train"]

#: Optimizers :func:`train` knows, by name.
OPTIMIZERS = ("adamw", "adam", "sgd")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def isolated_rng(
    seed: int | torch.Generator, device: torch.device | str = "cpu"
) -> Iterator[None]:
    """Run the block with PyTorch's RNG seeded by ``seed``, then restore the global state.

    ``seed`` is an ``int``, or a ``torch.Generator`` from which one is drawn.
    """
    gen = as_generator(seed)
    value = int(torch.randint(2**62, (), generator=gen)) if gen is seed else gen.initial_seed()
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(value)
        yield


@contextlib.contextmanager
def _modes(model: nn.Module, training: bool) -> Iterator[None]:
    """Run the block in training (or evaluation) mode; then restore every module's mode.

    A model already in the requested training mode keeps the modes of its
    submodules (a BatchNorm the caller put in evaluation mode stays there and
    its running statistics are not updated); otherwise the whole model is
    switched. Afterwards every submodule is back in the mode it was in.
    """
    before = [(module, module.training) for module in model.modules()]
    if not (training and model.training):
        model.train(training)
    try:
        yield
    finally:
        for module, mode in before:
            module.training = mode


def _check_data(x: object, y: object) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have a first (batch) dimension, got a 0-d tensor")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): there is nothing to fit or evaluate")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"NaN or inf in the data: {name} holds non-finite values")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None) -> torch.Tensor:
    prediction = model(x)
    if loss_fn is None:
        if prediction.shape != y.shape:
            raise ValueError(
                f"the model's predictions have shape {tuple(prediction.shape)} but y has shape "
                f"{tuple(y.shape)}; the mean squared error needs the same shape (no broadcasting)"
            )
        return nn.functional.mse_loss(prediction, y)
    return loss_fn(prediction, y)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adamw",
    loss_fn: LossFn | None = None,
    seed: int | torch.Generator = 0,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters on the full batch ``(x, y)``.

    Each step is one full-batch forward and backward pass and one optimizer
    step, in training mode (dropout on). A model already in training mode
    keeps its submodules' modes (a BatchNorm you put in evaluation mode stays
    frozen); afterwards every submodule is back in the mode it was in.

    Args:
        model: maps ``x (n, ...)`` to predictions of ``y``'s shape ``(n, ...)``.
        x, y: the data, non-empty and finite.
        steps: number of optimizer steps.
        lr: learning rate.
        optimizer: ``"adamw"`` (PyTorch defaults, weight decay 0.01), ``"adam"`` or ``"sgd"``.
        loss_fn: ``loss_fn(prediction, y)``; defaults to the mean squared
            error, which requires predictions of exactly ``y``'s shape.
        seed: an ``int`` or a ``torch.Generator``; seeds dropout, and the
            global RNG is left untouched.
        callback: called as ``callback(step, loss)`` after each step (steps count from 1).

    Returns:
        The training loss of every step, before that step's update.

    Raises:
        ValueError: if the model has no trainable parameters, the data are
            empty or hold NaN/inf, or the shapes do not match.
        FloatingPointError: if the loss stops being finite although the data
            are finite (the training diverged: lower ``lr`` or alpha).
    """
    _check_data(x, y)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    as_generator(seed)  # checked before anything changes
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
    history: list[float] = []
    with _modes(model, True), isolated_rng(seed, x.device):
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, x, y, loss_fn)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the training loss became {value} at step {step} (lr={lr}) although "
                    "the data are finite: the training diverged; lower the learning rate or alpha"
                )
            loss.backward()
            opt.step()
            history.append(value)
            if callback is not None:
                callback(step, value)
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    train_mode: bool = False,
    seed: int | torch.Generator = 0,
) -> float:
    """The loss of ``model`` on ``(x, y)``, without gradients.

    Runs in evaluation mode (dropout off) unless ``train_mode=True``, which
    reproduces the mistake of validating with dropout on (seeded by
    ``seed``). Either way every submodule is put back in the mode it was in.
    The data must be non-empty and finite and, for the default mean squared
    error, the predictions of exactly ``y``'s shape.
    """
    _check_data(x, y)
    train_mode = check_bool("train_mode", train_mode)
    as_generator(seed)
    with _modes(model, train_mode), isolated_rng(seed, x.device):
        return _loss(model, x, y, loss_fn).item()
