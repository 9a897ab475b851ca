"""Headless Chromium for tests: a page is opened, read and photographed as a person would see it.

Use::

    from tests.browser import chromium, screenshot, colour_pixels

    with chromium(tmp_path) as driver:      # skips the test, saying why, where there is no browser
        driver.get(url)
        screenshot(driver, tmp_path / "page.png")

Needs selenium (requirements.txt), Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``
installs them where it can); :func:`unavailable` says what is missing, and :func:`chromium` skips the
test with that reason. Nothing is downloaded: the driver is the system's ``/usr/bin/chromedriver``
(selenium's own driver manager, which would fetch one, is never asked).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
WINDOW = (1400, 2000)


def chromium_binary() -> str | None:
    """The system's Chromium, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable() -> str | None:
    """Why a headless browser cannot be had here, or None if it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    if chromium_binary() is None:
        return "no chromium on PATH (make browser-deps installs Debian's chromium)"
    if not Path(CHROMEDRIVER).exists():
        return f"no {CHROMEDRIVER} (make browser-deps installs Debian's chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(tmp_path: Path, width: int = WINDOW[0], height: int = WINDOW[1], timeout: float = 30.0) -> Iterator[Any]:
    """A selenium webdriver for a headless Chromium with its own profile under ``tmp_path``; the
    browser and its driver are ended on exit. Skips the test (``pytest.skip``) with one clear reason
    when selenium, chromium or chromedriver is missing or the browser does not start. Pages get
    ``timeout`` s to load; the browser's console is kept (``driver.get_log("browser")``)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium_binary()
    profile = tmp_path / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container: Chromium's sandbox needs namespaces it may not get
        "--disable-dev-shm-usage",  # a small /dev/shm would crash the renderer
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",  # nothing but the page under test goes out
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",  # one CSS pixel is one screenshot pixel
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as e:
        first = (e.msg or str(e)).strip().splitlines()[0] if (e.msg or str(e)).strip() else type(e).__name__
        pytest.skip(f"headless chromium did not start: {first}")
    try:
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        yield driver
    finally:
        driver.quit()  # ends the browser and the chromedriver process it started


def screenshot(driver: Any, path: Path, width: int | None = None) -> Path:
    """Save a full-page PNG of the current page to ``path``: the window is first made as tall as
    the document, so nothing below the fold is cut off."""
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight, 200);"
    )
    size = driver.get_window_size()
    driver.set_window_size(width or size["width"], int(height) + 120)  # room for the browser's own frame
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def wait_until(driver: Any, condition: Callable[[Any], Any], timeout: float = 15.0, what: str = "the page") -> Any:
    """Poll ``condition(driver)`` until it returns something truthy (returned), or fail saying ``what``."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except Exception as e:  # selenium's TimeoutException says nothing of what was awaited
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from e


def element_image(element: Any) -> Any:
    """A Pillow RGB image of one element as drawn on the page (scrolled into view first)."""
    from PIL import Image

    element.parent.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    time.sleep(0.05)
    return Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")


def colour_pixels(image: Any, min_saturation: int = 60, max_white: int = 245) -> int:
    """How many pixels of ``image`` are coloured: neither white, black nor a grey (the spread between
    a pixel's largest and smallest channel is at least ``min_saturation``). A chart's axes, text and
    grid are greys; its plotted series are the coloured pixels."""
    data = image.convert("RGB").tobytes()
    count = 0
    for i in range(0, len(data), 3):
        r, g, b = data[i], data[i + 1], data[i + 2]
        if min(r, g, b) <= max_white and max(r, g, b) - min(r, g, b) >= min_saturation:
            count += 1
    return count


def console_errors(driver: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """The browser console's messages at SEVERE level (script errors, blocked content, failed
    loads) since the last call, less those containing any of ``ignore``."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry.get("level") == "SEVERE" and not any(text in entry["message"] for text in ignore)
    ]
