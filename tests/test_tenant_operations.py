"""Operating a pattern target ('tenant-%s'): verify and repair each tenant's database, status and metrics per
tenant, and the exit code a monitoring check relies on. Tenant databases are `file:` targets (pyturso)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from conftest import pending, run_worker
from support.pgcluster import free_port
from support.workers import WorkerProcess, wait_until
from test_security import login_role
from test_tenants import _metrics, _start_worker, drain_pattern, tenant_rows

TENANTS = ("acme", "globex", "initech")


def verify(dsn: str, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgturso", "verify", "--dsn", dsn, "--target", target,
                           "--settle-timeout", "1", *args], capture_output=True, text=True, timeout=300)


def write_on_turso(path: Path, *statements: str) -> None:
    """Change a tenant's database behind pgturso's back."""
    import turso as pyturso

    db = pyturso.connect(str(path))
    try:
        for sql in statements:
            db.execute(sql)
        db.commit()
    finally:
        db.close()


def tenants_setup(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """Three tenants' orders: a column kept in Postgres, a row filter, and rows of every tenant."""
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text, secret text, "
                 "status text NOT NULL DEFAULT 'open')")
    conn.execute("INSERT INTO orders SELECT g, (ARRAY['acme', 'globex', 'initech'])[g % 3 + 1], 'item' || g, "
                 "'s' || g, CASE WHEN g % 10 = 0 THEN 'draft' ELSE 'open' END FROM generate_series(1, 300) g")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id', "
                 "columns => ARRAY['id', 'tenant_id', 'item', 'status'], row_filter => $$status <> 'draft'$$)")


def on_turso(path: Path) -> list[tuple[Any, ...]]:
    return tenant_rows(path, "SELECT id, tenant_id, item, status FROM orders ORDER BY id")


def in_postgres(conn: psycopg.Connection[Any], tenant: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT id, tenant_id, item, status FROM orders WHERE tenant_id = %s AND status <> 'draft' ORDER BY id",
        (tenant,)).fetchall()]


def test_verify_compares_each_tenant_database_and_repairs_only_the_altered_one(conn, dsn, tmp_path: Path):
    tenants_setup(conn, tmp_path)
    drain_pattern(dsn)
    clean = verify(dsn, "tenant-%s")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    for tenant in TENANTS:  # each tenant's database compared with that tenant's rows only (filter applied)
        count = len(in_postgres(conn, tenant))
        assert f"tenant-{tenant}: public.orders -> orders: equal (postgres {count} rows, turso {count} rows)" \
            in clean.stdout, clean.stdout

    globex = tmp_path / "tenant-globex.db"
    # Drift in globex's database only: a row changed, one deleted, an extra row, and a row of acme's (its key
    # exists in Postgres, but it is not globex's: extra there), and a draft (filtered out: extra there too).
    write_on_turso(globex, "UPDATE orders SET item = 'tampered' WHERE id = 1",
                   "DELETE FROM orders WHERE id = 4",
                   "INSERT INTO orders VALUES (9999, 'globex', 'ghost', 'open')",
                   "INSERT INTO orders VALUES (3, 'acme', 'item3', 'open')",
                   "INSERT INTO orders VALUES (10, 'globex', 'draft row', 'draft')")
    untouched = {t: on_turso(tmp_path / f"tenant-{t}.db") for t in ("acme", "initech")}
    found = verify(dsn, "tenant-%s")
    assert found.returncode == 1, found.stdout + found.stderr
    assert "tenant-globex: public.orders -> orders: DIFFERENT" in found.stdout
    assert "2 missing or different, 3 extra on Turso" in found.stdout, found.stdout
    assert "tenant-acme: public.orders -> orders: equal" in found.stdout
    assert "tenant-initech: public.orders -> orders: equal" in found.stdout
    # one tenant alone, by its own target name
    assert verify(dsn, "tenant-acme").returncode == 0
    assert verify(dsn, "tenant-globex").returncode == 1

    repaired = verify(dsn, "tenant-%s", "--repair")
    assert repaired.returncode == 1 and "repair queued for 5 rows" in repaired.stdout, repaired.stdout
    # The repairs are globex's events only: the other tenants' databases get nothing.
    assert conn.execute("SELECT array_agg(DISTINCT tenant) FROM pgturso.outbox").fetchone()[0] == ["globex"]
    drain_pattern(dsn)
    assert verify(dsn, "tenant-%s").returncode == 0
    for tenant in TENANTS:
        assert on_turso(tmp_path / f"tenant-{tenant}.db") == in_postgres(conn, tenant), tenant
    assert {t: on_turso(tmp_path / f"tenant-{t}.db") for t in ("acme", "initech")} == untouched
    assert "secret" not in [r[1] for r in tenant_rows(globex, "PRAGMA table_info(orders)")]


def test_verify_of_a_pattern_reports_a_tenant_it_cannot_reach_and_goes_on(conn, dsn, tmp_path: Path):
    tenants_setup(conn, tmp_path)
    drain_pattern(dsn)
    # initech's database is elsewhere now, and empty: its table is missing there.
    conn.execute("SELECT pgturso.add_target('tenant-initech', %s)", (f"file:{tmp_path}/moved-initech.db",))
    result = verify(dsn, "tenant-%s")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tenant-acme: public.orders -> orders: equal" in result.stdout
    assert "tenant-globex: public.orders -> orders: equal" in result.stdout
    assert "tenant-initech" in result.stderr and "orders" in result.stderr


def test_verify_of_a_tenant_file_another_process_holds_open_says_so_and_goes_on(conn, dsn, tmp_path: Path):
    """A running pattern worker keeps a busy tenant's file: database open (pyturso locks the file): verify
    reports that tenant as not compared, with the reason, and compares the others (it crashed with a
    traceback, or said "all equal" when no tenant could be compared)."""
    tenants_setup(conn, tmp_path)
    drain_pattern(dsn)
    # Another process holds globex's file open, as a worker delivering to it does.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, turso; db = turso.connect(sys.argv[1]); "
                               "db.execute('SELECT 1').fetchall(); print('open', flush=True); sys.stdin.read()",
                               str(tmp_path / "tenant-globex.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        result = verify(dsn, "tenant-%s")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "tenant-acme: public.orders -> orders: equal" in result.stdout
    assert "tenant-initech: public.orders -> orders: equal" in result.stdout
    assert f"tenant-globex: cannot verify: file:{tmp_path}/tenant-globex.db is held open by another process" \
        in result.stderr, result.stderr
    assert "verified in" in result.stdout and "none differ, 1 tenant database(s) not compared" in result.stdout
    assert verify(dsn, "tenant-%s").returncode == 0  # once it is closed


def test_verify_of_a_pattern_without_tenants_says_so(conn, dsn, tmp_path: Path):
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    result = verify(dsn, "tenant-%s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no tenant databases yet" in result.stdout
    # an override of a tenant not seen yet is not a tenant database yet: said so, not "equal"
    conn.execute("SELECT pgturso.add_target('tenant-zeta', %s)", (f"file:{tmp_path}/zeta.db",))
    early = verify(dsn, "tenant-zeta")
    assert early.returncode == 0 and "tenant-zeta: no tables are tracked to this target" in early.stdout
    unknown = verify(dsn, "other-%s")
    assert unknown.returncode == 2 and "no target named 'other-%s'" in unknown.stderr


def status(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgturso", "status", "--dsn", dsn, *args], capture_output=True,
                          text=True, timeout=60)


def retrying_for(conn: psycopg.Connection[Any], target: str) -> float:
    row = conn.execute("SELECT extract(epoch FROM now() - failing_since)::float8 FROM pgturso.target_status "
                       "WHERE target = %s AND worker_status = 'retrying'", (target,)).fetchone()
    return row[0] if row and row[0] is not None else -1.0


def test_status_and_metrics_show_each_tenant_and_a_long_retry_fails_the_check(conn, dsn, tmp_path: Path):
    # globex's database is a server nobody listens on: its tenant retries, acme's delivers.
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    conn.execute("SELECT pgturso.add_target('tenant-globex', %s)", (f"http://127.0.0.1:{free_port()}",))
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    shown = status(dsn)
    assert "pattern tenant-%s: no tenant databases yet" in shown.stdout, shown.stderr
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'anvil'), (2, 'globex', 'gear'), (3, 'globex', 'rope')")
    port = free_port()
    worker = _start_worker(dsn, "--metrics-port", str(port))
    try:
        wait_until(lambda: retrying_for(conn, "tenant-globex") >= 0, 60, "globex to retry")
        wait_until(lambda: conn.execute("SELECT worker_status FROM pgturso.target_status "
                                        "WHERE target = 'tenant-acme'").fetchone()[0] == "idle", 60, "acme idle")
        rows = conn.execute("SELECT target, pattern, tenant, pending_rows, lag IS NOT NULL, worker_status, "
                            "last_error IS NOT NULL FROM pgturso.status WHERE table_name = 'orders'::regclass "
                            "ORDER BY target").fetchall()
        assert rows == [("tenant-acme", "tenant-%s", "acme", 0, False, "idle", False),
                        ("tenant-globex", "tenant-%s", "globex", 2, True, "retrying", True)]

        # Retrying for less than the threshold: reported, not failing (a Turso blip must not page anyone).
        shown = status(dsn, "--max-retrying", "3600")
        assert shown.returncode == 0, shown.stdout
        assert "pattern tenant-%s: 2 tenant database(s) (1 idle, 1 retrying)" in shown.stdout, shown.stdout
        assert "target tenant-globex (tenant globex of tenant-%s): worker retrying" in shown.stdout
        assert "target tenant-acme (tenant acme of tenant-%s): worker idle" in shown.stdout
        globex_block = shown.stdout.split("target tenant-globex")[1]
        assert "retrying for" in globex_block and "orders" in globex_block
        # Only what needs a look: for a pattern of hundreds of idle tenants, the one that is not.
        problems = status(dsn, "--max-retrying", "3600", "--problems")
        assert problems.returncode == 0 and "target tenant-globex" in problems.stdout, problems.stdout
        assert "target tenant-acme" not in problems.stdout and "pattern tenant-%s: 2 tenant" in problems.stdout
        # Longer than the threshold: the check fails, naming the tenant.
        wait_until(lambda: retrying_for(conn, "tenant-globex") > 1.5, 60, "globex to retry for a while")
        failing = status(dsn, "--max-retrying", "1")
        assert failing.returncode == 1, failing.stdout
        assert "over --max-retrying 1s" in failing.stdout.split("target tenant-globex")[1]
        assert "over --max-retrying" not in failing.stdout.split("target tenant-globex")[0]

        # One endpoint, each tenant's gauges and counters labelled with its target and its pattern.
        def samples() -> dict[str, float]:
            return _metrics(port)

        wait_until(lambda: samples().get(series("pgturso_backlog_rows", "tenant-globex")) == 2, 60,
                   "globex's backlog in the metrics")
        values = samples()
        assert values[series("pgturso_lag_seconds", "tenant-globex")] > 0
        assert values[series("pgturso_retries_total", "tenant-globex")] > 0
        assert values[series("pgturso_backlog_rows", "tenant-acme")] == 0
        assert values[series("pgturso_up", "tenant-acme")] == 1
        assert values[series("pgturso_rows_delivered_total", "tenant-acme")] == 1
        # The batch size in force, for a tenant that has delivered nothing yet too (it showed 0).
        assert values[series("pgturso_batch_rows_limit", "tenant-globex")] == values[
            series("pgturso_batch_rows_limit", "tenant-acme")] > 0
        # Every sample of the endpoint is a tenant's, tied to its pattern (one series per metric and tenant).
        assert all(name.endswith(',pattern="tenant-%s"}') for name in values), sorted(values)
        assert len(values) == 2 * len({name.split("{")[0] for name in values})  # metrics x tenants

        # globex comes back (its database moves to a file): the error and the retrying streak are over.
        conn.execute("SELECT pgturso.add_target('tenant-globex', %s)", (f"file:{tmp_path}/globex-now.db",))
        worker.stop()
        worker = _start_worker(dsn)
        wait_until(lambda: pending(conn) == 0, 60, "globex delivered")
        wait_until(lambda: status(dsn, "--max-retrying", "1").returncode == 0, 60, "status healthy again")
        # The streak ends when the tenant's state is next recorded after the delivery got past the error.
        wait_until(lambda: conn.execute("SELECT failing_since FROM pgturso.delivery_state "
                                        "WHERE target = 'tenant-globex'").fetchone()[0] is None, 60,
                   "globex's retrying streak to be over")
    finally:
        worker.stop()


def test_status_fails_on_a_plain_target_retrying_too_long(conn, dsn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pgturso.add_target('eu', %s)", (f"http://127.0.0.1:{free_port()}",))
    conn.execute("SELECT pgturso.track_table('t', target => 'eu')")
    conn.execute("INSERT INTO t VALUES (1), (2)")
    port = free_port()
    worker = WorkerProcess(dsn, "", "--target", "eu", "--metrics-port", str(port),
                           env={"PGTURSO_RETRY_MAX_DELAY": "1"}).start()
    try:
        wait_until(lambda: retrying_for(conn, "eu") >= 0, 60, "eu to retry")
        # The backlog and lag of a target that is down are in the metrics (they were only read after a delivery).
        wait_until(lambda: _metrics(port).get("pgturso_backlog_rows") == 2, 60, "the backlog in the metrics")
        assert _metrics(port)["pgturso_lag_seconds"] > 0 and _metrics(port)["pgturso_up"] == 0
        assert status(dsn).returncode == 0  # the default threshold (5 minutes) is not reached
        wait_until(lambda: retrying_for(conn, "eu") > 1.5, 60, "eu to retry for a while")
        failing = status(dsn, "--max-retrying", "1")
        assert failing.returncode == 1 and "target eu: worker retrying" in failing.stdout, failing.stdout
        assert status(dsn, "--max-retrying", "0").returncode == 0  # 0: never
    finally:
        worker.stop()


def oldest_pending_age(conn: psycopg.Connection[Any], target: str) -> float:
    row = conn.execute("SELECT extract(epoch FROM max(lag))::float8 FROM pgturso.status WHERE target = %s",
                       (target,)).fetchone()
    return row[0] if row and row[0] is not None else -1.0


def test_status_max_lag_names_each_target_and_tenant_whose_oldest_change_is_too_old(conn, dsn, tmp_path: Path):
    conn.execute("SELECT pgturso.add_target('eu', %s)", (f"file:{tmp_path}/eu.db",))
    conn.execute("SELECT pgturso.add_target('us', %s)", (f"file:{tmp_path}/us.db",))
    conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
    for name in ("eu", "us"):
        conn.execute(f"CREATE TABLE t_{name} (id int PRIMARY KEY)")
        conn.execute(f"SELECT pgturso.track_table('t_{name}', target => '{name}')")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
    conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
    conn.execute("INSERT INTO orders VALUES (1, 'acme', 'anvil'), (2, 'globex', 'gear')")
    for target in ("eu", "us", "tenant-%s"):
        result = run_worker(dsn, "", "--target", target)
        assert result.returncode == 0, result.stderr
    assert status(dsn, "--max-lag", "1").returncode == 0  # nothing pending anywhere
    # No worker runs now: eu's and globex's changes wait; us and acme have nothing pending.
    conn.execute("INSERT INTO t_eu VALUES (1)")
    conn.execute("INSERT INTO orders VALUES (3, 'globex', 'rope')")
    assert status(dsn, "--max-lag", "3600").returncode == 0  # younger than the threshold
    wait_until(lambda: min(oldest_pending_age(conn, t) for t in ("eu", "tenant-globex")) > 1.5, 60,
               "the pending changes to age")
    over = status(dsn, "--max-lag", "1")
    assert over.returncode == 1, over.stdout + over.stderr
    body, summary = over.stdout.rstrip("\n").rsplit("\n", 1)
    assert summary == "over --max-lag 1s: eu, tenant-globex"
    blocks = {block.split(":", 1)[0].split(" ")[0]: block for block in ("\n" + body).split("\ntarget ")[1:]}
    assert "over --max-lag 1s" in blocks["eu"] and "over --max-lag 1s" in blocks["tenant-globex"], over.stdout
    assert "over --max-lag" not in blocks["us"] + blocks["tenant-acme"] + blocks["default"]
    problems = status(dsn, "--max-lag", "1", "--problems")
    assert problems.returncode == 1 and "target eu:" in problems.stdout, problems.stdout
    assert "target tenant-globex" in problems.stdout and "target us:" not in problems.stdout
    assert "target tenant-acme" not in problems.stdout
    assert status(dsn, "--max-lag", "0").returncode == 0  # 0: never (the default)
    assert status(dsn).returncode == 0
    for target in ("eu", "tenant-%s"):  # delivered: nothing is old any more
        assert run_worker(dsn, "", "--target", target).returncode == 0
    assert status(dsn, "--max-lag", "1").returncode == 0


def series(metric: str, target: str, pattern: str = "tenant-%s") -> str:
    """A tenant's sample name on a pattern worker's endpoint."""
    return f'{metric}{{target="{target}",pattern="{pattern}"}}'


def test_a_tenant_metrics_member_started_again_is_one_series():
    from pgturso.common.metrics import Metrics

    pattern = Metrics()
    first = pattern.member({"target": "tenant-a", "pattern": "tenant-%s"})
    first.add("pgturso_rows_delivered_total", 3)
    again = pattern.member({"target": "tenant-a", "pattern": "tenant-%s"})  # handed over and back
    again.add("pgturso_rows_delivered_total", 2)
    lines = [ln for ln in pattern.render().splitlines() if ln.startswith("pgturso_rows_delivered_total")]
    assert lines == [series("pgturso_rows_delivered_total", "tenant-a") + " 5"]
    assert not first.serving


def test_metric_label_values_are_escaped():
    from pgturso.common.metrics import Metrics

    part = Metrics().member({"target": 'a"b\\c\nd'})
    assert part.labels == 'target="a\\"b\\\\c\\nd"'


def readme_per_tenant_example() -> tuple[str, list[str]]:
    """The SQL and shell blocks of README.md's "A database per tenant", as written there."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### A database per tenant", 1)[1]
    sql = section.split("```sql\n", 1)[1].split("```", 1)[0]
    shell = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return sql, [line.split("  #", 1)[0].strip() for line in shell.splitlines() if line.strip()]


def test_the_readme_per_tenant_example_delivers_rows_to_two_tenant_databases(conn, dsn, tmp_path: Path):
    import os
    import signal

    sql, commands = readme_per_tenant_example()
    # The README's Turso Cloud URLs, as local files (the only change to what it says).
    urls = {"libsql://tenant-%s-myorg.turso.io": f"file:{tmp_path}/tenant-%s.db",
            "libsql://acme-eu-myorg.turso.io": f"file:{tmp_path}/acme-eu.db"}
    for cloud, local in urls.items():
        assert cloud in sql
        sql = sql.replace(cloud, local)
    conn.execute(sql)
    run, shown, verified = commands
    assert run.startswith("pgturso-worker run") and shown.startswith("pgturso-worker status")
    # $DSN as the README's installation section sets the worker up: a role of its own, no superuser.
    with login_role(conn, dsn, "pgturso_worker") as worker_dsn:
        conn.execute("SELECT pgturso.grant_worker('pgturso_worker')")
        env = {**os.environ, "DSN": worker_dsn, "ADMIN_DSN": dsn, "PGTURSO_IDLE_WAIT": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(["bash", "-c", f"exec {run}"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=log.open("w"))
        try:
            wait_until(lambda: conn.execute("SELECT count(*) FROM pgturso.outbox").fetchone()[0] == 0, 90,
                       "the worker to deliver")
        finally:
            worker.send_signal(signal.SIGTERM)  # it holds the file: databases open (a server would not care)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        assert worker.returncode == 0, log.read_text()
        # As the README says: each database only its tenant's rows, without internal_note, and both plans.
        assert tenant_rows(tmp_path / "acme-eu.db", "SELECT * FROM orders") == [(1, "acme", "anvil")]
        assert tenant_rows(tmp_path / "tenant-globex.db", "SELECT * FROM orders") == [(2, "globex", "gear")]
        for database in ("acme-eu.db", "tenant-globex.db"):
            assert tenant_rows(tmp_path / database, "SELECT * FROM plans ORDER BY id") == [(1, "free", 0),
                                                                                          (2, "pro", 10)]
        assert not (tmp_path / "tenant-acme.db").exists()  # acme's own target overrides the pattern's URL
        status_run = subprocess.run(["bash", "-c", shown], env=env, capture_output=True, text=True, timeout=60)
        assert status_run.returncode == 0, status_run.stdout + status_run.stderr
        assert "target tenant-acme (tenant acme of tenant-%s)" in status_run.stdout
        assert "target tenant-globex (tenant globex of tenant-%s): worker stopped" in status_run.stdout
        verify_run = subprocess.run(["bash", "-c", verified], env=env, capture_output=True, text=True, timeout=60)
        assert verify_run.returncode == 0, verify_run.stdout + verify_run.stderr
        assert "tenant-globex: public.orders -> orders: equal (postgres 1 rows, turso 1 rows)" in verify_run.stdout
        assert "tenant-acme: public.plans -> plans: equal (postgres 2 rows, turso 2 rows)" in verify_run.stdout
        # The worker's role cannot read the tables: verify says none was compared, never "all equal".
        as_worker = subprocess.run(["bash", "-c", verified.replace("$ADMIN_DSN", "$DSN")], env=env,
                                   capture_output=True, text=True, timeout=60)
        assert as_worker.returncode == 2 and "all equal" not in as_worker.stdout, as_worker.stdout
        assert "2 tenant database(s) not compared" in as_worker.stdout, as_worker.stdout + as_worker.stderr


def test_verify_of_an_integer_routed_table_reads_each_tenant_by_index(conn, dsn, tmp_path: Path):
    from pgturso.capture.layout import TableLayout
    from pgturso.verify import _rows

    conn.execute("SELECT pgturso.add_target(%s, %s)", ("shop-%s", f"file:{tmp_path}/shop-%s.db"))
    conn.execute("CREATE TABLE sales (id int PRIMARY KEY, shop int NOT NULL, amount int)")
    conn.execute("CREATE INDEX ON sales (shop)")
    conn.execute("INSERT INTO sales SELECT g, g % 5, g FROM generate_series(1, 2000) g")
    conn.execute("SELECT pgturso.track_table('sales', target => 'shop-%s', route_by => 'shop')")
    conn.execute("ANALYZE sales")
    run = subprocess.run([sys.executable, "-m", "pgturso", "run", "--once", "--dsn", dsn, "--target", "shop-%s"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    spec = conn.execute("SELECT spec FROM pgturso.layout ORDER BY id DESC LIMIT 1").fetchone()[0]
    rows = _rows(TableLayout.from_spec(spec), "public.sales", with_params=False, tenant="3")
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN SELECT count(*) FROM {rows} AS r").fetchall())
    assert "Index Cond: (shop = 3)" in plan, plan  # an index finds the tenant's rows, not a walk of all of them
    assert conn.execute(f"SELECT count(*) FROM {rows} AS r").fetchone()[0] == 400
    write_on_turso(tmp_path / "shop-3.db", "DELETE FROM sales WHERE id = 3")
    found = verify(dsn, "shop-%s")
    assert found.returncode == 1 and "shop-3: public.sales -> sales: DIFFERENT" in found.stdout, found.stdout
    assert "shop-4: public.sales -> sales: equal (postgres 400 rows, turso 400 rows)" in found.stdout


def test_verify_repair_while_the_pattern_worker_delivers_to_tursodb_servers(conn, dsn, tmp_path: Path):
    from support.turso import TursoServer, read_rows

    servers = {name: TursoServer().start() for name in ("a", "b")}
    worker = None
    try:
        conn.execute("SELECT pgturso.add_target(%s, %s)", ("tenant-%s", f"file:{tmp_path}/tenant-%s.db"))
        for name, server in servers.items():
            conn.execute("SELECT pgturso.add_target(%s, %s)", (f"tenant-{name}", server.url))
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, item text)")
        conn.execute("INSERT INTO orders SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, 'i' || g "
                     "FROM generate_series(1, 200) g")
        conn.execute("SELECT pgturso.track_table('orders', target => 'tenant-%s', route_by => 'tenant_id')")
        worker = _start_worker(dsn)
        wait_until(lambda: pending(conn) == 0, 90, "both tenants delivered")
        read_rows(servers["b"].url, "UPDATE orders SET item = 'tampered' WHERE id = 1")
        read_rows(servers["b"].url, "INSERT INTO orders VALUES (2, 'a', 'i2')")  # a's row, extra on b
        conn.execute("UPDATE orders SET item = item || '!' WHERE id % 10 = 0")  # in flight while verify runs
        repaired = verify(dsn, "tenant-%s", "--repair", "--settle-timeout", "30")
        assert repaired.returncode == 1, repaired.stdout + repaired.stderr
        assert "tenant-b: public.orders -> orders: DIFFERENT" in repaired.stdout
        assert "tenant-a: public.orders -> orders: equal" in repaired.stdout
        assert "repair queued for 2 rows" in repaired.stdout and "repairs delivered" in repaired.stdout
        again = verify(dsn, "tenant-%s")
        assert again.returncode == 0, again.stdout + again.stderr
        assert servers["b"].query("SELECT item FROM orders WHERE id = 1") == [["i1"]]
        assert worker.stop() == 0, worker.output
    finally:
        if worker is not None and worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
        for server in servers.values():
            server.cleanup()
