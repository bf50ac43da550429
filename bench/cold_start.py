"""Cold start: from `streamlit run app.py` to the first page drawn in a real browser.

Starts the app on a free loopback port (the browser test's helpers), opens it in Debian's
Chromium and waits for the Dataset page's title. Reports the seconds to the health endpoint,
to the first drawn page, and whether the server process imported TensorFlow by then.

    python bench/cold_start.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser_helpers import launch_chromium, start_app, stop_app  # noqa: E402


def tensorflow_loaded(pid: int) -> bool:
    """Whether the process has TensorFlow's shared library mapped (i.e. imported it)."""
    maps = Path(f"/proc/{pid}/maps").read_text(errors="ignore")
    return "libtensorflow" in maps or "_pywrap_tensorflow" in maps


def measure_once(playwright) -> dict:
    home = Path(tempfile.mkdtemp(prefix="retrain-cold-"))
    t0 = time.perf_counter()
    proc, url = start_app(home, home / "server.log")
    healthy = time.perf_counter() - t0
    try:
        browser = launch_chromium(playwright)
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("heading", name="Dataset").wait_for(timeout=60_000)
        drawn = time.perf_counter() - t0
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        tf = tensorflow_loaded(proc.pid)
        browser.close()
    finally:
        stop_app(proc)
    return {"health_s": healthy, "first_page_s": drawn, "server_rss_mb": rss, "tensorflow": tf}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        rows = [measure_once(playwright) for _ in range(args.repeats)]
    print("| run | to health (s) | to first page (s) | server RSS (MB) | TensorFlow imported |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for i, row in enumerate(rows, 1):
        print(
            f"| {i} | {row['health_s']:.2f} | {row['first_page_s']:.2f} | "
            f"{row['server_rss_mb']:.0f} | {'yes' if row['tensorflow'] else 'no'} |"
        )
    median = statistics.median(r["first_page_s"] for r in rows)
    print(f"\nmedian time to first page: {median:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
