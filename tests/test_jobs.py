"""retrain.runs.jobs: run directories, status with dead-worker detection, the host-wide queue."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for_run, write_run_dir

from retrain.errors import RunError
from retrain.runs import jobs, rundir
from retrain.runs.rundir import write_status
from retrain.sessions.workspace import write_json
from retrain.training.config import TrainConfig


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run_dir(tmp_path: Path, name: str = "run-1", **status) -> Path:
    config = {"base": "builtin:digits-cnn", "epochs": 3}
    return write_run_dir(tmp_path / "runs" / name, config, status=status or None)


def test_dead_worker_is_reported_interrupted(tmp_path):
    run_dir = _run_dir(tmp_path, state="running", pid=_dead_pid())
    (run_dir / rundir.CHECKPOINT_FILE).write_bytes(b"x")
    status = jobs.read_status(run_dir)
    assert status["state"] == "interrupted" and status["previous_state"] == "running"
    assert "resume" in status["error"] and status["resumable"] is True
    # the file itself is not rewritten: a resumed worker owns it
    assert rundir.read_status_file(run_dir)["state"] == "running"


def test_live_worker_stays_running_and_a_stop_request_shows_as_stopping(tmp_path):
    import psutil

    me = psutil.Process()
    run_dir = _run_dir(tmp_path, state="running", pid=me.pid, pid_started=me.create_time())
    assert jobs.read_status(run_dir)["state"] == "running"
    jobs.request_stop(run_dir)
    assert rundir.stop_requested(run_dir)
    assert jobs.read_status(run_dir)["state"] == "stopping"
    # a reused pid (another start time) is not the worker
    write_status(run_dir, "running", pid_started=me.create_time() - 1000)
    assert jobs.read_status(run_dir)["state"] == "interrupted"


def test_finished_states_are_kept(tmp_path):
    run_dir = _run_dir(tmp_path, state="failed", pid=_dead_pid(), error="Bad thing; do X.")
    status = jobs.read_status(run_dir)
    assert status["state"] == "failed" and status["error"] == "Bad thing; do X."


def test_not_a_run_directory_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="is not a run directory"):
        jobs.read_status(tmp_path)
    with pytest.raises(RunError, match="is not a run directory"):
        jobs.request_stop(tmp_path)


def test_new_metrics_are_read_incrementally_and_half_lines_wait(tmp_path):
    run_dir = _run_dir(tmp_path)
    path = run_dir / rundir.METRICS_FILE  # written by hand: half lines are the point
    path.write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "lo')
    rows, offset = jobs.read_new_metrics(run_dir, 0)
    assert [r["epoch"] for r in rows] == [1]
    with open(path, "a") as f:
        f.write('ss": 0.5}\n{"epoch": 3, "loss": 0.4}\n')
    rows, offset = jobs.read_new_metrics(run_dir, offset)
    assert [r["epoch"] for r in rows] == [2, 3]
    assert jobs.read_new_metrics(run_dir, offset) == ([], offset)
    path.write_text('{"epoch": 1}\n')  # rewritten by a resume: read again from the start
    assert jobs.read_new_metrics(run_dir, offset)[0] == [{"epoch": 1}]
    assert [r["epoch"] for r in jobs.read_metrics(run_dir)] == [1]


def test_list_runs_newest_first_with_best_val_accuracy(tmp_path):
    old = _run_dir(tmp_path, "run-a", state="done", created=100.0)
    write_run_dir(
        old, metrics=[{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75}]
    )
    _run_dir(tmp_path, "run-b", state="failed", created=200.0, error="x")
    runs = jobs.list_runs(tmp_path)
    assert [r["run_id"] for r in runs] == ["run-b", "run-a"]
    assert runs[1]["best_val_accuracy"] == 0.75 and runs[1]["epochs_done"] == 2
    assert runs[0]["state"] == "failed" and runs[0]["epochs"] == 3


def test_queue_holds_a_second_worker_until_the_first_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_MAX_WORKERS", "1")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    import psutil

    try:
        write_json(
            jobs.queue_dir() / "00000000000000000001-other.json",
            {"pid": sleeper.pid, "started": psutil.Process(sleeper.pid).create_time()},
        )
        run_dir = _run_dir(tmp_path)
        granted: list[bool] = []

        def worker():
            with jobs.training_slot(run_dir, poll_s=0.05) as ok:
                granted.append(ok)

        thread = threading.Thread(target=worker)
        thread.start()
        deadline = time.time() + 10
        while (rundir.read_status_file(run_dir) or {}).get("state") != "queued":
            assert time.time() < deadline
            time.sleep(0.02)
        status = jobs.read_status(run_dir)
        assert status["state"] == "queued" and status["position"] == 1 and not granted
    finally:
        sleeper.kill()
        sleeper.wait()
    thread.join(timeout=10)
    assert granted == [True]
    assert list(jobs.queue_dir().glob("*.json")) == []  # both tickets gone


def test_a_stop_while_queued_gives_up_the_place(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_MAX_WORKERS", "1")
    import psutil

    me = psutil.Process()
    write_json(
        jobs.queue_dir() / "00000000000000000001-x.json",
        {"pid": me.pid, "started": me.create_time()},
    )
    run_dir = _run_dir(tmp_path)
    rundir.request_stop(run_dir)
    with jobs.training_slot(run_dir, poll_s=0.01) as ok:
        assert ok is False


def test_start_run_writes_config_first_and_a_bad_run_fails_with_one_line(tmp_path):
    config = TrainConfig(data=str(tmp_path / "missing"), base="builtin:digits-cnn", epochs=2)
    run_dir = jobs.start_run(config, tmp_path / "ws")
    assert run_dir.parent == tmp_path / "ws" / "runs"
    saved = rundir.read_config(run_dir)
    assert saved["out"] == str(run_dir) and saved["epochs"] == 2
    assert jobs.read_status(run_dir)["state"] in ("queued", "running", "failed")
    status = wait_for_run(run_dir, timeout_s=90, poll_s=0.1)
    assert status["state"] == "failed"
    assert "missing" in status["error"] and "\n" not in status["error"]
    # The worker writes "failed" first and prints its last words after: give them a moment
    # (on a loaded host the log lagged the status; CI saw it empty once).
    deadline = time.monotonic() + 30
    while "error:" not in jobs.read_log_tail(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "error:" in jobs.read_log_tail(run_dir)
    assert [r["run_id"] for r in jobs.list_runs(tmp_path / "ws")] == [run_dir.name]


def test_worker_env_caps_threads_and_keeps_home(monkeypatch, tmp_path):
    env = jobs.worker_env()
    from retrain.training import devices

    # one owner of the count: the worker applies it with devices.limit_threads
    assert int(env["RETRAIN_WORKER_THREADS"]) == devices.worker_threads() >= 1
    assert env["RETRAIN_HOME"] == str(jobs.home())


def test_cli_status_and_stop(tmp_path):
    from retrain.__main__ import main

    run_dir = _run_dir(tmp_path, state="running", pid=_dead_pid())
    assert main(["status", str(run_dir)]) == 0
    assert main(["stop", str(run_dir)]) == 0
    assert rundir.stop_requested(run_dir)
    assert main(["status", str(tmp_path / "nope")]) == 2


def test_delete_run_removes_a_finished_run_and_refuses_a_live_one(tmp_path):
    import os

    done = _run_dir(tmp_path, "run-done", state="done")
    jobs.delete_run(tmp_path, "run-done")
    assert not done.exists()
    live = _run_dir(tmp_path, "run-live", state="running", pid=os.getpid())
    with pytest.raises(RunError, match="stop it on the Train page"):
        jobs.delete_run(tmp_path, "run-live")
    assert live.exists()


def test_worker_command_is_the_cli_of_a_new_or_resumed_run(tmp_path):
    from retrain.__main__ import build_parser
    from retrain.training.config import config_from_args

    config = TrainConfig(data="d.zip", base="builtin:digits-cnn", epochs=4, freeze="TOP:2")
    run_dir = tmp_path / "runs" / "run-x"
    command = jobs.worker_command(run_dir, config, tmp_path)
    assert command[:4] == [sys.executable, "-m", "retrain", "train"]
    args = build_parser().parse_args(command[3:])
    assert args.handler == "retrain.runs.worker:cli_train"
    again = config_from_args(args)
    assert again.out == str(run_dir) and again.epochs == 4 and again.freeze == "top:2"
    assert args.workspace == tmp_path
    resume = jobs.worker_command(run_dir, workspace=tmp_path, python="python3")
    assert resume == ["python3", "-m", "retrain", "train", "--resume", str(run_dir),
                      "--workspace", str(tmp_path)]  # fmt: skip


def test_session_liveness_is_what_the_session_sweep_is_given(tmp_path):
    import os

    session = tmp_path / "session"
    _run_dir(session, "run-done", state="done")
    assert jobs.session_has_live_run(session) is False
    _run_dir(session, "run-live", state="running", pid=os.getpid())
    assert jobs.session_has_live_run(session) is True


def test_create_run_and_prepare_resume_start_no_process(tmp_path):
    import os

    config = TrainConfig(data="d.zip", base="builtin:digits-cnn", epochs=2)
    run_dir = jobs.create_run(config, tmp_path)
    assert run_dir.parent == tmp_path / "runs" and rundir.read_pid(run_dir) is None
    assert rundir.read_config(run_dir) == {**config.to_dict(), "out": str(run_dir),
                                           "run_id": run_dir.name}  # fmt: skip
    assert rundir.read_status_file(run_dir)["state"] == "queued"
    with pytest.raises(FileExistsError):
        jobs.create_run(config, tmp_path, run_dir=run_dir)
    rundir.write_status(run_dir, "running", pid=os.getpid())
    with pytest.raises(RunError, match="is still running; stop it first"):
        jobs.prepare_resume(run_dir)
    rundir.write_status(run_dir, "done", pid=None)
    rundir.write_pid(run_dir, 99999)
    assert jobs.prepare_resume(run_dir) == run_dir
    assert rundir.read_status_file(run_dir)["state"] == "queued"
    assert rundir.read_pid(run_dir) is None
