"""Load test on loopback: several browser sessions upload and browse while one of them trains.

    .venv/bin/python bench/load.py [--sessions 5] [--epochs 3] [--timeout 240] [--demo] [--cold]

Starts the model workers (``python -m retrain.service --wait``, as the Docker image and ``make
run`` do; ``--cold`` leaves that to the first page view), then ``streamlit run app.py`` on a
free 127.0.0.1 port with its own RETRAIN_HOME, opens one
Chromium (Debian's, headless) with one browser context per session, and drives them all at
once (asyncio):

* session 0 ("trainer") picks the built-in digits sample and the built-in starter model and
  trains it for ``--epochs`` epochs, watching the live chart;
* sessions 1..N-1 ("visitors") each upload their own small zip (class names unique to the
  session) and browse every page in a loop until the training is done; visitor 1 first
  uploads the Teachable Machine export of ``../shared/models`` on the Model page (when it is
  there), timed from the upload to its architecture drawn ("Model (TM upload)").

Every page load (click in the sidebar -> the new page's title shown and the app idle) is
timed, and the server logs its own time per page view (``RETRAIN_PAGE_LOG``, "server_side":
the script runs, without the browser's drawing). The script reports p50/p95/max per page, failures, the training time and the server's
peak memory, writes ``bench/results/load.json``, and checks on disk that no session saw
another session's run ids or class names. It only ever talks to 127.0.0.1, and stops itself
after ``--timeout`` seconds (the server and its workers are stopped in every case).
Exit status: 0 when every page answered and nothing leaked, 1 otherwise, 3 on the hard timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser_helpers import (  # noqa: E402  (shared with the browser tests)
    CHROMIUM,
    CHROMIUM_ARGS,
    start_app,
    stop_app,
)
from tests.test_browser import shapes_zip  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# One visitor also uploads this Teachable Machine export on the Model page (when present).
TEACHABLE_MACHINE = ROOT.parent / "shared" / "models" / "teachable_machine_water"
PAGES = [  # (sidebar link, the page's title)
    ("2 · Model", "Model"),
    ("3 · Train", "Train"),
    ("4 · Evaluate", "Evaluate"),
    ("5 · Export", "Export"),
    ("Runs", "Runs"),
    ("1 · Dataset", "Dataset"),
]
STATE_JS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    if (!app) return 'absent';
    const conn = app.getAttribute('data-test-connection-state');
    if (conn && conn !== 'CONNECTED') return 'disconnected';
    if (document.querySelector('[data-testid="stException"]')) return 'exception';
    const busy = app.getAttribute('data-test-script-state') === 'running'
        || !!document.querySelector('[data-testid="stStatusWidgetRunningIcon"], '
            + '[data-testid="stStatusWidgetRunningManIcon"], [data-testid="stSpinner"]');
    return busy ? 'running' : 'idle';
}"""


class Failure(Exception):
    """A page did not answer (timeout, exception box, lost connection)."""


class Stats:
    """Timings, failures and what each session could read."""

    def __init__(self) -> None:
        self.loads: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.texts: dict[int, list[str]] = {}
        self.tokens: dict[int, str] = {}
        self.training: dict[str, Any] = {}
        self.train_window: tuple[float, float] | None = None  # monotonic start, end
        self.rss: dict[str, float] = {"server_peak_mb": 0.0, "workers_peak_mb": 0.0}
        self.cpu: dict[str, float] = {}  # CPU seconds per group of processes
        self.cpu_timeline: list[dict[str, float]] = []  # the same, every half second

    def load(self, session: int, page: str, seconds: float) -> None:
        end = time.monotonic()
        self.loads.append(
            {"session": session, "page": page, "seconds": round(seconds, 3),
             "start": end - seconds, "end": end, "wall_end": round(time.time(), 3)}
        )  # fmt: skip


# --------------------------------------------------------------------------- page helpers


async def settle(page, timeout: float, quiet_polls: int = 2) -> None:
    """Wait until the app is connected, shows no exception and no script run is going on."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        state = await page.evaluate(STATE_JS)
        if state == "exception":
            text = await page.locator('[data-testid="stException"]').first.inner_text()
            raise Failure("exception on the page: " + text[:300])
        quiet = quiet + 1 if state == "idle" else 0
        if quiet >= quiet_polls:
            return
        await asyncio.sleep(0.1)
    raise Failure(f"not idle within {timeout:.0f} s")


async def visible_text(page) -> str:
    """What the page shows: its text and its HTML (widget values, links, attributes)."""
    return await page.locator("body").inner_text() + "\n" + await page.content()


async def wait_text(page, pattern: str, timeout: float) -> str:
    rx = re.compile(pattern, re.I | re.S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = await page.locator('[data-testid="stMain"]').inner_text()
        if rx.search(text):
            return text
        if await page.locator('[data-testid="stException"]').count():
            raise Failure("exception on the page while waiting for " + pattern)
        await asyncio.sleep(0.2)
    raise Failure(f"no {pattern!r} within {timeout:.0f} s")


async def open_page(page, link: str, title: str, answer_s: float = 30.0, done_s: float = 90.0):
    """Click ``link`` in the sidebar; return seconds until ``title`` is shown and the app idle.

    A page that shows no title within ``answer_s`` or is still running after ``done_s`` did not
    answer (a `Failure`); a slow page that finishes in time only counts in the timings.
    """
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    t0 = time.monotonic()
    await page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=link).click()
    heading = page.locator('[data-testid="stMain"] h1', has_text=re.compile(title, re.I))
    try:
        await heading.first.wait_for(timeout=answer_s * 1000)
    except PlaywrightTimeout as err:
        raise Failure(f"no '{title}' title within {answer_s:.0f} s") from err
    await settle(page, done_s - (time.monotonic() - t0))
    return time.monotonic() - t0


async def first_visit(page, url: str, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    await page.goto(url)
    await page.locator('[data-testid="stMain"] h1').first.wait_for(timeout=timeout * 1000)
    await settle(page, timeout)
    return time.monotonic() - t0


async def token_of(page, timeout: float = 10.0) -> str:
    """The session token the page's browser keeps in its cookie (the address bar has none)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cookie in await page.context.cookies():
            if cookie["name"] == "retrain_session":
                return cookie["value"]
        await asyncio.sleep(0.2)
    return ""


# --------------------------------------------------------------------------- the sessions


async def trainer(ctx, url: str, epochs: int, stats: Stats, done: asyncio.Event) -> None:
    """Session 0: sample data, starter model, train ``epochs`` epochs, watch it finish."""
    page = await ctx.new_page()
    texts = stats.texts.setdefault(0, [])
    try:
        stats.load(0, "open", await first_visit(page, url))
        stats.tokens[0] = await token_of(page)
        t0 = time.monotonic()
        await page.locator(".st-key-use_sample button").first.click()
        await wait_text(page, r"digit 5", 90)
        await settle(page, 60)
        stats.load(0, "sample dataset", time.monotonic() - t0)

        stats.load(0, "Model", await open_page(page, "2 · Model", "Model"))
        source = page.locator(".st-key-model_source")
        await source.get_by_text(re.compile("Built-in starter model", re.I)).first.click()
        t0 = time.monotonic()
        await settle(page, 60)
        load = page.locator(".st-key-model_load button")
        if await load.count():
            await load.first.click()
        await page.locator('.st-key-layer_stack [data-testid="stHtml"] .rs-row').first.wait_for(
            timeout=120_000
        )
        await wait_text(page, r"Before → after", 60)  # the new head is built
        await settle(page, 60)
        stats.load(0, "starter model", time.monotonic() - t0)
        texts.append(await visible_text(page))

        stats.load(0, "Train", await open_page(page, "3 · Train", "Train"))
        field = page.locator(".st-key-epochs input").first
        await field.fill(str(epochs))
        await field.press("Enter")
        await settle(page, 30)
        # --epochs in all, as before phase 2 became the default: head only.
        await page.get_by_text("Fine-tuning (phase 2").first.click()
        await settle(page, 30)  # a lazy expander: the click's rerun builds its widgets
        field = page.locator(".st-key-fine_tune_epochs input").first
        await field.fill("0")
        await field.press("Enter")
        await settle(page, 30)
        t0 = time.monotonic()
        await page.locator(".st-key-start_training button").first.click()
        first_epoch = None
        while time.monotonic() - t0 < 180:
            drawn = await page.evaluate(
                """() => Math.max(0, ...Array.from(document.querySelectorAll(
                    '.st-key-train_loss_chart [data-testid="stPlotlyChart"] .js-plotly-plot'))
                    .flatMap(p => (p._fullData || p.data || [])
                        .map(t => t.x && t.x.length !== undefined ? t.x.length : 0)))"""
            )
            if drawn and first_epoch is None:
                first_epoch = time.monotonic() - t0
            main = await page.locator('[data-testid="stMain"]').inner_text()
            if drawn >= epochs and re.search(r"\bdone\b|finished|complete", main, re.I):
                break
            if re.search(r"\bfailed\b|interrupted", main, re.I):
                raise Failure("training failed: " + main[-400:])
            await asyncio.sleep(0.5)
        else:
            raise Failure(f"training did not finish {epochs} epochs within 180 s")
        stats.train_window = (t0, time.monotonic())
        stats.training = {
            "epochs": epochs,
            "seconds_to_first_epoch_on_chart": round(first_epoch or -1, 1),
            "seconds_to_done": round(time.monotonic() - t0, 1),
        }
        texts.append(await visible_text(page))
        stats.load(0, "Runs", await open_page(page, "Runs", "Runs"))
        texts.append(await visible_text(page))
    except Exception as err:  # noqa: BLE001  (every failure is counted and reported)
        stats.failures.append(f"trainer: {type(err).__name__}: {str(err)[:300]}")
        with contextlib.suppress(Exception):
            await page.screenshot(path=str(RESULTS / "load-trainer-failure.png"))
    finally:
        done.set()


async def visitor(
    i: int, ctx, url: str, data_zip: Path, stats: Stats, done: asyncio.Event, deadline: float
) -> None:
    """Sessions 1..N-1: upload their own zip, then browse every page until training is done."""
    page = await ctx.new_page()
    texts = stats.texts.setdefault(i, [])
    rounds = 0
    try:
        await asyncio.sleep(0.3 * i)  # staggered arrivals, like people opening a shared link
        stats.load(i, "open", await first_visit(page, url))
        stats.tokens[i] = await token_of(page)
        t0 = time.monotonic()
        await page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(
            str(data_zip)
        )
        await wait_text(page, rf"s{i}-circle", 90)
        await settle(page, 60)
        stats.load(i, "upload", time.monotonic() - t0)
        texts.append(await visible_text(page))
        if i == 1 and (TEACHABLE_MACHINE / "keras_model.h5").is_file():
            stats.load(i, "Model (TM upload)", await upload_teachable_machine(page))
        while (not done.is_set() or rounds < 2) and time.monotonic() < deadline:
            for link, title in PAGES:
                try:
                    stats.load(i, title, await open_page(page, link, title))
                    texts.append(await visible_text(page))
                except Failure as err:
                    stats.failures.append(f"session {i} {title}: {err}")
                    with contextlib.suppress(Exception):
                        await page.screenshot(path=str(RESULTS / f"load-s{i}-{title}.png"))
                await asyncio.sleep(0.2)
            rounds += 1
    except Exception as err:  # noqa: BLE001  (every failure is counted and reported)
        stats.failures.append(f"session {i}: {type(err).__name__}: {str(err)[:300]}")


async def upload_teachable_machine(page) -> float:
    """Open the Model page, upload the Teachable Machine export (keras_model.h5 + labels.txt);
    return seconds from the upload to the layer stack drawn (the first draw of its architecture).
    """
    await open_page(page, "2 · Model", "Model")
    await page.locator(".st-key-model_source").get_by_text(re.compile("Upload")).first.click()
    await settle(page, 60)
    files = page.locator('.st-key-model_upload [data-testid="stFileUploaderDropzoneInput"]')
    t0 = time.monotonic()
    await files.set_input_files(
        [str(TEACHABLE_MACHINE / "keras_model.h5"), str(TEACHABLE_MACHINE / "labels.txt")]
    )
    await page.locator('.st-key-layer_stack [data-testid="stHtml"] .rs-row').first.wait_for(
        timeout=180_000
    )
    return time.monotonic() - t0


def start_model_workers(home: Path) -> None:
    """``python -m retrain.service --wait`` on ``home``, as a server's start script runs it."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN_")}
    env.update(RETRAIN_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    subprocess.run(
        [sys.executable, "-m", "retrain.service", "--wait"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )


async def sample_processes(server_pid: int, stats: Stats, stop: asyncio.Event) -> None:
    """Peak RSS of the Streamlit server and, separately, of the workers (the processes it
    started, and the model workers started before it); and the CPU seconds each group used
    (the browsers too: on this one host they take their share of the same cores)."""
    import psutil

    from retrain.service import pool

    server = psutil.Process(server_pid)
    me = psutil.Process()
    seen: dict[int, tuple[str, float]] = {}  # pid -> (group, cpu seconds at last look)

    def look(group: str, process: psutil.Process) -> float:
        times = process.cpu_times()
        seen[process.pid] = (group, times.user + times.system)
        return process.memory_info().rss / 2**20

    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            own = look("server", server)
            workers = 0.0
            processes = {c.pid: ("training", c) for c in server.children(recursive=True)}
            for record in pool.live_workers():
                with contextlib.suppress(psutil.Error):
                    processes[record["pid"]] = ("model workers", psutil.Process(record["pid"]))
            for group, child in processes.values():
                with contextlib.suppress(psutil.Error):
                    workers += look(group, child)
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.pid not in processes and child.pid != server_pid:
                        look("browsers (Chromium + Playwright)", child)
            stats.rss["server_peak_mb"] = max(stats.rss["server_peak_mb"], own)
            stats.rss["workers_peak_mb"] = max(stats.rss["workers_peak_mb"], workers)
        stats.cpu = {}
        for group, used in seen.values():
            stats.cpu[group] = round(stats.cpu.get(group, 0.0) + used, 1)
        stats.cpu_timeline.append({"t": round(time.time(), 2), **stats.cpu})
        await asyncio.sleep(0.5)


async def drive(url: str, server_pid: int, args: argparse.Namespace, stats: Stats) -> None:
    from playwright.async_api import async_playwright

    tmp = Path(tempfile.mkdtemp(prefix="retrain-load-"))
    zips = {
        i: shapes_zip(tmp / f"s{i}.zip", tuple(f"s{i}-{c}" for c in ("circle", "square")), 10)
        for i in range(1, args.sessions)
    }
    done, stop_sampling = asyncio.Event(), asyncio.Event()
    deadline = time.monotonic() + args.timeout - 30
    sampler = asyncio.create_task(sample_processes(server_pid, stats, stop_sampling))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        contexts = [
            await browser.new_context(viewport={"width": 1280, "height": 900})
            for _ in range(args.sessions)
        ]
        for ctx in contexts:
            ctx.set_default_timeout(60_000)
        await asyncio.gather(
            trainer(contexts[0], url, args.epochs, stats, done),
            *(
                visitor(i, contexts[i], url, zips[i], stats, done, deadline)
                for i in range(1, args.sessions)
            ),
        )
        await browser.close()
    stop_sampling.set()
    await sampler


# --------------------------------------------------------------------------- checks, report


def leaks(home: Path, stats: Stats) -> list[str]:
    """Run ids and class names of one session that appeared in another session's pages."""
    sessions = home / "sessions"
    run_ids = {
        token: [p.name for p in (sessions / token / "runs").glob("*") if p.is_dir()]
        for token in stats.tokens.values()
    }
    found = []
    for i, texts in stats.texts.items():
        own = stats.tokens.get(i)
        seen = "\n".join(texts)
        for j, token in stats.tokens.items():
            if token == own:
                continue
            for run_id in run_ids.get(token, []):
                if run_id in seen:
                    found.append(f"session {i} saw run {run_id} of session {j}")
            if j > 0 and f"s{j}-circle" in seen:
                found.append(f"session {i} saw class names of session {j}")
            if token in seen:
                found.append(f"session {i} saw the session token of session {j}")
    if len(set(stats.tokens.values())) != len(stats.tokens):
        found.append(f"two browser sessions shared a token: {stats.tokens}")
    # The check must be able to fail: the trainer does see its own run id.
    own_runs = run_ids.get(stats.tokens.get(0, ""), [])
    if not own_runs or not any(r in "\n".join(stats.texts.get(0, [])) for r in own_runs):
        found.append("the trainer never saw its own run id: this check would miss leaks")
    return found


def summarize(stats: Stats) -> dict[str, Any]:
    by_page: dict[str, list[float]] = {}
    for row in stats.loads:
        by_page.setdefault(row["page"], []).append(row["seconds"])

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 2)

    titles = {title for _, title in PAGES}
    navigations = [r["seconds"] for r in stats.loads if r["page"] in titles]
    window = stats.train_window
    during = [
        r["seconds"]
        for r in stats.loads
        if r["page"] in titles and window and r["end"] > window[0] and r["start"] < window[1]
    ]
    return {
        "page_loads": len(navigations),
        "p50_s": pct(navigations, 0.5) if navigations else None,
        "p95_s": pct(navigations, 0.95) if navigations else None,
        "max_s": round(max(navigations), 2) if navigations else None,
        "during_training": {
            "page_loads": len(during),
            "p50_s": pct(during, 0.5) if during else None,
            "p95_s": pct(during, 0.95) if during else None,
        },
        "per_page": {
            page: {
                "n": len(v),
                "p50_s": pct(v, 0.5),
                "p95_s": pct(v, 0.95),
                "max_s": round(max(v), 2),
                "mean_s": round(statistics.fmean(v), 2),
            }
            for page, v in sorted(by_page.items())
        },
    }


def server_side(page_log: Path) -> dict[str, Any]:
    """p50/p95 of the server's own time per page view (a script run, from ``RETRAIN_PAGE_LOG``):
    what a visitor on another machine waits for besides the network and their own browser."""
    by_page: dict[str, list[float]] = {}
    with contextlib.suppress(OSError):
        for line in page_log.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                row = json.loads(line)
                by_page.setdefault(row["page"], []).append(float(row["seconds"]))

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 3)

    every = [v for values in by_page.values() for v in values]
    return {
        "script_runs": len(every),
        "p50_s": pct(every, 0.5) if every else None,
        "p95_s": pct(every, 0.95) if every else None,
        "per_page": {
            page: {"n": len(v), "p50_s": pct(v, 0.5), "p95_s": pct(v, 0.95), "max_s": max(v)}
            for page, v in sorted(by_page.items())
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5, help="browser sessions (>= 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs the trainer runs")
    parser.add_argument("--timeout", type=float, default=240, help="hard limit in seconds")
    parser.add_argument("--demo", action="store_true", help="run the app with RETRAIN_DEMO=1")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not start the model workers before the server (as the Docker image and "
        "`make run` do): the first page view starts them, and the first visitors wait",
    )
    parser.add_argument(
        "--train-nice",
        type=int,
        default=None,
        help="RETRAIN_TRAIN_NICE for the server's training runs (default: the app's own, 10)",
    )
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="retrain-load-home-"))
    # The server logs its own time per page view (app.py): the server's share of a page load.
    page_log = home / "page-times.jsonl"
    extra = {"RETRAIN_PAGE_LOG": str(page_log), **({"RETRAIN_DEMO": "1"} if args.demo else {})}
    if args.train_nice is not None:
        extra["RETRAIN_TRAIN_NICE"] = str(args.train_nice)
    os.environ["RETRAIN_HOME"] = str(home)  # this script's view of the server's home
    if not args.cold:
        start_model_workers(home)
    proc, url = start_app(home, RESULTS / "load-server.log", extra)
    # Last resort: whatever hangs, the server and its workers go and the script ends.
    watchdog = threading.Timer(args.timeout + 30, lambda: (stop_app(proc), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    stats = Stats()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(drive(url, proc.pid, args, stats), args.timeout))
    except TimeoutError:
        stats.failures.append(f"the load test hit its {args.timeout:.0f} s limit")
    finally:
        stop_app(proc)
        watchdog.cancel()
        from retrain.service import pool

        pool.stop_workers()  # started before the server: not its children
    leaked = leaks(home, stats)
    report = {
        "sessions": args.sessions,
        "demo": args.demo,
        "train_nice": args.train_nice,
        "model_workers_started_before_the_server": not args.cold,
        "wall_s": round(time.monotonic() - started, 1),
        "cpus": os.cpu_count(),
        # Other work on the host inflates every timing; the 1-minute load average says how much.
        "host_load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        **summarize(stats),
        "server_side": server_side(page_log),
        "training": stats.training,
        "memory": {k: round(v) for k, v in stats.rss.items()},
        # Model workers started before the server count their start (TensorFlow, the starter
        # model) too; everything else is the test's own.
        "cpu_seconds": stats.cpu,
        "failures": stats.failures,
        "leaks": leaked,
        "loads": stats.loads,
        "cpu_timeline": stats.cpu_timeline,
    }
    (RESULTS / "load.json").write_text(json.dumps(report, indent=2))
    with contextlib.suppress(OSError):  # each script run, with its time: to line up with loads
        (RESULTS / "load-page-times.jsonl").write_text(page_log.read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "loads"}, indent=2))
    ok = not stats.failures and not leaked and bool(stats.training)
    print(("PASS" if ok else "FAIL") + f": details in {RESULTS / 'load.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
