"""The last chapter's character-level GPT-2, its corpora and its shipped checkpoint."""

import json
import platform

import pytest
import torch
from safetensors import safe_open

from lora_tutorial import charlm


@pytest.fixture(scope="module")
def tokenizer():
    return charlm.CharTokenizer()


@pytest.fixture(scope="module")
def numpy_corpus(tokenizer):
    return charlm.numpy_docstrings(tokenizer)


@pytest.fixture(scope="module")
def shipped():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs faster on one thread
    yield charlm.pretrained_char_gpt2()[1]
    torch.set_num_threads(threads)


def test_tokenizer_round_trips_and_marks_unknown_characters(tokenizer):
    text = "Parameters\n----------\na : array_like"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == 96
    assert tokenizer.decode(tokenizer.encode("x×y\t")) == "x?y?"


def test_the_two_corpora_are_read_from_the_installed_packages(tokenizer, numpy_corpus):
    cards = charlm.sklearn_dataset_cards(tokenizer)
    assert len(numpy_corpus.text) == 300_000
    # Functions only: scalar types' docstrings name the platform's aliases.
    assert "Alias on this platform" not in numpy_corpus.text
    assert "  " not in numpy_corpus.text and "\n\n\n" not in cards.text  # white space folded
    assert "Parameters\n----------" in numpy_corpus.text and ">>> np." in numpy_corpus.text
    assert ":Number of Instances:" in cards.text and "Parameters\n----------" not in cards.text
    for corpus in (numpy_corpus, cards):
        assert len(corpus.train) + len(corpus.val) == len(corpus.text)
        assert 8 * len(corpus.val) < len(corpus.train) < 10 * len(corpus.val)
    assert charlm.numpy_docstrings(tokenizer).text == numpy_corpus.text  # the same every time


def test_a_fresh_model_leaves_the_global_rng_alone(global_rng_untouched):
    first = charlm.char_gpt2(96, seed=3)
    second = charlm.char_gpt2(96, seed=3)
    assert torch.equal(first.transformer.wte.weight, second.transformer.wte.weight)
    assert not torch.equal(first.transformer.wte.weight, charlm.char_gpt2(96, seed=4).transformer.wte.weight)


def test_the_recipe_still_reproduces_the_shipped_checkpoint(numpy_corpus):
    with safe_open(str(charlm.CHECKPOINT_PATH), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["recipe"]) == charlm.PRETRAIN
    first = json.loads(meta["first_losses"])
    _, history = charlm.pretrain_char_gpt2(numpy_corpus, **charlm.PRETRAIN, stop_after=len(first))
    if meta["made_on"] == charlm.made_on():
        # The machine kind and versions that wrote the file: bit for bit.
        # A difference means the recipe changed: run tools/make_gpt2_checkpoint.py.
        assert history == first
    else:  # another processor may round differently, but not by much
        assert history == pytest.approx(first, abs=1e-3), platform.machine()


def test_the_shipped_model_is_small_and_has_learned_its_corpus(tokenizer, numpy_corpus, shipped):
    assert charlm.CHECKPOINT_PATH.stat().st_size < 2_000_000
    assert not shipped.training
    cards = charlm.sklearn_dataset_cards(tokenizer)
    own = charlm.eval_loss(shipped, numpy_corpus.val[:8192])
    assert own < 1.6 < charlm.eval_loss(shipped, cards.val)  # far below log(96) = 4.56 nats


def test_generation_is_seeded_and_restores_the_mode(tokenizer, shipped):
    model = shipped.train()
    text = charlm.generate(model, tokenizer, "Returns\n", 40, seed=1)
    assert model.training and len(text) == 40
    assert charlm.generate(model, tokenizer, "Returns\n", 40, seed=1) == text
    assert charlm.generate(model, tokenizer, "Returns\n", 40, seed=2) != text
    model.eval()
    with pytest.raises(ValueError, match="n_chars"):
        charlm.generate(model, tokenizer, "x", 0)
    with pytest.raises(ValueError, match="temperature"):
        charlm.generate(model, tokenizer, "x", 5, temperature=0)
    with pytest.raises(ValueError, match="length=64"):
        charlm.eval_loss(model, tokenizer.encode("too short"))


def test_the_trigram_yardstick_tells_the_corpora_apart(tokenizer, numpy_corpus):
    cards = charlm.sklearn_dataset_cards(tokenizer)
    n = len(cards.train)
    old = charlm.CharTrigrams(tokenizer.decode(numpy_corpus.train[:n]))
    new = charlm.CharTrigrams(tokenizer.decode(cards.train))
    def style(ids):
        text = tokenizer.decode(ids[:2000])
        return new.log_prob(text) - old.log_prob(text)
    assert style(numpy_corpus.val) < 0 < style(cards.val)
