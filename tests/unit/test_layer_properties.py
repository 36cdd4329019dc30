"""Property tests of LoRALinear (Hypothesis): random shapes, ranks, alphas, dtypes
and random sequences of merge / unmerge / train / eval / changes to the adapter.

Invariants checked after every step:

* outputs in evaluation mode equal ``x W0ᵀ + b + x ΔWᵀ`` (computed in float64)
  within a rounding bound for the dtype, merged or not, where ΔW is the
  recorded update while merged and ``delta_weight()`` otherwise;
* unmerging restores the weight the layer had before merging, to within
  ``eps · (|W0| + |ΔW|)`` elementwise (one rounded addition and one rounded
  subtraction), whatever happened to the adapter in between;
* a refused operation (an overflowing merge, changing alpha while merged, a
  training-mode forward of a merged layer) leaves every tensor bit-identical;
* no parameter ever becomes NaN or inf, and a state dict reloads into a fresh
  layer that computes bit-identical outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_tutorial import LoRALinear, make_linear

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ["merge", "unmerge", "train_step", "eval", "train_mode", "set_alpha", "perturb",
       "overflow", "reload"]
# Merging, unmerging and changing the adapter in between are the interesting part.
WEIGHTED_OPS = OPS + ["merge", "unmerge", "perturb"] * 2

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def snapshot(layer: LoRALinear) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_unchanged(layer: LoRALinear, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        assert torch.equal(value, before[key]), key


def merged_delta(layer: LoRALinear) -> torch.Tensor:
    """The update the layer adds, (out, in), in float64."""
    if layer.merged:
        return layer.merged_lora_B.double() @ layer.merged_lora_A.double()
    return layer.scaling * layer.lora_B.double() @ layer.lora_A.double()


def as_out_in(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    return weight.T if layer.fan_in_fan_out else weight


def check_outputs(layer: LoRALinear, w0: torch.Tensor, x: torch.Tensor) -> None:
    """Evaluation-mode output against float64 maths, within a rounding bound."""
    eps = torch.finfo(layer.lora_A.dtype).eps
    delta = merged_delta(layer)
    w0 = as_out_in(layer, w0).double()
    b = layer.base.bias.double()
    x64 = x.double()
    expected = x64 @ (w0 + delta).T + b
    # |error| <= eps * (k + 4) * (|x| |W0 + ΔW|ᵀ + |b|): a standard dot-product bound.
    lora_abs = abs(layer.scaling) * layer.lora_B.double().abs() @ layer.lora_A.double().abs()
    scale = x64.abs() @ (w0.abs() + delta.abs() + lora_abs).T + b.abs()
    bound = eps * (layer.in_features + layer.r + 4) * scale + 4 * torch.finfo(layer.lora_A.dtype).tiny
    mode = layer.training
    layer.eval()
    with torch.no_grad():
        out = layer(x).double()
    layer.train(mode)
    assert torch.isfinite(out).all()
    assert ((out - expected).abs() <= bound).all(), float(((out - expected).abs() - bound).max())


def all_finite(layer: LoRALinear) -> bool:
    return all(torch.isfinite(t).all() for t in layer.state_dict().values())


@st.composite
def layers(draw: st.DrawFn) -> tuple[LoRALinear, torch.Tensor, bool]:
    in_f, out_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    r = draw(st.integers(1, 6))
    alpha = draw(st.sampled_from([0.25, 1.0, 2.0, 8.0, 16.0, 64.0]))
    rslora = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    conv1d = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    base = make_linear(in_f, out_f, seed=seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(out_f, in_f)
        with torch.no_grad():
            conv.weight.copy_(base.weight.T)
            conv.bias.copy_(base.bias)
        base = conv
    layer = LoRALinear.from_linear(base.to(dtype), r=r, alpha=alpha, rslora=rslora,
                                   dropout=draw(st.sampled_from([0.0, 0.3])), seed=seed)
    with torch.no_grad():
        layer.lora_B.copy_(0.3 * torch.randn(out_f, r, generator=gen(seed + 1)))
    x = torch.randn(5, in_f, generator=gen(seed + 2)).to(dtype)
    return layer, x, conv1d


@SETTINGS
@given(setup=layers(), ops=st.lists(st.sampled_from(WEIGHTED_OPS), min_size=4, max_size=12),
       seed=st.integers(0, 1000))
def test_random_sequences_keep_every_invariant(setup, ops, seed):
    layer, x, _ = setup
    dtype = layer.lora_A.dtype
    eps = torch.finfo(dtype).eps
    w_unmerged = layer.base.weight.clone()  # the base weight while unmerged (W0)
    for step, op in enumerate(ops):
        before = snapshot(layer)
        if op == "merge":
            was_merged = layer.merged
            layer.merge_weights_()
            assert layer.merged
            if was_merged:
                assert_unchanged(layer, before)
        elif op == "unmerge":
            if layer.merged:
                delta = merged_delta(layer)
                layer.unmerge_weights_()
                w0 = as_out_in(layer, w_unmerged).double()
                bound = eps * (w0.abs() + delta.abs()) + torch.finfo(dtype).tiny
                error = (as_out_in(layer, layer.base.weight).double() - w0).abs()
                assert (error <= bound).all(), float((error - bound).max())
                w_unmerged = layer.base.weight.clone()
            else:
                layer.unmerge_weights_()
                assert_unchanged(layer, before)
            assert not layer.merged
        elif op == "train_step":
            layer.train()
            if layer.merged:  # refused: the adapter would get no gradient
                with pytest.raises(RuntimeError, match="unmerge_weights_"):
                    layer(x)
                assert_unchanged(layer, before)
            elif dtype in (torch.float32, torch.float64):
                opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-2)
                torch.manual_seed(seed + step)
                layer(x).square().mean().backward()
                opt.step()
                assert torch.equal(layer.base.weight, w_unmerged)
        elif op == "eval":
            layer.eval()
        elif op == "train_mode":
            layer.train()
        elif op == "set_alpha":
            if layer.merged:
                with pytest.raises(RuntimeError, match="merged"):
                    layer.alpha = 3.0
                assert_unchanged(layer, before)
            else:
                layer.alpha = 3.0
        elif op == "perturb":  # an optimiser step with stale gradients, by hand
            with torch.no_grad():
                layer.lora_A.mul_(0.5)
                layer.lora_B.add_(0.1)
        elif op == "overflow":  # a finite update whose sum with the weight overflows
            if not layer.merged:
                big = torch.finfo(dtype).max * 0.75
                with torch.no_grad():
                    layer.base.weight.fill_(big)
                    layer.lora_A.fill_(1.0 / layer.scaling)
                    layer.lora_B.fill_(big / layer.r)  # delta = big, if s * big stays finite
                inside = snapshot(layer)
                with pytest.raises(ValueError, match="non-finite"):
                    layer.merge_weights_()
                assert_unchanged(layer, inside)
                layer.load_state_dict(before)
        elif op == "reload":
            fresh = _copy_layer(layer)
            fresh.load_state_dict(layer.state_dict())
            assert fresh.merged == layer.merged
            mode = layer.training
            layer.eval(), fresh.eval()
            with torch.no_grad():
                assert torch.equal(fresh(x), layer(x))
            layer.train(mode)
        assert all_finite(layer), op
        check_outputs(layer, w_unmerged, x)


def _copy_layer(layer: LoRALinear) -> LoRALinear:
    """A fresh layer with the same settings and a different base weight."""
    base = copy.deepcopy(layer.base)
    with torch.no_grad():
        base.weight.zero_()
    fresh = LoRALinear.from_linear(base, r=layer.r, alpha=layer.alpha, rslora=layer.rslora,
                                   dropout=layer.dropout_p, seed=1)
    return fresh
