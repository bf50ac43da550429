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


def test_waiting_shows_the_place_in_the_queue(monkeypatch):
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
        return box

    monkeypatch.setattr(service_page.st, "empty", spy_empty)
    at = _app().run()
    assert not at.exception
    assert any("2 requests before yours; 1 being answered" in text for text in seen), seen
