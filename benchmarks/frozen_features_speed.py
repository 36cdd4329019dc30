"""Three ways to fine-tune chapter 3's head for 600 steps, timed.

1. the source's way: the whole model in the loop, so the frozen backbone runs every step;
2. the book's chapter-3 way: the backbone's features computed once, the head trained on them;
3. `fit_lora_on_stats`: the head trained on the features' statistics (expected dropout).

Usage: python benchmarks/frozen_features_speed.py [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import _report
import lora_tutorial as lt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the results as a Markdown table to this file")
    args = parser.parse_args()
    task, model = lt.pretrained_tiny_adapter()
    lt.mark_only_lora_as_trainable(model, bias="lora_only")
    lt.train(copy.deepcopy(model.head), torch.zeros(8, 256), torch.zeros(8, 16), steps=1, lr=1e-3)  # warm-up

    runs = {}
    whole = copy.deepcopy(model)
    start = time.perf_counter()
    lt.train(whole, task.x_train, task.y_new_train, steps=600, lr=5e-3)
    runs["whole model every step (the source)"] = (time.perf_counter() - start, lt.evaluate(whole, task.x_val, task.y_new_val))

    head = copy.deepcopy(model.head)
    start = time.perf_counter()
    with torch.no_grad():
        feats = model.features(task.x_train)
    lt.train(head, feats, task.y_new_train, steps=600, lr=5e-3)
    with torch.no_grad():
        val_feats = model.features(task.x_val)
    runs["features once, head trained on them"] = (time.perf_counter() - start, lt.evaluate(head, val_feats, task.y_new_val))

    head = copy.deepcopy(model.head)
    start = time.perf_counter()
    with torch.no_grad():
        feats = model.features(task.x_train)
    lt.fit_lora_on_stats(head, lt.FeatureStats.from_data(feats, task.y_new_train), steps=600, lr=5e-3)
    runs["fit_lora_on_stats"] = (time.perf_counter() - start, lt.evaluate(head, val_feats, task.y_new_val))

    base = runs["whole model every step (the source)"][0]
    rows = ["| 600 fine-tuning steps of chapter 3's head | time (s) | speed-up (×) | validation loss |",
            "| --- | ---: | ---: | ---: |"]
    for name, (seconds, val) in runs.items():
        print(f"{name:38s} {seconds:7.2f} s  ({base / seconds:6.1f}x)   validation loss {val:.4f}")
        rows.append(f"| {name} | {seconds:.2f} | {base / seconds:.1f} | {val:.4f} |")
    _report.write(args.markdown, "frozen_features_speed.py", "\n".join(rows))


if __name__ == "__main__":
    main()
