"""Execute the chapter notebooks top to bottom, each in one fresh kernel, and store their outputs.

This is how the committed outputs are made (`make notebooks`); `pytest --nbval`
then proves they are current. Widget state is stored too, so that the rendered
book can show the widgets without a kernel. Execution timestamps are not
recorded, so re-running an unchanged notebook gives an unchanged file, and a cell's
consecutive writes to stdout are stored as one output (one printout, one box).

Usage:
    python tools/run_notebooks.py                 # every notebook in notebooks/
    python tools/run_notebooks.py notebooks/02_scaled_zero_init.ipynb
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def collapse_hidden_cells(nb: nbformat.NotebookNode) -> None:
    """Collapse, in JupyterLab too, the cells the rendered book hides.

    Cells tagged ``remove-cell`` (glue calls and guard assertions) are left out
    of the rendered pages by Jupyter Book; this metadata folds their source and
    outputs in JupyterLab and Notebook 7 as well, so a reader running the chapter
    sees the same story.
    """
    for cell in nb.cells:
        if cell.cell_type == "code" and "remove-cell" in cell.metadata.get("tags", []):
            cell.metadata["jupyter"] = {"source_hidden": True, "outputs_hidden": True}


def run(path: Path, timeout: int = 600) -> float:
    """Execute one notebook in place; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    collapse_hidden_cells(nb)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        store_widget_state=True,
        # One printout, one output: a cell's consecutive writes to stdout are stored as one
        # stream output, not one per flush (nbval coalesces streams before comparing too).
        coalesce_streams=True,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    total = 0.0
    for path in paths:
        elapsed = run(path.resolve())
        total += elapsed
        print(f"{path.name}: executed in {elapsed:.1f} s", flush=True)
    print(f"all {len(paths)} notebook(s): {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
