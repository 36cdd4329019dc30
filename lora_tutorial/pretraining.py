"""Chapter 3's set-up: pretraining ``TinyAdapter`` on the old task, and a shipped checkpoint of it.

Pretraining the source's way takes a few seconds on a CPU. Chapter 3 does it
live and checks that it reproduces the checkpoint shipped with the library;
chapter 4, chapter 5 and the rank/alpha explorer load the checkpoint instead.
``python tools/make_checkpoint.py`` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import AdaptationTask, make_adaptation_task
from .models import TinyAdapter
from .training import train

__all__ = [
    "CHECKPOINT_PATH",
    "pretrain",
    "pretrained_tiny_adapter",
    "source_setup",
    "write_checkpoint",
]

#: Where the shipped checkpoint lives (``TinyAdapter`` after the source's 800 pretraining steps).
CHECKPOINT_PATH = Path(__file__).parent / "checkpoints" / "tiny_adapter_source.safetensors"


def source_setup(seed: int = 0) -> tuple[AdaptationTask, TinyAdapter]:
    """The source's data and model, drawn from one stream as its code does.

    ``make_task_matrices`` (whose seed the source fixes at 0), the training and
    validation inputs, and then a fresh ``TinyAdapter`` all draw from one
    generator seeded with ``seed``.
    """
    stream = torch.Generator().manual_seed(seed)
    task = make_adaptation_task(seed=stream)
    model = TinyAdapter(generator=stream)
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
    """
    model.backbone.requires_grad_(True)
    model.head.requires_grad_(False)
    model.head.base.requires_grad_(train_head)
    with model.head.disable_adapter():
        return train(model, x, y, steps=steps, lr=lr, seed=seed)


def write_checkpoint(path: Path = CHECKPOINT_PATH) -> list[float]:
    """Pretrain the source's model from scratch and save its weights to ``path``."""
    from safetensors.torch import save_file

    task, model = source_setup()
    history = pretrain(model, task.x_train, task.y_old_train)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return history


def pretrained_tiny_adapter() -> tuple[AdaptationTask, TinyAdapter]:
    """The source's task and its model after pretraining, loaded from the shipped checkpoint.

    The model is returned ready for fine-tuning: backbone and head base frozen,
    only the adapter (``lora_A``, ``lora_B``) trainable, and in training mode.
    """
    from safetensors.torch import load_file

    task, model = source_setup()
    model.load_state_dict(load_file(str(CHECKPOINT_PATH)))
    model.requires_grad_(False)
    model.head.lora_A.requires_grad_(True)
    model.head.lora_B.requires_grad_(True)
    return task, model
