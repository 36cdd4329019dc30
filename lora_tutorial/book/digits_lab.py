"""Chapter 5's experiments: LoRA on scikit-learn's digits, against published claims.

A :class:`DigitsLab` holds the two tasks and the network pretrained on the
source task (digits 0-4, see :mod:`lora_tutorial.digits`), everything in
float64 so that every printed digit is the same on every machine (float32
rounding, amplified over a hundred training steps, is not). An :class:`Arm`
says how to adapt a fresh copy of that network (new head only, LoRA with its
rank, scale, targets and start, or full fine-tuning); :meth:`DigitsLab.run`
trains one arm at one learning rate, full-batch, for a fixed number of AdamW
steps, and measures it (:class:`Outcome`).

A *seed* of the chapter's comparisons fixes everything random that is not the
thing compared: the pretrained network's initial weights (so the pretrained
network itself), and the new head's and the adapters' initial values. The data
split is fixed, and full-batch training without dropout has no data order and
no masks. :func:`sweep` runs arms × learning rates × seeds; :func:`tuned`
picks each arm's learning rate per seed on validation data with
:func:`~lora_tutorial.book.verdict.best_inside`.

The chapter's sweeps (:data:`SWEEPS`, 2,300 runs over the ten :data:`SEEDS`)
take minutes, so ``tools/make_digits_sweeps.py`` runs them and stores their
outcomes in :data:`SWEEPS_FILE`, once natively and once under PyTorch's plain
kernels (:data:`OTHER_KERNELS`), keeping of the second run the runs that came
out differently; :func:`load_sweeps` reads the file back and refuses one made
from other settings. :func:`first_step` and :func:`similarity_summary` are the
measurements behind claims 3 and 7.

Tiny models train faster on one CPU thread than on two (thread hand-offs cost
more than the matrix products save), so training runs under
:func:`~lora_tutorial.digits.torch_threads` (re-exported here), which restores
the previous setting afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import lora_tutorial as lt
from lora_tutorial._checks import (
    as_generator,
    check_bool,
    check_choice,
    check_positive_finite,
    check_positive_int,
)
from lora_tutorial.book import verdict
from lora_tutorial.digits import (
    SOURCE_DIGITS,
    TARGET_DIGITS,
    DigitsMLP,
    Split,
    Task,
    accuracy,
    load_digit_tasks,
    pretrain_digits,
    torch_threads,
)

__all__ = [
    "Arm",
    "DTYPE",
    "DigitsLab",
    "FirstStep",
    "HIDDEN",
    "LRS",
    "OTHER_KERNELS",
    "OTHER_TOLERANCE",
    "Outcome",
    "SEEDS",
    "SIMILARITY_LR",
    "SIMILARITY_RANKS",
    "SPLIT_SEED",
    "SWEEPS",
    "SWEEPS_FILE",
    "StoredSweeps",
    "SweepSpec",
    "adapter_seed",
    "data_directions",
    "fc1_updates",
    "finetune",
    "first_step",
    "load_sweeps",
    "run_sweep",
    "save_sweeps",
    "similarity_grid",
    "similarity_summary",
    "sweep",
    "torch_threads",
    "tuned",
]

#: The dtype of every tensor of the chapter (data, networks, adapters).
DTYPE = torch.float64
#: The seed of the fixed training/validation/test split (every lab shares it).
SPLIT_SEED = 0
#: The three hidden layers, the adapters' default targets.
HIDDEN = ("fc1", "fc2", "fc3")
METHODS = ("head", "lora", "full")
SPLITS = ("train", "val", "test")


def adapter_seed(seed: int) -> int:
    """The seed the new head and the adapters of the chapter's seed ``seed`` draw from.

    ``100 + seed``, kept apart from the pretraining's ``1 + seed`` so that the
    head's first values are not the pretrained network's first initial values.
    """
    return 100 + _check_seed("seed", seed)


def _check_seed(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0 (``bool`` is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _float32_draws() -> Iterator[None]:
    """Draw initial weights as ``nn.Linear`` draws them by default (float32).

    The lab casts them to float64 afterwards, so its numbers do not depend on
    the caller's ``torch.set_default_dtype``; the previous default is restored.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _as_float64(task: Task) -> Task:
    splits = (getattr(task, name) for name in SPLITS)
    return Task(task.name, *(Split(s.x.to(DTYPE), s.y) for s in splits))


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

    Args:
        model: maps ``split.x (n, 64)`` to logits ``(n, classes)``.
        split: the training data.
        steps: number of AdamW steps.
        lr, b_lr_ratio: learning rates (positive, finite).

    Returns:
        The loss before each step.
    """
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    b_lr_ratio = check_positive_finite("b_lr_ratio", b_lr_ratio)
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


@dataclass(frozen=True)
class Arm:
    """One way to adapt the pretrained network; the learning rate is chosen apart.

    Attributes:
        method: ``"head"`` (only the new head trains), ``"lora"`` (rank-``r``
            adapters on ``targets`` and the new head) or ``"full"`` (everything).
        r: the adapters' rank.
        alpha: the scale's numerator; ``None`` means ``2 r``.
        targets: the adapted layers, among :data:`HIDDEN`.
        rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        zero: which factor starts at zero: ``"B"`` (the usual start, ``A``
            Kaiming-uniform) or ``"A"`` (the mirror image, ``B`` drawn by
            :func:`~lora_tutorial.layers.mirror_init_`).
        b_lr_ratio: ``B``'s learning rate over everything else's (LoRA+).
    """

    method: str = "lora"
    r: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = HIDDEN
    rslora: bool = False
    zero: str = "B"
    b_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_positive_int("r", self.r)
        if self.alpha is not None:
            check_positive_finite("alpha", self.alpha)
        if isinstance(self.targets, str) or not self.targets or not all(
                t in HIDDEN for t in self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"targets must be a non-empty tuple of distinct names among {HIDDEN}, "
                f"got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        check_bool("rslora", self.rslora)
        check_choice("zero", self.zero, ("A", "B"))
        check_positive_finite("b_lr_ratio", self.b_lr_ratio)

    @property
    def scale_alpha(self) -> float:
        """The ``alpha`` used: the given one, or ``2 r``."""
        return 2.0 * self.r if self.alpha is None else float(self.alpha)

    @property
    def name(self) -> str:
        """A short label (``"head"``, ``"full"`` or ``"LoRA r=4"``) and what differs."""
        if self.method != "lora":
            return self.method
        parts = [f"LoRA r={self.r}"]
        if self.targets != HIDDEN:
            parts.append("on " + "+".join(self.targets))
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        if self.rslora:
            parts.append("rsLoRA")
        if self.zero == "A":
            parts.append("A=0")
        if self.b_lr_ratio != 1.0:
            parts.append(f"lr_B/lr_A={self.b_lr_ratio:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Outcome:
    """What one fine-tuning run scores (losses are cross-entropies, ``inf`` if it diverged).

    Attributes:
        train_loss: on the target's training split, after training.
        val_loss, val_acc: on the target's validation split (tuning uses these).
        test_acc: on the target's test split: what the run learned.
        source_acc: on the source's test split, the adapted features read by the
            pretrained head: what the run kept of the old task.
    """

    train_loss: float
    val_loss: float
    val_acc: float
    test_acc: float
    source_acc: float

    @property
    def diverged(self) -> bool:
        """Whether the training loss stopped being finite."""
        return math.isinf(self.train_loss)

    def as_dict(self) -> dict[str, float]:
        """The five numbers by name."""
        return asdict(self)

    def gap(self, other: "Outcome") -> float:
        """The largest absolute difference between the two outcomes' numbers.

        ``inf`` against ``inf`` (two diverged runs) counts as no difference.
        """
        gaps = [0.0 if a == b else abs(a - b)
                for a, b in zip(self.as_dict().values(), other.as_dict().values())]
        return max(gaps)


@dataclass
class DigitsLab:
    """The two tasks (float64), the pretrained network, and fresh copies of it to adapt.

    Build one with :meth:`create`. ``steps`` is the number of fine-tuning
    steps every run uses unless told otherwise; ``seed`` is the seed it was
    pretrained from.
    """

    source: Task
    target: Task
    pretrained: DigitsMLP
    steps: int = 100
    seed: int = 0

    @classmethod
    def create(cls, seed: int = 0, steps: int = 100, pretrain_steps: int = 200) -> "DigitsLab":
        """Load the digits, cut the fixed split and pretrain the network on the source task.

        The split is always the one drawn from :data:`SPLIT_SEED`; ``seed``
        picks the pretrained network: its initial weights are drawn (as
        :class:`~lora_tutorial.digits.DigitsMLP` draws them, in float32) from
        ``1 + seed``, cast to float64, and trained for ``pretrain_steps``
        full-batch AdamW steps on the source task's training split.
        """
        seed = _check_seed("seed", seed)
        steps = check_positive_int("steps", steps)
        pretrain_steps = check_positive_int("pretrain_steps", pretrain_steps)
        source, target = (_as_float64(t) for t in load_digit_tasks(SPLIT_SEED))
        with _float32_draws():
            model = DigitsMLP(n_classes=len(SOURCE_DIGITS), seed=1 + seed)
        model = model.to(DTYPE)
        pretrain_digits(model, source.train, steps=pretrain_steps)
        model.requires_grad_(False)
        return cls(source, target, model.eval(), steps, seed)

    def fresh_model(self, seed: int | torch.Generator = 1) -> DigitsMLP:
        """A copy of the pretrained network, all frozen, with a new head for the target.

        The head is an ``nn.Linear`` drawn from ``seed`` (in float32, as
        PyTorch draws it, then cast to float64) and is left trainable; the
        pretrained network itself is never changed.
        """
        model = copy.deepcopy(self.pretrained)
        with _float32_draws():
            head = lt.make_linear(model.head.in_features, len(TARGET_DIGITS), seed=seed)
        model.head = head.to(DTYPE)
        return model

    def adapt(self, arm: Arm | str = "lora", *, seed: int | torch.Generator = 1,
              **settings: object) -> DigitsMLP:
        """A fresh model set up for ``arm`` (an :class:`Arm`, or its ``method`` and settings).

        ``lab.adapt("lora", r=2)`` is ``lab.adapt(Arm("lora", r=2))``. The head
        and then the adapters draw from one generator seeded with ``seed``
        (``"lora"`` uses :func:`~lora_tutorial.inject.add_lora`, PEFT's
        Kaiming-uniform ``A`` and ``B = 0``; with ``zero="A"`` every adapter
        is then restarted by :func:`~lora_tutorial.layers.mirror_init_`,
        drawing from the same generator).
        """
        if isinstance(arm, str):
            arm = Arm(arm, **settings)  # type: ignore[arg-type]
        elif settings:
            raise TypeError(f"pass settings either in the Arm or as keywords, not both: {settings}")
        gen = as_generator(seed)
        model = self.fresh_model(gen)
        if arm.method == "full":
            model.requires_grad_(True)
        elif arm.method == "lora":
            lt.add_lora(model, list(arm.targets), r=arm.r, alpha=arm.scale_alpha,
                        rslora=arm.rslora, modules_to_save=["head"], seed=gen)
            if arm.zero == "A":
                for _, layer in lt.lora_layers(model):
                    lt.mirror_init_(layer, seed=gen)
        return model.train()

    def run(self, arm: Arm, lr: float, *, seed: int | torch.Generator = 1,
            steps: int | None = None,
            callback: Callable[[int, nn.Module], None] | None = None,
            ) -> tuple[DigitsMLP, Outcome]:
        """Adapt a fresh model by ``arm``, fine-tune it at ``lr`` and measure it.

        Returns:
            The trained model and its :class:`Outcome`.
        """
        model = self.adapt(arm, seed=seed)
        steps = self.steps if steps is None else steps
        history = finetune(model, self.target.train, steps=steps, lr=lr,
                           b_lr_ratio=arm.b_lr_ratio, callback=callback)
        return model, self.measure(model, diverged=math.isinf(history[-1]))

    def measure(self, model: DigitsMLP, diverged: bool = False) -> Outcome:
        """The :class:`Outcome` of a trained model (all ``inf``/0 if it ``diverged``)."""
        if diverged:
            return Outcome(math.inf, math.inf, 0.0, 0.0, 0.0)
        train_loss = self.loss(model, "train")
        if not math.isfinite(train_loss):
            return Outcome(math.inf, math.inf, 0.0, 0.0, 0.0)
        return Outcome(train_loss, self.loss(model, "val"), self.target_accuracy(model, "val"),
                       self.target_accuracy(model), self.source_accuracy(model))

    def target_accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Accuracy on the target task's ``split`` ("train", "val" or "test")."""
        part = getattr(self.target, check_choice("split", split, SPLITS))
        return accuracy(model, part.x, part.y)

    def source_accuracy(self, model: DigitsMLP, split: str = "test") -> float:
        """Source-task accuracy of ``model``'s features read by the pretrained head.

        How much of what pretraining learned survives fine-tuning: the
        pretrained model scores its own source accuracy here.
        """
        part = getattr(self.source, check_choice("split", split, SPLITS))
        reader = nn.Sequential(_Features(model), self.pretrained.head)
        return accuracy(reader, part.x, part.y)

    def loss(self, model: nn.Module, split: str = "train") -> float:
        """Cross-entropy of ``model`` on the target's ``split`` (evaluation mode)."""
        part = getattr(self.target, check_choice("split", split, SPLITS))
        was_training = model.training
        try:
            with torch.no_grad():
                return float(F.cross_entropy(model.eval()(part.x), part.y))
        finally:
            model.train(was_training)

    def train_loss(self, model: nn.Module) -> float:
        """Cross-entropy of ``model`` on the target's training split (evaluation mode)."""
        return self.loss(model, "train")


class _Features(nn.Module):
    def __init__(self, model: DigitsMLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


Results = dict[tuple[Arm, int], dict[float, Outcome]]


def sweep(
    labs: Mapping[int, DigitsLab],
    arms: Sequence[Arm],
    lrs: Sequence[float],
    *,
    steps: int | None = None,
) -> Results:
    """Every arm at every learning rate on every seed's lab.

    Args:
        labs: ``{seed: lab}``, the lab pretrained from that seed; the run's head
            and adapters draw from :func:`adapter_seed` of it.
        arms, lrs: what to run.
        steps: fine-tuning steps (default: each lab's ``steps``).

    Returns:
        ``{(arm, seed): {lr: outcome}}``.
    """
    out: Results = {}
    with torch_threads(1):
        for seed, lab in labs.items():
            for arm in arms:
                out[arm, seed] = {
                    lr: lab.run(arm, lr, seed=adapter_seed(seed), steps=steps)[1] for lr in lrs}
    return out


def tuned(by_lr: Mapping[float, Outcome], *, name: str = "grid",
          by: str = "val_loss") -> tuple[float, Outcome]:
    """The learning rate whose ``by`` score (a validation loss by default) is lowest.

    Uses :func:`~lora_tutorial.book.verdict.best_inside`, which refuses a best
    point on the grid's edge.

    Returns:
        ``(lr, outcome)``.
    """
    check_choice("by", by, ("val_loss", "train_loss"))
    lrs = sorted(by_lr)
    scores = [getattr(by_lr[lr], by) for lr in lrs]
    best = verdict.best_inside(lrs, scores, name=name)
    return lrs[best], by_lr[lrs[best]]


def _grid(start: float, factor: float, n: int) -> tuple[float, ...]:
    return tuple(float(f"{start * factor**k:.4g}") for k in range(n))


#: The chapter's seeds; seed ``k`` pretrains from ``1 + k`` and adapts from ``100 + k``.
SEEDS = tuple(range(10))
#: 1, 2, 5 per decade, 0.001 to 0.2.
LRS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1)


@dataclass(frozen=True)
class SweepSpec:
    """One of the chapter's sweeps: every arm at every learning rate on every seed."""

    name: str
    arms: tuple[Arm, ...]
    lrs: tuple[float, ...]
    steps: int = 100


#: The sweeps behind chapter 5's seven claims, by name.
SWEEPS: dict[str, SweepSpec] = {spec.name: spec for spec in (
    # Claims 1, 2 and 7: the new head alone, LoRA at ranks 1-16 on fc1-fc3, everything.
    SweepSpec("methods", (Arm("head"), *(Arm("lora", r=r) for r in (1, 2, 4, 8, 16)),
                          Arm("full")), LRS),
    # Claim 3: one alpha for every rank, under alpha/r and alpha/sqrt(r).
    SweepSpec("scaling", tuple(Arm("lora", r=r, alpha=8.0, rslora=rs)
                               for rs in (False, True) for r in (1, 4, 16, 64)),
              (1e-4, 2e-4, 5e-4) + LRS[:7]),
    # Claim 4: which factor starts at zero, on a grid a factor sqrt(2) apart.
    SweepSpec("init", (Arm("lora", r=4), Arm("lora", r=4, zero="A")),
              _grid(1e-3, math.sqrt(2.0), 15)),
    # Claim 5: LoRA+, B's learning rate a multiple of A's, 50 steps.
    SweepSpec("loraplus", tuple(Arm("lora", r=4, b_lr_ratio=k) for k in (1.0, 4.0, 16.0, 64.0)),
              (2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2), steps=50),
    # Claim 6: 768 adapter parameters, spread over three layers or on one.
    SweepSpec("placement", (Arm("lora", r=2), *(Arm("lora", r=6, targets=(t,)) for t in HIDDEN)),
              LRS),
)}

#: Where ``tools/make_digits_sweeps.py`` stores the sweeps' results:
#: ``book/data/digits_sweeps.json`` in the package.
#:
#: :meta hide-value:
SWEEPS_FILE = Path(__file__).resolve().parent / "data" / "digits_sweeps.json"


def run_sweep(spec: SweepSpec, labs: Mapping[int, DigitsLab],
              progress: Callable[[str], None] | None = None) -> Results:
    """Run ``spec`` on every seed's lab: ``{(arm, seed): {lr: outcome}}``."""
    out: Results = {}
    for arm in spec.arms:
        out.update(sweep(labs, [arm], spec.lrs, steps=spec.steps))
        if progress is not None:
            progress(f"{spec.name}: {arm.name}")
    return out


def _arm_to_json(arm: Arm) -> dict[str, object]:
    d = asdict(arm)
    d["targets"] = list(arm.targets)
    return d


#: The kernels of the second run of the sweeps, PyTorch's plain (non-SIMD) code.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default"}
#: Runs of that second run that differ from the first by more than this are stored.
OTHER_TOLERANCE = 1e-9


@dataclass
class StoredSweeps:
    """What :func:`load_sweeps` reads.

    Attributes:
        results: ``{sweep name: {(arm, seed): {lr: outcome}}}`` for :data:`SWEEPS`.
        similarity: :func:`similarity_summary` over :data:`SEEDS`.
        elsewhere: the same sweeps run again under :data:`OTHER_KERNELS`: the
            results with every run that came out differently (by more than
            :data:`OTHER_TOLERANCE` in any number) replaced by that run.
        changed: ``{sweep name: [(arm, seed, lr), ...]}``, the runs that differ.
        similarity_elsewhere: :func:`similarity_summary` of the second run.
        about: how the file was made.
    """

    results: dict[str, Results]
    similarity: dict[str, dict[str, list[float]]]
    elsewhere: dict[str, Results]
    changed: dict[str, list[tuple[Arm, int, float]]]
    similarity_elsewhere: dict[str, dict[str, list[float]]]
    about: dict[str, object] = field(default_factory=dict)


def _runs_to_json(spec: SweepSpec, by_arm: Results,
                  keep: Callable[[Arm, int, float], bool] = lambda *_: True) -> list[dict]:
    return [{"arm": spec.arms.index(arm), "seed": seed, "lr": lr, **outcome.as_dict()}
            for (arm, seed), by_lr in by_arm.items() for lr, outcome in by_lr.items()
            if keep(arm, seed, lr)]


def _differs(a: Outcome, b: Outcome) -> bool:
    gap = a.gap(b)
    return math.isnan(gap) or gap > OTHER_TOLERANCE


def save_sweeps(results: Mapping[str, Results],
                similarity: Mapping[str, Mapping[str, list[float]]],
                elsewhere: Mapping[str, Results],
                similarity_elsewhere: Mapping[str, Mapping[str, list[float]]],
                path: Path | str = SWEEPS_FILE,
                about: Mapping[str, object] | None = None) -> None:
    """Write the sweeps' results and claim 7's similarities as JSON, at full precision.

    Each sweep stores its spec (arms, learning rates, steps) beside its runs, so
    that :func:`load_sweeps` can refuse a file made from other settings. Of the
    second run, ``elsewhere`` (made under :data:`OTHER_KERNELS`), only the runs
    that differ by more than :data:`OTHER_TOLERANCE` are stored.
    """
    sweeps: dict[str, object] = {}
    other: dict[str, object] = {}
    for name, by_arm in results.items():
        spec = SWEEPS[name]
        sweeps[name] = {"arms": [_arm_to_json(a) for a in spec.arms], "lrs": list(spec.lrs),
                        "steps": spec.steps, "runs": _runs_to_json(spec, by_arm)}
        other[name] = _runs_to_json(spec, elsewhere[name], lambda arm, seed, lr: _differs(
            by_arm[arm, seed][lr], elsewhere[name][arm, seed][lr]))
    data = {"about": dict(about or {}), "seeds": list(SEEDS), "sweeps": sweeps,
            "similarity": {"lr": SIMILARITY_LR, "update_ranks": list(SIMILARITY_RANKS),
                           "values": {k: dict(v) for k, v in similarity.items()}},
            "elsewhere": {"env": dict(OTHER_KERNELS), "tolerance": OTHER_TOLERANCE,
                          "runs": other,
                          "similarity": {k: dict(v) for k, v in similarity_elsewhere.items()}}}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def _outcome(run: Mapping[str, float]) -> Outcome:
    return Outcome(*(float(run[k]) for k in ("train_loss", "val_loss", "val_acc", "test_acc",
                                             "source_acc")))


def load_sweeps(path: Path | str = SWEEPS_FILE) -> StoredSweeps:
    """Read the file :func:`save_sweeps` wrote.

    Raises:
        ValueError: if the file's sweeps, seeds, arms, learning rates or steps are
            not those of :data:`SWEEPS` and :data:`SEEDS` (the file is stale:
            re-run ``tools/make_digits_sweeps.py``).
    """
    data = json.loads(Path(path).read_text())
    stale = "re-run tools/make_digits_sweeps.py"
    similarity = data["similarity"]
    other = data["elsewhere"]
    if (tuple(data["seeds"]) != SEEDS or set(data["sweeps"]) != set(SWEEPS)
            or similarity["lr"] != SIMILARITY_LR
            or tuple(similarity["update_ranks"]) != SIMILARITY_RANKS
            or other["env"] != OTHER_KERNELS or other["tolerance"] != OTHER_TOLERANCE):
        raise ValueError(f"{path}: its seeds, sweeps or settings are not the chapter's; {stale}")
    results: dict[str, Results] = {}
    elsewhere: dict[str, Results] = {}
    changed: dict[str, list[tuple[Arm, int, float]]] = {}
    for name, stored in data["sweeps"].items():
        spec = SWEEPS[name]
        if (stored["arms"] != [_arm_to_json(a) for a in spec.arms]
                or tuple(stored["lrs"]) != spec.lrs or stored["steps"] != spec.steps):
            raise ValueError(f"{path}: sweep {name!r} was made with other settings; {stale}")
        by_arm: Results = {(arm, seed): {} for arm in spec.arms for seed in SEEDS}
        for run in stored["runs"]:
            by_arm[spec.arms[run["arm"]], run["seed"]][run["lr"]] = _outcome(run)
        if any(list(by_lr) != list(spec.lrs) for by_lr in by_arm.values()):
            raise ValueError(f"{path}: sweep {name!r} misses runs; {stale}")
        results[name] = by_arm
        moved = {key: dict(by_lr) for key, by_lr in by_arm.items()}
        changed[name] = []
        for run in other["runs"][name]:
            arm = spec.arms[run["arm"]]
            moved[arm, run["seed"]][run["lr"]] = _outcome(run)
            changed[name].append((arm, run["seed"], run["lr"]))
        elsewhere[name] = moved
    return StoredSweeps(results, similarity["values"], elsewhere, changed, other["similarity"],
                        dict(data["about"]))


def data_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` directions of input space that hold most of the images ``x (n, 64)``.

    The top ``k`` right-singular vectors of ``x`` (not centred: the mean image is
    a direction the data fill too), as rows of a ``(k, 64)`` float64 tensor.
    """
    k = check_positive_int("k", k)
    with torch_threads(1):
        return torch.linalg.svd(x.detach().to(DTYPE), full_matrices=False).Vh[:k]


@dataclass(frozen=True)
class FirstStep:
    """What ``fc1``'s adapter did in the first AdamW step, at one rank and scaling rule.

    Attributes:
        r: the rank.
        grad_b: ``‖∂L/∂B‖_F`` of ``fc1``'s adapter at the start.
        update: ``‖ΔW‖_F``, the Frobenius size of ``fc1``'s update ``s B A`` after step 1.
        effect: ``‖ΔW X‖_F / ‖W₀ X‖_F`` over the training images ``X``: the
            update's effect on the data, relative to what the frozen weight does.
        on_data: ``‖ΔW P‖_F``, the part of the update that reads the data's top
            directions (``P`` projects onto :func:`data_directions`).
        off_data: ``‖ΔW (I - P)‖_F``, the rest (``on_data² + off_data² = update²``).
    """

    r: int
    grad_b: float
    update: float
    effect: float
    on_data: float
    off_data: float


def first_step(lab: DigitsLab, ranks: Sequence[int], *, rslora: bool, alpha: float = 8.0,
               lr: float = 1e-2, seed: int | torch.Generator = 1,
               k: int = 8) -> list[FirstStep]:
    """One AdamW step of LoRA on the hidden layers at each rank, measured on ``fc1``.

    Every rank starts from the same ``seed`` (so the same head, and ``A`` drawn
    from the same stream); ``k`` is the number of data directions for
    :attr:`FirstStep.on_data`.
    """
    x = lab.target.train.x
    basis = data_directions(x, k)  # (k, 64)
    out = []
    with torch_threads(1):
        for r in ranks:
            model = lab.adapt(Arm("lora", r=r, alpha=alpha, rslora=rslora), seed=seed)
            loss = F.cross_entropy(model(x), lab.target.train.y)
            grad_b = torch.autograd.grad(loss, model.fc1.lora_B)[0]
            finetune(model, lab.target.train, steps=1, lr=lr)
            with torch.no_grad():
                delta = model.fc1.delta_weight()  # (64, 64)
                effect = (x @ delta.T).norm() / (x @ model.fc1.base.weight.T).norm()
                on_data = delta @ basis.T @ basis
            out.append(FirstStep(r, float(grad_b.norm()), float(delta.norm()), float(effect),
                                 float(on_data.norm()), float((delta - on_data).norm())))
    return out


#: The learning rate of the runs whose updates claim 7 compares.
SIMILARITY_LR = 1e-2
#: Their ranks, 4 against 16 (one seed) and 8 against 8 (two seeds).
SIMILARITY_RANKS = (4, 8, 16)


def fc1_updates(lab: DigitsLab, seed: int, ranks: Sequence[int] = SIMILARITY_RANKS,
                lr: float = SIMILARITY_LR) -> dict[int, tuple[torch.Tensor, Outcome]]:
    """``fc1``'s learned update ``ΔW (64, 64)`` and the run's outcome, for LoRA at each rank.

    The runs are those of the ``"methods"`` sweep at ``lr`` (LoRA on the three
    hidden layers, alpha = 2r, head and adapters from :func:`adapter_seed` of
    ``seed``), so the outcomes can be checked against the stored ones.
    """
    out = {}
    for r in ranks:
        model, outcome = lab.run(Arm("lora", r=r), lr, seed=adapter_seed(seed))
        out[r] = (model.fc1.delta_weight().detach(), outcome)
    return out


def similarity_summary(updates: Mapping[int, Mapping[int, torch.Tensor]],
                       x: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Claim 7's numbers: ``[φ(1, 1), φ(4, 4)]`` for three kinds of pairs.

    Args:
        updates: ``{seed: {rank: ΔW}}`` with ranks 4, 8 and 16.
        x: the training images ``(n, 64)``, whose top directions are a reference.

    Returns:
        ``{"ranks": {"s": [...]}, "seeds": {"a-b": [...]}, "data": {"s": [...]}}``:
        rank 4 against rank 16 on one seed; rank 8 of seed ``a`` against rank 8
        of the next seed ``b`` (cyclically, in the order given); and rank 8
        against the images' own top directions (the right-singular vectors of ``x``).
    """
    seeds = list(updates)
    out: dict[str, dict[str, list[float]]] = {"ranks": {}, "seeds": {}, "data": {}}

    def pair(w1: torch.Tensor, w2: torch.Tensor) -> list[float]:
        grid = similarity_grid(w1, w2, 4, 4)
        return [float(grid[0, 0]), float(grid[3, 3])]

    for i, seed in enumerate(seeds):
        out["ranks"][str(seed)] = pair(updates[seed][4], updates[seed][16])
        other = seeds[(i + 1) % len(seeds)]
        out["seeds"][f"{seed}-{other}"] = pair(updates[seed][8], updates[other][8])
        out["data"][str(seed)] = pair(updates[seed][8], x)
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
