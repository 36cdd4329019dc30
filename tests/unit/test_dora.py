"""DoRA (DoRALinear, add_lora(use_dora=True)) against PEFT's use_dora=True.

On nn.Linear and on a small random GPT-2 (Conv1D, nothing downloaded), in
float64: the same outputs, the same gradients of A, B and the magnitude,
the same merged weights, and adapter files with lora_magnitude_vector moving
both ways; then what DoRA must keep of the library's guarantees (a fresh
layer is its base, merge records, ties, NF4 bases, read-only sizes).
"""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_tutorial as lt
from lora_tutorial.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFormatError

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 40
GPT2 = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 10)
        self.down = nn.Linear(10, 6, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def base_model(kind):
    with lt.isolated_rng(0):
        if kind == "linear":
            return Net().double()
        return GPT2LMHeadModel(GPT2Config(**GPT2)).double()


TARGETS = {"linear": ["up", "down"], "gpt2": ["c_attn", "c_fc"]}


def inputs(kind, n=3):
    if kind == "linear":
        return torch.randn(n, 12, generator=gen(5), dtype=torch.float64)
    return torch.randint(1, VOCAB, (n, 7), generator=gen(5))


def run(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def peft(base, kind, **kwargs):
    with warnings.catch_warnings():  # "fan_in_fan_out is set to False but the target is Conv1D"
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(copy.deepcopy(base), LoraConfig(
            target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2", **kwargs))


def trained_pair(kind, dropout=0.0):
    """Ours and PEFT's DoRA models with the same (moved) A, B and magnitude."""
    base = base_model(kind)
    ours = lt.add_lora(copy.deepcopy(base), TARGETS[kind], r=3, alpha=6, dropout=dropout,
                       use_dora=True, seed=1)
    theirs = peft(base, kind, r=3, lora_alpha=6, lora_dropout=dropout, use_dora=True)
    g = gen(2)
    with torch.no_grad():
        for name, layer in lt.lora_layers(ours):
            layer.lora_B.normal_(std=0.3, generator=g)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return base, ours, theirs


@pytest.mark.parametrize("kind", ["linear", "gpt2"])
def test_a_fresh_dora_model_computes_its_base_and_peft_starts_the_same_magnitude(kind):
    base = base_model(kind)
    ours = lt.add_lora(copy.deepcopy(base), TARGETS[kind], r=2, use_dora=True)
    theirs = peft(base, kind, r=2, use_dora=True)
    x = inputs(kind)
    torch.testing.assert_close(run(ours.eval(), x), run(base.eval(), x), rtol=0, atol=1e-12)
    for name, layer in lt.lora_layers(ours):
        peft_m = theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        assert layer.lora_magnitude_vector.shape == (layer.out_features,)
        torch.testing.assert_close(layer.lora_magnitude_vector, peft_m, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["linear", "gpt2"])
def test_dora_outputs_and_gradients_of_a_b_and_m_match_peft(kind):
    _, ours, theirs = trained_pair(kind)
    x = inputs(kind)
    out, ref = run(ours.train(), x), run(theirs.train(), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (out ** 2).sum().backward()
    (ref ** 2).sum().backward()
    for name, layer in lt.lora_layers(ours):
        p = theirs.base_model.model.get_submodule(name)
        pairs = [(layer.lora_A, p.lora_A["default"].weight), (layer.lora_B, p.lora_B["default"].weight),
                 (layer.lora_magnitude_vector, p.lora_magnitude_vector["default"].weight)]
        for mine, peft_param in pairs:
            assert mine.grad is not None and mine.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-9, atol=1e-11)


def test_dora_with_dropout_in_training_matches_peft_mask_for_mask():
    _, ours, theirs = trained_pair("gpt2", dropout=0.3)
    x = inputs("gpt2")
    with lt.isolated_rng(7):
        out = run(ours.train(), x)
    with lt.isolated_rng(7):
        ref = run(theirs.train(), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "gpt2"])
def test_dora_merged_weights_match_peft_and_unmerge_gives_the_base_back(kind):
    base, ours, theirs = trained_pair(kind)
    x = inputs(kind)
    before = run(ours.eval(), x)
    for _, layer in lt.lora_layers(ours):
        layer.merge_weights_()
    theirs.merge_adapter()
    for name, layer in lt.lora_layers(ours):
        peft_weight = theirs.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base.weight, peft_weight, rtol=0, atol=1e-12)
        assert layer.merged_lora_scale.shape == (layer.out_features,)
    torch.testing.assert_close(run(ours, x), before, rtol=0, atol=1e-12)
    for name, layer in lt.lora_layers(ours):
        layer.unmerge_weights_()
        torch.testing.assert_close(layer.base.weight, base.get_submodule(name).weight,
                                   rtol=0, atol=1e-12)
    torch.testing.assert_close(run(ours, x), before, rtol=0, atol=1e-12)
    plain = lt.unload_lora(copy.deepcopy(ours), merge=True)  # merge_and_unload
    torch.testing.assert_close(run(plain.eval(), x), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "gpt2"])
def test_dora_files_move_both_ways_with_the_magnitude(kind, tmp_path):
    base, ours, theirs = trained_pair(kind)
    x = inputs(kind)
    expected = run(ours.eval(), x)
    lt.save_adapter(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS)
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())["use_dora"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run(loaded.eval(), x), expected, rtol=0, atol=1e-12)

    theirs.save_pretrained(tmp_path / "peft")
    target = lt.add_lora(copy.deepcopy(base), TARGETS[kind], r=3, use_dora=True, seed=9)
    lt.load_adapter(target, tmp_path / "peft")
    torch.testing.assert_close(run(target.eval(), x), expected, rtol=0, atol=1e-12)
    trainable = {n for n, p in target.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in target.named_parameters() if ".lora_" in n}

    # A DoRA file into LoRA layers, or the other way round, is refused, nothing loaded.
    plain = lt.add_lora(copy.deepcopy(base), TARGETS[kind], r=3)
    state = copy.deepcopy(plain.state_dict())
    with pytest.raises(AdapterFormatError, match="use_dora=true, but the model's adapter 'default' is LoRA"):
        lt.load_adapter(plain, tmp_path / "peft")
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())
    lt.save_adapter(plain, tmp_path / "plain")
    with pytest.raises(AdapterFormatError, match="use_dora=false, but .* is DoRA"):
        lt.load_adapter(target, tmp_path / "plain")


def test_dora_keeps_the_merge_record_the_tie_and_the_read_only_sizes():
    base = base_model("gpt2")
    model = lt.add_lora(copy.deepcopy(base), ["c_attn", "lm_head"], r=2, use_dora=True)
    head = model.lm_head
    assert head.tied_to() == ["transformer.wte.weight"]
    with pytest.raises(RuntimeError, match="tied to"):
        head.merge_weights_()
    assert not head.merged
    with pytest.raises(AttributeError, match="read-only"):
        head.r = 4
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(1))
    layer.merge_weights_()
    state = copy.deepcopy(layer.state_dict())
    assert {"merged_lora_A", "merged_lora_B", "merged_lora_scale"} <= set(state)
    fresh = copy.deepcopy(layer)
    fresh.unmerge_weights_()
    fresh.load_state_dict(state)  # a merged state dict: merged again, with its record
    assert fresh.merged
    torch.testing.assert_close(fresh.merged_lora_scale, layer.merged_lora_scale)
    partial = {k: v for k, v in state.items() if "lora_" in k}
    with pytest.raises(RuntimeError, match="merge record without its base"):
        copy.deepcopy(layer).load_state_dict(partial, strict=False)
    layer.unmerge_weights_()
    assert "merged_lora_scale" not in layer.state_dict()


def test_dora_on_an_nf4_base_is_dora_on_its_dequantised_weight_and_refuses_to_merge():
    nf4 = lt.NF4Linear.from_linear(lt.make_linear(64, 32, seed=3))
    q = lt.DoRALinear.from_linear(nf4, r=4, seed=1)
    plain = lt.DoRALinear.from_linear(nf4.to_linear(), r=4, seed=1)
    with torch.no_grad():
        plain.lora_A.copy_(q.lora_A)
        q.lora_B.normal_(generator=gen(2))
        plain.lora_B.copy_(q.lora_B)
    x = torch.randn(5, 64, generator=gen(4))
    torch.testing.assert_close(q(x), plain(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="cannot merge into the NF4Linear base"):
        q.merge_weights_()
    assert not q.merged


def test_dora_layers_and_their_merges_leave_the_global_rng_alone(global_rng_untouched):
    model = lt.add_lora(base_model("linear"), ["up", "down"], r=2, dropout=0.0,
                        use_dora=True, seed=4)
    for _, layer in lt.lora_layers(model):
        layer.reset_lora_parameters(seed=1)
        layer.merge_weights_()
        layer.unmerge_weights_()
