"""Chapter 7's experiments: LoRA on the small character-level GPT-2, over seeds.

The chapter adapts the shipped GPT-2 of :mod:`lora_tutorial.charlm` (pretrained
on NumPy's docstrings) to scikit-learn's data-set cards. This module holds what
the chapter and ``tools/make_gpt2_sweeps.py`` share:

* :func:`finetune`, the training loop the chapter prints and runs;
* :class:`GPT2Lab`, the two corpora, the pretrained model in float64 and the
  fixed text slices every run is measured on;
* the placement experiment (:data:`ARMS`, :func:`placement_run`): six ways of
  spending one budget of trainable parameters, each run over :data:`SEEDS` at
  every learning rate of :data:`LRS`;
* the same placement runs, fewer of them, from a second checkpoint pretrained
  with another seed (:data:`OTHER_PRETRAIN_SEED`, :func:`other_checkpoint`);
* the temperature experiment (:func:`repeated_word_pairs`) on samples of the
  chapter's fine-tuned model;
* the results file (:data:`SWEEPS_PATH`) that the tool writes with
  :func:`make_sweeps` and the chapter reads with :func:`load_sweeps`.

Everything computes in float64: the placement runs are 150 AdamW steps long, and
float32 rounding, which differs between CPU kernels, would reach the printed
digits and the sampled text.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

import lora_tutorial as lt
from lora_tutorial import charlm
from lora_tutorial._checks import as_generator, check_choice, check_positive_finite, check_positive_int

__all__ = [
    "ARMS",
    "FIRST_STEPS",
    "GPT2Lab",
    "LRS",
    "MAIN",
    "OLD_VAL_CHARS",
    "OTHER_ARMS",
    "OTHER_PRETRAIN_SEED",
    "OTHER_SEEDS",
    "SAMPLE_CHARS",
    "SAMPLE_SEEDS",
    "SEEDS",
    "STEPS",
    "SWEEPS_PATH",
    "TEMPERATURES",
    "adapt",
    "finetune",
    "load_sweeps",
    "main_model",
    "other_checkpoint",
    "make_sweeps",
    "placement_run",
    "recipe",
    "repeated_word_pairs",
    "tuned",
]

#: Where ``tools/make_gpt2_sweeps.py`` writes the chapter's sweep results:
#: ``book/data/gpt2_sweeps.json`` in the package.
#:
#: :meta hide-value:
SWEEPS_PATH = Path(__file__).parent / "data" / "gpt2_sweeps.json"

#: How many characters of the old corpus's validation text every loss is measured on.
OLD_VAL_CHARS = 8192

#: The chapter's main run, every linear map at rank 8, alpha 16.
MAIN = {"targets": "all-linear", "r": 8, "alpha": 16.0, "steps": 150, "lr": 1e-2, "seed": 0}

#: Six ways to spend 7,680 trainable parameters, as (target modules, rank); alpha is 2r:
#: both matrices of the attention or of the MLP, or one of the four alone.
ARMS: dict[str, tuple[tuple[str, ...], int]] = {
    "attention r=10": (("c_attn", "attn.c_proj"), 10),
    "MLP r=6": (("c_fc", "mlp.c_proj"), 6),
    "c_attn r=15": (("c_attn",), 15),
    "c_fc r=12": (("c_fc",), 12),
    "attn.c_proj r=30": (("attn.c_proj",), 30),
    "mlp.c_proj r=12": (("mlp.c_proj",), 12),
}
#: The seeds of the placement runs (each fixes the adapters' start and the batches).
SEEDS = (0, 1, 2, 3, 4)
#: The learning-rate grid; each arm's rate is picked per seed on validation text.
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
#: The pretraining seed of the second checkpoint (:func:`other_checkpoint`; the
#: shipped one's is 0).
OTHER_PRETRAIN_SEED = 1
#: The adapter seeds of the placement runs repeated from the second checkpoint.
OTHER_SEEDS = (0, 1, 2)
#: The arms repeated from the second checkpoint, those of chapter 7's first three
#: comparisons.
OTHER_ARMS = ("attention r=10", "MLP r=6", "c_attn r=15", "c_fc r=12")
#: The length of every placement run (the main run's).
STEPS = 150
#: How many training losses of each run the file keeps, for the chapter's spot-check.
FIRST_STEPS = 25
#: Sampling temperatures of the temperature experiment.
TEMPERATURES = (0.1, 0.3, 0.5, 0.7, 1.0, 1.2)
#: The seeds of the samples drawn at each temperature.
SAMPLE_SEEDS = tuple(range(8))
#: The length of each sample, in characters.
SAMPLE_CHARS = 200
PROMPT = "The "


def finetune(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    steps: int,
    lr: float,
    seed: int | torch.Generator = 0,
    batch_size: int = 16,
    length: int = 64,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters on random windows of ``ids``.

    Each step draws ``batch_size`` windows of ``length + 1`` tokens at random
    offsets (:func:`~lora_tutorial.charlm.random_batch`, from a generator seeded
    with ``seed``), predicts every next token and steps AdamW (PyTorch's
    defaults) on the cross-entropy. ``callback(step, model)`` runs after each
    step. The model is left in eval mode.

    Args:
        model: a language model whose frozen parameters have
            ``requires_grad=False``.
        ids: token ids of shape ``(n,)``, ``n > length + 1``.
        seed: an ``int`` or a ``torch.Generator`` the batches' offsets are drawn
            from (the global RNG is not touched).

    Returns:
        The training loss of every step, before that step's update.
    """
    steps, lr = _checked(model, ids, steps, lr, batch_size, length)
    batches = as_generator(seed)  # the batches' own random stream
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    history = []
    model.train()
    for step in range(1, steps + 1):
        batch = charlm.random_batch(ids, batch_size, length, batches)
        loss = charlm.lm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if callback is not None:
            callback(step, model)
    model.eval()
    return history


def _checked(model: object, ids: object, steps: object, lr: object, batch_size: object,
             length: object) -> tuple[int, float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters: add adapters first (lt.add_lora)")
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    check_positive_int("batch_size", batch_size)
    length = check_positive_int("length", length)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or len(ids) <= length + 1:
        raise ValueError(f"ids must be a 1-D tensor of more than length + 1 = {length + 1} "
                         f"token ids, got {getattr(ids, 'shape', type(ids).__name__)}")
    return steps, lr


@dataclass(frozen=True)
class GPT2Lab:
    """The chapter's setting: two corpora, the pretrained GPT-2 and the measuring slices.

    Attributes:
        tokenizer: the character tokenizer.
        old: the pretraining corpus (NumPy's docstrings).
        new: the corpus the model is adapted to (scikit-learn's data-set cards).
        pretrained: the shipped checkpoint in float64, eval mode; never trained
            here (:func:`adapt` copies it).
    """

    tokenizer: charlm.CharTokenizer
    old: charlm.Corpus
    new: charlm.Corpus
    pretrained: nn.Module

    @classmethod
    def load(cls) -> "GPT2Lab":
        """Read both corpora and the shipped checkpoint (cast to float64)."""
        tokenizer, pretrained = charlm.pretrained_char_gpt2()
        return cls(tokenizer, charlm.numpy_docstrings(tokenizer),
                   charlm.sklearn_dataset_cards(tokenizer), pretrained.double())

    @property
    def old_val(self) -> torch.Tensor:
        """The first :data:`OLD_VAL_CHARS` tokens of the old validation text, ``(8192,)``."""
        return self.old.val[:OLD_VAL_CHARS]

    @property
    def tune(self) -> torch.Tensor:
        """The first half of the new validation text, on which learning rates are picked."""
        return self.new.val[: len(self.new.val) // 2]

    @property
    def test(self) -> torch.Tensor:
        """The second half of the new validation text, on which learning is reported."""
        return self.new.val[len(self.new.val) // 2:]

    def losses(self, model: nn.Module) -> dict[str, float]:
        """Validation losses (nats per character): ``old``, ``tune`` and ``test``."""
        return {"old": charlm.eval_loss(model, self.old_val),
                "tune": charlm.eval_loss(model, self.tune),
                "test": charlm.eval_loss(model, self.test)}


def adapt(pretrained: nn.Module, arm: str, seed: int | torch.Generator = 0) -> nn.Module:
    """A copy of ``pretrained`` with the adapters of one of :data:`ARMS` (alpha = 2r)."""
    check_choice("arm", arm, ARMS)
    targets, r = ARMS[arm]
    return lt.add_lora(copy.deepcopy(pretrained), list(targets), r=r, alpha=2.0 * r, seed=seed)


def placement_run(lab: GPT2Lab, arm: str, seed: int, lr: float,
                  steps: int = STEPS) -> dict[str, object]:
    """One placement run: adapt, fine-tune on the new corpus, measure.

    The seed fixes both what is random apart from the placement: the adapters'
    initial values and the batches. Returns a dict with ``arm``, ``seed``,
    ``lr``, ``trainable`` (the number of trainable parameters), ``first_losses``
    (the first :data:`FIRST_STEPS` training losses) and the validation losses
    ``old``, ``tune`` and ``test`` after training.
    """
    model = adapt(lab.pretrained, arm, seed=seed)
    history = finetune(model, lab.new.train, steps=steps, lr=lr, seed=seed)
    return {"arm": arm, "seed": seed, "lr": lr,
            "trainable": lt.count_parameters(model).trainable,
            "first_losses": history[:FIRST_STEPS], **lab.losses(model)}


def main_model(lab: GPT2Lab) -> nn.Module:
    """The chapter's fine-tuned model: :data:`MAIN`'s run from the pretrained copy."""
    model = lt.add_lora(copy.deepcopy(lab.pretrained), MAIN["targets"], r=MAIN["r"],
                        alpha=MAIN["alpha"], seed=MAIN["seed"])
    finetune(model, lab.new.train, steps=MAIN["steps"], lr=MAIN["lr"], seed=MAIN["seed"])
    return model


def other_checkpoint(lab: GPT2Lab) -> tuple[nn.Module, list[float]]:
    """A second pretrained model: the shipped checkpoint's recipe with another seed.

    Pretrains by :data:`lora_tutorial.charlm.PRETRAIN` with seed
    :data:`OTHER_PRETRAIN_SEED` (minutes on one CPU thread, in float32), and
    rounds the weights through float16 as the shipped checkpoint stores them,
    before the cast to float64. Returns the model (eval mode) and the
    pretraining losses.
    """
    recipe = {**charlm.PRETRAIN, "seed": OTHER_PRETRAIN_SEED}
    model, history = charlm.pretrain_char_gpt2(lab.old, **recipe)
    return model.half().double().eval(), history


def repeated_word_pairs(text: str) -> float:
    """The share of ``text``'s consecutive word pairs that already occurred earlier in it.

    Words are runs of non-space characters. Text that loops ("the that the
    that ...") scores near 1, text that never repeats a pair scores 0.
    """
    words = text.split()
    pairs = list(zip(words, words[1:]))
    if not pairs:
        raise ValueError(f"text must hold at least two words, got {text!r}")
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for pair in pairs:
        repeats += pair in seen
        seen.add(pair)
    return repeats / len(pairs)


def recipe() -> dict[str, object]:
    """Everything the results file depends on, as it stores it."""
    import numpy as np
    import sklearn
    import transformers

    return {"arms": {k: [list(t), r] for k, (t, r) in ARMS.items()}, "seeds": list(SEEDS),
            "lrs": list(LRS), "steps": STEPS, "main": MAIN, "temperatures": list(TEMPERATURES),
            "sample_seeds": list(SAMPLE_SEEDS), "sample_chars": SAMPLE_CHARS, "prompt": PROMPT,
            "old_val_chars": OLD_VAL_CHARS,
            "other": {"pretrain_seed": OTHER_PRETRAIN_SEED, "seeds": list(OTHER_SEEDS),
                      "arms": list(OTHER_ARMS)}, "versions": {
                "torch": torch.__version__.split("+")[0], "numpy": np.__version__,
                "sklearn": sklearn.__version__, "transformers": transformers.__version__}}


def make_sweeps(lab: GPT2Lab, progress: Callable[[str], None] | None = None,
                previous: dict[str, object] | None = None) -> dict[str, object]:
    """Run every placement run and draw every temperature sample: the results file's content.

    Runs :data:`ARMS` x :data:`SEEDS` x :data:`LRS` placement runs of
    :data:`STEPS` steps, then :func:`main_model` and its samples at each of
    :data:`TEMPERATURES` (one per seed of :data:`SAMPLE_SEEDS`).

    ``previous``, an earlier results file, saves time when only arms were added:
    if its recipe equals :func:`recipe` apart from the arms, its runs of arms
    whose definition is unchanged, and its samples, are kept as they are (every
    run is a function of its arm, seed and learning rate alone, so a re-run would
    store the same numbers), and only the missing runs are run; so is the
    second checkpoint's part if its recipe is unchanged.

    The second checkpoint's part, ``"other"``, holds its first 20 pretraining
    losses and its placement runs (:data:`OTHER_ARMS` x :data:`OTHER_SEEDS` x
    :data:`LRS`).
    """
    kept: dict[tuple[str, int, float], dict[str, object]] = {}
    samples = other = None
    now = recipe()
    if previous is not None:
        before = previous["recipe"]
        if {k: v for k, v in before.items() if k not in ("arms", "other")} == \
                {k: v for k, v in now.items() if k not in ("arms", "other")}:
            same = {a for a, d in before["arms"].items() if now["arms"].get(a) == d}
            kept = {(r["arm"], r["seed"], r["lr"]): r for r in previous["placement"]
                    if r["arm"] in same}
            samples = previous["samples"]
            if before.get("other") == now["other"] and same >= set(OTHER_ARMS):
                other = previous.get("other")
    runs = []
    for seed in SEEDS:
        for arm in ARMS:
            for lr in LRS:
                if (arm, seed, lr) in kept:
                    runs.append(kept[arm, seed, lr])
                    continue
                runs.append(placement_run(lab, arm, seed, lr))
                if progress is not None:
                    progress(f"{arm} seed {seed} lr {lr:g}: test {runs[-1]['test']:.4f}")
    if samples is None:
        model = main_model(lab)
        samples = {f"{t:g}": [charlm.generate(model, lab.tokenizer, PROMPT, SAMPLE_CHARS,
                                              temperature=t, seed=k) for k in SAMPLE_SEEDS]
                   for t in TEMPERATURES}
    if other is None:
        start = time.perf_counter()
        second, history = other_checkpoint(lab)
        if progress is not None:
            progress(f"pretrained seed {OTHER_PRETRAIN_SEED} in {time.perf_counter() - start:.0f} s:"
                     f" last loss {history[-1]:.4f}")
        lab2 = replace(lab, pretrained=second)
        other = {"first_pretrain_losses": history[:20], "placement": []}
        for seed in OTHER_SEEDS:
            for arm in OTHER_ARMS:
                for lr in LRS:
                    other["placement"].append(placement_run(lab2, arm, seed, lr))
                    if progress is not None:
                        progress(f"other: {arm} seed {seed} lr {lr:g}: "
                                 f"test {other['placement'][-1]['test']:.4f}")
    return {"recipe": now, "placement": runs, "samples": samples, "other": other}


def load_sweeps(path: Path = SWEEPS_PATH) -> dict[str, object]:
    """The results file ``tools/make_gpt2_sweeps.py`` wrote."""
    return json.loads(Path(path).read_text())


def tuned(runs: Sequence[dict[str, object]], arm: str, seed: int) -> dict[str, object]:
    """The run of ``arm`` and ``seed`` whose learning rate has the lowest ``tune`` loss.

    Refuses (``ValueError``) a best learning rate on the edge of :data:`LRS`
    (:func:`~lora_tutorial.book.verdict.best_inside`).
    """
    from lora_tutorial.book import verdict

    mine = sorted((r for r in runs if r["arm"] == arm and r["seed"] == seed),
                  key=lambda r: r["lr"])
    lrs = [r["lr"] for r in mine]
    best = verdict.best_inside(lrs, [r["tune"] for r in mine], name=f"lr of {arm}, seed {seed}")
    return mine[best]

