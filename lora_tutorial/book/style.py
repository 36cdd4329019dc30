"""The book's figure style: one look for every figure, drawn for the page's column.

Every chapter calls :func:`use_book_style` once, after its imports; it sets
matplotlib's defaults (:data:`BOOK_STYLE`) and, in a notebook, has every figure
stored as a PNG at twice its displayed size, displayed at its size. A figure
cell then draws with a few helpers::

    fig, ax = book.figure()                    # one panel, the column's width
    fig, (top, bottom) = book.figure(panels=2)  # two panels, stacked, each as tall
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(steps, curve, label=name, **book.series(i))
    book.label_lines(ax)                       # names beside the lines' ends
    book.label_hline(ax, floor, "best possible")  # a reference line, named on it
    plt.show()

The measurements behind the numbers (Chromium, sphinx-book-theme, a 1280-px window):

* **The column.** A chapter's text column is 688 px wide, and an output figure
  has 8 px of padding each side, so a figure is drawn :data:`COLUMN_PX` = 672 px
  wide at :data:`DPI` = 100 (6.72 in) and shown at exactly that size: 1 px of the
  drawing is 1 px of the page. Narrower screens scale it down as a whole.
* **Sharp on any screen.** IPython's ``retina`` format stores the PNG at twice the
  dots per inch (1344 px wide) with ``width`` = 672 in the output's metadata;
  myst-nb writes that into the ``<img>``'s ``width``, so a high-resolution screen
  gets two pixels of drawing per CSS pixel. nbval compares neither PNG bytes nor
  output metadata, so strict nbval stays deterministic (the figure's
  ``<Figure size ...>`` text is sanitised in ``tests/sanitize.cfg``). SVG was not
  chosen: nbval compares ``image/svg+xml`` text, and every path coordinate of an
  SVG would then have to agree to the last printed digit on every machine.
* **Readable text.** Sizes are in points, and at 100 dpi a point is 100/72 px:
  tick labels (9 pt) are 12.5 px on the page, axis labels and direct labels
  (10 pt) 13.9 px, titles (11 pt) 15.3 px. Nothing in a figure is below 8 pt
  (11 px). On a 390-px phone the whole figure, text included, shows at 53%.
* **Colour that survives colour blindness.** Series take the Okabe-Ito colours
  (:data:`OKABE_ITO`, :data:`PALETTE`), chosen to stay distinct under the common
  colour-vision deficiencies, always together with a line style and, where points
  matter, a marker (:func:`series`), so that no two series differ by colour
  alone. Ordered series (ranks, rates) take :func:`ordered_colors`, from viridis,
  whose lightness rises steadily.
* **Labels where the eye is.** :func:`label_lines` writes each line's name beside
  its end, in its colour, instead of a legend far from the lines;
  :func:`label_hline` draws a reference line with its name written on it.
* **Panels stack.** :func:`figure` gives every panel the column's full width and
  its own height: a figure of several panels grows taller instead of shrinking
  its panels side by side.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib as mpl
from cycler import cycler

__all__ = [
    "BOOK_STYLE",
    "COLUMN_PX",
    "COLUMN_WIDTH",
    "DPI",
    "LINESTYLES",
    "MARKERS",
    "OKABE_ITO",
    "PALETTE",
    "PANEL_HEIGHT",
    "figure",
    "label_hline",
    "label_lines",
    "ordered_colors",
    "series",
    "use_book_style",
]

#: Width of the chapters' figure area, in CSS pixels, at a 1280-px window.
COLUMN_PX = 672
#: Dots per inch of a figure as displayed (1 inch of figure is 100 px of page).
DPI = 100
#: Width of every figure in inches (the column, drawn at its own size).
COLUMN_WIDTH = COLUMN_PX / DPI
#: Height of one panel, in inches (300 px).
PANEL_HEIGHT = 3.0

#: The Okabe-Ito palette (Okabe and Ito, *Color Universal Design*, 2008), by name.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}

#: The order in which series take the palette's colours (yellow, too light on
#: white for lines and text, is left out; black is last, for a reference).
PALETTE: list[str] = [OKABE_ITO[name] for name in (
    "blue", "vermillion", "bluish green", "orange", "reddish purple", "sky blue", "black")]

#: Line styles in the palette's order (series i has colour i and line style i).
LINESTYLES: list[Any] = ["-", "--", "-.", ":", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (8, 2)), (0, (1, 1))]

#: Markers, in the palette's order.
MARKERS: list[str] = ["o", "s", "^", "D", "v", "P", "X"]

#: Matplotlib settings shared by every figure in the book (see the module's notes).
BOOK_STYLE: dict[str, Any] = {
    "figure.figsize": (COLUMN_WIDTH, PANEL_HEIGHT),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.constrained_layout.use": True,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "figure.titlesize": 11,
    "figure.titleweight": "bold",
    "axes.prop_cycle": cycler(color=PALETTE) + cycler(linestyle=LINESTYLES),
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.axisbelow": True,
    "image.cmap": "viridis",
}


def use_book_style() -> None:
    """Apply :data:`BOOK_STYLE`, and in a notebook store figures as sharp PNGs.

    In an IPython kernel this selects the ``retina`` format (a PNG at twice
    :data:`DPI`, displayed at its size through the output's ``width`` metadata)
    without ``bbox_inches="tight"``, so that a figure keeps exactly the size it
    was drawn at: :data:`COLUMN_PX` wide. Outside IPython only the settings apply.
    """
    import matplotlib.pyplot  # noqa: F401  (selects the backend before the formats)

    mpl.rcParams.update(BOOK_STYLE)
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of the book
        return
    if get_ipython() is None:
        return
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("retina", bbox_inches=None)


def series(i: int, *, marker: bool = False, **overrides: Any) -> dict[str, Any]:
    """Colour, line style (and marker) of series ``i``, as keywords for ``plot``.

    ``ax.plot(x, y, **book.series(2, marker=True))`` draws series 2 in bluish
    green, dash-dotted, with triangles. ``overrides`` replace any of them.
    """
    n = len(PALETTE)
    style: dict[str, Any] = {"color": PALETTE[i % n], "linestyle": LINESTYLES[i % n]}
    if marker:
        style["marker"] = MARKERS[i % n]
    style.update(overrides)
    return style


def ordered_colors(n: int, start: float = 0.0, stop: float = 0.85) -> list[tuple[float, ...]]:
    """``n`` colours of viridis, dark to light, for series with an order (ranks, rates).

    The lightest part of viridis (above ``stop``) is left out: yellow on white is
    hard to see. Pair them with markers or line styles too, as :func:`series` does.
    """
    cmap = mpl.colormaps["viridis"]
    if n == 1:
        return [cmap(start)]
    return [cmap(start + (stop - start) * i / (n - 1)) for i in range(n)]


def figure(panels: int = 1, *, columns: int = 1, height: float | Sequence[float] = PANEL_HEIGHT,
           sharex: bool = False, sharey: bool = False, **kwargs: Any):
    """A figure the column's width, with ``panels`` panels stacked, each ``height`` inches tall.

    Returns ``(fig, ax)`` for one panel and ``(fig, axes)`` (a flat array) for
    several. ``height`` may list one height per row (a tall panel above a short
    one). ``columns=2`` puts two panels side by side, each half the column
    (336 px): only for small panels that read well at that size, such as two
    squares. Panels never shrink to make room: more rows make a taller figure.
    """
    import matplotlib.pyplot as plt

    rows = -(-panels // columns)
    heights = [float(height)] * rows if isinstance(height, (int, float)) else [float(h) for h in height]
    if len(heights) != rows:
        raise ValueError(f"height lists {len(heights)} rows, the figure has {rows}")
    fig, axes = plt.subplots(rows, columns, figsize=(COLUMN_WIDTH, sum(heights)), sharex=sharex,
                             sharey=sharey, squeeze=False, gridspec_kw={"height_ratios": heights}, **kwargs)
    flat = axes.ravel()
    for ax in flat[panels:]:
        ax.remove()
    flat = flat[:panels]
    return (fig, flat[0]) if panels == 1 else (fig, flat)


def _axes_fraction(ax, x: float, y: float) -> tuple[float, float]:
    """Where the data point (x, y) lies in ``ax``, as fractions of its width and height."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling first
    return tuple((ax.transScale + ax.transLimits).transform((x, y)))


def _spread(positions: Sequence[float], heights: Sequence[float]) -> list[float]:
    """Move positions apart until neighbours no longer overlap, each ``heights[i]`` tall."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    placed = [positions[i] for i in order]
    size = [heights[i] for i in order]
    for _ in range(500):
        moved = False
        for j in range(1, len(placed)):
            overlap = (size[j - 1] + size[j]) / 2 - (placed[j] - placed[j - 1])
            if overlap > 1e-9:
                placed[j - 1] -= overlap / 2
                placed[j] += overlap / 2
                moved = True
        if not moved:
            break
    out = [0.0] * len(positions)
    for rank, i in enumerate(order):
        out[i] = placed[rank]
    return out


def label_lines(ax, lines=None, *, labels: Sequence[str] | None = None, x: float | None = None,
                fontsize: float | None = None, gap: float = 1.25, **text_kwargs: Any) -> list:
    """Write each line's name beside it, in its colour: a legend where the lines are.

    By default each label sits just right of the plotting area, level with the
    line's last point, and the labels are spread vertically so they never
    overlap (``gap`` is the height of a line of text, in lines: 1.25 leaves a
    quarter line between labels);
    constrained layout then narrows the axes to make room. With ``x`` given,
    each label sits inside the plot at that x, on its line. ``lines`` defaults to
    every line of ``ax`` with a label (not ``_``-prefixed); ``labels`` replace
    their labels. Returns the text objects.
    """
    if lines is None:
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    if labels is None:
        labels = [line.get_label() for line in lines]
    fontsize = fontsize if fontsize is not None else mpl.rcParams["font.size"]
    anchors = []
    for line in lines:
        xs, ys = (list(map(float, d)) for d in line.get_data())
        points = [(a, b) for a, b in zip(xs, ys) if a == a and b == b]  # drop NaNs
        if x is None:
            anchors.append(_axes_fraction(ax, *points[-1]))
        else:
            after = next((k for k, (a, _) in enumerate(points) if a >= x), len(points) - 1)
            (x0, y0), (x1, y1) = points[max(after - 1, 0)], points[after]
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            anchors.append(_axes_fraction(ax, x, y0 + t * (y1 - y0)))
    fig = ax.figure
    height_px = fig.get_figheight() * fig.dpi * ax.get_position().height
    line_height = gap * fontsize * fig.dpi / 72 / max(height_px, 1.0)
    ys = _spread([a[1] for a in anchors], [line_height * (1 + label.count("\n")) for label in labels])
    texts = []
    for line, label, (fx, _), fy in zip(lines, labels, anchors, ys):
        style = {"color": line.get_color(), "fontsize": fontsize, "va": "center"}
        if x is None:
            style.update(ha="left")
            where = (1.0, fy)
            offset = (6, 0)
        else:
            style.update(ha="center")
            where = (fx, fy)
            offset = (0, 0)
        style.update(text_kwargs)
        texts.append(ax.annotate(label, xy=where, xycoords="axes fraction", xytext=offset,
                                 textcoords="offset points", annotation_clip=False, **style))
    return texts


def label_hline(ax, y: float, text: str, *, color: str = "0.35", linestyle: Any = "--", where: str = "right",
                above: bool = True, linewidth: float = 1.2, fontsize: float | None = None, **text_kwargs: Any):
    """A horizontal reference line at ``y`` (a floor, a baseline) with ``text`` written on it.

    The text sits just above the line (below with ``above=False``), at its
    right end (``where="left"``: its left end), in the line's colour. Returns
    the line and the text.
    """
    line = ax.axhline(y, color=color, linestyle=linestyle, linewidth=linewidth, zorder=1.5)
    fx = 0.99 if where == "right" else 0.01
    label = ax.annotate(text, xy=(fx, y), xycoords=("axes fraction", "data"),
                        xytext=(0, 3 if above else -3), textcoords="offset points",
                        ha="right" if where == "right" else "left", va="bottom" if above else "top",
                        color=color, fontsize=fontsize if fontsize is not None else mpl.rcParams["font.size"],
                        **text_kwargs)
    return line, label
