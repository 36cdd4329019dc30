"""A faithful replay of the second source's run, printed output and all (chapter 3).

The source notebook pretrains a small network, fine-tunes a LoRA adapter on
its head and merges it, drawing every random number (initial weights, dropout
masks) from PyTorch's *global* stream. Its cells carry the execution counts
``In [15]`` (the ``LoRALinear`` class), ``In [20]`` (``TinyAdapter`` and a demo
that builds one and runs it on ``torch.randn(10, 128)``), ``In [None]`` (the
data, which calls ``torch.manual_seed(0)``) and ``In [21]`` (the training).
``In [21]`` directly follows ``In [20]``, so the data cell, shown between them,
ran *before* the demo: the demo's draws then shifted the stream that
initialises the real model. Replayed in that order, the run prints the
source's lines to the last digit.

This module is that replay, labelled as such: the source's own ``LoRALinear``
(an ``nn.Linear`` base, normal initialisation of ``A``) and ``TinyAdapter``,
and its own training loops, on the global stream exactly as the source uses
it. The data come from :func:`~lora_tutorial.data.make_adaptation_task`
drawing from the global generator, which gives the source's very tensors.
Everything runs inside ``torch.random.fork_rng``, so the caller's global
RNG state is left exactly as it was. The book's own code lives elsewhere;
nothing else in the library uses these classes.

Two shortcuts, which change no number (pass ``literal=True`` for the source's
loops exactly as written; a unit test checks that both agree bit for bit):

* during pretraining ``B = 0`` and the adapter is frozen, so it adds exact
  zeros to the output and to the gradient; the replay advances the random
  stream exactly as the dropout mask of its forward pass would (the only trace
  the adapter leaves) and skips the arithmetic;
* fine-tuning computes the frozen backbone's output once instead of at every
  step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_positive_int
from .data import AdaptationTask, make_adaptation_task

__all__ = [
    "SOURCE_ORDERS",
    "SourceLoRALinear",
    "SourceRun",
    "SourceTinyAdapter",
    "replay_source_run",
    "source_initial_model",
]

#: The cell orders a replay can follow, ``"executed"`` (data before the demo,
#: as the execution counts show) or ``"displayed"`` (top to bottom as printed).
SOURCE_ORDERS = ("executed", "displayed")


class SourceLoRALinear(nn.Module):
    """The source's ``LoRALinear``, as it wrote it (a replay, not the book's layer).

    ``base`` is a frozen ``nn.Linear``; ``lora_A (r, in)`` starts normal with
    standard deviation ``init_scale``, ``lora_B (out, r)`` at zero; dropout acts
    on the adapter's input. Input ``(n, in)`` → output ``(n, out)``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.1, bias: bool = True,
                 init_scale: float = 1e-4) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features, bias=bias)
        for p in self.base.parameters():
            p.requires_grad = False
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        nn.init.normal_(self.lora_A, std=init_scale)
        nn.init.zeros_(self.lora_B)
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        base_out = self.base(x)
        lora_out = F.linear(self.dropout(x), self.lora_A)
        lora_out = F.linear(lora_out, self.lora_B) * self.scaling
        return base_out + lora_out

    @torch.no_grad()
    def merge_weights_(self) -> None:
        """Add ``scaling · B A`` to the base weight, once."""
        if self.merged:
            return
        self.base.weight += (self.lora_B @ self.lora_A) * self.scaling
        self.merged = True


class SourceTinyAdapter(nn.Module):
    """The source's ``TinyAdapter``: ``Linear(d_in, d_hidden)`` → GELU → LoRA head.

    Input ``(n, d_in)`` → output ``(n, d_out)``.
    """

    def __init__(self, d_in: int = 128, d_hidden: int = 256, d_out: int = 16,
                 r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.backbone = nn.Linear(d_in, d_hidden, bias=True)
        self.head = SourceLoRALinear(d_hidden, d_out, r=r, alpha=alpha)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.backbone(x)))


@dataclass
class SourceRun:
    """What a replay of the source's run produced.

    Attributes:
        log: the lines the run printed, as the source's ``print`` calls
            format them (blank lines included).
        task: the data (the source's very tensors).
        model: the model as the source leaves it: pretrained, fine-tuned,
            its head merged, in training mode.
        head_pretrained: a copy of the head as fine-tuning found it (its
            base still the random initialisation, ``B = 0``).
        head_unmerged: a copy of the head just before merging.
        features_train: the frozen backbone's output ``gelu(backbone(x))`` on
            the training inputs, ``(4096, 256)``.
        features_val: the same on the validation inputs, ``(512, 256)``.
        pretrain_losses: the training loss of every pretraining step.
        finetune_losses: the training loss of every fine-tuning step.
        val_losses: the validation losses printed during fine-tuning
            (computed, as in the source, in training mode: dropout on).
        merged_val: the merged model's validation loss.
    """

    log: list[str]
    task: AdaptationTask
    model: SourceTinyAdapter
    head_pretrained: SourceLoRALinear
    head_unmerged: SourceLoRALinear
    features_train: torch.Tensor
    features_val: torch.Tensor
    pretrain_losses: list[float]
    finetune_losses: list[float]
    val_losses: list[float]
    merged_val: float


def _demo_cell() -> None:
    """``In [20]``'s demo: build a ``TinyAdapter`` and run it on random input."""
    adapter = SourceTinyAdapter()
    x = torch.randn(10, 128)
    adapter(x)  # in training mode: its dropout draws a mask too


def _start(order: str) -> tuple[AdaptationTask, SourceTinyAdapter]:
    """The data and the fresh model, drawn from the global stream in ``order``."""
    if order == "displayed":
        _demo_cell()
    torch.manual_seed(0)  # inside the source's make_task_matrices
    task = make_adaptation_task(seed=torch.default_generator)
    if order == "executed":
        _demo_cell()
    model = SourceTinyAdapter(128, 256, 16, r=8, alpha=16.0)
    return task, model


def source_initial_model(order: str = "executed") -> SourceTinyAdapter:
    """The source's model before pretraining, its cells run in ``order``.

    Runs in a forked RNG: the global RNG state is left as it was.
    """
    check_choice("order", order, SOURCE_ORDERS)
    with torch.random.fork_rng(devices=[]):
        return _start(order)[1]


def replay_source_run(
    order: str = "executed",
    *,
    pretrain_steps: int = 800,
    finetune_steps: int = 600,
    log_every: int = 100,
    literal: bool = False,
) -> SourceRun:
    """Replay the source's pretraining, fine-tuning and merge on the global stream.

    With the defaults this prints nothing and returns the source's printed
    lines in :attr:`SourceRun.log`, digit for digit. The whole run happens in
    a forked RNG, so the caller's global RNG state is left as it was.

    Args:
        order: ``"executed"`` (the data cell before the demo, the order the
            execution counts show) or ``"displayed"`` (top to bottom).
        pretrain_steps: the pretraining loop's length (800).
        finetune_steps: the fine-tuning loop's length (600).
        log_every: print a loss every this many steps (100).
        literal: run the source's loops exactly as written, without the two
            shortcuts described in the module's docstring (same numbers,
            slower).
    """
    check_choice("order", order, SOURCE_ORDERS)
    pretrain_steps = check_positive_int("pretrain_steps", pretrain_steps)
    finetune_steps = check_positive_int("finetune_steps", finetune_steps)
    log_every = check_positive_int("log_every", log_every)
    log: list[str] = []
    with torch.random.fork_rng(devices=[]):
        task, model = _start(order)
        loss_fn = nn.MSELoss()

        # pretrain: the backbone trains, the whole head is frozen
        for p in model.backbone.parameters():
            p.requires_grad = True
        for p in model.head.parameters():
            p.requires_grad = False
        opt = torch.optim.AdamW(
            filter(lambda p: p.requires_grad, model.parameters()), lr=2e-3)
        pretrain_losses = []
        def pretrain_output(x: torch.Tensor) -> torch.Tensor:
            if literal:
                return model(x)
            h = model.act(model.backbone(x))
            # The mask dropout would draw: only its draws matter (it multiplies
            # zeros), and randint below advances the stream exactly as
            # bernoulli_ on a tensor of h's shape does, in two thirds the time.
            torch.randint(0, 2**31, h.shape)
            return model.head.base(h)  # + the adapter's exact zeros

        for step in range(pretrain_steps):
            opt.zero_grad()
            loss = loss_fn(pretrain_output(task.x_train), task.y_old_train)
            loss.backward()
            opt.step()
            pretrain_losses.append(loss.item())
            if (step + 1) % log_every == 0:
                log.append(f"[Pretrain] step {step+1}, loss={loss.item():.4f}")

        # finetune: the LoRA factors and the head's bias train
        for p in model.backbone.parameters():
            p.requires_grad = False
        for n, p in model.head.named_parameters():
            p.requires_grad = ("lora_" in n) or ("bias" in n)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log += ["", f"Trainable params after freezing: {trainable}/{total} "
                f"({100*trainable/total:.2f}%). only LoRA is trainable."]
        opt = torch.optim.AdamW(
            filter(lambda p: p.requires_grad, model.parameters()), lr=5e-3)
        head_pretrained = copy.deepcopy(model.head)
        with torch.no_grad():  # the frozen backbone's output, computed once
            feats_train = model.act(model.backbone(task.x_train))
            feats_val = model.act(model.backbone(task.x_val))

        def head_output(x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
            return model(x) if literal else model.head(feats)

        finetune_losses, val_losses = [], []
        for step in range(finetune_steps):
            opt.zero_grad()
            pred = head_output(task.x_train, feats_train)
            loss = loss_fn(pred, task.y_new_train)
            loss.backward()
            opt.step()
            finetune_losses.append(loss.item())
            if (step + 1) % log_every == 0:
                with torch.no_grad():  # still in training mode: dropout on
                    val_pred = head_output(task.x_val, feats_val)
                    val_loss = loss_fn(val_pred, task.y_new_val).item()
                val_losses.append(val_loss)
                log.append(f"[LoRA finetune] step {step+1}, "
                           f"train_loss={loss.item():.4f}, val_loss={val_loss:.4f}")

        head_unmerged = copy.deepcopy(model.head)
        model.head.merge_weights_()
        with torch.no_grad():
            merged_val = loss_fn(model(task.x_val), task.y_new_val).item()
        log += ["", f"Merged for inference. Val loss (merged): {merged_val:.4f}"]
    return SourceRun(
        log=log, task=task, model=model, head_pretrained=head_pretrained,
        head_unmerged=head_unmerged,
        features_train=feats_train, features_val=feats_val,
        pretrain_losses=pretrain_losses, finetune_losses=finetune_losses,
        val_losses=val_losses, merged_val=merged_val,
    )
