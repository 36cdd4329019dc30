"""The last chapter's character-level GPT-2, its corpora and its shipped checkpoint."""

import json

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


def test_tokenizer_round_trips_and_marks_unknown_characters(tokenizer):
    text = "Parameters\n----------\na : array_like"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == 96
    assert tokenizer.decode(tokenizer.encode("x×y\t")) == "x?y?"


def test_the_two_corpora_are_read_from_the_installed_packages(tokenizer, numpy_corpus):
    cards = charlm.sklearn_dataset_cards(tokenizer)
    assert numpy_corpus.text.startswith(numpy_corpus.text[:100]) and len(numpy_corpus.text) == 300_000
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
    shipped = json.loads(meta["first_losses"])
    _, history = charlm.pretrain_char_gpt2(numpy_corpus, **charlm.PRETRAIN, stop_after=len(shipped))
    assert history == shipped  # bit for bit: run tools/make_gpt2_checkpoint.py after a change


def test_the_shipped_model_is_small_and_has_learned_its_corpus(tokenizer, numpy_corpus):
    assert charlm.CHECKPOINT_PATH.stat().st_size < 2_000_000
    tok, model = charlm.pretrained_char_gpt2()
    assert not model.training
    cards = charlm.sklearn_dataset_cards(tok)
    own = charlm.eval_loss(model, numpy_corpus.val)
    assert own < 1.6 < charlm.eval_loss(model, cards.val)  # far below log(96) = 4.56 nats


def test_generation_is_seeded_and_restores_the_mode(tokenizer):
    _, model = charlm.pretrained_char_gpt2()
    model.train()
    text = charlm.generate(model, tokenizer, "Returns\n", 40, seed=1)
    assert model.training and len(text) == 40
    assert charlm.generate(model, tokenizer, "Returns\n", 40, seed=1) == text
    assert charlm.generate(model, tokenizer, "Returns\n", 40, seed=2) != text
    with pytest.raises(ValueError, match="n_chars"):
        charlm.generate(model, tokenizer, "x", 0)
