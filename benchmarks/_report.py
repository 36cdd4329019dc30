"""Writing a benchmark's figures as Markdown for the book's appendix (book/benchmarks.md)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """One line describing where the figures were measured."""
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, Python {sys.version.split()[0]}")


def write(path: str | None, script: str, table: str, note: str = "") -> None:
    """Write ``table`` to ``path`` (if given) with the date, the machine and the command."""
    if not path:
        return
    target = Path(path)
    command = f"python benchmarks/{script} --markdown {target.relative_to(ROOT) if target.is_absolute() else target}"
    text = (f"Measured on {datetime.date.today().isoformat()}, {machine()}, with `{command}`."
            f"{' ' + note if note else ''}\n\n{table}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
