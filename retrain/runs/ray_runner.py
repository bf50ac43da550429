"""Training runs as Ray jobs on a Ray cluster (the ``ray`` runner; docs/scale-out.md).

The run directory stays the single source of truth: a Ray job runs exactly the worker command
the local runner runs for that run directory (``python -m retrain train ... --out RUN_DIR``
or ``--resume RUN_DIR``), and the worker writes status, metrics, progress and checkpoints
there, on storage that the dashboard and every Ray node share (``$RETRAIN_HOME`` mounted at
the same path everywhere). Ray queues and places the jobs: each asks for its GPUs/CPUs
(``entrypoint_num_gpus``/``entrypoint_num_cpus``) and the worker takes no local training slot
(`RAY_JOB_ENV` in its environment says so). Nothing here schedules anything.

Settings (environment):
    RAY_ADDRESS: the cluster's dashboard/Jobs API, e.g. ``http://ray-head:8265`` (Ray's own
        variable; default ``http://127.0.0.1:8265``).
    RETRAIN_RAY_GPUS, RETRAIN_RAY_CPUS: what each run asks Ray for (default ``auto`` GPUs,
        1 CPU); ``submit --gpus/--cpus`` override them. ``auto`` (`choose_gpus`) asks for 1 GPU
        when the cluster has one or its autoscaler can add one, else for none.
    RETRAIN_RAY_SHIP_CODE: ``1`` ships this checkout's ``retrain/`` package with each job
        (Ray's ``runtime_env`` ``working_dir``); unset, the nodes must have the project
        installed (the Dockerfile's ``ray-node`` target).
    RETRAIN_RAY_PYTHON: the interpreter on the nodes (default ``python``).

`ray` itself is imported inside the functions that talk to the cluster: importing this module
costs nothing, and the local runner never imports it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import shlex
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from retrain.errors import ConfigError, RunError
from retrain.sessions.workspace import env_number, home, keras_home, read_json, write_json

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# In a Ray job's environment: Ray placed this worker; it takes no local training slot and
# expects its run directory to exist already (written by the dashboard on shared storage).
RAY_JOB_ENV = "RETRAIN_RAY_JOB"
# The job's own submission id, which the worker compares with the run's runner record.
JOB_ID_ENV = "RETRAIN_RAY_JOB_ID"
# Seconds for one request to the cluster: a cluster that does not answer is reported, never
# waited on forever.
REQUEST_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 120.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Where the storage probe leaves its files, and the record of the last good probe.
PROBE_DIR = ".ray-probe"
PROBE_RECORD = "ray-storage.json"


class ClusterError(RunError):
    """The Ray cluster cannot be reached, refused a job, or does not share RETRAIN_HOME."""


def in_ray_job() -> bool:
    """Whether this process is a worker that Ray placed (its job set `RAY_JOB_ENV`)."""
    return os.environ.get(RAY_JOB_ENV) == "1"


def address() -> str:
    """The cluster's Jobs API address (``$RAY_ADDRESS``, default ``http://127.0.0.1:8265``).

    Raises:
        ConfigError: ``$RAY_ADDRESS`` is not an http(s) address (e.g. ``auto`` or ``ray://``,
            which name the cluster's internal ports, not its Jobs API).
    """
    value = os.environ.get("RAY_ADDRESS", "").strip().rstrip("/") or DEFAULT_ADDRESS
    if not value.startswith(("http://", "https://")):
        raise ConfigError(
            f"RAY_ADDRESS is '{value}'; the ray runner needs the Ray dashboard's address, "
            "e.g. RAY_ADDRESS=http://ray-head:8265."
        )
    return value


GPUS_ENV = "RETRAIN_RAY_GPUS"
GPUS_AUTO = "auto"


def parse_gpus(value: str | float | None = None) -> float | None:
    """The GPUs one run asks for: ``value`` (``--gpus``), else ``$RETRAIN_RAY_GPUS``, else
    ``auto``; None means ``auto`` (decided per run by `choose_gpus`).

    Raises:
        ConfigError: neither ``auto`` nor a number of 0 or more.
    """
    if value is None:
        raw = os.environ.get(GPUS_ENV, "").strip()
        if raw.lower() in ("", GPUS_AUTO):
            return None
        return env_number(GPUS_ENV, 0.0, allow_zero=True)
    if isinstance(value, str):
        if value.strip().lower() == GPUS_AUTO:
            return None
        try:
            number = float(value)
        except ValueError:
            number = -1.0
    else:
        number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"--gpus {value}: expected auto or a number of GPUs (0 or more).")
    return number


def resources(
    gpus: str | float | None = None, cpus: float | None = None
) -> tuple[float | None, float]:
    """The (GPUs, CPUs) one run asks Ray for: the arguments, else ``$RETRAIN_RAY_GPUS`` /
    ``$RETRAIN_RAY_CPUS``, else ``auto`` GPUs (None: `choose_gpus` decides) and 1 CPU.

    Raises:
        ConfigError: a negative or non-numeric value (``auto`` aside).
    """
    wanted = parse_gpus(gpus)
    cpus = env_number("RETRAIN_RAY_CPUS", 1.0, allow_zero=True) if cpus is None else float(cpus)
    if cpus < 0:
        raise ConfigError(f"--cpus {cpus:g}: expected 0 or more.")
    return wanted, cpus


def gpu_choice(
    cluster_gpus: float | None, autoscaler_gpus: float | None, autoscaler: bool
) -> tuple[float, str]:
    """What ``auto`` asks for, and why: 1 GPU when the cluster has one or its autoscaler can
    add one (``autoscaler_gpus``: the most its node types offer), else 0.

    Args:
        cluster_gpus: GPUs on the cluster's live nodes now (None: unknown).
        autoscaler_gpus: GPUs the autoscaler's node types can add (None: unknown).
        autoscaler: whether the cluster publishes an autoscaler config (node types).
    """
    if cluster_gpus:
        return 1.0, f"auto: the cluster has {cluster_gpus:g} GPU(s)"
    if autoscaler_gpus:
        return 1.0, (
            f"auto: the cluster has no GPU now; its autoscaler can add up to {autoscaler_gpus:g}"
        )
    if autoscaler:
        return 0.0, "auto: the cluster has no GPU and its autoscaler offers none"
    return 0.0, "auto: the cluster has no GPU and no autoscaler node types that could add one"


def live_gpus(addr: str) -> float | None:
    """GPUs on the cluster's live nodes, through Ray's State API (the dashboard address);
    None when it lists no node (a head that just started) or cannot be asked."""
    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(
            address=addr, filters=[("state", "=", "ALIVE")], timeout=int(REQUEST_TIMEOUT_S)
        )
    except Exception:  # noqa: BLE001 (Ray raises many types; the probe's count stands in)
        return None
    if not nodes:
        return None
    return float(sum((node.resources_total or {}).get("GPU", 0) for node in nodes))


def choose_gpus(gpus: str | float | None = None, addr: str | None = None) -> tuple[float, str]:
    """The GPUs one run asks Ray for, and why (recorded in the run's runner record).

    A number (``--gpus``, else ``$RETRAIN_RAY_GPUS``) is taken as it is. ``auto`` (the
    default) looks at the cluster: its live nodes' GPUs (Ray's State API, else the storage
    probe's ``ray.cluster_resources()``) and what its autoscaler can add (the probe's
    ``get_max_resources_from_cluster_config()``, Ray's view of the autoscaler's node types,
    the one Ray Train uses; none published: none can be added). See `gpu_choice`.

    Raises:
        ConfigError: a bad ``--gpus`` / ``$RETRAIN_RAY_GPUS``.
        ClusterError: the cluster cannot be reached (auto only).
    """
    wanted = parse_gpus(gpus)
    if wanted is not None:
        where = "--gpus" if gpus is not None else GPUS_ENV
        return wanted, f"asked for {wanted:g} ({where})"
    addr = addr or address()
    probe = check_storage(addr)
    now = live_gpus(addr)
    if now is None:
        now = probe.get("cluster_gpus")
    autoscaler = probe.get("autoscaler_resources")
    max_gpus = float(autoscaler.get("GPU") or 0) if isinstance(autoscaler, dict) else None
    gpus, reason = gpu_choice(now, max_gpus, isinstance(autoscaler, dict))
    if not gpus and probe.get("cluster_error"):
        reason += f" (the storage probe could not ask Ray: {probe['cluster_error']})"
    return gpus, reason


def node_python() -> str:
    """The interpreter that runs ``-m retrain`` on the nodes (``$RETRAIN_RAY_PYTHON``)."""
    return os.environ.get("RETRAIN_RAY_PYTHON", "").strip() or "python"


def _unreachable(addr: str, reason: object) -> ClusterError:
    return ClusterError(
        f"The Ray cluster at {addr} cannot be reached ({reason}). Start it, or set RAY_ADDRESS "
        "to its dashboard address (e.g. http://ray-head:8265)."
    )


def cluster_version(addr: str | None = None) -> dict[str, Any]:
    """The cluster's ``/api/version`` answer (``ray_version``, ``session_name``).

    A plain request with a timeout first, so a cluster that is down or black-holed is reported
    in seconds (Ray's client waits without a limit).

    Raises:
        ClusterError: the cluster does not answer.
    """
    addr = addr or address()
    try:
        with urllib.request.urlopen(f"{addr}/api/version", timeout=REQUEST_TIMEOUT_S) as reply:
            return json.loads(reply.read().decode())
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise _unreachable(addr, reason) from None


# One client per cluster address for this process (the page polls every second); dropped when
# a request to its cluster fails.
_CLIENTS: dict[str, Any] = {}


def client(addr: str | None = None):
    """A `ray.job_submission.JobSubmissionClient` for ``addr`` whose requests time out.

    Raises:
        ClusterError: the cluster does not answer, or Ray is not installed here.
    """
    addr = addr or address()
    if addr in _CLIENTS:
        return _CLIENTS[addr]
    cluster_version(addr)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ClusterError(
            "The ray runner needs Ray here: pip install -r requirements-ray.txt "
            "(or set RETRAIN_RUNNER=local)."
        ) from None
    # Ray logs each package upload at INFO on stderr; keep the CLI's stderr for errors.
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        ray_client = JobSubmissionClient(addr)
    except (ConnectionError, RuntimeError) as err:
        raise _unreachable(addr, err) from None
    # Ray's client passes extra keywords to requests; a timeout bounds every later call.
    ray_client._do_request = functools.partial(ray_client._do_request, timeout=REQUEST_TIMEOUT_S)
    _CLIENTS[addr] = ray_client
    return ray_client


def _call(addr: str, fn, *args, **kwargs):
    """Call a client method; connection problems become one `ClusterError` line."""
    import requests

    try:
        return fn(*args, **kwargs)
    except (requests.exceptions.RequestException, ConnectionError) as err:
        _CLIENTS.pop(addr, None)
        reason = "no answer" if isinstance(err, requests.exceptions.Timeout) else "refused"
        raise _unreachable(addr, f"connection {reason}") from None


def ship_code_default() -> bool:
    """Whether jobs ship this checkout's code (``$RETRAIN_RAY_SHIP_CODE=1``)."""
    return os.environ.get("RETRAIN_RAY_SHIP_CODE", "").strip() == "1"


def runtime_env(
    *, threads: int, job_id: str = "", working_dir: Path | None = None
) -> dict[str, Any]:
    """The job's ``runtime_env``: the dashboard's home and Keras cache (the same paths on
    every node), the no-local-slot flag and the job's own id, the thread cap, and the
    ``working_dir`` to ship.
    """
    env = {
        "RETRAIN_HOME": str(home()),
        "KERAS_HOME": str(keras_home()),
        RAY_JOB_ENV: "1",
        JOB_ID_ENV: job_id,
        "RETRAIN_WORKER_THREADS": str(max(1, threads)),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get("KERAS_BACKEND"):
        env["KERAS_BACKEND"] = os.environ["KERAS_BACKEND"]
    result: dict[str, Any] = {"env_vars": env}
    if working_dir is not None:
        result["working_dir"] = str(working_dir)
    return result


@contextlib.contextmanager
def code_package(ship: bool):
    """Yield a folder holding only a copy of this checkout's ``retrain/`` package (or None
    when not ``ship``), to send as the job's ``working_dir``: Ray zips and uploads it during
    `submit_job` (once per content hash) and runs the job inside it. Only the package travels,
    never the virtual environment, the workspace or test data.
    """
    if not ship:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="retrain-ray-code-") as tmp:
        shutil.copytree(
            ROOT / "retrain",
            Path(tmp) / "retrain",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        yield Path(tmp)


def submit(
    command: list[str],
    *,
    run_dir: Path,
    gpus: float,
    cpus: float,
    addr: str | None = None,
    ship_code: bool | None = None,
    gpus_reason: str = "",
) -> dict[str, Any]:
    """Submit ``command`` (the worker command line, its interpreter replaced by the nodes'
    `node_python`) as a Ray job; return the runner record ``{runner, job_id, address, gpus,
    gpus_reason, cpus, entrypoint, ship_code, submitted}`` to keep in the run directory.

    Args:
        ship_code: send this checkout's ``retrain/`` as the job's ``working_dir``; default
            ``$RETRAIN_RAY_SHIP_CODE``. Without it the nodes must have the project installed.

    Raises:
        ClusterError: the cluster does not answer or refuses the job.
    """
    addr = addr or address()
    ship = ship_code_default() if ship_code is None else ship_code
    ray_client = client(addr)
    entrypoint = shlex.join([node_python(), *command[1:]])
    # Our own submission id, known to the job itself: a worker whose job is no longer the
    # run's (the run was stopped while Ray kept the job pending, then resumed) does not train.
    job_id = f"retrain-{Path(run_dir).name[:48]}-{secrets.token_hex(4)}"
    threads = max(1, int(cpus))
    with code_package(ship) as working_dir:
        try:
            job_id = _call(
                addr,
                ray_client.submit_job,
                entrypoint=entrypoint,
                submission_id=job_id,
                entrypoint_num_gpus=gpus or None,
                entrypoint_num_cpus=cpus or None,
                runtime_env=runtime_env(threads=threads, job_id=job_id, working_dir=working_dir),
                metadata={"retrain_run_dir": str(run_dir)},
            )
        except RuntimeError as err:
            raise ClusterError(f"The Ray cluster at {addr} refused the job: {err}") from None
    return {
        "runner": "ray",
        "job_id": job_id,
        "address": addr,
        "gpus": gpus,
        "gpus_reason": gpus_reason or f"asked for {gpus:g}",
        "cpus": cpus,
        "entrypoint": entrypoint,
        "ship_code": ship,
        "submitted": time.time(),
    }


def last_log_line(text: str) -> str:
    """The last non-empty line of a job's log ('' when there is none)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def job_view(record: dict[str, Any]) -> dict[str, Any]:
    """What Ray says about the job of a runner record, never raising for a cluster problem.

    Returns:
        ``{"job_id", "address", "reachable", "job_status"}``, plus ``message`` (Ray's),
        ``last_log_line`` for a failed job, ``waiting`` (how many jobs Ray has pending, this
        one included) for a pending one, and ``error`` when the cluster cannot be asked or no
        longer knows the job. Ray reports no place in its queue: pending jobs are placed as
        resources free up, not first come first served.
    """
    addr, job_id = record.get("address") or address(), record.get("job_id")
    view: dict[str, Any] = {"job_id": job_id, "address": addr, "reachable": False}
    try:
        ray_client = client(addr)
        info = _call(addr, ray_client.get_job_info, job_id)
    except ClusterError as err:
        view["error"] = str(err)
        return view
    except RuntimeError as err:  # Ray answers 404 for a job it does not know
        view.update(reachable=True, job_status=None)
        view["error"] = (
            f"The Ray cluster at {addr} no longer knows job {job_id} (its head was restarted "
            f"or the job was deleted): {str(err)[:200]}"
        )
        return view
    status = str(getattr(info.status, "value", info.status))
    view.update(reachable=True, job_status=status, message=info.message or "")
    if status == "PENDING":
        with contextlib.suppress(ClusterError, RuntimeError):
            jobs = _call(addr, ray_client.list_jobs)
            view["waiting"] = sum(
                1 for job in jobs if str(getattr(job.status, "value", job.status)) == "PENDING"
            )
    if status == "FAILED":
        with contextlib.suppress(ClusterError, RuntimeError):
            view["last_log_line"] = last_log_line(_call(addr, ray_client.get_job_logs, job_id))
        view["driver_exit_code"] = info.driver_exit_code
    return view


def job_logs(record: dict[str, Any]) -> str:
    """The job's output as Ray keeps it.

    Raises:
        ClusterError: the cluster cannot be reached or no longer knows the job.
    """
    addr = record.get("address") or address()
    try:
        return _call(addr, client(addr).get_job_logs, record.get("job_id"))
    except RuntimeError as err:
        raise ClusterError(f"Ray has no logs for job {record.get('job_id')}: {err}") from None


def stop_job(record: dict[str, Any]) -> bool:
    """Ask Ray to stop the job (used for a job Ray has not started; a running worker stops
    through the run directory's stop request, keeping what it trained). Return whether Ray
    knew the job as live; an unreachable cluster or unknown job counts as not live."""
    addr = record.get("address") or address()
    try:
        return bool(_call(addr, client(addr).stop_job, record.get("job_id")))
    except (ClusterError, RuntimeError):
        return False


# The storage probe job: write the token first (the storage check), then what only a driver on
# the cluster can ask Ray (for --gpus auto). A hung connection is bounded by SIGALRM's default
# action, which ends the job (the check then fails, as for any failed probe).
_PROBE_CODE = """
import json, os, signal, sys
path, token = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
facts = {}
try:
    signal.alarm(60)
    import ray
    from ray._private.state import state
    ray.init(logging_level="ERROR", log_to_driver=False)
    facts["cluster_gpus"] = ray.cluster_resources().get("GPU", 0)
    facts["autoscaler_resources"] = state.get_max_resources_from_cluster_config()
    ray.shutdown()
    signal.alarm(0)
except Exception as err:
    facts["error"] = repr(err)[:300]
with open(path, "w") as f:
    f.write(token + "\\n" + json.dumps(facts))
"""


def check_storage(
    addr: str | None = None, timeout_s: float = PROBE_TIMEOUT_S, *, reuse: bool = True
) -> dict[str, Any]:
    """Check that the cluster's nodes and this process share ``$RETRAIN_HOME``.

    A tiny probe job (no GPU, no CPU reserved) writes a random token into
    ``$RETRAIN_HOME/.ray-probe/`` on the node where Ray runs it; this process then reads it.
    The job also writes what ``--gpus auto`` needs to know and only a driver on the cluster
    can ask: ``ray.cluster_resources()``'s GPUs and the autoscaler's node types
    (``get_max_resources_from_cluster_config()``: None when no autoscaler publishes any).
    A good result is remembered per cluster session (``$RETRAIN_HOME/ray-storage.json``), so
    the probe runs once per cluster start, not once per run.

    Args:
        reuse: accept a good probe of the same cluster session (False: probe again).

    Returns:
        The probe record ``{address, session_name, checked, cluster_gpus,
        autoscaler_resources}`` (+ ``cluster_error`` when the job could not ask Ray).

    Raises:
        ClusterError: the cluster does not answer, the probe failed, or the file it wrote is
            not visible here (nothing should be submitted then).
    """
    addr = addr or address()
    session = cluster_version(addr).get("session_name")
    root = home()
    known = read_json(root / PROBE_RECORD)
    if (
        reuse
        and isinstance(known, dict)
        and session
        and (known.get("address"), known.get("session_name")) == (addr, session)
        and "autoscaler_resources" in known
    ):
        return known
    token = secrets.token_hex(8)
    path = root / PROBE_DIR / f"{token}.txt"
    code = _PROBE_CODE
    ray_client = client(addr)
    try:
        job_id = _call(
            addr,
            ray_client.submit_job,
            entrypoint=shlex.join([node_python(), "-c", code, str(path), token]),
            metadata={"retrain_probe": "storage"},
        )
    except RuntimeError as err:
        raise ClusterError(f"The Ray cluster at {addr} refused the storage probe: {err}") from None
    deadline = time.monotonic() + timeout_s
    status = "PENDING"
    while time.monotonic() < deadline:
        status = str(_call(addr, ray_client.get_job_status, job_id).value)
        if status in TERMINAL:
            break
        time.sleep(0.3)
    mount_hint = (
        f"Mount the same shared volume (NFS, EFS, Filestore or a FUSE-mounted bucket) at {root} "
        "on this dashboard and on every Ray node (head and workers), set RETRAIN_HOME to it "
        "everywhere, then try again (docs/scale-out.md). Nothing was submitted."
    )
    if status not in TERMINAL:
        stop_job({"address": addr, "job_id": job_id})
        raise ClusterError(
            f"The storage probe job did not finish in {timeout_s:.0f} s on the Ray cluster at "
            f"{addr} (it stayed {status}); check the cluster's head node. Nothing was submitted."
        )
    try:
        seen, _, facts_text = path.read_text().partition("\n")
    except OSError:
        seen, facts_text = None, ""
    finally:
        path.unlink(missing_ok=True)
    if status != "SUCCEEDED":
        line = ""
        with contextlib.suppress(ClusterError, RuntimeError):
            line = last_log_line(_call(addr, ray_client.get_job_logs, job_id))
        raise ClusterError(
            f"The storage probe job {status.lower()} on the Ray cluster at {addr}"
            + (f": {line}" if line else "")
            + f". Check that the nodes run '{node_python()}' (RETRAIN_RAY_PYTHON) and can write "
            f"to {root}. Nothing was submitted."
        )
    if seen != token:
        raise ClusterError(
            f"The Ray cluster does not share RETRAIN_HOME with this dashboard: a probe job wrote "
            f"{path} on a Ray node but it is not visible here. {mount_hint}"
        )
    try:
        facts = json.loads(facts_text)
    except ValueError:
        facts = {"error": "the probe wrote no cluster resources"}
    record = {
        "address": addr,
        "session_name": session,
        "checked": time.time(),
        "cluster_gpus": facts.get("cluster_gpus"),
        "autoscaler_resources": facts.get("autoscaler_resources"),
    }
    if facts.get("error"):
        record["cluster_error"] = facts["error"]
    write_json(root / PROBE_RECORD, record)
    return record


def _job_supervisor() -> tuple[int, float] | None:
    """The Ray process that runs this worker's job (the nearest ``ray::`` ancestor), as
    (pid, start time); None when there is none."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process().parents():
            if parent.name().startswith("ray::") or "JobSupervisor" in " ".join(parent.cmdline()):
                return parent.pid, parent.create_time()
    return None


def exit_with_job(poll_s: float = 2.0) -> bool:
    """In a Ray job, end this worker when the job's supervisor process is gone.

    Ray normally ends a job's driver with its supervisor, but when the node's Ray processes
    are killed all at once (the head goes away), the driver can be left running on its own,
    still writing the run directory while the dashboard reports the run interrupted. A
    daemon thread checks the supervisor every ``poll_s`` seconds and, once it is gone, ends
    the process like a kill: the last finished epoch's checkpoint stays, so the run resumes
    from it. Return whether a supervisor was found to watch.
    """
    import threading

    import psutil

    supervisor = _job_supervisor()
    if supervisor is None:
        return False
    pid, started = supervisor

    def alive() -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() == started
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        print(
            "error: the Ray job running this worker is gone (its node or the cluster's head "
            "stopped); exiting so the run can be resumed from its last finished epoch.",
            flush=True,
        )
        os._exit(3)

    threading.Thread(target=watch, name="ray-job-watch", daemon=True).start()
    return True


def tee_output(log_path: Path) -> None:
    """Copy everything this process writes on stdout/stderr into ``log_path`` too.

    A Ray job's output goes to Ray's job log (on the head); the run directory's log is what
    the dashboard shows for every run, so a Ray worker writes both, as the local runner's
    worker writes its log. A ``tee`` process reads a pipe that replaces fds 1 and 2, so output
    from C++ (TensorFlow) is copied too, and nothing is lost when this process is killed.
    """
    import subprocess
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    subprocess.Popen(
        ["tee", "-a", str(log_path)],
        stdin=read_end,
        stdout=1,  # the job's own output, which Ray keeps
        stderr=subprocess.DEVNULL,
    )
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)


def enter_job(config_path: Path, log_path: Path, record: dict[str, Any] | None) -> None:
    """What a worker does first when Ray placed it (`in_ray_job`): check that this node sees
    the run directory the dashboard wrote and that its job is still the run's job, copy its
    output into the run's log, and end with its Ray job (`exit_with_job`).

    Raises:
        ClusterError: the run's config is not visible on this node (RETRAIN_HOME not shared),
            or the run's record names another job (this one was superseded).
    """
    if not Path(config_path).is_file():
        raise ClusterError(
            f"This Ray node ({os.uname().nodename}) does not see {config_path}, written by the "
            f"dashboard: mount the shared RETRAIN_HOME volume at {home()} on every Ray node "
            "(docs/scale-out.md)."
        )
    mine = os.environ.get(JOB_ID_ENV, "")
    current = (record or {}).get("job_id")
    if mine and current and mine != current:
        raise ClusterError(
            f"Ray job {mine} is no longer this run's job (the run now belongs to {current}); "
            "not training."
        )
    tee_output(Path(log_path))
    exit_with_job()


def waiting_message(gpus: float | None) -> str:
    """What a run that Ray has not started yet waits for, in the user's words."""
    return (
        "waiting for a free GPU on the cluster" if gpus else "waiting for free CPUs on the cluster"
    )


def apply_view(
    status: dict[str, Any], record: dict[str, Any], view: dict[str, Any]
) -> dict[str, Any]:
    """Merge Ray's view of a run's job into its status (the file says queued/running/stopping).

    - Ray waits for resources: ``queued`` with ``waiting`` ("waiting for a free GPU on the
      cluster") and ``cluster_waiting`` (how many jobs the cluster has pending).
    - Ray runs it: the file's state stands.
    - the cluster cannot be reached, no longer knows the job, or the job ended without the
      run recording its end: ``interrupted`` with one line saying why; resuming continues
      from the last finished epoch.
    - Ray says the job failed: ``failed`` with the job's last log line.
    """
    status = dict(status)
    state = status.get("state", "queued")
    job = record.get("job_id")
    resume = "resume the run to continue from its last finished epoch"
    job_status = view.get("job_status")
    if not view.get("reachable"):
        status.update(
            previous_state=state,
            state="interrupted",
            error=f"Lost the Ray cluster at {view.get('address')}: {view.get('error')} "
            f"The run is interrupted; when the cluster is back, {resume}.",
        )
    elif job_status is None:
        status.update(
            previous_state=state,
            state="interrupted",
            error=f"{view.get('error')} The run is interrupted; {resume}.",
        )
    elif job_status == "PENDING":
        status["state"] = "queued"
        status["waiting"] = waiting_message(record.get("gpus"))
        if view.get("waiting") is not None:
            status["cluster_waiting"] = view["waiting"]
    elif job_status == "FAILED":
        line = view.get("last_log_line") or view.get("message") or "no log"
        status.update(
            previous_state=state, state="failed", error=f"The Ray job {job} failed: {line}"
        )
    elif job_status == "STOPPED":
        status.update(
            previous_state=state,
            state="interrupted",
            error=f"The Ray job {job} was stopped before the run finished; {resume}.",
        )
    elif job_status == "SUCCEEDED":
        status.update(
            previous_state=state,
            state="interrupted",
            error=f"The Ray job {job} ended but the run did not record its end (does every Ray "
            f"node mount RETRAIN_HOME?); {resume}.",
        )
    return status
