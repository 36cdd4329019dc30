"""add_lora's targets (PEFT's conventions), the layers it adapts, and what it refuses."""

import copy

import pytest
import torch
from torch import nn

import lora_tutorial as lt
from transformers.pytorch_utils import Conv1D


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(before, model):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(self.q_proj(x) * self.v_proj(x))


def names(model):
    return [name for name, _ in lt.lora_layers(model)]


# ------------------------------------------------------------ target syntax
def test_a_list_matches_names_and_suffixes():
    model = nn.Sequential(Block(), Block())
    lt.add_lora(model, ["q_proj", "1.mlp.0"], r=2)
    assert names(model) == ["0.q_proj", "1.q_proj", "1.mlp.0"]


def test_a_string_is_a_full_match_regular_expression():
    model = nn.Sequential(Block(), Block())
    lt.add_lora(model, r"1\.(q|v)_proj", r=2)
    assert names(model) == ["1.q_proj", "1.v_proj"]
    with pytest.raises(ValueError, match=r"target_modules=.* does not compile"):
        lt.add_lora(nn.Sequential(Block()), "(q_proj", r=2)
    # full match: "q_proj" alone as a regex matches no full name (they start with "0.")
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] matched no linear layer"):
        lt.add_lora(nn.Sequential(Block()), "q_proj", r=2)


def test_all_linear_skips_the_output_head_of_a_transformers_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                        bos_token_id=0, eos_token_id=0)
    with lt.isolated_rng(0):
        model = GPT2LMHeadModel(config)
    lt.add_lora(model, "all-linear", r=2)
    assert names(model) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                            "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert isinstance(model.lm_head, nn.Linear)  # get_output_embeddings(): left alone


def test_all_linear_on_a_plain_module_takes_every_linear_layer():
    model = nn.Sequential(Block(), nn.Linear(8, 2))
    lt.add_lora(model, "ALL-LINEAR", r=2)  # PEFT lower-cases it
    assert names(model) == ["0.q_proj", "0.v_proj", "0.mlp.0", "0.mlp.2", "1"]


def test_bad_target_types():
    with pytest.raises(TypeError, match="target_modules must be a list of module names"):
        lt.add_lora(nn.Sequential(Block()), 3)
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        lt.add_lora(nn.Sequential(Block()), ["q_proj", ""])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lt.add_lora("model", ["q_proj"])
    with pytest.raises(TypeError, match="rslora must be a bool, got 'no'"):
        lt.add_lora(nn.Sequential(Block()), ["q_proj"], rslora="no")


# ------------------------------------------------------------ what is adapted
def test_linear_subclasses_and_conv1d_are_adapted():
    """Issue 10, item 9: they used to be skipped silently."""
    class MyLinear(nn.Linear):
        pass

    model = nn.ModuleDict({
        "sub": MyLinear(6, 4),
        "ndq": nn.modules.linear.NonDynamicallyQuantizableLinear(6, 4),
        "conv": Conv1D(4, 6),  # Conv1D(nf=out, nx=in): weight (in, out) = (6, 4)
    })
    lt.add_lora(model, ["sub", "ndq", "conv"], r=2, seed=0)
    assert names(model) == ["sub", "ndq", "conv"]
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    for name in ("sub", "ndq", "conv"):
        layer = model[name]
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(2))
            expected = layer.base(x) + x @ layer.delta_weight().T
            torch.testing.assert_close(layer(x), expected)
            layer.merge_weights_()
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert model["conv"].fan_in_fan_out and model["conv"].base.weight.shape == (6, 4)
    assert isinstance(lt.unload_lora(model, merge=False)["sub"], MyLinear)


def test_multihead_attention_out_proj_is_refused_with_the_reason():
    """nn.MultiheadAttention reads out_proj.weight and never calls out_proj."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "ff": nn.Linear(8, 8)})
    before = params(model)
    with pytest.raises(ValueError, match=r"'attn.out_proj', which cannot be adapted: .* never calls out_proj"):
        lt.add_lora(model, ["out_proj", "ff"])
    assert unchanged(before, model) and not names(model)
    lt.add_lora(model, "all-linear", r=2)  # all-linear leaves it out
    assert names(model) == ["ff"]


def test_a_match_that_is_not_a_linear_layer_is_refused_saying_what_it_is():
    model = nn.Sequential(Block())
    with pytest.raises(ValueError, match=r"'0.mlp', which cannot be adapted: it is a Sequential"):
        lt.add_lora(model, ["mlp"])
    with pytest.raises(ValueError, match=r"'0.mlp.1', which cannot be adapted: it is a GELU"):
        lt.add_lora(model, r"0\.mlp\.\d")
    assert not names(model)


def test_a_list_entry_that_matches_nothing_is_named():
    model = nn.Sequential(Block())
    before = params(model)
    with pytest.raises(ValueError, match=r"target_modules \['k_proj'\] match no module"):
        lt.add_lora(model, ["q_proj", "k_proj"])
    assert unchanged(before, model) and not names(model)


def test_an_adapted_model_is_refused_before_anything_changes():
    model = nn.Sequential(Block())
    lt.add_lora(model, ["q_proj"], r=2, seed=0)
    before, trainable = params(model), [p.requires_grad for p in model.parameters()]
    for target in (["base"], ["q_proj"], "all-linear", r"0\.q_proj\.base"):
        with pytest.raises(ValueError, match="the model is already adapted"):
            lt.add_lora(model, target, r=2)
        assert unchanged(before, model) and names(model) == ["0.q_proj"]
        assert [p.requires_grad for p in model.parameters()] == trainable
    lt.add_lora(model, ["v_proj"], r=2)  # other layers may still be adapted
    assert names(model) == ["0.q_proj", "0.v_proj"]


def test_validation_comes_before_drawing_from_the_callers_generator():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError):
        lt.add_lora(nn.Sequential(Block()), ["nothing"], seed=gen)
    assert torch.equal(gen.get_state(), state)


# ------------------------------------------------------------ modules_to_save
def test_modules_to_save_train_whole_and_are_never_adapted():
    model = nn.ModuleDict({"body": Block(), "classifier": nn.Linear(8, 3)})
    model.classifier.requires_grad_(False)
    lt.add_lora(model, "all-linear", r=2, modules_to_save=["classifier"])
    assert names(model) == ["body.q_proj", "body.v_proj", "body.mlp.0", "body.mlp.2"]
    assert all(p.requires_grad for p in model.classifier.trained.parameters())
    assert [name for name, _ in lt.saved_modules(model)] == ["classifier"]
    with pytest.raises(ValueError, match=r"modules_to_save names \['head'\] match no module with parameters"):
        lt.add_lora(nn.Sequential(Block()), ["q_proj"], modules_to_save=["head"])
    with pytest.raises(TypeError, match="modules_to_save must be a list of module names"):
        lt.add_lora(nn.Sequential(Block()), ["q_proj"], modules_to_save="mlp")
    model = nn.ModuleDict({"body": Block(), "classifier": nn.Linear(8, 3)})
    lt.add_lora(model, ["q_proj"], r=2, modules_to_save=["classifier"])
    lt.add_lora(model, ["v_proj"], r=2)  # adapting more layers keeps the head saved
    assert [name for name, _ in lt.saved_modules(model)] == ["classifier"]
    assert all(p.requires_grad for p in model.classifier.trained.parameters())
    adapted = lt.add_lora(nn.Sequential(Block()), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="is or holds a LoRALinear"):
        lt.add_lora(adapted, ["v_proj"], modules_to_save=["q_proj"])


# ------------------------------------------------------------ unload
def test_unload_with_merge_checks_every_layer_before_changing_any():
    """Issue 10: a non-finite update in a later layer used to leave earlier ones merged."""
    model = nn.Sequential(Block(), Block())
    lt.add_lora(model, ["q_proj", "v_proj"], r=2, seed=0)
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.fill_(0.1)
        model[1].v_proj.lora_B[0, 0] = float("inf")
    before = params(model)
    with pytest.raises(ValueError, match=r"merged weight of '1.v_proj' would have 8 non-finite"):
        lt.unload_lora(model, merge=True)
    assert unchanged(before, model) and len(names(model)) == 4
    assert not any(layer.merged for _, layer in lt.lora_layers(model))


def test_unload_in_fp16_refuses_an_overflowing_merge():
    model = lt.add_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).half(), ["0", "1"], r=2)
    with torch.no_grad():
        model[1].base.weight.fill_(60000.0)
        model[1].lora_B.fill_(1000.0)  # finite, but 60000 + update > 65504
        model[1].lora_A.fill_(1.0)
    before = params(model)
    with pytest.raises(ValueError, match="merged weight of '1'"):
        lt.unload_lora(model, merge=True)
    assert unchanged(before, model)


def test_unload_forgets_the_recorded_settings():
    model = nn.ModuleDict({"body": Block(), "classifier": nn.Linear(8, 3)})
    lt.add_lora(model, ["q_proj"], r=2, bias="all", modules_to_save=["classifier"])
    plain = lt.unload_lora(copy.deepcopy(model), merge=False)
    assert lt.recorded_bias(plain) is None and lt.saved_modules(plain) == []
