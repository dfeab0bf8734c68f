"""The initial copy runs in chunks beside live writes: no long locks, progress in pgturso.status, exact result."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time

import psycopg
from conftest import drain
from support.turso import TursoServer, read_rows
from support.workers import WorkerProcess, outbox_empty, wait_until

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest)

ROWS = int(os.environ.get("COPY_TEST_ROWS", "200000"))


def _writers(dsn: str, stop: threading.Event, commits: list[float], seed: int) -> None:
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            try:
                _write_one(conn, rng)
            except psycopg.errors.UniqueViolation:
                continue  # a key move onto a key that exists: Postgres refused it, nothing to replicate
            commits.append(time.monotonic())


def _write_one(conn: psycopg.Connection, rng: random.Random) -> None:
    k = rng.randint(1, int(ROWS * 1.1))
    roll = rng.random()
    if roll < 0.5:
        conn.execute("UPDATE big SET n = n + 1, v = 'changed' WHERE id = %s", (k,))
    elif roll < 0.7:
        conn.execute("DELETE FROM big WHERE id = %s", (k,))
    elif roll < 0.9:
        conn.execute("INSERT INTO big VALUES (%s, 'inserted', 0) ON CONFLICT (id) DO UPDATE SET n = big.n + 1",
                     (k,))
    else:
        conn.execute("UPDATE big SET id = %s WHERE id = %s", (int(ROWS * 1.1) + k, k))  # key moves




def test_copy_of_a_big_table_while_writers_write(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text, n int)")
    conn.execute("INSERT INTO big SELECT g, md5(g::text), 0 FROM generate_series(1, %s) g", (ROWS,))
    conn.execute("ANALYZE big")
    stop, commits = threading.Event(), []
    writers = [threading.Thread(target=_writers, args=(dsn, stop, commits, seed)) for seed in (1, 2)]
    for thread in writers:
        thread.start()
    worker = None
    try:
        time.sleep(0.3)
        copy_started = time.monotonic()
        conn.execute("SELECT pgturso.track_table('big')")
        worker = WorkerProcess(dsn, turso.url, "--copy-chunk-rows", "5000", "--idle-wait", "1").start()
        progress = []

        def copied() -> bool:
            state, done, total = conn.execute(
                "SELECT copy_state, copy_rows_done, copy_rows_total FROM pgturso.status").fetchone()
            progress.append((state, done, total))
            return state == "done"

        wait_until(lambda: (progress and progress[-1][1] > 0) or copied(), 300, "the copy to start", interval=0.02)
        shown = subprocess.run([sys.executable, "-m", "pgturso", "status", "--dsn", dsn], capture_output=True,
                               text=True)
        assert re.search(r"\n  big +big .*(\d+/\d+ rows|done)\n", shown.stdout), shown.stdout
        wait_until(copied, 300, "the copy to finish", interval=0.02)
        copy_finished = time.monotonic()
        started, finished = progress[0], progress[-1]
        assert started[0] == "copying" and started[2] and started[2] >= ROWS * 0.9, started
        assert any(0 < done < total for state, done, total in progress if state == "copying"), progress[:5]
        during_copy = [t for t in commits if copy_started < t < copy_finished]
        assert len(during_copy) > 50, "writers kept committing while the table was copied"
        assert all(thread.is_alive() for thread in writers)
        assert finished[1] >= ROWS * 0.9
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    try:
        wait_until(lambda: outbox_empty(dsn), 300, "the worker to catch up")
        expected = {r[0]: list(r) for r in conn.execute("SELECT id, v, n FROM big").fetchall()}
        actual = {r[0]: r for r in turso.query("SELECT id, v, n FROM big")}
        wrong = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        assert not wrong, [(k, expected.get(k), actual.get(k)) for k in wrong[:10]] + [worker.output[-3000:]]
    finally:
        assert worker is not None
        code = worker.stop()
        assert code == 0, worker.output[-3000:]


def test_resync_table_copies_afresh(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5000) g")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    read_rows(turso.url, "DELETE FROM t WHERE id % 10 = 0")
    read_rows(turso.url, "UPDATE t SET v = 'drift' WHERE id % 7 = 0")
    read_rows(turso.url, "INSERT INTO t VALUES (999999, 'only on turso')")
    conn.execute("SELECT pgturso.resync_table('t')")
    conn.execute("UPDATE t SET v = 'after resync' WHERE id = 1")
    assert conn.execute("SELECT copy_state FROM pgturso.status").fetchone() == ("copying",)
    drain(dsn, turso.url)
    expected = [list(r) for r in conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()]
    assert turso.query("SELECT id, v FROM t ORDER BY id") == expected
    assert conn.execute("SELECT copy_state, copy_rows_done FROM pgturso.status").fetchone() == ("done", 5000)
