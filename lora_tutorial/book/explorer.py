"""The rank/alpha lab and explorer: retrain chapter 3's adapter for any rank, alpha and seed.

Four pieces:

* :class:`RankAlphaLab` retrains the adapter of chapter 3's pretrained
  ``TinyAdapter`` head for any rank, alpha, scaling rule and seed of the
  adapter's initial ``A``, on the cached statistics of the frozen features,
  in float64, many adapters of one rank at once, and caches every result;
* :class:`RankAlphaSweep` holds the losses of a grid of such runs over seeds
  and training lengths, and reads and writes the results file the book ships
  (``tools/make_rank_alpha_sweep.py`` writes it, chapter 4 reads it and checks
  part of it live);
* :class:`ExplorerFigure` draws one result in one figure, in the book's style
  and for its column: the training curve, the final loss beside the best any
  rank-``r`` update can reach, and the singular values of the learned update
  beside those of the task's change;
* :func:`rank_alpha_explorer` (live, in JupyterLab: every move retrains and
  redraws) and :func:`static_rank_alpha_explorer` (for the static book: a grid
  of results precomputed when the notebook runs, each stored as what it adds
  to a shared background, switched by sliders linked to them in the browser,
  with no kernel).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from PIL import Image as PILImage

from .._checks import check_bool, check_positive_finite, check_positive_int, check_probability
from ..analysis import singular_values
from ..frozen_features import FeatureStats, best_low_rank_update
from ..layers import LoRALinear
from ..pretraining import pretrained_tiny_adapter
from .style import BOOK_STYLE, COLUMN_PX, COLUMN_WIDTH, DPI, PALETTE, series

__all__ = [
    "ALPHA_RANGE",
    "fit_adapters_on_stats",
    "SWEEP_PATH",
    "ExplorerFigure",
    "ExplorerResult",
    "RankAlphaExplorer",
    "RankAlphaLab",
    "RankAlphaSweep",
    "rank_alpha_explorer",
    "shipped_rank_alpha_sweep",
    "static_rank_alpha_explorer",
]

#: The range of the alpha slider (2**-2 to 2**8, on a log scale).
ALPHA_RANGE = (2.0**-2, 2.0**8)
SCALINGS = {"α/r": False, "α/√r": True}
#: The results file of chapter 4's sweep (``tools/make_rank_alpha_sweep.py`` writes it):
#: ``book/data/rank_alpha_sweep.json`` in the package.
#:
#: :meta hide-value:
SWEEP_PATH = Path(__file__).parent / "data" / "rank_alpha_sweep.json"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the setting.

    A 600-step fit on a 256 → 16 head is hundreds of tiny operations; a
    second thread only adds hand-offs between them (and, on a busy
    machine, waits for a free core at every one of them).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def fit_adapters_on_stats(
    stats: FeatureStats,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor,
    scaling: torch.Tensor,
    *,
    steps: int,
    lr: float,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train ``n`` rank-``r`` adapters of one frozen head at once, gradients by formula.

    The loss, the optimizer and the result are those of
    :func:`~lora_tutorial.frozen_features.fit_lora_on_stats` on each adapter
    alone (the full-batch MSE on the frozen features plus dropout's expected
    penalty, ``torch.optim.AdamW`` with PyTorch's defaults on ``lora_A``,
    ``lora_B`` and the bias), up to rounding; ``tests/unit/test_explorer.py``
    checks it. Two things make it faster: the gradient is written out instead
    of taken by autograd, ``∂L/∂W = 2 (W G + b h̄ᵀ - Cᵀ) / k`` for the head
    ``W = W0 + s B A``, and ``W G`` is computed as ``W0 G + s B (A G)``, which
    costs ``r d²`` instead of ``k d²`` per adapter and step.

    Args:
        stats: statistics of the frozen features ``(d)`` and targets ``(k)``.
        weight: the frozen base weight ``W0``, ``(k, d)``.
        lora_a: the adapters' initial ``A``, ``(n, r, d)``.
        lora_b: their initial ``B``, ``(n, k, r)``.
        bias: their initial bias, ``(n, k)``.
        scaling: each adapter's scale ``s`` (``alpha / r`` or
            ``alpha / sqrt(r)``), ``(n,)``.
        steps, lr: the number of AdamW steps and the learning rate.
        dropout: the dropout rate on the adapter's input (its expected penalty
            is added to the loss trained on).

    Returns:
        The trained ``A`` ``(n, r, d)``, ``B`` ``(n, k, r)`` and bias ``(n, k)``,
        and the history ``(steps + 1, n)``: each adapter's training MSE in
        evaluation mode (no dropout penalty) after 0, 1, ..., ``steps`` steps.

    Raises:
        FloatingPointError: if a loss stops being finite.
    """
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    p = check_probability("dropout", dropout)
    if not (isinstance(lora_a, torch.Tensor) and lora_a.dim() == 3):
        raise ValueError(f"lora_a must be a 3-D tensor (n, r, d), got {getattr(lora_a, 'shape', lora_a)!r}")
    k, d = stats.d_out, stats.d_in
    n, r = lora_a.shape[0], lora_a.shape[1]
    shapes = {"weight": (weight, (k, d)), "lora_a": (lora_a, (n, r, d)),
              "lora_b": (lora_b, (n, k, r)), "bias": (bias, (n, k)), "scaling": (scaling, (n,))}
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    like = {"dtype": lora_a.dtype}
    gram, mean_h, mean_y = (t.to(**like) for t in (stats.gram, stats.mean_h, stats.mean_y))
    cross_t = stats.cross.T.to(**like)  # Cᵀ, (k, d)
    w0 = weight.detach().to(**like)
    base_w = w0 @ gram - cross_t  # W0 G - Cᵀ, (k, d)
    base_b = w0 @ mean_h - mean_y  # W0 h̄ - ȳ, (k,)
    ridge = (2 * p / (1 - p) / k) * torch.diagonal(gram)  # dropout: 2 p/(1-p)/k E[h_i²]
    a, b, c = (t.detach().to(**like).clone().contiguous() for t in (lora_a, lora_b, bias))
    s = scaling.detach().to(**like)[:, None, None]
    # AdamW as fit_lora_on_stats runs it. The gradients set below must be
    # contiguous: fused AdamW (torch 2.13, CPU) silently misreads a strided one.
    optimizer = torch.optim.AdamW([a, b, c], lr=lr, fused=True)
    history = torch.empty(steps + 1, n, **like)
    for step in range(steps + 1):
        sb = s * b  # (n, k, r)
        delta = sb @ a  # ΔW = s B A, (n, k, d)
        w = w0 + delta  # the heads
        # R_W = W G + b h̄ᵀ - Cᵀ and R_b = W h̄ + b - ȳ: k/2 times the MSE's gradient
        r_w = base_w + sb @ (a @ gram) + c[:, :, None] * mean_h
        r_b = base_b + (sb @ (a @ mean_h)[:, :, None])[..., 0] + c
        # k MSE = E|y|² + tr(W G Wᵀ) + 2 bᵀW h̄ + |b|² - 2 tr(W C) - 2 bᵀȳ
        history[step] = (stats.y_sq + (w * (r_w - cross_t)).sum((1, 2))
                         + (c * (r_b - mean_y)).sum(1)) / k
        if step == steps:
            break
        grad_w = (2 / k) * r_w + ridge * delta  # dropout's penalty acts on ΔW
        a.grad = sb.transpose(1, 2) @ grad_w
        b.grad = s * (grad_w @ a.transpose(1, 2))
        c.grad = (2 / k) * r_b
        optimizer.step()
    if not bool(torch.isfinite(history).all()):
        bad = sorted(set(torch.nonzero(~torch.isfinite(history))[:, 1].tolist()))
        raise FloatingPointError(
            f"training diverged (lr={lr}) for adapters {bad}: the loss stopped being finite; "
            "lower lr or alpha")
    return a, b, c, history


def _as_settings(settings: Iterable[tuple[int, float, bool]]) -> list[tuple[int, float, bool]]:
    out = []
    for setting in settings:
        if not (isinstance(setting, tuple) and len(setting) == 3):
            raise ValueError(f"settings must hold (rank, alpha, rslora) tuples, got {setting!r}")
        rank, alpha, rslora = setting
        out.append((check_positive_int("rank", rank), check_positive_finite("alpha", alpha),
                    check_bool("rslora", rslora)))
    return out


def _as_seeds(seeds: Iterable[int]) -> list[int]:
    out = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seeds must be non-negative ints, got {seed!r}")
        out.append(int(seed))
    if not out:
        raise ValueError("seeds must hold at least one seed, got none")
    return out


@dataclass(frozen=True)
class ExplorerResult:
    """One retraining of the adapter.

    Attributes:
        rank, alpha, rslora: the settings.
        seed: the seed of the adapter's initial ``A``.
        steps: ``0, 1, ..., lab.steps``.
        history: the training loss in evaluation mode after each number of steps.
        final_loss: the training loss of the result in evaluation mode (``history[-1]``).
        best_loss: the lowest training loss any rank-``rank`` update can reach.
        learned_sv: singular values of the learned update ``ΔW`` (``rank`` of them).
    """

    rank: int
    alpha: float
    rslora: bool
    seed: int
    steps: np.ndarray
    history: np.ndarray
    final_loss: float
    best_loss: float
    learned_sv: np.ndarray

    @property
    def scaling(self) -> float:
        """The factor multiplying ``B @ A``."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def loss_after(self, steps: int) -> float:
        """The training loss after ``steps`` steps (0 to ``lab.steps``)."""
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not (
                0 <= steps < len(self.history)):
            raise ValueError(f"steps must be an int from 0 to {len(self.history) - 1}, got {steps!r}")
        return float(self.history[steps])


@dataclass
class RankAlphaLab:
    """Retrains chapter 3's rank-``r`` adapter on cached frozen-feature statistics.

    Args:
        stats: statistics of the frozen features and the new task's targets.
        base: the head's frozen base layer (``W0``, ``b``); the lab computes in its dtype.
        true_delta: the teacher's change of the head, ``(d_out, d_hidden)``.
        steps, lr: the fine-tuning schedule (chapter 3's: 600 AdamW steps at 5e-3).
        dropout, init, init_scale: the adapter's settings (chapter 3's).
        seed: the seed of ``lora_A``'s initial draw when a run names none.
        max_rank: the largest rank offered.
    """

    stats: FeatureStats
    base: torch.nn.Linear
    true_delta: torch.Tensor
    steps: int = 600
    lr: float = 5e-3
    dropout: float = 0.1
    init: str = "normal"
    init_scale: float = 1e-4
    seed: int = 0
    max_rank: int = 16
    _cache: dict = field(default_factory=dict, repr=False)
    _runs: dict = field(default_factory=dict, repr=False)
    _best: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_checkpoint(cls, dtype: torch.dtype = torch.float64, **kwargs) -> "RankAlphaLab":
        """The lab for chapter 3's pretrained model (the shipped checkpoint).

        ``dtype`` is the precision of every computation (float64 by default, so
        that what the book prints does not depend on the machine's kernels);
        the data are drawn in float32, as the source draws them, then cast.
        """
        task, model = pretrained_tiny_adapter(dtype=dtype)
        with torch.no_grad():
            features = model.features(task.x_train)
        return cls(
            stats=FeatureStats.from_data(features, task.y_new_train),
            base=copy.deepcopy(model.head.base),
            true_delta=task.true_delta_weight,
            **kwargs,
        )

    def best_loss(self, rank: int) -> float:
        """The lowest training loss any rank-``rank`` change of the head (and its bias) can reach."""
        if rank not in self._best:
            fit = best_low_rank_update(self.stats, self.base.weight, self.base.bias, rank)
            self._best[rank] = fit.loss
        return self._best[rank]

    @property
    def true_sv(self) -> np.ndarray:
        """Singular values of the teacher's change ``W_new2 - W_old2``."""
        return singular_values(self.true_delta).numpy()

    @property
    def full_rank_sv(self) -> np.ndarray:
        """Singular values of the best unrestricted change of the head on these features."""
        if "full_sv" not in self._best:
            fit = best_low_rank_update(self.stats, self.base.weight, self.base.bias, self.stats.d_out)
            self._best["full_sv"] = singular_values(fit.delta_weight).numpy()
        return self._best["full_sv"]

    def run(self, rank: int, alpha: float, rslora: bool = False, seed: int | None = None) -> ExplorerResult:
        """Retrain the adapter with these settings (or return the cached result).

        ``seed`` seeds the adapter's initial ``A`` (``None``: the lab's seed).
        Training depends on alpha and the rule only through the scale ``s``
        (``alpha / r`` or ``alpha / sqrt(r)``): settings with the same rank,
        seed and ``s`` (rank 1 under both rules, or rank 16 with ``α/√r = 16``
        and ``α/r = 64``) share one run.
        """
        seeds = None if seed is None else [seed]
        return self.run_many([(rank, alpha, rslora)], seeds)[0]

    def run_many(self, settings: Iterable[tuple[int, float, bool]],
                 seeds: Iterable[int] | None = None) -> list[ExplorerResult]:
        """Retrain the adapter for every ``(rank, alpha, rslora)`` setting and seed.

        The runs a setting and seed need that are not cached yet are trained
        together, one batch per rank and seed (:func:`fit_adapters_on_stats`).

        Returns:
            The results, setting by setting, and for each setting seed by seed.
        """
        settings = _as_settings(settings)
        seeds = [self.seed] if seeds is None else _as_seeds(seeds)
        for rank, _, _ in settings:
            if rank > self.max_rank:
                raise ValueError(f"rank must be at most max_rank={self.max_rank}, got {rank}")
        keys = [(rank, alpha, rslora, seed) for rank, alpha, rslora in settings for seed in seeds]
        missing: dict[tuple[int, int], dict[float, None]] = {}
        for rank, alpha, rslora, seed in keys:
            scale = self._scaling(rank, alpha, rslora)
            if (rank, scale, seed) not in self._runs:
                missing.setdefault((rank, seed), {})[scale] = None
        for (rank, seed), scales in missing.items():
            self._train(rank, seed, list(scales))
        for key in keys:
            if key not in self._cache:
                rank, alpha, rslora, seed = key
                history, sv = self._runs[rank, self._scaling(rank, alpha, rslora), seed]
                self._cache[key] = ExplorerResult(
                    rank=rank, alpha=alpha, rslora=rslora, seed=seed,
                    steps=np.arange(self.steps + 1), history=history,
                    final_loss=float(history[-1]), best_loss=self.best_loss(rank),
                    learned_sv=sv,
                )
        return [self._cache[key] for key in keys]

    def sweep(self, ranks: Sequence[int], alphas: Sequence[float], seeds: Sequence[int],
              budgets: Sequence[int]) -> "RankAlphaSweep":
        """The loss after each budget of steps, for every rank, alpha, rule and seed."""
        ranks, alphas, seeds = list(ranks), list(alphas), _as_seeds(seeds)
        budgets = list(budgets)
        for budget in budgets:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not (
                    0 < budget <= self.steps):
                raise ValueError(f"budgets must be ints from 1 to steps={self.steps}, got {budget!r}")
        loss = np.empty((len(SCALINGS), len(ranks), len(alphas), len(seeds), len(budgets)))
        for i, rslora in enumerate(SCALINGS.values()):
            for j, rank in enumerate(ranks):
                results = self.run_many([(rank, alpha, rslora) for alpha in alphas], seeds)
                for n, result in enumerate(results):
                    loss[i, j, n // len(seeds), n % len(seeds)] = result.history[budgets]
        return RankAlphaSweep(ranks=tuple(int(r) for r in ranks), alphas=tuple(float(a) for a in alphas),
                              seeds=tuple(seeds), budgets=tuple(int(t) for t in budgets),
                              loss=loss, settings=self.settings)

    @property
    def n_runs(self) -> int:
        """How many distinct runs the lab has trained so far."""
        return len(self._runs)

    @property
    def settings(self) -> dict:
        """The training settings every run shares (what a sweep's file records)."""
        return {"steps": self.steps, "lr": self.lr, "dropout": self.dropout, "init": self.init,
                "init_scale": self.init_scale, "dtype": str(self.base.weight.dtype)}

    def _layer(self, rank: int, alpha: float, rslora: bool, seed: int) -> LoRALinear:
        """The fresh adapter of these settings, ``A`` drawn as the library draws it."""
        return LoRALinear.from_linear(
            copy.deepcopy(self.base), r=rank, alpha=alpha, dropout=self.dropout, init=self.init,
            init_scale=self.init_scale, rslora=rslora, seed=seed)

    def _scaling(self, rank: int, alpha: float, rslora: bool) -> float:
        key = ("scaling", rank, alpha, rslora)
        if key not in self._best:  # LoRALinear's own formula, to the last bit
            self._best[key] = self._layer(rank, alpha, rslora, 0).scaling
        return self._best[key]

    def _train(self, rank: int, seed: int, scales: list[float]) -> None:
        """Train one adapter per scale from the same initial ``A``, together."""
        layer = self._layer(rank, 1.0, False, seed)
        n = len(scales)
        with one_thread():
            a, b, _, history = fit_adapters_on_stats(
                self.stats, layer.base.weight,
                layer.lora_A.detach().expand(n, -1, -1), layer.lora_B.detach().expand(n, -1, -1),
                layer.base.bias.detach().expand(n, -1),
                torch.tensor(scales, dtype=layer.lora_A.dtype),
                steps=self.steps, lr=self.lr, dropout=self.dropout)
            sv = torch.linalg.svdvals(torch.tensor(scales, dtype=a.dtype)[:, None, None] * (b @ a))
        for i, scale in enumerate(scales):
            self._runs[rank, scale, seed] = (history[:, i].numpy().copy(), sv[i, :rank].numpy().copy())


@dataclass(frozen=True)
class RankAlphaSweep:
    """The losses of a grid of runs: every rule, rank, alpha and seed, after each budget.

    Attributes:
        ranks, alphas, seeds: the grid.
        budgets: the numbers of steps after which each run's loss was recorded.
        loss: the training loss (MSE, evaluation mode), an array of shape
            ``(2, len(ranks), len(alphas), len(seeds), len(budgets))``; the
            first axis is the rule, ``α/r`` then ``α/√r``.
        settings: the lab's training settings (:attr:`RankAlphaLab.settings`).
    """

    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    budgets: tuple[int, ...]
    loss: np.ndarray
    settings: dict

    def table(self, rule: str, budget: int) -> np.ndarray:
        """The losses of one rule after one budget: ``(len(ranks), len(alphas), len(seeds))``."""
        if rule not in SCALINGS:
            raise ValueError(f"rule must be one of {list(SCALINGS)}, got {rule!r}")
        if budget not in self.budgets:
            raise ValueError(f"budget must be one of {list(self.budgets)}, got {budget!r}")
        return self.loss[list(SCALINGS).index(rule), :, :, :, self.budgets.index(budget)]

    def max_difference(self, other: "RankAlphaSweep") -> np.ndarray:
        """The largest absolute difference from ``other``, budget by budget.

        ``other`` (typically a live re-run of part of the grid) must have the
        same settings and budgets, and ranks, alphas and seeds that this sweep
        holds; the comparison covers the runs ``other`` holds.

        Returns:
            One number per budget, shape ``(len(budgets),)``.
        """
        if (other.settings, other.budgets) != (self.settings, self.budgets):
            raise ValueError("other must share this sweep's settings and budgets")
        for name in ("ranks", "alphas", "seeds"):
            if not set(getattr(other, name)) <= set(getattr(self, name)):
                raise ValueError(f"other's {name} {getattr(other, name)} must be among this "
                                 f"sweep's {getattr(self, name)}")
        mine = self.loss[:, [self.ranks.index(r) for r in other.ranks]]
        mine = mine[:, :, [self.alphas.index(a) for a in other.alphas]]
        mine = mine[:, :, :, [self.seeds.index(s) for s in other.seeds]]
        return np.abs(mine - other.loss).max(axis=(0, 1, 2, 3))

    def to_json(self) -> str:
        """The sweep as JSON (every loss with all its digits)."""
        return json.dumps({"settings": self.settings, "ranks": self.ranks, "alphas": self.alphas,
                           "seeds": self.seeds, "budgets": self.budgets, "rules": list(SCALINGS),
                           "loss": self.loss.tolist()}, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "RankAlphaSweep":
        """Read what :meth:`to_json` wrote."""
        data = json.loads(text)
        if data.get("rules") != list(SCALINGS):
            raise ValueError(f"the sweep's rules must be {list(SCALINGS)}, got {data.get('rules')!r}")
        sweep = cls(ranks=tuple(data["ranks"]), alphas=tuple(float(a) for a in data["alphas"]),
                    seeds=tuple(data["seeds"]), budgets=tuple(data["budgets"]),
                    loss=np.array(data["loss"], dtype=np.float64), settings=data["settings"])
        shape = (len(SCALINGS), len(sweep.ranks), len(sweep.alphas), len(sweep.seeds), len(sweep.budgets))
        if sweep.loss.shape != shape:
            raise ValueError(f"the sweep's losses must have shape {shape}, got {sweep.loss.shape}")
        return sweep


def shipped_rank_alpha_sweep() -> RankAlphaSweep:
    """The sweep chapter 4 reports: :data:`SWEEP_PATH`, written by ``tools/make_rank_alpha_sweep.py``."""
    return RankAlphaSweep.from_json(SWEEP_PATH.read_text(encoding="utf-8"))


class ExplorerFigure:
    """One figure, three panels, in the book's style, redrawn in place for each :class:`ExplorerResult`.

    It is drawn for the book's column (:data:`~lora_tutorial.book.style.COLUMN_PX`
    = 672 px wide, the size it is shown at) with the book's fonts, colours and
    line styles: the training curve across the column, and below it, side by
    side, the final loss against the best each rank can reach and the singular
    values of the learned update. ``scale`` is how many image pixels it stores
    per pixel of the page: 2 (the static book's) stays sharp on high-resolution
    screens; the live explorer draws at 1.5, which is sharp enough and quicker.

    The axes, their limits and everything that does not depend on the result
    are drawn once; a new result redraws only its own lines and title on top of
    that background (blitting), which keeps a redraw to a few milliseconds.
    Losses outside the fixed axis range are clipped to its edge, so extreme
    settings still give a readable figure.
    """

    #: The fixed y-range of the training-curve panel (log scale).
    LOSS_RANGE = (0.6, 4.0)
    #: Heights of the two rows of panels, in inches (100 px each), and of the title.
    HEIGHTS = (2.45, 2.45)
    TITLE_HEIGHT = 0.35

    def __init__(self, lab: RankAlphaLab, scale: float = 2.0) -> None:
        self.lab = lab
        self.scale = scale
        self.dpi = DPI * scale
        self.width_px = round(COLUMN_WIDTH * DPI)  # as shown on the page
        self._style = {**BOOK_STYLE, "figure.dpi": self.dpi, "savefig.dpi": self.dpi}
        with mpl.rc_context(self._style):
            self.figure = Figure(figsize=(COLUMN_WIDTH, sum(self.HEIGHTS) + self.TITLE_HEIGHT), dpi=self.dpi,
                                 layout="constrained")
            self.canvas = FigureCanvasAgg(self.figure)
            axes = self.figure.subplot_mosaic([["curve", "curve"], ["best", "sv"]], height_ratios=self.HEIGHTS)
            self.ax_curve, self.ax_best, self.ax_sv = axes["curve"], axes["best"], axes["sv"]
            self._draw_background()
            self.title = self.figure.suptitle("rank 16, α = 0.25, scaling α/√r = 0.0625", x=0.01, ha="left",
                                              animated=True)
            self.canvas.draw()  # lay out once, then freeze the layout and keep the background
            self.figure.set_layout_engine("none")
            self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._animated = [self.curve, self.best_line, self.final_marker, self.sv_markers, self.title,
                          self.curve_title]

    def _draw_background(self) -> None:
        lab = self.lab
        ranks = np.arange(1, lab.max_rank + 1)
        best = np.array([lab.best_loss(int(r)) for r in ranks])
        green = PALETTE[2]

        ax = self.ax_curve
        (self.curve,) = ax.plot([], [], label="this adapter's training loss (eval mode)", animated=True,
                                **series(0))
        self.best_line = ax.axhline(best[0], color=green, ls="--", lw=1.5, animated=True,
                                    label="the best any update of this rank can reach")
        ax.set_yscale("log")
        ax.set_ylim(*self.LOSS_RANGE)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0])
        ax.set_xlim(0, lab.steps)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (MSE, log)")
        self.curve_title = ax.set_title("Training curve: final loss 0.000, the best possible 0.000",
                                        animated=True)
        ax.legend(handles=[self.curve, self.best_line], loc="upper right")

        ax = self.ax_best
        ax.plot(ranks, best, color=green, ls="--", marker="o", ms=3.5, lw=1.5, label="best at each rank")
        (self.final_marker,) = ax.plot([], [], "*", color=PALETTE[1], ms=15, mec="white", mew=0.8,
                                       label="this adapter", animated=True)
        ax.set_ylim(best.min() * 0.92, max(best.max() * 1.15, 2.0))
        ax.set_xlim(0.5, lab.max_rank + 0.5)
        ax.set_xticks([1, 4, 8, 12, 16])
        ax.set_xlabel("rank r")
        ax.set_ylabel("final training loss")
        ax.set_title("Final loss, and the best by rank")
        ax.legend(handles=[ax.lines[0], self.final_marker], loc="upper right", handletextpad=0.4)

        ax = self.ax_sv
        k = len(lab.true_sv)
        index = np.arange(1, k + 1)
        ax.plot(index, lab.true_sv, color="black", ls="--", lw=1.2, label="teacher's change")
        ax.plot(index, lab.full_rank_sv, color=green, ls=":", lw=2.0, label="best full-rank change")
        (self.sv_markers,) = ax.plot([], [], "o", color=PALETTE[1], ms=5, label="learned ΔW", animated=True)
        self.sv_top = 1.5 * max(lab.true_sv.max(), lab.full_rank_sv.max())  # room for the legend
        ax.set_ylim(0, self.sv_top)
        ax.set_xlim(0.5, k + 0.5)
        ax.set_xticks([1, 4, 8, 12, 16])
        ax.set_xlabel("index (largest first)")
        ax.set_ylabel("singular value")
        ax.set_title("Singular values of ΔW")
        ax.legend(handles=[ax.lines[0], ax.lines[1], self.sv_markers], loc="upper right", handletextpad=0.4)

    def show(self, result: ExplorerResult) -> Figure:
        """Redraw the figure for ``result``; returns the figure."""
        low, high = self.LOSS_RANGE
        self.curve.set_data(result.steps, np.clip(result.history, low, high))
        self.best_line.set_ydata([result.best_loss, result.best_loss])
        bottom, top = self.ax_best.get_ylim()
        self.final_marker.set_data([result.rank], [np.clip(result.final_loss, bottom, top)])
        self.sv_markers.set_data(np.arange(1, result.rank + 1), np.clip(result.learned_sv, 0, self.sv_top))
        rule = "α/√r" if result.rslora else "α/r"
        self.title.set_text(f"rank {result.rank}, α = {result.alpha:g}, scaling {rule} = {result.scaling:.3g}")
        self.curve_title.set_text(f"Training curve: final loss {result.final_loss:.3f}, "
                                  f"the best possible {result.best_loss:.3f}")
        self.canvas.restore_region(self.background)
        with mpl.rc_context(self._style):
            for artist in self._animated:
                self.figure.draw_artist(artist)
        return self.figure

    def describe(self) -> str:
        """What the figure shows whatever the setting, in words (the alt text of its background)."""
        lab = self.lab
        return (f"Three panels. Top: the adapter's training loss over {lab.steps} steps on a log scale, with a "
                "dashed green line at the lowest loss any update of its rank can reach. Bottom left: that "
                f"lowest loss for each rank from 1 to {lab.max_rank} (green, falling from "
                f"{lab.best_loss(1):.2f} to {lab.best_loss(lab.max_rank):.2f}) and the adapter's final loss "
                "as a star at its rank. Bottom right: the singular values of the teacher's change (black, "
                "dashed), of the best full-rank change (green, dotted) and of the learned update (dots).")

    @staticmethod
    def describe_result(result: ExplorerResult) -> str:
        """What the figure shows for ``result``, in words (the alt text of its image)."""
        rule = "α/√r" if result.rslora else "α/r"
        sv = result.learned_sv
        values = (f"one singular value is {sv[0]:.2f}" if len(sv) == 1 else
                  f"{len(sv)} singular values run from {sv[0]:.2f} down to {sv[-1]:.2f}")
        return (f"Rank {result.rank}, α = {result.alpha:g}, scaling {rule} = {result.scaling:.3g}: the training "
                f"loss goes from {result.history[0]:.2f} at step 0 to {result.final_loss:.3f} after "
                f"{len(result.history) - 1} steps, against the best possible {result.best_loss:.3f}; the "
                f"learned update's {values}.")

    def _pixels(self) -> np.ndarray:
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()

    @staticmethod
    def _encode(image: PILImage.Image, colors: int) -> bytes:
        # Fast octree quantisation: a few milliseconds where median cut takes tens.
        image = image.quantize(colors=colors, method=PILImage.Quantize.FASTOCTREE)
        buffer = io.BytesIO()
        image.save(buffer, format="png", optimize=False)
        return buffer.getvalue()

    def png(self, result: ExplorerResult, colors: int = 64) -> bytes:
        """The figure for ``result`` as a palette PNG (``colors`` colours) in bytes."""
        self.show(result)
        return self._encode(PILImage.fromarray(self._pixels()), colors)

    def background_png(self, colors: int = 64) -> bytes:
        """What every result's figure shares (axes, labels, the curves that do not move) as a PNG."""
        self.canvas.restore_region(self.background)
        return self._encode(PILImage.fromarray(self._pixels()), colors)

    def overlay_png(self, result: ExplorerResult, colors: int = 64) -> bytes:
        """Only what ``result`` adds to :meth:`background_png`, transparent elsewhere, as a PNG.

        Laid exactly over the background image, it shows the figure :meth:`png`
        draws: every pixel that differs from the background is stored, opaque,
        and every other one is transparent. The static explorer stores one
        background and 60 of these, which are a fifth of the size of whole figures.
        """
        self.canvas.restore_region(self.background)
        background = self._pixels()
        self.show(result)
        pixels = self._pixels()
        changed = (pixels != background).any(axis=2)
        rgba = np.zeros(pixels.shape[:2] + (4,), dtype=np.uint8)
        rgba[changed, :3] = pixels[changed]
        rgba[changed, 3] = 255
        return self._encode(PILImage.fromarray(rgba, "RGBA"), colors)


class RankAlphaExplorer:
    """Live sliders for rank and alpha and a scaling toggle; each move retrains and redraws.

    Display it in a notebook (it shows its ``widget``). :meth:`update` is what
    a slider move calls; it returns the seconds the move took.
    """

    #: How many image pixels its figure stores per page pixel (sharp, and quick to draw).
    SCALE = 1.5

    def __init__(self, lab: RankAlphaLab | None = None, rank: int = 8, alpha: float = 16.0) -> None:
        import ipywidgets as w

        self.lab = lab or RankAlphaLab.from_checkpoint()
        self.drawing = ExplorerFigure(self.lab, scale=self.SCALE)
        self._png: dict[tuple[int, float, bool], bytes] = {}
        self.rank = w.IntSlider(value=rank, min=1, max=self.lab.max_rank, description="rank r", continuous_update=False)
        self.alpha = w.FloatLogSlider(
            value=alpha, base=2, min=math.log2(ALPHA_RANGE[0]), max=math.log2(ALPHA_RANGE[1]), step=0.5,
            description="alpha α", continuous_update=False, readout_format=".3g",
        )
        self.scaling = w.ToggleButtons(options=list(SCALINGS), value="α/r", description="scaling")
        self.image = w.Image(format="png", layout=w.Layout(width="100%", max_width=f"{COLUMN_PX}px", height="auto"))
        self.status = w.HTML()
        for control in (self.rank, self.alpha, self.scaling):
            control.observe(self._on_change, names="value")
        self.widget = w.VBox([w.HBox([self.rank, self.alpha]), self.scaling, self.image, self.status])
        self.update(rank, alpha, False)

    def _on_change(self, _change: object) -> None:
        self.update(self.rank.value, self.alpha.value, SCALINGS[self.scaling.value])

    def update(self, rank: int, alpha: float, rslora: bool) -> float:
        """Retrain (or fetch from the cache) and redraw; returns the seconds it took."""
        start = time.perf_counter()
        key = (int(rank), float(alpha), bool(rslora))
        result = self.lab.run(*key)
        if key not in self._png:
            self._png[key] = self.drawing.png(result)
        self.image.value = self._png[key]
        self.status.value = (
            f"final training loss <b>{result.final_loss:.3f}</b>; the best any rank-{result.rank} update "
            f"can reach is <b>{result.best_loss:.3f}</b>"
        )
        return time.perf_counter() - start

    def _repr_mimebundle_(self, **kwargs: object) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = "RankAlphaExplorer (live: needs a kernel)"
        return bundle


def rank_alpha_explorer(lab: RankAlphaLab | None = None, rank: int = 8, alpha: float = 16.0) -> RankAlphaExplorer:
    """The live rank/alpha explorer for JupyterLab (needs a running kernel)."""
    return RankAlphaExplorer(lab, rank=rank, alpha=alpha)


def static_rank_alpha_explorer(
    lab: RankAlphaLab | None = None,
    ranks: Sequence[int] = (1, 2, 4, 8, 16),
    alphas: Sequence[float] = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0),
    scale: float = 2.0,
):
    """Sliders that work without a kernel: a precomputed grid of figures, switched in the browser.

    Every (scaling, rank, alpha) combination is computed now and drawn. What
    every figure shares (axes, labels, the curves that do not move) is stored
    once, as a background image; each combination stores only what it adds
    (:meth:`ExplorerFigure.overlay_png`), laid over the background in the same
    cell of a ``GridBox``. The overlays sit in nested ``ipywidgets.Stack``
    widgets (scaling → rank → alpha); each control's ``index`` is ``jslink``-ed
    to the ``selected_index`` of the stacks at its level, so moving a control
    switches figures in the browser, from the widget state saved in the
    notebook. Each image's description is its tooltip (the only text an
    ``ipywidgets.Image`` carries), which the book turns into its alt text
    (``book/js/widgets-setup.js``).

    Returns:
        An ``ipywidgets.VBox``: the sliders, the scaling toggle, and a
        ``GridBox`` holding the background image and the stacks of
        ``len(ranks) * len(alphas) * 2`` overlays.
    """
    import ipywidgets as w

    from traitlets import Unicode

    class DescribedImage(w.Image):
        """An image whose tooltip shows: ipywidgets sets a view's tooltip only when its model has
        an empty ``description``, and an ``Image`` has none at all (its view then fails to render)."""

        description = Unicode("").tag(sync=True)

    lab = lab or RankAlphaLab.from_checkpoint()
    lab.run_many([(rank, alpha, rslora) for rslora in SCALINGS.values()
                  for rank in ranks for alpha in alphas])  # trained together, rank by rank
    drawing = ExplorerFigure(lab, scale=scale)

    def fill(**kwargs):  # every box and image fills the figure's cell exactly: no margin, no scrollbar
        return w.Layout(width="100%", height="auto", margin="0", **kwargs)

    # Start at the source's rank 8 and alpha 16 when the grid has them.
    rank_slider = w.SelectionSlider(options=[(str(r), r) for r in ranks], value=8 if 8 in ranks else ranks[0],
                                    description="rank r", continuous_update=True)
    alpha_slider = w.SelectionSlider(options=[(f"{a:g}", a) for a in alphas],
                                     value=16.0 if 16.0 in alphas else alphas[0],
                                     description="alpha α", continuous_update=True)
    scaling = w.ToggleButtons(options=list(SCALINGS), value="α/r", description="scaling")
    by_scaling = []
    links = []
    for rslora in SCALINGS.values():
        by_rank = []
        for rank in ranks:
            images = []
            for alpha in alphas:
                result = lab.run(rank, alpha, rslora)
                images.append(DescribedImage(value=drawing.overlay_png(result), format="png", layout=fill(),
                                             tooltip=drawing.describe_result(result)))
            by_alpha = w.Stack(images, selected_index=alpha_slider.index, layout=fill())
            links.append(w.jslink((alpha_slider, "index"), (by_alpha, "selected_index")))
            by_rank.append(by_alpha)
        stack = w.Stack(by_rank, selected_index=rank_slider.index, layout=fill())
        links.append(w.jslink((rank_slider, "index"), (stack, "selected_index")))
        by_scaling.append(stack)
    figures = w.Stack(by_scaling, selected_index=0, layout=fill(grid_area="figure"))
    links.append(w.jslink((scaling, "index"), (figures, "selected_index")))
    background = DescribedImage(value=drawing.background_png(), format="png", layout=fill(grid_area="figure"),
                                tooltip=drawing.describe())
    background.add_class("explorer-background")  # what the browser tests tell from the overlays
    figure = w.GridBox([background, figures],
                       layout=w.Layout(grid_template_areas='"figure"', grid_template_columns="100%",
                                       width="100%", max_width=f"{drawing.width_px}px", overflow="hidden"))
    box = w.VBox([w.HBox([rank_slider, alpha_slider]), scaling, figure])
    box.links = links  # keep the links alive with the box
    n_figures = 2 * len(ranks) * len(alphas)
    return _with_plain_text(box, f"static rank/alpha explorer: {n_figures} "
                                 "figures (sliders work without a kernel)")


def _with_plain_text(widget, text: str):
    """Give ``widget`` a one-line plain-text form (its repr lists every child)."""
    bundle = widget._repr_mimebundle_
    widget._repr_mimebundle_ = lambda **kwargs: {**bundle(**kwargs),
                                                 "text/plain": text}
    return widget
