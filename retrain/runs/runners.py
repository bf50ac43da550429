"""Where runs train: one small interface, two runners (``RETRAIN_RUNNER=local|ray``).

* ``local`` (the default): the worker subprocess on this host, behind the host's training
  slots (`retrain.runs.jobs`). Nothing on this path imports Ray.
* ``ray``: the same worker command as a Ray job on a cluster (`retrain.runs.ray_runner`); Ray
  queues and places it. The run directory records the job (``runner.json``, through
  `retrain.runs.rundir`), so any later process finds it.

Both runners answer `start`, `resume`, `status`, `stop` and `logs` with the same shapes; a
run already started is handled by the runner that started it (`runner_for`), whatever
``RETRAIN_RUNNER`` says now. ``python -m retrain submit`` is `cli_submit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Protocol

from retrain.errors import ConfigError, RunError
from retrain.runs import jobs, rundir
from retrain.training.config import TrainConfig, config_from_args

RUNNERS = ("local", "ray")


class Runner(Protocol):
    """What the dashboard and the CLI need from a place that trains runs."""

    name: str

    def start(
        self,
        config: TrainConfig,
        workspace: Path,
        *,
        run_dir: Path | None = None,
        gpus: float | str | None = None,  # a number, "auto", None: $RETRAIN_RAY_GPUS
        cpus: float | None = None,
    ) -> dict[str, Any]:
        """Start a new run; return ``{"run_dir", "runner", "job_id", "state"}`` at once."""
        ...

    def resume(
        self,
        run_dir: Path,
        workspace: Path | None = None,
        *,
        gpus: float | str | None = None,  # a number, "auto", None: $RETRAIN_RAY_GPUS
        cpus: float | None = None,
    ) -> dict[str, Any]:
        """Continue a stopped/interrupted run from its last finished epoch (same shape)."""
        ...

    def status(self, run_dir: Path) -> dict[str, Any]:
        """The run's status (`retrain.runs.jobs.read_status`: liveness included)."""
        ...

    def stop(self, run_dir: Path) -> dict[str, Any]:
        """Ask the run to stop after its current batch; return ``{"run_dir", "state", ...}``."""
        ...

    def logs(self, run_dir: Path, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's output."""
        ...


def runner_name(name: str | None = None) -> str:
    """``name``, else ``$RETRAIN_RUNNER``, else ``local``.

    Raises:
        ConfigError: not one of ``local``, ``ray``.
    """
    value = (name or os.environ.get("RETRAIN_RUNNER") or "local").strip().lower()
    if value not in RUNNERS:
        raise ConfigError(f"Unknown runner '{value}'; use RETRAIN_RUNNER=local or ray.")
    return value


def get_runner(name: str | None = None) -> Runner:
    """The runner called ``name`` (default: `runner_name`)."""
    return RayRunner() if runner_name(name) == "ray" else LocalRunner()


def runner_for(run_dir: Path) -> Runner:
    """The runner that started ``run_dir`` (its ``runner.json``; none means local)."""
    record = rundir.read_runner(Path(run_dir)) or {}
    return RayRunner() if record.get("runner") == "ray" else LocalRunner()


def _reply(run_dir: Path, runner: str, job_id: str | None) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "runner": runner,
        "job_id": job_id,
        "state": jobs.read_status(run_dir)["state"],
    }


class LocalRunner:
    """Today's worker subprocess on this host, behind the host's training slots."""

    name = "local"

    def start(self, config, workspace, *, run_dir=None, gpus=None, cpus=None):
        if run_dir is None:
            run_dir = jobs.start_run(config, workspace)
        else:
            run_dir = jobs.start_run(config, workspace, run_dir=run_dir)
        return _reply(run_dir, self.name, str(rundir.read_pid(run_dir) or ""))

    def resume(self, run_dir, workspace=None, *, gpus=None, cpus=None):
        run_dir = Path(run_dir)
        jobs.prepare_resume(run_dir)  # refuses an active run before the record is touched
        rundir.clear_runner(run_dir)  # from now on a local worker trains it (pid liveness)
        run_dir = jobs.resume_run(run_dir, workspace)
        return _reply(run_dir, self.name, str(rundir.read_pid(run_dir) or ""))

    def status(self, run_dir):
        return jobs.read_status(Path(run_dir))

    def stop(self, run_dir):
        run_dir = Path(run_dir)
        jobs.request_stop(run_dir)
        return {
            "run_dir": str(run_dir),
            "stop_requested": True,
            "state": self.status(run_dir)["state"],
        }

    def logs(self, run_dir, lines=40):
        return rundir.read_log_tail(Path(run_dir), lines)


class RayRunner:
    """The same worker command as a Ray job (`retrain.runs.ray_runner`); Ray queues and places
    it."""

    name = "ray"

    def check(self) -> None:
        """The storage probe (once per cluster session): raises `ClusterError` when the
        cluster's nodes do not share ``RETRAIN_HOME`` with this process."""
        from retrain.runs import ray_runner

        ray_runner.check_storage()

    def _submit(self, run_dir: Path, command: list[str], gpus, cpus) -> dict[str, Any]:
        from retrain.runs import ray_runner

        _, cpus = ray_runner.resources(gpus, cpus)
        try:
            gpus, reason = ray_runner.choose_gpus(gpus)  # "auto" looks at the cluster
            record = ray_runner.submit(
                command, run_dir=run_dir, gpus=gpus, cpus=cpus, gpus_reason=reason
            )
        except RunError as err:
            rundir.write_status(run_dir, "failed", error=str(err), finished=time.time())
            raise
        rundir.write_runner(run_dir, record)
        return _reply(run_dir, self.name, record["job_id"])

    def start(self, config, workspace, *, run_dir=None, gpus=None, cpus=None):
        from retrain.runs import ray_runner

        ray_runner.resources(gpus, cpus)  # bad values fail before anything is written
        self.check()
        run_dir = jobs.create_run(config, workspace, run_dir=run_dir)
        command = jobs.worker_command(
            run_dir, dataclasses.replace(config, out=str(run_dir)), workspace
        )
        return self._submit(run_dir, command, gpus, cpus)

    def resume(self, run_dir, workspace=None, *, gpus=None, cpus=None):
        from retrain.runs import ray_runner

        run_dir = Path(run_dir)
        ray_runner.resources(gpus, cpus)
        self.check()
        jobs.prepare_resume(run_dir)
        rundir.clear_stop(run_dir)  # the last stop request was the previous job's
        return self._submit(run_dir, jobs.worker_command(run_dir, workspace=workspace), gpus, cpus)

    def status(self, run_dir):
        return jobs.read_status(Path(run_dir))

    def stop(self, run_dir):
        """The run directory's stop request (the worker stops after its current batch and
        keeps what it trained); a job Ray has not started is also cancelled in Ray and the
        run ends as stopped, as a local run stopped in the queue does."""
        from retrain.runs import ray_runner

        run_dir = Path(run_dir)
        jobs.request_stop(run_dir)
        record = rundir.read_runner(run_dir) or {}
        status = jobs.read_status(run_dir)
        reply = {"run_dir": str(run_dir), "stop_requested": True, "state": status["state"]}
        if status["state"] == "queued" and status.get("ray", {}).get("job_status") == "PENDING":
            reply["ray_stop_job"] = ray_runner.stop_job(record)
            rundir.write_status(run_dir, "done", stopped=True, finished=time.time())
            reply["state"] = "done"
        return reply

    def logs(self, run_dir, lines=40):
        """The run's log; Ray's copy of the job's output when the worker wrote none (a job
        that failed before the worker started: no Python, no code, no shared volume)."""
        from retrain.runs import ray_runner

        run_dir = Path(run_dir)
        text = rundir.read_log_tail(run_dir, lines)
        if text.strip():
            return text
        try:
            output = ray_runner.job_logs(rundir.read_runner(run_dir) or {})
        except RunError as err:
            return str(err)
        return "\n".join(output.splitlines()[-lines:])


# --- The command line -----------------------------------------------------------------


def cli_submit(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain submit [train flags] --out RUN_DIR [--runner] [--gpus] [--cpus]``:
    start the run (or ``--resume RUN_DIR``) and return at once with
    ``{"run_dir", "runner", "job_id", "state"}``.

    Raises:
        ConfigError: bad flags or settings. RunError / ClusterError: the run cannot start.
    """
    workspace = getattr(args, "workspace", None)
    if getattr(args, "resume", None):
        run_dir = Path(args.resume)
        rundir.check_run_dir(run_dir)
        runner = get_runner(args.runner) if args.runner else runner_for(run_dir)
        return runner.resume(run_dir, workspace, gpus=args.gpus, cpus=args.cpus)
    config = config_from_args(args)
    if not config.out:
        raise ConfigError("submit needs --out RUN_DIR (the run directory to create).")
    if Path(config.out).exists():
        hint = f"continue it with --resume {config.out}" if rundir.has_config(config.out) else ""
        raise RunError(
            f"'{config.out}' already exists; submit creates a new run directory: "
            + (f"{hint}, or choose a new --out." if hint else "choose a new --out.")
        )
    runner = get_runner(args.runner)
    return runner.start(config, workspace, run_dir=Path(config.out), gpus=args.gpus, cpus=args.cpus)


def cli_status(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain status RUN_DIR``: `retrain.runs.jobs.cli_status` plus ``runner`` and,
    for a Ray run, ``gpus`` and ``gpus_reason`` (what the job asked Ray for, and why) and
    ``ray`` (Ray's view of its job, asked even when the run has ended)."""
    result = jobs.cli_status(args)
    record = rundir.read_runner(Path(args.run_dir)) or {}
    result["runner"] = record.get("runner", "local")
    if record.get("runner") == "ray":
        result["gpus"] = record.get("gpus")
        result["gpus_reason"] = record.get("gpus_reason") or f"asked for {record.get('gpus')}"
    if record.get("runner") == "ray" and "ray" not in result:
        from retrain.runs import ray_runner

        result["ray"] = ray_runner.job_view(record)
    return result


def cli_stop(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m retrain stop RUN_DIR``: the run's runner stops it; the reply keeps
    ``{"run_dir", "stop_requested", "state"}``."""
    run_dir = Path(args.run_dir)
    rundir.check_run_dir(run_dir)
    return runner_for(run_dir).stop(run_dir)
