"""Headless Chromium for the browser tests: Debian's chromium + chromium-driver through selenium.

`require_chromium()` fails under CI (where `make test` installs both) and skips elsewhere when
they are missing; `headless_chromium(profile_dir, size)` starts one with the flags this machine
needs (no sandbox as root, no GPU, no background or update traffic) and a fresh profile.
"""

import os
import shutil

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def require_chromium() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    if os.environ.get("CI"):
        pytest.fail("chromium and chromedriver are required under CI (make test installs them)", pytrace=False)
    pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")


def headless_chromium(profile_dir, size: str):
    """A selenium Chrome driver on Debian's Chromium; `size` like '1200,1600'. Quit it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={size}", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
