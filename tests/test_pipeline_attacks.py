"""Attacks on the worker's pipeline (cd54158): no Postgres transaction stays open while Turso has a request, so a
batch too large to read ahead is read in parts by autocommit statements that select it by its name (its
snapshot), between the requests that carry them. What the outbox loses meanwhile (skip_transaction,
untrack_table delete pending events without waiting for the worker) must not cut a source transaction in two on
Turso: each arrives whole or not at all."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import pending, run_worker
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer, install_apply_counter
from support.workers import WorkerProcess, outbox_empty, wait_until
from test_lock_attacks import on_turso

LARGE_EVENTS = 60  # events of the large source transaction, 100 rows of ~200 bytes each: about 1.4 MB per table,
# more than a batch read at once (CLIENT_SIDE_BYTES), so it is read in parts
LARGE_ROWS = LARGE_EVENTS * 100
BACKLOG = 400  # one-row transactions, delivered in batches of 5


def write_large_transaction(conn: psycopg.Connection[Any], tables: tuple[str, ...]) -> str:
    """One source transaction of LARGE_ROWS rows in each of ``tables`` (read in parts, sent in 64 kB
    requests); its txid."""
    with conn.transaction():
        txid = str(conn.execute("SELECT pg_current_xact_id()").fetchone()[0])  # type: ignore[index]
        for k in range(LARGE_EVENTS):
            for table in tables:
                conn.execute(f"INSERT INTO {table} SELECT g, repeat('x', 200) "
                             "FROM generate_series(%s::int, %s::int) g", (k * 100 + 1, k * 100 + 100))
    return txid


STREAMING = ("--max-request-bytes", "65536", "--max-statement-bytes", "16384", "--idle-wait", "1")
SMALL_BATCHES = ("--batch-events", "5", "--idle-wait", "1")


@dataclass
class Tracked:
    """Tables tracked, a worker delivering them through a CloudProxy, their first rows on Turso and the first
    table's writes counted there (``applied``). ``worker`` may be replaced (a kill and a restart): the current
    one is stopped at the end."""

    dsn: str
    cloud: CloudProxy
    worker: WorkerProcess
    worker_args: tuple[str, ...]

    def restart(self) -> WorkerProcess:
        self.worker = WorkerProcess(self.dsn, self.cloud.url, *self.worker_args).start()
        return self.worker


@contextmanager
def tracked_behind_a_proxy(conn: psycopg.Connection[Any], dsn: str, turso: TursoServer,
                           worker_args: tuple[str, ...] = STREAMING, tables: tuple[str, ...] = ("t",),
                           stream_expiry: float = 120) -> Iterator[Tracked]:
    for table in tables:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.execute("SELECT pgturso.track_table(%s)", (table,))
    with CloudProxy(turso.url, None, stream_expiry=stream_expiry) as cloud:
        tracked = Tracked(dsn, cloud, WorkerProcess(dsn, cloud.url, *worker_args).start(), worker_args)
        try:
            for table in tables:
                conn.execute(f"INSERT INTO {table} VALUES (0, 'delivered')")
            first_rows = " + ".join(f"(SELECT count(*) FROM {table})" for table in tables)
            wait_until(lambda: on_turso(turso, f"SELECT {first_rows}") == [[len(tables)]], 60,
                       "the first rows to be delivered")
            install_apply_counter(turso.url, tables[0])
            yield tracked
        finally:
            tracked.worker.stop()


def a_backlog_behind(tracked: Tracked, conn: psycopg.Connection[Any], slow_answers: list[float] | None = None) -> None:
    """Stop the worker, commit BACKLOG one-row transactions into t (batches of 5, read ahead), start it again
    (the proxy answering its requests with ``slow_answers``' delays, when given)."""
    assert tracked.worker.stop() == 0
    for i in range(1, BACKLOG + 1):
        conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
    if slow_answers is not None:
        tracked.cloud.slow_answers = slow_answers
    tracked.restart()


def every_backlog_row_once(turso: TursoServer, tracked: Tracked, dsn: str) -> None:
    wait_until(lambda: outbox_empty(dsn), 120, "the worker to deliver the backlog")
    wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t") == [[BACKLOG + 1]], 60, "every row on Turso")
    assert turso.query("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM applied") == \
        [[BACKLOG, BACKLOG, 1, BACKLOG]], tracked.worker.output[-3000:]


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # a wal target's skip works on the slot
def test_skip_transaction_while_its_streamed_batch_travels_never_half_applies_it(conn, dsn, turso: TursoServer,
                                                                                 capture):
    """skip_transaction of the source transaction whose parts the worker is sending (Turso holds the first
    request): the worker no longer holds a snapshot or a lock on those events, so the parts still to read lose
    them. Turso must end with the whole transaction or none of it, never the first part alone."""
    with tracked_behind_a_proxy(conn, dsn, turso) as tracked:
        cloud = tracked.cloud
        cloud.answer_delays = [10.0]  # the large transaction's first request is answered 10 s late
        txid = write_large_transaction(conn, ("t",))
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the first part of the large transaction")
        skipped = conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'attack')", (txid,)).fetchone()[0]
        assert skipped == LARGE_EVENTS
        assert cloud.holding > 0, "Turso answered before the skip: nothing was shown (hold the request longer)"
        wait_until(lambda: cloud.holding == 0 and outbox_empty(dsn), 120, "the worker to settle after the hang")
        conn.execute("INSERT INTO t VALUES (-1, 'after')")
        wait_until(lambda: outbox_empty(dsn), 60, "the row after to be delivered")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t WHERE id = -1") == [[1]], 60, "the row after")
        applied = turso.query("SELECT count(*) FROM applied WHERE id > 0")[0][0]
        assert applied in (0, LARGE_ROWS), \
            f"Turso applied {applied} of the skipped transaction's {LARGE_ROWS} rows: it was cut in two"
        assert turso.query("SELECT count(*) FROM t WHERE id > 0")[0][0] == applied


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_untrack_table_while_a_streamed_transaction_travels_never_half_applies_it(conn, dsn, turso: TursoServer,
                                                                                  capture):
    """A source transaction writing two tables, streamed in parts; untrack_table of one of them while Turso holds
    the first part. The other table's rows all arrive; the untracked table's rows arrive whole or not at all
    (never the first part's alone: the transaction would be cut in two on Turso)."""
    with tracked_behind_a_proxy(conn, dsn, turso, tables=('a', 'b')) as tracked:
        cloud = tracked.cloud
        cloud.answer_delays = [10.0]
        write_large_transaction(conn, ("a", "b"))
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the first part of the large transaction")
        untracking = threading.Thread(target=lambda: psycopg.connect(dsn, autocommit=True).execute(
            "SELECT pgturso.untrack_table('a')"))
        untracking.start()
        untracking.join(60)
        assert cloud.holding > 0, "Turso answered before untrack_table: nothing was shown (hold it longer)"
        wait_until(lambda: cloud.holding == 0 and outbox_empty(dsn), 120, "the worker to settle after the hang")
        assert turso.query("SELECT count(*) FROM b WHERE id > 0") == [[LARGE_ROWS]], tracked.worker.output[-3000:]
        applied = turso.query("SELECT count(*) FROM applied WHERE id > 0")[0][0]
        assert applied in (0, LARGE_ROWS), \
            f"Turso applied {applied} of the transaction's {LARGE_ROWS} rows of the untracked table: cut in two"


def large_transaction_on_turso_once(turso: TursoServer, table: str = "t") -> bool:
    """Every row of the large transaction is on Turso and was written there exactly once (the counter)."""
    return (on_turso(turso, f"SELECT count(*) FROM {table} WHERE id > 0") == [[LARGE_ROWS]]
            and on_turso(turso, "SELECT count(*), count(DISTINCT id) FROM applied WHERE id > 0")
            == [[LARGE_ROWS, LARGE_ROWS]])


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
@pytest.mark.parametrize("fault", ["503", "hang", "garbage", "postgres_gone"])
def test_a_streamed_batch_failing_after_its_first_part_is_sent_again_whole_and_once(conn, dsn, turso: TursoServer,
                                                                                     capture, fault):
    """Turso holds the first part of a large source transaction; meanwhile the request of the next part is set
    to fail (a 503, a hang answered 504, a 200 of garbage), or the worker's Postgres session is terminated (its
    next part cannot be read). The half-sent Turso transaction is rolled back and the batch is sent again whole:
    every row arrives, each written once."""
    with tracked_behind_a_proxy(conn, dsn, turso) as tracked:
        cloud = tracked.cloud
        cloud.answer_delays = [3.0]
        write_large_transaction(conn, ("t",))
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the first part of the large transaction")
        sent_before = len(cloud.requests)
        if fault == "503":
            cloud.faults = [(503, "text/plain", "Service Unavailable")]
        elif fault == "hang":
            cloud.stalls = [2.0]
        elif fault == "garbage":
            cloud.faults = [(200, "application/json", '{"results": [{"type": "ok"')]
        else:
            terminated = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name LIKE 'pgturso%%' AND pid <> pg_backend_pid()").fetchone()[0]
            assert terminated >= 1
        assert cloud.holding > 0, "Turso answered before the fault was set: nothing was shown"
        wait_until(lambda: outbox_empty(dsn) and cloud.holding == 0, 120, "the worker to deliver after the fault")
        assert large_transaction_on_turso_once(turso), tracked.worker.output[-3000:]
        if fault != "postgres_gone":
            assert len(cloud.requests) > sent_before + 1, "the fault was never met: nothing was shown"
            assert tracked.worker.lines("retry"), tracked.worker.output[-3000:]


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_a_worker_killed_while_turso_holds_a_part_of_a_streamed_batch_delivers_it_once_after_restart(
        conn, dsn, turso: TursoServer, capture):
    """SIGKILL while Turso holds the first part of a large source transaction (its Turso transaction open, the
    next parts unread): the stream expires and rolls it back; a new worker sends the batch whole, each row
    written once."""
    with tracked_behind_a_proxy(conn, dsn, turso, stream_expiry=3) as tracked:
        cloud = tracked.cloud
        cloud.answer_delays = [20.0]
        write_large_transaction(conn, ("t",))
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the first part of the large transaction")
        tracked.worker.kill()
        tracked.restart()
        wait_until(lambda: outbox_empty(dsn), 120, "the restarted worker to deliver")
        assert large_transaction_on_turso_once(turso), tracked.worker.output[-3000:]


# trigger capture: a wal worker takes the backlog in a few large batches, done before the test can hold one
@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_worker_killed_after_turso_committed_a_batch_read_ahead_of_delivers_every_row_once(
        conn, dsn, turso: TursoServer, capture):
    """Small batches, read ahead: Turso commits batch N and its answer is held while the worker has read batch
    N+1 (in a transaction it rolled back) and waits. SIGKILL then: Postgres still has N's events pending (its
    deletion comes once Turso answered), Turso has N and its marker. The new worker recovers by the marker: N is
    not applied again, N+1 and the rest arrive, every row written once."""
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=SMALL_BATCHES, stream_expiry=3) as tracked:
        cloud = tracked.cloud
        a_backlog_behind(tracked, conn)
        wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                   "a few batches to be delivered")
        cloud.slow_answers = [20.0]  # the next answer: a batch Turso committed, the worker not told
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
        tracked.worker.kill()
        tracked.restart()
        every_backlog_row_once(turso, tracked, dsn)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_transactions_below_a_streamed_batchs_cut_committing_between_its_parts_arrive_once_and_whole(
        conn, dsn, turso: TursoServer, capture):
    """Two transactions open when the large one commits, their events' ids below its cut (they wrote first):
    one wrote in a released savepoint and a rolled-back one, the other straddles (writes again after the large
    one commits). The batch of the large transaction is chosen without them (they are in progress in its
    snapshot); they commit while Turso holds the batch's first part, so the parts read after, selecting the batch
    by its snapshot, must not take them in mid-batch, and they must not be skipped either: both arrive after, whole
    and once; the rolled-back savepoint's row never."""
    with tracked_behind_a_proxy(conn, dsn, turso) as tracked:
        cloud = tracked.cloud
        with psycopg.connect(dsn) as savepoints, psycopg.connect(dsn) as straddling:
            savepoints.execute("SAVEPOINT a")
            savepoints.execute("INSERT INTO t VALUES (-10, 'in a released savepoint')")
            savepoints.execute("RELEASE SAVEPOINT a")
            savepoints.execute("SAVEPOINT b")
            savepoints.execute("INSERT INTO t VALUES (-11, 'rolled back')")
            savepoints.execute("ROLLBACK TO SAVEPOINT b")
            straddling.execute("INSERT INTO t VALUES (-20, 'before the large one')")
            cloud.answer_delays = [5.0]
            write_large_transaction(conn, ("t",))
            wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the first part of the large transaction")
            savepoints.execute("SAVEPOINT c")
            savepoints.execute("INSERT INTO t VALUES (-12, 'in a savepoint after the choice')")
            savepoints.commit()
            straddling.execute("INSERT INTO t VALUES (-21, 'after the large one')")
            straddling.commit()
            assert cloud.holding > 0, "Turso answered before the others committed: nothing was shown"
        wait_until(lambda: outbox_empty(dsn) and cloud.holding == 0, 120, "the worker to deliver everything")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t WHERE id < 0") == [[4]], 60,
                   "the transactions below the cut")
        assert large_transaction_on_turso_once(turso), tracked.worker.output[-3000:]
        assert turso.query("SELECT id FROM t WHERE id < 0 ORDER BY id") == [[-21], [-20], [-12], [-10]]
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied WHERE id < 0") == [[4, 4]]


# trigger capture: a wal worker sends this backlog in too few requests to hold one past the start's
@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_batch_failing_while_the_next_was_read_ahead_loses_and_repeats_nothing(conn, dsn, turso: TursoServer,
                                                                                  capture):
    """A backlog of small batches, read ahead: Turso's answer to one batch is held, and the request after it
    (the next batch, sent once the held one settled, with the one after it read ahead meanwhile) fails with a
    503. The batch read ahead is dropped (its transaction was rolled back): every row arrives, each written
    once."""
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=SMALL_BATCHES, stream_expiry=3) as tracked:
        cloud = tracked.cloud
        a_backlog_behind(tracked, conn, slow_answers=[0.0, 0.0, 0.0, 3.0])  # past the start's: a batch's answer
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a batch's answer")
        cloud.faults = [(503, "text/plain", "Service Unavailable")]
        wait_until(lambda: not cloud.faults, 120, "the worker to meet the fault")
        every_backlog_row_once(turso, tracked, dsn)
        assert tracked.worker.lines("retry"), tracked.worker.output[-3000:]


def restart_holding_a_small_batch_while_a_large_one_is_read_ahead(tracked: Tracked, dsn: str) -> None:
    """Restart the worker over a backlog of small and large batches in turn (HELD_BATCHES): Turso commits the third
    small batch and tells the worker 10 s later; returns once it holds that answer and the worker has read the
    large batch after it ahead."""
    cloud = tracked.cloud
    small_commits = [0]
    answer = cloud._answer

    def slow_small_commit(frontend: Any, body: dict[str, Any], headers: Any) -> Any:
        result = answer(frontend, body, headers)
        text = json.dumps(body)
        if "COMMIT" in text.upper() and "bbbb" not in text and 'INTO \\"t\\"' in text:
            small_commits[0] += 1  # a small batch, whole in this request
            if small_commits[0] == 3:  # committed, the worker told 10 s later
                return (*result[:4], 10.0)
        return result

    cloud._answer = slow_small_commit  # type: ignore[method-assign]
    tracked.restart()
    wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a small batch's answer")
    wait_until(lambda: worker_backend_done_reading(dsn), 5, "the worker to read the large batch ahead")


def worker_backend_done_reading(dsn: str) -> bool:
    """The worker's connection is idle after a transaction it ended (the read of the next batch, while the one
    before travels), not after a statement of its own (recording or sending a batch)."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        return bool(watcher.execute(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = 'pgturso-worker' "
            "AND state = 'idle' AND query IN ('ROLLBACK', 'COMMIT'))").fetchone()[0])  # type: ignore[index]


@contextmanager
def a_batch_read_ahead(conn: psycopg.Connection[Any], dsn: str, turso: TursoServer) -> Iterator[tuple[Tracked, int]]:
    """Small batches, read ahead: Turso committed batch N and its answer is held while the worker has read batch
    N+1 into memory (in a transaction it ended). Yields the tracked setup at that moment and N+1's first row."""
    small = ("--batch-events", "5", "--batch-rows", "5", "--idle-wait", "1")
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=small, stream_expiry=30) as tracked:
        cloud = tracked.cloud
        a_backlog_behind(tracked, conn)
        wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                   "a few batches to be delivered")
        cloud.slow_answers = [10.0]  # the next batch is committed on Turso, the worker told 10 s later
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
        wait_until(lambda: worker_backend_done_reading(dsn), 5, "the worker to read the next batch ahead")
        yield tracked, turso.query("SELECT max(id) FROM t")[0][0] + 1


# (the test cluster's transaction ids are in epoch 0: a row's xmin is its transaction's xid8)
SKIP_ROW = ("SELECT pgturso.skip_transaction((SELECT xmin::text::xid8 FROM t WHERE id = %s), 'attack', "
            "target => 'default')")


def skipped_row_never_sent(turso: TursoServer, tracked: Tracked, dsn: str, skipped_row: int) -> None:
    """Every backlog row but ``skipped_row`` arrives once; that one never (the batch read ahead is read again)."""
    assert tracked.cloud.holding > 0, "Turso answered before the skip: nothing was shown (hold the answer longer)"
    wait_until(lambda: outbox_empty(dsn), 120, "the worker to deliver the backlog")
    others = f"SELECT count(*) FROM t WHERE id <> {skipped_row}"
    wait_until(lambda: on_turso(turso, others) == [[BACKLOG]], 60, "every other row")
    assert turso.query(f"SELECT count(*) FROM t WHERE id = {skipped_row}") == [[0]], \
        f"the skipped transaction (row {skipped_row}, read ahead before the skip) was sent"
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG - 1, BACKLOG - 1]]


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_skip_transaction_of_a_batch_read_ahead_never_sends_it(conn, dsn, turso: TursoServer, capture):
    """Small batches, read ahead: Turso committed batch N and its answer is held while the worker has read batch
    N+1 into memory (in a transaction it ended). skip_transaction of N+1's first transaction now: its row must
    never reach Turso, and every other row arrives once (the batch read ahead is read again, without it)."""
    with a_batch_read_ahead(conn, dsn, turso) as (tracked, skipped_row):
        conn.execute(SKIP_ROW, (skipped_row,))
        skipped_row_never_sent(turso, tracked, dsn, skipped_row)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
@pytest.mark.parametrize("kill_when", ["turso_committed_n", "n_plus_1_held_before_turso", "turso_committed_n_plus_1"])
def test_skip_transaction_of_a_batch_read_ahead_then_a_sigkill_never_sends_it(conn, dsn, turso: TursoServer,
                                                                              capture, kill_when: str):
    """As test_skip_transaction_of_a_batch_read_ahead_never_sends_it (the skip committed between N+1's read and its
    send), then the worker SIGKILLed: while Turso holds batch N's answer (committed there, its events not deleted
    yet); once N was deleted and N+1, read again, is held before it reaches Turso; or once Turso committed N+1 and
    holds its answer (N+1's deletion not done). A new worker recovers from Turso's marker: the skipped row never
    arrives, every other row once, and the skip is not said delivered. (A new case.)"""
    with a_batch_read_ahead(conn, dsn, turso) as (tracked, skipped_row):
        cloud = tracked.cloud
        conn.execute(SKIP_ROW, (skipped_row,))
        if kill_when == "n_plus_1_held_before_turso":
            cloud.stalls = [60.0]  # N's answer comes, N is deleted; N+1's request is held, never forwarded
            wait_until(lambda: cloud.holding > 0 and cloud.stalls == [], 60, "N+1's request to be held")
        elif kill_when == "turso_committed_n_plus_1":
            cloud.slow_answers = [60.0]  # N's answer comes; N+1 is committed on Turso, the worker told a minute later
            beyond = f"SELECT count(*) FROM t WHERE id > {skipped_row}"
            wait_until(lambda: cloud.slow_answers == [] and cloud.holding > 0
                       and on_turso(turso, beyond) != [[0]], 60, "Turso to commit N+1 and hold its answer")
        assert turso.query(f"SELECT count(*) FROM t WHERE id = {skipped_row}") == [[0]]
        tracked.worker.kill()
        cloud.stalls, cloud.slow_answers = [], []
        tracked.restart()
        wait_until(lambda: outbox_empty(dsn), 120, "the new worker to deliver the backlog")
        others = f"SELECT count(*) FROM t WHERE id <> {skipped_row}"
        wait_until(lambda: on_turso(turso, others) == [[BACKLOG]], 60, "every other row")
        assert turso.query(f"SELECT count(*) FROM t WHERE id = {skipped_row}") == [[0]], \
            f"the skipped transaction (row {skipped_row}) was sent: {tracked.worker.output[-3000:]}"
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG - 1, BACKLOG - 1]], \
            tracked.worker.output[-3000:]
        assert conn.execute("SELECT delivered_at FROM pgturso.skipped_transaction WHERE txid = "
                            "(SELECT xmin::text::xid8 FROM t WHERE id = %s)", (skipped_row,)).fetchall() == [(None,)]


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # a slot's batch is checked by its LSN
@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_skip_transaction_at_any_isolation_of_a_batch_read_ahead_never_sends_it(conn, dsn, turso: TursoServer,
                                                                               capture, isolation: str):
    """As test_skip_transaction_of_a_batch_read_ahead_never_sends_it, the skip run in a REPEATABLE READ or
    SERIALIZABLE transaction: it records its deletion in that transaction (pgturso.outbox_deletion), which the
    worker's check before sending sees once it committed, as it sees the deletion."""
    with a_batch_read_ahead(conn, dsn, turso) as (tracked, skipped_row), psycopg.connect(dsn) as skipper:
        skipper.execute(f"BEGIN ISOLATION LEVEL {isolation}")
        skipper.execute(SKIP_ROW, (skipped_row,))
        skipper.execute("COMMIT")
        skipped_row_never_sent(turso, tracked, dsn, skipped_row)


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_deletion_by_hand_that_records_itself_while_a_batch_is_read_ahead_never_sends_it(
        conn, dsn, turso: TursoServer, capture):
    """What docs/design.md tells a superuser who must delete pending events by hand (DELETE FROM pgturso.outbox
    records nothing, so a batch read ahead would send them all the same): record it with
    pgturso._note_outbox_deletion in the same transaction. The worker's check then sees the generation moved,
    counts N+1 again and reads it without the deleted transaction's row."""
    with a_batch_read_ahead(conn, dsn, turso) as (tracked, deleted_row):
        with conn.transaction():
            deleted = conn.execute("DELETE FROM pgturso.outbox WHERE txid = (SELECT xmin::text::xid8 FROM t "
                                   "WHERE id = %s)", (deleted_row,)).rowcount
            assert deleted == 1
            conn.execute("SELECT pgturso._note_outbox_deletion('manual', %s)", (deleted,))
        skipped_row_never_sent(turso, tracked, dsn, deleted_row)


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_skip_rolled_back_while_a_batch_is_read_ahead_sends_it_as_read(conn, dsn, turso: TursoServer, capture):
    """skip_transaction of N+1's first transaction, rolled back while N+1 is read ahead: nothing was deleted, so
    the batch is sent as it was read (not read again) and every row arrives once."""
    with a_batch_read_ahead(conn, dsn, turso) as (tracked, first_row):
        with conn.transaction(force_rollback=True):
            assert conn.execute(SKIP_ROW, (first_row,)).fetchone()[0] == 1
        assert tracked.cloud.holding > 0, "Turso answered before the skip: nothing was shown"
        every_backlog_row_once(turso, tracked, dsn)
        assert "batch_changed" not in tracked.worker.output, tracked.worker.output[-3000:]


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_skip_for_another_target_while_a_batch_is_read_ahead_sends_it_as_read(conn, dsn, turso: TursoServer,
                                                                                 capture):
    """A skip of another target's pending transaction (and untrack_table of its table) while N+1 is read ahead
    moves the deletion generation: the worker counts N+1's events again (POSITION_IF_WHOLE), finds them all, and
    sends it as read."""
    conn.execute("SELECT pgturso.add_target('elsewhere', 'http://127.0.0.1:1')")
    conn.execute("CREATE TABLE abroad (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('abroad', target => 'elsewhere')")
    conn.execute("INSERT INTO abroad VALUES (1)")
    with a_batch_read_ahead(conn, dsn, turso) as (tracked, _):
        generation = conn.execute("SELECT count(*) FROM pgturso.outbox_deletion").fetchone()[0]
        conn.execute("SELECT pgturso.skip_transaction((SELECT xmin::text::xid8 FROM abroad WHERE id = 1), 'attack', "
                     "target => 'elsewhere')")
        assert conn.execute("SELECT count(*) FROM pgturso.outbox_deletion").fetchone()[0] == generation + 1
        assert tracked.cloud.holding > 0, "Turso answered before the skip: nothing was shown"
        conn.execute("SELECT pgturso.untrack_table('abroad')")  # (its creation stays pending, for no worker)
        every_backlog_row_once(turso, tracked, dsn)
        assert "batch_changed" not in tracked.worker.output, tracked.worker.output[-3000:]


# trigger capture: how the outbox's next batch is read past the one in flight (a slot's batches follow the stream)
@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_a_transaction_below_the_cut_of_a_batch_in_flight_arrives_before_what_commits_after_it(
        conn, dsn, turso: TursoServer, capture):
    """A transaction that wrote before the backlog (the lowest outbox id) stays open while the worker delivers it
    in small batches, read ahead. It commits while Turso holds a batch's answer and the next batch is read ahead
    already (without it: in progress then); then another transaction updates one of its rows. Batches chosen later
    read past the one in flight: the late transaction's events lie below that batch's cut and are none of its
    events, so they must come in the next batch, before the update. Read past by the cut alone, they would be
    skipped, and then deleted unsent with a later batch, whose name (cut and snapshot) covers them."""
    small = ("--batch-events", "5", "--batch-rows", "5", "--idle-wait", "1")
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=small, stream_expiry=30) as tracked:
        cloud = tracked.cloud
        with psycopg.connect(dsn) as late:
            late.execute("INSERT INTO t VALUES (-1, 'late'), (-2, 'late too')")  # below every cut, committed later
            a_backlog_behind(tracked, conn)
            wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                       "a few batches to be delivered")
            cloud.slow_answers = [10.0]  # a batch committed on Turso, the worker told 10 s later
            wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
            wait_until(lambda: worker_backend_done_reading(dsn), 5, "the worker to read the next batch ahead")
            late.commit()
        conn.execute("UPDATE t SET v = 'updated after the late one committed' WHERE id = -1")
        assert cloud.holding > 0, "Turso answered before the late commit: nothing was shown (hold it longer)"
        wait_until(lambda: outbox_empty(dsn), 120, "the worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t WHERE id > 0") == [[BACKLOG]], 60,
                   "every backlog row on Turso")
        assert turso.query("SELECT id, v FROM t WHERE id < 0 ORDER BY id") == [
            [-2, "late too"], [-1, "updated after the late one committed"]], tracked.worker.output[-3000:]
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied WHERE id > 0") == [[BACKLOG, BACKLOG]]


def worker_backend_waits_for_a_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as watcher:
        return bool(watcher.execute(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = 'pgturso-worker' "
            "AND wait_event_type = 'Lock')").fetchone()[0])  # type: ignore[index]


# trigger capture: the read-ahead pipeline's record-then-delete order is the outbox's (a slot's batch is settled
# at once)
@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
@pytest.mark.parametrize("fault", ["postgres_session_lost", "sigkill"])
def test_a_batch_recorded_but_not_deleted_when_the_next_commits_is_not_sent_again(conn, dsn, turso: TursoServer,
                                                                                    capture, fault):
    """Batch N+1 is recorded delivered (its marker) and its events are being deleted while N+2 travels; N+2 holds
    transactions that wrote before N+1's (open when N+1 was chosen, committed since), so N+2's name (its cut)
    lies below N+1's events and does not cover them. N+1's deletion waits for a row lock; N+2 commits on Turso;
    then the worker's Postgres session is lost (or the worker is SIGKILLed). Recovery must forget N+1's events
    by the marker Postgres recorded, not only by Turso's (N+2's): every row written on Turso once."""
    # (the answers held 10 s must not shrink the batches: N+2 is the early transactions, all of them)
    small = ("--batch-events", "5", "--batch-rows", "5", "--idle-wait", "1", "--max-transaction-seconds", "60")
    early = 5  # transactions that write before the backlog and commit while batch N+1 is read ahead
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=small, stream_expiry=30) as tracked:
        cloud = tracked.cloud
        opened = [psycopg.connect(dsn) for _ in range(early)]
        try:
            for k, session in enumerate(opened):
                session.execute("INSERT INTO t VALUES (%s, 'early')", (BACKLOG + 1 + k,))
            a_backlog_behind(tracked, conn)
            wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                       "a few batches to be delivered")
            cloud.slow_answers = [10.0]  # batch N: committed on Turso, the worker told 10 s later
            wait_until(lambda: cloud.holding > 0, 60, "Turso to hold batch N's answer")
            wait_until(lambda: worker_backend_done_reading(dsn), 5, "the worker to read batch N+1 ahead")
            n_last = turso.query(f"SELECT max(id) FROM t WHERE id <= {BACKLOG}")[0][0]
            next_rows = (n_last + 1, n_last + 5)  # batch N+1's rows
            for session in opened:  # invisible to N+1 (read already); their events' ids are below it
                session.commit()
            cloud.slow_answers = [10.0]  # batch N+1's answer, once N's came
            wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t WHERE id BETWEEN {} AND {}".format(*next_rows))
                       == [[5]] and cloud.holding > 0, 60, "Turso to hold batch N+1's answer")
            wait_until(lambda: worker_backend_done_reading(dsn), 5, "the worker to read batch N+2 ahead")
            with psycopg.connect(dsn) as locker:
                locked = locker.execute(
                    "SELECT count(*) FROM (SELECT FROM pgturso.outbox WHERE txid IN (SELECT xmin::text::xid8 "
                    "FROM t WHERE id BETWEEN %s AND %s) FOR UPDATE) AS l", next_rows).fetchone()[0]
                assert locked == 5, "batch N+1's events are gone already: nothing was shown"
                wait_until(lambda: on_turso(turso, f"SELECT count(*) FROM t WHERE id > {BACKLOG}") == [[early]],
                           60, "batch N+2 (the early transactions) to commit on Turso")
                wait_until(lambda: worker_backend_waits_for_a_lock(dsn), 30, "N+1's deletion to wait")
                if fault == "sigkill":
                    tracked.worker.kill()
                terminated = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'pgturso-worker' AND wait_event_type = 'Lock'").fetchone()[0]
                assert terminated == 1
                locker.rollback()
            if fault == "sigkill":
                tracked.restart()
        finally:
            for session in opened:
                session.close()
        wait_until(lambda: outbox_empty(dsn), 120, "the worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t") == [[BACKLOG + early + 1]], 60,
                   "every row on Turso")
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == \
            [[BACKLOG + early, BACKLOG + early]], tracked.worker.output[-3000:]
        assert conn.execute("SELECT rows_delivered FROM pgturso.delivery_state WHERE target = 'default'").fetchone() \
            == (BACKLOG + early + 1,), "the delivered rows were not counted once each"


HELD_ROWS = 50  # rows of each transaction: a batch each (HELD_BATCHES); small ones fit a request, large ones not
HELD_BATCHES = ("--max-request-bytes", "8000", "--max-statement-bytes", "2000", "--batch-rows", str(HELD_ROWS),
                "--idle-wait", "1")


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_skip_transaction_of_a_held_batch_never_sends_it(conn, dsn, turso: TursoServer, capture):
    """A small batch N (one request, sent from memory) is committed on Turso and its answer held while the worker
    has read ahead past a request of the large batch N+1 (held: to be sent on from the open stream, 7561f69).
    skip_transaction of N+1's transaction now: none of its rows reach Turso, every other row arrives once."""
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=HELD_BATCHES, stream_expiry=30) as tracked:
        cloud = tracked.cloud
        assert tracked.worker.stop() == 0
        for n in range(40):
            conn.execute("INSERT INTO t SELECT %s * 100 + g, repeat('b', %s) FROM generate_series(1, %s) g",
                         (n + 1, 400 if n % 2 else 1, HELD_ROWS))
        restart_holding_a_small_batch_while_a_large_one_is_read_ahead(tracked, dsn)
        last = turso.query("SELECT max(id) FROM t")[0][0]
        skipped = (last // 100 + 1) * 100 + 1  # the first row of the batch held
        assert (skipped // 100 - 1) % 2 == 1, f"the batch after {last} is not a large one"
        conn.execute("SELECT pgturso.skip_transaction((SELECT xmin::text::xid8 FROM t WHERE id = %s), 'attack', "
                     "target => 'default')", (skipped,))
        assert cloud.holding > 0, "Turso answered before the skip: nothing was shown (hold the answer longer)"
        wait_until(lambda: outbox_empty(dsn), 120, "the worker to deliver the backlog")
        everything = 40 * HELD_ROWS + 1
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t") == [[everything - HELD_ROWS]], 60,
                   "every other row")
        skipped_rows = f"id BETWEEN {skipped} AND {skipped + HELD_ROWS}"
        assert turso.query(f"SELECT count(*) FROM t WHERE {skipped_rows}") == [[0]], tracked.worker.output[-3000:]
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == \
            [[39 * HELD_ROWS, 39 * HELD_ROWS]], tracked.worker.output[-3000:]


@contextmanager
def two_tables_with_a_batch_read_ahead(conn: psycopg.Connection[Any], dsn: str, turso: TursoServer
                                       ) -> Iterator[Tracked]:
    """Small batches of tables kept and t (one row of each per transaction): Turso committed batch N and its answer
    is held while the worker has read batch N+1 into memory. Yields the tracked setup at that moment."""
    small = ("--batch-events", "5", "--batch-rows", "5", "--idle-wait", "1")
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=small, tables=("kept", "t"),
                                stream_expiry=30) as tracked:
        cloud = tracked.cloud
        assert tracked.worker.stop() == 0
        for i in range(1, BACKLOG + 1):  # one row of each table per transaction
            with conn.transaction():
                conn.execute("INSERT INTO kept VALUES (%s, 'x')", (i,))
                conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
        tracked.restart()
        wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                   "a few batches to be delivered")
        cloud.slow_answers = [10.0]  # the next batch is committed on Turso, the worker told 10 s later
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
        wait_until(lambda: worker_backend_done_reading(dsn), 5, "the worker to read the next batch ahead")
        yield tracked


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
@pytest.mark.parametrize("then", ["deliver", "sigkill"])
def test_untrack_table_of_a_batch_read_ahead_never_sends_it(conn, dsn, turso: TursoServer, capture, then: str):
    """Small batches of two tables, read ahead: Turso committed batch N and its answer is held while the worker has
    read batch N+1 (rows of both tables) into memory. untrack_table of one of them now: none of its rows reach
    Turso after that (its Turso table stays as it was when untrack_table committed), and every row of the other
    table arrives once (the batch read ahead is read again, without the untracked table's rows). [sigkill]: the
    worker is SIGKILLed right after untrack_table, before it heard of N (a new worker recovers from Turso's
    marker; a new case, passes)."""
    with two_tables_with_a_batch_read_ahead(conn, dsn, turso) as tracked:
        cloud = tracked.cloud
        on_turso_at_untrack = turso.query("SELECT id FROM t ORDER BY id")
        with psycopg.connect(dsn, autocommit=True) as untracker:
            untracker.execute("SELECT pgturso.untrack_table('t')")
        assert cloud.holding > 0, "Turso answered before untrack_table: nothing was shown (hold the answer longer)"
        if then == "sigkill":
            tracked.worker.kill()
            cloud.slow_answers = []
            tracked.restart()
        assert len(on_turso_at_untrack) < BACKLOG + 1, "every row of t was on Turso already: nothing was shown"
        wait_until(lambda: outbox_empty(dsn) and cloud.holding == 0, 120, "the worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM kept") == [[BACKLOG + 1]], 60,
                   "every row of the table still tracked")
        assert turso.query("SELECT id FROM t ORDER BY id") == on_turso_at_untrack, \
            f"rows of t read ahead before untrack_table were sent after it: {tracked.worker.output[-3000:]}"
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG, BACKLOG]], \
            tracked.worker.output[-3000:]
        conn.execute("INSERT INTO kept VALUES (-1, 'after')")  # delivery goes on
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM kept WHERE id = -1") == [[1]], 60, "the row after")
        assert turso.query("SELECT id FROM t ORDER BY id") == on_turso_at_untrack


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_untrack_and_track_again_of_a_table_in_a_batch_read_ahead_ends_equal_and_once(conn, dsn,
                                                                                     turso: TursoServer, capture):
    """Attack on c64bfdb: as test_untrack_table_of_a_batch_read_ahead_never_sends_it, but the table is tracked
    again right after untrack_table, while Turso still holds batch N's answer and N+1 (rows of both tables) is in
    memory: the batch read ahead was decoded with the table's old tracking (a new tracked_table id now), so it is
    dropped and read again; the table is copied afresh. Turso's t ends equal to Postgres's, every row of the other
    table is applied once, and status says in sync. (A new case; passes.)"""
    with two_tables_with_a_batch_read_ahead(conn, dsn, turso) as tracked:
        cloud = tracked.cloud
        with psycopg.connect(dsn, autocommit=True) as untracker:
            untracker.execute("SELECT pgturso.untrack_table('t')")
            untracker.execute("UPDATE t SET v = 'while untracked' WHERE id % 7 = 0")
            untracker.execute("SELECT pgturso.track_table('t')")
        assert cloud.holding > 0, "Turso answered before the re-track: nothing was shown (hold the answer longer)"
        conn.execute("UPDATE t SET v = 'after' WHERE id % 11 = 0")
        conn.execute("INSERT INTO kept VALUES (-1, 'after')")
        expected = [list(r) for r in conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()]
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM kept") == [[BACKLOG + 2]], 120,
                   "every row of the table still tracked")
        wait_until(lambda: on_turso(turso, "SELECT id, v FROM t ORDER BY id") == expected, 120,
                   "t on Turso equal to Postgres's (copied again)")
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG + 1, BACKLOG + 1]], \
            tracked.worker.output[-3000:]
        wait_until(lambda: conn.execute("SELECT bool_and(in_sync) FROM pgturso.status").fetchone()[0], 60,
                   "status to say in sync")


@contextmanager
def skipped_while_turso_holds_a_committed_batch(conn: psycopg.Connection[Any], dsn: str, turso: TursoServer
                                                ) -> Iterator[tuple[Tracked, int]]:
    """Small batches: Turso committed batch N and its answer is held. skip_transaction of one of N's transactions
    and of the last one (no batch read it yet), while Turso still holds the answer. Yields the tracked setup and
    the row of N whose transaction was skipped."""
    small = ("--batch-events", "5", "--batch-rows", "5", "--idle-wait", "1")
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=small, stream_expiry=30) as tracked:
        cloud = tracked.cloud
        assert tracked.worker.stop() == 0
        for i in range(1, BACKLOG + 1):
            conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
        conn.execute("INSERT INTO t VALUES (%s, 'the last one')", (BACKLOG + 1,))
        tracked.restart()
        wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                   "a few batches to be delivered")
        cloud.slow_answers = [10.0]  # the next batch is committed on Turso, the worker told 10 s later
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
        on_turso_row = turso.query("SELECT max(id) FROM t")[0][0]  # a row of the batch Turso committed
        skip = ("SELECT pgturso.skip_transaction((SELECT xmin::text::xid8 FROM t WHERE id = %s), 'attack', "
                "target => 'default')")
        conn.execute(skip, (on_turso_row,))
        conn.execute(skip, (BACKLOG + 1,))  # the last transaction: not read yet by any batch
        assert cloud.holding > 0, "Turso answered before the skip: nothing was shown (hold the answer longer)"
        yield tracked, on_turso_row


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_skip_transaction_of_a_batch_turso_committed_says_it_was_delivered(conn, dsn, turso: TursoServer, capture):
    """Small batches: Turso committed batch N and its answer is held. skip_transaction of a transaction of N now
    cannot unsend it: its row is on Turso, and once the worker learns that Turso has N, pgturso.skipped_transaction
    says so (delivered_at), instead of recording a transaction Turso lacks. A skip of a transaction no batch
    sent yet stays a skip (delivered_at NULL, its row never sent)."""
    with skipped_while_turso_holds_a_committed_batch(conn, dsn, turso) as (tracked, on_turso_row):
        cloud = tracked.cloud
        wait_until(lambda: outbox_empty(dsn) and cloud.holding == 0, 120, "the worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t") == [[BACKLOG + 1]], 60, "every other row")
        assert turso.query(f"SELECT count(*) FROM t WHERE id IN ({on_turso_row}, {BACKLOG + 1})") == [[1]]

        def recorded(row: int) -> bool:
            return bool(conn.execute(
                "SELECT s.delivered_at IS NOT NULL FROM pgturso.skipped_transaction s "
                "WHERE s.txid = (SELECT xmin::text::xid8 FROM t WHERE id = %s)", (row,)).fetchone()[0])

        assert recorded(on_turso_row), "the skip of a transaction Turso had says Turso lacks it"
        assert not recorded(BACKLOG + 1), "a skipped transaction that was never sent is said delivered"
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG, BACKLOG]]



def skip_in_a_committed_batch_then_kill(conn: psycopg.Connection[Any], dsn: str, turso: TursoServer
                                       ) -> tuple[int, bool]:
    """Small batches: Turso committed batch N, its answer held; skip_transaction of one of N's transactions and of
    one no batch read yet, then the worker is SIGKILLed and a new one recovers from Turso's marker. Asserts that
    the skip never sent stays a skip and never arrives and every other row arrives once; returns the row of N
    skipped and whether its skip says delivered (delivered_at)."""
    with skipped_while_turso_holds_a_committed_batch(conn, dsn, turso) as (tracked, on_turso_row):
        cloud = tracked.cloud
        tracked.worker.kill()
        cloud.slow_answers = []
        tracked.restart()
        wait_until(lambda: outbox_empty(dsn), 120, "the new worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t") == [[BACKLOG + 1]], 60, "every other row")
        assert turso.query(f"SELECT count(*) FROM t WHERE id = {BACKLOG + 1}") == [[0]], "a skip was sent"
        assert turso.query(f"SELECT count(*) FROM t WHERE id = {on_turso_row}") == [[1]]
        said = dict(conn.execute(
            "SELECT t.id, s.delivered_at IS NOT NULL FROM pgturso.skipped_transaction s "
            "JOIN t ON s.txid = t.xmin::text::xid8 WHERE t.id IN (%s, %s)", (on_turso_row, BACKLOG + 1)).fetchall())
        assert said[BACKLOG + 1] is False, "a skipped transaction that was never sent is said delivered"
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG, BACKLOG]], \
            tracked.worker.output[-3000:]
        return on_turso_row, bool(said[on_turso_row])


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_skip_transaction_of_a_batch_turso_committed_then_a_killed_worker_never_says_delivered_wrongly(
        conn, dsn, turso: TursoServer, capture):
    """Attack on delivered_at (33e089d): as test_skip_transaction_of_a_batch_turso_committed_says_it_was_delivered,
    but the worker is SIGKILLed while Turso holds batch N's answer, right after the skips. No skip of a
    transaction never sent is said delivered, and it never arrives; every other row arrives once. (A new case;
    passes. Whether the skip Turso has is said delivered: the test below.)"""
    skip_in_a_committed_batch_then_kill(conn, dsn, turso)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_skip_transaction_of_a_batch_turso_committed_then_a_killed_worker_says_delivered(
        conn, dsn, turso: TursoServer, capture):
    """The skip of a transaction Turso has is said delivered after the worker that sent it was killed, too: a
    trigger target's recovery, forgetting the batch by Turso's marker, marks the skips of transactions it carried
    (Outbox.forget, SKIPS_DELIVERED); a wal target's, decoding what the marker confirms, marks those the marker's
    chain of batches did not drop (WalOutbox.forget, WalBatch.chain_of). Failed before (delivered_at NULL; wal:
    an xfail until the marker named what its chain dropped)."""
    row, said_delivered = skip_in_a_committed_batch_then_kill(conn, dsn, turso)
    assert said_delivered, f"the skip of a transaction Turso has (row {row}) says Turso lacks it"


def _markers(turso: TursoServer) -> dict[str, dict[str, Any]]:
    return {str(source): json.loads(marker)
            for source, marker in turso.query("SELECT source_id, applied_ids FROM _pgturso_progress")}


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_a_marker_without_a_chain_as_0_5_0_wrote_it_infers_nothing_at_recovery(conn, dsn, turso: TursoServer,
                                                                                capture):
    """Upgrade attack on a6667c9: as test_skip_transaction_of_a_batch_turso_committed_then_a_killed_worker_says_
    delivered, but the marker on Turso is as a 0.5.0 worker wrote it (no 'from', no 'dropped': the batch was sent
    before the upgrade) when the new worker recovers. It infers nothing: no skip is said delivered (the one of a
    transaction Turso has stays unknown, delivered_at NULL; never one Turso lacks), the skip never sent never
    arrives, every other row arrives once, and the next marker names its chain."""
    with skipped_while_turso_holds_a_committed_batch(conn, dsn, turso) as (tracked, on_turso_row):
        tracked.worker.kill()
        tracked.cloud.slow_answers = []
        (source, marker), = _markers(turso).items()
        assert "from" in marker and "dropped" in marker, marker
        old = json.dumps({k: marker[k] for k in ("slot", "lsn", "layouts")}, separators=(",", ":"))
        turso.query(f"UPDATE _pgturso_progress SET applied_ids = '{old}' WHERE source_id = '{source}'")
        assert "from" not in _markers(turso)[source]
        tracked.restart()
        wait_until(lambda: outbox_empty(dsn), 120, "the new worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM t") == [[BACKLOG + 1]], 60, "every other row")
        assert turso.query(f"SELECT count(*) FROM t WHERE id IN ({on_turso_row}, {BACKLOG + 1})") == [[1]]
        said = dict(conn.execute(
            "SELECT t.id, s.delivered_at IS NOT NULL FROM pgturso.skipped_transaction s "
            "JOIN t ON s.txid = t.xmin::text::xid8 WHERE t.id IN (%s, %s)", (on_turso_row, BACKLOG + 1)).fetchall())
        assert said == {on_turso_row: False, BACKLOG + 1: False}, said
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[BACKLOG, BACKLOG]], \
            tracked.worker.output[-3000:]
        assert "from" in _markers(turso)[source], "the upgraded worker's marker names its chain"


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_untrack_table_of_a_held_batch_never_sends_it(conn, dsn, turso: TursoServer, capture):
    """As test_skip_transaction_of_a_held_batch_never_sends_it, with untrack_table: a small batch N is committed on
    Turso and its answer held while the worker has read ahead past a request of the large batch N+1 (held, to be
    sent on from the open stream), whose transaction writes the table untracked now and another one. None of the
    untracked table's rows reach Turso after untrack_table; the other table gets every row once."""
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=HELD_BATCHES, tables=("kept", "t"),
                                stream_expiry=30) as tracked:
        cloud = tracked.cloud
        assert tracked.worker.stop() == 0
        for n in range(40):  # a batch each: small and large ones in turn
            with conn.transaction():
                conn.execute("INSERT INTO t SELECT %s * 100 + g, repeat('b', %s) FROM generate_series(1, %s) g",
                             (n + 1, 400 if n % 2 else 1, HELD_ROWS))
                conn.execute("INSERT INTO kept VALUES (%s, 'x')", (n + 1,))
        restart_holding_a_small_batch_while_a_large_one_is_read_ahead(tracked, dsn)
        on_turso_at_untrack = turso.query("SELECT count(*), max(id) FROM t")[0]
        assert (on_turso_at_untrack[1] // 100) % 2 == 1, f"the batch after {on_turso_at_untrack} is not a large one"
        with psycopg.connect(dsn, autocommit=True) as untracker:
            untracker.execute("SELECT pgturso.untrack_table('t')")
        assert cloud.holding > 0, "Turso answered before untrack_table: nothing was shown (hold the answer longer)"
        wait_until(lambda: outbox_empty(dsn) and cloud.holding == 0, 120, "the worker to deliver the backlog")
        wait_until(lambda: on_turso(turso, "SELECT count(*) FROM kept") == [[41]], 60, "every row of kept")
        assert turso.query("SELECT count(*), max(id) FROM t")[0] == on_turso_at_untrack, tracked.worker.output[-3000:]
        assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[40, 40]], \
            tracked.worker.output[-3000:]


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_the_skip_of_a_transaction_turso_refused_is_never_said_delivered_across_restarts(
        conn, dsn, turso: TursoServer, capture):
    """Turso refuses a transaction (a trigger only the target has): the worker blocks on it, the operator skips
    it, a worker delivers the rest, and two more runs in a row recover from that marker with no new batch
    between (each re-reads what the marker confirms). The skip's delivered_at stays NULL (Turso never had the
    transaction), its row never arrives, every other row arrives once."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    assert run_worker(dsn, turso.url).returncode == 0
    install_apply_counter(turso.url, "t")
    turso.query("CREATE TRIGGER no_bad BEFORE INSERT ON t WHEN NEW.v LIKE 'bad%' "
                "BEGIN SELECT RAISE(ABORT, 'no bad rows here'); END")
    for i, v in enumerate(["good", "bad one", "after", "last"], start=1):
        conn.execute("INSERT INTO t VALUES (%s, %s)", (i, v))
    blocked = run_worker(dsn, turso.url)
    assert blocked.returncode == 2 and "no bad rows here" in blocked.stderr, blocked.stderr
    bad = conn.execute("SELECT xmin::text FROM t WHERE id = 2").fetchone()[0]
    conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'refused by Turso')", (bad,))
    for _ in range(3):  # delivers the rest, then restarts twice with nothing new
        result = run_worker(dsn, turso.url)
        assert result.returncode == 0, result.stderr
    assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "good"], [3, "after"], [4, "last"]]
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[3, 3]]
    assert conn.execute("SELECT delivered_at FROM pgturso.skipped_transaction").fetchall() == [(None,)]
    assert pending(conn) == 0


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_a_rolled_back_skip_drops_nothing_and_records_nothing(conn, dsn, turso: TursoServer, capture):
    """skip_transaction inside a transaction that rolls back: the transaction is delivered as if never skipped
    (it writes nothing non-transactional), no skip is recorded, every row arrives once."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    assert run_worker(dsn, turso.url).returncode == 0
    install_apply_counter(turso.url, "t")
    for i in range(1, 4):
        conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
    victim = conn.execute("SELECT xmin::text FROM t WHERE id = 2").fetchone()[0]
    with conn.transaction():
        conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'changed my mind', target => 'default')", (victim,))
        raise psycopg.Rollback()  # the skip's transaction rolls back
    assert conn.execute("SELECT count(*) FROM pgturso.skipped_transaction").fetchone()[0] == 0
    result = run_worker(dsn, turso.url)
    assert result.returncode == 0, result.stderr
    assert turso.query("SELECT id FROM t ORDER BY id") == [[1], [2], [3]]
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[3, 3]]
    assert pending(conn) == 0


def timed_batches(output: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """A worker's JSON log: each "batch_timing" line with the line after it. Every line must be JSON (a traceback
    or a warning printed by the timing bookkeeping would not be)."""
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    return [(line, lines[i + 1] if i + 1 < len(lines) else {}) for i, line in enumerate(lines)
            if line["event"] == "batch_timing"]


# trigger only: a slot's backlog of 400 one-row transactions left no request to fault after the held answer here
@pytest.mark.parametrize("capture", ["trigger"], indirect=True)
def test_timed_batches_through_failed_sends_retries_and_a_stop_mid_send_deliver_every_row_once(
        conn, dsn, turso: TursoServer, capture):
    """The pipelined sender's timing (Sender.submit(timing=...), batch_timing at debug) over a backlog of small
    batches read ahead, while Turso's answer to one is held, the next request fails (503, then garbage), another
    stalls into a 504, and the worker is stopped (SIGTERM) while Turso holds a committed batch's answer. The
    bookkeeping must change nothing: every row arrives once (Turso's write counter), the worker stops cleanly,
    every log line is JSON (nothing raised or printed), and each batch_timing line is followed by its batch's
    "delivered" line, its steps in order."""
    args = (*SMALL_BATCHES, "--log-level", "debug", "--log-format", "json")
    with tracked_behind_a_proxy(conn, dsn, turso, worker_args=args, stream_expiry=30) as tracked:
        cloud = tracked.cloud
        a_backlog_behind(tracked, conn)
        wait_until(lambda: (on_turso(turso, "SELECT count(*) FROM applied") or [[0]])[0][0] >= 25, 60,
                   "a few batches to be delivered")
        cloud.slow_answers = [3.0]
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a batch's answer")
        cloud.faults = [(503, "text/plain", "Service Unavailable"), (200, "application/json", "{not json")]
        wait_until(lambda: not cloud.faults, 120, "the worker to meet the faults")
        cloud.stalls = [2.0]
        wait_until(lambda: not cloud.stalls, 120, "the worker to meet the stall")
        wait_until(lambda: cloud.holding == 0, 60, "the stall to end")
        cloud.slow_answers = [5.0]  # committed on Turso, the worker told 5 s later: it is stopped meanwhile
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold a committed batch's answer")
        stopped = tracked.worker
        assert stopped.stop(60) == 0, stopped.output[-3000:]
        assert not outbox_empty(dsn), "the backlog was delivered before the stop: nothing was shown"
        restarted = tracked.restart()
        every_backlog_row_once(turso, tracked, dsn)
        assert restarted.stop() == 0
        for worker in (stopped, restarted):
            timed = timed_batches(worker.output)
            assert timed, worker.output[-3000:]
            for timing, after in timed:
                assert after.get("event") == "delivered" and after.get("rows", 0) > 0, (timing, after)
                steps = [s for s in ("read", "read_done", "settled", "positioned", "sent", "answered", "removed")
                         if s != "settled" or s in timing]
                assert [timing[s] for s in steps] == sorted(timing[s] for s in steps), timing
        assert '"retry"' in stopped.output, stopped.output[-3000:]
