"""Model work from a page: send a request to the model workers, show the wait, draw the answer.

The web server never imports an ML framework. `model_answer` sends one request
(`retrain.service.ask`), shows the visitor their place in the queue with a Cancel button (or
the progress of a long request), and returns the JSON answer, or None after showing the
request's one-line error (with a Retry button when the worker died).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import streamlit as st

from retrain.errors import RetrainError
from retrain.service import WorkerLost, ask, cached, cancel, prefetch, warm_up

#: The base the Model page starts from when the session has not chosen one.
DEFAULT_BASE = "builtin:digits-cnn"


@st.cache_resource(show_spinner=False)
def start_model_workers() -> str:
    """Start the warm model workers with the server's first page view (once per server)."""
    try:
        return warm_up()
    except RetrainError as err:  # e.g. a bad RETRAIN_MODEL_WORKERS: said again on first use
        return f"not started: {err}"


def _widget_key(kind: str, args: dict[str, Any]) -> str:
    text = json.dumps({"kind": kind, "args": args}, sort_keys=True, default=str)
    return f"_svc_{kind}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def model_answer(
    kind: str,
    label: str,
    *,
    show_errors: bool = True,
    progress_bar: bool = False,
    words: Callable[[str], str] | None = None,
    **args: Any,
) -> dict[str, Any] | None:
    """The answer of the model request ``kind(**args)``, waiting for it on the page.

    Args:
        kind: a request kind (`retrain.service.kinds.KINDS`).
        label: what is being done, in the user's words ("Reading the model").
        show_errors: show a failed request's one line here (else the caller gets None only).
        progress_bar: draw the request's progress reports as a bar (exports).
        words: rewrites an error's text in the page's words (CLI flags -> page controls).
        **args: the request's arguments.

    Returns:
        The JSON answer, or None when the request failed or was cancelled.
    """
    session = st.session_state.get("token", "")
    key = _widget_key(kind, args)
    if st.session_state.get(f"{key}_cancel"):
        del st.session_state[f"{key}_cancel"]  # once: "Ask again" sends the request again
        cancel(kind, session, **args)
        st.info(f"{label}: cancelled.")
        st.button("Ask again", key=f"{key}_again")
        return None
    message = st.empty()
    bar = st.empty() if progress_bar else None
    button = st.empty()
    shown = {"button": False}

    def on_wait(status: dict[str, Any]) -> None:  # about twice a second (retrain.service)
        if status.get("state") == "queued":
            ahead = (status.get("position") or 1) - 1
            busy = status.get("running") or 0
            where = f"{ahead} request{'s' if ahead != 1 else ''} before yours" if ahead else "next"
            if status.get("workers_ready") == 0 and not busy:
                text = f"{label}: starting a model worker (TensorFlow loads once, about 10 s)…"
            else:
                text = f"{label}: waiting for a model worker ({where}; {busy} being answered)."
            message.info(text, icon=":material/hourglass_top:")
            if not shown["button"]:
                shown["button"] = True
                button.button("Cancel", key=f"{key}_cancel")
            return
        progress = status.get("progress") or {}
        text = progress.get("text") or ""
        if bar is not None and progress:
            bar.progress(min(max(float(progress.get("fraction") or 0.0), 0.0), 1.0), text=text)
        message.info(f"{label}…" + (f" {text}" if text and bar is None else ""))

    try:
        answer = ask(kind, session=session, on_wait=on_wait, **args)
    except WorkerLost as err:
        message.empty()
        button.empty()
        st.error(str(err))
        st.button("Retry", key=f"{key}_retry", type="primary")
        return None
    except RetrainError as err:
        message.empty()
        button.empty()
        if show_errors:
            st.error(words(str(err)) if words else str(err))
        return None
    message.empty()
    button.empty()
    if bar is not None:
        bar.empty()
    return answer


def default_head_choice(info: dict[str, Any]) -> dict[str, Any]:
    """The Model page's choice before anything is touched, for the base ``info`` describes
    (`models.describe`): replace the classifier after the suggested cut, base frozen, no
    hidden layer, dropout 0.2, no conv block, softmax."""
    names = [row["name"] for row in info["layers"]]
    return {
        "cut_at": info["suggested_cut"] if info["suggested_cut"] in names else names[-1],
        "freeze": "all",
        "hidden_units": 0,
        "dropout": 0.2,
        "add_conv": 0,
        "binary_sigmoid": False,
    }


def prefetch_model_page(num_classes: int, workspace: str) -> bool:
    """A new dataset of ``num_classes`` classes: queue the Model page's new head now (its
    layer table, when even that is not known yet), so the page draws at once when the visitor
    gets there. Never waits; nothing for "add classes, keep the old ones" (asked by names).
    Returns whether a request was queued."""
    spec = st.session_state.get("base") or DEFAULT_BASE
    surgery = st.session_state.get("surgery") if st.session_state.get("base") == spec else None
    if surgery and surgery.get("keep_old_classes"):
        return False
    session = st.session_state.get("token", "")
    try:
        info = cached("describe", spec=spec)
        if info is None:
            return prefetch("describe", session=session, spec=spec, workspace=workspace)
        return prefetch(
            "head_preview",
            session=session,
            spec=spec,
            choice=surgery or default_head_choice(info),
            workspace=workspace,
            num_classes=num_classes,
        )
    except RetrainError:  # no worker could start: the Model page says why when it asks
        return False
