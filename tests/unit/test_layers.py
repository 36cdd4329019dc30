"""LoRALayer (chapter 1) and LoRALinear: maths, initialisation, merging, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_tutorial import LoRALayer, LoRALinear, count_parameters, make_linear


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- LoRALayer
def test_naive_layer_counts_match_the_source():
    layer = LoRALayer(64, 10, rank=4)
    assert (count_parameters(layer).trainable, count_parameters(layer).total) == (306, 946)
    assert layer.linear.bias.requires_grad and not layer.linear.weight.requires_grad


def test_naive_layer_bias_fix():
    layer = LoRALayer(64, 10, rank=4, freeze_bias=True)
    assert count_parameters(layer).trainable == 296
    assert not layer.linear.bias.requires_grad


def test_naive_layer_reproduces_the_source_stream():
    # The source: torch.manual_seed(42); X, y = randn...; then the layer draws from the same stream.
    torch.manual_seed(42)
    torch.randn(1000, 64), torch.randn(1000, 10)
    ref_linear = nn.Linear(64, 10)
    ref_a, ref_b = torch.randn(64, 4), torch.randn(4, 10)

    g = gen(42)
    torch.randn(1000, 64, generator=g), torch.randn(1000, 10, generator=g)
    layer = LoRALayer(64, 10, rank=4, seed=g)
    assert torch.equal(layer.linear.weight, ref_linear.weight)
    assert torch.equal(layer.linear.bias, ref_linear.bias)
    assert torch.equal(layer.lora_A, ref_a) and torch.equal(layer.lora_B, ref_b)


def test_naive_layer_forward_is_linear_plus_xab():
    layer = LoRALayer(6, 3, rank=2, seed=gen())
    x = torch.randn(5, 6, generator=gen(1))
    expected = layer.linear(x) + (x @ layer.lora_A) @ layer.lora_B
    assert layer.lora_A.shape == (6, 2) and layer.lora_B.shape == (2, 3)
    torch.testing.assert_close(layer(x), expected)


def test_make_linear_with_generator_matches_nn_linear_under_manual_seed(global_rng_untouched):
    state = torch.get_rng_state()
    torch.manual_seed(7)
    ref = nn.Linear(5, 4)
    torch.set_rng_state(state)
    mine = make_linear(5, 4, seed=gen(7))
    assert torch.equal(mine.weight, ref.weight) and torch.equal(mine.bias, ref.bias)


# ---------------------------------------------------------------- LoRALinear
def test_shapes_and_scaling():
    layer = LoRALinear(32, 12, r=4, alpha=8.0)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (12, 4)
    assert layer.scaling == 2.0
    assert LoRALinear(32, 12, r=4, alpha=8.0, rslora=True).scaling == 4.0
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("init", ["normal", "kaiming", "gaussian"])
def test_fresh_layer_equals_its_base_exactly(init):
    layer = LoRALinear(64, 16, r=8, dropout=0.3, init=init, seed=gen())
    x = torch.randn(20, 64, generator=gen(1))
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(layer(x), layer.base(x))


def test_init_distributions():
    torch_gen = gen(3)
    normal = LoRALinear(512, 4, r=16, init="normal", init_scale=1e-3, seed=torch_gen)
    assert normal.lora_A.std().item() == pytest.approx(1e-3, rel=0.05)
    kaiming = LoRALinear(512, 4, r=16, init="kaiming", seed=torch_gen)
    bound = 1 / math.sqrt(512)
    assert kaiming.lora_A.abs().max().item() <= bound
    assert kaiming.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    gaussian = LoRALinear(512, 4, r=16, init="gaussian", seed=torch_gen)
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)


def test_forward_is_base_plus_scaled_update():
    layer = LoRALinear(10, 6, r=3, alpha=6.0, dropout=0.0, seed=gen())
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(2))
    x = torch.randn(4, 10, generator=gen(1))
    expected = layer.base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


def test_dropout_applies_to_the_adapter_input_only():
    layer = LoRALinear(10, 6, r=3, alpha=3.0, dropout=0.5, seed=gen())
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(2))
    x = torch.randn(8, 10, generator=gen(1))
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    expected = layer.base(x) + layer.scaling * dropped @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(out, expected)


def test_train_mode_with_dropout_differs_eval_mode_does_not():
    layer = LoRALinear(32, 8, r=4, dropout=0.2, seed=gen())
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(2))
    x = torch.randn(16, 32, generator=gen(1))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def trained_like_layer(dropout=0.1):
    layer = LoRALinear(48, 12, r=4, alpha=8.0, dropout=dropout, seed=gen())
    with torch.no_grad():
        layer.lora_B.normal_(std=0.2, generator=gen(5))
        layer.lora_A.normal_(std=0.2, generator=gen(6))
    return layer


def test_merge_and_unmerge_agree_in_eval_mode():
    layer = trained_like_layer().eval()
    x = torch.randn(32, 48, generator=gen(1))
    w0 = layer.base.weight.clone()
    unmerged = layer(x)
    layer.merge_weights_()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    assert (layer.base.weight - w0).abs().max() > 0.05  # the update really is inside the weight now
    layer.unmerge_weights_()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_merge_twice_adds_once_and_unmerge_unmerged_is_a_no_op():
    layer = trained_like_layer().eval()
    w0 = layer.base.weight.clone()
    layer.unmerge_weights_()  # not merged: nothing to subtract
    assert torch.equal(layer.base.weight, w0)
    layer.merge_weights_()
    once = layer.base.weight.clone()
    layer.merge_weights_()
    assert torch.equal(layer.base.weight, once)
    layer.unmerge_weights_()
    layer.unmerge_weights_()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_merged_and_unmerged_differ_in_train_mode_because_of_dropout():
    layer = trained_like_layer(dropout=0.5).train()
    x = torch.randn(32, 48, generator=gen(1))
    torch.manual_seed(0)
    unmerged = layer(x)
    layer.merge_weights_()
    with torch.no_grad():
        merged = layer(x)
    assert (merged - unmerged).abs().max() > 1e-2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merging_a_non_finite_update_raises_and_leaves_weights_untouched(bad):
    layer = trained_like_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = bad
    w0 = layer.base.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge_weights_()
    assert torch.equal(layer.base.weight, w0)
    assert not layer.merged


def test_training_forward_on_a_merged_layer_raises():
    layer = trained_like_layer()
    layer.merge_weights_()
    x = torch.randn(4, 48)
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge_weights_"):
        layer(x)
    with torch.no_grad():  # inference is fine
        layer(x)
    layer.eval()
    layer(x)
    layer.requires_grad_(False)  # a frozen adapter cannot miss a gradient
    layer.train()
    layer(x)


def test_from_linear_keeps_the_wrapped_layer():
    linear = nn.Linear(20, 7)
    with torch.no_grad():  # pretend it was trained
        linear.weight.mul_(3.0).add_(0.1)
    x = torch.randn(9, 20, generator=gen(1))
    before = linear(x)
    layer = LoRALinear.from_linear(linear, r=4, alpha=8.0, seed=gen())
    assert layer.base is linear
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert torch.equal(layer(x), before)
    assert (layer.in_features, layer.out_features, layer.r, layer.scaling) == (20, 7, 4, 2.0)
    assert LoRALinear.from_linear(nn.Linear(3, 2, bias=False), r=1).base.bias is None


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(LoRALinear(3, 2))


def test_disable_adapter():
    layer = trained_like_layer().eval()
    x = torch.randn(4, 48)
    with layer.disable_adapter():
        assert torch.equal(layer(x), layer.base(x))
    assert not torch.allclose(layer(x), layer.base(x))
    layer.merge_weights_()
    with pytest.raises(RuntimeError, match="merged"):
        with layer.disable_adapter():
            pass


def test_reset_lora_parameters_is_reproducible():
    layer = trained_like_layer()
    layer.reset_lora_parameters(seed=gen(9))
    first = layer.lora_A.clone()
    assert torch.count_nonzero(layer.lora_B) == 0
    layer.reset_lora_parameters(seed=gen(9))
    assert torch.equal(layer.lora_A, first)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("r", [0, -1, 1.5, True, "8", None])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"r must be a positive int, got"):
        LoRALinear(8, 4, r=r)
    with pytest.raises(ValueError, match=r"rank must be a positive int"):
        LoRALayer(8, 4, rank=r)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "16", None])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number, got"):
        LoRALinear(8, 4, alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got"):
        LoRALinear(8, 4, dropout=dropout)


@pytest.mark.parametrize("features", [(0, 4), (8, -2), (8.0, 4)])
def test_bad_feature_sizes(features):
    with pytest.raises(ValueError, match="_features must be a positive int"):
        LoRALinear(*features)
    with pytest.raises(ValueError, match="_features must be a positive int"):
        LoRALayer(*features)


def test_bad_init_and_init_scale():
    with pytest.raises(ValueError, match="init must be one of 'normal', 'kaiming', 'gaussian', got 'xavier'"):
        LoRALinear(8, 4, init="xavier")
    with pytest.raises(ValueError, match="init_scale must be a positive finite number"):
        LoRALinear(8, 4, init_scale=0.0)


def test_bad_input_width_names_expected_and_got():
    with pytest.raises(ValueError, match=r"last dimension 8 \(in_features\), got shape \(3, 5\)"):
        LoRALinear(8, 4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"last dimension 8 \(in_features\), got shape \(3, 5\)"):
        LoRALayer(8, 4)(torch.randn(3, 5))


def test_bad_arguments_leave_the_generator_untouched():
    g = gen(0)
    state = g.get_state()
    with pytest.raises(ValueError):
        LoRALinear(8, 4, r=0, seed=g)
    assert torch.equal(g.get_state(), state)
