"""The page in a real browser: `crossmodal ui` in a subprocess, driven by Playwright with system Chromium.

Checks what AppTest cannot: the server starts from the CLI, thumbnails are really served and decode in
the browser (and are small), and a file dropped on the real uploader gets captions and similar images.
Screenshots land in the test's tmp_path.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.helpers import free_port, jpeg_bytes, start_cli

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason="needs system Chromium at /usr/bin/chromium (apt-get install chromium)")]

START_TIMEOUT = 120
UI_TIMEOUT_MS = 90_000
THUMBS_JS = """(want) => {
  const imgs = [...document.querySelectorAll('[data-testid="stMain"] [data-testid="stImage"] img')];
  return imgs.length >= want && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""
SIZES_JS = """() => [...document.querySelectorAll('[data-testid="stMain"] [data-testid="stImage"] img')]
  .map(i => [i.naturalWidth, i.naturalHeight])"""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the CLI and the Streamlit server it started (one process group), however the test went."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(webui_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("webui-server") / "server.log"
    with open(log_path, "wb") as log:
        proc = start_cli("ui", "--port", str(port), "--host", "127.0.0.1", home=webui_home, stdout=log,
                         stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`crossmodal ui` exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`crossmodal ui` did not answer within {START_TIMEOUT}s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


@pytest.mark.subprocess
def test_search_detail_and_upload_in_a_browser(server: str, browser, webui_photos: Path, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(server)

    box = page.get_by_placeholder("a dog running on a beach")
    box.fill("red circles")
    box.press("Enter")
    page.get_by_text("10 results, no more.").wait_for()  # the whole index fits on the first page
    page.wait_for_function(THUMBS_JS, arg=10)
    sizes = page.evaluate(SIZES_JS)
    assert len(sizes) == 10 and all(0 < max(w, h) <= 256 for w, h in sizes), sizes
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

    main = page.get_by_test_id("stMain")
    shown = main.get_by_role("button", name="Open", exact=True).count()  # the rest: under "Show N weaker..."
    folded = main.get_by_text(re.compile(r"^Show \d+ weaker match"))
    hidden = int(re.search(r"\d+", folded.inner_text()).group()) if folded.count() else 0
    assert shown >= 1 and shown + hidden == 10, (shown, hidden)
    main.get_by_role("button", name="Open", exact=True).first.click()
    page.get_by_text("More like this").wait_for()
    main.get_by_test_id("stCode").get_by_text(str(webui_photos)).wait_for()  # the file's path
    page.wait_for_function(THUMBS_JS, arg=2)
    page.screenshot(path=str(tmp_path / "detail.png"), full_page=True)
    main.get_by_role("button", name="← Back to results").click()
    page.get_by_text("#1 ·").first.wait_for()  # (#10 may be folded under the weaker matches)

    page.get_by_text("Image", exact=True).click()
    good = tmp_path / "query.jpg"
    good.write_bytes(jpeg_bytes(5))
    page.locator('input[type="file"]').set_input_files(str(good))
    page.get_by_text("Most similar images").wait_for()
    page.get_by_text("shapes and colours").first.wait_for()
    page.wait_for_function(THUMBS_JS, arg=11)  # the upload's preview + 10 similar images
    assert page.get_by_text("shapes and colours").count() == 5
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)

    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image at all\n")
    page.locator('input[type="file"]').set_input_files(str(bad))
    page.get_by_text("'notes.jpg' is not an image crossmodal can read").wait_for()
    page.get_by_text("Most similar images").wait_for(state="detached")  # no results for a bad upload
    assert page.get_by_text("Traceback").count() == 0
    page.screenshot(path=str(tmp_path / "bad-upload.png"), full_page=True)
    page.close()
