"""Run chapter 5's sweeps over its seeds and store the results the chapter reads.

Chapter 5 decides seven claims by the book's rule, over ten seeds, with each
arm's learning rate tuned on validation data: 2,300 fine-tuning runs, many
minutes of CPU time, too many for a chapter that must run in 25 s. So
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
    python tools/make_digits_sweeps.py --add           # only the seeds the file lacks

With ``--add`` the script keeps the runs of the seeds the existing file already
holds (its sweeps must be today's ``SWEEPS``), runs only the seeds of
``dl.SEEDS`` it lacks (both ways), and recomputes claim 7's similarities, which
pair each seed with the next, over all of ``dl.SEEDS`` (a few dozen runs).

It takes about twenty minutes of CPU time on one thread, each way; on a shared machine run it
with ``nice``.
"""

from __future__ import annotations

import argparse
import json
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


def run_all(label: str, seeds: tuple[int, ...] = dl.SEEDS) -> tuple[dict, dict]:
    """Every sweep on ``seeds`` and claim 7's similarities over ``dl.SEEDS``, in this process."""
    start = time.process_time()

    def progress(message: str) -> None:
        print(f"[{label}] {time.process_time() - start:7.1f}s  {message}", flush=True)

    with dl.torch_threads(1):
        labs = {seed: dl.DigitsLab.create(seed=seed) for seed in dl.SEEDS}
        some = {seed: labs[seed] for seed in seeds}
        results = {name: dl.run_sweep(spec, some, progress) for name, spec in dl.SWEEPS.items()}
        updates = {seed: {r: delta for r, (delta, _) in dl.fc1_updates(lab, seed).items()}
                   for seed, lab in labs.items()}
        similarity = dl.similarity_summary(updates, labs[dl.SEEDS[0]].target.train.x)
    return results, similarity


def read_stored(path: Path) -> tuple[tuple[int, ...], dict, dict]:
    """The seeds, runs and other-kernel runs of an existing file (sweeps as today's).

    Returns ``(seeds, results, elsewhere)``, ``elsewhere`` in full (the stored
    runs with those that moved under the other kernels replaced).
    """
    data = json.loads(path.read_text())
    seeds = tuple(data["seeds"])
    results: dict = {}
    elsewhere: dict = {}
    for name, spec in dl.SWEEPS.items():
        stored = data["sweeps"][name]
        if (stored["arms"] != [dl._arm_to_json(a) for a in spec.arms]
                or tuple(stored["lrs"]) != spec.lrs or stored["steps"] != spec.steps):
            raise SystemExit(f"{path}: sweep {name!r} has other settings; run without --add")
        by_arm: dict = {(arm, seed): {} for arm in spec.arms for seed in seeds}
        for run in stored["runs"]:
            by_arm[spec.arms[run["arm"]], run["seed"]][run["lr"]] = dl._outcome(run)
        moved = {key: dict(by_lr) for key, by_lr in by_arm.items()}
        for run in data["elsewhere"]["runs"][name]:
            moved[spec.arms[run["arm"]], run["seed"]][run["lr"]] = dl._outcome(run)
        results[name], elsewhere[name] = by_arm, moved
    return seeds, results, elsewhere


def merge(old: dict, new: dict) -> dict:
    """``{sweep: {(arm, seed): runs}}`` of both, in the order of ``dl.SWEEPS`` and ``dl.SEEDS``."""
    out = {}
    for name, spec in dl.SWEEPS.items():
        both = {**old[name], **new[name]}
        out[name] = {(arm, seed): both[arm, seed] for arm in spec.arms for seed in dl.SEEDS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=dl.SWEEPS_FILE)
    parser.add_argument("--add", action="store_true",
                        help="run only the seeds of dl.SEEDS that the file at --out lacks")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--seeds", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.child is not None:  # the second run, under the other kernels
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
        args.child.write_bytes(pickle.dumps(run_all("other kernels", seeds)))
        return
    start = time.process_time()
    old_seeds: tuple[int, ...] = ()
    if args.add:
        old_seeds, old, old_elsewhere = read_stored(args.out)
        if not set(old_seeds) <= set(dl.SEEDS):
            raise SystemExit(f"{args.out} holds seeds {old_seeds} not in dl.SEEDS; "
                             "run without --add")
    seeds = tuple(s for s in dl.SEEDS if s not in old_seeds)
    with tempfile.TemporaryDirectory() as tmp:
        child_out = Path(tmp) / "other.pickle"
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        child = subprocess.Popen([sys.executable, __file__, "--child", str(child_out),
                                  "--seeds", ",".join(map(str, seeds))],
                                 env={**env, **dl.OTHER_KERNELS})
        results, similarity = run_all("native", seeds)
        if child.wait() != 0:
            raise SystemExit(f"the run under {dl.OTHER_KERNELS} failed")
        elsewhere, similarity_elsewhere = pickle.loads(child_out.read_bytes())
    if args.add:
        results, elsewhere = merge(old, results), merge(old_elsewhere, elsewhere)
    about = {"made_by": "tools/make_digits_sweeps.py", "torch": torch.__version__.split("+")[0],
             "dtype": str(dl.DTYPE), "split_seed": dl.SPLIT_SEED}
    dl.save_sweeps(results, similarity, elsewhere, similarity_elsewhere, args.out, about)
    print(f"wrote {args.out} ({time.process_time() - start:.0f}s of CPU time here)")


if __name__ == "__main__":
    main()
