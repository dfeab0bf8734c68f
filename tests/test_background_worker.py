"""Postgres runs the worker: ``shared_preload_libraries = 'pgturso'`` and a few ``pgturso.*`` lines (and
pg_cron, which runs ``pgturso.sync()`` on a schedule).

Each test starts its own cluster with the library preloaded (the background workers are registered at
server start) and a real tursodb, and asserts on the rows that arrive on Turso and on the server's log.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgturso.common.settings import SERVER_SETTINGS
from support.pgcluster import PG_BIN, PgCluster, _as_postgres
from support.turso import TursoServer
from support.workers import wait_until

WORKERS_QUERY = """
    SELECT application_name, query FROM pg_stat_activity WHERE backend_type = 'pgturso worker'
    ORDER BY application_name
"""


class PreloadCluster(PgCluster):
    def __init__(self, databases: str, url: str, **settings: str) -> None:
        super().__init__(settings={
            "shared_preload_libraries": "'pgturso'",
            "pgturso.database": f"'{databases}'",
            "pgturso.url": f"'{url}'",
            "pgturso.restart_delay": "1",
            "pgturso.retry_base_delay": "0.1",
            **settings,
        })

    def sql(self, statement: str, dbname: str = "postgres", params: Any = None) -> list[Any]:
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def python_pids(self) -> dict[str, int]:
        """The Python worker's pid per background worker (its pg_stat_activity row names it)."""
        pids = {}
        for name, activity in self.sql(WORKERS_QUERY):
            found = re.search(r"Python worker pid (\d+)", activity or "")
            if found:
                pids[name] = int(found.group(1))
        return pids


@pytest.fixture
def clusters() -> Iterator[list[PreloadCluster]]:
    started: list[PreloadCluster] = []
    yield started
    for cluster in started:
        cluster.stop()


def start(clusters: list[PreloadCluster], databases: str, url: str, **settings: str) -> PreloadCluster:
    cluster = PreloadCluster(databases, url, **settings)
    clusters.append(cluster)
    return cluster.start()


def create_app(cluster: PreloadCluster, dbname: str = "app", table: str = "t") -> None:
    """What the issue's user does: CREATE DATABASE, CREATE EXTENSION, track_table."""
    cluster.sql(f"CREATE DATABASE {dbname}")
    cluster.sql("CREATE EXTENSION pgturso CASCADE", dbname)
    cluster.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)", dbname)
    cluster.sql(f"SELECT pgturso.track_table('{table}')", dbname)


def turso_count(turso: TursoServer, table: str) -> int:
    try:
        return int(turso.query(f"SELECT count(*) FROM {table}")[0][0])
    except Exception:  # the table is not there yet
        return -1


def insert_and_wait(cluster: PreloadCluster, turso: TursoServer, rows: range, dbname: str = "app",
                    table: str = "t") -> None:
    cluster.sql(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(%s::int, %s::int) g", dbname,
                (rows.start, rows.stop - 1))
    wait_until(lambda: turso_count(turso, table) >= rows.stop - 1, 60,
               f"rows up to {rows.stop - 1} of {dbname}.{table} on Turso")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_missing_database_is_waited_for_quietly_then_delivered_from(clusters, turso: TursoServer):
    cluster = start(clusters, "app", turso.url)
    wait_until(lambda: "does not exist" in cluster.log(), 30, "the worker to notice the missing database")
    time.sleep(5)  # several more attempts: still the one line
    assert cluster.log().count("event=waiting") == 1, cluster.log()

    cluster.sql("CREATE DATABASE app")
    wait_until(lambda: "CREATE EXTENSION pgturso" in cluster.log(), 30, "the worker to wait for the extension")
    create_app_tables = ["CREATE EXTENSION pgturso CASCADE", "CREATE TABLE t (id int PRIMARY KEY, v text)",
                         "SELECT pgturso.track_table('t')"]
    for statement in create_app_tables:
        cluster.sql(statement, "app")
    insert_and_wait(cluster, turso, range(1, 101))
    assert turso.query("SELECT id, v FROM t WHERE id = 42") == [[42, "v42"]]
    assert cluster.log().count("event=waiting") == 2  # one per reason: no database, then no extension
    assert "app/default: level=info" in cluster.log() and " ts=" not in cluster.log()  # the server's prefix dates it

    workers = cluster.sql(WORKERS_QUERY)
    assert [name for name, _ in workers] == ["pgturso app/default"]
    assert "delivering app/default: Python worker pid" in workers[0][1]
    deliverer = cluster.sql("SELECT DISTINCT worker FROM pgturso.status", "app")
    assert re.fullmatch(r"background worker \d+ on .+ \(Python pid \d+\)", deliverer[0][0]), deliverer
    assert cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgturso-worker'"
                       " AND datname = 'app'")[0][0] >= 1


def test_a_crashed_python_worker_is_restarted_and_postgres_is_untouched(clusters, turso: TursoServer):
    cluster = start(clusters, "app", turso.url)
    create_app(cluster)
    insert_and_wait(cluster, turso, range(1, 11))
    started_at = cluster.sql("SELECT pg_postmaster_start_time()")[0][0]
    with psycopg.connect(cluster.dsn("app"), autocommit=True) as bystander:  # a session that must survive
        pid = cluster.python_pids()["pgturso app/default"]
        os.kill(pid, signal.SIGSEGV)
        wait_until(lambda: "terminated by signal 11" in cluster.log(), 30, "the crash to be logged")
        wait_until(lambda: cluster.python_pids().get("pgturso app/default") not in (None, pid), 30,
                   "a new Python worker")
        insert_and_wait(cluster, turso, range(11, 51))
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert cluster.sql("SELECT pg_postmaster_start_time()")[0][0] == started_at
    assert "terminating any other active server processes" not in cluster.log()
    assert not alive(pid)


def test_fast_shutdown_is_quick_and_leaves_no_worker_process(clusters, turso: TursoServer):
    from support.cloud_proxy import CloudProxy

    with CloudProxy(turso.url, None) as cloud:
        cluster = start(clusters, "app", cloud.url)
        create_app(cluster)
        insert_and_wait(cluster, turso, range(1, 11))
        defined = cluster.sql("SELECT name, boot_val, context FROM pg_settings WHERE name LIKE 'pgturso.%'")
        assert {name: (default, context) for name, default, context in defined} == {
            f"pgturso.{s.name}": (s.default, "sighup" if s.reload else "postmaster") for s in SERVER_SETTINGS}
        pid = cluster.python_pids()["pgturso app/default"]
        # The worker is in the middle of a request when the server stops, and Turso holds it for 120 s: told to
        # stop (SIGTERM), the worker would finish that batch first. Fast shutdown must not wait for it: the
        # supervisor SIGKILLs it after 0.5 s.
        cloud.stalls = [120.0]
        cluster.sql("INSERT INTO t VALUES (11, 'held by Turso')", "app")
        wait_until(lambda: cloud.holding > 0, 60, "Turso to hold the worker's request")
        began = time.monotonic()
        cluster.pg_ctl("stop", "-m", "fast", "-w")
        took = time.monotonic() - began
        # A bound far below the 120 s the worker would wait for Turso (the supervisor's 0.5 s grace and Postgres's
        # own shutdown checkpoint take the rest; a loaded machine stretches the latter), not a speed assertion.
        assert took < 30, f"pg_ctl -m fast stop took {took:.2f}s: it waited for the worker's request"
        assert not alive(pid)


def test_smart_shutdown_does_not_wait_for_the_workers_own_connection(clusters, turso: TursoServer):
    cluster = start(clusters, "app", turso.url)
    create_app(cluster)
    insert_and_wait(cluster, turso, range(1, 11))
    pid = cluster.python_pids()["pgturso app/default"]
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(cluster.datadir), "stop", "-m", "smart",
                                 "-w", "-t", "60"]), check=True, capture_output=True)
    assert "stopping the Python worker" in cluster.log(), cluster.log()
    assert not alive(pid)


def test_two_databases_and_a_named_target_deliver_independently(clusters, turso: TursoServer, tmp_path):
    other = TursoServer().start()
    try:
        cluster = start(clusters, "app, app/eu, shop", turso.url)
        create_app(cluster, "app", "t")
        cluster.sql("SELECT pgturso.add_target('eu', %s)", "app", (other.url,))
        cluster.sql("CREATE TABLE e (id int PRIMARY KEY, v text)", "app")
        cluster.sql("SELECT pgturso.track_table('e', target => 'eu')", "app")
        cluster.sql("CREATE DATABASE shop")
        cluster.sql(f"ALTER DATABASE shop SET pgturso.url = '{other.url}'")
        cluster.sql("CREATE EXTENSION pgturso CASCADE", "shop")
        cluster.sql("CREATE TABLE s (id int PRIMARY KEY, v text)", "shop")
        cluster.sql("SELECT pgturso.track_table('s')", "shop")

        insert_and_wait(cluster, turso, range(1, 21), "app", "t")
        insert_and_wait(cluster, other, range(1, 31), "app", "e")
        insert_and_wait(cluster, other, range(1, 41), "shop", "s")
        assert turso_count(turso, "e") == -1 and turso_count(turso, "s") == -1  # each went where it belongs
        pids = cluster.python_pids()
        assert sorted(pids) == ["pgturso app/default", "pgturso app/eu", "pgturso shop/default"]

        # One (database, target) crashing does not stop the others.
        os.kill(pids["pgturso app/eu"], signal.SIGKILL)
        insert_and_wait(cluster, turso, range(21, 41), "app", "t")
        insert_and_wait(cluster, other, range(41, 61), "shop", "s")
        insert_and_wait(cluster, other, range(31, 61), "app", "e")
    finally:
        other.cleanup()


def test_reload_changes_the_log_level(clusters, turso: TursoServer):
    cluster = start(clusters, "app", turso.url)
    create_app(cluster)
    insert_and_wait(cluster, turso, range(1, 11))
    wait_until(lambda: "event=delivered" in cluster.log(), 30, "an info line about the delivery")

    cluster.set("pgturso.log_level", "'warning'")  # appends it to postgresql.conf, then reloads
    wait_until(lambda: "event=reloaded changed=log_level" in cluster.log(), 30,
               "the Python worker to reload its settings")
    insert_and_wait(cluster, turso, range(11, 21))
    cluster.sql("SELECT pg_sleep(1)")  # let any line about that delivery reach the log
    after_reload = cluster.log().split("event=reloaded", 1)[1]
    assert "event=delivered" not in after_reload
    assert cluster.python_pids()  # the same process carries on


def test_a_separate_worker_and_the_background_worker_share_one_delivery_lock(clusters, turso: TursoServer):
    from support.workers import WorkerProcess

    cluster = start(clusters, "app", turso.url)
    create_app(cluster)
    insert_and_wait(cluster, turso, range(1, 11))
    separate = WorkerProcess(cluster.dsn("app"), turso.url).start()
    wait_until(lambda: separate.lines("standby"), 30, f"the separate worker to stand by: {separate.output}")
    # Both running: the background worker delivers, the separate one waits; pgturso.sync() does nothing.
    insert_and_wait(cluster, turso, range(11, 21))
    assert cluster.sql("SELECT pgturso.sync()", "app") == [(0,)]
    # Turn the background worker off: the separate process takes over.
    cluster.sql("ALTER SYSTEM SET pgturso.enabled = off")
    cluster.sql("SELECT pg_reload_conf()")
    wait_until(lambda: separate.lines("lock_acquired"), 30, "the separate worker to take over")
    insert_and_wait(cluster, turso, range(21, 31))
    assert "pgturso-worker on" in cluster.sql("SELECT DISTINCT worker FROM pgturso.status", "app")[0][0]
    assert separate.stop() == 0
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM t") == [[30, 30]]


def ensure_pg_cron() -> None:
    """pg_cron in the server that PG_BIN belongs to. A relocated copy of the packaged server (the team's
    development setup) was made before `make deps` installed postgresql-15-cron: give it the package's files."""
    pg_config = str(PG_BIN / "pg_config")
    pkglib = subprocess.run([pg_config, "--pkglibdir"], capture_output=True, text=True, check=True).stdout.strip()
    share = subprocess.run([pg_config, "--sharedir"], capture_output=True, text=True, check=True).stdout.strip()
    if os.path.exists(f"{pkglib}/pg_cron.so"):
        return
    packaged = "/usr/lib/postgresql/15/lib/pg_cron.so"
    assert os.path.exists(packaged), "pg_cron is missing: make deps installs postgresql-15-cron"
    shutil.copy(packaged, pkglib)
    for script in glob.glob("/usr/share/postgresql/15/extension/pg_cron*"):
        shutil.copy(script, f"{share}/extension/")


def test_pg_cron_schedules_pgturso_sync(clusters, turso: TursoServer):
    ensure_pg_cron()
    cluster = PgCluster(settings={"shared_preload_libraries": "'pg_cron'", "cron.database_name": "'app'",
                                  "pgturso.url": f"'{turso.url}'"})
    clusters.append(cluster)  # type: ignore[arg-type]
    cluster.start()
    sql = PreloadCluster.sql.__get__(cluster)
    sql("CREATE DATABASE app")
    for statement in ("CREATE EXTENSION pg_cron", "CREATE EXTENSION pgturso CASCADE",
                      "CREATE TABLE t (id int PRIMARY KEY, v text)", "SELECT pgturso.track_table('t')",
                      "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 30) g"):
        sql(statement, "app")
    # As the README says to schedule it: every minute.
    sql("SELECT cron.schedule('pgturso', '* * * * *', 'SELECT pgturso.sync()')", "app")
    wait_until(lambda: turso_count(turso, "t") == 30, 150, "pg_cron's pgturso.sync() to deliver the rows")
    first_run = "SELECT status, return_message FROM cron.job_run_details ORDER BY runid LIMIT 1"
    wait_until(lambda: sql(first_run, "app")[0][0] != "running", 60, "the job to finish")
    assert sql(first_run, "app") == [("succeeded", "1 row")]
    assert sql("SELECT count(*) FROM pgturso.outbox", "app") == [(0,)]
    deliverer = sql("SELECT DISTINCT worker FROM pgturso.status", "app")[0][0]
    assert deliverer.startswith("pgturso.sync() in backend"), deliverer


def test_a_wal_captured_target_is_delivered_by_the_background_worker(clusters, turso: TursoServer):
    cluster = start(clusters, "app", turso.url, wal_level="logical")
    cluster.sql("CREATE DATABASE app")
    cluster.sql("CREATE EXTENSION pgturso CASCADE", "app")
    cluster.sql("UPDATE pgturso.target SET capture = 'wal'", "app")
    cluster.sql("CREATE TABLE t (id int PRIMARY KEY, v text)", "app")
    cluster.sql("SELECT pgturso.track_table('t')", "app")
    insert_and_wait(cluster, turso, range(1, 51))
    cluster.sql("UPDATE t SET v = 'changed' WHERE id <= 5", "app")
    wait_until(lambda: turso.query("SELECT count(*) FROM t WHERE v = 'changed'") == [[5]], 60, "the update")


def test_workers_start_on_promotion_not_on_a_standby(clusters, turso: TursoServer):
    primary = start(clusters, "app", turso.url, wal_level="replica", max_wal_senders="4", hot_standby="on")
    create_app(primary)
    insert_and_wait(primary, turso, range(1, 11))
    standby_dir = primary.base / "standby"
    subprocess.run(_as_postgres([str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                                 "-U", primary.user, "-D", str(standby_dir), "-R", "-X", "stream"]),
                   check=True, capture_output=True)
    standby = PreloadCluster("app", turso.url)
    standby.base, standby.datadir, standby.logfile = primary.base, standby_dir, primary.base / "standby.log"
    with open(standby_dir / "postgresql.conf", "a") as conf:
        conf.write(f"port = {standby.port}\n")
    try:
        standby.pg_ctl("start", "-w", "-l", str(standby.logfile))
        primary.pg_ctl("stop", "-m", "fast", "-w")  # this primary's worker is gone; changes wait in the outbox
        # While in recovery: no worker (the standby is read-only, and the primary's worker delivers).
        standby.sql("SELECT pg_sleep(2)")
        assert standby.sql(WORKERS_QUERY) == []
        assert "started the Python worker" not in standby.log()
        standby.pg_ctl("promote", "-w")
        wait_until(lambda: standby.python_pids(), 30, "the worker to start after promotion")
        insert_and_wait(standby, turso, range(11, 31))
    finally:
        standby.pg_ctl("stop", "-m", "immediate", "-w")


def test_an_interpreter_without_psycopg_is_named_then_fixed_by_a_reload(clusters, turso: TursoServer):
    cluster = PreloadCluster("app", turso.url)
    clusters.append(cluster)
    bare = cluster.base / "bare"  # a Python without psycopg, as a fresh machine's python3 before apt-get
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    cluster.settings["pgturso.python"] = f"'{bare}/bin/python'"
    cluster.start()
    create_app(cluster)
    wait_until(lambda: "retrying cannot fix" in cluster.log(), 30, "the worker to give up on that interpreter")
    assert "cannot start: No module named 'psycopg'" in cluster.log()
    assert "python3-psycopg" in cluster.log()
    cluster.set("pgturso.python", "'/usr/bin/python3'")  # appends it to postgresql.conf, then reloads
    insert_and_wait(cluster, turso, range(1, 11))
    assert cluster.log().count("cannot start") == 1  # not retried every few seconds meanwhile


def test_the_background_worker_delivers_as_a_role_that_is_not_a_superuser(clusters, turso: TursoServer):
    cluster = start(clusters, "app", turso.url, **{"pgturso.role": "'pgturso_worker'"})
    wait_until(lambda: 'role "pgturso_worker" does not exist' in cluster.log(), 30, "the worker to wait")
    cluster.sql("CREATE ROLE pgturso_worker LOGIN")
    cluster.sql("CREATE DATABASE app")
    cluster.sql("CREATE EXTENSION pgturso CASCADE", "app")
    cluster.sql("SELECT pgturso.grant_worker('pgturso_worker')", "app")
    cluster.sql("CREATE TABLE t (id int PRIMARY KEY, v text)", "app")
    cluster.sql("SELECT pgturso.track_table('t')", "app")
    insert_and_wait(cluster, turso, range(1, 21))
    users = cluster.sql("SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name LIKE 'pgturso-worker%'")
    assert users == [("pgturso_worker",)]
    assert cluster.sql("SELECT rolsuper FROM pg_roles WHERE rolname = 'pgturso_worker'") == [(False,)]


def test_the_background_worker_delivers_every_tenant_of_a_pattern_target(clusters, turso: TursoServer):
    """`pgturso.database = 'app/tenant-%s'`: one background worker delivers each tenant to its own database. The
    tenant value here is a tursodb port, so that each tenant is a real server of its own (the server's Python has
    no pyturso for file: databases)."""
    other = TursoServer().start()
    try:
        ports = [turso.url.rsplit(":", 1)[1].strip("/"), other.url.rsplit(":", 1)[1].strip("/")]
        cluster = start(clusters, "app/tenant-%s", turso.url)
        cluster.sql("CREATE DATABASE app")
        cluster.sql("CREATE EXTENSION pgturso CASCADE", "app")
        cluster.sql("SELECT pgturso.add_target('tenant-%s', 'http://127.0.0.1:%s')", "app")
        cluster.sql("CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, item text)", "app")
        cluster.sql("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant')", "app")
        cluster.sql("INSERT INTO orders SELECT g, %s, 'first' FROM generate_series(1, 20) g", "app", (ports[0],))
        cluster.sql("INSERT INTO orders SELECT g, %s, 'second' FROM generate_series(21, 50) g", "app", (ports[1],))
        wait_until(lambda: turso_count(turso, "orders") == 20 and turso_count(other, "orders") == 30, 90,
                   "each tenant's rows in its own database")
        cluster.sql("UPDATE orders SET tenant = %s WHERE id = 1", "app", (ports[1],))  # a move between tenants
        wait_until(lambda: turso_count(turso, "orders") == 19 and turso_count(other, "orders") == 31, 60,
                   "the moved row to leave one tenant's database for the other's")
        assert other.query("SELECT item FROM orders WHERE id = 1") == [["first"]]
        assert list(cluster.python_pids()) == ["pgturso app/tenant-%s"]
    finally:
        other.cleanup()
