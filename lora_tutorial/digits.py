"""Real data for chapter 5: scikit-learn's handwritten digits, a small MLP, and its pretraining.

The data are the 1,797 8×8 images that ship inside scikit-learn
(``sklearn.datasets.load_digits``, nothing is downloaded), scaled to
[0, 1] and flattened to 64 numbers, and cut once into fixed training,
validation and test splits. Two tasks are built from them:

* the **source task**, on which the network is pretrained: tell the digits
  0-4 apart (5 classes);
* the **target task**, to which it is then adapted: tell the digits 5-9 apart
  (5 classes, labelled ``digit - 5``). Features learned on 0-4 know only part
  of what 5-9 need, and the source task stays measurable on its own test
  images, so forgetting can be measured.

scikit-learn is an optional dependency (``pip install lora-tutorial[digits]``),
imported only when the data are loaded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import as_generator, check_last_dim, check_positive_finite, check_positive_int
from .layers import make_linear
from .training import train

__all__ = [
    "DigitsMLP",
    "Split",
    "Task",
    "accuracy",
    "load_digit_tasks",
    "pretrain_digits",
    "pretrained_digits_mlp",
    "torch_threads",
]

#: The digits of the source task and of the target task.
SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    Networks as small as :class:`~lora_tutorial.digits.DigitsMLP` train several times faster on one
    CPU thread than on two (handing work between threads costs more than the
    tiny matrix products save), and far faster on a busy machine.
    """
    n = check_positive_int("n", n)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Split:
    """Images ``x (n, 64)`` in [0, 1] and their class labels ``y (n,)`` (int64).

    Checked when made: ``x`` a finite floating-point ``(n, features)`` tensor,
    ``y`` an integer ``(n,)`` tensor.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        _check_inputs("x", self.x)
        _check_labels("y", self.y, len(self.x))

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Task:
    """One task's fixed, disjoint training, validation and test splits."""

    name: str
    train: Split
    val: Split
    test: Split


def load_digit_tasks(
    seed: int | torch.Generator = 0, n_val: int = 360, n_test: int = 360
) -> tuple[Task, Task]:
    """The source task (digits 0-4) and the target task (digits 5-9).

    scikit-learn's 1,797 digits are shuffled by ``seed`` and cut: the last
    ``n_test`` images of the shuffled order are the test split, the ``n_val``
    before them the validation split, the rest (1,077 with the defaults) the
    training split. Each task then keeps its own digits from every split;
    the labels are ``digit`` for the source and ``digit - 5`` for the target.
    The global RNG is not touched.

    Returns:
        ``(source, target)``; every ``x`` is float32 ``(n, 64)`` (pixel
        intensity / 16), every ``y`` int64 ``(n,)`` in 0..4.
    """
    n_val = check_positive_int("n_val", n_val)
    n_test = check_positive_int("n_test", n_test)
    gen = as_generator(seed)
    from sklearn.datasets import load_digits  # optional dependency, loaded late

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    digit = torch.as_tensor(data.target, dtype=torch.int64)
    if n_val + n_test >= len(digit):
        raise ValueError(
            f"n_val + n_test must leave images to train on: got {n_val} + {n_test} "
            f"of {len(digit)} images"
        )
    order = torch.randperm(len(digit), generator=gen)
    n_train = len(digit) - n_val - n_test
    parts = torch.split(order, [n_train, n_val, n_test])

    def task(name: str, digits: tuple[int, ...]) -> Task:
        splits = []
        for index in parts:
            keep = index[torch.isin(digit[index], torch.tensor(digits))]
            splits.append(Split(x[keep], digit[keep] - digits[0]))
        return Task(name, *splits)

    return task("digits 0-4", SOURCE_DIGITS), task("digits 5-9", TARGET_DIGITS)


class DigitsMLP(nn.Module):
    """``fc1`` → ReLU → ``fc2`` → ReLU → ``fc3`` → ReLU → ``head``: a plain MLP.

    Three square-ish hidden layers of equal width (so a rank costs the same
    number of adapter parameters in each, which chapter 5's placement
    experiment needs) and a linear head.

    Args:
        n_classes: outputs of the head.
        hidden: width of the three hidden layers.
        seed: an ``int`` or ``torch.Generator`` every weight is drawn from
            (``fc1``, ``fc2``, ``fc3``, ``head``, in that order).

    Shapes:
        input ``(n, 64)`` → logits ``(n, n_classes)``; :meth:`features` gives
        the head's input ``(n, hidden)``.
    """

    def __init__(
        self, n_classes: int = 5, hidden: int = 64, *, seed: int | torch.Generator = 0
    ) -> None:
        n_classes = check_positive_int("n_classes", n_classes)
        hidden = check_positive_int("hidden", hidden)
        gen = as_generator(seed)
        super().__init__()
        self.fc1 = make_linear(64, hidden, seed=gen)
        self.fc2 = make_linear(hidden, hidden, seed=gen)
        self.fc3 = make_linear(hidden, hidden, seed=gen)
        self.head = make_linear(hidden, n_classes, seed=gen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: ``(n, 64)`` → ``(n, hidden)``."""
        check_last_dim("x", x, 64)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.relu(self.fc3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: ``(n, 64)`` → ``(n, n_classes)``."""
        return self.head(self.features(x))


def _check_inputs(name: str, x: object) -> torch.Tensor:
    """A finite floating-point ``(n, features)`` tensor with ``n >= 1``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must hold floating-point values, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, features) with n >= 1, got {tuple(x.shape)}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} value(s) that are not finite (NaN or inf)")
    return x


def _check_labels(name: str, labels: object, n: int) -> torch.Tensor:
    """An integer ``(n,)`` tensor of class labels."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), one label per row, got {tuple(labels.shape)}")
    return labels


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows of ``x (n, 64)`` whose arg-max logit is ``labels (n,)``.

    Computed in evaluation mode; the model is put back in the mode it was in.
    ``x`` must be finite with ``n >= 1`` rows, ``labels`` integers of shape
    ``(n,)`` (not ``(n, 1)``, which would broadcast), and the model's logits
    ``(n, classes)`` with every label below ``classes``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = _check_inputs("x", x)
    labels = _check_labels("labels", labels, len(x))
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    if logits.dim() != 2 or logits.shape[0] != len(x):
        raise ValueError(f"the model's logits must have shape ({len(x)}, classes), got "
                         f"{tuple(logits.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) (the model's classes), got "
                         f"values from {int(labels.min())} to {int(labels.max())}")
    return float((logits.argmax(dim=1) == labels).float().mean())


def pretrain_digits(
    model: DigitsMLP, split: Split, *, steps: int = 200, lr: float = 1e-2
) -> list[float]:
    """Train every parameter of ``model`` on ``split``, in place.

    Full-batch AdamW on the cross-entropy, with
    :func:`~lora_tutorial.training.train`, on one CPU thread
    (:func:`torch_threads`). Returns the loss history. Every argument is
    checked before any parameter is made trainable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(split, Split):
        raise TypeError(f"split must be a Split, got {type(split).__name__}")
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    model.requires_grad_(True)
    with torch_threads(1):
        return train(model, split.x, split.y, steps=steps, lr=lr, loss_fn=F.cross_entropy)


def pretrained_digits_mlp(
    seed: int | torch.Generator = 0, steps: int = 200, hidden: int = 64
) -> tuple[Task, Task, DigitsMLP]:
    """The two tasks and a :class:`DigitsMLP` pretrained on the source task.

    The splits are drawn with ``seed`` and the network's weights with
    ``seed + 1`` (a ``torch.Generator`` as ``seed`` is drawn from for both, in
    that order); pretraining is deterministic, so equal arguments give equal
    weights. The model comes back frozen (``requires_grad=False``) and in
    evaluation mode, ready to be adapted.
    """
    as_generator(seed)  # checked before anything is drawn
    steps = check_positive_int("steps", steps)
    hidden = check_positive_int("hidden", hidden)
    weights = seed if isinstance(seed, torch.Generator) else seed + 1
    source, target = load_digit_tasks(seed)
    model = DigitsMLP(n_classes=len(SOURCE_DIGITS), hidden=hidden, seed=weights)
    pretrain_digits(model, source.train, steps=steps)
    model.requires_grad_(False)
    return source, target, model.eval()
