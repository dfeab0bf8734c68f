"""Scenario 11: a database per tenant (a pattern target), delivered by one worker process.

11a  the same rows copied into one `file:` database, and spread over one `file:` database per tenant.
11b  a live load spread over every tenant: commit-to-visible latency per tenant, then the same load again with
     one tenant's database (a tursodb server) down for a while: the other tenants' latency must not suffer.
11c  the worker's peak RSS with all those tenants, and what an idle tenant costs it (CPU, connections, files).
11f  11b's steady load again with the routed table captured from the WAL (``capture => 'wal'``, another pattern
     of `file:` databases): the pattern's router turns its slot into per-tenant outbox events, which the same
     per-tenant delivery sends. Its tenants are registered (and seeded) by the router before the load.

``--only 11b`` (or ``11b,11f``) skips 11a's copy: the tenants' databases are made by one row each instead (a few
seconds, not minutes), for measuring the live load alone. 11b's note counts the tenant batches delivered during the
steady load (tenant visits that delivered something) and the worker's CPU per batch: with fewer visits per second
than the load's transactions, batches grow until visits x transactions per batch = the load (a queue).

Visibility is read from the worker's own log, not by polling a thousand databases (which would load the
machine and the files being written): a tenant's transactions are delivered in its commit order, each
"delivered" line names the tenant and how many source transactions it applied, so the k-th line's running
total says which of that tenant's commits became visible when the line was written (after Turso committed
and Postgres recorded it: never earlier than the truth). Each tenant's rows are counted on its database at
the end.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import turso
from delivery import _percentile
from harness import Bench, Row, fmt_int, fmt_rate, progress, scratch_dir
from support.turso import TursoServer

COLUMNS = "(id bigint PRIMARY KEY, tenant_id text NOT NULL, txt text, n int)"
PATTERN = "tenant-%s"
WAL_PATTERN = "wal-%s"  # 11f: the same tenants, their table captured from the WAL


def _tenant_threads() -> int:
    """The worker's tenant_threads: its default, unless PGTURSO_TENANT_THREADS is set for the run."""
    from pgturso.common.settings import SETTINGS

    default = next(s.default for s in SETTINGS if s.name == "tenant_threads")
    return int(os.environ.get("PGTURSO_TENANT_THREADS", default))


def _tenant(number: int) -> str:
    return f"t{number:04d}"


class PatternRun:
    """``python -m pgturso run --target PATTERN`` with its JSON log read live: per tenant, the times at which
    its delivered transactions added up to 1, 2, 3, … (``per_row``: its rows, for a load of one row per
    transaction whose transactions the log does not count one by one: a wal pattern's router queues many source
    transactions in one routing transaction, which a tenant's "delivered" line counts as one)."""

    def __init__(self, dsn: str, target: str, *, once: bool, url: str | None = None,
                 extra: tuple[str, ...] = (), per_row: bool = False) -> None:
        self.per_row = per_row
        cmd = [sys.executable, "-m", "pgturso", "run", "--dsn", dsn, "--target", target, "--log-format", "json",
               *(["--url", url] if url else []), *(["--once"] if once else []), *extra]
        env = {**os.environ, "PGTURSO_RETRY_BASE_DELAY": "0.1", "PGTURSO_RETRY_MAX_DELAY": "1"}
        self.launched = time.monotonic()
        self.started: float | None = None
        self.visible: dict[str, list[float]] = defaultdict(list)  # tenant target -> time of each transaction
        self.rows = 0
        self.batches = 0  # "delivered" lines: tenant visits that delivered a batch
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.peak_kb = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.monotonic()
            try:
                fields = json.loads(line)
            except ValueError:
                self.errors.append(line.strip())
                continue
            name = fields.get("event")
            with self.lock:
                if name == "starting" and self.started is None:
                    self.started = now
                elif name == "delivered":
                    self.rows += int(fields.get("rows", 0))
                    self.batches += 1
                    self.visible[str(fields.get("target"))].extend(
                        [now] * int(fields.get("rows" if self.per_row else "transactions", 0)))
                elif fields.get("level") in ("warning", "error"):
                    self.errors.append(line.strip())

    def status(self, field: str) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def sample(self) -> None:
        self.peak_kb = max(self.peak_kb, self.status("VmHWM"))

    def wait(self, timeout: float) -> float:
        """Wait for the exit; returns the seconds from the worker's start to its exit."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.sample()
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"worker killed after {timeout:.0f}s: {' | '.join(self.errors[-3:])}")
            time.sleep(0.02)
        ended = time.monotonic()
        self.reader.join(10)
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {' | '.join(self.errors[-3:])}")
        return ended - (self.started or self.launched)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.sample()
            self.proc.terminate()
        self.wait(60)


def _count(path: Path, table: str) -> int:
    db = turso.connect(str(path))
    try:
        return int(db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])
    finally:
        db.close()


# -- 11a: the initial copy into one database and into one per tenant --------------------------------------------


def _copy_into_tenants(b: Bench, tmp: Path, tenants: int, per_tenant: int, server: TursoServer) -> tuple[float, float]:
    """Rows/s of track_table's copy of tenants x per_tenant rows into one file database, then into one per
    tenant (each drained by ``run --once``). The pattern 'tenant-%s' also gets the (empty) table of the live
    load, so the copy's tenants are ready for it; tenant t0000's database is the tursodb ``server`` (the one the
    live load takes down), the others are files."""
    total = tenants * per_tenant
    with b.connect() as conn:
        for table in ("fan_single", "fan_copy", "fan_live"):
            conn.execute(f"CREATE TABLE {table} {COLUMNS}")
        for table in ("fan_single", "fan_copy"):
            conn.execute(f"INSERT INTO {table} SELECT g, 't' || lpad((g % {tenants})::text, 4, '0'), 'row ' || g, "
                         f"g % 1000 FROM generate_series(1, {total}) AS g")
            conn.execute(f"VACUUM ANALYZE {table}")
        conn.execute("SELECT pgturso.add_target('one', %s)", (f"file:{tmp}/one.db",))
        conn.execute("SELECT pgturso.add_target(%s, %s)", (PATTERN, f"file:{tmp}/tenant-%s.db"))
        conn.execute("SELECT pgturso.add_target(%s, %s)", (PATTERN.replace("%s", _tenant(0)), server.url))
        conn.execute("SELECT pgturso.track_table('fan_live', target => %s, route_by => 'tenant_id')", (PATTERN,))
    rates = []
    for table, target, extra in (("fan_single", "one", ""), ("fan_copy", PATTERN, ", route_by => 'tenant_id'")):
        b.clear_outbox()
        b.sql(f"SELECT pgturso.track_table('{table}', target => '{target}'{extra})")
        run = PatternRun(b.dsn, target, once=True)
        seconds = run.wait(1800)
        rates.append(total / seconds)
        progress(f"   {table}: {fmt_int(total)} rows into {target} in {seconds:.1f}s")
    b.clear_outbox()
    single = _count(tmp / "one.db", "fan_single")
    spread = len(server.query("SELECT id FROM fan_copy")) + sum(
        _count(tmp / f"tenant-{_tenant(n)}.db", "fan_copy") for n in range(1, tenants))
    if single != total or spread != total:
        raise RuntimeError(f"fan-out copy: {single} rows in the single database, {spread} over the tenants' "
                           f"databases; expected {total} each")
    return rates[0], rates[1]


def _seed_tenants(b: Bench, tmp: Path, tenants: int, server: TursoServer) -> None:
    """11b without 11a (``--only 11b``): the pattern, its live table and every tenant's database as 11a leaves
    them (t0000 the tursodb ``server``), made by a row per tenant (negative ids) drained by ``run --once``
    instead of 11a's copy of a million rows."""
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE fan_live {COLUMNS}")
        conn.execute("SELECT pgturso.add_target(%s, %s)", (PATTERN, f"file:{tmp}/tenant-%s.db"))
        conn.execute("SELECT pgturso.add_target(%s, %s)", (PATTERN.replace("%s", _tenant(0)), server.url))
        conn.execute("SELECT pgturso.track_table('fan_live', target => %s, route_by => 'tenant_id')", (PATTERN,))
        conn.execute("INSERT INTO fan_live SELECT -1 - g, 't' || lpad(g::text, 4, '0'), 'seed', 0 "
                     f"FROM generate_series(0, {tenants - 1}) AS g")
    seconds = PatternRun(b.dsn, PATTERN, once=True).wait(1800)
    progress(f"   {PATTERN}: {fmt_int(tenants)} tenants seeded (no 11a copy) in {seconds:.1f}s")


# -- 11b: a live load over every tenant ---------------------------------------------------------------------------


class Load:
    """Single-row transactions at ``rate``/s over ``tenants`` tenants (random tenant each), from four writer
    threads; a tenant belongs to one writer, so its commits are in the writer's order. Records each tenant's
    commit times."""

    WRITERS = 4

    def __init__(self, b: Bench, table: str, tenants: int, rate: int, seconds: float, first_id: int) -> None:
        self.b, self.table, self.tenants, self.rate, self.seconds = b, table, tenants, rate, seconds
        self.next_id = first_id
        self.commits: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def _writer(self, number: int) -> None:
        rng = random.Random(number)
        mine = [t for t in range(self.tenants) if t % self.WRITERS == number]
        interval = self.WRITERS / self.rate
        started = time.monotonic()
        k = 0
        with psycopg.connect(self.b.dsn, autocommit=True) as conn:
            while True:
                due = started + k * interval
                if due - started >= self.seconds:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                tenant = _tenant(rng.choice(mine))
                with self.lock:
                    row_id, self.next_id = self.next_id, self.next_id + 1
                conn.execute(f"INSERT INTO {self.table} VALUES (%s, %s, 'live', %s)", (row_id, tenant, k))
                self.commits[tenant].append(time.monotonic())
                k += 1

    def run(self, during: Any = None) -> float:
        threads = [threading.Thread(target=self._writer, args=(n,)) for n in range(self.WRITERS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        if during is not None:
            during()
        for thread in threads:
            thread.join()
        return sum(len(v) for v in self.commits.values()) / (time.monotonic() - started)


def _latencies(load: Load, run: PatternRun, pattern: str, offset: dict[str, int]) -> dict[str, list[float]]:
    """Per tenant: commit-to-visible seconds of each of its transactions in this load (inf: never seen).
    ``offset``: the tenant's transactions delivered before this load."""
    with run.lock:
        visible = {name: list(times) for name, times in run.visible.items()}
    result = {}
    for tenant, commits in load.commits.items():
        name = pattern.replace("%s", tenant)
        seen = visible.get(name, [])[offset.get(name, 0):]
        result[tenant] = [(seen[i] - c if i < len(seen) else float("inf")) for i, c in enumerate(commits)]
    return result


def _wait_visited(b: Bench, tenants: int, worker: PatternRun, pattern: str = PATTERN) -> None:
    """Until the worker started and looked at every tenant once (recovered it from its marker): the load
    measures delivery, not the worker's start."""
    deadline = time.monotonic() + 600
    query = ("SELECT count(*) FROM pgturso.delivery_state WHERE target LIKE %s AND status = 'idle' "
             "AND worker LIKE %s")
    while b.sql(query, (pattern.replace("%s", "t%"), f"%pid {worker.proc.pid})"))[0][0] < tenants:
        if time.monotonic() > deadline or worker.proc.poll() is not None:
            raise RuntimeError(f"the pattern worker did not start: {' | '.join(worker.errors[-3:])}")
        time.sleep(0.2)


def _wait_drained(b: Bench, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while b.sql("SELECT count(*) FROM pgturso.outbox")[0][0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the pattern worker did not drain the outbox in time")
        time.sleep(0.1)


def s11_fanout(b: Bench) -> None:
    s = b.sizes
    b.group = 11
    tenants, per_tenant = s.fan_tenants, s.fan_rows_per_tenant
    server = TursoServer().start()  # the tenant whose database goes down: a tursodb server, the others files
    try:
        with scratch_dir() as tmp:
            progress(f"11. a database per tenant: {fmt_int(tenants)} tenants")
            if b.wants("11a"):
                single, spread = _copy_into_tenants(b, tmp, tenants, per_tenant, server)
                b.add(Row("", f"Copy of {fmt_int(tenants * per_tenant)} rows into one file database (track_table, "
                              "worker --once)", fmt_rate(single)))
                b.add(Row("11a", f"Copy of the same rows into {fmt_int(tenants)} databases, one per tenant "
                                 f"({fmt_int(per_tenant)} rows each): rows/s vs one database",
                          f"{fmt_rate(spread)} = {spread / single:.2f}x", ">= 0.50x", spread >= 0.5 * single,
                          f"one worker, {_tenant_threads()} tenant threads; every tenant a file: database but one "
                          "(a tursodb server)"))
            elif b.wants("11b"):
                _seed_tenants(b, tmp, tenants, server)
            steady = _live(b, tmp, tenants, server) if b.wants("11b") else None
            if b.wants("11f"):
                _live_wal(b, tmp, tenants, steady)
    finally:
        server.cleanup()


def _live(b: Bench, tmp: Path, tenants: int, server: TursoServer) -> dict[str, list[float]]:
    """11b-11e; returns the steady load's latencies per tenant (11f compares with them)."""
    s = b.sizes
    down = _tenant(0)
    b.sql("VACUUM ANALYZE")
    b.sql("CHECKPOINT")
    worker = PatternRun(b.dsn, PATTERN, once=False)
    _wait_visited(b, tenants, worker)
    results: dict[str, tuple[dict[str, list[float]], float]] = {}
    visits: dict[str, int] = {}  # per load: the batches delivered (tenant visits that delivered something)
    cpu: dict[str, float] = {}  # per load: the worker's CPU seconds (user + system, every thread)
    backends: dict[str, float] = {}  # per load: its Postgres backends' CPU seconds
    next_id = 1
    try:
        for label in ("steady", "outage"):
            with worker.lock:
                offset = {name: len(times) for name, times in worker.visible.items()}
                batches_before = worker.batches
            cpu_before, backends_before = worker.cpu_seconds(), _backends_cpu(b)
            load = Load(b, "fan_live", tenants, s.fan_rate, s.fan_seconds, next_id)

            def outage() -> None:
                time.sleep(min(5.0, s.fan_seconds / 6))
                server.stop()
                progress(f"   {down}'s database down for {s.fan_outage_seconds}s")
                time.sleep(s.fan_outage_seconds)
                server.start()

            progress(f"   live load ({label}): {s.fan_rate} tx/s over {fmt_int(tenants)} tenants for "
                     f"{s.fan_seconds}s")
            rate = load.run(outage if label == "outage" else None)
            next_id = load.next_id
            _wait_drained(b, 300)
            time.sleep(0.5)  # the last "delivered" lines reach the log
            worker.sample()
            results[label] = (_latencies(load, worker, PATTERN, offset), rate)
            visits[label] = worker.batches - batches_before
            cpu[label] = worker.cpu_seconds() - cpu_before
            backends[label] = _backends_cpu(b) - backends_before
        idle = _idle_cost(b, worker)
    finally:
        worker.stop()
    expected = {t: n for t, n in b.sql("SELECT tenant_id, count(*) FROM fan_live GROUP BY 1")}
    for number in range(tenants):
        tenant = _tenant(number)
        if number == 0:
            got = len(server.query("SELECT id FROM fan_live"))
        else:
            got = _count(tmp / f"tenant-{tenant}.db", "fan_live")
        if got != expected.get(tenant, 0):
            raise RuntimeError(f"live fan-out: tenant {tenant} has {got} rows, Postgres {expected.get(tenant)}")
    _report_live(b, tenants, results, down, worker, idle, visits["steady"], cpu["steady"], backends["steady"])
    return results["steady"][0]


def _backends_cpu(b: Bench) -> float:
    """CPU seconds (user + system) used so far by the worker's Postgres backends (the same machine's /proc)."""
    total = 0.0
    for (pid,) in b.sql("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgturso-worker%'"):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _worst_p99(latencies: dict[str, list[float]]) -> float:
    """The highest of the tenants' own commit-to-visible p99s."""
    return max(_percentile(lat, 99) for lat in latencies.values())


def _live_wal(b: Bench, tmp: Path, tenants: int, steady: dict[str, list[float]] | None) -> None:
    """11f: 11b's steady load over the same tenants, the table captured from the WAL (WAL_PATTERN)."""
    s = b.sizes
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE fan_wal {COLUMNS}")
        conn.execute("SELECT pgturso.add_target(%s, %s)", (WAL_PATTERN, f"file:{tmp}/wal-%s.db"))
        conn.execute("SELECT pgturso.track_table('fan_wal', target => %s, route_by => 'tenant_id', capture => 'wal')",
                     (WAL_PATTERN,))
        # Every tenant met by the router (registered, its database created) before the load: a row each.
        conn.execute(f"INSERT INTO fan_wal SELECT -1 - g, 't' || lpad(g::text, 4, '0'), 'seed', 0 "
                     f"FROM generate_series(0, {tenants - 1}) AS g")
    seeded = PatternRun(b.dsn, WAL_PATTERN, once=True).wait(1800)
    progress(f"   {WAL_PATTERN}: {fmt_int(tenants)} tenants registered by the router and seeded in {seeded:.1f}s")
    b.sql("VACUUM ANALYZE")
    worker = PatternRun(b.dsn, WAL_PATTERN, once=False, per_row=True)
    try:
        _wait_visited(b, tenants, worker, WAL_PATTERN)
        load = Load(b, "fan_wal", tenants, s.fan_rate, s.fan_seconds, 1)
        progress(f"   live load (wal): {s.fan_rate} tx/s over {fmt_int(tenants)} tenants for {s.fan_seconds}s")
        rate = load.run()
        # Where the time goes: how long after the load's last commit the router had queued everything (its slot
        # confirmed past that point), and how long until the tenants' workers had delivered it all.
        ended, end_lsn = time.monotonic(), b.sql("SELECT pg_current_wal_lsn()::text")[0][0]
        routed_after = delivered_after = None
        while delivered_after is None and time.monotonic() - ended < 300:
            if routed_after is None and b.sql(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                    "WHERE slot_name = pgturso._slot_name(%s)", (end_lsn, WAL_PATTERN))[0][0]:
                routed_after = time.monotonic() - ended
            if routed_after is not None and not b.sql("SELECT count(*) FROM pgturso.outbox")[0][0]:
                delivered_after = time.monotonic() - ended
            time.sleep(0.1)
        if delivered_after is None:
            raise RuntimeError("the wal pattern's worker did not deliver the load in time")
        time.sleep(0.5)  # the last "delivered" lines reach the log
        worker.sample()
        latencies = _latencies(load, worker, WAL_PATTERN, {})
    finally:
        worker.stop()
    expected = {t: n for t, n in b.sql("SELECT tenant_id, count(*) FROM fan_wal GROUP BY 1")}
    b.sql("SELECT pgturso.untrack_table('fan_wal')")  # its slot would keep WAL for the scenarios after this one
    b.sql("SELECT pgturso.remove_target(%s)", (WAL_PATTERN,))
    for number in range(tenants):
        tenant = _tenant(number)
        got = _count(tmp / f"wal-{tenant}.db", "fan_wal")
        if got != expected.get(tenant, 0):
            raise RuntimeError(f"wal fan-out: tenant {tenant} has {got} rows, Postgres {expected.get(tenant)}")
    every = [x for lat in latencies.values() for x in lat]
    unseen = sum(1 for x in every if x == float("inf"))
    worst = _worst_p99(latencies)
    note = (f"{rate:.0f} tx/s achieved; all: p50 {_percentile(every, 50) * 1000:.0f} ms, "
            f"p99 {_percentile(every, 99) * 1000:.0f} ms; after the last commit, routed in {routed_after:.1f} s, "
            f"delivered in {delivered_after:.1f} s")
    if steady:
        trigger = [x for lat in steady.values() for x in lat]
        note += (f"; 11b (trigger capture) in this run: p50 {_percentile(trigger, 50) * 1000:.0f} ms, "
                 f"p99 {_percentile(trigger, 99) * 1000:.0f} ms, worst tenant {_worst_p99(steady) * 1000:.0f} ms")
    if unseen:
        note += f"; {unseen} transactions never seen"
    b.add(Row("11f", f"The 11b load ({s.fan_rate} tx/s over {fmt_int(tenants)} tenants) with the routed table "
                     "captured from the WAL (capture => 'wal', the pattern's router): commit-to-visible p99 of the "
                     "worst tenant", f"{worst * 1000:.0f} ms", "<= 1 s",
              worst <= 1.0 and not unseen, note))


def _idle_cost(b: Bench, worker: PatternRun) -> dict[str, float]:
    """After the load, with every tenant idle: the worker's CPU over a few seconds, its Postgres connections,
    open files and threads (its Turso connections close after fanout.TARGET_IDLE_SECONDS)."""
    from pgturso.run.fanout import TARGET_IDLE_SECONDS

    time.sleep(TARGET_IDLE_SECONDS + 3)
    window = 3.0 if b.quick else 5.0
    cpu = worker.cpu_seconds()
    time.sleep(window)
    cpu = (worker.cpu_seconds() - cpu) / window
    connections = b.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgturso-worker%'")[0][0]
    return {"cpu": cpu, "connections": connections, "files": worker.open_files(), "threads": worker.status("Threads"),
            "rss_mb": worker.status("VmRSS") / 1024}


def _report_live(b: Bench, tenants: int, results: dict[str, tuple[dict[str, list[float]], float]], down: str,
                 worker: PatternRun, idle: dict[str, float], visits: int, cpu: float,
                 backends_cpu: float) -> None:
    s = b.sizes
    steady, steady_rate = results["steady"]
    outage, outage_rate = results["outage"]
    unseen = sum(1 for lat in (*steady.values(), *outage.values()) for x in lat if x == float("inf"))
    every = [x for lat in steady.values() for x in lat]
    worst_p99 = _worst_p99(steady)
    others_steady = [x for t, lat in steady.items() if t != down for x in lat]
    others_outage = [x for t, lat in outage.items() if t != down for x in lat]
    p99_steady, p99_outage = _percentile(others_steady, 99), _percentile(others_outage, 99)
    note = (f"{steady_rate:.0f} tx/s achieved over {len(steady)} tenants for {s.fan_seconds}s (about "
            f"{len(every) / max(len(steady), 1):.1f} transactions per tenant, so a tenant's own p99 is its worst "
            f"few); all: p50 {_percentile(every, 50) * 1000:.0f} ms, p99 {_percentile(every, 99) * 1000:.0f} ms; "
            f"{visits} tenant batches delivered, {len(every) / max(visits, 1):.1f} transactions each (visits below "
            "the load's rate are a queue: batches grow until visits x transactions per batch = the load), "
            f"worker CPU {cpu * 1000 / max(visits, 1):.1f} ms per batch, its Postgres backends' "
            f"{backends_cpu * 1000 / max(visits, 1):.1f} ms")
    if unseen:
        note += f"; {unseen} transactions never seen"
    b.add(Row("11b", f"Live load of {s.fan_rate} tx/s over {fmt_int(tenants)} tenants: commit-to-visible p99 of "
                     "the worst tenant", f"{worst_p99 * 1000:.0f} ms", "<= 1 s", worst_p99 <= 1.0 and not unseen,
              note))
    b.add(Row("11c", f"The same load with one tenant's database down for {s.fan_outage_seconds}s: the other "
                     "tenants' p99 vs without the outage",
              f"{p99_outage * 1000:.0f} ms vs {p99_steady * 1000:.0f} ms = {p99_outage / p99_steady:.2f}x",
              "<= 1.2x", p99_outage <= 1.2 * p99_steady,
              f"{outage_rate:.0f} tx/s achieved; the down tenant's own p99 "
              f"{_percentile(outage[down], 99):.1f} s" if down in outage else ""))
    peak = worker.peak_kb / 1024
    b.add(Row("11d", f"Worker peak RSS with {fmt_int(tenants)} tenants (copy of state per tenant, live load)",
              f"{peak:.0f} MB", "<= 300 MB", peak <= 300))
    b.add(Row("11e", f"Idle cost of {fmt_int(tenants)} tenants (all idle, after the load)",
              f"{idle['cpu'] * 100:.1f}% of a core, {idle['connections']:.0f} Postgres connections, "
              f"{idle['files']:.0f} open files, {idle['threads']:.0f} threads",
              note=f"the same whatever the number of tenants: per idle tenant no connection, thread or file; "
                   f"RSS {idle['rss_mb']:.0f} MB"))
