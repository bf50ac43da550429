"""A real local Ray head on loopback, for the Ray runner's tests and bench/ray_submit.py.

`RayHead.start()` runs ``ray start --head --block`` as a subprocess in its own process group,
on free loopback ports, with a small object store, and waits until the Jobs API answers.
`RayHead.stop()` kills it by its process id (the whole process group), then any process left
that names this head's private temp folder (Ray's workers and job drivers), then removes the
folder. The head's environment is what a cluster image gives its nodes: this checkout's
virtual environment first on PATH (so ``python`` is the project's interpreter) and the
checkout on PYTHONPATH (the project "installed" on the node).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB


def ray_installed() -> bool:
    """Whether Ray (with its `ray` command) is installed in this interpreter's environment."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return RAY_BIN.is_file()


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def can_hide() -> bool:
    """Whether a private mount namespace with a tmpfs can be made here (root + unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs x /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


class RayHead:
    """One local Ray head node (GCS, raylet, dashboard with the Jobs API) on loopback."""

    def __init__(self, num_cpus: int = 2, num_gpus: int = 0, hide: Path | None = None) -> None:
        """``hide``: a folder that this head's processes must not see (an empty tmpfs is
        mounted over it in a private mount namespace, like a Ray node that lacks a shared
        volume). Needs ``unshare`` and root; `hidden` says whether it worked."""
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.hide = hide
        self.hidden = False
        self.proc: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self.address = ""
        self.log_path: Path | None = None
        self.start_seconds = 0.0

    def start(self, timeout_s: float = 180.0) -> RayHead:
        """Start the head and wait until its Jobs API answers; return self."""
        # Ray's unix sockets live under its temp dir, whose path must stay short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rtray-", dir="/tmp"))
        gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
        self.address = f"http://127.0.0.1:{dash}"
        env = dict(os.environ)
        env.update(
            {
                "PATH": os.pathsep.join([str(RAY_BIN.parent), env.get("PATH", "")]),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
                ),
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        env.pop("RAY_ADDRESS", None)
        command = [
            str(RAY_BIN),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.hide is not None and can_hide():
            Path(self.hide).mkdir(parents=True, exist_ok=True)
            # `unshare` and `sh` exec in place: the head keeps the pid (and group) we start.
            script = f"mount -t tmpfs retrain-hidden {shlex.quote(str(self.hide))} && exec "
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c"] + [
                script + shlex.join(command)
            ]
            self.hidden = True
        self.log_path = self.temp_dir / "head.log"
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.temp_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills all of it
            )
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{tail}")
            if self._jobs_api_answers():
                self.start_seconds = time.monotonic() - started
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Ray head did not answer within {timeout_s:.0f} s")

    def _jobs_api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=2) as reply:
                json.loads(reply.read())
                return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        """Kill the head's whole process group at once (SIGKILL): the head "goes away"."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Kill the head by its process id (process group), then what is left of this head's
        processes (they name its private temp folder), then remove the folder."""
        self.kill()
        if self.temp_dir is not None:
            self._kill_leftovers(str(self.temp_dir))
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    @staticmethod
    def _kill_leftovers(marker: str, grace_s: float = 10.0) -> None:
        import psutil

        deadline = time.monotonic() + grace_s
        while True:
            left = []
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if any(marker in part for part in proc.info["cmdline"] or ()):
                        left.append(proc)
                except (psutil.Error, TypeError):
                    continue
            if not left:
                return
            for proc in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
