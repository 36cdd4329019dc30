"""Issue 18, items 6 to 8 and the error messages: what PEFT selects from our files, where
"all-linear" differs from PEFT, configs the tensors cannot contradict, messages that say what is there."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lora_tutorial as lt

from peft import LoraConfig, PeftModel, get_peft_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quietly(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


def peft_adapted(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if hasattr(m, "lora_A") and n)


def randomise(model):
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.normal_(generator=gen(1))
    return model


# ------------------------------------------------------------ item 8: target_modules PEFT reads alike
@pytest.mark.parametrize("targets, written", [
    ("0", "0"),  # as a list, ["0"] would also select "1.0" (a ReLU): PEFT failed to load it
    (["1.1"], ["1.1"]),  # a list that selects exactly what was adapted stays a list
    ("all-linear", r"0|1\.1"),
])
def test_saved_target_modules_select_in_peft_exactly_the_adapted_modules(targets, written, tmp_path):
    with lt.isolated_rng(0):
        base = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 4)))
    ours = randomise(lt.add_lora(copy.deepcopy(base), targets, r=2))
    lt.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == written
    theirs = quietly(PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path))
    assert peft_adapted(theirs) == sorted(name for name, _ in lt.lora_layers(ours))
    x = torch.randn(3, 4, generator=gen(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------ item 7: "all-linear" against PEFT
class WithHeadMethod(nn.Module):
    """A plain module (not a transformers model) that defines get_output_embeddings."""

    def __init__(self):
        super().__init__()
        self.body, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def get_output_embeddings(self):
        return self.out

    def forward(self, x):
        return self.out(self.body(x))


def test_all_linear_on_a_plain_module_with_get_output_embeddings_matches_peft():
    ours = lt.add_lora(WithHeadMethod(), "all-linear", r=2)
    theirs = quietly(get_peft_model, WithHeadMethod(), LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(name for name, _ in lt.lora_layers(ours)) == peft_adapted(theirs) == ["body", "out"]


def test_all_linear_leaves_out_attention_out_proj_and_says_why_peft_files_with_it_fail(tmp_path):
    """The one documented difference: PEFT adapts self_attn.out_proj, which the attention never calls."""
    with lt.isolated_rng(0):
        encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    ours = lt.add_lora(copy.deepcopy(encoder), "all-linear", r=2)
    theirs = quietly(get_peft_model, copy.deepcopy(encoder),
                     LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert sorted(name for name, _ in lt.lora_layers(ours)) == ["linear1", "linear2"]
    assert peft_adapted(theirs) == ["linear1", "linear2", "self_attn.out_proj"]
    x = torch.randn(5, 1, 8, generator=gen(3))
    before = theirs(x)
    with torch.no_grad():  # PEFT's adapter there changes nothing: the attention reads the weight
        layer = theirs.base_model.model.self_attn.out_proj
        layer.lora_B["default"].weight.normal_(generator=gen(4))
    assert torch.equal(theirs(x), before)
    quietly(theirs.save_pretrained, str(tmp_path))
    with pytest.raises(lt.AdapterFormatError, match=r"self_attn.out_proj.lora_A.weight: the model has no "
                                                    r"LoRALinear.*the out_proj of nn.MultiheadAttention, "
                                                    r"which this library does not adapt"):
        lt.load_adapter(ours, tmp_path)
    assert "out_proj" in lt.inject.__doc__ and "differs from PEFT" in lt.inject.__doc__


# ------------------------------------------------------------ item 6: a config the tensors cannot contradict
def test_the_saved_rank_is_the_factors_and_factors_that_do_not_fit_are_refused(tmp_path):
    model = randomise(lt.add_lora(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2, alpha=4.0))
    with pytest.raises(AttributeError, match="r is read-only"):
        model[0].r = 4  # issue 18: this changed the scaling and was saved as r=4
    lt.save_adapter(model, tmp_path / "good")
    assert json.loads((tmp_path / "good" / "adapter_config.json").read_text())["r"] == 2
    model[0].lora_B = nn.Parameter(torch.zeros(4, 3))  # replaced by hand, no longer fitting lora_A
    with pytest.raises(ValueError, match=r"holds lora_A \(2, 8\) and lora_B \(4, 3\), which do not fit"):
        lt.save_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(TypeError, match="not a LoRALinear itself"):  # PEFT has no name for it
        lt.save_adapter(lt.LoRALinear(4, 4, r=2), tmp_path / "bare")


# ------------------------------------------------------------ messages that say what is there
def test_an_unknown_tensor_of_an_adapted_layer_is_named_without_contradiction(tmp_path):
    model = randomise(lt.add_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0"], r=2))
    lt.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.0.lora_C.weight"] = torch.zeros(2, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(lt.AdapterFormatError, match=r"^base_model.model.0.lora_C.weight: the LoRALinear at "
                                                    r"'0' has no tensor 'lora_C.weight'"):
        lt.load_adapter(model, tmp_path)
    del tensors["base_model.model.0.lora_C.weight"]
    tensors["base_model.model.1.weight"] = torch.zeros(2, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(lt.AdapterFormatError, match=r"at this path \('1'\): it is a tensor of the base "
                                                    r"module '1'; if that module was trained whole"):
        lt.load_adapter(model, tmp_path)


def test_a_lazy_model_is_refused_before_add_lora_or_load_adapter_changes_it(tmp_path):
    """Issue 18: add_lora(m, ["2"], modules_to_save=["3"]) replaced layer 2, then raised."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3), nn.Linear(3, 3), nn.Linear(3, 3))
    before = copy.deepcopy(model[2].state_dict())
    with pytest.raises(ValueError, match=r"uninitialised lazy parameter '1.weight'"):
        lt.add_lora(model, ["2"], modules_to_save=["3"])
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    assert torch.equal(model[2].weight, before["weight"]) and model[2].weight.requires_grad
    with pytest.raises(ValueError, match="uninitialised lazy parameter"):
        lt.mark_only_lora_as_trainable(model)
    assert all(p.requires_grad for p in model[2].parameters())
    adapted = lt.add_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    lt.save_adapter(randomise(adapted), tmp_path)
    adapted.lazy = nn.LazyLinear(2)
    with pytest.raises(ValueError, match="uninitialised lazy parameter 'lazy.weight'"):
        lt.load_adapter(adapted, tmp_path)
