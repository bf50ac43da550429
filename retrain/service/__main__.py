"""``python -m retrain.service [--wait]``: start this host's model workers now.

A server's start script runs it before ``streamlit run`` (the Dockerfile and ``make run`` do),
so no visitor waits for TensorFlow to load; with ``--wait`` it returns once every worker is
warm. Prints the workers as JSON. Pages start them on first need anyway.
"""

from __future__ import annotations

import json
import sys
import time

from retrain.service import pool


def main(argv: list[str]) -> int:
    wait = "--wait" in argv
    workers = pool.ensure_workers()
    deadline = time.time() + 300
    while wait and time.time() < deadline:
        workers = pool.live_workers()
        if workers and all("ready" in w for w in workers):
            break
        time.sleep(0.5)
    print(json.dumps({"workers": workers}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
