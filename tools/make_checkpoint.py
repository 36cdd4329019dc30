"""Rewrite the shipped checkpoint lora_tutorial/checkpoints/tiny_adapter_source.safetensors.

Run it after changing anything that changes pretraining (TinyAdapter's
initialisation, the task data, `pretrain`, `train`); chapter 3 checks, under
strict nbval, that its own live pretraining reproduces the checkpoint.

Usage: python tools/make_checkpoint.py
"""

from lora_tutorial.pretraining import CHECKPOINT_PATH, write_checkpoint

if __name__ == "__main__":
    history = write_checkpoint()
    print(f"wrote {CHECKPOINT_PATH.name}: final pretraining loss {history[-1]:.4f} after {len(history)} steps")
