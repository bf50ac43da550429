"""Training runs as worker processes: start, queue, watch, stop, resume.

The dashboard never trains in its own process. `start_run` writes the run directory's
``config.json`` and spawns ``python -m retrain train ... --out RUN_DIR`` in its own process
group, with its output in ``log.txt``. A crash of the worker cannot take the app down, and the
memory it used (GPU memory included) is returned when it ends. The page then only reads files
(`read_status`, `read_metrics`, `read_progress`).

At most ``$RETRAIN_MAX_WORKERS`` (default 1) workers train at once on a host. A worker takes a
ticket in ``<home>/queue/`` and waits, with ``status.json`` saying ``queued`` and its position,
until fewer than N tickets are ahead of it; tickets of dead processes are dropped.

status.json states: queued, running, stopping, done, failed (with ``error``), and
interrupted, which no worker writes: `read_status` reports it when the worker's process is
gone while the file still says queued/running/stopping.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrain.errors import RunError
from retrain.train import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    PROGRESS_FILE,
    STATUS_FILE,
    STOP_FILE,
    TrainConfig,
    config_to_args,
    read_json,
    read_metrics_file,
    write_json,
    write_status,
)
from retrain.workspace import home, keras_home, new_run_id, run_path, runs_dir

ROOT = Path(__file__).resolve().parents[1]
LOG_FILE = "log.txt"
PID_FILE = "pid"
ACTIVE_STATES = ("queued", "running", "stopping")
# A run whose worker has not written its pid yet counts as alive for this long.
START_GRACE_S = 60.0


def max_workers() -> int:
    """Training workers allowed at once on this host (``$RETRAIN_MAX_WORKERS``, default 1)."""
    try:
        return max(1, int(os.environ.get("RETRAIN_MAX_WORKERS", "1")))
    except ValueError:
        return 1


def queue_dir() -> Path:
    """The host-wide folder of training-slot tickets."""
    path = home() / "queue"
    path.mkdir(parents=True, exist_ok=True)
    return path


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie); with ``started``, also that it is the same
    process (its start time matches), so a reused pid is not mistaken for the worker."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not (started and abs(proc.create_time() - float(started)) > 2.0)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _own_start_time() -> float | None:
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None


@contextlib.contextmanager
def training_slot(run_dir: Path, poll_s: float = 0.5) -> Iterator[bool]:
    """Wait for one of the host's training slots; yield True once granted, False if a stop
    was requested while waiting. The slot is released on exit (and when the process dies,
    since tickets of dead processes are ignored).
    """
    run_dir = Path(run_dir)
    folder = queue_dir()
    started = _own_start_time()
    ticket = folder / f"{time.time_ns():020d}-{os.getpid()}.json"
    write_json(ticket, {"pid": os.getpid(), "started": started, "run_dir": str(run_dir)})
    try:
        while True:
            ahead = 0
            for other in sorted(folder.glob("*.json")):
                if other == ticket:
                    break
                info = read_json(other)
                if not isinstance(info, dict) or not process_alive(
                    info.get("pid"), info.get("started")
                ):
                    other.unlink(missing_ok=True)
                    continue
                ahead += 1
            if ahead < max_workers():
                break
            if (run_dir / STOP_FILE).exists():
                yield False
                return
            write_status(
                run_dir,
                "queued",
                position=ahead - max_workers() + 1,
                pid=os.getpid(),
                pid_started=started,
            )
            time.sleep(poll_s)
        yield True
    finally:
        ticket.unlink(missing_ok=True)


def worker_env() -> dict[str, str]:
    """The environment of a worker: same home, capped CPU threads, unbuffered output."""
    from retrain.devices import worker_threads

    env = dict(os.environ)
    env.update(
        {
            "RETRAIN_HOME": str(home()),
            "KERAS_HOME": str(keras_home()),
            # The worker applies it with devices.limit_threads before importing a framework.
            "RETRAIN_WORKER_THREADS": str(worker_threads()),
            "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def _spawn(run_dir: Path, args: list[str]) -> int:
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "retrain", "train", *args],
            cwd=ROOT,
            env=worker_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stop/kill never hits the app
        )
    (run_dir / PID_FILE).write_text(str(proc.pid))
    return proc.pid


def start_run(config: TrainConfig, workspace: Path) -> Path:
    """Create a run directory in ``workspace``, start its worker, return the run directory.

    ``config.json`` is written before the worker starts, so the run shows up (queued) at once.
    """
    run_dir = run_path(workspace, new_run_id())
    run_dir.mkdir(parents=True, exist_ok=False)
    config = dataclasses.replace(config, out=str(run_dir))
    write_json(run_dir / CONFIG_FILE, {**config.to_dict(), "run_id": run_dir.name})
    write_status(run_dir, "queued", created=time.time())
    _spawn(run_dir, [*config_to_args(config), "--workspace", str(Path(workspace))])
    return run_dir


def resume_run(run_dir: Path, workspace: Path | None = None) -> Path:
    """Start a worker that continues ``run_dir`` from its last finished epoch.

    Raises:
        RunError: the run is still active or is not a run directory.
    """
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status["state"] in ACTIVE_STATES:
        raise RunError(f"Run '{run_dir.name}' is still {status['state']}; stop it first.")
    write_status(run_dir, "queued", created=time.time(), error=None, stopped=False)
    (run_dir / PID_FILE).unlink(missing_ok=True)
    args = ["--resume", str(run_dir)]
    if workspace is not None:
        args += ["--workspace", str(workspace)]
    _spawn(run_dir, args)
    return run_dir


def _check_run_dir(run_dir: Path) -> None:
    if not (run_dir / CONFIG_FILE).is_file() and not (run_dir / STATUS_FILE).is_file():
        raise RunError(
            f"'{run_dir}' is not a run directory (no config.json or status.json). "
            "Pass the folder given to `train --out`."
        )


def read_status(run_dir: Path) -> dict[str, Any]:
    """Return ``status.json`` with ``run_id``; report ``interrupted`` for a dead worker.

    ``stopping`` is reported as soon as a stop was requested of a running worker.

    Raises:
        RunError: ``run_dir`` is not a run directory.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    status = read_json(run_dir / STATUS_FILE)
    if not isinstance(status, dict):
        status = {"state": "queued", "created": (run_dir / CONFIG_FILE).stat().st_mtime}
    status = dict(status)
    state = status.get("state", "queued")
    if state in ACTIVE_STATES:
        pid = status.get("pid")
        started = status.get("pid_started")
        if not pid:
            try:
                pid, started = int((run_dir / PID_FILE).read_text().strip()), None
            except (OSError, ValueError):
                pid = None
        if pid:
            alive = process_alive(pid, started)
        else:
            created = status.get("created") or status.get("updated") or 0
            alive = time.time() - float(created) < START_GRACE_S
        if not alive:
            status["previous_state"] = state
            status["state"] = state = "interrupted"
            status["error"] = (
                "The training process ended unexpectedly (killed or out of memory); "
                "resume the run to continue from its last finished epoch."
            )
        elif state == "running" and (run_dir / STOP_FILE).exists():
            status["state"] = "stopping"
    status["run_id"] = run_dir.name
    status["resumable"] = state == "interrupted" and (run_dir / CHECKPOINT_FILE).is_file()
    return status


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All finished epochs of a run (``metrics.jsonl``), oldest first."""
    return read_metrics_file(Path(run_dir))


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


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    """The worker's latest ``progress.json`` (None before it wrote one)."""
    progress = read_json(Path(run_dir) / PROGRESS_FILE)
    return progress if isinstance(progress, dict) else None


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` ({} when unreadable)."""
    config = read_json(Path(run_dir) / CONFIG_FILE)
    return config if isinstance(config, dict) else {}


def read_log_tail(run_dir: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the worker's ``log.txt``."""
    try:
        with open(Path(run_dir) / LOG_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def request_stop(run_dir: Path) -> None:
    """Ask the run's worker to stop after its current batch (it keeps what it trained).

    Raises:
        RunError: ``run_dir`` is not a run directory.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    (run_dir / STOP_FILE).write_text(str(time.time()))


def delete_run(workspace: Path, run_id: str) -> None:
    """Delete a finished run of ``workspace`` and all its files.

    Raises:
        RunError: the run is still queued, running or stopping.
        ConfigError: ``run_id`` is not a plain run id.
    """
    run_dir = run_path(workspace, run_id)
    if not run_dir.is_dir():
        return
    state = read_status(run_dir).get("state")
    if state in ACTIVE_STATES:
        raise RunError(f"Run '{run_id}' is {state}; stop it on the Train page before deleting it.")
    shutil.rmtree(run_dir)


def best_val_accuracy(metrics: list[dict[str, Any]]) -> float | None:
    """The best validation accuracy of finished epochs (None without validation)."""
    values = [m["val_accuracy"] for m in metrics if m.get("val_accuracy") is not None]
    return max(values) if values else None


def list_runs(workspace: Path) -> list[dict[str, Any]]:
    """The runs of one workspace, newest first: id, live state (dead workers show as
    interrupted), config, metrics, best val accuracy, start/finish times."""
    runs = []
    for run_dir in runs_dir(workspace).iterdir():
        if not run_dir.is_dir() or not (run_dir / CONFIG_FILE).is_file():
            continue
        status = read_status(run_dir)
        config = read_config(run_dir)
        metrics = read_metrics(run_dir)
        runs.append(
            {
                "run_id": run_dir.name,
                "run_dir": str(run_dir),
                "state": status["state"],
                "error": status.get("error"),
                "created": status.get("created") or (run_dir / CONFIG_FILE).stat().st_mtime,
                "base": config.get("base"),
                "data": config.get("dataset_name") or Path(str(config.get("data", ""))).name,
                "epochs": int(config.get("epochs", 0)) + int(config.get("fine_tune_epochs", 0)),
                "epochs_done": len(metrics),
                "best_val_accuracy": best_val_accuracy(metrics),
                "started": status.get("started"),
                "finished": status.get("finished"),
                "config": config,
                "metrics": metrics,
            }
        )
    runs.sort(key=lambda r: (r["created"], r["run_id"]), reverse=True)
    return runs


def cli_status(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain status RUN_DIR``: status.json (with interrupted detection) + summary."""
    run_dir = Path(args.run_dir)
    status = read_status(run_dir)
    metrics = read_metrics(run_dir)
    status["epochs_done"] = len(metrics)
    status["best_val_accuracy"] = best_val_accuracy(metrics)
    return status


def cli_stop(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain stop RUN_DIR``: request a stop; print the resulting state."""
    run_dir = Path(args.run_dir)
    request_stop(run_dir)
    return {"run_dir": str(run_dir), "stop_requested": True, "state": read_status(run_dir)["state"]}
