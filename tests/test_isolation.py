"""Session isolation on a shared host: one browser session never reaches another's files.

Two sessions (two tokens, two workspaces) are set up side by side. User-supplied names (run
ids, tokens, upload file names, zip entries) must never resolve outside the session's own
workspace, the Runs page of one session must not list the other's runs, and the TTL cleaner
deletes only idle sessions.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_run_dir
from PIL import Image

from retrain.errors import ConfigError
from retrain.runs import rundir
from retrain.runs.jobs import session_has_live_run
from retrain.sessions.workspace import (
    cleanup_sessions,
    home,
    is_valid_token,
    is_within,
    new_session_token,
    run_path,
    runs_dir,
    session_workspace,
)

ROOT = Path(__file__).resolve().parents[1]

# Names a hostile client can send as a run id (query parameter, widget value, CLI argument).
HOSTILE_RUN_IDS = [
    "",
    ".",
    "..",
    "../other",
    "../../sessions",
    "run/../../x",
    "a/b",
    "a\\b",
    "/etc/passwd",
    "/",
    "~",
    "~/x",
    ".hidden",
    "run..x",
    "run\x00x",
    "run\nx",
    "%2e%2e",
    "%2e%2e%2fetc",
    "C:\\Windows",
    "r" * 200,
]

HOSTILE_TOKENS = [
    "",
    "short",
    "../../../../../../tmp",
    "aaaaaaaaaaaaaaaa/../../x",
    "/abs/aaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaa\x00",
    "a" * 65,
    "................",
    "aaaa aaaa aaaa aaaa",
]


@pytest.fixture
def two_sessions() -> tuple[tuple[str, Path], tuple[str, Path]]:
    """Two browser sessions A and B: ``((token_a, workspace_a), (token_b, workspace_b))``."""
    token_a, token_b = new_session_token(), new_session_token()
    return (token_a, session_workspace(token_a)), (token_b, session_workspace(token_b))


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_run(
    workspace: Path, run_id: str, classes: list[str], state: str = "done", **status
) -> Path:
    """A finished run directory as the worker writes it (DESIGN.md), without training."""
    run_dir = run_path(workspace, run_id)
    config = {
        "data": str(workspace / "datasets" / "secret" / "manifest.json"),
        "base": "builtin:digits-cnn",
        "out": str(run_dir),
        "epochs": 2,
        "batch_size": 32,
        "lr": 0.001,
        "class_names": classes,
        "dataset_id": "0123456789abcdef",
    }
    lines = [
        {"epoch": e, "phase": "head", "loss": 1.0 / e, "accuracy": 0.5 + e / 10, "val_loss": 1.1,
         "val_accuracy": 0.5 + e / 10, "lr": 0.001, "seconds": 1.0}
        for e in (1, 2)
    ]  # fmt: skip
    return write_run_dir(
        run_dir,
        config,
        status={"state": state, "run_id": run_id, "started": time.time() - 60, **status},
        metrics=lines,
    )


# --------------------------------------------------------------------------- workspaces


def test_each_session_gets_its_own_unguessable_workspace(two_sessions):
    (token_a, ws_a), (token_b, ws_b) = two_sessions
    assert token_a != token_b
    assert len(token_a) >= 22 and is_valid_token(token_a)  # 128 bits, URL-safe
    assert ws_a != ws_b
    assert ws_a.parent == ws_b.parent == home() / "sessions"
    assert not is_within(ws_a, ws_b) and not is_within(ws_b, ws_a)
    # The same token finds the same workspace again (a browser reload).
    assert session_workspace(token_a) == ws_a


@pytest.mark.parametrize("token", HOSTILE_TOKENS)
def test_hostile_session_tokens_are_refused(token):
    def snapshot() -> tuple[set[Path], set[Path]]:
        # Everything under home, and what sits beside it (where "../x" tokens would land).
        return _all_files(home()) | set(home().rglob("*")), set(home().parent.iterdir())

    before = snapshot()
    with pytest.raises(ConfigError, match="Invalid session id"):
        session_workspace(token)
    assert snapshot() == before
    assert not (home() / "sessions").exists() or all(
        is_valid_token(p.name) for p in (home() / "sessions").iterdir()
    )


# --------------------------------------------------------------------------- run ids


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS)
def test_hostile_run_ids_never_become_paths(two_sessions, run_id):
    (_, ws_a), _ = two_sessions
    with pytest.raises(ConfigError, match="not a valid run id"):
        run_path(ws_a, run_id)


def test_run_ids_resolve_inside_their_own_workspace_only(two_sessions):
    (_, ws_a), (_, ws_b) = two_sessions
    b_run = _fake_run(ws_b, "run-20261126-101500-b0b0", ["digit 5", "digit 6"])
    # Session A asking for B's run id gets a folder in A's workspace, which does not exist.
    seen_from_a = run_path(ws_a, b_run.name)
    assert is_within(seen_from_a, ws_a)
    assert not is_within(seen_from_a, ws_b)
    assert not seen_from_a.exists()
    for run_id in ["run-1", "run-20261126-101500-a1b2", "my.run_2", "A" * 81]:
        assert is_within(run_path(ws_a, run_id), runs_dir(ws_a))


def test_is_within_is_not_fooled_by_prefixes_dots_or_symlinks(two_sessions, tmp_path):
    (token_a, ws_a), (_, ws_b) = two_sessions
    assert is_within(ws_a / "runs" / "x", ws_a)
    assert is_within(ws_a, ws_a)
    assert not is_within(ws_a / ".." / ws_b.name, ws_a)
    assert not is_within(ws_a / "runs" / ".." / ".." / ws_b.name / "session.json", ws_a)
    # A sibling whose name starts with A's token is not inside A (string-prefix trap).
    sibling = ws_a.parent / (token_a + "x")
    sibling.mkdir()
    assert not is_within(sibling / "f", ws_a)
    # A symlink planted inside A that points at B resolves to B: not inside A.
    link = ws_a / "link"
    link.symlink_to(ws_b, target_is_directory=True)
    assert not is_within(link / "session.json", ws_a)
    assert not is_within(Path("/etc/passwd"), ws_a)


# --------------------------------------------------------------------------- uploads


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _hostile_zip() -> bytes:
    """Two valid classes plus entries that try to escape (zip slip, absolute, backslashes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label, cls in enumerate(["cat", "dog"]):
            for i in range(4):
                zf.writestr(f"{cls}/{i}.png", _png_bytes(label * 10 + i))
        zf.writestr("../escaped.png", _png_bytes(90))
        zf.writestr("cat/../../escaped2.png", _png_bytes(91))
        zf.writestr("/tmp/escaped3.png", _png_bytes(92))
        zf.writestr("..\\escaped4.png", _png_bytes(93))
    return buf.getvalue()


def _new_files_outside(before: set[Path], root: Path, workspace: Path) -> list[Path]:
    """Files created under ``root`` since ``before`` that are not inside ``workspace``."""
    shared = [home() / "keras", home() / "queue"]  # host-wide caches are allowed
    return sorted(
        p
        for p in _all_files(root) - before
        if not is_within(p, workspace) and not any(is_within(p, s) for s in shared)
    )


def test_hostile_zip_extracts_only_inside_its_workspace(two_sessions, tmp_path):
    data = pytest.importorskip("retrain.data", reason="retrain.data is not written yet")
    (_, ws_a), (_, ws_b) = two_sessions
    upload = tmp_path / "upload" / "hostile.zip"
    upload.parent.mkdir()
    upload.write_bytes(_hostile_zip())
    before_home = _all_files(home())
    before_tmp = _all_files(tmp_path)
    dataset = data.ingest(upload, ws_a)
    assert dataset.class_names == ["cat", "dog"]
    assert is_within(dataset.root, ws_a)
    assert _new_files_outside(before_home, home(), ws_a) == []
    assert _all_files(tmp_path) == before_tmp
    assert not list(ws_b.rglob("*.png"))
    assert not Path("/tmp/escaped3.png").exists()


def test_upload_file_name_cannot_escape_the_workspace(two_sessions):
    """The Dataset page must not use the browser-supplied file name as a path."""
    (token_a, ws_a), (_, ws_b) = two_sessions
    at = _open_page("dataset", token_a).run()
    try:
        uploader = at.get("file_uploader")
        uploader = next(w for w in uploader if w.key == "dataset_upload")
    except StopIteration:
        pytest.skip("pages/dataset.py has no file uploader with key 'dataset_upload' yet")
    before = _all_files(home())
    evil_name = "../../" + ws_b.name + "/evil.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label, cls in enumerate(["cat", "dog"]):
            for i in range(3):
                zf.writestr(f"{cls}/{i}.png", _png_bytes(label * 10 + i))
    uploader.set_value((evil_name, buf.getvalue(), "application/zip")).run()
    assert not at.exception
    manifest = at.session_state.get("dataset")
    assert manifest, "the upload should have become the session's dataset"
    assert is_within(Path(manifest), ws_a)
    assert _new_files_outside(before, home(), ws_a) == []
    assert not (ws_b / "evil.zip").exists()
    assert "evil.zip" not in {p.name for p in ws_b.rglob("*")}


# --------------------------------------------------------------------------- pages


def _open_page(page: str, token: str, **query: str):
    """Run ``app.py`` (navigation, sidebar) as session ``token`` and open ``pages/<page>.py``."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["token"] = token  # as the browser's session cookie names it
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at.switch_page(f"pages/{page}.py")


def _page_text(at) -> str:
    """Everything a user can read on an AppTest page (markdown, tables, metrics, widgets)."""
    parts: list[str] = []
    for node in at.main:
        parts.append(_node_text(node))
    for node in at.sidebar:
        parts.append(_node_text(node))
    return "\n".join(parts)


def _node_text(node) -> str:
    out: list[str] = []
    for attr in ("value", "label", "body", "options"):
        try:
            value = getattr(node, attr, None)
        except (ValueError, TypeError, KeyError):  # some elements have no such value
            continue
        if hasattr(value, "to_csv"):  # DataFrames: every cell, untruncated
            out.append(value.to_csv())
        elif value is not None and not callable(value):
            out.append(str(value))
    proto = getattr(node, "proto", None)
    if proto is not None:
        out.append(str(proto))
    for child in getattr(node, "children", {}).values():
        out.append(_node_text(child))
    return "\n".join(out)


def test_runs_page_shows_only_this_sessions_runs(two_sessions):
    pytest.importorskip("retrain.runs.jobs", reason="retrain.runs.jobs is not written yet")
    (token_a, ws_a), (_, ws_b) = two_sessions
    a_run = _fake_run(ws_a, "run-20261126-090000-aaaa", ["digit 5", "digit 6"])
    b_run = _fake_run(ws_b, "run-20261126-091500-bbbb", ["secret-b-1", "secret-b-2"])

    at = _open_page("runs", token_a).run()
    assert not at.exception, at.exception
    text = _page_text(at)
    assert a_run.name in text, "the Runs page should list this session's own run"
    assert b_run.name not in text
    assert "secret-b" not in text
    assert ws_b.name not in text


@pytest.mark.parametrize("page", ["train", "evaluate", "export"])
def test_another_sessions_run_id_in_the_link_shows_nothing_of_it(two_sessions, page):
    """``?run=<B's run id>`` opened in session A must not reach B's run directory."""
    pytest.importorskip("retrain.runs.jobs", reason="retrain.runs.jobs is not written yet")
    (token_a, _), (_, ws_b) = two_sessions
    b_run = _fake_run(ws_b, "run-20261126-091500-bbbb", ["secret-b-1", "secret-b-2"])
    at = _open_page(page, token_a, run=b_run.name)
    at.session_state["run_id"] = b_run.name
    at.run()
    assert not at.exception, f"a stale or foreign run id must not crash the page: {at.exception}"
    text = _page_text(at)
    assert "secret-b" not in text
    assert ws_b.name not in text
    assert not at.get("download_button"), "no download may be offered for another's run"


# --------------------------------------------------------------------------- TTL cleanup


def _age(folder: Path, seconds: float, now: float) -> None:
    """Make every file and folder under ``folder`` look untouched for ``seconds``."""
    stamp = now - seconds
    for p in sorted(folder.rglob("*"), reverse=True):
        os.utime(p, (stamp, stamp))
    os.utime(folder, (stamp, stamp))


def test_cleanup_deletes_idle_sessions_and_keeps_active_and_running_ones():
    now = time.time()
    day = 24 * 3600
    idle = session_workspace(new_session_token())
    (idle / "session.json").write_text("{}")
    _fake_run(idle, "run-old", ["a", "b"], state="done")
    recent = session_workspace(new_session_token())
    (recent / "session.json").write_text("{}")
    running = session_workspace(new_session_token())
    _fake_run(running, "run-live", ["a", "b"], state="running", pid=os.getpid())
    crashed = session_workspace(new_session_token())  # says running, but its worker is gone
    _fake_run(crashed, "run-dead", ["a", "b"], state="running", pid=_dead_pid())
    active_run = session_workspace(new_session_token())
    _fake_run(active_run, "run-writing", ["a", "b"], state="done")
    not_a_session = home() / "sessions" / "README"
    not_a_session.mkdir()
    keras_cache = home() / "keras"
    keras_cache.mkdir(exist_ok=True)  # (conftest links the run's built-in model folder there)
    (keras_cache / "weights.h5").write_bytes(b"x")

    _age(idle, 2 * day, now)
    _age(running, 2 * day, now)
    _age(crashed, 2 * day, now)
    _age(active_run, 2 * day, now)
    os.utime(active_run / "runs" / "run-writing" / rundir.METRICS_FILE, (now, now))
    _age(not_a_session, 2 * day, now)
    _age(keras_cache, 2 * day, now)

    removed = cleanup_sessions(session_has_live_run, ttl_hours=24, now=now)

    assert sorted(removed) == sorted([idle, crashed])
    assert not idle.exists() and not crashed.exists()
    assert recent.is_dir() and running.is_dir() and active_run.is_dir()
    assert not_a_session.is_dir()
    assert (keras_cache / "weights.h5").is_file()


def test_cleanup_ttl_comes_from_the_environment(monkeypatch):
    now = time.time()
    ws = session_workspace(new_session_token())
    (ws / "session.json").write_text("{}")
    _age(ws, 3 * 3600, now)
    monkeypatch.setenv("RETRAIN_SESSION_TTL_HOURS", "4")
    assert cleanup_sessions(session_has_live_run, now=now) == []
    monkeypatch.setenv("RETRAIN_SESSION_TTL_HOURS", "2")
    assert cleanup_sessions(session_has_live_run, now=now) == [ws]
    assert not ws.exists()


def test_app_sweeps_idle_sessions_when_it_starts(monkeypatch):
    """app.py runs the cleaner (at most once an hour); an hour-old idle session disappears."""
    from streamlit.testing.v1 import AppTest

    now = time.time()
    stale = session_workspace(new_session_token())
    (stale / "session.json").write_text("{}")
    _age(stale, 3 * 3600, now)
    monkeypatch.setenv("RETRAIN_SESSION_TTL_HOURS", "1")
    import streamlit as st

    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    deadline = time.time() + 10
    while stale.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not stale.exists()
    # The visitor's own (new) session survives the sweep.
    assert len(list((home() / "sessions").iterdir())) == 1
