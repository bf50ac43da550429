"""The app shell (AppTest of app.py): the sidebar's choices and demo mode."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _sidebar_text(at: AppTest) -> str:
    return "\n".join(m.value for m in at.sidebar.markdown)


def test_a_new_session_sees_every_step_not_yet_chosen():
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    text = _sidebar_text(at)
    assert "**Dataset:** _not yet_" in text and "**Base model:** _not yet_" in text
    assert at.session_state["token"]  # kept in a cookie, so a reload finds it
    assert "s" not in at.query_params  # the address bar carries no session


def test_choosing_the_sample_is_remembered_for_the_sidebar_and_other_pages():
    # (AppTest drops the sidebar on a second run under st.navigation; the real-browser test
    # checks the sidebar itself right after a choice.)
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.button(key="use_sample").click().run()
    assert not at.exception
    assert at.session_state["dataset_label"].startswith("digits-5-6-7-8-9: 5 classes")
    saved = (Path(at.session_state["workspace"]) / "session.json").read_text()
    assert "digits-5-6-7-8-9" in saved  # a reload finds it again


def test_demo_mode_preselects_the_sample_and_the_starter_model(monkeypatch):
    monkeypatch.setenv("RETRAIN_DEMO", "1")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.session_state["base"] == "builtin:digits-cnn"
    assert "digit 5" in Path(at.session_state["dataset"]).read_text()
    text = _sidebar_text(at)
    assert "Digits CNN (built-in, digits 0-4)" in text and "5 classes" in text
    assert any("Demo" in info.value for info in at.info)


def test_each_page_view_is_logged_with_the_servers_time_when_asked(monkeypatch, tmp_path):
    import json

    log = tmp_path / "pages.jsonl"
    monkeypatch.setenv("RETRAIN_PAGE_LOG", str(log))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["page"] for row in rows] == ["1 · Dataset"]
    assert 0 < rows[0]["seconds"] < 60 and rows[0]["t"] > 0
    monkeypatch.delenv("RETRAIN_PAGE_LOG")
    AppTest.from_file(APP, default_timeout=60).run()
    assert len(log.read_text().splitlines()) == 1  # unset: nothing is written
