"""Upgrades in place: ``ALTER EXTENSION pgturso UPDATE`` from every earlier release.

An installed pgturso is never dropped and re-created to upgrade it (that would lose the outbox). The build
keeps each older release's install script (extension/history/) and generates the upgrade scripts from the
same sources as a fresh install (extension/build.py). Two things are checked here against a real cluster:

- the catalog an upgrade leaves is the catalog a fresh install creates (functions and their bodies,
  settings, rights and security; tables and their columns; views; event triggers; extension membership);
- a database upgraded with undelivered events, and tracked tables, delivers every event afterwards, and its
  capture functions are regenerated with the new code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from conftest import REPO, drain, pending
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer, install_apply_counter
from support.workers import WorkerProcess, wait_until

OLD_VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0"]

# Everything of the extension that a user could tell apart, as comparable rows. Names of generated
# constraints and the order of columns added by ALTER TABLE differ legitimately, so columns are compared
# as a set per table with their type, default, nullability.
CATALOG_QUERIES = {
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_function_result(p.oid), p.prosrc, p.prosecdef,
               p.provolatile, coalesce(p.proconfig, '{}')::text, coalesce(p.proacl::text, ''),
               obj_description(p.oid, 'pg_proc')
        FROM pg_proc p WHERE p.pronamespace = 'pgturso'::regnamespace
          AND p.proname !~ '^_capture_[0-9]'  -- generated per tracked table, compared by the other test
        ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attstorage, a.attcompression
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'pgturso'::regnamespace AND c.relkind IN ('r', 'v', 'p')
        ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind, coalesce(c.relacl::text, ''), coalesce(c.reloptions::text, ''),
               CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END
        FROM pg_class c WHERE c.relnamespace = 'pgturso'::regnamespace ORDER BY 1""",
    "constraints": """
        SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE connamespace = 'pgturso'::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT regexp_replace(pg_get_indexdef(indexrelid), 'INDEX \\S+ ON', 'INDEX ON')
        FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'pgturso'::regnamespace)
        ORDER BY 1""",
    "event_triggers": """
        SELECT evtname, evtevent, evtfoid::regproc::text, evtenabled, coalesce(evttags::text, '')
        FROM pg_event_trigger ORDER BY 1""",
    "members": """
        SELECT pg_describe_object(classid, objid, objsubid) FROM pg_depend
        WHERE refclassid = 'pg_extension'::regclass
          AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pgturso') AND deptype = 'e'
        ORDER BY 1""",
    "config_tables": """
        SELECT coalesce((SELECT array_agg(c::regclass::text ORDER BY c::regclass::text)
                         FROM unnest(extconfig) AS c), '{}')::text, coalesce(extcondition::text, '')
        FROM pg_extension WHERE extname = 'pgturso'""",
    "version": "SELECT extversion FROM pg_extension WHERE extname = 'pgturso'",
}


@contextmanager
def _database(pg_cluster: Any, name: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(pg_cluster.dsn(name), autocommit=True) as conn:
            yield conn
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _catalog(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {name: conn.execute(sql).fetchall() for name, sql in CATALOG_QUERIES.items()}


@pytest.mark.parametrize("old_version", OLD_VERSIONS)
def test_an_upgraded_catalog_equals_a_fresh_install(pg_cluster, old_version):
    with _database(pg_cluster, "upgrade_fresh") as fresh, _database(pg_cluster, "upgrade_old") as old:
        fresh.execute("CREATE EXTENSION pgturso CASCADE")
        old.execute(f"CREATE EXTENSION pgturso VERSION '{old_version}' CASCADE")
        assert old.execute("SELECT extversion FROM pg_extension WHERE extname = 'pgturso'").fetchone() == (
            old_version,)
        old.execute("ALTER EXTENSION pgturso UPDATE")
        want, got = _catalog(fresh), _catalog(old)
        for name in CATALOG_QUERIES:
            missing = sorted(set(want[name]) - set(got[name]), key=str)
            extra = sorted(set(got[name]) - set(want[name]), key=str)
            assert not missing and not extra, f"{name} differ after the upgrade: missing {missing}, extra {extra}"


@pytest.mark.parametrize("old_version", OLD_VERSIONS)
def test_upgrade_with_pending_events_delivers_everything(pg_cluster, turso: TursoServer, old_version):
    with _database(pg_cluster, "upgrade_pending") as conn:
        dsn = pg_cluster.dsn("upgrade_pending")
        conn.execute(f"CREATE EXTENSION pgturso VERSION '{old_version}' CASCADE")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, at timestamptz)")
        conn.execute("CREATE SCHEMA s; CREATE TABLE s.other (k text PRIMARY KEY, n bigint)")
        conn.execute("INSERT INTO items SELECT g, 'before ' || g, '2026-01-01' FROM generate_series(1, 50) g")
        conn.execute("SELECT pgturso.track_table('items')")
        conn.execute("SELECT pgturso.track_table('s.other')")
        # 0.1.0 made unique indexes UNIQUE on Turso; the upgrade re-creates them plain (layout.Index says why).
        conn.execute("CREATE TABLE uq (id int PRIMARY KEY, u text UNIQUE)")
        conn.execute("SELECT pgturso.track_table('uq')")
        conn.execute("INSERT INTO s.other VALUES ('a', 1), ('b', 2)")
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok')")
        conn.execute("CREATE TABLE moods (id int PRIMARY KEY, m mood, ms mood[])")
        conn.execute("SELECT pgturso.track_table('moods')")
        conn.execute("INSERT INTO moods VALUES (1, 'sad', '{sad,ok}')")
        conn.execute("UPDATE items SET name = 'updated' WHERE id <= 10")
        conn.execute("DELETE FROM items WHERE id > 45")
        before = pending(conn)
        assert before > 0

        conn.execute("ALTER EXTENSION pgturso UPDATE")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pgturso'").fetchone() != (
            old_version,)
        # Nothing pending was lost by the upgrade, and capture still works with the regenerated functions,
        # which stay outside the extension (pg_dump dumps them with the triggers that use them).
        assert pending(conn) == before
        assert conn.execute(CATALOG_QUERIES["members"]).fetchall() == [
            m for m in conn.execute(CATALOG_QUERIES["members"]).fetchall() if not re.search(r"_capture_[0-9]", m[0])]
        # The regenerated capture functions encode with this version's code (docs/security.md): a cast the
        # type's owner adds is never run by them (0.1.0's json_build_array ran it as the extension owner).
        conn.execute("""
            CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE plpgsql AS
                $$ BEGIN RAISE EXCEPTION 'a user-defined cast ran'; END $$;
            CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)""")
        conn.execute("INSERT INTO moods VALUES (2, 'ok', '{ok}')")
        # ... and they go with the extension (DROP EXTENSION removes them and their triggers).
        assert conn.execute("""
            SELECT count(*) FROM pg_depend d
            WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pgturso') AND d.deptype = 'x'
              AND (d.objid IN (SELECT oid FROM pg_trigger WHERE tgname LIKE 'pgturso_capture_%')
                   OR d.objid IN (SELECT oid FROM pg_proc WHERE proname ~ '^_capture_[0-9]+$'))""").fetchone() == (
            4 * 5,)
        conn.execute("INSERT INTO items VALUES (100, 'after', '2026-11-28')")
        conn.execute("UPDATE s.other SET n = n * 10")
        conn.execute("ALTER TABLE items ADD COLUMN extra int")
        conn.execute("UPDATE items SET extra = id WHERE id = 100")
        conn.execute("INSERT INTO uq VALUES (2, 'b'), (1, 'a')")
        conn.execute("UPDATE uq SET id = id + 1")  # Turso: delete 1, then (3,'b') while (2,'b') is still there

        drain(dsn, turso.url)
        assert pending(conn) == 0
        assert turso.query("SELECT id, name, extra FROM items ORDER BY id") == [
            [r[0], r[1], r[2]] for r in conn.execute("SELECT id, name, extra FROM items ORDER BY id").fetchall()]
        assert turso.query('SELECT k, n FROM "s.other" ORDER BY k') == [["a", 10], ["b", 20]]
        assert turso.query("SELECT id, u FROM uq ORDER BY id") == [[2, "a"], [3, "b"]]
        assert turso.query("SELECT sql FROM sqlite_schema WHERE name = 'uq_u_key'") == [
            ['CREATE INDEX "uq_u_key" ON "uq" ("u")']]
        assert turso.query("SELECT id, m, ms FROM moods ORDER BY id") == [[1, "sad", '["sad","ok"]'],
                                                                         [2, "ok", '["ok"]']]


# What a role may do in schema pgturso: EXECUTE on each function, each table privilege, UPDATE of each column.
ROLE_RIGHTS = """
    SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'pgturso'::regnamespace AND has_function_privilege(%(role)s, p.oid, 'EXECUTE')
    UNION ALL
    SELECT priv || ' ' || c.oid::regclass::text FROM pg_class c
    CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS priv
    WHERE c.relnamespace = 'pgturso'::regnamespace AND c.relkind IN ('r', 'v', 'p')
      AND has_table_privilege(%(role)s, c.oid, priv)
    UNION ALL
    SELECT 'UPDATE ' || c.oid::regclass::text || '.' || a.attname FROM pg_class c
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE c.relnamespace = 'pgturso'::regnamespace AND c.relkind IN ('r', 'p')
      AND has_column_privilege(%(role)s, c.oid, a.attnum, 'UPDATE')
    ORDER BY 1
"""


@pytest.mark.parametrize("old_version", [v for v in OLD_VERSIONS if v != "0.1.0"])  # grant_worker came in 0.2.0
def test_an_upgrade_gives_a_worker_role_what_grant_worker_gives_now(pg_cluster, old_version):
    """A role set up by grant_worker before the upgrade keeps working after it: the upgrade grants it what this
    version's grant_worker grants (a function whose signature changed is re-created without the old grant)."""
    with _database(pg_cluster, "upgrade_grants") as conn:
        conn.execute(f"CREATE EXTENSION pgturso VERSION '{old_version}' CASCADE")
        for role in ("upgraded_worker", "fresh_worker", "bystander"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role}")
        try:
            conn.execute("SELECT pgturso.grant_worker('upgraded_worker')")
            conn.execute("ALTER EXTENSION pgturso UPDATE")
            conn.execute("SELECT pgturso.grant_worker('fresh_worker')")
            rights = {role: [r[0] for r in conn.execute(ROLE_RIGHTS, {"role": role}).fetchall()]
                      for role in ("upgraded_worker", "fresh_worker", "bystander")}
            assert rights["fresh_worker"], "grant_worker granted nothing?"
            assert rights["upgraded_worker"] == rights["fresh_worker"]
            everyone = [r[0] for r in conn.execute(ROLE_RIGHTS, {"role": "public"}).fetchall()]
            assert rights["bystander"] == everyone, "the upgrade granted a role that grant_worker never named"
        finally:
            conn.execute("DROP EXTENSION IF EXISTS pgturso CASCADE")
            for role in ("upgraded_worker", "fresh_worker", "bystander"):
                conn.execute(f"DROP OWNED BY {role}")
                conn.execute(f"DROP ROLE {role}")


def test_this_versions_worker_delivers_batches_read_ahead_before_alter_extension_update(pg_cluster,
                                                                                          turso: TursoServer):
    """The package is installed before ``ALTER EXTENSION pgturso UPDATE`` runs (README: an installed database
    keeps working across an upgrade of the package): a worker of this version, started against a 0.5.0 catalog,
    reads batches ahead while others travel, and 0.5.0 has no pgturso.outbox_deletion (0.6.0's deletion
    generation) to check them against. It must deliver every row, the check falling back to counting the batch
    again, and keep delivering after the upgrade."""
    with _database(pg_cluster, "upgrade_worker_first") as conn:
        dsn = pg_cluster.dsn("upgrade_worker_first")
        conn.execute("CREATE EXTENSION pgturso VERSION '0.5.0' CASCADE")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute("SELECT pgturso.track_table('items')")
        for i in range(1, 41):  # one event per transaction: batches of 5 leave more pending, read ahead
            conn.execute("INSERT INTO items VALUES (%s, %s)", (i, f"row {i}"))
        small = ("--batch-events", "5", "--batch-rows", "5", "--idle-wait", "1")
        drain(dsn, turso.url, *small)
        assert pending(conn) == 0
        assert turso.query("SELECT count(*), sum(id) FROM items") == [[40, sum(range(1, 41))]]

        conn.execute("ALTER EXTENSION pgturso UPDATE")
        for i in range(41, 81):
            conn.execute("INSERT INTO items VALUES (%s, %s)", (i, f"row {i}"))
        drain(dsn, turso.url, *small)
        assert pending(conn) == 0
        assert turso.query("SELECT count(*), sum(id) FROM items") == [[80, sum(range(1, 81))]]


# The worker package of 0.6.0 (the commit before 0.7.0 opened): an operator may upgrade the catalog before
# restarting the worker, so a 0.6.0-era worker process runs over this version's catalog meanwhile.
RELEASE_0_6_0 = "4e4ac994a90032f3d06bf1a1d05df7439fcb102f"


@pytest.fixture(scope="module")
def worker_0_6_0(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that runs ``python -m pgturso`` from 0.6.0's worker package."""
    root = tmp_path_factory.mktemp("worker-0.6.0")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", RELEASE_0_6_0, "worker/pgturso"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    env = {"PYTHONPATH": str(root / "worker")}
    found = subprocess.run([sys.executable, "-c", "import pgturso; print(pgturso.__file__)"],
                           env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout
    assert found.startswith(str(root)), found
    return env


@pytest.mark.parametrize("capture", ["trigger", "wal"])
@pytest.mark.parametrize("worker_version", ["this", "0.6.0"])
def test_an_upgrade_while_the_worker_runs_over_a_pending_skip_loses_doubles_and_sends_nothing_skipped(
        pg_cluster, turso: TursoServer, capture: str, worker_version: str, request: pytest.FixtureRequest):
    """0.6.0's catalog, a backlog of one-row transactions being delivered by a running worker (this version's, or
    0.6.0's still running over the upgraded catalog) through a slow link; skip_transaction of one not delivered
    yet (a wal target meets it later in the slot), then ALTER EXTENSION pgturso UPDATE at once, then more
    writes: the skipped row never arrives, every other row once (Turso's write counter), the skip's record says
    one event, one row, not delivered. (A new case.)"""
    env = request.getfixturevalue("worker_0_6_0") if worker_version == "0.6.0" else {}
    backlog, skipped = 300, 280
    with _database(pg_cluster, "upgrade_skip") as conn, CloudProxy(turso.url, None, stream_expiry=60) as cloud:
        dsn = pg_cluster.dsn("upgrade_skip")
        conn.execute("CREATE EXTENSION pgturso VERSION '0.6.0' CASCADE")
        if capture == "wal":
            conn.execute("UPDATE pgturso.target SET capture = 'wal'")
        worker = None
        try:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("SELECT pgturso.track_table('t')")
            conn.execute("INSERT INTO t VALUES (0, 'first')")
            drain(dsn, turso.url)
            install_apply_counter(turso.url, "t")
            for i in range(1, backlog + 1):
                conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
            cloud.request_delay = 0.05
            worker = WorkerProcess(dsn, cloud.url, "--batch-events", "5", "--batch-rows", "5", "--idle-wait", "0.5",
                                   env=env).start()
            wait_until(lambda: turso.query("SELECT count(*) FROM applied")[0][0] >= 20, 120, "delivery to begin")
            conn.execute("SELECT pgturso.skip_transaction((SELECT xmin::text::xid8 FROM t WHERE id = %s), 'attack', "
                         "target => 'default')", (skipped,))
            conn.execute("ALTER EXTENSION pgturso UPDATE")
            assert turso.query(f"SELECT count(*) FROM t WHERE id >= {skipped}") == [[0]], \
                "the skip was met before the upgrade: delivery went too fast to show anything"
            for i in range(backlog + 1, backlog + 21):
                conn.execute("INSERT INTO t VALUES (%s, 'after the upgrade')", (i,))
            cloud.request_delay = 0.0
            last = f"SELECT count(*) FROM t WHERE id = {backlog + 20}"
            wait_until(lambda: turso.query(last) == [[1]], 180, "the rows written after the upgrade")
            assert worker.proc is not None and worker.proc.poll() is None, worker.output[-3000:]
            assert worker.stop() == 0, worker.output[-3000:]
            assert pending(conn) == 0
            total = backlog + 20 - 1
            assert turso.query(f"SELECT count(*) FROM t WHERE id = {skipped}") == [[0]], worker.output[-3000:]
            assert turso.query("SELECT count(*) FROM t WHERE id > 0") == [[total]]
            assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[total, total]], \
                worker.output[-3000:]
            assert conn.execute("SELECT events, rows, delivered_at FROM pgturso.skipped_transaction").fetchall() == [
                (1, 1, None)]
        finally:
            if worker is not None and worker.proc is not None and worker.proc.poll() is None:
                worker.kill()
            if capture == "wal":
                conn.execute("SELECT pgturso._drop_slot(name) FROM pgturso.target")
