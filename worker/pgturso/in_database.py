"""``SELECT pgturso.sync()``: one delivery pass run inside Postgres, with the worker's own code.

The PL/Python function imports this module; it connects back to the same database (psycopg, over the
server's Unix socket unless a DSN is given) and runs ``Worker.run(once=True)``: the same code path as
``pgturso-worker run --once``, the same advisory lock (a pass while a worker is delivering does nothing), the
same marker. Settings come from ``pgturso.*`` and the server's ``PGTURSO_*`` environment. Needs psycopg and
requests in the server's Python (Debian: python3-psycopg, python3-requests); ``file:`` targets also need
pyturso there.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from .common.settings import POSTGRESQL_CONF_NAMES, resolve
from .run.worker import EXIT_LOCKED, EXIT_OK, Worker


class _PlpyHandler(logging.Handler):
    def __init__(self, plpy: Any) -> None:
        super().__init__()
        self.plpy = plpy

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {"msg": record.getMessage()}
        line = "pgturso: " + " ".join(f"{k}={v}" for k, v in fields.items())
        (self.plpy.warning if record.levelno >= logging.WARNING else self.plpy.log)(line)


def own_dsn(plpy: Any) -> str:
    """A libpq DSN for this database over the first Unix socket directory, as the current user."""
    row = plpy.execute(
        "SELECT split_part(current_setting('unix_socket_directories'), ',', 1) AS host, "
        "current_setting('port') AS port, current_database() AS db, current_user AS usr"
    )[0]
    parts = {"host": row["host"].strip(), "port": row["port"], "dbname": row["db"], "user": row["usr"]}
    return " ".join(f"{k}='{str(v).replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"
                    for k, v in parts.items())


# Tables of the target being copied on which this backend holds more than the ACCESS SHARE lock a read takes
# (a write, SELECT FOR UPDATE/SHARE, LOCK TABLE): a copy chunk's FOR SHARE would wait for this transaction.
LOCKED_COPIES = """
    SELECT string_agg(DISTINCT t.relid::regclass::text, ', ') AS tables
    FROM pgturso.tracked_table t
    WHERE t.target = $1 AND t.copy_state = 'copying' AND t.dropped_at IS NULL
      AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                  WHERE l.pid = pg_catalog.pg_backend_pid() AND l.mode <> 'AccessShareLock'
                    AND l.relation IN (SELECT t.relid UNION SELECT relid FROM pg_catalog.pg_partition_tree(t.relid)))
"""


def tables_being_copied_and_locked(plpy: Any, target: str) -> str | None:
    """The target's tables with a copy pending that this transaction holds a lock on (see LOCKED_COPIES)."""
    rows = plpy.execute(plpy.prepare(LOCKED_COPIES, ["text"]), [target])
    return rows[0]["tables"] if rows else None


# pgturso's own tables (but the outbox) that this transaction has written or locked for writing
# (skip_transaction, resync_table, DDL on a tracked table, ...). A pass on another connection reads them as
# they were before this transaction and may update or delete the same rows (the events skip_transaction
# deleted, the state it recorded): it would wait for this transaction, which waits for it. Captures only
# insert into the outbox, which a pass never waits for, so the outbox is left out.
WRITTEN_CATALOG = """
    SELECT string_agg(DISTINCT c.relname, ', ' ORDER BY c.relname) AS tables
    FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_class c ON c.oid = l.relation
    WHERE l.pid = pg_catalog.pg_backend_pid() AND l.mode <> 'AccessShareLock' AND c.relkind = 'r'
      AND c.relnamespace = 'pgturso'::regnamespace AND c.relname <> 'outbox'
"""


def pgturso_tables_written(plpy: Any) -> str | None:
    """pgturso's tables this transaction wrote that a delivery pass could wait on (see WRITTEN_CATALOG)."""
    rows = plpy.execute(WRITTEN_CATALOG)
    return rows[0]["tables"] if rows else None


def sync(plpy: Any, dsn: str | None = None, url: str | None = None, target: str | None = None) -> int:
    """Deliver what is committed; returns the number of outbox events delivered (0 if another worker runs)."""
    names = POSTGRESQL_CONF_NAMES
    rows = plpy.execute(plpy.prepare("SELECT name, current_setting(name, true) AS value FROM unnest($1) AS name",
                                     ["text[]"]), [names])
    from_conf = {r["name"]: r["value"] for r in rows if r["value"] is not None}
    settings = resolve(from_conf, os.environ, {"url": url, "target": target})
    written = pgturso_tables_written(plpy)
    if written:
        plpy.notice(f"pgturso: this pass did nothing: this transaction changed pgturso's own tables ({written}), "
                    "which a delivery pass would wait for while this transaction waits for the pass; call "
                    "pgturso.sync() after COMMIT")
        return 0
    logger = logging.getLogger("pgturso")
    handler = _PlpyHandler(plpy)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if settings.log_level == "info" else settings.log_level.upper())
    logger.propagate = False
    try:
        worker = Worker(dsn or own_dsn(plpy), settings)
        worker.read_ahead = False  # no threads inside a Postgres backend
        worker.identity = f"pgturso.sync() in backend {os.getpid()} on {socket.gethostname()}"
        held = tables_being_copied_and_locked(plpy, settings.target)
        if held:
            # The pass runs on another connection, and this backend waits for it: a copy chunk (which locks
            # its rows FOR SHARE) would wait for this transaction's locks forever, an undetectable deadlock.
            worker.copy_enabled = False
            plpy.notice(f"pgturso: the copy of {held} is left for a later pass: this transaction holds a lock on "
                        "it that the copy would wait for; call pgturso.sync() after COMMIT to copy it")
        code = worker.run(once=True)
    finally:
        logger.removeHandler(handler)
    if code == EXIT_LOCKED:
        plpy.notice("pgturso: another worker is delivering; this pass did nothing")
        return 0
    if code != EXIT_OK:
        plpy.error(f"pgturso: delivery failed (exit code {code}); see the server log and pgturso.status",
                   hint="SELECT * FROM pgturso.status shows the last error and what to fix.")
    return worker.events_delivered
