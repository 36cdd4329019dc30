"""Chapter 3's set-up: pretraining ``TinyAdapter`` on the old task, and shipped checkpoints of it.

Pretraining the source's way takes a few seconds on a CPU. Chapter 3 does it
live and checks that it reproduces the checkpoint shipped with the library;
chapter 4, chapter 5 and the rank/alpha explorer load the checkpoint instead.
A second checkpoint holds chapter 3's comparison run, pretrained from the same
start with the head's base layer trained too (``train_head=True``); a unit
test checks that it reproduces. ``python tools/make_checkpoint.py`` rewrites
both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._checks import as_generator, check_bool, check_positive_int, check_positive_finite
from .data import AdaptationTask, make_adaptation_task
from .models import TinyAdapter
from .training import _check_data, train

__all__ = [
    "CHECKPOINT_PATH",
    "HEAD_PRETRAINED_PATH",
    "pretrain",
    "pretrained_tiny_adapter",
    "source_setup",
    "write_checkpoint",
]

#: Where the shipped checkpoint lives (``TinyAdapter`` after the source's 800 pretraining steps):
#: ``checkpoints/tiny_adapter_source.safetensors`` in the package.
#:
#: :meta hide-value:
CHECKPOINT_PATH = Path(__file__).parent / "checkpoints" / "tiny_adapter_source.safetensors"
#: The same 800 steps from the same start, with the head's base layer trained too:
#: ``checkpoints/tiny_adapter_head_pretrained.safetensors`` in the package.
#:
#: :meta hide-value:
HEAD_PRETRAINED_PATH = CHECKPOINT_PATH.with_name("tiny_adapter_head_pretrained.safetensors")


def _checkpoint_path(train_head: bool) -> Path:
    check_bool("train_head", train_head)
    return HEAD_PRETRAINED_PATH if train_head else CHECKPOINT_PATH


def source_setup(seed: int | torch.Generator = 0) -> tuple[AdaptationTask, TinyAdapter]:
    """The source's data and model, drawn from one stream as its code does.

    ``make_task_matrices`` (whose seed the source fixes at 0), the training and
    validation inputs, and then a fresh ``TinyAdapter`` all draw from one
    generator: seeded with ``seed`` if it is an ``int``, or ``seed`` itself
    (drawn from and advanced) if it is a ``torch.Generator``.
    """
    stream = as_generator(seed)
    task = make_adaptation_task(seed=stream)
    model = TinyAdapter(seed=stream)
    return task, model


def pretrain(
    model: TinyAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 800,
    lr: float = 2e-3,
    train_head: bool = False,
    seed: int = 0,
) -> list[float]:
    """Pretrain ``model`` on ``(x, y)`` the source's way, in place.

    The backbone trains; the head is frozen (the source's choice) unless
    ``train_head=True``, which trains the head's base layer too. The adapter
    (which starts at zero, so it adds nothing) is disabled and stays frozen.
    Full-batch AdamW, as :func:`~lora_tutorial.training.train`.

    Returns:
        The loss history.

    Raises:
        TypeError, ValueError: for a bad argument, before the model changes
            (which parameters train included).
    """
    _check_pretrain_arguments(model, x, y, steps=steps, lr=lr,
                              train_head=train_head, seed=seed)
    model.backbone.requires_grad_(True)
    model.head.requires_grad_(False)
    model.head.base.requires_grad_(train_head)
    with model.head.disable_adapter():
        return train(model, x, y, steps=steps, lr=lr, seed=seed)


def _check_pretrain_arguments(model: object, x: object, y: object, **settings: object) -> None:
    """Everything :func:`pretrain` checks before it changes which parameters train."""
    if not isinstance(model, TinyAdapter):
        raise TypeError(f"model must be a TinyAdapter, got {type(model).__name__}")
    check_bool("train_head", settings["train_head"])
    check_positive_int("steps", settings["steps"])
    check_positive_finite("lr", settings["lr"])
    as_generator(settings["seed"])
    _check_data(x, y)
    d_in, d_out = model.backbone.in_features, model.head.out_features
    if x.ndim != 2 or x.shape[1] != d_in or y.shape != (x.shape[0], d_out):
        raise ValueError(
            f"pretrain needs x of shape (n, {d_in}) and y of shape (n, {d_out}) for this model, "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}")


#: How many of the pretraining's first losses a checkpoint records.
FIRST_LOSSES = 50


def write_checkpoint(path: Path | None = None, *, train_head: bool = False) -> list[float]:
    """Pretrain the source's model from scratch and save its weights.

    ``train_head`` is passed on to :func:`pretrain`; ``path`` defaults to the
    shipped checkpoint of that kind. Returns the loss history.
    """
    from safetensors.torch import save_file

    path = _checkpoint_path(train_head) if path is None else Path(path)
    task, model = source_setup()
    history = pretrain(model, task.x_train, task.y_old_train, train_head=train_head)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The first losses let a test check the recipe on any machine in seconds,
    # before float32 rounding has had hundreds of steps to grow.
    metadata = {"first_losses": json.dumps(history[:FIRST_LOSSES])}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata)
    return history


def pretrained_tiny_adapter(
    train_head: bool = False, *, dtype: torch.dtype = torch.float32
) -> tuple[AdaptationTask, TinyAdapter]:
    """The source's task and its model after pretraining, loaded from a shipped checkpoint.

    ``train_head=False`` (the source's pretraining, head frozen) or ``True``
    (the comparison run whose head's base layer was pretrained too). The
    model is returned ready for fine-tuning: backbone and head base frozen,
    only the adapter (``lora_A``, ``lora_B``) trainable, and in training mode.
    ``dtype`` casts the task's tensors and the model after loading (the data
    are drawn and the checkpoint is stored in float32; the book computes in
    float64, so that its printed digits agree on every machine).
    """
    from safetensors.torch import load_file

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = _checkpoint_path(train_head)
    task, model = source_setup()
    model.load_state_dict(load_file(str(path)))
    model.requires_grad_(False)
    model.head.lora_A.requires_grad_(True)
    model.head.lora_B.requires_grad_(True)
    if dtype != torch.float32:
        task, model = task.to(dtype), model.to(dtype)
    return task, model
