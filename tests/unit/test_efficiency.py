"""Measured optimizer state and activations, and byte formatting."""

import pytest
import torch
from torch import nn

import lora_tutorial as lt


def test_format_bytes():
    values = (0, 999, 1000, 17548, 301_989_888, 2.8e12)
    assert [lt.format_bytes(v) for v in values] == [
        "0 B", "999 B", "1 kB", "17.5 kB", "302 MB", "2.8 TB"]
    with pytest.raises(ValueError, match="n_bytes must be >= 0, got -1"):
        lt.format_bytes(-1)


def test_adamw_state_is_two_fp32_moments_and_a_step_count():
    layer = lt.LoRALinear(64, 8, r=4, seed=0)
    params = [layer.lora_A, layer.lora_B]
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    assert lt.optimizer_state_bytes(opt) == 0  # created lazily, at the first step
    layer(torch.randn(3, 64)).sum().backward()
    opt.step()
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert lt.optimizer_state_bytes(opt) - steps == 2 * n * 4


def test_activation_bytes_counts_what_the_backward_pass_needs():
    x = torch.randn(32, 64)
    trainable = nn.Linear(64, 8)
    # A trainable weight needs its input for its gradient: 32 x 64 floats.
    assert lt.activation_bytes(trainable, lambda: trainable(x)) == 32 * 64 * 4
    frozen = nn.Linear(64, 8).requires_grad_(False)
    assert lt.activation_bytes(frozen, lambda: frozen(x)) == 0  # nothing to train
    # Weights are not activations: with a trainable input, the saved weight
    # (needed for the input's gradient) is not counted.
    x_grad = x.clone().requires_grad_()
    assert lt.activation_bytes(frozen, lambda: frozen(x_grad)) == 0


def test_activation_bytes_of_a_lora_layer():
    x = torch.randn(32, 64)
    layer = lt.LoRALinear(64, 8, r=4, dropout=0.0, seed=0)
    # The adapter keeps its input (for A's gradient) and A x (for B's).
    assert lt.activation_bytes(layer, lambda: layer(x)) == (32 * 64 + 32 * 4) * 4
