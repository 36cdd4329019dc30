"""Chapter 9's experiments: magnitude and direction, and DoRA against LoRA.

Chapter 9 measures the DoRA paper's statistic (the slope of the mean change of the
row lengths, Delta M, on the mean change of the row directions, Delta D) for full
fine-tuning, LoRA and DoRA on chapter 5's digits, each method at the learning rate
the validation loss picks per seed, over several draws of the task split and the
pretrained network. That is 3 draws x 5 seeds x 3 methods x 5 learning rates = 225
fine-tuning runs, too many for a chapter that must run in 25 s, so
``tools/make_dora_sweeps.py`` runs them with :func:`run_all` and stores the results
in :data:`SWEEPS_FILE`. The chapter re-runs some of them live (with its own copy of
:func:`finetune`, the code it teaches) and asserts that they agree with the file;
``tests/unit/test_dora_lab.py`` re-runs one stored run.

Everything runs in float64 on one thread.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import lora_tutorial as lt
from lora_tutorial.digits import Split, torch_threads

__all__ = ["DRAWS", "GRID", "HIDDEN", "METHODS", "SEEDS", "SWEEPS_FILE", "Draw",
           "finetune", "key", "load_sweeps", "magnitude_direction", "run_all", "run_one",
           "save_sweeps", "setup", "weight"]

#: (task split seed of ``load_digit_tasks``, seed of the pretrained ``DigitsMLP``).
DRAWS: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (2, 3))
#: Seeds of the adapter's start and the batches, per draw.
SEEDS: tuple[int, ...] = tuple(range(5))
#: The three methods compared.
METHODS: tuple[str, ...] = ("FT", "LoRA", "DoRA")
#: The learning rates every method is tuned over (per seed, on validation loss).
GRID: tuple[float, ...] = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: The layers whose magnitude and direction are measured.
HIDDEN: tuple[str, ...] = ("fc1", "fc2", "fc3")
#: Where ``tools/make_dora_sweeps.py`` writes the results.
SWEEPS_FILE = Path(__file__).resolve().parent / "data" / "dora_sweeps.json"

STEPS, EVERY, BATCH, RANK, ALPHA = 120, 20, 64, 4, 8.0


def _as64(split: Split) -> Split:
    return Split(split.x.double(), split.y)


class Draw:
    """One draw: the task split, and the network pretrained on its digits 0-4."""

    def __init__(self, task_seed: int, base_seed: int) -> None:
        with _float64():
            source, target = lt.load_digit_tasks(task_seed)
            self.source = source
            base = lt.DigitsMLP(seed=base_seed)
            lt.pretrain_digits(base, _as64(source.train), steps=200)
        self.base = base.requires_grad_(False).eval()
        self.train, self.val, self.test = (_as64(s) for s in
                                           (target.train, target.val, target.test))


class _float64:
    def __enter__(self) -> None:
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.before)


def setup(draw: int) -> Draw:
    """The draw of index ``draw`` in :data:`DRAWS`."""
    return Draw(*DRAWS[draw])


def weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a layer computes with: ``W0 + delta`` for an adapter."""
    if isinstance(module, lt.LoRALinear):
        return (module.base.weight + module.delta_weight()).detach()
    return module.weight.detach()


def magnitude_direction(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """The paper's (Delta M, Delta D) of ``w`` against ``w0``, over the rows."""
    d_m = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean()
    d_d = (1 - F.cosine_similarity(w, w0, dim=1)).mean()
    return d_m.item(), d_d.item()


def finetune(base: lt.DigitsMLP, data: Split, method: str, seed: int, lr: float,
             steps: int = STEPS, every: int = EVERY, batch: int = BATCH):
    """Chapter 9's run: ``(model, points)``, points of rows (Delta M, Delta D)."""
    with _float64():
        model = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        if method == "FT":
            model.requires_grad_(True)
        else:
            lt.add_lora(model, list(HIDDEN) + ["head"], r=RANK, alpha=ALPHA,
                        use_dora=method == "DoRA", seed=g)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        points = []
        model.train()
        with torch_threads(1):
            for step in range(1, steps + 1):
                rows = torch.randint(0, len(data.y), (batch,), generator=g)
                loss = F.cross_entropy(model(data.x[rows]), data.y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if every and step % every == 0:
                    points += [magnitude_direction(weight(base.get_submodule(n)),
                                                   weight(model.get_submodule(n)))
                               for n in HIDDEN]
    return model.eval(), np.array(points)


def run_one(draw: Draw, method: str, seed: int, lr: float) -> dict[str, object]:
    """One run's stored record: slope and line of the fit, losses, accuracy."""
    model, points = finetune(draw.base, draw.train, method, seed, lr)
    fit = np.polyfit(points[:, 1], points[:, 0], 1)
    with torch.no_grad():
        val = F.cross_entropy(model(draw.val.x), draw.val.y).item()
        test = F.cross_entropy(model(draw.test.x), draw.test.y).item()
    return {"slope": float(fit[0]), "intercept": float(fit[1]),
            "dd_range": [float(points[:, 1].min()), float(points[:, 1].max())],
            "val_loss": val, "test_loss": test,
            "test_acc": lt.digits.accuracy(model, draw.test.x, draw.test.y)}


def key(draw: int, method: str, seed: int, lr: float) -> str:
    """The key of one run in the stored file."""
    return f"{draw}/{method}/{seed}/{lr:g}"


def _all_runs() -> Iterator[tuple[int, str, int, float]]:
    for d in range(len(DRAWS)):
        for method in METHODS:
            for seed in SEEDS:
                for lr in GRID:
                    yield d, method, seed, lr


def run_all(progress: Callable[[str], None] = print) -> dict[str, dict]:
    """Every run of every draw, keyed by :func:`key`."""
    runs = {}
    draws = {}
    for d, method, seed, lr in _all_runs():
        if d not in draws:
            draws[d] = setup(d)
            progress(f"draw {d}: task {DRAWS[d][0]}, pretrained seed {DRAWS[d][1]}")
        runs[key(d, method, seed, lr)] = run_one(draws[d], method, seed, lr)
    return runs


def save_sweeps(runs: dict[str, dict], about: dict[str, object],
                path: Path | str = SWEEPS_FILE) -> None:
    """Write the runs, with the settings they were made with."""
    settings = {"draws": [list(d) for d in DRAWS], "seeds": list(SEEDS),
                "methods": list(METHODS), "grid": list(GRID), "steps": STEPS,
                "every": EVERY, "batch": BATCH, "rank": RANK, "alpha": ALPHA}
    Path(path).write_text(json.dumps({"about": about, "settings": settings,
                                      "runs": runs}, indent=1) + "\n")


def load_sweeps(path: Path | str = SWEEPS_FILE) -> dict[str, dict]:
    """The stored runs, keyed by :func:`key`; refuses a file of other settings."""
    data = json.loads(Path(path).read_text())
    settings = data["settings"]
    expected = {"draws": [list(d) for d in DRAWS], "seeds": list(SEEDS),
                "methods": list(METHODS), "grid": list(GRID), "steps": STEPS,
                "every": EVERY, "batch": BATCH, "rank": RANK, "alpha": ALPHA}
    if settings != expected:
        raise ValueError(f"{path} was made with other settings: {settings} "
                         f"(expected {expected}); re-run tools/make_dora_sweeps.py")
    return data["runs"]
