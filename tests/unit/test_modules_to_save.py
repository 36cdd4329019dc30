"""Issue 18, items 2, 4 and 5: modules trained whole (PEFT's semantics), freezing by what a
parameter is, and the trainable set after load_adapter."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_tutorial as lt

from peft import LoraConfig, PeftModel, get_peft_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        with lt.isolated_rng(seed):
            self.q, self.v = nn.Linear(6, 6), nn.Linear(6, 6)
            self.score = nn.Linear(6, 3)

    def forward(self, x):
        return self.score(torch.relu(self.q(x)) * self.v(x))


X = torch.randn(5, 6, generator=gen(9))


def out(model):
    with torch.no_grad():
        return model(X)


def quietly(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def step(model, seed=0):
    """One optimiser step on everything that trains."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(5, 3, generator=gen(seed))
    loss = (model(X) - target).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


# ------------------------------------------------------------ item 2: a copy trains, the original stays
def test_a_module_trained_whole_is_a_copy_kept_beside_its_original():
    base = Net()
    ours = lt.add_lora(copy.deepcopy(base), ["q"], r=2, seed=0, modules_to_save=["score"])
    theirs = quietly(get_peft_model, copy.deepcopy(base),
                     LoraConfig(r=2, target_modules=["q"], modules_to_save=["score"]))
    # PEFT's layout and counts (the original and the copy both count in the total)
    assert isinstance(ours.score, lt.ModuleToSave) and ours.score.original_module is not ours.score.trained
    peft_keys = {k.removeprefix("base_model.model.") for k in theirs.state_dict() if ".score." in k}
    assert {k for k in ours.state_dict() if k.startswith("score.")} == peft_keys
    count = lt.count_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    assert trainable(ours) == {"q.lora_A", "q.lora_B", "score.modules_to_save.default.weight",
                               "score.modules_to_save.default.bias"}
    for _ in range(3):
        step(ours)
    assert torch.equal(ours.score.original_module.weight, base.score.weight)
    assert not torch.equal(ours.score.weight, base.score.weight)  # reads go to the trained copy
    trained_out = out(ours)
    with lt.disable_adapter(ours):
        assert torch.equal(out(ours), out(base))
        assert torch.equal(ours.score.weight, base.score.weight)
    assert torch.equal(out(ours), trained_out)
    plain = lt.unload_lora(copy.deepcopy(ours), merge=False)  # the base model back
    assert type(plain.score) is nn.Linear and torch.equal(out(plain), out(base))
    merged = lt.unload_lora(copy.deepcopy(ours), merge=True)  # what the adapted model computes
    assert type(merged.score) is nn.Linear
    torch.testing.assert_close(out(merged), trained_out, atol=1e-6, rtol=0)


def test_merge_and_unload_agrees_with_peft_for_a_module_trained_whole(tmp_path):
    base = Net()
    ours = lt.add_lora(copy.deepcopy(base), ["q"], r=2, seed=0, modules_to_save=["score"])
    step(ours)
    lt.save_adapter(ours, tmp_path)
    theirs = quietly(PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(out(theirs), out(ours), atol=1e-6, rtol=0)
    torch.testing.assert_close(out(theirs.merge_and_unload()), out(lt.unload_lora(ours)),
                               atol=1e-6, rtol=0)


def test_disable_adapter_refuses_merged_layers_before_switching_anything_off():
    model = lt.add_lora(Net(), ["q", "v"], r=2, modules_to_save=["score"])
    model.eval()
    model.v.merge_weights_()
    with pytest.raises(RuntimeError, match=r"merged layers \['v'\]"):
        with lt.disable_adapter(model):
            pass
    assert model.q._adapter_enabled and model.score._adapter_enabled


def test_a_module_at_two_paths_or_a_container_is_not_trained_whole():
    model = Net()
    model.alias = model.score  # one module, two names
    with pytest.raises(ValueError, match=r"'alias', a module that is also at 'score'|'score', a module "
                                         r"that is also at 'alias'"):
        lt.add_lora(model, ["q"], modules_to_save=["score"])
    assert type(model.score) is nn.Linear and not list(lt.lora_layers(model))
    model = nn.ModuleDict({"q": nn.Linear(2, 2), "blocks": nn.ModuleList([nn.Linear(2, 2)])})
    with pytest.raises(ValueError, match=r"'blocks', a ModuleList, which has no forward pass"):
        lt.add_lora(model, ["q"], modules_to_save=["blocks"])


@pytest.mark.parametrize("bias", ["none", "all"])
def test_files_with_modules_to_save_match_peft_key_for_key(bias, tmp_path):
    """With bias="all" PEFT also writes the biases under original_module and modules_to_save."""
    base = Net()
    theirs = quietly(get_peft_model, copy.deepcopy(base),
                     LoraConfig(r=2, target_modules=["q"], modules_to_save=["score"], bias=bias,
                                init_lora_weights=False))
    step(theirs)
    quietly(theirs.save_pretrained, str(tmp_path / "theirs"))
    ours = lt.add_lora(copy.deepcopy(base), ["q"], r=2, modules_to_save=["score"], bias=bias)
    lt.load_adapter(ours, tmp_path / "theirs")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-6, rtol=0)
    lt.save_adapter(ours, tmp_path / "ours")
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert mine.keys() == peft.keys()
    assert all(torch.equal(mine[k], peft[k]) for k in mine)
    if bias == "all":
        assert "base_model.model.score.original_module.bias" in mine
        assert trainable(ours) >= {"score.modules_to_save.default.bias", "v.bias", "q.base.bias"}
        assert "score.original_module.bias" not in trainable(ours)


# ------------------------------------------------------------ item 5: the trainable set after a load
@pytest.mark.parametrize("prepared", [dict(modules_to_save=["score"]), dict(bias="lora_only"),
                                      dict(bias="all", modules_to_save=["score"])])
def test_after_a_load_what_trains_is_what_the_file_describes(prepared, tmp_path):
    """Issue 18, item 5: the prepared extras kept training, the next save dropped them (3.07)."""
    base = Net()
    source = lt.add_lora(copy.deepcopy(base), ["q", "v"], r=2, seed=1)
    step(source)
    lt.save_adapter(source, tmp_path / "plain")
    target = lt.add_lora(copy.deepcopy(base), ["q", "v"], r=2, seed=2, **prepared)
    step(target, seed=3)  # its own extras moved
    lt.load_adapter(target, tmp_path / "plain")
    assert trainable(target) == {f"{m}.lora_{f}" for m in "qv" for f in "AB"}
    assert lt.recorded_bias(target) == "none" and lt.saved_modules(target) == []
    if prepared.get("bias", "none") == "none":  # (biases train in place, in PEFT too)
        # the head the file does not name is the base's again
        theirs = quietly(PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path / "plain"))
        torch.testing.assert_close(out(target), out(theirs), atol=1e-6, rtol=0)
    # training on and saving: the file holds everything that trained
    at_load = copy.deepcopy(target)
    step(target, seed=4)
    lt.save_adapter(target, tmp_path / "again")
    lt.load_adapter(at_load, tmp_path / "again")
    assert torch.equal(out(at_load), out(target))


def test_a_file_that_trains_a_module_whole_makes_the_model_do_so(tmp_path):
    base = Net()
    source = lt.add_lora(copy.deepcopy(base), ["q"], r=2, seed=1, modules_to_save=["score"])
    step(source)
    lt.save_adapter(source, tmp_path)
    target = lt.add_lora(copy.deepcopy(base), ["q"], r=2, seed=2)
    lt.load_adapter(target, tmp_path)
    assert isinstance(target.score, lt.ModuleToSave)
    assert torch.equal(target.score.original_module.weight, base.score.weight)
    assert trainable(target) == trainable(source) and torch.equal(out(target), out(source))


# ------------------------------------------------------------ item 4: freezing by what a parameter is
class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.explora_head, self.flora_gate, self.q = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.explora_head(self.flora_gate(self.q(x)))


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_a_module_named_like_a_factor_is_frozen_and_never_saved(bias, tmp_path):
    model = lt.add_lora(Named(), ["q"], r=2, bias=bias)
    expected = {"q.lora_A", "q.lora_B"} | ({"q.base.bias"} if bias == "lora_only" else set())
    assert trainable(model) == expected
    model.requires_grad_(True)
    lt.mark_only_lora_as_trainable(model, bias=bias)
    assert trainable(model) == expected
    lt.save_adapter(model, tmp_path)
    assert not any("lora_head" in k or "lora_gate" in k
                   for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q"]


def test_names_recorded_from_a_peft_file_that_match_nothing_here_do_not_block_more_adapters(tmp_path):
    """PEFT's SEQ_CLS task records modules_to_save=["classifier", "score"]; this model has a score only."""
    base = Net()
    theirs = quietly(get_peft_model, copy.deepcopy(base),
                     LoraConfig(r=2, target_modules=["q"], modules_to_save=["classifier", "score"]))
    quietly(theirs.save_pretrained, str(tmp_path))
    ours = lt.add_lora(copy.deepcopy(base), ["q"], r=2)
    lt.load_adapter(ours, tmp_path)
    lt.add_lora(ours, ["v"], r=2, alpha=8.0)  # PEFT's default alpha, as loaded
    assert [name for name, _ in lt.saved_modules(ours)] == ["score"]
    lt.save_adapter(ours, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "score"]
    with pytest.raises(ValueError, match=r"modules_to_save names \['head'\] match no module"):
        lt.add_lora(ours, ["v"], modules_to_save=["head"])
