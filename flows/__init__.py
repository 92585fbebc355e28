"""Prefect flows over the DVC pipeline (pipeline.py), their process supervision (supervisor.py) and work pools
(pools.py).

Prefect reads its settings when it is imported, so the one default changed here is set before any flow module
imports it: the ephemeral server (what `python -m flows.pipeline` starts when no PREFECT_API_URL is set) may take
longer than Prefect's default 20 s to start on a loaded box, and a run then fails before its first stage. And the
server's analytics are off: they phone home (nothing to reach offline), and their heartbeat raced the flow for the
ephemeral server's SQLite file ("database is locked", a traceback in the flow's log).
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
