"""What every scenario shares: sizes, result rows, the Postgres cluster, fresh tursodb servers and the worker.

Every number the benchmark reports is a ratio of two measurements taken in the same run on the same machine,
so the absolute speed of the machine cancels out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.pgcluster import PG_BIN, PgCluster  # noqa: E402
from support.turso import TursoServer, tursodb_binary  # noqa: E402

PGBENCH = str(PG_BIN / "pgbench")
STARTED = time.monotonic()


@dataclass(frozen=True)
class Sizes:
    """Every size and duration, full and --quick; the code paths are the same."""

    bulk_rows: int  # 1: rows per INSERT/UPDATE/DELETE statement
    oltp_seconds: int  # 2: pgbench duration per run
    oltp_update_rows: int  # 2: rows in the table the UPDATE script picks keys from
    upkeep_changes: int  # 3: row changes delivered before the outbox is measured
    upkeep_seconds: int  # 3: time budget of that load (the changes actually delivered are reported)
    upkeep_tps: int  # 3: pgbench rate (-R) of the mixed load; about 100 row changes per transaction
    upkeep_table_rows: int  # 3: rows in the table that the load updates
    backlog_txns: int  # 4, 6, 8, 9: committed single-row transactions in the backlog
    big_txns: int  # 4, 8: number of large transactions
    big_txn_rows: int  # 4, 8: rows per large transaction
    small_backlog_txns: int  # 8, 9: the smaller backlog that the large one is compared with
    naive_rows: int  # 4: rows sent one request per row
    latency_rate: int  # 5: transactions per second
    latency_seconds: int  # 5: duration of the steady load
    copy_rows: int  # 7: rows in the table that track_table copies
    fan_tenants: int  # 11: tenants of the pattern target (one file: database each)
    fan_rows_per_tenant: int  # 11: rows per tenant in the copy
    fan_rate: int  # 11: transactions per second of the live load over all tenants
    fan_seconds: int  # 11: duration of each live load
    fan_outage_seconds: int  # 11: how long one tenant's database is down during the second load


FULL = Sizes(
    bulk_rows=200_000,
    oltp_seconds=30,
    oltp_update_rows=100_000,
    upkeep_changes=5_000_000,
    upkeep_seconds=240,
    upkeep_tps=400,
    upkeep_table_rows=100_000,
    backlog_txns=1_000_000,
    big_txns=10,
    big_txn_rows=100_000,
    small_backlog_txns=100_000,
    naive_rows=300,
    latency_rate=500,
    latency_seconds=20,
    copy_rows=1_000_000,
    fan_tenants=1_000,
    fan_rows_per_tenant=1_000,
    fan_rate=500,
    fan_seconds=40,
    fan_outage_seconds=30,
)
QUICK = Sizes(
    bulk_rows=5_000,
    oltp_seconds=3,
    oltp_update_rows=5_000,
    upkeep_changes=20_000,
    upkeep_seconds=20,
    upkeep_tps=40,
    upkeep_table_rows=5_000,
    backlog_txns=5_000,
    big_txns=10,
    big_txn_rows=1_000,
    small_backlog_txns=500,
    naive_rows=50,
    latency_rate=100,
    latency_seconds=3,
    copy_rows=10_000,
    fan_tenants=30,
    fan_rows_per_tenant=200,
    fan_rate=60,
    fan_seconds=6,
    fan_outage_seconds=3,
)


def progress(message: str) -> None:
    """A progress line on stderr; stdout carries only the result table."""
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_rate(rows_per_s: float) -> str:
    return f"{rows_per_s / 1000:,.1f}k rows/s" if rows_per_s >= 1000 else f"{rows_per_s:,.0f} rows/s"


def fmt_int(n: int) -> str:
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g}M"
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


@dataclass
class Row:
    """One line of the result table. ``ok`` is None for informational lines (baselines, absolute numbers)."""

    key: str
    scenario: str
    measured: str
    target: str = ""
    ok: bool | None = None
    note: str = ""
    group: int = 0  # the scenario number; the table is sorted by it

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return "info"
        return "pass" if self.ok else "FAIL"


@dataclass
class Bench:
    sizes: Sizes
    quick: bool
    pg: PgCluster
    results: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # shared measurements (ceilings) between scenarios
    group: int = 0  # the scenario being run; rows added are filed under it
    cleanup: list[Path] = field(default_factory=list)  # scratch directories to remove at the end
    parts: set[str] = field(default_factory=set)  # --only 11a: the parts asked for (empty: every part)

    def wants(self, part: str) -> bool:
        """Whether ``part`` (e.g. "11b") is to run: every part unless --only named parts of its scenario."""
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        named = {p for p in self.parts if p.rstrip("abcdefghijklmnopqrstuvwxyz") == number}
        return not named or part in named

    @property
    def dsn(self) -> str:
        return self.pg.dsn()

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh autocommit connection; returns its rows (empty if none)."""
        with self.connect() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def add(self, row: Row, group: int | None = None) -> None:
        row.group = self.group if group is None else group
        self.results.append(row)
        progress(f"  {row.key} {row.scenario}: {row.measured} (target {row.target or '-'}) {row.verdict}")

    def clear_outbox(self) -> None:
        """An empty outbox, and no memory of delivering anywhere: every scenario delivers to a fresh Turso
        database, and a worker that finds a fresh database where Postgres remembers delivering (rightly) copies
        every table of the target afresh, the earlier scenarios' million-row tables included. That copy ran
        under scenarios 5 and 7 until session 4 (p50 337 ms; the copy counted at half its rate)."""
        with self.connect() as conn:
            conn.execute("TRUNCATE pgturso.outbox")
            conn.execute("UPDATE pgturso.delivery_state SET delivered_marker = NULL")
            conn.execute("VACUUM ANALYZE pgturso.outbox")


# -- Turso over HTTP, spoken directly (the ceiling and the naive sender must not use the worker's code) -------


class TursoHttp:
    """A minimal Hrana-over-HTTP client on one keep-alive session."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/v2/pipeline"
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"

    def pipeline(self, reqs: list[dict[str, Any]], baton: str | None = None) -> dict[str, Any]:
        response = self.session.post(self.url, data=json.dumps({"baton": baton, "requests": reqs}), timeout=300)
        response.raise_for_status()
        answer = response.json()
        for result in answer["results"]:
            if result.get("type") == "error":
                raise RuntimeError(f"Turso error: {result['error']}")
            batch = result.get("response", {}).get("result", {})
            for error in batch.get("step_errors", []) if isinstance(batch, dict) else []:
                if error is not None:
                    raise RuntimeError(f"Turso batch step error: {error}")
        return answer

    @staticmethod
    def stmt(sql: str, args: Sequence[Any] = ()) -> dict[str, Any]:
        return {"sql": sql, "args": [_hrana_value(a) for a in args]}

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[list[Any]]:
        answer = self.pipeline([{"type": "execute", "stmt": self.stmt(sql, args)}])
        rows = answer["results"][0]["response"]["result"]["rows"]
        return [[None if v["type"] == "null" else v["value"] for v in row] for row in rows]

    def batch(self, statements: list[dict[str, Any]], baton: str | None = None) -> dict[str, Any]:
        steps = [{"stmt": s} for s in statements]
        return self.pipeline([{"type": "batch", "batch": {"steps": steps}}], baton)

    def close(self) -> None:
        self.session.close()


def _hrana_value(value: Any) -> dict[str, Any]:
    if value is None:
        return {"type": "null"}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    return {"type": "text", "value": str(value)}


@contextlib.contextmanager
def fresh_turso() -> Iterator[TursoServer]:
    """A new, empty tursodb --sync-server on loopback; every load is measured into a fresh one."""
    server = TursoServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgturso-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tursodb_version() -> str:
    try:
        out = subprocess.run([tursodb_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.strip() or "unknown"
    except OSError:
        return "unknown"


# -- the worker as a subprocess ---------------------------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process ``pid`` has used so far (/proc/PID/stat); 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # Fields after the command name (which may hold spaces): state is the first, utime the 12th.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


class WalsenderCpu:
    """The CPU the walsenders of the cluster use while a worker drains a slot, sampled every 50 ms from /proc
    (a walsender exits with its worker: the last sample before then is kept)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.seconds: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> WalsenderCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _sample(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(0.05):
                if not any(cpu_seconds(pid) for pid in self.seconds):
                    for (pid,) in conn.execute("SELECT pid FROM pg_stat_replication").fetchall():
                        self.seconds.setdefault(pid, 0.0)
                for pid in self.seconds:
                    self.seconds[pid] = max(self.seconds[pid], cpu_seconds(pid))


@dataclass
class WorkerRun:
    returncode: int | None = None
    seconds: float = 0.0  # from the worker's "starting" log line (or its launch, without one) to its exit
    rows: int = 0  # sum of rows over its "delivered" log lines; callers replace it with the count on Turso
    events: int = 0
    batches: int = 0
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0  # user + system CPU the worker process used (last /proc sample, within 10 ms of its exit)
    batch_ms: list[float] = field(default_factory=list)  # the "ms" of each "delivered" log line
    # (when the bench read it, the rows delivered so far) for each "delivered" line: logged once Turso answered
    # the batch's commit, so its rows were visible on Turso by then
    delivered_at: list[tuple[float, int]] = field(default_factory=list)
    # the "batch_timing" debug line logged just before each "delivered" line (the worker run with
    # --log-level debug), aligned with delivered_at ({} where there was none): when each step of the batch happened
    timings: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# the steps of a batch that the worker's "batch_timing" debug line gives (time.monotonic() of the worker: the
# host's CLOCK_MONOTONIC, the bench's own clock), in the order they happen ("settled" only for a batch read
# ahead: the batch before it answered and recorded)
BATCH_STEPS = ("read", "read_done", "settled", "positioned", "sent", "answered", "removed")


class WorkerProcess:
    """``python -m pgturso run`` with its JSON logs read live and its peak RSS sampled from /proc."""

    def __init__(self, dsn: str, url: str, *, once: bool, extra: Sequence[str] = ()) -> None:
        cmd = [sys.executable, "-m", "pgturso", "run", "--dsn", dsn, "--url", url, "--log-format", "json"]
        if once:
            cmd.append("--once")
        cmd.extend(extra)
        self.run = WorkerRun()
        self.launched_at = time.monotonic()
        self.started_at: float | None = None
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        timing: dict[str, float] = {}
        for line in self.proc.stderr:
            now = time.monotonic()
            try:
                fields = json.loads(line)
            except ValueError:
                self.run.errors.append(line.strip())
                continue
            name = fields.get("event")
            with self.lock:
                if name == "starting":
                    self.started_at = now
                elif name == "batch_timing":
                    timing = {k: float(v) for k, v in fields.items() if k in BATCH_STEPS}
                elif name == "delivered":
                    self.run.rows += int(fields.get("rows", 0))
                    self.run.events += int(fields.get("events", 0))
                    self.run.batches += 1
                    self.run.delivered_at.append((now, self.run.rows))
                    self.run.timings.append(timing)
                    timing = {}
                    if isinstance(fields.get("ms"), (int, float)):
                        self.run.batch_ms.append(float(fields["ms"]))
                elif fields.get("level") in ("warning", "error"):
                    self.run.errors.append(line.strip())

    def delivered_rows(self) -> int:
        with self.lock:
            return self.run.rows

    def _vm_hwm_kb(self) -> int:
        """The process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the forking parent."""
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def wait(self, timeout: float | None = None) -> WorkerRun:
        """Wait for the exit, sampling VmHWM every 10 ms (it only grows; the last sample is within 10 ms of the end)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        peak_kb = 0
        while True:
            peak_kb = max(peak_kb, self._vm_hwm_kb())
            self.run.cpu_seconds = max(self.run.cpu_seconds, cpu_seconds(self.proc.pid))
            if self.proc.poll() is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self.run.errors.append(f"worker killed after {timeout:.0f}s timeout")
                break
            time.sleep(0.01)
        ended = time.monotonic()
        self.reader.join(10)
        self.run.returncode = self.proc.returncode
        self.run.peak_rss_mb = peak_kb / 1024
        self.run.seconds = ended - (self.started_at or self.launched_at)
        return self.run

    def stop(self, timeout: float = 30) -> WorkerRun:
        if self.proc.returncode is None:
            self.proc.terminate()
        return self.wait(timeout)


def drain(dsn: str, url: str, timeout: float = 1800) -> WorkerRun:
    """``pgturso-worker run --once``: deliver everything committed, then exit."""
    run = WorkerProcess(dsn, url, once=True).wait(timeout)
    if run.returncode != 0:
        raise RuntimeError(f"worker exited with {run.returncode}: {' | '.join(run.errors[-3:])}")
    return run


def pgbench(dsn_args: Sequence[str], args: Sequence[str]) -> str:
    """Run pgbench; returns its stdout. Raises on failure."""
    result = subprocess.run([PGBENCH, *args, *dsn_args, "postgres"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr[-500:]}")
    return result.stdout


def pgbench_start(dsn_args: Sequence[str], args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PGBENCH, *args, *dsn_args, "postgres"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_all(procs: Sequence[subprocess.Popen[str]], timeout: float) -> bool:
    """Wait for every process; past ``timeout`` seconds terminate the rest and return False."""
    deadline = time.monotonic() + timeout
    finished = True
    for proc in procs:
        try:
            proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            finished = False
            proc.terminate()
            proc.communicate()
    for proc in procs:
        if finished and proc.returncode != 0:
            raise RuntimeError(f"pgbench failed with exit code {proc.returncode}")
    return finished


def pgbench_conn_args(pg: PgCluster) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user]
