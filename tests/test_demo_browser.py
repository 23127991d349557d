"""The demo page the way a person uses it: ``python app/demo.py`` on 127.0.0.1, opened in headless
Chromium (Debian's, driven by Playwright: no browser download), both buttons pressed with the
defaults (a few steps, to keep it short). It skips where Chromium or Playwright is absent, except
under CI (``CI=true``), where that is a failure: ``.ci/run`` installs both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FEW_STEPS = "4"
START_TIMEOUT_S = 180
RUN_TIMEOUT_MS = 240_000
#: True once a summary is filled in, or Gradio shows an error (a toast for ``gr.Error``, an output's
#: status "Error" for any other exception): the wait is over.
_DONE = """([summary]) => document.querySelector(summary).value !== ''
    || document.querySelector('.toast-body.error, [data-testid="status-tracker"] .error') !== null"""


def _require(available: bool, reason: str) -> None:
    """Skip without ``available`` locally; under CI (``CI=true``) a missing tool is a failure."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run must install it)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the demo did not serve {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def playwright_api() -> Any:
    """Playwright's ``sync_playwright``, once Chromium, Playwright and Gradio are known to be there."""
    _require(CHROMIUM.is_file(), f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)")
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        _require(False, f"{err.name} is not installed (pip install -e '.[dev]'; Playwright needs no browser download)")
    return sync_playwright


@pytest.fixture
def demo_url(tmp_path):
    """``python app/demo.py --port <free port>``, serving (its output in ``tmp_path/demo.log``); stopped afterwards."""
    port, log = _free_port(), tmp_path / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "app" / "demo.py"), "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _press(page: Any, button: str, steps_slider: int) -> None:
    steps = page.get_by_label("number input for steps").nth(steps_slider)
    steps.fill(FEW_STEPS)
    steps.press("Enter")
    page.get_by_role("button", name=button, exact=True).click()


def _shown(page: Any, output: str) -> tuple[str, int]:
    """The displayed image's address and natural width, once it has loaded."""
    image = page.locator(f"#{output} img")
    image.wait_for()
    page.wait_for_function("([id]) => document.querySelector(`#${id} img`).complete", arg=[output])
    return image.get_attribute("src"), image.evaluate("e => e.naturalWidth")


def test_both_buttons_with_the_defaults_show_images_clips_and_verdicts(tmp_path, playwright_api, demo_url):
    with playwright_api() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(demo_url, wait_until="networkidle")
            _press(page, "generate", 0)
            _press(page, "generate clip", 1)
            for summary in ("#image-summary textarea", "#clip-summary textarea"):
                page.wait_for_function(_DONE, arg=[summary], timeout=RUN_TIMEOUT_MS)
            log = (tmp_path / "demo.log").read_text()[-3000:]
            assert page.locator(".toast-body.error").all_inner_texts() == [], f"the page shows an error:\n{log}"
            assert page.get_by_text("Error", exact=True).count() == 0, f"an output shows Error:\n{log}"
            for summary in ("#image-summary textarea", "#clip-summary textarea"):
                text = page.locator(summary).input_value()
                assert "ShapeWorld verifier: untouched score " in text and "; diffaccel score " in text, text
                assert "native size 64x64, shown enlarged 4x" in text, text
            for output in ("image-untouched", "image-diffaccel", "clip-untouched", "clip-diffaccel"):
                src, width = _shown(page, output)
                assert width == 256, (output, src, width)
                assert src.endswith(".gif") == output.startswith("clip"), (output, src)
        finally:
            browser.close()
