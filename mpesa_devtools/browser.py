"""A real browser for `make screenshots` and the tests: Debian's headless Chromium, driven
by selenium (a test requirement) through Debian's chromedriver.

Owns where they live, the flags this machine needs (headless, no sandbox, none of
Chromium's own traffic), `missing()` (why none can start here), `start_browser()` (a
WebDriver on a fresh profile, removed again by `quit()`) and explicit, generous waits
(`wait()`, `element()`). The tests' fixtures, with their
skip-or-fail rule, are in tests/browser.py.
"""

import logging
import os
import shutil
import subprocess
import tempfile
from importlib.util import find_spec

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30
# Headless, no sandbox (root in a container), and none of Chromium's own traffic: this
# network refuses its connections to Google (many at once, each a delay and a log line).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--no-proxy-server")


class _NotWebDriver(logging.Filter):
    """Drops urllib3's lines about requests to chromedriver (`/session/<32 hex>/...`): the
    WebDriver protocol's chatter, whose session id the suite's log check takes for a
    callback signature. Every other urllib3 line is kept (and checked)."""

    def filter(self, record):
        return "/session" not in str(record.args)


def _quiet_webdriver_logs():
    """Selenium logs each WebDriver command and answer at DEBUG (page sources, typed keys,
    session ids): none of it is the gateway's log, which the suite checks."""
    logging.getLogger("selenium").setLevel(logging.WARNING)
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _NotWebDriver) for f in pool.filters):
        pool.addFilter(_NotWebDriver())


def missing():
    """Why no browser can be started here (None: it can)."""
    if find_spec("selenium") is None:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install {package})"
    return None


def start_browser(width=1280, height=900, javascript=True):
    """A Chrome WebDriver on headless Chromium, its window `width` x `height`, on a
    profile of its own in a temporary folder (`javascript=False`: pages run none);
    `quit()` ends it and removes the folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _quiet_webdriver_logs()
    profile = tempfile.mkdtemp(prefix="mpesa-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    if not javascript:  # as a customer whose phone browser runs none
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    service = Service(CHROMEDRIVER, log_output=subprocess.DEVNULL)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    quit_driver = driver.quit

    def quit():
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit
    driver.set_page_load_timeout(WAIT_S * 2)
    driver.set_script_timeout(WAIT_S)
    driver.set_window_size(width, height)
    return driver


def wait(driver, timeout=WAIT_S):
    """WebDriverWait with the suite's deadline: `wait(driver).until(condition)`."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout)


def element(driver, css, timeout=WAIT_S):
    """The element `css` selects, once the page has one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return wait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
