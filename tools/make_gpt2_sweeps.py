"""Rewrite chapter 7's sweep results, lora_tutorial/book/data/gpt2_sweeps.json.

Chapter 7 compares six placements of one budget of LoRA parameters on the small
GPT-2 over five seeds, each at four learning rates (120 fine-tuning runs of 150
steps), repeats three of the comparisons from a second checkpoint pretrained with
another seed (48 runs), and measures what the sampling temperature does to the
fine-tuned model's text (48 samples). That is minutes of CPU time, too long for a
chapter, so this script runs it once (`lora_tutorial.book.gpt2_lab.make_sweeps`, in
float64) and the chapter prints from the file. The chapter re-runs one run, picked
with a fixed seed, live and asserts that it agrees, and `tests/unit/test_gpt2_lab.py`
checks that the file still matches its recipe, re-runs one entry and the start of the
second checkpoint's pretraining. Run this script after changing the model, the
corpora, the recipe or `gpt2_lab`.

Usage: python tools/make_gpt2_sweeps.py [--add]   (about 20 minutes on one CPU thread)

With --add, runs kept in the existing file are not run again when only arms were
added to `gpt2_lab.ARMS` (see `gpt2_lab.make_sweeps`): only the new arms' runs are.
"""

import json
import sys
import time

import torch

from lora_tutorial.book import gpt2_lab

if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and leaves the others
    start = time.perf_counter()
    path = gpt2_lab.SWEEPS_PATH
    previous = gpt2_lab.load_sweeps(path) if "--add" in sys.argv[1:] else None
    results = gpt2_lab.make_sweeps(gpt2_lab.GPT2Lab.load(), progress=print,
                                   previous=previous)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path.name} ({path.stat().st_size / 1024:.0f} KiB) "
          f"in {time.perf_counter() - start:.0f} s")
