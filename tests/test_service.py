"""The model-worker seam: fair queue, answers by content, warm workers, a worker killed mid-request."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from retrain.errors import ConfigError, ModelError
from retrain.service import WorkerLost, ask, client, kinds, pool
from retrain.service import queue as requests
from retrain.sessions.workspace import read_json


@pytest.fixture
def workers(monkeypatch):
    """A real pool of one warm worker on this test's home; stopped afterwards."""
    monkeypatch.setenv("RETRAIN_MODEL_WORKERS", "1")
    monkeypatch.setenv("RETRAIN_MODEL_THREADS", "1")
    monkeypatch.setenv("RETRAIN_PRELOAD", "")  # these tests load their own models
    yield pool
    pool.stop_workers()


# ------------------------------------------------------------------------- the queue


def _request(rid: str, session: str, at: float) -> dict:
    return {"id": rid, "session": session, "enqueued": at}


def test_fair_order_takes_sessions_in_turn_not_first_come_first_served():
    waiting = [
        _request("a1", "A", 1.0),
        _request("a2", "A", 2.0),
        _request("a3", "A", 3.0),
        _request("b1", "B", 4.0),
    ]
    assert requests.fair_order(waiting, {}) == ["a1", "b1", "a2", "a3"]
    # A was just served, B never: B's first request goes first.
    assert requests.fair_order(waiting, {"A": 100.0}) == ["b1", "a1", "a2", "a3"]


def test_position_claim_and_cancel_follow_the_fair_order():
    for i, session in enumerate(("alice", "alice", "alice", "bob")):
        rid = requests.request_id(str(i) * 64, session)
        requests.enqueue(rid, str(i) * 64, "describe", {"spec": "builtin:x"}, session)
        time.sleep(0.01)
    bob = requests.request_id("3" * 64, "bob")
    alice_last = requests.request_id("2" * 64, "alice")
    assert requests.position(bob) == 2  # behind alice's first only
    assert requests.position(alice_last) == 4
    assert requests.cancel(alice_last) is True
    assert requests.position(alice_last) is None and requests.state(alice_last) is None
    me = {"pid": os.getpid(), "started": None, "host": requests.this_host()}
    first = requests.claim(me)
    assert first["session"] == requests.session_tag("alice")
    assert requests.state(first["id"]) == "running"
    assert requests.claim(me)["id"] == bob  # alice was just served: bob's turn
    assert requests.cancel(bob) is False  # running, not waiting
    # The same request asked again (a rerun of the page) is not queued twice.
    rid = requests.request_id("1" * 64, "alice")
    requests.enqueue(rid, "1" * 64, "describe", {"spec": "builtin:x"}, "alice")
    assert len(list((pool.service_dir() / "queue").glob("*.json"))) == 1


def test_a_worker_kept_for_quick_requests_leaves_long_ones_in_their_place():
    export = requests.request_id("e" * 64, "alice")
    requests.enqueue(export, "e" * 64, "export", {"run_dir": "/r", "formats": ["keras"]}, "alice")
    time.sleep(0.01)
    preview = requests.request_id("p" * 64, "bob")
    requests.enqueue(preview, "p" * 64, "head_preview", {"spec": "builtin:x"}, "bob")
    me = {"pid": os.getpid(), "started": None, "host": requests.this_host()}
    quick = requests.claim(me, pool.skipped_kinds(pool.QUICK))
    assert quick["id"] == preview  # the export came first, but is not for this worker
    assert requests.claim(me, pool.skipped_kinds(pool.QUICK)) is None
    assert requests.position(export) == 1 and requests.state(export) == "queued"
    assert requests.claim(me, pool.skipped_kinds(pool.ANY))["id"] == export


def test_a_model_request_waits_briefly_for_the_worker_that_has_its_model_loaded(monkeypatch):
    from retrain.service import worker

    me = {"pid": os.getpid(), "started": None, "host": requests.this_host()}
    other = {"pid": os.getppid(), "started": None, "host": requests.this_host()}
    monkeypatch.setattr(pool, "live_workers", lambda: [me, other])
    pool.write_holds(other["pid"], ["upload/keras_model.h5"])
    assert pool.held_elsewhere(me["pid"]) == ({"upload/keras_model.h5"}, set())
    preview = requests.request_id("h" * 64, "alice")
    requests.enqueue(preview, "h" * 64, "head_preview", {"spec": "upload/keras_model.h5"}, "alice")
    time.sleep(0.01)
    starter = requests.request_id("s" * 64, "bob")
    requests.enqueue(starter, "s" * 64, "describe", {"spec": "builtin:digits-cnn"}, "bob")
    # This worker does not hold the upload, the other does: it takes bob's request instead.
    assert requests.claim(me, leave=worker._holder_wanted(me["pid"]))["id"] == starter
    assert requests.claim(me, leave=worker._holder_wanted(me["pid"])) is None
    assert requests.claim(other, leave=worker._holder_wanted(other["pid"]))["id"] == preview
    # Nobody else holds it, or it waited longer than AFFINITY_S: anyone takes it.
    late = requests.request_id("l" * 64, "carol")
    requests.enqueue(late, "l" * 64, "head_preview", {"spec": "upload/keras_model.h5"}, "carol")
    monkeypatch.setattr(worker, "AFFINITY_S", 0.0)
    time.sleep(0.01)
    assert requests.claim(me, leave=worker._holder_wanted(me["pid"]))["id"] == late
    # While the holder checks the upload's conversion, requests on it wait for it longer.
    pool.write_holds(other["pid"], ["upload/keras_model.h5"], ["upload/keras_model.h5"])
    checked = requests.request_id("c" * 64, "carol")
    requests.enqueue(checked, "c" * 64, "describe", {"spec": "upload/keras_model.h5"}, "carol")
    time.sleep(0.01)
    assert requests.claim(me, leave=worker._holder_wanted(me["pid"])) is None
    monkeypatch.setattr(worker, "CHECKING_S", 0.0)
    assert requests.claim(me, leave=worker._holder_wanted(me["pid"]))["id"] == checked


def test_the_checked_copy_of_a_converted_model_is_written_after_the_answer():
    from retrain.models import load

    done: list[str] = []
    load._later(lambda: done.append("now"))  # outside a worker's answer: at once
    with load.writes_after() as writes:
        load._later(lambda: done.append("later"))
        assert done == ["now"]
    assert done == ["now"] and len(writes) == 1
    writes[0]()
    assert done == ["now", "later"] and load._AFTER is None


def test_an_answer_on_an_unchecked_conversion_is_answered_again_once_checked_or_dropped(
    tmp_path: Path, monkeypatch
):
    import shutil

    from retrain.models import load
    from retrain.service import cache, worker
    from tests.test_models import keras2_nested_h5

    path = tmp_path / "keras_model.h5"
    keras2_nested_h5(path)
    args = {"spec": str(path)}
    request = {"id": "r1", "key": kinds.key_of("describe", args), "kind": "describe", "args": args}
    checks = worker.Checks()
    with load.writes_after() as later:
        assert worker.answer(request) == {"ok": True, "key": request["key"]}
    assert kinds.unchecked(str(path))
    checks.add(request, later)
    assert cache.read_answer(request["key"])["origin"]["conversion_check"] == "after this answer"
    # Before the check: the next request on that base is answered from it as it is.
    probe = {**request, "id": "r2", "args": {**args, "preprocessing": "tf"}}
    probe["key"] = kinds.key_of("describe", probe["args"])
    with load.writes_after() as later:
        assert worker.answer(probe)["ok"] is True
    assert kinds.unchecked(str(path))  # it rests on the unchecked base too
    checks.add(probe, later)
    assert list(checks.pending) == [str(path)]
    assert not checks.due(idle=False) and checks.due(idle=True)
    monkeypatch.setattr(worker, "CHECK_DEFER_S", 0.0)
    assert checks.due(idle=False)  # a busy worker checks it after CHECK_DEFER_S all the same
    checks.run()
    assert not checks.pending and not kinds.unchecked(str(path))
    for key in (request["key"], probe["key"]):  # both answered again, from the checked base
        origin = cache.read_answer(key)["origin"]
        assert origin["conversion_max_abs_diff"] <= 1e-4 and "conversion_check" not in origin

    # The same file converted again, and its check fails this time.
    kinds.forget_base(str(path))
    shutil.rmtree(load._converted_path(path).parent)
    cache.drop_answer(request["key"])

    def differs(p, model):
        raise ModelError(f"'{Path(p).name}' could not be converted faithfully (outputs differ).")

    monkeypatch.setattr(load.keras2, "check_conversion", differs)
    with load.writes_after() as later:
        assert worker.answer(request)["ok"] is True
    assert str(path) in kinds.held_specs()
    assert worker.after_answer(later, [request], checked=True) is False
    assert str(path) not in kinds.held_specs()  # dropped: the next request loads it again
    assert cache.read_answer(request["key"]) is None
    with load.writes_after():
        outcome = worker.answer(request)
    assert outcome["ok"] is False and "converted faithfully" in outcome["message"]


def test_long_kinds_and_the_lanes_of_a_pool():
    assert pool.skipped_kinds(pool.QUICK) == {"evaluate_run", "forgetting", "export"}
    assert pool.skipped_kinds(pool.ANY) == frozenset()
    assert pool.lanes(0) == [] and pool.lanes(1) == [pool.ANY]  # one worker must take anything
    assert pool.lanes(2) == [pool.ANY, pool.QUICK]
    assert pool.lanes(4) == [pool.ANY, pool.QUICK, pool.ANY, pool.ANY]


def test_the_pool_fills_the_lanes_that_have_no_live_worker(monkeypatch):
    monkeypatch.setenv("RETRAIN_MODEL_WORKERS", "2")
    live = [{"pid": 1, "lane": pool.QUICK}]  # the "any" worker died
    started = []
    monkeypatch.setattr(pool, "live_workers", lambda: list(live))
    monkeypatch.setattr(pool, "start_worker", lambda lane: started.append(lane) or {"lane": lane})
    assert [w["lane"] for w in pool.ensure_workers()] == [pool.QUICK, pool.ANY]
    assert started == [pool.ANY]
    live[:] = [{"pid": 1, "lane": pool.ANY}, {"pid": 2, "lane": pool.ANY}]  # full: nothing new
    assert len(pool.ensure_workers()) == 2 and started == [pool.ANY]


def test_model_workers_run_unpinned_at_normal_priority_and_training_yields(monkeypatch):
    import subprocess
    import sys

    from retrain.runs import jobs

    monkeypatch.delenv("RETRAIN_TRAIN_NICE", raising=False)
    assert jobs.worker_env()["RETRAIN_TRAIN_NICE"] == str(jobs.TRAIN_NICE) == "10"
    env = pool.worker_env(pool.QUICK)
    assert "RETRAIN_TRAIN_NICE" not in env and env["RETRAIN_MODEL_LANE"] == pool.QUICK
    code = (
        "import os; from retrain.training import devices; from retrain.runs.worker import yield_cpu\n"
        "cpus = os.sched_getaffinity(0); devices.limit_threads(1, pin=False)\n"
        "assert os.sched_getaffinity(0) == cpus, 'a model worker was pinned'\n"
        "print(yield_cpu('10'), os.nice(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == [str(os.nice(0) + 10)] * 2


@pytest.mark.skipif(
    not Path("/proc/self/autogroup").exists(), reason="no session autogroups on this kernel"
)
def test_a_training_run_in_its_own_session_lowers_its_session_group():
    """With autogroups a nice value only counts inside a session: the run's session yields."""
    import subprocess
    import sys

    code = (
        "import os; from retrain.runs.worker import yield_cpu\n"
        "yield_cpu('10'); print(open('/proc/self/autogroup').read().split('nice')[-1].strip())"
    )
    root = Path(__file__).resolve().parents[1]
    mine = Path("/proc/self/autogroup").read_text()

    def group_nice(new_session: bool) -> str:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
            start_new_session=new_session,
        ).stdout.strip()  # fmt: skip

    assert group_nice(True) == "10"  # as the dashboard starts a run (jobs._spawn)
    before = mine.split("nice")[-1].strip()
    assert group_nice(False) == before  # not a session leader: the shared group is untouched
    assert Path("/proc/self/autogroup").read_text() == mine


def test_prefetch_queues_once_and_never_for_a_known_answer(monkeypatch):
    from retrain.service import cache

    monkeypatch.setenv("RETRAIN_MODEL_WORKERS", "1")
    monkeypatch.setattr(pool, "ensure_workers", lambda: [])  # no process: only the queue
    args = {"spec": "builtin:x", "choice": {"freeze": "all"}, "num_classes": 2}
    assert client.prefetch("head_preview", session="alice", workspace="/w/a", **args) is True
    assert client.prefetch("head_preview", session="alice", workspace="/w/a", **args) is True
    queued = list((pool.service_dir() / "queue").glob("*.json"))
    assert len(queued) == 1  # a rerun does not queue it twice
    # The page's own request later is the same request: it waits for this one.
    assert queued[0].stem == client.request_id("head_preview", "alice", workspace="/w/b", **args)
    cache.write_answer(client.key_of("head_preview", args), "head_preview", {"ok": 1})
    assert client.prefetch("head_preview", session="bob", **args) is False
    assert client.prefetch("export", session="bob", run_dir="/r", formats=[]) is False  # uncached
    monkeypatch.setenv("RETRAIN_MODEL_WORKERS", "0")  # embedded: it would compute it here, now
    assert client.prefetch("head_preview", session="bob", spec="builtin:y", choice={}) is False


def test_request_files_never_carry_the_session_token():
    token = "Secret_session_token_123456"
    rid = requests.request_id("f" * 64, token)
    requests.enqueue(rid, "f" * 64, "describe", {"spec": "builtin:x"}, token)
    assert token not in rid
    for path in pool.service_dir().rglob("*"):
        if path.is_file():
            assert token not in path.read_text(errors="replace"), path


# ------------------------------------------------------------------------- the cache


def test_answers_are_addressed_by_content_not_by_path_or_session(tmp_path: Path):
    one, two, other = tmp_path / "a" / "m.keras", tmp_path / "b" / "m.keras", tmp_path / "o.keras"
    for path, data in ((one, b"same"), (two, b"same"), (other, b"different")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    key = client.key_of("describe", {"spec": str(one), "workspace": "/sessions/a"})
    assert key == client.key_of("describe", {"spec": str(two), "workspace": "/sessions/b"})
    assert key != client.key_of("describe", {"spec": str(other), "workspace": "/sessions/a"})
    assert key != client.key_of(
        "describe", {"spec": str(one), "preprocessing": "unit", "workspace": "/x"}
    )
    one.write_bytes(b"changed")  # a new version of the file is a new answer
    assert key != client.key_of("describe", {"spec": str(one), "workspace": "/sessions/a"})


def test_old_answers_are_pruned_and_recent_ones_kept():
    from retrain.service import cache

    cache.write_answer("a" * 64, "describe", {"x": 1})
    cache.write_answer("b" * 64, "describe", {"x": 2})
    old = time.time() - 30 * 86400
    os.utime(cache.answer_path("a" * 64), (old, old))
    assert cache.prune() == 1
    assert cache.read_answer("a" * 64) is None and cache.read_answer("b" * 64) == {"x": 2}


def test_a_worker_preloads_the_starter_model_before_it_says_it_is_ready(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no starter model there yet
    monkeypatch.setenv("RETRAIN_MODEL_WORKERS", "1")
    monkeypatch.setenv("RETRAIN_MODEL_THREADS", "1")
    try:
        record = pool.ensure_workers()[0]
        path = pool.record_path(record["pid"])
        deadline = time.time() + 180
        while time.time() < deadline and "ready" not in (read_json(path) or {}):
            time.sleep(0.2)
        assert "ready" in read_json(path), "the worker never became ready"
        from retrain.models import builtin_path

        assert builtin_path().is_file()  # trained at start, not at the first Model page visit
        from retrain.sessions.workspace import home

        # The sample's images too: the first "Use sample dataset" click only reads them.
        assert (home() / "samples" / "digits-5-6-7-8-9.complete").is_file()
        # The Model page's first request on it is answered before anyone asks.
        assert client.cached("describe", spec="builtin:digits-cnn", workspace="/any")["name"]
        started = time.time()
        assert ask("base_head", spec="builtin:digits-cnn")["has_head"] is True
        assert time.time() - started < 5
    finally:
        pool.stop_workers()


def test_a_models_labels_file_is_part_of_its_answers_address(tmp_path: Path):
    model = tmp_path / "keras_model.h5"
    model.write_bytes(b"weights")
    before = client.key_of("describe", {"spec": str(model)})
    (tmp_path / "labels.txt").write_text("0 cat\n1 dog\n")
    named = client.key_of("describe", {"spec": str(model)})
    (tmp_path / "labels.txt").write_text("0 ant\n1 bee\n")
    assert len({before, named, client.key_of("describe", {"spec": str(model)})}) == 3


def test_the_start_command_starts_warm_workers_before_the_server(workers):
    import json
    import subprocess
    import sys

    from retrain.runs.procs import process_alive

    def service(flag: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "retrain.service", flag],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    started = service("--wait")["workers"]
    assert len(started) == 1 and "ready" in started[0]
    assert [w["pid"] for w in pool.live_workers()] == [started[0]["pid"]]
    # ... and `--stop` ends them (what `make run` does when its server stops).
    assert service("--stop") == {"stopped": 1}
    assert pool.live_workers() == []
    assert not process_alive(started[0]["pid"], started[0]["started"])


def test_a_replaced_heads_preview_depends_on_the_number_of_classes_not_their_names():
    choice = {"cut_at": None, "freeze": "all", "hidden_units": 0, "dropout": 0.2}
    by_count = kinds.head_preview("builtin:digits-cnn", choice, num_classes=3)
    by_names = kinds.head_preview("builtin:digits-cnn", choice, classes=["owl", "cat", "<b>"])
    assert json_of(by_count) == json_of(by_names)
    assert by_count["output_shape"][-1] == 3


def json_of(answer: dict) -> str:
    import json

    return json.dumps(answer, sort_keys=True, default=str)


def test_unknown_kind_is_one_line():
    with pytest.raises(ConfigError, match="Unknown model request 'nope'"):
        ask("nope")


def test_inline_mode_answers_in_process_and_caches(monkeypatch):
    calls = []

    def fake(spec: str, workspace: str | None = None) -> dict:
        calls.append(spec)
        return {"name": spec, "has_head": True, "class_names": []}

    monkeypatch.setitem(kinds.KINDS, "base_head", kinds.Kind(fake, context=("workspace",)))
    first = ask("base_head", spec="zoo:x", workspace="/one")
    again = ask("base_head", spec="zoo:x", workspace="/two")  # another session: same answer
    assert first == again == {"name": "zoo:x", "has_head": True, "class_names": []}
    assert calls == ["zoo:x"]


# ------------------------------------------------------------------------- real workers


def test_a_warm_worker_answers_and_the_web_side_never_imports_keras(workers, tmp_path):
    import subprocess
    import sys

    # The asking process is a fresh interpreter, as the web server is.
    code = (
        "import sys, time\n"
        "from retrain.service import ask\n"
        "t = time.time(); a = ask('base_head', spec='builtin:digits-cnn')\n"
        "t2 = time.time(); b = ask('base_head', spec='builtin:digits-cnn')\n"
        "print(a['has_head'], len(a['class_names']), round(time.time() - t2, 3))\n"
        "print(','.join(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first, heavy = out.stdout.split("\n")[:2]
    has_head, classes, cached_s = first.split()
    assert has_head == "True" and classes == "5"
    assert float(cached_s) < 1.0  # the second answer comes from the cache
    assert heavy == ""
    assert len(pool.live_workers()) == 1
    # The workers' log has a line per answer: its wait in the queue, wall and CPU seconds.
    log = (pool.workers_dir() / "workers.log").read_text()
    assert re.search(r"answered base_head in [\d.]+ s \([\d.]+ CPU-s\) after [\d.]+ s in", log)

    # A Keras 2 file: the layer table first, the "Before → after" next, the check when idle.
    from tests.test_models import keras2_nested_h5

    keras2_nested_h5(tmp_path / "keras_model.h5")
    spec = str(tmp_path / "keras_model.h5")
    info = ask("describe", spec=spec)
    assert info["origin"]["conversion_check"] == "after this answer"
    choice = {"cut_at": info["suggested_cut"], "freeze": "all"}
    assert ask("head_preview", spec=spec, choice=choice, num_classes=3)["diff"]
    deadline = time.time() + 60
    while "conversion_check" in (info := ask("describe", spec=spec))["origin"]:
        assert time.time() < deadline, "the conversion was never checked"
        time.sleep(0.2)
    assert info["origin"]["conversion_max_abs_diff"] <= 1e-4


def test_a_worker_killed_mid_request_gives_one_line_and_the_next_request_a_fresh_worker(
    workers,
):
    pool.ensure_workers()
    victim = pool.live_workers()[0]
    outcome: dict = {}

    def slow_request() -> None:
        try:
            # Builds EfficientNetB0 from its config: seconds, long enough to be killed in.
            outcome["answer"] = ask("describe", spec="applications:EfficientNetB0:none")
        except Exception as err:  # noqa: BLE001 (the assertion below names it)
            outcome["error"] = err

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and requests.running_count() == 0:
        time.sleep(0.05)
    assert requests.running_count() == 1, "the request never started"
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the page would hang: ask() did not return"
    assert time.time() - killed_at < 10
    assert isinstance(outcome.get("error"), WorkerLost), outcome
    assert str(outcome["error"]).count("\n") == 0 and "Retry" in str(outcome["error"])
    answer = ask("base_head", spec="builtin:digits-cnn")  # a fresh worker takes it
    assert answer["has_head"] is True
    assert [w["pid"] for w in pool.live_workers()] != [victim["pid"]]


def test_a_refused_model_is_refused_in_the_worker_with_its_own_line(workers, tmp_path):
    fake = tmp_path / "model.h5"
    fake.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ModelError) as err:
        ask("describe", spec=str(fake))
    assert "\n" not in str(err.value)
    assert len(pool.live_workers()) == 1  # the worker survives a refusal


def test_a_model_bomb_is_refused_by_the_worker_in_seconds_and_its_memory_stays_flat(
    workers, tmp_path
):
    import psutil

    from tests.test_model_bomb import keras_bomb

    bomb = keras_bomb(tmp_path / "bomb")
    ask("base_head", spec="builtin:digits-cnn")  # the worker is warm (TF imported)
    worker = psutil.Process(pool.live_workers()[0]["pid"])
    before = worker.memory_info().rss
    started = time.time()
    with pytest.raises(ModelError) as err:
        ask("describe", spec=str(bomb))
    seconds = time.time() - started
    grown_mb = (worker.memory_info().rss - before) / 2**20
    assert "\n" not in str(err.value) and "GB" in str(err.value), str(err.value)
    assert seconds < 5, f"refused after {seconds:.1f} s"
    assert grown_mb < 100, f"the worker grew by {grown_mb:.0f} MB"
    assert worker.is_running()
