"""`ingest`: a zip, folder or upload -> a validated `Dataset` in the session's workspace.

Zips are extracted safely to ``<workspace>/datasets/<dataset_id>/files`` (or a folder is read
in place); ingesting the same content again returns the same dataset without re-extracting.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from retrain.data.checks import _scan, _write_manifest, load_dataset
from retrain.data.dataset import Dataset, Progress
from retrain.data.images import _nfc
from retrain.data.zips import _extract_zip, _walk_folder
from retrain.errors import DatasetError
from retrain.sessions.uploads import save_upload
from retrain.sessions.workspace import file_sha256, home, write_json


def _datasets_dir(workspace: Path) -> Path:
    folder = Path(workspace) / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ingest(source: str | Path, workspace: Path, *, progress: Progress | None = None) -> Dataset:
    """Check a zip file or folder of images and write its manifest into ``workspace``.

    Zips are extracted (safely) to ``<workspace>/datasets/<dataset_id>/files``; folders are read
    in place. Ingesting the same content again returns the same dataset without re-extracting.

    Args:
        source: a .zip file, a folder of class folders (or split folders), or a manifest.json.
        workspace: the session's workspace folder.
        progress: optional ``callback(fraction 0..1, message)`` for a progress bar.

    Returns:
        The validated `Dataset`.

    Raises:
        DatasetError: the input cannot make a classifier; the message says what to do.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DatasetError(
            f"'{source}' does not exist. Give a .zip file or a folder of class folders."
        )
    if source.is_dir():
        return _ingest_folder(source, Path(workspace), progress)
    if source.name == "manifest.json":
        return load_dataset(source)
    return _ingest_zip(source, Path(workspace), progress)


def resolve_dataset(
    source: Dataset | str | Path,
    workspace: str | Path | None = None,
    *,
    what: str = "data",
    hint: str = "Pass a zip or a folder of class folders.",
) -> Dataset:
    """A `Dataset` for a Dataset, a manifest.json, a zip or a folder (ingested into
    ``workspace``, default the home folder).

    Args:
        what, hint: the words of the error when nothing is there:
            ``No {what} at '{path}'. {hint}``.

    Raises:
        DatasetError: nothing at ``source``, or not usable images.
    """
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    if path.name == "manifest.json" and path.is_file():
        return load_dataset(path)
    if not path.exists():
        raise DatasetError(f"No {what} at '{path}'. {hint}")
    return ingest(path, Path(home() if workspace is None else workspace))


def _ingest_folder(folder: Path, workspace: Path, progress: Progress | None) -> Dataset:
    folder = folder.resolve()
    if progress:
        progress(0.0, "Listing files")
    candidates, skipped, junk = _walk_folder(folder)
    scan = _scan(folder, candidates, skipped, junk, folder.name, progress, 0.0)
    target = _datasets_dir(workspace) / scan["dataset_id"]
    target.mkdir(exist_ok=True)
    root = folder / scan["prefix"] if scan["prefix"] else folder
    return _write_manifest(target, scan, folder.name, root, folder)


def _ingest_zip(path: Path, workspace: Path, progress: Progress | None) -> Dataset:
    datasets = _datasets_dir(workspace)
    name = _nfc(path.stem) or "dataset"
    if progress:
        progress(0.0, "Reading the zip")
    zip_digest = file_sha256(path)
    known = datasets / "zips" / f"{zip_digest[:32]}.json"
    reused = _reuse(known, datasets)
    if reused is not None:
        return reused if reused.name == name else _rename(reused, name)
    tmp = Path(tempfile.mkdtemp(prefix=".ingest-", dir=datasets))
    try:
        files = tmp / "files"
        files.mkdir()
        candidates, skipped, junk = _extract_zip(path, files, progress)
        scan = _scan(files, candidates, skipped, junk, path.name, progress, 0.3)
        target = datasets / scan["dataset_id"]
        target.mkdir(exist_ok=True)
        prefix = scan["prefix"]
        final_files = target / "files"
        if not (final_files / prefix).is_dir():
            # First time (or the same images under another wrapper name): keep this extraction.
            if final_files.exists():
                shutil.rmtree(final_files)
            files.rename(final_files)
        dataset = _write_manifest(target, scan, name, final_files / prefix, path)
        known.parent.mkdir(exist_ok=True)
        write_json(known, {"dataset_id": dataset.dataset_id})
        return dataset
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reuse(known: Path, datasets: Path) -> Dataset | None:
    try:
        dataset_id = json.loads(known.read_text())["dataset_id"]
        return load_dataset(datasets / str(dataset_id) / "manifest.json")
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        return None


def _rename(dataset: Dataset, name: str) -> Dataset:
    """The same zip uploaded under another name: keep everything, show the new name."""
    manifest = json.loads(dataset.manifest_path.read_text(encoding="utf-8"))
    manifest["name"] = name
    write_json(dataset.manifest_path, manifest)
    return load_dataset(dataset.manifest_path)


def ingest_upload(
    fileobj: BinaryIO, filename: str, workspace: Path, *, progress: Progress | None = None
) -> Dataset:
    """Save an uploaded zip into ``workspace/uploads``, ingest it, then delete the upload.

    The dataset's name is the upload's file name (cleaned by `retrain.sessions.uploads`) without
    ``.zip``.
    """
    target = save_upload(
        Path(workspace) / "uploads" / "datasets", filename, fileobj, default_name="dataset.zip"
    )
    try:
        return ingest(target, workspace, progress=progress)
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: another upload is being ingested
            target.parent.parent.rmdir()
