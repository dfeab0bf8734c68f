"""The pgoutput format pgturso reads from a wal target's slot: the one place that names the plugin's options
(publications, protocol version) and the row-change messages' layout.

The worker's readers (slot.py, replication.py) import it; so does extension/build.py, which substitutes
``@PGOUTPUT_TABLES_OPTIONS@`` and ``@PGOUTPUT_ROW_CHANGE_RELID(expr)@`` into the extension's SQL
(pgturso._slot_holds_nothing_for, status's look into a slot). Pure Python without dependencies: the build runs
it with the system's python3.
"""

from __future__ import annotations

# The publications the extension creates (extension/sql/01_catalog--0.2.0.sql): the wal targets' tables (their
# rows' changes) and pgturso.outbox (DDL, copies, repairs, TRUNCATE: the events of every target).
TABLES_PUBLICATION = "pgturso_tables"
OUTBOX_PUBLICATION = "pgturso_outbox"
PUBLICATIONS = f"{TABLES_PUBLICATION},{OUTBOX_PUBLICATION}"
PROTO_VERSION = 1

# Message kinds (their first byte). slot.py's hot loops compare with their literals instead (66, 67, 73, 85, 68:
# a global's lookup per message counts at ~100k messages/s).
BEGIN, COMMIT, RELATION, INSERT, UPDATE, DELETE, TRUNCATE = b"BCRIUDT"
ROW_CHANGES = (INSERT, UPDATE, DELETE)
# Insert, Update and Delete name their relation's oid right after the kind: a big-endian uint32 at bytes 1-4 (a
# partition's change is published as its root's: publish_via_partition_root).
RELID_AT = 1


def _options(publications: str) -> list[tuple[str, str]]:
    return [("proto_version", str(PROTO_VERSION)), ("publication_names", publications)]


def peek_options_sql(publications: str) -> str:
    """The plugin's options as the trailing arguments of pg_logical_slot_peek_binary_changes."""
    return ", ".join(f"'{name}', '{value}'" for name, value in _options(publications))


def replication_options_sql(publications: str) -> str:
    """The plugin's options as START_REPLICATION ... LOGICAL's option list (without its parentheses)."""
    return ", ".join(f"{name} '{value}'" for name, value in _options(publications))


def row_change_relid_sql(data: str) -> str:
    """SQL: the relation oid (int8) of the pgoutput message ``data`` (a bytea expression) when it is an Insert,
    Update or Delete; NULL for any other message."""
    kinds = ", ".join(str(kind) for kind in ROW_CHANGES)
    relid = " | ".join(f"(get_byte({data}, {RELID_AT + n})::int8 << {24 - 8 * n})" for n in range(4))
    return f"CASE WHEN get_byte({data}, 0) IN ({kinds}) THEN {relid} END"
