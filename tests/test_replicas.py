"""Two web replicas on one RETRAIN_HOME behave as one app (real servers, real Chromium).

A visitor starts a run on replica A; A is killed with SIGKILL mid-run; the same browser opens
replica B (as a proxy would send it after A died) and finds its session (the cookie), the run,
and the run's curve still growing. Screenshots and both servers' logs land in
``test-artifacts/replicas/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.browser_helpers import (
    BROWSER_MARKS,
    ROOT,
    assert_no_exception,
    browser_page,
    go_to,
    max_epochs_drawn,
    screenshot,
    start_app,
    stop_app,
    wait_for_text,
    wait_idle,
    widget,
)

ARTIFACTS = ROOT / "test-artifacts" / "replicas"
EPOCHS = 60  # a budget far beyond what the test waits for: the run is stopped at the end

pytestmark = BROWSER_MARKS


def _set_number(page, key: str, value: str) -> None:
    box = widget(page, key).locator("input")
    if box.count():
        if not box.first.is_visible():  # inside a closed expander: open it
            expander = page.locator('[data-testid="stExpander"]', has=widget(page, key))
            expander.locator("summary").first.click()
        box.first.fill(value)
        box.first.press("Enter")
        wait_idle(page)


def _kill_leftovers(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica A's children (the training worker, the model worker) outlive it by design."""
    from retrain.runs import jobs, rundir
    from retrain.service import pool

    monkeypatch.setenv("RETRAIN_HOME", str(home))
    for run_dir in home.glob("sessions/*/runs/*"):
        jobs.request_stop(run_dir)
        pid = rundir.read_pid(run_dir)
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    pool.stop_workers()


def test_a_session_goes_on_in_replica_b_after_replica_a_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    home = tmp_path / "home"
    a, url_a = start_app(home, ARTIFACTS / "server-a.log")
    b, url_b = start_app(home, ARTIFACTS / "server-b.log")
    notes: list[str] = []
    try:
        with browser_page(ARTIFACTS, notes) as page:
            page.goto(url_a)
            wait_idle(page)
            widget(page, "use_sample").locator("button").first.click()
            wait_idle(page, timeout=120)
            wait_for_text(page, r"digit 5.*digit 9", timeout=90)
            go_to(page, "2 · Model")
            widget(page, "model_source").get_by_text(re.compile("Built-in starter")).first.click()
            wait_idle(page, timeout=120)
            # Train everything: no feature cache, so each epoch takes a while.
            widget(page, "freeze_mode").get_by_text("Train everything").first.click()
            wait_idle(page, timeout=120)
            wait_for_text(page, r"Before → after", timeout=120)
            go_to(page, "3 · Train")
            _set_number(page, "epochs", str(EPOCHS))
            _set_number(page, "early_stopping", "0")
            widget(page, "start_training").locator("button").first.click()
            wait_for_text(page, r"\bRun run-", timeout=60)
            deadline = time.monotonic() + 180
            while max_epochs_drawn(page) < 1 and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            on_a = max_epochs_drawn(page)
            assert on_a >= 1, "no epoch was drawn on replica A"
            screenshot(page, ARTIFACTS, "01-training-on-a")
            notes.append(f"replica A drew {on_a} epoch(s); killing A")

            os.kill(a.pid, signal.SIGKILL)
            a.wait(timeout=10)
            page.goto(url_b)  # the proxy sends the browser to the surviving replica
            wait_idle(page)
            assert_no_exception(page)
            go_to(page, "3 · Train")
            text = wait_for_text(page, r"\bRun run-", timeout=60)
            assert "digits-5" in page.locator('[data-testid="stSidebar"]').inner_text(), text
            # A fresh tab loads the chart's script first: wait for B to show what A showed.
            deadline = time.monotonic() + 60
            while max_epochs_drawn(page) < on_a and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            first_on_b = max_epochs_drawn(page)
            deadline = time.monotonic() + 120
            while max_epochs_drawn(page) <= first_on_b and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            later_on_b = max_epochs_drawn(page)
            screenshot(page, ARTIFACTS, "02-still-training-on-b")
            notes.append(f"replica B drew {first_on_b} then {later_on_b} epochs")
            assert later_on_b > first_on_b >= on_a, (on_a, first_on_b, later_on_b)
            widget(page, "stop_training").locator("button").first.click()
            wait_idle(page)
    finally:
        (ARTIFACTS / "notes.txt").write_text("\n".join(notes) + "\n")
        stop_app(b)
        if a.poll() is None:
            stop_app(a)
        _kill_leftovers(home, monkeypatch)
