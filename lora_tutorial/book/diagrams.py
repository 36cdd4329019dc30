"""Diagrams the book draws with matplotlib, in its figure style (:mod:`.style`).

:func:`lora_diagram` draws a LoRA layer: the frozen weight :math:`W` beside the
trained path through :math:`A` and :math:`B`, every matrix drawn to the shape it
has, so the reader sees how thin the trained path is.
"""

from __future__ import annotations

from matplotlib.patches import Circle, FancyArrowPatch, Rectangle

from .style import COLUMN_WIDTH, OKABE_ITO

__all__ = ["lora_diagram"]

_FROZEN = "#D9D9D9"
_TRAINED_A = OKABE_ITO["orange"]
_TRAINED_B = OKABE_ITO["sky blue"]


def _arrow(ax, start, end, **kwargs):
    style = {"arrowstyle": "-|>", "mutation_scale": 12, "lw": 1.4, "color": "0.25",
             "shrinkA": 0, "shrinkB": 0}
    style.update(kwargs)
    ax.add_patch(FancyArrowPatch(start, end, **style))


def _matrix(ax, x, y_mid, width, height, color, hatch=None):
    """A matrix drawn as a box, ``height`` rows by ``width`` columns, centred at ``y_mid``."""
    box = Rectangle((x, y_mid - height / 2), width, height, facecolor=color, edgecolor="0.2",
                    linewidth=1.2, hatch=hatch)
    ax.add_patch(box)
    return box


def lora_diagram(*, d: float = 16.0, r: float = 4.0, title: str | None = None):
    """A LoRA layer as a block diagram: :math:`h = Wx + \\frac{\\alpha}{r} BAx`.

    The input :math:`x` (:math:`d_{in}` numbers) takes two paths: through the
    frozen :math:`W` (:math:`d_{out} \\times d_{in}`, grey, hatched) and through
    the trained :math:`A` (:math:`r \\times d_{in}`) and :math:`B`
    (:math:`d_{out} \\times r`), scaled by :math:`\\alpha / r`; the two add up to
    :math:`h`. Boxes are drawn to scale: ``d`` units for :math:`d_{in}` and
    :math:`d_{out}`, ``r`` for the rank. Returns the figure, the column's width.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.1))
    ax.set_xlim(0, 100)
    ax.set_ylim(-1, 46)
    ax.set_aspect("equal")
    ax.axis("off")
    top, bottom, mid = 36.0, 12.0, 24.0

    # x: a column of d_in numbers
    _matrix(ax, 2, mid, 2.2, d, "white")
    ax.text(3.1, mid - d / 2 - 1.5, "$x$\n$d_{in}$", ha="center", va="top")
    # the frozen path
    split = 9.0  # x splits into the two paths
    ax.plot([4.2, split], [mid, mid], color="0.25", lw=1.4, ls="-")
    ax.plot([split, split], [bottom, top], color="0.25", lw=1.4, ls="-")
    ax.add_patch(Circle((split, mid), 0.6, color="0.25"))
    _arrow(ax, (split, top), (17.8, top))
    _matrix(ax, 18, top, d, d, _FROZEN, hatch="///")
    ax.text(18 + d / 2, top, "$W$", ha="center", va="center", fontsize=14,
            bbox={"facecolor": _FROZEN, "edgecolor": "none", "pad": 1})
    ax.text(18 + d + 1.5, top + d / 2 - 0.5, "frozen\n$d_{out} \\times d_{in}$", ha="left", va="top")
    # the trained path
    _arrow(ax, (split, bottom), (17.8, bottom))
    _matrix(ax, 18, bottom, d, r, _TRAINED_A)
    ax.text(18 + d / 2, bottom, "$A$", ha="center", va="center", fontsize=14)
    ax.text(18 + d / 2, bottom - r / 2 - 1.2, "trained, $r \\times d_{in}$", ha="center", va="top")
    _arrow(ax, (18 + d + 0.2, bottom), (39.3, bottom))
    _matrix(ax, 39.5, bottom, 1.2, r, "white")  # A x: r numbers
    ax.text(40.1, bottom + r / 2 + 1, "$Ax$: $r$", ha="center", va="bottom")
    _arrow(ax, (40.9, bottom), (45.3, bottom))
    _matrix(ax, 45.5, bottom, r, d, _TRAINED_B)
    ax.text(45.5 + r / 2, bottom, "$B$", ha="center", va="center", fontsize=14)
    ax.text(45.5 + r + 1.2, bottom - d / 2 + 0.5, "trained\n$d_{out} \\times r$", ha="left", va="bottom")
    # the sum and the output
    sx = 70.0
    ax.add_patch(Circle((sx, mid), 2.4, facecolor="white", edgecolor="0.2", linewidth=1.2))
    ax.text(sx, mid, "+", ha="center", va="center", fontsize=15)
    ax.plot([18 + d, sx, sx], [top, top, mid + 8], color="0.25", lw=1.4, ls="-")
    _arrow(ax, (sx, mid + 8.5), (sx, mid + 2.5))
    ax.text(sx - 11, top + 1.2, "$Wx$", ha="center", va="bottom")
    ax.plot([45.5 + r, sx, sx], [bottom, bottom, mid - 8], color="0.25", lw=1.4, ls="-")
    _arrow(ax, (sx, mid - 8.5), (sx, mid - 2.5))
    ax.text(sx - 9, bottom + 1, "$\\times\\,\\dfrac{\\alpha}{r}$", ha="center", va="bottom", fontsize=11)
    _arrow(ax, (sx + 2.4, mid), (sx + 9.8, mid))
    _matrix(ax, sx + 10, mid, 2.2, d, "white")
    ax.text(sx + 11.1, mid - d / 2 - 1.5, "$h$\n$d_{out}$", ha="center", va="top")
    ax.text(sx + 14.5, mid, "$h = Wx + \\dfrac{\\alpha}{r}\\,BAx$", ha="left", va="center", fontsize=11)
    ax.set_title(title if title is not None else
                 "LoRA: a frozen weight beside a thin trained path")
    return fig
