"""Per-session quotas: disk, uploads per minute, one active run; one line each, others untouched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import write_run_dir

from retrain.errors import RetrainError
from retrain.runs import jobs
from retrain.sessions import quotas
from retrain.sessions.quotas import QuotaError
from retrain.sessions.uploads import save_upload
from retrain.sessions.workspace import home, new_session_token, session_workspace
from retrain.training.config import TrainConfig


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def two_sessions() -> tuple[Path, Path]:
    return session_workspace(new_session_token()), session_workspace(new_session_token())


def test_quota_error_is_a_one_line_retrain_error():
    assert issubclass(QuotaError, RetrainError)


def test_disk_quota_refuses_an_upload_that_would_go_over(two_sessions, monkeypatch):
    a, b = two_sessions
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "1")
    (b / "big.bin").write_bytes(b"x" * 900_000)  # B's own files do not count against A
    b_before = _files(b)
    save_upload(a / "uploads", "small.zip", b"a" * 400_000)
    with pytest.raises(QuotaError) as err:
        save_upload(a / "uploads", "more.zip", b"b" * 700_000)
    message = str(err.value)
    assert "\n" not in message
    assert "of its 1 MB" in message and "delete old runs on the Runs page" in message
    assert not list((a / "uploads").rglob("more.zip")), "the refused upload is not kept"
    assert not [p for p in (a / "uploads").iterdir() if p.name.startswith(".upload-")]
    assert _files(b) == b_before
    # The same file again is no new upload: allowed at the quota.
    save_upload(a / "uploads", "small.zip", b"a" * 400_000)


def test_zero_turns_the_disk_quota_off(two_sessions, monkeypatch):
    a, _ = two_sessions
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "0")
    save_upload(a / "uploads", "big.zip", b"x" * 3_000_000)


def test_bad_quota_setting_is_one_line(monkeypatch):
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "lots")
    with pytest.raises(RetrainError, match="RETRAIN_SESSION_QUOTA_MB='lots' is not a number"):
        quotas.quota_mb()


def test_uploads_per_minute(two_sessions, monkeypatch):
    a, b = two_sessions
    monkeypatch.setenv("RETRAIN_UPLOADS_PER_MINUTE", "3")
    now = time.time()
    for i in range(3):
        quotas.check_upload(a / "uploads", 10, now=now + i)
    with pytest.raises(
        QuotaError, match=r"^3 uploads in the last minute \(at most 3\): wait \d+ s"
    ):
        quotas.check_upload(a / "uploads", 10, now=now + 5)
    # B has its own count; A's limit touched nothing of B.
    b_before = _files(b)
    quotas.check_upload(b / "uploads", 10, now=now + 5)
    assert not [p for p in b_before if not p.exists()]
    # A minute later A may upload again.
    quotas.check_upload(a / "uploads", 10, now=now + 61)
    # Through save_upload: distinct files count, the fourth in a minute is refused.
    monkeypatch.setenv("RETRAIN_UPLOADS_PER_MINUTE", "2")
    fresh = session_workspace(new_session_token())
    save_upload(fresh / "uploads", "1.png", b"1")
    save_upload(fresh / "uploads", "2.png", b"2")
    save_upload(fresh / "uploads", "1.png", b"1")  # the same file again: not a new upload
    with pytest.raises(QuotaError, match="uploads in the last minute"):
        save_upload(fresh / "uploads", "3.png", b"3")


def test_the_cli_home_is_not_limited(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRAIN_UPLOADS_PER_MINUTE", "1")
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "1")
    for i in range(3):
        save_upload(home() / "uploads", f"{i}.bin", bytes([i]) * 600_000)
        save_upload(tmp_path / "elsewhere", f"{i}.bin", bytes([i]) * 600_000)
    assert quotas.session_of(home() / "uploads") is None
    assert quotas.session_of(home() / "sessions" / "../x") is None


def _live_run(workspace: Path, run_id: str) -> Path:
    return write_run_dir(
        workspace / "runs" / run_id,
        {"epochs": 1, "base": "builtin:digits-cnn"},
        status={"state": "running", "pid": os.getpid(), "created": time.time()},
    )


def test_one_active_run_per_session(two_sessions, tmp_path):
    a, b = two_sessions
    _live_run(a, "run-a-live")
    config = TrainConfig(data=str(tmp_path / "data"), base="builtin:digits-cnn")
    with pytest.raises(QuotaError) as err:
        jobs.create_run(config, a)
    assert str(err.value).startswith("Run 'run-a-live' is still training in this session")
    assert "stop it on the Train page" in str(err.value)
    assert sorted(p.name for p in (a / "runs").iterdir()) == ["run-a-live"]
    # Another session trains freely, and A's live run is not touched.
    b_run = jobs.create_run(config, b)
    assert b_run.is_dir() and b_run.parent.parent == b
    assert jobs.read_status(a / "runs" / "run-a-live")["state"] == "running"
    # Resuming an old run while another is active is refused the same way.
    old = write_run_dir(a / "runs" / "run-old", {"epochs": 1}, status={"state": "done"})
    with pytest.raises(QuotaError, match="one run at a time"):
        jobs.prepare_resume(old)
    # The CLI's own workspace may run several.
    _live_run(home(), "run-cli-live")
    assert jobs.create_run(config, home()).is_dir()


def test_a_session_over_its_disk_quota_cannot_start_a_run(two_sessions, monkeypatch, tmp_path):
    a, _ = two_sessions
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "1")
    (a / "datasets").mkdir()
    (a / "datasets" / "big.npy").write_bytes(b"x" * 1_200_000)
    config = TrainConfig(data=str(tmp_path / "data"), base="builtin:digits-cnn")
    with pytest.raises(QuotaError, match="This session uses 1 MB of its 1 MB"):
        jobs.create_run(config, a)


def test_an_upload_over_the_quota_is_one_line_on_the_page(monkeypatch):
    # Every page uploader that saves a file goes through pages._ui.saved_upload (the Model
    # page's old data and probe, the Evaluate page's forgetting zip): a refusal is one line.
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from pages._ui import ensure_session, saved_upload

        upload = st.file_uploader("The original task's images", key="old_zip")
        if upload is not None:
            st.session_state["saved"] = saved_upload(ensure_session() / "uploads", upload)

    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "1")
    at = AppTest.from_function(page, default_timeout=30).run()
    at.file_uploader(key="old_zip").upload("old.zip", b"x" * 1_500_000, "application/zip")
    at.run()
    assert not at.exception
    assert at.session_state["saved"] is None
    assert len(at.error) == 1 and "of its 1 MB" in at.error[0].value
    assert "\n" not in at.error[0].value.strip()


def test_every_page_that_saves_an_upload_catches_its_refusal():
    """A quota refusal (a RetrainError) never reaches the page as a traceback: each page's
    `save_upload` call sits in a ``try`` that catches RetrainError."""
    import ast

    pages = Path(__file__).resolve().parents[1] / "pages"
    unguarded = []
    for path in sorted(pages.glob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "save_upload"):
                continue
            up = parents.get(node)
            while up is not None and not (
                isinstance(up, ast.Try)
                and any("RetrainError" in ast.unparse(h.type or ast.Name("")) for h in up.handlers)
            ):
                up = parents.get(up)
            if up is None:
                unguarded.append(f"{path.name}:{node.lineno}")
    assert unguarded == []


def test_a_zip_that_would_fill_the_quota_is_refused_before_extraction(two_sessions, monkeypatch):
    # The zip itself fits (0.5 MB); what it declares it would write does not (1 MB quota).
    import zipfile

    from retrain.data import ingest

    a, _ = two_sessions
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "1")
    upload = a / "uploads" / "photos.zip"
    upload.parent.mkdir(parents=True)
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as zf:
        for cls in ("cats", "dogs"):
            zf.writestr(f"photos/{cls}/a.png", os.urandom(260_000))
    with pytest.raises(QuotaError) as err:
        ingest(upload, a)
    message = str(err.value)
    assert "\n" not in message
    assert "plus 1 MB more of its 1 MB" in message, message
    written = [p for p in (a / "datasets").rglob("*") if p.is_file()]
    assert written == [], "nothing is extracted"
    monkeypatch.setenv("RETRAIN_SESSION_QUOTA_MB", "0")  # the same zip with room: no quota error
    with pytest.raises(RetrainError) as other:
        ingest(upload, a)  # (its "images" are random bytes: refused for that, not for room)
    assert not isinstance(other.value, QuotaError)
