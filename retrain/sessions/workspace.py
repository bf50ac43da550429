"""Where Retrain Studio keeps files: one home folder, one workspace per browser session.

Layout under the home folder (``$RETRAIN_HOME``, default ``./workspace``)::

    sessions/<token>/          one per browser session; the token is unguessable and lives
                               in a cookie (or comes from the signed-in user), never the URL
        datasets/<dataset_id>/ extracted images, manifest.json, cache/
        models/                uploaded base models
        runs/<run_id>/         run directories (see DESIGN.md)
        session.json           what the session has chosen so far
    keras/                     shared Keras cache (ImageNet weights, starter model)
    queue/                     host-wide training slots (at most N workers at once)
    shares/<share_id>/         read-only snapshots of shared runs (`retrain.sessions.share`)

The CLI uses the home folder itself as its workspace unless ``--workspace`` says otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from retrain.errors import ConfigError

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


def home() -> Path:
    """Return the home folder (``$RETRAIN_HOME`` or ``./workspace``), creating it."""
    path = Path(os.environ.get("RETRAIN_HOME", "workspace")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def env_number(name: str, default: float, *, allow_zero: bool = False) -> float:
    """The number in ``$name``, or ``default`` when it is unset or blank.

    Args:
        allow_zero: accept 0 (e.g. a run that asks for no GPU); otherwise it must be positive.

    Raises:
        ConfigError: not a number, negative, or 0 without ``allow_zero``.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    wanted = "0 or more" if allow_zero else "a positive number"
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number. Set it to {wanted}.") from None
    if value < 0 or (value == 0 and not allow_zero):
        must = "must be 0 or more" if allow_zero else "must be positive"
        raise ConfigError(f"{name}={raw!r} {must}. Set it to {wanted}.")
    return value


def new_session_token() -> str:
    """Return a fresh unguessable session token (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def user_session_token(secret: str, issuer: str, subject: str) -> str:
    """The session token of a signed-in user: the same for that user on every browser.

    A keyed hash (HMAC-SHA256 with the deployment's secret) of the identity provider and the
    user's stable id, so nobody can derive it without the secret, and two providers'
    users never share a workspace.

    Raises:
        ConfigError: no secret, or no user id.
    """
    if not secret or not subject:
        raise ConfigError("Sign-in needs a cookie_secret in [auth] and a user id (sub) to work.")
    mac = hmac.new(secret.encode(), f"{issuer}\n{subject}".encode(), hashlib.sha256)
    return "u" + base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")[:31]


def is_valid_token(token: str) -> bool:
    """Whether ``token`` has the shape of a session token (so it is safe as a folder name)."""
    return isinstance(token, str) and bool(_TOKEN_RE.fullmatch(token))


def session_workspace(token: str) -> Path:
    """Return (and create) the workspace folder of the browser session ``token``.

    Raises:
        ConfigError: the token is not a valid session token.
    """
    if not is_valid_token(token):
        raise ConfigError("Invalid session id. Open the dashboard again for a fresh session.")
    path = home() / "sessions" / token
    path.mkdir(parents=True, exist_ok=True)
    # Touch so the TTL cleaner sees activity.
    os.utime(path)
    return path


def runs_dir(workspace: Path) -> Path:
    """Return (and create) the folder that holds ``workspace``'s run directories."""
    path = Path(workspace) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_id(prefix: str = "run") -> str:
    """Return a sortable, unique run id such as ``run-20261126-101500-a1b2``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_path(workspace: Path, run_id: str) -> Path:
    """Return the run directory of ``run_id`` inside ``workspace``, refusing path tricks.

    Raises:
        ConfigError: ``run_id`` is not a plain run id (slashes, dots, ...).
    """
    if not _RUN_ID_RE.match(run_id or "") or ".." in run_id:
        raise ConfigError(f"'{run_id}' is not a valid run id. Pick a run from the list.")
    return runs_dir(workspace) / run_id


def keras_home() -> Path:
    """Return the shared Keras cache folder (ImageNet weights are downloaded here once)."""
    path = Path(os.environ.get("KERAS_HOME", home() / "keras"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves to a location inside ``root``."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


_ABSOLUTE_PATH = re.compile(r"(?<![A-Za-z0-9_.])/[^\s:'\"`]+")


def shareable(value: Any) -> Any:
    """Replace absolute server paths inside a string by their last part.

    Files people download and share (exported models' metadata, model cards) must not carry
    server paths: they name the session's workspace, and the session id in them opens it.
    ``"applications:MobileNetV2:/srv/sessions/abc/models/w.h5"`` -> ``"applications:MobileNetV2:w.h5"``.
    """
    if not isinstance(value, str):
        return value
    return _ABSOLUTE_PATH.sub(lambda m: PurePosixPath(m.group()).name, value)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a uniquely named temporary file, then a
    rename), so readers never see half a file and two writers never share a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=json_default, ensure_ascii=False), "utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file; None when it is missing or unreadable (e.g. being replaced)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def json_default(value: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays as Python values, anything else as str."""
    # numpy scalars and arrays without importing numpy here
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def cleanup_sessions(
    session_live: Callable[[Path], bool],
    ttl_hours: float | None = None,
    now: float | None = None,
) -> list[Path]:
    """Delete session workspaces idle for longer than the TTL; return what was deleted.

    Args:
        session_live: whether a session folder must be kept although idle (it has a live
            run): the caller passes it (``retrain.runs.jobs.session_has_live_run``), since this
            lowest module knows nothing of runs. A session whose worker died is not live.
        ttl_hours: idle time allowed; default ``$RETRAIN_SESSION_TTL_HOURS`` or 24 hours.
        now: the current time (for tests).
    """
    ttl = (
        ttl_hours
        if ttl_hours is not None
        else float(os.environ.get("RETRAIN_SESSION_TTL_HOURS", 24))
    )
    now = time.time() if now is None else now
    sessions = home() / "sessions"
    removed: list[Path] = []
    if not sessions.is_dir():
        return removed
    for folder in sessions.iterdir():
        if not folder.is_dir() or not is_valid_token(folder.name):
            continue
        last = max(
            (p.stat().st_mtime for p in [folder, *folder.glob("*"), *folder.glob("runs/*/*")]),
            default=0.0,
        )
        if now - last < ttl * 3600:
            continue
        if session_live(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
