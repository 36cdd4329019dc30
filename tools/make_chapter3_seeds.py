"""Chapter 3's two comparisons, repeated over five draws of the source's set-up.

Chapter 3 compares the source's pretraining (head frozen) with a pretraining of
the head too, and fine-tuning with and without dropout, on the book's own run.
One run is one draw of the teacher, the data and the initial weights; this script
repeats both comparisons for ``lt.source_setup(seed)`` with seeds 0 to 4 (800
pretraining steps each, twice, so it takes minutes) and writes the numbers the
chapter decides its verdicts from. Seed 0 is the chapter's own run, which the
chapter checks against the shipped checkpoints live.

    python tools/make_chapter3_seeds.py   # writes lora_tutorial/book/data/chapter3_seeds.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

import lora_tutorial as lt

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "lora_tutorial" / "book" / "data" / "chapter3_seeds.json"
SEEDS = range(5)


def fine_tune(model: lt.TinyAdapter, task: lt.AdaptationTask, dropout: float) -> dict[str, float]:
    """Chapter 3's fine-tuning on frozen features (600 AdamW steps at 5e-3, rank 8, bias trained)."""
    with torch.no_grad():
        train, val = model.features(task.x_train), model.features(task.x_val)
    head = copy.deepcopy(model.head)
    head.dropout_p = dropout
    head.requires_grad_(False)
    head.lora_A.requires_grad_(True)
    head.lora_B.requires_grad_(True)
    head.base.bias.requires_grad_(True)
    lt.fit_lora_on_stats(head, lt.FeatureStats.from_data(train, task.y_new_train), steps=600, lr=5e-3)
    return {"new_train": lt.evaluate(head, train, task.y_new_train),
            "new_val": lt.evaluate(head, val, task.y_new_val)}


def one_seed(seed: int) -> dict[str, dict[str, float]]:
    out = {}
    for label, train_head in (("head frozen", False), ("head pretrained", True)):
        task, model = lt.source_setup(seed=seed)
        lt.pretrain(model, task.x_train, task.y_old_train, train_head=train_head)
        task, model = task.to(torch.float64), model.double()  # as chapter 3 computes
        row = {"old_train": lt.evaluate(model, task.x_train, task.y_old_train),
               "old_val": lt.evaluate(model, task.x_val, task.y_old_val)}
        row.update(fine_tune(model, task, dropout=0.1))
        if not train_head:
            row.update({f"{k}_no_dropout": v for k, v in fine_tune(model, task, dropout=0.0).items()})
        out[label] = row
    return out


def main() -> int:
    results = {}
    for seed in SEEDS:
        results[str(seed)] = one_seed(seed)
        print(f"seed {seed}: {json.dumps(results[str(seed)])}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"made_by": "tools/make_chapter3_seeds.py", "seeds": results}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
