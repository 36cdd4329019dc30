"""Writing a benchmark's figures as Markdown for the book's appendix (book/benchmarks.md)."""

from __future__ import annotations

import datetime
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
