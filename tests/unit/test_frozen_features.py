"""Feature statistics, reduced-rank regression and training on statistics."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from lora_tutorial import FeatureStats, LoRALinear, best_low_rank_update, fit_lora_on_stats, train


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def problem(n=400, d=12, k=5):
    h = F.gelu(torch.randn(n, d, generator=gen(1)))
    y = h @ torch.randn(k, d, generator=gen(2)).T + 0.3 * torch.randn(n, k, generator=gen(3)) + 0.5
    return h, y


def test_mse_from_stats_equals_the_mse_on_data():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w, b = torch.randn(5, 12, generator=gen(4)), torch.randn(5, generator=gen(5))
    expected = F.mse_loss(h.double() @ w.double().T + b.double(), y.double())
    torch.testing.assert_close(stats.mse(w, b), expected)
    torch.testing.assert_close(stats.mse(w), F.mse_loss(h.double() @ w.double().T, y.double()))


def test_dropout_penalty_is_the_exact_expectation():
    # Enumerate every dropout mask of a 4-feature input: the expectation is exact.
    h, y = problem(n=3, d=4, k=2)
    stats = FeatureStats.from_data(h, y)
    p = 0.25
    w0 = torch.randn(2, 4, generator=gen(6), dtype=torch.float64)
    dw = torch.randn(2, 4, generator=gen(7), dtype=torch.float64)
    expected = torch.zeros((), dtype=torch.float64)
    for mask in itertools.product([0.0, 1.0], repeat=4):
        m = torch.tensor(mask, dtype=torch.float64)
        prob = torch.prod(torch.where(m > 0, 1 - p, p))
        out = h.double() @ w0.T + (h.double() * m / (1 - p)) @ dw.T
        expected += prob * F.mse_loss(out, y.double())
    torch.testing.assert_close(stats.mse(w0 + dw) + stats.dropout_penalty(dw, p), expected)


def brute_force_best_rank(h, y, w0, b0, rank):
    """Reduced-rank regression on the data itself (centred, intercept free)."""
    t = y.double() - h.double() @ w0.double().T - b0.double()
    hc, tc = h.double() - h.double().mean(0), t - t.mean(0)
    m = torch.linalg.lstsq(hc, tc).solution
    fitted = hc @ m
    _, s, vh = torch.linalg.svd(fitted, full_matrices=False)
    v = vh[:rank].T
    best = hc @ m @ v @ v.T
    return F.mse_loss(best, tc).item()


@pytest.mark.parametrize("rank", [1, 2, 5, 9])
def test_best_low_rank_update_matches_brute_force(rank):
    h, y = problem()
    w0, b0 = torch.randn(5, 12, generator=gen(4)), torch.randn(5, generator=gen(5))
    fit = best_low_rank_update(FeatureStats.from_data(h, y), w0, b0, rank)
    assert fit.loss == pytest.approx(brute_force_best_rank(h, y, w0, b0, rank), rel=1e-9, abs=1e-12)
    # The returned update really reaches that loss, and has the rank it may.
    reached = F.mse_loss(h.double() @ (w0.double() + fit.delta_weight).T + fit.bias, y.double()).item()
    assert reached == pytest.approx(fit.loss, rel=1e-9)
    assert torch.linalg.matrix_rank(fit.delta_weight).item() == min(rank, 5)


def test_best_loss_decreases_with_rank_down_to_full_rank():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w0 = torch.zeros(5, 12)
    losses = [best_low_rank_update(stats, w0, None, r).loss for r in range(1, 7)]
    assert all(a >= b - 1e-12 for a, b in zip(losses, losses[1:]))
    assert losses[4] == pytest.approx(losses[5]) == pytest.approx(best_low_rank_update(stats, w0, None, 1).full_rank_loss)


def test_best_low_rank_update_without_bias():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w0, b0 = torch.zeros(5, 12), torch.zeros(5)
    fit = best_low_rank_update(stats, w0, b0, 5, fit_bias=False)
    ols = torch.linalg.lstsq(h.double(), y.double()).solution
    assert fit.loss == pytest.approx(F.mse_loss(h.double() @ ols, y.double()).item(), rel=1e-9)
    assert torch.equal(fit.bias, b0.double())
    # With a free bias the loss can only be lower.
    assert best_low_rank_update(stats, w0, b0, 5).loss < fit.loss


def test_best_low_rank_update_errors():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        best_low_rank_update(stats, torch.zeros(5, 12), None, 0)
    with pytest.raises(ValueError, match=r"weight must have shape \(5, 12\), got \(12, 5\)"):
        best_low_rank_update(stats, torch.zeros(12, 5), None, 1)
    with pytest.raises(ValueError, match="same number of rows"):
        FeatureStats.from_data(h, y[:10])


def test_training_on_stats_follows_training_on_data():
    # Without dropout both minimise the same full-batch loss with the same AdamW.
    h, y = problem()
    layer = LoRALinear(12, 5, r=2, alpha=4.0, dropout=0.0, init="kaiming", seed=gen(8))
    layer.base.bias.requires_grad_(True)  # train the bias too, as fit_lora_on_stats does by default
    twin = copy.deepcopy(layer)
    on_data = train(layer, h, y, steps=60, lr=0.02)
    on_stats = fit_lora_on_stats(twin, FeatureStats.from_data(h, y), steps=60, lr=0.02)
    assert on_stats == pytest.approx(on_data, rel=1e-4)
    torch.testing.assert_close(twin.delta_weight(), layer.delta_weight(), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(twin.base.bias, layer.base.bias, atol=1e-4, rtol=1e-3)


def test_training_on_stats_leaves_requires_grad_as_it_found_it():
    h, y = problem()
    layer = LoRALinear(12, 5, r=2, seed=gen(8))
    fit_lora_on_stats(layer, FeatureStats.from_data(h, y), steps=3, lr=0.01)
    assert not layer.base.bias.requires_grad and layer.lora_A.requires_grad


def test_training_on_stats_errors():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    with pytest.raises(ValueError, match=r"stats are for a \(5, 12\) layer, got a \(3, 12\) layer"):
        fit_lora_on_stats(LoRALinear(12, 3), stats, steps=1, lr=0.1)
    merged = LoRALinear(12, 5)
    merged.merge_weights_()
    with pytest.raises(RuntimeError, match="merged"):
        fit_lora_on_stats(merged, stats, steps=1, lr=0.1)
