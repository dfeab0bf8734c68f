"""Running ``pgturso-worker run`` as a separate process, the way an operator does, with its log kept."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

RUNNING: list[WorkerProcess] = []  # killed after each test by conftest, whatever the test did


class WorkerProcess:
    def __init__(self, dsn: str, url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "pgturso", "run", "--dsn", dsn, "--url", url, *args]
        self.env = {**os.environ, "PGTURSO_RETRY_BASE_DELAY": "0.1", **(env or {})}
        self.log = Path(tempfile.mkstemp(prefix="pgturso-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        RUNNING.append(self)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, as in a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as an operator stops it; its exit code (0 after a clean stop)."""
        assert self.proc is not None
        # A worker still starting (Python importing) has no SIGTERM handler yet: the signal would end it by
        # default (exit -15), whatever the test is about. On a loaded machine that takes seconds, longer than
        # some tests' work: wait for the worker to log something (or to exit) first. One that says nothing for
        # a minute is signalled all the same.
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and not self.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    @property
    def started(self) -> bool:
        """It logged an event: it handles SIGTERM (cli.main installs a handler before its first connection to
        Postgres, the worker's own before ``starting``; none logs before)."""
        return any(mark in self.output for mark in ("event=", '"event":'))

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, event: str) -> list[str]:
        return [line for line in self.output.splitlines() if f"event={event}" in line]


# `run --once` in a child that reports its own peak RSS as it exits. VmHWM, not getrusage's ru_maxrss: Linux
# carries ru_maxrss over from the process that forked the child (here the pytest worker, hundreds of MB after
# a few hundred tests), so it measured the test runner, not the worker.
_PEAK_RSS_SCRIPT = (
    "import re, sys; from pgturso.cli import main; rc = main(sys.argv[1:]); "
    "status = open('/proc/self/status').read(); "
    "print('peak_rss_kb', re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr); "
    "sys.exit(rc)"
)


def run_once_measuring_peak_rss(dsn: str, url: str, *args: str, timeout: float = 900,
                                env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """``pgturso-worker run --once`` to the end: the finished process and its peak RSS in MB (0 if it did not
    get to report it)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, "run", "--once", "--dsn", dsn, "--url", url,
                           *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    found = re.search(r"peak_rss_kb (\d+)", done.stderr)
    return done, int(found.group(1)) / 1024 if found else 0.0


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; a bound on waiting, not a performance assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def autovacuum_paused(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """No autovacuum worker runs in the cluster meanwhile. pgturso.status's in_sync after a stopped worker holds
    only while no transaction has committed since (it cannot tell an ANALYZE's commit from a write to a tracked
    table without reading the slot): an autoanalyze of the outbox, which a drain churns, would make it false at a
    random moment of a test that asserts it true."""
    conn.execute("ALTER SYSTEM SET autovacuum = off")
    conn.execute("SELECT pg_reload_conf()")
    try:
        wait_until(lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE backend_type = "
                                            "'autovacuum worker'").fetchall(), 120, "autovacuum workers to end")
        yield
    finally:
        conn.execute("ALTER SYSTEM RESET autovacuum")
        conn.execute("SELECT pg_reload_conf()")


def outbox_empty(dsn: str) -> bool:
    """Everything committed so far is on Turso (the outbox is empty; a wal target's slot is past it)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pgturso.wait_for_sync('0 s')").fetchone()
            return bool(row and row[0])
    except psycopg.OperationalError:
        return False


# What a failed wait for delivery shows, so that a failure seen once (e.g. on a loaded CI machine) says where the
# changes stopped: per target its worker's state, the outbox per target and tenant, the wal patterns' routers,
# blocked tenants and slots, and what the worker logged.
_SYNC_STATE_QUERIES = {
    "target_status": "SELECT target, worker_status, worker_alive, transactions_delivered, rows_delivered, retries, "
                     "last_error, pattern, tenant FROM pgturso.target_status ORDER BY target",
    "status": "SELECT table_name, target, pending_events, in_sync, worker_status, wal_pending_bytes, last_error "
              "FROM pgturso.status ORDER BY 1, 2",
    "outbox": "SELECT t.target, o.tenant, o.route, o.op, count(*), min(o.id), max(o.id), "
              "array_agg(DISTINCT o.txid::text) FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id "
              "JOIN pgturso.tracked_table t ON t.id = l.table_id GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    "blocked_tenant": "SELECT pattern, tenant, error, txid FROM pgturso.blocked_tenant ORDER BY 1, 2",
    "router": "SELECT pattern, marker, copies, pid FROM pgturso.router ORDER BY 1",
    "slots": "SELECT slot_name, active_pid, wal_status, confirmed_flush_lsn, pg_current_wal_insert_lsn() "
             "FROM pg_replication_slots ORDER BY 1",
    "sessions": "SELECT pid, application_name, state, wait_event_type, wait_event, now() - xact_start, "
                "left(query, 120) FROM pg_stat_activity WHERE datname = current_database() ORDER BY pid",
}


def sync_state(dsn: str, *workers: WorkerProcess) -> str:
    """Where undelivered changes are: pgturso's state (over a connection of its own) and the workers' logs."""
    parts: list[str] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, sql in _SYNC_STATE_QUERIES.items():
                try:
                    rows = conn.execute(sql).fetchall()
                except psycopg.Error as exc:
                    rows = [(f"(failed: {str(exc).strip()})",)]
                parts.append(f"-- {name}:\n" + "\n".join(repr(tuple(r)) for r in rows))
    except psycopg.Error as exc:
        parts.append(f"-- (Postgres unreachable: {str(exc).strip()})")
    for number, worker in enumerate(workers):
        parts.append(f"-- worker {number} ({' '.join(worker.cmd[3:])}):\n{worker.output[-20000:]}")
    return "\n".join(parts)


def wait_for_sync(conn: psycopg.Connection[Any], timeout: str, *workers: WorkerProcess) -> None:
    """pgturso.wait_for_sync(timeout) must say true; if not, fail showing where the changes are (sync_state)."""
    if not conn.execute("SELECT pgturso.wait_for_sync(%s)", (timeout,)).fetchone()[0]:  # type: ignore[index]
        raise AssertionError(f"pgturso.wait_for_sync('{timeout}') timed out\n{sync_state(_dsn_of(conn), *workers)}")


def _dsn_of(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    return f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"
