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
    cluster = PgCluster(port=PG_PORT).start()
    yield cluster
    cluster.stop()


_pg_noproc = factories.postgresql_noproc(
    host="127.0.0.1", port=PG_PORT, user="postgres", dbname="pgturso_test", load=[_create_extension]
)


@pytest.fixture(scope="session")
def pg_server(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("_pg_noproc")


postgresql = factories.postgresql("pg_server")


@pytest.fixture
def conn(postgresql: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """A superuser connection (autocommit) to this test's database; pgturso is installed."""
    postgresql.autocommit = True
    return postgresql


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    info = postgresql.info
    return f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
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


def pending(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()
    assert row is not None
    return int(row[0])
