"""The ecosystem's own commands, run the way a reader runs them in a fresh clone.

A reader who has done only `pip install -r requirements.txt` has no built book and no
node_modules/. There `pytest --nbval` must pass, reporting the browser tests as skipped
(with how to run them); it runs here in a temporary copy of the checkout without _build/
and node_modules/, on the browser tests and one small chapter (the whole suite would cost
minutes, and `make test` runs it anyway). And `jupyter-book build .` must stop with a
message saying to run `npm ci` rather than build pages whose sliders stay blank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_CHAPTER = "notebooks/01_naive_lora.ipynb"
NOT_IN_A_FRESH_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "_build", "node_modules", "*.egg-info", "__pycache__", ".pytest_cache",
    ".ipynb_checkpoints",
)

sys.path.insert(0, str(ROOT / "tools"))
import vendor_assets  # noqa: E402  (tools/ is not a package)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """A copy of the checkout as a reader's clone has it: no built book, no node_modules/."""
    clone = tmp_path_factory.mktemp("clone") / "lora-from-scratch"
    shutil.copytree(ROOT, clone, ignore=NOT_IN_A_FRESH_CLONE)
    return clone


def reader_env() -> dict[str, str]:
    """The environment of a reader's shell: nothing `make test` sets."""
    env = dict(os.environ)
    env.pop("LORA_BOOK_TESTS", None)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_plain_pytest_passes_and_skips_the_browser_tests(fresh_clone):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "-v", "-rs", "tests/browser", SMALL_CHAPTER],
        cwd=fresh_clone, env=reader_env(), capture_output=True, text=True, timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    summary = out.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert passed >= 5, "the chapter's cells ran under nbval"
    # Every browser test (and nothing else) is skipped, and says how to run it.
    results = re.findall(r"^(tests/browser/\S+) (PASSED|FAILED|ERROR|SKIPPED)", out, re.MULTILINE)
    assert len(results) >= 40 and {status for _, status in results} == {"SKIPPED"}
    assert skipped == len(results)
    assert f"{skipped} browser tests skipped: they need the built book (_build/html)" in out
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED [")]
    assert reasons and all("run `make test`" in line for line in reasons)


def test_required_browser_tests_fail_without_the_book(fresh_clone):
    """What `make test` and CI set: a missing book is an error, never a skip."""
    env = reader_env() | {"LORA_BOOK_TESTS": "require"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:nbval", "-o", "addopts=", "-x", "-q",
         "tests/browser/test_rendered_book.py::test_every_built_page_is_checked"],
        cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "the book is not built: run `make book` first" in run.stdout
    assert "skipped" not in run.stdout.splitlines()[-1]


def test_book_build_without_node_modules_or_npm_stops_and_says_to_run_npm_ci(tmp_path, monkeypatch):
    """The vendor_assets extension, as `jupyter-book build .` calls it at the start of a build.

    With Node.js installed it runs `npm ci` itself (the lock file's versions); without, it
    stops the build. (A whole plain build, which `make book` is, proves the extension is
    listed in _config.yml: without it the browser tests find no JavaScript.)
    """
    from sphinx.errors import ConfigError

    for name in ("package.json", "package-lock.json"):
        shutil.copy2(ROOT / name, tmp_path / name)
    monkeypatch.setenv("PATH", str(tmp_path / "no-node-here"))
    with pytest.raises(ConfigError, match=r"no node_modules.*no `npm`.*Install Node.js.*`npm ci`.*`make book`"):
        vendor_assets._stage_for_sphinx(SimpleNamespace(confdir=str(tmp_path)), config=None)
    assert not (tmp_path / "_build").exists(), "nothing staged"


def test_node_modules_that_do_not_match_the_lock_file_are_refused(tmp_path):
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(ROOT / name, tmp_path / name)
    locked = json.loads((ROOT / "package-lock.json").read_text())["packages"]
    for name in json.loads((ROOT / "package.json").read_text())["dependencies"]:
        manifest = tmp_path / "node_modules" / name / "package.json"
        manifest.parent.mkdir(parents=True)
        version = locked[f"node_modules/{name}"]["version"]
        manifest.write_text(json.dumps({"version": "0.0.1" if name == "mathjax" else version}))
    pinned = locked["node_modules/mathjax"]["version"]
    with pytest.raises(vendor_assets.AssetsError, match=rf"mathjax 0\.0\.1 \(package-lock.json pins {pinned}\)"):
        vendor_assets.check_node_modules(tmp_path)
    assert not (tmp_path / "_build").exists(), "nothing staged"
