"""Shared fixtures: one real PostgreSQL 15 cluster per session, a fresh database and a fresh tursodb per test.

initdb refuses to run as root, so the cluster runs as the ``postgres`` user (support/pgcluster.py) and
pytest-postgresql's no-process fixtures hand out one database per test, cloned from a template that already
has ``CREATE EXTENSION pgturso CASCADE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories
from support import workers
from support.pgcluster import PgCluster, free_port
from support.turso import TursoServer

REPO = Path(__file__).resolve().parents[1]
PG_PORT = free_port()
WORKER = [sys.executable, "-m", "pgturso"]


def _create_extension(host: str, port: int, user: str, dbname: str, **_: Any) -> None:
    with psycopg.connect(host=host, port=port, user=user, dbname=dbname, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pgturso CASCADE")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    # wal_level = logical for the tests of capture => 'wal' (its cost to trigger capture is small); prepared
    # transactions for the two-phase commit tests.
    cluster = PgCluster(port=PG_PORT, settings={"wal_level": "logical", "max_replication_slots": "20",
                                                "max_prepared_transactions": "10"}).start()
    yield cluster
    cluster.stop()


_pg_noproc = factories.postgresql_noproc(
    host="127.0.0.1", port=PG_PORT, user="postgres", dbname="pgturso_test", load=[_create_extension]
)


@pytest.fixture(scope="session")
def pg_server(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("_pg_noproc")


postgresql = factories.postgresql("pg_server")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules that set ``CAPTURE_MODES`` run each of their database tests once per capture mode."""
    modes = getattr(metafunc.module, "CAPTURE_MODES", None)
    chosen = any(m.args and m.args[0] == "capture" for m in metafunc.definition.iter_markers("parametrize"))
    if modes and "capture" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("capture", modes, indirect=True)


@pytest.fixture
def capture(request: pytest.FixtureRequest) -> str:
    """The capture mode of the test database's targets: 'trigger' unless the module runs both."""
    return str(getattr(request, "param", "trigger"))


@pytest.fixture
def _capture_mode(postgresql: psycopg.Connection[Any], capture: str) -> Iterator[None]:
    """Every table this test tracks is captured by ``capture`` (a target's mode is set by its first table,
    or here, before it has any)."""
    postgresql.autocommit = True
    if capture == "wal":
        postgresql.execute("UPDATE pgturso.target SET capture = 'wal'")
    yield
    if capture == "wal":
        _kill_workers()  # a running worker would recreate the slot; a slot left behind blocks DROP DATABASE
        info = postgresql.info  # a fresh connection: the test may have restarted Postgres under this one
        with psycopg.connect(host=info.host, port=info.port, user=info.user, dbname=info.dbname,
                             autocommit=True) as fresh:
            if fresh.execute("SELECT to_regclass('pgturso.target')").fetchone()[0]:  # type: ignore[index]
                fresh.execute("SELECT pgturso._drop_slot(name) FROM pgturso.target")


@pytest.fixture
def conn(postgresql: psycopg.Connection[Any], _capture_mode: None) -> psycopg.Connection[Any]:
    """A superuser connection (autocommit) to this test's database; pgturso is installed."""
    postgresql.autocommit = True
    return postgresql


@pytest.fixture
def no_autovacuum(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """No autovacuum worker runs during the test (support.workers.autovacuum_paused): for tests that assert
    pgturso.status's in_sync after a worker stopped, which any commit since (an autoanalyze's too) turns false."""
    from support.workers import autovacuum_paused

    with autovacuum_paused(conn):
        yield


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any], _capture_mode: None) -> str:
    info = postgresql.info
    return f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    _kill_workers()


def _kill_workers() -> None:
    while workers.RUNNING:
        worker = workers.RUNNING.pop()
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
        worker.log.unlink(missing_ok=True)


@pytest.fixture
def turso() -> Iterator[TursoServer]:
    server = TursoServer().start()
    yield server
    server.cleanup()


def run_worker(dsn: str, url: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``pgturso-worker run --once`` as a user runs it; returns the finished process."""
    full_env = {**os.environ, "PGTURSO_RETRY_BASE_DELAY": "0.05", **(env or {})}
    url_flag = ["--url", url] if url else []  # no URL: the target's own (pgturso.url or pgturso.target)
    return subprocess.run(
        [*WORKER, "run", "--once", "--dsn", dsn, *url_flag, *args],
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def drain(dsn: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the worker once and insist that it succeeded."""
    result = run_worker(dsn, url, *args)
    assert result.returncode == 0, result.stderr
    return result


# The row changes and outbox events still in a wal target's slot (Insert, Update, Delete messages).
SLOT_PENDING = """
    SELECT count(*) FROM pgturso.target g JOIN pg_replication_slots r ON r.slot_name = pgturso._slot_name(g.name)
    CROSS JOIN LATERAL pg_logical_slot_peek_binary_changes(r.slot_name, NULL, NULL, 'proto_version', '1',
                                                           'publication_names', 'pgturso_tables,pgturso_outbox') c
    WHERE g.capture = 'wal' AND get_byte(c.data, 0) IN (73, 85, 68)
"""


def pending(conn: psycopg.Connection[Any]) -> int:
    """Changes not yet confirmed by Turso: outbox events (trigger capture), or what a slot still holds (wal)."""
    # to_jsonb: a database of 0.1.0 (before an upgrade) has no capture column
    wal = "SELECT EXISTS (SELECT 1 FROM pgturso.target g WHERE to_jsonb(g) ->> 'capture' = 'wal')"
    if conn.execute(wal).fetchone()[0]:  # type: ignore[index]
        # (plus the events a pattern's router wrote for its tenants, or trigger capture for a tenant)
        row = conn.execute(f"SELECT ({SLOT_PENDING}) + (SELECT count(*) FROM pgturso.outbox WHERE tenant IS NOT NULL)"
                           ).fetchone()
    else:
        row = conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()
    assert row is not None
    return int(row[0])
