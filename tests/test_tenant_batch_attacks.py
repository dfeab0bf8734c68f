"""Attacks on the pattern worker's one-statement tenant batch (Outbox.read_whole_batch: events, snapshot and
position read in one statement outside a transaction, deleted by name afterwards in autocommit; a round's
several tenants read in one statement and deleted in one) and on its scheduler (up to STEPS_QUEUED_PER_THREAD
steps handed out per thread, the pending-tenants walk skipped while enough tenants are due). Asserted on the
rows that arrived in each tenant's `file:` database, and on how often each row was written there (a Turso-side
trigger counts the writes)."""

from __future__ import annotations

import gc
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import pending
from support.workers import WorkerProcess, wait_until
from test_tenants import (
    _start_worker,
    applied_writes,
    count_postgres_writes,
    drain_pattern,
    install_file_apply_counter,
    pg_tenant_rows,
    postgres_writes,
    tenant_rows,
    two_tenants_counted,
)


def test_tenants_whose_databases_hang_never_starve_a_healthy_tenant(conn, dsn, tmp_path: Path):
    """Three tenants' databases accept connections and never answer (each step waits out request_timeout), one
    thread: at any moment one of them is being tried and the others wait out a short backoff, so there are
    always as many tenants 'due' as steps may be queued. A healthy tenant's new row must still arrive: it is
    found only by the pending-tenants walk (a busy worker hears no NOTIFY), which must not be skipped because
    failing tenants in backoff count as due."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(64)  # never accepted: a request is sent and no answer ever comes
    port = hanging.getsockname()[1]
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    bad = ["bad1", "bad2", "bad3"]
    for name in bad:
        conn.execute("SELECT pgturso.add_target(%s, %s)", (f"tenant-{name}", f"http://127.0.0.1:{port}"))
    conn.execute("INSERT INTO orders SELECT n, t, 'down' FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)", (bad,))
    conn.execute("INSERT INTO orders VALUES (10, 'good', 'first')")
    worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--tenant-threads", "1", "--idle-wait", "1",
                           env={"PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_RETRY_MAX_DELAY": "0.3",
                                "PGTURSO_REQUEST_TIMEOUT": "1.5"}).start()
    def delivered(tenant: str) -> bool:  # its database stays open (locked) in the worker: asked of Postgres
        return conn.execute("SELECT count(*) = 0 FROM pgturso.outbox WHERE tenant = %s", (tenant,)).fetchone()[0]

    try:
        wait_until(lambda: delivered("good"), 60, "the healthy tenant's first visit")
        conn.execute("INSERT INTO orders VALUES (11, 'good', 'second'), (12, 'good', 'third')")
        wait_until(lambda: delivered("good"), 60, "the healthy tenant's later rows, while three tenants hang")
        assert not delivered("bad1")
    finally:
        worker.stop()
        hanging.close()
    assert tenant_rows(tmp_path / "tenant-good.db", "SELECT id, item FROM orders ORDER BY id") == [
        (10, "first"), (11, "second"), (12, "third")]


class Crash(BaseException):
    """The worker process dying at a chosen point (nothing of the worker's own handling runs)."""


@pytest.fixture
def hooked_sends(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Callable[[], None]]]:
    """Run the callables queued under 'before' just before a tenant's one-statement batch is sent (after it was
    read), and those under 'after' once Turso committed it and before Postgres deletes it: the two windows in
    which the batch is held outside any Postgres transaction."""
    from pgturso.run import fanout

    hooks: dict[str, list[Callable[[], None]]] = {"before": [], "after": []}
    send = fanout.send_batch

    def run(when: str) -> None:
        queued, hooks[when] = hooks[when], []
        for hook in queued:
            hook()

    def hooked(target: Any, statements: Any, marker: Any) -> int:
        run("before")
        sent = send(target, statements, marker)
        run("after")
        return sent

    monkeypatch.setattr(fanout, "send_batch", hooked)
    return hooks


def in_process_pattern_worker(dsn: str) -> Any:
    from pgturso.common.settings import resolve
    from pgturso.run.fanout import PatternWorker

    pattern = PatternWorker(dsn, resolve({}, {}, {"target": "tenant-%s"}))
    pattern._connect()
    return pattern


def tenant_worker(pattern: Any, value: str) -> Any:
    """The pattern worker's TenantWorker of tenant ``value``, as its scan makes one (without its lock)."""
    from pgturso.run.fanout import TENANTS

    for name, tenant, url, token in pattern.conn.execute(TENANTS, (pattern.pattern,)).fetchall():
        if tenant == value:
            return pattern._tenant(name, tenant, (url, token))
    raise AssertionError(f"no tenant {value!r}")


def assert_every_write_arrived_once(conn: psycopg.Connection[Any], tmp_path: Path, *tenants: str) -> None:
    for tenant in tenants:
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item FROM orders ORDER BY id") == pg_tenant_rows(conn, tenant), tenant
        assert applied_writes(path) == postgres_writes(conn, tenant), tenant
    assert pending(conn) == 0


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
def test_transactions_open_during_a_one_statement_read_that_commit_in_its_windows_arrive_once_in_order(
        conn, dsn, tmp_path: Path, isolation: str, hooked_sends):
    """Two transactions hold lower outbox ids than the batch's last one while a tenant's batch is read in one
    statement: one (a deferred constraint trigger that writes at commit, a savepoint rolled back, a tenant
    move) commits between the read and the send, with a new autocommit write; the other commits after Turso
    committed the batch and before Postgres deleted it. The deletion by the batch's name must leave them all,
    the next one-statement batches deliver them, and the batch's position is past the commits it read."""
    two_tenants_counted(conn, dsn, tmp_path)
    conn.execute("CREATE FUNCTION defer_echo() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "INSERT INTO orders VALUES (NEW.id + 1000, NEW.tenant_id, 'deferred echo'); RETURN NULL; END $$")
    conn.execute("CREATE CONSTRAINT TRIGGER defer_echo AFTER INSERT ON orders DEFERRABLE INITIALLY DEFERRED "
                 "FOR EACH ROW WHEN (NEW.item = 'defer') EXECUTE FUNCTION defer_echo()")
    first = psycopg.connect(dsn)
    second = psycopg.connect(dsn)
    try:
        for session in (first, second):
            session.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        first.execute("INSERT INTO orders VALUES (1, 'acme', 'open'), (2, 'acme', 'defer')")
        with first.transaction():  # a savepoint, rolled back: nothing of it may arrive
            first.execute("INSERT INTO orders VALUES (3, 'acme', 'rolled back')")
            first.execute("UPDATE orders SET item = 'rolled back' WHERE id = 100")
            raise psycopg.Rollback()
        first.execute("UPDATE orders SET tenant_id = 'globex', item = 'moved' WHERE id = 100")
        second.execute("INSERT INTO orders VALUES (4, 'acme', 'open too')")
        second.execute("UPDATE orders SET item = 'g2' WHERE id = 200")
        conn.execute("INSERT INTO orders VALUES (5, 'acme', 'read'), (6, 'globex', 'read')")
        read_after = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        hooked_sends["before"] += [first.commit,
                                   lambda: conn.execute("INSERT INTO orders VALUES (7, 'acme', 'during send')")]
        rolled_back: list[str] = []

        def commit_second() -> None:
            try:
                second.commit()
            except psycopg.errors.SerializationFailure:  # SERIALIZABLE may refuse it: then nothing of it arrives
                rolled_back.append("open too")

        hooked_sends["after"].append(commit_second)
        written = ("open", "defer", "open too", "read", "during send", "deferred echo")
        pattern = in_process_pattern_worker(dsn)
        try:
            acme = tenant_worker(pattern, "acme")
            acme.step(pattern._pool_connection, True)
            batch = acme._sending
            assert batch is not None and batch.event_count == 1 and batch.held == []
            # The position was taken in the read's statement after its events' commits (a server without it
            # may lack them): at least the WAL position seen just after the last of those commits.
            assert conn.execute("SELECT %s::pg_lsn >= %s::pg_lsn",
                                (batch.position["lsn"], read_after)).fetchone()[0], (batch.position, read_after)
            assert items_pending(conn, "acme", *written) == [w for w in written if w not in ("read", *rolled_back)]
            acme.step(pattern._pool_connection, True)  # what committed in the windows: a whole batch again
            assert acme._sending is not batch and items_pending(conn, "acme", *written) == []
            acme.close_target()
        finally:
            pattern._shut_down()
    finally:
        first.close()
        second.close()
    drain_pattern(dsn)
    assert pg_tenant_rows(conn, "acme") == [(1, "open"), (2, "defer"), *([(4, "open too")] if not rolled_back else []),
                                            (5, "read"), (7, "during send"), (1002, "deferred echo")]
    assert_every_write_arrived_once(conn, tmp_path, "acme", "globex")


def items_pending(conn: psycopg.Connection[Any], tenant: str, *items: str) -> list[str]:
    """Which of ``items`` (values of orders.item) an event of ``tenant`` still in the outbox carries."""
    payloads = [p for (p,) in conn.execute(
        "SELECT payload FROM pgturso.outbox WHERE tenant = %s AND payload IS NOT NULL", (tenant,))]
    return [item for item in items if any(json.dumps(item) in p for p in payloads)]


def test_a_worker_dying_around_a_one_statement_batch_applies_it_once_and_a_stale_one_is_fenced(
        conn, dsn, tmp_path: Path, hooked_sends):
    """The worker dies between reading a tenant's batch and sending it (nothing happened), then between Turso's
    commit and the autocommit delete: a fresh worker must forget the batch by the marker, not apply it again;
    and the dead worker's tenant state (stale marker, 'recovered') stepped again after the fresh worker
    delivered more (a queued step of a tenant whose lock was lost) must be fenced, then recover and deliver,
    each write applied once."""
    two_tenants_counted(conn, dsn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'one'), (2, 'globex', 'two')")

    def crash() -> None:
        raise Crash

    pattern = in_process_pattern_worker(dsn)
    try:
        acme = tenant_worker(pattern, "acme")
        hooked_sends["before"].append(crash)
        with pytest.raises(Crash):
            acme.step(pattern._pool_connection, True)
        assert items_pending(conn, "acme", "one") == ["one"]
        hooked_sends["after"].append(crash)
        with pytest.raises(Crash):
            acme.step(pattern._pool_connection, True)
        assert items_pending(conn, "acme", "one") == ["one"]  # committed on Turso, not deleted
        acme.close_target()
        drain_pattern(dsn)  # a fresh worker: recovers acme from its marker (forgets, does not resend)
        assert pending(conn) == 0
        conn.execute("INSERT INTO orders VALUES (3, 'acme', 'three')")
        drain_pattern(dsn)  # and delivers past it: the marker on Turso moves on
        conn.execute("INSERT INTO orders VALUES (4, 'acme', 'four')")
        # The dead worker's state, stepped late: its marker is two batches old.
        again = acme.step(pattern._pool_connection, True)
        assert again is not None and not acme.recovered, "a stale marker must fence the batch"
        assert items_pending(conn, "acme", "four") == ["four"]
        assert acme.step(pattern._pool_connection, True) is None  # recovered from the marker, delivered
        acme.close_target()
    finally:
        pattern._shut_down()
    drain_pattern(dsn)
    assert_every_write_arrived_once(conn, tmp_path, "acme", "globex")


def test_a_file_databases_marker_fence_refuses_a_batch_written_over_a_marker_it_did_not_see(tmp_path: Path):
    """The fence on a `file:` database (every tenant's, in the usual setup): a batch sent over a marker that is
    no longer the target's is refused whole, its statements with it (pyturso runs the check, a SELECT, only if
    its row is fetched)."""
    from pgturso.common.errors import MarkerMoved
    from pgturso.delivery.pipeline import send_batch
    from pgturso.delivery.progress import CREATE_MARKER_SQL, marker_statements
    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    target = FileTarget(str(tmp_path / "fenced.db"))
    try:
        target.execute(CREATE_MARKER_SQL)
        target.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        send_batch(target, [Statement("INSERT INTO t VALUES (1)")], marker_statements("src", "M1", ""))
        send_batch(target, [Statement("INSERT INTO t VALUES (2)")], marker_statements("src", "M2", "M1"))
        with pytest.raises(MarkerMoved, match="another worker delivered"):
            send_batch(target, [Statement("INSERT INTO t VALUES (3)")], marker_statements("src", "M3", "M1"))
        assert target.query("SELECT id FROM t ORDER BY id") == [[1], [2]]
        assert target.query("SELECT applied_ids FROM _pgturso_progress") == [["M2"]]
    finally:
        target.close()


def test_a_late_delete_by_a_worker_that_lost_its_tenant_does_not_make_the_next_start_recopy_it(
        conn, dsn, tmp_path: Path, hooked_sends):
    """A worker that lost a tenant (a step already handed out when its connection and locks went) commits the
    batch on Turso; before its autocommit delete runs, another worker takes the tenant, forgets that batch by
    the marker and delivers one more. The late delete then finds nothing to remove: it must not record its
    older marker as the last one delivered, or the next start takes the tenant's database for an older copy
    and recopies every table (every row written again)."""
    from pgturso.run.worker import delivery_connection

    two_tenants_counted(conn, dsn, tmp_path)
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'one')")

    def stall() -> None:
        raise Crash  # the delete is run by hand below, late

    pattern = in_process_pattern_worker(dsn)
    try:
        acme = tenant_worker(pattern, "acme")
        hooked_sends["after"].append(stall)
        try:
            acme.step(pattern._pool_connection, True)
        except Crash:
            pass
        late = acme._sending
        assert late is not None and acme.outbox is not None
        acme.close_target()  # a file: database is open in one process at a time
        drain_pattern(dsn)  # another worker: recovers from the marker just committed, forgets the batch
        conn.execute("INSERT INTO orders VALUES (2, 'acme', 'two')")
        drain_pattern(dsn)
        acme.outbox.conn = delivery_connection(dsn)
        try:
            acme.outbox.remove_delivered(late)  # the stalled worker's delete, at last
        finally:
            acme.outbox.conn.close()
    finally:
        pattern._shut_down()
    conn.execute("INSERT INTO orders VALUES (3, 'acme', 'three')")
    result = drain_pattern(dsn, "--log-format", "json")
    assert "target_behind" not in result.stderr, result.stderr
    assert_every_write_arrived_once(conn, tmp_path, "acme", "globex")
    # Counted once, by the worker that forgot the batch; the late delete removed nothing and counts nothing.
    assert conn.execute("SELECT rows_delivered FROM pgturso.delivery_state WHERE target = 'tenant-acme'"
                        ).fetchone()[0] == len(pg_tenant_rows(conn, "acme"))


def test_two_workers_losing_their_locks_with_steps_queued_apply_every_tenants_rows_once(conn, dsn, tmp_path: Path):
    """Two pattern workers of one thread each (so up to two steps of tenants are handed out per worker, one
    waiting in the pool's queue) share twelve tenants while writers spread transactions over several tenants,
    a reference table and new tenants. Their schedulers' connections (which hold every delivery lock) are
    terminated again and again: each time the tenants change hands while the losing worker still has steps
    running or queued for them, which go on with no lock, fenced only by the marker on each tenant's database.
    Every tenant ends with exactly its rows, each written once (a Turso-side trigger counts the writes)."""
    import random
    import time

    from support.tenant_load import LedgerWriters
    from test_tenant_attacks import (
        assert_each_tenant_applied_its_rows_once,
        ledgers_and_notices_counted,
        start_pattern_worker,
        wait_until_drained,
    )

    tenants = [f"t{n:02d}" for n in range(12)]
    ledgers_and_notices_counted(conn, dsn, tmp_path, tenants)
    writers = LedgerWriters(dsn, tenants, most_tenants=3, most_rows=5, notice_chance=0.2, most_notices=1,
                            new_tenant_chance=0.05, pause=0.005)

    workers = [start_pattern_worker(dsn, tenant_threads=1, retry_max_delay=0.3) for _ in range(2)]
    rng = random.Random(11)
    try:
        writers.start()
        # Eight rounds that did terminate a scheduler's connection: on a loaded machine the workers may still be
        # starting (no connection to terminate yet) when the first rounds come.
        rounds, deadline = 0, time.monotonic() + 120
        while rounds < 8 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.0))
            rounds += conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) > 0 "
                                   "FROM pg_stat_activity WHERE application_name = 'pgturso-worker-pattern'"
                                   ).fetchone()[0]
        assert rounds == 8, f"only {rounds} rounds found a scheduler's connection to terminate"
        writers.stop()
        assert not writers.errors, writers.errors
        wait_until_drained(conn)
        for worker in workers:
            assert worker.stop() == 0, worker.output
    finally:
        writers.stop()
        for worker in workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.kill()
    assert any(w.lines("retry") for w in workers)  # the schedulers did lose their connections
    assert_each_tenant_applied_its_rows_once(conn, tmp_path, tenants)


def test_table_wide_events_between_a_tenants_data_in_one_statement_batch_apply_in_order(conn, dsn, tmp_path: Path):
    """One tenant's pending events, read whole in one statement, hold data, a TRUNCATE of the routed table
    (queued for every tenant), a column added and used, a new tenant and a reference table's rows: applied in
    outbox order as one batch, each write once."""
    two_tenants_counted(conn, dsn, tmp_path)
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("SELECT pgturso.track_table('notes', target => 'tenant-%s')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'before truncate'), (2, 'globex', 'before truncate')")
    conn.execute("INSERT INTO notes VALUES (1, 'n1')")
    conn.execute("TRUNCATE orders")
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (3, 'acme', 'after truncate')")
        conn.execute("ALTER TABLE orders ADD COLUMN note text")
        conn.execute("UPDATE orders SET note = 'noted' WHERE id = 3")
        conn.execute("INSERT INTO orders VALUES (4, 'initech', 'a new tenant', 'new')")
    conn.execute("UPDATE notes SET body = 'n1 again'")
    pattern = in_process_pattern_worker(dsn)
    try:
        acme = tenant_worker(pattern, "acme")
        assert acme.step(pattern._pool_connection, True) is None
        batch = acme._sending
        assert batch is not None and type(batch).__name__ == "WholeBatch" and batch.transactions >= 5
        assert items_pending(conn, "acme", "after truncate") == []
        acme.close_target()
    finally:
        pattern._shut_down()
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, item, note FROM orders ORDER BY id") == [
        (3, "after truncate", "noted")]
    assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT id, body FROM notes") == [(1, "n1 again")]
    drain_pattern(dsn)
    for tenant in ("acme", "globex", "initech"):
        path = tmp_path / f"tenant-{tenant}.db"
        assert tenant_rows(path, "SELECT id, item, note FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant, "id, item, note"), tenant
        assert tenant_rows(path, "SELECT id, body FROM notes") == [(1, "n1 again")], tenant
    # Written once each since the counters went in; a TRUNCATE removes rows without a write to count.
    assert applied_writes(tmp_path / "tenant-acme.db") == [1, 3, 3]
    assert applied_writes(tmp_path / "tenant-globex.db") == [2]
    assert pending(conn) == 0


def test_a_tenant_moved_to_a_new_database_while_the_worker_runs_gets_everything_there(conn, dsn, tmp_path: Path):
    """remove_target's HINT: to move a tenant, add_target its name with the new URL. A running pattern worker
    (which learns each tenant's URL from its scan) must deliver there from then on, with the rows it had."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'before'), (2, 'globex', 'other')")
    worker = WorkerProcess(dsn, "", "--target", "tenant-%s", "--idle-wait", "1").start()
    try:
        wait_until(lambda: pending(conn) == 0, 60, "the first delivery")
        conn.execute("SELECT pgturso.add_target('tenant-acme', %s)", (f"file:{tmp_path}/moved-acme.db",))
        conn.execute("INSERT INTO orders VALUES (3, 'acme', 'after')")
        # Its next scan (each second) sees the new URL; the new database, without a marker, is caught up whole.
        def copied_after_the_move() -> bool:
            log = worker.output
            return "event=target_behind" in log and "event=copy " in log[log.index("event=target_behind"):]

        wait_until(copied_after_the_move, 60, "the moved tenant's tables copied afresh to its new database")
        wait_until(lambda: pending(conn) == 0 and not conn.execute(
            "SELECT EXISTS (SELECT FROM pgturso.tracked_table WHERE copy_state = 'copying')").fetchone()[0],
            60, "the delivery after the move")
    finally:
        assert worker.stop() == 0, worker.output
    assert tenant_rows(tmp_path / "moved-acme.db", "SELECT id, item FROM orders ORDER BY id") == [
        (1, "before"), (3, "after")], worker.output


# -- rounds: several tenants' batches read in one statement and deleted in one (PatternWorker._run_round) ---------

ROUND = ("acme", "globex", "initech")


def recovered_round(conn: psycopg.Connection[Any], dsn: str, tmp_path: Path) -> tuple[Any, list[Any]]:
    """Three tenants with counted writes, and an in-process pattern worker whose TenantWorkers of them have had
    their first visit (a round takes recovered tenants only)."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("INSERT INTO orders SELECT 100 + n, t, 'first' FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)",
                 (list(ROUND),))
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    drain_pattern(dsn)
    for tenant in ROUND:
        install_file_apply_counter(tmp_path / f"tenant-{tenant}.db", "orders")
    count_postgres_writes(conn)
    pattern = in_process_pattern_worker(dsn)
    tenants = [tenant_worker(pattern, value) for value in ROUND]
    for tenant in tenants:
        assert tenant.step(pattern._pool_connection, True) is None and tenant.recovered
    return pattern, tenants


@contextmanager
def a_recovered_round(conn: psycopg.Connection[Any], dsn: str, tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    """recovered_round, its tenants' databases closed and its worker shut down at the end."""
    pattern, tenants = recovered_round(conn, dsn, tmp_path)
    try:
        yield pattern, tenants
        for tenant in tenants:
            tenant.close_target()
    finally:
        pattern._shut_down()


def test_a_round_deletes_what_turso_committed_and_leaves_a_failed_tenants_events_for_its_own_retry(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A round reads three tenants' batches in one statement (no tenant reads its own) and sends each; the middle
    tenant's database fails. The round's one deletion must remove exactly the two delivered batches: the failed
    tenant keeps its events, is shown retrying and waits out its own backoff, and its next visit delivers them;
    every write arrives once."""
    from pgturso.common.errors import TursoUnavailable
    from pgturso.run import fanout
    from pgturso.sources.outbox import Outbox

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        conn.execute("INSERT INTO orders VALUES (4, 'globex', 'g2'), (5, 'initech', 'i2')")
        send = fanout.send_batch

        def globex_down(target: Any, statements: Any, marker: Any) -> int:
            if "tenant-globex" in target.description:
                raise TursoUnavailable(f"{target.description}: down for the test")
            return send(target, statements, marker)

        def read_alone(self: Any) -> Any:
            raise AssertionError("a round's tenant read its own batch")

        counted = ("SELECT target, transactions_delivered, rows_delivered FROM pgturso.delivery_state "
                   "WHERE target = ANY (%s) ORDER BY target")
        names = [f"tenant-{t}" for t in ROUND]
        before = conn.execute(counted, (names,)).fetchall()
        monkeypatch.setattr(fanout, "send_batch", globex_down)
        monkeypatch.setattr(Outbox, "read_whole_batch", read_alone)
        outcomes = pattern._run_round(tenants)
        assert outcomes["tenant-acme"] is None and outcomes["tenant-initech"] is None, outcomes
        assert isinstance(outcomes["tenant-globex"], float) and outcomes["tenant-globex"] > 0, outcomes
        assert items_pending(conn, "acme", "a1") == [] and items_pending(conn, "initech", "i1", "i2") == []
        assert items_pending(conn, "globex", "g1", "g2") == ["g1", "g2"]
        acme, globex, initech = tenants
        assert (acme.attempts, globex.attempts, initech.attempts) == (0, 1, 0)
        # Each delivered batch counted once, in its own tenant's row; the failed tenant's not at all.
        assert [(t, tx - tx0, rows - rows0) for (t, tx, rows), (_, tx0, rows0) in
                zip(conn.execute(counted, (names,)).fetchall(), before, strict=True)] == [
            ("tenant-acme", 1, 1), ("tenant-globex", 0, 0), ("tenant-initech", 2, 2)]
        assert conn.execute("SELECT status, last_error LIKE '%down for the test%' FROM pgturso.delivery_state "
                            "WHERE target = 'tenant-globex'").fetchone() == ("retrying", True)
        monkeypatch.undo()
        conn.execute("INSERT INTO orders VALUES (6, 'acme', 'a2')")
        outcomes = pattern._run_round(tenants)  # globex recovers from its marker and delivers, on its own
        assert set(outcomes.values()) == {None}, outcomes
        assert pending(conn) == 0
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


@pytest.mark.parametrize("dies", ["after the second send", "in the deletion"])
def test_a_worker_dying_mid_round_leaves_each_tenant_to_recover_from_its_own_marker(
        conn, dsn, tmp_path: Path, hooked_sends, dies: str):
    """The worker dies in a round after Turso committed two tenants' batches and before the round's deletion (or
    its connection is cut as the deletion runs): nothing was deleted, and a fresh worker recovers each tenant
    from the marker on its database, forgetting what arrived and sending what did not, each write once."""
    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        sent: list[str] = []

        def note() -> None:
            sent.append("sent")
            if len(sent) == 2 and dies == "after the second send":
                raise Crash
            hooked_sends["after"].append(note)

        def cut() -> None:  # the pool connection terminated just before the round's deletion
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'pgturso-worker-tenant'")

        hooked_sends["after"].append(note)
        if dies == "after the second send":
            with pytest.raises(Crash):
                pattern._run_round(tenants)
            assert items_pending(conn, "acme", "a1") == ["a1"] and items_pending(conn, "globex", "g1") == ["g1"]
        else:
            from pgturso.run import fanout

            record = fanout.record_tenant_batches

            def cut_then_record(*args: Any) -> Any:
                cut()
                return record(*args)

            fanout.record_tenant_batches = cut_then_record  # type: ignore[assignment]
            try:
                outcomes = pattern._run_round(tenants)
            finally:
                fanout.record_tenant_batches = record  # type: ignore[assignment]
            assert all(isinstance(v, float) for v in outcomes.values()), outcomes
            assert not any(t.recovered for t in tenants)  # each recovers from its marker at its next visit
            assert items_pending(conn, "initech", "i1") == ["i1"]
    drain_pattern(dsn)  # a fresh worker: each tenant recovered from its own marker
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_round_mate_failing_unexpectedly_does_not_keep_its_closed_database_locked(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A round's tenant whose step fails with an unexpected error is reported (its outcome the exception) and its
    database closed, as a step's would be. pyturso lets go of a file's lock only when the connection object is
    freed, not at close(): the outcome kept with its traceback (whose frames hold the database object, and the
    round's outcomes, which hold the exception: a cycle only the garbage collector frees) kept the file locked
    after the close, so another worker taking the tenant over could not open it."""
    import gc
    import subprocess
    import sys

    from pgturso.run import fanout

    pattern, tenants = recovered_round(conn, dsn, tmp_path)
    send = fanout.send_batch

    def globex_breaks(target: Any, statements: Any, marker: Any) -> int:
        if "tenant-globex" in target.description:
            raise RuntimeError("an unexpected failure, for the test")
        return send(target, statements, marker)

    gc.disable()
    try:
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1')")
        monkeypatch.setattr(fanout, "send_batch", globex_breaks)
        outcomes = pattern._run_round(tenants)
        assert isinstance(outcomes["tenant-globex"], RuntimeError), outcomes
        del outcomes
        for tenant in tenants:
            tenant.close_target()  # as _collect closes a failed tenant's (and the idle ones' later)
        opened = subprocess.run(
            [sys.executable, "-c", "import sys, turso; turso.connect(sys.argv[1]).close()",
             str(tmp_path / "tenant-globex.db")], capture_output=True, text=True)
        assert opened.returncode == 0, opened.stderr[-300:]
    finally:
        gc.enable()
        pattern._shut_down()
    monkeypatch.undo()
    drain_pattern(dsn)
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_tenant_batch_whose_fsync_fails_stays_in_the_outbox_until_one_succeeds(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tenant's commit on its file: database makes no fsync of its own (synchronous = NORMAL): an fsync of its
    WAL makes it durable, after the commit when the tenant is stepped alone, for the whole round before its
    deletion otherwise. When that fsync fails the batch is committed on the file but not known to be durable:
    its events must stay in the outbox (alone and in a round, where the round's other tenants are deleted), and
    the marker read at the tenant's recovery must not forget them until an fsync succeeded. Once one does they
    are forgotten by the marker, not applied again."""
    import errno
    import os

    fsync = os.fsync
    broken = {"acme": False}

    def failing_for_acme(fd: int) -> None:
        if broken["acme"] and os.readlink(f"/proc/self/fd/{fd}").endswith("tenant-acme.db-wal"):
            raise OSError(errno.EIO, "Input/output error (for the test)")
        fsync(fd)

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        acme = tenants[0]
        monkeypatch.setattr(os, "fsync", failing_for_acme)
        broken["acme"] = True
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'one')")
        assert acme.step(pattern._pool_connection, False) is not None  # failed: a retry after a delay
        assert items_pending(conn, "acme", "one") == ["one"]
        assert tenant_rows(tmp_path / "tenant-acme.db", "SELECT item FROM orders WHERE id = 1") == [("one",)]
        assert acme.step(pattern._pool_connection, False) is not None  # recovery: the marker is not trusted
        assert items_pending(conn, "acme", "one") == ["one"]
        broken["acme"] = False
        assert acme.step(pattern._pool_connection, False) is None  # recovered: forgotten by the marker
        assert items_pending(conn, "acme", "one") == []

        # In a round: acme's fsync fails, the others' succeed and only theirs are deleted.
        conn.execute("INSERT INTO orders VALUES (2, 'acme', 'two'), (3, 'globex', 'three'), (4, 'initech', 'four')")
        broken["acme"] = True
        outcomes = pattern._run_round(tenants)
        assert outcomes["tenant-globex"] is None and outcomes["tenant-initech"] is None, outcomes
        assert isinstance(outcomes["tenant-acme"], float), outcomes
        assert items_pending(conn, "acme", "two") == ["two"]
        assert items_pending(conn, "globex", "three") == [] and items_pending(conn, "initech", "four") == []
        assert not acme.recovered
        assert acme.step(pattern._pool_connection, False) is not None  # still failing: still held
        assert items_pending(conn, "acme", "two") == ["two"]
        broken["acme"] = False
        assert acme.step(pattern._pool_connection, False) is None
        assert pending(conn) == 0
    monkeypatch.undo()
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


# Loaded first by the worker processes of the SIGKILL tests: records, for each tenant's WAL, how many of its
# bytes are known to be on disk (what an fsync covered: the WAL's size when it ran; 0 after a completed TRUNCATE
# checkpoint), so that the test can cut off what an OS crash may lose (cut_to_durable) and nothing more.
_RECORD_DURABLE = """
import json, os, threading
from pgturso.delivery import targets

_DURABLE = os.environ["PGTURSO_TEST_DURABLE"]
_lock = threading.Lock()

def _record(wal, size):
    with _lock:
        with open(_DURABLE) as f:
            known = json.load(f)
        known[os.path.abspath(wal)] = size
        with open(_DURABLE + ".new", "w") as f:
            json.dump(known, f)
        os.replace(_DURABLE + ".new", _DURABLE)

_sync = targets.PendingSync.sync

def recorded_sync(self, **how):
    wal = self.target.path + "-wal"
    size = os.path.getsize(wal)  # written before the fsync: covered by it
    _sync(self, **how)
    _record(wal, size)

_checkpoint = targets.FileTarget._checkpoint

def recorded_checkpoint(self):
    _checkpoint(self)
    if not os.path.getsize(self.path + "-wal"):
        _record(self.path + "-wal", 0)

targets.PendingSync.sync = recorded_sync
targets.FileTarget._checkpoint = recorded_checkpoint
"""

# `pgturso-worker run --once` that SIGKILLs itself at a chosen point of a tenant's visit (a real process death:
# nothing of the worker's own handling runs, the page cache keeps what it wrote), or (where = "never") a plain
# one that records its fsyncs.
_DYING_WORKER = _RECORD_DURABLE + """
import signal, sys
from pgturso.cli import main

where = sys.argv.pop(1)
commit = targets.FileTransaction.commit
sync = targets.PendingSync.sync

def dying_commit(self):
    if where == "after_commit":  # COMMIT ran (its WAL frames written, none fsynced), its fsync did not
        self.target.conn.execute("COMMIT")
        os.kill(os.getpid(), signal.SIGKILL)
    commit(self)

def dying_sync(self, **how):
    sync(self, **how)
    if where == "after_fsync" and self.commits:  # a commit's fsync, not recovery's; no Postgres deletion yet
        os.kill(os.getpid(), signal.SIGKILL)

targets.FileTransaction.commit = dying_commit
targets.PendingSync.sync = dying_sync
sys.exit(main(sys.argv[1:]))
"""


def durable_record(tmp_path: Path, tenants: tuple[str, ...]) -> Path:
    """The record of what is durable of each tenant's WAL (_RECORD_DURABLE), starting from now: everything the
    WALs hold (their commits were fsynced before their events left the outbox, and nothing is pending)."""
    record = tmp_path / "durable.json"
    record.write_text(json.dumps({
        str((tmp_path / f"tenant-{t}.db-wal").absolute()): (tmp_path / f"tenant-{t}.db-wal").stat().st_size
        for t in tenants if (tmp_path / f"tenant-{t}.db-wal").exists()}))
    return record


def run_dying_pattern_worker(dsn: str, where: str, record: Path) -> None:
    import os
    import subprocess
    import sys

    died = subprocess.run([sys.executable, "-c", _DYING_WORKER, where, "run", "--once", "--dsn", dsn, "--target",
                           "tenant-%s"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PGTURSO_RETRY_BASE_DELAY": "0.05", "PGTURSO_TEST_DURABLE": str(record)})
    assert died.returncode == (0 if where == "never" else -9), died.stderr


@pytest.mark.parametrize("power_lost", [False, True], ids=["wal_kept", "unsynced_frames_lost"])
def test_a_tenant_worker_sigkilled_between_commit_and_fsync_and_after_it_applies_each_batch_once(
        conn, dsn, tmp_path: Path, power_lost: bool):
    """A tenant's commit on its file: database fsyncs nothing of its frames (synchronous = NORMAL); the fsync of
    its WAL after it does. A worker SIGKILLed between the two leaves a WAL holding the batch and its marker, its
    events still in the outbox. The next worker opens that file with a non-empty WAL: it fsyncs it before
    trusting the marker in it, forgets the batch by that marker (not applied again), and delivers the next;
    SIGKILLed after that commit's fsync and before the Postgres deletion, a third worker forgets that one too.
    `unsynced_frames_lost`: what an OS crash may do instead of a SIGKILL, every WAL cut back to what an fsync
    covered: the batch was never forgotten in Postgres, so it is applied once, by the next worker."""
    two_tenants_counted(conn, dsn, tmp_path)
    wals = [tmp_path / f"tenant-{tenant}.db-wal" for tenant in ("acme", "globex")]
    record = durable_record(tmp_path, ("acme", "globex"))
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'one'), (2, 'globex', 'two')")
    sizes = [wal.stat().st_size for wal in wals]
    run_dying_pattern_worker(dsn, "after_commit", record)  # at the first tenant's commit (the other's may be under way)
    assert items_pending(conn, "acme", "one") == ["one"] and items_pending(conn, "globex", "two") == ["two"]
    assert any(wal.stat().st_size > size for wal, size in zip(wals, sizes, strict=True)), "a batch is in its WAL"
    if power_lost:
        assert cut_to_durable(record)
    conn.execute("INSERT INTO orders VALUES (3, 'acme', 'three'), (4, 'globex', 'four')")
    run_dying_pattern_worker(dsn, "after_fsync", record)
    run_dying_pattern_worker(dsn, "never", record)
    if power_lost:  # and again once everything was delivered: nothing Postgres forgot may sit in such frames
        cut_to_durable(record)
    assert_every_write_arrived_once(conn, tmp_path, "acme", "globex")


# A round of the three tenants of recovered_round in a real process SIGKILLed at a chosen point: after every
# tenant's commit and before the round's fsyncs, or after the fsyncs and before the round's deletion in Postgres.
_DYING_ROUND = _RECORD_DURABLE + """
import signal, sys
from pgturso.common.settings import resolve
from pgturso.run import fanout
import psycopg

where, dsn = sys.argv[1], sys.argv[2]
pattern = fanout.PatternWorker(dsn, resolve({}, {}, {"target": "tenant-%s"}))
pattern._connect()
tenants = [pattern._tenant(name, tenant, (url, token))
           for name, tenant, url, token in pattern.conn.execute(fanout.TENANTS, (pattern.pattern,)).fetchall()]
for tenant in tenants:
    assert tenant.step(pattern._pool_connection, True) is None and tenant.recovered
with psycopg.connect(dsn, autocommit=True) as writer:
    writer.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "before_fsync":  # every commit made, no fsync run: each one started beside the next sends never ends
    targets.PendingSync.sync = lambda self, **how: threading.Event().wait()
    fanout.PatternWorker._sync_round = die
elif where == "mid_fsyncs":  # acme's fsync ended, globex's runs (never ends), initech's started or queued
    acme_synced = threading.Event()

    def held_sync(self, **how):
        if self.target.path.endswith("tenant-acme.db"):
            recorded_sync(self, **how)
            acme_synced.set()
        else:
            threading.Event().wait()

    def die_once_acme_synced(*args):
        assert acme_synced.wait(60), "acme's fsync never ended"
        die()

    targets.PendingSync.sync = held_sync
    fanout.PatternWorker._sync_round = die_once_acme_synced
else:
    fanout.record_tenant_batches = die
pattern._run_round(tenants)
raise SystemExit("the round did not reach its kill point")
"""


@pytest.mark.parametrize("power_lost", [False, True], ids=["wal_kept", "unsynced_frames_lost"])
@pytest.mark.parametrize("where", ["before_fsync", "mid_fsyncs", "after_fsync"])
def test_a_round_sigkilled_around_its_group_fsync_applies_each_tenants_batch_once(
        conn, dsn, tmp_path: Path, where: str, power_lost: bool):
    """A round commits its tenants' batches without an fsync, starting each WAL's fsync as its commit returns
    (3f22dde), and waits for every one before its one deletion in Postgres. A real worker SIGKILLed after the
    commits and before any fsync ran (each held), while they run (acme's ended, globex's running, initech's
    started or queued), or after the fsyncs and before the deletion, leaves every event in the outbox; the next
    worker fsyncs each WAL before it trusts the marker in it and forgets what arrived. `unsynced_frames_lost`:
    every WAL cut back to what an fsync covered (what an OS crash may leave): the unsynced batches are gone from
    the files but not from the outbox, and are applied once."""
    import os
    import subprocess
    import sys

    pattern, tenants = recovered_round(conn, dsn, tmp_path)
    for tenant in tenants:
        tenant.close_target()
    pattern._shut_down()
    del pattern, tenants
    gc.collect()  # pyturso lets go of a file's lock when the connection is freed
    record = durable_record(tmp_path, ROUND)
    died = subprocess.run([sys.executable, "-c", _DYING_ROUND, where, dsn], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PGTURSO_TEST_DURABLE": str(record)})
    assert died.returncode == -9, died.stderr
    assert items_pending(conn, "acme", "a1") == ["a1"] and items_pending(conn, "globex", "g1") == ["g1"]
    assert items_pending(conn, "initech", "i1") == ["i1"]
    committed = [peek(tmp_path / f"tenant-{t}.db", "SELECT count(*) FROM orders WHERE id < 100") for t in ROUND]
    assert committed == [1, 1, 1]  # every batch committed on its file (and, after_fsync, fsynced)
    if power_lost:
        cut = cut_to_durable(record)
        cut_tenants = sorted(Path(wal).name.removeprefix("tenant-").removesuffix(".db-wal") for wal in cut)
        # fsynced frames are never cut
        assert cut_tenants == {"before_fsync": list(ROUND), "mid_fsyncs": ["globex", "initech"],
                               "after_fsync": []}[where], cut
    run_dying_pattern_worker(dsn, "never", record)
    if power_lost:
        cut_to_durable(record)
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def peek(path: Path, sql: str) -> Any:
    """One value read from a tenant's file by a connection dropped without close(), whose checkpoint would fsync
    the WAL (making durable what the test is about to cut as an OS crash would)."""
    import turso as pyturso

    db = pyturso.connect(str(path), isolation_level=None)
    value = db.execute(sql).fetchall()[0][0]
    del db
    gc.collect()
    return value


def cut_to_durable(record: Path) -> list[str]:
    """What an OS crash may leave of each tenant's WAL (synchronous = NORMAL): the bytes an fsync covered
    (_RECORD_DURABLE), and the header of a WAL restarted after a checkpoint (pyturso fsyncs it when it writes
    it), none of the frames written after. Returns the WALs cut."""
    cut = []
    for wal, durable in json.loads(record.read_text()).items():
        size = Path(wal).stat().st_size if Path(wal).exists() else 0
        keep = max(durable, min(size, 32))
        if size > keep:
            with open(wal, "r+b") as frames:
                frames.truncate(keep)
            cut.append(wal)
    return cut


@pytest.mark.parametrize("synchronous_commit", ["on", "off"])
def test_an_immediate_postgres_shutdown_with_wal_in_flight_after_turso_committed_a_batch_ends_exact(
        conn, dsn, tmp_path: Path, hooked_sends, pg_cluster, synchronous_commit: str):
    """A batch's marker records the server's WAL insert position when it was sent, which counts WAL that an open
    transaction inserted and nobody has written out yet. Postgres stopped with `-m immediate` right after Turso
    committed the batch loses WAL nobody flushed: had the position been left unflushed, the restarted server
    would be behind it, and the next worker would take the marker for one of another history and start over,
    copying every tenant's tables afresh (MarkerRecovery._start_over: safe, but a full recopy after every crash; it
    did).
    _source_position makes the WAL durable up to the position it gives before the batch is sent, so the worker
    carries on from the marker: no start-over, no copy, every tenant exact.

    With synchronous_commit = off for every session (the writers' and the worker's), the batch's own rows were
    committed asynchronously: unflushed at the crash they would be lost while Turso has them (the insert
    position saw that loss and recopied everything). The flush before sending makes them durable: they are
    still on Postgres after the crash, and nothing is recopied."""
    conn.execute("CREATE TABLE scratch (id int, filler text)")
    # The open transaction's WAL stays in its buffers: no WAL writer round, and no autovacuum commit (any commit
    # writes out the WAL before it).
    conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    conn.execute("ALTER SYSTEM SET autovacuum = off")
    conn.execute(f"ALTER SYSTEM SET synchronous_commit = {synchronous_commit}")  # "on" or "off": a literal
    conn.execute("SELECT pg_reload_conf()")
    try:
        pattern, tenants = recovered_round(conn, dsn, tmp_path)
        copies = "SELECT array_agg(copy_started_at ORDER BY id) FROM pgturso.tracked_table"
        copies_before = conn.execute(copies).fetchone()[0]
        with psycopg.connect(dsn, autocommit=True) as writer:
            assert writer.execute("SHOW synchronous_commit").fetchone()[0] == synchronous_commit
            writer.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1')")
        open_writer = psycopg.connect(dsn)
        open_writer.execute("INSERT INTO scratch SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g")

        def crash() -> None:
            raise Crash

        hooked_sends["after"].append(crash)
        with pytest.raises(Crash):
            tenants[0].step(pattern._pool_connection, True)  # acme's batch committed on Turso, not deleted
        pg_cluster.pg_ctl("stop", "-m", "immediate", "-w")
        open_writer.close()
        for tenant in tenants:
            tenant.close_target()
        pattern._shut_down()
    finally:
        pg_cluster.pg_ctl("start", "-w", "-l", str(pg_cluster.logfile))
        pg_cluster.wait_ready()
        with psycopg.connect(dsn, autocommit=True) as again:
            again.execute("ALTER SYSTEM RESET wal_writer_delay")
            again.execute("ALTER SYSTEM RESET autovacuum")
            again.execute("ALTER SYSTEM RESET synchronous_commit")
            again.execute("SELECT pg_reload_conf()")
    with psycopg.connect(dsn, autocommit=True) as again:
        worker = _start_worker(dsn)
        try:
            again.execute("INSERT INTO orders VALUES (3, 'initech', 'after the restart')")
            assert again.execute("SELECT pgturso.wait_for_sync('300 s')").fetchone()[0]
        finally:
            worker.stop()
        assert "source_history_changed" not in worker.output, worker.output
        # The batch's rows, committed before it was sent, survived the crash (flushed with the position).
        assert again.execute("SELECT id FROM orders WHERE id < 3 ORDER BY id").fetchall() == [(1,), (2,)]
        assert again.execute(copies).fetchone()[0] == copies_before, "no table was copied again"
        for tenant in ROUND:
            assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == \
                pg_tenant_rows(again, tenant), (tenant, worker.output)
        assert pending(again) == 0


@pytest.mark.parametrize("directory_fsync", ["succeeds", "fails"])
def test_first_visits_share_a_round_and_its_one_fsync_of_the_directory_of_the_files_they_created(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, directory_fsync: str):
    """Three tenants' first visits in one round (bench 11a: a copy into a thousand new databases): each recovers
    (no file yet: it creates it) and sends its batch; their WALs are fsynced side by side and the directory
    holding the three new files once, all before the round's one deletion. A failed fsync of that directory
    leaves every one of their batches' events in the outbox (their files' entries may not be on disk), and a
    fresh worker forgets them by the markers it finds: every row once."""
    import os

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders SELECT 100 + n, t, 'first' FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)",
                 (list(ROUND),))  # captured: one event per tenant, and the tenants registered
    pattern = in_process_pattern_worker(dsn)
    try:
        tenants = [tenant_worker(pattern, value) for value in ROUND]
        assert all(pattern._may_share_a_round(t) and not t.recovered for t in tenants)
        fsync = os.fsync
        synced: list[str] = []

        def recording_fsync(fd: int) -> None:
            name = os.readlink(f"/proc/self/fd/{fd}")
            synced.append(name)
            if directory_fsync == "fails" and name == str(tmp_path):
                raise OSError(5, "Input/output error")
            fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        outcomes = pattern._run_round(tenants)
        monkeypatch.undo()
        # Recovered in the round; after a failed fsync each recovers again from its marker at its next visit.
        assert all(t.recovered == (directory_fsync == "succeeds") for t in tenants)
        wals = sorted(name for name in synced if name.endswith("-wal"))
        assert wals == sorted(str(tmp_path / f"tenant-{t}.db-wal") for t in ROUND), synced
        assert synced.count(str(tmp_path)) == 1, synced  # once for the three files the round created
        assert synced.index(str(tmp_path)) > max(synced.index(w) for w in wals)
        if directory_fsync == "succeeds":
            assert set(outcomes.values()) == {None}, outcomes
            assert pending(conn) == 0
        else:
            assert all(isinstance(v, float) for v in outcomes.values()), outcomes
            assert all(items_pending(conn, t, "first") == ["first"] for t in ROUND)
        for tenant in tenants:
            tenant.close_target()
    finally:
        pattern._shut_down()
    drain_pattern(dsn)
    for tenant in ROUND:
        assert tenant_rows(tmp_path / f"tenant-{tenant}.db", "SELECT id, item FROM orders ORDER BY id") == \
            pg_tenant_rows(conn, tenant), tenant
    assert pending(conn) == 0
