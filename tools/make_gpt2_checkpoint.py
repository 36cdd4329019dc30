"""Rewrite the shipped character-level GPT-2, lora_tutorial/checkpoints/char_gpt2_numpy.safetensors.

It pretrains `lora_tutorial.charlm.char_gpt2` on the docstrings of the installed
NumPy by the recipe `lora_tutorial.charlm.PRETRAIN` (about two minutes on one
CPU thread) and saves it in float16 with, in the file's metadata, its first
losses and the model's shape (`model_shape`: `MODEL_SHAPE` and the vocabulary
size, which `pretrained_char_gpt2` checks, since `n_head` cannot be read off the
tensors). `tests/unit/test_charlm.py` checks that the recipe still reproduces
those losses; run this script after changing the model, the corpus or the recipe.

Usage: python tools/make_gpt2_checkpoint.py
"""

import time

from lora_tutorial.charlm import CHECKPOINT_PATH, write_checkpoint

if __name__ == "__main__":
    start = time.perf_counter()
    history = write_checkpoint()
    size = CHECKPOINT_PATH.stat().st_size
    print(f"wrote {CHECKPOINT_PATH.name} ({size / 1024:.0f} KiB) in {time.perf_counter() - start:.0f} s: "
          f"loss {history[0]:.3f} -> {history[-1]:.3f} after {len(history)} steps")
