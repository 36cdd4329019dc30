"""The book's own machinery, kept apart from the LoRA library.

``import lora_tutorial`` gives the LoRA library and loads no plotting or widget
library; the chapters import this subpackage explicitly
(``from lora_tutorial import book``) for what only a book needs:

* :mod:`~lora_tutorial.book.notebook`: the plot style, :func:`glue` for the prose
  and :func:`source_code` for printing the library's code.
* :mod:`~lora_tutorial.book.explorer`: chapter 4's rank/alpha lab, its shipped
  sweep over seeds, its figure and its sliders (live and static).
* :mod:`~lora_tutorial.book.verdict`: the book's rule for deciding a claim.
"""

from .explorer import (
    RankAlphaLab,
    rank_alpha_explorer,
    shipped_rank_alpha_sweep,
    static_rank_alpha_explorer,
)
from .notebook import BOOK_STYLE, glue, source_code, use_book_style

__all__ = [
    "BOOK_STYLE",
    "glue",
    "rank_alpha_explorer",
    "RankAlphaLab",
    "shipped_rank_alpha_sweep",
    "source_code",
    "static_rank_alpha_explorer",
    "use_book_style",
]
