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
