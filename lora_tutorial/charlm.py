"""A small character-level GPT-2 and two corpora that ship inside pinned packages.

The last chapter adapts a language model. Nothing may be downloaded, so both the
model and its text are made here:

* the **pretraining corpus** is the docstrings of NumPy's public functions (an API
  reference: ``Parameters``, ``Returns``, ``>>> np.`` examples), read from the
  installed ``numpy`` at run time;
* the **fine-tuning corpus** is the descriptions of the data sets that
  scikit-learn bundles (data-set cards: ``:Number of Instances:``, citations),
  read from the installed ``sklearn`` package.

Both packages are pinned in ``requirements.txt``, so every machine reads the same
text; the project copies neither into its repository. The model is
``transformers``' ``GPT2LMHeadModel`` built from a small ``GPT2Config`` with one
token per character. ``tools/make_gpt2_checkpoint.py`` pretrains it and ships
the result (:data:`CHECKPOINT_PATH`); :func:`pretrained_char_gpt2` loads it.

``transformers`` is imported only inside the functions that need it.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import string
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import as_generator, check_positive_finite, check_positive_int

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPT2LMHeadModel

__all__ = [
    "CHECKPOINT_PATH",
    "CharTokenizer",
    "CharTrigrams",
    "checkpoint_shape",
    "Corpus",
    "char_gpt2",
    "eval_loss",
    "generate",
    "lm_loss",
    "made_on",
    "MODEL_SHAPE",
    "numpy_docstrings",
    "PRETRAIN",
    "pretrain_char_gpt2",
    "pretrained_char_gpt2",
    "random_batch",
    "sklearn_dataset_cards",
    "write_checkpoint",
]

#: The shipped pretrained model (written by ``tools/make_gpt2_checkpoint.py``):
#: ``checkpoints/char_gpt2_numpy.safetensors`` in the package.
#:
#: :meta hide-value:
CHECKPOINT_PATH = Path(__file__).parent / "checkpoints" / "char_gpt2_numpy.safetensors"

#: The model's shape, small enough to pretrain in a few minutes on one CPU thread.
MODEL_SHAPE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}

#: The pretraining recipe, as ``tools/make_gpt2_checkpoint.py`` runs it.
PRETRAIN = {"steps": 1500, "batch_size": 32, "lr": 3e-3, "seed": 0}


class CharTokenizer:
    """One token per character: printable ASCII and the newline; any other character is ``?``.

    ``encode`` maps a string of length ``n`` to a ``(n,)`` long tensor,
    ``decode`` maps it back. Only ``str`` is encoded (``bytes`` are refused,
    not read as unknown characters), and only ids in ``[0, vocab_size)`` decode.
    """

    def __init__(self) -> None:
        self.chars = "\n" + "".join(c for c in string.printable if c.isprintable())
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.unknown = self.index["?"]

    @property
    def vocab_size(self) -> int:
        """How many tokens there are (96)."""
        return len(self.chars)

    def clean(self, text: str) -> str:
        """``text`` with every character the vocabulary lacks replaced by ``?``."""
        return "".join(c if c in self.index else "?" for c in _check_text("text", text))

    def encode(self, text: str) -> torch.Tensor:
        """``text`` of length ``n`` → token ids of shape ``(n,)`` (unknown characters → ``?``)."""
        text = _check_text("text", text)
        return torch.tensor([self.index.get(c, self.unknown) for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        """Token ids of shape ``(n,)``, each in ``[0, vocab_size)`` → a string of length ``n``."""
        ids = _check_ids("ids", ids, self.vocab_size)
        return "".join(self.chars[i] for i in ids.tolist())


def _check_text(name: str, text: object, min_len: int = 0) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if len(text) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} character(s), got {text!r}")
    return text


def _check_ids(name: str, ids: object, vocab_size: int, min_len: int = 0) -> torch.Tensor:
    """Check token ids: a 1-D integer tensor of at least ``min_len`` ids in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {tuple(ids.shape)}")
    if len(ids) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} tokens, got {len(ids)}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got values from "
                         f"{int(ids.min())} to {int(ids.max())}")
    return ids


def _check_tokenizer(tokenizer: object) -> "CharTokenizer":
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
    return tokenizer


def _check_model(model: object) -> tuple[int, int]:
    """A GPT-2 language model's ``(n_positions, vocab_size)``, or a TypeError."""
    config = getattr(model, "config", None) if isinstance(model, nn.Module) else None
    sizes = (getattr(config, "n_positions", None), getattr(config, "vocab_size", None))
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        raise TypeError("model must be a GPT-2 language model (a torch.nn.Module whose config "
                        f"has n_positions and vocab_size), got {type(model).__name__}")
    return sizes  # type: ignore[return-value]


def _check_seed(seed: object) -> int | torch.Generator:
    """An ``int`` seed >= 0 or a CPU ``torch.Generator`` (checked, not drawn from)."""
    as_generator(seed)
    return seed  # type: ignore[return-value]


def _draw_seed(seed: int | torch.Generator) -> int:
    """``seed`` itself, or a seed drawn from the generator."""
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed))
    return int(seed)


@dataclass(frozen=True)
class Corpus:
    """A text cut into training and validation token streams.

    Attributes:
        name: what the text is.
        text: the cleaned text.
        train: token ids of the first 90%, shape ``(n_train,)``.
        val: token ids of the last 10%, shape ``(n_val,)``.
    """

    name: str
    text: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, name: str, text: str, tokenizer: CharTokenizer) -> "Corpus":
        """Clean ``text``, fold its white space, and split it 90/10.

        Runs of spaces (indentation, padding in tables) are folded into one and
        blank lines into one: a model this small would otherwise spend its
        capacity, and its samples, on white space.
        """
        _check_text("name", name)
        _check_text("text", text)
        _check_tokenizer(tokenizer)
        lines = [tokenizer.clean(" ".join(line.split())) for line in text.splitlines()]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
        ids = tokenizer.encode(text)
        cut = int(0.9 * len(ids))
        return cls(name, text, ids[:cut], ids[cut:])


def numpy_docstrings(tokenizer: CharTokenizer, max_chars: int = 300_000) -> Corpus:
    """The docstrings of NumPy's public functions, sorted by name, up to ``max_chars``.

    Only functions and ufuncs: the docstrings of NumPy's scalar types describe
    the machine they run on (their platform aliases), and would make the
    corpus differ between machines.
    """
    import numpy as np

    _check_tokenizer(tokenizer)
    check_positive_int("max_chars", max_chars)
    kinds = (types.FunctionType, types.BuiltinFunctionType, np.ufunc)
    docs = []
    for name in sorted(n for n in dir(np) if not n.startswith("_")):
        obj = getattr(np, name)
        doc = inspect.getdoc(obj) if isinstance(obj, kinds) else None
        if doc:
            docs.append(doc)
    corpus = Corpus.from_text(f"NumPy {np.__version__} docstrings", "\n\n".join(docs), tokenizer)
    return Corpus.from_text(corpus.name, corpus.text[:max_chars], tokenizer)


def sklearn_dataset_cards(tokenizer: CharTokenizer) -> Corpus:
    """The descriptions of scikit-learn's bundled data sets (``datasets/descr/*.rst``)."""
    import sklearn

    _check_tokenizer(tokenizer)
    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.rst")))
    return Corpus.from_text(f"scikit-learn {sklearn.__version__} data-set descriptions", text, tokenizer)


def char_gpt2(vocab_size: int, seed: int | torch.Generator = 0) -> "GPT2LMHeadModel":
    """A fresh GPT-2 of :data:`MODEL_SHAPE` with ``vocab_size`` tokens and no dropout.

    Its weights are drawn inside a forked RNG seeded with ``seed`` (transformers
    initialises from PyTorch's global RNG), so the caller's RNG is untouched. A
    ``torch.Generator`` as ``seed`` gives the seed of that RNG (one draw).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab_size = check_positive_int("vocab_size", vocab_size)
    seed = _draw_seed(_check_seed(seed))
    config = GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **MODEL_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU stream only
        return GPT2LMHeadModel(config)


def random_batch(ids: torch.Tensor, batch_size: int, length: int,
                 generator: int | torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``length + 1`` tokens from ``ids (n,)`` at random offsets.

    The offsets are drawn from ``generator`` (a ``torch.Generator``, or an
    ``int`` seed). Returns a ``(batch_size, length + 1)`` tensor: inputs are
    ``[:, :-1]``, next-token targets ``[:, 1:]``.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    length = check_positive_int("length", length)
    ids = _check_ids("ids", ids, 2**63 - 1, min_len=length + 1)  # one window at least
    generator = as_generator(generator, "generator")
    starts = torch.randint(0, len(ids) - length, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + length + 1] for s in starts.tolist()])


def lm_loss(model: "GPT2LMHeadModel", batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per character) of a ``(b, t + 1)`` batch of ids.

    ``t`` is at most ``model.config.n_positions``, every id below its ``vocab_size``.
    """
    n_positions, vocab_size = _check_model(model)
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or not 2 <= batch.shape[1] <= n_positions + 1:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"batch must be a (b, t + 1) tensor of token ids with 1 <= t <= "
                         f"{n_positions} (n_positions), got {shape}")
    _check_ids("batch", batch.reshape(-1), vocab_size)
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: "GPT2LMHeadModel", ids: torch.Tensor, length: int | None = None) -> float:
    """Next-token loss over ``ids (n,)`` cut into consecutive windows (eval mode, restored).

    Windows hold ``length`` inputs, at most ``model.config.n_positions``, which is
    the default (``None``); ``ids`` must hold more than ``length`` tokens.
    """
    n_positions, vocab_size = _check_model(model)
    if length is None:
        length = n_positions
    length = check_positive_int("length", length)
    if length > n_positions:
        raise ValueError(f"length must be at most the model's n_positions = {n_positions}, "
                         f"got {length}")
    ids = _check_ids("ids", ids, vocab_size)
    n = (len(ids) - 1) // length
    if n < 1:
        raise ValueError(f"ids must hold more than length={length} tokens, got {len(ids)}")
    batch = torch.stack([ids[i * length : i * length + length + 1] for i in range(n)])
    was_training = model.training
    model.eval()
    try:
        return lm_loss(model, batch).item()
    finally:
        model.train(was_training)


def pretrain_char_gpt2(
    corpus: Corpus,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int | torch.Generator = 0,
    stop_after: int | None = None,
) -> tuple["GPT2LMHeadModel", list[float]]:
    """Pretrain a fresh :func:`char_gpt2` on ``corpus.train`` with AdamW.

    The model is drawn with ``seed`` and batches from a generator seeded with
    it (a ``torch.Generator`` is drawn from for both); the learning rate
    decays linearly to zero. It runs on one CPU thread, so that the thread
    count cannot change the order of any sum; other processors' float32 kernels
    still round differently in the last bits (see the book's reproducibility
    appendix for the measured spread). Returns the model and the loss of
    every step. ``stop_after`` ends the run early, on the same schedule (the
    test that the recipe still reproduces the shipped model uses it).
    """
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus, got {type(corpus).__name__}")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    lr = check_positive_finite("lr", lr)
    run = steps if stop_after is None else min(steps, check_positive_int("stop_after", stop_after))
    length = MODEL_SHAPE["n_positions"]
    if len(corpus.train) < length + 1:
        raise ValueError(f"corpus.train must hold at least {length + 1} tokens, got {len(corpus.train)}")
    _check_seed(seed)
    model = char_gpt2(CharTokenizer().vocab_size, seed=seed)
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    length = model.config.n_positions
    history = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(run):
            batch = random_batch(corpus.train, batch_size, length, generator)
            loss = lm_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return model.eval(), history


def write_checkpoint(path: Path = CHECKPOINT_PATH) -> list[float]:
    """Pretrain by :data:`PRETRAIN` on the NumPy corpus and save the model to ``path``.

    The weights are stored in float16 (the file stays well under 1 MB); the first
    losses of the run are stored in the file's metadata, so a test can check that
    the recipe still reproduces them exactly, and so is the model's shape
    (:func:`checkpoint_shape`), which loading checks.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tokenizer = CharTokenizer()
    model, history = pretrain_char_gpt2(numpy_docstrings(tokenizer), **PRETRAIN)
    # lm_head.weight is the token embedding (GPT-2 ties them): stored once.
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    meta = {
        "model_shape": json.dumps(checkpoint_shape()),
        "recipe": json.dumps(PRETRAIN),
        "first_losses": json.dumps(history[:20]),
        "made_on": made_on(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return history


def made_on() -> str:
    """The machine and library versions a pretraining run's exact losses belong to."""
    import platform

    import numpy as np

    return f"{platform.machine()} torch {torch.__version__} numpy {np.__version__}"


def checkpoint_shape() -> dict[str, int]:
    """The shape the checkpoint records: :data:`MODEL_SHAPE` and the vocabulary size."""
    return {**MODEL_SHAPE, "vocab_size": CharTokenizer().vocab_size}


def pretrained_char_gpt2() -> tuple[CharTokenizer, "GPT2LMHeadModel"]:
    """The shipped pretrained model (float32, eval mode) and its tokenizer.

    The file records the model's shape (``n_head`` cannot be read off the
    tensors); a file of another shape than :func:`checkpoint_shape`, or whose
    tensors do not fit the model, is refused with a :class:`ValueError`.
    """
    from safetensors import safe_open

    rerun = "run tools/make_gpt2_checkpoint.py"
    with safe_open(str(CHECKPOINT_PATH), "pt") as f:
        recorded = json.loads((f.metadata() or {}).get("model_shape", "null"))
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    expected = checkpoint_shape()
    if recorded != expected:
        raise ValueError(f"{CHECKPOINT_PATH.name} holds a model of shape {recorded}, but "
                         f"this library builds {expected}; {rerun}")
    tokenizer = CharTokenizer()
    model = char_gpt2(tokenizer.vocab_size)
    own = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    if state.keys() != own.keys():
        raise ValueError(f"{CHECKPOINT_PATH.name} does not match the model: missing "
                         f"{sorted(own.keys() - state.keys())}, unexpected "
                         f"{sorted(state.keys() - own.keys())}; {rerun}")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{CHECKPOINT_PATH.name}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                         f"the model {tuple(own[wrong[0]].shape)}; {rerun}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return tokenizer, model.eval()


@torch.no_grad()
def generate(
    model: "GPT2LMHeadModel",
    tokenizer: CharTokenizer,
    prompt: str,
    n_chars: int,
    *,
    temperature: float = 0.7,
    seed: int | torch.Generator = 0,
) -> str:
    """Sample ``n_chars`` characters after ``prompt``, one at a time (eval mode).

    Each character is drawn from ``softmax(logits / temperature)`` with a
    generator seeded by ``seed`` (or ``seed`` itself, a ``torch.Generator``),
    so the same model and seed always give the same text. (Greedy decoding
    makes a model this small repeat itself.) A temperature so small that
    ``logits / temperature`` overflows draws from the limit: the most likely
    characters.
    """
    window, vocab_size = _check_model(model)
    _check_tokenizer(tokenizer)
    if vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model has {vocab_size} tokens, the tokenizer {tokenizer.vocab_size}")
    _check_text("prompt", prompt, min_len=1)
    n_chars = check_positive_int("n_chars", n_chars)
    temperature = check_positive_finite("temperature", temperature)
    generator = as_generator(seed)
    ids = tokenizer.encode(prompt)[None]
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_chars):
            logits = model(ids[:, -window:]).logits[0, -1]
            scaled = logits / temperature
            if not torch.isfinite(scaled).all():  # a tiny temperature: the limit
                shifted = logits.double() - logits.double().max()  # float64: 1e-300 is not 0
                scaled = shifted / temperature
            probs = torch.softmax(scaled, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(ids[0, -n_chars:])


class CharTrigrams:
    """A character trigram model of a text, with add-one smoothing.

    The chapter uses two of them, one per corpus, as a yardstick of style: the
    log-likelihood ratio of a sample under the two says which corpus it reads
    like, independently of the network that wrote it.
    """

    def __init__(self, text: str, vocab_size: int = 96) -> None:
        _check_text("text", text)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.pairs: dict[str, int] = {}
        self.triples: dict[str, int] = {}
        for i in range(len(text) - 2):
            self.pairs[text[i : i + 2]] = self.pairs.get(text[i : i + 2], 0) + 1
            self.triples[text[i : i + 3]] = self.triples.get(text[i : i + 3], 0) + 1

    def log_prob(self, text: str) -> float:
        """Mean log-probability (nats) of each character of ``text`` given the two before it.

        ``text`` must hold at least three characters (one with two before it).
        """
        _check_text("text", text, min_len=3)
        total = 0.0
        for i in range(2, len(text)):
            seen = self.triples.get(text[i - 2 : i + 1], 0) + 1
            total += math.log(seen / (self.pairs.get(text[i - 2 : i], 0) + self.vocab_size))
        return total / (len(text) - 2)
