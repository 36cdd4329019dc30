"""Run chapter 5's sweeps over its seeds and store the results the chapter reads.

Chapter 5 decides seven claims by the book's rule, over five seeds, with each
arm's learning rate tuned on validation data: about a thousand fine-tuning runs,
several minutes of CPU time, too many for a chapter that must run in 25 s. So
this script runs them (the sweeps are defined once, in
``lora_tutorial.book.digits_lab.SWEEPS``) and writes
``lora_tutorial/book/data/digits_sweeps.json``; the chapter loads that file,
re-runs a seeded-random part of it live and asserts agreement, and
``tests/unit/test_digits_lab.py`` checks that the file is current.

Everything runs in float64, yet runs at learning rates near the edge of
stability are chaotic: the last bits that differ between CPU kernels grow until
the run ends elsewhere. So the script runs every sweep a second time in a child
process under PyTorch's plain kernels (``digits_lab.OTHER_KERNELS``) and stores
the runs that come out differently; the chapter checks that its verdicts do not
depend on them.

    python tools/make_digits_sweeps.py                 # both runs, into the package
    python tools/make_digits_sweeps.py --out /tmp/s.json

It takes about ten minutes of CPU time on one thread; on a shared machine run it
with ``nice``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_tutorial.book import digits_lab as dl  # noqa: E402


def run_all(label: str) -> tuple[dict, dict]:
    """Every sweep and claim 7's similarities, in this process."""
    start = time.process_time()

    def progress(message: str) -> None:
        print(f"[{label}] {time.process_time() - start:7.1f}s  {message}", flush=True)

    with dl.torch_threads(1):
        labs = {seed: dl.DigitsLab.create(seed=seed) for seed in dl.SEEDS}
        results = {name: dl.run_sweep(spec, labs, progress) for name, spec in dl.SWEEPS.items()}
        updates = {seed: {r: delta for r, (delta, _) in dl.fc1_updates(lab, seed).items()}
                   for seed, lab in labs.items()}
        similarity = dl.similarity_summary(updates, labs[dl.SEEDS[0]].target.train.x)
    return results, similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=dl.SWEEPS_FILE)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.child is not None:  # the second run, under the other kernels
        args.child.write_bytes(pickle.dumps(run_all("other kernels")))
        return
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        child_out = Path(tmp) / "other.pickle"
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        child = subprocess.Popen([sys.executable, __file__, "--child", str(child_out)],
                                 env={**env, **dl.OTHER_KERNELS})
        results, similarity = run_all("native")
        if child.wait() != 0:
            raise SystemExit(f"the run under {dl.OTHER_KERNELS} failed")
        elsewhere, similarity_elsewhere = pickle.loads(child_out.read_bytes())
    about = {"made_by": "tools/make_digits_sweeps.py", "torch": torch.__version__.split("+")[0],
             "dtype": str(dl.DTYPE), "split_seed": dl.SPLIT_SEED}
    dl.save_sweeps(results, similarity, elsewhere, similarity_elsewhere, args.out, about)
    print(f"wrote {args.out} ({time.process_time() - start:.0f}s of CPU time here)")


if __name__ == "__main__":
    main()
