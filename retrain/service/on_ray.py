"""Model requests on a Ray cluster: the same request kinds, answered by Ray actors.

With ``RETRAIN_RUNNER=ray`` the web tier holds no model workers of its own: each request goes
to one of ``RETRAIN_MODEL_WORKERS`` named, detached Ray actors (`ModelActor`), which keep
TensorFlow imported and their recent models loaded, on whatever node Ray placed them. A fleet
of web replicas then needs no TensorFlow at all. Answers still land in the shared answer
cache (``$RETRAIN_HOME`` is on storage every node shares, as for training runs).

Settings (environment):
    RETRAIN_RAY_CLUSTER: how the web tier joins the cluster as a Ray driver: the GCS address
        (``ray-head:6379``) or Ray Client's (``ray://ray-head:10001``). Default: Ray Client on
        the host of ``RAY_ADDRESS`` (the Jobs API address training uses), port 10001.
    RETRAIN_RAY_MODEL_CPUS: CPUs each model actor reserves (default 1).

An actor that dies mid-request (out of memory, killed) is restarted by Ray; the request that
it was answering gets the same one line as a local worker's (`queue.WORKER_LOST`).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any

from retrain.errors import RunError
from retrain.service import cache, pool
from retrain.service import queue as requests
from retrain.sessions.workspace import env_number, home, keras_home

NAMESPACE = "retrain"
ACTOR_PREFIX = "retrain-model-worker"
PROBE_S = 3.0  # a port that does not answer in this long is a cluster that is not there


def cluster_address() -> str:
    """Where the web tier joins the cluster (``RETRAIN_RAY_CLUSTER``, else Ray Client on the
    host of ``RAY_ADDRESS``)."""
    explicit = os.environ.get("RETRAIN_RAY_CLUSTER", "").strip()
    if explicit:
        return explicit
    jobs = os.environ.get("RAY_ADDRESS", "").strip() or "http://127.0.0.1:8265"
    host = urllib.parse.urlparse(jobs).hostname or "127.0.0.1"
    return f"ray://{host}:10001"


def _unreachable(address: str, reason: str) -> RunError:
    return RunError(
        f"Cannot reach the Ray cluster at {address} for model requests ({reason}). "
        "Check that it runs, or set RETRAIN_RAY_CLUSTER to its address."
    )


def _probe(address: str, timeout_s: float = PROBE_S) -> None:
    """Refuse within ``timeout_s`` when nothing answers at the cluster's host and port.

    ``ray.init`` waits out its own timeouts first: 30 s for Ray Client, over a minute for a
    GCS address; every page's model request would wait that long for the same one line.
    """
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        why = (
            f"no answer within {timeout_s:.0f} s"
            if isinstance(err, TimeoutError)
            else (err.strerror or str(err)).lower()
        )
        raise _unreachable(address, f"port {port}: {why}") from None


def _connect() -> Any:
    import ray

    if not ray.is_initialized():
        address = cluster_address()
        _probe(address)
        try:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        except Exception as err:  # any failure to join is one line for the page
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise _unreachable(address, reason) from None
    return ray


class ModelActor:
    """A warm model worker as a Ray actor: imports Keras once, answers requests one by one."""

    def __init__(self) -> None:
        from retrain.service import worker

        worker.warm()

    def pid(self) -> int:
        return os.getpid()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        from retrain.service import worker

        outcome = worker.answer(request)
        if outcome.get("ok") and "answer" not in outcome:
            outcome["answer"] = cache.read_answer(request["key"])
        return outcome


def _actor(index: int) -> Any:
    ray = _connect()
    remote = ray.remote(ModelActor)
    return remote.options(
        name=f"{ACTOR_PREFIX}-{index}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        num_cpus=env_number("RETRAIN_RAY_MODEL_CPUS", 1.0, allow_zero=True),
        runtime_env={
            "env_vars": {
                "RETRAIN_HOME": str(home()),
                "KERAS_HOME": str(keras_home()),
                "TF_CPP_MIN_LOG_LEVEL": "2",
            }
        },
    ).remote()


def actor_for(args: dict[str, Any]) -> Any:
    """The actor for a request: requests on the same model go to the same actor (it has the
    model loaded)."""
    model = str(args.get("spec") or args.get("model") or args.get("run_dir") or "")
    return _actor(zlib.crc32(model.encode()) % max(pool.pool_size(), 1))


def warm_up() -> None:
    """Create the actors now (each imports Keras as it starts)."""
    for index in range(max(pool.pool_size(), 1)):
        _actor(index)


def _until_alive(
    ray: Any, actor: Any, deadline: float, on_wait: Callable[[dict[str, Any]], None] | None
) -> None:
    """Wait while ``actor`` restarts (it died; Ray starts it again and it imports Keras, about
    5 s), so the request after a worker's death goes to the fresh one instead of failing too.
    A request is never sent twice: one that kills its actor is `WORKER_LOST`."""
    while time.time() < deadline:
        ref = actor.pid.remote()
        while not ray.wait([ref], timeout=0.2)[0]:
            if time.time() > deadline:
                return
        try:
            ray.get(ref)
            return
        except ray.exceptions.ActorUnavailableError:  # restarting
            if on_wait is not None:
                on_wait({"state": "queued", "position": 1, "running": 0, "workers_ready": 0})
            time.sleep(0.5)
        except ray.exceptions.RayActorError:
            return  # gone for good: the request itself says so


def ask(
    kind: str,
    args: dict[str, Any],
    key: str,
    timeout: float,
    on_wait: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Answer ``kind(**args)`` on the cluster; return the outcome record (see `worker.answer`)."""
    ray = _connect()
    rid = f"ray-{key[:24]}-{os.getpid()}"
    request = {"id": rid, "key": key, "kind": kind, "args": args, "session": ""}
    deadline = time.time() + timeout
    actor = actor_for(args)
    _until_alive(ray, actor, deadline, on_wait)
    ref = actor.answer.remote(request)
    while True:
        done, _ = ray.wait([ref], timeout=0.2)
        if done:
            break
        if on_wait is not None:
            on_wait({"state": "running", "progress": requests.read_progress(rid)})
        if time.time() > deadline:
            ray.cancel(ref)
            return {
                "ok": False,
                "error": "ServiceError",
                "message": f"No answer from the cluster's model workers after {timeout:.0f} s. "
                "Retry in a minute.",
            }
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError:
        return {"ok": False, "error": "WorkerLost", "message": requests.WORKER_LOST}
