"""The Python side of Postgres' background worker (extension/supervisor.c, ``shared_preload_libraries``).

The background worker runs ``python -m pgturso run`` with the connection in libpq's ``PG*`` variables, the
target in ``PGTURSO_TARGET`` and its own pid in ``PGTURSO_BACKGROUND_WORKER``. Before delivering, the
process waits for what a fresh setup may not have yet: the database, ``CREATE EXTENSION pgturso`` in it, and
the named target. It retries quietly: one log line each time the reason changes, not one per attempt.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import psycopg

from .common.logs import event
from .common.postgres import connect

log = logging.getLogger("pgturso.background")

ENVIRONMENT = "PGTURSO_BACKGROUND_WORKER"
CHECK_EVERY_SECONDS = 2.0


def started_by_postgres() -> bool:
    return bool(os.environ.get(ENVIRONMENT))


def not_ready_reason(dsn: str, target: str) -> str | None:
    """Why this database cannot be delivered from yet (and what makes it ready), or None once it can."""
    try:
        with connect(dsn, autocommit=True, application_name="pgturso-worker", connect_timeout=10) as conn:
            if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pgturso'").fetchone() is None:
                return "pgturso is not installed in this database yet (CREATE EXTENSION pgturso CASCADE)"
            if target != "default" and conn.execute(
                    "SELECT 1 FROM pgturso.target WHERE name = %s", (target,)).fetchone() is None:
                return f"there is no target named {target!r} yet (SELECT pgturso.add_target('{target}', …))"
    except psycopg.OperationalError as exc:  # no such database yet, or the server is not accepting connections
        return str(exc).strip()
    return None


def wait_until_ready(dsn: str, target: str) -> bool:
    """Wait until the database can be delivered from; False if stopped (SIGTERM) while waiting."""
    stopped = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopped
        stopped = True

    previous = signal.signal(signal.SIGTERM, stop)
    # A reload while waiting changes nothing here (the settings are read once ready); the worker's own SIGHUP
    # handler replaces this one.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logged = None
    try:
        while not stopped:
            reason = not_ready_reason(dsn, target)
            if reason is None:
                if logged is not None:
                    event(log, logging.INFO, "ready", target=target)
                return True
            if reason != logged:
                event(log, logging.INFO, "waiting", target=target, reason=reason,
                      retrying_every_s=CHECK_EVERY_SECONDS)
                logged = reason
            deadline = time.monotonic() + CHECK_EVERY_SECONDS
            while not stopped and time.monotonic() < deadline:
                time.sleep(0.1)
        return False
    finally:
        signal.signal(signal.SIGTERM, previous)
