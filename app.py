"""Retrain Studio: the entry point (``streamlit run app.py``).

Builds the navigation over pages/ and the shared sidebar. Imports no TensorFlow, so the
first page renders in about a second. ``/?share=<id>`` opens only the read-only Shared model
page (pages/shared.py); the visitor still gets a workspace of their own (for "Copy to my
workspace"), and nothing of the owner's.
"""

import threading
import time

import streamlit as st

from pages._service import start_model_workers
from pages._ui import (
    PAGE_FILES,
    demo_mode,
    ensure_session,
    keep_session_cookie,
    log_page_time,
    preselect_demo,
    render_account,
    render_sidebar,
    session_notice,
    sidebar_choices,
)
from retrain.runs.jobs import session_has_live_run
from retrain.sessions.share import prune_shares
from retrain.sessions.workspace import cleanup_sessions

STARTED = time.perf_counter()  # this script run's start: the server's time for the page view
st.set_page_config(
    page_title="Retrain Studio", page_icon=":material/model_training:", layout="wide"
)
workspace = ensure_session()


@st.cache_resource(ttl="1h", show_spinner=False)
def _clean_idle_sessions() -> threading.Thread:
    """Delete idle session workspaces older than the TTL, at most once an hour per server.

    Runs in a background thread so a large deletion never delays a page. The cached value
    expires after an hour; the next page view after that starts the next sweep.
    """

    def sweep_all() -> None:
        cleanup_sessions(session_has_live_run)
        prune_shares()  # shares outlive sessions; an expired one keeps only its "expired" note

    sweep = threading.Thread(target=sweep_all, name="retrain-cleanup", daemon=True)
    sweep.start()
    return sweep


_clean_idle_sessions()
start_model_workers()  # warm model workers with the first page view: TF loads there

shared_view = st.query_params.get("share") is not None
if shared_view:
    page = st.navigation(
        [st.Page(PAGE_FILES["shared"], title="Shared model", icon=":material/share:")],
        position="hidden",
    )
else:
    steps = [
        st.Page(
            PAGE_FILES["dataset"], title="1 · Dataset", icon=":material/folder_zip:", default=True
        ),
        st.Page(PAGE_FILES["model"], title="2 · Model", icon=":material/account_tree:"),
        st.Page(PAGE_FILES["train"], title="3 · Train", icon=":material/monitoring:"),
        st.Page(PAGE_FILES["evaluate"], title="4 · Evaluate", icon=":material/fact_check:"),
        st.Page(PAGE_FILES["export"], title="5 · Export", icon=":material/download:"),
    ]
    history = [st.Page(PAGE_FILES["runs"], title="Runs", icon=":material/history:")]
    page = st.navigation({"Retrain a model": steps, "History": history})
    preselect_demo(workspace)

with st.sidebar:
    st.markdown("### Retrain Studio")
    st.caption("Retrain a Keras image classifier on your own images.")
    keep_session_cookie()
render_account()
if session_notice():
    st.info(session_notice(), icon=":material/lock:")
if demo_mode() and not shared_view:
    st.info(
        "**Demo:** retrains a small digit classifier (trained on digits 0-4) to recognise "
        "digits 5-9. The sample data and starter model are preselected and epochs are capped; "
        "run it locally for your own data and bigger models.",
        icon=":material/info:",
    )
try:
    if shared_view:
        page.run()
    else:
        choices = st.sidebar.empty()
        shown = render_sidebar(choices)
        try:
            page.run()
        finally:  # after st.stop too
            if sidebar_choices() != shown:
                # The page just chose something (a dataset, a model, a run): the sidebar is
                # drawn again in its place, so it never lags a page behind. (A rerun did this
                # before: the whole page drawn twice, on the server and in the browser.)
                render_sidebar(choices)
finally:  # st.stop and st.rerun end a run by raising: they are page views too
    log_page_time(page.title, time.perf_counter() - STARTED)
