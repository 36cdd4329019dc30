"""GPT-2 (Conv1D layers) and a sequence-classification head, by add_lora and by PEFT.

Small random GPT-2 models (seeded, nothing downloaded): the same trainable
parameters as PEFT's, the same logits with the same factors, adapter files
exchanged in both directions with identical outputs, merge and unmerge, and a
fully trained head (``modules_to_save``) saved and loaded in PEFT's format.
"""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lora_tutorial as lt
from lora_tutorial.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

VOCAB = 96
CONFIG = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gpt2():
    with lt.isolated_rng(0):
        return GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, VOCAB, (2, 10), generator=gen(3))


def peft_model(base, **kwargs):
    with warnings.catch_warnings():  # "fan_in_fan_out is set to False but the target is Conv1D"
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))


def randomise_b(model, seed):
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.normal_(std=0.05, generator=gen(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"], "all-linear"])
def test_gpt2_trainable_parameters_equal_peft(gpt2, targets):
    ours = lt.add_lora(copy.deepcopy(gpt2), targets, r=4, alpha=8.0, seed=1)
    theirs = peft_model(gpt2, r=4, lora_alpha=8, target_modules=targets)
    trainable, total = theirs.get_nb_trainable_parameters()
    count = lt.count_parameters(ours)
    assert (count.trainable, count.total) == (trainable, total)
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if hasattr(m, "lora_A") and n)
    assert sorted(name for name, _ in lt.lora_layers(ours)) == peft_names


def test_gpt2_same_factors_same_logits_and_merge(gpt2, tokens):
    ours = lt.add_lora(copy.deepcopy(gpt2), ["c_attn", "c_fc"], r=4, alpha=8.0, seed=1).eval()
    randomise_b(ours, 2)
    theirs = peft_model(gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]).eval()
    with torch.no_grad():
        for name, layer in lt.lora_layers(ours):
            twin = theirs.base_model.model.get_submodule(name)
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    expected = logits(ours, tokens)
    torch.testing.assert_close(expected, logits(theirs, tokens), atol=1e-5, rtol=0)
    assert (expected - logits(gpt2, tokens)).abs().max() > 1e-3  # the adapters do something

    w0 = {name: layer.base.weight.clone() for name, layer in lt.lora_layers(ours)}
    for _, layer in lt.lora_layers(ours):
        layer.merge_weights_()
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    merged_peft = theirs.merge_and_unload()
    for name, layer in lt.lora_layers(ours):  # Conv1D weights (in, out), merged alike
        torch.testing.assert_close(layer.base.weight, merged_peft.get_submodule(name).weight,
                                   atol=1e-6, rtol=0)
    for name, layer in lt.lora_layers(ours):
        layer.unmerge_weights_()
        torch.testing.assert_close(layer.base.weight, w0[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    plain = lt.unload_lora(copy.deepcopy(ours), merge=True)
    torch.testing.assert_close(logits(plain, tokens), expected, atol=1e-5, rtol=0)


def test_gpt2_adapter_saved_here_loads_in_peft(gpt2, tokens, tmp_path):
    ours = lt.add_lora(copy.deepcopy(gpt2), ["c_attn", "c_proj"], r=4, alpha=8.0,
                       bias="lora_only", seed=1).eval()
    randomise_b(ours, 2)
    with torch.no_grad():
        ours.transformer.h[0].attn.c_attn.base.bias.add_(0.1)  # a trained adapter bias
    ours.requires_grad_(False)
    lt.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] is True and config["bias"] == "lora_only"
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in load_file(
        str(tmp_path / ADAPTER_WEIGHTS))
    theirs = PeftModel.from_pretrained(copy.deepcopy(gpt2), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, tokens), logits(ours, tokens), atol=1e-5, rtol=0)


def test_gpt2_adapter_trained_in_peft_loads_here(gpt2, tokens, tmp_path):
    theirs = peft_model(gpt2, r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                        use_rslora=True, lora_dropout=0.0)
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    with lt.isolated_rng(0):
        for _ in range(3):
            opt.zero_grad()
            theirs(tokens, labels=tokens).loss.backward()
            opt.step()
    theirs.eval().save_pretrained(str(tmp_path))
    ours = lt.add_lora(copy.deepcopy(gpt2), ["c_attn", "c_fc"], r=4, seed=5).eval()
    lt.load_adapter(ours, tmp_path)
    assert all(layer.rslora and layer.alpha == 16.0 for _, layer in lt.lora_layers(ours))
    expected = logits(theirs, tokens)
    assert (expected - logits(gpt2, tokens)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------ modules_to_save
@pytest.fixture(scope="module")
def classifier():
    with lt.isolated_rng(0):
        return GPT2ForSequenceClassification(GPT2Config(num_labels=3, **CONFIG)).eval()


def scores(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_head_trained_in_peft_for_classification_loads_here(classifier, tokens, tmp_path):
    """PEFT's SEQ_CLS task adds modules_to_save=["classifier", "score"]: the head trains whole."""
    theirs = peft_model(classifier, task_type="SEQ_CLS", r=4, lora_alpha=8,
                        target_modules=["c_attn"])
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    with lt.isolated_rng(0):
        for _ in range(3):
            opt.zero_grad()
            theirs(tokens, labels=labels).loss.backward()
            opt.step()
    theirs.eval().save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert "base_model.model.score.weight" in saved
    ours = lt.add_lora(copy.deepcopy(classifier), ["c_attn"], r=4, alpha=8.0, seed=0).eval()
    before = ours.score.weight.clone()
    lt.load_adapter(ours, tmp_path)
    assert not torch.equal(ours.score.weight, before)
    torch.testing.assert_close(ours.score.weight, saved["base_model.model.score.weight"])
    torch.testing.assert_close(scores(ours, tokens), scores(theirs, tokens), atol=1e-5, rtol=0)
    # and saved again from here, it carries the head
    lt.save_adapter(ours, tmp_path / "again")
    assert "base_model.model.score.weight" in load_file(str(tmp_path / "again" / ADAPTER_WEIGHTS))


def test_a_head_trained_here_loads_in_peft(classifier, tokens, tmp_path):
    ours = lt.add_lora(copy.deepcopy(classifier), ["c_attn"], r=4, alpha=8.0, seed=0,
                       modules_to_save=["score"]).eval()
    assert ours.score.weight.requires_grad
    randomise_b(ours, 2)
    with torch.no_grad():
        ours.score.weight.normal_(std=0.5, generator=gen(4))  # "trained"
    ours.requires_grad_(False)
    lt.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in load_file(str(tmp_path / ADAPTER_WEIGHTS))
    theirs = PeftModel.from_pretrained(copy.deepcopy(classifier), str(tmp_path)).eval()
    assert (scores(ours, tokens) - scores(classifier, tokens)).abs().max() > 1e-2
    torch.testing.assert_close(scores(theirs, tokens), scores(ours, tokens), atol=1e-5, rtol=0)


def test_a_head_file_that_lacks_the_head_is_refused(classifier, tmp_path):
    ours = lt.add_lora(copy.deepcopy(classifier), ["c_attn"], r=4, seed=0, modules_to_save=["score"])
    lt.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(dict(config, modules_to_save=None)))
    target = lt.add_lora(copy.deepcopy(classifier), ["c_attn"], r=4, seed=0)
    with pytest.raises(lt.AdapterFormatError, match="base_model.model.score.weight: the model has no"):
        lt.load_adapter(target, tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    del tensors["base_model.model.score.weight"]
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    with pytest.raises(lt.AdapterFormatError, match="base_model.model.score.weight is missing"):
        lt.load_adapter(target, tmp_path)
