"""How long the test suite takes: units plus every notebook under strict nbval, then each notebook alone.

Usage: python benchmarks/suite_time.py   (from the repository root, in the project's environment)

The goal (issue 3): the whole `pytest --nbval` run of units and notebooks within 90 s
on the 2-core CI machine. The browser tests of the rendered book are not part of this
figure (they need the built book; `make test` runs them too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
    notebooks = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
    print(f"machine: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}")
    total = timed_pytest("tests/unit", "tests/test_notebooks.py", *notebooks)
    verdict = "within" if total <= GOAL_SECONDS else "OVER"
    print(f"units + all notebooks (strict nbval): {total:6.1f} s  ({verdict} the {GOAL_SECONDS:.0f} s goal)")
    print(f"  unit tests alone:                   {timed_pytest('tests/unit', 'tests/test_notebooks.py'):6.1f} s")
    for notebook in notebooks:
        print(f"  {Path(notebook).name:36s} {timed_pytest(notebook):6.1f} s")


if __name__ == "__main__":
    main()
