"""Chapter 3's set-up, the shipped checkpoint, and the small analysis helpers."""

import pytest
import torch

import lora_tutorial as lt


def test_source_setup_is_the_sources_stream(global_rng_untouched):
    task, model = lt.source_setup()
    assert torch.equal(task.mats["W_old1"], lt.make_task_matrices(seed=0)["W_old1"])
    again_task, again_model = lt.source_setup()
    assert torch.equal(model.backbone.weight, again_model.backbone.weight)
    assert torch.equal(task.x_val, again_task.x_val)


@pytest.mark.parametrize("train_head", [False, True])
def test_pretrain_trains_what_it_says(train_head):
    task, model = lt.source_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = lt.pretrain(model, task.x_train[:256], task.y_old_train[:256], steps=5, train_head=train_head)
    assert len(history) == 5
    after = model.state_dict()
    assert not torch.equal(after["backbone.weight"], before["backbone.weight"])
    assert torch.equal(after["head.base.weight"], before["head.base.weight"]) is not train_head
    assert torch.equal(after["head.lora_A"], before["head.lora_A"])  # the adapter never moves
    assert torch.equal(after["head.lora_B"], before["head.lora_B"])


def test_pretrained_checkpoint_loads_ready_for_fine_tuning():
    task, model = lt.pretrained_tiny_adapter()
    assert lt.count_parameters(model).trainable == 2176
    assert lt.evaluate(model, task.x_train, task.y_old_train) < 0.03  # it learned the old task
    assert torch.count_nonzero(model.head.lora_B) == 0


def test_relative_update_norm():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    fresh = lt.LoRALinear(16, 4, r=2)
    assert lt.relative_update_norm(fresh, x) == 0.0
    with torch.no_grad():
        fresh.lora_B.fill_(0.1)
    expected = (x @ fresh.delta_weight().T).norm() / fresh.base(x).norm()
    assert lt.relative_update_norm(fresh, x) == pytest.approx(expected.item())
    fresh.merge_weights_()
    with pytest.raises(RuntimeError, match="merged"):
        lt.relative_update_norm(fresh, x)
    with pytest.raises(TypeError, match="LoRALayer or a LoRALinear"):
        lt.relative_update_norm(torch.nn.Linear(16, 4), x)


def test_singular_values():
    m = torch.diag(torch.tensor([3.0, 1.0, 2.0]))
    assert lt.singular_values(m).tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="must be 2-D"):
        lt.singular_values(torch.ones(3))


@pytest.mark.parametrize("train_head", [False, True])
def test_live_pretraining_reproduces_the_shipped_checkpoints(train_head):
    # Chapter 3 (and 4, 6, the explorer) load these instead of pretraining again:
    # they must be exactly what lt.pretrain makes (tools/make_checkpoint.py).
    task, model = lt.source_setup()
    lt.pretrain(model, task.x_train, task.y_old_train, train_head=train_head)
    _, shipped = lt.pretrained_tiny_adapter(train_head=train_head)
    for name, value in shipped.state_dict().items():
        assert torch.allclose(model.state_dict()[name], value, atol=1e-4), name


def test_head_pretrained_checkpoint_reproduces():
    # Chapter 3 loads this comparison run instead of pretraining it again (800 steps).
    task, model = lt.source_setup()
    history = lt.pretrain(model, task.x_train, task.y_old_train, train_head=True)
    _, shipped = lt.pretrained_tiny_adapter(train_head=True)
    for name, value in shipped.state_dict().items():
        assert torch.allclose(model.state_dict()[name], value, atol=1e-4), name
    assert history[-1] < 0.015  # lower than the head-frozen run's 0.0207
    assert shipped.head.base.bias.requires_grad is False and shipped.head.lora_A.requires_grad
    with pytest.raises(TypeError, match="train_head must be True or False"):
        lt.pretrained_tiny_adapter(train_head="yes")
