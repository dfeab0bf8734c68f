"""The Postgres side of capture: the SQL of a tracked table's trigger function and initial copy.

Capture runs per statement, not per row: AFTER statement triggers with transition tables pack the changed
rows into outbox events of up to ``CHUNK_ROWS`` rows each, every row a JSON array in column order (see
types.py for each column's encoding). That keeps the per-row cost to building one small JSON array.

- INSERT: one 'U' (upsert) event per chunk of new rows.
- UPDATE: a 'D' event with the keys that the statement moved away from (primary-key changes), then 'U'
  events with the new rows. Keys that are still present are simply overwritten.
- DELETE: 'D' events with the keys of the deleted rows.
- TRUNCATE: one 'T' event.

Materialized views cannot have triggers: ``refresh_function_sql`` generates the function that
``pgturso.refresh_materialized_view`` calls to refresh one and send only the rows that changed.
"""

from __future__ import annotations

from ..common.quoting import quote_ident
from .layout import Column, TableLayout
from .types import OUTPUT_TEXT, equality_is_identity

CHUNK_ROWS = 1000
# json_build_array takes at most 100 arguments (FUNC_MAX_ARGS); wider rows are built from text pieces.
_MAX_FUNCTION_ARGS = 100

# Settings that make every value's text form independent of the writing session. track_table pins the same
# ones for the initial copy (extension/sql/20_track.sql; a test checks that they agree). A capture function
# pins only the ones its table's types depend on (each SET costs a little on every statement), and always the
# first ``len(SESSION_SETTINGS)``: the search_path, and standard_conforming_strings, without which a backslash
# in a string constant of generated code ends it early (a database owner may set it off: docs/security.md).
SESSION_SETTINGS = (
    "SET search_path = pg_catalog, pg_temp",
    "SET standard_conforming_strings = on",
)
CAPTURE_SETTINGS = (
    *SESSION_SETTINGS,
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'iso_8601'",
    "SET extra_float_digits = 1",
)


def capture_settings_options() -> str:
    """CAPTURE_SETTINGS as a connection's startup ``options`` (``-c name=value``, spaces escaped): what a
    session must be given before it runs anything, e.g. a walsender, whose output functions write the text
    forms of decoded values. Startup options take precedence over ALTER DATABASE / ROLE settings."""
    options = []
    for clause in CAPTURE_SETTINGS:
        name, value = clause.removeprefix("SET ").split(" = ")
        options.append(f"-c {name}={value.strip(chr(39)).replace(' ', chr(92) + ' ')}")
    return " ".join(options)


def _json_array(exprs: list[str]) -> str:
    if len(exprs) <= _MAX_FUNCTION_ARGS:
        return f"json_build_array({', '.join(exprs)})::text"
    parts = ", ".join(f"coalesce(to_json({e})::text, 'null')" for e in exprs)
    return f"'[' || array_to_string(ARRAY[{parts}], ',') || ']'"


# Integer columns whose JSON form is their text form: built by concatenation, which is several times cheaper
# per row than json_build_array (it looks up every argument's type on every call).
_PLAIN_INTEGERS = frozenset({"int2", "int4", "int8", "oid"})


def row_json_sql(layout: TableLayout, alias: str, key_only: bool = False) -> str:
    """A Postgres expression giving one row of ``alias`` as a JSON array text."""
    columns = layout.key_layout if key_only else list(layout.columns)
    refs = [f"{alias}.{quote_ident(c.name)}" for c in columns]
    if all(c.base_type in _PLAIN_INTEGERS and c.encode == "{col}" for c in columns):
        parts = " || ',' || ".join(f"coalesce({ref}::text, 'null')" for ref in refs)
        return f"('[' || {parts} || ']')"
    return _json_array([c.encode.format(col=ref) for c, ref in zip(columns, refs, strict=True)])


def filtered(layout: TableLayout, source: str) -> str:
    """``source`` restricted to the rows the table's row filter lets through (all of them without one).

    The filter is Postgres' own deparsed form of it (layout.row_filter): built-in immutable functions over the
    table's columns only, checked at track_table, so evaluating it here runs no code any role defined.
    """
    if not layout.row_filter:
        return source
    return f"(SELECT * FROM {source} AS filtered WHERE ({layout.row_filter}))"


def pack_sql(layout_id: int, op: str, row_expr: str, source: str, tenant: str | None = None,
             fan_out: bool = False) -> str:
    """INSERT … SELECT that packs the rows of ``source`` (aliased ``src``) into outbox events.

    ``tenant``: an expression over ``src`` naming each row's tenant (a routed table, see ``route_expr``): an
    event then holds the rows of one tenant only. ``fan_out``: a reference table, each event queued once per
    tenant of its pattern (``FAN_OUT_TENANTS``).
    """
    if fan_out:
        return (
            "INSERT INTO pgturso.outbox (layout_id, op, nrows, payload, tenant) "
            f"SELECT {int(layout_id)}, '{op}', p.n, p.payload, g.tenant "
            f"FROM (SELECT count(*) AS n, string_agg(packed.row_json, ',') AS payload, packed.chunk "
            f"FROM (SELECT {row_expr} AS row_json, (row_number() OVER () - 1) / {CHUNK_ROWS} AS chunk "
            f"FROM {source} AS src) AS packed GROUP BY packed.chunk) AS p "
            f"CROSS JOIN {FAN_OUT_TENANTS.format(layout_id=int(layout_id))} ORDER BY p.chunk, g.tenant"
        )
    if tenant is None:
        return (
            "INSERT INTO pgturso.outbox (layout_id, op, nrows, payload) "
            f"SELECT {int(layout_id)}, '{op}', count(*), string_agg(packed.row_json, ',') "
            f"FROM (SELECT {row_expr} AS row_json, (row_number() OVER () - 1) / {CHUNK_ROWS} AS chunk "
            f"FROM {source} AS src) AS packed GROUP BY packed.chunk"
        )
    # A wal pattern's events written here (copies, repairs) wait for its router: held (HELD_FOR_ROUTER).
    held = HELD_FOR_ROUTER.format(layout_id=int(layout_id))
    return (
        "INSERT INTO pgturso.outbox (layout_id, op, nrows, payload, tenant, route) "
        f"SELECT {int(layout_id)}, '{op}', count(*), string_agg(packed.row_json, ','), "
        f"CASE WHEN {held} THEN NULL ELSE packed.tenant END, CASE WHEN {held} THEN packed.tenant END "
        f"FROM (SELECT {row_expr} AS row_json, {tenant} AS tenant, "
        f"(row_number() OVER (PARTITION BY {tenant}) - 1) / {CHUNK_ROWS} AS chunk "
        f"FROM {source} AS src) AS packed GROUP BY packed.tenant, packed.chunk"
    )


# capture => 'wal' for a pattern target: its router (sources/router.py) writes the tenants' events in commit
# order; an event of such a pattern written by anything else (a copy, a repair) would overtake changes committed
# before it that the router has not routed yet. So it is held: tenant NULL (no tenant's worker reads it) and its
# tenant in route, until the router meets it in the stream and queues it again there. Asked once per statement
# (pgturso._held_for_router: a wal pattern's, outside its router); trigger capture's writers never ask.
# An uncorrelated scalar subquery: Postgres runs it once per statement (an InitPlan). As a one-row subquery
# CROSS JOINed to the rows it was planned as the inner side of a nested loop and called once per row (bench
# 11a: 1.1M calls, 64 s of the 1M-row copy's 135 s of chunks into 1,000 tenants).
HELD_FOR_ROUTER = ("(SELECT pgturso._held_for_router((SELECT t.target FROM pgturso.layout l "
                   "JOIN pgturso.tracked_table t ON t.id = l.table_id WHERE l.id = {layout_id})))")


# A reference table's events go to every tenant of its pattern: pgturso._pattern_tenants first updates a row
# that a new tenant's registration updates too, so a concurrent registration either waits for this transaction
# and copies the reference rows with its change, or this waits for the registration and queues the change for
# the new tenant too; under REPEATABLE READ the loser gets a serialization failure instead of a stale list
# (docs/design.md, "Reference tables").
FAN_OUT_TENANTS = "pgturso._pattern_tenants({layout_id}) AS g(tenant)"


def tenant_rows_sql(layout: TableLayout, layout_id: int, relation: str) -> str:
    """Every row of a reference table as upsert events for one tenant, ``$1`` (a new tenant's registration)."""
    return pack_sql(layout_id, "U", row_json_sql(layout, "src"), filtered(layout, relation), "$1::text")


def route_expr(layout: TableLayout, alias: str) -> str | None:
    """The tenant of a row of a routed table (its route_by column as text); None for other tables. The text is
    the type's output (key_text_sql), never a cast the table's owner created: the capture function runs it as
    pgturso (SECURITY DEFINER), and the text chooses the tenant database the row goes to."""
    if not layout.route_by:
        return None
    return key_text_sql(layout.column(layout.route_by), f"{alias}.{quote_ident(layout.route_by)}")


def register_tenants_sql(layout: TableLayout, layout_id: int, source: str, where: str = "") -> str:
    """A routed table: the statement that registers the tenants of ``source``'s rows (their databases get the
    pattern's tables) before their events are packed; '' for other tables."""
    if not layout.route_by:
        return ""
    return (f"SELECT pgturso._register_tenants({int(layout_id)}, ARRAY(SELECT DISTINCT {route_expr(layout, 'src')} "
            f"FROM {filtered(layout, source)} AS src {where}))")


def _moved_keys_source(layout: TableLayout) -> str:
    """Old rows whose key the statement moved away from: no new row has the same key *as Turso sees it*.

    With a row filter, only old rows that matched it are on Turso, and a new row that does not match it
    does not replace its old one: an UPDATE moving a row out of the filter deletes it there (one moving a
    row into the filter is an upsert of the new row), as a Postgres 15 publication's row filter does."""
    if all(c.trusted and equality_is_identity(c.base_type) and c.deterministic for c in layout.key_layout):
        match = " AND ".join(f"n.{quote_ident(k)} = o.{quote_ident(k)}" for k in layout.key_columns)
    else:  # e.g. a citext key, or text under a nondeterministic collation, changing case: Postgres calls it
        # equal, Turso holds a different key
        match = f"{row_json_sql(layout, 'n', key_only=True)} = {row_json_sql(layout, 'o', key_only=True)}"
    if layout.route_by:  # a row whose tenant changed leaves its old tenant's database
        match += f" AND {route_expr(layout, 'n')} = {route_expr(layout, 'o')}"
    old_rows, new_rows = filtered(layout, "old_rows"), filtered(layout, "new_rows")
    return f"(SELECT o.* FROM {old_rows} AS o WHERE NOT EXISTS (SELECT 1 FROM {new_rows} AS n WHERE {match}))"


def snapshot_sql(layout: TableLayout, layout_id: int, relation: str) -> str:
    """The initial copy: every existing row of ``relation`` as upsert events."""
    packed = pack_sql(layout_id, "U", row_json_sql(layout, "src"), filtered(layout, relation),
                      route_expr(layout, "src"), layout.reference)
    register = register_tenants_sql(layout, layout_id, relation)
    return f"{register}; {packed}" if register else packed


def capture_settings(layout: TableLayout) -> list[str]:
    """The SET clauses a table's capture function needs: SESSION_SETTINGS always, the rest by column type."""
    needed = {name for column in layout.columns for name in column.settings}
    always = len(SESSION_SETTINGS)
    return [*SESSION_SETTINGS] + [clause for clause in CAPTURE_SETTINGS[always:] if clause.split()[1] in needed]


def _collect_sql(op: str, row_expr: str, source: str, small_first: bool = True, tenant: str | None = None) -> str:
    """PL/pgSQL that packs the rows of ``source`` (a transition table) into events held in the capture
    function's arrays (v_ops, v_counts, v_payloads), read-only: the function writes them to the outbox
    afterwards. With ``small_first`` a statement of up to CHUNK_ROWS rows, the common case, takes one cheaper
    query (counting the rows first costs little for a transition table, more for a join).

    ``tenant`` (a routed table, see ``route_expr``): one event per tenant and chunk, its tenant in v_tenants."""
    if tenant is not None:
        chunks = (
            f"SELECT count(*) AS n, string_agg(packed.row_json, ',') AS p, packed.chunk, packed.tenant "
            f"FROM (SELECT {row_expr} AS row_json, {tenant} AS tenant, "
            f"(row_number() OVER (PARTITION BY {tenant}) - 1) / {CHUNK_ROWS} AS chunk "
            f"FROM {source} AS src) AS packed GROUP BY packed.tenant, packed.chunk"
        )
        order = "ORDER BY c.tenant, c.chunk"
        return (
            f"SELECT v_ops || array_agg('{op}'::text {order}), v_counts || array_agg(c.n {order}), "
            f"v_payloads || array_agg(c.p {order}), v_tenants || array_agg(c.tenant {order}) "
            f"INTO v_ops, v_counts, v_payloads, v_tenants FROM ({chunks}) AS c"
        )
    chunks = (
        f"SELECT count(*) AS n, string_agg(packed.row_json, ',') AS p, packed.chunk "
        f"FROM (SELECT {row_expr} AS row_json, (row_number() OVER () - 1) / {CHUNK_ROWS} AS chunk "
        f"FROM {source} AS src) AS packed GROUP BY packed.chunk"
    )
    chunked = (
        f"SELECT v_ops || array_agg('{op}'::text ORDER BY c.chunk), v_counts || array_agg(c.n ORDER BY c.chunk), "
        f"v_payloads || array_agg(c.p ORDER BY c.chunk) INTO v_ops, v_counts, v_payloads FROM ({chunks}) AS c"
    )
    if not small_first:
        return chunked
    return (
        f"IF (SELECT count(*) FROM {source} AS counted) <= {CHUNK_ROWS} THEN\n"
        f"        SELECT count(*), string_agg({row_expr}, ',') INTO v_count, v_payload FROM {source} AS src;\n"
        f"        IF v_count > 0 THEN\n"
        f"          v_ops := v_ops || '{op}'::text; v_counts := v_counts || v_count; "
        f"v_payloads := v_payloads || v_payload;\n"
        f"        END IF;\n"
        f"      ELSE\n"
        f"        {chunked};\n"
        f"      END IF"
    )


# Waking the worker: a sleeping worker holds pg_advisory_lock(WAKE_LOCK_CLASS, table id) for each of its
# tables. A capture function that cannot take the same lock shared knows the worker sleeps and notifies it;
# otherwise the worker is busy (or not running) and will look at the outbox anyway: no NOTIFY, which is the
# most expensive part of capturing a single-row statement.
WAKE_LOCK_CLASS = int.from_bytes(b"pgtw", "big")
# Postgres refuses to PREPARE a transaction that sent a NOTIFY (two-phase commit). A role, database or session that
# prepares transactions sets pgturso.notify = off: its captures and DDL neither notify nor take the wake lock, and
# an idle worker finds their changes within idle_wait seconds. (SQL files use it as @NOTIFY_ENABLED@.)
NOTIFY_ENABLED = "coalesce(current_setting('pgturso.notify', true), 'on') NOT IN ('off', 'false', 'no', '0')"


def capture_function_sql(layout: TableLayout, layout_id: int, function_name: str, table_id: int) -> str:
    """CREATE OR REPLACE of the table's statement-level trigger function.

    The rows are packed inside an exception block and written to the outbox after it. The block only reads
    (so its subtransaction takes no transaction id, and a transaction of many statements does not overflow
    the subtransaction cache); if packing fails, the layout no longer matches the table (DDL that pgturso's
    event triggers did not see): pgturso._capture_failed follows the schema and recopies the table, with a
    WARNING, so the application's write goes through and Turso still gets every change.
    """
    tenant = route_expr(layout, "src")
    upsert_new = _collect_sql("U", row_json_sql(layout, "src"), filtered(layout, "new_rows"), tenant=tenant)
    delete_old = _collect_sql("D", row_json_sql(layout, "src", key_only=True), filtered(layout, "old_rows"),
                              tenant=tenant)
    delete_moved = _collect_sql("D", row_json_sql(layout, "src", key_only=True), _moved_keys_source(layout),
                                small_first=False, tenant=tenant)
    truncate = f"INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES ({int(layout_id)}, 'T', 0)"
    write = (f"INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)\n"
             f"    SELECT {int(layout_id)}, e.op::\"char\", e.n, e.p "
             "FROM unnest(v_ops, v_counts, v_payloads) AS e(op, n, p)")
    declare_tenants = ""
    if layout.route_by:
        # A new tenant value of the new rows first gets its database's tables (pgturso._register_tenants: it
        # writes, so after the read-only block, and before the rows' events). A delete whose tenant is then
        # still no tenant (a row moved out of, or deleted from, a tenant that a running initial copy has not
        # registered yet) removes a row that never reached a database: a tenant is registered before any event
        # of it is queued. Such deletes are dropped, one probe per delete event (queued, they reached a database
        # without the table and stopped that tenant), under the pattern's row lock FOR SHARE, which a
        # registration's update of that row conflicts with: in READ COMMITTED a registration in progress is
        # waited for and seen by the probe after it; under REPEATABLE READ one committed after this snapshot
        # fails this one to serialize.
        # TRUNCATE empties the table in every tenant's database.
        pattern = (f"(SELECT t.target FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id "
                   f"WHERE l.id = {int(layout_id)})")
        registered = f"EXISTS (SELECT 1 FROM pgturso.target g WHERE g.tenant = e.t AND g.pattern = {pattern})"
        unregistered = (
            f"SELECT 1 FROM {filtered(layout, 'new_rows')} AS src WHERE NOT EXISTS (SELECT 1 FROM pgturso.target g "
            f"WHERE g.tenant = {tenant} AND g.pattern = {pattern})")
        perform = "PERFORM " + register_tenants_sql(layout, layout_id, "new_rows").removeprefix("SELECT ")
        write = (f"IF TG_OP <> 'DELETE' THEN\n      IF EXISTS ({unregistered}) THEN\n        {perform};\n"
                 f"      END IF;\n    END IF;\n"
                 "    IF EXISTS (SELECT 1 FROM unnest(v_ops, v_tenants) AS e(o, t) "
                 f"WHERE e.o = 'D' AND NOT {registered}) THEN\n"
                 f"      PERFORM 1 FROM pgturso.target p WHERE p.name = {pattern} FOR SHARE;\n"
                 "      SELECT coalesce(array_agg(e.o ORDER BY e.i), '{}'), "
                 "coalesce(array_agg(e.n ORDER BY e.i), '{}'), "
                 "coalesce(array_agg(e.p ORDER BY e.i), '{}'), coalesce(array_agg(e.t ORDER BY e.i), '{}') "
                 f"INTO v_ops, v_counts, v_payloads, v_tenants "
                 f"FROM unnest(v_ops, v_counts, v_payloads, v_tenants) WITH ORDINALITY AS e(o, n, p, t, i) "
                 f"WHERE {registered};\n"
                 f"    END IF;\n"
                 f"    INSERT INTO pgturso.outbox (layout_id, op, nrows, payload, tenant)\n"
                 f"    SELECT {int(layout_id)}, e.op::\"char\", e.n, e.p, e.t "
                 f"FROM unnest(v_ops, v_counts, v_payloads, v_tenants) AS e(op, n, p, t)")
        declare_tenants = "  v_tenants text[] := '{}';\n"
        truncate = f"PERFORM pgturso._fan_out({int(layout_id)}, 'T', NULL)"
    elif layout.reference:
        # Each event once per tenant database of the pattern, in order for each; TRUNCATE empties the table in
        # every one of them.
        write = (f"IF cardinality(v_ops) > 0 THEN\n"
                 f"      INSERT INTO pgturso.outbox (layout_id, op, nrows, payload, tenant)\n"
                 f"      SELECT {int(layout_id)}, e.op::\"char\", e.n, e.p, g.tenant "
                 f"FROM unnest(v_ops, v_counts, v_payloads) WITH ORDINALITY AS e(op, n, p, ord) "
                 f"CROSS JOIN {FAN_OUT_TENANTS.format(layout_id=int(layout_id))} ORDER BY e.ord, g.tenant;\n"
                 f"    END IF")
        truncate = f"PERFORM pgturso._fan_out({int(layout_id)}, 'T', NULL)"
    # A row filter names columns unqualified: let them win over PL/pgSQL's own names (found, new, ...).
    conflict = "#variable_conflict use_column\n" if layout.row_filter else ""
    body = f"""
{conflict}DECLARE
  v_ops text[] := '{{}}';
  v_counts bigint[] := '{{}}';
  v_payloads text[] := '{{}}';
  v_count bigint;
  v_payload text;
{declare_tenants}BEGIN
  -- Generated by pgturso.track_table; do not edit.
  IF TG_OP = 'TRUNCATE' THEN
    {truncate};
  ELSE
    BEGIN
      IF TG_OP = 'INSERT' THEN
      {upsert_new};
      ELSIF TG_OP = 'UPDATE' THEN
      {delete_moved};
      {upsert_new};
      ELSE
      {delete_old};
      END IF;
    EXCEPTION WHEN OTHERS THEN
      PERFORM pgturso._capture_failed({int(table_id)}, TG_RELID, SQLSTATE, SQLERRM);
      RETURN NULL;
    END;
    {write};
  END IF;
  IF {NOTIFY_ENABLED} THEN
    IF NOT pg_try_advisory_xact_lock_shared({WAKE_LOCK_CLASS}, {int(table_id)}) THEN
      PERFORM pg_notify('pgturso', '');
    END IF;
  END IF;
  RETURN NULL;
END
"""
    tag = _dollar_tag(body)
    return (
        f"CREATE OR REPLACE FUNCTION pgturso.{quote_ident(function_name)}() RETURNS trigger\n"
        "LANGUAGE plpgsql SECURITY DEFINER " + " ".join(capture_settings(layout)) + "\n"
        f"AS {tag}{body}{tag}"
    )


def refresh_function_sql(layout: TableLayout, layout_id: int, function_name: str) -> str:
    """CREATE OR REPLACE of ``function_name(rel regclass, concurrent boolean)`` for a materialized view.

    It remembers every row (as its JSON array) and key before REFRESH MATERIALIZED VIEW, then sends a 'D'
    event for the keys that are gone and 'U' events for the rows that are new or different.
    """
    row = row_json_sql(layout, "src")
    key = row_json_sql(layout, "src", key_only=True)
    # format() pattern: a literal % in a column name must be doubled; %s is the view.
    select = f"SELECT {row} AS r, {key} AS k FROM ".replace("%", "%%")
    where = f" WHERE ({layout.row_filter})".replace("%", "%%") if layout.row_filter else ""
    before, after = (
        f"CREATE TEMP TABLE {t} ON COMMIT DROP AS {select}%s AS src{where}"
        for t in ("pgturso_mv_before", "pgturso_mv_after")
    )
    deletes = pack_sql(
        layout_id, "D", "src.k",
        "(SELECT b.k FROM pg_temp.pgturso_mv_before AS b "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_temp.pgturso_mv_after AS a WHERE a.k = b.k))",
    )
    upserts = pack_sql(
        layout_id, "U", "src.r",
        "(SELECT a.r FROM pg_temp.pgturso_mv_after AS a "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_temp.pgturso_mv_before AS b WHERE b.r = a.r))",
    )
    body = f"""
BEGIN
  -- Generated by pgturso.track_table; do not edit.
  DROP TABLE IF EXISTS pg_temp.pgturso_mv_before, pg_temp.pgturso_mv_after;
  EXECUTE format({_dollar_quote(before)}, rel);
  IF concurrent THEN
    EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', rel);
  ELSE
    EXECUTE format('REFRESH MATERIALIZED VIEW %s', rel);
  END IF;
  EXECUTE format({_dollar_quote(after)}, rel);
  {deletes};
  {upserts};
  DROP TABLE pg_temp.pgturso_mv_before, pg_temp.pgturso_mv_after;
  PERFORM pgturso._wake_worker();
END
"""
    tag = _dollar_tag(body)
    return (
        f"CREATE OR REPLACE FUNCTION pgturso.{quote_ident(function_name)}(rel regclass, concurrent boolean) "
        "RETURNS void\nLANGUAGE plpgsql " + " ".join(CAPTURE_SETTINGS) + "\n"
        f"AS {tag}{body}{tag}"
    )


def _dollar_quote(text: str) -> str:
    """``text`` as a dollar-quoted string constant: column names may hold quotes and backslashes, and a
    dollar-quoted constant means the same whatever standard_conforming_strings says."""
    n = 0
    while f"$pgturso_sql{n}$" in text:
        n += 1
    return f"$pgturso_sql{n}${text}$pgturso_sql{n}$"


def _dollar_tag(body: str) -> str:
    """A dollar-quote tag that does not occur in ``body`` (column names may hold anything)."""
    n = 0
    while f"$pgturso{n}$" in body:
        n += 1
    return f"$pgturso{n}$"


def key_text_sql(column: Column, ref: str) -> str:
    """A key value's text form, by the type's output function only (no cast a user may have created)."""
    return f"{ref}::text" if column.trusted else OUTPUT_TEXT.format(col=ref)


def key_from_text_sql(column: Column, text: str) -> str | None:
    """A value's text form read back as a value of the column's type (comparable with it, and encoded by
    the column's encoder alike), by built-in input functions only: cast to the built-in type under the
    domain, so no domain CHECK runs. None when the column's type is one a user may have defined (its input
    or a cast from text could be theirs): such keys are compared as text, and such values are encoded from
    their text form, which is what their encoder (types.USER_TYPE) makes of them anyway.
    """
    if not column.trusted or not column.base_pg_type:
        return None
    return f"({text})::{column.base_pg_type}"


def copy_chunk_sql(layout: TableLayout, layout_id: int, relation: str, limit: int) -> tuple[str, str]:
    """One chunk of a table's initial copy, as two statements taking the previous chunk's last key $1
    (text[]; NULL: from the start):

    - ``bound``: the key ``limit`` rows further on (NULL: fewer rows are left), fixed before anything is
      locked, so a row that a concurrent write moves to another key while the chunk waits for its lock is
      re-checked against the range and, outside it, left to that write's own event;
    - ``chunk`` ($2: the bound): the rows in the range, locked FOR SHARE so that no write to them can commit
      between this read and their queued upserts (a write that waited for the lock gets a later event);
      returns the rows copied.
    """
    keys = [quote_ident(k) for k in layout.key_columns]
    src_keys = ", ".join(f"src.{k}" for k in keys)
    typed_keys = [key_from_text_sql(c, "") for c in layout.key_layout]
    if None in typed_keys:
        # The worker runs this with its own rights: it must not read a key back through a user's input
        # function or cast. A key of such a type is copied in one chunk (one transaction) instead.
        bound = "SELECT NULL::text[]"
        after = before = "true"
    else:
        def typed(param: str) -> str:
            values = ", ".join(key_from_text_sql(c, f"({param}::text[])[{i + 1}]") or ""
                               for i, c in enumerate(layout.key_layout))
            return f"({values})" if len(keys) > 1 else values

        key_tuple = f"({src_keys})" if len(keys) > 1 else src_keys
        after = f"($1::text[] IS NULL OR {key_tuple} > {typed('$1')})"
        before = f"($2::text[] IS NULL OR {key_tuple} <= {typed('$2')})"
        key_text = ", ".join(key_text_sql(c, f"src.{k}") for c, k in zip(layout.key_layout, keys, strict=True))
        bound = (f"SELECT ARRAY[{key_text}] FROM {relation} AS src WHERE {after} "
                 f"ORDER BY {src_keys} OFFSET {int(limit) - 1} LIMIT 1")
    # Rows outside the row filter are neither copied nor locked: a write moving one into the filter is captured
    # as its upsert (FOR SHARE re-checks the filter on a row version that changed while the chunk waited).
    only_filtered = f" AND ({layout.row_filter})" if layout.row_filter else ""
    rows = "chunk"
    register = ""
    if layout.route_by:
        # The chunk's new tenants are registered (their C events drawn) before its rows are packed: packing
        # waits for the registration's one row.
        register = f"registered AS MATERIALIZED ({register_tenants_sql(layout, layout_id, 'chunk')}), "
        rows = "(SELECT * FROM chunk WHERE (SELECT true FROM registered))"
    packed = pack_sql(layout_id, "U", row_json_sql(layout, "src"), rows, route_expr(layout, "src"), layout.reference)
    chunk = (
        f"WITH chunk AS MATERIALIZED (SELECT src.* FROM {relation} AS src "
        f"WHERE {after} AND {before}{only_filtered} FOR SHARE OF src), "
        f"{register}packed AS ({packed}"
        " RETURNING 1) SELECT count(*) FROM chunk"
    )
    return bound, chunk
