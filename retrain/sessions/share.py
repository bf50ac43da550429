"""Share links: a read-only snapshot of one finished run, never the workspace.

A share is a folder ``<home>/shares/<share_id>/`` (the id is 192 random bits, URL-safe) that
holds exactly what the Shared model page shows, copied out of the run when the share is
made, so it outlives the owner's session (the TTL sweep deletes sessions, not shares)::

    share.json     who may revoke it (a hash of the owner's session), run id, created,
                   expires, downloads, examples, revoked
    model.keras    the run's model (for Try it, Copy to my workspace and the download)
    config.json    the run's config with server paths cut to their last part
    (metrics)      the run's per-epoch metrics (the curves), named as in the run directory
    report.json    the held-out evaluation: accuracy, per class, confusion matrix (no
                   image paths: the owner's images stay the owner's)
    card.md        the model card
    labels.txt     the class names, one a line
    examples/      only when the owner ticked "include example images": a few held-out
                   images per class, ``examples/<class index>/<n>.<ext>``
    exports/       only when the owner allowed downloads: the run's exported files that
                   stand alone (``.tflite``, ``.onnx``, the export zips), as the Export page
                   made them

Revoking deletes everything but ``share.json`` (marked revoked), so the link can say it was
revoked; an expired share's files are deleted by `prune_shares`. Any id that is not one this
module made (``../x``, ``%2e``, too short, ...) is "no such link" before a path is built.

Model work (the evaluation report) is done by the caller and passed in: this module copies
files and never imports Keras.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from retrain.errors import RetrainError
from retrain.runs import rundir
from retrain.sessions.uploads import clean_file_name
from retrain.sessions.workspace import home, is_within, read_json, shareable, write_json

SHARE_FILE = "share.json"
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
METRICS_FILE = rundir.METRICS_FILE
REPORT_FILE = "report.json"
CARD_FILE = "card.md"
LABELS_FILE = "labels.txt"
EXAMPLES_DIR = "examples"
EXPORTS_DIR = "exports"
#: Exported files a share with downloads carries (single files; folders travel in the zips).
EXPORT_SUFFIXES = (".tflite", ".onnx", ".zip")

DEFAULT_EXPIRES_HOURS = 7 * 24.0
MAX_EXPIRES_HOURS = 90 * 24.0
EXAMPLES_PER_CLASS = 3
# What a share id looks like: `new_share_id` makes 32 URL-safe characters (192 bits).
_SHARE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")
# Report keys a visitor may see; "predictions"/"misclassified" name the owner's image files.
_REPORT_KEYS = (
    "split",
    "num_images",
    "class_names",
    "accuracy",
    "loss",
    "macro",
    "weighted",
    "per_class",
    "confusion_matrix",
    "top_k",
    "old_images",
)
NO_SUCH_LINK = "No such link: check that it was copied whole, or ask its owner for a new one."


class ShareError(RetrainError):
    """A share link cannot be made or opened (no such link, revoked, expired, not finished)."""


def shares_root() -> Path:
    """The folder of every share on this host (``<home>/shares``)."""
    path = home() / "shares"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_share_id() -> str:
    """A fresh unguessable share id: 192 random bits, 32 URL-safe characters, never starting
    with "-" (``retrain unshare -Xy...`` would read it as an option; 1 id in 64 did)."""
    while True:
        share_id = secrets.token_urlsafe(24)
        if not share_id.startswith("-"):
            return share_id


def is_valid_share_id(share_id: Any) -> bool:
    """Whether ``share_id`` has the exact shape `new_share_id` makes (so it is a safe name)."""
    return isinstance(share_id, str) and bool(_SHARE_ID_RE.fullmatch(share_id))


def share_folder(share_id: Any) -> Path:
    """The folder of share ``share_id`` (it may not exist).

    Raises:
        ShareError: ``share_id`` is malformed ("no such link").
    """
    if not is_valid_share_id(share_id):
        raise ShareError(NO_SUCH_LINK)
    folder = shares_root() / share_id
    if not is_within(folder, shares_root()):  # belt and braces: the pattern already refuses
        raise ShareError(NO_SUCH_LINK)
    return folder


def owner_key(session: str | Path) -> str:
    """Who owns a share: a hash of the owner's session folder name (the token itself is a key
    to the workspace and is not written into shares)."""
    return hashlib.sha256(Path(session).name.encode()).hexdigest()[:32]


def url_path(share_id: str) -> str:
    """The path and query of a share's link, e.g. ``/?share=<id>``."""
    return f"/?share={share_id}"


def _run_model(run_dir: Path) -> Path:
    for path in (rundir.best_model_path(run_dir), rundir.final_model_path(run_dir)):
        if path.is_file():
            return path
    raise ShareError(f"Run '{run_dir.name}' has no saved model to share. Train it first.")


def _expires(expires_hours: float | None, now: float) -> float:
    hours = DEFAULT_EXPIRES_HOURS if expires_hours is None else float(expires_hours)
    if not 0 < hours <= MAX_EXPIRES_HOURS:
        raise ShareError(
            f"--expires {expires_hours:g} hours is out of range: give more than 0 and at most "
            f"{MAX_EXPIRES_HOURS:g} (90 days)."
        )
    return now + hours * 3600


def _example_images(run_dir: Path, config: dict, class_names: list[str]) -> dict[int, list[Path]]:
    """A few held-out images per class of the run's data (from its recorded split)."""
    from retrain.evaluate.metrics import run_dataset  # the run's data, wherever it was recorded

    split = rundir.read_split(run_dir)
    if not split:
        return {}
    try:
        dataset = run_dataset(run_dir, config)
    except RetrainError:
        return {}
    labels = dict(dataset.splits.get("train", []))
    for name in ("val", "test"):
        labels.update(dict(dataset.splits.get(name, [])))
    chosen: dict[int, list[Path]] = {}
    for relative in split.get("val") or []:
        label = labels.get(relative)
        if label is None or label >= len(dataset.class_names):
            continue
        name = dataset.class_names[label]
        if name not in class_names:
            continue
        index = class_names.index(name)
        picked = chosen.setdefault(index, [])
        path = dataset.image_path(relative)
        if len(picked) < EXAMPLES_PER_CLASS and path.is_file():
            picked.append(path)
    return chosen


def check_shareable(run_dir: str | Path) -> Path:
    """The model file of a run that can be shared (finished, with a model).

    Raises:
        ShareError: not a run directory, not finished, or no model.
    """
    run_dir = Path(run_dir)
    status = rundir.read_status_file(run_dir) if rundir.is_run_dir(run_dir) else None
    if not status or status.get("state") != "done":
        raise ShareError(
            f"'{run_dir.name}' is not a finished run: only a finished run can be shared."
        )
    return _run_model(run_dir)


def create_share(
    run_dir: str | Path,
    report: dict[str, Any],
    *,
    owner: str,
    downloads: bool = False,
    examples: bool = False,
    expires_hours: float | None = None,
    card: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Snapshot a finished run into a new share; return ``{url_path, share_id, expires}``.

    Args:
        run_dir: a finished run.
        report: the run's evaluation (`retrain.evaluate.evaluate_run`), computed by the caller
            (the CLI in-process, a page through the model worker).
        owner: `owner_key` of the session allowed to list and revoke it.
        downloads: the shared page offers the model, labels and card for download.
        examples: copy a few held-out images per class (shown, and copied by "Copy to my
            workspace"); without it no image of the owner leaves the workspace.
        expires_hours: how long the link works (default 7 days, at most 90).
        card: the model card (`card_answer`, from a model worker); None writes it here
            (it records library versions, which imports Keras: the CLI's case).

    Raises:
        ShareError: the run is not finished, has no model, or the expiry is out of range.
    """
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    expires = _expires(expires_hours, now)
    model = check_shareable(run_dir)
    config = rundir.read_config(run_dir)
    from retrain.models.modelfile import read_metadata

    meta = read_metadata(model)
    class_names = [str(c) for c in (meta.get("class_names") or config.get("class_names") or [])]
    share_id = new_share_id()
    folder = share_folder(share_id)
    tmp = shares_root() / f".{share_id}.tmp"
    tmp.mkdir()
    try:
        shutil.copy2(model, tmp / MODEL_FILE)
        write_json(tmp / CONFIG_FILE, {k: shareable(v) for k, v in config.items()})
        (tmp / METRICS_FILE).write_text(
            "".join(json.dumps(row) + "\n" for row in rundir.read_metrics(run_dir))
        )
        visible = {k: report[k] for k in _REPORT_KEYS if k in report}
        write_json(tmp / REPORT_FILE, visible)
        (tmp / LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))
        (tmp / CARD_FILE).write_text(card if card is not None else _card(run_dir, meta, visible))
        shown_examples: dict[str, list[str]] = {}
        if examples:
            for index, paths in _example_images(run_dir, config, class_names).items():
                target = tmp / EXAMPLES_DIR / str(index)
                target.mkdir(parents=True)
                for n, path in enumerate(paths):
                    name = f"{n}{Path(path).suffix.lower()}"
                    shutil.copy2(path, target / name)
                    shown_examples.setdefault(str(index), []).append(name)
        exports: list[str] = []
        if downloads and rundir.export_dir(run_dir).is_dir():
            for path in sorted(rundir.export_dir(run_dir).iterdir()):
                if path.is_file() and path.suffix.lower() in EXPORT_SUFFIXES:
                    (tmp / EXPORTS_DIR).mkdir(exist_ok=True)
                    name = clean_file_name(path.name, "export")
                    shutil.copy2(path, tmp / EXPORTS_DIR / name)
                    exports.append(name)
        record = {
            "share_id": share_id,
            "owner": owner,
            "run_id": run_dir.name,
            "model_name": clean_file_name(config.get("dataset_name") or run_dir.name, "model"),
            "class_names": class_names,
            "created": now,
            "expires": expires,
            "downloads": bool(downloads),
            "exports": exports,
            "examples": shown_examples,
            "revoked": False,
        }
        write_json(tmp / SHARE_FILE, record)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"url_path": url_path(share_id), "share_id": share_id, "expires": expires}


def _card(run_dir: Path, meta: dict[str, Any], report: dict[str, Any]) -> str:
    from retrain.export.export import model_card

    evaluation = None
    if "accuracy" in report:
        evaluation = {
            "images": report.get("num_images"),
            "accuracy": report["accuracy"],
            "macro_f1": (report.get("macro") or {}).get("f1"),
        }
    return model_card(run_dir, meta, evaluation)


def card_answer(run_dir: str, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card a share of ``run_dir`` shows, as the model workers answer it (request
    kind ``share_card``): ``{"card": markdown}``. ``evaluation``: the report's ``accuracy``,
    ``num_images`` and ``macro``."""
    from retrain.models.modelfile import read_metadata

    run_dir = Path(run_dir)
    return {"card": _card(run_dir, read_metadata(_run_model(run_dir)), evaluation or {})}


def card_evaluation(report: dict[str, Any]) -> dict[str, Any]:
    """What of an evaluation report the model card shows (the ``share_card`` argument)."""
    return {k: report[k] for k in ("accuracy", "num_images", "macro") if k in report}


def read_share(share_id: Any, now: float | None = None) -> dict[str, Any]:
    """The record of a live share, with ``folder`` (its files) added.

    Raises:
        ShareError: malformed or unknown id ("no such link"), revoked, or expired; one line.
    """
    folder = share_folder(share_id)
    record = read_json(folder / SHARE_FILE)
    if not isinstance(record, dict):
        raise ShareError(NO_SUCH_LINK)
    now = time.time() if now is None else now
    if record.get("revoked"):
        raise ShareError("This link was revoked by its owner: ask them for a new one.")
    if now >= float(record.get("expires") or 0):
        day = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(record.get("expires") or 0)))
        raise ShareError(f"This link expired on {day}: ask its owner for a new one.")
    if not (folder / MODEL_FILE).is_file():
        raise ShareError(NO_SUCH_LINK)
    return {**record, "folder": folder}


def share_file(record: dict[str, Any], name: str) -> Path:
    """One file of a live share (``MODEL_FILE``, ``CARD_FILE``, ...)."""
    return Path(record["folder"]) / name


def read_report(record: dict[str, Any]) -> dict[str, Any]:
    """The shared evaluation report ({} when there is none)."""
    report = read_json(share_file(record, REPORT_FILE))
    return report if isinstance(report, dict) else {}


def read_shared_metrics(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The shared run's per-epoch metrics."""
    path = share_file(record, METRICS_FILE)
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def example_images(record: dict[str, Any]) -> dict[str, list[Path]]:
    """Class name -> the shared example images (empty unless the owner included them)."""
    names = record.get("class_names") or []
    found: dict[str, list[Path]] = {}
    for index, files in (record.get("examples") or {}).items():
        if not str(index).isdigit() or int(index) >= len(names):
            continue
        for name in files:
            path = share_file(record, EXAMPLES_DIR) / str(int(index)) / clean_file_name(name)
            if path.is_file() and is_within(path, record["folder"]):
                found.setdefault(names[int(index)], []).append(path)
    return found


def export_files(record: dict[str, Any]) -> list[Path]:
    """The exported files a share offers for download (none unless downloads were allowed)."""
    if not record.get("downloads"):
        return []
    folder = share_file(record, EXPORTS_DIR)
    found = []
    for name in record.get("exports") or []:
        path = folder / clean_file_name(name)
        if path.is_file() and is_within(path, record["folder"]):
            found.append(path)
    return found


def revoke_share(share_id: Any, owner: str | None = None) -> dict[str, Any]:
    """Revoke a share: its files go, a "revoked" record stays so the link says so.

    Args:
        owner: when given (a page), only that owner's share is revoked; the CLI, run by
            whoever runs the host, passes None.

    Raises:
        ShareError: no such link, or not ``owner``'s.
    """
    folder = share_folder(share_id)
    record = read_json(folder / SHARE_FILE)
    if not isinstance(record, dict) or (owner is not None and record.get("owner") != owner):
        raise ShareError(NO_SUCH_LINK)
    record["revoked"] = True
    record["revoked_at"] = time.time()
    write_json(folder / SHARE_FILE, record)
    for child in folder.iterdir():
        if child.name != SHARE_FILE:
            shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
    return {"share_id": share_id, "revoked": True}


def list_shares(owner: str, now: float | None = None) -> list[dict[str, Any]]:
    """The live shares of ``owner``, newest first (each with ``url_path``)."""
    now = time.time() if now is None else now
    found = []
    for folder in shares_root().iterdir():
        if not is_valid_share_id(folder.name):
            continue
        record = read_json(folder / SHARE_FILE)
        if not isinstance(record, dict) or record.get("owner") != owner:
            continue
        if record.get("revoked") or now >= float(record.get("expires") or 0):
            continue
        found.append({**record, "url_path": url_path(folder.name)})
    found.sort(key=lambda r: r.get("created") or 0, reverse=True)
    return found


def prune_shares(now: float | None = None) -> list[str]:
    """Delete the files of expired shares (their record stays, so the link says "expired");
    return their ids."""
    now = time.time() if now is None else now
    pruned = []
    for folder in shares_root().iterdir():
        if not is_valid_share_id(folder.name):
            continue
        record = read_json(folder / SHARE_FILE)
        if not isinstance(record, dict) or record.get("revoked"):
            continue
        if now >= float(record.get("expires") or 0) and (folder / MODEL_FILE).exists():
            for child in folder.iterdir():
                if child.name != SHARE_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
            pruned.append(folder.name)
    return pruned


def copy_to_workspace(share_id: Any, workspace: str | Path) -> dict[str, Any]:
    """Copy a shared model (and its example images, when shared) into a visitor's workspace.

    Returns:
        ``{"model": path of the copied .keras (a BASE spec), "label", "examples": folder of
        class folders or None}``.

    Raises:
        ShareError: the link is not live.
    """
    record = read_share(share_id)
    target = Path(workspace) / "models" / f"shared-{share_id[:12]}"
    target.mkdir(parents=True, exist_ok=True)
    name = clean_file_name(f"{record.get('model_name') or 'shared'}.keras", "shared.keras")
    model = target / name
    shutil.copy2(share_file(record, MODEL_FILE), model)
    shutil.copy2(share_file(record, LABELS_FILE), target / LABELS_FILE)
    examples_dir = None
    shown = example_images(record)
    if shown:
        examples_dir = target / "examples"
        shutil.rmtree(examples_dir, ignore_errors=True)
        for class_name, paths in shown.items():
            folder = examples_dir / clean_file_name(class_name, "class")
            folder.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy2(path, folder / path.name)
    return {
        "model": str(model),
        "label": f"Shared model: {record.get('model_name')} ({len(record['class_names'])} classes)",
        "examples": str(examples_dir) if examples_dir else None,
    }


# ---------------------------------------------------------------------------- CLI


def cli_share(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain share RUN_DIR [--downloads] [--examples] [--expires HOURS]``.

    Scores the run in this process (the CLI may import Keras), then snapshots it.
    """
    from retrain.evaluate.metrics import evaluate_run
    from retrain.sessions.quotas import session_of

    run_dir = Path(args.run_dir)
    _expires(args.expires, time.time())  # refuse a bad --expires before scoring
    check_shareable(run_dir)
    report = evaluate_run(run_dir, "val", include_predictions=False)
    session = session_of(run_dir)
    return create_share(
        run_dir,
        report,
        owner=owner_key(session) if session is not None else "cli",
        downloads=args.downloads,
        examples=args.examples,
        expires_hours=args.expires,
    )


def cli_unshare(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain unshare SHARE_ID``: revoke a share link."""
    return revoke_share(args.share_id)
