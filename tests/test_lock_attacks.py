"""Attacks on promise 2: pgturso never makes an application's write or DDL wait on the worker or on Turso, nor
fail, where it would not without pgturso. Each test builds the interleaving with real sessions and shows who
waits on whom through pg_locks / pg_stat_activity, then checks the rows that reach Turso."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from support.turso import TursoServer
from support.workers import WorkerProcess, outbox_empty, wait_until

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest) unless it says

# Backends waiting for a lock, with whom they wait for.
WAITING = """
    SELECT a.pid, a.application_name, pg_blocking_pids(a.pid) FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
"""


def waiting(conn: psycopg.Connection[Any]) -> list[tuple[int, str, list[int]]]:
    return [(int(pid), str(app), list(blockers)) for pid, app, blockers in conn.execute(WAITING).fetchall()]


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
