"""The host's queue of model requests, on disk, fair across sessions.

Files under ``$RETRAIN_HOME/service`` (this module owns them):

    queue/<id>.json      a waiting request: {id, key, kind, args, session, enqueued}
    running/<id>.json    the same, claimed by a worker: + {worker: {pid, started, host}}
    results/<id>.json    its outcome: {ok: true, key} or {ok: false, error, message}
    progress/<id>.json   {text, fraction} while a long request (export) runs
    served/<session>     touched each time a request of that session is taken (fairness)

A worker claims a request by renaming it from queue/ to running/ (atomic: two workers never
get the same one). Requests are taken round robin across sessions, the session served least
recently first, so one visitor's ten requests never wait in front of another's first. Any
web replica on the same home reads and writes the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrain.service.cache import service_dir
from retrain.sessions.workspace import read_json, write_json

#: What a page shows when the worker answering its request died.
WORKER_LOST = (
    "The model worker stopped while answering (out of memory, or killed). "
    "Retry: a fresh worker takes the next request."
)


def _dir(name: str) -> Path:
    path = service_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def session_tag(session: str) -> str:
    """A short, non-reversible tag of a session (request files never carry its token)."""
    return hashlib.sha256((session or "anonymous").encode()).hexdigest()[:12]


def request_id(key: str, session: str) -> str:
    """One id per (answer, session): a page that reruns while waiting finds its own request."""
    return f"{key[:24]}-{session_tag(session)}"


def enqueue(request_id_: str, key: str, kind: str, args: dict[str, Any], session: str) -> None:
    """Put a request in the queue unless it is already waiting, running or answered."""
    if state(request_id_) in ("queued", "running"):
        return
    clear_result(request_id_)
    write_json(
        _dir("queue") / f"{request_id_}.json",
        {
            "id": request_id_,
            "key": key,
            "kind": kind,
            "args": args,
            "session": session_tag(session),
            "enqueued": time.time(),
        },
    )


def state(request_id_: str) -> str | None:
    """ "queued", "running", "answered", or None (unknown)."""
    if (_dir("queue") / f"{request_id_}.json").exists():
        return "queued"
    if (_dir("running") / f"{request_id_}.json").exists():
        return "running"
    if (_dir("results") / f"{request_id_}.json").exists():
        return "answered"
    return None


def _waiting() -> list[dict[str, Any]]:
    found = []
    for path in _dir("queue").glob("*.json"):
        request = read_json(path)
        if isinstance(request, dict) and "id" in request:
            found.append(request)
    return found


def _last_served(session: str) -> float:
    try:
        return (_dir("served") / session).stat().st_mtime
    except OSError:
        return 0.0


def fair_order(requests: list[dict[str, Any]], last_served: dict[str, float]) -> list[str]:
    """The order requests are taken in: round robin over sessions, least recently served first.

    Args:
        requests: waiting requests, each with ``id``, ``session`` and ``enqueued``.
        last_served: when each session was last served (missing = never).

    Returns:
        Request ids, the next one first.
    """
    by_session: dict[str, list[dict[str, Any]]] = {}
    for request in sorted(requests, key=lambda r: (r["enqueued"], r["id"])):
        by_session.setdefault(request["session"], []).append(request)
    sessions = sorted(
        by_session, key=lambda s: (last_served.get(s, 0.0), by_session[s][0]["enqueued"])
    )
    order: list[str] = []
    depth = 0
    while len(order) < len(requests):
        for session in sessions:
            if depth < len(by_session[session]):
                order.append(by_session[session][depth]["id"])
        depth += 1
    return order


def _order() -> tuple[list[str], dict[str, dict[str, Any]]]:
    waiting = _waiting()
    served = {r["session"]: _last_served(r["session"]) for r in waiting}
    return fair_order(waiting, served), {r["id"]: r for r in waiting}


def position(request_id_: str) -> int | None:
    """1 for the next request to be taken, 2 for the one after, ...; None when not waiting."""
    order, _ = _order()
    return order.index(request_id_) + 1 if request_id_ in order else None


def running_count() -> int:
    """Requests being answered now."""
    return sum(1 for _ in _dir("running").glob("*.json"))


def claim(
    worker: dict[str, Any],
    skip: frozenset[str] = frozenset(),
    leave: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any] | None:
    """Take the next request for ``worker`` ({pid, started, host}); None when none waits.

    Args:
        skip: request kinds this worker does not take (a worker kept for quick requests skips
            the long ones); they stay in the queue, in their place, for another worker.
        leave: true for a waiting request this worker should leave to another one for now
            (one that has its model loaded); asked only about requests it would otherwise take.
    """
    order, requests = _order()
    for rid in order:
        if requests[rid].get("kind") in skip:
            continue
        if leave is not None and leave(requests[rid]):
            continue
        source = _dir("queue") / f"{rid}.json"
        target = _dir("running") / f"{rid}.json"
        try:
            os.rename(source, target)
        except OSError:
            continue  # another worker took it, or it was cancelled
        request = {**requests[rid], "worker": worker, "started": time.time()}
        write_json(target, request)
        served = _dir("served") / request["session"]
        served.touch()
        os.utime(served)
        return request
    return None


def running_request(request_id_: str) -> dict[str, Any] | None:
    found = read_json(_dir("running") / f"{request_id_}.json")
    return found if isinstance(found, dict) else None


def finish(request_id_: str, outcome: dict[str, Any]) -> None:
    """Record the outcome of a request and take it off the running list."""
    write_json(_dir("results") / f"{request_id_}.json", outcome)
    for folder in ("running", "progress"):
        with contextlib.suppress(FileNotFoundError):
            (_dir(folder) / f"{request_id_}.json").unlink()


def result(request_id_: str) -> dict[str, Any] | None:
    found = read_json(_dir("results") / f"{request_id_}.json")
    return found if isinstance(found, dict) else None


def clear_result(request_id_: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (_dir("results") / f"{request_id_}.json").unlink()


def cancel(request_id_: str) -> bool:
    """Take a waiting request out of the queue; False when it is already running or gone."""
    try:
        (_dir("queue") / f"{request_id_}.json").unlink()
    except FileNotFoundError:
        return False
    return True


def write_progress(request_id_: str, text: str, fraction: float) -> None:
    write_json(_dir("progress") / f"{request_id_}.json", {"text": text, "fraction": fraction})


def read_progress(request_id_: str) -> dict[str, Any] | None:
    found = read_json(_dir("progress") / f"{request_id_}.json")
    return found if isinstance(found, dict) else None


def this_host() -> str:
    return socket.gethostname()
