"""The bounded pool of warm model workers on this host.

``RETRAIN_MODEL_WORKERS`` processes at most (default 2 on up to 8 cores, else one per 4
cores), started with the first page view or on first need, each keeping TensorFlow imported
and its recent models loaded. With two or more, one worker is kept for quick requests (its
lane is "quick": describe, previews, predict, Grad-CAM; never an evaluation or an export), so a
visitor's minute-long export never holds up everyone's Model page; the others take anything. Each is recorded in ``$RETRAIN_HOME/service/workers/<host>-<pid>.json``; a worker
whose record is removed exits (that is how `stop_workers` asks). Workers run in their own
process group, so they outlive a web replica that is killed: another replica on the same home
finds them and keeps using them. ``RETRAIN_MODEL_WORKERS=0`` answers requests inside the
calling process instead (the CLI-like embedded mode the page tests use).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrain.runs.procs import process_alive
from retrain.service.cache import service_dir
from retrain.service.queue import this_host
from retrain.sessions.workspace import env_number, read_json, write_json

ROOT = Path(__file__).resolve().parents[2]


def pool_size() -> int:
    """``RETRAIN_MODEL_WORKERS``, or 2 on hosts of up to 8 cores (one of them for quick
    requests), else one per 4 cores."""
    default = max(2, (os.cpu_count() or 1) // 4)
    return int(env_number("RETRAIN_MODEL_WORKERS", default, allow_zero=True))


#: The lane of a worker that takes any request, and of one kept for quick requests.
ANY, QUICK = "any", "quick"


def lanes(size: int) -> list[str]:
    """The lanes of a pool of ``size`` workers: the second is kept for quick requests (a pool
    of one takes anything: it must)."""
    return [QUICK if index == 1 else ANY for index in range(size)]


def skipped_kinds(lane: str) -> frozenset[str]:
    """The request kinds a worker of ``lane`` leaves to the others (the long ones, for QUICK)."""
    from retrain.service.kinds import KINDS

    if lane != QUICK:
        return frozenset()
    return frozenset(name for name, kind in KINDS.items() if kind.long)


def workers_dir() -> Path:
    path = service_dir() / "workers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_path(pid: int, host: str | None = None) -> Path:
    return workers_dir() / f"{host or this_host()}-{pid}.json"


def holds_path(pid: int) -> Path:
    """Which bases worker ``pid`` keeps loaded (a list of BASE specs; not a ``.json``, so
    `live_workers` never reads it as a worker)."""
    return workers_dir() / f"{this_host()}-{pid}.holds"


def write_holds(pid: int, specs: list[str], checking: list[str] | None = None) -> None:
    """Say which bases worker ``pid`` keeps loaded, and which of them it is checking (a
    converted Keras 2 file, after the answer that loaded it)."""
    write_json(holds_path(pid), {"held": sorted(specs), "checking": sorted(checking or [])})


def held_elsewhere(me: int) -> tuple[set[str], set[str]]:
    """The bases the other live workers of this host keep loaded, and those they are checking."""
    held: set[str] = set()
    checking: set[str] = set()
    for record in live_workers():
        if record.get("pid") != me:
            found = read_json(holds_path(record["pid"]))
            if isinstance(found, dict):
                held.update(s for s in found.get("held") or [] if isinstance(s, str))
                checking.update(s for s in found.get("checking") or [] if isinstance(s, str))
    return held, checking


def live_workers() -> list[dict[str, Any]]:
    """This host's workers that still run; records of dead ones are removed."""
    alive = []
    host = this_host()
    for path in workers_dir().glob(f"{host}-*.json"):
        record = read_json(path)
        if not isinstance(record, dict):
            continue
        if process_alive(record.get("pid"), record.get("started")):
            alive.append(record)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(FileNotFoundError):
                path.with_suffix(".holds").unlink()
    return alive


@contextlib.contextmanager
def _pool_lock() -> Iterator[None]:
    """One replica at a time decides how many workers to start."""
    with open(service_dir() / "pool.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker_env(lane: str = ANY) -> dict[str, str]:
    """A training worker's environment (`jobs.worker_env`: same home, capped threads), with
    ``RETRAIN_MODEL_THREADS`` threads when it is set, and the worker's lane."""
    from retrain.runs.jobs import worker_env as training_env

    env = training_env()
    env.pop("RETRAIN_TRAIN_NICE", None)  # model requests are interactive: normal priority
    if os.environ.get("RETRAIN_MODEL_THREADS"):
        env["RETRAIN_WORKER_THREADS"] = os.environ["RETRAIN_MODEL_THREADS"]
    env["RETRAIN_MODEL_LANE"] = lane
    return env


def start_worker(lane: str = ANY) -> dict[str, Any]:
    """Start one worker process of ``lane`` (in its own process group) and record it."""
    import psutil

    log = open(workers_dir() / "workers.log", "ab")  # noqa: SIM115 (the child keeps it)
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "retrain.service.worker"],
            cwd=ROOT,
            env=worker_env(lane),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        started = time.time()
    record = {
        "pid": proc.pid,
        "started": started,
        "host": this_host(),
        "since": time.time(),
        "lane": lane,
    }
    write_json(record_path(proc.pid), record)
    return record


def ensure_workers() -> list[dict[str, Any]]:
    """Top the pool up to `pool_size` live workers; return them. Cheap when it is full."""
    size = pool_size()
    if size <= 0:
        return []
    alive = live_workers()
    if len(alive) >= size:
        return alive
    with _pool_lock():
        alive = live_workers()
        missing = lanes(size)
        for record in alive:  # what runs already fills its lane (a worker by hand: "any")
            lane = record.get("lane", ANY)
            missing.remove(lane if lane in missing else missing[0])
            if not missing:
                break
        alive += [start_worker(lane) for lane in missing]
    return alive


def stop_workers(timeout: float = 10.0) -> int:
    """Ask this host's workers (of this home) to exit, then end those that do not; return how
    many there were."""
    records = live_workers()
    for record in records:
        with contextlib.suppress(FileNotFoundError):
            record_path(record["pid"]).unlink()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(record["pid"], signal.SIGTERM)
    deadline = time.time() + timeout
    for record in records:
        while process_alive(record["pid"], record["started"]) and time.time() < deadline:
            time.sleep(0.05)
        if process_alive(record["pid"], record["started"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(record["pid"], signal.SIGKILL)
    return len(records)
