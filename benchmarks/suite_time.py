"""How long the test suite takes: units plus every notebook under strict nbval, then each notebook alone.

Usage: python benchmarks/suite_time.py [--markdown FILE]   (in the project's environment)

The goals: every chapter under strict `pytest --nbval` within 180 s all together, and each
chapter alone within 25 s, on the 2-core CI machine. The browser tests of the rendered book
are not part of these figures (they need the built book; `make test` runs them too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import _report

ROOT = Path(__file__).resolve().parent.parent
ALL_CHAPTERS_GOAL = 180.0
CHAPTER_GOAL = 25.0


def timed_pytest(*targets: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", *targets], cwd=ROOT, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-3000:])
        raise SystemExit(f"pytest {' '.join(targets)} failed")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the results as a Markdown table to this file")
    args = parser.parse_args()
    notebooks = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
    print(f"machine: {_report.machine()}")
    rows = ["| what | time (s) | goal |", "| --- | ---: | --- |"]

    def report(label: str, seconds: float, goal: float | None = None) -> None:
        verdict = "" if goal is None else f"≤ {goal:.0f}\u00a0s: {'met' if seconds <= goal else 'MISSED'}"
        print(f"{label:44s} {seconds:6.1f} s  {verdict}")
        rows.append(f"| {label} | {seconds:.1f} | {verdict} |")

    report("every chapter, strict nbval", timed_pytest(*notebooks), ALL_CHAPTERS_GOAL)
    report("unit tests and notebook house rules", timed_pytest("tests/unit", "tests/test_notebooks.py"))
    for notebook in notebooks:
        report(f"{Path(notebook).name} alone", timed_pytest(notebook), CHAPTER_GOAL)
    _report.write(args.markdown, "suite_time.py", "\n".join(rows),
                  note="Each line is one `pytest` process, so each includes starting Python and the kernels.")


if __name__ == "__main__":
    main()
