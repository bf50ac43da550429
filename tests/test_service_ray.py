"""Model requests answered by Ray actors on a REAL local Ray head (tests/ray_fixtures.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_fixtures import RayHead, ray_installed

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not ray_installed(), reason="ray is not installed (requirements-ray.txt)"),
]
ROOT = Path(__file__).resolve().parents[1]

ASK = """
import sys, time
from retrain.service import ask, WorkerLost
kind, spec = sys.argv[1], sys.argv[2]
extra = dict(a.split("=", 1) for a in sys.argv[3:])
t = time.time()
try:
    answer = ask(kind, spec=spec, **extra)
    print("ok", answer.get("has_head"), len(answer.get("class_names") or []), round(time.time() - t, 2))
except WorkerLost as err:
    print("lost", str(err))
print(",".join(m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules) or "-")
"""

PID = """
import time
import ray
from retrain.service import on_ray
on_ray._connect()
for attempt in range(60):  # a killed actor restarts (max_restarts=-1): wait for it
    try:
        print(ray.get(on_ray._actor(0).pid.remote()))
        break
    except ray.exceptions.ActorUnavailableError:
        time.sleep(1)
"""


def _run(code: str, env: dict[str, str], *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("\n")


def test_requests_run_on_ray_actors_and_a_killed_actor_is_replaced(tmp_path: Path):
    head = RayHead(num_cpus=2).start()
    try:
        gcs = next(a.split("=", 1)[1] for a in head.proc.args if str(a).startswith("--port="))
        env = {
            **os.environ,
            "RETRAIN_RUNNER": "ray",
            "RAY_ADDRESS": head.address,
            "RETRAIN_RAY_CLUSTER": f"127.0.0.1:{gcs}",
            "RETRAIN_MODEL_WORKERS": "1",
            "PYTHONPATH": str(ROOT),
        }
        first = _run(ASK, env, "base_head", "builtin:digits-cnn")
        assert first[0].startswith("ok True 5"), first
        assert first[1] == "-", f"the asking process imported {first[1]}"
        # The actor is detached and warm: its pid, then kill -9 it.
        pid = int(_run(PID, env)[0])
        os.kill(pid, 9)
        # The next request waits for the restarting actor and is answered by it. Not one whose
        # answer the actor cached ahead at start (describe_ahead): that never reaches it.
        again = _run(ASK, env, "describe", "builtin:digits-cnn", "preprocessing=unit")
        assert again[0].startswith("ok"), again
        assert int(_run(PID, env)[0]) != pid
    finally:
        head.stop()


def test_a_cluster_that_is_not_there_is_one_line_within_seconds(monkeypatch):
    # ray.init alone waits 30 s (Ray Client) or over a minute (a GCS address) before failing.
    import socket
    import time

    from retrain.errors import RunError
    from retrain.service import on_ray

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"ray://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        monkeypatch.setenv("RETRAIN_RAY_CLUSTER", address)
        started = time.monotonic()
        with pytest.raises(RunError) as err:
            on_ray._connect()
        assert time.monotonic() - started < on_ray.PROBE_S + 5
        message = str(err.value)
        assert "\n" not in message
        assert f"Cannot reach the Ray cluster at {address}" in message
        assert f"port {port}: connection refused" in message
        assert "set RETRAIN_RAY_CLUSTER" in message
