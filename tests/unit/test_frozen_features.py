"""Feature statistics, reduced-rank regression and training on statistics."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from lora_tutorial import (
    FeatureStats,
    LoRALinear,
    best_low_rank_update,
    evaluate,
    fit_lora_on_stats,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny steps: one thread is faster, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def problem(n=400, d=12, k=5):
    h = F.gelu(torch.randn(n, d, generator=gen(1)))
    noise = 0.3 * torch.randn(n, k, generator=gen(3))
    y = h @ torch.randn(k, d, generator=gen(2)).T + noise + 0.5
    return h, y


def test_mse_from_stats_equals_the_mse_on_data():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w = torch.randn(5, 12, generator=gen(4), dtype=torch.float64)
    b = torch.randn(5, generator=gen(5), dtype=torch.float64)
    hd, yd = h.double(), y.double()
    torch.testing.assert_close(stats.mse(w, b), F.mse_loss(hd @ w.T + b, yd))
    torch.testing.assert_close(stats.mse(w), F.mse_loss(hd @ w.T, yd))
    # In the weight's precision: float32 weights give a float32 loss.
    loss32 = stats.mse(w.float(), b.float())
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, F.mse_loss(h @ w.float().T + b.float(), y))


def test_mse_from_stats_has_the_gradients_of_the_mse_on_data():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w = torch.randn(5, 12, generator=gen(4), dtype=torch.float64)
    b = torch.randn(5, generator=gen(5), dtype=torch.float64)
    on_stats = torch.autograd.grad(stats.mse(w.requires_grad_(), b.requires_grad_()), (w, b))
    on_data = torch.autograd.grad(F.mse_loss(h.double() @ w.T + b, y.double()), (w, b))
    for got, expected in zip(on_stats, on_data):
        torch.testing.assert_close(got, expected)


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
    got = stats.mse(w0 + dw) + stats.dropout_penalty(dw, p)
    torch.testing.assert_close(got, expected)
    assert stats.dropout_penalty(dw, 0.0) == 0


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
    expected = brute_force_best_rank(h, y, w0, b0, rank)
    assert fit.loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # The returned update really reaches that loss, and has the rank it may.
    out = h.double() @ (w0.double() + fit.delta_weight).T + fit.bias
    assert F.mse_loss(out, y.double()).item() == pytest.approx(fit.loss, rel=1e-9)
    assert torch.linalg.matrix_rank(fit.delta_weight).item() == min(rank, 5)


def test_best_loss_decreases_with_rank_down_to_full_rank():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w0 = torch.zeros(5, 12)
    losses = [best_low_rank_update(stats, w0, None, r).loss for r in range(1, 7)]
    assert all(a >= b - 1e-12 for a, b in zip(losses, losses[1:]))
    full = best_low_rank_update(stats, w0, None, 1).full_rank_loss
    assert losses[4] == pytest.approx(losses[5]) == pytest.approx(full)


def test_best_low_rank_update_without_bias():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    w0, b0 = torch.zeros(5, 12), torch.zeros(5)
    fit = best_low_rank_update(stats, w0, b0, 5, fit_bias=False)
    ols = torch.linalg.lstsq(h.double(), y.double()).solution
    expected = F.mse_loss(h.double() @ ols, y.double()).item()
    assert fit.loss == pytest.approx(expected, rel=1e-9)
    assert torch.equal(fit.bias, b0.double())
    # With a free bias the loss can only be lower.
    assert best_low_rank_update(stats, w0, b0, 5).loss < fit.loss


def test_best_low_rank_update_errors():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        best_low_rank_update(stats, torch.zeros(5, 12), None, 0)
    with pytest.raises(ValueError, match=r"shape \(5, 12\), got \(12, 5\)"):
        best_low_rank_update(stats, torch.zeros(12, 5), None, 1)
    with pytest.raises(ValueError, match="same number of rows"):
        FeatureStats.from_data(h, y[:10])


def adapter(dropout=0.0, train_bias=True):
    layer = LoRALinear(12, 5, r=2, alpha=4.0, dropout=dropout, init="kaiming",
                       seed=gen(8))
    layer.base.bias.requires_grad_(train_bias)
    return layer


def test_training_on_stats_is_full_batch_adamw_on_the_data():
    # Without dropout both minimise the same loss with the same AdamW: the
    # same trajectory, step by step, and the same trained layer.
    h, y = problem()
    layer = adapter()
    twin = copy.deepcopy(layer)
    on_data = train(layer, h, y, steps=100, lr=0.02)
    on_stats = fit_lora_on_stats(twin, FeatureStats.from_data(h, y), steps=100, lr=0.02)
    assert on_stats == pytest.approx(on_data, rel=2e-6)
    for got, expected in zip(twin.parameters(), layer.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_training_on_stats_trains_exactly_what_requires_grad():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    frozen_bias = adapter(train_bias=False)
    bias = frozen_bias.base.bias.clone()
    fit_lora_on_stats(frozen_bias, stats, steps=5, lr=0.01)
    assert torch.equal(frozen_bias.base.bias, bias)
    assert not frozen_bias.base.bias.requires_grad
    # Make the base weight trainable too: the same as full-batch AdamW on data.
    full = adapter()
    full.base.weight.requires_grad_(True)
    twin = copy.deepcopy(full)
    on_data = train(full, h, y, steps=50, lr=0.02)
    on_stats = fit_lora_on_stats(twin, stats, steps=50, lr=0.02)
    assert on_stats == pytest.approx(on_data, rel=2e-6)
    torch.testing.assert_close(twin.base.weight, full.base.weight, rtol=1e-5, atol=1e-6)


def test_training_on_stats_with_dropout_is_the_average_stochastic_run():
    # Dropout 0.3 on the adapter's input: the stochastic runs on the data land
    # around the run on the expected loss, and far closer to it than to the
    # run that ignores dropout (the penalty is what dropout does on average).
    h, y = problem(n=1000)
    stats = FeatureStats.from_data(h, y)
    layer = adapter(dropout=0.3)
    expected_run = copy.deepcopy(layer)
    objective = fit_lora_on_stats(expected_run, stats, steps=200, lr=0.02)
    ignoring = copy.deepcopy(layer)
    ignoring.dropout_p = 0.0
    fit_lora_on_stats(ignoring, stats, steps=200, lr=0.02)
    finals, objectives = [], []
    for seed in range(3):
        run = copy.deepcopy(layer)
        history = train(run, h, y, steps=200, lr=0.02, seed=seed)
        finals.append(evaluate(run, h, y))
        objectives.append(sum(history[-50:]) / 50)
    mean_final = sum(finals) / len(finals)
    target = evaluate(expected_run, h, y)
    assert abs(mean_final - target) < 0.2 * abs(mean_final - evaluate(ignoring, h, y))
    assert sum(objectives) / 3 == pytest.approx(sum(objective[-50:]) / 50, rel=0.02)


def test_record_mse_is_the_loss_without_dropouts_penalty():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    layer = adapter(dropout=0.2)
    objective = fit_lora_on_stats(copy.deepcopy(layer), stats, steps=20, lr=0.02)
    mse = fit_lora_on_stats(layer, stats, steps=20, lr=0.02, record="mse")
    assert objective[0] == pytest.approx(mse[0])  # B = 0: no update, no penalty
    assert all(o > m for o, m in zip(objective[1:], mse[1:]))
    assert len(mse) == 20


def test_training_on_stats_errors_leave_the_layer_unchanged():
    h, y = problem()
    stats = FeatureStats.from_data(h, y)
    with pytest.raises(ValueError, match=r"stats are for a \(5, 12\) layer, got a \(3, 12\)"):
        fit_lora_on_stats(LoRALinear(12, 3), stats, steps=1, lr=0.1)
    merged = LoRALinear(12, 5)
    merged.merge_weights_()
    with pytest.raises(RuntimeError, match="merged"):
        fit_lora_on_stats(merged, stats, steps=1, lr=0.1)
    frozen = LoRALinear(12, 5).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_lora_on_stats(frozen, stats, steps=1, lr=0.1)
    with pytest.raises(TypeError, match="LoRALinear on an nn.Linear, got Linear"):
        fit_lora_on_stats(torch.nn.Linear(12, 5), stats, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="record must be one of"):
        fit_lora_on_stats(LoRALinear(12, 5), stats, steps=1, lr=0.1, record="x")
    diverging = adapter()
    diverging.alpha = 1e30
    before = copy.deepcopy(diverging.state_dict())
    with pytest.raises(FloatingPointError, match="lower either"):
        fit_lora_on_stats(diverging, stats, steps=50, lr=1e3)
    for name, value in diverging.state_dict().items():
        assert torch.equal(value, before[name]), name
