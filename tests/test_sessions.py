"""Private sessions: the cookie (or the signed-in user) names the workspace, never the URL.

AppTest cannot carry browser cookies, so these tests stand in for the browser's
``retrain_session`` cookie by patching `pages._ui.browser_cookie_token`; the real cookie is
checked in Chromium by tests/test_browser_share.py and tests/test_browser_signin.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import pages._ui as ui
from retrain.sessions.workspace import (
    home,
    new_session_token,
    session_workspace,
    user_session_token,
)

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
HOSTILE = "<img src=x onerror=alert(1)>"


def _app(cookie: str | None, monkeypatch: pytest.MonkeyPatch, **query: str) -> AppTest:
    monkeypatch.setattr(ui, "browser_cookie_token", lambda: cookie)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(query)
    return at.run()


def _sessions() -> set[str]:
    folder = home() / "sessions"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_the_cookie_names_the_workspace_and_a_reload_keeps_it(monkeypatch):
    token = new_session_token()
    workspace = session_workspace(token)
    (workspace / "session.json").write_text('{"base": "builtin:digits-cnn", "base_label": "X"}')
    at = _app(token, monkeypatch)
    assert not at.exception, at.exception
    assert at.session_state["token"] == token
    assert at.session_state["base"] == "builtin:digits-cnn"
    assert "s" not in at.query_params
    assert _sessions() == {token}
    assert not [i for i in at.info if "Links no longer" in i.value]


def test_no_cookie_gets_a_fresh_workspace(monkeypatch):
    other = new_session_token()
    session_workspace(other)
    at = _app(None, monkeypatch)
    assert not at.exception, at.exception
    mine = at.session_state["token"]
    assert mine != other and _sessions() == {other, mine}


@pytest.mark.parametrize("cookie", [None, "own"])
def test_an_old_address_bar_link_opens_nothing_and_says_so(monkeypatch, cookie):
    owner = new_session_token()
    owner_ws = session_workspace(owner)
    (owner_ws / "session.json").write_text('{"dataset_label": "secret-data: 2 classes"}')
    own = new_session_token() if cookie else None
    at = _app(own, monkeypatch, s=owner)
    assert not at.exception, at.exception
    assert at.session_state["token"] not in (owner,)
    if own:
        assert at.session_state["token"] == own
    assert "dataset_label" not in at.session_state
    assert "s" not in at.query_params, "the old token is dropped from the address bar"
    notices = [i.value for i in at.info if "Links no longer open a workspace" in i.value]
    assert len(notices) == 1 and "\n" not in notices[0]


def test_the_owners_own_old_link_needs_no_notice(monkeypatch):
    token = new_session_token()
    session_workspace(token)
    at = _app(token, monkeypatch, s=token)
    assert at.session_state["token"] == token
    assert not [i for i in at.info if "Links no longer" in i.value]


@pytest.mark.parametrize("bad", ["../../x", "short", "a" * 65, HOSTILE, "aaaa aaaa aaaa aaaa"])
def test_a_forged_cookie_gets_a_fresh_workspace(monkeypatch, bad):
    cookies = {ui.SESSION_COOKIE: bad}
    monkeypatch.setattr(type(ui.st.context), "cookies", property(lambda self: cookies))
    assert ui.browser_cookie_token() is None
    before = set(home().parent.iterdir())
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert at.session_state["token"] != bad
    assert _sessions() == {at.session_state["token"]}
    assert set(home().parent.iterdir()) == before


def test_a_signed_in_user_gets_the_same_workspace_on_every_browser(monkeypatch):
    secret = "s3cret-for-the-test"
    issuer = "http://127.0.0.1:9/"
    expected = user_session_token(secret, issuer, "alice")
    for cookie in (new_session_token(), None):  # two browsers: one with a cookie, one without
        monkeypatch.setattr(ui, "browser_cookie_token", lambda cookie=cookie: cookie)
        at = AppTest.from_file(APP, default_timeout=60)
        at.secrets["auth"] = {
            "cookie_secret": secret,
            "client_id": "x",
            "client_secret": "y",
            "redirect_uri": "http://127.0.0.1/oauth2callback",
            "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration",
        }
        at.user = {"is_logged_in": True, "sub": "alice", "iss": issuer, "name": HOSTILE}
        at.run()
        assert not at.exception, at.exception
        assert at.session_state["token"] == expected
        caption = " ".join(c.value for c in at.sidebar.caption)
        assert "Signed in as \\<img src=x onerror=alert(1)\\>" in caption
        assert at.sidebar.button(key="account_sign_out")
    assert user_session_token(secret, issuer, "bob") != expected
    assert user_session_token("another-secret", issuer, "alice") != expected


def test_anonymous_is_the_default_and_sign_in_is_offered_only_when_configured(monkeypatch):
    at = _app(None, monkeypatch)
    assert not [b for b in at.sidebar.button if b.key and b.key.startswith("account_")]
    monkeypatch.setattr(ui, "browser_cookie_token", lambda: None)
    at = AppTest.from_file(APP, default_timeout=60)
    at.secrets["auth"] = {"cookie_secret": "x", "client_id": "x", "client_secret": "y"}
    at.user = {"is_logged_in": False}
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.button(key="account_sign_in_default").label == "Sign in"
    assert "_signed_in" not in at.session_state


def test_hostile_names_in_the_sidebar_show_as_text(monkeypatch):
    token = new_session_token()
    workspace = session_workspace(token)
    (workspace / "session.json").write_text(
        '{"dataset_label": "<img src=x onerror=alert(1)>: 2 classes", '
        '"base_label": "[click](javascript:alert(1)) **bold** $x$"}'
    )
    at = _app(token, monkeypatch)
    assert not at.exception, at.exception
    text = "\n".join(m.value for m in at.sidebar.markdown)
    assert "\\<img src=x onerror=alert(1)\\>" in text
    assert "<img" not in text.replace("\\<img", "")
    assert "\\[click\\](javascript:alert(1)) \\*\\*bold\\*\\* \\$x\\$" in text


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        (HOSTILE, "\\<img src=x onerror=alert(1)\\>"),
        ("<script>alert(1)</script>", "\\<script\\>alert(1)\\</script\\>"),
        ("[x](http://evil)", "\\[x\\](http://evil)"),
        ("**b** _i_ `c` ~s~ $m$ | #h", "\\*\\*b\\*\\* \\_i\\_ \\`c\\` \\~s\\~ \\$m\\$ \\| \\#h"),
        ("- item", "\\- item"),
        ("1. item", "1\\. item"),
        ("two\nlines", "two lines"),
        ("a\\b", "a\\\\b"),
    ],
)
def test_as_text_escapes_every_markup(name, escaped):
    assert ui.as_text(name) == escaped


def test_xsrf_protection_stays_on():
    import tomllib

    from streamlit import config as st_config

    settings = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert settings.get("server", {}).get("enableXsrfProtection", True) is True
    assert st_config.get_option("server.enableXsrfProtection") is True
