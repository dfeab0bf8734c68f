"""``pgturso-worker verify``: compare Postgres and Turso table by table, and optionally repair Turso.

Postgres rows are read in key order, encoded exactly as capture encodes them, and sent to Turso in chunks;
Turso decodes each chunk with the same expressions the worker applies changes with and reports, in one
query per chunk, which rows are missing or different. Extra rows on Turso are found from the counts and then
by key. Differences seen while the worker is delivering are checked again after ``wait_for_sync``: only
those that persist are reported.

Repairs go through the outbox, like any change: under a short SHARE lock on the table (so no write can slip
between the read and the queued event) the differing rows are re-read and queued as upserts, extra rows that
are still absent from Postgres as deletes, and the worker delivers them in order with everything else.
Londiste's compare/repair is the model.

A pattern target ('tenant-%s'): each tenant's database is compared with that tenant's rows only (the rows
of a routed table whose route_by value is the tenant, its column list and row filter applied), one tenant
after the other (``verify_tenants``); a row on a tenant's database that Postgres has under another tenant is
extra there. Repairs are that tenant's events, which only its database receives.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg

from .capture.layout import Column, TableLayout
from .capture.sql import (
    CAPTURE_SETTINGS,
    SESSION_SETTINGS,
    filtered,
    key_from_text_sql,
    key_text_sql,
    pack_sql,
    route_expr,
    row_json_sql,
)
from .common.errors import PgTursoError
from .common.logs import Progress
from .common.quoting import quote_ident, quote_literal
from .delivery.targets import Target

CHUNK_ROWS = 5000

TRACKED_TABLES = """
    SELECT format('%%I.%%I', n.nspname, c.relname), l.id, l.spec
    FROM pgturso.tracked_table t
    JOIN pg_class c ON c.oid = t.relid AND t.target = %(target)s
        AND c.relkind IN ('r', 'p', 'm')  -- never a view its owner made of a tracked table (docs/security.md)
    JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL (SELECT id, spec FROM pgturso.layout WHERE table_id = t.id ORDER BY id DESC LIMIT 1) l
    ORDER BY 1
"""

CAPTURE_DISABLED = """
    SELECT format('%%I.%%I', n.nspname, c.relname)
    FROM pgturso.tracked_table t
    JOIN pg_class c ON c.oid = t.relid AND t.target = %(target)s AND t.dropped_at IS NULL
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE pgturso._capture_disabled(t.id)
    ORDER BY 1
"""


@dataclass
class TableReport:
    table: str
    target_table: str
    postgres_rows: int = 0
    turso_rows: int = 0
    different: list[tuple[str, ...]] = field(default_factory=list)  # keys (Postgres text form) missing/different
    extra: list[list[Any]] = field(default_factory=list)  # keys (Turso values) only on Turso
    repaired: int = 0

    @property
    def equal(self) -> bool:
        """No row missing, different or extra, and the counts agree (a count mismatch is never "equal")."""
        return not self.different and not self.extra and self.postgres_rows == self.turso_rows


def _set_local(conn: psycopg.Connection[Any]) -> None:
    for setting in CAPTURE_SETTINGS:
        conn.execute(setting.replace("SET ", "SET LOCAL ", 1))


# Route column types whose text form read back is the value itself, so `column = 'tenant'::type` selects the
# rows whose column::text is 'tenant' (and more only under a nondeterministic collation: the text test stays).
_INDEXABLE_ROUTES = frozenset({"int2", "int4", "int8", "text", "varchar", "bpchar", "uuid"})


def _rows(layout: TableLayout, relation: str, with_params: bool = True, tenant: str | None = None) -> str:
    """The rows of ``relation`` that belong on Turso (its row filter applied; ``tenant``: on that tenant's
    database, those whose route_by value it is), for a query run with parameters (a ``%`` doubled) or without."""
    rows = filtered(layout, relation)
    if tenant is not None and layout.route_by:
        where = f"{route_expr(layout, 'routed')} = {quote_literal(tenant)}"
        column = next(c for c in layout.columns if c.name == layout.route_by)
        if column.base_type in _INDEXABLE_ROUTES:
            # The same rows, but an index on the column (route_by::text is not indexable unless a text column)
            # finds them: each tenant reads its rows, not the whole table.
            where = f"routed.{quote_ident(column.name)} = {quote_literal(tenant)}::{column.base_type} AND {where}"
        rows = f"(SELECT * FROM {rows} AS routed WHERE {where})"
    return rows.replace("%", "%%") if with_params else rows


def _key_text(layout: TableLayout, alias: str) -> str:
    return ", ".join(key_text_sql(c, f"{alias}.{quote_ident(c.name)}") for c in layout.key_layout)


def _diff_sql(layout: TableLayout) -> str:
    """SQLite: index of each chunk row that is missing on Turso or differs from it, and whether it is missing."""
    decoded = [c.decode.format(val=f"j.value->>{i}") for i, c in enumerate(layout.columns)]
    by_name = {c.name: decoded[i] for i, c in enumerate(layout.columns)}
    join = " AND ".join(f"t.{quote_ident(k)} = {by_name[k]}" for k in layout.key_columns)
    same = " AND ".join(f"t.{quote_ident(c.name)} IS {decoded[i]}" for i, c in enumerate(layout.columns))
    first_key = quote_ident(layout.key_columns[0])
    return (
        f"SELECT j.key, t.{first_key} IS NULL FROM json_each(?) AS j "
        f"LEFT JOIN {quote_ident(layout.target_table)} AS t ON {join} WHERE t.{first_key} IS NULL OR NOT ({same})"
    )


def _key_rows_sql(layout: TableLayout) -> str:
    """Postgres: derived table ``k`` of typed key columns (and their position), one text[] per column; a key
    of a type a user may have defined stays text (capture.key_from_text_sql), compared by _key_match as such."""
    arrays = ", ".join("%s::text[]" for _ in layout.key_columns)
    raw = ", ".join(f"k{i}" for i in range(len(layout.key_columns)))
    casts = ", ".join(f"{key_from_text_sql(c, f'raw.k{i}') or f'raw.k{i}'} AS {quote_ident(c.name)}"
                      for i, c in enumerate(layout.key_layout))
    return (f"(SELECT {casts}, raw._pgturso_n FROM unnest({arrays}) WITH ORDINALITY AS raw({raw}, _pgturso_n)) "
            "AS k")


def _key_match(layout: TableLayout, alias: str) -> str:
    def side(c: Column) -> str:
        ref = f"{alias}.{quote_ident(c.name)}"
        return ref if key_from_text_sql(c, "") else key_text_sql(c, ref)

    return " AND ".join(f"{side(c)} = k.{quote_ident(c.name)}" for c in layout.key_layout)


def _key_params(layout: TableLayout, keys: Sequence[Sequence[str | None]]) -> list[list[str | None]]:
    return [[key[i] for key in keys] for i in range(len(layout.key_columns))]


def _turso_keys_sql(layout: TableLayout) -> str:
    """Turso keys by rowid pages: the first page (NULL bound) from the lowest rowid, which may be 0 or negative
    (an INTEGER PRIMARY KEY is the rowid)."""
    keys = ", ".join(quote_ident(k) for k in layout.key_columns)
    return (f"SELECT rowid, {keys} FROM {quote_ident(layout.target_table)} "
            "WHERE ? IS NULL OR rowid > ? ORDER BY rowid LIMIT ?")


def _as_pg_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    return str(value)


class Verifier:
    def __init__(self, conn: psycopg.Connection[Any], target: Target, progress: TextIO = sys.stderr,
                 target_name: str = "default", tenant: str | None = None) -> None:
        self.conn = conn
        # As the worker's: no function or operator of a schema others may create in can stand in for a built-in
        # one in the comparisons verify runs with its operator's rights (docs/security.md).
        for setting in SESSION_SETTINGS:
            conn.execute(setting)
        self.target_name = target_name  # a pattern's name for a tenant's database
        self.tenant = tenant  # the tenant whose database ``target`` is (a pattern target), else None
        self.target = target
        self.progress = progress

    def tables(self, names: Sequence[str] = ()) -> list[tuple[str, int, TableLayout]]:
        rows = self.conn.execute(TRACKED_TABLES, {"target": self.target_name}).fetchall()
        self.conn.commit()
        found = [(name, layout_id, TableLayout.from_spec(spec)) for name, layout_id, spec in rows]
        if names:
            wanted = set(names)
            def names_of(entry: tuple[str, int, TableLayout]) -> set[str]:
                qualified = entry[0]
                return {qualified, entry[2].source_table, qualified.removeprefix("public.")}

            unknown = wanted - set().union(*(names_of(f) for f in found))
            if unknown:
                raise ValueError(f"not tracked: {', '.join(sorted(unknown))} (see pgturso.tracked_table)")
            found = [f for f in found if names_of(f) & wanted]
        return found

    def wait_for_sync(self, timeout: float) -> bool:
        row = self.conn.execute("SELECT pgturso.wait_for_sync(make_interval(secs => %s))", (timeout,)).fetchone()
        self.conn.commit()
        return bool(row and row[0])

    def _rows(self, layout: TableLayout, relation: str, with_params: bool = True) -> str:
        return _rows(layout, relation, with_params, self.tenant)

    def _differing(self, relation: str, layout: TableLayout, where: str = "", params: Sequence[Any] = ()
                   ) -> tuple[int, list[tuple[str, ...]], int]:
        """Stream Postgres rows (optionally filtered) and ask Turso which differ.

        Returns the rows read, the keys (Postgres text form) of rows missing or different, and how many of
        those are missing.
        """
        diff = _diff_sql(layout)
        order = ", ".join(f"src.{quote_ident(k)}" for k in layout.key_columns)
        query = (f"SELECT {row_json_sql(layout, 'src')}, {_key_text(layout, 'src')} "
                 f"FROM {self._rows(layout, relation)} AS src {where} ORDER BY {order}")
        total, differing, missing = 0, [], 0
        with self.conn.transaction():
            _set_local(self.conn)
            estimate = 0
            if not where:
                count = f"SELECT count(*) FROM {self._rows(layout, relation, with_params=False)} AS r"
                estimate = self.conn.execute(count).fetchone()[0]  # type: ignore[index]
            bar = Progress(f"verify {layout.source_table}", estimate, self.progress) if estimate else None
            with self.conn.cursor(name="pgturso_verify") as cur:
                cur.itersize = CHUNK_ROWS
                cur.execute(query, params)
                while rows := cur.fetchmany(CHUNK_ROWS):
                    payload = "[" + ",".join(r[0] for r in rows) + "]"
                    for index, absent in self.target.query(diff, [payload]):
                        differing.append(tuple(rows[int(index)][1:]))  # type: ignore[arg-type,call-overload]
                        missing += bool(absent)
                    total += len(rows)
                    if bar:
                        bar.update(total)
            if bar:
                bar.finish()
        return total, differing, missing

    def _extra_keys(self, relation: str, layout: TableLayout) -> list[list[Any]]:
        """Keys on Turso that Postgres does not have (only run when the counts say there are some)."""
        extra: list[list[Any]] = []
        last_rowid: int | None = None
        while True:
            rows = self.target.query(_turso_keys_sql(layout), [last_rowid, last_rowid, CHUNK_ROWS])
            if not rows:
                return extra
            last_rowid = int(rows[-1][0])  # type: ignore[arg-type]
            with self.conn.transaction():
                extra.extend(self._absent_in_postgres(relation, layout, [list(r[1:]) for r in rows]))

    def _absent_in_postgres(self, relation: str, layout: TableLayout, keys: list[list[Any]]) -> list[list[Any]]:
        """Those of ``keys`` (Turso values) that no row of ``relation`` that belongs on Turso (its row filter
        applied) has, as the caller's transaction sees."""
        probe = (f"SELECT k._pgturso_n FROM {_key_rows_sql(layout)} WHERE NOT EXISTS "
                 f"(SELECT 1 FROM {self._rows(layout, relation)} AS r WHERE {_key_match(layout, 'r')})")
        as_text = [[_as_pg_text(v) for v in key] for key in keys]
        return [keys[int(n) - 1] for (n,) in self.conn.execute(probe, _key_params(layout, as_text)).fetchall()]

    def _count_turso(self, layout: TableLayout) -> int:
        return int(self.target.query(f"SELECT count(*) FROM {quote_ident(layout.target_table)}")[0][0])  # type: ignore[arg-type]

    def verify(self, relation: str, layout: TableLayout, settle_timeout: float = 30.0) -> TableReport:
        report = TableReport(relation, layout.target_table)
        report.postgres_rows, differing, missing = self._differing(relation, layout)
        report.turso_rows = self._count_turso(layout)
        if differing or report.turso_rows != report.postgres_rows - missing:
            # Changes may have been in flight: let the worker catch up, then look again at what differed.
            self.wait_for_sync(settle_timeout)
            if differing:
                _, differing, missing = self._recheck(relation, layout, differing)
            self._recount(relation, layout, report)
            # Turso holds the rows that match, the differing ones that are present, and any extras.
            if report.turso_rows > report.postgres_rows - missing:
                report.extra = self._extra_keys(relation, layout)
            if not differing and not report.extra and report.postgres_rows != report.turso_rows:
                # Only the counts differ: writes may have committed between the two counts; count once more
                # after the worker caught up. A mismatch that remains is reported (never "equal").
                self.wait_for_sync(settle_timeout)
                self._recount(relation, layout, report)
        report.different = differing
        return report

    def _recount(self, relation: str, layout: TableLayout, report: TableReport) -> None:
        with self.conn.transaction():
            rows = self._rows(layout, relation, with_params=False)
            row = self.conn.execute(f"SELECT count(*) FROM {rows} AS r").fetchone()
        report.postgres_rows = int(row[0]) if row else 0
        report.turso_rows = self._count_turso(layout)

    def _recheck(self, relation: str, layout: TableLayout, keys: list[tuple[str, ...]]
                 ) -> tuple[int, list[tuple[str, ...]], int]:
        where, params = self._key_filter(layout, keys)
        return self._differing(relation, layout, where, params)

    @staticmethod
    def _key_filter(layout: TableLayout, keys: Sequence[Sequence[str | None]]) -> tuple[str, list[Any]]:
        where = f"WHERE EXISTS (SELECT 1 FROM {_key_rows_sql(layout)} WHERE {_key_match(layout, 'src')})"
        return where, _key_params(layout, keys)

    def _event_tenant(self) -> str | None:
        """The tenant of the repair events (a constant: only this tenant's database receives them)."""
        return None if self.tenant is None else quote_literal(self.tenant).replace("%", "%%")

    def repair(self, relation: str, layout_id: int, layout: TableLayout, report: TableReport) -> int:
        """Queue upserts for missing/different rows and deletes for extra ones; returns events queued."""
        if report.equal:
            return 0
        with self.conn.transaction():
            _set_local(self.conn)
            self.conn.execute(f"LOCK TABLE {relation} IN SHARE MODE")
            queued = 0
            if report.different:
                where, params = self._key_filter(layout, report.different)
                source = f"(SELECT * FROM {self._rows(layout, relation)} AS src {where})"
                queued += self.conn.execute(pack_sql(layout_id, "U", row_json_sql(layout, "src"), source,
                                                     self._event_tenant()), params).rowcount
            # A key extra on Turso when verify looked may have been written in Postgres since: its own event
            # brings it to Turso, and a delete queued now would land after that event and remove the row.
            # The SHARE lock is held, so what is absent now stays absent until the delete is queued.
            extra = self._absent_in_postgres(relation, layout, report.extra) if report.extra else []
            if extra:
                keys = [[_as_pg_text(v) for v in key] for key in extra]
                source = f"(SELECT * FROM {_key_rows_sql(layout)})"
                queued += self.conn.execute(
                    pack_sql(layout_id, "D", row_json_sql(layout, "src", key_only=True), source,
                             self._event_tenant()),
                    _key_params(layout, keys)).rowcount
            self.conn.execute("SELECT pg_notify('pgturso', '')")
        report.repaired = len(report.different) + len(extra)
        return queued


def print_report(report: TableReport, stream: TextIO = sys.stdout, examples: int = 10, label: str = "") -> None:
    state = "equal" if report.equal else "DIFFERENT"
    stream.write(f"{label}{report.table} -> {report.target_table}: {state} (postgres {report.postgres_rows} rows, "
                 f"turso {report.turso_rows} rows")
    if not report.equal:
        stream.write(f"; {len(report.different)} missing or different, {len(report.extra)} extra on Turso")
        if not report.different and not report.extra:
            stream.write("; the counts differ (rows changing while verify ran? run it again)")
    stream.write(")\n")
    for key in report.different[:examples]:
        stream.write(f"  missing or different: key {tuple(key)}\n")
    for key in report.extra[:examples]:
        stream.write(f"  only on Turso: key {tuple(key)}\n")
    if report.repaired:
        stream.write(f"  repair queued for {report.repaired} rows\n")


def _verify_tables(verifier: Verifier, names: Sequence[str], repair: bool, settle_timeout: float,
                   label: str = "") -> int:
    """Verify (and repair) the named tables, or all of the verifier's target's; the number that differ."""
    differences = 0
    # A table whose capture triggers are disabled loses every write silently: name it first.
    for (table,) in verifier.conn.execute(CAPTURE_DISABLED, {"target": verifier.target_name}).fetchall():
        print(f"{label}{table}: capture DISABLED (ALTER TABLE ... DISABLE TRIGGER): its writes are not replicated; "
              "ALTER TABLE ... ENABLE TRIGGER ALL, then verify --repair (or SELECT pgturso.resync_table(...))")
        differences += 1
    tables = verifier.tables(names)
    if not tables and verifier.tenant is None:
        print(f"{verifier.target_name}: no tables are tracked to this target (an add_target of a tenant's name "
              "becomes that tenant's database with the tenant's first routed row)")
    for relation, layout_id, layout in tables:
        report = verifier.verify(relation, layout, settle_timeout)
        if repair and not report.equal:
            verifier.repair(relation, layout_id, layout, report)
        print_report(report, label=label)
        differences += not report.equal
    return differences


def _finish(verifier: Verifier, repair: bool, differences: int, settle_timeout: float, started: float,
            what: str, not_compared: int = 0) -> None:
    if repair and differences:
        synced = verifier.wait_for_sync(settle_timeout)
        print("repairs delivered" if synced else "repairs queued; they are delivered when the worker runs")
    # "all equal" only when everything was compared: a tenant that could not be is no evidence of equality.
    outcome = f"{differences} {what} differ" if differences else "all equal" if not not_compared else "none differ"
    print(f"verified in {time.monotonic() - started:.1f}s: {outcome}"
          + (f", {not_compared} {what} not compared" if not_compared else ""))


def run_verify(conn: psycopg.Connection[Any], target: Target, names: Sequence[str], repair: bool,
               settle_timeout: float = 30.0, target_name: str = "default") -> int:
    """Verify (and repair) the named tables, or all of the target's; 0 when all were equal, 1 otherwise."""
    verifier = Verifier(conn, target, target_name=target_name)
    started = time.monotonic()
    differences = _verify_tables(verifier, names, repair, settle_timeout)
    _finish(verifier, repair, differences, settle_timeout, started, "table(s)")
    return 1 if differences else 0


TENANTS_OF = "SELECT name, tenant FROM pgturso.target WHERE pattern = %s ORDER BY name"


def verify_tenants(conn: psycopg.Connection[Any], pattern: str, tenants: Sequence[tuple[str, str]],
                   open_tenant: Callable[[str], Target], names: Sequence[str], repair: bool,
                   settle_timeout: float = 30.0) -> int:
    """Verify (and repair) each of ``tenants`` (target name, tenant value) of ``pattern``: 0 when every tenant's
    database was equal to its rows, 1 when one differed, 2 when one could not be compared (the others are
    compared all the same; the error names the tenant)."""
    started = time.monotonic()
    if not tenants:
        print(f"{pattern}: no tenant databases yet (a tenant's database appears with its first routed row)")
        return 0
    differing, failed = 0, 0
    verifier: Verifier | None = None
    for name, tenant in tenants:
        try:
            target = open_tenant(name)
            try:
                verifier = Verifier(conn, target, target_name=pattern, tenant=tenant)
                differing += bool(_verify_tables(verifier, names, repair, settle_timeout, label=f"{name}: "))
            finally:
                target.close()
        except (PgTursoError, psycopg.Error) as exc:
            print(f"{name}: cannot verify: {str(exc).strip()}", file=sys.stderr)
            failed += 1
    if verifier is not None:
        _finish(verifier, repair, differing, settle_timeout, started, "tenant database(s)", failed)
    if failed:
        print(f"{failed} tenant database(s) could not be verified (see the errors above)", file=sys.stderr)
        return 2
    return 1 if differing else 0
