"""The live rank/alpha explorer in a real JupyterLab, driven through Chromium.

Starts `jupyter lab` on a free local port (no token, in a temporary directory),
opens a notebook that shows `book.rank_alpha_explorer()`, runs it, moves the rank
slider with the keyboard, and checks that the kernel retrained and the figure changed.
Like every browser test it runs under `make test` (which requires it) and is skipped by a
plain `pytest` in a checkout without the built book or Chromium (see conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
               "source": "from lora_tutorial import book\nexplorer = book.rank_alpha_explorer()\nexplorer"}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_idle_kernel(url: str, timeout: float = 60) -> None:
    """Wait until the notebook's kernel has started and is idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/kernels", timeout=2) as response:
            kernels = json.load(response)
        if kernels and all(k["execution_state"] == "idle" for k in kernels):
            time.sleep(1.0)
            return
        time.sleep(0.3)
    pytest.fail("the notebook's kernel did not become idle within 60 s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's `chromium` or set CHROMIUM")
    root = tmp_path_factory.mktemp("lab")
    (root / "explore.ipynb").write_text(json.dumps(NOTEBOOK))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("jupyter lab did not start within 60 s")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=20)


def test_live_explorer_retrains_when_the_rank_slider_moves(lab):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        outside: list[str] = []
        page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((lab, "data:", "blob:")) else None)
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(f"{lab}/lab/tree/explore.ipynb")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        wait_for_idle_kernel(lab)
        status = page.locator(".jp-OutputArea .widget-html").first
        for attempt in range(3):  # a run requested while the page is still connecting can be dropped
            page.locator(".jp-Cell .jp-InputArea-editor").first.click()
            page.keyboard.press("Control+Enter")
            try:
                status.wait_for(timeout=20_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
        image = page.locator(".jp-OutputArea img").first
        image.wait_for(timeout=30_000)
        assert "rank-8" in status.inner_text()
        before = image.get_attribute("src")

        page.locator(".jp-OutputArea .noUi-handle").first.focus()  # the rank slider
        for _ in range(4):
            page.keyboard.press("ArrowLeft")
        page.wait_for_function(
            "(el) => el.innerText.includes('rank-4')", arg=status.element_handle(), timeout=30_000)
        assert image.get_attribute("src") != before
        assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
        assert errors == []
        assert outside == [], "JupyterLab and the widget need nothing from the network"
        browser.close()
