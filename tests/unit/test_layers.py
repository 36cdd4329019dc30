"""LoRALayer (chapter 1) and LoRALinear: maths, initialisation, merging, errors."""

import copy
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


# ------------------------------------------------- dropout_p, alpha, rslora
def test_dropout_p_is_readable_and_settable():
    layer = LoRALinear(8, 4, dropout=0.1).eval()
    assert layer.dropout_p == 0.1 and isinstance(layer.dropout, nn.Dropout)
    layer.dropout_p = 0.0
    assert layer.dropout_p == 0.0 and isinstance(layer.dropout, nn.Identity)
    layer.dropout_p = 0.3
    assert layer.dropout_p == 0.3 and not layer.dropout.training  # follows the layer's mode
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
        layer.dropout_p = 1.0
    assert layer.dropout_p == 0.3


def test_alpha_and_rslora_are_validated_where_they_are_stored():
    layer = LoRALinear(8, 4, r=4, alpha=8.0)
    layer.alpha, layer.rslora = 4.0, True
    assert layer.scaling == 2.0
    with pytest.raises(ValueError, match="alpha must be a positive finite number, got -1"):
        layer.alpha = -1
    with pytest.raises(TypeError, match="rslora must be True or False, got 'no'"):
        layer.rslora = "no"
    assert (layer.alpha, layer.rslora) == (4.0, True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rslora="no"), "rslora must be True or False, got 'no'"),
    (dict(bias="no"), "bias must be True or False, got 'no'"),
    (dict(seed=1.5), "seed must be an int or a torch.Generator, got 1.5"),
    (dict(seed="0"), "seed must be an int or a torch.Generator, got '0'"),
])
def test_wrong_kinds_are_type_errors_naming_the_argument(kwargs, message):
    # Before: rslora="no" and bias="no" were read with bool() and turned the option on.
    with pytest.raises(TypeError, match=message):
        LoRALinear(8, 4, **kwargs)


def test_bad_arguments_leave_the_generator_untouched_even_late_ones():
    g = gen(0)
    state = g.get_state()
    for kwargs in (dict(dropout=1.0), dict(rslora=1), dict(init_scale=-1.0), dict(bias=None)):
        with pytest.raises((TypeError, ValueError)):
            LoRALinear(8, 4, seed=g, **kwargs)
    with pytest.raises(ValueError):
        LoRALayer(8, 4, rank=0, seed=g)
    assert torch.equal(g.get_state(), state)


# ------------------------------------------------------- issue 10, item 1
def test_a_merged_state_dict_reloads_to_the_same_outputs():
    # Before: the state dict did not say the layer was merged; a fresh layer loading it
    # computed W0 + 2 dW, and merging it again added the update twice.
    layer = trained_like_layer().eval()
    x = torch.randn(8, 48, generator=gen(1))
    expected = layer(x)
    w0 = layer.base.weight.clone()
    layer.merge_weights_()
    state = layer.state_dict()
    assert {"merged_lora_A", "merged_lora_B"} <= set(state)
    fresh = LoRALinear(48, 12, r=4, alpha=8.0, dropout=0.1).eval()
    fresh.load_state_dict(state)  # strict
    assert fresh.merged
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)
    fresh.merge_weights_()  # already merged: nothing is added twice
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)
    fresh.unmerge_weights_()
    torch.testing.assert_close(fresh.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)


def test_unmerged_state_dicts_keep_their_keys_and_load_into_merged_layers():
    layer = trained_like_layer().eval()
    unmerged_state = copy.deepcopy(layer.state_dict())
    assert set(unmerged_state) == {"lora_A", "lora_B", "base.weight", "base.bias"}
    x = torch.randn(8, 48, generator=gen(1))
    expected = layer(x)
    layer.merge_weights_()
    layer.load_state_dict(unmerged_state)  # an unmerged state: the layer is unmerged after it
    assert not layer.merged
    torch.testing.assert_close(layer(x), expected)
    # Loading only the adapter's tensors (strict=False) leaves the merge as it is.
    layer.merge_weights_()
    layer.load_state_dict({"lora_B": torch.zeros(12, 4)}, strict=False)
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------- issue 10, item 2
def test_unmerge_restores_w0_whatever_happened_to_the_adapter_while_merged():
    # Before: unmerge subtracted the *current* update, so changing lora_A, lora_B
    # (by hand, load_state_dict or an optimiser step) while merged corrupted W0.
    layer = trained_like_layer().eval()
    w0 = layer.base.weight.clone()
    layer.merge_weights_()
    with torch.no_grad():
        layer.lora_B.mul_(5.0)
        layer.lora_A.add_(1.0)
    layer.load_state_dict({"lora_A": torch.ones(4, 48)}, strict=False)
    layer.unmerge_weights_()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    assert torch.equal(layer.lora_A, torch.ones(4, 48))  # the change itself is kept


def test_an_optimiser_step_with_stale_gradients_while_merged_does_not_corrupt_w0():
    layer = trained_like_layer().train()
    w0 = layer.base.weight.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(4, 48, generator=gen(1))).sum().backward()
    layer.eval().merge_weights_()
    opt.step()  # stale gradients move lora_A, lora_B while merged
    layer.unmerge_weights_()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_alpha_and_rslora_cannot_change_while_merged():
    layer = trained_like_layer()
    layer.merge_weights_()
    with pytest.raises(RuntimeError, match="cannot change alpha of a merged LoRALinear"):
        layer.alpha = 1.0
    with pytest.raises(RuntimeError, match="cannot change rslora"):
        layer.rslora = True
    with pytest.raises(RuntimeError, match="cannot reset the adapter"):
        layer.reset_lora_parameters()
    assert (layer.alpha, layer.rslora) == (8.0, False)


# ------------------------------------------------------- issue 10, item 3
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_refuses_an_overflowing_sum_and_leaves_the_weights_untouched(dtype):
    # Before: a finite delta whose sum with W0 overflows "merged" into inf and W0 was lost.
    big = torch.finfo(dtype).max * 0.75
    linear = nn.Linear(4, 2).to(dtype)
    with torch.no_grad():
        linear.weight.fill_(big)
    layer = LoRALinear.from_linear(linear, r=1, alpha=1.0)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(big)
    assert torch.isfinite(layer.delta_weight()).all()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"8 non-finite value\(s\).*overflow"):
        layer.merge_weights_()
    assert not layer.merged
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


# --------------------------------------------- GPT-2's Conv1D and subclasses
def conv1d_layer(n_in=6, n_out=10):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(n_out, n_in)  # weight (in, out); computes x @ W + b
    with torch.no_grad():
        conv.weight.normal_(generator=gen(1))
        conv.bias.normal_(generator=gen(2))
    return conv


def test_from_linear_adapts_gpt2_conv1d():
    conv = conv1d_layer()
    x = torch.randn(3, 5, 6, generator=gen(3))
    before = conv(x)
    layer = LoRALinear.from_linear(conv, r=2, alpha=4.0, seed=gen())
    assert layer.base is conv and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (6, 10)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (10, 2)
    assert torch.equal(layer(x), before)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(4))
    layer.eval()
    adapted = layer(x)
    torch.testing.assert_close(adapted, before + x @ layer.delta_weight().T)
    w0 = conv.weight.clone()
    layer.merge_weights_()
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)
    layer.unmerge_weights_()
    torch.testing.assert_close(conv.weight, w0, atol=1e-6, rtol=0)


def test_conv1d_layer_equals_peft_with_the_same_factors():
    from peft import LoraConfig, get_peft_model

    conv = conv1d_layer()
    ours = LoRALinear.from_linear(copy.deepcopy(conv), r=2, alpha=4.0, seed=gen())
    with torch.no_grad():
        ours.lora_B.normal_(generator=gen(4))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    theirs = get_peft_model(nn.ModuleDict({"c_attn": copy.deepcopy(conv)}), config)
    peft_layer = theirs.base_model.model["c_attn"]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(4, 6, generator=gen(3))
    torch.testing.assert_close(ours.eval()(x), peft_layer.eval()(x))
    ours.merge_weights_()
    peft_layer.merge()
    torch.testing.assert_close(ours.base.weight, peft_layer.base_layer.weight)


def test_from_linear_accepts_nn_linear_subclasses():
    attention = nn.MultiheadAttention(8, 2)
    layer = LoRALinear.from_linear(attention.out_proj, r=2)
    assert layer.base is attention.out_proj and not layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (8, 8)


def test_importing_the_library_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, lora_tutorial; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_base_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="base maps 5 to 3 features, but in_features=4"):
        LoRALinear(4, 3, base=nn.Linear(5, 3))


def test_relative_update_norm_checks_x_and_handles_conv1d():
    from lora_tutorial import relative_update_norm

    layer = LoRALinear.from_linear(conv1d_layer(), r=2, seed=gen())
    x = torch.randn(7, 6, generator=gen(3))
    assert relative_update_norm(layer, x) == 0.0  # B = 0
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(4))
    with torch.no_grad():
        expected = (x @ layer.delta_weight().T).norm() / layer.base(x).norm()
    assert relative_update_norm(layer, x) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match=r"last dimension 6 \(in_features\), got shape \(7, 5\)"):
        relative_update_norm(layer, torch.randn(7, 5))
