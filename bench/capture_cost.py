"""Scenarios 1 and 2: what capture costs the writing transaction on the primary (the worker is not running)."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from harness import Bench, Row, fmt_int, median, pgbench, pgbench_conn_args, progress

COLUMNS = "(id int PRIMARY KEY, txt text, n int, f float8)"
BULK_VARIANTS = ("untracked", "pgturso", "wal", "plpgsql", "pgq")
BULK_LABELS = {
    "pgturso": "pgturso (statement trigger)",
    "wal": "pgturso capture => 'wal' (logical slot, no trigger)",
    "plpgsql": "baseline: PL/pgSQL row trigger, to_jsonb(NEW) into a queue",
    "pgq": "baseline: PgQ pgq.logutriga (C row trigger)",
}
PLPGSQL_QUEUE = """
CREATE TABLE bench_queue (id bigserial PRIMARY KEY, op "char" NOT NULL, payload jsonb NOT NULL);
CREATE FUNCTION bench_queue_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO bench_queue (op, payload) VALUES ('D', to_jsonb(OLD));
  ELSE
    INSERT INTO bench_queue (op, payload) VALUES (left(TG_OP, 1), to_jsonb(NEW));
  END IF;
  RETURN NULL;
END $$;
"""


# Wal capture is chosen per target: the benchmark's wal tables go to a target of their own. Its slot is not
# read while writers are measured (no worker runs), as for the outbox: what writers pay is all that is measured.
WAL_TARGET = "bench_wal"


def track_wal(conn: psycopg.Connection[Any], table: str, target: str = WAL_TARGET) -> None:
    conn.execute("SELECT pgturso.add_target(%s, 'file:/dev/null') WHERE NOT EXISTS "
                 "(SELECT 1 FROM pgturso.target WHERE name = %s)", (target, target))
    conn.execute("SELECT pgturso.track_table(%s, target => %s, capture => 'wal')", (table, target))


def drop_wal_slot(conn: psycopg.Connection[Any]) -> None:
    """Let the slot go, so that it does not keep the WAL of the runs and scenarios that follow. No worker reads
    it while writers are measured, so whether it exists changes nothing for them (wal_level = logical does)."""
    conn.execute("SELECT pgturso._drop_slot(%s)", (WAL_TARGET,))


def _setup_bulk(b: Bench) -> str:
    with b.connect() as conn:
        for variant in BULK_VARIANTS:
            conn.execute(f"CREATE TABLE bulk_{variant} {COLUMNS}")
        conn.execute("SELECT pgturso.track_table('bulk_pgturso')")
        track_wal(conn, "bulk_wal")
        conn.execute(PLPGSQL_QUEUE)
        conn.execute(
            "CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON bulk_plpgsql "
            "FOR EACH ROW EXECUTE FUNCTION bench_queue_capture()"
        )
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgq")
        conn.execute("SELECT pgq.create_queue('bench')")
        conn.execute(
            "CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON bulk_pgq "
            "FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('bench')"
        )
        row = conn.execute("SELECT queue_data_pfx FROM pgq.queue WHERE queue_name = 'bench'").fetchone()
        assert row is not None
        return str(row[0])


def s1_bulk(b: Bench) -> None:
    n = b.sizes.bulk_rows
    progress(f"1. bulk capture cost: {fmt_int(n)} rows per statement, 4 variants, median of 3")
    pgq_events = _setup_bulk(b)
    statements = {
        "INSERT": "INSERT INTO {t} SELECT g, 'row ' || g, g % 1000, g * 0.5 FROM generate_series(1, {n}) AS g",
        "UPDATE": "UPDATE {t} SET n = n + 1, f = f * 2",
        "DELETE": "DELETE FROM {t}",
    }
    times: dict[tuple[str, str], list[float]] = {(v, op): [] for v in BULK_VARIANTS for op in statements}
    with b.connect() as conn:
        for rep in range(3):
            order = BULK_VARIANTS[rep:] + BULK_VARIANTS[:rep]  # rotate, so no variant always runs first
            for variant in order:
                table = f"bulk_{variant}"
                conn.execute(f"TRUNCATE {table}")
                conn.execute("TRUNCATE pgturso.outbox, bench_queue")
                conn.execute(f"TRUNCATE {pgq_events}")
                conn.execute(f"VACUUM ANALYZE {table}")
                conn.execute("VACUUM pgturso.outbox, bench_queue")
                drop_wal_slot(conn)
                conn.execute("CHECKPOINT")
                for op, sql in statements.items():
                    started = time.perf_counter()
                    conn.execute(sql.format(t=table, n=n))
                    times[(variant, op)].append(time.perf_counter() - started)
        conn.execute("TRUNCATE pgturso.outbox, bench_queue")
        conn.execute(f"TRUNCATE {pgq_events}")
        conn.execute("SELECT pgturso._drop_slot(%s)", (WAL_TARGET,))
    for i, op in enumerate(statements):
        base = median(times[("untracked", op)])
        for variant in ("pgturso", "wal", "plpgsql", "pgq"):
            ratio = median(times[(variant, op)]) / base
            tracked = variant in ("pgturso", "wal")
            limit = 1.2 if variant == "wal" else 2.0
            b.add(
                Row(
                    key=(f"1{'abc'[i]}" + ("w" if variant == "wal" else "")) if tracked else "",
                    scenario=f"Bulk {op} {fmt_int(n)} rows: {BULK_LABELS[variant]}",
                    measured=f"{ratio:.2f}x untracked",
                    target=f"<= {limit}x" if tracked else "",
                    ok=(ratio <= limit) if tracked else None,
                    note=f"untracked {base * 1000:.0f} ms, this {median(times[(variant, op)]) * 1000:.0f} ms"
                    if tracked
                    else f"{median(times[(variant, op)]) * 1000:.0f} ms",
                )
            )


OLTP_TABLES = ("oltp_plain", "oltp_tracked", "oltp_wal")
OLTP_SCRIPTS = {
    "INSERT": "\\set n random(1, 1000000)\nINSERT INTO {t} (txt, n, f) VALUES ('pgbench row', :n, :n * 0.5);\n",
    "UPDATE": "\\set id random(1, {rows})\nUPDATE {t} SET n = n + 1, f = f + 1 WHERE id = :id;\n",
}
TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def s2_oltp(b: Bench) -> None:
    seconds, rows = b.sizes.oltp_seconds, b.sizes.oltp_update_rows
    progress(f"2. OLTP capture cost: pgbench, 4 clients, {seconds}s per run, single-row INSERT and UPDATE")
    with b.connect() as conn:
        for t in OLTP_TABLES:
            conn.execute(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, txt text, n int, f float8)")
        conn.execute("SELECT pgturso.track_table('oltp_tracked')")
        track_wal(conn, "oltp_wal")
    scripts = Path(tempfile.mkdtemp(prefix="pgturso-bench-"))
    b.cleanup.append(scripts)
    for op, script in OLTP_SCRIPTS.items():
        for t in OLTP_TABLES:
            (scripts / f"{op}_{t}.sql").write_text(script.format(t=t, rows=rows))
    for i, op in enumerate(OLTP_SCRIPTS):
        tps: dict[str, float] = {}
        for t in OLTP_TABLES:
            with b.connect() as conn:
                drop_wal_slot(conn)
                conn.execute(f"TRUNCATE {t} RESTART IDENTITY")
                if op == "UPDATE":
                    conn.execute(
                        f"INSERT INTO {t} (txt, n, f) SELECT 'row ' || g, g, g * 0.5 FROM generate_series(1, {rows}) g"
                    )
                conn.execute("TRUNCATE pgturso.outbox")
                conn.execute(f"VACUUM ANALYZE {t}")
                conn.execute("VACUUM pgturso.outbox")
                conn.execute("CHECKPOINT")
            out = pgbench(
                pgbench_conn_args(b.pg),
                [*"-n -M prepared -c 4 -j 2 -T".split(), str(seconds), "-f", str(scripts / f"{op}_{t}.sql")],
            )
            match = TPS.search(out)
            if not match:
                raise RuntimeError(f"no tps in pgbench output: {out[-300:]}")
            tps[t] = float(match.group(1))
        b.clear_outbox()
        b.sql("SELECT pgturso._drop_slot(%s)", (WAL_TARGET,))
        ratio = tps["oltp_tracked"] / tps["oltp_plain"]
        b.add(
            Row(
                key=f"2{'ab'[i]}",
                scenario=f"OLTP single-row {op}, pgbench 4 clients {seconds}s: tracked tps / untracked tps",
                measured=f"{ratio:.2f}x",
                target=">= 0.85x",
                ok=ratio >= 0.85,
                note=f"untracked {tps['oltp_plain']:,.0f} tps, tracked {tps['oltp_tracked']:,.0f} tps (one run each)",
            )
        )
        ratio = tps["oltp_wal"] / tps["oltp_plain"]
        b.add(
            Row(
                key=f"2{'ab'[i]}w",
                scenario=f"OLTP single-row {op}, capture => 'wal': tracked tps / untracked tps",
                measured=f"{ratio:.2f}x",
                target=">= 0.90x",
                ok=ratio >= 0.90,
                note=f"untracked {tps['oltp_plain']:,.0f} tps, wal-tracked {tps['oltp_wal']:,.0f} tps (one run each)",
            )
        )
