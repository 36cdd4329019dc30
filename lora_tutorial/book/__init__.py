"""The book's own machinery, kept apart from the LoRA library.

``import lora_tutorial`` gives the LoRA library and loads no plotting or widget
library; the chapters import this subpackage explicitly
(``from lora_tutorial import book``) for what only a book needs:

* :mod:`~lora_tutorial.book.style`: the figure style (:func:`use_book_style`) and
  the helpers every figure uses: :func:`figure`, :func:`series`,
  :func:`ordered_colors`, :func:`label_lines`, :func:`label_hline`, the palette.
* :mod:`~lora_tutorial.book.diagrams`: :func:`lora_diagram`, LoRA as a block diagram.
* :mod:`~lora_tutorial.book.notebook`: :func:`glue` for the prose, and
  :func:`show_source` / :func:`source_code` for showing the library's code.
* :mod:`~lora_tutorial.book.explorer`: chapter 4's rank/alpha sweep, its figure,
  its shipped sweep over seeds, and its sliders (live and static).
* :mod:`~lora_tutorial.book.verdict`: the book's rule for deciding a claim.
"""

from . import style
from .diagrams import lora_diagram
from .explorer import (
    RankAlphaLab,
    rank_alpha_explorer,
    shipped_rank_alpha_sweep,
    static_rank_alpha_explorer,
)
from .notebook import Source, glue, show_source, source_code
from .style import *  # noqa: F403 (the style's names, listed in style.__all__)

__all__ = [
    *style.__all__,
    "Source",
    "glue",
    "lora_diagram",
    "rank_alpha_explorer",
    "RankAlphaLab",
    "shipped_rank_alpha_sweep",
    "show_source",
    "source_code",
    "static_rank_alpha_explorer",
]
