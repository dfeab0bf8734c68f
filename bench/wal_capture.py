"""Scenario 10: capture => 'wal' — the worker drains a backlog of single-row transactions from the slot.

Scenarios 1 and 2 measure what wal capture costs writers (rows 1*w, 2*w); this one what it costs the worker:
the same backlog as scenario 4a, committed with no worker running, then drained by one `--once` run into a
fresh tursodb, against the HTTP ceiling scenario 4 measured.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from capture_cost import track_wal
from delivery import (
    COLUMNS,
    LATENCY_WORKER_FLAGS,
    _measure_latency,
    _percentile,
    latency_legs_note,
    polled_note,
    server_cpu_us_per_row,
    turso_count,
)
from harness import (
    Bench,
    Row,
    WalsenderCpu,
    WorkerProcess,
    WorkerRun,
    fmt_int,
    fmt_rate,
    fresh_turso,
    pgbench,
    pgbench_conn_args,
    progress,
)

INSERT_ONE = "INSERT INTO backlog_wal VALUES (nextval('backlog_wal_ids'), 'pgbench row', 1, 0.5);\n"
DRAIN_TARGET = "bench_wal_drain"  # a target of its own: its slot is made for this backlog


def s10_wal_drain(b: Bench) -> None:
    n = b.sizes.backlog_txns
    if not (b.wants("10a") or b.wants("10b")):
        return
    progress(f"10. capture => 'wal': drain {fmt_int(n)} single-row transactions from the slot")
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE backlog_wal {COLUMNS}")
        conn.execute("CREATE SEQUENCE backlog_wal_ids")
        track_wal(conn, "backlog_wal", DRAIN_TARGET)
    script = Path(tempfile.mkdtemp(prefix="pgturso-bench-")) / "insert.sql"
    b.cleanup.append(script.parent)
    script.write_text(INSERT_ONE)
    pgbench(pgbench_conn_args(b.pg), ["-n", "-M", "prepared", "-c", "4", "-j", "2", "-t", str(n // 4),
                                      "-f", str(script)])
    retained = b.sql("SELECT wal_retained_bytes FROM pgturso.status WHERE table_name = 'backlog_wal'::regclass")
    try:
        with fresh_turso() as server, WalsenderCpu(b.dsn) as walsender:
            run = WorkerProcess(b.dsn, server.url, once=True, extra=["--target", DRAIN_TARGET]).wait(1800)
            if run.returncode != 0:
                raise RuntimeError(f"worker exited with {run.returncode}: {' | '.join(run.errors[-3:])}")
            turso_us = server_cpu_us_per_row(server, n // 4 * 4)
            run.rows = turso_count(server.url, "backlog_wal")
        if run.rows != n // 4 * 4:
            raise RuntimeError(f"wal drain: Turso has {run.rows} rows, expected {n // 4 * 4}")
    finally:
        b.sql("SELECT pgturso.untrack_table('backlog_wal')")  # the target's last table: its slot goes too
    ceiling = b.facts.get("http_ceiling")
    b.add(
        Row(
            "10a",
            f"capture => 'wal': drain {fmt_int(n)} single-row transactions from the slot to tursodb over HTTP",
            fmt_rate(run.rows_per_s) + (f" = {run.rows_per_s / ceiling:.2f}x ceiling" if ceiling else ""),
            ">= 0.70x ceiling",
            (run.rows_per_s >= 0.7 * ceiling) if ceiling else None,
            f"{run.seconds:.1f}s, {run.batches} batches; the slot kept {(retained[0][0] or 0) / 2**20:.0f} MB of WAL; "
            + cpu_budget(run, walsender.total, turso_us, ceiling),
        )
    )
    b.add(
        Row(
            "10b",
            f"capture => 'wal': worker peak RSS draining {fmt_int(n)} single-row transactions",
            f"{run.peak_rss_mb:.0f} MB",
            "<= 150 MB",
            run.peak_rss_mb <= 150,
            "VmHWM of the worker process, sampled every 10 ms",
        )
    )


def cpu_budget(run: WorkerRun, walsender_seconds: float, turso_us: float, ceiling: float | None) -> str:
    """Where the drain's CPU went, per row, and the fastest drain that much CPU allows on this machine's cores:
    the walsender, the worker and tursodb all share them."""
    rows = max(run.rows, 1)
    walsender_us, worker_us = walsender_seconds / rows * 1e6, run.cpu_seconds / rows * 1e6
    total_us = walsender_us + worker_us + turso_us
    cores = os.cpu_count() or 1
    bound = cores / total_us * 1e6 if total_us else 0.0
    said = (f"CPU per row: walsender {walsender_us:.1f} µs, worker {worker_us:.1f} µs, tursodb {turso_us:.1f} µs; "
            f"{cores} cores allow at most {fmt_rate(bound)}")
    return said + (f" = {bound / ceiling:.2f}x ceiling" if ceiling else "")


def s10_wal_latency(b: Bench) -> None:
    """Commit-to-visible latency of a wal table with the worker running, as scenario 5 measures trigger capture:
    compare 10c/10d with 5a/5b."""
    s = b.sizes
    total = s.latency_rate * s.latency_seconds
    if not (b.wants("10c") or b.wants("10d")):
        return
    progress(f"10. capture => 'wal': latency at {s.latency_rate} transactions/s for {s.latency_seconds}s")
    with b.connect() as conn:
        conn.execute(f"CREATE TABLE lat_wal {COLUMNS}")
        track_wal(conn, "lat_wal", DRAIN_TARGET)
        conn.execute("CHECKPOINT")
    try:
        with fresh_turso() as server:
            worker = WorkerProcess(b.dsn, server.url, once=False,
                                   extra=["--target", DRAIN_TARGET, *LATENCY_WORKER_FLAGS])
            try:
                result = _measure_latency(b, server.url, s.latency_rate, total, worker, table="lat_wal")
            finally:
                run = worker.stop()
    finally:
        b.sql("SELECT pgturso.untrack_table('lat_wal')")
    lat = result.latencies_ms
    note = (f"{len(lat)} transactions at {result.rate:.0f}/s; measured as 5a ({polled_note(result)}); "
            f"the worker is woken by its replication stream; "
            f"{run.batches} batches; peak RSS {run.peak_rss_mb:.0f} MB; compare with 5a/5b (trigger capture); "
            f"per row: {latency_legs_note(result)}")
    progress(f"  legs: {latency_legs_note(result)}")
    if result.unseen:
        note += f"; {result.unseen} never seen"
    p50, p99 = _percentile(lat, 50), _percentile(lat, 99)
    b.add(Row("10c", f"capture => 'wal': commit-to-visible latency at {s.latency_rate} tx/s: p50", f"{p50:.1f} ms",
              "<= 20 ms", p50 <= 20 and not result.unseen, note))
    b.add(Row("10d", f"capture => 'wal': commit-to-visible latency at {s.latency_rate} tx/s: p99", f"{p99:.1f} ms",
              "<= 100 ms", p99 <= 100 and not result.unseen))
