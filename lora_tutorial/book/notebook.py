"""Small helpers the book's notebooks use to show things: plot style and source code."""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from typing import Any

import matplotlib as mpl

__all__ = ["BOOK_STYLE", "glue", "source_code", "use_book_style"]

class _NoHubKernelMessage(logging.Filter):
    """Drop bitsandbytes' note that it could not download an optional CPU kernel.

    On CPUs with AVX512-BF16, importing bitsandbytes (which PEFT does) tries to
    fetch a faster 4-bit kernel from the Hugging Face hub and logs a warning
    when it cannot. The book downloads nothing and never needs that kernel, so
    the message would only put stderr into the chapters' outputs on some
    machines; every other message of bitsandbytes still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelMessage())

#: The MIME prefix under which myst-nb looks for glued values.
GLUE_PREFIX = "application/papermill.record/"

#: Matplotlib settings shared by every figure in the book.
BOOK_STYLE: dict[str, Any] = {
    "figure.figsize": (7.0, 3.6),
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the book's prose, as ``myst_nb.glue`` does.

    The prose pastes it with ``{glue:text}`name```. This writes the same
    notebook output as ``myst_nb.glue`` (a display output tagged with
    ``scrapbook`` metadata) without importing ``myst_nb``, whose first ``glue``
    call costs seconds of imports in every kernel. Round floats before gluing
    them: the stored text is what the book shows and what nbval compares.
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipy_display

    mimebundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipy_display({prefix + key: data for key, data in mimebundle.items()}, raw=True, metadata=metadata)


def use_book_style() -> None:
    """Apply :data:`BOOK_STYLE` to matplotlib's global settings."""
    mpl.rcParams.update(BOOK_STYLE)


def source_code(obj: Any) -> str:
    """The source of a function, method or class, without its docstrings.

    The book prints the library's code where a chapter discusses it, so the
    reader sees what actually runs rather than a copy.
    """
    source = textwrap.dedent(inspect.getsource(obj))
    tree = ast.parse(source)
    lines = source.splitlines()
    drop: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop.update(range(first.lineno - 1, first.end_lineno))
    return "\n".join(line for i, line in enumerate(lines) if i not in drop).rstrip() + "\n"
