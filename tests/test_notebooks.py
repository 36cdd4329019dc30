"""House rules for the stored notebooks, checked without running them.

`pytest --nbval` proves that the stored outputs are current; these tests check
that they are outputs worth storing, and that each chapter keeps the book's
conventions.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
MACHINE_PATH = re.compile(r"(/work/|/tmp/|/root/|/home/|site-packages|\\Users\\)")


def load(path):
    return json.loads(path.read_text())


def markdown(nb):
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_chapters_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_naive_lora.ipynb",
        "02_scaled_zero_init.ipynb",
        "03_pretrain_finetune_merge.ipynb",
        "04_parameter_efficiency.ipynb",
        "05_lora_on_real_data.ipynb",
        "06_from_scratch_to_peft.ipynb",
        "07_lora_on_a_language_model.ipynb",
        "08_qlora.ipynb",
        "09_dora_and_many_adapters.ipynb",
    ]
    toc = (ROOT / "_toc.yml").read_text()
    for path in NOTEBOOKS:
        assert f"notebooks/{path.stem}" in toc, f"{path.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_top_to_bottom_in_one_kernel(path):
    counts = [c["execution_count"] for c in code_cells(load(path))]
    assert counts == list(range(1, len(counts) + 1)), "re-run with `make notebooks`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_clean(path):
    for i, cell in enumerate(code_cells(load(path))):
        for out in cell["outputs"]:
            assert out["output_type"] != "error", f"code cell {i} stores a traceback"
            assert out.get("name") != "stderr", f"code cell {i} stores stderr: {''.join(out['text'])[:200]}"
            text = "".join(out.get("text", "")) + json.dumps(
                {k: v for k, v in out.get("data", {}).items() if not k.startswith("image/")})
            assert not ADDRESS.search(text), f"code cell {i} shows a memory address"
            assert not MACHINE_PATH.search(text), f"code cell {i} shows a machine path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_output_is_ignored_by_nbval(path):
    # Strict nbval everywhere: no cell opts out of the comparison.
    for cell in code_cells(load(path)):
        tags = cell.get("metadata", {}).get("tags", [])
        assert not any(t.startswith("nbval-") for t in tags), tags


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_structure(path):
    nb = load(path)
    text = markdown(nb)
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")
    assert "What you will learn" in text
    assert "## Summary" in text and "## Exercises" in text
    assert text.index("## Summary") < text.index("## Exercises")
    exercises = re.findall(r"```\{exercise\}\n:label: (\S+)", text)
    assert 2 <= len(exercises) <= 4
    solutions = re.findall(r"```\{solution(?:-start)?\} (\S+)\n:class: dropdown", text)
    assert solutions == exercises, "every exercise needs a dropdown solution, in order"


# Diagrams drawn by the book's machinery (lora_tutorial.book.diagrams) have a title but no axes.
DIAGRAMS = ("book.lora_diagram(",)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_have_captions_titles_and_labels(path):
    for cell in code_cells(load(path)):
        shows_figure = any("image/png" in out.get("data", {}) for out in cell["outputs"])
        if not shows_figure:
            continue
        source = "".join(cell["source"])
        caption = cell["metadata"].get("mystnb", {}).get("figure", {}).get("caption", "")
        assert len(caption) > 40, f"figure without a caption: {source[:80]}"
        assert source.rstrip().endswith("plt.show()"), "end figure cells with plt.show()"
        if any(diagram in source for diagram in DIAGRAMS):
            continue
        assert "set_title" in source or "suptitle" in source, f"figure without a title: {source[:80]}"
        # A y axis is labelled by its label, or by the names of its rows (bar and dot charts).
        labelled_y = any(k in source for k in ("set_ylabel", "barh", "set_yticks"))
        assert "set_xlabel" in source and labelled_y, source[:80]


# Chapters not yet restyled for issue 21 (figure style, alt text, numbered citations of
# figures, one output per printout). Their tests are expected to fail until then; a
# chapter's author removes it from this list when restyling it (the tests then XPASS).
NOT_YET_RESTYLED: set[str] = set()  # every chapter is restyled
STYLED = [pytest.param(p, id=p.stem, marks=[pytest.mark.xfail(reason="not yet restyled (issue 21)", strict=False)]
                       if p.stem in NOT_YET_RESTYLED else []) for p in NOTEBOOKS]


@pytest.mark.parametrize("path", STYLED)
def test_figures_say_what_they_show(path):
    # Alt text that describes the figure (not the image's hash file name), a name the
    # prose cites it by ({numref}), and maths in captions written as maths.
    nb = load(path)
    prose = markdown(nb)
    for cell in code_cells(nb):
        if not any("image/png" in out.get("data", {}) for out in cell["outputs"]):
            continue
        meta = cell["metadata"].get("mystnb", {})
        alt, name = meta.get("image", {}).get("alt", ""), meta.get("figure", {}).get("name", "")
        caption = meta.get("figure", {}).get("caption", "")
        assert len(alt) > 60 and not re.search(r"\.(png|svg|jpe?g)$", alt), f"{name}: alt text {alt!r}"
        assert f"{{numref}}`{name}`" in prose, f"{name} is never cited by number in the prose"
        assert not re.search(r"(?<!\\)alpha ?/ ?(sqrt|r\b)", caption), f"{name}: write maths as $\\alpha/r$"
        assert "hide-input" in cell["metadata"].get("tags", []), f"{name}: fold the plotting code"


@pytest.mark.parametrize("path", STYLED)
def test_one_printout_is_one_output(path):
    # A cell's consecutive writes to stdout are one output (tools/run_notebooks.py
    # coalesces them), so the book shows one box, not the header in one and its rows in another.
    for i, cell in enumerate(code_cells(load(path))):
        kinds = [out.get("name") for out in cell["outputs"] if out["output_type"] == "stream"]
        assert all(a != b for a, b in zip(kinds, kinds[1:])), f"code cell {i}: a printout split over outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_glued_name_in_the_prose_is_glued_by_the_notebook(path):
    nb = load(path)
    glued = {
        out["metadata"]["scrapbook"]["name"]
        for cell in code_cells(nb)
        for out in cell["outputs"]
        if "scrapbook" in out.get("metadata", {})
    }
    used = set(re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)(?::[^`]*)?`", markdown(nb)))
    assert used <= glued, f"pasted but never glued: {sorted(used - glued)}"


def test_notebook_sizes_are_sensible():
    for path in NOTEBOOKS:
        assert path.stat().st_size < 2_500_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"


def test_chapter_4_stores_the_static_widgets():
    nb = load(ROOT / "notebooks" / "04_parameter_efficiency.ipynb")
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    models = [m["model_name"] for m in state.values()]
    assert models.count("LinkModel") >= 1 + 2 + 2 * 5
    assert models.count("StackModel") >= 1 + 2 + 2 * 5
    assert models.count("ImageModel") >= 2 * 5 * 6


# The rendered book is read at about 80 characters a line: wider code or printed
# output scrolls sideways (tests/browser checks the rendered pages themselves).
MAX_WIDTH = 80


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_and_printed_output_fit_the_page(path):
    too_wide = []
    for i, cell in enumerate(code_cells(load(path))):
        lines = "".join(cell["source"]).splitlines()
        for out in cell["outputs"]:
            if out["output_type"] == "stream":
                lines += "".join(out["text"]).splitlines()
            elif "text/plain" in out.get("data", {}) and "text/html" not in out["data"] \
                    and not any(k.startswith("image/") for k in out["data"]):
                lines += "".join(out["data"]["text/plain"]).splitlines()
        too_wide += [f"code cell {i}: {line[:60]}…" for line in lines if len(line) > MAX_WIDTH]
    assert not too_wide, f"{len(too_wide)} line(s) over {MAX_WIDTH} characters:\n" + "\n".join(too_wide[:10])


GUARD = re.compile(r"^\s*assert\b", re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_guards_its_claims(path):
    # Every comparison in the prose is backed by an assert in a code cell, so strict
    # nbval fails the day a claim stops being true. A chapter with comparative prose
    # and no guards is the failure this catches.
    guards = sum(len(GUARD.findall("".join(c["source"]))) for c in code_cells(load(path)))
    assert guards >= 5, f"only {guards} guard assert(s)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_hidden_in_the_book_are_collapsed_in_jupyterlab(path):
    # Glue calls and guards are bookkeeping: hidden in the rendered book (remove-cell)
    # and folded in JupyterLab (tools/run_notebooks.py sets the metadata).
    for i, cell in enumerate(code_cells(load(path))):
        if "remove-cell" in cell["metadata"].get("tags", []):
            assert cell["metadata"].get("jupyter") == {"source_hidden": True, "outputs_hidden": True}, i


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_glue_calls_live_in_hidden_cells(path):
    for i, cell in enumerate(code_cells(load(path))):
        if "book.glue(" in "".join(cell["source"]):
            assert "remove-cell" in cell["metadata"].get("tags", []), f"code cell {i} glues in view"
