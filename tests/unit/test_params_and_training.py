"""Counting, freezing, the training loop and evaluation."""

import copy

import pytest
import torch
from torch import nn

from lora_tutorial import (
    LoRALinear,
    ParamCount,
    TinyAdapter,
    count_parameters,
    evaluate,
    mark_only_lora_as_trainable,
    train,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- counts
def test_tiny_adapter_counts_after_the_sources_freezing():
    model = TinyAdapter()
    # The source's own freezing: backbone frozen, head trains "lora_" and "bias".
    model.backbone.requires_grad_(False)
    for name, p in model.head.named_parameters():
        p.requires_grad = ("lora_" in name) or ("bias" in name)
    count = count_parameters(model)
    assert (count.trainable, count.total) == (2192, 39312)
    assert str(count) == "2192/39312 (5.58%)"
    # ... and the helper that does the same.
    assert mark_only_lora_as_trainable(TinyAdapter(), bias="lora_only") == ParamCount(2192, 39312)


def test_bias_modes():
    model = TinyAdapter()
    assert mark_only_lora_as_trainable(model, bias="none").trainable == 2048 + 128
    assert mark_only_lora_as_trainable(model, bias="all").trainable == 2048 + 128 + 256 + 16
    with pytest.raises(ValueError, match="bias must be one of 'none', 'all', 'lora_only', got 'some'"):
        mark_only_lora_as_trainable(model, bias="some")


def test_count_parameters_counts_shared_parameters_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    assert count_parameters(model) == ParamCount(20, 20)
    assert ParamCount(0, 0).percent == 0.0


@pytest.mark.parametrize("bias, trained_biases", [("none", set()), ("lora_only", {"head.base.bias"}),
                                                  ("all", {"head.base.bias", "backbone.bias"})])
def test_after_freezing_only_the_adapter_gets_gradients(bias, trained_biases):
    model = TinyAdapter(d_in=8, d_hidden=12, d_out=3, r=2, seed=gen())
    with torch.no_grad():
        model.head.lora_B.normal_(generator=gen(1))  # so that lora_A gets a non-zero gradient too
    mark_only_lora_as_trainable(model, bias=bias)
    x, y = torch.randn(16, 8, generator=gen(2)), torch.randn(16, 3, generator=gen(3))
    nn.functional.mse_loss(model(x), y).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"head.lora_A", "head.lora_B"} | trained_biases
    assert model.head.lora_A.grad.abs().sum() > 0 and model.head.lora_B.grad.abs().sum() > 0


def test_tiny_adapter_shapes_and_features():
    model = TinyAdapter(seed=gen())
    x = torch.randn(10, 128, generator=gen(1))
    assert model(x).shape == (10, 16)
    assert model.features(x).shape == (10, 256)
    torch.testing.assert_close(model.head(model.features(x)), model(x))


def test_tiny_adapter_bad_arguments_fail_before_building():
    g = gen()
    state = g.get_state()
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        TinyAdapter(r=0, seed=g)
    with pytest.raises(ValueError, match="d_hidden must be a positive int"):
        TinyAdapter(d_hidden=0, seed=g)
    assert torch.equal(g.get_state(), state)


# ----------------------------------------------------------------- training
def regression_problem(n=256):
    x = torch.randn(n, 6, generator=gen(1))
    w = torch.randn(2, 6, generator=gen(2))
    return x, x @ w.T


def test_train_reduces_the_loss_and_returns_its_history(global_rng_untouched):
    x, y = regression_problem()
    layer = LoRALinear(6, 2, r=2, alpha=2.0, dropout=0.0, init="kaiming", seed=gen())
    history = train(layer, x, y, steps=200, lr=0.05)
    assert len(history) == 200
    assert history[-1] < 0.5 * history[0]
    assert history[0] == pytest.approx(nn.functional.mse_loss(
        LoRALinear(6, 2, r=2, alpha=2.0, dropout=0.0, init="kaiming", seed=gen())(x), y).item())


def test_train_is_deterministic_with_dropout_and_restores_the_mode(global_rng_untouched):
    x, y = regression_problem()
    first = LoRALinear(6, 2, r=2, dropout=0.3, init="kaiming", seed=gen()).eval()
    second = copy.deepcopy(first)
    calls = []
    h1 = train(first, x, y, steps=20, lr=0.01, seed=5, callback=lambda s, v: calls.append((s, v)))
    h2 = train(second, x, y, steps=20, lr=0.01, seed=5)
    assert h1 == h2
    assert calls == list(enumerate(h1, start=1))
    assert not first.training
    h3 = train(copy.deepcopy(second), x, y, steps=20, lr=0.01, seed=6)
    assert h3 != h2


def test_train_errors():
    x, y = regression_problem()
    frozen = nn.Linear(6, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, x, y, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        train(nn.Linear(6, 2), x, y, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
        train(nn.Linear(6, 2), x, y, steps=1, lr=-1)
    with pytest.raises(ValueError, match="optimizer must be one of 'adamw', 'adam', 'sgd', got 'lbfgs'"):
        train(nn.Linear(6, 2), x, y, steps=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="same number of rows, got 256 and 10"):
        train(nn.Linear(6, 2), x, y[:10], steps=1, lr=0.1)
    with pytest.raises(FloatingPointError, match="became"):
        train(nn.Linear(6, 2), x * 1e3, y, steps=50, lr=1e3, optimizer="sgd")


def test_evaluate_runs_in_eval_mode_and_restores_the_mode(global_rng_untouched):
    layer = LoRALinear(6, 2, r=2, dropout=0.5, seed=gen())
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(4))
    x, y = regression_problem()
    layer.train()
    clean = evaluate(layer, x, y)
    assert layer.training
    assert clean == pytest.approx(nn.functional.mse_loss(layer.eval()(x), y).item())
    assert not layer.training
    noisy = evaluate(layer, x, y, train_mode=True, seed=1)
    assert not layer.training
    assert noisy != pytest.approx(clean)
    assert noisy == evaluate(layer, x, y, train_mode=True, seed=1)


def test_default_device_asks_each_backend_about_itself(monkeypatch):
    from lora_tutorial import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert default_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert default_device().type == "cpu"


# ------------------------------------------- issue 10: inputs and modes
def test_train_and_evaluate_refuse_predictions_of_another_shape():
    # Before: targets (n, 1) against predictions (n, 4) broadcast into a meaningless loss.
    x = torch.randn(32, 6, generator=gen(1))
    model = nn.Linear(6, 4)
    before = copy.deepcopy(model.state_dict())
    for call in (lambda: train(model, x, x[:, :1], steps=1, lr=0.1), lambda: evaluate(model, x, x[:, :1])):
        with pytest.raises(ValueError, match=r"predictions have shape \(32, 4\) but y has shape \(32, 1\)"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A loss of one's own may compare other shapes (class indices, for example).
    labels = torch.randint(0, 4, (32,), generator=gen(2))
    assert evaluate(model, x, labels, loss_fn=nn.functional.cross_entropy) > 0


def test_train_and_evaluate_say_empty_and_nan_in_the_data():
    # Before: evaluate on empty data returned nan; NaN data told you to lower the learning rate.
    model = nn.Linear(3, 2)
    empty_x, empty_y = torch.empty(0, 3), torch.empty(0, 2)
    with pytest.raises(ValueError, match="x is empty"):
        evaluate(model, empty_x, empty_y)
    with pytest.raises(ValueError, match="x is empty"):
        train(model, empty_x, empty_y, steps=1, lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    y[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in the data: y"):
        train(model, x, y, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="NaN or inf in the data: y"):
        evaluate(model, x, y)


def frozen_batchnorm_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # the user freezes the BatchNorm (its statistics stay as they are)
    model[1].requires_grad_(False)
    return model


def test_train_keeps_a_frozen_batchnorm_in_eval_mode_and_its_statistics():
    # Before: train() called model.train(), updating the frozen BatchNorm's running statistics,
    # and restored only the top-level mode.
    model = frozen_batchnorm_model()
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    x, y = torch.randn(16, 4, generator=gen(1)), torch.randn(16, 2, generator=gen(2))
    train(model, x, y, steps=5, lr=0.01)
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert [m.training for m in model] == [True, False, True]


@pytest.mark.parametrize("top_level_training", [True, False])
def test_train_and_evaluate_restore_every_submodules_mode(top_level_training):
    model = frozen_batchnorm_model()
    model.training = top_level_training
    modes = [m.training for m in model.modules()]
    x, y = torch.randn(16, 4, generator=gen(1)), torch.randn(16, 2, generator=gen(2))
    train(model, x, y, steps=2, lr=0.01)
    assert [m.training for m in model.modules()] == modes
    evaluate(model, x, y)
    evaluate(model, x, y, train_mode=True)
    assert [m.training for m in model.modules()] == modes


def test_wrong_kinds_are_type_errors_naming_the_argument():
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        count_parameters("model")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        mark_only_lora_as_trainable({})
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator, got 1.5"):
        train(nn.Linear(3, 2), x, y, steps=1, lr=0.1, seed=1.5)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator, got '0'"):
        TinyAdapter(seed="0")
    with pytest.raises(TypeError, match="rslora must be True or False, got 'no'"):
        TinyAdapter(rslora="no")
    with pytest.raises(TypeError, match="train_mode must be True or False"):
        evaluate(nn.Linear(3, 2), x, y, train_mode="no")


def test_a_generator_seed_is_drawn_from(global_rng_untouched):
    x, y = regression_problem()
    layer = LoRALinear(6, 2, r=2, dropout=0.3, init="kaiming", seed=gen())
    g1, g2 = gen(11), gen(11)
    h1 = train(copy.deepcopy(layer), x, y, steps=5, lr=0.01, seed=g1)
    h2 = train(copy.deepcopy(layer), x, y, steps=5, lr=0.01, seed=g2)
    assert h1 == h2 and not torch.equal(g1.get_state(), gen(11).get_state())


def test_mark_only_lora_as_trainable_records_the_bias_mode_on_the_model():
    model = TinyAdapter(d_in=4, d_hidden=6, d_out=2, r=2)
    mark_only_lora_as_trainable(model, bias="lora_only")
    assert model.lora_bias_mode == "lora_only"
