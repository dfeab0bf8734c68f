"""``pgturso-worker``: deliver tracked tables' changes from Postgres to Turso.

    pgturso-worker run --dsn "$DSN" --url http://127.0.0.1:8080 --auth-token "$TOKEN"   # until stopped
    pgturso-worker run --dsn "$DSN" --once                                               # drain, exit
    pgturso-worker status --dsn "$DSN"

Every setting is read from postgresql.conf (pgturso.NAME), then PGTURSO_NAME in the environment, then the
flag; the last one given wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import psycopg

from . import __version__, background
from .common import logs
from .common.errors import ConfigError, PgTursoError, RetriesExhausted
from .common.postgres import connect
from .common.retry import backoff_delay
from .common.settings import POSTGRESQL_CONF_NAMES, POSTGRESQL_CONF_QUERY, SETTINGS, Settings, resolve
from .delivery.targets import Target, open_target
from .run.fanout import PatternWorker
from .run.worker import EXIT_FATAL, EXIT_OK, EXIT_RETRIES_EXHAUSTED, Worker, target_endpoint
from .verify import TENANTS_OF, run_verify, verify_tenants

log = logging.getLogger("pgturso.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgturso-worker",
        description="Keep Turso tables equal to tracked Postgres tables.",
        epilog="Settings: flag > PGTURSO_* environment > pgturso.* in postgresql.conf > default.",
    )
    parser.add_argument("--version", action="version", version=f"pgturso {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "deliver changes until stopped"),
        ("status", "show what is pending, the lag and the last error"),
        ("verify", "compare Postgres and Turso table by table (exit 1 on any difference)"),
    ):
        sub = commands.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--dsn", default=os.environ.get("PGTURSO_DSN", ""),
                         help="Postgres connection string (env PGTURSO_DSN; libpq PG* variables also apply)")
        if name == "status":
            sub.add_argument("--max-retrying", type=float, default=DEFAULT_MAX_RETRYING, metavar="SECONDS",
                             help="exit 1 when a target (or tenant database) has been retrying, delivering "
                                  "nothing, for longer than this (0: never)")
            sub.add_argument("--max-lag", type=float, default=0.0, metavar="SECONDS",
                             help="exit 1 naming each target (or tenant database) whose oldest pending change "
                                  "was captured longer ago than this (0: never)")
            sub.add_argument("--problems", action="store_true",
                             help="show only the targets and tenant databases with an error, retrying, blocked, "
                                  "not running or over --max-lag (and each pattern's summary line)")
        if name == "run":
            sub.add_argument("--once", action="store_true", help="deliver what is committed now, then exit")
        if name == "verify":
            sub.add_argument("tables", nargs="*", help="tracked tables to verify (default: all)")
            sub.add_argument("--repair", action="store_true",
                             help="queue the differing rows for delivery (upserts, and deletes of extra rows)")
            sub.add_argument("--settle-timeout", type=float, default=30.0,
                             help="seconds to wait for in-flight changes before re-checking differences")
        if name in ("run", "verify"):
            for setting in SETTINGS:
                sub.add_argument(setting.flag, dest=setting.name, default=None,
                                 help=f"{setting.help} (env {setting.env}"
                                 + (f", {setting.guc}" if setting.in_postgresql_conf else "")
                                 + f"; default {setting.default})")
    return parser


def load_settings(dsn: str, flags: dict[str, object]) -> Settings:
    with connect(dsn, autocommit=True) as conn:
        rows = conn.execute(POSTGRESQL_CONF_QUERY, {"names": POSTGRESQL_CONF_NAMES}).fetchall()
    from_conf = {name: value for name, value in rows if value is not None}
    return resolve(from_conf, os.environ, flags)


def postgres_may_come_back(exc: psycopg.OperationalError) -> bool:
    """A connection failure that retrying can fix: Postgres down, starting, restarting, out of connection
    slots, the network. Not a rejected login (class 28) nor a database that does not exist (3D000)."""
    state = exc.sqlstate or ""
    return not (state.startswith("28") or state == "3D000")


class _Stopping(Exception):
    pass


def load_settings_waiting(dsn: str, flags: dict[str, object], once: bool) -> Settings:
    """``load_settings`` for ``run``: Postgres being down at start is an outage like any other, retried with
    the worker's capped backoff (its retry settings from flags and environment, as postgresql.conf cannot be
    read yet) until it answers; ``--once`` (or --retry-limit) gives up after the limit: RetriesExhausted.
    SIGTERM or SIGINT meanwhile (while retrying, or while a slow Postgres answers): _Stopping."""
    early = resolve({}, os.environ, flags)
    limit = early.retry_limit or (3 if once else 0)
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        attempt = 0
        while True:
            try:
                settings = load_settings(dsn, flags)
            except psycopg.OperationalError as exc:
                if not postgres_may_come_back(exc):
                    raise
                attempt += 1
                if limit and attempt > limit:
                    logs.event(log, logging.ERROR, "giving_up", attempts=attempt - 1, error=str(exc).strip())
                    raise RetriesExhausted(f"Postgres unreachable after {attempt - 1} retries: {exc}") from exc
                delay = backoff_delay(attempt, early.retry_base_delay, early.retry_max_delay)
                logs.event(log, logging.WARNING, "retry", attempt=attempt, delay_s=round(delay, 2),
                           error=str(exc).strip())
                deadline = time.monotonic() + delay
                while not stop and time.monotonic() < deadline:
                    time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
                if stop:
                    raise _Stopping() from exc
                continue
            if stop:  # told to stop while Postgres answered: the worker's own handlers are not installed yet
                raise _Stopping()
            return settings
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        return _status(args.dsn, args.max_retrying, args.problems, args.max_lag)
    flags = {s.name: getattr(args, s.name) for s in SETTINGS}
    logs.TIMESTAMPS = not background.started_by_postgres()
    logs.setup(flags.get("log_level") or os.environ.get("PGTURSO_LOG_LEVEL") or "info",  # type: ignore[arg-type]
               flags.get("log_format") or os.environ.get("PGTURSO_LOG_FORMAT") or "text")  # type: ignore[arg-type]
    if args.command == "run" and background.started_by_postgres():
        target = flags.get("target") or os.environ.get("PGTURSO_TARGET") or "default"
        if not background.wait_until_ready(args.dsn, str(target)):
            return 0
    try:
        if args.command == "run":
            settings = load_settings_waiting(args.dsn, flags, args.once)
        else:
            settings = load_settings(args.dsn, flags)
        settings.token()  # a missing token or key file is a start-up error, not a later one
        settings.encryption()
    except RetriesExhausted:
        return EXIT_RETRIES_EXHAUSTED
    except _Stopping:
        logs.event(log, logging.INFO, "stopped", reason="signal while reading the settings from Postgres")
        return EXIT_OK
    except (ConfigError, psycopg.Error) as exc:
        logs.event(log, logging.ERROR, "bad_configuration", error=str(exc).strip())
        return EXIT_FATAL
    logs.setup(settings.log_level, settings.log_format)
    if args.command == "verify":
        return _verify(args, settings)
    if "%s" in settings.target:  # a pattern target: every tenant database, each by its own worker thread
        pattern = PatternWorker(args.dsn, settings)
        pattern.install_signal_handlers()
        return pattern.run(once=args.once)
    worker = Worker(args.dsn, settings)
    worker.reload_settings = lambda: load_settings(args.dsn, flags)
    worker.install_signal_handlers()
    return worker.run(once=args.once)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    """Verify the target's tables; a pattern target ('tenant-%s'): every tenant's database, or one tenant's
    database by its own name ('tenant-acme')."""
    def open_endpoint(name: str) -> Target:
        url, token = target_endpoint(conn, dataclasses.replace(settings, target=name))
        return open_target(url, token, max_request_bytes=settings.max_request_bytes,
                           timeout=settings.request_timeout, tls_ca_file=settings.tls_ca_file,
                           encryption_key=settings.encryption())

    try:
        with connect(args.dsn, autocommit=True, application_name="pgturso-verify") as conn:
            row = conn.execute(TARGET_PATTERN, (settings.target,)).fetchone()
            if row is None and "%s" in settings.target:
                raise ConfigError(f"there is no target named {settings.target!r}; create it with SELECT "
                                  f"pgturso.add_target('{settings.target}', 'libsql://…%s…', 'token')")
            if "%s" in settings.target or (row is not None and row[0] is not None):
                pattern = settings.target if "%s" in settings.target else row[0]  # type: ignore[index]
                tenants = (conn.execute(TENANTS_OF, (pattern,)).fetchall() if pattern == settings.target
                           else [(settings.target, row[1])])  # type: ignore[index]
                return verify_tenants(conn, pattern, tenants, open_endpoint, args.tables, args.repair,
                                      args.settle_timeout)
            target = open_endpoint(settings.target)
            try:
                return run_verify(conn, target, args.tables, args.repair, args.settle_timeout, settings.target)
            finally:
                target.close()
    except (ValueError, PgTursoError, psycopg.Error) as exc:
        logs.event(log, logging.ERROR, "verify_failed", error=str(exc).strip())
        return EXIT_FATAL


TARGET_PATTERN = "SELECT pattern, tenant FROM pgturso.target WHERE name = %s"
STATUS_QUERY = """
    SELECT target, table_name::text, target_table, pending_rows, coalesce(extract(epoch FROM lag), 0)::float8,
           rows_delivered, last_delivered_at, copy_state, copy_rows_done, copy_rows_total, wal_pending_bytes
    FROM pgturso.status ORDER BY 1, 2
"""
# A pattern target first, then its tenants (each a target of its own).
TARGETS_QUERY = """
    SELECT target, worker_status, recorded_status, worker, retries, last_error, last_error_at,
           last_error_txid::text, previous_error, previous_error_at, error_cleared_at,
           extract(epoch FROM now() - failing_since)::float8, pattern, tenant, rows_delivered,
           strpos(target, '%s') > 0
    FROM pgturso.target_status ORDER BY coalesce(pattern, target), pattern IS NOT NULL, target
"""
DEFAULT_MAX_RETRYING = 300.0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _status(dsn: str, max_retrying: float = DEFAULT_MAX_RETRYING, problems_only: bool = False,
            max_lag: float = 0.0) -> int:
    """Render pgturso.status for a terminal; exit 1 when a target is failing now: blocked, stopped with a
    current error, claimed by a worker that is not running (killed), or retrying (Turso unreachable, 5xx,
    429) for longer than ``max_retrying`` seconds (0: never) -- it has delivered nothing since -- or its
    oldest pending change is older than ``max_lag`` seconds (0: never; the last line names them all). A pattern
    target is shown as a summary line, then a block per tenant database (``problems_only``: only the targets
    and tenants with an error, retrying, blocked or not running). Cleared errors are shown as history.
    Exit 2 when the status cannot be read (Postgres unreachable, no pgturso, no right to read it)."""
    try:
        with connect(dsn, autocommit=True) as conn:
            tables = conn.execute(STATUS_QUERY).fetchall()
            targets = conn.execute(TARGETS_QUERY).fetchall()
    except psycopg.Error as exc:  # unknown is not healthy: say why, exit 2
        print(f"pgturso: cannot read pgturso.status: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FATAL
    failing = False
    lagging: list[str] = []
    oldest: dict[str, float] = {}  # per target (a tenant's own included): the age of its oldest pending change
    for row in tables:
        oldest[row[0]] = max(oldest.get(row[0], 0.0), row[4])
    tenants_of: dict[str, list[str]] = {}
    for row in targets:
        if row[12] is not None:
            tenants_of.setdefault(row[12], []).append(row[1])
    for (target, status, recorded, worker, retries, error, error_at, error_txid, previous, previous_at,
         cleared_at, failing_for, pattern, tenant, delivered_total, is_pattern) in targets:
        lines: list[str] = []
        problem = False
        if is_pattern:  # its tenants have the workers and the state; the pattern's own row has neither
            states = tenants_of.get(target, [])
            counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
            lines.append(f"pattern {target}: " + (f"{len(states)} tenant database(s) ({counts})" if states
                                                  else "no tenant databases yet"))
            problem = True  # the summary line is always shown
        else:
            shown = status if status == recorded else f"{status} (was {recorded}: nobody holds its delivery lock)"
            what = f"target {target}" + (f" (tenant {tenant} of {pattern})" if pattern else "")
            lines.append(f"{what}: worker {shown}" + (f" ({worker})" if worker else "")
                         + f", {retries} retries, {delivered_total} rows delivered")
            long_retry = status == "retrying" and failing_for is not None and 0 < max_retrying < failing_for
            too_old = 0 < max_lag < oldest.get(target, 0.0)
            if too_old:
                lines.append(f"  oldest pending change captured {_duration(oldest[target])} ago "
                             f"(over --max-lag {max_lag:g}s)")
                lagging.append(target)
            if status == "retrying" and failing_for is not None:
                lines.append(f"  retrying for {_duration(failing_for)}, nothing delivered since"
                             + (f" (over --max-retrying {max_retrying:g}s)" if long_retry else ""))
            if error:
                lines.append(f"  error at {error_at}" + (f", source transaction {error_txid}" if error_txid else "")
                             + ":")
                lines.append(f"    {error}")
            if previous:
                lines.append(f"  previous error at {previous_at}, cleared at {cleared_at}:")
                lines.append(f"    {previous}")
            failing |= (status in ("blocked", "not running") or (status == "stopped" and bool(error))
                        or long_retry or too_old)
            problem = bool(error) or status in ("retrying", "blocked", "not running") or too_old
        if problems_only and not problem:
            continue  # e.g. the hundreds of idle tenants of a pattern
        mine = [t for t in tables if t[0] == target]
        if mine:
            lines.append(f"  {'table':30} {'turso table':30} {'pending rows':>12} {'lag':>8} {'delivered':>12}  "
                         "last delivered       initial copy")
        in_slot = 0
        for _, table, turso_table, pending, lag, delivered, last_at, copy_state, done, total, wal_bytes in mine:
            last = last_at.strftime("%Y-%m-%d %H:%M:%S") if last_at else "-"
            copy = "done" if copy_state == "done" else f"{done}/{total or '?'} rows"
            count = "-" if pattern else delivered  # a tenant's rows are counted per target only (above)
            lines.append(f"  {table:30} {turso_table:30} {pending:>12} {lag:>7.1f}s {count:>12}  {last:19}  {copy}")
            in_slot = max(in_slot, wal_bytes or 0)
        if in_slot:  # a wal target: what its slot still holds is not counted in rows (docs/operations.md)
            lines.append(f"  + changes in the replication slot not yet read: up to {in_slot} bytes of WAL")
        print("\n".join(lines))
    if lagging:
        print(f"over --max-lag {max_lag:g}s: {', '.join(lagging)}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
