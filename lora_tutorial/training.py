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
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ._checks import as_generator, check_bool, check_choice, check_positive_finite, check_positive_int

__all__ = ["OPTIMIZERS", "evaluate", "isolated_rng", "train", "train_together"]

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


def _optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


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
        x: the inputs, non-empty and finite.
        y: the targets, non-empty and finite.
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
    opt = _optimizer(optimizer, params, lr)
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


def _stacked(name: str, value: object, n: int) -> tuple[torch.Tensor, int | None]:
    """A tensor shared by every model (``in_dims`` None) or one per model, stacked (0)."""
    if isinstance(value, torch.Tensor):
        return value, None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise TypeError(
            f"{name} must be a torch.Tensor shared by all {n} models or a list of {n} "
            f"tensors, one per model, got {type(value).__name__}"
            + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
    shapes = {tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in value}
    if len(shapes) != 1 or None in shapes:
        raise ValueError(f"{name}: the {n} tensors must all have one shape, got {sorted(map(str, shapes))}")
    return torch.stack(list(value)), 0


def _settings(model: nn.Module) -> list[object]:
    """What a forward pass reads besides tensors: the printed structure and LoRA settings."""
    lora = [(n, m.scaling, m.merged, m._adapter_enabled, m.fan_in_fan_out)
            for n, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "scaling") and hasattr(m, "merged")]
    return [str(model), lora]


def train_together(
    models: Sequence[nn.Module],
    x: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor | Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    optimizer: str = "adamw",
    loss_fn: LossFn | None = None,
) -> list[list[float]]:
    """Train several models of one architecture at once, in one vectorised pass per step.

    Each model is trained as :func:`train` would train it alone (full batch, its
    own optimizer, on its own data), up to rounding, but all of them share every
    step: their parameters are stacked along a new first dimension
    (``torch.func.stack_module_state``), one call computes every model's loss
    (``torch.func.vmap`` over ``torch.func.functional_call``), and one optimizer
    steps the stacked tensors. AdamW, Adam and SGD update each number on its own,
    so one optimizer over the stack is the same as one per model, and the sum of
    the losses gives each model exactly its own gradient. The trained values are
    copied back into the models. This is how a chapter measures a claim over
    several seeds for little more than the price of one.

    Args:
        models: ``m`` models of one class, with the same parameter names, shapes,
            trainable set and settings (a LoRA layer's rank, alpha and scaling
            rule included), and no active dropout: dropout masks drawn inside
            ``vmap`` could not be the ones :func:`train` draws, so train such
            models one by one.
        x: the inputs: one tensor shared by every model, or a list of ``m``
            tensors of one shape, one per model (for instance one data set per seed).
        y: the targets, likewise shared or one per model.
        steps: number of optimizer steps, as for :func:`train`.
        lr: learning rate, as for :func:`train`.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"``, as for :func:`train`.
        loss_fn: as for :func:`train`.

    Returns:
        For each model, the training loss of every step, before that step's update.
    """
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or not models:
        raise TypeError("models must be a non-empty list of torch.nn.Module")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(model).__name__}")
    n = len(models)
    xs, x_dim = _stacked("x", x, n)
    ys, y_dim = _stacked("y", y, n)
    for i in range(n):
        _check_data(xs if x_dim is None else xs[i], ys if y_dim is None else ys[i])
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    template = models[0]
    layout = [(k, tuple(p.shape), p.requires_grad) for k, p in template.named_parameters()]
    for i, model in enumerate(models[1:], start=1):
        if type(model) is not type(template) or _settings(model) != _settings(template) or [
                (k, tuple(p.shape), p.requires_grad) for k, p in model.named_parameters()] != layout:
            raise ValueError(
                f"models[{i}] differs from models[0] in its class, parameters, trainable set "
                "or settings (rank, alpha, scaling rule, merged state): train_together needs "
                "models of one architecture that differ only in their numbers")
    for i, model in enumerate(models):
        for name, module in model.named_modules():
            p = getattr(module, "dropout_p", getattr(module, "p", 0.0)) \
                if isinstance(module, nn.Dropout) or hasattr(module, "dropout_p") else 0.0
            if p:
                raise ValueError(
                    f"models[{i}]: {name or 'the model'} has dropout {p}: dropout masks drawn "
                    "inside vmap cannot be train()'s, so train models with dropout one by one")
    if not any(trainable for *_, trainable in layout):
        raise ValueError("the models have no trainable parameters: nothing to train")
    params, buffers = torch.func.stack_module_state(list(models))
    trainable = [t for t in params.values() if t.requires_grad]
    opt = _optimizer(optimizer, trainable, lr)

    def one_loss(p: dict, b: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return _loss(lambda inp: torch.func.functional_call(template, (p, b), (inp,)), xi, yi, loss_fn)

    batched = torch.func.vmap(one_loss, in_dims=(0, 0, x_dim, y_dim))
    histories: list[list[float]] = [[] for _ in models]
    with _modes(template, True):
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            losses = batched(params, buffers, xs, ys)
            values = losses.tolist()
            for i, value in enumerate(values):
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the training loss of models[{i}] became {value} at step {step} "
                        f"(lr={lr}): the training diverged; lower the learning rate or alpha")
                histories[i].append(value)
            losses.sum().backward()
            opt.step()
    with torch.no_grad():
        for name, stacked in params.items():
            if stacked.requires_grad:
                for i, model in enumerate(models):
                    model.get_parameter(name).copy_(stacked[i])
    return histories
