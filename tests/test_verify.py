"""``pgturso-worker verify``: finds every kind of difference, repairs exactly those rows, safe while delivering."""

from __future__ import annotations

import subprocess
import sys

from conftest import drain
from support.turso import TursoServer, read_rows
from support.workers import WorkerProcess, outbox_empty, wait_until

CAPTURE_MODES = ("trigger", "wal")  # every test here runs in both capture modes (conftest)


def verify(dsn: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--url", url,
                           "--settle-timeout", "2", *args], capture_output=True, text=True, timeout=300)


def test_verify_finds_and_repairs_missing_different_and_extra_rows(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text, raw bytea, at timestamptz, n numeric(6,2))")
    conn.execute("INSERT INTO a SELECT g, 'v' || g, decode(md5(g::text), 'hex'), '2024-01-01'::timestamptz "
                 "+ g * interval '1 hour', g / 7.0 FROM generate_series(1, 12000) g")
    conn.execute("CREATE TABLE b (k text, n int, PRIMARY KEY (k, n))")
    conn.execute("INSERT INTO b SELECT 'key' || g, g FROM generate_series(1, 50) g")
    conn.execute("SELECT pgturso.track_table('a')")
    conn.execute("SELECT pgturso.track_table('b')")
    drain(dsn, turso.url)
    clean = verify(dsn, turso.url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "all equal" in clean.stdout

    # Drift that only someone writing to Turso directly could cause.
    for sql in ("DELETE FROM a WHERE id IN (5, 6000)", "UPDATE a SET v = 'tampered' WHERE id = 7",
                "UPDATE a SET raw = x'00' WHERE id = 11000", "INSERT INTO a (id, v) VALUES (99999, 'extra')",
                "DELETE FROM b WHERE k = 'key3'", "INSERT INTO b VALUES ('ghost', 1)"):
        read_rows(turso.url, sql)
    found = verify(dsn, turso.url)
    assert found.returncode == 1
    assert "public.a -> a: DIFFERENT" in found.stdout and "4 missing or different, 1 extra" in found.stdout
    assert "public.b -> b: DIFFERENT" in found.stdout and "1 missing or different, 1 extra" in found.stdout
    assert "('5',)" in found.stdout and "[99999]" not in found.stdout and "(99999,)" in found.stdout

    # Repairs travel through the outbox; a running worker delivers them.
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    try:
        repaired = verify(dsn, turso.url, "--repair")
        assert "repair queued for 5 rows" in repaired.stdout and "repairs delivered" in repaired.stdout
        wait_until(lambda: outbox_empty(dsn), 30, "repairs to be delivered")
        again = verify(dsn, turso.url)
        assert again.returncode == 0, again.stdout
        assert turso.query("SELECT v FROM a WHERE id = 7") == [["v7"]]
        assert turso.query("SELECT count(*) FROM a WHERE id = 99999") == [[0]]
    finally:
        worker.stop()


def test_verify_is_not_fooled_by_changes_in_flight(conn, dsn, turso: TursoServer):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 3000) g")
    conn.execute("SELECT pgturso.track_table('t')")
    worker = WorkerProcess(dsn, turso.url, "--idle-wait", "1").start()
    try:
        wait_until(lambda: outbox_empty(dsn), 30, "the initial copy")
        conn.execute("UPDATE t SET v = v + 1 WHERE id % 3 = 0")  # pending while verify starts
        result = verify(dsn, turso.url, "t")
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        worker.stop()


def test_verify_names_an_untracked_table(conn, dsn, turso: TursoServer):
    result = verify(dsn, turso.url, "nope")
    assert result.returncode == 2 and "not tracked: nope" in result.stderr
