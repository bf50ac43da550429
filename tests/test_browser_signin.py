"""Sign-in (st.login) against a local OIDC provider, in a real browser.

The test starts ``oidc-provider-mock`` on loopback and the app with an ``[auth]`` section in
its secrets (in a temporary ``$HOME/.streamlit/secrets.toml``). Alice signs in on one browser
and picks the sample dataset; on a second browser (its own cookies) she starts anonymous,
with a workspace of her own, then signs in and finds her dataset: the workspace belongs to
the user, not to the browser. Nothing reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import time
from pathlib import Path

import browser_helpers
import pytest
from browser_helpers import (
    BROWSER_MARKS,
    assert_no_exception,
    launch_chromium,
    screenshot,
    serve_app,
    wait_for_text,
    wait_idle,
)

from retrain.sessions.workspace import home, user_session_token

pytestmark = [
    *BROWSER_MARKS,
    pytest.mark.skipif(
        not all(
            __import__("importlib").util.find_spec(m) for m in ("authlib", "oidc_provider_mock")
        ),
        reason="Authlib and oidc-provider-mock are needed (requirements-dev.txt)",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser-signin"
SECRET = "test-cookie-secret-0123456789abcdef"


def _sign_in(page, url: str, user: str) -> None:
    page.locator(".st-key-account_sign_in_default button").click()
    page.wait_for_url("**/oauth2/authorize**", timeout=30_000)
    page.locator('input[name="sub"]').fill(user)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{url}/**", timeout=30_000)
    wait_idle(page)
    wait_for_text(page, r"Signed in as", where="body", timeout=30)


def test_signed_in_workspace_follows_the_user_across_browsers(monkeypatch, tmp_path):
    from oidc_provider_mock import run_server_in_thread
    from playwright.sync_api import sync_playwright

    port = browser_helpers.free_port()
    monkeypatch.setattr(browser_helpers, "free_port", lambda: port)
    notes: list[str] = []
    with run_server_in_thread(port=0) as provider:
        issuer = f"http://localhost:{provider.server_port}"
        fake_home = tmp_path / "user-home"
        (fake_home / ".streamlit").mkdir(parents=True)
        (fake_home / ".streamlit" / "secrets.toml").write_text(
            "[auth]\n"
            f'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
            f'cookie_secret = "{SECRET}"\n'
            'client_id = "retrain-studio"\n'
            'client_secret = "retrain-studio-secret"\n'
            f'server_metadata_url = "{issuer}/.well-known/openid-configuration"\n'
        )
        monkeypatch.setattr(
            browser_helpers,
            "start_app",
            _with_env(browser_helpers.start_app, {"HOME": str(fake_home)}),
        )
        with serve_app(home(), ARTIFACTS) as url, sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                one = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
                one.set_default_timeout(60_000)
                one.goto(url)
                wait_idle(one)
                assert_no_exception(one)
                _sign_in(one, url, "alice")
                alice = home() / "sessions" / user_session_token(SECRET, issuer, "alice")
                notes.append(f"alice signed in; her workspace {alice.name[:8]}…")
                one.locator(".st-key-use_sample button").first.click()
                wait_idle(one, timeout=120)
                wait_for_text(one, r"digits-5-6-7-8-9", where="body", timeout=90)
                deadline = time.monotonic() + 20
                while not (alice / "session.json").is_file() and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert "digits-5-6-7-8-9" in (alice / "session.json").read_text()
                screenshot(one, ARTIFACTS, "01-alice-browser-one")

                two = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
                two.set_default_timeout(60_000)
                two.goto(url)
                wait_idle(two)
                body = two.inner_text("body")
                assert "digits-5-6-7-8-9" not in body, "an anonymous browser saw alice's choice"
                cookie = _session_cookie(two)
                assert (
                    cookie != alice.name
                    and not (home() / "sessions" / cookie / "session.json").is_file()
                )
                _sign_in(two, url, "alice")
                wait_for_text(two, r"digits-5-6-7-8-9", where="body", timeout=30)
                screenshot(two, ARTIFACTS, "02-alice-browser-two")
                notes.append("browser two: anonymous first, then alice's workspace after sign-in")

                # Bob signs in on browser two after signing out: his own, empty workspace.
                two.locator(".st-key-account_sign_out button").click()
                two.wait_for_url("**/oauth2/end_session**", timeout=30_000)  # the provider asks
                two.get_by_role("button", name="End session").click()
                two.locator(".st-key-account_sign_in_default button").wait_for(timeout=30_000)
                wait_idle(two)
                assert "digits-5-6-7-8-9" not in two.inner_text("body"), "signed out, still alice's"
                _sign_in(two, url, "bob")
                body = two.inner_text("body")
                assert "digits-5-6-7-8-9" not in body, "bob saw alice's workspace"
                assert (home() / "sessions" / user_session_token(SECRET, issuer, "bob")).is_dir()
                notes.append("bob: his own workspace")
            except BaseException:
                for i, ctx in enumerate(browser.contexts):
                    for page in ctx.pages:
                        screenshot(page, ARTIFACTS, f"99-failure-{i}")
                print("\n".join(notes))
                raise
            finally:
                (ARTIFACTS / "notes.txt").write_text("\n".join(notes) + "\n")
                browser.close()


def _session_cookie(page, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cookie in page.context.cookies():
            if cookie["name"] == "retrain_session":
                return cookie["value"]
        page.wait_for_timeout(200)
    raise AssertionError("the page set no session cookie")


def _with_env(start_app, extra: dict[str, str]):
    def start(home_dir, log_path, extra_env=None):
        return start_app(home_dir, log_path, {**(extra_env or {}), **extra})

    return start
