"""Submitting runs to Ray vs the local runner: latency, and many runs at once on a small head.

    python bench/ray_submit.py [--repeats 3] [--concurrent 6] [--epochs 2]

Starts a real local Ray head on loopback (tests/ray_fixtures.py: 2 CPUs, no GPU), then:

1. submit-to-first-epoch latency: the same run (the built-in starter model on the built-in
   digits sample, 1 CPU) started through the ``local`` runner and through the ``ray`` runner,
   ``--repeats`` times each, one at a time; the time from ``start`` to the first line of
   ``metrics.jsonl``, and, for Ray, to the job's start (PENDING -> RUNNING). The storage probe
   (once per cluster session) is timed on its own.
2. ``--concurrent`` runs submitted at once to the 2-CPU head, 1 CPU each: polls every run's
   status every 0.5 s; reports how many trained at once (at most 2), how many were seen
   waiting ("waiting for free CPUs on the cluster"), and whether all finished with every
   epoch recorded (none lost).

Prints one JSON object; numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ray_fixtures import RayHead  # noqa: E402


def first_epoch_seconds(run_dir: Path, started: float, timeout_s: float = 600) -> float:
    from retrain.runs import jobs, rundir

    while time.monotonic() - started < timeout_s:
        if rundir.read_metrics(run_dir):
            return time.monotonic() - started
        state = jobs.read_status(run_dir)["state"]
        if state in ("failed", "interrupted"):
            raise RuntimeError(f"{run_dir}: {jobs.read_status(run_dir)}")
        time.sleep(0.1)
    raise RuntimeError(f"{run_dir}: no epoch after {timeout_s} s")


def wait_done(run_dirs: list[Path], timeout_s: float = 900) -> None:
    from retrain.runs import jobs

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [jobs.read_status(r)["state"] for r in run_dirs]
        if all(s not in jobs.ACTIVE_STATES for s in states):
            return
        time.sleep(0.5)
    raise RuntimeError("runs did not finish")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="retrain-bench-ray-"))
    os.environ["RETRAIN_HOME"] = str(home)
    os.environ.update({"RETRAIN_RAY_GPUS": "0", "RETRAIN_RAY_CPUS": "1"})
    from retrain.data import sample
    from retrain.runs import jobs, ray_runner, rundir, runners
    from retrain.training.config import TrainConfig

    workspace = home / "bench"
    data = sample.sample_dataset(workspace)
    config = TrainConfig(data=str(data), base="builtin:digits-cnn", epochs=args.epochs)
    # Train the starter model once, so no run pays for it.
    from retrain import models

    models.ensure_builtin("digits-cnn")

    head = RayHead(num_cpus=2).start()
    os.environ["RAY_ADDRESS"] = head.address
    result: dict = {"head_start_s": round(head.start_seconds, 1), "epochs": args.epochs}
    try:
        started = time.monotonic()
        ray_runner.check_storage()
        result["storage_probe_s"] = round(time.monotonic() - started, 2)

        latency: dict[str, list[float]] = {"local": [], "ray": []}
        job_start: list[float] = []
        for i in range(args.repeats):
            for name in ("local", "ray"):
                run_dir = workspace / "runs" / f"latency-{name}-{i}"
                started = time.monotonic()
                reply = runners.get_runner(name).start(config, workspace, run_dir=run_dir)
                if name == "ray":
                    record = rundir.read_runner(run_dir)
                    while ray_runner.job_view(record).get("job_status") == "PENDING":
                        time.sleep(0.05)
                    job_start.append(time.monotonic() - started)
                latency[name].append(first_epoch_seconds(run_dir, started))
                wait_done([run_dir])
                assert jobs.read_status(run_dir)["state"] == "done", reply
        result["submit_to_first_epoch_s"] = {
            name: {"median": round(statistics.median(v), 2), "all": [round(x, 2) for x in v]}
            for name, v in latency.items()
        }
        result["ray_submit_to_job_running_s"] = {
            "median": round(statistics.median(job_start), 2),
            "all": [round(x, 2) for x in job_start],
        }

        # N runs at once on the 2-CPU head, 1 CPU each.
        run_dirs = [workspace / "runs" / f"many-{i}" for i in range(args.concurrent)]
        started = time.monotonic()
        ray = runners.get_runner("ray")
        for run_dir in run_dirs:
            ray.start(config, workspace, run_dir=run_dir)
        submitted_s = time.monotonic() - started
        most_running, waiting_seen, samples = 0, set(), []
        while True:
            statuses = [jobs.read_status(r) for r in run_dirs]
            views = [s.get("ray", {}).get("job_status") for s in statuses]
            running = sum(1 for v in views if v == "RUNNING")
            most_running = max(most_running, running)
            for r, s in zip(run_dirs, statuses, strict=True):
                if s.get("waiting"):
                    waiting_seen.add(r.name)
            samples.append((round(time.monotonic() - started, 1), running, views.count("PENDING")))
            if all(s["state"] not in jobs.ACTIVE_STATES for s in statuses):
                break
            time.sleep(0.5)
        total_s = time.monotonic() - started
        finished = [jobs.read_status(r) for r in run_dirs]
        epochs = [len(rundir.read_metrics(r)) for r in run_dirs]

        def ray_states() -> list:
            return [ray_runner.job_view(rundir.read_runner(r)).get("job_status") for r in run_dirs]

        ray_at_done = ray_states()  # Ray lags the run directory by the worker's exit
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            s in ray_runner.TERMINAL for s in ray_states()
        ):
            time.sleep(0.5)
        ray_final = ray_states()
        result["concurrent"] = {
            "runs": args.concurrent,
            "head_cpus": 2,
            "cpus_per_run": 1,
            "submit_all_s": round(submitted_s, 2),
            "all_done_s": round(total_s, 1),
            "states": [s["state"] for s in finished],
            "ray_states_when_runs_done": ray_at_done,
            "ray_states": ray_final,
            "epochs_recorded": epochs,
            "most_running_at_once": most_running,
            "runs_seen_waiting": len(waiting_seen),
            "timeline_every_5s": [s for s in samples if int(s[0] * 2) % 10 == 0][:40],
        }
    finally:
        head.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
