"""Run every chapter under the portability matrix and report what it prints differently.

A reader's machine runs other floating-point kernels than the one that executed the
notebooks: another SIMD width (PyTorch picks AVX-512, AVX2 or plain code at start-up),
another thread count, another BLAS code path. Strict nbval compares every printed
character, so every printed number must be one that all of them reproduce. This tool
executes each chapter in a fresh kernel under each environment of the matrix below,
compares every output nbval compares (after nbval's own sanitisers) with the stored
one, and reports each printed number that differs, with its values and spread.

    python tools/portability.py                      # every chapter, every environment
    python tools/portability.py notebooks/01_naive_lora.ipynb --env default
    python tools/portability.py --report portability.md
    python tools/portability.py --checkpoints      # the shipped checkpoints' spread

``make portability`` runs the first form. ``--checkpoints`` retrains the recipes
behind the shipped checkpoints under each environment and reports how far each
lands from the stored values: the unit tests that check the checkpoints derive
their tolerances from this measurement. The exit status is 1 when any output
differs from the stored notebook, 0 otherwise.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent

#: The environments every chapter must print the same numbers under.
MATRIX: dict[str, dict[str, str]] = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},  # no SIMD kernels
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},  # MKL's portable code path
    "one-thread": {"OMP_NUM_THREADS": "1"},
}

#: Every variable the matrix sets (and MKL's thread count, which follows OMP's).
MATRIX_KEYS = {key for env in MATRIX.values() for key in env} | {"MKL_NUM_THREADS"}

#: Output keys nbval leaves out of its comparison (nbval 0.11, without nbdime).
SKIP_KEYS = {
    "metadata", "traceback", "prompt_number", "output_type", "name",
    "execution_count", "application/vnd.jupyter.widget-view+json",
    "image/png", "image/jpeg",
}

#: A printed number: an optional sign, digits with thousands commas, a fraction,
#: an exponent.
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def sanitizers() -> list[tuple[re.Pattern[str], str]]:
    """nbval's sanitisers, read from ``tests/sanitize.cfg``."""
    config = configparser.ConfigParser()
    config.read(ROOT / "tests" / "sanitize.cfg")
    return [(re.compile(config[s]["regex"]), config[s]["replace"]) for s in config.sections()]


def comparable(outputs: list[dict], patterns: list[tuple[re.Pattern[str], str]]) -> str:
    """One cell's outputs as nbval compares them: streams joined, skipped keys left out."""
    merged: list[dict] = []
    for out in outputs:  # nbval joins consecutive outputs of one stream
        if (out.get("output_type") == "stream" and merged
                and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + out["text"]}
        else:
            merged.append(dict(out))
    parts = []
    for out in merged:
        for key, value in sorted(out.items()):
            if key in SKIP_KEYS:
                continue
            items = sorted(value.items()) if key == "data" else [(key, value)]
            for sub, text in items:
                if sub in SKIP_KEYS:
                    continue
                text = "".join(text) if isinstance(text, list) else str(text)
                if not isinstance(text, str):
                    text = json.dumps(text, sort_keys=True)
                for regex, replace in patterns:
                    text = regex.sub(replace, text)
                parts.append(f"[{sub}]\n{text}")
    return "\n".join(parts)


def cell_outputs(nb: nbformat.NotebookNode) -> dict[int, str]:
    patterns = sanitizers()
    return {i: comparable(c.get("outputs", []), patterns)
            for i, c in enumerate(nb.cells) if c.cell_type == "code"}


def execute(path: Path, env: dict[str, str], timeout: int = 900) -> tuple[dict[int, str], float, str]:
    """Execute a copy of one notebook in a fresh kernel under ``env``."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            allow_errors=True)
    start = time.perf_counter()
    # Start from this process's environment without the matrix's own settings,
    # so that "native" is native even when the caller exported one of them.
    base = {k: v for k, v in os.environ.items() if k not in MATRIX_KEYS}
    client.execute(env={**base, **env})
    elapsed = time.perf_counter() - start
    errors = [f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
              for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return cell_outputs(nb), elapsed, "; ".join(errors)


@dataclass
class Difference:
    """One printed number (or line) that differs between environments."""
    chapter: str
    cell: int
    context: str
    values: dict[str, str] = field(default_factory=dict)

    def spread(self) -> float | None:
        try:
            numbers = [float(v.replace(",", "")) for v in self.values.values()]
        except ValueError:
            return None
        return max(numbers) - min(numbers)


def number_differences(chapter: str, cell: int, runs: dict[str, str]) -> list[Difference]:
    """Line by line, the numbers that differ among ``runs`` (environment -> text)."""
    names = list(runs)
    lines = {name: runs[name].splitlines() for name in names}
    found: list[Difference] = []
    for k in range(max(len(v) for v in lines.values())):
        row = {name: lines[name][k] if k < len(lines[name]) else "" for name in names}
        if len(set(row.values())) == 1:
            continue
        skeletons = {NUMBER.sub("#", line) for line in row.values()}
        tokens = {name: NUMBER.findall(line) for name, line in row.items()}
        if len(skeletons) == 1:
            for j in range(len(next(iter(tokens.values())))):
                values = {name: tokens[name][j] for name in names}
                if len(set(values.values())) > 1:
                    context = NUMBER.sub("#", row[names[0]]).strip()[:60]
                    found.append(Difference(chapter, cell, context, values))
        else:
            found.append(Difference(chapter, cell, "text differs",
                                    {name: line.strip()[:40] for name, line in row.items()}))
    return found


#: Run under each environment by ``--checkpoints``: one JSON line of deviations.
CHECKPOINT_PROBE = """
import json, torch
from safetensors import safe_open
import lora_tutorial as lt
from lora_tutorial import charlm
from lora_tutorial.pretraining import _checkpoint_path
out = {}
for head in (False, True):
    task, model = lt.source_setup()
    history = lt.pretrain(model, task.x_train, task.y_old_train, train_head=head)
    _, shipped = lt.pretrained_tiny_adapter(train_head=head)
    live = model.state_dict()
    out[f"TinyAdapter (head {'pretrained' if head else 'frozen'}): weights after 800 steps"] = max(
        (live[k] - v).abs().max().item() for k, v in shipped.state_dict().items())
    with safe_open(str(_checkpoint_path(head)), "pt") as f:
        first = json.loads((f.metadata() or {}).get("first_losses", "[]"))
    if first:
        out[f"TinyAdapter (head {'pretrained' if head else 'frozen'}): first {len(first)} losses"] = max(
            abs(a - b) for a, b in zip(history, first))
with safe_open(str(charlm.CHECKPOINT_PATH), "pt") as f:
    first = json.loads(f.metadata()["first_losses"])
_, history = charlm.pretrain_char_gpt2(charlm.numpy_docstrings(charlm.CharTokenizer()),
                                       **charlm.PRETRAIN, stop_after=len(first))
out[f"character GPT-2: first {len(first)} losses"] = max(abs(a - b) for a, b in zip(history, first))
print(json.dumps(out))
"""


def checkpoint_spread(envs: list[str]) -> str:
    """Retrain the shipped checkpoints' recipes under each environment; tabulate the deviations."""
    import subprocess

    base = {k: v for k, v in os.environ.items() if k not in MATRIX_KEYS}
    rows: dict[str, dict[str, float]] = {}
    for env in envs:
        done = subprocess.run([sys.executable, "-c", CHECKPOINT_PROBE], env={**base, **MATRIX[env]},
                              capture_output=True, text=True, check=True, cwd=ROOT)
        for what, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
            rows.setdefault(what, {})[env] = value
        print(f"  checkpoints [{env}]: done", flush=True)
    lines = ["| recipe, compared with the stored values | " + " | ".join(envs) + " | largest |",
             "| --- | " + " | ".join("---:" for _ in envs) + " | ---: |"]
    for what, by_env in rows.items():
        lines.append(f"| {what} | " + " | ".join(f"{by_env[e]:.1e}" for e in envs)
                     + f" | {max(by_env.values()):.1e} |")
    return "\n".join(lines) + "\n"


def measured_on(argv: list[str] | None) -> str:
    """When, where and by which command a report was made (one sentence)."""
    import datetime
    import platform

    import torch

    command = "python tools/portability.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    return (f"Measured on {datetime.date.today().isoformat()} ({platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}) with `{command}`.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--env", action="append", choices=list(MATRIX),
                        help="an environment of the matrix (repeatable; default: all)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="kernels at once (timings are then not comparable; more jobs than "
                             "cores / threads oversubscribes OpenMP and can be ten times slower)")
    parser.add_argument("--report", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--checkpoints", action="store_true",
                        help="measure the shipped checkpoints' recipes instead of the chapters")
    args = parser.parse_args(argv)
    if args.checkpoints:
        table = checkpoint_spread(args.env or list(MATRIX))
        table = f"{measured_on(argv)}\n\n{table}"
        print(table)
        if args.report:
            args.report.write_text(table)
        return 0
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    envs = args.env or list(MATRIX)

    jobs = [(path, env) for path in paths for env in envs]
    def run(job):
        path, env = job
        outputs, elapsed, errors = execute(path, MATRIX[env])
        print(f"  {path.stem} [{env}]: {elapsed:.1f} s" + (f"  ERRORS: {errors}" if errors else ""),
              flush=True)
        return job, (outputs, elapsed, errors)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(pool.map(run, jobs))

    lines = [f"{measured_on(argv)[:-1]}: {len(paths)} chapters, each executed in a fresh "
             "kernel under each environment; every output nbval compares, after its "
             "sanitisers, compared with the stored notebook.", "",
             "| environment | settings | cells compared | cells that differ | errors |",
             "| --- | --- | ---: | ---: | --- |"]
    differences: list[Difference] = []
    failed = False
    for env in envs:
        compared = differ = 0
        errs = []
        for path in paths:
            stored = cell_outputs(nbformat.read(path, as_version=4))
            outputs, _, errors = results[path, env]
            compared += len(stored)
            differ += sum(stored[i] != outputs.get(i) for i in stored)
            if errors:
                errs.append(f"{path.stem}: {errors}")
        failed |= bool(differ or errs)
        settings = " ".join(f"{k}={v}" for k, v in MATRIX[env].items()) or "(as installed)"
        lines.append(f"| {env} | {settings} | {compared} | {differ} | {'; '.join(errs) or 'none'} |")
    for path in paths:
        stored = cell_outputs(nbformat.read(path, as_version=4))
        for i in stored:
            runs = {"stored": stored[i], **{env: results[path, env][0].get(i, "") for env in envs}}
            if len(set(runs.values())) > 1:
                differences.extend(number_differences(path.stem, i, runs))
    lines += ["", "**Printed values that differ.**", ""]
    if differences:
        lines += ["| chapter | cell | line | " + " | ".join(["stored", *envs]) + " | spread |",
                  "| --- | ---: | --- | " + " | ".join("---" for _ in ["stored", *envs]) + " | ---: |"]
        for d in differences:
            spread = d.spread()
            lines.append(f"| {d.chapter} | {d.cell} | `{d.context}` | "
                         + " | ".join(f"`{d.values.get(n, '')}`" for n in ["stored", *envs])
                         + f" | {'' if spread is None else f'{spread:.3g}'} |")
        spreads = [(d.spread(), d) for d in differences if d.spread() is not None]
        if spreads:
            top, d = max(spreads, key=lambda item: item[0])
            lines += ["", f"Largest spread: {top:.3g} ({d.chapter}, cell {d.cell}, `{d.context}`)."]
    else:
        lines.append("None: every environment printed exactly the stored outputs.")
    times = {env: sum(results[p, env][1] for p in paths) for env in envs}
    lines += ["", "Run time: " + ", ".join(f"{env} {t:.0f} s" for env, t in times.items()) + "."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
