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
    # Not bit for bit: another processor's float32 kernels round differently, and
    # "made_on" cannot tell two x86 CPUs apart. Measured on 2026-12-03, the first
    # 20 losses (about 4.2 nats) of a live run differed from the stored ones by at
    # most 5.7e-6 across the portability matrix (native AVX-512, ATEN_CPU_CAPABILITY
    # =default and =avx2, MKL_CBWR=COMPATIBLE, OMP_NUM_THREADS=1; /tmp script in the
    # closing note of issue 16). 5e-5 allows that spread nine times over and still
    # fails for any change of the recipe: a different learning rate, batch or seed
    # moves the second loss by more than 1e-3.
    assert history == pytest.approx(first, abs=5e-5), platform.machine()


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


# ------------------------------------------------------------ issue 18: inputs checked, shape recorded
@pytest.fixture(scope="module")
def small():
    return charlm.char_gpt2(96, seed=0).eval()


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([5, 96]), ValueError, r"ids must be token ids in \[0, 96\), got values from 5 to 96"),
    (torch.tensor([-1, 3]), ValueError, r"ids must be token ids in \[0, 96\)"),
    (torch.zeros(2, 3, dtype=torch.long), ValueError, r"ids must be 1-D \(n,\), got shape \(2, 3\)"),
    (torch.tensor([1.0, 2.0]), TypeError, r"ids must hold integer token ids, got dtype torch.float32"),
    ([1, 2], TypeError, r"ids must be a torch.Tensor of token ids, got list"),
])
def test_decode_refuses_what_is_not_token_ids(tokenizer, ids, error, message):
    with pytest.raises(error, match=message):
        tokenizer.decode(ids)


def test_encode_refuses_bytes_and_marks_only_unknown_characters(tokenizer):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenizer.encode(b"abc")
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.clean(None)
    assert tokenizer.decode(tokenizer.encode("a€b")) == "a?b"  # documented: unknown -> "?"


@pytest.mark.parametrize("length, message", [
    (0, "length must be a positive int, got 0"),
    (True, "length must be a positive int, got True"),
    (-5, "length must be a positive int, got -5"),
    (100, "length must be at most the model's n_positions = 64, got 100"),
])
def test_eval_loss_checks_the_window_length(tokenizer, small, length, message):
    ids = tokenizer.encode("Parameters\n" * 7)
    with pytest.raises(ValueError, match=message):
        charlm.eval_loss(small, ids, length)


def test_eval_loss_and_lm_loss_check_their_ids(tokenizer, small):
    assert charlm.eval_loss(small, tokenizer.encode("Parameters\n" * 7), 16) > 0
    with pytest.raises(ValueError, match=r"ids must be 1-D"):
        charlm.eval_loss(small, torch.zeros(2, 70, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, 96\)"):
        charlm.eval_loss(small, torch.full((70,), 200))
    with pytest.raises(TypeError, match="model must be a GPT-2 language model"):
        charlm.eval_loss(torch.nn.Linear(2, 2), tokenizer.encode("x" * 70))
    with pytest.raises(ValueError, match=r"batch must be a \(b, t \+ 1\) tensor"):
        charlm.lm_loss(small, torch.zeros(5, dtype=torch.long))


def test_generate_checks_its_arguments_before_drawing(tokenizer, small):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for kwargs, message in [(dict(prompt=""), "prompt must hold at least 1 character"),
                            (dict(temperature=True), "temperature must be a positive finite number, got True"),
                            (dict(temperature=float("inf")), "temperature must be"),
                            (dict(n_chars=0), "n_chars must be a positive int")]:
        args = dict(prompt="x", n_chars=3, temperature=0.7) | kwargs
        with pytest.raises(ValueError, match=message):
            charlm.generate(small, tokenizer, args["prompt"], args["n_chars"],
                            temperature=args["temperature"], seed=g)
    assert torch.equal(g.get_state(), state)
    with pytest.raises(TypeError, match="tokenizer must be a CharTokenizer"):
        charlm.generate(small, "abc", "x", 3)


def test_a_tiny_temperature_draws_the_most_likely_characters(tokenizer, small):
    """1e-300 used to fail inside multinomial: logits / temperature overflowed."""
    text = charlm.generate(small, tokenizer, "The ", 3, temperature=1e-300, seed=1)
    ids = tokenizer.encode("The ")
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, small(ids[None]).logits[0, -1].argmax().view(1)])
    assert text == tokenizer.decode(ids[-3:])
    same = charlm.generate(small, tokenizer, "The ", 3, seed=torch.Generator().manual_seed(3))
    assert same == charlm.generate(small, tokenizer, "The ", 3, seed=3)


def test_random_batch_checks_its_arguments_before_drawing(tokenizer):
    ids = tokenizer.encode("abcdefghij" * 3)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        charlm.random_batch(ids, 0, 4, g)
    with pytest.raises(ValueError, match="ids must hold at least 31 tokens, got 30"):
        charlm.random_batch(ids, 2, 30, g)
    with pytest.raises(ValueError, match="length must be a positive int, got True"):
        charlm.random_batch(ids, 2, True, g)
    assert torch.equal(g.get_state(), state)
    assert charlm.random_batch(ids, 3, 29, g).shape == (3, 30)


def test_the_trigram_yardstick_checks_its_text():
    trigrams = charlm.CharTrigrams("abcabcabd")
    with pytest.raises(ValueError, match="text must hold at least 3 character"):
        trigrams.log_prob("ab")
    with pytest.raises(TypeError, match="text must be a str"):
        charlm.CharTrigrams(b"abc")


def test_the_shipped_checkpoint_records_its_shape_and_refuses_another(monkeypatch):
    with safe_open(str(charlm.CHECKPOINT_PATH), "pt") as f:
        recorded = json.loads(f.metadata()["model_shape"])
    assert recorded == charlm.checkpoint_shape() == {**charlm.MODEL_SHAPE, "vocab_size": 96}
    # n_head cannot be read off the tensors: a 2-head model would load them silently
    monkeypatch.setitem(charlm.MODEL_SHAPE, "n_head", 2)
    with pytest.raises(ValueError, match=r"holds a model of shape \{.*'n_head': 4.*\}, but this library "
                                         r"builds \{.*'n_head': 2"):
        charlm.pretrained_char_gpt2()
