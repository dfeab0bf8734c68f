"""``pgturso-worker``: deliver tracked tables' changes from Postgres to Turso.

    pgturso-worker run --dsn "$DSN" --url http://127.0.0.1:8080 --auth-token "$TOKEN"   # until stopped
    pgturso-worker run --dsn "$DSN" --once                                               # drain, exit
    pgturso-worker status --dsn "$DSN"

Every setting is read from postgresql.conf (pgturso.NAME), then PGTURSO_NAME in the environment, then the
flag; the last one given wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import psycopg

from . import __version__, logs
from .errors import ConfigError
from .settings import POSTGRESQL_CONF_NAMES, POSTGRESQL_CONF_QUERY, SETTINGS, Settings, resolve
from .worker import EXIT_FATAL, Worker

log = logging.getLogger("pgturso.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgturso-worker",
        description="Keep Turso tables equal to tracked Postgres tables.",
        epilog="Settings: flag > PGTURSO_* environment > pgturso.* in postgresql.conf > default.",
    )
    parser.add_argument("--version", action="version", version=f"pgturso {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "deliver changes until stopped"), ("status", "show what is pending")):
        sub = commands.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--dsn", default=os.environ.get("PGTURSO_DSN", ""),
                         help="Postgres connection string (env PGTURSO_DSN; libpq PG* variables also apply)")
        if name == "run":
            sub.add_argument("--once", action="store_true", help="deliver what is committed now, then exit")
            for setting in SETTINGS:
                sub.add_argument(setting.flag, dest=setting.name, default=None,
                                 help=f"{setting.help} (env {setting.env}"
                                 + (f", {setting.guc}" if setting.in_postgresql_conf else "")
                                 + f"; default {setting.default})")
    return parser


def load_settings(dsn: str, flags: dict[str, object]) -> Settings:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(POSTGRESQL_CONF_QUERY, {"names": POSTGRESQL_CONF_NAMES}).fetchall()
    from_conf = {name: value for name, value in rows if value is not None}
    return resolve(from_conf, os.environ, flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        return _status(args.dsn)
    flags = {s.name: getattr(args, s.name) for s in SETTINGS}
    logs.setup(flags.get("log_level") or os.environ.get("PGTURSO_LOG_LEVEL") or "info",  # type: ignore[arg-type]
               flags.get("log_format") or os.environ.get("PGTURSO_LOG_FORMAT") or "text")  # type: ignore[arg-type]
    try:
        settings = load_settings(args.dsn, flags)
        settings.token()  # a missing token file is a start-up error, not a later one
    except (ConfigError, psycopg.Error) as exc:
        logs.event(log, logging.ERROR, "bad_configuration", error=str(exc).strip())
        return EXIT_FATAL
    logs.setup(settings.log_level, settings.log_format)
    worker = Worker(args.dsn, settings)
    worker.install_signal_handlers()
    return worker.run(once=args.once)


def _status(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT t.relid::text, t.target_table, count(o.id), coalesce(sum(o.nrows), 0), min(o.captured_at) "
            "FROM pgturso.tracked_table t LEFT JOIN pgturso.layout l ON l.table_id = t.id "
            "LEFT JOIN pgturso.outbox o ON o.layout_id = l.id GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    print(f"{'table':30} {'turso table':30} {'pending events':>14} {'pending rows':>12}  oldest pending")
    for relid, target, events, nrows, oldest in rows:
        print(f"{relid:30} {target:30} {events:>14} {nrows:>12}  {oldest or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
