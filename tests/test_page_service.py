"""pages/_service.model_answer: what a visitor sees when a model request fails or waits."""

from __future__ import annotations

import pages._service as service_page
from retrain.errors import ModelError
from retrain.service import WorkerLost
from retrain.service.queue import WORKER_LOST


def _script():
    import streamlit as st

    from pages._service import model_answer

    answer = model_answer("base_head", "Reading the model", spec="builtin:digits-cnn")
    st.write(f"answer: {answer}")


def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_function(_script, default_timeout=30)


def test_a_lost_worker_is_one_line_with_a_retry_that_asks_again(monkeypatch):
    calls = []

    def lost(kind, **args):
        calls.append(kind)
        if len(calls) == 1:
            raise WorkerLost(WORKER_LOST)
        return {"has_head": True}

    monkeypatch.setattr(service_page, "ask", lost)
    at = _app().run()
    assert [e.value for e in at.error] == [WORKER_LOST]
    assert "\n" not in at.error[0].value
    retry = [b for b in at.button if b.label == "Retry"]
    assert len(retry) == 1
    retry[0].click().run()
    assert not at.error
    assert any("answer: {'has_head': True}" in m.value for m in at.markdown)
    assert calls == ["base_head", "base_head"]


def test_a_refusal_is_shown_as_its_line_and_nothing_else(monkeypatch):
    def refuse(kind, **args):
        raise ModelError("'x.keras' declares 9.2 GB of weights; refused.")

    monkeypatch.setattr(service_page, "ask", refuse)
    at = _app().run()
    assert [e.value for e in at.error] == ["'x.keras' declares 9.2 GB of weights; refused."]
    assert not at.exception
    assert any("answer: None" in m.value for m in at.markdown)


def test_waiting_shows_the_place_in_the_queue_and_a_cancel_button(monkeypatch):
    def queued(kind, on_wait=None, **args):
        on_wait({"state": "queued", "position": 3, "running": 1, "workers_ready": 1})
        return {"has_head": True}

    monkeypatch.setattr(service_page, "ask", queued)
    seen = []
    real_info = service_page.st.empty

    def spy_empty():
        box = real_info()
        original = box.info

        def info(text, **kwargs):
            seen.append(text)
            return original(text, **kwargs)

        box.info = info
        original_button = box.button

        def button(label, **kwargs):
            seen.append(f"button: {label}")
            return original_button(label, **kwargs)

        box.button = button
        return box

    monkeypatch.setattr(service_page.st, "empty", spy_empty)
    at = _app().run()
    assert not at.exception
    assert any("2 requests before yours; 1 being answered" in text for text in seen), seen
    assert "button: Cancel" in seen


def test_cancel_takes_the_request_out_of_the_queue_and_ask_again_asks(monkeypatch):
    """The Cancel button (drawn while waiting) reruns the page with its state set: the request
    leaves the queue, the page says so, and "Ask again" sends it again."""
    asked, cancelled = [], []

    def answer(kind, on_wait=None, **args):
        asked.append(kind)
        return {"has_head": True}

    monkeypatch.setattr(service_page, "ask", answer)
    monkeypatch.setattr(
        service_page, "cancel", lambda kind, session, **args: cancelled.append(kind)
    )
    at = _app()
    key = service_page._widget_key("base_head", {"spec": "builtin:digits-cnn"})
    at.session_state[f"{key}_cancel"] = True  # what clicking Cancel leaves for the rerun
    at.run()
    assert cancelled == ["base_head"] and asked == []
    assert any("cancelled" in i.value for i in at.info)
    again = [b for b in at.button if b.label == "Ask again"]
    again[0].click().run()
    assert asked == ["base_head"]
    assert any("answer: {'has_head': True}" in m.value for m in at.markdown)
