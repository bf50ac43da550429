"""Sessions: the home folder, one workspace per browser session, and what a visitor may do.

Where things happen:

- ``workspace``  where files live: the home folder, session workspaces, JSON helpers
- ``uploads``    saving an uploaded file: one rule for its name, one hash for its folder
- ``quotas``     per-session limits on a public host: disk, uploads per minute, runs
- ``share``      share links: a read-only snapshot of one finished run

Import the modules themselves (``from retrain.sessions import workspace``); nothing is
re-exported here. `workspace` is the bottom of the library: it imports only `retrain.errors`.
"""
