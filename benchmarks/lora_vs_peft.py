"""The book's LoRALinear against PEFT's LoRA Linear and plain nn.Linear, on the CPU, in one process.

For each shape (out x in), with r = 8 and a batch of 256 rows:

* a training step: forward, mean of the output as the loss, backward (for the LoRA
  layers only the adapter trains; for nn.Linear its weight and bias do);
* an inference forward pass, in evaluation mode under torch.inference_mode().

Contenders run interleaved: in each round every contender runs `--iters` times in a
shuffled order, so slow drifts of the machine hit all of them alike; the figure for a
contender is the median over rounds of its per-iteration time. Ratios compare medians.

Usage:
    python benchmarks/lora_vs_peft.py                 # prints the table
    python benchmarks/lora_vs_peft.py --markdown FILE # also writes it for the book's appendix,
                                                      # and FILE with .json for chapter 6's figure

Goals (issue 5): from-scratch training step <= 1.05x PEFT's; merged inference <= 1.02x
nn.Linear; unmerged inference <= 1.15x nn.Linear at 4096x4096.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import _report
import lora_tutorial as lt

warnings.filterwarnings("ignore", category=FutureWarning)
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

R, BATCH = 8, 256


def contenders(d_in: int, d_out: int) -> dict[str, nn.Module]:
    """The four layers, with identical base weights and adapters."""
    g = torch.Generator().manual_seed(0)
    linear = lt.make_linear(d_in, d_out, seed=g)
    ours = lt.LoRALinear.from_linear(copy.deepcopy(linear), r=R, alpha=16.0, dropout=0.0, init="kaiming", seed=g)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.01, generator=g)
    merged = copy.deepcopy(ours)
    merged.merge_weights_()
    holder = inject_adapter_in_model(
        LoraConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=["layer"]),
        nn.ModuleDict({"layer": copy.deepcopy(linear)}),
    )
    peft_layer = holder["layer"]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    return {"nn.Linear": linear, "LoRALinear": ours, "LoRALinear (merged)": merged, "PEFT lora.Linear": peft_layer}


def train_step(layer: nn.Module, x: torch.Tensor) -> None:
    layer(x).mean().backward()
    for p in layer.parameters():
        p.grad = None


def infer(layer: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        layer(x)


def measure(shape: tuple[int, int], rounds: int, iters: int) -> dict[tuple[str, str], float]:
    d_out, d_in = shape
    layers = contenders(d_in, d_out)
    x = torch.randn(BATCH, d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # sanity: the same function everywhere
        ref = layers["LoRALinear"].eval()(x)
        for name, layer in layers.items():
            if name != "nn.Linear":
                assert torch.allclose(layer.eval()(x), ref, atol=1e-4), name
    jobs = []
    for name, layer in layers.items():
        if name != "LoRALinear (merged)":  # a merged layer cannot train: it refuses
            jobs.append(("train step", name, layer, train_step))
        jobs.append(("inference", name, layer, infer))
    rng = random.Random(0)
    samples: dict[tuple[str, str], list[float]] = {(kind, name): [] for kind, name, _, _ in jobs}
    for job in jobs:  # warm-up
        job[2].train(job[0] == "train step")
        job[3](job[2], x)
    for _ in range(rounds):
        rng.shuffle(jobs)
        for kind, name, layer, fn in jobs:
            layer.train(kind == "train step")
            start = time.perf_counter()
            for _ in range(iters):
                fn(layer, x)
            samples[kind, name].append((time.perf_counter() - start) / iters)
    return {key: statistics.median(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--markdown", help="also write the results as a Markdown table to this file")
    args = parser.parse_args(argv)

    import peft

    header = (f"peft {peft.__version__}; r = {R}, batch {BATCH}; {args.rounds} rounds of {args.iters} "
              f"iterations per contender, interleaved; medians")
    print(f"{_report.machine()}; {header}")
    names = ("nn.Linear", "LoRALinear", "LoRALinear (merged)", "PEFT lora.Linear")
    times = ["| shape | measurement | nn.Linear (ms) | LoRALinear (ms) | LoRALinear merged (ms) | PEFT (ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    goals = ["| goal | shape | measured | verdict |", "| --- | --- | ---: | --- |"]
    verdicts = []
    results: dict = {"settings": {"peft": peft.__version__, "r": R, "batch": BATCH, "rounds": args.rounds,
                                  "iters": args.iters},
                     "times_ms": {}, "goals": []}
    for shape in ((1024, 1024), (4096, 4096)):
        t = measure(shape, args.rounds, args.iters)
        label = f"{shape[0]}×{shape[1]}"
        for kind in ("train step", "inference"):
            cells = [f"{1e3 * t[kind, name]:.2f}" if (kind, name) in t else "—" for name in names]
            results["times_ms"].setdefault(label, {})[kind] = {
                name: round(1e3 * t[kind, name], 4) for name in names if (kind, name) in t}
            times.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
        checks = [("training step: LoRALinear / PEFT ≤ 1.05",
                   t["train step", "LoRALinear"] / t["train step", "PEFT lora.Linear"], 1.05),
                  ("inference: merged LoRALinear / nn.Linear ≤ 1.02",
                   t["inference", "LoRALinear (merged)"] / t["inference", "nn.Linear"], 1.02)]
        if shape == (4096, 4096):
            checks.append(("inference: unmerged LoRALinear / nn.Linear ≤ 1.15",
                           t["inference", "LoRALinear"] / t["inference", "nn.Linear"], 1.15))
        for goal, ratio, limit in checks:
            verdicts.append(ratio <= limit)
            goals.append(f"| {goal} | {label} | {ratio:.3f} | {'met' if ratio <= limit else 'MISSED'} |")
            results["goals"].append({"goal": goal, "shape": label, "ratio": round(ratio, 4),
                                     "met": ratio <= limit})
    lines = times + [""] + goals
    table = "\n".join(lines)
    print(table)
    _report.write(args.markdown, "lora_vs_peft.py", table, note=header + ".")
    _report.write_json(args.markdown, "lora_vs_peft.py", results)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
