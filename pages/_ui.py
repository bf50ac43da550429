"""What every page shares: the session (workspace + remembered choices) and the sidebar.

Session-state keys (the only ones pages use; everything else lives in widgets' own keys):

==================  =====================================================================
``token``           the browser session's unguessable id: from the ``retrain_session``
                    cookie (SameSite=Strict), or derived from the signed-in user; never
                    from the address bar, which grants nothing
``workspace``       ``Path`` of that session's workspace folder
``dataset``         path (str) of the current dataset's manifest.json, or absent
``dataset_label``   one line for the sidebar, e.g. "flowers12: 12 classes, 960 images"
``base``            BASE spec (str) of the chosen base model, e.g. ``builtin:digits-cnn``
``base_label``      one line for the sidebar
``surgery``         dict of the Model page's choices (cut_at, head, freeze), for Train
``run_id``          the run the Train / Evaluate / Export pages show
``train_settings``  dict of the Train form's settings that differ from the defaults
                    (TrainConfig field -> value): what the person set there survives leaving
                    the page, a closed expander and a reload
==================  =====================================================================

Page-private keys start with an underscore (e.g. ``_dataset_upload_seen``, which stops a
rerun from ingesting the same upload twice; ``_touched``, when the workspace was last marked
as in use; ``_demo_preselected``; ``_model_upload_saved``, the upload already saved;
``_session_notice``, the one line shown when an old ``?s=`` link opened a fresh workspace);
widget keys are named in each page. The Train page's settings widgets are keyed by
`TrainConfig` field names (``epochs``, ``lr``, ...); outside that page only
`prefill_train_settings` writes them (Runs' "start a new run from this config").

The remembered choices (all but ``token`` and ``workspace``) are written through to
``<workspace>/session.json``, so a browser reload or a new tab in the same browser (same
cookie) loses nothing. A test (or a trusted caller) may set ``token`` in session state before
the first run to attach the session to that workspace; a browser cannot set session state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import streamlit as st

from retrain.errors import ConfigError, RetrainError
from retrain.sessions.workspace import (
    is_valid_token,
    new_session_token,
    read_json,
    session_workspace,
    user_session_token,
    write_json,
)

#: The cookie that carries the session token (set by the page, read with st.context.cookies).
SESSION_COOKIE = "retrain_session"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
OLD_LINK_NOTICE = (
    "Links no longer open a workspace (the address bar carries nothing private): "
    "this is a fresh workspace of your own."
)

REMEMBERED = (
    "dataset",
    "dataset_label",
    "base",
    "base_label",
    "surgery",
    "run_id",
    "train_settings",
)

# The Model page's choices (the ``surgery`` key): TrainConfig fields that Train and Runs carry.
# ``preprocessing`` is there only when the page found it (probe) or it was set by hand.
SURGERY_KEYS = (
    "cut_at",
    "freeze",
    "hidden_units",
    "dropout",
    "add_conv",
    "binary_sigmoid",
    "preprocessing",
    "keep_old_classes",  # "Add classes, keep the old ones" (with its old data and names)
    "old_data",
    "original_classes",
)

PAGE_FILES = {
    "dataset": "pages/dataset.py",
    "model": "pages/model.py",
    "train": "pages/train.py",
    "evaluate": "pages/evaluate.py",
    "export": "pages/export.py",
    "runs": "pages/runs.py",
    "shared": "pages/shared.py",
}


def demo_mode() -> bool:
    """Whether the app runs as a shared hosted demo (``RETRAIN_DEMO=1``)."""
    return os.environ.get("RETRAIN_DEMO", "") not in ("", "0", "false")


def ensure_session() -> Path:
    """Attach this browser session to its workspace; return it.

    The workspace is the signed-in user's (when sign-in is configured and the user signed
    in), else the one named by this browser's session cookie, else a new one. An old ``?s=``
    link is dropped from the address bar and, when it named another workspace, gets a
    one-line notice (``_session_notice``): the link opens nothing.
    """
    if "workspace" in st.session_state:
        workspace = st.session_state["workspace"]
        if time.time() - st.session_state.get("_touched", 0) > 600:
            # A session in use is not idle: keep the TTL sweep away from it.
            st.session_state["_touched"] = time.time()
            with contextlib.suppress(OSError):
                os.utime(workspace)
        return workspace
    token = st.session_state.get("token")
    if not is_valid_token(token or ""):
        token = signed_in_token() or browser_cookie_token()
    old_link = st.query_params.get("s")
    if old_link is not None:
        del st.query_params["s"]
        if old_link != token:
            st.session_state["_session_notice"] = OLD_LINK_NOTICE
    if not is_valid_token(token or ""):
        token = new_session_token()
    try:
        workspace = session_workspace(token)
    except ConfigError:
        token = new_session_token()
        workspace = session_workspace(token)
    st.session_state["token"] = token
    st.session_state["workspace"] = workspace
    saved = _read_saved(workspace)
    for key in REMEMBERED:
        if key in saved and key not in st.session_state:
            st.session_state[key] = saved[key]
    return workspace


def browser_cookie_token() -> str | None:
    """The session token in this browser's ``retrain_session`` cookie (as the page was
    loaded), or None."""
    try:
        value = st.context.cookies.get(SESSION_COOKIE)
    except (AttributeError, RuntimeError):  # no browser behind this run (bare mode)
        return None
    return value if isinstance(value, str) and is_valid_token(value) else None


def keep_session_cookie() -> None:
    """Make this browser remember the session: a tiny script sets the ``retrain_session``
    cookie (SameSite=Strict, 30 days, Secure on https) when it does not hold the token yet.

    Signed-in users are not written into the cookie (their workspace follows the sign-in);
    the anonymous workspace stays this browser's for when they sign out. Draws nothing
    visible (a zero-height frame); call it once per run, from app.py.
    """
    token = st.session_state.get("token")
    if not is_valid_token(token or "") or st.session_state.get("_signed_in"):
        return
    if browser_cookie_token() == token:
        return
    # st.iframe (components.html's successor) runs the script in a same-origin frame, which
    # may set the app's cookie. The token matches [A-Za-z0-9_-]{16,64} (is_valid_token), so
    # it is safe inside the script; nothing else of the visitor's goes into it.
    st.iframe(
        "<script>(function(){var d=window.parent.document;"
        "var secure=window.parent.location.protocol==='https:'?'; Secure':'';"
        f"d.cookie='{SESSION_COOKIE}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; "
        "SameSite=Strict'+secure;})();</script>",
        height=1,
    )


def session_notice() -> str | None:
    """The one-line notice for this session (an old ``?s=`` link opened a fresh workspace)."""
    return st.session_state.get("_session_notice")


# --------------------------------------------------------------------------- sign-in


def auth_settings() -> dict[str, Any] | None:
    """The ``[auth]`` section of the deployment's secrets, or None (anonymous use only)."""
    try:
        auth = st.secrets.get("auth")
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return dict(auth) if auth else None


def _providers(auth: dict[str, Any]) -> list[str | None]:
    """Named providers (``[auth.<name>]``), or ``[None]`` for a single unnamed one."""
    named = [k for k, v in auth.items() if isinstance(v, dict) and "client_id" in v]
    return named or ([None] if "client_id" in auth else [])


def signed_in_token() -> str | None:
    """The workspace token of the signed-in user (same on every browser), or None."""
    auth = auth_settings()
    if not auth:
        return None
    try:
        if not st.user.is_logged_in:
            return None
        user = st.user.to_dict()
    except (AttributeError, KeyError):
        return None
    subject = str(user.get("sub") or user.get("email") or "")
    try:
        token = user_session_token(
            str(auth.get("cookie_secret", "")), str(user.get("iss", "")), subject
        )
    except ConfigError:  # no secret or no user id: stay anonymous rather than share one
        return None
    st.session_state["_signed_in"] = True
    return token


def render_account() -> None:
    """Sign in / sign out in the sidebar, only when the deployment configured sign-in."""
    auth = auth_settings()
    if not auth:
        return
    providers = _providers(auth)
    with st.sidebar:
        if st.session_state.get("_signed_in"):
            who = st.user.get("name") or st.user.get("email") or "you"
            st.caption(f"Signed in as {as_text(str(who))}: this workspace is yours on any browser.")
            if st.button("Sign out", key="account_sign_out"):
                for key in ("token", "workspace", "_signed_in", *REMEMBERED):
                    st.session_state.pop(key, None)
                st.logout()
        elif providers:
            st.caption("Sign in to keep your workspace across browsers.")
            for provider in providers:
                label = f"Sign in with {provider}" if provider else "Sign in"
                if st.button(label, key=f"account_sign_in_{provider or 'default'}"):
                    for key in ("token", "workspace", *REMEMBERED):
                        st.session_state.pop(key, None)
                    if provider:
                        st.login(provider)
                    else:
                        st.login()


# --------------------------------------------------------------------------- text


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~$])")
_LEADING_MARKER = re.compile(r"^([-+=]|\d+[.)])")


def as_text(value: Any) -> str:
    """``value`` escaped for Streamlit Markdown (captions, info boxes, the sidebar), so a
    name like ``<img src=x onerror=alert(1)>`` or ``[x](http://...)`` shows as those
    characters, never as markup, a link, a list or LaTeX."""
    text = " ".join(str(value).split())  # no new lines: a name stays on its line
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return _LEADING_MARKER.sub(lambda m: m[0][:-1] + "\\" + m[0][-1], text)


def _read_saved(workspace: Path) -> dict[str, Any]:
    saved = read_json(workspace / "session.json")
    return saved if isinstance(saved, dict) else {}


@st.cache_resource(show_spinner=False, max_entries=16)
def _dataset_at(manifest: str, mtime_ns: int) -> Any:
    from retrain.data import load_dataset

    return load_dataset(manifest)


def load_dataset_cached(manifest: str) -> Any:
    """The `retrain.data.Dataset` of ``manifest``, parsed once per version of the file.

    Pages rerun on every click; a large manifest takes tens of ms to parse each time.
    Datasets are frozen, so one object is shared safely.

    Raises:
        DatasetError: the manifest is missing or unreadable.
    """
    try:
        mtime_ns = Path(manifest).stat().st_mtime_ns
    except OSError:
        from retrain.data import load_dataset

        return load_dataset(manifest)  # raises its own one-line DatasetError
    return _dataset_at(str(manifest), mtime_ns)


def dataset_label(dataset: Any) -> str:
    """The sidebar's one line for a `retrain.data.Dataset`."""
    return f"{dataset.name}: {len(dataset.class_names)} classes, {dataset.num_images():,} images"


def preselect_demo(workspace: Path) -> None:
    """In demo mode, choose the sample digits and the starter model for a new session.

    So the banner's promise holds: a visitor can go straight to Train. Once per session;
    what the visitor chooses afterwards is kept.
    """
    if not demo_mode() or st.session_state.get("_demo_preselected"):
        return
    st.session_state["_demo_preselected"] = True
    if not st.session_state.get("dataset"):
        from retrain.data import ingest
        from retrain.data.sample import sample_dataset
        from retrain.sessions.workspace import home

        with st.spinner("Preparing the sample digits…"):
            dataset = ingest(sample_dataset(home()), workspace)
        remember(dataset=str(dataset.manifest_path), dataset_label=dataset_label(dataset))
    if not st.session_state.get("base"):
        from retrain.models import BUILTIN_LABELS

        remember(base="builtin:digits-cnn", base_label=BUILTIN_LABELS["digits-cnn"])


def remember(**values: Any) -> None:
    """Set remembered keys in session state and write them to ``session.json``.

    A value of ``None`` forgets the key.
    """
    for key, value in values.items():
        if key not in REMEMBERED:
            raise KeyError(f"{key!r} is not a remembered session key; see pages/_ui.py")
        if value is None:
            st.session_state.pop(key, None)
        else:
            st.session_state[key] = value
    workspace = ensure_session()
    data = {k: st.session_state[k] for k in REMEMBERED if k in st.session_state}
    write_json(workspace / "session.json", data)


def prefill_train_settings(settings: dict[str, Any]) -> None:
    """Fill the Train page's settings form with a run's settings (`TrainConfig.to_dict()`).

    The form's widgets are keyed by TrainConfig field names. The data, base model and the
    Model page's choices are not settings of the form (they are remembered keys); in demo
    mode the epochs keep the demo's default, which the demo caps.
    """
    skipped = {"data", "base", "out", *SURGERY_KEYS}
    if demo_mode():
        skipped.add("epochs")
    for name, value in settings.items():
        if name not in skipped:
            st.session_state[name] = value


OLD_DATA_SOURCES = {
    "sample": "The built-in sample's digits 0-4 (the starter model's original task)",
    "upload": "Upload the original task's images (zip of class folders)",
    "none": "None: distillation only (keeps far less of the old task; old images help most)",
}


def saved_upload(folder: Path, upload: Any, default_name: str = "upload") -> str | None:
    """Save a file the visitor uploaded under ``folder`` (`save_upload`); its path, or None
    after showing the one-line refusal (the session's upload rate or disk quota,
    `retrain.sessions.quotas`) where the uploader is."""
    from retrain.sessions.uploads import save_upload

    try:
        return str(save_upload(folder, upload.name, upload.getvalue(), default_name=default_name))
    except RetrainError as err:
        st.error(str(err))
        return None


def old_data_picker(workspace: Path, base_spec: str, key: str) -> str | None:
    """The original task's images for "Add classes, keep the old ones"; a path or None.

    Offers the built-in digits 0-4 for the starter model, an upload, or none; starts from
    what the Model page remembered (``surgery["old_data"]``). Before anything was chosen in
    keep mode, the built-in digits where they are offered: rehearsal keeps far more of the
    old task than distillation alone (docs/benchmarks.md, issue 10).
    """
    surgery = st.session_state.get("surgery") or {}
    remembered = surgery.get("old_data")
    sources = [s for s in OLD_DATA_SOURCES if s != "sample" or base_spec.startswith("builtin:")]
    if remembered:
        start = "sample" if "digits-0-1-2-3-4" in remembered else "upload"  # sample_dataset's
    else:  # "none" once chosen in keep mode; the built-in digits before that
        start = "none" if surgery.get("keep_old_classes") else "sample"
    source = st.radio(
        "The original task's images",
        sources,
        index=sources.index(start) if start in sources else len(sources) - 1,
        format_func=OLD_DATA_SOURCES.get,
        key=f"{key}_old_source",
        help="With them: a few images per old class are rehearsed every epoch and the rest "
        "measure the old task live. Without: distillation, and no live old-task measure.",
    )
    if source == "sample":
        from retrain.data.sample import sample_dataset

        return str(sample_dataset(workspace, "0-4"))
    if source == "none":
        return None
    upload = st.file_uploader(OLD_DATA_SOURCES["upload"], type=["zip"], key=f"{key}_old_upload")
    if upload is not None:
        return saved_upload(workspace / "uploads", upload)
    if remembered and Path(remembered).exists() and start == "upload":
        st.caption(f"Using the images uploaded earlier: {Path(remembered).name}")
        return remembered
    return None


#: The library speaks the CLI's flags. On the Model and Evaluate pages the names of the
#: original outputs are typed in a box above the message: these say so in the page's words.
ORIGINAL_NAMES_WORDS = (
    ('pass --original-classes "a,b,..." (', "type the names of its outputs in the box above ("),
    (
        ") or the old data (its class folders, sorted).",
        "), or choose the original task's images above (their class folders, sorted, name them).",
    ),
    ("pass --original-classes", "type the names of its outputs in the box above"),
    ("given with --original-classes", "typed in the box above"),
    ("--original-classes names", "The box above names"),
    ("--original-classes '", "The output names '"),
    ("--original-classes", "the names box above"),
)


def page_words(text: str, words: tuple[tuple[str, str], ...] = ORIGINAL_NAMES_WORDS) -> str:
    """``text`` with the CLI flags it names replaced by what a person does on the page."""
    for flag, replacement in words:
        text = text.replace(flag, replacement)
    return text


def link(page: str, label: str, icon: str = ":material/arrow_forward:") -> None:
    """A link to another step; plain text when the page runs outside the app's navigation
    (a page opened on its own, as page tests do)."""
    from streamlit.errors import StreamlitPageNotFoundError

    try:
        st.page_link(PAGE_FILES[page], label=label, icon=icon)
    except StreamlitPageNotFoundError:
        st.markdown(f"→ {label} ({page.capitalize()} in the sidebar)")


def require(key: str, message: str, page: str) -> Any:
    """Return ``st.session_state[key]``, or explain what is missing, link to ``page`` and stop."""
    value = st.session_state.get(key)
    if value:
        return value
    st.info(message)
    link(page, f"Go to {page.capitalize()}")
    st.stop()


def require_finished_run(workspace: Path, action: str) -> Path:
    """Return the remembered run's folder if it finished; else say why not, link to Train, stop.

    ``action`` completes "... it once it is done" (e.g. "evaluate", "export").
    """
    from retrain.errors import RetrainError
    from retrain.runs import jobs
    from retrain.sessions.workspace import run_path

    run_id = require(
        "run_id", f"Train a model first: this page needs a finished run to {action}.", "train"
    )
    try:
        run_dir = run_path(workspace, run_id)
        state = jobs.read_status(run_dir).get("state", "unknown")
    except RetrainError:
        state = "missing"
    if state == "done":
        return run_dir
    if state == "missing":
        st.info(f"Run '{run_id}' is not in this session. Train a model or pick one on Runs.")
    else:
        st.info(f"Run '{run_id}' is {state}: {action} it once it is done.")
    link("train", "Go to Train")
    st.stop()


def sidebar_choices() -> tuple[tuple[str, str | None], ...]:
    """What the sidebar shows: (step, chosen value or None) for each step."""
    return (
        ("Dataset", st.session_state.get("dataset_label")),
        ("Base model", st.session_state.get("base_label")),
        ("Run", st.session_state.get("run_id")),
    )


def log_page_time(page: str, seconds: float) -> None:
    """Append ``{"t", "page", "seconds"}`` to the file ``RETRAIN_PAGE_LOG`` names, when set: the
    server's time for one page view (the script run), to find slow pages on a live host and to
    tell the server's share of a page load from the browser's (`bench/load.py` reads it)."""
    path = os.environ.get("RETRAIN_PAGE_LOG")
    if not path:
        return
    line = json.dumps({"t": round(time.time(), 3), "page": page, "seconds": round(seconds, 4)})
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def render_sidebar(slot: Any) -> tuple[tuple[str, str | None], ...]:
    """Draw the guided flow's choices so far into ``slot`` (a sidebar `st.empty`), each ticked
    once made; return what was drawn. Drawn again into the same slot, it replaces the first."""
    rows = sidebar_choices()
    with slot.container():
        st.caption("YOUR CHOICES")
        for title, value in rows:
            icon = ":material/check_circle:" if value else ":material/radio_button_unchecked:"
            st.markdown(f"{icon} **{title}:** {as_text(value) if value else '_not yet_'}")
    return rows
