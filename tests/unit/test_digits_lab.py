"""Chapter 5's experiments: lora_tutorial.book.digits_lab."""

import math

import pytest
import torch

import lora_tutorial as lt
from lora_tutorial.book import digits_lab as dl

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def lab():
    return dl.DigitsLab.create(seed=0, steps=20, pretrain_steps=60)


def test_torch_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with dl.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n"):
        with dl.torch_threads(0):
            pass


def test_adapt_sets_up_each_method(lab):
    head = lab.adapt("head")
    assert lt.count_parameters(head).trainable == 64 * 5 + 5
    full = lab.adapt("full")
    assert lt.count_parameters(full).trainable == sum(p.numel() for p in full.parameters())
    lora = lab.adapt("lora", r=2, targets=["fc2"])
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names == {"fc2.lora_A", "fc2.lora_B", "head.modules_to_save.default.weight",
                     "head.modules_to_save.default.bias"}  # a trained copy of the head, as in PEFT
    assert lora.fc2.alpha == 4.0  # alpha defaults to 2r
    with pytest.raises(ValueError, match="method"):
        lab.adapt("prefix")


def test_a_fresh_adapter_changes_nothing_and_the_pretrained_model_stays_untouched(lab):
    before = [p.clone() for p in lab.pretrained.parameters()]
    model = lab.adapt("lora", r=4)
    # B = 0: the adapted features are the pretrained ones, so the source task is intact.
    assert lab.source_accuracy(model) == lab.source_accuracy(lab.pretrained)
    dl.finetune(model, lab.target.train, steps=5, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, lab.pretrained.parameters()))


def test_finetune_learns_and_is_deterministic(lab):
    runs = []
    for _ in range(2):
        model = lab.adapt("lora", r=2)
        runs.append(dl.finetune(model, lab.target.train, steps=20, lr=1e-2))
    assert runs[0] == runs[1]
    assert runs[0][-1] < 0.5 * runs[0][0]


def test_finetune_gives_b_its_own_learning_rate(lab):
    model = lab.adapt("lora", r=2, targets=["fc1"])
    h0, b0 = model.head.weight.clone(), model.fc1.lora_B.clone()
    dl.finetune(model, lab.target.train, steps=1, lr=1e-3, b_lr_ratio=16.0)
    # Adam's first step moves every parameter with a non-zero gradient by about
    # its learning rate (A's gradient is zero while B = 0).
    step_head = (model.head.weight - h0).abs().max().item()
    step_b = (model.fc1.lora_B - b0).abs().max().item()
    assert step_head == pytest.approx(1e-3, rel=0.05)
    assert step_b == pytest.approx(16e-3, rel=0.05)


def test_finetune_stops_on_a_non_finite_loss(lab):
    model = lab.adapt("full")
    with torch.no_grad():
        model.fc1.weight.fill_(float("nan"))
    history = dl.finetune(model, lab.target.train, steps=5, lr=1e-2)
    assert history == [math.inf]


def test_swap_init_zeroes_a_and_draws_b(lab):
    model = lab.adapt("lora", r=3)
    before = model(lab.target.val.x)
    dl.swap_init(model, seed=0)
    for _, layer in lt.lora_layers(model):
        assert torch.count_nonzero(layer.lora_A) == 0
        assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
        assert layer.lora_B.abs().max() <= 1 / math.sqrt(layer.in_features)
    assert torch.equal(model(lab.target.val.x), before)  # still a no-op at the start


def test_compare_methods_and_best_runs(lab):
    runs = dl.compare_methods(lab, ranks=[2], lrs=[1e-2, 3e-2])
    assert [r.name for r in runs] == ["head", "head", "LoRA r=2", "LoRA r=2", "full", "full"]
    best = dl.best_runs(runs)
    assert [r.name for r in best] == ["head", "LoRA r=2", "full"]
    for run in best:
        mine = [r for r in runs if r.name == run.name]
        assert run.val_acc == max(r.val_acc for r in mine)
    assert best[0].source_acc == lab.source_accuracy(lab.pretrained)  # the head forgets nothing
    assert best[0].trainable < best[1].trainable < best[2].trainable


def test_scaling_sweep_shows_the_gradient_collapse_under_alpha_over_r(lab):
    plain = dl.scaling_sweep(lab, [1, 16], rslora=False)
    stable = dl.scaling_sweep(lab, [1, 16], rslora=True)
    assert plain[0] == stable[0]  # at r = 1 the two rules agree
    assert plain[1].grad_norm < 0.5 * stable[1].grad_norm
    assert all(row.first_change > 0 and row.final_loss > 0 for row in plain + stable)


def test_init_and_loraplus_sweeps_have_one_loss_per_setting(lab):
    assert len(dl.init_sweep(lab, [1e-3, 1e-2], zero="A")) == 2
    with pytest.raises(ValueError, match="zero"):
        dl.init_sweep(lab, [1e-3], zero="C")
    plus = dl.loraplus_sweep(lab, [1, 4], [1e-3, 1e-2], steps=5)
    assert list(plus) == [1, 4] and all(len(v) == 2 for v in plus.values())


def test_placement_sweep_counts_adapter_parameters(lab):
    placed = dl.placement_sweep(lab, {"all": (dl.HIDDEN, 1), "fc1": (["fc1"], 3)}, seeds=(1,))
    assert placed["all"][0] == placed["fc1"][0] == 3 * 128
    assert all(0.0 <= acc <= 1.0 for _, acc in placed.values())


def test_similarity_grid_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 6, generator=gen)
    grid = dl.similarity_grid(w, w, 3, 4)
    assert grid.shape == (3, 4)
    assert torch.allclose(grid, torch.ones(3, 4, dtype=torch.float64))  # nested subspaces
    # Orthogonal updates: row spaces spanned by disjoint coordinates.
    w1 = torch.zeros(4, 6)
    w1[0, 0], w1[1, 1] = 2.0, 1.0
    w2 = torch.zeros(4, 6)
    w2[0, 2], w2[1, 3] = 2.0, 1.0
    assert torch.allclose(dl.similarity_grid(w1, w2, 2, 2), torch.zeros(2, 2, dtype=torch.float64))
    # One shared axis: phi(1, 1) = 1 and phi(2, 2) = 1/2.
    w3 = torch.zeros(4, 6)
    w3[0, 0], w3[1, 4] = 2.0, 1.0
    grid = dl.similarity_grid(w1, w3, 2, 2)
    assert grid[0, 0].item() == pytest.approx(1.0)
    assert grid[1, 1].item() == pytest.approx(0.5)
