"""One visitor uploads a Teachable Machine export on the Model page: seconds to the architecture.

    .venv/bin/python bench/tm_upload.py [--visitors 2]

Starts ``streamlit run app.py`` on a free loopback port with its own RETRAIN_HOME and the
default warm model worker, waits until the worker is warm (TensorFlow imported), then, in
Debian's headless Chromium, for each visitor (a new browser context = a new session): opens
the Model page, picks "Upload", sets ``keras_model.h5`` + ``labels.txt`` of
``../shared/models/teachable_machine_water`` on the real file input, and times until the
layer-stack chart is drawn. The first visitor's model is converted in the worker; the next
ones get the answer from the cache (same file content). Also reports the server's RSS and
whether it has an ML framework mapped. Writes ``bench/results/tm_upload.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser_helpers import (  # noqa: E402
    go_to,
    launch_chromium,
    ml_libraries_loaded,
    rss_mb,
    start_app,
    stop_app,
    wait_idle,
    widget,
)

TM = ROOT.parent / "shared" / "models" / "teachable_machine_water"
RESULTS = ROOT / "bench" / "results"


def wait_for_warm_worker(home: Path, timeout: float = 180.0) -> float:
    """Seconds until a model worker of ``home`` says it is warm."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for record in (home / "service" / "workers").glob("*.json"):
            if "ready" in json.loads(record.read_text() or "{}"):
                return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError("no model worker became warm")


def upload_and_time(browser, url: str) -> float:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(url)
        wait_idle(page)
        go_to(page, "2 · Model")
        widget(page, "model_source").get_by_text(re.compile(r"Upload")).first.click()
        wait_idle(page)
        files = page.locator('.st-key-model_upload [data-testid="stFileUploaderDropzoneInput"]')
        t0 = time.monotonic()
        files.set_input_files([str(TM / "keras_model.h5"), str(TM / "labels.txt")])
        page.locator('.st-key-layer_stack [data-testid="stHtml"] .rs-row').first.wait_for()
        return time.monotonic() - t0
    finally:
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, default=2)
    args = parser.parse_args()
    if not (TM / "keras_model.h5").is_file():
        print(f"{TM} is not present; nothing to measure.")
        return 2
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="tm-upload-"))
    proc, url = start_app(home, home / "server.log")
    result: dict = {"visitors": []}
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page()
            page.goto(url)  # the first page view starts the model worker
            wait_idle(page)
            page.close()
            result["worker_warm_s"] = round(wait_for_warm_worker(home), 1)
            for i in range(args.visitors):
                seconds = upload_and_time(browser, url)
                result["visitors"].append(round(seconds, 2))
                print(f"visitor {i + 1}: upload -> architecture drawn in {seconds:.1f} s")
            browser.close()
        result["server_rss_mb"] = round(rss_mb(proc.pid), 0)
        result["server_ml_libraries"] = ml_libraries_loaded(proc.pid)
    finally:
        stop_app(proc)
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tm_upload.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
