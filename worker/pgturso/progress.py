"""The progress marker that makes delivery exactly-once.

Every delivery writes, in the same Turso transaction as the data, which outbox events it carried into the
target's ``_pgturso_progress`` table: the batch's name (``outbox.Batch.marker()``: its last id, snapshot,
held transactions and tables). The worker deletes those events from the outbox only after the commit; if it
dies in between, the next start reads the marker and deletes them then, instead of sending them again. A
batch's name never matches a later event (outbox.py says why), so an old marker is harmless.
"""

from __future__ import annotations

from .quoting import quote_ident
from .statements import Statement

MARKER_TABLE = "_pgturso_progress"

CREATE_MARKER_SQL = (
    f"CREATE TABLE IF NOT EXISTS {quote_ident(MARKER_TABLE)} ("
    "source_id TEXT PRIMARY KEY, applied_ids TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
READ_MARKER_SQL = f"SELECT applied_ids FROM {quote_ident(MARKER_TABLE)} WHERE source_id = ?"
WRITE_MARKER_SQL = (
    f"INSERT INTO {quote_ident(MARKER_TABLE)} (source_id, applied_ids, applied_at) "
    "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) "
    "ON CONFLICT (source_id) DO UPDATE SET applied_ids = excluded.applied_ids, applied_at = excluded.applied_at"
)


def marker_statement(source_id: str, batch_marker: str) -> Statement:
    return Statement(WRITE_MARKER_SQL, (source_id, batch_marker))
