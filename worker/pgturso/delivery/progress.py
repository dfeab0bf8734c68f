"""The progress marker that makes delivery exactly-once.

Every delivery writes, in the same Turso transaction as the data, which outbox events it carried into the
target's ``_pgturso_progress`` table: the batch's name (``outbox.Batch.marker()``: its last id, snapshot,
held transactions and tables). The worker deletes those events from the outbox only after the commit; if it
dies in between, the next start reads the marker and deletes them then, instead of sending them again. A
batch's name never matches a later event (outbox.py says why), so an old marker is harmless — on the server
whose past it describes: the marker also records that server's position (system, timeline, WAL position), and
a worker whose source does not have that position in its history (a standby promoted before it replayed what
was delivered) forgets nothing by it and resyncs instead (run/recovery.py MarkerRecovery._start_over,
docs/design.md).

The marker is also a fence: a worker writes it only over the marker it last saw. A worker that lost the
delivery lock (its Postgres connection died while a batch was in flight) and whose batch reaches Turso after
another worker delivered cannot commit it, so batches from two workers can never interleave on the target.
"""

from __future__ import annotations

from ..common.quoting import quote_ident
from .statements import Statement

MARKER_TABLE = "_pgturso_progress"

CREATE_MARKER_SQL = (
    f"CREATE TABLE IF NOT EXISTS {quote_ident(MARKER_TABLE)} ("
    "source_id TEXT PRIMARY KEY, applied_ids TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
READ_MARKER_SQL = f"SELECT applied_ids FROM {quote_ident(MARKER_TABLE)} WHERE source_id = ?"
# Whether the marker table exists, read without writing: a fresh database (a new tenant's file) gets the table in
# its first batch's transaction instead of a transaction of its own (one commit and its fsyncs fewer per new
# database; the fence is the same: another worker's marker written meanwhile still fails the check).
MARKER_TABLE_EXISTS_SQL = f"SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '{MARKER_TABLE}'"
# Written only over the marker this worker last saw (its fence): if another worker delivered to this target
# in between, nothing is written and the check below fails the whole Turso transaction.
WRITE_MARKER_SQL = (
    f"INSERT INTO {quote_ident(MARKER_TABLE)} (source_id, applied_ids, applied_at) "
    "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) "
    "ON CONFLICT (source_id) DO UPDATE SET applied_ids = excluded.applied_ids, applied_at = excluded.applied_at "
    f"WHERE {quote_ident(MARKER_TABLE)}.applied_ids = ?"
)
# SQLite has no RAISE outside triggers: json() of a non-JSON text is the portable way to fail a statement.
CHECK_MARKER_SQL = "SELECT CASE WHEN changes() = 1 THEN 1 ELSE json('pgturso: the progress marker moved') END"
CHECK_MARKER_OPERATION = "progress marker check"


def marker_statements(source_id: str, batch_marker: str, previous: str, *, create: bool = False) -> list[Statement]:
    """Write the batch's marker over ``previous`` (the marker this worker read or wrote last; "" for none),
    and fail the transaction if the marker on the target was not that one. ``create``: the target had no marker
    table when the worker recovered; it is created in this transaction (IF NOT EXISTS: another worker may have
    created it meanwhile, and then its marker, if any, fails the check)."""
    return [
        *([Statement(CREATE_MARKER_SQL, table=MARKER_TABLE, operation="create")] if create else []),
        Statement(WRITE_MARKER_SQL, (source_id, batch_marker, previous)),
        Statement(CHECK_MARKER_SQL, table=MARKER_TABLE, operation=CHECK_MARKER_OPERATION),
    ]
