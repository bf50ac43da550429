"""The run directory: every file a training run writes, and the one way to read and write each.

A run directory is the source of truth of one training run (DESIGN.md). This module names its
files and owns their formats; every other module (training, jobs, evaluation, export, pages)
goes through the functions below and never spells a file name::

    config.json     RunConfig: the TrainConfig fields + what training resolved (classes, ...)
    status.json     {"state": queued|running|stopping|done|failed, "updated", ...}; readers
                    (retrain.runs.jobs) report "interrupted" when the worker is gone
    metrics.jsonl   one JSON object per finished epoch (epoch, phase, loss, val_accuracy, ...)
    progress.json   the current epoch/batch, images per second, ETA (or a preparing phase)
    split.json      {"train": [...], "val": [...]}: image paths relative to the dataset root
    old_task.json   a keep-old-classes run: the original classes, how they were named, and the
                    old data's rehearsal memory and held-out images (paths, as split.json)
    lr_find.json    a run with --lr auto: the learning-rate range test's curve and the chosen
                    rate (retrain.training.lr_find.LRFinding); a resumed run reuses it
    stop            a stop request (its presence is the request)
    last.npz        the resume checkpoint: weights + optimizer state + epoch counter
    best.keras      the best epoch's model; model.keras the last one
    history.csv     Keras CSVLogger; tensorboard/ TensorBoard logs
    log.txt         the worker's stdout/stderr; pid its process id
    runner.json     where the run trains when not locally: {"runner": "ray", "job_id", "address", ...}

JSON files are written atomically (`retrain.sessions.workspace.write_json`), so a reader never
sees half a file. This module imports no framework and nothing of ``retrain`` above the workspace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrain.errors import RunError
from retrain.sessions.workspace import json_default, read_json, write_json

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
SPLIT_FILE = "split.json"
OLD_TASK_FILE = "old_task.json"  # keep-old-classes runs (retrain.training.keep)
LR_FIND_FILE = "lr_find.json"  # --lr auto: the range test (retrain.training.lr_find)
STOP_FILE = "stop"
CHECKPOINT_FILE = "last.npz"  # weights + optimizer state + epoch counter, for --resume
BEST_MODEL_FILE = "best.keras"
FINAL_MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
LOG_FILE = "log.txt"
PID_FILE = "pid"
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"  # exported files (retrain.export.export) and their zip
RUNNER_FILE = "runner.json"  # the runner that started the run (retrain.runs.runners)


# ----------------------------------------------------------------------------------------
# Paths of the files other code opens itself (Keras writes them, or a process logs to them).


def best_model_path(run_dir: Path) -> Path:
    """``best.keras``: the model of the best epoch by validation accuracy."""
    return Path(run_dir) / BEST_MODEL_FILE


def final_model_path(run_dir: Path) -> Path:
    """``model.keras``: the model as the run ended."""
    return Path(run_dir) / FINAL_MODEL_FILE


def history_path(run_dir: Path) -> Path:
    """``history.csv``, written by Keras's CSVLogger."""
    return Path(run_dir) / HISTORY_FILE


def tensorboard_dir(run_dir: Path) -> Path:
    """``tensorboard/``, written by Keras's TensorBoard callback."""
    return Path(run_dir) / TENSORBOARD_DIR


def export_dir(run_dir: Path) -> Path:
    """``export/``: the files `retrain.export.export` writes for the run (and their zip)."""
    return Path(run_dir) / EXPORT_DIR


def log_path(run_dir: Path) -> Path:
    """``log.txt``: the worker's stdout and stderr."""
    return Path(run_dir) / LOG_FILE


def config_path(run_dir: Path) -> Path:
    """``config.json`` (for its modification time; read it with `read_config`)."""
    return Path(run_dir) / CONFIG_FILE


# ----------------------------------------------------------------------------------------
# What a run directory is.


def is_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run (its config.json or status.json exists)."""
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE).is_file() or (run_dir / STATUS_FILE).is_file()


def has_config(run_dir: Path) -> bool:
    """Whether the run's ``config.json`` exists (written before its worker starts)."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def check_run_dir(run_dir: Path) -> None:
    """Raise `RunError` unless ``run_dir`` is a run directory.

    Raises:
        RunError: neither config.json nor status.json is there.
    """
    if not is_run_dir(run_dir):
        raise RunError(
            f"'{run_dir}' is not a run directory (no config.json or status.json). "
            "Pass the folder given to `train --out`."
        )


# ----------------------------------------------------------------------------------------
# config.json


@dataclass
class RunConfig:
    """``config.json``: the run's settings (the `retrain.training.config.TrainConfig` fields, kept
    as a dict so this module needs no config import) plus what training resolved.

    Reading is tolerant: keys it does not know stay in ``settings``, keys it misses are None.
    ``config.TrainConfig.from_json(run_config.settings)`` gives the TrainConfig back.
    """

    settings: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    dataset_id: str | None = None
    dataset_name: str | None = None
    manifest_path: str | None = None
    class_names: list[str] | None = None
    num_train: int | None = None
    num_val: int | None = None
    validation: str | None = None  # where validation images came from, in words
    image_size_used: list[int] | None = None
    loss: str | None = None
    label_encoding: str | None = None
    preprocessing: str | None = None  # the key used; also the setting of that name (see below)
    preprocessing_source: str | None = None  # how it was found: detected, probe, set by hand
    preprocessing_probe: dict[str, float] | None = None  # candidate -> accuracy on old data
    preprocessing_probe_info: dict[str, Any] | None = None  # log losses, sample, margin
    cut_at_used: str | None = None
    feature_cache: bool | None = None
    batch_size_used: int | None = None
    global_batch_size: int | None = None
    precision: str | None = None
    backend: str | None = None
    device: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    diff: dict[str, Any] | None = None
    lr_used: float | None = None  # phase 1's learning rate: set, or found (lr_find.json)

    @classmethod
    def resolved_keys(cls) -> tuple[str, ...]:
        """The keys training adds beside the settings."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "settings")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Split a ``config.json`` object into settings and resolved keys.

        ``preprocessing`` is both: the setting (auto or a key) is overwritten in the file by
        the key training used, which as a setting reproduces the run (resume keeps it).
        """
        resolved = set(cls.resolved_keys())
        return cls(
            settings={k: v for k, v in data.items() if k not in resolved or k == "preprocessing"},
            **{k: v for k, v in data.items() if k in resolved},
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat ``config.json`` object: settings first, then the resolved keys that are set."""
        out = dict(self.settings)
        for key in self.resolved_keys():
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """A setting or resolved key by name (``default`` when absent or None)."""
        value = getattr(self, key, None) if key in self.resolved_keys() else None
        if value is None:
            value = self.settings.get(key)
        return default if value is None else value


def write_config(run_dir: Path, config: RunConfig) -> None:
    """Write ``config.json``."""
    write_json(Path(run_dir) / CONFIG_FILE, config.to_dict())


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` as a plain dict ({} when missing or unreadable)."""
    config = read_json(Path(run_dir) / CONFIG_FILE)
    return config if isinstance(config, dict) else {}


def load_config(run_dir: Path) -> RunConfig:
    """The run's ``config.json`` as a `RunConfig`.

    Raises:
        RunError: the folder has no readable config.json.
    """
    config = read_json(Path(run_dir) / CONFIG_FILE)
    if not isinstance(config, dict):
        raise RunError(
            f"'{run_dir}' is not a run directory (no readable config.json). "
            "Pass the folder that `train` wrote."
        )
    return RunConfig.from_dict(config)


# ----------------------------------------------------------------------------------------
# status.json


def read_status_file(run_dir: Path) -> dict[str, Any] | None:
    """``status.json`` as written (None when missing or unreadable); no liveness check:
    `retrain.runs.jobs.read_status` adds that."""
    status = read_json(Path(run_dir) / STATUS_FILE)
    return status if isinstance(status, dict) else None


def write_status(run_dir: Path, state: str, **extra: Any) -> dict[str, Any]:
    """Update ``status.json``: ``state`` plus ``extra``, keeping the other keys; return it."""
    path = Path(run_dir) / STATUS_FILE
    status = read_json(path) or {}
    if state not in ("queued",):
        status.pop("position", None)
    status.update(extra)
    status["state"] = state
    status["updated"] = time.time()
    write_json(path, status)
    return status


def created_time(run_dir: Path) -> float:
    """When the run was created: config.json's modification time."""
    return (Path(run_dir) / CONFIG_FILE).stat().st_mtime


# ----------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All finished epochs (``metrics.jsonl``), oldest first; a half-written last line (a crash
    mid-write) is ignored."""
    rows: list[dict[str, Any]] = []
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def read_new_metrics(run_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The metrics lines written after byte ``offset``; return them and the next offset.

    Only complete lines count, so a line being written is picked up by the next call. A file
    shorter than ``offset`` (a resumed run rewrote it) is read again from the start.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    rows = []
    for line in chunk[:end].splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows, offset + end


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one finished epoch to ``metrics.jsonl`` (flushed to disk: a crash keeps it)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row, default=json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(run_dir: Path, last_epoch: int) -> list[dict[str, Any]]:
    """Keep the metrics of epochs up to ``last_epoch`` (one line each); return them.

    A resumed run calls it: epochs after its checkpoint will be trained again.
    """
    seen: set[int] = set()
    kept = []
    for row in read_metrics(run_dir):
        epoch = row.get("epoch", 0)
        if epoch <= last_epoch and epoch not in seen:
            seen.add(epoch)
            kept.append(row)
    (Path(run_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def best_val_accuracy(metrics: list[dict[str, Any]]) -> float | None:
    """The best validation accuracy of finished epochs (None without validation)."""
    values = [m["val_accuracy"] for m in metrics if m.get("val_accuracy") is not None]
    return max(values) if values else None


def saved_score(
    status: dict[str, Any], metrics: list[dict[str, Any]]
) -> tuple[int | None, float | None]:
    """The epoch of ``best.keras`` (what evaluate, export and share use) and its validation
    accuracy as logged; (None, None) when the run does not say (runs older than
    ``saved_epoch`` give ``best_epoch``, the same epoch there)."""
    epoch = status.get("saved_epoch") or status.get("best_epoch")
    row = next((m for m in metrics if epoch and m.get("epoch") == epoch), None)
    if row is None or row.get("val_accuracy") is None:
        return None, None
    return int(epoch), float(row["val_accuracy"])


# ----------------------------------------------------------------------------------------
# progress.json


def write_progress(run_dir: Path, progress: dict[str, Any]) -> None:
    """Replace ``progress.json`` (``time`` is added when missing)."""
    write_json(
        Path(run_dir) / PROGRESS_FILE, {**progress, "time": progress.get("time", time.time())}
    )


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    """The worker's latest ``progress.json`` (None before it wrote one)."""
    progress = read_json(Path(run_dir) / PROGRESS_FILE)
    return progress if isinstance(progress, dict) else None


# ----------------------------------------------------------------------------------------
# Stop requests


def request_stop(run_dir: Path) -> None:
    """Ask the run's worker to stop after its current batch (it keeps what it trained).

    Raises:
        RunError: ``run_dir`` is not a run directory.
    """
    check_run_dir(run_dir)
    (Path(run_dir) / STOP_FILE).write_text(str(time.time()))


def stop_requested(run_dir: Path) -> bool:
    """Whether a stop was requested (and not yet cleared by a new worker)."""
    return (Path(run_dir) / STOP_FILE).exists()


def clear_stop(run_dir: Path) -> None:
    """Forget a stop request: it belonged to a previous worker of the run."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# The runner record: which runner started the run, and its job there (retrain.runs.runners)


def write_runner(run_dir: Path, record: dict[str, Any]) -> None:
    """Record the runner that started the run and its job (e.g. ``{"runner": "ray",
    "job_id", "address", ...}``), so any later process can find the job."""
    write_json(Path(run_dir) / RUNNER_FILE, record)


def read_runner(run_dir: Path) -> dict[str, Any] | None:
    """The run's runner record (None for a run the local runner started)."""
    record = read_json(Path(run_dir) / RUNNER_FILE)
    return record if isinstance(record, dict) else None


def clear_runner(run_dir: Path) -> None:
    """Forget the runner record (the run now trains in a local worker)."""
    (Path(run_dir) / RUNNER_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# The worker process: its pid and its log


def write_pid(run_dir: Path, pid: int) -> None:
    """Record the worker's process id (before it wrote status.json itself)."""
    (Path(run_dir) / PID_FILE).write_text(str(pid))


def read_pid(run_dir: Path) -> int | None:
    """The recorded worker process id (None when there is none)."""
    try:
        return int((Path(run_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def clear_pid(run_dir: Path) -> None:
    """Forget the previous worker's process id (a resumed run gets a new one)."""
    (Path(run_dir) / PID_FILE).unlink(missing_ok=True)


def log_size(run_dir: Path) -> int:
    """The size of ``log.txt`` in bytes (0 when missing)."""
    try:
        return (Path(run_dir) / LOG_FILE).stat().st_size
    except OSError:
        return 0


def read_log_tail(run_dir: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the worker's ``log.txt``."""
    try:
        with open(Path(run_dir) / LOG_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------------------
# old_task.json: what a keep-old-classes run kept of the original task


def write_old_task(run_dir: Path, record: dict[str, Any]) -> None:
    """Record the original task of a keep-old-classes run (`keep.OldTask.record`): keys
    ``original_classes``, ``class_names_rule`` and, with old data, ``dataset_id``,
    ``dataset_name``, ``manifest_path``, ``memory`` and ``val`` (paths relative to its root),
    ``val_split``, ``val_source``; training adds ``rehearsal_images``, ``old_val_images``,
    ``distill_weight`` and ``distill_temperature``."""
    write_json(Path(run_dir) / OLD_TASK_FILE, dict(record))


def read_old_task(run_dir: Path) -> dict[str, Any] | None:
    """The recorded original task (see `write_old_task`); None for other runs."""
    record = read_json(Path(run_dir) / OLD_TASK_FILE)
    return record if isinstance(record, dict) else None


def write_lr_find(run_dir: Path, record: dict[str, Any]) -> None:
    """Record a run's learning-rate range test (`lr_find.LRFinding.to_dict`): keys ``lrs``,
    ``losses`` (the curve), ``lr`` (the chosen rate), ``rule``, ``suggestions``, ``steps``,
    ``seconds``, ``images``, ``on``."""
    write_json(Path(run_dir) / LR_FIND_FILE, dict(record))


def read_lr_find(run_dir: Path) -> dict[str, Any] | None:
    """The recorded range test (see `write_lr_find`); None when the run set its own rate."""
    record = read_json(Path(run_dir) / LR_FIND_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("lr"), (int, float)):
        return None
    return record


def clear_lr_find(run_dir: Path) -> None:
    """Forget an earlier range test (a fresh run in a reused directory finds its own)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / LR_FIND_FILE).unlink()


# ----------------------------------------------------------------------------------------
# split.json: the images the run trained and validated on


def write_split(run_dir: Path, train: list[str], val: list[str]) -> None:
    """Record the split: image paths relative to the dataset root.

    Raises:
        RunError: an image is on both sides (a bug: validation must be held out).
    """
    overlap = set(train) & set(val)
    if overlap:
        raise RunError(
            f"The split puts {len(overlap)} images in both train and val "
            f"(e.g. '{sorted(overlap)[0]}'); start a new run."
        )
    write_json(Path(run_dir) / SPLIT_FILE, {"train": list(train), "val": list(val)})


def read_split(run_dir: Path) -> dict[str, list[str]] | None:
    """The recorded split ``{"train": [...], "val": [...]}``; None for runs without one
    (written by older versions)."""
    split = read_json(Path(run_dir) / SPLIT_FILE)
    if not isinstance(split, dict) or not all(
        isinstance(split.get(k), list) for k in ("train", "val")
    ):
        return None
    return {"train": [str(p) for p in split["train"]], "val": [str(p) for p in split["val"]]}


def indices_of(paths: list[str], wanted: list[str]) -> np.ndarray:
    """Positions in ``paths`` of the ``wanted`` paths, in ``paths`` order.

    Raises:
        RunError: a wanted path is not in ``paths`` (the data changed since the run).
    """
    position = {p: i for i, p in enumerate(paths)}
    missing = [p for p in wanted if p not in position]
    if missing:
        raise RunError(
            f"{len(missing)} images of the run's recorded split are no longer in its data "
            f"(e.g. '{missing[0]}'); evaluate on a test zip or folder, or start a new run."
        )
    return np.sort(np.asarray([position[p] for p in wanted], dtype=np.int64))


# ----------------------------------------------------------------------------------------
# last.npz: the resume checkpoint


def save_checkpoint(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``last.npz`` atomically: ``arrays`` plus ``meta`` (JSON) under the key "meta"."""
    path = Path(run_dir) / CHECKPOINT_FILE
    payload = dict(arrays)
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **payload)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Any] | None:
    """Return ``(meta, npz)`` of the run's ``last.npz``, or None when there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    npz = np.load(path)
    meta = json.loads(npz["meta"].tobytes().decode())
    return meta, npz


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run can be resumed (``last.npz`` exists)."""
    return (Path(run_dir) / CHECKPOINT_FILE).is_file()
