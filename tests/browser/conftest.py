"""When the browser tests run, and when they are skipped.

They need the built book (_build/html, from `make book` or `jupyter-book build .`) and
Debian's Chromium (/usr/bin/chromium, or set CHROMIUM). A reader's plain `pytest --nbval`
in a fresh clone has neither the built book nor, perhaps, Chromium: there these tests are
skipped, with one line saying how to run them. `make test` (and so CI) sets
LORA_BOOK_TESTS=require: there nothing is skipped, and a missing book or browser is an
error (the tests' fixtures fail), so CI can never pass without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
HTML = ROOT / "_build" / "html"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("LORA_BOOK_TESTS", "") == "require"
HOW_TO_RUN = "run `make test` (builds the book, then runs every test)"


def missing() -> list[str]:
    """What the browser tests need and this checkout lacks."""
    lacks = []
    if not (HTML / "index.html").exists():
        lacks.append("the built book (_build/html)")
    if not Path(CHROMIUM).exists():
        lacks.append(f"Chromium ({CHROMIUM})")
    return lacks


def _in_this_directory(item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    lacks = missing()
    if REQUIRED or not lacks:
        return
    skip = pytest.mark.skip(reason=f"browser test: needs {' and '.join(lacks)}; {HOW_TO_RUN}")
    skipped = 0
    for item in items:
        if _in_this_directory(item):
            item.add_marker(skip)
            skipped += 1
    config._lora_browser_skipped = (skipped, lacks)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped, lacks = getattr(config, "_lora_browser_skipped", (0, []))
    if skipped:
        terminalreporter.write_line(
            f"{skipped} browser tests skipped: they need {' and '.join(lacks)}; {HOW_TO_RUN}"
        )
