"""Answers on disk, addressed by content: a reload, another visitor or another replica reuses them.

The address of an answer (`request_key`) is a SHA-256 over the kind, the arguments that
decide it (file paths replaced by the SHA-256 of the file's bytes, so the same model uploaded
by two sessions is one answer) and the content of the files the kind depends on. Never the
session, never the time. Answers live in ``$RETRAIN_HOME/service/answers/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrain.sessions.workspace import file_sha256, home, read_json, write_json

#: Bump when an answer's shape changes: old answers are then never read.
ANSWER_VERSION = 1
_HASHES: dict[tuple[str, int, int], str] = {}


def service_dir() -> Path:
    """``$RETRAIN_HOME/service``, created."""
    path = home() / "service"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) in this process; "missing"
    for a file that is not there."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    if not path.is_file():
        return "not-a-file"
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = file_sha256(path)
    return _HASHES[memo]


def _by_content(value: Any) -> Any:
    """An argument as it addresses the answer: an existing file by its content hash."""
    if isinstance(value, str) and value and len(value) < 4096:
        path = Path(value)
        if path.is_absolute() and path.is_file():
            return {"file": file_hash(path), "name": path.name}
        # A BASE spec that ends in a weights file: the file's content, not its path.
        head, sep, tail = value.rpartition(":")
        if sep and head.startswith("applications:") and Path(tail).is_file():
            return {"spec": head, "weights": file_hash(tail)}
    if isinstance(value, list | tuple):
        return [_by_content(v) for v in value]
    if isinstance(value, dict):
        return {k: _by_content(v) for k, v in sorted(value.items())}
    return value


def request_key(
    kind: str,
    args: dict[str, Any],
    context: tuple[str, ...] = (),
    files: Callable[[dict[str, Any]], list[Path]] | None = None,
) -> str:
    """The content address of the answer to ``kind(**args)``.

    Args:
        context: arguments left out (they do not change the answer: a session's workspace).
        files: the files, beyond paths given as arguments, whose content decides the answer.
    """
    decisive = {k: _by_content(v) for k, v in sorted(args.items()) if k not in context}
    files = [file_hash(p) for p in (files(args) if files else [])]
    text = json.dumps(
        {"v": ANSWER_VERSION, "kind": kind, "args": decisive, "files": files},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def answer_path(key: str) -> Path:
    return service_dir() / "answers" / key[:2] / f"{key}.json"


def read_answer(key: str) -> dict[str, Any] | None:
    """The cached answer of ``key``, or None."""
    found = read_json(answer_path(key))
    if isinstance(found, dict) and "answer" in found:
        with contextlib.suppress(OSError):  # recently used: a size-bounded sweep keeps it
            os.utime(answer_path(key))
        return found["answer"]
    return None


def write_answer(key: str, kind: str, answer: dict[str, Any]) -> None:
    """Keep ``answer`` under its address."""
    path = answer_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"kind": kind, "answer": answer})


def drop_answer(key: str) -> None:
    """Forget the answer of ``key`` (it rested on a model that failed its check)."""
    answer_path(key).unlink(missing_ok=True)


def files_dir() -> Path:
    """Where kinds that answer with files (Grad-CAM pictures) write them."""
    path = service_dir() / "files"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prune(now: float | None = None) -> int:
    """Delete answers and pictures unused for ``RETRAIN_ANSWER_TTL_DAYS`` (default 7) and
    request outcomes older than a day; return how many files went. Workers call it when idle.
    """
    import time

    from retrain.sessions.workspace import env_number

    now = time.time() if now is None else now
    answer_age = env_number("RETRAIN_ANSWER_TTL_DAYS", 7.0) * 86400
    removed = 0
    for folder, age in (("answers", answer_age), ("files", answer_age), ("results", 86400)):
        for path in (service_dir() / folder).rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and now - path.stat().st_mtime > age:
                    path.unlink()
                    removed += 1
    return removed
