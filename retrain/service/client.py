"""`ask`: one model request from the web tier, answered from the cache or by a worker.

Where the answer comes from, in order: the answer cache (by content); else, by
``RETRAIN_MODEL_WORKERS`` and ``RETRAIN_RUNNER``: this process (0 workers: the embedded mode),
the host's warm worker pool through the queue (the default), or Ray actors on the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from retrain import errors
from retrain.errors import RetrainError
from retrain.runs.procs import process_alive
from retrain.service import cache, kinds, pool
from retrain.service import queue as requests
from retrain.service.kinds import key_of

Waiting = Callable[[dict[str, Any]], None]


class ServiceError(RetrainError):
    """A model request could not be answered (no worker, a timeout, a bug in the worker)."""


class WorkerLost(ServiceError):
    """The model worker stopped while answering (out of memory, killed)."""


WORKER_LOST = requests.WORKER_LOST
#: How often a waiting page looks at the queue and the workers (the answer is polled faster).
LOOK_EVERY_S = 0.5


def backend() -> str:
    """``"inline"`` (0 model workers), ``"ray"`` (``RETRAIN_RUNNER=ray``) or ``"local"``."""
    if pool.pool_size() == 0:
        return "inline"
    from retrain.runs.runners import runner_name

    return "ray" if runner_name() == "ray" else "local"


def warm_up() -> str:
    """Start the model workers now (the first page view does), without waiting for them."""
    mode = backend()
    if mode == "local":
        pool.ensure_workers()
    elif mode == "ray":
        from retrain.service import on_ray

        on_ray.warm_up()
    return mode


def _raise(outcome: dict[str, Any]) -> None:
    name = outcome.get("error", "")
    message = outcome.get("message") or "The model request failed."
    if name == "WorkerLost":
        raise WorkerLost(message)
    error_type = getattr(errors, name, None)
    if isinstance(error_type, type) and issubclass(error_type, RetrainError):
        raise error_type(message)
    raise ServiceError(message)


def ask(
    kind: str,
    *,
    session: str = "",
    on_wait: Waiting | None = None,
    timeout: float | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Send the request ``kind(**args)`` and return its JSON answer.

    Args:
        kind: a name in `retrain.service.kinds.KINDS`.
        session: who asks (queues are fair across sessions); never part of the answer.
        on_wait: called about twice a second while waiting, with ``{"state": "queued",
            "position": n, "running": k, "workers_ready": w}`` or ``{"state": "running",
            "progress": {...}}``.
        timeout: seconds to wait; default the kind's own.
        **args: the request's JSON arguments.

    Raises:
        RetrainError: the request's own one-line error (a refused model, a missing file...),
            `WorkerLost` when the worker died, `ServiceError` on a timeout or a worker bug.
    """
    spec = kinds.get(kind)
    key = key_of(kind, args)
    if spec.cache:
        found = cache.read_answer(key)
        if found is not None:
            return found
    mode = backend()
    if mode == "inline":
        answer = kinds.run(kind, args, progress=_inline_progress(on_wait))
        if spec.cache:
            cache.write_answer(key, kind, answer)
        return answer
    limit = spec.timeout_s if timeout is None else timeout
    if mode == "ray":
        from retrain.service import on_ray

        outcome = on_ray.ask(kind, args, key, limit, on_wait)
        if not outcome.get("ok"):
            _raise(outcome)
        return outcome["answer"]
    return _ask_local(kind, args, key, session, limit, on_wait)


def cached(kind: str, **args: Any) -> dict[str, Any] | None:
    """The answer to ``kind(**args)`` when it is already known (on disk), else None: never
    asks a worker."""
    spec = kinds.get(kind)
    return cache.read_answer(key_of(kind, args)) if spec.cache else None


def prefetch(kind: str, *, session: str = "", **args: Any) -> bool:
    """Queue ``kind(**args)`` now so that its answer is ready when a page asks for it; never
    waits. Used where the next request is easy to guess (a new dataset: the Model page's new
    head). Only with the local pool: in the embedded mode it would be computed here, now; on
    Ray it is asked when needed. Returns whether a request was queued.
    """
    spec = kinds.get(kind)
    if not spec.cache or backend() != "local":
        return False
    key = key_of(kind, args)
    if cache.read_answer(key) is not None:
        return False
    _send(kind, args, key, session)
    return True


def _inline_progress(on_wait: Waiting | None) -> Callable[[str, float], None]:
    def report(text: str, fraction: float) -> None:
        if on_wait is not None:
            on_wait({"state": "running", "progress": {"text": text, "fraction": fraction}})

    return report


def request_id(kind: str, session: str = "", **args: Any) -> str:
    """The id `ask` gives this request (for `cancel`)."""
    return requests.request_id(key_of(kind, args), session)


def cancel(kind: str, session: str = "", **args: Any) -> bool:
    """Take this session's waiting request ``kind(**args)`` out of the queue; False when it is
    already being answered (its answer is then still cached for next time) or not queued."""
    return requests.cancel(request_id(kind, session, **args))


def _send(
    kind: str, args: dict[str, Any], key: str, session: str
) -> tuple[str, list[dict[str, Any]]]:
    """Queue ``kind(**args)`` for the local pool (once: a rerun finds it queued) and make sure
    workers are there to take it; return its request id and the live workers."""
    rid = requests.request_id(key, session)
    requests.enqueue(rid, key, kind, args, session)
    return rid, pool.ensure_workers()


def _ask_local(
    kind: str,
    args: dict[str, Any],
    key: str,
    session: str,
    limit: float,
    on_wait: Waiting | None,
) -> dict[str, Any]:
    rid, workers = _send(kind, args, key, session)
    deadline = time.time() + limit
    next_look, pause = 0.0, 0.02
    while True:
        outcome = requests.result(rid)
        if outcome is not None:
            return _delivered(outcome, key)
        if time.time() >= next_look:  # the queue, the workers: twice a second is enough
            next_look = time.time() + LOOK_EVERY_S
            _look(rid, on_wait, workers)
            workers = pool.ensure_workers()  # a worker that died (idle or not) is replaced
        if time.time() > deadline:
            requests.cancel(rid)
            raise ServiceError(
                f"No answer from the model worker after {limit:.0f} s. "
                "The host is busy: retry in a minute."
            )
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)


def _look(rid: str, on_wait: Waiting | None, workers: list[dict[str, Any]]) -> None:
    """Where request ``rid`` stands, told to ``on_wait``; a worker that died answering it turns
    it into `WORKER_LOST`; a request that vanished was cancelled.

    Raises:
        ServiceError: the request is neither waiting, running nor answered (cancelled).
    """
    state = requests.state(rid)
    if state == "running":
        _check_worker(rid)
        status = {"state": "running", "progress": requests.read_progress(rid)}
    elif state == "queued":
        status = {
            "state": "queued",
            "position": requests.position(rid),
            "running": requests.running_count(),
            "workers_ready": sum(1 for w in workers if "ready" in w),
        }
    elif state is None:
        raise ServiceError("The model request was cancelled. Ask again to retry.")
    else:
        return  # answered in the meantime: the caller reads it next
    if on_wait is not None:
        on_wait(status)


def _delivered(outcome: dict[str, Any], key: str) -> dict[str, Any]:
    if not outcome.get("ok"):
        _raise(outcome)
    if "answer" in outcome:
        return outcome["answer"]
    found = cache.read_answer(key)
    if found is None:
        raise ServiceError("The model worker's answer was lost (the cache was cleared). Retry.")
    return found


def _check_worker(rid: str) -> None:
    """A request whose worker died is answered with `WORKER_LOST` (for every waiter)."""
    request = requests.running_request(rid)
    worker = (request or {}).get("worker")
    if not worker or worker.get("host") != requests.this_host():
        return  # just claimed (no worker written yet), or a worker on another host
    if process_alive(worker.get("pid"), worker.get("started")):
        return
    if requests.state(rid) == "running":  # not answered in the meantime
        requests.finish(rid, {"ok": False, "error": "WorkerLost", "message": WORKER_LOST})
    # The caller's loop reads the outcome; the next request tops the pool up again.
