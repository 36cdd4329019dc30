"""Run chapter 9's sweeps over its draws, seeds and learning rates; store the results.

Chapter 9 measures the DoRA paper's slope of Delta M on Delta D, and compares DoRA
with LoRA, for three methods tuned per seed over five learning rates, on five
seeds of each of three draws of the task and the pretrained network: 225
fine-tuning runs, about a minute of CPU time, too many for a chapter that must run
in 25 s. So this script runs them (``lora_tutorial.book.dora_lab``) and writes
``lora_tutorial/book/data/dora_sweeps.json``; the chapter loads that file,
re-runs some of its runs live and asserts agreement, and
``tests/unit/test_dora_lab.py`` re-runs one stored run.

    python tools/make_dora_sweeps.py                 # into the package
    python tools/make_dora_sweeps.py --out /tmp/d.json

It takes about a minute of CPU time on one thread; on a shared machine run it
with ``nice``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_tutorial.book import dora_lab  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=dora_lab.SWEEPS_FILE)
    args = parser.parse_args()
    start = time.process_time()

    def progress(message: str) -> None:
        print(f"{time.process_time() - start:7.1f}s  {message}", flush=True)

    runs = dora_lab.run_all(progress)
    about = {"made_by": "tools/make_dora_sweeps.py",
             "torch": torch.__version__.split("+")[0], "dtype": "torch.float64"}
    dora_lab.save_sweeps(runs, about, args.out)
    print(f"wrote {args.out} ({time.process_time() - start:.0f}s of CPU time)")


if __name__ == "__main__":
    main()
