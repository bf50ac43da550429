"""Add classes and keep the old ones, in a real browser (Playwright + Debian's Chromium).

The sample digits 5-9 are the new data; the built-in starter model knows digits 0-4. On the
Model page "Add classes, keep the old ones" with the starter's own digits 0-4 as old data
shows the outputs before and after (10 outputs, old first); the Train page trains and draws
the old task's and the new task's held-out accuracy per epoch while it runs (the forgetting
curve); the Evaluate page scores the old task before and after, per class.

Screenshots and the server log land in ``test-artifacts/browser-keep/``. The helpers are
tests/browser_helpers.py's, shared with test_browser.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser_helpers import (
    BROWSER_MARKS,
    ROOT,
    assert_no_exception,
    browser_page,
    go_to,
    head_only_settings,
    main_text,
    plotly_traces,
    screenshot,
    serve_app,
    wait_for_text,
    wait_idle,
    widget,
)

ARTIFACTS = ROOT / "test-artifacts" / "browser-keep"
EPOCHS = 6

pytestmark = BROWSER_MARKS


def shot(page, name: str) -> Path:
    """Save the main area as ``test-artifacts/browser-keep/<name>.png``."""
    return screenshot(page, ARTIFACTS, name)


def task_curves(page) -> dict[str, int]:
    """Points drawn per trace of the old-task/new-task chart (``train_tasks_chart``)."""
    names = {"old classes", "new classes"}
    return {t["name"]: t["n"] for t in plotly_traces(page) if t["name"] in names}


@pytest.fixture
def app_url(tmp_path: Path) -> Iterator[str]:
    with serve_app(tmp_path / "home", ARTIFACTS) as url:
        yield url


def test_add_classes_to_the_starter_model_and_watch_both_tasks(app_url: str):
    notes: list[str] = []
    with browser_page(ARTIFACTS, notes) as page:
        run_flow(page, app_url, notes)


def run_flow(page, url: str, notes: list[str]) -> None:
    t0 = time.monotonic()

    def note(msg: str) -> None:
        notes.append(f"[{time.monotonic() - t0:6.1f} s] {msg}")

    # 1. The sample digits 5-9 are the new data.
    page.goto(url)
    wait_idle(page)
    widget(page, "use_sample").locator("button").first.click()
    wait_idle(page, timeout=120)
    wait_for_text(page, r"digit 5.*digit 9", timeout=90)
    note("sample digits 5-9 ingested")

    # 2. The starter model: add classes, keep the old ones, with its digits 0-4 as old data.
    go_to(page, "2 · Model")
    source = widget(page, "model_source")
    source.get_by_text(re.compile(r"Built-in starter model", re.I)).first.click()
    wait_idle(page, timeout=120)
    load = widget(page, "model_load").locator("button")
    if load.count():
        load.first.click()
        wait_idle(page, timeout=120)
    mode = widget(page, "head_mode")
    mode.wait_for(timeout=120_000)
    mode.get_by_text("Add classes, keep the old ones").click()
    wait_idle(page, timeout=120)
    old = widget(page, "model_old_source")
    old.get_by_text(re.compile(r"built-in sample's digits 0-4", re.I)).click()
    wait_idle(page, timeout=120)
    text = wait_for_text(page, r"Outputs before → after", timeout=120)
    assert re.search(r"Output\W+10 units", text), "the widened head should have 10 outputs"
    # The outputs table (a canvas grid: its cells are not DOM text); the layer table is in its
    # expander, closed.
    page.locator('[data-testid="stMain"] [data-testid="stDataFrame"]:visible').first.wait_for()
    shot(page, "01-model-keep")
    note("model page: keep mode, outputs before -> after shown (10 units)")

    # 3. Train: both curves grow while it trains.
    go_to(page, "3 · Train")
    wait_for_text(page, r"Keep the old classes", timeout=60)
    assert "the original head kept" in main_text(page)
    # Head epochs only: keep mode's automatic fine-tuning budget (phase 2) is set to 0 here,
    # so the chart has exactly EPOCHS points (early stopping's patience exceeds them).
    head_only_settings(page, EPOCHS)
    widget(page, "start_training").locator("button").first.click()
    wait_for_text(page, r"\bRun run-", timeout=60)
    seen: list[dict[str, int]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert_no_exception(page)
        curves = task_curves(page)
        if curves and (not seen or seen[-1] != curves):
            seen.append(curves)
            note(f"old/new chart points: {curves}")
        text = main_text(page)
        if re.search(r"\bfailed\b|ended unexpectedly", text):
            raise AssertionError("the training failed:\n" + text[-1500:])
        if re.search(r"\bDone\b", text) and curves.get("old classes") == EPOCHS:
            break
        page.wait_for_timeout(300)
    wait_idle(page)
    final = task_curves(page)
    assert final == {"old classes": EPOCHS, "new classes": EPOCHS}, f"saw {seen}"
    assert min(s.get("old classes", 0) for s in seen) < EPOCHS, (
        f"the chart should grow while training (live), saw {seen}"
    )
    shot(page, "02-train-both-curves")
    note(f"training done; both curves drawn, growth {seen}")

    # 4. Evaluate: forgetting per class on the run's own held-out old images.
    go_to(page, "4 · Evaluate")
    toggle = widget(page, "eval_forget_run")
    toggle.wait_for(timeout=90_000)
    toggle.locator("label").first.click()
    wait_idle(page, timeout=120)
    text = wait_for_text(page, r"Before retraining.*After retraining.*Drop", timeout=120)
    assert "among all its classes" in text
    bars = [t for t in plotly_traces(page) if t["type"] == "bar" and t["name"] == "after"]
    assert bars and bars[0]["n"] == 5, f"one 'after' bar per old class: {bars}"
    shot(page, "03-evaluate-forgetting")
    note("evaluate: forgetting per class shown")
    assert time.monotonic() - t0 < 420
