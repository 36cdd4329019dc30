"""The rank/alpha explorer: its retraining, its figure, and the logic of both widgets.

The live explorer's cell in chapter 4 is only meaningful with a kernel; these
tests drive the same objects directly.
"""

import io
import math

import ipywidgets as w
import numpy as np
import pytest
from PIL import Image

import lora_tutorial as lt
from lora_tutorial import book
from lora_tutorial.book.explorer import ALPHA_RANGE, ExplorerFigure, RankAlphaExplorer


@pytest.fixture(scope="module")
def lab():
    return book.RankAlphaLab.from_checkpoint()


@pytest.fixture(scope="module")
def figure(lab):
    return ExplorerFigure(lab)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_run_matches_chapter_3_and_is_cached(lab):
    result = lab.run(8, 16.0)
    assert result.rank == 8 and result.scaling == 2.0
    assert result.final_loss == pytest.approx(1.144, abs=2e-3)  # chapter 3's adapter, fitted on statistics
    assert result.best_loss == pytest.approx(lab.best_loss(8))
    assert result.best_loss <= result.final_loss
    assert len(result.learned_sv) == 8 and np.all(np.diff(result.learned_sv) <= 0)
    assert len(result.steps) == len(result.history) and result.steps[-1] == lab.steps
    assert lab.run(8, 16.0) is result  # the cache


@pytest.mark.parametrize("rank, alpha, rslora", [
    (1, ALPHA_RANGE[1], False), (1, ALPHA_RANGE[1], True),
    (16, ALPHA_RANGE[0], False), (16, ALPHA_RANGE[0], True), (16, ALPHA_RANGE[1], True),
])
def test_extreme_settings_give_finite_numbers_and_a_figure(lab, figure, rank, alpha, rslora):
    result = lab.run(rank, alpha, rslora)
    assert np.all(np.isfinite(result.history)) and math.isfinite(result.final_loss)
    assert np.all(np.isfinite(result.learned_sv))
    assert png_size(figure.png(result)) == (800, 272)


def test_bad_settings(lab):
    with pytest.raises(ValueError, match="rank must be at most max_rank=16, got 17"):
        lab.run(17, 1.0)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lab.run(0, 1.0)
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        lab.run(4, float("inf"))


def test_figure_changes_with_the_result(lab, figure):
    first, second = figure.png(lab.run(2, 16.0)), figure.png(lab.run(16, 16.0))
    assert first != second
    assert figure.png(lab.run(2, 16.0)) == first  # redrawing is deterministic


def test_live_explorer_retrains_on_slider_moves_and_caches(lab):
    explorer = book.rank_alpha_explorer(lab, rank=8, alpha=16.0)
    assert isinstance(explorer, RankAlphaExplorer)
    start = explorer.image.value
    assert png_size(start) == (800, 272)
    assert "1.14" in explorer.status.value
    explorer.rank.value = 3  # what dragging the slider does
    assert (3, 16.0, False) in lab._cache and explorer.image.value != start
    explorer.scaling.value = "α/√r"
    assert (3, 16.0, True) in lab._cache
    explorer.alpha.value = ALPHA_RANGE[1]
    assert explorer.alpha.value == ALPHA_RANGE[1]
    assert (3, ALPHA_RANGE[1], True) in lab._cache
    assert explorer.update(3, ALPHA_RANGE[1], True) < 0.05  # served from the cache
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_static_explorer_links_every_control_to_its_stacks(lab, figure):
    ranks, alphas = [2, 8], [1.0, 16.0, 256.0]
    box = book.static_rank_alpha_explorer(lab, ranks=ranks, alphas=alphas)
    (rank_slider, alpha_slider), scaling, figures = box.children[0].children, box.children[1], box.children[2]
    assert rank_slider.value == 8 and alpha_slider.value == 16.0
    assert isinstance(figures, w.Stack) and len(figures.children) == 2  # alpha/r, alpha/sqrt(r)
    images = [img for by_rank in figures.children for by_alpha in by_rank.children for img in by_alpha.children]
    assert len(images) == 2 * len(ranks) * len(alphas)
    assert len({img.value for img in images}) == len(images)  # every figure differs
    links = {(link.source[0].model_id, link.source[1], link.target[0].model_id) for link in box.links}
    assert (scaling.model_id, "index", figures.model_id) in links
    for by_rank in figures.children:
        assert by_rank.selected_index == rank_slider.index
        assert (rank_slider.model_id, "index", by_rank.model_id) in links
        for by_alpha in by_rank.children:
            assert by_alpha.selected_index == alpha_slider.index
            assert (alpha_slider.model_id, "index", by_alpha.model_id) in links
    # The image shown for (scaling, rank, alpha) is that setting's figure.
    expected = figure.png(lab.run(2, 256.0, True))
    assert figures.children[1].children[0].children[2].value == expected


def test_settings_with_the_same_scale_share_one_run(lab):
    # rank 16: alpha/sqrt(r) = 16/4 and alpha/r = 64/16 are both s = 4.
    rs, plain = lab.run(16, 16.0, True), lab.run(16, 64.0, False)
    assert rs.scaling == plain.scaling == 4.0
    assert rs.history is plain.history and rs.final_loss == plain.final_loss
    assert (rs.alpha, rs.rslora) == (16.0, True)  # each keeps its own labels
    assert lab.run(4, 16.0, True).final_loss != lab.run(4, 16.0, False).final_loss
