"""The feature browser at scale: Chromium times and bytes of each view, and site generation speed.

Writes a synthetic site of `--features` features (default 100,000; documents from
`sae_assets.core.features.site_synthetic`, files by `write_site_files`, the code the
feature_site asset runs) into a temporary directory, serves it uncached from 127.0.0.1 with a
handler that counts the bytes it sends (tests/browser.py), and times in headless Chromium,
median of `--repeats` fresh loads: first paint of the list, a token search (a different token
each time, so nothing is cached in the page; the time includes the search box's 0.15 s typing
debounce) and opening a feature page. Prints each with the bytes it loaded, the largest of
those over the 2 MB budget, and as the last line the seconds of writing the site per 1,000
features (goal <= 1; the time spent synthesizing documents is measured apart and left out),
after the same in CPU seconds of this process, steadier on a shared machine.
The site goes to /dev/shm by default (`--dir`): on a busy shared disk creating and deleting
100,000 files costs minutes that say nothing about the site's code.

    .venv/bin/python bench/site_scale.py [--features 100000] [--repeats 3] [--dir /dev/shm] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common

sys.path.insert(0, str(_common.REPO_ROOT / "tests"))  # Chromium and the counting server live with the tests

BUDGET = 2_000_000


def write_site(directory: Path, n_features: int) -> tuple[float, float, float]:
    """(wall seconds writing the site, CPU seconds of that, wall seconds synthesizing documents), one pass.

    Synthesis happens inside the iterator the writer pulls from, so its time is taken apart there."""
    from sae_assets.core.features.site_synthetic import synthetic_ranges
    from sae_assets.defs.site_files import write_site_files

    synth_wall = synth_cpu = 0.0

    def ranges():
        nonlocal synth_wall, synth_cpu
        parts = synthetic_ranges(n_features)
        while True:
            wall, cpu = time.perf_counter(), time.process_time()
            part = next(parts, None)
            synth_wall += time.perf_counter() - wall
            synth_cpu += time.process_time() - cpu
            if part is None:
                return
            yield part

    cpu = time.process_time()
    wall, _ = _common.timed(lambda: write_site_files(lambda name: directory / name, ranges(), dictionary="bench"))
    return wall - synth_wall, time.process_time() - cpu - synth_cpu, synth_wall


def site_summary(directory: Path) -> str:
    groups: dict[str, list[int]] = {}
    for path in directory.iterdir():
        kind = path.name.rsplit("-", 1)[0] if path.name[-4:-3].isdigit() else path.name
        groups.setdefault(kind, []).append(path.stat().st_size)
    return ", ".join(f"{kind} {len(s)} files {sum(s) / 1e6:.2f} MB" for kind, s in sorted(groups.items())
                     if kind in ("feature", "index", "by-density", "by-max", "tokens", "search"))


def measure_views(url: str, keys: list[str], features: list[int], repeats: int, profile: str) -> dict[str, tuple]:
    """{view: (median seconds, largest bytes)} over `repeats` fresh page loads."""
    from browser import headless_chromium, take_sent
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(profile, "1200,1600")
    views = ("first_paint", "token_search", "feature_page")
    seen: dict[str, tuple[list[float], list[int]]] = {v: ([], []) for v in views}

    def until(view: str, act, loaded: str) -> None:
        take_sent()
        started = time.perf_counter()
        act()
        WebDriverWait(driver, 60, poll_frequency=0.005).until(
            lambda d: d.execute_script("return document.body.getAttribute('data-loaded')") == loaded)
        seen[view][0].append(time.perf_counter() - started)
        seen[view][1].append(sum(n for _, n in take_sent()))

    try:
        for r in range(repeats):
            driver.get("about:blank")
            until("first_paint", lambda: driver.get(url), "list")
            box = driver.find_element(By.ID, "search")
            until("token_search", lambda: box.send_keys(keys[r]), "search")
            until("feature_page", lambda: driver.execute_script(f"location.hash = 'feature={features[r]}'"),
                  str(features[r]))
    finally:
        driver.quit()
    return {view: (_common.median(s), max(b)) for view, (s, b) in seen.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the site's directory and print it")
    shm = Path("/dev/shm")
    parser.add_argument("--dir", default=str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None,
                        help="where to write the site (default: /dev/shm where there is one, else the temp dir); "
                        "generation is mostly creating files, so its time follows this file system")
    args = parser.parse_args()
    from browser import serve_counting

    tmp = Path(tempfile.mkdtemp(prefix="site-scale-", dir=args.dir))
    try:
        site = tmp / "site"
        site.mkdir()
        write_s, write_cpu_s, synth_s = write_site(site, args.features)
        print(f"site: {args.features} features under {tmp}; {site_summary(site)}")
        keys = [f"w{100 + 37 * r}" for r in range(args.repeats)]  # ranks ~300: tens of matches at 100k
        features = [args.features // 2 + 7 * r for r in range(args.repeats)]
        server = serve_counting(site)
        try:
            views = measure_views(f"http://127.0.0.1:{server.server_address[1]}/index.html", keys, features,
                                  args.repeats, str(tmp / "profile"))
        finally:
            server.shutdown()
            server.server_close()
        for view, (seconds, loaded) in views.items():
            print(f"{view}_s: {seconds:.3f}  bytes: {loaded}")
        print(f"largest_view_bytes_vs_2MB_budget: {max(b for _, b in views.values()) / BUDGET:.4f}")
        print(f"site_generation_s: {write_s:.2f} (synthesizing the documents took {synth_s:.2f} s, not counted)")
        print(f"site_generation_cpu_s_per_1000_features: {write_cpu_s / args.features * 1000:.4f}")
        print(f"site_generation_s_per_1000_features: {write_s / args.features * 1000:.4f}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
