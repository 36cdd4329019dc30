"""Counting formulas, checked against counted parameters and measured optimizer state."""

import pytest
import torch

import lora_tutorial as lt


def test_formulas_match_counted_parameters():
    layer = lt.LoRALinear(256, 16, r=8)
    assert lt.lora_parameter_count(256, 16, 8) == layer.lora_A.numel() + layer.lora_B.numel() == 2176
    assert lt.full_parameter_count(256, 16) == layer.base.weight.numel()
    assert lt.full_parameter_count(256, 16, bias=True) == sum(p.numel() for p in layer.base.parameters())


def test_break_even_rank():
    assert lt.break_even_rank(256, 16) == pytest.approx(15.0588, abs=1e-4)
    assert lt.break_even_rank(1000, 1000) == 500
    r = int(lt.break_even_rank(256, 16))
    assert lt.lora_parameter_count(256, 16, r) < lt.full_parameter_count(256, 16) < lt.lora_parameter_count(256, 16, r + 1)


def test_gpt3_numbers_of_the_lora_paper():
    gpt3 = lt.GPT3_175B
    assert lt.adapter_parameter_count(gpt3, 1) == 4_718_592  # the paper's 4.7M
    assert lt.adapter_parameter_count(gpt3, 8) == 37_748_736  # the paper's 37.7M
    assert lt.adapter_parameter_count(gpt3, 4) == 18_874_368  # the 18M budget of its Table 5
    assert lt.checkpoint_bytes(gpt3.n_params) == 350_000_000_000
    assert lt.checkpoint_bytes(18_874_368) / 2**20 == pytest.approx(36.0)


def test_format_bytes():
    assert [lt.format_bytes(v) for v in (0, 999, 1000, 17548, 301_989_888, 2.8e12)] == [
        "0 B", "999 B", "1 kB", "17.5 kB", "302 MB", "2.8 TB"]
    with pytest.raises(ValueError, match="n_bytes must be >= 0, got -1"):
        lt.format_bytes(-1)


def test_adam_formula_matches_measured_optimizer_state():
    layer = lt.LoRALinear(64, 8, r=4, seed=torch.Generator().manual_seed(0))
    params = [layer.lora_A, layer.lora_B]
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    assert lt.optimizer_state_bytes(opt) == 0
    layer(torch.randn(3, 64)).sum().backward()
    opt.step()
    moments = lt.optimizer_state_bytes(opt) - sum(
        s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert moments == 2 * n * 4
    assert lt.adam_training_bytes(n) == 4 * n * 4


@pytest.mark.parametrize("call", [lambda: lt.lora_parameter_count(0, 4, 1), lambda: lt.lora_parameter_count(4, 4, -1),
                                  lambda: lt.adapter_parameter_count(lt.GPT3_175B, 0)])
def test_bad_counts(call):
    with pytest.raises(ValueError, match="must be a positive int"):
        call()
