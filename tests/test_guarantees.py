"""Never lose, never duplicate, never reorder: concurrency, crashes, outages, poison changes, failover.

Each test would fail if the promise it names broke. They run real Postgres, real tursodb and the worker as a
separate process; SOAK_SECONDS (``make soak``) lengthens the concurrency runs.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from conftest import REPO, drain, pending, run_worker
from support.cloud_proxy import CloudProxy
from support.pgcluster import PG_BIN, PgCluster, _as_postgres
from support.turso import TursoServer, install_apply_counter, read_rows
from support.workers import WorkerProcess, outbox_empty, run_once_measuring_peak_rss, wait_until
from support.workload import Workload, assert_equal, create_tables

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "0"))
SEED = int(os.environ.get("PGTURSO_TEST_SEED", "20261125"))


@pytest.fixture(params=["tursodb", "sqld-proxy"])
def turso_url(request: pytest.FixtureRequest, turso: TursoServer, monkeypatch: pytest.MonkeyPatch):
    """Where the worker delivers: tursodb itself, or the sqld-like proxy in front of it (Turso Cloud's signed
    batons, closed and expiring streams, and the write lock that a stream of a killed worker holds until sqld
    takes it away), so the same proofs cover Cloud's behaviour. Through the proxy, requests are small so that
    deliveries span several requests of a stream, as large ones do on Cloud."""
    if request.param == "tursodb":
        yield turso.url
        return
    monkeypatch.setenv("PGTURSO_MAX_REQUEST_BYTES", "8000")
    monkeypatch.setenv("PGTURSO_MAX_STATEMENT_BYTES", "4000")
    with CloudProxy(turso.url, None, lock_timeout=2.0) as cloud:
        yield cloud.url
    assert any(body.get("baton") for body in cloud.requests), "deliveries spanned requests of a stream"


def test_convergence_under_concurrency(conn, dsn, turso: TursoServer, turso_url: str):
    """8 sessions of random transactions on 3 tables while the worker runs; then Turso equals Postgres."""
    create_tables(conn)
    worker = WorkerProcess(dsn, turso_url, "--idle-wait", "1").start()
    try:
        load = Workload(dsn, seed=SEED).run_for(SOAK_SECONDS or 8)
        assert not load.errors, load.errors[:5]
        assert load.commits > 100 and load.rollbacks > 0
        wait_until(lambda: outbox_empty(dsn), 120, "the worker to catch up")
        assert_equal(conn, turso)
        assert worker.lines("delivered")
    finally:
        assert worker.stop() == 0


def test_exactly_once_across_sigkill(conn, dsn, turso: TursoServer, turso_url: str):
    """SIGKILL the worker 20 times under load: nothing lost, no row written twice on Turso."""
    conn.execute("CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, who int, amount int)")
    conn.execute("SELECT pgturso.track_table('ledger')")
    drain(dsn, turso_url)
    install_apply_counter(turso.url, "ledger")
    stop = threading.Event()

    def write(session: int) -> None:
        rng = random.Random(SEED + session)
        with psycopg.connect(dsn, autocommit=True) as writer:
            # A short pause between statements bounds the backlog the kills leave: without one, wal capture's
            # cheaper writes left a backlog whose final drain through the Cloud proxy took about 100 of its
            # 120 s on a quiet machine, and timed out on a loaded one.
            while not stop.wait(0.005):
                n = rng.randint(1, 30)
                writer.execute("INSERT INTO ledger (who, amount) SELECT %s, g FROM generate_series(1, %s) g",
                               (session, n))

    writers = [threading.Thread(target=write, args=(s,)) for s in range(3)]
    for thread in writers:
        thread.start()
    rng = random.Random(SEED)
    kills = 0
    try:
        while kills < 20:
            worker = WorkerProcess(dsn, turso_url).start()
            time.sleep(rng.uniform(0.3, 1.2))
            worker.kill()
            kills += 1
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    drain(dsn, turso_url)
    total = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM ledger") == [[total, total]]
    applied, distinct = turso.query("SELECT count(*), count(DISTINCT id) FROM applied")[0]
    assert distinct == total, "every row arrived"
    assert applied == total, f"{applied - total} row writes were applied twice"
    assert kills == 20


def test_turso_outage_under_load(conn, dsn, turso: TursoServer, turso_url: str):
    """Turso down 30 s under load: writes never fail, the worker backs off (capped, logged), then catches up."""
    create_tables(conn)
    worker = WorkerProcess(dsn, turso_url, "--retry-max-delay", "4", "--idle-wait", "1").start()
    load = Workload(dsn, seed=SEED + 1, sessions=3)
    threads = load.start()
    try:
        time.sleep(2)
        turso.stop()
        commits_before = load.commits
        time.sleep(30)
        commits_during = load.commits - commits_before
        turso.start()
        time.sleep(2)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(30)
    assert not load.errors, load.errors[:5]
    assert commits_during > 50, "Postgres writers must keep committing while Turso is down"
    wait_until(lambda: outbox_empty(dsn), 120, "the worker to catch up after the outage")
    assert_equal(conn, turso)
    retries = worker.lines("retry")
    delays = [float(re.search(r"delay_s=([\d.]+)", line).group(1)) for line in retries]
    assert 4 <= len(retries) <= 30, f"{len(retries)} retry lines in 30 s"
    assert max(delays) <= 4.0 and delays[0] < 1.0, delays
    assert worker.lines("resumed"), worker.output[-6000:]
    assert worker.stop() == 0


def test_postgres_restart_while_the_worker_runs(pg_cluster, conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'before')")
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1", "--retry-max-delay", "1").start()
    wait_until(lambda: outbox_empty(dsn), 30, "first delivery")
    pg_cluster.restart()
    pg_cluster.wait_ready()
    with psycopg.connect(dsn, autocommit=True) as again:
        again.execute("INSERT INTO t VALUES (2, 'after restart')")
        wait_until(lambda: outbox_empty(dsn), 60, "delivery after the restart")
        assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "before"], [2, "after restart"]]
    assert worker.lines("retry") and worker.stop() == 0


@pytest.mark.parametrize("capture", ["trigger"], indirect=True)  # skip_transaction: trigger capture only
def test_poison_change_blocks_visibly_then_resumes_or_is_skipped(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    # A constraint only the target has, as an operator might add by mistake.
    read_rows(turso.url, "CREATE TRIGGER no_bad BEFORE INSERT ON t WHEN NEW.v LIKE 'bad%' "
                         "BEGIN SELECT RAISE(ABORT, 'no bad rows here'); END")
    for i, v in enumerate(["good", "bad one", "after", "bad two", "last"], start=1):
        conn.execute("INSERT INTO t VALUES (%s, %s)", (i, v))
    first_bad_txid = conn.execute(
        "SELECT txid::text FROM pgturso.outbox ORDER BY id OFFSET 1 LIMIT 1").fetchone()[0]

    result = run_worker(dsn, turso.url)
    assert result.returncode == 2
    assert "event=blocked" in result.stderr and "public.t" in result.stderr and "no bad rows here" in result.stderr
    # Everything before the poison transaction is applied, nothing after it.
    assert turso.query("SELECT id FROM t ORDER BY id") == [[1]]
    status = conn.execute("SELECT worker_status, last_error, last_error_table, last_error_txid::text, "
                          "pending_events FROM pgturso.status").fetchone()
    assert status[0] == "blocked" and "no bad rows here" in status[1]
    assert status[2] == "public.t" and status[3] == first_bad_txid and status[4] == 4
    shown = subprocess.run([sys.executable, "-m", "pgturso", "status", "--dsn", dsn], capture_output=True, text=True)
    assert shown.returncode == 1 and "target default: worker blocked" in shown.stdout
    assert "no bad rows here" in shown.stdout
    assert first_bad_txid in shown.stdout and "public.t" in shown.stdout

    # The operator skips the first one deliberately; the skip is recorded.
    with pytest.raises(psycopg.Error, match="needs a reason"):
        conn.execute("SELECT pgturso.skip_transaction(%s::xid8, '')", (first_bad_txid,))
    conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'bad test row')", (first_bad_txid,))
    skipped = conn.execute("SELECT reason, rows, tables, error FROM pgturso.skipped_transaction").fetchall()
    assert skipped[0][:3] == ("bad test row", 1, ["public.t"]) and "no bad rows here" in skipped[0][3]

    # A running worker stays blocked on the next poison, retrying; fixing the target lets it resume.
    worker = WorkerProcess(dsn, turso.url, "--retry-max-delay", "1").start()
    try:
        wait_until(lambda: len(worker.lines("blocked")) >= 2, 30, "the worker to block on 'bad two'")
        assert turso.query("SELECT id FROM t ORDER BY id") == [[1], [3]]
        read_rows(turso.url, "DROP TRIGGER no_bad")
        wait_until(lambda: outbox_empty(dsn), 30, "the worker to resume")
        assert turso.query("SELECT id, v FROM t ORDER BY id") == [[1, "good"], [3, "after"], [4, "bad two"],
                                                                  [5, "last"]]
        assert conn.execute("SELECT worker_status FROM pgturso.status").fetchone()[0] in ("idle", "delivering")
    finally:
        assert worker.stop() == 0


def test_second_worker_is_a_hot_standby(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.track_table('t')")
    first = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    wait_until(lambda: outbox_empty(dsn), 30, "the first worker to deliver")
    second = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    try:
        wait_until(lambda: second.lines("standby"), 30, "the second worker to stand by")
        conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
        wait_until(lambda: outbox_empty(dsn), 30, "delivery by the first worker")
        assert not second.lines("delivered"), "the standby must not deliver while the first one is alive"
        first.kill()
        conn.execute("INSERT INTO t SELECT generate_series(11, 20)")
        wait_until(lambda: outbox_empty(dsn), 30, "the standby to take over")
        assert second.lines("lock_acquired") and second.lines("delivered")
        assert turso.query("SELECT count(*) FROM t") == [[20]]
        assert run_worker(dsn, turso.url).returncode == 3  # --once refuses to race the active worker
    finally:
        assert second.stop() == 0


def test_a_big_transaction_is_streamed_and_atomic(conn, dsn, turso: TursoServer):
    """One source transaction larger than many requests: bounded memory; nothing visible before COMMIT."""
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('big')")
    drain(dsn, turso.url)
    rows = int(os.environ.get("BIG_TRANSACTION_ROWS", "200000"))
    conn.execute("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,))
    small = ("--max-request-bytes", "1000000", "--max-statement-bytes", "250000")
    # Turso going away in the middle of the stream (from the 5th request on) must leave nothing of it.
    with CloudProxy(turso.url, "t") as cloud:
        original = cloud._forward
        calls = {"n": 0}

        def flaky(requests_):
            calls["n"] += 1
            if calls["n"] >= 5:
                raise OSError("connection reset in the middle of the transaction")
            return original(requests_)

        cloud._forward = flaky  # type: ignore[method-assign]
        failed = run_worker(dsn, cloud.url, "--auth-token", "t", "--retry-limit", "1", *small)
    assert failed.returncode == 1 and calls["n"] > 5
    # tursodb serves every client on one connection, so readers would see the open transaction; a restart
    # shows what was committed: nothing.
    turso.stop()
    turso.start()
    assert turso.query("SELECT count(*) FROM big") == [[0]]
    done, peak_mb = run_once_measuring_peak_rss(dsn, turso.url, *small, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert turso.query("SELECT count(*), min(id), max(id) FROM big") == [[rows, 1, rows]]
    assert peak_mb < 150, f"worker peak RSS {peak_mb:.0f} MB"
    assert pending(conn) == 0


@contextmanager
def _primary_and_standby(wal_level: str = "replica") -> Iterator[tuple[PgCluster, Callable[[], PgCluster]]]:
    """A primary that streams WAL, and a function that makes a standby of it (a base backup) and starts it."""
    primary = PgCluster(settings={"wal_level": wal_level, "max_wal_senders": "4", "hot_standby": "on"}).start()
    standbys: list[PgCluster] = []

    def start_standby() -> PgCluster:
        standby_dir = primary.base / "standby"
        subprocess.run(_as_postgres([str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                                     "-U", primary.user, "-D", str(standby_dir), "-R", "-X", "stream"]),
                       check=True, capture_output=True)
        standby = PgCluster(port=None)
        standby.base, standby.datadir = primary.base, standby_dir
        with open(standby_dir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {standby.port}\n")
        standby.pg_ctl("start", "-w", "-l", str(primary.base / "standby.log"))
        standbys.append(standby)
        return standby

    try:
        yield primary, start_standby
    finally:
        for standby in standbys:
            try:
                standby.pg_ctl("stop", "-m", "immediate", "-w")
            except subprocess.CalledProcessError:
                pass
        primary.stop()


def _wait_replayed(primary: PgCluster, standby: PgCluster) -> None:
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
    with psycopg.connect(standby.dsn(), autocommit=True) as replica:
        wait_until(lambda: replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0],
                   30, "the standby to replay")


def _ledger(dsn: str, capture: str = "trigger") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pgturso CASCADE")
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, v text)")
        conn.execute("SELECT pgturso.track_table('ledger', capture => %s)", (capture,))
        conn.execute("INSERT INTO ledger SELECT g, 'first' FROM generate_series(1, 100) g")


def _rows(dsn: str) -> list[list[object]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [list(r) for r in conn.execute("SELECT id, v FROM ledger ORDER BY id").fetchall()]


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_failover_to_a_promoted_standby_carries_on(turso: TursoServer, capture: str):
    """Trigger capture: the outbox is replicated with the data, so after promotion the worker resumes, nothing
    lost or doubled. Wal capture: PG 15 does not keep the slot on the standby; the worker finds it missing,
    makes a new one and copies the tables afresh (recreated on Turso: nothing doubled, nothing lost)."""
    with _primary_and_standby("logical" if capture == "wal" else "replica") as (primary, start_standby):
        dsn = primary.dsn()
        _ledger(dsn, capture)
        drain(dsn, turso.url)
        install_apply_counter(turso.url, "ledger")
        standby = start_standby()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO ledger SELECT g, 'pending' FROM generate_series(101, 200) g")
            conn.execute("UPDATE ledger SET v = 'changed' WHERE id <= 10")
        _wait_replayed(primary, standby)
        primary.pg_ctl("stop", "-m", "immediate", "-w")
        standby.pg_ctl("promote", "-w")
        new_dsn = standby.dsn()
        result = drain(new_dsn, turso.url)
        with psycopg.connect(new_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO ledger VALUES (201, 'on the new primary')")
            drain(new_dsn, turso.url)
            reported = conn.execute("SELECT coalesce(last_error, previous_error) FROM pgturso.status").fetchone()[0]
        assert turso.query("SELECT id, v FROM ledger ORDER BY id") == _rows(new_dsn)
        if capture == "wal":
            assert "event=slot_lost" in result.stderr and "missing" in reported
            assert re.search(r"re-copying (public\.)?ledger\b", reported), reported
            return
        # 100 new rows + 10 updates + 1 row after promotion; the first 100 were copied before the counter.
        assert turso.query("SELECT count(*) FROM applied") == [[111]], "no re-copy, nothing applied twice"
        assert "source_history_changed" not in result.stderr  # the marker's position is in the new history


def test_failover_to_a_lagging_standby_brings_turso_back_to_postgres(turso: TursoServer):
    """A standby promoted before it replayed changes already delivered: the new server lacks them, and hands
    out outbox ids and transaction ids again that the marker on Turso names. The worker sees that the marker's
    WAL position is not in the new server's history, forgets nothing by it (new events would go), and resyncs
    every table so that Turso holds what Postgres has, not the changes Postgres lost."""
    with _primary_and_standby() as (primary, start_standby):
        dsn = primary.dsn()
        _ledger(dsn)
        drain(dsn, turso.url)
        standby = start_standby()
        _wait_replayed(primary, standby)
        with psycopg.connect(standby.dsn(), autocommit=True) as replica:
            # The standby falls behind: it stops receiving WAL (a paused replay alone would not do: promotion
            # replays whatever WAL the standby has received).
            replica.execute("ALTER SYSTEM SET primary_conninfo = ''")
            replica.execute("SELECT pg_reload_conf()")
            wait_until(lambda: not replica.execute("SELECT count(*) FROM pg_stat_wal_receiver").fetchone()[0],
                       30, "the standby to stop receiving")
        with psycopg.connect(dsn, autocommit=True) as conn:  # delivered from the primary, never replayed
            conn.execute("INSERT INTO ledger SELECT g, 'lost' FROM generate_series(101, 150) g")
            conn.execute("UPDATE ledger SET v = 'lost' WHERE id <= 10")
        drain(dsn, turso.url)
        assert turso.query("SELECT count(*) FROM ledger WHERE v = 'lost'") == [[60]]
        primary.pg_ctl("stop", "-m", "immediate", "-w")
        standby.pg_ctl("promote", "-w")
        new_dsn = standby.dsn()
        marker = json.loads(turso.query("SELECT applied_ids FROM _pgturso_progress")[0][0])  # type: ignore[arg-type]
        with psycopg.connect(new_dsn, autocommit=True) as conn:
            for key in range(101, 121):  # one transaction each: their ids and xids repeat delivered ones
                conn.execute("INSERT INTO ledger VALUES (%s, 'new')", (key,))
            conn.execute("UPDATE ledger SET v = 'new' WHERE id IN (11, 12)")
            # The new server writes past the marker's WAL position: only its timeline tells the two apart.
            conn.execute("CREATE TABLE filler (n int)")  # not tracked
            while conn.execute("SELECT pg_current_wal_insert_lsn() <= %s::pg_lsn",
                               (marker["position"]["lsn"],)).fetchone()[0]:
                conn.execute("INSERT INTO filler VALUES (1)")
                conn.execute("SELECT pg_switch_wal()")
            position = conn.execute("SELECT pgturso._source_position()").fetchone()[0]
            assert position["timeline"] == marker["position"]["timeline"] + 1
        result = drain(new_dsn, turso.url)
        assert turso.query("SELECT id, v FROM ledger ORDER BY id") == _rows(new_dsn), result.stderr
        assert "source_history_changed" in result.stderr
        with psycopg.connect(new_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO ledger VALUES (121, 'later')")
        again = drain(new_dsn, turso.url)
        assert "source_history_changed" not in again.stderr, "the new marker is trusted: no second resync"
        assert turso.query("SELECT id, v FROM ledger ORDER BY id") == _rows(new_dsn)


def test_soak_target_is_wired():
    assert "soak:" in (REPO / "Makefile").read_text()


def test_immediate_shutdowns_at_random_moments_under_asynchronous_writes_never_recopy_lose_or_double(
        conn, dsn, turso: TursoServer, pg_cluster):
    """Attack on the marker's flushed position (f635a62, pgturso._source_position): writers commit one-row
    transactions with synchronous_commit = off (so commits are visible before their WAL is flushed) while the
    worker delivers; at a random moment Postgres is stopped with `-m immediate` (the WAL not flushed is lost:
    async commits with it), in every other round the worker SIGKILLed at the same instant, then Postgres is
    started again. Many rounds: the worker never takes the server for another history or Turso for behind (no
    source_history_changed, no target_behind, no table copied again), Turso ends with exactly Postgres's rows
    (none that the crash took from Postgres), each applied once. (A new case.)"""
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    install_apply_counter(turso.url, "t")
    copies = "SELECT array_agg(copy_started_at ORDER BY id) FROM pgturso.tracked_table"
    copies_before = conn.execute(copies).fetchone()[0]
    conn.execute("ALTER SYSTEM SET synchronous_commit = off")
    conn.execute("SELECT pg_reload_conf()")
    ids = itertools.count(1)
    ids_lock = threading.Lock()
    workers: list[WorkerProcess] = []

    def write(stop: threading.Event) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as writer:
                while not stop.is_set():
                    with ids_lock:
                        row = next(ids)
                    writer.execute("INSERT INTO t VALUES (%s, 'x')", (row,))
        except psycopg.Error:
            pass  # Postgres went down under it

    try:
        for round_ in range(8):
            worker = WorkerProcess(dsn, turso.url, "--batch-events", "10", "--idle-wait", "0.2").start()
            workers.append(worker)
            stop = threading.Event()
            writers = [threading.Thread(target=write, args=(stop,)) for _ in range(2)]
            for writer in writers:
                writer.start()
            wait_until(lambda w=worker: w.started, 60, "the worker to start")
            time.sleep(rng.uniform(0.2, 2.0))
            if round_ % 2 == 0:
                assert worker.proc is not None
                worker.proc.kill()  # SIGKILL, the same instant as the crash below
            pg_cluster.pg_ctl("stop", "-m", "immediate", "-w")
            stop.set()
            for writer in writers:
                writer.join(60)
            worker.kill()  # (one left running was retrying against a Postgres that is down)
            pg_cluster.pg_ctl("start", "-w", "-l", str(pg_cluster.logfile))
            pg_cluster.wait_ready()
    finally:
        with psycopg.connect(dsn, autocommit=True) as again:
            again.execute("ALTER SYSTEM RESET synchronous_commit")
            again.execute("SELECT pg_reload_conf()")
    final = WorkerProcess(dsn, turso.url, "--idle-wait", "0.2").start()
    workers.append(final)
    with psycopg.connect(dsn, autocommit=True) as again:
        try:
            assert again.execute("SELECT pgturso.wait_for_sync('300 s')").fetchone()[0]
        finally:
            assert final.stop() == 0
        logs = "\n".join(w.output for w in workers)
        for event_name in ("source_history_changed", "target_behind"):
            assert f"event={event_name}" not in logs, (seed, [line for line in logs.splitlines() if event_name in line])
        assert again.execute(copies).fetchone()[0] == copies_before, f"a table was copied again (seed {seed})"
        on_postgres = [r[0] for r in again.execute("SELECT id FROM t ORDER BY id").fetchall()]
    assert len(on_postgres) > 0
    assert [r[0] for r in turso.query("SELECT id FROM t ORDER BY id")] == on_postgres, f"seed {seed}"
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[len(on_postgres)] * 2], f"seed {seed}"
