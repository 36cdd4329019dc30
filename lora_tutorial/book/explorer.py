"""The rank/alpha explorer: retrain chapter 3's adapter as sliders move, and see what changes.

Three pieces:

* :class:`RankAlphaLab` retrains the adapter of chapter 3's pretrained
  ``TinyAdapter`` head for any rank, alpha and scaling rule, on the cached
  statistics of the frozen features (:func:`~lora_tutorial.frozen_features.fit_lora_on_stats`),
  and caches every result;
* :class:`ExplorerFigure` draws one result in one figure: the training curve,
  the final loss beside the best any rank-``r`` update can reach, and the
  singular values of the learned update beside those of the task's change;
* :func:`rank_alpha_explorer` (live, in JupyterLab: every move retrains and
  redraws) and :func:`static_rank_alpha_explorer` (for the static book: a grid
  of results precomputed when the notebook runs, switched by sliders linked to
  the figures in the browser, with no kernel).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from PIL import Image as PILImage

from .._checks import check_positive_finite, check_positive_int
from ..analysis import singular_values
from ..frozen_features import FeatureStats, best_low_rank_update, fit_lora_on_stats
from ..layers import LoRALinear
from ..pretraining import pretrained_tiny_adapter

__all__ = [
    "ALPHA_RANGE",
    "ExplorerFigure",
    "ExplorerResult",
    "RankAlphaExplorer",
    "RankAlphaLab",
    "rank_alpha_explorer",
    "static_rank_alpha_explorer",
]

#: The range of the alpha slider (2**-2 to 2**8, on a log scale).
ALPHA_RANGE = (2.0**-2, 2.0**8)
SCALINGS = {"α/r": False, "α/√r": True}


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


@dataclass(frozen=True)
class ExplorerResult:
    """One retraining of the adapter.

    Attributes:
        rank, alpha, rslora: the settings.
        steps: the step numbers at which ``history`` was recorded.
        history: the training loss in evaluation mode at those steps.
        final_loss: the training loss of the result in evaluation mode.
        best_loss: the lowest training loss any rank-``rank`` update can reach.
        learned_sv: singular values of the learned update ``ΔW`` (``rank`` of them).
    """

    rank: int
    alpha: float
    rslora: bool
    steps: np.ndarray
    history: np.ndarray
    final_loss: float
    best_loss: float
    learned_sv: np.ndarray

    @property
    def scaling(self) -> float:
        """The factor multiplying ``B @ A``."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@dataclass
class RankAlphaLab:
    """Retrains chapter 3's rank-``r`` adapter on cached frozen-feature statistics.

    Args:
        stats: statistics of the frozen features and the new task's targets.
        base: the head's frozen base layer (``W0``, ``b``).
        true_delta: the teacher's change of the head, ``(d_out, d_hidden)``.
        steps, lr: the fine-tuning schedule (chapter 3's: 600 AdamW steps at 5e-3).
        dropout, init, init_scale: the adapter's settings (chapter 3's).
        seed: seeds ``lora_A``'s initial draw, the same for every setting.
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
    def from_checkpoint(cls, **kwargs) -> "RankAlphaLab":
        """The lab for chapter 3's pretrained model (the shipped checkpoint)."""
        task, model = pretrained_tiny_adapter()
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

    def run(self, rank: int, alpha: float, rslora: bool = False) -> ExplorerResult:
        """Retrain the adapter with these settings (or return the cached result).

        Training depends on alpha and the rule only through the scale ``s``
        (``alpha / r`` or ``alpha / sqrt(r)``): settings with the same rank
        and the same ``s`` (rank 1 under both rules, or rank 16 with
        ``α/√r = 16`` and ``α/r = 64``) share one run.
        """
        rank = check_positive_int("rank", rank)
        if rank > self.max_rank:
            raise ValueError(f"rank must be at most max_rank={self.max_rank}, got {rank}")
        alpha = check_positive_finite("alpha", alpha)
        key = (rank, float(alpha), bool(rslora))
        if key not in self._cache:
            history, final, sv = self._train(rank, alpha, rslora)
            self._cache[key] = ExplorerResult(
                rank=rank, alpha=float(alpha), rslora=bool(rslora),
                steps=np.arange(1, self.steps + 1), history=history,
                final_loss=final, best_loss=self.best_loss(rank),
                learned_sv=sv,
            )
        return self._cache[key]

    def _train(self, rank: int, alpha: float, rslora: bool) -> tuple:
        """History, final loss and singular values of one run, by (r, s)."""
        layer = LoRALinear.from_linear(
            copy.deepcopy(self.base), r=rank, alpha=alpha,
            dropout=self.dropout, init=self.init,
            init_scale=self.init_scale, rslora=rslora, seed=self.seed)
        key = (rank, layer.scaling)
        if key not in self._runs:
            layer.base.bias.requires_grad_(True)  # chapter 3 trains it too
            with one_thread():
                history = fit_lora_on_stats(layer, self.stats, steps=self.steps,
                                            lr=self.lr, record="mse")
            with torch.no_grad():
                delta = layer.delta_weight().double()
                weight = layer.base.weight.double() + delta
                final = float(self.stats.mse(weight, layer.base.bias))
            self._runs[key] = (np.array(history), final,
                               singular_values(delta).numpy()[:rank])
        return self._runs[key]


class ExplorerFigure:
    """One figure, three panels, redrawn in place for each :class:`ExplorerResult`.

    The axes, their limits and everything that does not depend on the result
    are drawn once; a new result redraws only its own lines and title on top of
    that background (blitting), which keeps a redraw to a few milliseconds.
    Losses outside the fixed axis range are clipped to its edge, so extreme
    settings still give a readable figure.
    """

    #: The fixed y-range of the training-curve panel (log scale).
    LOSS_RANGE = (0.6, 4.0)

    def __init__(self, lab: RankAlphaLab, width: float = 10.0, height: float = 3.4, dpi: int = 80) -> None:
        self.lab = lab
        self.dpi = dpi
        self.figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
        self.canvas = FigureCanvasAgg(self.figure)
        self.ax_curve, self.ax_best, self.ax_sv = self.figure.subplots(1, 3)
        ranks = np.arange(1, lab.max_rank + 1)
        best = np.array([lab.best_loss(int(r)) for r in ranks])
        plain = ScalarFormatter()

        ax = self.ax_curve
        (self.curve,) = ax.plot([], [], color="C0", label="training loss (eval mode)", animated=True)
        self.best_line = ax.axhline(best[0], color="C2", ls="--", label="best possible at this rank", animated=True)
        ax.set_yscale("log")
        ax.set_ylim(*self.LOSS_RANGE)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0])
        ax.set_xlim(0, lab.steps)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (MSE, log scale)")
        ax.set_title("Training curve")
        ax.legend(handles=[self.curve, self.best_line], loc="upper right", fontsize=8)

        ax = self.ax_best
        ax.plot(ranks, best, "o-", color="C2", ms=3, label="best any rank-r update can do")
        (self.final_marker,) = ax.plot([], [], "*", color="C3", ms=14, label="this adapter", animated=True)
        ax.set_ylim(best.min() * 0.92, max(best.max() * 1.15, 2.0))
        ax.set_xlim(0.5, lab.max_rank + 0.5)
        ax.set_xlabel("rank r")
        ax.set_ylabel("final training loss (MSE)")
        ax.set_title("Final loss vs the best possible")
        ax.legend(handles=[ax.lines[0], self.final_marker], loc="upper right", fontsize=8)

        ax = self.ax_sv
        k = len(lab.true_sv)
        index = np.arange(1, k + 1)
        ax.plot(index, lab.true_sv, "k--", lw=1, label="teacher's change")
        ax.plot(index, lab.full_rank_sv, ":", color="C2", lw=1.5, label="best full-rank change")
        (self.sv_markers,) = ax.plot([], [], "o", color="C3", ms=5, label="learned ΔW", animated=True)
        self.sv_top = 1.15 * max(lab.true_sv.max(), lab.full_rank_sv.max())
        ax.set_ylim(0, self.sv_top)
        ax.set_xlim(0.5, k + 0.5)
        ax.set_xlabel("index (largest first)")
        ax.set_ylabel("singular value")
        ax.set_title("Singular values of ΔW")
        ax.legend(handles=[ax.lines[0], ax.lines[1], self.sv_markers], loc="upper right", fontsize=8)
        for axis in (self.ax_curve, self.ax_best, self.ax_sv):
            axis.grid(True, alpha=0.3)

        self.title = self.figure.suptitle("rank 16, α = 256, scaling α/√r = 64: final loss 0.000", fontsize=10,
                                          animated=True)
        self.canvas.draw()  # lay out once, then freeze the layout and keep the background
        self.figure.set_layout_engine("none")
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._animated = [self.curve, self.best_line, self.final_marker, self.sv_markers, self.title]

    def show(self, result: ExplorerResult) -> Figure:
        """Redraw the figure for ``result``; returns the figure."""
        low, high = self.LOSS_RANGE
        self.curve.set_data(result.steps, np.clip(result.history, low, high))
        self.best_line.set_ydata([result.best_loss, result.best_loss])
        bottom, top = self.ax_best.get_ylim()
        self.final_marker.set_data([result.rank], [np.clip(result.final_loss, bottom, top)])
        self.sv_markers.set_data(np.arange(1, result.rank + 1), np.clip(result.learned_sv, 0, self.sv_top))
        rule = "α/√r" if result.rslora else "α/r"
        self.title.set_text(
            f"rank {result.rank}, α = {result.alpha:g}, scaling {rule} = {result.scaling:.3g}: "
            f"final loss {result.final_loss:.3f} (best possible {result.best_loss:.3f})"
        )
        self.canvas.restore_region(self.background)
        for artist in self._animated:
            self.figure.draw_artist(artist)
        return self.figure

    def png(self, result: ExplorerResult, colors: int = 96) -> bytes:
        """The figure for ``result`` as a palette PNG (``colors`` colours) in bytes."""
        self.show(result)
        rgba = np.asarray(self.canvas.buffer_rgba())
        image = PILImage.fromarray(rgba[..., :3]).quantize(colors=colors, method=PILImage.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        image.save(buffer, format="png", optimize=False)
        return buffer.getvalue()


class RankAlphaExplorer:
    """Live sliders for rank and alpha and a scaling toggle; each move retrains and redraws.

    Display it in a notebook (it shows its ``widget``). :meth:`update` is what
    a slider move calls; it returns the seconds the move took.
    """

    def __init__(self, lab: RankAlphaLab | None = None, rank: int = 8, alpha: float = 16.0) -> None:
        import ipywidgets as w

        self.lab = lab or RankAlphaLab.from_checkpoint()
        self.drawing = ExplorerFigure(self.lab)
        self._png: dict[tuple[int, float, bool], bytes] = {}
        self.rank = w.IntSlider(value=rank, min=1, max=self.lab.max_rank, description="rank r", continuous_update=False)
        self.alpha = w.FloatLogSlider(
            value=alpha, base=2, min=math.log2(ALPHA_RANGE[0]), max=math.log2(ALPHA_RANGE[1]), step=0.5,
            description="alpha α", continuous_update=False, readout_format=".3g",
        )
        self.scaling = w.ToggleButtons(options=list(SCALINGS), value="α/r", description="scaling")
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
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
    dpi: int = 80,
):
    """Sliders that work without a kernel: a precomputed grid of figures, switched in the browser.

    Every (scaling, rank, alpha) combination is computed now and drawn as a PNG.
    The figures sit in nested ``ipywidgets.Stack`` widgets (scaling → rank →
    alpha); each control's ``index`` is ``jslink``-ed to the ``selected_index``
    of the stacks at its level, so moving a control switches figures in the
    browser, from the widget state saved in the notebook.

    Returns:
        An ``ipywidgets.VBox``; ``len(ranks) * len(alphas) * 2`` PNGs inside.
    """
    import ipywidgets as w

    lab = lab or RankAlphaLab.from_checkpoint()
    drawing = ExplorerFigure(lab, dpi=dpi)
    fit = w.Layout(max_width="100%", height="auto")
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
            images = [
                w.Image(value=drawing.png(lab.run(rank, alpha, rslora)), format="png", layout=fit)
                for alpha in alphas
            ]
            by_alpha = w.Stack(images, selected_index=alpha_slider.index)
            links.append(w.jslink((alpha_slider, "index"), (by_alpha, "selected_index")))
            by_rank.append(by_alpha)
        stack = w.Stack(by_rank, selected_index=rank_slider.index)
        links.append(w.jslink((rank_slider, "index"), (stack, "selected_index")))
        by_scaling.append(stack)
    figures = w.Stack(by_scaling, selected_index=0)
    links.append(w.jslink((scaling, "index"), (figures, "selected_index")))
    box = w.VBox([w.HBox([rank_slider, alpha_slider]), scaling, figures])
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
