"""Chapter 5's real data and network: lora_tutorial.digits."""

import pytest
import torch

import lora_tutorial as lt
from lora_tutorial.digits import Split, accuracy

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def tasks():
    return lt.load_digit_tasks(0)


def test_tasks_split_the_digits_without_overlap(tasks):
    source, target = tasks
    sizes = [len(getattr(t, s)) for t in (source, target) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797
    for task in (source, target):
        for split in (task.train, task.val, task.test):
            assert split.x.shape == (len(split), 64) and split.x.dtype == torch.float32
            assert split.y.dtype == torch.int64 and set(split.y.tolist()) == set(range(5))
            assert 0.0 <= float(split.x.min()) and float(split.x.max()) <= 1.0
    # No image is in two splits of the same task (images are distinct rows of the data set).
    rows = [tuple(r.tolist()) for s in (source.train, source.val, source.test) for r in s.x]
    assert len(set(rows)) > 0.99 * len(rows)  # a few digits are exact duplicates in the data


def test_splits_are_fixed_by_the_seed_and_leave_the_global_rng_alone(tasks):
    state = torch.get_rng_state()
    again = lt.load_digit_tasks(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again[1].test.x, tasks[1].test.x)
    other = lt.load_digit_tasks(1)
    assert not torch.equal(other[1].test.x, tasks[1].test.x)


def test_load_digit_tasks_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_val"):
        lt.load_digit_tasks(0, n_val=0)
    with pytest.raises(ValueError, match="n_val \\+ n_test"):
        lt.load_digit_tasks(0, n_val=1000, n_test=900)


def test_mlp_shapes_and_seeding():
    model = lt.DigitsMLP(n_classes=5, hidden=16, seed=3)
    x = torch.rand(7, 64)
    assert model(x).shape == (7, 5)
    assert model.features(x).shape == (7, 16)
    same = lt.DigitsMLP(n_classes=5, hidden=16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    with pytest.raises(ValueError, match="hidden"):
        lt.DigitsMLP(hidden=0)


def test_accuracy_counts_the_argmax_and_keeps_the_mode():
    model = torch.nn.Linear(64, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    model.train()
    assert accuracy(model, torch.rand(4, 64), torch.tensor([1, 1, 0, 2])) == 0.5
    assert model.training


def test_pretraining_learns_the_source_task_reproducibly(tasks):
    source, target, model = lt.pretrained_digits_mlp(0, steps=60)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert accuracy(model, source.test.x, source.test.y) > 0.9
    _, _, again = lt.pretrained_digits_mlp(0, steps=60)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_pretrain_digits_returns_a_falling_loss():
    x = torch.rand(40, 64)
    split = Split(x, (x[:, 0] > 0.5).long())
    history = lt.pretrain_digits(lt.DigitsMLP(n_classes=2, seed=0), split, steps=30)
    assert len(history) == 30 and history[-1] < history[0]


# ------------------------------------------------------------ issue 18: inputs checked before anything changes
@pytest.fixture
def three_way():
    model = torch.nn.Linear(64, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    return model


@pytest.mark.parametrize("x, labels, error, message", [
    (torch.rand(4, 64), torch.tensor([[1], [1], [0], [2]]), ValueError,
     r"labels must have shape \(4,\), one label per row, got \(4, 1\)"),
    (torch.rand(0, 64), torch.zeros(0, dtype=torch.long), ValueError, r"x must have shape \(n, features\) "
                                                                       r"with n >= 1, got \(0, 64\)"),
    (torch.full((2, 64), float("nan")), torch.tensor([1, 1]), ValueError, r"x holds 128 value\(s\) that are not finite"),
    (torch.rand(2, 64), torch.tensor([1.0, 1.0]), TypeError, "labels must hold integer class labels"),
    (torch.rand(2, 64), torch.tensor([1, 3]), ValueError, r"labels must lie in \[0, 3\)"),
])
def test_accuracy_refuses_what_would_broadcast_or_not_count(three_way, x, labels, error, message):
    with pytest.raises(error, match=message):
        accuracy(three_way, x, labels)


def test_pretrain_digits_checks_before_making_anything_trainable():
    """Issue 18: steps=0 made every parameter trainable (512 -> 13,317), then raised."""
    model = lt.add_lora(lt.DigitsMLP(seed=0), ["fc1"], r=4)
    count = lt.count_parameters(model).trainable
    split = Split(torch.rand(8, 64), torch.zeros(8, dtype=torch.long))
    for kwargs, message in [(dict(steps=0), "steps must be a positive int"),
                            (dict(lr=float("nan")), "lr must be a positive finite number")]:
        with pytest.raises(ValueError, match=message):
            lt.pretrain_digits(model, split, **kwargs)
        assert lt.count_parameters(model).trainable == count
    with pytest.raises(TypeError, match="split must be a Split"):
        lt.pretrain_digits(model, (split.x, split.y))
    with pytest.raises(ValueError, match=r"y must have shape \(8,\)"):
        Split(torch.rand(8, 64), torch.zeros(8, 1, dtype=torch.long))


def test_pretrained_digits_mlp_accepts_a_generator_and_checks_first():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        lt.pretrained_digits_mlp(seed=g, steps=0)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator"):
        lt.pretrained_digits_mlp(seed=1.5)
    assert torch.equal(g.get_state(), state)
    _, target, model = lt.pretrained_digits_mlp(seed=g, steps=5, hidden=8)
    _, again, twin = lt.pretrained_digits_mlp(seed=torch.Generator().manual_seed(5), steps=5, hidden=8)
    assert torch.equal(target.test.x, again.test.x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_mlp_names_a_wrong_input_width():
    with pytest.raises(ValueError, match=r"x must have last dimension 64 \(in_features\), got shape \(3, 10\)"):
        lt.DigitsMLP(seed=0)(torch.rand(3, 10))
