"""What the operational surface says is true: wait_for_sync, verify (and repair), status, skip_transaction,
and a worker started while Postgres is down (issue 18's cases, each reproduced against real parts)."""

from __future__ import annotations

import contextlib
import io
import shutil
import signal
import socket
import subprocess
import threading
from typing import Any

import psycopg
import pytest
from conftest import WORKER, drain, pending, run_worker
from pgturso.delivery.targets import open_target
from pgturso.run.worker import DELIVERY_LOCK_CLASS
from pgturso.verify import TableReport, Verifier
from support.turso import TursoServer, read_rows
from support.workers import WorkerProcess, outbox_empty, wait_until


def verify(dsn: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WORKER, "verify", "--dsn", dsn, "--url", url, "--settle-timeout", "1", *args],
                          capture_output=True, text=True, timeout=300)


def status(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WORKER, "status", "--dsn", dsn], capture_output=True, text=True, timeout=60)


@pytest.fixture
def second_turso():
    server = TursoServer().start()
    yield server
    server.cleanup()


# -- wait_for_sync -----------------------------------------------------------------------------------------


def test_wait_for_sync_covers_pending_initial_copies_and_resyncs(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 30000) g")
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1", "--copy-chunk-rows", "1000").start()
    try:
        conn.execute("SELECT pgturso.track_table('t')")  # large: copied by the worker, in chunks
        assert conn.execute("SELECT pgturso.wait_for_sync('120 s')").fetchone() == (True,)
        assert turso.query("SELECT count(*) FROM t") == [[30000]]

        conn.execute("SELECT pgturso.resync_table('t')")
        conn.execute("UPDATE t SET v = 'mine' WHERE id = 1")
        assert conn.execute("SELECT pgturso.wait_for_sync('120 s')").fetchone() == (True,)
        assert turso.query("SELECT count(*) FROM t") == [[30000]]
        assert turso.query("SELECT v FROM t WHERE id IN (1, 30000) ORDER BY id") == [["mine"], ["v30000"]]

        # verify's re-check waits the same way: a copy in progress is not a difference.
        conn.execute("SELECT pgturso.resync_table('t')")
        checked = subprocess.run([*WORKER, "verify", "--dsn", dsn, "--url", turso.url, "--settle-timeout", "120"],
                                 capture_output=True, text=True, timeout=300)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        worker.stop()


def test_wait_for_sync_without_a_worker_times_out_on_a_pending_copy(conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("INSERT INTO t SELECT generate_series(1, 20000)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("DELETE FROM pgturso.outbox")  # as if the create were delivered: only the copy is left
    assert conn.execute("SELECT pgturso.wait_for_sync('0.3 s')").fetchone() == (False,)


def test_wait_for_sync_waits_for_a_copy_begun_during_the_wait_whose_last_chunk_commits_after_anothers(conn, dsn):
    """Two copies begin during the wait (resync_table of two tables; or a worker's recopy of two targets) and
    their last chunks run at once: a's chunk transaction starts first and commits last. The wait sees b finish
    (copy_finished_at, its transaction's start, after the call) and takes a new snapshot, in which a's chunk is
    still uncommitted; when a's commits, its copy_finished_at is earlier than b's. The rows of a, committed
    before the call, are then in no snapshot the wait checks: it must not say true until they are delivered.
    Delivery is simulated by deleting what is pending, as in the test above (no worker runs)."""
    for name in ("a", "b", "c"):
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
        conn.execute(f"INSERT INTO {name} SELECT generate_series(1, 5)")
        conn.execute(f"SELECT pgturso.track_table('{name}')")  # small: copied inline
    conn.execute("DELETE FROM pgturso.outbox")  # as if delivered
    conn.execute("INSERT INTO c VALUES (6)")  # pending at the call: the wait does not end at once
    table_id = dict(conn.execute("SELECT relid::regclass::text, id FROM pgturso.tracked_table").fetchall())
    answer: list[Any] = []

    def wait() -> None:
        with psycopg.connect(dsn, autocommit=True) as waiter:
            answer.append(waiter.execute("SELECT pgturso.wait_for_sync('8 s')").fetchone())

    waiting = threading.Thread(target=wait)
    waiting.start()
    try:
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%wait_for_sync(''8 s'')%' "
            "AND pid <> pg_backend_pid()").fetchone()[0] == 1, 30, "the wait to begin")
        conn.execute("SELECT pgturso.resync_table('a'), pgturso.resync_table('b')")  # copies begin in the wait
        conn.execute("DELETE FROM pgturso.outbox")  # c's row and the copies' creates delivered
        with psycopg.connect(dsn) as last_a, psycopg.connect(dsn) as last_b:
            assert last_a.execute("SELECT pgturso._copy_chunk(%s, 1000)", (table_id["a"],)).fetchone() == (5,)
            last_a.execute("SELECT pg_sleep(0.05)")  # b's chunk transaction starts later (copy_finished_at)
            assert last_b.execute("SELECT pgturso._copy_chunk(%s, 1000)", (table_id["b"],)).fetchone() == (5,)
            last_b.commit()
            conn.execute("SELECT pg_sleep(0.5)")  # the wait sees b finished and looks again from there
            assert not answer
            conn.execute("DELETE FROM pgturso.outbox")  # b's copy delivered (a's chunk is uncommitted)
            last_a.commit()
        assert conn.execute("SELECT count(*) FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id "
                            "WHERE l.table_id = %s", (table_id["a"],)).fetchone()[0] > 0  # a's rows: not delivered
    finally:
        waiting.join()
    assert answer == [(False,)]


# -- pgturso.sync() inside a transaction -----------------------------------------------------------------------


def test_sync_in_a_transaction_holding_a_table_being_copied_leaves_the_copy(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20000) g")
    conn.execute("SELECT pgturso.track_table('t')")  # large: a chunked copy is pending
    dbname = conn.info.dbname
    # A copy chunk waiting for the caller's row lock would wait forever (the caller waits for sync()):
    # bound it, so that the failure this test guards against shows as an error, not a hang.
    conn.execute(f"ALTER DATABASE {dbname} SET lock_timeout = '10s'")
    try:
        with conn.transaction():
            conn.execute("UPDATE t SET v = 'mine' WHERE id = 1")
            conn.execute("SET LOCAL client_min_messages = notice")
            notices: list[str] = []
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            conn.execute("SELECT pgturso.sync(url => %s)", (turso.url,))
        assert any("copy of public.t" in n and "after COMMIT" in n for n in notices), notices
        assert turso.query("SELECT count(*) FROM t") == [[0]]  # created, its copy left for a later pass
        conn.execute("SELECT pgturso.sync(url => %s)", (turso.url,))
        assert turso.query("SELECT count(*) FROM t") == [[20000]]
        assert turso.query("SELECT v FROM t WHERE id = 1") == [["mine"]]
    finally:
        conn.execute(f"ALTER DATABASE {dbname} RESET lock_timeout")



def test_sync_in_the_transaction_that_skipped_a_transaction_does_not_wait_for_itself(conn, dsn, turso: TursoServer):
    """skip_transaction deletes outbox events and records the skip: a pass on another connection would wait
    for those row locks while this transaction waits for it. sync() says so and does nothing; after COMMIT
    it delivers the rest."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    read_rows(turso.url, "CREATE TRIGGER no_bad BEFORE INSERT ON t WHEN NEW.v = 'bad' "
                         "BEGIN SELECT RAISE(ABORT, 'no bad rows here'); END")
    conn.execute("INSERT INTO t VALUES (1, 'bad')")
    conn.execute("INSERT INTO t VALUES (2, 'good')")
    txid = conn.execute("SELECT min(txid)::text FROM pgturso.outbox").fetchone()[0]
    assert run_worker(dsn, turso.url).returncode == 2
    dbname = conn.info.dbname
    conn.execute(f"ALTER DATABASE {dbname} SET lock_timeout = '10s'")  # the failure shows as an error, not a hang
    try:
        with conn.transaction():
            conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'refused by Turso')", (txid,))
            conn.execute("SET LOCAL client_min_messages = notice")
            notices: list[str] = []
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            assert conn.execute("SELECT pgturso.sync(url => %s)", (turso.url,)).fetchone() == (0,)
        assert any("after COMMIT" in n and "skipped_transaction" in n for n in notices), notices
        assert conn.execute("SELECT pgturso.sync(url => %s)", (turso.url,)).fetchone()[0] >= 1
    finally:
        conn.execute(f"ALTER DATABASE {dbname} RESET lock_timeout")
    assert turso.query("SELECT id, v FROM t") == [[2, "good"]]
    assert pending(conn) == 0

# -- verify ------------------------------------------------------------------------------------------------


def test_verify_finds_extra_turso_rows_with_keys_at_or_below_zero(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    # An INTEGER PRIMARY KEY is SQLite's rowid: these two sort before any rowid > 0.
    read_rows(turso.url, "INSERT INTO t VALUES (0, 'zero'), (-5, 'minus five')")
    found = verify(dsn, turso.url)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "DIFFERENT (postgres 20 rows, turso 22 rows; 0 missing or different, 2 extra" in found.stdout
    assert "(0,)" in found.stdout and "(-5,)" in found.stdout


def test_a_count_mismatch_is_never_equal():
    assert TableReport("t", "t", postgres_rows=5, turso_rows=5).equal
    assert not TableReport("t", "t", postgres_rows=20, turso_rows=22).equal


def test_repair_does_not_delete_a_row_reinserted_while_verify_ran(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    conn.execute("DELETE FROM t WHERE id = 7")  # pending: no worker runs, so Turso still has 7
    target = open_target(turso.url, None, max_request_bytes=1 << 20, timeout=30)
    try:
        with psycopg.connect(dsn, autocommit=True) as verify_conn:
            verifier = Verifier(verify_conn, target, progress=io.StringIO())
            ((relation, layout_id, layout),) = verifier.tables()
            report = verifier.verify(relation, layout, settle_timeout=0.2)
            assert report.extra == [[7]]
            conn.execute("INSERT INTO t VALUES (7, 'back')")  # after verify looked, before repair
            verifier.repair(relation, layout_id, layout, report)
    finally:
        target.close()
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t WHERE id = 7") == [[7, "back"]]
    assert verify(dsn, turso.url).returncode == 0


# -- skip_transaction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_skip_transaction_skips_it_for_the_refusing_target_only(conn, dsn, turso: TursoServer,
                                                               second_turso: TursoServer, capture: str):
    conn.execute("SELECT pgturso.add_target('eu', %s)", (second_turso.url,))
    conn.execute("CREATE TABLE home (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE abroad (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('home')")
    conn.execute("SELECT pgturso.track_table('abroad', target => 'eu')")
    drain(dsn, turso.url)
    drain(dsn, "", "--target", "eu")
    read_rows(turso.url, "CREATE TRIGGER no_bad BEFORE INSERT ON home WHEN NEW.v = 'bad' "
                         "BEGIN SELECT RAISE(ABORT, 'no bad rows here'); END")
    with conn.transaction():  # one source transaction, both targets; only default refuses it
        conn.execute("INSERT INTO home VALUES (1, 'bad')")
        conn.execute("INSERT INTO abroad VALUES (1, 'fine')")
    conn.execute("INSERT INTO home VALUES (2, 'after')")
    assert run_worker(dsn, turso.url).returncode == 2
    txid = conn.execute("SELECT last_error_txid::text FROM pgturso.delivery_state WHERE target = 'default'"
                        ).fetchone()[0]

    conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'refused by default''s trigger')", (txid,))
    if capture == "trigger":  # wal: the slot keeps them; the worker drops the skipped ones as it reads them
        assert pending(conn) == 2, "eu's change of that transaction, and the next one, stay queued"
    drain(dsn, "", "--target", "eu")
    assert second_turso.query("SELECT id, v FROM abroad") == [[1, "fine"]]
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM home") == [[2, "after"]]
    assert conn.execute("SELECT target, rows, tables FROM pgturso.skipped_transaction").fetchall() == [
        ("default", 1, ["public.home"])]


def test_skip_transaction_needs_a_target_when_it_cannot_tell_which(conn, dsn, second_turso: TursoServer):
    conn.execute("SELECT pgturso.add_target('eu', %s)", (second_turso.url,))
    conn.execute("CREATE TABLE home (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE abroad (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('home')")
    conn.execute("SELECT pgturso.track_table('abroad', target => 'eu')")
    conn.execute("DELETE FROM pgturso.outbox")
    with conn.transaction():
        conn.execute("INSERT INTO home VALUES (1)")
        conn.execute("INSERT INTO abroad VALUES (1)")
    txid = conn.execute("SELECT DISTINCT txid::text FROM pgturso.outbox").fetchone()[0]
    with pytest.raises(psycopg.Error, match="touches tables of targets default, eu") as ambiguous:
        conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'why')", (txid,))
    assert "target =>" in ambiguous.value.diag.message_hint
    assert conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'why', target => 'eu')", (txid,)
                        ).fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id "
                        "JOIN pgturso.tracked_table t ON t.id = l.table_id WHERE t.target = 'default'"
                        ).fetchone() == (1,)


# -- status ----------------------------------------------------------------------------------------------------


def _target_state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute("SELECT worker_status, last_error, previous_error, previous_error_at IS NOT NULL "
                       "FROM pgturso.status").fetchone()
    assert row is not None
    return tuple(row)


def test_status_clears_an_error_once_delivery_recovered(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    turso.stop()
    assert run_worker(dsn, turso.url, "--retry-limit", "1").returncode == 1
    state = _target_state(conn)
    assert state[0] == "stopped" and "gave up" in state[1]
    down = status(dsn)
    assert down.returncode == 1 and "gave up" in down.stdout  # a worker that gave up is a current failure

    turso.start()
    drain(dsn, turso.url)
    state = _target_state(conn)
    assert state[0] == "stopped" and state[1] is None, "the error is history now"
    assert "gave up" in state[2] and state[3]
    shown = status(dsn)
    assert shown.returncode == 0, shown.stdout
    assert "previous error" in shown.stdout and "gave up" in shown.stdout


def test_status_tells_a_killed_worker_from_a_live_one(conn, dsn, turso: TursoServer):
    assert DELIVERY_LOCK_CLASS == 1885828210, "pgturso.target_status names the delivery lock by this number"
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    wait_until(lambda: _target_state(conn)[0] == "idle", 30, "the worker to be idle")
    assert conn.execute("SELECT worker_alive FROM pgturso.status").fetchone() == (True,)
    assert status(dsn).returncode == 0
    worker.kill()
    wait_until(lambda: _target_state(conn)[0] == "not running", 30, "status to notice the dead worker")
    assert conn.execute("SELECT worker_alive FROM pgturso.status").fetchone() == (False,)
    shown = status(dsn)
    assert shown.returncode == 1 and "worker not running (was idle" in shown.stdout


# -- a different or older Turso database -----------------------------------------------------------------------


def _rows(conn: psycopg.Connection[Any]) -> list[list[Any]]:
    return [list(r) for r in conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()]


def test_a_changed_url_gets_a_full_copy_not_just_the_pending_changes(conn, dsn, turso: TursoServer,
                                                                    second_turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    conn.execute("UPDATE t SET v = 'changed' WHERE id <= 10")
    drain(dsn, turso.url)
    conn.execute("INSERT INTO t VALUES (101, 'pending when the URL changed')")
    # pgturso.url now names another database: it has none of what was delivered.
    moved = drain(dsn, second_turso.url)
    assert "event=target_behind" in moved.stderr and "copying its tables afresh" in moved.stderr
    # The pending insert was dropped (the copy carries it), recorded as a deletion of pending events.
    assert conn.execute("SELECT operation, events FROM pgturso.outbox_deletion").fetchall() == [("recopy_target", 1)]
    assert second_turso.query("SELECT id, v FROM t ORDER BY id") == _rows(conn)
    conn.execute("INSERT INTO t VALUES (102, 'later')")
    again = drain(dsn, second_turso.url)
    assert "target_behind" not in again.stderr, "once caught up, the new database is the one delivered to"
    assert second_turso.query("SELECT id, v FROM t ORDER BY id") == _rows(conn)


def test_an_older_copy_of_the_turso_database_is_brought_up_to_date(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    turso.stop()
    backup = turso.dir / "backup"
    backup.mkdir()
    for file in turso.dir.glob("replica.db*"):
        shutil.copy2(file, backup / file.name)
    turso.start()
    conn.execute("INSERT INTO t SELECT g, 'new' || g FROM generate_series(51, 60) g")
    conn.execute("DELETE FROM t WHERE id <= 5")
    conn.execute("UPDATE t SET v = 'updated' WHERE id = 20")
    drain(dsn, turso.url)
    assert turso.query("SELECT id, v FROM t ORDER BY id") == _rows(conn)

    turso.stop()  # the operator restores yesterday's copy of the Turso database
    for file in turso.dir.glob("replica.db*"):
        file.unlink()
    for file in backup.iterdir():
        shutil.copy2(file, turso.dir / file.name)
    turso.start()
    conn.execute("INSERT INTO t VALUES (61, 'after the restore')")
    restored = drain(dsn, turso.url)
    assert "event=target_behind" in restored.stderr
    assert turso.query("SELECT id, v FROM t ORDER BY id") == _rows(conn)


def test_status_that_cannot_be_read_is_not_healthy():
    shown = status("host=127.0.0.1 port=1 user=postgres dbname=nothing connect_timeout=2")
    assert shown.returncode == 2 and "cannot read pgturso.status" in shown.stderr
    assert "Traceback" not in shown.stderr


# -- the worker and a Postgres that is down ------------------------------------------------------------------


def test_worker_started_while_postgres_is_down_waits_for_it(pg_cluster, conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.close()
    pg_cluster.pg_ctl("stop", "-m", "fast", "-w")
    try:
        worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1", "--retry-max-delay", "0.5").start()
        wait_until(lambda: len(worker.lines("retry")) >= 2, 30, "the worker to retry connecting")
        assert worker.proc is not None and worker.proc.poll() is None, worker.output
        assert "bad_configuration" not in worker.output
    finally:
        pg_cluster.pg_ctl("start", "-w", "-l", str(pg_cluster.logfile))
    pg_cluster.wait_ready()
    with psycopg.connect(dsn, autocommit=True) as again:
        again.execute("INSERT INTO t VALUES (1, 'after the outage')")
    wait_until(lambda: outbox_empty(dsn), 60, "delivery once Postgres is up")
    assert turso.query("SELECT id, v FROM t") == [[1, "after the outage"]]
    assert worker.stop() == 0


class _SlowDoor:
    """A TCP forwarder to Postgres that keeps every connection waiting until ``opened`` is set: a Postgres slow
    to answer (a busy server, a long network path) while the worker connects."""

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.knocked = threading.Event()  # a connection arrived and waits
        self.opened = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.opened.set()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.knocked.set()
        self.opened.wait()
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)


def test_a_sigterm_while_the_worker_reads_its_settings_stops_it(conn, dsn, turso: TursoServer):
    """The worker is told to stop while it connects to Postgres to read its settings (systemctl stop right
    after start): it stops, and cleanly, instead of forgetting the signal once the settings arrive and running
    on until it is killed."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    door = _SlowDoor(conn.info.port)
    try:
        worker = WorkerProcess(dsn.replace(f"port={conn.info.port}", f"port={door.port}"), turso.url,
                               "--idle-wait", "1").start()
        assert worker.proc is not None
        wait_until(door.knocked.is_set, 60, "the worker to connect to read its settings")
        worker.proc.send_signal(signal.SIGTERM)
        door.opened.set()
        try:
            code = worker.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker ran on after SIGTERM: {worker.output[-3000:]}") from None
        assert code == 0, worker.output
        assert "event=stopped" in worker.output and "event=starting" not in worker.output, worker.output
    finally:
        door.close()


def test_worker_once_gives_up_on_a_postgres_that_stays_down(dsn):
    unreachable = "host=127.0.0.1 port=1 user=postgres dbname=nothing connect_timeout=2"
    result = subprocess.run([*WORKER, "run", "--once", "--dsn", unreachable, "--url", "http://127.0.0.1:1",
                             "--retry-limit", "2", "--retry-base-delay", "0.05"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr  # retries exhausted, not "bad configuration" (2)
    assert result.stderr.count("event=retry") == 2 and "event=giving_up" in result.stderr


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_skip_transaction_never_drops_the_schema_change_it_carries(conn, dsn, turso, capture):
    """The refused transaction also added a column. Skipping it must drop its row changes only: the schema
    change is not what Turso refused, and without it every later write to the table is refused too (and
    verify --repair, whose upserts name the new column, cannot repair it)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    read_rows(turso.url, "CREATE TRIGGER no_bad BEFORE INSERT ON t WHEN NEW.v LIKE 'bad%' "
                         "BEGIN SELECT RAISE(ABORT, 'no bad rows here'); END")
    with conn.transaction():
        conn.execute("ALTER TABLE t ADD COLUMN c int")
        conn.execute("INSERT INTO t VALUES (1, 'bad row', 10)")
    bad_txid = conn.execute("SELECT max(txid)::text FROM pgturso.outbox").fetchone()[0]  # its ALTER's event
    conn.execute("INSERT INTO t VALUES (2, 'good', 20)")
    result = run_worker(dsn, turso.url)
    assert result.returncode == 2 and "no bad rows here" in result.stderr, result.stderr
    assert conn.execute("SELECT last_error_txid::text FROM pgturso.status").fetchone()[0] == bad_txid

    skipped = conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'a row Turso refuses')", (bad_txid,))
    # the insert; the schema change stays (wal: the insert is in the slot, dropped and counted by the worker)
    assert skipped.fetchone()[0] == (1 if capture == "trigger" else 0)
    result = run_worker(dsn, turso.url)
    # The later, good transaction is delivered, with the column the skipped transaction added.
    assert result.returncode == 0, result.stderr
    assert turso.query("SELECT id, v, c FROM t ORDER BY id") == [[2, "good", 20]]
    assert conn.execute("SELECT events, rows, tables FROM pgturso.skipped_transaction").fetchall() == [
        (1, 1, ["public.t"])]
    assert pending(conn) == 0


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wait_for_sync_is_not_true_while_a_wal_targets_slot_is_missing(conn, dsn, turso, capture):
    """A wal target's slot is gone (a failover to a standby: Postgres 15 does not carry logical slots over; or
    an operator dropped it). A row committed since is on Turso only after the worker replaced the slot and
    copied the table again; until then wait_for_sync must not say it is there."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    drain(dsn, turso.url)
    conn.execute("SELECT pg_drop_replication_slot(pgturso._slot_name('default'))")
    conn.execute("INSERT INTO t VALUES (2, 'committed before the call')")
    synced = conn.execute("SELECT pgturso.wait_for_sync('1 second')").fetchone()[0]
    on_turso = turso.query("SELECT id FROM t ORDER BY id")
    assert on_turso == [[1]]  # no worker ran: row 2 is not on Turso
    assert synced is False, "wait_for_sync said every committed row is on Turso; row 2 is not"


def test_wait_for_sync_on_a_hot_standby_refuses_while_a_target_captures_from_the_wal(turso):
    """Read-your-writes from a replica: an application writes on the primary, then calls wait_for_sync on a hot
    standby before reading Turso. For a wal target what Turso confirmed is the primary's slot, which a standby
    cannot see: it must refuse, naming the fix, rather than answer true while the row, committed and replayed
    before the call, is not on Turso."""
    from test_guarantees import _ledger, _primary_and_standby, _wait_replayed

    with _primary_and_standby("logical") as (primary, start_standby):
        dsn = primary.dsn()
        _ledger(dsn, "wal")
        drain(dsn, turso.url)
        standby = start_standby()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO ledger VALUES (101, 'committed before the call')")
        _wait_replayed(primary, standby)
        with psycopg.connect(standby.dsn(), autocommit=True) as replica:
            assert replica.execute("SELECT count(*) FROM ledger WHERE id = 101").fetchone()[0] == 1
            with pytest.raises(psycopg.errors.RaiseException, match="cannot run on a standby") as refused:
                replica.execute("SELECT pgturso.wait_for_sync('1 second')")
            assert "on the primary" in (refused.value.diag.message_hint or "")
        assert turso.query("SELECT count(*) FROM ledger WHERE id = 101") == [[0]]  # no worker ran since
        with psycopg.connect(dsn, autocommit=True) as conn:  # the primary still answers, honestly
            assert conn.execute("SELECT pgturso.wait_for_sync('1 second')").fetchone()[0] is False
