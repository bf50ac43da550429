"""The ray runner against a REAL local Ray head (tests/ray_fixtures.py), on loopback.

One head serves the module (starting one costs ~10-20 s on 2 cores); the test that kills it
mid-run starts the next one, which the tests after it use. Runs are tiny (the built-in digits
model, a few 16x16 images, 1-2 epochs) so the whole module stays around two minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
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
    from retrain.errors import RetrainError
    from retrain.runs import ray_runner

    (port,) = free_ports(1)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    with pytest.raises(RetrainError, match=r"cannot be reached .*set RAY_ADDRESS"):
        ray_runner.check_storage()
    view = ray_runner.job_view({"job_id": "raysubmit_x", "address": f"http://127.0.0.1:{port}"})
    assert view["reachable"] is False and "cannot be reached" in view["error"]


def test_ray_address_must_be_the_dashboard(monkeypatch: pytest.MonkeyPatch):
    from retrain.errors import ConfigError
    from retrain.runs import ray_runner

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match="dashboard's address"):
        ray_runner.address()
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "lots")
    with pytest.raises(ConfigError, match="RETRAIN_RAY_GPUS"):
        ray_runner.resources()
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "-1")
    with pytest.raises(ConfigError, match=r"RETRAIN_RAY_GPUS='-1' must be 0 or more"):
        ray_runner.resources()
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "0")  # 0 is allowed here; the data limits refuse it
    assert ray_runner.resources()[0] == 0.0


def test_gpus_auto_is_the_default_and_numbers_still_count(monkeypatch: pytest.MonkeyPatch):
    from retrain.errors import ConfigError
    from retrain.runs import ray_runner

    monkeypatch.delenv("RETRAIN_RAY_GPUS", raising=False)
    assert ray_runner.resources() == (None, 1.0)  # None: auto, decided per run
    assert ray_runner.parse_gpus("auto") is None and ray_runner.parse_gpus(" AUTO ") is None
    assert ray_runner.parse_gpus("0") == 0.0 and ray_runner.parse_gpus("0.5") == 0.5
    assert ray_runner.parse_gpus(2) == 2.0
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(ConfigError, match=f"--gpus {bad}: expected auto or a number"):
            ray_runner.parse_gpus(bad)
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "auto")
    assert ray_runner.resources()[0] is None
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "2")
    # A number is taken as it is, without asking the cluster (none is reachable here).
    assert ray_runner.choose_gpus() == (2.0, "asked for 2 (RETRAIN_RAY_GPUS)")
    assert ray_runner.choose_gpus("0") == (0.0, "asked for 0 (--gpus)")


@pytest.mark.parametrize(
    ("cluster_gpus", "autoscaler_gpus", "autoscaler", "chosen", "why"),
    [
        (2.0, None, False, 1.0, "auto: the cluster has 2 GPU(s)"),
        (0.0, 8.0, True, 1.0, "auto: the cluster has no GPU now; its autoscaler can add up to 8"),
        (0.0, 0.0, True, 0.0, "auto: the cluster has no GPU and its autoscaler offers none"),
        (None, None, False, 0.0, "auto: the cluster has no GPU and no autoscaler node types"),
    ],
)
def test_gpus_auto_asks_for_a_gpu_only_where_one_is_or_can_be_added(
    cluster_gpus, autoscaler_gpus, autoscaler, chosen, why
):
    from retrain.runs import ray_runner

    gpus, reason = ray_runner.gpu_choice(cluster_gpus, autoscaler_gpus, autoscaler)
    assert gpus == chosen and reason.startswith(why)


def test_a_ray_worker_refuses_a_node_without_the_run_or_a_superseded_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What the worker checks first when Ray placed it (no cluster needed)."""
    from retrain.errors import RetrainError
    from retrain.runs import ray_runner

    config = tmp_path / "run" / "config.json"
    with pytest.raises(RetrainError, match=r"does not see .*config.json.*mount the shared"):
        ray_runner.enter_job(config, tmp_path / "log.txt", None)
    config.parent.mkdir()
    config.write_text("{}")
    monkeypatch.setenv(ray_runner.JOB_ID_ENV, "retrain-run-old")
    with pytest.raises(RetrainError, match="no longer this run's job"):
        ray_runner.enter_job(config, tmp_path / "log.txt", {"job_id": "retrain-run-new"})


# --- Against the real head ---


def test_storage_probe_reads_what_a_job_wrote_and_remembers_it(ray_env: Cluster):
    from retrain.runs import ray_runner
    from retrain.sessions.workspace import home

    first = ray_runner.check_storage()
    assert first["address"] == ray_env.address and first["session_name"]
    # What --gpus auto needs, asked by the probe job on the cluster: no GPU, no autoscaler.
    assert first["cluster_gpus"] == 0 and first["autoscaler_resources"] is None
    assert "cluster_error" not in first
    assert not list((home() / ray_runner.PROBE_DIR).glob("*.txt"))  # the probe cleans up
    # Once per cluster session: the second check submits no job.
    from ray.job_submission import JobSubmissionClient

    before = len(JobSubmissionClient(ray_env.address).list_jobs())
    assert ray_runner.check_storage() == first
    assert len(JobSubmissionClient(ray_env.address).list_jobs()) == before


def test_storage_probe_refuses_a_cluster_that_does_not_share_the_home(
    ray_env: Cluster, monkeypatch: pytest.MonkeyPatch
):
    from retrain.errors import RetrainError
    from retrain.runs import ray_runner

    if not ray_env.head.hidden:
        pytest.skip("no private mount namespace here (needs root and unshare)")
    # The head's processes see an empty tmpfs at this path: a node without the shared volume.
    monkeypatch.setenv("RETRAIN_HOME", str(ray_env.hidden_home))
    with pytest.raises(RetrainError, match=r"does not share RETRAIN_HOME.*Mount the same"):
        ray_runner.check_storage()


def test_code_shipped_as_working_dir_or_installed_on_the_node(ray_env: Cluster, tmp_path: Path):
    """Both ways of getting the code onto the cluster run this checkout's `retrain`."""
    from retrain.runs import ray_runner

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


# --- Runs through the CLI, the seam and the page ---


def cli(*args: str, check: bool = True) -> dict:
    """Run ``python -m retrain ARGS`` as a user would; return its JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "retrain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RETRAIN_JSON_COMPACT": "1"},
    )
    if check:
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    return {"returncode": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout}


@pytest.fixture
def tiny_data(make_image_folder, keras_cache) -> Path:
    """Two classes of 16x16 images; the built-in starter model is already trained."""
    return make_image_folder(classes=("cat", "dog"), per_class=6, size=16)


def submit(data: Path, run_dir: Path, *extra: str) -> dict:
    return cli(
        "submit",
        "--data",
        str(data),
        "--base",
        "builtin:digits-cnn",
        "--out",
        str(run_dir),
        "--batch-size",
        "4",
        *extra,
    )


def epochs_of(run_dir: Path) -> list[int]:
    from retrain.runs import rundir

    return [row["epoch"] for row in rundir.read_metrics(run_dir)]


def test_local_default_imports_no_ray(tiny_data: Path, tmp_path: Path):
    """The local default (jobs, worker, CLI, the seam) submits and trains runs, reports
    and stops them, and never imports Ray."""
    submitted, trained = tmp_path / "submitted", tmp_path / "trained"
    script = f"""
import json, sys, time
from retrain.runs import jobs, runners, worker  # noqa: F401
from retrain.__main__ import main
assert runners.get_runner().name == "local"
args = ["--data", {str(tiny_data)!r}, "--base", "builtin:digits-cnn", "--epochs", "1",
        "--fine-tune-epochs", "0"]
assert main(["submit", *args, "--out", {str(submitted)!r}]) == 0
assert main(["submit", *args, "--out", {str(submitted)!r}]) == 2  # it exists: one line
assert main(["train", *args, "--out", {str(trained)!r}]) == 0  # the worker, in-process
deadline = time.time() + 120
while jobs.read_status({str(submitted)!r})["state"] in jobs.ACTIVE_STATES:
    assert time.time() < deadline
    time.sleep(0.2)
assert main(["status", {str(submitted)!r}]) == 0 and main(["stop", {str(trained)!r}]) == 0
print("RAY_IMPORTED" if "ray" in sys.modules else "NO_RAY")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RETRAIN_RUNNER", "RAY_ADDRESS")}
    env["RETRAIN_JSON_COMPACT"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "NO_RAY"
    reply = json.loads(lines[0])  # submit answers at once with exactly these keys
    assert set(reply) == {"run_dir", "runner", "job_id", "state"}
    assert reply["runner"] == "local" and reply["state"] == "queued" and int(reply["job_id"])
    assert "already exists" in proc.stderr and "choose a new --out" in proc.stderr
    status = json.loads(lines[-3])
    assert status["state"] == "done" and status["runner"] == "local" and "ray" not in status
    from retrain.runs import jobs

    assert jobs.read_status(trained)["state"] == "done"


def test_submit_trains_on_ray_and_status_watches_it_to_done(
    ray_env: Cluster, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With the default ``--gpus auto`` on this CPU-only head (no autoscaler): the job asks
    for no GPU, trains, and status says so and why."""
    monkeypatch.delenv("RETRAIN_RAY_GPUS")
    run_dir = tmp_path / "run-ray"
    reply = submit(
        tiny_data, run_dir, "--epochs", "2", "--fine-tune-epochs", "0", "--runner", "ray"
    )
    assert set(reply) == {"run_dir", "runner", "job_id", "state"}
    assert reply["runner"] == "ray" and reply["run_dir"] == str(run_dir)
    assert reply["state"] == "queued" and reply["job_id"].startswith("retrain-run-ray-")
    from retrain.runs import rundir

    record = rundir.read_runner(run_dir)
    assert record["job_id"] == reply["job_id"] and record["address"] == ray_env.address
    assert record["entrypoint"].startswith("python -m retrain train ")
    assert f"--out {run_dir}" in record["entrypoint"]
    no_gpu = "auto: the cluster has no GPU and no autoscaler node types that could add one"
    assert record["gpus"] == 0 and record["gpus_reason"] == no_gpu

    seen = set()

    def finished():
        status = cli("status", str(run_dir))
        seen.add(status["state"])
        return status if status["state"] not in ("queued", "running", "stopping") else None

    status = wait_for(finished, timeout_s=240, poll_s=1.0, what="the Ray run to finish")
    assert status["state"] == "done", status
    assert status["epochs_done"] == 2 and status["runner"] == "ray"
    assert status["gpus"] == 0 and status["gpus_reason"] == no_gpu
    # The run directory says done as the worker writes its end; Ray says so once it exited.
    status = wait_for(
        lambda: (s := cli("status", str(run_dir)))["ray"]["job_status"] != "RUNNING" and s,
        timeout_s=60,
        what="Ray to see the job end",
    )
    assert status["ray"]["job_status"] == "SUCCEEDED" and status["state"] == "done"
    assert "running" in seen  # the CLI saw it train
    assert epochs_of(run_dir) == [1, 2]
    log = rundir.read_log_tail(run_dir, 400)
    assert "epoch" in log.lower()  # the worker's output is in the run's own log too


def test_stop_a_running_ray_job_then_resume_it(ray_env: Cluster, tiny_data: Path, tmp_path: Path):
    from retrain.runs import ray_runner, rundir

    run_dir = tmp_path / "run-long"
    reply = submit(
        tiny_data, run_dir, "--epochs", "400", "--early-stopping", "0", "--runner", "ray"
    )
    wait_for(lambda: epochs_of(run_dir), timeout_s=240, what="a first epoch")
    stopped = cli("stop", str(run_dir))
    assert stopped["stop_requested"] is True and stopped["state"] in ("stopping", "done")
    wait_for(lambda: cli("status", str(run_dir))["state"] == "done", timeout_s=120, what="the stop")
    status = cli("status", str(run_dir))
    assert status["stopped"] is True and 1 <= status["epochs_done"] < 400
    # Ray: the job is over (the worker stopped itself after its batch and exited cleanly).
    view = wait_for(
        lambda: (
            (v := ray_runner.job_view(rundir.read_runner(run_dir)))["job_status"]
            in ray_runner.TERMINAL
            and v
        ),
        timeout_s=60,
        what="Ray to see the job end",
    )
    assert view["job_status"] == "SUCCEEDED" and view["job_id"] == reply["job_id"]
    done_before = epochs_of(run_dir)

    # Resume: a new Ray job for the same run directory, continuing after the last epoch.
    resumed = cli("submit", "--resume", str(run_dir))  # the run's record says ray
    assert resumed["runner"] == "ray" and resumed["job_id"] != reply["job_id"]
    assert rundir.read_runner(run_dir)["entrypoint"].endswith(f"--resume {run_dir}") or (
        f"--resume {run_dir}" in rundir.read_runner(run_dir)["entrypoint"]
    )
    wait_for(lambda: len(epochs_of(run_dir)) > len(done_before), timeout_s=240, what="a new epoch")
    cli("stop", str(run_dir))
    wait_for(lambda: cli("status", str(run_dir))["state"] == "done", timeout_s=120, what="stop")
    epochs = epochs_of(run_dir)
    assert epochs == list(range(1, len(epochs) + 1))  # each epoch exactly once, in order
    assert epochs[: len(done_before)] == done_before


def test_a_job_waiting_for_a_gpu_shows_it_and_stops_without_training(
    ray_env: Cluster, tiny_data: Path, tmp_path: Path
):
    """The head has no GPU: a run asking for one waits in Ray's queue; stop ends it."""
    from retrain.runs import jobs, ray_runner, rundir

    run_dir = tmp_path / "run-gpu"
    reply = submit(tiny_data, run_dir, "--epochs", "1", "--runner", "ray", "--gpus", "1")
    assert reply["state"] == "queued"
    status = wait_for(
        lambda: (s := jobs.read_status(run_dir)).get("waiting") and s, what="Ray's PENDING"
    )
    assert status["state"] == "queued"
    assert status["waiting"] == "waiting for a free GPU on the cluster"
    assert status["cluster_waiting"] >= 1 and status["ray"]["job_status"] == "PENDING"
    stopped = cli("stop", str(run_dir))
    assert stopped["state"] == "done" and stopped["ray_stop_job"] is True
    status = cli("status", str(run_dir))
    assert status["state"] == "done" and status["stopped"] is True
    assert status["epochs_done"] == 0 and rundir.stop_requested(run_dir)
    # Should Ray start it later anyway (Ray 2.60 does not cancel a job waiting for
    # resources), its worker reads the stop request first and trains nothing.
    assert ray_runner.job_view(rundir.read_runner(run_dir))["job_status"] == "PENDING"


def test_a_job_that_dies_on_the_cluster_is_failed_with_its_last_log_line(
    ray_env: Cluster, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """E.g. the nodes have no such interpreter: Ray fails the job before any worker runs."""
    from retrain.runs import ray_runner, runners

    ray_runner.check_storage()  # a good probe first (remembered for this home) ...
    monkeypatch.setenv("RETRAIN_RAY_PYTHON", "/opt/no-such-python")  # ... then a bad node setup
    with pytest.raises(ray_runner.ClusterError, match=r"probe.*Check that the nodes run '/opt/no"):
        ray_runner.check_storage(reuse=False)
    run_dir = tmp_path / "run-dies"
    submit(tiny_data, run_dir, "--epochs", "1", "--runner", "ray")
    status = wait_for(
        lambda: (s := cli("status", str(run_dir)))["state"] == "failed" and s,
        timeout_s=60,
        what="the failed job",
    )
    assert status["error"].startswith("The Ray job retrain-run-dies-")
    assert "failed: " in status["error"] and "/opt/no-such-python" in status["error"]
    assert status["ray"]["job_status"] == "FAILED" and status["resumable"] is False
    # The worker never ran, so the run's own log is empty: the runner shows Ray's copy.
    assert "/opt/no-such-python" in runners.runner_for(run_dir).logs(run_dir)


APP = str(ROOT / "app.py")


@pytest.fixture
def page_session(tmp_path: Path, tiny_data: Path) -> dict:
    from retrain import data

    workspace = tmp_path / "ws"
    workspace.mkdir()
    dataset = data.ingest(tiny_data, workspace)
    return {"workspace": workspace, "manifest": str(dataset.manifest_path)}


def train_page(session: dict, run_id: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("pages/train.py")
    at.session_state["workspace"] = session["workspace"]
    at.session_state["dataset"] = session["manifest"]
    at.session_state["base"] = "builtin:digits-cnn"
    at.session_state["surgery"] = {"freeze": "all"}  # the starter model's suggested cut
    if run_id:
        at.session_state["run_id"] = run_id
    return at


def page_text(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    for kind in ("success", "error", "warning", "info"):
        parts += [str(el.value) for el in getattr(at, kind)]
    return "\n".join(parts)


def test_train_page_starts_and_watches_a_ray_run(ray_env: Cluster, page_session: dict):
    from retrain.runs import rundir

    at = train_page(page_session)
    at.session_state["train_more_fine_tune"] = True  # its expander, opened
    at.run()
    assert not at.exception
    at.number_input(key="epochs").set_value(2)
    at.number_input(key="fine_tune_epochs").set_value(0)
    at.button(key="start_training").click().run()
    assert not at.exception, at.exception
    run_id = at.session_state["run_id"]
    run_dir = page_session["workspace"] / "runs" / run_id
    assert rundir.read_runner(run_dir)["runner"] == "ray"

    def done():
        at.run()
        assert not at.error, [e.value for e in at.error]
        return "Done" in page_text(at)

    wait_for(done, timeout_s=240, poll_s=1.0, what="the page to show the run done")
    assert not at.exception
    assert "the model that Evaluate and Export use" in page_text(at)
    charts = {chart.key for chart in at.get("plotly_chart")}
    assert {"train_loss_chart", "train_accuracy_chart"} <= charts  # (+ the lr finder's curve)
    assert epochs_of(run_dir) == [1, 2]


def test_train_page_shows_a_run_waiting_for_a_gpu_and_stops_it(
    ray_env: Cluster, page_session: dict, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("RETRAIN_RAY_GPUS", "1")  # the head has none: Ray keeps it waiting
    at = train_page(page_session).run()
    at.number_input(key="epochs").set_value(1)
    at.button(key="start_training").click().run()

    def waiting():
        at.run()
        return "Waiting for a free GPU on the cluster" in page_text(at)

    wait_for(waiting, timeout_s=60, poll_s=1.0, what="the page to show the GPU wait")
    at.button(key="stop_training").click().run()
    at.run()
    assert "Stopped." in page_text(at) and not at.exception


def test_head_killed_mid_run_shows_interrupted_then_resume_continues(
    ray_env: Cluster, page_session: dict, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
):
    """Runs last in this module: it kills the module's head and starts the next one."""
    import psutil

    from retrain.runs import jobs, rundir

    run_dir = page_session["workspace"] / "runs" / "run-kill"
    # 400 epochs and no early stopping: the run is certainly still training when the head dies.
    submit(tiny_data, run_dir, "--epochs", "400", "--early-stopping", "0", "--runner", "ray")
    wait_for(lambda: epochs_of(run_dir), timeout_s=240, what="a first epoch")
    pid = rundir.read_status_file(run_dir)["pid"]

    ray_env.head.kill()  # the whole head at once, as when its machine goes away
    status = cli("status", str(run_dir))
    assert status["state"] == "interrupted", status
    assert status["error"].startswith(f"Lost the Ray cluster at {ray_env.address}")
    assert "resume" in status["error"] and status["resumable"] is True
    assert status["ray"]["reachable"] is False
    # The worker does not go on alone: it ends with its job's supervisor.
    wait_for(lambda: not psutil.pid_exists(pid), timeout_s=30, what="the orphaned worker to end")
    finished = epochs_of(run_dir)
    time.sleep(1.5)
    assert epochs_of(run_dir) == finished  # nothing writes the run any more
    assert jobs.read_status(run_dir)["state"] == "interrupted"

    ray_env.restart()
    monkeypatch.setenv("RAY_ADDRESS", ray_env.address)
    at = train_page(page_session, "run-kill").run()
    assert not at.exception
    assert "Lost the Ray cluster" in page_text(at)  # the old head is gone for good
    at.button(key="resume_training").click().run()
    assert not at.exception, at.exception
    record = rundir.read_runner(run_dir)
    assert record["address"] == ray_env.address
    wait_for(lambda: len(epochs_of(run_dir)) > len(finished), timeout_s=240, what="a resumed epoch")
    cli("stop", str(run_dir))
    wait_for(lambda: cli("status", str(run_dir))["state"] == "done", timeout_s=120, what="stop")
    epochs = epochs_of(run_dir)
    assert epochs[: len(finished)] == finished  # continued from the last finished epoch
    assert epochs == list(range(1, len(epochs) + 1))
