"""The training worker's entry: take a training slot, then train.

``python -m retrain train ...`` lands here (`cli_train`): in a terminal, or as the worker
process `retrain.runs.jobs` starts for the dashboard (the command line is
`retrain.runs.jobs.worker_command`). This is the one module that knows both sides: the host's
queue of training slots (`retrain.runs.jobs.training_slot`) and the training itself
(`retrain.training.train.train`); neither of those imports the other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from retrain.errors import RunError
from retrain.runs import jobs, ray_runner, rundir
from retrain.training.config import TrainConfig, config_from_args
from retrain.training.train import train


def cli_train(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain train ...``: train in the foreground; return the summary JSON.

    ``--resume RUN_DIR`` reads the run's ``config.json`` and continues after its last
    finished epoch. The worker first waits for one of the host's training slots.

    Raises:
        ConfigError: bad flags. RunError: nothing to resume, divergence, out of memory.
    """
    threads = os.environ.get("RETRAIN_WORKER_THREADS")
    if threads:
        from retrain.training import devices

        devices.limit_threads(int(threads))
    yield_cpu(os.environ.get("RETRAIN_TRAIN_NICE"))
    resume = bool(getattr(args, "resume", None))
    if ray_runner.in_ray_job():  # Ray placed this worker; the dashboard wrote its run directory
        target = Path(args.resume if resume else (args.out or "."))
        ray_runner.enter_job(
            rundir.config_path(target), rundir.log_path(target), rundir.read_runner(target)
        )
    if resume:
        run_dir = Path(args.resume)
        saved = rundir.read_config(run_dir)
        if not saved:
            raise RunError(f"No config.json in '{run_dir}'; --resume needs a run directory.")
        settings = rundir.RunConfig.from_dict(saved).settings
        config = dataclasses.replace(TrainConfig.from_json(settings), out=str(run_dir))
    else:
        config = config_from_args(args)
        run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_in_slot(config, run_dir, workspace=getattr(args, "workspace", None), resume=resume)


AUTOGROUP = Path("/proc/self/autogroup")


def yield_cpu(nice: str | None) -> int:
    """Lower this process's CPU priority by ``nice`` (``RETRAIN_TRAIN_NICE``, set by the
    dashboard's `jobs.worker_env`; unset in a terminal); return the niceness now.

    On a Linux kernel with session autogroups (``/proc/sys/kernel/sched_autogroup_enabled``,
    the default on most distributions), a process's nice value only orders it among the
    processes of its own session, and the dashboard starts each training run in a session of
    its own. There ``os.nice`` alone changed nothing: measured here, a "nice 10" run still took
    an equal share of the cores beside the model workers. So the leader of its own session also
    lowers its session's group (`_yield_session`).
    """
    try:
        step = int(nice or 0)
    except ValueError:
        step = 0
    if step > 0:
        with contextlib.suppress(OSError):
            now = os.nice(step)
            _yield_session(now)
            return now
    return os.nice(0)


def _yield_session(niceness: int) -> None:
    """Give this process's autogroup the niceness ``niceness`` when this process leads its own
    session (a group shared with the dashboard is never touched)."""
    if not AUTOGROUP.exists() or os.getsid(0) != os.getpid():
        return
    with contextlib.suppress(OSError, ValueError):
        current = int(AUTOGROUP.read_text().split("nice")[-1])
        if niceness > current:  # only ever lower the priority (raising it needs privileges)
            AUTOGROUP.write_text(str(niceness))


def run_in_slot(
    config: TrainConfig, run_dir: Path, *, workspace: Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Wait for a training slot on this host, then `retrain.training.train.train` the run.

    A stop requested while waiting ends the run as done (stopped, no epoch trained). A worker
    that Ray placed takes no local slot (Ray queued it) but honours a stop requested before it
    started the same way.
    """
    if ray_runner.in_ray_job():
        if rundir.stop_requested(run_dir):
            rundir.write_status(run_dir, "done", stopped=True, finished=time.time())
            return {"run_dir": str(run_dir), "state": "done", "stopped": True, "epochs_done": 0}
        return train(config, run_dir, workspace=workspace, resume=resume)
    if (rundir.read_runner(run_dir) or {}).get("runner") == "ray":
        rundir.clear_runner(run_dir)  # it trains here now, not in its old Ray job
    with jobs.training_slot(run_dir) as granted:
        if not granted:  # stopped while waiting in the queue
            rundir.write_status(run_dir, "done", stopped=True, finished=time.time())
            return {"run_dir": str(run_dir), "state": "done", "stopped": True, "epochs_done": 0}
        return train(config, run_dir, workspace=workspace, resume=resume)
