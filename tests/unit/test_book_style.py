"""The book's figure style: figures drawn for the column, sharp, in colours and styles that
survive colour blindness, labelled where the lines are; source shown as highlighted code."""

import base64
import struct

import matplotlib
import pytest
from IPython.core.formatters import format_display_data
from IPython.core.interactiveshell import InteractiveShell

import lora_tutorial as lt
from lora_tutorial import book


@pytest.fixture
def styled():
    """The book's style in an IPython shell, matplotlib's settings restored afterwards."""
    InteractiveShell.instance()
    with matplotlib.rc_context():
        book.use_book_style()
        yield
    import matplotlib.pyplot as plt

    plt.close("all")


def png_size(data: str) -> tuple[int, int]:
    png = base64.b64decode(data)
    return struct.unpack(">II", png[16:24])


def test_a_figure_is_stored_at_twice_its_size_and_shown_at_the_column_width(styled):
    fig, ax = book.figure()
    ax.plot([0, 1], [1, 0])
    ax.set_title("a title")
    data, metadata = format_display_data(fig)
    assert metadata["image/png"]["width"] == book.COLUMN_PX == 672
    assert png_size(data["image/png"]) == (2 * 672, 2 * metadata["image/png"]["height"])
    assert data["text/plain"].startswith("<Figure size 672x300")


def test_panels_stack_at_full_width(styled):
    fig, axes = book.figure(panels=3)
    assert len(axes) == 3 and tuple(fig.get_size_inches()) == pytest.approx((6.72, 9.0))
    fig, (top, bottom) = book.figure(panels=2, height=[2.5, 1.5])
    assert tuple(fig.get_size_inches()) == pytest.approx((6.72, 4.0))
    fig.canvas.draw()
    assert top.get_position().width == pytest.approx(bottom.get_position().width, rel=0.05)
    with pytest.raises(ValueError, match="height lists 1 rows"):
        book.figure(panels=2, height=[2.0])


def test_series_differ_by_more_than_colour():
    styles = [book.series(i, marker=True) for i in range(len(book.PALETTE))]
    assert len({s["color"] for s in styles}) == len(styles)
    assert len({str(s["linestyle"]) for s in styles}) == len(styles)
    assert len({s["marker"] for s in styles}) == len(styles)
    assert book.OKABE_ITO["yellow"] not in book.PALETTE  # too light for lines on white
    assert book.series(1, lw=3)["lw"] == 3


def test_ordered_colours_darken_to_lighten():
    colours = book.ordered_colors(5)
    lightness = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b, _ in colours]
    assert lightness == sorted(lightness) and len(colours) == 5


def test_direct_labels_never_overlap(styled):
    fig, ax = book.figure()
    for i in range(4):  # four lines ending at almost the same height
        ax.plot([0, 10], [0, 1 + 0.001 * i], label=f"line {i}", **book.series(i))
    texts = book.label_lines(ax)
    fig.canvas.draw()
    boxes = sorted((t.get_window_extent() for t in texts), key=lambda b: b.y0)
    assert [t.get_color() for t in texts] == [line.get_color() for line in ax.get_lines()]
    assert all(lower.y1 <= upper.y0 + 0.5 for lower, upper in zip(boxes, boxes[1:]))


def test_a_reference_line_carries_its_name(styled):
    fig, ax = book.figure()
    ax.plot([0, 1], [0, 2])
    line, text = book.label_hline(ax, 1.0, "floor", where="left", above=False)
    assert text.get_text() == "floor" and line.get_ydata()[0] == 1.0 and text.get_va() == "top"


def test_the_lora_diagram_is_drawn_for_the_column(styled):
    fig = book.lora_diagram()
    assert fig.get_size_inches()[0] == pytest.approx(book.COLUMN_WIDTH)
    assert fig.axes[0].get_title(loc="left").startswith("LoRA")  # titles sit left


def test_source_is_shown_as_highlighted_python():
    shown = book.show_source(lt.LoRALayer.forward, lt.LoRALayer.update)
    data, _ = format_display_data(shown)
    assert data["text/markdown"].startswith("```python\ndef forward(")
    assert data["text/markdown"].endswith("\n```\n") and "def update(" in data["text/markdown"]
    assert data["text/plain"] == shown.code.rstrip() and '"""' not in shown.code
    assert shown.lines == len(shown.code.splitlines())
