"""How long the test suite takes: units plus every notebook under strict nbval, then each notebook alone.

Usage: python benchmarks/suite_time.py [--markdown FILE]   (in the project's environment)

The goal (issue 3): the `pytest --nbval` run of the units and chapters 1-4 within 90 s
on the 2-core CI machine. The browser tests of the rendered book are not part of this
figure (they need the built book; `make test` runs them too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import _report

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 90.0


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
    chapters = [n for n in notebooks if Path(n).name[:2] in {"01", "02", "03", "04"}]
    print(f"machine: {_report.machine()}")
    rows = ["| what | time |", "| --- | ---: |"]

    def report(label: str, seconds: float) -> None:
        print(f"{label:58s} {seconds:6.1f} s")
        rows.append(f"| {label} | {seconds:.1f} s |")

    goal = timed_pytest("tests/unit", "tests/test_notebooks.py", *chapters)
    report(f"units + chapters 1-4, strict nbval (goal ≤ {GOAL_SECONDS:.0f} s: "
           f"{'met' if goal <= GOAL_SECONDS else 'MISSED'})", goal)
    report("units + every notebook, strict nbval", timed_pytest("tests/unit", "tests/test_notebooks.py", *notebooks))
    report("unit tests and notebook house rules alone", timed_pytest("tests/unit", "tests/test_notebooks.py"))
    for notebook in notebooks:
        report(f"{Path(notebook).name} alone", timed_pytest(notebook))
    _report.write(args.markdown, "suite_time.py", "\n".join(rows),
                  note="Each line is one `pytest` process, so each includes starting Python and the kernels.")


if __name__ == "__main__":
    main()
