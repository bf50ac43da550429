"""Getting candidate images out of a zip (safely) or a folder (read in place).

A zip is refused from its directory first (entries, sizes, compression ratio, unsafe paths)
before anything is extracted; junk (macOS metadata, hidden and system files) is listed,
not warned about.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from retrain.data.dataset import (
    _MB,
    Progress,
    _human_bytes,
    _max_entries,
    _max_extract_bytes,
    _max_file_bytes,
    _max_ratio,
)
from retrain.data.images import (
    _entry_name,
    _file_reason,
    _ImageProblem,
    _junk_reason,
    _safe_relpath,
)
from retrain.errors import DatasetError
from retrain.sessions.quotas import check_room
from retrain.sessions.workspace import is_within

_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# Skip reasons that are routine (every zip made on a Mac has them): listed, not warned about.
_ROUTINE_SKIPS = ("macOS metadata", "hidden file", "hidden folder", "Windows system file")


# --------------------------------------------------------------------------------------
# Zip extraction


def _reject_zip(path: Path) -> DatasetError:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return DatasetError(f"Cannot read '{path.name}' ({err.strerror}). Upload it again.")
    if head in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return DatasetError(
            f"'{path.name}' is a truncated or damaged zip (its file list is missing). "
            "The upload may have been cut off: create the zip again and re-upload it."
        )
    return DatasetError(
        f"'{path.name}' is not a zip file. Zip the folder that holds your class folders "
        "(e.g. right-click > Compress) and upload the .zip."
    )


def _check_zip_directory(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse zip bombs from the zip's own directory, before anything is extracted."""
    files = [i for i in infos if not i.is_dir()]
    max_entries = _max_entries()
    if len(infos) > max_entries:
        raise DatasetError(
            f"'{path.name}' has {len(infos):,} entries, more than the limit of {max_entries:,} "
            "(RETRAIN_MAX_ZIP_ENTRIES). Upload fewer files or raise the limit."
        )
    total = sum(i.file_size for i in files)
    packed = sum(i.compress_size for i in files)
    max_total = _max_extract_bytes()
    if total > max_total:
        raise DatasetError(
            f"'{path.name}' would expand to {_human_bytes(total)}, more than the limit of "
            f"{_human_bytes(max_total)} (RETRAIN_MAX_EXTRACT_MB). Upload a smaller dataset "
            "or raise the limit."
        )
    max_ratio = _max_ratio()
    # Small entries may compress extremely well legitimately (a blank BMP); only volume matters.
    for info in files:
        if info.file_size >= _MB and info.file_size > max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise DatasetError(
                f"'{path.name}' looks like a zip bomb: '{info.filename}' expands {ratio:,.0f}x "
                f"({_human_bytes(info.compress_size)} to {_human_bytes(info.file_size)}; "
                f"the limit is {max_ratio:,.0f}x). Zip the images themselves, not generated data."
            )
    if total >= _MB and total > max_ratio * max(packed, 1):
        raise DatasetError(
            f"'{path.name}' looks like a zip bomb: it expands {total / max(packed, 1):,.0f}x "
            f"({_human_bytes(packed)} to {_human_bytes(total)}; the limit is {max_ratio:,.0f}x). "
            "Zip the images themselves, not generated data."
        )


def _extract_zip(
    path: Path, dest: Path, progress: Progress | None
) -> tuple[list[str], list[dict], list[dict]]:
    """Extract the image files of a zip into ``dest``; return candidates, skips, junk skips."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _reject_zip(path) from None
    except OSError as err:
        raise DatasetError(
            f"Cannot read '{path.name}' ({err.strerror}). Upload it again."
        ) from None
    skipped: list[dict] = []
    junk: list[dict] = []
    junk_folders: Counter[str] = Counter()
    with zf:
        infos = zf.infolist()
        _check_zip_directory(path, infos)
        max_file = _max_file_bytes()
        plan: list[tuple[zipfile.ZipInfo, str]] = []
        seen: set[str] = set()
        for info in infos:
            mode = info.external_attr >> 16
            if info.is_dir() or stat.S_ISDIR(mode):
                continue
            name = _entry_name(info)
            rel = _safe_relpath(name)
            if rel is None:
                skipped.append({"path": name, "reason": "unsafe path (outside the dataset)"})
                continue
            if stat.S_ISLNK(mode):
                skipped.append({"path": rel, "reason": "symbolic link (not extracted)"})
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                skipped.append({"path": rel, "reason": "special file (device, pipe or socket)"})
                continue
            reason = _file_reason(rel)
            if reason in _ROUTINE_SKIPS:
                # One line per system folder (a __MACOSX folder can hold thousands of files).
                parts = rel.split("/")
                folder = next((p for p in parts[:-1] if _junk_reason(p, is_folder=True)), None)
                if folder is not None:
                    key = "/".join(parts[: parts.index(folder) + 1]) + "/"
                    junk_folders[key] += 1
                else:
                    junk.append({"path": rel, "reason": reason})
                continue
            if reason:
                skipped.append({"path": rel, "reason": reason})
                continue
            if info.flag_bits & 0x1:
                skipped.append({"path": rel, "reason": "password-protected (encrypted) entry"})
                continue
            if info.compress_type not in _ZIP_METHODS:
                skipped.append({"path": rel, "reason": "unsupported zip compression method"})
                continue
            if info.file_size > max_file:
                skipped.append(
                    {
                        "path": rel,
                        "reason": f"too large ({_human_bytes(info.file_size)}; the limit is "
                        f"{_human_bytes(max_file)} per file)",
                    }
                )
                continue
            if rel in seen:
                skipped.append({"path": rel, "reason": "duplicate name in the zip"})
                continue
            seen.add(rel)
            plan.append((info, rel))
        for folder, n in sorted(junk_folders.items()):
            reason = _junk_reason(folder.rstrip("/").split("/")[-1], is_folder=True)
            junk.append({"path": folder, "reason": f"{reason} ({n} files)"})

        # The zip's own directory says how much it will write: a session near its disk quota
        # is refused here, before a byte is extracted (not after filling its disk).
        check_room(dest, sum(info.file_size for info, _ in plan))
        candidates: list[str] = []
        dest_resolved = dest.resolve()
        for done, (info, rel) in enumerate(plan):
            target = dest / rel
            if not is_within(target, dest_resolved):
                skipped.append({"path": rel, "reason": "unsafe path (outside the dataset)"})
                continue
            problem = _extract_one(zf, info, target, max_file)
            if problem:
                skipped.append({"path": rel, "reason": problem})
            else:
                candidates.append(rel)
            if progress and done % 200 == 0:
                progress(0.3 * done / max(len(plan), 1), f"Extracting {done:,}/{len(plan):,} files")
    return candidates, skipped, junk


def _extract_one(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, max_file: int
) -> str | None:
    """Copy one entry, never writing more than its declared size; return a problem or None."""
    limit = min(info.file_size, max_file)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        # "xb": never follow or overwrite anything already there.
        with zf.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise _ImageProblem("larger than its zip entry says (not extracted)")
                dst.write(chunk)
    except _ImageProblem as err:
        target.unlink(missing_ok=True)
        return str(err)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError):
        target.unlink(missing_ok=True)
        return "damaged zip entry (failed its checksum)"
    except OSError as err:
        if not isinstance(err, FileExistsError):
            target.unlink(missing_ok=True)
        return f"could not be extracted ({err.strerror or err})"
    return None


# --------------------------------------------------------------------------------------
# Folders read in place


def _walk_folder(root: Path) -> tuple[list[str], list[dict], list[dict]]:
    candidates: list[str] = []
    skipped: list[dict] = []
    junk: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in sorted(dirnames):
            reason = _junk_reason(d, is_folder=True)
            if reason:
                junk.append({"path": f"{prefix}{d}/", "reason": reason})
            elif (here / d).is_symlink():
                skipped.append({"path": f"{prefix}{d}/", "reason": "symbolic link (not followed)"})
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = prefix + f
            full = here / f
            if full.is_symlink():
                skipped.append({"path": rel, "reason": "symbolic link (not followed)"})
                continue
            if not full.is_file():
                skipped.append({"path": rel, "reason": "special file (device, pipe or socket)"})
                continue
            reason = _file_reason(rel)
            if reason in _ROUTINE_SKIPS:
                junk.append({"path": rel, "reason": reason})
            elif reason:
                skipped.append({"path": rel, "reason": reason})
            else:
                candidates.append(rel)
    return candidates, skipped, junk
