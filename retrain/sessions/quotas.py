"""Per-session limits for a public host: disk, uploads per minute, one active run.

Each limit answers with a `QuotaError` whose one line says what to do. Only the session's
own folder is read or written (its size, its ``.uploads.json`` log of recent uploads); nothing
of another session is touched. The limits apply to browser sessions (folders under
``<home>/sessions/``); the CLI, working in the home folder itself, is not limited.

=============================  =======  ===================================================
variable                       default  meaning
=============================  =======  ===================================================
``RETRAIN_SESSION_QUOTA_MB``   2048     disk one session may fill (uploads, datasets, runs)
``RETRAIN_UPLOADS_PER_MINUTE`` 20       new files one session may upload in any minute
=============================  =======  ===================================================
(0 turns a limit off.) One active run per session is checked by `retrain.runs.jobs.create_run`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from retrain.errors import ConfigError
from retrain.sessions.workspace import env_number, home, is_valid_token, read_json, write_json

DEFAULT_QUOTA_MB = 2048
DEFAULT_UPLOADS_PER_MINUTE = 20
UPLOAD_LOG = ".uploads.json"


class QuotaError(ConfigError):
    """A session reached one of its limits (disk, uploads per minute, active runs)."""


def quota_mb() -> float:
    """Disk a session may use, in MB (``$RETRAIN_SESSION_QUOTA_MB``); 0 = no limit."""
    return env_number("RETRAIN_SESSION_QUOTA_MB", DEFAULT_QUOTA_MB, allow_zero=True)


def uploads_per_minute() -> int:
    """New uploads a session may make in any minute (``$RETRAIN_UPLOADS_PER_MINUTE``); 0 = no
    limit."""
    return int(
        env_number("RETRAIN_UPLOADS_PER_MINUTE", DEFAULT_UPLOADS_PER_MINUTE, allow_zero=True)
    )


def session_of(path: str | Path) -> Path | None:
    """The browser session folder that ``path`` lies in, or None (the CLI's home, elsewhere)."""
    sessions = home() / "sessions"
    try:
        relative = Path(path).resolve().relative_to(sessions.resolve())
    except ValueError:
        return None
    if not relative.parts or not is_valid_token(relative.parts[0]):
        return None
    return sessions / relative.parts[0]


def disk_used(folder: str | Path) -> int:
    """Bytes of the files under ``folder`` (symlinks not followed)."""
    total = 0
    stack = [Path(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def _mb(size: float) -> str:
    return f"{size / 1e6:,.0f} MB" if size < 1e9 else f"{size / 1e9:,.1f} GB"


def check_disk(session: str | Path, adding: int = 0) -> None:
    """Refuse when the session (plus ``adding`` bytes) would go over its disk quota.

    Raises:
        QuotaError: over the quota; the message says how much is used and what to delete.
    """
    limit_mb = quota_mb()
    if not limit_mb:
        return
    limit = limit_mb * 1e6
    used = disk_used(session)
    if used + adding > limit:
        what = f" plus {_mb(adding)} more" if adding else ""
        raise QuotaError(
            f"This session uses {_mb(used)}{what} of its {_mb(limit)}: delete old runs on the "
            "Runs page (or start a fresh session) and try again."
        )


def check_room(folder: str | Path, adding: int) -> None:
    """Refuse writing ``adding`` more bytes into ``folder`` when its session would go over its
    disk quota (a zip's declared extracted size, before anything is extracted). Does nothing
    outside a browser session.

    Raises:
        QuotaError: the session would go over its quota.
    """
    session = session_of(folder)
    if session is not None:
        check_disk(session, adding=adding)


def check_upload(folder: str | Path, size: int, now: float | None = None) -> None:
    """Count one new upload of ``size`` bytes into ``folder`` against its session's limits.

    Does nothing outside a browser session. The upload is counted (in the session's
    ``.uploads.json``) only when it is allowed.

    Raises:
        QuotaError: too many uploads in the last minute, or the disk quota would be exceeded.
    """
    session = session_of(folder)
    if session is None:
        return
    now = time.time() if now is None else now
    limit = uploads_per_minute()
    log = read_json(session / UPLOAD_LOG)
    recent = (
        [t for t in log if isinstance(t, int | float) and now - t < 60]
        if isinstance(log, list)
        else []
    )
    if limit and len(recent) >= limit:
        wait = max(1, int(60 - (now - min(recent))) + 1)
        raise QuotaError(
            f"{len(recent)} uploads in the last minute (at most {limit}): wait {wait} s and "
            "upload again."
        )
    check_disk(session, adding=size)
    session.mkdir(parents=True, exist_ok=True)
    write_json(session / UPLOAD_LOG, [*recent, now])
