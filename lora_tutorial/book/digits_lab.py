"""Chapter 5's experiments: LoRA on scikit-learn's digits, against published claims.

A :class:`DigitsLab` holds the two tasks and the network pretrained on the
source task (digits 0-4, see :mod:`lora_tutorial.digits`). Each experiment
starts from a fresh copy of it with a new head for the target task (5-9),
trains full-batch for a fixed number of AdamW steps and measures. The sweeps
are small functions, one per claim, so the chapter can show the core of an
experiment and call the sweep.

Tiny models train faster on one CPU thread than on two (thread hand-offs cost
more than the matrix products save), and much faster on a busy machine, so
training and the sweeps run under :func:`~lora_tutorial.digits.torch_threads`
(re-exported here), which restores the previous setting afterwards.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import lora_tutorial as lt
from lora_tutorial._checks import as_generator, check_choice, check_positive_int
from lora_tutorial.digits import (
    TARGET_DIGITS,
    DigitsMLP,
    Split,
    Task,
    accuracy,
    pretrained_digits_mlp,
    torch_threads,
)

__all__ = [
    "DigitsLab",
    "HIDDEN",
    "MethodResult",
    "ScalingResult",
    "best_runs",
    "compare_methods",
    "finetune",
    "init_sweep",
    "loraplus_sweep",
    "placement_sweep",
    "scaling_sweep",
    "similarity_grid",
    "swap_init",
]

#: The three hidden layers, the adapters' default targets.
HIDDEN = ("fc1", "fc2", "fc3")
METHODS = ("head", "lora", "full")


def finetune(
    model: nn.Module,
    split: Split,
    *,
    steps: int,
    lr: float,
    b_lr_ratio: float = 1.0,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters on ``split``.

    Full-batch AdamW (PyTorch's defaults) on the cross-entropy, on one CPU
    thread (:func:`~lora_tutorial.digits.torch_threads`). Every ``lora_B``
    trains at ``lr * b_lr_ratio`` (LoRA+), the rest at ``lr``.
    ``callback(step, model)`` runs after each step. If the loss stops being
    finite, training stops and the history ends with ``inf``.

    Returns:
        The loss before each step.
    """
    steps = check_positive_int("steps", steps)
    b_ids = {id(layer.lora_B) for _, layer in lt.lora_layers(model)}  # what it is, not its name
    trainable = [p for p in model.parameters() if p.requires_grad]
    b_params = [p for p in trainable if id(p) in b_ids]
    others = [p for p in trainable if id(p) not in b_ids]
    groups = [{"params": others, "lr": lr}]
    if b_params:
        groups.append({"params": b_params, "lr": lr * b_lr_ratio})
    opt = torch.optim.AdamW(groups, lr=lr)
    with torch_threads(1):
        return _run(model, split, opt, steps, callback)


def _run(
    model: nn.Module,
    split: Split,
    opt: torch.optim.Optimizer,
    steps: int,
    callback: Callable[[int, nn.Module], None] | None,
) -> list[float]:
    history: list[float] = []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(split.x), split.y)
        value = loss.item()
        if not math.isfinite(value):
            history.append(math.inf)
            break
        loss.backward()
        opt.step()
        history.append(value)
        if callback is not None:
            callback(step, model)
    return history


def swap_init(model: nn.Module, seed: int | torch.Generator = 0) -> None:
    """Start every adapter the other way round: ``A = 0`` and ``B`` random.

    ``B`` is drawn from the distribution ``A`` had (uniform on
    ±1/√in_features, PEFT's Kaiming-uniform), so only the roles change.
    """
    gen = as_generator(seed)
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.lora_A.zero_()
            layer.lora_B.uniform_(-bound, bound, generator=gen)


@dataclass
class DigitsLab:
    """The two tasks, the pretrained network, and fresh copies of it to adapt.

    Build one with :meth:`create`. ``steps`` is the number of fine-tuning
    steps every experiment uses unless told otherwise.
    """

    source: Task
    target: Task
    pretrained: DigitsMLP
    steps: int = 100

    @classmethod
    def create(cls, seed: int = 0, steps: int = 100, pretrain_steps: int = 200) -> "DigitsLab":
        """Load the digits and pretrain the network on the source task."""
        source, target, model = pretrained_digits_mlp(seed, steps=pretrain_steps)
        return cls(source, target, model, steps)

    def fresh_model(self, seed: int | torch.Generator = 1) -> DigitsMLP:
        """A copy of the pretrained network, all frozen, with a new head for the target.

        The head is an ``nn.Linear`` drawn from ``seed`` and is left
        trainable; the pretrained network itself is never changed.
        """
        model = copy.deepcopy(self.pretrained)
        model.head = lt.make_linear(model.head.in_features, len(TARGET_DIGITS), seed=seed)
        return model

    def adapt(
        self,
        method: str,
        r: int = 4,
        alpha: float | None = None,
        *,
        targets: Sequence[str] = HIDDEN,
        rslora: bool = False,
        seed: int = 1,
    ) -> DigitsMLP:
        """A fresh model set up for ``method``: ``"head"``, ``"lora"`` or ``"full"``.

        ``"head"`` trains only the new head; ``"full"`` trains everything;
        ``"lora"`` puts rank-``r`` adapters (``alpha`` defaults to ``2 r``) on
        ``targets`` with :func:`~lora_tutorial.inject.add_lora` and trains them and
        the new head. The head and the adapters draw from one generator
        seeded with ``seed``.
        """
        check_choice("method", method, METHODS)
        gen = as_generator(seed)
        model = self.fresh_model(gen)
        if method == "full":
            model.requires_grad_(True)
        elif method == "lora":
            alpha = 2.0 * r if alpha is None else alpha
            lt.add_lora(model, list(targets), r=r, alpha=alpha, rslora=rslora,
                        modules_to_save=["head"], seed=gen)
        return model.train()

    def target_accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Accuracy on the target task's ``split`` ("train", "val" or "test")."""
        part = getattr(self.target, split)
        return accuracy(model, part.x, part.y)

    def source_accuracy(self, model: DigitsMLP, split: str = "test") -> float:
        """Source-task accuracy of ``model``'s features read by the pretrained head.

        How much of what pretraining learned survives fine-tuning: the
        pretrained model scores its own source accuracy here.
        """
        part = getattr(self.source, split)
        reader = nn.Sequential(_Features(model), self.pretrained.head)
        return accuracy(reader, part.x, part.y)

    def train_loss(self, model: nn.Module) -> float:
        """Cross-entropy of ``model`` on the target's training split (evaluation mode)."""
        train = self.target.train
        with torch.no_grad():
            return float(F.cross_entropy(model.eval()(train.x), train.y))


class _Features(nn.Module):
    def __init__(self, model: DigitsMLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


@dataclass
class MethodResult:
    """One adapted model and what it scores."""

    name: str
    trainable: int
    lr: float
    val_acc: float
    test_acc: float
    source_acc: float
    model: DigitsMLP = field(repr=False)


def compare_methods(
    lab: DigitsLab, ranks: Sequence[int], lrs: Sequence[float], seed: int = 1
) -> list[MethodResult]:
    """Head only, LoRA at each rank (on ``fc1``-``fc3``, α = 2r) and full fine-tuning.

    Every method trains once per learning rate in ``lrs``. Returns every run,
    method by method; :func:`best_runs` keeps the best of each.
    """
    setups = [("head", {})] + [(f"LoRA r={r}", {"r": r}) for r in ranks] + [("full", {})]
    results = []
    with torch_threads(1):
        for name, kwargs in setups:
            method = "lora" if kwargs else name
            for lr in lrs:
                model = lab.adapt(method, seed=seed, **kwargs)
                finetune(model, lab.target.train, steps=lab.steps, lr=lr)
                results.append(MethodResult(
                    name, lt.count_parameters(model).trainable, lr,
                    lab.target_accuracy(model, "val"), lab.target_accuracy(model),
                    lab.source_accuracy(model), model))
    return results


def best_runs(results: Sequence[MethodResult]) -> list[MethodResult]:
    """For each method (in order of first appearance) its run with the best validation accuracy.

    Among equal validation accuracies the first run wins.
    """
    best: dict[str, MethodResult] = {}
    for run in results:
        if run.name not in best or run.val_acc > best[run.name].val_acc:
            best[run.name] = run
    return list(best.values())


@dataclass
class ScalingResult:
    """One rank of :func:`scaling_sweep`."""

    r: int
    grad_norm: float  # ‖∂L/∂B‖ summed over the adapters, at the start
    first_change: float  # ‖fc1's update(x)‖ / ‖fc1.base(x)‖ after one step
    final_loss: float


def scaling_sweep(
    lab: DigitsLab, ranks: Sequence[int], *, rslora: bool, alpha: float = 8.0, lr: float = 3e-3
) -> list[ScalingResult]:
    """Train LoRA at each rank with the same ``alpha`` and ``lr``, under α/r or α/√r.

    Measures the adapters' gradient at the start, the relative size of
    ``fc1``'s update after the first step, and the final training loss.
    """
    out = []
    x = lab.target.train.x
    with torch_threads(1):
        for r in ranks:
            model = lab.adapt("lora", r=r, alpha=alpha, rslora=rslora)
            loss = F.cross_entropy(model(x), lab.target.train.y)
            grads = torch.autograd.grad(loss, [layer.lora_B for _, layer in lt.lora_layers(model)])
            grad_norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
            first: list[float] = []

            def after_step(step: int, m: nn.Module) -> None:
                if step == 1:
                    first.append(lt.relative_update_norm(m.fc1, x))

            finetune(model, lab.target.train, steps=lab.steps, lr=lr, callback=after_step)
            out.append(ScalingResult(r, grad_norm, first[0], lab.train_loss(model)))
    return out


def init_sweep(
    lab: DigitsLab, lrs: Sequence[float], *, r: int = 4, zero: str = "B"
) -> list[float]:
    """Final training loss of rank-``r`` LoRA at each learning rate.

    ``zero="B"`` is the usual start (B = 0, A random); ``zero="A"`` swaps
    the roles with :func:`swap_init`. A run whose loss stops being finite
    scores ``inf``.
    """
    check_choice("zero", zero, ("A", "B"))
    losses = []
    with torch_threads(1):
        for lr in lrs:
            model = lab.adapt("lora", r=r)
            if zero == "A":
                swap_init(model, seed=2)
            history = finetune(model, lab.target.train, steps=lab.steps, lr=lr)
            losses.append(math.inf if math.isinf(history[-1]) else lab.train_loss(model))
    return losses


def loraplus_sweep(
    lab: DigitsLab, ratios: Sequence[float], lrs: Sequence[float], *, r: int = 4,
    steps: int | None = None,
) -> dict[float, list[float]]:
    """Final training loss for each ratio ``lr_B / lr_A`` and each base ``lr``.

    Returns ``{ratio: [loss at lrs[0], loss at lrs[1], ...]}``; a diverged
    run scores ``inf``.
    """
    out: dict[float, list[float]] = {}
    with torch_threads(1):
        for ratio in ratios:
            out[ratio] = []
            for lr in lrs:
                model = lab.adapt("lora", r=r)
                history = finetune(model, lab.target.train, steps=steps or lab.steps,
                                   lr=lr, b_lr_ratio=ratio)
                out[ratio].append(math.inf if math.isinf(history[-1]) else lab.train_loss(model))
    return out


def placement_sweep(
    lab: DigitsLab,
    placements: dict[str, tuple[Sequence[str], int]],
    *,
    lr: float = 1e-2,
    seeds: Sequence[int] = (1, 2),
) -> dict[str, tuple[int, float]]:
    """Test accuracy of adapters placed as ``{label: (targets, rank)}``.

    Returns ``{label: (adapter parameters, mean test accuracy over seeds)}``;
    the new head (trained in every case) is not counted.
    """
    out = {}
    with torch_threads(1):
        for label, (targets, r) in placements.items():
            accs = []
            for seed in seeds:
                model = lab.adapt("lora", r=r, targets=targets, seed=seed)
                finetune(model, lab.target.train, steps=lab.steps, lr=lr)
                accs.append(lab.target_accuracy(model))
            n = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lt.lora_layers(model))
            out[label] = (n, sum(accs) / len(accs))
    return out


def _right_singular_vectors(w: torch.Tensor) -> torch.Tensor:
    with torch_threads(1):  # small matrices: one thread is faster
        return torch.linalg.svd(w.detach().double(), full_matrices=False).Vh  # (k, in)


def similarity_grid(w1: torch.Tensor, w2: torch.Tensor, i_max: int, j_max: int) -> torch.Tensor:
    """Hu et al.'s normalised subspace similarity of two updates ``(out, in)``.

    ``φ(i, j) = ‖V1_iᵀ V2_j‖_F² / min(i, j)``, where ``V1_i`` holds the top
    ``i`` right-singular vectors of ``w1`` (and ``V2_j`` of ``w2``): 1 when
    one subspace contains the other, about ``max(i, j) / in`` for random ones.

    Returns:
        ``(i_max, j_max)`` float64 tensor, entry ``[i-1, j-1]`` = ``φ(i, j)``.
    """
    v1 = _right_singular_vectors(w1)[:i_max]
    v2 = _right_singular_vectors(w2)[:j_max]
    overlap = (v1 @ v2.T) ** 2  # (i_max, j_max)
    cum = overlap.cumsum(0).cumsum(1)
    sizes = torch.arange(1, i_max + 1, dtype=torch.float64)
    mins = torch.minimum(sizes[:, None], torch.arange(1, j_max + 1, dtype=torch.float64)[None])
    return cum / mins
