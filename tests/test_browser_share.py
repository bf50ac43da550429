"""Private sessions and share links in a real browser (Playwright + Debian's Chromium).

Three browsers (Chromium contexts, each with its own cookies) on one server:

- A owns a finished run (a tiny model trained by the test into A's workspace; one class is
  named ``<img src=x onerror=alert(1)>``). A reload keeps A's session (the cookie).
- B opens A's old address-bar link (``/?s=<A's token>``) and gets a fresh workspace of its
  own, with a one-line notice.
- A shares the run from the Runs page; C opens the link: sees the confusion matrix, tries an
  image and gets a prediction, finds no control that writes to A's workspace, and A's files
  do not change. The hostile class name shows as text; no script runs.
- A revokes the link; C's reload says so.

Screenshots, the server's log and notes land in ``test-artifacts/browser-share/``.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from browser_helpers import (
    BROWSER_MARKS,
    assert_no_exception,
    go_to,
    launch_chromium,
    main_text,
    plotly_traces,
    screenshot,
    serve_app,
    wait_for_text,
    wait_idle,
)
from PIL import Image

from retrain.sessions.workspace import home, is_valid_token

pytestmark = BROWSER_MARKS

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser-share"
HOSTILE = "<img src=x onerror=alert(1)>"
COOKIE = "retrain_session"


def _cookie(context, timeout: float = 20.0) -> dict:
    """The session cookie the page set in ``context`` (waits for the page's script)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cookie in context.cookies():
            if cookie["name"] == COOKIE:
                return cookie
        time.sleep(0.2)
    raise AssertionError(f"no {COOKIE} cookie within {timeout:.0f} s: {context.cookies()}")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _runs_page(page) -> None:
    go_to(page, "Runs")
    wait_for_text(page, r"Runs")


def test_private_sessions_and_share_links(make_run, tmp_path):
    notes: list[str] = []
    alerts: list[str] = []
    t0 = time.monotonic()

    def note(msg: str) -> None:
        notes.append(f"[{time.monotonic() - t0:6.1f} s] {msg}")

    def shot(page, name: str) -> None:
        screenshot(page, ARTIFACTS, name)

    image = tmp_path / "try.png"
    Image.new("RGB", (16, 16), (220, 40, 40)).save(image)
    from playwright.sync_api import sync_playwright

    with serve_app(home(), ARTIFACTS) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        pages = {}
        try:
            contexts = {
                who: browser.new_context(viewport={"width": 1400, "height": 1000}) for who in "ABC"
            }
            for who, context in contexts.items():
                pages[who] = page = context.new_page()
                page.set_default_timeout(60_000)
                page.on(
                    "dialog", lambda d, who=who: (alerts.append(f"{who}: {d.message}"), d.dismiss())
                )
            a, b, c = pages["A"], pages["B"], pages["C"]

            # --- A: a private session, kept in a SameSite=Strict cookie, not the URL.
            a.goto(url)
            wait_idle(a)
            assert_no_exception(a)
            cookie = _cookie(contexts["A"])
            token_a = cookie["value"]
            assert is_valid_token(token_a) and cookie["sameSite"] == "Strict"
            assert "s=" not in a.url, a.url
            workspace_a = home() / "sessions" / token_a
            assert workspace_a.is_dir()
            run_dir = make_run(
                workspace_a, classes=("cat", "dog", HOSTILE), per_class=8, epochs=10,
                run_id="run-shared",
            )  # fmt: skip
            note(f"A's session {token_a[:6]}…; run trained into A's workspace")

            # A reload keeps A's session: the Runs page lists A's run.
            a.reload()
            wait_idle(a)
            assert _cookie(contexts["A"])["value"] == token_a
            _runs_page(a)
            wait_for_text(a, r"run-shared")
            assert len(list((home() / "sessions").iterdir())) == 1, "a reload made a new session"
            note("A reloaded: same session, run listed")

            # --- B opens A's old address-bar link: a fresh workspace and a notice.
            b.goto(f"{url}/?s={token_a}")
            wait_idle(b)
            wait_for_text(b, r"Links no longer open a workspace")
            token_b = _cookie(contexts["B"])["value"]
            assert token_b != token_a
            assert "s=" not in b.url, b.url
            _runs_page(b)
            wait_for_text(b, r"No runs yet")
            assert "run-shared" not in main_text(b)
            shot(b, "01-B-old-link-fresh-workspace")
            note("B with A's old link: fresh workspace, no runs")

            # --- A shares the run from the Runs page.
            a.locator('[data-testid="stPopover"] button', has_text="Share").first.click()
            a.get_by_role("button", name="Create link").click()
            wait_for_text(a, r"\?share=[A-Za-z0-9_-]{32}", timeout=240)
            wait_idle(a, timeout=120)
            link = re.search(r"https?://\S+\?share=[A-Za-z0-9_-]{32}", a.locator(
                '[data-testid="stCode"]').first.inner_text()).group(0)  # fmt: skip
            share_id = link.rsplit("=", 1)[1]
            shot(a, "02-A-share-link")
            note(f"A made the link {link}")
            a.keyboard.press("Escape")
            wait_idle(a)
            wait_for_text(a, re.escape(share_id))  # the owner's list of shares

            # --- C opens the link: results, hostile name as text, Try it, nothing of A's.
            before = _files(workspace_a)
            c.goto(link)
            wait_idle(c, timeout=120)
            text = wait_for_text(c, r"Shared model.*3 classes", timeout=60)
            assert HOSTILE in text, "the hostile class name must show as text"
            assert c.locator("img[onerror], [onerror]").count() == 0
            deadline = time.monotonic() + 30
            while True:
                heatmaps = [t for t in plotly_traces(c) if t["type"] == "heatmap"]
                if heatmaps:
                    break
                assert time.monotonic() < deadline, "no confusion matrix on the shared page"
                c.wait_for_timeout(250)
            heatmap = heatmaps[0]
            assert heatmap["z"] == 3, heatmap  # 3 x 3: one row per class
            c.locator(
                '.st-key-shared_try_upload [data-testid="stFileUploaderDropzoneInput"]'
            ).set_input_files(str(image))
            wait_idle(c, timeout=240)
            text = wait_for_text(c, r"Top class:\s*(cat|dog|<img)", timeout=240)
            note("C: confusion matrix seen, prediction: " + re.search(r"Top class:[^\n]*", text)[0])
            shot(c, "03-C-shared-page")
            controls = c.locator(
                '[data-testid="stMain"] button, [data-testid="stMain"] input, '
                '[data-testid="stSidebar"] button'
            )
            labels = [
                (controls.nth(i).inner_text() or controls.nth(i).get_attribute("aria-label") or "")
                for i in range(controls.count())
            ]
            note(f"C's controls: {labels}")
            forbidden = re.compile(r"delete|revoke|train|stop|resume|share|export", re.I)
            assert not [label for label in labels if forbidden.search(label)], labels
            assert c.locator('[data-testid="stSidebarNav"]').count() == 0, "no way into A's steps"
            assert _files(workspace_a) == before, "C's visit changed A's workspace"
            # The upload went through with Streamlit's XSRF protection on (its cookie is set).
            assert any(k["name"] == "_streamlit_xsrf" for k in contexts["C"].cookies())
            assert not alerts, alerts

            # --- A revokes; C's reload says so.
            a.get_by_role("button", name="Revoke").first.click()
            wait_idle(a)
            wait_for_text(a, r"No live share links")
            c.reload()
            wait_idle(c)
            wait_for_text(c, r"This link was revoked by its owner")
            shot(c, "04-C-revoked")
            note("A revoked; C's reload says so")

            # --- A's reload still keeps A's session.
            a.reload()
            wait_idle(a)
            _runs_page(a)
            wait_for_text(a, r"run-shared")
            assert _cookie(contexts["A"])["value"] == token_a
            assert not alerts, alerts
            note("A reloaded again: same session")
        except BaseException:
            for who, page in pages.items():
                with contextlib.suppress(Exception):  # best effort while reporting a failure
                    screenshot(page, ARTIFACTS, f"99-failure-{who}")
            print(f"\nBrowser test failed; screenshots and server.log are in {ARTIFACTS}")
            print("\n".join(notes))
            raise
        finally:
            (ARTIFACTS / "notes.txt").write_text("\n".join(notes) + "\n")
            browser.close()
    assert run_dir.is_dir()
