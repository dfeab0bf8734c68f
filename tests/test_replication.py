"""End to end: real Postgres with the extension, the real worker, a real tursodb server; asserts on rows."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from conftest import drain, pending, run_worker
from support.turso import TursoServer

CAPTURE_MODES = ("trigger", "wal")


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[list[Any]]:
    return [list(r) for r in conn.execute(sql).fetchall()]


def test_track_table_copies_existing_rows_and_creates_the_table(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int)")
    conn.execute("INSERT INTO items SELECT g, 'item ' || g, g * 10 FROM generate_series(1, 2500) g")
    conn.execute("SELECT pgturso.track_table('items')")

    drain(dsn, turso.url)

    assert turso.query("SELECT count(*), sum(qty) FROM items") == [[2500, sum(g * 10 for g in range(1, 2501))]]
    assert turso.query("SELECT id, name, qty FROM items WHERE id IN (1, 2500) ORDER BY id") == [
        [1, "item 1", 10],
        [2500, "item 2500", 25000],
    ]
    ddl = turso.query("SELECT sql FROM sqlite_schema WHERE name = 'items'")[0][0]
    assert '"name" TEXT NOT NULL' in ddl and 'PRIMARY KEY ("id")' in ddl
    assert pending(conn) == 0


def test_insert_update_delete_key_change_and_truncate(conn, dsn, turso: TursoServer):
    # A DEFERRABLE key is refused (tests/test_correctness.py): keys swap places in one transaction instead,
    # and one statement moves several keys at once.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two'), (3, 'three'), (4, 'four')")
    conn.execute("UPDATE t SET v = 'TWO' WHERE id = 2")
    conn.execute("UPDATE t SET id = 30 WHERE id = 3")  # primary key change
    with conn.transaction():  # keys swap places
        conn.execute("UPDATE t SET id = -1 WHERE id = 1")
        conn.execute("UPDATE t SET id = 1 WHERE id = 4")
        conn.execute("UPDATE t SET id = 4 WHERE id = -1")
    conn.execute("UPDATE t SET id = id * 10 WHERE id IN (1, 4)")  # two keys move in one statement
    conn.execute("UPDATE t SET id = id / 10 WHERE id IN (10, 40)")
    conn.execute("DELETE FROM t WHERE id = 2")
    drain(dsn, turso.url)
    expected = pg_rows(conn, "SELECT id, v FROM t ORDER BY id")
    assert expected == [[1, "four"], [4, "one"], [30, "three"]]
    assert turso.query("SELECT id, v FROM t ORDER BY id") == expected

    conn.execute("TRUNCATE t")
    conn.execute("INSERT INTO t VALUES (7, 'after truncate')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[7, "after truncate"]]


def test_composite_keys_and_key_change(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE m (a text, b int, v int, PRIMARY KEY (a, b))")
    conn.execute("SELECT pgturso.track_table('m')")
    conn.execute("INSERT INTO m SELECT chr(97 + g % 3), g, g FROM generate_series(1, 30) g")
    conn.execute("UPDATE m SET b = b + 100 WHERE a = 'a'")
    conn.execute("DELETE FROM m WHERE a = 'b' AND b < 10")
    drain(dsn, turso.url)
    assert turso.query("SELECT a, b, v FROM m ORDER BY a, b") == pg_rows(conn, "SELECT a, b, v FROM m ORDER BY a, b")


def test_rolled_back_transactions_and_savepoints_send_nothing(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    with pytest.raises(psycopg.errors.RaiseException):
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1, 'rolled back')")
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'abort'; END $$")
    with conn.transaction():
        conn.execute("INSERT INTO t VALUES (2, 'kept')")
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO t VALUES (3, 'savepoint rolled back')")
        conn.execute("UPDATE t SET v = 'changed in savepoint' WHERE id = 2")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("INSERT INTO t VALUES (4, 'kept too')")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[2, "kept"], [4, "kept too"]]


def test_commit_order_beats_outbox_order(conn, dsn, turso: TursoServer, capture: str):
    """B writes first, A commits, then B touches A's row: B must land after A although B's first event is older."""
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text)")
    conn.execute("SELECT pgturso.track_table('acct')")
    drain(dsn, turso.url)
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        b.execute("INSERT INTO acct VALUES (100, 'b was here first')")  # B's oldest event
        a.execute("INSERT INTO acct VALUES (1, 'A')")
        a.execute("INSERT INTO acct VALUES (2, 'A')")
        a.commit()
        b.execute("UPDATE acct SET owner = 'B' WHERE id = 1")  # after A committed
        b.execute("DELETE FROM acct WHERE id = 2")
        b.commit()
    if capture == "trigger":  # the slot decodes in commit order by construction
        ids = pg_rows(conn, "SELECT txid::text, min(id), max(id) FROM pgturso.outbox GROUP BY txid ORDER BY min(id)")
        assert len(ids) == 2 and ids[0][1] < ids[1][1] < ids[0][2], "B's events must straddle A's in the outbox"
    drain(dsn, turso.url)
    assert turso.query("SELECT id, owner FROM acct ORDER BY id") == [[1, "B"], [100, "b was here first"]]


def test_blocked_writer_waits_for_commit_and_lands_after_it(conn, dsn, turso: TursoServer):
    """Two real sessions contend for one row; whichever commits last must win on Turso too."""
    conn.execute("CREATE TABLE c (id int PRIMARY KEY, n int)")
    conn.execute("INSERT INTO c VALUES (1, 0)")
    conn.execute("SELECT pgturso.track_table('c')")
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        second.execute("INSERT INTO c VALUES (2, 0)")  # second's outbox events start before first's
        first.execute("UPDATE c SET n = 1 WHERE id = 1")
        blocked = threading.Thread(target=lambda: second.execute("UPDATE c SET n = n + 10 WHERE id = 1"))
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive(), "the second update should wait for the first transaction"
        first.commit()
        blocked.join(10)
        second.commit()
    assert pg_rows(conn, "SELECT n FROM c WHERE id = 1") == [[11]]
    drain(dsn, turso.url)
    assert turso.query("SELECT id, n FROM c ORDER BY id") == [[1, 11], [2, 0]]


def test_long_open_transaction_does_not_hold_back_later_commits(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    with psycopg.connect(dsn) as slow:
        slow.execute("INSERT INTO t VALUES (1, 'slow')")
        conn.execute("INSERT INTO t VALUES (2, 'fast')")
        drain(dsn, turso.url)
        assert turso.query("SELECT id FROM t ORDER BY id") == [[2]]
        slow.commit()
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "slow"], [2, "fast"]]
    assert pending(conn) == 0


def test_values_of_each_supported_type_arrive_intact(conn, dsn, turso: TursoServer):
    conn.execute("""
        CREATE TABLE typed (
            id bigint PRIMARY KEY, i2 smallint, i4 integer, money_ numeric(10, 2), wide numeric,
            f8 double precision, f4 real, flag boolean, t text, vc varchar(20), raw bytea,
            j json, jb jsonb, u uuid, d date, ts timestamp, tstz timestamptz)
    """)
    conn.execute("SET TimeZone = 'America/New_York'")  # the writer's zone must not leak into Turso
    conn.execute("""
        INSERT INTO typed VALUES
          (9223372036854775807, -32768, 2147483647, 12345678.91, 123456789012345678901234567890.123456789,
           1.7976931348623157e308, 1.5, true, 'héllo "wörld" 🚀', 'x', '\\x00ff10',
           '{"b": [1, 2]}', '{"a": {"b": null}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29',
           '2024-02-29 23:59:59.123456', '2024-06-01 12:00:00-04'),
          (-9223372036854775808, 0, 0, 0, -0.5, -0.0, 0, false, '', '', '\\x', '[]', '"s"', NULL, NULL, NULL, NULL),
          (0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
    """)
    conn.execute("SELECT pgturso.track_table('typed')")
    drain(dsn, turso.url)
    rows = turso.query("SELECT * FROM typed ORDER BY id")
    assert rows[0] == [-9223372036854775808, 0, 0, 0, "-0.5", -0.0, 0.0, 0, "", "", b"", "[]", '"s"',
                       None, None, None, None]
    assert rows[1] == [0] + [None] * 16
    top = rows[2]
    assert top[:4] == [9223372036854775807, -32768, 2147483647, 12345678.91]
    assert top[4] == "123456789012345678901234567890.123456789"  # wide numerics keep every digit
    assert top[5:10] == [1.7976931348623157e308, 1.5, 1, 'héllo "wörld" 🚀', "x"]
    assert top[10] == b"\x00\xff\x10"
    assert top[11:14] == ['{"b": [1, 2]}', '{"a": {"b": null}}', "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]
    assert top[14:16] == ["2024-02-29", "2024-02-29T23:59:59.123456"]
    assert top[16] == "2024-06-01T16:00:00+00:00"
    assert turso.query("SELECT typeof(money_), typeof(raw), datetime(tstz) FROM typed WHERE id > 0") == [
        ["real", "blob", "2024-06-01 16:00:00"]
    ]


def test_many_source_transactions_travel_in_one_request(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    for i in range(300):
        conn.execute("INSERT INTO t VALUES (%s, %s)", (i, f"v{i}"))
    result = drain(dsn, turso.url)
    delivered = [line for line in result.stderr.splitlines() if "event=delivered" in line]
    assert len(delivered) == 1 and "transactions=300" in delivered[0] and "statements=1" in delivered[0], delivered
    assert turso.query("SELECT count(*) FROM t") == [[300]]


def test_a_transaction_larger_than_one_request_is_applied_whole(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    conn.execute("SELECT pgturso.track_table('big')")
    conn.execute("INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
    result = drain(dsn, turso.url, "--max-request-bytes", "200000", "--max-statement-bytes", "100000")
    assert "event=delivered" in result.stderr
    assert turso.query("SELECT count(*), min(id), max(id) FROM big") == [[20000, 1, 20000]]


def test_turso_down_fails_the_run_and_keeps_the_outbox(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
    before = pending(conn)
    turso.stop()
    result = run_worker(dsn, turso.url, "--retry-limit", "2")
    assert result.returncode != 0
    assert "event=retry" in result.stderr and "event=giving_up" in result.stderr
    assert pending(conn) == before
    turso.start()
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*) FROM t") == [[10]]


def run_worker_that_dies_after_turso_commits(dsn: str, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One in-process worker pass that is killed between Turso's commit and the outbox delete."""
    from pgturso.common.settings import resolve
    from pgturso.run.worker import Worker
    from pgturso.sources.outbox import Outbox
    from pgturso.sources.slot import WalOutbox

    class Crash(Exception):
        pass

    def crash(self, batch):
        raise Crash("killed between Turso's commit and the outbox delete")

    with monkeypatch.context() as patch:
        patch.setattr(Outbox, "remove_delivered", crash)
        patch.setattr(WalOutbox, "remove_delivered", crash)
        with pytest.raises(Crash):
            Worker(dsn, resolve({}, {}, {"url": url})).run(once=True)


def test_exactly_once_when_the_worker_dies_after_turso_committed(conn, dsn, turso: TursoServer, monkeypatch):
    from pgturso.common.settings import resolve
    from pgturso.run.worker import Worker

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    run_worker_that_dies_after_turso_commits(dsn, turso.url, monkeypatch)
    settings = resolve({}, {}, {"url": turso.url})
    assert pending(conn) > 0
    assert turso.query("SELECT id, v FROM t") == [[1, "x"]]
    # If the restarted worker sent the batch again, this row would come back.
    read_rows_sql = "DELETE FROM t"
    from support.turso import read_rows

    read_rows(turso.url, read_rows_sql)
    assert Worker(dsn, settings).run(once=True) == 0
    assert pending(conn) == 0
    assert turso.query("SELECT count(*) FROM t") == [[0]]


def test_a_batch_recovered_from_the_marker_is_counted_delivered_once(conn, dsn, turso: TursoServer, monkeypatch):
    """Turso committed a batch, then the worker died before deleting it (it counted nothing): the next start
    forgets the batch by the marker (a late delete). It was delivered once, so it counts once: in
    pgturso.status's totals (delivery_state, table_state) and in the metrics of the worker that removed it."""
    from pgturso.common.settings import resolve
    from pgturso.run.worker import Worker

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'x'), (2, 'y')")
    run_worker_that_dies_after_turso_commits(dsn, turso.url, monkeypatch)
    assert turso.query("SELECT count(*) FROM t") == [[2]] and pending(conn) > 0
    conn.execute("INSERT INTO t VALUES (3, 'z')")
    worker = Worker(dsn, resolve({}, {}, {"url": turso.url}))
    assert worker.run(once=True) == 0
    assert pending(conn) == 0 and turso.query("SELECT count(*) FROM t") == [[3]]
    # Three transactions: track_table's (the table's creation event, in the first batch) and the two inserts.
    assert conn.execute("SELECT transactions_delivered, rows_delivered FROM pgturso.delivery_state").fetchall() \
        == [(3, 3)]
    assert conn.execute("SELECT rows_delivered FROM pgturso.table_state").fetchall() == [(3,)]
    samples = dict(line.rsplit(" ", 1) for line in worker.metrics.render().splitlines() if line[0] != "#")
    assert (samples["pgturso_transactions_delivered_total"], samples["pgturso_rows_delivered_total"]) == ("3", "3")


def test_recovery_from_the_marker_spares_a_transaction_that_committed_later(conn, dsn, turso: TursoServer,
                                                                           monkeypatch):
    """The marker names a batch by its snapshot: an event with a lower id whose transaction was still open
    when the batch was read must survive the recovery and arrive afterwards."""
    from pgturso.common.settings import resolve
    from pgturso.run.worker import Worker

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    settings = resolve({}, {}, {"url": turso.url})
    with psycopg.connect(dsn) as slow:
        slow.execute("INSERT INTO t VALUES (1, 'slow')")  # the lower outbox id, committed last
        conn.execute("INSERT INTO t VALUES (2, 'fast')")
        run_worker_that_dies_after_turso_commits(dsn, turso.url, monkeypatch)
        slow.commit()
    assert turso.query("SELECT id FROM t ORDER BY id") == [[2]]
    assert Worker(dsn, settings).run(once=True) == 0
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "slow"], [2, "fast"]]
    assert pending(conn) == 0


def test_file_target_writes_a_local_turso_database(conn, dsn, tmp_path):
    import turso as pyturso

    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, raw bytea)")
    conn.execute("INSERT INTO notes VALUES (1, 'first', '\\xdead')")
    conn.execute("SELECT pgturso.track_table('notes')")
    conn.execute("INSERT INTO notes VALUES (2, 'second', NULL)")
    conn.execute("UPDATE notes SET body = 'FIRST' WHERE id = 1")
    path = tmp_path / "replica.db"
    drain(dsn, f"file:{path}")
    conn.execute("DELETE FROM notes WHERE id = 2")
    drain(dsn, f"file:{path}")
    db = pyturso.connect(str(path))
    assert db.execute("SELECT id, body, raw FROM notes ORDER BY id").fetchall() == [(1, "FIRST", b"\xde\xad")]
    db.close()


def test_running_worker_wakes_on_commit_and_stops_cleanly(conn, dsn, turso: TursoServer):
    import signal
    import subprocess
    import time

    from conftest import WORKER

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    proc = subprocess.Popen([*WORKER, "run", "--dsn", dsn, "--url", turso.url, "--idle-wait", "30"],
                            stderr=subprocess.PIPE, text=True)
    try:
        # The worker is up and idle (it created t on Turso) before the commit that must wake it: a worker still
        # starting would deliver the row on its first pass, however it was woken. (A loop that gave up after
        # 20 s went on regardless, and a slow start then failed the 10 s check below.)
        from support.workers import wait_until

        def created() -> bool:
            try:
                return turso.query("SELECT count(*) FROM sqlite_schema WHERE name = 't'") == [[1]]
            except RuntimeError:
                return False

        wait_until(created, 120, "the worker to create t on Turso")
        conn.execute("INSERT INTO t VALUES (1, 'live')")
        committed = time.monotonic()
        while time.monotonic() - committed < 10 and turso.query("SELECT count(*) FROM t") != [[1]]:
            time.sleep(0.01)
        # With --idle-wait 30 only LISTEN/NOTIFY can have woken the worker this soon.
        assert time.monotonic() - committed < 10 and turso.query("SELECT v FROM t") == [["live"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    assert "event=stopping" in stderr


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # how outbox batches are grouped
@pytest.mark.parametrize("mixed", [False, True], ids=["one table, upserts only", "upserts and deletes"])
def test_batch_groups_keep_order_and_size_limit(conn, dsn, turso: TursoServer, mixed: bool):
    """A batch of only one table's upserts is merged by id range, any other by runs; either way every group
    stays under the statement size limit, rows keep their order, and every event is delivered once."""
    from pgturso.sources.outbox import Outbox

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    conn.execute("""CREATE PROCEDURE churn(n int, mixed bool) LANGUAGE plpgsql AS $$
        BEGIN FOR i IN 1..n LOOP
            INSERT INTO t VALUES (i % 50, repeat('x', i % 97) || i) ON CONFLICT (id) DO UPDATE SET v = excluded.v;
            IF mixed AND i % 7 = 0 THEN DELETE FROM t WHERE id = (i * 3) % 50; END IF;
            COMMIT;
        END LOOP; END $$""")
    conn.execute("CALL churn(600, %s)", (mixed,))
    limit = 2048
    with psycopg.connect(dsn, autocommit=True) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        outbox = Outbox(reader, batch_rows=10_000, batch_events=10_000, max_group_bytes=limit)
        with reader.transaction():
            batch = outbox.choose_batch()
            assert batch is not None and batch.uniform is not mixed
            groups = list(batch.events())
        assert batch.event_count == pending(conn) >= 600
        assert all(len(g.payload or "") + 2 <= limit for g in groups)
        assert [g.id for g in groups] == sorted(g.id for g in groups)
        if not mixed:
            assert len(groups) > 1  # the size limit split the run
    drain(dsn, turso.url, "--max-statement-bytes", str(limit))
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [
        [r[0], r[1]] for r in conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    ]
    assert pending(conn) == 0


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # how outbox batches are named
@pytest.mark.parametrize("part_bytes", [1, 40, 1 << 20])
def test_a_batch_read_in_parts_after_its_transaction_is_the_batch_that_transaction_read(conn, dsn, part_bytes: int):
    """A batch too large to hold is read in parts, each by its own statements, after the transaction that chose
    it ended (no transaction stays open while Turso has a part). Its name (cut, snapshot, held transactions)
    selects exactly the events that transaction saw, although transactions with ids below the cut commit
    meanwhile, one of them straddling the cut, and later events arrive."""
    from pgturso.sources.outbox import Outbox

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("SELECT pgturso.track_table('u')")
    conn.execute("DELETE FROM pgturso.outbox")
    with psycopg.connect(dsn, autocommit=True) as late, psycopg.connect(dsn, autocommit=True) as straddling:
        late.execute("BEGIN")
        late.execute("INSERT INTO t VALUES (100, 'committed after the batch was chosen')")  # an id below the cut
        straddling.execute("BEGIN")
        straddling.execute("INSERT INTO u VALUES (1, 'straddles')")
        for i in range(1, 8):
            conn.execute("INSERT INTO t VALUES (%s, %s)", (i, "x" * (10 * i)))
            conn.execute("INSERT INTO u VALUES (%s, 'u')", (i + 10,))
        straddling.execute("INSERT INTO u VALUES (99, 'straddles too')")  # past the cut
        straddling.execute("COMMIT")
        conn.execute("UPDATE t SET v = 'updated' WHERE id = 3")
        with psycopg.connect(dsn, autocommit=True) as reader:
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            outbox = Outbox(reader, batch_rows=10_000, batch_events=12)
            with reader.transaction():
                batch = outbox.choose_batch()
                assert batch is not None and batch.held  # the straddling transaction is held back
                chosen = outbox._batch(batch.upto)  # the same batch, read through a cursor in this transaction
                in_transaction = list(chosen.events())
            late.execute("COMMIT")
            conn.execute("INSERT INTO t VALUES (200, 'after')")
            batch.part_bytes, batch.payload_bytes = part_bytes, None
            in_parts = list(batch.events())
            assert reader.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert ",".join(e.payload or "" for e in in_parts) == ",".join(e.payload or "" for e in in_transaction)
    assert (batch.event_count, batch.rows) == (chosen.event_count, chosen.rows)
    assert "committed after" not in str([e.payload for e in in_parts]) and "straddles" not in str(in_parts)


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # how outbox batches are chosen
@pytest.mark.parametrize("case", ["caught_up", "late_in_progress", "late_above_xmax", "held"])
def test_reading_past_a_batch_in_flight_chooses_what_deleting_it_would_leave(conn, dsn, case: str):
    """While batch P travels, the next batch is chosen as if P's events were gone (Outbox.read_past): above P's
    cut when every pending event at or below it is P's, else by deleting P's events in the reading transaction
    (rolled back). Either way it is the batch a deletion of P would leave: also when a transaction below P's cut
    commits after P was chosen (in progress in P's snapshot; or drawn its id before P's snapshot with a
    transaction id at or above the snapshot's xmax, so not in its in-progress list), and when P held back a
    transaction straddling its cut. Those come first in the next batch (their ids are the lowest)."""
    from pgturso.sources.outbox import DELETE_BATCH, Outbox

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DELETE FROM pgturso.outbox")
    batch_events = 100
    with psycopg.connect(dsn, autocommit=True) as late, psycopg.connect(dsn, autocommit=True) as earlier, \
            psycopg.connect(dsn, autocommit=True) as reader:
        if case == "late_in_progress":
            late.execute("BEGIN")
            late.execute("INSERT INTO t VALUES (-1, 'below the cut, committed after it was chosen')")
        if case == "held":
            late.execute("BEGIN")
            late.execute("INSERT INTO t VALUES (-1, 'straddles the cut')")
        for i in range(1, 6):
            conn.execute("INSERT INTO t VALUES (%s, 'backlog')", (i,))
        if case == "late_above_xmax":
            earlier.execute("BEGIN")
            earlier_xid = int(str(earlier.execute("SELECT pg_current_xact_id()").fetchone()[0]))  # type: ignore[index]
            late.execute("BEGIN")
            late.execute("INSERT INTO t VALUES (-1, 'below the cut, its xid at or above the snapshot xmax')")
            late_xid = int(str(late.execute("SELECT pg_current_xact_id()").fetchone()[0]))  # type: ignore[index]
            earlier.execute("INSERT INTO t VALUES (6, 'an older transaction id, a later outbox id')")
            earlier.execute("COMMIT")
            assert earlier_xid < late_xid
        if case == "held":
            late.execute("INSERT INTO t VALUES (-2, 'straddles the cut too')")
            late.execute("COMMIT")
            batch_events = 4  # the cut falls between the straddling transaction's two events
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        outbox = Outbox(reader, batch_rows=10_000, batch_events=batch_events)
        with reader.transaction():
            past = outbox.choose_batch()
            assert past is not None
            past_ids = [e.id for e in past.events()]
        if case == "late_above_xmax":
            xmax = int(past.snapshot.split(":")[1])
            assert xmax <= late_xid, f"the late transaction {late_xid} is below the snapshot's xmax {xmax}"
        if case == "held":
            assert past.held
        if case.startswith("late"):
            late.execute("COMMIT")
        conn.execute("INSERT INTO t VALUES (100, 'after')")

        def next_batch(by_deletion: bool) -> tuple[Any, ...]:
            with reader.transaction(force_rollback=True):
                if by_deletion:
                    reader.execute(DELETE_BATCH, {"marker": past.marker()})
                else:
                    outbox.read_past(past)
                batch = outbox.choose_batch()
                assert batch is not None
                events = [(e.id, e.payload, e.count) for e in batch.events()]
            return (batch.upto, batch.held, batch.transactions, batch.event_count, events), batch.after

        read_past, after = next_batch(by_deletion=False)
        deleted, _ = next_batch(by_deletion=True)
    assert read_past == deleted
    assert not set(past_ids) & {event[0] for event in read_past[4]}
    assert after == (past.upto if case == "caught_up" else 0)  # above the cut only when nothing is below it
    if case != "caught_up":
        assert read_past[4][0][0] < past.upto  # the late or held transaction's events come first


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # how outbox batches are counted
@pytest.mark.parametrize("skipped", [False, True])
def test_a_delivered_batch_counts_what_its_deletion_removed(conn, dsn, skipped: bool):
    """A delivered batch is counted (transactions, rows, rows per table) from what it read, once, in
    delivery_state and table_state: also when its deletion removed fewer events than it read (skip_transaction of
    one of its transactions while it travelled: Turso committed that transaction with the batch all the same)."""
    from pgturso.sources.outbox import Outbox

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("SELECT pgturso.track_table('u')")
    conn.execute("DELETE FROM pgturso.outbox")
    with conn.transaction():
        conn.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3) g")
    with conn.transaction():
        skipped_txid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO u SELECT g, 'y' FROM generate_series(1, 4) g")
        conn.execute("INSERT INTO t VALUES (10, 'z')")
    conn.execute("INSERT INTO u VALUES (20, 'w')")

    def totals() -> tuple[Any, ...]:
        return conn.execute(
            "SELECT d.transactions_delivered, d.rows_delivered, "
            "(SELECT array_agg(s.rows_delivered ORDER BY t.relid::regclass::text) FROM pgturso.tracked_table t "
            " LEFT JOIN pgturso.table_state s ON s.table_id = t.id) "
            "FROM pgturso.delivery_state d WHERE d.target = 'default'").fetchone()  # type: ignore[return-value]

    with psycopg.connect(dsn, autocommit=True) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        outbox = Outbox(reader, batch_rows=10_000, batch_events=100)
        with reader.transaction():
            batch = outbox.choose_batch()
            assert batch is not None
            list(batch.events())
        assert (batch.transactions, batch.rows, batch.event_count) == (3, 9, 4)
        if skipped:
            conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'test', target => 'default')", (skipped_txid,))
        pending_before = conn.execute(
            "SELECT count(*), count(DISTINCT txid), sum(nrows) FROM pgturso.outbox").fetchone()
        before = totals()
        batch.position = {}
        removed = outbox.mark_delivered(batch)
    after = totals()
    assert removed.events == pending_before[0] == (2 if skipped else 4)
    assert (removed.transactions, removed.rows) == (3, 9)  # what the batch read and Turso committed
    assert (after[0] - before[0], after[1] - before[1]) == (removed.transactions, removed.rows)
    per_table = [(a or 0) - (b or 0) for a, b in zip(after[2], before[2], strict=True)]
    assert per_table == [4, 5]  # t, u


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # how outbox batches are chosen
@pytest.mark.parametrize("batch_events", [3, 4, 100])
def test_a_batch_chosen_from_the_head_alone_is_the_batch_the_full_queries_choose(conn, dsn, batch_events: int):
    """A batch whose cut is the last event of the head takes its figures from the head query (and, below the
    event limit, holds no transaction back): its cut, held transactions, transaction count and events are the
    ones the straddling query finds for the same cut, read in one round trip or through a cursor."""
    from pgturso.sources.outbox import Outbox

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DELETE FROM pgturso.outbox")
    with psycopg.connect(dsn, autocommit=True) as other:
        with other.transaction():
            other.execute("INSERT INTO t VALUES (1, 'straddles')")  # the lowest id, committed last
            for i in range(2, 5):
                conn.execute("INSERT INTO t VALUES (%s, 'single')", (i,))
            other.execute("INSERT INTO t VALUES (5, 'straddles too')")
    conn.execute("INSERT INTO t VALUES (6, 'after')")
    with psycopg.connect(dsn, autocommit=True) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        outbox = Outbox(reader, batch_rows=10_000, batch_events=batch_events)
        with reader.transaction():
            batch = outbox.choose_batch()
            assert batch is not None and batch.payload_bytes is not None
            full = outbox._batch(batch.upto)
            assert (batch.held, batch.transactions, batch.snapshot) == (full.held, full.transactions, full.snapshot)
            assert batch.uniform == full.uniform and batch.params == full.params
            read_at_once = [(e.id, e.payload) for e in batch.events()]
            assert [(e.id, e.payload) for e in full.events()] == read_at_once  # full: through a cursor
        assert batch.more_pending is (batch_events <= 6)
        if batch_events == 4:  # the cut falls between the straddling transaction's two events
            assert len(batch.held) == 1 and batch.transactions == 3
        if batch_events == 100:
            assert batch.held == [] and batch.transactions == 5 and batch.event_count == 6


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # markers of outbox batches
def test_a_marker_of_the_id_range_format_is_still_honoured(conn, dsn, turso: TursoServer):
    """Markers written before batches were named by snapshot list id ranges; what they list is not resent."""
    from pgturso.delivery.progress import CREATE_MARKER_SQL, MARKER_TABLE
    from support.turso import read_rows

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    conn.execute("INSERT INTO t VALUES (1, 'in Postgres')")
    low, high = conn.execute("SELECT min(id), max(id) FROM pgturso.outbox").fetchone()
    source_id = conn.execute("SELECT source_id::text FROM pgturso.instance").fetchone()[0]
    # As if an older worker had applied the batch (with a value we can tell apart) and died before deleting it.
    read_rows(turso.url, CREATE_MARKER_SQL)
    read_rows(turso.url, "INSERT INTO t VALUES (1, 'applied earlier')")
    read_rows(turso.url, f"INSERT OR REPLACE INTO {MARKER_TABLE} VALUES ('{source_id}', '[[{low},{high}]]', 'earlier')")
    drain(dsn, turso.url)
    assert pending(conn) == 0
    assert turso.query("SELECT id, v FROM t") == [[1, "applied earlier"]]


def test_a_worker_that_missed_another_workers_delivery_cannot_commit(conn, dsn, turso: TursoServer):
    """The marker is a fence: a worker whose view of it is stale (another worker delivered meanwhile, as after
    losing the delivery lock) has its batch refused whole, then recovers from the marker and carries on."""
    from pgturso.common.errors import MarkerMoved
    from pgturso.common.settings import resolve
    from pgturso.run.worker import Worker

    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    stale = Worker(dsn, resolve({}, {}, {"url": turso.url}))
    stale.read_ahead = False
    stale._connect()
    stale.recover()  # reads the marker as it is now
    stale._disconnect()  # gives up the connection (and so the delivery lock) to the other worker
    conn.execute("INSERT INTO t VALUES (1, 'by the other worker')")
    drain(dsn, turso.url)
    conn.execute("INSERT INTO t VALUES (2, 'later')")
    stale._connect()
    with pytest.raises(MarkerMoved, match="another worker delivered"):
        stale.deliver_batch()
    assert turso.query("SELECT id FROM t ORDER BY id") == [[1]]
    assert pending(conn) == 1  # nothing was marked delivered
    assert stale.run(once=True) == 0  # recovers from the marker, then delivers
    stale.close()
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "by the other worker"], [2, "later"]]
    assert pending(conn) == 0


def test_an_update_that_leaves_a_large_value_alone_keeps_it(conn, dsn, turso: TursoServer):
    """Large values are stored out of line (TOAST); an UPDATE that does not touch them leaves them out of the
    WAL, so logical decoding does not send them: the other columns are updated in place, key moves included."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, status text, body text, data bytea)")
    conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL, ALTER COLUMN data SET STORAGE EXTERNAL")
    conn.execute("SELECT pgturso.track_table('docs')")
    conn.execute("INSERT INTO docs SELECT g, 'new', repeat(md5(g::text), 400), decode(repeat(md5(g::text), 300), 'hex')"
                 " FROM generate_series(1, 3) g")
    drain(dsn, turso.url)
    conn.execute("UPDATE docs SET status = 'read' WHERE id = 1")
    conn.execute("UPDATE docs SET id = 20, status = 'moved' WHERE id = 2")
    conn.execute("UPDATE docs SET body = 'short now' WHERE id = 3")
    drain(dsn, turso.url)
    expected = pg_rows(conn, "SELECT id, status, md5(body), md5(data) FROM docs ORDER BY id")
    rows = turso.query("SELECT id, status, body, hex(data) FROM docs ORDER BY id")
    import hashlib
    assert [[r[0], r[1], hashlib.md5(r[2].encode()).hexdigest(), hashlib.md5(bytes.fromhex(r[3])).hexdigest()]
            for r in rows] == expected


def test_truncate_among_concurrent_writers_lands_in_commit_order(conn, dsn, turso: TursoServer):
    """Sessions insert and update while others TRUNCATE (a table, and a partition alone), some in the same
    transaction as their inserts, a few of them deadlocking (rolled back: nothing sent), with a worker
    delivering meanwhile: whatever order the commits took, Turso ends equal to Postgres."""
    import random

    from support.workers import WorkerProcess

    conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, session int, n int)")
    conn.execute("CREATE TABLE p (id bigserial, region text, n int, PRIMARY KEY (id, region)) "
                 "PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us')")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("SELECT pgturso.track_table('p')")
    failures: list[BaseException] = []

    def statement(writer: psycopg.Connection[Any], rng: random.Random, number: int) -> None:
        step = rng.random()
        if step < 0.5:
            writer.execute("INSERT INTO t (session, n) SELECT %s, g FROM generate_series(1, %s) g",
                           (number, rng.randint(1, 5)))
            writer.execute("INSERT INTO p (region, n) VALUES (%s, %s)", (rng.choice(["eu", "us"]), number))
        elif step < 0.75:
            writer.execute("UPDATE t SET n = n + 1 WHERE id %% 3 = %s", (number % 3,))
        elif step < 0.87:
            writer.execute("TRUNCATE t")
        elif step < 0.95:
            writer.execute(f"TRUNCATE p_{rng.choice(['eu', 'us'])}")  # a partition alone
        else:
            writer.execute("TRUNCATE p")

    def session(number: int) -> None:
        rng = random.Random(number)
        try:
            with psycopg.connect(dsn, autocommit=True) as writer:
                for _ in range(40):
                    try:
                        with writer.transaction():
                            for _ in range(rng.randint(1, 3)):
                                statement(writer, rng, number)
                    except psycopg.errors.DeadlockDetected:
                        pass  # rolled back whole: none of it may reach Turso
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "0.2").start()
    try:
        sessions = [threading.Thread(target=session, args=(n,)) for n in range(4)]
        for thread in sessions:
            thread.start()
        for thread in sessions:
            thread.join()
    finally:
        assert worker.stop() == 0
    assert failures == []
    drain(dsn, turso.url)
    for table in ("t", "p"):
        expected = [list(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id, 2").fetchall()]
        assert turso.query(f"SELECT * FROM {table} ORDER BY id, 2") == expected, table
    assert pending(conn) == 0


def test_a_running_workers_batches_say_when_each_step_happened(conn, dsn, turso: TursoServer, capture: str):
    """At debug level, each batch of the pipelined path logs "batch_timing" just before its "delivered" line: when
    its read began and ended, its marker's position was taken, it was handed to the sender, Turso answered its
    commit and its events were removed (time.monotonic(); the latency benchmark splits a row's latency by them).
    The steps happen in that order, and the rows are on Turso (order only: no timed assertion)."""
    import itertools
    import json
    import subprocess

    from conftest import WORKER
    from support.workers import wait_until

    conn.execute("CREATE TABLE steps (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('steps')")
    drain(dsn, turso.url)
    proc = subprocess.Popen([*WORKER, "run", "--dsn", dsn, "--url", turso.url, "--log-level", "debug",
                             "--log-format", "json"], stderr=subprocess.PIPE, text=True)
    try:
        for i in range(1, 4):  # one at a time: each its own batch, read while the worker is caught up
            conn.execute("INSERT INTO steps VALUES (%s, 'row')", (i,))
            wait_until(lambda i=i: turso.query("SELECT count(*) FROM steps") == [[i]], 60, f"row {i} on Turso")
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    timed = [(before, after) for before, after in itertools.pairwise(lines)
             if before["event"] == "batch_timing" and after["event"] == "delivered"]
    assert sum(after["rows"] for _, after in timed) == 3, stderr
    for timing, _ in timed:  # "settled" only for a batch read ahead while the one before travelled
        steps = [s for s in ("read", "read_done", "settled", "positioned", "sent", "answered", "removed")
                 if s != "settled" or s in timing]
        assert [timing[s] for s in steps] == sorted(timing[s] for s in steps), timing
