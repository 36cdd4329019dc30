"""The toy data of the book.

Every builder takes a ``seed``: an ``int`` (a fresh generator seeded with it)
or a :class:`torch.Generator` (drawn from and advanced, so that several draws
can share one stream). None of them touches PyTorch's global RNG. Values are
always drawn on the CPU and then moved to ``device``, so they do not depend on
the device.

Two data sets:

* :func:`create_toy_dataset` (chapter 1): random inputs and *independent*
  random targets.
* :func:`make_task_matrices` / :func:`synth_data` / :func:`forward_with_mats`
  (chapters 3-5): a random two-layer "teacher" network defines an old task and
  a new task that differ only in the second layer; :func:`make_adaptation_task`
  draws the whole set-up in one go.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import as_generator, check_non_negative, check_positive_int

__all__ = [
    "AdaptationTask",
    "create_toy_dataset",
    "forward_with_mats",
    "make_adaptation_task",
    "make_task_matrices",
    "synth_data",
]


def create_toy_dataset(
    n_samples: int = 1000,
    in_features: int = 64,
    out_features: int = 10,
    seed: int | torch.Generator = 42,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 1's toy data: standard-normal inputs and independent standard-normal targets.

    The targets do not depend on the inputs at all, which is the point chapter 1
    makes about it. With the defaults this returns the very tensors the source
    draws after ``torch.manual_seed(42)``.

    Returns:
        ``X`` of shape ``(n_samples, in_features)`` and ``y`` of shape
        ``(n_samples, out_features)``.
    """
    n_samples = check_positive_int("n_samples", n_samples)
    in_features = check_positive_int("in_features", in_features)
    out_features = check_positive_int("out_features", out_features)
    gen = as_generator(seed)
    x = torch.randn(n_samples, in_features, generator=gen)
    y = torch.randn(n_samples, out_features, generator=gen)
    return x, y


def make_task_matrices(
    d_in: int = 128,
    d_hidden: int = 256,
    d_out: int = 16,
    shift: float = 0.15,
    seed: int | torch.Generator = 0,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The teacher weights of the old and the new task.

    ``W_old1 (d_hidden, d_in)`` and ``b_old1 (d_hidden,)`` form the shared first
    layer; ``W_old2 (d_out, d_hidden)``, ``b_old2 (d_out,)`` the old task's
    second layer; the new task's second layer is the old one plus
    ``shift`` times standard-normal noise (``W_new2``, ``b_new2``). With
    ``seed=0`` these are the very tensors the source's ``make_task_matrices``
    returns.

    Returns:
        A dict with keys ``W_old1, b_old1, W_old2, b_old2, W_new2, b_new2``.
    """
    d_in = check_positive_int("d_in", d_in)
    d_hidden = check_positive_int("d_hidden", d_hidden)
    d_out = check_positive_int("d_out", d_out)
    shift = check_non_negative("shift", shift)
    gen = as_generator(seed)
    w_old1 = torch.randn(d_hidden, d_in, generator=gen) / math.sqrt(d_in)
    b_old1 = torch.randn(d_hidden, generator=gen) * 0.1
    w_old2 = torch.randn(d_out, d_hidden, generator=gen) / math.sqrt(d_hidden)
    b_old2 = torch.randn(d_out, generator=gen) * 0.1
    w_new2 = w_old2 + shift * torch.randn(d_out, d_hidden, generator=gen)
    b_new2 = b_old2 + shift * torch.randn(d_out, generator=gen)
    mats = dict(W_old1=w_old1, b_old1=b_old1, W_old2=w_old2, b_old2=b_old2, W_new2=w_new2, b_new2=b_new2)
    return {name: t.to(device) for name, t in mats.items()}


def synth_data(
    n: int = 4096,
    d_in: int = 128,
    *,
    seed: int | torch.Generator,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``n`` standard-normal inputs of shape ``(n, d_in)``.

    ``seed`` is required: a training and a validation set drawn with the same
    integer seed would be the same data. Pass one generator to draw both from
    one stream.
    """
    n = check_positive_int("n", n)
    d_in = check_positive_int("d_in", d_in)
    gen = as_generator(seed)
    return torch.randn(n, d_in, generator=gen).to(device)


def forward_with_mats(
    x: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """The teacher network ``W2 · gelu(W1 x + b1) + b2``: ``(n, d_in)`` → ``(n, d_out)``."""
    if x.shape[-1] != W1.shape[1]:
        raise ValueError(f"x must have last dimension {W1.shape[1]} (W1's in_features), got shape {tuple(x.shape)}")
    if W2.shape[1] != W1.shape[0]:
        raise ValueError(f"W2 must have {W1.shape[0]} columns (W1's out_features), got shape {tuple(W2.shape)}")
    return F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2)


@dataclass(frozen=True)
class AdaptationTask:
    """The full set-up of chapters 3-5: teacher weights, inputs and both tasks' targets.

    Attributes:
        mats: the teacher weights (see :func:`make_task_matrices`).
        x_train: ``(n_train, d_in)`` training inputs.
        x_val: ``(n_val, d_in)`` validation inputs.
        y_old_train: the old task's training targets, ``(n_train, d_out)``.
        y_old_val: the old task's validation targets, ``(n_val, d_out)``.
        y_new_train: the new task's training targets, ``(n_train, d_out)``.
        y_new_val: the new task's validation targets, ``(n_val, d_out)``.
    """

    mats: dict[str, torch.Tensor]
    x_train: torch.Tensor
    x_val: torch.Tensor
    y_old_train: torch.Tensor
    y_old_val: torch.Tensor
    y_new_train: torch.Tensor
    y_new_val: torch.Tensor

    @property
    def true_delta_weight(self) -> torch.Tensor:
        """``W_new2 - W_old2``: the change of the second layer that defines the new task, ``(d_out, d_hidden)``."""
        return self.mats["W_new2"] - self.mats["W_old2"]

    def to(self, dtype: torch.dtype) -> "AdaptationTask":
        """The same task with every tensor cast to ``dtype`` (the values drawn stay the values).

        The book draws the source's data in float32, as the source does, and
        computes in float64 (``task.to(torch.float64)``), so that what it prints
        does not depend on the machine's floating-point kernels.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        cast = {f.name: getattr(self, f.name).to(dtype) for f in dataclasses.fields(self) if f.name != "mats"}
        return dataclasses.replace(self, mats={k: v.to(dtype) for k, v in self.mats.items()}, **cast)


def make_adaptation_task(
    d_in: int = 128,
    d_hidden: int = 256,
    d_out: int = 16,
    shift: float = 0.15,
    n_train: int = 4096,
    n_val: int = 512,
    seed: int | torch.Generator = 0,
    device: str | torch.device = "cpu",
) -> AdaptationTask:
    """Draw the teacher, then the training and the validation inputs, from one stream.

    This is the source's data flow in one call: ``make_task_matrices``, then
    ``synth_data(n_train)`` and ``synth_data(n_val)``, with the targets of both
    tasks computed by :func:`forward_with_mats`. Every argument is checked
    before anything is drawn from ``seed``.
    """
    for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out),
                        ("n_train", n_train), ("n_val", n_val)):
        check_positive_int(name, value)
    check_non_negative("shift", shift)
    gen = as_generator(seed)
    mats = make_task_matrices(d_in, d_hidden, d_out, shift=shift, seed=gen, device=device)
    x_train = synth_data(n_train, d_in, seed=gen, device=device)
    x_val = synth_data(n_val, d_in, seed=gen, device=device)

    def targets(x: torch.Tensor, task: str) -> torch.Tensor:
        return forward_with_mats(x, mats["W_old1"], mats["b_old1"], mats[f"W_{task}2"], mats[f"b_{task}2"])

    return AdaptationTask(
        mats=mats,
        x_train=x_train,
        x_val=x_val,
        y_old_train=targets(x_train, "old"),
        y_old_val=targets(x_val, "old"),
        y_new_train=targets(x_train, "new"),
        y_new_val=targets(x_val, "new"),
    )
