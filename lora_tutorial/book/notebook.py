"""Small helpers the book's notebooks use to show things: glued values and the library's source.

The figure style lives in :mod:`lora_tutorial.book.style`; ``BOOK_STYLE`` and
``use_book_style`` are re-exported here for older imports.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from typing import Any

from .style import BOOK_STYLE, use_book_style

__all__ = ["Source", "glue", "show_source", "source_code"]

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


class Source:
    """Source code that a notebook shows as highlighted Python, not as printed text.

    Its Markdown form is a fenced ``python`` block: JupyterLab highlights it, and
    the book renders it with the same highlighting as its code cells. The plain
    text form (what ``print`` or a terminal shows) is the code itself. Both are
    plain text, so strict nbval compares them exactly and deterministically (no
    HTML from a highlighter whose markup could change between versions).
    """

    def __init__(self, code: str, name: str = "") -> None:
        self.code = code
        self.name = name

    @property
    def lines(self) -> int:
        """How many lines of code it shows."""
        return len(self.code.splitlines())

    def _repr_markdown_(self) -> str:
        return f"```python\n{self.code.rstrip()}\n```\n"

    def __repr__(self) -> str:
        return self.code.rstrip()


def show_source(*objs: Any) -> Source:
    """The source of ``objs`` without docstrings (:func:`source_code`), shown highlighted.

    A notebook cell ending in ``book.show_source(lt.LoRALinear)`` displays the
    class as highlighted code; several objects are shown one after the other,
    separated by a blank line, in one output. Where the code is long, the chapter
    folds the cell's output (the ``hide-output`` tag, with a ``code_prompt_show``
    naming it), so the reader opens it when the prose sends them there.
    """
    code = "\n".join(source_code(obj) for obj in objs)
    return Source(code, ", ".join(getattr(obj, "__qualname__", "") for obj in objs))
