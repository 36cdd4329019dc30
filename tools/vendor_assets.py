"""Stage the JavaScript the built book ships locally, so that it needs no network.

Jupyter Book loads MathJax and the ipywidgets HTML manager (with RequireJS) from
CDNs by default. `make book` installs the pinned npm packages (package.json,
package-lock.json) into node_modules/ and then runs this script, which copies
just the files the pages load into _build/assets/ (mostly vendor/), together with
book/js/widgets-setup.js (our own small shim, see its comments). `_config.yml` lists
_build/assets in `html_extra_path`, so Sphinx copies them into _build/html/,
and points `mathjax_path` and `nb_ipywidgets_js` there.

They are deliberately not under _static/: Jupyter Book adds every .js file found
there to every page.

Usage: python tools/vendor_assets.py  (from the repository root)
"""

from __future__ import annotations

import shutil
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


def main() -> int:
    missing = [src for src, _ in FILES if not (NODE_MODULES / src).exists()]
    if missing:
        print(
            "vendor_assets: missing in node_modules/: " + ", ".join(missing)
            + "\nRun `npm ci` first (or simply `make book`).",
            file=sys.stderr,
        )
        return 1
    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    for src, dst in FILES:
        source, target = NODE_MODULES / src, DEST / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    shutil.copy2(ROOT / "book" / "js" / "widgets-setup.js", DEST / "widgets-setup.js")  # ours, not npm's
    fonts = NODE_MODULES / "@jupyter-widgets/html-manager/dist"
    FONT_DEST.mkdir(parents=True)
    for font in fonts.iterdir():
        if font.suffix in FONT_SUFFIXES:
            shutil.copy2(font, FONT_DEST / font.name)
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    print(f"vendor_assets: staged {size / 1e6:.1f} MB of JavaScript and fonts in {ASSETS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
