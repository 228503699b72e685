"""Headless Chromium for the browser tests: Debian's chromium + chromium-driver through selenium.

`require_chromium()` fails under CI (where `make test` installs both) and skips elsewhere when
they are missing; `headless_chromium(profile_dir, size)` starts one with the flags this machine
needs (no sandbox as root, no GPU, no background or update traffic) and a fresh profile.
`serve_counting(directory)` serves a site on 127.0.0.1 and counts the bytes of each file sent
(tests/test_site_scale.py, bench/site_scale.py).
"""

import http.server
import os
import shutil
import threading

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


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory, uncached, and records (file, bytes) of every response body it sends."""

    sent: list[tuple[str, int]] = []
    lock = threading.Lock()

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")  # every view pays for what it loads
        super().end_headers()

    def copyfile(self, source, outputfile):
        data = source.read()
        outputfile.write(data)
        with self.lock:
            self.sent.append((self.path.split("?")[0].lstrip("/"), len(data)))

    def log_message(self, *args):
        pass


def take_sent() -> list[tuple[str, int]]:
    """The (file, bytes) sent since the last call."""
    with CountingHandler.lock:
        sent, CountingHandler.sent[:] = list(CountingHandler.sent), []
    return sent


def serve_counting(directory) -> http.server.ThreadingHTTPServer:
    """A started server for `directory` on a free port; call shutdown() and server_close() when done."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: CountingHandler(*a, directory=str(directory), **k))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
