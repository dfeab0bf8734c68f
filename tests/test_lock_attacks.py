"""Attacks on promise 2: pgturso never makes an application's write or DDL wait on the worker or on Turso, nor
fail, where it would not without pgturso. Each test builds the interleaving with real sessions and shows who
waits on whom through pg_locks / pg_stat_activity, then checks the rows that reach Turso."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import drain, run_worker
from pgturso.capture.sql import WAKE_LOCK_CLASS
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer, install_apply_counter
from support.workers import WorkerProcess, outbox_empty, wait_until

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest) unless it says

# Backends waiting for a lock, with whom they wait for.
WAITING = """
    SELECT a.pid, a.application_name, pg_blocking_pids(a.pid) FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
"""


def waiting(conn: psycopg.Connection[Any]) -> list[tuple[int, str, list[int]]]:
    return [(int(pid), str(app), list(blockers)) for pid, app, blockers in conn.execute(WAITING).fetchall()]


def blocked_by(conn: psycopg.Connection[Any], pid: int) -> bool:
    """Whether a backend waits for a lock ``pid`` holds."""
    return any(pid in blockers for _, _, blockers in waiting(conn))


def deadlock_timeout_seconds(conn: psycopg.Connection[Any]) -> float:
    return float(conn.execute("SELECT extract(epoch FROM current_setting('deadlock_timeout')::interval)")
                 .fetchone()[0])


def test_a_copy_chunk_waiting_for_a_writer_never_makes_that_writer_deadlock(conn, dsn, turso: TursoServer):
    """The chunked initial copy locks its rows FOR SHARE in key order. A writer that holds a row lock inside the
    chunk's range and then writes a row the chunk already locked (or runs DDL on the table, which waits for the
    chunk's table lock) closes a cycle. Postgres ends one of the two; without pgturso the writer would never
    have waited, so the one ended must be the copy chunk (retried later), never the application's write."""
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO big SELECT g, 'old' FROM generate_series(1, 12000) g")  # over the in-call copy
    conn.execute("SELECT pgturso.track_table('big')")
    assert conn.execute("SELECT copy_state FROM pgturso.tracked_table").fetchone()[0] == "copying"
    for second_write in ("UPDATE big SET v = 'second' WHERE id = 3", "ALTER TABLE big ADD COLUMN extra int"):
        writer = psycopg.connect(dsn)
        worker = None
        try:
            writer.execute("UPDATE big SET v = 'first' WHERE id = 50")  # the writer holds row 50's lock
            writer_pid = writer.info.backend_pid
            worker = WorkerProcess(dsn, turso.url, "--copy-chunk-rows", "1000", "--idle-wait", "1").start()

            # The worker's chunk has locked rows 1..49 FOR SHARE and waits for the writer's row 50.
            def chunk_waits(writer_pid: int = writer_pid) -> bool:
                return any(writer_pid in blockers for _, app, blockers in waiting(conn)
                           if app.startswith("pgturso-worker"))

            wait_until(chunk_waits, 60, "the copy chunk to wait for the writer's row lock")
            # Let the chunk's own deadlock check pass (it runs once, deadlock_timeout after it began waiting):
            # the cycle is then found by the writer's check, and Postgres would end the writer.
            time.sleep(deadlock_timeout_seconds(conn) * 1.5)
            writer.execute(second_write)  # must not fail with a deadlock
            writer.commit()
            wait_until(lambda: conn.execute("SELECT copy_state FROM pgturso.tracked_table").fetchone()[0] == "done",
                       120, "the copy to finish")
            wait_until(lambda: outbox_empty(dsn), 120, "the worker to catch up")
            expected = {r[0]: r[1] for r in conn.execute("SELECT id, v FROM big").fetchall()}
            actual = {r[0]: r[1] for r in turso.query("SELECT id, v FROM big")}
            assert actual == expected, worker.output[-3000:]
            assert worker.stop() == 0, worker.output[-3000:]
            # The copy chunk stepped back (it is retried), it was not reported as a failure.
            assert "event=retry" not in worker.output, worker.output[-3000:]
        finally:
            writer.close()
            if worker is not None:
                worker.stop()
        conn.execute("SELECT pgturso.resync_table('big')")  # copy again for the second interleaving


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # a wal worker holds no outbox rows meanwhile
def test_untrack_table_while_turso_hangs_never_blocks_the_tables_writers(conn, dsn, turso: TursoServer, capture):
    """untrack_table while Turso holds a batch of the table: the worker keeps no transaction open meanwhile, so
    untrack_table waits for nothing (it used to wait for the batch's deletion, kept open until Turso answered,
    and had to do so before locking the table, or every reader and writer of the table would have waited for
    Turso behind it). The batch in flight loses its events to untrack_table; once Turso committed it, the worker
    still records it as delivered, so that a restart does not take the target for one that lacks deliveries
    (and copy it afresh)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("SELECT pgturso.track_table('kept')")
    with CloudProxy(turso.url, None, stream_expiry=60) as cloud:
        worker = WorkerProcess(dsn, cloud.url, "--batch-events", "1", "--idle-wait", "1").start()
        try:
            conn.execute("INSERT INTO t VALUES (0, 'delivered')")
            wait_until(lambda: outbox_empty(dsn), 60, "the first row to be delivered")
            cloud.slow_answers = [30.0]  # Turso commits the next batch and answers 30 s later
            for i in (1, 2, 3):
                conn.execute("INSERT INTO t VALUES (%s, 'pending')", (i,))
            wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a batch of t")
            with psycopg.connect(dsn, autocommit=True) as untracker, psycopg.connect(dsn, autocommit=True) as writer:
                untracking = threading.Thread(target=untracker.execute,
                                              args=("SELECT pgturso.untrack_table('t')",))
                untracking.start()
                writes: list[str] = []
                writing = threading.Thread(target=lambda: writes.append(
                    str(writer.execute("INSERT INTO t VALUES (10, 'written meanwhile') RETURNING v").fetchone()[0])))
                writing.start()
                # Both finish long before Turso answers (30 s). A momentary lock wait of the writer behind
                # untrack_table's own brief ACCESS EXCLUSIVE lock (dropping the triggers) is no wait for Turso: the
                # promise is that neither waits for the held batch, so the check is that both end meanwhile.
                deadline = time.monotonic() + 15
                for thread in (untracking, writing):
                    thread.join(max(0.0, deadline - time.monotonic()))
                assert writes == ["written meanwhile"] and not untracking.is_alive(), (
                    f"untrack_table or the table's writer waited while Turso did not answer: {waiting(conn)}")
            assert cloud.holding > 0, "Turso answered before untrack_table ran: nothing was shown (hold it longer)"
            assert conn.execute("SELECT count(*) FROM pgturso.tracked_table WHERE relid = 't'::regclass"
                                ).fetchone()[0] == 0
            wait_until(lambda: cloud.holding == 0 and outbox_empty(dsn), 60, "the worker to deliver after the hang")
            assert worker.stop() == 0, worker.output[-3000:]
            # Postgres knows the batch Turso has last (its marker) although untrack_table removed its events: a
            # restart recovers by it and carries on with the tables still tracked; it recopies nothing.
            conn.execute("INSERT INTO kept VALUES (1)")
            restarted = run_worker(dsn, cloud.url, "--once")
            assert restarted.returncode == 0 and "target_behind" not in restarted.stderr, restarted.stderr
            assert turso.query("SELECT id FROM kept") == [[1]], restarted.stderr
        finally:
            worker.stop()


def test_untrack_table_leaves_no_event_of_a_writer_it_waited_for_under_any_isolation(conn, dsn, turso: TursoServer,
                                                                                     capture):
    """untrack_table waits for the table's open writers (dropping the triggers locks the table), then deletes
    the table's events. A REPEATABLE READ or SERIALIZABLE caller's snapshot predates that wait: the events of a
    writer that committed during it would stay in the outbox naming a layout that is gone, and the worker could
    not decode them. Such a caller is refused with the fix; READ COMMITTED removes them."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("SELECT pgturso.track_table('kept')")
    for isolation in ("REPEATABLE READ", "SERIALIZABLE", "READ COMMITTED"):
        writer = psycopg.connect(dsn)
        untracker = psycopg.connect(dsn, autocommit=True)
        try:
            writer.execute("INSERT INTO t VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET v = excluded.v", (isolation,))
            untracker.execute(f"BEGIN ISOLATION LEVEL {isolation}")
            errors: list[Exception] = []

            def untrack(untracker: psycopg.Connection[Any] = untracker, errors: list[Exception] = errors) -> None:
                try:
                    untracker.execute("SELECT pgturso.untrack_table('t')")
                    untracker.execute("COMMIT")
                except psycopg.Error as exc:
                    errors.append(exc)
                    untracker.execute("ROLLBACK")

            untracking = threading.Thread(target=untrack)
            untracking.start()
            writer_pid = writer.info.backend_pid
            wait_until(lambda pid=writer_pid, thread=untracking: not thread.is_alive() or blocked_by(conn, pid), 30,
                       "untrack_table to wait for the writer, or to be refused")
            writer.commit()
            untracking.join(30)
        finally:
            writer.close()
            untracker.close()
        gone = conn.execute("SELECT count(*) FROM pgturso.outbox o WHERE NOT EXISTS "
                            "(SELECT 1 FROM pgturso.layout l WHERE l.id = o.layout_id)").fetchone()[0]
        assert gone == 0, f"{isolation}: {gone} event(s) of the untracked table left undecodable"
        if isolation == "READ COMMITTED":
            assert not errors
        else:
            assert errors and "READ COMMITTED" in str(errors[0].diag.message_hint), errors
    conn.execute("INSERT INTO kept VALUES (1)")
    result = drain(dsn, turso.url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert turso.query("SELECT id FROM kept") == [[1]]


def _pattern_with_two_tables(conn: psycopg.Connection[Any], url: str) -> None:
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", url))
    for table in ("orders", "invoices"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, v text)")
        conn.execute(f"SELECT pgturso.track_table('{table}', target => 'tenant-%s', route_by => 'tenant_id')")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'acme', 'old'), (2, 'globex', 'old')")


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # pattern targets capture by trigger only
def test_table_wide_events_of_two_tables_of_a_pattern_never_wait_for_each_other(conn, dsn, tmp_path, capture):
    """TRUNCATE or DDL of a pattern's table is queued once per tenant (pgturso._fan_out), ordered against a
    new tenant's registration. Two such statements on two different tables of the pattern have nothing to
    order: the second must not wait for the first's transaction, nor deadlock with it when that transaction
    then writes the second table (it waits for the second's table lock, which is ordinary)."""
    from test_tenants import drain_pattern, tenant_rows

    _pattern_with_two_tables(conn, f"file:{tmp_path}/tenant-%s.db")
    for new_id, second in enumerate(("TRUNCATE invoices", "ALTER TABLE invoices ADD COLUMN note text"), start=3):
        first, other = psycopg.connect(dsn), psycopg.connect(dsn)
        try:
            first.execute("TRUNCATE orders")
            first_pid = first.info.backend_pid
            done: list[str] = []
            errors: list[Exception] = []

            def run(sql: str = second, session: psycopg.Connection[Any] = other, done: list[str] = done,
                    errors: list[Exception] = errors) -> None:
                try:
                    session.execute(sql)
                    done.append(sql)
                except psycopg.Error as exc:
                    errors.append(exc)

            running = threading.Thread(target=run)
            running.start()
            wait_until(lambda thread=running, pid=first_pid: not thread.is_alive() or blocked_by(conn, pid), 30,
                       f"{second} to finish or wait")
            chain = waiting(conn)
            assert done == [second] and not chain, f"{second} waited for the TRUNCATE of another table: {chain}"
            # The first transaction now writes the second table: it waits for that table's lock, as without
            # pgturso, and no deadlock follows.
            writing = threading.Thread(target=run, kwargs={
                "sql": f"INSERT INTO invoices (id, tenant_id, v) VALUES ({new_id}, 'acme', 'new')", "session": first})
            writing.start()
            wait_until(lambda pid=other.info.backend_pid: blocked_by(conn, pid), 30, "the write to wait")
            other.commit()
            writing.join(30)
            first.commit()
            assert not errors and len(done) == 2, errors
        finally:
            first.close()
            other.close()
        drain_pattern(dsn)
        for tenant in ("acme", "globex"):
            path = tmp_path / f"tenant-{tenant}.db"
            for table in ("orders", "invoices"):
                expected = [tuple(r) for r in conn.execute(
                    f"SELECT id, v FROM {table} WHERE tenant_id = %s ORDER BY id", (tenant,)).fetchall()]
                assert tenant_rows(path, f"SELECT id, v FROM {table} ORDER BY id") == expected, (tenant, table)


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_new_tenant_and_a_table_wide_event_under_repeatable_read_fail_rather_than_act_on_a_stale_list(
        conn, dsn, tmp_path, capture):
    """A table-wide event only shares the pattern's row with a registration now (FOR SHARE against its
    UPDATE) and updates its backend's stripe, which every registration updates: a REPEATABLE READ
    transaction whose snapshot predates the other's commit still fails (serialization failure, to retry)
    instead of queueing a new tenant's tables at an old layout, or a TRUNCATE for a stale list of tenants."""
    from test_tenants import drain_pattern, tenant_rows

    _pattern_with_two_tables(conn, f"file:{tmp_path}/tenant-%s.db")
    # A registration whose snapshot predates a committed schema change.
    with psycopg.connect(dsn) as late:
        late.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        late.execute("SELECT 1")
        conn.execute("ALTER TABLE orders ADD COLUMN note text")
        with pytest.raises(psycopg.errors.SerializationFailure):
            late.execute("INSERT INTO orders (id, tenant_id, v) VALUES (10, 'newco', 'x')")
    # A TRUNCATE whose snapshot predates a committed registration.
    with psycopg.connect(dsn) as late:
        late.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        late.execute("SELECT 1")
        conn.execute("INSERT INTO orders (id, tenant_id, v, note) VALUES (11, 'initech', 'x', 'n')")
        with pytest.raises(psycopg.errors.SerializationFailure):
            late.execute("TRUNCATE invoices")
    # Retried, both reach every tenant, new ones included, with the schema change.
    conn.execute("INSERT INTO orders (id, tenant_id, v, note) VALUES (10, 'newco', 'x', 'n')")
    conn.execute("TRUNCATE invoices")
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "newco", "initech"):
        path = tmp_path / f"tenant-{tenant}.db"
        expected = [tuple(r) for r in conn.execute(
            "SELECT id, v, note FROM orders WHERE tenant_id = %s ORDER BY id", (tenant,)).fetchall()]
        assert tenant_rows(path, "SELECT id, v, note FROM orders ORDER BY id") == expected, tenant
        assert tenant_rows(path, "SELECT count(*) FROM invoices") == [(0,)], tenant


def _worker_sleeps(conn: psycopg.Connection[Any]) -> bool:
    """Whether the worker holds its wake locks (it sleeps: a capture then sends it a NOTIFY)."""
    return bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid "
        "AND a.application_name = 'pgturso-worker')", (WAKE_LOCK_CLASS,)).fetchone()[0])


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_prepared_transaction_commits_once_its_session_turns_notify_off(conn, dsn, turso: TursoServer, capture):
    """A capture that finds the worker asleep wakes it with a NOTIFY, and Postgres refuses to PREPARE a
    transaction that sent one: two-phase commit of a write to a tracked table failed whenever the worker was
    idle. With pgturso.notify = off (for the role, database or session) pgturso sends none; the worker finds
    the changes within idle_wait seconds, and a prepared transaction reaches Turso once COMMIT PREPARED."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    try:
        wait_until(lambda: _worker_sleeps(conn), 60, "the worker to go idle")
        # By default the NOTIFY is sent, and PREPARE TRANSACTION refuses it (Postgres's error); nothing of the
        # transaction reaches Turso.
        with psycopg.connect(dsn) as app:
            app.execute("INSERT INTO t VALUES (1, 'refused')")
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="NOTIFY"):
                app.execute("PREPARE TRANSACTION 'pgturso_lock_attacks_1'")
        wait_until(lambda: _worker_sleeps(conn), 60, "the worker to go idle again")
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("SET pgturso.notify = off")
            app.execute("BEGIN")
            app.execute("INSERT INTO t VALUES (2, 'prepared')")
            app.execute("ALTER TABLE t ADD COLUMN n int")  # DDL on a tracked table notifies too
            app.execute("UPDATE t SET n = 7")
            app.execute("PREPARE TRANSACTION 'pgturso_lock_attacks_2'")
        assert conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0  # invisible until committed
        conn.execute("COMMIT PREPARED 'pgturso_lock_attacks_2'")
        wait_until(lambda: outbox_empty(dsn), 60, "the prepared transaction to reach Turso")
        assert turso.query("SELECT id, v, n FROM t") == [[2, "prepared", 7]], worker.output[-3000:]
    finally:
        worker.stop()
        for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
                                   ).fetchall():
            conn.execute(f"ROLLBACK PREPARED '{gid}'")


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # a wal worker counts no table_state meanwhile
def test_renaming_a_table_whose_first_batch_turso_holds_never_waits_for_turso(conn, dsn, turso: TursoServer, capture):
    """The batch that first delivers a table creates its counters row (table_state), and the foreign key check
    of that insert locks the table's tracked_table row (FOR KEY SHARE). A RENAME of the table changes that row's
    Turso name, a key of it: while the worker kept that insert open until Turso confirmed the batch, the ALTER
    TABLE, holding the table's ACCESS EXCLUSIVE lock, waited for Turso, and every reader and writer of the table
    behind it. The counters are now written once Turso confirmed, in a transaction of their own."""
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('kept')")
    with CloudProxy(turso.url, None) as cloud:
        worker = WorkerProcess(dsn, cloud.url, "--batch-events", "1", "--idle-wait", "1").start()
        try:
            conn.execute("INSERT INTO kept VALUES (1)")
            wait_until(lambda: outbox_empty(dsn), 60, "the first row to be delivered")
            cloud.stalls = [15.0]  # Turso accepts the next request and answers nothing for 15 s
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("SELECT pgturso.track_table('t')")
            conn.execute("INSERT INTO t VALUES (1, 'pending')")
            wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the first batch of t")
            with psycopg.connect(dsn, autocommit=True) as renamer:
                renaming = threading.Thread(target=renamer.execute, args=("ALTER TABLE t RENAME TO t_renamed",))
                renaming.start()
                wait_until(lambda: not renaming.is_alive() or blocked_by(conn, worker_pid(conn)), 30,
                           "the rename to finish or wait")
                chain = waiting(conn)
                renaming.join(30)
                assert not chain, f"ALTER TABLE ... RENAME waited for the worker, which waits for Turso: {chain}"
            wait_until(lambda: cloud.holding == 0 and outbox_empty(dsn), 60, "the worker to deliver after the hang")
            assert turso.query("SELECT id, v FROM t_renamed") == [[1, "pending"]], worker.output[-3000:]
        finally:
            worker.stop()


def worker_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgturso-worker'").fetchone()
    return int(row[0]) if row else 0


# The worker's sessions that hold a transaction open, and with it a snapshot (which CREATE INDEX CONCURRENTLY
# waits for, and vacuum keeps rows for) or a transaction id (which vacuum keeps rows for).
OPEN_WORKER_TRANSACTIONS = """
    SELECT pid, xact_start, application_name, state, backend_xmin::text, backend_xid::text FROM pg_stat_activity
    WHERE application_name LIKE 'pgturso-worker%' AND backend_type = 'client backend' AND xact_start IS NOT NULL
      AND (state LIKE 'idle in transaction%' OR backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
"""


def on_turso(turso: TursoServer, sql: str) -> list[list[Any]] | None:
    """Rows of ``sql`` on Turso, or None while its table does not exist yet."""
    try:
        return turso.query(sql)
    except Exception:
        return None


# How long CREATE INDEX / REINDEX CONCURRENTLY of an empty table may take while Turso holds a request for 30 s:
# a bound on waiting for the worker's transaction to end by itself, far below the hold, not a speed assertion.
DDL_BOUND_SECONDS = 10


def assert_ddl_never_waits_while_turso_holds_a_request(conn: psycopg.Connection[Any], dsn: str,
                                                       cloud: CloudProxy) -> None:
    """While Turso holds a request of the worker: no session of the worker keeps a transaction open, and
    CREATE INDEX CONCURRENTLY and REINDEX CONCURRENTLY of another table finish without waiting for the worker."""
    wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a request of the worker")
    # The worker reads the next batch while Turso has the one before (a few milliseconds of Postgres work), but
    # no transaction of it lasts: none seen now is still open a second later.
    seen = set(conn.execute(OPEN_WORKER_TRANSACTIONS).fetchall())
    time.sleep(1.0)
    lasting = seen & set(conn.execute(OPEN_WORKER_TRANSACTIONS).fetchall())
    assert not lasting, f"the worker keeps a transaction open while Turso holds its request: {lasting}"
    with psycopg.connect(dsn, autocommit=True) as ddl:
        for statement in ("CREATE INDEX CONCURRENTLY untracked_v ON untracked (v)",
                          "REINDEX INDEX CONCURRENTLY untracked_v"):
            # The DDL may wait a moment for a short transaction of the worker (it goes on looking at other
            # tenants and tables meanwhile), which ends by itself; what it must never do is wait until Turso
            # answers: it has to finish while Turso still holds the request (held for 30 s).
            running = threading.Thread(target=ddl.execute, args=(statement,))
            running.start()
            running.join(DDL_BOUND_SECONDS)
            stuck = running.is_alive()
            chain = waiting(conn) if stuck else []
            running.join(60)
            assert not stuck, (f"{statement} still waited after {DDL_BOUND_SECONDS} s, for the worker, which "
                               f"waits for Turso: {chain}")
    assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'untracked_v'::regclass").fetchone()[0]
    assert cloud.holding > 0, "Turso answered before the DDL ran: nothing was shown (hold the request longer)"


def delivered_after_the_hang(dsn: str, cloud: CloudProxy) -> bool:
    """Turso answered, and the worker delivered everything committed (tursodb shows a transaction's rows to other
    readers before it commits: Turso's rows alone do not say)."""
    return cloud.holding == 0 and outbox_empty(dsn)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_create_index_concurrently_never_waits_for_turso(conn, dsn, turso: TursoServer, capture):
    """CREATE INDEX CONCURRENTLY (and REINDEX or DETACH PARTITION CONCURRENTLY) waits for every transaction of
    the database holding a snapshot older than its own, on any table. The worker, reading the next batch ahead of
    the one Turso holds, kept one open until Turso answered (at most request_timeout); it keeps none now."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE untracked (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    with CloudProxy(turso.url, None) as cloud:
        worker = WorkerProcess(dsn, cloud.url, "--batch-events", "1", "--batch-rows", "1", "--idle-wait", "1").start()
        try:
            conn.execute("INSERT INTO t VALUES (0, 'delivered')")
            wait_until(lambda: on_turso(turso, "SELECT id FROM t") == [[0]], 60, "the first row to be delivered")
            install_apply_counter(turso.url, "t")
            cloud.stalls = [30.0]  # Turso takes the next request and answers nothing for 30 s (then 504)
            for i in (1, 2, 3):  # one batch each: the worker reads the next ones while Turso holds the first
                conn.execute("INSERT INTO t VALUES (%s, 'pending')", (i,))
            assert_ddl_never_waits_while_turso_holds_a_request(conn, dsn, cloud)
            wait_until(lambda: delivered_after_the_hang(dsn, cloud), 120, "the worker to deliver after the hang")
            expected = [[0, "delivered"], [1, "pending"], [2, "pending"], [3, "pending"]]
            assert turso.query("SELECT id, v FROM t ORDER BY id") == expected, worker.output[-3000:]
            assert turso.query("SELECT id FROM applied ORDER BY id") == [[1], [2], [3]], worker.output[-3000:]
        finally:
            worker.stop()


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_a_transaction_too_large_to_read_ahead_never_makes_ddl_wait_for_turso(conn, dsn, turso: TursoServer, capture):
    """A source transaction larger than one request is streamed to Turso over several requests, never held in
    memory whole. It is read from Postgres a request's worth at a time, each part in a statement of its own that
    selects the batch by its name (its snapshot), so no transaction stays open while Turso holds a request; and
    every row still arrives once, in one Turso transaction."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE untracked (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    with CloudProxy(turso.url, None, stream_expiry=120) as cloud:
        worker = WorkerProcess(dsn, cloud.url, "--max-request-bytes", "65536", "--max-statement-bytes", "16384",
                               "--idle-wait", "1").start()
        try:
            conn.execute("INSERT INTO t VALUES (0, 'delivered')")
            wait_until(lambda: on_turso(turso, "SELECT id FROM t") == [[0]], 60, "the first row to be delivered")
            install_apply_counter(turso.url, "t")
            cloud.answer_delays = [30.0]  # Turso answers the large transaction's first request 30 s late
            with conn.transaction():  # about 700 kB in 30 outbox events: a dozen requests
                for k in range(30):
                    conn.execute("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(%s::int, %s::int) g",
                                 (k * 100 + 1, k * 100 + 100))
            assert_ddl_never_waits_while_turso_holds_a_request(conn, dsn, cloud)
            wait_until(lambda: delivered_after_the_hang(dsn, cloud), 120, "the large transaction to be delivered")
            assert turso.query("SELECT count(*) FROM t") == [[3001]], worker.output[-3000:]
            assert turso.query("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM applied") == \
                [[3000, 3000, 1, 3000]], worker.output[-3000:]
            assert turso.query("SELECT count(*) FROM t WHERE length(v) = 200") == [[3000]]
        finally:
            worker.stop()


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # pattern targets capture by trigger
def test_a_tenants_backlog_larger_than_a_batch_never_makes_ddl_wait_for_turso(conn, dsn, turso: TursoServer,
                                                                               tmp_path: Path, capture):
    """A pattern worker reads a tenant's backlog in one statement when it fits a batch; a larger one (here a
    source transaction of six events, batches of two) goes the single-target way: no transaction of it may stay
    open while Turso holds its request either."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("CREATE TABLE untracked (id int PRIMARY KEY, v text)")
    with CloudProxy(turso.url, None) as cloud:
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-acme", cloud.url))  # acme's database: Turso
        conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'first')")
        worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1", "--batch-events", "2").start()
        try:
            wait_until(lambda: on_turso(turso, "SELECT id FROM orders") == [[1]], 60, "the first row to be delivered")
            install_apply_counter(turso.url, "orders")
            cloud.stalls = [30.0]
            with conn.transaction():
                for n in range(10, 16):
                    conn.execute("INSERT INTO orders VALUES (%s, 'acme', 'large')", (n,))
            assert_ddl_never_waits_while_turso_holds_a_request(conn, dsn, cloud)
            wait_until(lambda: delivered_after_the_hang(dsn, cloud), 120, "the worker to deliver after the hang")
            expected = [[n] for n in [1, *range(10, 16)]]
            assert turso.query("SELECT id FROM orders ORDER BY id") == expected, worker.output[-3000:]
            assert turso.query("SELECT id FROM applied ORDER BY id") == expected[1:], worker.output[-3000:]
        finally:
            worker.stop()


def test_the_looks_while_a_wake_lock_stays_busy_back_off_only_after_ten_found_nothing():
    """A busy moment (writers committing) keeps the 10 ms look of before; a lock busy for ten empty looks in a
    row (100 ms) is a long-open writer: the wait doubles from there, capped at 200 ms."""
    from pgturso.run.waiting import busy_look_wait

    assert [busy_look_wait(n) for n in range(16)] == [0.01] * 10 + [0.02, 0.04, 0.08, 0.1, 0.1, 0.1]
    assert busy_look_wait(10**6) == 0.1


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # wal captures take no wake lock
def test_an_open_writer_makes_the_idle_worker_neither_write_its_state_nor_poll_every_10_ms(
        conn, dsn, turso: TursoServer, capture):
    """A transaction that wrote a tracked table while the worker was awake holds that table's wake lock shared
    until it ends, so the worker cannot sleep and must look at the outbox for what commits meanwhile. Its state
    is 'idle' all along: recording it again on every look cost an UPDATE of delivery_state a hundred times a
    second for as long as the transaction stayed open (or a prepared one waited for COMMIT PREPARED); and
    looking every 10 ms cost about a hundred polls of the outbox a second. The looks now back off (to 200 ms)
    while they find nothing, and what another session commits meanwhile still arrives."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    table_id = conn.execute("SELECT id FROM pgturso.tracked_table").fetchone()[0]
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()

    def counters() -> tuple[int, int]:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute(
            "SELECT (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'pgturso.delivery_state'::regclass), "
            "(SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            " WHERE relid = 'pgturso.outbox'::regclass)").fetchone()

    try:
        wait_until(lambda: _worker_sleeps(conn), 60, "the worker to go idle")
        with psycopg.connect(dsn) as writer:
            # What a capture does when it finds the worker awake: hold the table's wake lock shared.
            writer.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", (WAKE_LOCK_CLASS, table_id))
            conn.execute("NOTIFY pgturso")  # wake the worker: it cannot sleep again while the writer is open
            wait_until(lambda: not _worker_sleeps(conn), 30, "the worker to wake")
            updates_before, polls_before = counters()
            time.sleep(2)  # the worker looks meanwhile: about 200 times at a fixed 10 ms
            conn.execute("SELECT pg_stat_force_next_flush()")
            time.sleep(1.5)  # its statistics reach the shared counters at most a second later
            updates_after, polls_after = counters()
            assert not _worker_sleeps(conn)
            # Another session's commit, which found the worker awake and sent no NOTIFY, still arrives.
            conn.execute("INSERT INTO t VALUES (1)")
            wait_until(lambda: turso.query("SELECT id FROM t") == [[1]], 30, "the row committed meanwhile")
        assert updates_after - updates_before < 10, \
            f"delivery_state updated {updates_after - updates_before} times while the worker was idle"
        assert polls_after - polls_before < 50, f"the outbox was scanned {polls_after - polls_before} times"
    finally:
        worker.stop()
