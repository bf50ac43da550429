"""What the real-browser tests share: a `streamlit run` server, Debian's Chromium, page helpers.

Used by tests/test_browser.py and tests/test_browser_keep.py. Each test writes its screenshots,
the server's log and its notes into its own artifacts folder (see `serve_app`, `browser_page`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # CI containers often have a tiny /dev/shm
]

#: ``pytestmark`` of a browser test module.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian chromium (/usr/bin/chromium) is not installed; .ci/run installs it",
    ),
]

# --------------------------------------------------------------------------- the server

#: Where the test run keeps its one built-in starter model (set by tests/conftest.py).
SHARED_BUILTIN_ENV = "TEST_SHARED_BUILTIN_DIR"


def link_builtin(keras_home: Path) -> None:
    """Make ``keras_home/builtin`` (where `models.ensure_builtin` caches the starter model) the
    test run's shared folder, so that the first process that needs the model trains it (14 s
    on the CI host, under the folder's own file lock) and every test home, server and worker
    after it loads it. Outside a test run (the load bench) nothing is linked."""
    shared = os.environ.get(SHARED_BUILTIN_ENV)
    target = Path(keras_home) / "builtin"
    if not shared or target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(shared, target_is_directory=True)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path, log_path: Path, extra_env: dict[str, str] | None = None):
    """Start ``streamlit run app.py`` on a free loopback port; return ``(process, url)``.

    Waits for ``/_stcore/health``; raises ``RuntimeError`` with the log's tail if the server
    does not come up within 60 s.
    """
    port = free_port()
    link_builtin(Path(home) / "keras")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN_")}
    env.update(
        RETRAIN_HOME=str(home),
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        **(extra_env or {}),
    )
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "streamlit", "run", "app.py",
            "--server.headless", "true",
            "--server.port", str(port),
            "--server.address", "127.0.0.1",
            "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none",
        ],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp,
        ):
            if resp.status == 200:
                return proc, url
        time.sleep(0.2)
    stop_app(proc)
    raise RuntimeError(f"streamlit did not come up on {url}:\n{log_path.read_text()[-3000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (training workers included)."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except (ImportError, OSError):
        children = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    for child in children:
        with contextlib.suppress(OSError):
            child.kill()


def launch_chromium(playwright):
    """Debian's Chromium, headless, with nothing that reaches beyond loopback."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )


# --------------------------------------------------------------------------- page helpers


def wait_idle(page, timeout: float = 60.0) -> None:
    """Wait until the app is connected and no script run is in progress.

    Streamlit marks its root with ``data-test-script-state`` / ``data-test-connection-state``;
    a script run in progress also shows ``stStatusWidget`` (the "Running..." man). Waits for
    three consecutive quiet polls so a rerun that starts right after a widget event is seen.
    """
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        state = page.evaluate(
            """() => {
                const app = document.querySelector('[data-testid="stApp"]');
                if (!app) return 'absent';
                const running = app.getAttribute('data-test-script-state') === 'running'
                    || !!document.querySelector('[data-testid="stStatusWidget"] svg, '
                        + '[data-testid="stStatusWidgetRunningIcon"], '
                        + '[data-testid="stStatusWidgetRunningManIcon"]');
                const spinning = !!document.querySelector('[data-testid="stSpinner"]');
                const connected = app.getAttribute('data-test-connection-state');
                if (connected && connected !== 'CONNECTED') return 'disconnected';
                return running || spinning ? 'running' : 'idle';
            }"""
        )
        quiet = quiet + 1 if state == "idle" else 0
        if quiet >= 3:
            return
        page.wait_for_timeout(150)
    raise TimeoutError(f"the app did not become idle within {timeout:.0f} s")


def assert_no_exception(page) -> None:
    """Fail with the traceback text when a page shows a Streamlit exception box."""
    boxes = page.locator('[data-testid="stException"]')
    if boxes.count():
        raise AssertionError("the page shows an exception:\n" + boxes.first.inner_text()[:2000])


def main_text(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def wait_for_text(page, pattern: str, timeout: float = 60.0, where: str = "main") -> str:
    """Wait until the main area's text matches ``pattern`` (regex); return that text."""
    rx = re.compile(pattern, re.I | re.S)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        assert_no_exception(page)
        text = main_text(page) if where == "main" else page.inner_text("body")
        if rx.search(text):
            return text
        page.wait_for_timeout(250)
    raise AssertionError(
        f"no text matching {pattern!r} within {timeout:.0f} s; saw:\n{text[-1500:]}"
    )


def go_to(page, title: str) -> int:
    """Click a step in the sidebar navigation; wait until that page shows and settles.

    Returns how many clicks it took: a page switch that lands while the current page reruns
    itself (e.g. the Train page's live view when a run ends) can be swallowed by that rerun;
    the caller notes it, the test clicks once more.
    """
    link = page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title)
    heading = page.locator('[data-testid="stMain"] h1').filter(
        has_text=re.compile(re.escape(title.split("· ")[-1]), re.I)
    )
    for clicks in (1, 2):
        link.click()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not heading.count():
            page.wait_for_timeout(200)
        if heading.count():
            wait_idle(page)
            assert_no_exception(page)
            return clicks
    raise AssertionError(f"clicking '{title}' twice did not open that page:\n{main_text(page)}")


def widget(page, key: str):
    """The container of the widget created with ``key=`` (Streamlit adds ``st-key-<key>``)."""
    return page.locator(f".st-key-{key}")


def head_only_settings(page, epochs: int, batch_size: int = 8, lr: float = 0.01) -> None:
    """On the Train page: ``epochs`` head epochs of small batches at ``lr`` and no phase 2 (its
    epochs set to 0 in its lazy expander, as a person would); each field checked as taken.

    Small batches give enough steps to learn, and epochs long enough that the live chart is
    seen part-drawn.
    """
    page.get_by_text(re.compile(r"^Fine-tuning \(phase 2")).first.click()
    wait_idle(page)  # a lazy expander: the click's rerun builds its widgets
    fields = (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("fine_tune_epochs", 0))
    for key, value in fields:
        field = widget(page, key).locator("input").first
        field.fill(str(value))
        field.press("Enter")
        wait_idle(page)
        assert float(field.input_value()) == float(value), f"{key} did not take {value}"


def keyed(page, key: str, testid: str):
    """The element ``testid`` of the widget/element created with ``key=`` (on it or inside)."""
    return page.locator(
        f'.st-key-{key}[data-testid="{testid}"], .st-key-{key} [data-testid="{testid}"]'
    ).first


def plotly_traces(page, within: str = "") -> list[dict]:
    """Type, name and sizes of every trace of every Plotly chart on the page (or inside the
    CSS selector ``within``, e.g. ``.st-key-train_loss_chart``).

    Reads Plotly's ``_fullData`` (typed arrays decoded) where it exists.
    """
    return page.evaluate(
        """(within) => Array.from(document.querySelectorAll(
                within + ' [data-testid="stPlotlyChart"] .js-plotly-plot'))
            .flatMap((plot, i) => (plot._fullData || plot.data || []).map(t => ({
                chart: i,
                type: t.type || 'scatter',
                name: t.name || '',
                n: t.x && t.x.length !== undefined ? t.x.length
                    : (t.y && t.y.length !== undefined ? t.y.length : 0),
                x: t.x && t.x.length !== undefined ? Array.from(t.x).slice(0, 50) : [],
                z: t.z && t.z.length !== undefined ? t.z.length : 0,
            })))""",
        within,
    )


def max_epochs_drawn(page) -> int:
    """The epochs the Train page's loss chart shows (its longest line). Only that chart: the
    learning-rate range test's curve beside it has one point per step, not per epoch."""
    traces = plotly_traces(page, ".st-key-train_loss_chart")
    lines = [t for t in traces if t["type"] in ("scatter", "scattergl")]
    return max((t["n"] for t in lines), default=0)


def screenshot(page, folder: Path, name: str) -> Path:
    """Save the whole main area as ``folder/name.png`` (Streamlit scrolls inside it, so grow
    the viewport first)."""
    path = folder / f"{name}.png"
    height = page.evaluate(
        """() => {
            const main = document.querySelector('[data-testid="stMain"]');
            return main ? main.scrollHeight : document.body.scrollHeight;
        }"""
    )
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": max(800, min(int(height), 5000))})
    page.wait_for_timeout(300)  # let charts re-layout to the new size
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    return path


ML_LIBRARIES = (
    "libtensorflow",
    "_pywrap_tensorflow",
    "libjax",
    "jaxlib",
    "libtorch",
    "xla_extension",
)


def ml_libraries_loaded(pid: int) -> list[str]:
    """Shared libraries of an ML framework mapped into process ``pid`` (from /proc/PID/maps)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if line.split() else ""
        if any(marker in path for marker in ML_LIBRARIES):
            found.add(Path(path).name)
    return sorted(found)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def serve_app(home: Path, artifacts: Path) -> Iterator[str]:
    """Empty ``artifacts``, start the app there (``server.log``) on ``home``; yield its URL.

    The server logs each script run to ``page-times.jsonl`` there (`script_runs` reads it).

    After the test's body, the web server must not have loaded an ML framework: every model
    answer came from a model worker (`retrain.service`). Its RSS lands in ``server.txt``.
    """
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    page_log = {"RETRAIN_PAGE_LOG": str(artifacts / "page-times.jsonl")}
    proc, url = start_app(home, artifacts / "server.log", page_log)
    try:
        yield url
        loaded = ml_libraries_loaded(proc.pid)
        (artifacts / "server.txt").write_text(
            f"server pid {proc.pid}, RSS {rss_mb(proc.pid):.0f} MB, ML libraries: {loaded}\n"
        )
        assert loaded == [], f"the web server loaded an ML framework: {loaded}"
    finally:
        stop_app(proc)


def script_runs(artifacts: Path) -> list[str]:
    """The page of each script run the server of `serve_app` has done so far, in order."""
    log = artifacts / "page-times.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line)["page"] for line in lines]


@contextlib.contextmanager
def browser_page(artifacts: Path, notes: list[str], **context_options: Any) -> Iterator[Any]:
    """A 1400x900 Chromium page with 60 s timeouts.

    When the body fails: a ``99-failure`` screenshot, and the folder and ``notes`` printed.
    Either way ``notes`` land in ``artifacts/notes.txt``.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, **context_options)
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield page
        except BaseException:
            with contextlib.suppress(Exception):
                screenshot(page, artifacts, "99-failure")
            print(f"\nBrowser test failed; screenshots and server.log are in {artifacts}")
            print("\n".join(notes))
            raise
        finally:
            (artifacts / "notes.txt").write_text("\n".join(notes) + "\n")
            context.close()
            browser.close()
