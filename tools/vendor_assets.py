"""Stage the JavaScript the built book ships locally, so that it needs no network.

Jupyter Book loads MathJax and the ipywidgets HTML manager (with RequireJS) from
CDNs by default. This book instead ships the pinned npm packages (package.json,
package-lock.json), installed into node_modules/ by `npm ci`. This module copies
just the files the pages load into _build/assets/ (mostly vendor/), together with
book/js/widgets-setup.js (our own small shim, see its comments). `_config.yml` lists
_build/assets in `html_extra_path`, so Sphinx copies them into _build/html/,
and points `mathjax_path` and `nb_ipywidgets_js` there.

It is a Sphinx extension (listed in `_config.yml`): every book build, `make book` or a
plain `jupyter-book build .`, stages the files at its start, before Sphinx looks for
`html_extra_path`. Without node_modules/ (or with one that does not match
package-lock.json) it runs `npm ci` (the pinned versions, as `make book` does) when Node.js
is installed; otherwise the build stops with a message saying to install Node.js and run
`npm ci`, instead of producing pages whose sliders and math stay blank.

The files are deliberately not under _static/: Jupyter Book adds every .js file found
there to every page.

Usage as a script (from the repository root): python tools/vendor_assets.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "node_modules"
ASSETS = ROOT / "_build" / "assets"
DEST = ASSETS / "vendor"
# The widget manager's stylesheet asks for its icon fonts at a path relative to the page,
# "@jupyter-widgets/html-manager/dist/<hash>.woff2"; every page with widgets is in notebooks/.
FONT_DEST = ASSETS / "notebooks" / "@jupyter-widgets" / "html-manager" / "dist"

# (source under node_modules, destination under vendor/); directories are copied whole.
FILES = [
    ("requirejs/require.js", "require.js"),
    ("@jupyter-widgets/html-manager/dist/embed-amd.js", "html-manager/embed-amd.js"),
    ("mathjax/es5/tex-mml-chtml.js", "mathjax/tex-mml-chtml.js"),
    ("mathjax/es5/output/chtml/fonts/woff-v2", "mathjax/output/chtml/fonts/woff-v2"),
    ("mathjax/es5/input/tex/extensions", "mathjax/input/tex/extensions"),
    ("mathjax/es5/ui", "mathjax/ui"),
    ("mathjax/es5/a11y", "mathjax/a11y"),
    ("mathjax/es5/sre", "mathjax/sre"),
]
# The widget manager's icon fonts sit next to embed-amd.js with hashed names; browsers use the
# first of these formats they support.
FONT_SUFFIXES = {".woff2", ".woff", ".ttf"}
NPM_CI = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
HOW_TO_FIX = "Install Node.js, then run `npm ci` in the repository root (or simply `make book`)."


class AssetsError(RuntimeError):
    """node_modules/ is missing, incomplete or does not match package-lock.json."""


def node_modules_problem(root: Path = ROOT) -> str | None:
    """What is wrong with root/node_modules/ (None: it holds what package-lock.json pins)."""
    node_modules = root / "node_modules"
    if not node_modules.is_dir():
        return "the book's JavaScript is not installed (no node_modules/)"
    locked = json.loads((root / "package-lock.json").read_text())["packages"]
    wanted = json.loads((root / "package.json").read_text())["dependencies"]
    wrong = []
    for name in wanted:
        manifest = node_modules / name / "package.json"
        have = json.loads(manifest.read_text())["version"] if manifest.exists() else "missing"
        pinned = locked[f"node_modules/{name}"]["version"]
        if have != pinned:
            wrong.append(f"{name} {have} (package-lock.json pins {pinned})")
    wrong += [f"{src} missing" for src, _ in FILES if not (node_modules / src).exists()]
    return f"node_modules/ does not match package-lock.json: {', '.join(wrong)}" if wrong else None


def check_node_modules(root: Path = ROOT) -> None:
    """Raise AssetsError unless node_modules/ holds the versions package-lock.json pins."""
    problem = node_modules_problem(root)
    if problem:
        raise AssetsError(f"{problem}. {HOW_TO_FIX}")


def install_node_modules(root: Path = ROOT, log=print) -> None:
    """Make node_modules/ what package-lock.json pins, running `npm ci` if it is not."""
    problem = node_modules_problem(root)
    if problem is None:
        return
    if shutil.which("npm") is None:
        raise AssetsError(f"{problem}, and there is no `npm` to install it. {HOW_TO_FIX}")
    log(f"vendor_assets: {problem}; running `{' '.join(NPM_CI)}`")
    run = subprocess.run(NPM_CI, cwd=root, capture_output=True, text=True)
    if run.returncode != 0:
        output = (run.stdout + run.stderr)[-2000:]
        raise AssetsError(f"{problem}, and `{' '.join(NPM_CI)}` failed:\n{output}\n{HOW_TO_FIX}")
    check_node_modules(root)


def stage(root: Path = ROOT) -> int:
    """Copy the pinned JavaScript into root/_build/assets; return the bytes staged."""
    check_node_modules(root)
    node_modules, assets = root / "node_modules", root / ASSETS.relative_to(ROOT)
    dest, font_dest = assets / DEST.relative_to(ASSETS), assets / FONT_DEST.relative_to(ASSETS)
    if assets.exists():
        shutil.rmtree(assets)
    for src, dst in FILES:
        source, target = node_modules / src, dest / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    shutil.copy2(root / "book" / "js" / "widgets-setup.js", dest / "widgets-setup.js")  # ours, not npm's
    fonts = node_modules / "@jupyter-widgets/html-manager/dist"
    font_dest.mkdir(parents=True)
    for font in fonts.iterdir():
        if font.suffix in FONT_SUFFIXES:
            shutil.copy2(font, font_dest / font.name)
    return sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())


def _stage_for_sphinx(app, config) -> None:
    from sphinx.errors import ConfigError
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    root = Path(app.confdir)
    try:
        install_node_modules(root, log=logger.info)
        size = stage(root)
    except AssetsError as err:
        raise ConfigError(f"vendor_assets: {err}") from None
    logger.info(
        f"vendor_assets: staged {size / 1e6:.1f} MB of pinned JavaScript and fonts in _build/assets"
    )


def setup(app):
    """Sphinx entry point: stage the assets when the configuration is read.

    Priority 100 runs before Sphinx's own check (priority 800) that every
    html_extra_path entry exists.
    """
    app.connect("config-inited", _stage_for_sphinx, priority=100)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


def main() -> int:
    try:
        install_node_modules()
        size = stage()
    except AssetsError as err:
        print(f"vendor_assets: {err}", file=sys.stderr)
        return 1
    print(f"vendor_assets: staged {size / 1e6:.1f} MB of JavaScript and fonts in {ASSETS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
