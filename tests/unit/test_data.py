"""The toy data builders: the source's tensors, determinism, RNG isolation, errors."""

import math

import pytest
import torch

from lora_tutorial import (
    create_toy_dataset,
    forward_with_mats,
    make_adaptation_task,
    make_task_matrices,
    synth_data,
)

KEYS = ["W_old1", "b_old1", "W_old2", "b_old2", "W_new2", "b_new2"]


def source_make_task_matrices(d_in=128, d_hidden=256, d_out=16):
    """The source's construction, with the global RNG, as a reference."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    w_old1 = torch.randn(d_hidden, d_in) / math.sqrt(d_in)
    b_old1 = torch.randn(d_hidden) * 0.1
    w_old2 = torch.randn(d_out, d_hidden) / math.sqrt(d_hidden)
    b_old2 = torch.randn(d_out) * 0.1
    w_new2 = w_old2 + 0.15 * torch.randn_like(w_old2)
    b_new2 = b_old2 + 0.15 * torch.randn_like(b_old2)
    torch.set_rng_state(state)
    return dict(zip(KEYS, [w_old1, b_old1, w_old2, b_old2, w_new2, b_new2]))


def test_make_task_matrices_returns_the_sources_tensors(global_rng_untouched):
    mats = make_task_matrices(seed=0)
    ref = source_make_task_matrices()
    assert list(mats) == KEYS
    for key in KEYS:
        assert torch.equal(mats[key], ref[key]), key


def test_create_toy_dataset_returns_the_sources_tensors(global_rng_untouched):
    state = torch.get_rng_state()
    torch.manual_seed(42)
    ref_x, ref_y = torch.randn(1000, 64), torch.randn(1000, 10)
    torch.set_rng_state(state)
    x, y = create_toy_dataset(seed=42)
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


def test_builders_are_deterministic_and_seed_dependent(global_rng_untouched):
    assert torch.equal(synth_data(64, 8, seed=3), synth_data(64, 8, seed=3))
    assert not torch.equal(synth_data(64, 8, seed=3), synth_data(64, 8, seed=4))
    a, b = make_task_matrices(seed=1), make_task_matrices(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in KEYS)
    assert not torch.equal(a["W_old1"], make_task_matrices(seed=2)["W_old1"])
    assert torch.equal(create_toy_dataset(seed=5)[1], create_toy_dataset(seed=5)[1])


def test_one_generator_gives_one_stream(global_rng_untouched):
    g = torch.Generator().manual_seed(0)
    train, val = synth_data(32, 4, seed=g), synth_data(8, 4, seed=g)
    assert not torch.equal(train[:8], val)
    ref = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([train, val]), ref)


def test_synth_data_needs_a_seed():
    with pytest.raises(TypeError):
        synth_data(10, 4)


def test_adaptation_task_is_the_sources_flow(global_rng_untouched):
    task = make_adaptation_task(n_train=64, n_val=16)
    g = torch.Generator().manual_seed(0)
    mats = make_task_matrices(seed=g)
    x_train, x_val = synth_data(64, seed=g), synth_data(16, seed=g)
    assert torch.equal(task.x_train, x_train) and torch.equal(task.x_val, x_val)
    expected = forward_with_mats(x_val, mats["W_old1"], mats["b_old1"], mats["W_new2"], mats["b_new2"])
    assert torch.equal(task.y_new_val, expected)
    assert task.y_old_train.shape == (64, 16)
    assert torch.equal(task.true_delta_weight, mats["W_new2"] - mats["W_old2"])


def test_forward_with_mats_shape_and_errors():
    mats = make_task_matrices(8, 6, 3, seed=0)
    x = synth_data(5, 8, seed=1)
    y = forward_with_mats(x, mats["W_old1"], mats["b_old1"], mats["W_old2"], mats["b_old2"])
    assert y.shape == (5, 3)
    with pytest.raises(ValueError, match=r"last dimension 8"):
        forward_with_mats(synth_data(5, 7, seed=1), mats["W_old1"], mats["b_old1"], mats["W_old2"], mats["b_old2"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: create_toy_dataset(n_samples=0), "n_samples must be a positive int, got 0"),
        (lambda: create_toy_dataset(seed=-1), "seed must be a non-negative int or a torch.Generator, got -1"),
        (lambda: make_task_matrices(d_hidden=-4), "d_hidden must be a positive int, got -4"),
        (lambda: make_task_matrices(shift=-0.1), r"shift must be a finite number >= 0, got -0.1"),
        (lambda: make_task_matrices(shift=float("nan")), r"shift must be a finite number >= 0"),
        (lambda: synth_data(n=2.5, seed=0), "n must be a positive int, got 2.5"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_a_seed_of_the_wrong_kind_is_a_type_error(seed):
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator, got"):
        create_toy_dataset(seed=seed)


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_train=0), dict(n_val=-1), dict(d_out=0), dict(shift=-1.0)],
)
def test_builders_validate_before_drawing_from_the_callers_generator(kwargs):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError):
        make_adaptation_task(seed=g, **kwargs)
    assert torch.equal(g.get_state(), state)
