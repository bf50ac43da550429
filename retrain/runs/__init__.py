"""Runs: where training runs live and how they are started, watched, stopped and resumed.

Where things happen:

- ``rundir``      the run directory: every file a run writes, and the one way to read each
- ``jobs``        runs as local worker processes: start, queue, status, stop, resume
- ``runners``     where runs train: the ``local`` or ``ray`` runner behind one interface
- ``ray_runner``  runs as Ray jobs on a Ray cluster
- ``worker``      the worker's entry (``python -m retrain train``): take a slot, then train
- ``procs``       process identity: is a worker still the process it was

Import the modules themselves (``from retrain.runs import jobs, rundir``); nothing is
re-exported here. None of these modules imports an ML framework at import time.
"""
