"""pgturso benchmark: capture cost on the primary and delivery to Turso, each as a ratio measured in one run.

    TURSODB=.cache/turso/node_modules/.bin/tursodb .venv/bin/python bench/run.py [--quick]

Starts its own throwaway PostgreSQL 15 cluster and tursodb servers (loopback only), runs every scenario,
prints one Markdown table on stdout (progress goes to stderr) and, in full mode, rewrites the generated
section of BENCHMARKS.md. Full mode takes about 9 minutes on 2 cores; --quick runs the same code on tiny
sizes in under a minute and leaves BENCHMARKS.md alone unless --write is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from capture_cost import s1_bulk, s2_oltp
from delivery import make_backlogs, s3_upkeep, s4_throughput, s5_latency, s6_file, s7_initial_copy
from fanout import s11_fanout
from harness import FULL, QUICK, REPO, Bench, PgCluster, Row, progress
from report import product_version, section, table, utcnow, write_benchmarks_md
from wal_capture import s10_wal_drain, s10_wal_latency

# (number, name, function); the order is chosen so that later scenarios reuse earlier ones' backlogs and ceiling.
SCENARIOS: list[tuple[int, str, Callable[[Bench], None]]] = [
    (1, "bulk capture cost", s1_bulk),
    (2, "OLTP capture cost", s2_oltp),
    (4, "backlog generation", make_backlogs),
    (4, "throughput, memory and scale", s4_throughput),
    (10, "capture => 'wal': drain from the slot", s10_wal_drain),
    (10, "capture => 'wal': latency", s10_wal_latency),
    (6, "embedded file target", s6_file),
    (7, "initial copy", s7_initial_copy),
    (5, "latency", s5_latency),
    (3, "outbox upkeep", s3_upkeep),
    (11, "a database per tenant", s11_fanout),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in under a minute")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the generated section of BENCHMARKS.md (default: in full mode only)",
    )
    parser.add_argument("--only", default="",
                        help="comma-separated scenario numbers to run (for development); a letter after the number "
                             "(11a) runs only that part of a scenario that supports it")
    args = parser.parse_args()
    write = (not args.quick) if args.write is None else args.write
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    only = {int(x.rstrip("abcdefghijklmnopqrstuvwxyz")) for x in wanted}
    parts = {x for x in wanted if not x.isdigit()}
    if only & {4, 6, 8, 9}:
        only |= {4}

    started_at, started = utcnow(), time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    product = product_version()  # before the run: the measured code must not change under it
    pg = PgCluster(settings={"wal_level": "logical"})  # capture => 'wal' is measured beside trigger capture
    bench = Bench(sizes=QUICK if args.quick else FULL, quick=args.quick, pg=pg, parts=parts)
    errors = 0
    try:
        pg.start()
        bench.sql("CREATE EXTENSION pgturso CASCADE")
        progress(f"Postgres 15 on port {pg.port} ({'quick' if args.quick else 'full'} mode)")
        for number, name, run in SCENARIOS:
            if only and number not in only:
                continue
            bench.group = number
            try:
                run(bench)
            except Exception as exc:  # one broken scenario must not hide the others' results
                errors += 1
                traceback.print_exc()
                bench.add(
                    Row(
                        str(number),
                        f"{name}: did not complete",
                        "error",
                        ok=False,
                        note=f"{type(exc).__name__}: {str(exc)[:300]}",
                    ),
                    group=number,
                )
        elapsed = time.monotonic() - started
        progress(f"done in {elapsed / 60:.1f} min")
        bench.facts["product"] = product
        bench.facts["load"] = (load_before, Path("/proc/loadavg").read_text().split()[0])
        flags = "".join(f" {a}" for a in sys.argv[1:])
        env = "".join(f"{k}=… " for k in ("PG_BIN", "PYTHONPATH") if os.environ.get(k))
        make = "make bench" + (" QUICK=1" if args.quick else "")
        command = f"`{make}` (`{env}TURSODB=… .venv/bin/python bench/run.py{flags}`)"
        body = section(bench, command, elapsed, started_at)
        print(table(bench.results))
        print()
        print(body.splitlines()[-1])
        if write:
            path = Path(REPO) / "BENCHMARKS.md"
            write_benchmarks_md(path, body)
            progress(f"wrote {path}")
    finally:
        pg.stop()
        for path in bench.cleanup:
            shutil.rmtree(path, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
