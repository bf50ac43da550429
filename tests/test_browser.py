"""The whole flow in a real browser: Playwright drives Debian's Chromium against `streamlit run`.

Upload a zip through the real file input -> pick the built-in starter model and see its layers
-> replace the head -> train 2 epochs and watch the chart grow while the page stays interactive
-> see the confusion matrix -> download the .keras export.

A screenshot of every step lands in ``test-artifacts/browser/`` (with the server's log); when
the test fails it prints that folder. Playwright's own browser download does not work on these
machines, so the test uses ``/usr/bin/chromium`` (``.ci/run`` installs the Debian package) and
skips only when that binary is missing.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.browser_helpers import (
    BROWSER_MARKS,
    ROOT,
    assert_no_exception,
    browser_page,
    go_to,
    head_only_settings,
    main_text,
    max_epochs_drawn,
    plotly_traces,
    script_runs,
    serve_app,
    wait_for_text,
    wait_idle,
    widget,
)
from tests.browser_helpers import screenshot as save_screenshot

ARTIFACTS = ROOT / "test-artifacts" / "browser"
CLASSES = ("circle", "square", "triangle")
IMAGES_PER_CLASS = 20  # >= 10, so the dataset carries no "too few images" warning
EPOCHS = 2

pytestmark = BROWSER_MARKS


def screenshot(page, name: str) -> Path:
    """Save the main area as ``test-artifacts/browser/<name>.png``."""
    return save_screenshot(page, ARTIFACTS, name)


# --------------------------------------------------------------------------- the data


def shapes_zip(
    path: Path, classes: tuple[str, ...] = CLASSES, per_class: int = IMAGES_PER_CLASS
) -> Path:
    """A small, learnable dataset of 32x32 shapes (circle, square, triangle by class), zipped.

    Class ``k`` draws shape ``k % 3`` in colour ``k % 3``; the zip has one wrapper folder.
    """
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for label, cls in enumerate(classes):
            for i in range(per_class):
                # Every image differs (background shade, position), so there are no duplicates.
                img = Image.new("RGB", (32, 32), (250 - 3 * i, 245 - 2 * i, 235))
                draw = ImageDraw.Draw(img)
                x, y = i % 5, (i // 5) % 5  # position jitter
                colour = [(200, 30, 30), (30, 140, 30), (30, 30, 200)][label % 3]
                if label % 3 == 0:
                    draw.ellipse([3 + x, 3 + y, 23 + x, 23 + y], fill=colour)
                elif label % 3 == 1:
                    draw.rectangle([4 + x, 4 + y, 22 + x, 22 + y], fill=colour)
                else:
                    draw.polygon([(14 + x, 3 + y), (3 + x, 24 + y), (25 + x, 24 + y)], fill=colour)
                buf = io.BytesIO()
                img.save(buf, "PNG")
                zf.writestr(f"shapes/{cls}/{cls}_{i:02d}.png", buf.getvalue())
    return path


# --------------------------------------------------------------------------- the test


@pytest.fixture
def app_url(tmp_path: Path) -> Iterator[str]:
    with serve_app(tmp_path / "home", ARTIFACTS) as url:
        yield url


def test_full_flow_in_a_real_browser(app_url: str, tmp_path: Path):
    data_zip = shapes_zip(tmp_path / "shapes.zip")
    notes: list[str] = []
    with browser_page(ARTIFACTS, notes, accept_downloads=True) as page:
        run_flow(page, app_url, data_zip, tmp_path, notes)


def run_flow(page, url: str, data_zip: Path, tmp_path: Path, notes: list[str]) -> None:
    t0 = time.monotonic()

    def note(msg: str) -> None:
        notes.append(f"[{time.monotonic() - t0:6.1f} s] {msg}")

    # 1. The app opens on the Dataset step.
    page.goto(url)
    wait_idle(page)
    assert_no_exception(page)
    assert not re.search(r"[?&]s=", page.url), "the address bar must carry no session"
    wait_for_text(page, r"Dataset")
    screenshot(page, "01-start")
    note("app opened")

    # 2. Upload the zip through the real <input type=file>; see the class summary.
    page.locator(
        '.st-key-dataset_upload [data-testid="stFileUploaderDropzoneInput"], '
        '[data-testid="stFileUploaderDropzoneInput"]'
    ).first.set_input_files(str(data_zip))
    wait_idle(page, timeout=90)
    text = wait_for_text(page, r"circle.*square.*triangle|triangle.*square.*circle", timeout=60)
    n_images = len(CLASSES) * IMAGES_PER_CLASS
    assert re.search(rf"\b{n_images}\b", text), f"the summary should count {n_images} images"
    assert re.search(r"\b3\b", text), "the summary should count 3 classes"
    counts = page.locator('.st-key-class_counts [data-testid="stHtml"] .rs-row')
    counts.first.wait_for()
    assert counts.count() == len(CLASSES), "one bar per class in the images-per-class chart"
    screenshot(page, "02-dataset")
    note(f"dataset uploaded; summary shows 3 classes, {n_images} images")

    # 3. Model: the built-in starter model; its architecture.
    runs_before = len(script_runs(ARTIFACTS))
    go_to(page, "2 · Model")
    source = widget(page, "model_source")
    source.wait_for()
    source.get_by_text(re.compile(r"Built-in starter model", re.I)).first.click()
    wait_idle(page)
    load = widget(page, "model_load").locator("button")
    assert not load.count(), "a built-in model loads without a button"
    wait_idle(page, timeout=120)  # the starter model trains itself on first use (seconds)
    # The architecture: the layer stack's bars and the searchable layer table.
    bars = page.locator('.st-key-layer_stack [data-testid="stHtml"] .rs-row')
    bars.first.wait_for(timeout=120_000)
    # Coloured by the new head once its preview is in: a frozen base, new layers on top.
    bars.and_(page.locator('[data-status="new"]')).first.wait_for(timeout=60_000)
    statuses = {bars.nth(i).get_attribute("data-status") for i in range(bars.count())}
    assert "frozen" in statuses, f"the base should show as frozen: {statuses}"
    assert "params" in (bars.first.get_attribute("title") or ""), "a bar's hover names its size"
    # The table is one click away (a lazy expander under the stack): open it, as a user would.
    tables = page.locator('[data-testid="stExpander"]', has_text=re.compile(r"All layers \(table"))
    assert not tables.locator('[data-testid="stDataFrame"]').count(), "built only when opened"
    tables.locator("summary").first.click()
    tables.locator('[data-testid="stDataFrame"]').first.wait_for()
    wait_for_text(page, r"Parameters", timeout=30)
    screenshot(page, "03-model-architecture")
    note("starter model loaded; layer stack and layer table visible")
    # The sidebar shows the choice made on this page at once, not one page later.
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
    assert "Digits CNN" in sidebar and "shapes" in sidebar, sidebar
    # ... in the same script run: the visit that chose the (default) model ran the page once
    # (the sidebar is drawn again in its place; a rerun drew the whole page twice), opening the
    # table once more.
    runs = script_runs(ARTIFACTS)[runs_before:]
    assert runs == ["2 · Model", "2 · Model"], runs

    # 4. Replace the head: one output unit per new class, plus a hidden layer.
    text = wait_for_text(page, r"Removed.*Added.*Output", timeout=60)
    assert re.search(rf"Output\W+{len(CLASSES)} units", text), "the new head should have 3 units"
    page.get_by_text(re.compile(r"^Head options")).first.click()
    hidden = widget(page, "hidden_units").locator("input")
    hidden.wait_for()
    assert not page.get_by_text("Choose an option").count(), "the cut should still show its layer"
    hidden.fill("16")
    hidden.press("Enter")
    wait_idle(page, timeout=90)
    after = wait_for_text(page, r"Removed.*Added.*Output", timeout=60)
    added = re.search(r"Added\W+([^\n]+)", after)
    assert added and added.group(1) != re.search(r"Added\W+([^\n]+)", text).group(1), (
        "a hidden layer should appear among the added layers"
    )
    screenshot(page, "04-new-head")
    note(f"head replaced: added {added.group(1).strip()}")

    # 5. Train 2 epochs; the chart grows while the page stays interactive.
    go_to(page, "3 · Train")
    # 2 epochs of small batches at a head-sized learning rate: enough steps to learn the shapes;
    # head only (phase 2, on by default, is set to 0 in its expander as a person would).
    head_only_settings(page, EPOCHS)
    widget(page, "start_training").locator("button").first.click()
    text = wait_for_text(page, r"\bRun run-", timeout=60)  # the run's own section appears
    started = time.monotonic()
    seen: list[int] = []
    interacted = False
    while time.monotonic() - started < 150:
        assert_no_exception(page)
        drawn = max_epochs_drawn(page)
        if not seen or seen[-1] != drawn:
            seen.append(drawn)
            note(f"training chart shows {drawn} epoch(s)")
        text = main_text(page)
        running = re.search(r"Starting the training process|free training slot|Epoch \d+/\d+", text)
        if running and not interacted:
            # The page stays interactive while the live view refreshes: open the worker log,
            # go to another page and come back to the run.
            screenshot(page, "05a-train-running")
            drawn = max_epochs_drawn(page)
            if seen[-1] != drawn:
                seen.append(drawn)
                note(f"training chart shows {drawn} epoch(s)")
            t = time.monotonic()
            page.get_by_text("Worker log").first.click()
            clicks = go_to(page, "1 · Dataset")
            wait_for_text(page, r"circle", timeout=20)
            clicks += go_to(page, "3 · Train")
            wait_for_text(page, r"\bRun run-", timeout=20)
            note(
                f"during training ({running.group(0)!r}): opened the log, switched pages and "
                f"came back in {time.monotonic() - t:.1f} s"
                + (" (a page switch was swallowed by a rerun; clicked again)" if clicks > 2 else "")
            )
            interacted = True
            continue
        if drawn >= EPOCHS and re.search(r"\bDone\b", text):
            break
        if re.search(r"\bfailed\b|ended unexpectedly", text):
            raise AssertionError("the training failed:\n" + text[-1500:])
        page.wait_for_timeout(300)
    wait_idle(page)
    assert seen[0] < EPOCHS, "the chart should be drawn by the live view after the start"
    assert max_epochs_drawn(page) == EPOCHS, f"the chart should end at {EPOCHS} epochs, saw {seen}"
    assert interacted, "the page never showed the run as starting/running"
    screenshot(page, "05b-train-done")
    note(f"training finished; chart epochs over time: {seen}")

    # 6. Evaluate: the confusion matrix.
    go_to(page, "4 · Evaluate")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        heatmaps = [t for t in plotly_traces(page) if t["type"] == "heatmap"]
        if heatmaps:
            break
        assert_no_exception(page)
        page.wait_for_timeout(300)
    assert heatmaps and heatmaps[0]["z"] == len(CLASSES), f"no 3x3 confusion matrix: {heatmaps}"
    wait_idle(page)
    screenshot(page, "06-evaluate")
    note("confusion matrix drawn")

    # 7. Export: download the .keras file.
    go_to(page, "5 · Export")
    keras_button = page.locator('[data-testid="stDownloadButton"]').filter(
        has_text=re.compile(r"\.keras|keras", re.I)
    )
    if keras_button.count() == 0:
        formats = widget(page, "export_formats")
        if formats.count() and ".keras" not in formats.first.inner_text():
            formats.first.locator("input").first.click()
            page.get_by_role("option", name=re.compile(r"^\.keras")).first.click()
            page.keyboard.press("Escape")
            wait_idle(page)
        build = page.get_by_role("button", name=re.compile(r"export|build", re.I))
        build.first.click()
        wait_idle(page, timeout=120)
        keras_button.first.wait_for(timeout=120_000)
    screenshot(page, "07-export")
    with page.expect_download(timeout=60_000) as info:
        keras_button.first.locator("button").first.click()
    download = info.value
    target = tmp_path / (download.suggested_filename or "model.keras")
    download.save_as(str(target))
    assert target.suffix == ".keras", f"download is named {download.suggested_filename!r}"
    with zipfile.ZipFile(target) as zf:
        names = set(zf.namelist())
        assert {"config.json", "model.weights.h5"} <= names, names
        meta = json.loads(zf.read("retrain.json")) if "retrain.json" in names else {}
    if meta:
        assert list(meta.get("class_names", [])) == list(CLASSES), meta
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "retrain_session")
    assert token.encode() not in target.read_bytes(), "the session id leaks into the download"
    note(f"downloaded {target.name} ({target.stat().st_size} bytes), entries {sorted(names)}")

    # 8. Runs: the session's history lists the run.
    run_id = re.search(r"run-[0-9]{8}-[0-9]{6}-[0-9a-f]+", page.url + main_text(page))
    go_to(page, "Runs")
    if run_id:
        wait_for_text(page, re.escape(run_id.group(0)), timeout=30)
    screenshot(page, "08-runs")
    note("runs page lists the run")
    elapsed = time.monotonic() - t0
    note(f"whole flow: {elapsed:.0f} s")
    assert elapsed < 240, f"the flow took {elapsed:.0f} s; keep it under ~3 minutes"
