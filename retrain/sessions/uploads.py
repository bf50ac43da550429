"""Saving a file someone uploaded: one rule for its name, one content hash for its folder.

A browser sends any file name it likes (``../../other-session/x.zip``, control characters,
300 characters). `save_upload` keeps only a cleaned last component of it (`clean_file_name`)
and stores the bytes under a folder named by their SHA-256, so the same upload is stored once
and two different files never overwrite each other. Used by the Dataset, Model and Evaluate
pages and by `retrain.data.ingest_upload`. A new file in a browser session's workspace counts
against that session's upload rate and disk quota (`retrain.sessions.quotas.check_upload`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import BinaryIO

from retrain.sessions.quotas import check_upload

#: Longest file name kept (the extension survives a cut).
MAX_NAME_LENGTH = 120
#: Characters replaced by "_": path separators, ``:`` (BASE specs use it) and the rest of
#: what Windows forbids, so a saved name is also a safe download name.
_REPLACED = set('<>:"/\\|?*')
_CHUNK = 1 << 22


def clean_file_name(name: str, default: str = "upload") -> str:
    """The last component of a browser-supplied file name, safe as one file name.

    Unicode is normalised (NFC); any folder part is dropped (``/`` and ``\\`` both count);
    control characters and ``<>:"/\\|?*`` become ``_``; leading dots and spaces go (no hidden
    files, no ``..``); at most `MAX_NAME_LENGTH` characters, the extension kept.

    Returns:
        The cleaned name, or ``default`` when nothing is left.
    """
    text = unicodedata.normalize("NFC", str(name or "")).replace("\\", "/")
    last = text.rsplit("/", 1)[-1]
    cleaned = "".join("_" if ch in _REPLACED or not ch.isprintable() else ch for ch in last)
    cleaned = cleaned.strip().lstrip(". ").strip()
    if len(cleaned) > MAX_NAME_LENGTH:
        stem, dot, suffix = cleaned.rpartition(".")
        suffix = f"{dot}{suffix}" if stem and len(suffix) < 16 else ""
        cleaned = cleaned[: MAX_NAME_LENGTH - len(suffix)].rstrip() + suffix
    return cleaned or default


def save_upload(
    folder: str | Path, name: str, data: bytes | BinaryIO, *, default_name: str = "upload"
) -> Path:
    """Save an upload as ``<folder>/<content hash>/<cleaned name>`` and return that path.

    Args:
        folder: where uploads of this kind go (inside the session's workspace).
        name: the file name the browser sent (cleaned by `clean_file_name`).
        data: the bytes, or a binary file object (read from its current position in chunks,
            so a large zip never sits in memory twice).
        default_name: the name used when nothing of ``name`` survives cleaning.

    Returns:
        The saved file. The same content under the same name is written once: a second save
        returns the existing file (and counts against no quota).

    Raises:
        QuotaError: a new file would go over its session's uploads per minute or disk quota.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    safe = clean_file_name(name, default_name)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, bytes | bytearray | memoryview):
                digest.update(data)
                out.write(data)
            else:
                while chunk := data.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        target = folder / digest.hexdigest()[:16] / safe
        if target.is_file():
            return target
        # The temporary file is already inside the folder, so the disk check counts it.
        check_upload(folder, 0)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)
