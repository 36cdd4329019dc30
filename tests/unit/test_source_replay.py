"""The replay of the second source's run (chapter 3 checks the full run's printed lines)."""

import pytest
import torch

import lora_tutorial as lt
from lora_tutorial.source_replay import replay_source_run, source_initial_model


def short_run(**kwargs):
    return replay_source_run(pretrain_steps=3, finetune_steps=4, log_every=2, **kwargs)


def test_shortcuts_change_no_number(global_rng_untouched):
    fast, literal = short_run(), short_run(literal=True)
    assert fast.pretrain_losses == literal.pretrain_losses
    assert fast.log == literal.log
    assert fast.finetune_losses == literal.finetune_losses
    assert fast.val_losses == literal.val_losses
    for name, value in fast.model.state_dict().items():
        assert torch.equal(value, literal.model.state_dict()[name]), name


def test_replay_is_deterministic_and_logs_like_the_source(global_rng_untouched):
    run = short_run()
    assert run.log == short_run().log
    assert run.log[0].startswith("[Pretrain] step 2, loss=")
    assert run.log[1:3] == ["", "Trainable params after freezing: 2192/39312 (5.58%). only LoRA is trainable."]
    assert run.log[3].startswith("[LoRA finetune] step 2, train_loss=")
    assert run.log[-1] == f"Merged for inference. Val loss (merged): {run.merged_val:.4f}"
    assert run.model.head.merged and not run.head_unmerged.merged
    # Merging is exact up to float rounding: the eval-mode unmerged head is the merged one.
    run.head_unmerged.eval()
    with torch.no_grad():
        unmerged = run.head_unmerged(run.features_val)
        merged = run.model.head(run.features_val)
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-5)


def test_displayed_order_starts_from_the_books_model(global_rng_untouched):
    _, book_model = lt.source_setup()
    book = book_model.state_dict()
    displayed = source_initial_model("displayed").state_dict()
    executed = source_initial_model("executed").state_dict()
    assert set(displayed) == set(book)
    assert all(torch.equal(displayed[k], book[k]) for k in book)
    assert not torch.equal(executed["backbone.weight"], book["backbone.weight"])


def test_displayed_order_pretrains_like_the_book():
    # The source's frozen adapter adds exact zeros, so its pretraining losses
    # are the book's (which switches the adapter off) when both start alike.
    run = replay_source_run("displayed", pretrain_steps=4, finetune_steps=1)
    task, model = lt.source_setup()
    assert lt.pretrain(model, task.x_train, task.y_old_train, steps=4) == run.pretrain_losses


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="order must be one of"):
        replay_source_run("shuffled")
    with pytest.raises(ValueError, match="finetune_steps must be a positive int"):
        replay_source_run(finetune_steps=0)
