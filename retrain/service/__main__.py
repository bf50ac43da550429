"""``python -m retrain.service [--wait | --stop]``: start (or stop) this host's model workers.

A server's start script runs it before ``streamlit run`` (the Dockerfile and ``make run`` do),
so no visitor waits for TensorFlow to load; with ``--wait`` it returns once every worker is
warm. Prints the workers as JSON. Pages start them on first need anyway.

Workers outlive a web server on purpose (another replica on the same home keeps using them);
``--stop`` ends them: ``make run`` does when its server stops (Ctrl-C). Prints
``{"stopped": N}``.
"""

from __future__ import annotations

import json
import sys
import time

from retrain.service import pool


def main(argv: list[str]) -> int:
    if "--stop" in argv:
        print(json.dumps({"stopped": pool.stop_workers()}))
        return 0
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
