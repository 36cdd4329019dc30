"""Property test (Hypothesis): tied weights and modules trained whole, against PEFT.

Random small GPT-2 models (built from a GPT2Config, tied head or not, nothing
downloaded), random targets among the attention, MLP and head layers, random
modules trained whole (the head, the token embedding) and bias modes. For each:

* the counts of trainable and all parameters equal PEFT's;
* after "training" (random factors and copies) the file we write loads in PEFT
  to the same logits, and PEFT's file for the same adapter loads here alike;
* nothing but the adapter moved: with the adapter off the logits are the base
  model's, and a tied partner still holds the base weight;
* merging and unloading either gives the adapted logits, or, when the head is
  adapted and tied, is refused and changes nothing.
"""

import copy
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lora_tutorial as lt

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

SETTINGS = settings(derandomize=True, deadline=None, max_examples=12, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def quietly(make, *args, **kwargs):
    with warnings.catch_warnings():  # PEFT's notes on tied weights, Conv1D and embeddings
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@st.composite
def setups(draw):
    shape = dict(n_layer=draw(st.integers(1, 2)), n_embd=draw(st.sampled_from([8, 16])),
                 n_head=draw(st.sampled_from([1, 2])), vocab_size=draw(st.integers(12, 40)),
                 n_positions=16, bos_token_id=0, eos_token_id=0,
                 tie_word_embeddings=draw(st.booleans()))
    targets = draw(st.lists(st.sampled_from(["c_attn", "attn.c_proj", "c_fc", "lm_head"]),
                            min_size=1, max_size=3, unique=True))
    saved = draw(st.lists(st.sampled_from([n for n in ("lm_head", "wte") if n not in targets]),
                          max_size=2, unique=True))
    return shape, targets, saved, draw(st.sampled_from(["none", "lora_only", "all"])), draw(st.integers(0, 99))


@SETTINGS
@given(setup=setups())
def test_tied_weights_and_modules_trained_whole_behave_as_in_peft(setup):
    shape, targets, saved, bias, seed = setup
    with lt.isolated_rng(seed):
        base = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    tied = base.lm_head.weight is base.transformer.wte.weight
    assert tied == shape["tie_word_embeddings"]
    event(f"tied={tied}, head adapted={'lm_head' in targets}, saved={sorted(saved)}, bias={bias}")
    ids = torch.randint(0, shape["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(seed))
    wte = base.transformer.wte.weight.clone()
    kwargs = dict(r=2, target_modules=targets, modules_to_save=saved or None, bias=bias)
    ours = lt.add_lora(copy.deepcopy(base), targets, r=2, alpha=8.0, bias=bias,
                       modules_to_save=saved or None, seed=seed)
    theirs = quietly(get_peft_model, copy.deepcopy(base), LoraConfig(lora_alpha=8, **kwargs))
    count = lt.count_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # "training": what would train, moves
        for p in [p for p in ours.parameters() if p.requires_grad]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    adapted = logits(ours, ids)
    with lt.disable_adapter(ours):
        if bias == "none":  # (biases train in place, in PEFT too)
            assert torch.equal(logits(ours, ids), logits(base, ids))
    if tied and "wte" not in saved:
        assert torch.equal(ours.transformer.wte.weight, wte)
    for name, wrapper in lt.saved_modules(ours):
        assert not any(p.requires_grad for p in wrapper.original_module.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        lt.save_adapter(ours, Path(tmp) / "ours")
        in_peft = quietly(PeftModel.from_pretrained, copy.deepcopy(base), str(Path(tmp) / "ours"))
        torch.testing.assert_close(logits(in_peft.eval(), ids), adapted, atol=1e-4, rtol=1e-4)
        quietly(in_peft.save_pretrained, str(Path(tmp) / "theirs"))
        back = lt.add_lora(copy.deepcopy(base), targets, r=2, bias=bias, seed=seed + 2)
        lt.load_adapter(back, Path(tmp) / "theirs")
        torch.testing.assert_close(logits(back, ids), adapted, atol=1e-4, rtol=1e-4)
        assert ({n for n, p in back.named_parameters() if p.requires_grad}
                == {n for n, p in ours.named_parameters() if p.requires_grad})

    if tied and "lm_head" in targets:
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        try:
            lt.unload_lora(ours, merge=True)
        except RuntimeError as err:
            assert "tied to" in str(err)
        else:
            raise AssertionError("merging into a tied head was not refused")
        after = ours.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())
        ours.lm_head.untie_weights_()
    merged = lt.unload_lora(ours, merge=True)
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-4, rtol=1e-4)
    if tied and "wte" not in saved:
        assert torch.equal(merged.transformer.wte.weight, wte)
