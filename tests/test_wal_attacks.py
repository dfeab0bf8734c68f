"""Attacks on capture => 'wal': what pgoutput's decoded stream hides, checked against the rows on Turso.

Each test runs in both capture modes (CAPTURE_MODES): trigger capture is the reference the wal mode must match.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading

import psycopg
import pytest
from conftest import drain, pending
from support.pgcluster import PgCluster
from support.turso import TursoServer, install_apply_counter
from support.workers import WorkerProcess, run_once_measuring_peak_rss, wait_until

CAPTURE_MODES = ("trigger", "wal")

# A value stored out of line (TOASTed): random hex does not compress below the TOAST threshold.
BIG = "SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)"


def test_a_key_update_moving_a_row_into_the_filter_keeps_its_toasted_value(conn: psycopg.Connection, dsn: str,
                                                                        turso: TursoServer, capture: str):
    # A row moving into the filter reaches pgoutput as an insert, and a TOASTed value the UPDATE left alone is
    # "unchanged" in the new tuple: pgoutput fills it in from the old tuple, which holds it only under replica
    # identity FULL. With the key as identity (the filter uses the key alone) the row never reached Turso.
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute(f"INSERT INTO docs SELECT 1, ({BIG}), 1")
    conn.execute("SELECT pgturso.track_table('docs', row_filter => 'id > 100')")
    drain(dsn, turso.url)
    assert turso.query("SELECT count(*) FROM docs") == [[0]]

    conn.execute("UPDATE docs SET id = 101, n = 2 WHERE id = 1")  # into the filter; body not touched
    drain(dsn, turso.url)
    expected = conn.execute("SELECT id, length(body), md5(body), n FROM docs").fetchall()
    assert [list(r) for r in expected] == [[101, 12800, expected[0][2], 2]]
    assert turso.query("SELECT id, length(body), n FROM docs") == [[101, 12800, 2]]
    assert pending(conn) == 0



def test_the_owner_cannot_take_the_replica_identity_a_wal_table_needs(conn: psycopg.Connection, dsn: str,
                                                                      turso: TursoServer, capture: str):
    # The key on Turso is the primary key: an identity over another unique index would give the worker old
    # tuples without the key it deletes by, and a row-filtered table needs FULL (see the test above).
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, email text NOT NULL UNIQUE, body text)")
    conn.execute("ALTER TABLE acct ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute(f"INSERT INTO acct SELECT 1, 'a@x', ({BIG})")
    conn.execute("INSERT INTO acct VALUES (2, 'b@x', 'b'), (3, 'c@x', 'c')")
    conn.execute("SELECT pgturso.track_table('acct', row_filter => 'id > 1')")
    drain(dsn, turso.url)
    for identity in ("USING INDEX acct_email_key", "DEFAULT", "NOTHING"):
        if capture == "wal":
            with pytest.raises(psycopg.errors.RaiseException, match="replica identity") as refused:
                conn.execute(f"ALTER TABLE acct REPLICA IDENTITY {identity}")
            assert "REPLICA IDENTITY FULL" in refused.value.diag.message_hint
        else:
            conn.execute(f"ALTER TABLE acct REPLICA IDENTITY {identity}")
    conn.execute("DELETE FROM acct WHERE id = 3")
    conn.execute("UPDATE acct SET id = 101 WHERE id = 1")  # into the filter, its TOASTed body untouched
    drain(dsn, turso.url)
    expected = [list(r) for r in conn.execute(
        "SELECT id, email, length(body) FROM acct WHERE id > 1 ORDER BY id").fetchall()]
    assert expected == [[2, "b@x", 1], [101, "a@x", 12800]]
    assert turso.query("SELECT id, email, length(body) FROM acct ORDER BY id") == expected
    assert pending(conn) == 0


def test_updates_leaving_a_toasted_value_alone_keep_it_on_turso(conn: psycopg.Connection, dsn: str,
                                                                turso: TursoServer, capture: str):
    # pgoutput sends an untouched TOASTed value as "unchanged": the worker must set the other columns only,
    # including when the key changes (the row is found by its old key), and for a table keyed by key_columns
    # without a unique index (identity FULL).
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    conn.execute("CREATE TABLE notes (tag text NOT NULL, body text, n int)")  # no unique index
    for table in ("docs", "notes"):
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute(f"INSERT INTO docs SELECT i, ({BIG}), i FROM generate_series(1, 3) i")
    conn.execute(f"INSERT INTO notes SELECT 't' || i, ({BIG}), i FROM generate_series(1, 2) i")
    conn.execute("SELECT pgturso.track_table('docs')")
    conn.execute("SELECT pgturso.track_table('notes', key_columns => ARRAY['tag'])")
    drain(dsn, turso.url)
    with conn.transaction():
        conn.execute("UPDATE docs SET n = n + 10 WHERE id = 1")
        conn.execute("UPDATE docs SET id = 20, n = 22 WHERE id = 2")  # key change, body untouched
        conn.execute("UPDATE docs SET id = 30 WHERE id = 3")
        conn.execute("UPDATE docs SET n = 33 WHERE id = 30")
        conn.execute("UPDATE notes SET n = 5 WHERE tag = 't1'")
        conn.execute("UPDATE notes SET tag = 't20' WHERE tag = 't2'")
    drain(dsn, turso.url)
    for table, columns in (("docs", "id, md5(body), n"), ("notes", "tag, md5(body), n")):
        expected = [list(r) for r in conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()]
        rows = turso.query(f"SELECT {columns.replace('md5(body)', 'body')} FROM {table} ORDER BY 1")
        assert [[r[0], hashlib.md5(r[1].encode()).hexdigest(), r[2]] for r in rows] == expected, table
    assert pending(conn) == 0


def test_changes_of_a_rolled_back_savepoint_are_never_sent(conn: psycopg.Connection, dsn: str,
                                                           turso: TursoServer, capture: str):
    # The slot decodes the whole transaction, subtransactions included: rows and a schema change of a
    # subtransaction rolled back must not reach Turso, those around it must, in order and at once.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t VALUES (1, 'one')")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    with conn.transaction():
        conn.execute("INSERT INTO t VALUES (2, 'two')")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():  # a savepoint, rolled back
            conn.execute("ALTER TABLE t ADD COLUMN secret text DEFAULT 'leaked'")
            conn.execute("UPDATE t SET v = 'rolled back' WHERE id = 1")
            conn.execute("INSERT INTO t VALUES (3, 'rolled back', 'leaked')")
            conn.execute("DELETE FROM t WHERE id = 2")
            conn.execute("INSERT INTO t VALUES (1, 'dup')")
        conn.execute("UPDATE t SET v = 'kept' WHERE id = 1")
        with conn.transaction():  # a savepoint released
            conn.execute("INSERT INTO t VALUES (4, 'four')")
    with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():  # a whole transaction rolled back
        conn.execute("INSERT INTO t VALUES (5, 'five')")
        conn.execute("SELECT 1 / 0")
    drain(dsn, turso.url)
    assert [r[0] for r in turso.query("SELECT name FROM pragma_table_info('t') ORDER BY cid")] == ["id", "v"]
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "kept"], [2, "two"], [4, "four"]]
    assert pending(conn) == 0


def test_tracking_again_with_another_row_filter_sends_exactly_the_new_filters_rows(conn: psycopg.Connection,
                                                                                    dsn: str, turso: TursoServer,
                                                                                    capture: str):
    # Changes decoded before the untrack were written under the old filter, those after under the new one; the
    # slot is read after all of it, with the new filter in the publication.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => 'id > 10')")
    drain(dsn, turso.url)
    conn.execute("INSERT INTO t VALUES (5, 5), (15, 15)")
    conn.execute("UPDATE t SET id = 7 WHERE id = 15")  # out of the old filter, into the new one
    conn.execute("SELECT pgturso.untrack_table('t')")
    conn.execute("INSERT INTO t VALUES (6, 6), (16, 16)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => 'id <= 10')")
    conn.execute("INSERT INTO t VALUES (8, 8), (18, 18)")
    conn.execute("UPDATE t SET id = 17 WHERE id = 5")  # out of the new filter
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[6, 6], [7, 15], [8, 8]]
    assert pending(conn) == 0



def test_the_row_filter_check_cannot_be_dropped_to_stop_the_slot(conn: psycopg.Connection, dsn: str,
                                                                 turso: TursoServer, capture: str):
    # pgoutput evaluates the filter while decoding: a row on which it raises would stop the slot (every table
    # of the target) for good. The CHECK pgturso_row_filter refuses such a row to its writer, so dropping it
    # must be refused too.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => '10 / n > 1')")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('other')")
    if capture == "wal":
        with pytest.raises(psycopg.errors.RaiseException, match="pgturso_row_filter") as refused:
            conn.execute("ALTER TABLE t DROP CONSTRAINT pgturso_row_filter")
        assert "untrack_table('public.t')" in refused.value.diag.message_hint
    with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.DivisionByZero)):
        conn.execute("INSERT INTO t VALUES (1, 0)")
    conn.execute("INSERT INTO t VALUES (2, 2)")
    conn.execute("INSERT INTO other VALUES (1)")
    drain(dsn, turso.url)
    assert turso.query("SELECT id FROM t ORDER BY id") == [[2]]
    assert turso.query("SELECT id FROM other") == [[1]]
    assert pending(conn) == 0
    conn.execute("SELECT pgturso.untrack_table('t')")  # pgturso's own drop of the constraint goes through
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'pgturso_row_filter'").fetchone() == (0,)


def test_drop_extension_and_drop_table_remove_a_filtered_wal_table_without_a_refusal(conn: psycopg.Connection,
                                                                                     capture: str):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, n int)")
    conn.execute("SELECT pgturso.track_table('t', row_filter => 'n > 1')")
    conn.execute("SELECT pgturso.track_table('u', row_filter => 'n > 1')")
    conn.execute("DROP TABLE u")
    conn.execute("DROP EXTENSION pgturso CASCADE")
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'pgturso_row_filter'").fetchone() == (0,)
    conn.execute("CREATE EXTENSION pgturso CASCADE")  # for the fixtures' teardown


# A large source transaction: streamed to Turso in many requests (SMALL_REQUESTS) inside one Turso transaction.
BIG_ROWS = int(os.environ.get("BIG_TRANSACTION_ROWS", "200000"))
SMALL_REQUESTS = ("--max-request-bytes", "1000000", "--max-statement-bytes", "250000")


def turso_count(turso: TursoServer, table: str) -> int:
    try:
        return int(turso.query(f"SELECT count(*) FROM {table}")[0][0])
    except Exception:  # not created yet, or the server busy with the transaction
        return -1


def drain_measuring_rss(dsn: str, url: str, *args: str) -> float:
    """``run --once`` to the end; the worker's peak RSS in MB."""
    done, peak_mb = run_once_measuring_peak_rss(dsn, url, *args, env={"PGTURSO_RETRY_BASE_DELAY": "0.05"})
    assert done.returncode == 0, done.stderr[-3000:]
    return peak_mb


def test_sigkill_of_the_worker_inside_a_large_transaction_loses_and_doubles_nothing(
        conn: psycopg.Connection, dsn: str, turso: TursoServer, capture: str):
    # The worker dies (SIGKILL: no cleanup) while a 200k-row source transaction is half sent inside its Turso
    # transaction: that Turso transaction never commits, the slot (or the outbox) was not moved past it, and a
    # restarted worker sends it whole, once, in bounded memory, then what came after it.
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('big')")
    drain(dsn, turso.url)
    install_apply_counter(turso.url, "big")
    conn.execute("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, %s) g", (BIG_ROWS,))
    conn.execute("INSERT INTO big VALUES (-1, 'after'), (-2, 'after')")
    worker = WorkerProcess(dsn, turso.url, *SMALL_REQUESTS).start()
    # tursodb serves its clients on one connection: a reader sees the worker's open transaction.
    wait_until(lambda: 0 < turso_count(turso, "big") < BIG_ROWS // 2, 300, "the transaction half sent")
    worker.kill()
    peak_mb = drain_measuring_rss(dsn, turso.url, *SMALL_REQUESTS)
    assert turso.query("SELECT count(*), min(id), max(id) FROM big WHERE id > 0") == [[BIG_ROWS, 1, BIG_ROWS]]
    assert turso.query("SELECT id, v FROM big WHERE id < 0 ORDER BY id") == [[-2, "after"], [-1, "after"]]
    applied, distinct = turso.query("SELECT count(*), count(DISTINCT id) FROM applied")[0]
    assert (applied, distinct) == (BIG_ROWS + 2, BIG_ROWS + 2), f"{applied - distinct} rows written twice"
    assert peak_mb < 150, f"worker peak RSS {peak_mb:.0f} MB"
    assert pending(conn) == 0


def test_an_immediate_shutdown_of_postgres_mid_batch_then_restarts_lose_and_double_nothing(
        pg_cluster: PgCluster, conn: psycopg.Connection, dsn: str, turso: TursoServer, capture: str):
    # pg_ctl stop -m immediate while writers commit and the worker delivers: no shutdown checkpoint, so the
    # slot comes back at its last saved position, behind what Turso confirmed (the marker is ahead); the outbox
    # rows deleted after delivery may come back likewise. Postgres and the worker restart: what committed
    # arrives once, what did not never does.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, session int, n int)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    install_apply_counter(turso.url, "t")
    stop = threading.Event()
    failures: list[BaseException] = []
    next_id = iter(range(1, 10_000_000, 1000))
    lock = threading.Lock()

    def write(session: int) -> None:
        rng = random.Random(session)
        try:
            with psycopg.connect(dsn, autocommit=True) as writer:
                while not stop.is_set():
                    with lock:
                        first = next(next_id)
                    size = rng.choice((1, 5, 500))
                    writer.execute("INSERT INTO t SELECT g, %s, 0 FROM generate_series(%s::int, %s::int) g",
                                   (session, first, first + size - 1))
                    writer.execute("UPDATE t SET n = n + 1 WHERE id = %s", (first,))
        except psycopg.OperationalError:
            pass  # the server went away under the writer: what it had committed is the truth
        except BaseException as exc:  # reported below
            failures.append(exc)

    conn.execute("INSERT INTO t SELECT g, 0, 0 FROM generate_series(20000001, 20050000) g")  # a batch to be in
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "0.2", "--retry-max-delay", "1", *SMALL_REQUESTS).start()
    writers = [threading.Thread(target=write, args=(s,)) for s in range(3)]
    for thread in writers:
        thread.start()
    try:
        wait_until(lambda: turso_count(turso, "t") > 1000, 120, "delivery under way")
        pg_cluster.pg_ctl("stop", "-m", "immediate", "-w")
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert failures == []
    worker.kill()
    pg_cluster.pg_ctl("start", "-w", "-l", str(pg_cluster.logfile))
    pg_cluster.wait_ready()
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "0.2", *SMALL_REQUESTS).start()
    with psycopg.connect(dsn, autocommit=True) as again:
        again.execute("INSERT INTO t VALUES (-1, -1, -1)")  # after the restart
        expected = [list(r) for r in again.execute("SELECT id, session, n FROM t ORDER BY id").fetchall()]
        wait_until(lambda: turso_count(turso, "t") == len(expected), 300, "delivery after the restart")
        assert worker.stop() == 0
        assert pending(again) == 0  # (a wal slot is peeked only once its worker let go of it)
        assert turso.query("SELECT id, session, n FROM t ORDER BY id") == expected
        updates = again.execute("SELECT count(*) FROM t WHERE n > 0").fetchone()[0]
    applied, distinct = turso.query("SELECT count(*), count(DISTINCT id) FROM applied")[0]
    assert distinct == len(expected)
    assert applied == len(expected) + updates, f"{applied - len(expected) - updates} row writes applied twice"


def test_truncate_cascade_across_targets_and_modes_with_concurrent_writers(
        conn: psycopg.Connection, dsn: str, turso: TursoServer, capture: str):
    # TRUNCATE parent CASCADE empties its referencing tables in the same statement: a child on the same target
    # (the parameter's capture mode), and one on another target that captures by trigger. Writers insert into
    # all three meanwhile; each Turso database ends equal to Postgres.
    other = TursoServer().start()
    try:
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY, n int)")
        conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent, n int)")
        conn.execute("CREATE TABLE remote_child (id int PRIMARY KEY, parent_id int REFERENCES parent, n int)")
        conn.execute("SELECT pgturso.track_table('parent')")
        conn.execute("SELECT pgturso.track_table('child')")
        conn.execute("SELECT pgturso.add_target('other', %s)", (other.url,))
        conn.execute("SELECT pgturso.track_table('remote_child', target => 'other', capture => 'trigger')")
        failures: list[BaseException] = []
        counter = iter(range(1, 1_000_000))
        lock = threading.Lock()

        def ids(n: int) -> list[int]:
            with lock:
                return [next(counter) for _ in range(n)]

        def session(number: int) -> None:
            rng = random.Random(number)
            try:
                with psycopg.connect(dsn, autocommit=True) as writer:
                    for _ in range(40):
                        try:
                            with writer.transaction():
                                step = rng.random()
                                if step < 0.8:
                                    parent, *children = ids(5)
                                    writer.execute("INSERT INTO parent VALUES (%s, %s)", (parent, number))
                                    for child in children:
                                        table = rng.choice(("child", "remote_child"))
                                        writer.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)",
                                                       (child, parent, number))
                                    writer.execute("UPDATE parent SET n = n + 1 WHERE id = %s", (parent,))
                                elif step < 0.9:
                                    writer.execute("TRUNCATE parent CASCADE")
                                else:
                                    writer.execute("TRUNCATE child")
                        except psycopg.errors.DeadlockDetected:
                            pass  # rolled back whole: none of it may reach Turso
            except BaseException as exc:  # reported below
                failures.append(exc)

        workers = [WorkerProcess(dsn, turso.url, "--idle-wait", "0.2").start(),
                   WorkerProcess(dsn, "", "--target", "other", "--idle-wait", "0.2").start()]
        try:
            conn.execute("INSERT INTO parent VALUES (0, 0)")
            conn.execute("INSERT INTO remote_child VALUES (0, 0, 0)")
            wait_until(lambda: turso_count(turso, "parent") == 1 and turso_count(other, "remote_child") == 1, 60,
                       "both workers delivering")
            sessions = [threading.Thread(target=session, args=(n,)) for n in range(4)]
            for thread in sessions:
                thread.start()
            for thread in sessions:
                thread.join()
        finally:
            for worker in workers:
                assert worker.stop() == 0
        assert failures == []
        drain(dsn, turso.url)
        drain(dsn, "", "--target", "other")
        for server, table in ((turso, "parent"), (turso, "child"), (other, "remote_child")):
            expected = [list(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()]
            assert server.query(f"SELECT * FROM {table} ORDER BY id") == expected, table
        assert conn.execute("SELECT count(*) FROM parent").fetchone()[0] > 0, "the last writes came after a TRUNCATE"
        assert pending(conn) == 0
    finally:
        other.stop()
