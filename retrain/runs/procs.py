"""Process identity: is a worker still the process it was (pid reuse included)?

The lowest layer of the run machinery: the worker records its pid and start time
(`own_start_time`), and whoever watches a run (`retrain.runs.jobs`) asks `process_alive`.
"""

from __future__ import annotations


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie); with ``started``, also that it is the same
    process (its start time matches), so a reused pid is not mistaken for the worker."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not (started and abs(proc.create_time() - float(started)) > 2.0)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def own_start_time() -> float | None:
    """This process's start time (seconds since the epoch), as `process_alive` compares it."""
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None
