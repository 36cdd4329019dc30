"""Writing a benchmark's figures as Markdown for the book's appendix (book/benchmarks.md).

Tables put units in their headers ("time (ms)") and plain numbers in their cells, so a
narrow column never wraps a unit away from its number. A benchmark whose figures a
chapter plots also writes them as JSON beside the Markdown (:func:`write_json`), with
the same date, machine and command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """One line describing where the figures were measured."""
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, Python {sys.version.split()[0]}")


def command(script: str, path: str) -> str:
    """The command that writes ``path``, as the appendix quotes it."""
    target = Path(path)
    return f"python benchmarks/{script} --markdown {target.relative_to(ROOT) if target.is_absolute() else target}"


def write(path: str | None, script: str, table: str, note: str = "") -> None:
    """Write ``table`` to ``path`` (if given) with the date, the machine and the command."""
    if not path:
        return
    target = Path(path)
    command_line = command(script, path)
    text = (f"Measured on {datetime.date.today().isoformat()}, {machine()}, with `{command_line}`."
            f"{' ' + note if note else ''}\n\n{table}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def interleaved(jobs: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float]:
    """The median over ``rounds`` of each job's time per call, the jobs interleaved.

    Every job runs once to warm up; then in each round every job runs ``iters``
    times, in an order shuffled afresh (seeded), so slow drifts of the machine
    hit all of them alike.
    """
    order = list(jobs)
    rng = random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in order}
    for name in order:
        jobs[name]()
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(iters):
                jobs[name]()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_json(path: str | None, script: str, results: dict) -> None:
    """Write ``results`` as JSON beside the Markdown file ``path`` (same name, ``.json``).

    The file says when and where the figures were measured and by which command,
    so a chapter that plots them can say so: they are the last run's, not live.
    """
    if not path:
        return
    target = Path(path).with_suffix(".json")
    record = {"measured_on": datetime.date.today().isoformat(), "machine": machine(),
              "command": command(script, path), **results}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
