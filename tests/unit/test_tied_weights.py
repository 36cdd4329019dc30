"""Issue 18, item 1 (and the tied half of item 2): weight tying is never changed silently.

GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight``. Adapting the head is
fine; merging into it would rewrite the input embedding too, so it is refused
unless the layer is untied on request. Modules trained whole train a copy, so a
tied partner never moves. PEFT's own files for a tied head load.
"""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_tutorial as lt

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

CONFIG = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
              bos_token_id=0, eos_token_id=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gpt2():
    with lt.isolated_rng(0):
        model = GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


IDS = torch.randint(0, 40, (2, 8), generator=gen(3))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def quietly(make, *args, **kwargs):
    with warnings.catch_warnings():  # PEFT's notes on tied weights and Conv1D
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


def train_everything(model, seed=1):
    """Stand-in for training: random B factors and trained copies."""
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.normal_(std=0.3, generator=gen(seed))
        for _, wrapper in lt.saved_modules(model):
            for p in wrapper.trained.parameters():
                p.add_(torch.randn(p.shape, generator=gen(seed + 1)))
    return model


# ------------------------------------------------------------ merging into a tied weight
def test_merging_into_a_tied_head_is_refused_and_changes_nothing(gpt2):
    model = train_everything(lt.add_lora(copy.deepcopy(gpt2), ["lm_head"], r=2, seed=0))
    assert model.lm_head.tied_to() == ["transformer.wte.weight"]
    wte, adapted = model.transformer.wte.weight.clone(), logits(model)
    with pytest.raises(RuntimeError, match=r"tied to \['transformer.wte.weight'\]"):
        model.lm_head.merge_weights_()
    with pytest.raises(RuntimeError, match=r"the base weight of 'lm_head' is tied to "
                                           r"\['transformer.wte.weight'\].*no layer was changed"):
        lt.unload_lora(model, merge=True)
    assert isinstance(model.lm_head, lt.LoRALinear) and not model.lm_head.merged
    assert torch.equal(model.transformer.wte.weight, wte) and torch.equal(logits(model), adapted)
    plain = lt.unload_lora(copy.deepcopy(model), merge=False)  # dropping the adapter is fine
    assert torch.equal(logits(plain), logits(gpt2))
    twin = copy.deepcopy(model)  # a copy's tie is to the copy's embedding
    assert twin.lm_head.tied_to() == ["transformer.wte.weight"]
    twin.lm_head.untie_weights_()
    assert model.lm_head.tied_to() == ["transformer.wte.weight"]


def test_untying_on_request_then_merging_keeps_the_embedding(gpt2):
    model = train_everything(lt.add_lora(copy.deepcopy(gpt2), ["lm_head", "c_attn"], r=2, seed=0))
    adapted = logits(model)
    model.lm_head.untie_weights_()
    assert model.lm_head.tied_to() == [] and torch.equal(logits(model), adapted)
    merged = lt.unload_lora(model, merge=True)
    assert torch.equal(merged.transformer.wte.weight, gpt2.transformer.wte.weight)
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    torch.testing.assert_close(logits(merged), adapted, atol=1e-4, rtol=0)


def test_merging_elsewhere_in_a_tied_model_is_fine(gpt2):
    model = train_everything(lt.add_lora(copy.deepcopy(gpt2), ["c_attn", "c_fc"], r=2, seed=0))
    adapted = logits(model)
    merged = lt.unload_lora(model, merge=True)
    assert merged.lm_head.weight is merged.transformer.wte.weight
    torch.testing.assert_close(logits(merged), adapted, atol=1e-4, rtol=0)


def test_a_tie_by_identity_or_by_memory_is_found_whatever_the_names():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied by identity, no config, no telling names
    other = nn.Linear(4, 4)
    twin = nn.Linear(4, 4)
    twin.weight = nn.Parameter(other.weight.data)  # another Parameter on the same memory
    model = nn.ModuleDict({"emb": embedding, "out": head, "a": other, "b": twin})
    lt.add_lora(model, ["out", "a"], r=2, seed=0)
    assert model["out"].tied_to() == ["emb.weight"] and model["a"].tied_to() == ["b.weight"]
    with torch.no_grad():
        model["out"].lora_B.fill_(0.5)
    w = embedding.weight.clone()
    with pytest.raises(RuntimeError, match="tied to"):
        model["out"].merge_weights_()
    assert torch.equal(embedding.weight, w)


# ------------------------------------------------------------ PEFT's files for a tied head
def test_peft_lm_head_adapter_files_load_when_the_base_is_the_same(gpt2, tmp_path):
    """PEFT's default save of an adapted tied head carries lm_head.base_layer.weight."""
    theirs = quietly(get_peft_model, copy.deepcopy(gpt2),
                     LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False))
    quietly(theirs.save_pretrained, str(tmp_path))
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = lt.add_lora(copy.deepcopy(gpt2), ["lm_head"], r=2, seed=5)
    lt.load_adapter(ours, tmp_path)
    assert (logits(ours) - logits(gpt2)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=0)
    assert torch.equal(ours.transformer.wte.weight, gpt2.transformer.wte.weight)
    # another base model: the copy of its base weight differs, and the message says so
    other = copy.deepcopy(gpt2)
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.01)
    target = lt.add_lora(other, ["lm_head"], r=2, seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lt.AdapterFormatError, match=r"^base_model.model.lm_head.base_layer.weight is a "
                                                    r"copy of a base tensor of the model.*differs"):
        lt.load_adapter(target, tmp_path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_tied_adapters_of_peft_are_refused_clearly(gpt2, tmp_path):
    theirs = quietly(get_peft_model, copy.deepcopy(gpt2),
                     LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    quietly(theirs.save_pretrained, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, ensure_weight_tying=True)))
    ours = lt.add_lora(copy.deepcopy(gpt2), ["c_attn"], r=2)
    with pytest.raises(lt.AdapterFormatError, match="ensure_weight_tying=True is a feature this library "
                                                    "cannot honour"):
        lt.load_adapter(ours, tmp_path)


# ------------------------------------------------------------ modules trained whole beside a tie
@pytest.mark.parametrize("saved", [["lm_head"], ["wte"]])
def test_a_tied_module_trained_whole_is_a_copy_and_peft_reads_it_alike(gpt2, tmp_path, saved):
    """Issue 18, item 2: logits in PEFT differed by 10.4 (lm_head) and 9.7 (wte)."""
    ours = train_everything(lt.add_lora(copy.deepcopy(gpt2), ["c_attn"], r=2, seed=0,
                                        modules_to_save=saved))
    original = dict(lt.saved_modules(ours))
    (name, wrapper), = original.items()
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert all(p.requires_grad for p in wrapper.trained.parameters())
    # the tied pair is untouched: the head still reads the original embedding
    assert torch.equal(gpt2.transformer.wte.weight, wrapper.original_module.weight)
    partner = ours.transformer.wte.original_module if saved == ["wte"] else ours.transformer.wte
    assert torch.equal(partner.weight, gpt2.transformer.wte.weight)
    lt.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == saved
    theirs = quietly(PeftModel.from_pretrained, copy.deepcopy(gpt2), str(tmp_path)).eval()
    assert (logits(ours) - logits(gpt2)).abs().max() > 1e-2
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    with lt.disable_adapter(ours):
        assert torch.equal(logits(ours), logits(gpt2))


def test_a_peft_file_with_a_tied_head_trained_whole_leaves_the_embedding(gpt2, tmp_path):
    """Issue 18, item 2: load_adapter used to rewrite wte with the saved lm_head."""
    theirs = quietly(get_peft_model, copy.deepcopy(gpt2),
                     LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.normal_(generator=gen(4))
    quietly(theirs.save_pretrained, str(tmp_path))
    ours = lt.add_lora(copy.deepcopy(gpt2), ["c_attn"], r=2, seed=1)
    lt.load_adapter(ours, tmp_path)
    assert torch.equal(ours.transformer.wte.weight, gpt2.transformer.wte.weight)
    assert isinstance(ours.lm_head, lt.ModuleToSave)
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=0)
