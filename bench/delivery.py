"""Scenarios 3-9: delivery to Turso, against ceilings and baselines measured in the same run.

The backlogs are generated once and saved (a copy of the outbox rows); before every drain the outbox is
reloaded from the copy and the worker delivers into a fresh, empty tursodb, so every drain sees the same
events and the same empty target.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import turso
from harness import (
    Bench,
    Row,
    TursoHttp,
    WorkerProcess,
    WorkerRun,
    cpu_seconds,
    drain,
    fmt_int,
    fmt_rate,
    fresh_turso,
    median,
    pgbench_conn_args,
    pgbench_start,
    progress,
    scratch_dir,
    wait_all,
)
from support.turso import TursoServer

ROW_SQL = "g, 'row ' || g, g % 1000, g * 0.5"  # every generated row: (id, txt, n, f)
COLUMNS = "(id int PRIMARY KEY, txt text, n int, f float8)"
CHUNK_ROWS = 10_000
INSERT_JSON = "INSERT INTO {t} (id, txt, n, f) SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?)"


# -- backlogs ---------------------------------------------------------------------------------------------------


def make_backlogs(b: Bench) -> None:
    """Commit the single-row backlog and the large-transaction backlog, saving each one's outbox events."""
    s = b.sizes
    with b.connect() as conn:
        conn.execute("CREATE SCHEMA bench")
        conn.execute(
            "CREATE PROCEDURE bench.single_row_txns(first int, last int) LANGUAGE plpgsql AS $$ "
            "BEGIN FOR g IN first..last LOOP "
            f"INSERT INTO backlog VALUES ({ROW_SQL}); COMMIT; "
            "END LOOP; END $$"
        )
        for table in ("backlog", "bigtx"):
            conn.execute(f"CREATE TABLE {table} {COLUMNS}")
        b.clear_outbox()
        conn.execute("SELECT pgturso.track_table('backlog')")
        progress(f"   committing {fmt_int(s.backlog_txns)} single-row transactions")
        started = time.monotonic()
        conn.execute("CALL bench.single_row_txns(1, %s)", (s.backlog_txns,))
        b.facts["backlog_generate_s"] = time.monotonic() - started
        conn.execute("CREATE TABLE bench.single_events AS SELECT * FROM pgturso.outbox ORDER BY id")
        b.clear_outbox()
        conn.execute("SELECT pgturso.track_table('bigtx')")
        progress(f"   committing {s.big_txns} transactions of {fmt_int(s.big_txn_rows)} rows")
        for k in range(s.big_txns):
            first, last = k * s.big_txn_rows + 1, (k + 1) * s.big_txn_rows
            conn.execute(f"INSERT INTO bigtx SELECT {ROW_SQL} FROM generate_series({first}, {last}) AS g")
        conn.execute("CREATE TABLE bench.big_events AS SELECT * FROM pgturso.outbox ORDER BY id")
    b.clear_outbox()
    progress(f"   backlogs saved ({b.facts['backlog_generate_s']:.0f}s for the single-row one)")


def load_backlog(b: Bench, saved: str, transactions: int | None = None) -> None:
    """Put the saved events back into an empty outbox: all of them, or up to the given number of data events
    (each single-row transaction is one event with rows; the table-creation event(s) before them come along)."""
    upto = ""
    if transactions:
        nth = f"SELECT id FROM {saved} WHERE nrows > 0 ORDER BY id OFFSET {int(transactions) - 1} LIMIT 1"
        upto = f"WHERE id <= ({nth})"
    with b.connect() as conn:
        conn.execute("TRUNCATE pgturso.outbox")
        # Each drain goes to a fresh Turso database: Postgres must not remember delivering to another one, or
        # recovery (rightly) takes the fresh database for a lost one and copies the tables afresh.
        conn.execute("UPDATE pgturso.delivery_state SET delivered_marker = NULL")
        conn.execute(f"INSERT INTO pgturso.outbox OVERRIDING SYSTEM VALUE SELECT * FROM {saved} {upto} ORDER BY id")
        conn.execute("VACUUM ANALYZE pgturso.outbox")
        conn.execute("CHECKPOINT")


def target_ddl(name: str) -> str:
    """The table the worker creates on Turso for a tracked ``COLUMNS`` table (see docs/types.md), named ``name``."""
    return f'CREATE TABLE "{name}" ("id" INTEGER NOT NULL, "txt" TEXT, "n" INTEGER, "f" REAL, PRIMARY KEY ("id"))'


def json_chunks(b: Bench, table: str, chunk_rows: int = CHUNK_ROWS) -> list[str]:
    """The rows of ``table`` as JSON arrays of row arrays, ``chunk_rows`` per chunk (the worker's encoding)."""
    return [
        r[0]
        for r in b.sql(
            "SELECT '[' || string_agg(json_build_array(id, txt, n, f)::text, ',' ORDER BY id) || ']' "
            f"FROM {table} GROUP BY (id - 1) / {int(chunk_rows)} ORDER BY (id - 1) / {int(chunk_rows)}"
        )
    ]


def turso_count(url: str, table: str) -> int:
    client = TursoHttp(url)
    try:
        return int(client.execute(f"SELECT count(*) FROM {table}")[0][0])
    finally:
        client.close()


def drain_http(b: Bench, saved: str, table: str, expect_rows: int, transactions: int | None = None) -> WorkerRun:
    load_backlog(b, saved, transactions)
    with fresh_turso() as server:
        run = drain(b.dsn, server.url)
        got = turso_count(server.url, table)
    if got != expect_rows:
        raise RuntimeError(f"drain of {saved}: Turso has {got} rows, expected {expect_rows}")
    run.rows = got
    return run


# -- ceilings and baselines -----------------------------------------------------------------------------------


def server_cpu_us_per_row(server: TursoServer, nrows: int) -> float:
    """The CPU a fresh tursodb server has used so far, per row loaded, in µs."""
    assert server.proc is not None
    return cpu_seconds(server.proc.pid) / nrows * 1e6


def http_ceiling(b: Bench, table: str, nrows: int) -> tuple[float, str]:
    """The fastest direct load of ``table``'s rows into a fresh tursodb: json_each chunks posted to /v2/pipeline."""
    ddl = target_ddl("ceiling")
    insert = INSERT_JSON.format(t='"ceiling"')
    results: dict[str, float] = {}
    turso_cpu: dict[str, float] = {}  # tursodb's own CPU per row loaded, in µs
    for chunk_rows in (CHUNK_ROWS, 50_000):
        chunks = json_chunks(b, table, chunk_rows)
        # (a) one autocommit request per chunk
        with fresh_turso() as server:
            client = TursoHttp(server.url)
            client.execute(ddl)
            started = time.perf_counter()
            for chunk in chunks:
                client.pipeline([{"type": "execute", "stmt": client.stmt(insert, [chunk])}])
            results[f"{fmt_int(chunk_rows)}-row chunks, one request each"] = nrows / (time.perf_counter() - started)
            turso_cpu[f"{fmt_int(chunk_rows)}-row chunks, one request each"] = server_cpu_us_per_row(server, nrows)
            assert int(client.execute('SELECT count(*) FROM "ceiling"')[0][0]) == nrows
            client.close()
        # (b) one transaction, requests of up to ~8 MB on one stream (baton)
        with fresh_turso() as server:
            client = TursoHttp(server.url)
            client.execute(ddl)
            started = time.perf_counter()
            baton, pending, size = None, [client.stmt("BEGIN")], 0
            for chunk in chunks:
                pending.append(client.stmt(insert, [chunk]))
                size += len(chunk)
                if size > 8 << 20:
                    baton = client.batch(pending, baton).get("baton")
                    pending, size = [], 0
            pending.append(client.stmt("COMMIT"))
            client.batch(pending, baton)
            results[f"{fmt_int(chunk_rows)}-row chunks, one transaction"] = nrows / (time.perf_counter() - started)
            turso_cpu[f"{fmt_int(chunk_rows)}-row chunks, one transaction"] = server_cpu_us_per_row(server, nrows)
            assert int(client.execute('SELECT count(*) FROM "ceiling"')[0][0]) == nrows
            client.close()
    best = max(results, key=lambda k: results[k])
    detail = "; ".join(f"{k}: {fmt_rate(v)} (tursodb {turso_cpu[k]:.1f} µs CPU/row)" for k, v in results.items())
    return results[best], f"fastest of: {detail}"


def naive_rate(b: Bench, nrows: int) -> float:
    """One POST per row, each an autocommit INSERT with bound values."""
    rows = b.sql("SELECT id, txt, n, f FROM backlog ORDER BY id LIMIT %s", (nrows,))
    ddl = target_ddl("naive")
    with fresh_turso() as server:
        client = TursoHttp(server.url)
        client.execute(ddl)
        started = time.perf_counter()
        for row in rows:
            client.execute('INSERT INTO "naive" (id, txt, n, f) VALUES (?, ?, ?, ?)', row)
        rate = len(rows) / (time.perf_counter() - started)
        client.close()
    return rate


def file_ceiling(b: Bench, table: str, nrows: int) -> tuple[float, str]:
    """The fastest direct pyturso load of ``table``'s rows into a fresh file, in one transaction."""
    ddl = target_ddl("ceiling")
    chunks = json_chunks(b, table)
    tuples = b.sql(f"SELECT id, txt, n, f FROM {table} ORDER BY id")
    results: dict[str, float] = {}
    for variant in ("json_each, 10k-row chunks", "executemany"):
        with scratch_dir() as tmp:
            db = turso.connect(str(tmp / "ceiling.db"), isolation_level=None)
            db.execute(ddl)
            started = time.perf_counter()
            db.execute("BEGIN")
            if variant == "executemany":
                db.executemany('INSERT INTO "ceiling" (id, txt, n, f) VALUES (?, ?, ?, ?)', tuples)
            else:
                for chunk in chunks:
                    db.execute(INSERT_JSON.format(t='"ceiling"'), (chunk,))
            db.execute("COMMIT")
            results[variant] = nrows / (time.perf_counter() - started)
            assert db.execute('SELECT count(*) FROM "ceiling"').fetchone()[0] == nrows
            db.close()
    best = max(results, key=lambda k: results[k])
    return results[best], "fastest of: " + "; ".join(f"{k}: {fmt_rate(v)}" for k, v in results.items())


# -- 4, 8, 9: throughput, memory and scale over HTTP --------------------------------------------------------


def s4_throughput(b: Bench) -> None:
    s = b.sizes
    b.group = 4
    progress(f"4. throughput: ceiling (direct load of {fmt_int(s.backlog_txns)} rows), naive sender, worker drains")
    ceiling, ceiling_note = http_ceiling(b, "backlog", s.backlog_txns)
    b.facts["http_ceiling"] = ceiling
    naive = naive_rate(b, s.naive_rows)
    b.add(Row("", "Ceiling: direct load into tursodb over HTTP", fmt_rate(ceiling), note=ceiling_note))
    b.add(Row("", "Naive sender: one HTTP request per row", fmt_rate(naive), note=f"{s.naive_rows} rows"))

    progress(f"   draining {fmt_int(s.backlog_txns)} single-row transactions")
    single = drain_http(b, "bench.single_events", "backlog", s.backlog_txns)
    progress(f"   draining {s.big_txns} x {fmt_int(s.big_txn_rows)}-row transactions")
    big = drain_http(b, "bench.big_events", "bigtx", s.big_txns * s.big_txn_rows)
    small_runs = []
    for _ in range(3):
        progress(f"   draining {fmt_int(s.small_backlog_txns)} single-row transactions")
        run = drain_http(b, "bench.single_events", "backlog", s.small_backlog_txns, s.small_backlog_txns)
        small_runs.append(run)
    b.clear_outbox()

    for key, label, run in (
        ("4a", f"{fmt_int(s.backlog_txns)} single-row transactions", single),
        ("4b", f"{s.big_txns} transactions of {fmt_int(s.big_txn_rows)} rows", big),
    ):
        b.add(
            Row(
                key,
                f"Drain {label} to tursodb over HTTP: worker rows/s vs ceiling",
                f"{fmt_rate(run.rows_per_s)} = {run.rows_per_s / ceiling:.2f}x ceiling",
                ">= 0.70x ceiling",
                run.rows_per_s >= 0.7 * ceiling,
                f"{run.seconds:.1f}s, {run.batches} batches",
            )
        )
        b.add(
            Row(
                key + "'",
                f"Drain {label}: worker rows/s vs naive sender",
                f"{run.rows_per_s / naive:.0f}x naive",
                ">= 20x naive",
                run.rows_per_s >= 20 * naive,
            )
        )

    b.group = 8
    small_rss = max(r.peak_rss_mb for r in small_runs)
    for key, label, run in (
        ("8a", f"{fmt_int(s.backlog_txns)} single-row transactions", single),
        ("8b", f"{s.big_txns} transactions of {fmt_int(s.big_txn_rows)} rows", big),
    ):
        b.add(
            Row(
                key,
                f"Worker peak RSS draining {label}",
                f"{run.peak_rss_mb:.0f} MB",
                "<= 150 MB",
                run.peak_rss_mb <= 150,
                "VmHWM of the worker process, sampled every 10 ms",
            )
        )
    ratio = single.peak_rss_mb / small_rss
    b.add(
        Row(
            "8c",
            f"Worker peak RSS: {fmt_int(s.backlog_txns)} backlog vs {fmt_int(s.small_backlog_txns)} backlog",
            f"{ratio:.2f}x",
            "<= 1.20x",
            ratio <= 1.2,
            f"{single.peak_rss_mb:.0f} MB vs {small_rss:.0f} MB (max of 3)",
        )
    )

    b.group = 9
    small_rate = median([r.rows_per_s for r in small_runs])
    ratio = single.rows_per_s / small_rate
    b.add(
        Row(
            "9",
            f"Scale: rows/s draining {fmt_int(s.backlog_txns)} vs {fmt_int(s.small_backlog_txns)} backlog",
            f"{ratio:.2f}x",
            ">= 0.80x",
            ratio >= 0.8,
            f"{fmt_rate(single.rows_per_s)} vs {fmt_rate(small_rate)} (median of 3)",
        )
    )


# -- 6: embedded file target ----------------------------------------------------------------------------------


def s6_file(b: Bench) -> None:
    s = b.sizes
    b.group = 6
    progress(f"6. embedded file target: direct pyturso load and worker drain of {fmt_int(s.backlog_txns)} rows")
    ceiling, note = file_ceiling(b, "backlog", s.backlog_txns)
    load_backlog(b, "bench.single_events")
    with scratch_dir() as tmp:
        run = drain(b.dsn, f"file:{tmp / 'replica.db'}")
        db = turso.connect(str(tmp / "replica.db"))
        run.rows = db.execute('SELECT count(*) FROM "backlog"').fetchone()[0]
        db.close()
    b.clear_outbox()
    if run.rows != s.backlog_txns:
        raise RuntimeError(f"file drain: the file has {run.rows} rows, expected {s.backlog_txns}")
    b.add(Row("", "Ceiling: direct pyturso load into a file", fmt_rate(ceiling), note=note))
    b.add(
        Row(
            "6",
            f"Drain {fmt_int(s.backlog_txns)} single-row transactions to file: worker rows/s vs pyturso",
            f"{fmt_rate(run.rows_per_s)} = {run.rows_per_s / ceiling:.2f}x",
            ">= 0.70x",
            run.rows_per_s >= 0.7 * ceiling,
            f"{run.seconds:.1f}s, peak RSS {run.peak_rss_mb:.0f} MB",
        )
    )


# -- 7: initial copy ------------------------------------------------------------------------------------------


def s7_initial_copy(b: Bench) -> None:
    n = b.sizes.copy_rows
    b.group = 7
    progress(f"7. initial copy of a {fmt_int(n)}-row table")
    ceiling = b.facts["http_ceiling"]
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE copysrc {COLUMNS}")
        conn.execute(f"INSERT INTO copysrc SELECT {ROW_SQL} FROM generate_series(1, {n}) AS g")
        conn.execute("VACUUM ANALYZE copysrc")
    b.clear_outbox()
    started = time.monotonic()
    b.sql("SELECT pgturso.track_table('copysrc')")
    track_s = time.monotonic() - started
    with fresh_turso() as server:
        run = drain(b.dsn, server.url)
        got = turso_count(server.url, "copysrc")
    b.clear_outbox()
    if got != n:
        raise RuntimeError(f"initial copy: Turso has {got} rows, expected {n}")
    run.rows = got
    b.add(
        Row(
            "7",
            f"Initial copy of {fmt_int(n)} rows (track_table, then worker --once): rows/s vs ceiling",
            f"{fmt_rate(run.rows_per_s)} = {run.rows_per_s / ceiling:.2f}x ceiling",
            ">= 0.70x ceiling",
            run.rows_per_s >= 0.7 * ceiling,
            f"drain {run.seconds:.1f}s; track_table itself {track_s:.1f}s; peak RSS {run.peak_rss_mb:.0f} MB",
        )
    )


# -- 5: latency -----------------------------------------------------------------------------------------------


@dataclass
class LatencyResult:
    # commit to visible on Turso (the reported figure): Turso's answer to the commit of the row's batch, as the
    # worker timed it, or the poll's answer if that came first (see _measure_latency)
    latencies_ms: list[float]
    rate: float
    unseen: int
    # commit to the answer of the first poll of a reader that saw it (the reported figure until session 10; it
    # adds the poll's own wait for tursodb's accept loop: see _measure_latency)
    polled_ms: list[float]
    # per row, how long each leg took (LATENCY_LEGS), from the worker's batch_timing lines; empty without them
    legs: dict[str, list[float]] = field(default_factory=dict)


# the latency scenarios run the worker at debug level for its batch_timing lines (a few per batch)
LATENCY_WORKER_FLAGS = ("--log-level", "debug")

# (name, from, to) of each leg of one row's way, as the worker's batch_timing steps (BATCH_STEPS) and the bench's
# own "commit" and "seen" (the poll saw it)
LATENCY_LEGS = (
    ("commit -> the worker starts reading its batch", "commit", "read"),
    ("reading the batch (Postgres)", "read", "read_done"),
    ("read ahead: waiting for the batch before", "read_done", "settled"),
    ("the marker's source position", "settled", "positioned"),
    ("hand-off to the sender", "positioned", "sent"),
    ("the Turso request (tursodb accepts it on its next tick, commits, answers)", "sent", "answered"),
    ("Turso answered -> the bench's poll saw it", "answered", "seen"),
    ("commit -> Turso answered the commit", "commit", "answered"),
)


def polled_note(result: LatencyResult) -> str:
    return (f"a reader polling max(id) every ~1 ms got it back p50 {_percentile(result.polled_ms, 50):.1f} ms, "
            f"p99 {_percentile(result.polled_ms, 99):.1f} ms after the commit (its own request waits for tursodb's "
            f"accept loop, which sleeps 10 ms whenever no connection is queued)")


def latency_legs_note(result: LatencyResult) -> str:
    """Each leg's p50 / p99 in ms, for the row's note and the log."""
    return "; ".join(f"{name} p50 {_percentile(v, 50):.1f} / p99 {_percentile(v, 99):.1f} ms"
                     for name, _, _ in LATENCY_LEGS if (v := result.legs.get(name)))


def _median_or_nan(values: list[float]) -> float:
    return median(values) if values else math.nan


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def s5_latency(b: Bench) -> None:
    s = b.sizes
    b.group = 5
    total = s.latency_rate * s.latency_seconds
    progress(f"5. latency at {s.latency_rate} transactions/s for {s.latency_seconds}s with the worker running")
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE lat {COLUMNS}")
    b.clear_outbox()
    b.sql("SELECT pgturso.track_table('lat')")
    # Start from a quiet cluster: the earlier scenarios' million-row loads would otherwise be written out
    # (checkpoint, autovacuum) during these 20 seconds and show up as pauses of a quarter of a second.
    b.sql("VACUUM ANALYZE")
    b.sql("CHECKPOINT")
    os.sync()  # and the page cache: tursodb fsyncs its commits, which would wait behind those writes
    with fresh_turso() as server:
        floor = _request_round_trips(server.url, 50 if b.quick else 300)
        worker = WorkerProcess(b.dsn, server.url, once=False, extra=LATENCY_WORKER_FLAGS)
        try:
            result = _measure_latency(b, server.url, s.latency_rate, total, worker)
        finally:
            run = worker.stop()
    b.clear_outbox()
    lat = result.latencies_ms
    note = (
        f"{len(lat)} transactions at {result.rate:.0f}/s achieved; max {max(lat):.1f} ms; visible = Turso answered "
        f"the commit of the row's batch (as the worker timed it); {polled_note(result)}; the worker "
        f"delivered {run.batches} batches (median {_median_or_nan(run.batch_ms):.1f} ms "
        f"each by its log, {total / max(run.batches, 1):.1f} transactions each); peak RSS {run.peak_rss_mb:.0f} MB; "
        f"per row: {latency_legs_note(result)}"
    )
    progress(f"  legs: {latency_legs_note(result)}")
    if result.unseen:
        note += f"; {result.unseen} never seen"
    p50, p99 = _percentile(lat, 50), _percentile(lat, 99)
    b.add(
        Row(
            "",
            "Floor: round trip of one single-row INSERT request to tursodb",
            f"p50 {_percentile(floor, 50):.1f} ms, p99 {_percentile(floor, 99):.1f} ms",
            note=f"{len(floor)} requests at random 0-10 ms spacing; tursodb closes the connection after every "
            "response and answers an idle request after 0-10 ms",
        )
    )
    b.add(
        Row(
            "5a",
            f"Commit-to-visible latency at {s.latency_rate} tx/s: p50",
            f"{p50:.1f} ms",
            "<= 20 ms",
            p50 <= 20 and not result.unseen,
            note,
        )
    )
    b.add(
        Row(
            "5b",
            f"Commit-to-visible latency at {s.latency_rate} tx/s: p99",
            f"{p99:.1f} ms",
            "<= 100 ms",
            p99 <= 100 and not result.unseen,
        )
    )


def _request_round_trips(url: str, n: int) -> list[float]:
    client = TursoHttp(url)
    client.execute("CREATE TABLE floor (id INTEGER PRIMARY KEY, txt TEXT)")
    times = []
    for i in range(n):
        time.sleep(random.random() / 100)
        started = time.perf_counter()
        client.execute("INSERT INTO floor VALUES (?, 'latency probe')", [i])
        times.append((time.perf_counter() - started) * 1000)
    client.close()
    return times


def _measure_latency(b: Bench, url: str, rate: int, total: int, worker: WorkerProcess,
                     table: str = "lat") -> LatencyResult:
    """Commit ``total`` single-row transactions at ``rate`` and time when each became visible on Turso.

    A row is visible once Turso committed its batch: the reported latency ends when Turso answered that commit,
    as the worker timed it (its "answered" step, logged at debug level in batch_timing just before the batch's
    "delivered" line; rows counted in commit order, which is id order here), or when a reader's poll of max(id),
    sent about every millisecond, got the row back, if that came first. The poll's own figure is kept beside it
    but does not time visibility on tursodb: `tursodb --sync-server` accepts one connection at a time and, when
    none is queued, sleeps 10 ms before it looks again (strace: accept4 -> EAGAIN -> clock_nanosleep 10 ms), so
    a poll sent 1 ms after its last answer sits in the queue ahead of the worker's request at each wake-up and
    sees the commit served after it one sleep later (session 5: p50 10.6, p99 11.5 ms after the answer on a quiet
    machine). That is the reader's request waiting for the server, not the row becoming visible (a request
    queued behind the commit in the same wake-up reads it). ``unseen``: rows the poll never saw."""
    client = TursoHttp(url)
    deadline = time.monotonic() + 30
    while True:  # the worker has created the table on Turso and is idle, waiting for NOTIFY
        try:
            client.execute(f"SELECT max(id) FROM {table}")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    time.sleep(1.0)  # let the worker finish that delivery and go back to waiting for NOTIFY
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}
    done = threading.Event()

    def poll() -> None:
        last = 0
        while True:
            value = client.execute(f"SELECT max(id) FROM {table}")[0][0]
            now = time.monotonic()
            top = int(value) if value is not None else 0
            for i in range(last + 1, top + 1):
                seen[i] = now
            last = max(last, top)
            if last >= total or (done.is_set() and time.monotonic() > done_at + 10):
                return
            time.sleep(0.001)

    with worker.lock:
        rows_before = worker.run.rows  # delivered before the first probe (the table's creation: none)
    done_at = math.inf
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with b.connect() as conn:
        start = time.monotonic()
        for i in range(1, total + 1):
            due = start + (i - 1) / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'latency probe', 0, 0.0)", (i,), prepare=True)
            committed[i] = time.monotonic()
        elapsed = time.monotonic() - start
    done_at = time.monotonic()
    done.set()
    poller.join(15)
    client.close()
    with worker.lock:
        delivered_at = list(worker.run.delivered_at)
        timings = list(worker.run.timings)
    confirmed: dict[int, float] = {}
    steps: dict[int, dict[str, float]] = {}  # each row's batch's steps, and its own commit and poll
    upto = 0
    for (at, rows), timing in zip(delivered_at, timings, strict=True):
        for i in range(upto + 1, min(rows - rows_before, total) + 1):
            confirmed[i] = timing.get("answered", at)  # when Turso answered, if the worker said it
            if timing and i in committed and i in seen:
                # a batch read while none was in flight settled nothing after its read
                steps[i] = {"settled": timing.get("read_done", math.nan), **timing, "commit": committed[i],
                            "seen": seen[i]}
        upto = max(upto, rows - rows_before)
    polled = [(seen[i] - committed[i]) * 1000 for i in committed if i in seen]
    visible = [(min(seen[i], confirmed.get(i, math.inf)) - committed[i]) * 1000 for i in committed if i in seen]
    legs = {name: [(row[end] - row[start]) * 1000 for row in steps.values() if start in row and end in row]
            for name, start, end in LATENCY_LEGS}
    return LatencyResult(visible, total / elapsed, total - len(polled), polled,
                         {name: v for name, v in legs.items() if v})


# -- 3: outbox upkeep ---------------------------------------------------------------------------------------

UPKEEP_SCRIPTS = {  # name: (script, rows changed per transaction, share of the transactions)
    "range": ("\\set k random(1, {top})\nUPDATE churn SET n = n + 1 WHERE id BETWEEN :k AND :k + 999;\n", 1000, 0.1),
    "single": ("\\set k random(1, {rows})\nUPDATE churn SET n = n + 1 WHERE id = :k;\n", 1, 0.9),
}
OUTBOX_SIZES = (
    "SELECT pg_total_relation_size('pgturso.outbox'), pg_relation_size('pgturso.outbox'), "
    "pg_table_size('pgturso.outbox') - pg_relation_size('pgturso.outbox', 'main') "
    "- pg_relation_size('pgturso.outbox', 'fsm') - pg_relation_size('pgturso.outbox', 'vm'), "
    "pg_indexes_size('pgturso.outbox')"
)
AUTOVACUUMS = (
    "SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_all_tables "
    "WHERE relid IN ('pgturso.outbox'::regclass, (SELECT reltoastrelid FROM pg_class "
    "WHERE oid = 'pgturso.outbox'::regclass))"
)


def s3_upkeep(b: Bench) -> None:
    s = b.sizes
    b.group = 3
    rows = s.upkeep_table_rows
    per_second = sum(changes * share * s.upkeep_tps for _, changes, share in UPKEEP_SCRIPTS.values())
    duration = (s.upkeep_changes - rows) / per_second
    progress(
        f"3. outbox upkeep: worker running; pgbench at {s.upkeep_tps} tx/s for ~{duration:.0f}s "
        f"(90% single-row, 10% 1000-row UPDATEs) until {fmt_int(s.upkeep_changes)} changes are delivered"
    )
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE churn {COLUMNS}")
        conn.execute(f"INSERT INTO churn SELECT {ROW_SQL} FROM generate_series(1, {rows}) AS g")
    b.clear_outbox()
    b.sql("SELECT pgturso.track_table('churn')")  # the initial copy counts as changes too
    scripts = Path(tempfile.mkdtemp(prefix="pgturso-bench-"))
    b.cleanup.append(scripts)
    loads = []  # one pgbench per script, each throttled (-R) to its share and stopping after a fixed count
    expected = rows
    for name, (script, changes, share) in UPKEEP_SCRIPTS.items():
        path = scripts / f"{name}.sql"
        path.write_text(script.format(rows=rows, top=rows - 999))
        rate = s.upkeep_tps * share
        count = max(1, round(rate * duration))
        loads.append([*"-n -M prepared -c 1 -R".split(), f"{rate:g}", "-t", str(count), "-f", str(path)])
        expected += count * changes
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        with b.connect() as conn:
            while not stop.wait(1.0):
                peak[0] = max(peak[0], int(conn.execute(OUTBOX_SIZES).fetchone()[0]))  # type: ignore[index]

    with fresh_turso() as server:
        worker = WorkerProcess(b.dsn, server.url, once=False)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            started = time.monotonic()
            procs = [pgbench_start(pgbench_conn_args(b.pg), args) for args in loads]
            timed_out = not wait_all(procs, s.upkeep_seconds)
            load_s = time.monotonic() - started
            deadline = time.monotonic() + 120
            while b.sql("SELECT count(*) FROM pgturso.outbox")[0][0] and time.monotonic() < deadline:
                time.sleep(0.2)
            pending = b.sql("SELECT count(*) FROM pgturso.outbox")[0][0]
            time.sleep(0.5)  # let the worker log its last delivery
            delivered = worker.delivered_rows()
            total, heap, toast, index = b.sql(OUTBOX_SIZES)[0]
            autovacuums = b.sql(AUTOVACUUMS)[0][0]
        finally:
            stop.set()
            run = worker.stop()
    mb = 1 << 20
    note = (
        f"{delivered:,} changes delivered ({delivered / load_s:,.0f}/s over {load_s:.0f}s of load); "
        f"heap {heap / mb:.1f} MB, TOAST {toast / mb:.1f} MB, indexes {index / mb:.1f} MB; "
        f"peak during the load {peak[0] / mb:.1f} MB; {autovacuums} autovacuum runs on it"
    )
    if timed_out:
        note += f"; the load did not finish within its {s.upkeep_seconds}s budget and was stopped"
    elif delivered != expected:
        note += f"; expected {expected:,} changes"
    if pending:
        note += f"; {pending} events still pending"
    if run.errors:
        note += f"; worker: {run.errors[-1][:120]}"
    b.add(
        Row(
            "3",
            f"Outbox size after {fmt_int(delivered)} changes delivered "
            "(no VACUUM FULL: the worker's plain VACUUM and autovacuum)",
            f"{total / mb:.1f} MB",
            "< 10 MB",
            total < 10 * mb and not pending,
            note,
        )
    )
    b.clear_outbox()
