"""A mixed-adapter batch against one adapter, and against serving adapter by adapter.

Chapter 7's character GPT-2 (2 layers, 64 features) holds four LoRA adapters
(r = 8 on every linear layer). A batch of 64 sequences of 64 characters is run
under torch.inference_mode() four ways:

* **one adapter**: all 64 examples through the active adapter (the reference);
* **mixed batch**: ``lt.mixed_batch`` with 16 examples per adapter, interleaved
  (one forward pass; gathered per-example factors and ``torch.bmm``);
* **adapter by adapter**: the same 64 examples served as four batches of 16, one
  ``set_adapter`` each (what serving does without mixed batches);
* **PEFT mixed batch**: PEFT's ``model(..., adapter_names=...)`` on the same model.

Contenders run interleaved: in each round every contender runs `--iters` times in a
shuffled order; the figure for a contender is the median over rounds of its
per-iteration time. Every contender is first checked to compute the same logits.

Usage:
    python benchmarks/mixed_batch.py                 # prints the table
    python benchmarks/mixed_batch.py --markdown FILE # also writes it for the book's appendix

Goal (issue 20): the mixed batch costs at most 1.3 times one single-adapter batch of 64.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

import _report
import lora_tutorial as lt
from lora_tutorial import book  # noqa: F401  (quiets bitsandbytes' hub message)
from lora_tutorial import charlm

warnings.filterwarnings("ignore", category=FutureWarning)

NAMES = ("a", "b", "c", "d")
R, BATCH, LENGTH = 8, 64, 64
GOAL = 1.3


def build():
    """Our model with four adapters, the batch, its adapter names, and PEFT's model."""
    from peft import PeftModel

    from transformers.utils import logging
    logging.disable_progress_bar()
    tokenizer, base = charlm.pretrained_char_gpt2()
    base.eval()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    for name in NAMES:
        lt.add_lora(model, "all-linear", r=R, adapter_name=name, seed=g)
        lt.set_adapter(model, name)
        with torch.no_grad():
            for _, layer in lt.lora_layers(model):
                layer.lora_B.normal_(std=0.02, generator=g)
    lt.set_adapter(model, NAMES[0])
    model.eval().requires_grad_(False)
    ids = torch.randint(0, tokenizer.vocab_size, (BATCH, LENGTH), generator=g)
    names = [NAMES[i % len(NAMES)] for i in range(BATCH)]
    directory = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mixed_batch_{os.getpid()}")
    lt.save_adapter(model, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(directory, "a"),
                                         adapter_name="a")
        for name in NAMES[1:]:
            peft.load_adapter(os.path.join(directory, name), adapter_name=name)
    return model, peft.eval(), ids, names


def contenders(model, peft, ids, names):
    groups = {name: [i for i, n in enumerate(names) if n == name] for name in NAMES}

    def single():
        return model(ids).logits

    def mixed():
        with lt.mixed_batch(model, names):
            return model(ids).logits

    def by_adapter():
        out = torch.empty(ids.shape + (model.config.vocab_size,))
        for name, rows in groups.items():
            lt.set_adapter(model, name)
            out[rows] = model(ids[rows]).logits
        lt.set_adapter(model, NAMES[0])
        return out

    def peft_mixed():
        return peft(ids, adapter_names=names).logits

    return {"one adapter": single, "mixed batch": mixed, "adapter by adapter": by_adapter,
            "PEFT mixed batch": peft_mixed}


def measure(rounds: int, iters: int) -> dict[str, float]:
    model, peft, ids, names = build()
    jobs = contenders(model, peft, ids, names)
    with torch.inference_mode():  # sanity: mixed == adapter by adapter == PEFT's
        ref = jobs["adapter by adapter"]()
        for name in ("mixed batch", "PEFT mixed batch"):
            assert torch.allclose(jobs[name](), ref, atol=1e-4), name
    with torch.inference_mode():
        return _report.interleaved(jobs, rounds, iters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, two threads measure "
                             "the other processes' load as much as this code)")
    parser.add_argument("--markdown", help="also write the results as a Markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import peft

    load = os.getloadavg()[0]
    header = (f"peft {peft.__version__}; chapter 7's character GPT-2, {len(NAMES)} adapters "
              f"of rank {R} on every linear layer, a batch of {BATCH} × {LENGTH} characters; "
              f"{args.rounds} rounds of {args.iters} iterations per contender, interleaved; "
              f"medians; {args.threads} thread(s); load average {load:.1f} when started")
    print(f"{_report.machine()}; {header}")
    t = measure(args.rounds, args.iters)
    base = t["one adapter"]
    lines = [f"| contender | time per batch of {BATCH} (ms) | ratio to one adapter |",
             "| --- | ---: | ---: |"]
    lines += [f"| {name} | {1e3 * value:.2f} | {value / base:.2f} |" for name, value in t.items()]
    ratio = t["mixed batch"] / base
    met = ratio <= GOAL
    lines += ["", "| goal | measured | verdict |", "| --- | ---: | --- |",
              f"| mixed batch / one adapter ≤ {GOAL} | {ratio:.2f} | {'met' if met else 'MISSED'} |"]
    table = "\n".join(lines)
    print(table)
    _report.write(args.markdown, "mixed_batch.py", table, note=header + ".")
    # The same figures as JSON beside the Markdown, for chapter 9's figure and text.
    _report.write_json(args.markdown, "mixed_batch.py", {
        "setting": {"adapters": len(NAMES), "rank": R, "batch": BATCH, "length": LENGTH,
                    "threads": args.threads, "load_average": round(load, 1)},
        "times_ms": {name: round(1e3 * value, 2) for name, value in t.items()},
        "ratio_to_one_adapter": {name: round(value / base, 2) for name, value in t.items()},
        "goal": GOAL, "met": met})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
