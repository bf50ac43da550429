"""A warm model worker: ``python -m retrain.service.worker``.

Imports TensorFlow/Keras once, then takes requests from the host's queue (`queue.claim`), one
at a time, answers each (`kinds.run`), caches the answer by content and records the outcome.
A request that fails with a `RetrainError` (a hostile model refused, a missing file) is
answered with that one line; anything else is answered with a one-line "the model worker
failed" and the details in the worker log. It exits when its record in ``workers/`` is removed
(`pool.stop_workers`), when the home folder is gone, or after ``RETRAIN_MODEL_WORKER_IDLE_S``
seconds without work (default an hour; the next request starts a fresh one).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from retrain.errors import RetrainError
from retrain.models.load import writes_after
from retrain.runs.procs import own_start_time
from retrain.service import cache, kinds, pool
from retrain.service import queue as requests
from retrain.sessions.workspace import env_number, read_json, write_json

POLL_S = 0.05
#: How long a request waits for the worker that has its model loaded (`_holder_wanted`).
AFFINITY_S = 2.0
#: ... and for the worker that is checking its converted Keras 2 model (else both would).
CHECKING_S = 60.0
#: How long a worker may answer other requests before it checks a conversion it answered on,
CHECK_DEFER_S = 10.0
#: ... and how long it must have been idle to check it sooner: the page that got the answer
#: asks for the "Before → after" right after drawing it, which is answered first.
CHECK_IDLE_S = 3.0
PRUNE_EVERY_S = 600.0


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one request; return its outcome record (never raises for a request's fault)."""
    rid, key, kind = request["id"], request["key"], request["kind"]
    spec = kinds.get(kind)
    if spec.cache:
        found = cache.read_answer(key)
        if found is not None:  # another session asked the same while this one waited
            return {"ok": True, "key": key}
    try:
        result = kinds.run(
            kind,
            request["args"],
            progress=lambda text, fraction: requests.write_progress(rid, text, fraction),
        )
    except RetrainError as err:
        return {"ok": False, "error": type(err).__name__, "message": str(err)}
    except MemoryError:
        return {
            "ok": False,
            "error": "ModelError",
            "message": "The model worker ran out of memory on this request. "
            "Try a smaller model or fewer images.",
        }
    except Exception as err:  # a bug: one line for the page, the traceback in the worker log
        traceback.print_exc()
        return {
            "ok": False,
            "error": "WorkerError",
            "message": f"The model worker failed: {type(err).__name__}: {str(err)[:300]}",
        }
    if spec.cache:
        cache.write_answer(key, kind, result)
        return {"ok": True, "key": key}
    return {"ok": True, "key": key, "answer": result}


def after_answer(
    writes: list[Callable[[], None]], answered: list[dict[str, Any]], checked: bool = False
) -> bool:
    """Run what the answers to ``answered`` (requests on one base) left for later
    (`writes_after`): cache writes and, when ``checked``, the check of the Keras 2 model
    converted for the first of them. Their answers, cached meanwhile, are then answered again
    from the checked model (they say how close), or dropped with the model when the check
    failed: the next request on it gets the check's one line. Returns whether all succeeded."""
    for write in writes:
        try:
            write()
        except Exception as err:  # one line in the log; the worker goes on
            print(f"after answering {answered[0]['kind']}: {type(err).__name__}: {err}", flush=True)
            kinds.forget_base(_spec(answered[0]))
            for request in answered:
                cache.drop_answer(request["key"])
            return False
    for request in answered if checked else []:
        if kinds.get(request["kind"]).cache:
            with contextlib.suppress(RetrainError):
                result = kinds.run(request["kind"], request["args"])
                cache.write_answer(request["key"], request["kind"], result)
    return True


class Checks:
    """Conversions this worker answered on before checking them (`writes_after`), by BASE spec.

    Checked once the worker has been idle `CHECK_IDLE_S`, before it takes a long request, or
    once the oldest has waited `CHECK_DEFER_S`; while a check runs, the worker's holds say
    ``checking`` (other workers leave requests on that base to it, `CHECKING_S`). Meanwhile
    requests on the same base are answered from it as it is (the Model page's "Before →
    after" right after the layer stack), and answered again with the rest after the check.
    """

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Any]] = {}

    def add(self, request: dict[str, Any], writes: list[Callable[[], None]]) -> None:
        entry = self.pending.setdefault(
            _spec(request), {"since": time.time(), "writes": [], "answered": []}
        )
        entry["writes"] += writes
        entry["answered"].append(request)

    def due(self, idle: bool) -> bool:
        oldest = min((e["since"] for e in self.pending.values()), default=None)
        return oldest is not None and (idle or time.time() - oldest > CHECK_DEFER_S)

    def run(self) -> None:
        pending, self.pending = self.pending, {}
        for entry in pending.values():
            after_answer(entry["writes"], entry["answered"], checked=True)


def _spec(request: dict[str, Any]) -> str:
    return str((request.get("args") or {}).get("spec") or "")


def warm() -> None:
    """Import what every request needs and load the models most visitors start with
    (``RETRAIN_PRELOAD``, comma-separated BASE specs; default the built-in starter model), so
    the first request does not pay for them. With a built-in model it also writes the host's
    sample digits (`sample.sample_dataset`), so the first "Use sample dataset" click in the web
    server only reads them. Both a local worker and a Ray actor warm here, and end with
    `settle_heap`."""
    threads = os.environ.get("RETRAIN_WORKER_THREADS")
    if threads:
        from retrain.training import devices

        devices.limit_threads(int(threads), pin=False)
    import keras  # noqa: F401  (imports the backend: the slow part)

    from retrain import evaluate, models  # noqa: F401
    from retrain.models import surgery  # noqa: F401

    if importlib.util.find_spec("tf_keras") is not None:  # checks Keras 2 / TM conversions
        import tempfile

        from retrain.models import keras2

        with tempfile.TemporaryDirectory() as folder, contextlib.suppress(Exception):
            keras2.warm_up(folder)  # best effort: only the first conversion's speed

    preload = os.environ.get("RETRAIN_PRELOAD", "builtin:digits-cnn").split(",")
    specs = [spec.strip() for spec in preload if spec.strip()]
    if any(spec.startswith("builtin:") for spec in specs):
        with contextlib.suppress(OSError):  # the offline demo's "Use sample dataset" images
            from retrain.data.sample import sample_dataset
            from retrain.sessions.workspace import home

            sample_dataset(home())
    for spec in specs:
        try:  # the starter model trains once on a fresh host: before anyone waits for it
            kinds.load_base(spec)
            describe_ahead(spec)
        except RetrainError as err:
            print(f"preload of {spec} skipped: {err}", flush=True)
    settle_heap()  # last: what warming made stays out of full collections (a Ray actor too)


def settle_heap() -> None:
    """Leave what warming made (TensorFlow, Keras, the preloaded models: about 430,000
    objects) out of Python's full garbage collections from now on (`gc.freeze`).

    Each full collection walked all of them: 0.25-0.39 s, and one came in about every other
    Teachable Machine layer table (0.3-0.9 CPU-s before; measured in a warm worker), since
    building a model makes many objects. What is frozen is still freed when nothing refers
    to it; only a cycle among those objects would stay (the preloaded starter model, if it is
    ever dropped)."""
    gc.collect()
    gc.freeze()


def describe_ahead(spec: str) -> None:
    """Cache the answer to the Model page's first request on ``spec`` (its layer table) before
    anyone asks: every visitor who starts from that model then gets it at once."""
    key = kinds.key_of("describe", {"spec": spec})  # the address the page's request has
    if cache.read_answer(key) is None:
        cache.write_answer(key, "describe", kinds.run("describe", {"spec": spec}))


def _holder_wanted(me: int) -> Callable[[dict[str, Any]], bool]:
    """Whether to leave a waiting request to the worker that has its model loaded: a Model
    page request on a base another worker holds and this one does not, for `AFFINITY_S` after
    it was queued (`CHECKING_S` while that worker checks the base's conversion). With two
    workers, the "Before → after" that follows a new model's layer table went to the idle
    worker half the time, which loaded the model again (1.6 s for a Teachable Machine export,
    more for an ImageNet backbone); the holder answers it at once. After that anyone takes it
    (the holder may be busy with a long request)."""
    elsewhere: tuple[set[str], set[str]] | None = None  # read once per claim, when one waits

    def leave(request: dict[str, Any]) -> bool:
        nonlocal elsewhere
        spec = (request.get("args") or {}).get("spec")
        if not spec or spec in kinds.held_specs():
            return False
        age = time.time() - float(request.get("enqueued") or 0)
        if age > max(AFFINITY_S, CHECKING_S):
            return False
        if elsewhere is None:
            elsewhere = pool.held_elsewhere(me)
        held, checking = elsewhere
        return spec in checking or (age <= AFFINITY_S and spec in held)

    return leave


def _log_answer(request: dict[str, Any], started: float, cpu: float) -> None:
    """One line per answer in the workers' log: what it was, how long it waited in the queue,
    and its wall and CPU seconds (a host too busy for its workers shows as wall >> CPU)."""
    queued = started - float(request.get("enqueued") or started)
    print(
        f"answered {request['kind']} in {time.time() - started:.2f} s "
        f"({time.process_time() - cpu:.2f} CPU-s) after {queued:.2f} s in the queue",
        flush=True,
    )


def main() -> None:
    pid = os.getpid()
    record = pool.record_path(pid)
    me = {"pid": pid, "started": own_start_time(), "host": requests.this_host()}
    lane = os.environ.get("RETRAIN_MODEL_LANE", pool.ANY)
    skip = pool.skipped_kinds(lane)
    if not record.exists():  # started by hand, not by the pool
        write_json(record, {**me, "since": time.time(), "lane": lane})
    warm()
    if record.exists():  # say it is warm (benchmarks and status wait for this)
        write_json(record, {**(read_json(record) or me), "ready": time.time()})
    idle_limit = env_number("RETRAIN_MODEL_WORKER_IDLE_S", 3600.0)
    holds = kinds.held_specs()
    pool.write_holds(pid, holds)
    last_work = last_prune = time.time()
    checks = Checks()
    while True:
        if not record.exists():
            return  # stop_workers removed the record (or the home is gone)
        request = requests.claim(me, skip, leave=_holder_wanted(pid))
        idle = request is None and time.time() - last_work > CHECK_IDLE_S
        long = request is not None and kinds.get(request["kind"]).long  # minutes: check first
        if checks.due(idle=idle or long):
            pool.write_holds(pid, holds, list(checks.pending))  # others wait for the check
            checks.run()
            holds = kinds.held_specs()
            pool.write_holds(pid, holds)
        if request is None:
            if time.time() - last_prune > PRUNE_EVERY_S:
                cache.prune()
                last_prune = time.time()
            if time.time() - last_work > idle_limit:
                record.unlink(missing_ok=True)
                return
            time.sleep(POLL_S)
            continue
        started, cpu = time.time(), time.process_time()
        with writes_after() as writes:  # the page gets its answer before the cache writes
            outcome = answer(request)
        _log_answer(request, started, cpu)
        unchecked = kinds.unchecked(_spec(request))
        if unchecked:
            checks.add(request, writes)
        held = kinds.held_specs()
        if held != holds:  # said before the answer: the page's next request is for this one
            pool.write_holds(pid, held)
            holds = held
        requests.finish(request["id"], outcome)
        if not unchecked and not after_answer(writes, [request]):
            holds = kinds.held_specs()
            pool.write_holds(pid, holds)
        last_work = time.time()


if __name__ == "__main__":
    main()
