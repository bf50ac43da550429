"""Training runs as worker processes: start, queue, watch, stop, resume.

The dashboard never trains in its own process. `start_run` writes the run directory's
config and spawns the worker command (`worker_command`: ``python -m retrain train ... --out
RUN_DIR``) in its own process group, with its output in the run's log. A crash of the worker
cannot take the app down, and the memory it used (GPU memory included) is returned when it
ends. The page then only reads the run directory (`read_status`, `read_metrics`,
`read_progress`, through `retrain.runs.rundir`).

At most ``$RETRAIN_MAX_WORKERS`` (default 1) workers train at once on a host. A worker takes a
ticket in ``<home>/queue/`` (`training_slot`) and waits, with its status saying ``queued`` and
its position, until fewer than N tickets are ahead of it; tickets of dead processes are dropped.

Status states: queued, running, stopping, done, failed (with ``error``), and interrupted,
which no worker writes: `read_status` reports it when the worker's process is gone while the
status still says queued/running/stopping.

This module knows processes, not training: it never imports `retrain.training.train` (the
worker entry `retrain.runs.worker` joins the two).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrain.errors import RunError
from retrain.runs import rundir
from retrain.runs.procs import own_start_time, process_alive
from retrain.runs.rundir import (  # noqa: F401  (the page reads runs through jobs)
    best_val_accuracy,
    read_config,
    read_log_tail,
    read_metrics,
    read_new_metrics,
    read_progress,
)
from retrain.sessions import quotas
from retrain.sessions.workspace import (
    home,
    keras_home,
    new_run_id,
    read_json,
    run_path,
    runs_dir,
    write_json,
)
from retrain.training.config import TrainConfig, config_to_args

ROOT = Path(__file__).resolve().parents[2]
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


@contextlib.contextmanager
def training_slot(run_dir: Path, poll_s: float = 0.5) -> Iterator[bool]:
    """Wait for one of the host's training slots; yield True once granted, False if a stop
    was requested while waiting. The slot is released on exit (and when the process dies,
    since tickets of dead processes are ignored).
    """
    run_dir = Path(run_dir)
    folder = queue_dir()
    started = own_start_time()
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
            if rundir.stop_requested(run_dir):
                yield False
                return
            rundir.write_status(
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


# ----------------------------------------------------------------------------------------
# The local runner: one worker subprocess per run.


#: How much a training worker started by the dashboard yields the CPU (``os.nice``): a
#: visitor's page or model request runs first, the training takes what is left (all of it on
#: an idle host). ``RETRAIN_TRAIN_NICE=0`` turns it off.
TRAIN_NICE = 10


def worker_env() -> dict[str, str]:
    """The environment of a worker: same home, capped CPU threads, unbuffered output, and the
    training's lower CPU priority (`TRAIN_NICE`)."""
    from retrain.training.devices import worker_threads

    env = dict(os.environ)
    env.update(
        {
            "RETRAIN_HOME": str(home()),
            "KERAS_HOME": str(keras_home()),
            # The worker applies it with devices.limit_threads before importing a framework.
            "RETRAIN_WORKER_THREADS": str(worker_threads()),
            "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            # Training is batch work: on a shared host the pages and model requests go first.
            "RETRAIN_TRAIN_NICE": env.get("RETRAIN_TRAIN_NICE", str(TRAIN_NICE)),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def worker_command(
    run_dir: Path,
    config: TrainConfig | None = None,
    workspace: Path | None = None,
    *,
    python: str | None = None,
) -> list[str]:
    """The command line of the worker that trains ``run_dir``.

    With ``config``: a new run (its flags, ``--out`` = ``run_dir``); without: ``--resume
    run_dir`` (the worker reads the run's config). ``python`` defaults to this interpreter.
    """
    if config is not None:
        args = config_to_args(dataclasses.replace(config, out=str(run_dir)))
    else:
        args = ["--resume", str(run_dir)]
    if workspace is not None:
        args += ["--workspace", str(Path(workspace))]
    return [python or sys.executable, "-m", "retrain", "train", *args]


def _spawn(run_dir: Path, command: list[str]) -> int:
    with open(rundir.log_path(run_dir), "ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=worker_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stop/kill never hits the app
        )
    rundir.write_pid(run_dir, proc.pid)
    return proc.pid


def create_run(config: TrainConfig, workspace: Path, *, run_dir: Path | None = None) -> Path:
    """Create a run directory (default: a new id in ``workspace``) with its config and a
    "queued" status, so the run shows up at once; start nothing. Return the run directory.

    Raises:
        QuotaError: ``workspace`` is a browser session that already has a run queued, running
            or stopping, or is over its disk quota (`retrain.sessions.quotas`).
    """
    check_session_limits(workspace)
    run_dir = Path(run_dir) if run_dir is not None else run_path(workspace, new_run_id())
    run_dir.mkdir(parents=True, exist_ok=False)
    config = dataclasses.replace(config, out=str(run_dir))
    rundir.write_config(run_dir, rundir.RunConfig(settings=config.to_dict(), run_id=run_dir.name))
    rundir.write_status(run_dir, "queued", created=time.time())
    return run_dir


def check_session_limits(workspace: Path) -> None:
    """One active run per browser session, and the session's disk quota (no limit for the
    CLI's own workspace). ``workspace`` may be any path inside the session.

    Raises:
        QuotaError: a run of the session is still active, or the session is over its quota.
    """
    session = quotas.session_of(workspace)
    if session is None:
        return
    for other in sorted(Path(session).glob("runs/*")):
        if other.is_dir() and is_live(other):
            raise quotas.QuotaError(
                f"Run '{other.name}' is still training in this session (one run at a time): "
                "wait for it or stop it on the Train page, then start again."
            )
    quotas.check_disk(session)


def prepare_resume(run_dir: Path) -> Path:
    """Mark a finished/interrupted run "queued" again, forgetting its old worker.

    Raises:
        RunError: the run is still active or is not a run directory.
    """
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status["state"] in ACTIVE_STATES:
        raise RunError(f"Run '{run_dir.name}' is still {status['state']}; stop it first.")
    check_session_limits(run_dir)
    rundir.write_status(run_dir, "queued", created=time.time(), error=None, stopped=False)
    rundir.clear_pid(run_dir)
    rundir.clear_stop(run_dir)  # the last stop request was the previous worker's
    return run_dir


def start_run(config: TrainConfig, workspace: Path, *, run_dir: Path | None = None) -> Path:
    """Create a run directory in ``workspace``, start its worker, return the run directory."""
    run_dir = create_run(config, workspace, run_dir=run_dir)
    _spawn(run_dir, worker_command(run_dir, config, workspace))
    return run_dir


def resume_run(run_dir: Path, workspace: Path | None = None) -> Path:
    """Start a worker that continues ``run_dir`` from its last finished epoch.

    Raises:
        RunError: the run is still active or is not a run directory.
    """
    run_dir = prepare_resume(run_dir)
    _spawn(run_dir, worker_command(run_dir, workspace=workspace))
    return run_dir


# ----------------------------------------------------------------------------------------
# Watching runs: status with liveness, stop, list, delete.


def _worker_alive(run_dir: Path, status: dict[str, Any]) -> bool:
    """Whether the worker of an active run still runs (or may still be starting)."""
    pid, started = status.get("pid"), status.get("pid_started")
    if not pid:
        pid, started = rundir.read_pid(run_dir), None
    if pid:
        return process_alive(pid, started)
    created = status.get("created") or status.get("updated") or 0
    return time.time() - float(created) < START_GRACE_S


def read_status(run_dir: Path) -> dict[str, Any]:
    """Return the run's status with ``run_id``; report ``interrupted`` for a dead worker.

    ``stopping`` is reported as soon as a stop was requested of a running worker.

    Raises:
        RunError: ``run_dir`` is not a run directory.
    """
    run_dir = Path(run_dir)
    rundir.check_run_dir(run_dir)
    status = rundir.read_status_file(run_dir)
    if status is None:
        status = {"state": "queued", "created": rundir.created_time(run_dir)}
    status = dict(status)
    state = status.get("state", "queued")
    if state in ACTIVE_STATES:
        record = rundir.read_runner(run_dir) or {}
        if record.get("runner") == "ray":
            status = _with_ray_view(run_dir, status, record)
            state = status["state"]
            if state == "running" and rundir.stop_requested(run_dir):
                status["state"] = "stopping"
        elif not _worker_alive(run_dir, status):
            status["previous_state"] = state
            status["state"] = state = "interrupted"
            status["error"] = (
                "The training process ended unexpectedly (killed or out of memory); "
                "resume the run to continue from its last finished epoch."
            )
        elif state == "running" and rundir.stop_requested(run_dir):
            status["state"] = "stopping"
    status["run_id"] = run_dir.name
    # A Ray job that died (failed in Ray, not by the worker's own hand) resumes like a crash.
    died = state == "interrupted" or (state == "failed" and "previous_state" in status)
    status["resumable"] = died and rundir.has_checkpoint(run_dir)
    return status


def _with_ray_view(run_dir: Path, status: dict[str, Any], record: dict[str, Any]) -> dict:
    """An active Ray run's liveness comes from Ray (`retrain.runs.ray_runner`), not from a pid on
    another machine: queued while Ray waits for resources, interrupted when the cluster is
    gone, failed with the job's last log line; ``ray`` holds Ray's view."""
    from retrain.runs import ray_runner

    view = ray_runner.job_view(record)
    if view.get("job_status") not in ("PENDING", "RUNNING"):
        # The job ended (or the cluster went away) right after the worker wrote its end.
        fresh = rundir.read_status_file(run_dir)
        if fresh and fresh.get("state") not in ACTIVE_STATES:
            return {**fresh, "ray": view}
    merged = ray_runner.apply_view(status, record, view)
    merged["ray"] = view
    return merged


def is_live(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run that is queued, running or stopping with its worker alive."""
    try:
        return read_status(run_dir).get("state") in ACTIVE_STATES
    except ValueError:  # not a run directory
        return False


def session_has_live_run(session: Path) -> bool:
    """Whether a session workspace has a live run (`retrain.sessions.workspace.cleanup_sessions`
    keeps it)."""
    return any(is_live(run_dir) for run_dir in Path(session).glob("runs/*"))


def request_stop(run_dir: Path) -> None:
    """Ask the run's worker to stop after its current batch (it keeps what it trained).

    Raises:
        RunError: ``run_dir`` is not a run directory.
    """
    rundir.request_stop(Path(run_dir))


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


def list_runs(workspace: Path) -> list[dict[str, Any]]:
    """The runs of one workspace, newest first: id, live state (dead workers show as
    interrupted), config, metrics, best val accuracy, start/finish times."""
    runs = []
    for run_dir in runs_dir(workspace).iterdir():
        if not run_dir.is_dir() or not rundir.has_config(run_dir):
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
                "created": status.get("created") or rundir.created_time(run_dir),
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
    """``python -m retrain status RUN_DIR``: the status (with interrupted detection) + summary."""
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
