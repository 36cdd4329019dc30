"""Rewrite the shipped checkpoints lora_tutorial/checkpoints/tiny_adapter_*.safetensors.

Run it after changing anything that changes pretraining (TinyAdapter's
initialisation, the task data, `pretrain`, `train`); chapter 3 checks, under
strict nbval, that its own live pretraining reproduces the first checkpoint, and
tests/unit/test_pretraining_and_analysis.py that the second (head pretrained
too) reproduces.

Usage: python tools/make_checkpoint.py
"""

from lora_tutorial.pretraining import CHECKPOINT_PATH, HEAD_PRETRAINED_PATH, write_checkpoint

if __name__ == "__main__":
    for path, train_head in ((CHECKPOINT_PATH, False), (HEAD_PRETRAINED_PATH, True)):
        history = write_checkpoint(path, train_head=train_head)
        print(f"wrote {path.name}: final pretraining loss {history[-1]:.4f} after {len(history)} steps")
