"""The browser fixtures of the tests: mpesa_devtools.browser's headless Chromium, skipped
with the reason when it is missing locally and a failure under CI (`.ci/run` installs
it); explicit, generous waits (`wait()`, `WAIT_S`): CI is a loaded 2-core box; nothing
here sleeps.
"""

import os

from mpesa_devtools.browser import WAIT_S, element, missing, start_browser, wait

__all__ = ["WAIT_S", "browser_session", "cookie_header", "element", "missing",
           "require_browser", "start_browser", "wait"]


def require_browser():
    """Skip without a browser, locally; under CI a missing browser is a failure."""
    import pytest

    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)", pytrace=False)
    pytest.skip(reason)


def browser_session(width=1280, height=900, javascript=True):
    """A fixture's body: `yield from browser_session()` gives a started browser (or skips,
    or fails under CI) and quits it after."""
    require_browser()
    driver = start_browser(width, height, javascript)
    try:
        yield driver
    finally:
        driver.quit()


def cookie_header(driver):
    """The cookies the browser would send with the current page's URL, as a Cookie header
    (to fetch with urllib what the signed-in browser would, e.g. a download)."""
    return "; ".join(f"{c['name']}={c['value']}" for c in driver.get_cookies())
