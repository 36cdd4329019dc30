"""Training many models at once equals training each alone (train_together, fit_many_on_stats)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lora_tutorial as lt


def _task(seed):
    gen = torch.Generator().manual_seed(seed)
    base = lt.make_linear(12, 5, seed=gen).double()
    x = lt.synth_data(64, 12, seed=gen).double()
    with torch.no_grad():
        y = base(x) + 0.3 * x[:, :5]
    return base, x, y


def _adapted(seed, alpha=4.0, rslora=False):
    base, _, _ = _task(seed)
    return lt.LoRALinear.from_linear(base, r=3, alpha=alpha, rslora=rslora, seed=seed + 10)


def test_train_together_equals_train_one_by_one():
    tasks = [_task(s) for s in range(3)]
    together = [_adapted(s) for s in range(3)]
    histories = lt.train_together(together, [t[1] for t in tasks], [t[2] for t in tasks],
                                  steps=20, lr=1e-2)
    for s, (_, x, y) in enumerate(tasks):
        alone = _adapted(s)
        history = lt.train(alone, x, y, steps=20, lr=1e-2)
        torch.testing.assert_close(torch.tensor(histories[s]), torch.tensor(history), rtol=1e-12, atol=0)
        torch.testing.assert_close(together[s].lora_B, alone.lora_B, rtol=1e-10, atol=1e-14)
        assert histories[s][-1] < histories[s][0]  # it did train


def test_train_together_shares_data_and_takes_a_loss_function():
    _, x, _ = _task(0)
    labels = torch.arange(64) % 5
    models = [_adapted(s) for s in range(2)]
    histories = lt.train_together(models, x, labels, steps=5, lr=1e-2, loss_fn=F.cross_entropy)
    alone = _adapted(1)
    assert histories[1] == pytest.approx(lt.train(alone, x, labels, steps=5, lr=1e-2,
                                                  loss_fn=F.cross_entropy), rel=1e-12)


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m, "alpha", 8.0), "differs from models\\[0\\]"),
    (lambda m: setattr(m, "dropout_p", 0.1), "dropout"),
])
def test_train_together_refuses_models_it_cannot_train_faithfully(change, message):
    _, x, y = _task(0)
    models = [_adapted(0), _adapted(1)]
    for model in models[1 if "differs" in message else 0:]:
        change(model)
    before = models[0].lora_A.clone()
    with pytest.raises(ValueError, match=message):
        lt.train_together(models, x, y, steps=2, lr=1e-2)
    assert torch.equal(models[0].lora_A, before)


def test_train_together_checks_its_data():
    models = [_adapted(0), _adapted(1)]
    _, x, y = _task(0)
    with pytest.raises(TypeError, match="list of 2 tensors"):
        lt.train_together(models, [x], y, steps=2, lr=1e-2)
    with pytest.raises(TypeError, match="models must be a non-empty list"):
        lt.train_together(models[0], x, y, steps=2, lr=1e-2)


def _stats_layers(alphas, seeds, bias=True):
    base, x, y = _task(0)
    stats = lt.FeatureStats.from_data(x, y)
    layers = []
    for alpha, seed in zip(alphas, seeds):
        layer = lt.LoRALinear.from_linear(copy.deepcopy(base), r=2, alpha=alpha, dropout=0.1,
                                          init="kaiming", seed=seed)
        layer.base.bias.requires_grad_(bias)
        layers.append(layer)
    return stats, layers


@pytest.mark.parametrize("bias", [True, False])
def test_fit_many_on_stats_equals_fitting_each_alone(bias):
    alphas, seeds = [1.0, 4.0, 16.0], [0, 1, 2]
    stats, many = _stats_layers(alphas, seeds, bias)
    histories = lt.fit_many_on_stats(many, stats, steps=30, lr=1e-2, record="mse")
    _, alone = _stats_layers(alphas, seeds, bias)
    for i, layer in enumerate(alone):
        history = lt.fit_lora_on_stats(layer, stats, steps=30, lr=1e-2, record="mse")
        assert histories[i] == pytest.approx(history, rel=1e-12)
        torch.testing.assert_close(many[i].lora_A, layer.lora_A, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(many[i].base.bias, layer.base.bias, rtol=1e-10, atol=1e-14)
    assert histories[0] != histories[1]  # different alphas trained differently


def test_fit_many_on_stats_refuses_mixed_ranks_and_leaves_layers_on_divergence():
    stats, layers = _stats_layers([1.0, 1.0], [0, 1])
    other = lt.LoRALinear.from_linear(copy.deepcopy(layers[0].base), r=3, seed=0)
    with pytest.raises(ValueError, match="rank"):
        lt.fit_many_on_stats([layers[0], other], stats, steps=2, lr=1e-2)
    before = [l.lora_A.clone() for l in layers]
    with pytest.raises(FloatingPointError, match="diverged"):
        lt.fit_many_on_stats(layers, stats, steps=50, lr=1e30)
    assert all(torch.equal(l.lora_A, b) for l, b in zip(layers, before))


def test_task_to_casts_every_tensor_and_keeps_the_values():
    task = lt.make_adaptation_task(seed=0, n_train=8, n_val=4)
    wide = task.to(torch.float64)
    assert wide.x_train.dtype == wide.mats["W_old1"].dtype == torch.float64
    assert torch.equal(wide.x_train.float(), task.x_train)
    with pytest.raises(TypeError, match="dtype"):
        task.to(torch.int64)


def test_mirror_init_zeroes_a_and_draws_b_like_a_layer_with_r_inputs():
    layer = lt.LoRALinear(64, 16, r=4, seed=0)
    lt.mirror_init_(layer, seed=3)
    assert torch.count_nonzero(layer.lora_A) == 0
    bound = 1 / 4 ** 0.5  # kaiming_uniform(a=sqrt 5): 1/sqrt(fan_in), fan_in = r = 4
    assert 0.9 * bound < layer.lora_B.abs().max() <= bound
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), layer.base(x))  # still a no-op at the start
    with pytest.raises(TypeError, match="LoRALinear"):
        lt.mirror_init_(torch.nn.Linear(2, 2))
