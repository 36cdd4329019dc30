"""How much a last-bit difference grows over training, in float32 and in float64.

Two CPUs that run other floating-point kernels differ, at first, by about one
rounding: one unit in the last place (ulp) of the working precision. Training
repeats a map hundreds of times and can amplify such a difference. This script
measures the amplification on three of the book's own runs: it trains each one
twice, once from its inputs and once from inputs moved up by one ulp, and
reports the largest relative difference of the loss that the two runs print,
after 1, 10, 100 and all steps, in float32 and in float64. The appendix page
"Reproducibility" shows the table.

    python tools/float_drift.py --markdown benchmarks/results/float_drift.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import lora_tutorial as lt
from lora_tutorial.digits import Split

ROOT = Path(__file__).resolve().parent.parent


def nudged(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every entry moved up by one unit in the last place."""
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def demo_layer(dtype: torch.dtype, nudge: bool) -> list[float]:
    """Chapter 1: the demo's naive rank-4 layer, 500 full-batch Adam steps at lr 0.01."""
    stream = torch.Generator().manual_seed(42)
    x, y = lt.create_toy_dataset(seed=stream)
    model = lt.LoRALayer(64, 10, rank=4, seed=stream).to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    return lt.train(model, nudged(x) if nudge else x, y, steps=500, lr=0.01, optimizer="adam")


def head_on_features(dtype: torch.dtype, nudge: bool) -> list[float]:
    """Chapter 3: the book's rank-8 adapter on frozen features, no dropout, 600 AdamW steps."""
    task, model = lt.pretrained_tiny_adapter(dtype=dtype)
    with torch.no_grad():
        features = model.features(task.x_train)
    head = model.head
    head.dropout_p = 0.0
    head.base.bias.requires_grad_(True)
    stats = lt.FeatureStats.from_data(nudged(features) if nudge else features, task.y_new_train)
    return lt.fit_lora_on_stats(head, stats, steps=600, lr=5e-3, record="mse")


def digits_near_divergence(dtype: torch.dtype, nudge: bool) -> list[float]:
    """Chapter 5's setting: the digits MLP, LoRA rank 4 and a new head, lr 0.04 (near divergence)."""
    source, target = lt.load_digit_tasks(seed=0)
    model = lt.DigitsMLP(n_classes=5, seed=1).to(dtype)
    lt.pretrain_digits(model, Split(source.train.x.to(dtype), source.train.y), steps=200)
    model.requires_grad_(False)
    model.head = lt.make_linear(model.head.in_features, 5, seed=1).to(dtype)
    lt.add_lora(model, ["fc1", "fc2", "fc3"], r=4, alpha=8.0, modules_to_save=["head"], seed=1)
    x = target.train.x.to(dtype)
    return lt.train(model, nudged(x) if nudge else x, target.train.y, steps=100, lr=0.04,
                    loss_fn=F.cross_entropy)


CASES: dict[str, Callable[[torch.dtype, bool], list[float]]] = {
    "chapter 1: naive layer, 500 Adam steps": demo_layer,
    "chapter 3: adapter on frozen features, 600 steps": head_on_features,
    "chapter 5: digits MLP at lr 0.04, 100 steps": digits_near_divergence,
}


def drift(case: Callable[[torch.dtype, bool], list[float]], dtype: torch.dtype) -> list[float]:
    """Relative difference of the loss, step by step, between the run and its nudged twin."""
    a, b = case(dtype, False), case(dtype, True)
    return [abs(u - v) / abs(u) for u, v in zip(a, b)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        f"Measured on {date.today().isoformat()} ({platform.machine()}, torch {torch.__version__},"
        f" {torch.backends.cpu.get_cpu_capability()} kernels) by"
        " `python tools/float_drift.py --markdown benchmarks/results/float_drift.md`.",
        "",
        "Largest relative difference of the training loss between a run and its twin whose"
        " inputs were moved up by one unit in the last place:",
        "",
        "| run | precision | after 1 step | after 10 | after 100 | after the last |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, case in CASES.items():
        for dtype in (torch.float32, torch.float64):
            d = drift(case, dtype)
            upto = [max(d[:k]) for k in (1, 10, 100)] + [max(d)]
            lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | "
                         + " | ".join(f"{v:.0e}" for v in upto) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
