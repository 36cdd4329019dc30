"""What DoRA's magnitude costs: a training step of DoRA against LoRA at the same rank.

Two settings, each with LoRA and DoRA adapters of the same rank and identical weights:

* chapter 9's: the digits MLP (64 → 64 → 64 → 64 → 5) adapted on every layer at the
  chapter's rank 4 (alpha 8), a batch of 64 of the target task's training images, in
  float64 as the chapter trains;
* one 1024 × 1024 linear layer at rank 8, a batch of 256 rows, in float32.

A step is a forward pass, the loss, the backward pass and an AdamW update. DoRA
recomputes the norm of ``W0 + sBA`` per output unit at every step (as PEFT does),
which costs a matrix the size of the weight. Contenders run interleaved: in each
round every contender runs `--iters` steps in a shuffled order; the figure is the
median over rounds of the per-step time.

Usage:
    python benchmarks/dora_step.py                 # prints the table
    python benchmarks/dora_step.py --markdown FILE # also writes it for the book's appendix
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import _report
import lora_tutorial as lt
from lora_tutorial import book  # noqa: F401  (quiets bitsandbytes' hub message)

R_DIGITS = 4  # chapter 9's rank, alpha 8, batches of 64
R_LAYER = 8


def digits_setting():
    _, target, base = lt.pretrained_digits_mlp(seed=0)
    base = base.double()
    x, y = target.train.x[:64].double(), target.train.y[:64]
    models = {kind: lt.add_lora(copy.deepcopy(base), ["fc1", "fc2", "fc3", "head"],
                                r=R_DIGITS, alpha=8.0, use_dora=kind == "DoRA", seed=1)
              for kind in ("LoRA", "DoRA")}
    return models, x, lambda out: F.cross_entropy(out, y)


def layer_setting():
    linear = lt.make_linear(1024, 1024, seed=0)
    holder = {kind: nn.Sequential(copy.deepcopy(linear)) for kind in ("LoRA", "DoRA")}
    models = {kind: lt.add_lora(m, ["0"], r=R_LAYER, use_dora=kind == "DoRA", seed=1)
              for kind, m in holder.items()}
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
    return models, x, lambda out: out.square().mean()


def measure(setting, rounds: int, iters: int) -> dict[str, float]:
    models, x, loss_fn = setting()
    steps = {}
    for kind, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            loss_fn(model(x)).backward()
            optimizer.step()

        steps[kind] = step
    return _report.interleaved(steps, rounds, iters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, two threads measure "
                             "the other processes' load as much as this code)")
    parser.add_argument("--markdown", help="also write the results as a Markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    load = os.getloadavg()[0]
    header = (f"r = {R_DIGITS} on the digits, {R_LAYER} on the layer; {args.rounds} rounds of {args.iters} steps per contender, "
              f"interleaved; medians; {args.threads} thread(s); load average {load:.1f} when started")
    print(f"{_report.machine()}; {header}")
    lines = ["| setting | LoRA step (ms) | DoRA step (ms) | DoRA / LoRA |",
             "| --- | ---: | ---: | ---: |"]
    for label, setting in (("digits MLP, every layer, r 4, batch 64, float64 (chapter 9)",
                            digits_setting),
                           ("1024 × 1024 layer, r 8, batch 256, float32", layer_setting)):
        t = measure(setting, args.rounds, args.iters)
        lines.append(f"| {label} | {1e3 * t['LoRA']:.2f} | {1e3 * t['DoRA']:.2f} | "
                     f"{t['DoRA'] / t['LoRA']:.2f} |")
    table = "\n".join(lines)
    print(table)
    _report.write(args.markdown, "dora_step.py", table, note=header + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
