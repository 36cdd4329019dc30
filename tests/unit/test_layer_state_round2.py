"""Issue 18 for LoRALinear itself: sizes the tensors fix, state dicts checked whole, lazy layers."""

import pytest
import torch
from torch import nn

import lora_tutorial as lt


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def trained(layer, seed=1):
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(seed))
    return layer.eval()


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}, layer.merged


def unchanged(before, layer):
    state, merged = before
    after = layer.state_dict()
    return (merged == layer.merged and state.keys() == after.keys()
            and all(torch.equal(state[k], after[k]) for k in state))


# ------------------------------------------------------------ item 6: settings the tensors fix
@pytest.mark.parametrize("name, value", [("r", 4), ("r", 2), ("in_features", 3),
                                         ("out_features", 5), ("fan_in_fan_out", True)])
def test_sizes_fixed_by_the_tensors_are_read_only(name, value):
    layer = trained(lt.LoRALinear(8, 4, r=2, alpha=4.0, dropout=0.0))
    x = torch.randn(3, 8, generator=gen(2))
    expected, scaling = layer(x), layer.scaling
    with pytest.raises(AttributeError, match=rf"{name} is read-only: the layer's tensors fix it"):
        setattr(layer, name, value)
    assert layer.scaling == scaling == 2.0 and torch.equal(layer(x), expected)
    layer.merge_weights_()
    with pytest.raises(AttributeError, match="read-only"):
        setattr(layer, name, value)


# ------------------------------------------------------------ item 3 and "half-changed": state dicts
def test_a_merge_record_without_its_base_is_refused_and_changes_nothing():
    """The usual filter {k: v for k, v in sd.items() if "lora_" in k} takes the record apart."""
    source = lt.add_lora(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), ["0"], r=2, seed=0)
    trained(source[0], 1).merge_weights_()
    filtered = {k: v for k, v in source.state_dict().items() if "lora_" in k}
    assert {"0.merged_lora_A", "0.merged_lora_B"} <= filtered.keys() and "0.base.weight" not in filtered
    for merged_target in (False, True):
        target = lt.add_lora(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), ["0"], r=2, seed=3)
        trained(target[0], 2)
        if merged_target:
            target[0].merge_weights_()
        w0 = target[0].base.weight.clone()
        before = snapshot(target[0])
        with pytest.raises(RuntimeError, match=r"refusing a merge record without its base: .*"
                                               r"not \['0.base.weight'\]"):
            target.load_state_dict(filtered, strict=False)
        assert unchanged(before, target[0])
        target[0].unmerge_weights_()
        torch.testing.assert_close(target[0].base.weight, w0 - target[0].delta_weight()
                                   if merged_target else w0, atol=1e-6, rtol=0)
    # half a record is refused too; the factors alone (no record, no base) still load
    half = {k: v for k, v in source.state_dict().items() if k != "0.merged_lora_B"}
    target = lt.add_lora(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), ["0"], r=2)
    with pytest.raises(RuntimeError, match=r"holds \['0.merged_lora_A'\] but not \['0.merged_lora_B'\]"):
        target.load_state_dict(half)
    factors = {k: v for k, v in filtered.items() if "merged" not in k}
    target.load_state_dict(factors, strict=False)
    assert torch.equal(target[0].lora_B, source[0].lora_B) and not target[0].merged


def test_a_merged_rank_4_state_dict_is_refused_by_a_rank_2_layer_before_anything_changes():
    source = trained(lt.LoRALinear(6, 4, r=4, alpha=8.0, dropout=0.0, seed=0))
    source.merge_weights_()
    target = trained(lt.LoRALinear(6, 4, r=2, alpha=8.0, dropout=0.0, seed=1), 2)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"cannot load lora_A of shape \(4, 6\) into a LoRALinear "
                                           r"that holds \(2, 6\) \(r=2"):
        target.load_state_dict(source.state_dict())
    assert unchanged(before, target) and not target.merged
    # the same inside a model, with strict=False: the layer is untouched
    model = nn.Sequential(target)
    with pytest.raises(RuntimeError, match="cannot load 0.lora_A"):
        model.load_state_dict({f"0.{k}": v for k, v in source.state_dict().items()}, strict=False)
    assert unchanged(before, target)


# ------------------------------------------------------------ lazy layers
def test_an_uninitialised_lazy_linear_is_named_as_such():
    with pytest.raises(ValueError, match="uninitialised LazyLinear: its in_features are unknown "
                                         "until its first forward pass"):
        lt.LoRALinear.from_linear(nn.LazyLinear(3))
    lazy = nn.LazyLinear(3)
    lazy(torch.zeros(1, 5))  # initialised: an nn.Linear now
    assert lt.LoRALinear.from_linear(lazy, r=2).in_features == 5
