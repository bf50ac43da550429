"""The ray runner against a REAL local Ray head (tests/ray_fixtures.py), on loopback.

One head serves the module (starting one costs ~10-20 s on 2 cores); the test that kills it
mid-run starts the next one, which the tests after it use. Runs are tiny (the built-in digits
model, a few 16x16 images, 1-2 epochs) so the whole module stays around two minutes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.ray_fixtures import RayHead, free_ports, ray_installed

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not ray_installed(), reason="ray is not installed (requirements-ray.txt)"),
]

ROOT = Path(__file__).resolve().parents[1]


class Cluster:
    """The module's Ray head, replaceable (the head-kill test starts a new one)."""

    def __init__(self, hidden_home: Path) -> None:
        self.hidden_home = hidden_home
        self.head = RayHead(num_cpus=2, hide=hidden_home).start()

    @property
    def address(self) -> str:
        return self.head.address

    def restart(self) -> None:
        self.head.stop()
        self.head = RayHead(num_cpus=2, hide=self.hidden_home).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    hidden = tmp_path_factory.mktemp("home_the_cluster_cannot_see")
    running = Cluster(hidden)
    try:
        yield running
    finally:
        running.head.stop()


@pytest.fixture
def ray_env(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """This test's process talks to the module's head with the ray runner, CPU only."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("RETRAIN_RUNNER", "ray")
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "0")
    monkeypatch.setenv("RETRAIN_RAY_CPUS", "1")
    return cluster


def wait_for(predicate, timeout_s: float = 120.0, poll_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- No cluster needed ---


def test_unreachable_cluster_is_one_clear_line(monkeypatch: pytest.MonkeyPatch):
    from retrain import ray_runner
    from retrain.errors import RetrainError

    (port,) = free_ports(1)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    with pytest.raises(RetrainError, match=r"cannot be reached .*set RAY_ADDRESS"):
        ray_runner.check_storage()
    view = ray_runner.job_view({"job_id": "raysubmit_x", "address": f"http://127.0.0.1:{port}"})
    assert view["reachable"] is False and "cannot be reached" in view["error"]


def test_ray_address_must_be_the_dashboard(monkeypatch: pytest.MonkeyPatch):
    from retrain import ray_runner
    from retrain.errors import ConfigError

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match="dashboard's address"):
        ray_runner.address()
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "lots")
    with pytest.raises(ConfigError, match="RETRAIN_RAY_GPUS"):
        ray_runner.resources()


# --- Against the real head ---


def test_storage_probe_reads_what_a_job_wrote_and_remembers_it(ray_env: Cluster):
    from retrain import ray_runner
    from retrain.workspace import home

    first = ray_runner.check_storage()
    assert first["address"] == ray_env.address and first["session_name"]
    assert not list((home() / ray_runner.PROBE_DIR).glob("*.txt"))  # the probe cleans up
    # Once per cluster session: the second check submits no job.
    from ray.job_submission import JobSubmissionClient

    before = len(JobSubmissionClient(ray_env.address).list_jobs())
    assert ray_runner.check_storage() == first
    assert len(JobSubmissionClient(ray_env.address).list_jobs()) == before


def test_storage_probe_refuses_a_cluster_that_does_not_share_the_home(
    ray_env: Cluster, monkeypatch: pytest.MonkeyPatch
):
    from retrain import ray_runner
    from retrain.errors import RetrainError

    if not ray_env.head.hidden:
        pytest.skip("no private mount namespace here (needs root and unshare)")
    # The head's processes see an empty tmpfs at this path: a node without the shared volume.
    monkeypatch.setenv("RETRAIN_HOME", str(ray_env.hidden_home))
    with pytest.raises(RetrainError, match=r"does not share RETRAIN_HOME.*Mount the same"):
        ray_runner.check_storage()


def test_code_shipped_as_working_dir_or_installed_on_the_node(ray_env: Cluster, tmp_path: Path):
    """Both ways of getting the code onto the cluster run this checkout's `retrain`."""
    from retrain import ray_runner

    probe = [
        sys.executable,
        "-c",
        "import retrain, sys; print('RETRAIN_AT', retrain.__file__, sys.executable)",
    ]
    records = {
        ship: ray_runner.submit(probe, run_dir=tmp_path, gpus=0, cpus=0, ship_code=ship)
        for ship in (False, True)
    }
    for ship, record in records.items():
        wait_for(
            lambda r=record: ray_runner.job_view(r).get("job_status") in ray_runner.TERMINAL,
            what="the code probe job",
        )
        view = ray_runner.job_view(record)
        logs = ray_runner.job_logs(record)
        assert view["job_status"] == "SUCCEEDED", logs
        where = next(line for line in logs.splitlines() if line.startswith("RETRAIN_AT"))
        if ship:  # Ray unpacked the shipped package into its runtime-resources folder
            assert "working_dir_files" in where and "_ray_pkg_" in where
        else:  # the node's own copy (PYTHONPATH of the head = this checkout)
            assert str(ROOT / "retrain" / "__init__.py") in where
        assert record["entrypoint"].startswith("python -c ")
