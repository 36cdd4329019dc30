"""Chapter 9's stored sweeps: lora_tutorial.book.dora_lab and its results file."""

import math

import pytest

from lora_tutorial.book import dora_lab

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def stored():
    return dora_lab.load_sweeps()


def test_the_file_holds_every_run_of_the_settings(stored):
    keys = {dora_lab.key(d, m, s, lr) for d in range(len(dora_lab.DRAWS))
            for m in dora_lab.METHODS for s in dora_lab.SEEDS for lr in dora_lab.GRID}
    assert set(stored) == keys
    for run in stored.values():
        assert set(run) == {"slope", "intercept", "dd_range", "val_loss", "test_loss",
                            "test_acc"}
        assert all(math.isfinite(run[k]) for k in ("slope", "val_loss", "test_loss"))


def test_a_stored_run_is_what_the_code_computes_now(stored):
    # The second draw, DoRA, seed 2, at 3e-2: a run that is not the chapter's
    # draw (the chapter re-runs draw 0, seed 0 itself).
    draw = dora_lab.setup(1)
    run = dora_lab.run_one(draw, "DoRA", 2, 3e-2)
    want = stored[dora_lab.key(1, "DoRA", 2, 3e-2)]
    for name in ("slope", "intercept", "val_loss", "test_loss"):
        assert run[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    assert run["test_acc"] == want["test_acc"]


def test_a_file_of_other_settings_is_refused(tmp_path, stored):
    dora_lab.save_sweeps(stored, {"made_by": "test"}, tmp_path / "ok.json")
    assert dora_lab.load_sweeps(tmp_path / "ok.json") == stored
    text = (tmp_path / "ok.json").read_text().replace('"steps": 120', '"steps": 121')
    (tmp_path / "other.json").write_text(text)
    with pytest.raises(ValueError, match="other settings"):
        dora_lab.load_sweeps(tmp_path / "other.json")
