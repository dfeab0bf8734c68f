"""Attacks on the background worker (extension/supervisor/pgturso.c), as a reviewer of a Postgres extension
would make them: signals to the supervisor and to its Python process at awkward moments, a postmaster
crash-restart mid-batch, immediate shutdown, hostile output, odd database names and a dropped database.

Each test starts its own cluster (the background workers are registered at server start) and a real
tursodb, and asserts on the rows on Turso, counting every write of a row there (``install_apply_counter``):
a batch applied twice, or by two deliverers at once, shows up in the count even when the rows end up right.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo
from support.pgcluster import PG_BIN, _as_postgres
from support.turso import TursoServer, install_apply_counter
from support.workers import wait_until
from test_background_worker import WORKERS_QUERY, PreloadCluster, clusters, create_app, insert_and_wait, start

__all__ = ["clusters"]  # the fixture, shared with test_background_worker


def deliverers(cluster: PreloadCluster) -> set[int]:
    """Every process running ``python -m pgturso run`` for this cluster (its PGHOST is the cluster's socket
    directory), whoever its parent is now: an orphan of a dead supervisor counts too."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if (os.path.basename(cmdline[0]).startswith(b"python") and b"pgturso" in cmdline and b"run" in cmdline
                and f"PGHOST={cluster.base}".encode() in environ):
            found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan waits for whoever adopted it to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def supervisor_pid(cluster: PreloadCluster) -> int:
    rows = cluster.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pgturso worker'")
    assert len(rows) == 1, rows
    return int(rows[0][0])


def one_new_deliverer(cluster: PreloadCluster, before: set[int]) -> int:
    """Wait until exactly one deliverer runs and it is none of ``before``; returns its pid.

    One look at /proc per check: two (one to count, one to compare) could see the old deliverer alone, then
    nobody (it ended before the next one started), and take that for a new one."""
    seen: set[int] = set()

    def one_new() -> bool:
        seen.clear()
        seen.update(deliverers(cluster))
        return len(seen) == 1 and not seen & before

    wait_until(one_new, 60, f"one new deliverer instead of {before}")
    return next(iter(seen))


def assert_each_row_written_once(cluster: PreloadCluster, turso: TursoServer, rows: int, counted: int) -> None:
    """All ``rows`` on Turso; the ``counted`` ones written since the counter was installed written once."""
    assert cluster.sql("SELECT count(*) FROM t", "app") == [(rows,)]
    wait_until(lambda: turso.query("SELECT count(*) FROM t") == [[rows]], 60, f"{rows} rows on Turso")
    assert turso.query("SELECT count(*), count(DISTINCT id) FROM applied") == [[counted, counted]]


def test_no_deliverer_outlives_its_supervisor_and_none_writes_twice(clusters, turso: TursoServer):
    # A wrapper that runs Python as its child instead of exec'ing it (an operator setting an environment
    # variable, say): the process that delivers is then a grandchild of the supervisor, which the kernel's
    # parent-death signal does not reach.
    cluster = PreloadCluster("app", turso.url)
    clusters.append(cluster)
    wrapper = cluster.base / "python-wrapper"
    wrapper.write_text("#!/bin/sh\n/usr/bin/python3 \"$@\"\n")
    wrapper.chmod(0o755)
    cluster.settings["pgturso.python"] = f"'{wrapper}'"
    cluster.start()
    create_app(cluster)
    insert_and_wait(cluster, turso, range(1, 11))
    install_apply_counter(turso.url, "t")
    first = one_new_deliverer(cluster, set())

    # pg_terminate_backend() of the supervisor, mid-batch: it stops its Python process and is started again.
    cluster.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(11, 19999) g", "app")
    cluster.sql("SELECT pg_terminate_backend(%s)", params=(supervisor_pid(cluster),))
    second = one_new_deliverer(cluster, {first})
    assert not running(first)
    insert_and_wait(cluster, turso, range(20000, 20011))

    # A postmaster crash-restart (a backend killed by SIGKILL) while the Python process is mid-batch: the old
    # one must be gone before a new one starts, or two deliver at once.
    cluster.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(20011, 40000) g", "app")
    with psycopg.connect(cluster.dsn("app")) as victim:
        os.kill(victim.info.backend_pid, signal.SIGKILL)
        wait_until(lambda: "terminating any other active server processes" in cluster.log(), 30, "the crash")
    cluster.wait_ready()
    wait_until(lambda: not running(second), 30, f"the Python process {second} of the crashed server to be gone")
    third = one_new_deliverer(cluster, {second})

    # A Python process that hangs (SIGSTOP), then its supervisor is terminated: the stopped process is killed.
    insert_and_wait(cluster, turso, range(40001, 40011))
    os.kill(third, signal.SIGSTOP)
    cluster.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(40011, 40020) g", "app")
    cluster.sql("SELECT pg_terminate_backend(%s)", params=(supervisor_pid(cluster),))
    fourth = one_new_deliverer(cluster, {third})
    assert not running(third)
    insert_and_wait(cluster, turso, range(40021, 40031))

    # Immediate shutdown mid-batch leaves no process behind; after the restart the rest is delivered once.
    cluster.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(40031, 60000) g", "app")
    cluster.pg_ctl("stop", "-m", "immediate", "-w")
    wait_until(lambda: not deliverers(cluster), 30, f"no deliverer after immediate shutdown: {deliverers(cluster)}")
    assert not running(fourth)
    cluster.pg_ctl("start", "-w", "-l", str(cluster.logfile))
    assert_each_row_written_once(cluster, turso, 60000, counted=60000 - 10)
    assert len(deliverers(cluster)) == 1


def test_hostile_output_is_logged_in_pieces_and_harms_nothing(clusters, turso: TursoServer):
    # A wrapper that writes what no log line should hold before it starts Python: a line far longer than the
    # supervisor's buffer, bytes that are not UTF-8, printf directives, a NUL, a lone carriage return.
    cluster = PreloadCluster("app", turso.url)
    clusters.append(cluster)
    wrapper = cluster.base / "noisy-python"
    wrapper.write_text("#!/bin/sh\n"
                       "head -c 100000 /dev/zero | tr '\\0' x; echo\n"
                       "printf 'bad \\377\\376 utf8 %%s %%n %%d\\000after-nul\\rcr\\n'\n"
                       "printf 'no newline at the end'\n"
                       "exec /usr/bin/python3 \"$@\"\n")
    wrapper.chmod(0o755)
    cluster.settings["pgturso.python"] = f"'{wrapper}'"
    cluster.start()
    create_app(cluster)
    insert_and_wait(cluster, turso, range(1, 101))
    log = cluster.logfile.read_bytes()
    assert b"x" * 8000 in log and b"x" * 9000 not in log  # split into lines of the buffer's size
    assert b"bad \xff\xfe utf8 %s %n %d" in log
    assert b"no newline at the end" in log
    assert b"terminating any other active server processes" not in log


def test_odd_database_names_and_a_dropped_database(clusters, turso: TursoServer):
    name = "we're a \"db\", with/slash"
    quoted = '"' + name.replace('"', '""') + '"'
    entry = '"' + f"{name}/default".replace('"', '""') + '"'  # quoted whole: it holds a comma and a slash
    cluster = start(clusters, entry.replace("'", "''"), turso.url)
    cluster.dsn = lambda dbname="postgres": make_conninfo(  # type: ignore[method-assign]
        host="127.0.0.1", port=cluster.port, user=cluster.user, dbname=dbname)

    def create() -> None:
        cluster.sql(f"CREATE DATABASE {quoted}")
        for statement in ("CREATE EXTENSION pgturso CASCADE", "CREATE TABLE t (id int PRIMARY KEY, v text)",
                          "SELECT pgturso.track_table('t')"):
            cluster.sql(statement, name)

    create()
    insert_and_wait(cluster, turso, range(1, 21), name)
    assert list(cluster.python_pids()) == [f"pgturso {name}/default"]

    # The list of databases needs a restart: a reload says so and keeps the running list.
    cluster.set("pgturso.database", "'other'")
    wait_until(lambda: 'parameter "pgturso.database" cannot be changed without restarting' in cluster.log(), 30,
               "the reload to refuse the new list")
    insert_and_wait(cluster, turso, range(21, 26), name)

    # DROP DATABASE waits until every process of the server has absorbed its barrier, the supervisor too.
    cluster.sql("CREATE DATABASE scratch")
    cluster.sql("DROP DATABASE scratch")
    # DROP DATABASE ... WITH (FORCE) ends the worker's sessions; it waits for the database to come back.
    cluster.sql(f"DROP DATABASE {quoted} WITH (FORCE)")
    wait_until(lambda: "does not exist" in cluster.log(), 30, "the worker to notice the dropped database")
    turso.query("DROP TABLE t")
    create()
    insert_and_wait(cluster, turso, range(1, 31), name)
    assert "terminating any other active server processes" not in cluster.log()


def test_a_malformed_database_list_is_named_and_starts_no_worker(clusters, turso: TursoServer):
    cluster = start(clusters, "app, /eu", turso.url)
    assert "invalid value for parameter \"pgturso.database\"" in cluster.log()
    assert "an entry is \"database\" or \"database/target\"" in cluster.log()
    assert cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pgturso worker'") == [(0,)]
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(cluster.datadir), "stop", "-m", "fast"]),
                   check=True, capture_output=True)


def test_more_entries_than_worker_slots_are_named_once(clusters, turso: TursoServer):
    cluster = start(clusters, ", ".join(f"db{i}" for i in range(300)), turso.url)
    log = cluster.log()
    assert "pgturso.database lists 300 entries, but max_worker_processes is 8" in log
    assert "db7" in log.split("pgturso.database lists", 1)[1].split("\n", 3)[1]  # the first left without one
    assert log.count("too many background workers") <= 1  # not one line per entry
    workers = cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pgturso worker'")[0][0]
    assert 0 < workers < 8


def test_long_non_ascii_names_are_shown_whole_or_cut_between_characters(clusters, turso: TursoServer):
    database, target = "é" * 31, "ü" * 31  # 62 bytes each: the longest names, two bytes a character
    cluster = start(clusters, f"{database}/{target}", turso.url)
    # Read by a client that decodes strictly: a name cut inside a character broke every such query.
    wait_until(lambda: cluster.python_pids(), 30, "the worker to show in pg_stat_activity")
    [(appname, activity)] = cluster.sql(WORKERS_QUERY)
    assert activity.startswith(f"delivering {database}/{target}: Python worker pid ")
    assert f"pgturso {database}/{target}".startswith(appname) and len(appname.encode()) <= 63
    wait_until(lambda: "does not exist" in cluster.log(), 30, "the worker to wait for the database")
