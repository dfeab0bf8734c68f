"""The deletion generation (pgturso.outbox_deletion): every call that deletes pending outbox events besides
delivery records itself in its own transaction, so that a snapshot sees the record exactly when it sees the
deletion. A worker that read a batch ahead sends it as read only if the count is unchanged (docs/design.md,
"Counted once"); these attack that visibility from concurrent sessions at every isolation level."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from test_security import login_role

GENERATION = "SELECT count(*) FROM pgturso.outbox_deletion"
ISOLATIONS = ["read committed", "repeatable read", "serializable"]


def generation(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute(GENERATION).fetchone()[0])  # type: ignore[index]


def pending_of(conn: psycopg.Connection[Any], table: str) -> int:
    """The table's pending row changes (its creation's event aside, which no skip drops)."""
    return int(conn.execute("SELECT count(*) FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id "
                            "JOIN pgturso.tracked_table t ON t.id = l.table_id "
                            "WHERE t.relid = %s::regclass AND o.op = 'U'",
                            (table,)).fetchone()[0])  # type: ignore[index]


def two_pending_transactions(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """Table t tracked (no worker), two committed transactions of it pending; their txids."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    txids = []
    for i in (1, 2):
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (%s, 'x'), (%s, 'y')", (i * 10, i * 10 + 1))
            txids.append(str(conn.execute("SELECT pg_current_xact_id()").fetchone()[0]))  # type: ignore[index]
    return txids[0], txids[1]


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_skip_is_seen_in_the_generation_exactly_when_its_deletion_is(conn, dsn, isolation: str, outcome: str):
    """A reader's snapshot taken before a skip commits (a worker reading a batch ahead) sees neither the deletion
    nor its record; one taken after the commit sees both; a skip rolled back leaves neither."""
    txid, _ = two_pending_transactions(conn)
    before = generation(conn)
    with psycopg.connect(dsn) as skipper, psycopg.connect(dsn) as reader:
        skipper.execute(f"BEGIN ISOLATION LEVEL {isolation}")
        assert skipper.execute("SELECT pgturso.skip_transaction(%s::xid8, 'attack')", (txid,)).fetchone()[0] == 1
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")  # the worker's read of a batch, before the commit
        assert (generation(reader), pending_of(reader, "t")) == (before, 2)
        skipper.execute(outcome.upper())
        # The same snapshot still sees the events and the old generation: the batch it read holds them.
        assert (generation(reader), pending_of(reader, "t")) == (before, 2)
        reader.execute("ROLLBACK")
    # The worker's check before sending (a statement of its own): the generation moved iff the events went.
    gone = outcome == "commit"
    assert (generation(conn), pending_of(conn, "t")) == ((before + 1, 1) if gone else (before, 2))
    if gone:
        assert conn.execute("SELECT operation, events FROM pgturso.outbox_deletion ORDER BY id DESC LIMIT 1"
                            ).fetchone() == ("skip_transaction", 1)


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_skips_running_at_once_both_commit_and_both_count(conn, dsn, isolation: str):
    """Two skips in concurrent REPEATABLE READ or SERIALIZABLE transactions: recording the deletions adds no
    conflict between them (a row each, no shared counter row to update), and the generation moves by two."""
    first, second = two_pending_transactions(conn)
    before = generation(conn)
    with psycopg.connect(dsn) as one, psycopg.connect(dsn) as other:
        for session, txid in ((one, first), (other, second)):
            session.execute(f"BEGIN ISOLATION LEVEL {isolation}")
            session.execute("SELECT pgturso.skip_transaction(%s::xid8, 'attack')", (txid,))
        one.execute("COMMIT")
        other.execute("COMMIT")
    assert (generation(conn), pending_of(conn, "t")) == (before + 2, 0)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_untrack_table_is_seen_in_the_generation_exactly_when_its_deletion_is(conn, dsn, outcome: str):
    """untrack_table (READ COMMITTED, as it requires) with pending events: recorded with them, in its transaction."""
    two_pending_transactions(conn)
    before = generation(conn)
    with psycopg.connect(dsn) as untracker, psycopg.connect(dsn) as reader:
        untracker.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        untracker.execute("SELECT pgturso.untrack_table('t')")
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert (generation(reader), pending_of(reader, "t")) == (before, 2)
        untracker.execute(outcome.upper())
        assert generation(reader) == before
        reader.execute("ROLLBACK")
    if outcome == "commit":
        assert generation(conn) == before + 1
        assert conn.execute("SELECT operation, events FROM pgturso.outbox_deletion ORDER BY id DESC LIMIT 1"
                            ).fetchone() == ("untrack_table", 3)  # its creation and two changes
    else:
        assert (generation(conn), pending_of(conn, "t")) == (before, 2)


def test_untrack_table_with_nothing_pending_records_nothing(conn):
    """Only a deletion of pending events moves the generation (a worker would count its batch again for nothing)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DELETE FROM pgturso.outbox")  # (as if delivered)
    before = generation(conn)
    conn.execute("SELECT pgturso.untrack_table('t')")
    assert generation(conn) == before


def test_the_worker_role_reads_the_generation_and_no_one_else_may_change_it(conn, dsn):
    """The worker's role reads the generation and records its own deletions; it cannot delete or update a
    record (an equal count must mean no deletion); a role without grants reads nothing."""
    with login_role(conn, dsn, "gen_worker") as worker_dsn, login_role(conn, dsn, "gen_nobody") as nobody_dsn:
        conn.execute("SELECT pgturso.grant_worker('gen_worker')")
        with psycopg.connect(worker_dsn, autocommit=True) as worker:
            before = generation(worker)
            worker.execute("SELECT pgturso._note_outbox_deletion('recopy_target', 3)")
            assert generation(worker) == before + 1
            for change in ("DELETE FROM pgturso.outbox_deletion", "UPDATE pgturso.outbox_deletion SET events = 0"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    worker.execute(change)
        with psycopg.connect(nobody_dsn, autocommit=True) as nobody:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                generation(nobody)
