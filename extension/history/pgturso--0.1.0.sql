-- Generated from extension/sql/*.sql by make; do not edit.
\echo Use "CREATE EXTENSION pgturso CASCADE" to load this file. \quit

-- extension/sql/00_catalog.sql
-- pgturso's own tables. Only the extension owner (and superusers) can read or write them: application roles
-- reach the outbox solely through the SECURITY DEFINER capture triggers.

-- Identifies this source database on every target, so one Turso database can take several sources.
-- It is data, not a server setting, so it survives a restore or the promotion of a physical standby.
CREATE TABLE pgturso.instance (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source_id uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO pgturso.instance DEFAULT VALUES;
COMMENT ON TABLE pgturso.instance IS 'The identity of this source database on Turso targets.';

-- Turso databases to deliver to, each by its own worker. 'default' takes its URL from the worker's settings
-- (pgturso.url); named ones (pgturso.add_target) from here.
CREATE TABLE pgturso.target (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'),
    url text CHECK (url IS NULL OR url ~ '^(https?|libsql)://|^file:'),
    auth_token text,  -- readable only by the extension owner and superusers, like every pgturso table
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgturso.target (name) VALUES ('default');
COMMENT ON TABLE pgturso.target IS
    'Turso databases to deliver to. ''default'': URL from pgturso.url / the worker''s settings.';

CREATE TABLE pgturso.tracked_table (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid regclass NOT NULL UNIQUE,
    target text NOT NULL DEFAULT 'default' REFERENCES pgturso.target (name),
    target_table text NOT NULL,
    tracked_at timestamptz NOT NULL DEFAULT now(),
    -- track_table's choices, kept for schema changes: target_table (when given), key_columns (when given),
    -- indexes (false: no secondary indexes on Turso), drop_target (DROP TABLE drops the Turso table too).
    options jsonb NOT NULL DEFAULT '{}',
    -- Set by DROP TABLE while changes of the table are still undelivered; the row goes once they are.
    dropped_at timestamptz,
    -- The initial copy (and resync_table): the worker copies the rows in key order, a chunk per transaction,
    -- while capture already runs; copy_after is the key (text form) of the last row copied.
    copy_state text NOT NULL DEFAULT 'done' CHECK (copy_state IN ('copying', 'done')),
    copy_after text[],
    copy_rows_done bigint NOT NULL DEFAULT 0,
    copy_rows_total bigint,
    copy_started_at timestamptz,
    copy_finished_at timestamptz,
    UNIQUE (target, target_table)
);
COMMENT ON TABLE pgturso.tracked_table IS 'Tables replicated to Turso; maintained by track_table/untrack_table.';

-- A table's column layout as captured; every outbox event names the layout it was packed with.
CREATE TABLE pgturso.layout (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_id integer NOT NULL REFERENCES pgturso.tracked_table (id) ON DELETE CASCADE,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON pgturso.layout (table_id);
COMMENT ON TABLE pgturso.layout IS 'Column layouts of tracked tables (pgturso.layout.TableLayout as JSON).';

-- The outbox. Capture triggers append events in the writing transaction; the worker deletes them once the
-- target confirmed the commit that carries them. id comes from a sequence without cache, so a write that
-- waited for another transaction's commit always gets a larger id than every event of that transaction:
-- the worker's ordering rests on this (docs/design.md).
CREATE TABLE pgturso.outbox (
    id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    layout_id integer NOT NULL,
    op "char" NOT NULL CHECK (op IN ('C', 'U', 'D', 'T', 'A', 'X')),
    nrows integer NOT NULL,
    payload text,
    captured_at timestamptz NOT NULL DEFAULT now()
)
-- A queue: every row is deleted soon after it is written. Vacuum it (and its TOAST, where chunked events
-- live) after a fixed number of deletes rather than a fraction of its size, without cost-based pauses,
-- so freed space is reused and the trailing pages are truncated: it stays small without VACUUM FULL.
WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
      autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000,
      autovacuum_vacuum_cost_delay = 0,
      toast.autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 10000,
      toast.autovacuum_vacuum_cost_delay = 0);
CREATE INDEX outbox_txid_idx ON pgturso.outbox (txid, id);
COMMENT ON TABLE pgturso.outbox IS
    'Changes not yet confirmed by Turso. op: C create table, U upsert rows, D delete keys, T truncate, '
    'A schema change (payload {"from": old layout id, "recopy": bool}), X table dropped (payload '
    '{"drop_target": bool}); U/D payload: comma-separated JSON arrays, one per row (U: all columns, D: key).';

REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgturso FROM PUBLIC;


-- extension/sql/10_python.sql
-- PL/Python entry points. They stay one import long: the logic lives in the pgturso Python package
-- (worker/pgturso), which `make install` copies to @PYTHON_DIR@ for the server's Python.

CREATE FUNCTION pgturso._plan_layout(
    layout_id integer, relation text, source_table text, target_table text,
    columns jsonb, key_columns text[], function_name text, indexes jsonb
) RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_table
return plan_table(layout_id, relation, source_table, target_table, columns, key_columns, function_name, indexes)
$$;
COMMENT ON FUNCTION pgturso._plan_layout IS
    'Private: layout, capture and copy SQL of a table (pgturso.extension_api.plan_table).';

CREATE FUNCTION pgturso._plan_change(
    old_spec jsonb, source_table text, target_table text, columns jsonb, key_columns text[], indexes jsonb
) RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_change
return plan_change(old_spec, source_table, target_table, columns, key_columns, indexes)
$$;
COMMENT ON FUNCTION pgturso._plan_change IS
    'Private: how a tracked table''s layout changed (pgturso.extension_api.plan_change).';

CREATE FUNCTION pgturso._plan_rows(layout_id integer, spec jsonb, relation text, op text) RETURNS text
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import rows_sql
return rows_sql(layout_id, spec, relation, op)
$$;
COMMENT ON FUNCTION pgturso._plan_rows IS
    'Private: SQL sending every row of a relation as upserts (U) or its keys as deletes (D).';


CREATE FUNCTION pgturso._plan_copy_chunk(layout_id integer, spec jsonb, relation text, max_rows integer)
RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import copy_chunk
return copy_chunk(layout_id, spec, relation, max_rows)
$$;
COMMENT ON FUNCTION pgturso._plan_copy_chunk IS
    'Private: SQL copying the next chunk of a table''s rows (pgturso.capture.copy_chunk_sql).';


-- extension/sql/20_track.sql
-- track_table / untrack_table / refresh_materialized_view: install and remove a table's capture.
-- Schema changes of tracked tables are followed by the event triggers of 30_schema_changes.sql, which use the
-- same helpers (_describe, _install_capture) to compute a new layout.

CREATE FUNCTION pgturso._base_type(typ oid) RETURNS oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE chain(oid, base, depth) AS (
        SELECT t.oid, t.typbasetype, 0 FROM pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typbasetype, c.depth + 1 FROM chain c JOIN pg_type t ON t.oid = c.base
    )
    SELECT oid FROM chain ORDER BY depth DESC LIMIT 1
$$;
COMMENT ON FUNCTION pgturso._base_type IS 'Private: the type under a (possibly nested) domain.';

CREATE FUNCTION pgturso._capture_function_name(table_id integer) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '_capture_' || table_id $$;
COMMENT ON FUNCTION pgturso._capture_function_name IS 'Private: name of a tracked table''s capture function.';

-- The Turso name of a Postgres relation: the bare name in public, schema.name elsewhere (indexes too).
CREATE FUNCTION pgturso._turso_name(rel oid) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN n.nspname = 'public' THEN c.relname::text ELSE n.nspname || '.' || c.relname END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$$;
COMMENT ON FUNCTION pgturso._turso_name IS 'Private: default Turso name of a table or index.';

-- SQLite compares names ignoring the case of ASCII letters: two names equal under this clash on Turso.
CREATE FUNCTION pgturso._sqlite_name(name text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') $$;
COMMENT ON FUNCTION pgturso._sqlite_name IS 'Private: a name as SQLite compares it (ASCII case folded).';

-- The key a table replicates by: key_columns if given, else the primary key, else the unique index over NOT
-- NULL columns with the fewest columns (materialized views: any unique index, NULLs allowed by Postgres).
CREATE FUNCTION pgturso._key_columns(rel regclass, explicit text[]) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_keys text[];
    v_kind "char";
    v_bad text;
BEGIN
    SELECT relkind INTO v_kind FROM pg_class WHERE oid = rel;
    IF explicit IS NOT NULL THEN
        SELECT k INTO v_bad FROM unnest(explicit) AS k
        WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = k
                          AND a.attnum > 0 AND NOT a.attisdropped);
        IF v_bad IS NOT NULL OR cardinality(explicit) = 0 THEN
            RAISE EXCEPTION 'pgturso: key column "%" is not a column of %', coalesce(v_bad, ''), rel
                USING HINT = 'Pass existing column names: key_columns => ARRAY[''id'', ...].';
        END IF;
        IF v_kind <> 'm' THEN
            SELECT k INTO v_bad FROM unnest(explicit) AS k
            JOIN pg_attribute a ON a.attrelid = rel AND a.attname = k WHERE NOT a.attnotnull;
            IF v_bad IS NOT NULL THEN
                RAISE EXCEPTION 'pgturso: key column "%" of % may be NULL', v_bad, rel
                    USING HINT = format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL, then track the table.',
                                        rel, v_bad);
            END IF;
        END IF;
        RETURN explicit;
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary;
    IF v_keys IS NOT NULL THEN
        RETURN v_keys;
    END IF;
    SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord)
            FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
    INTO v_keys
    FROM pg_index i
    WHERE i.indrelid = rel AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
      AND NOT (0 = ANY (i.indkey[0:i.indnkeyatts - 1]))
      AND (v_kind = 'm' OR NOT EXISTS (
              SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) AS k(attnum)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE NOT a.attnotnull))
    ORDER BY i.indnkeyatts, i.indexrelid::regclass::text
    LIMIT 1;
    RETURN v_keys;
END
$$;
COMMENT ON FUNCTION pgturso._key_columns IS 'Private: the columns a tracked table is keyed by on Turso (NULL: none).';

-- Everything _plan_layout needs to know about a relation, read from the catalog.
CREATE FUNCTION pgturso._describe(
    rel regclass, options jsonb,
    OUT source_table text, OUT target_table text, OUT columns jsonb, OUT key_columns text[], OUT indexes jsonb
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname) INTO source_table
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    target_table := coalesce(options ->> 'target_table', pgturso._turso_name(rel));
    key_columns := pgturso._key_columns(rel, (SELECT array_agg(x) FROM jsonb_array_elements_text(
                                                 options -> 'key_columns') AS x));
    SELECT jsonb_agg(jsonb_build_object(
               'name', a.attname,
               'attnum', a.attnum,
               'pg_type', format_type(a.atttypid, a.atttypmod),
               'base_type', bt.typname,
               'kind', CASE WHEN bt.typcategory = 'A' THEN 'A' ELSE bt.typtype::text END,
               'typmod', CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
               'not_null', a.attnotnull) ORDER BY a.attnum)
    INTO columns
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    JOIN pg_type bt ON bt.oid = pgturso._base_type(a.atttypid)
    WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
    -- Plain-column btree/hash indexes without predicate or deferral; partial, expression and other indexes
    -- (GIN, GiST, ...) have no SQLite equivalent and stay on Postgres.
    IF coalesce((options ->> 'indexes')::boolean, true) THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'name', pgturso._turso_name(i.indexrelid),
                   'unique', i.indisunique,
                   'columns', (SELECT jsonb_agg(a.attname ORDER BY k.ord)
                               FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
                               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum))
                   ORDER BY i.indexrelid::regclass::text), '[]')
        INTO indexes
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_am am ON am.oid = ic.relam
        WHERE i.indrelid = rel AND NOT i.indisprimary AND i.indisvalid AND i.indpred IS NULL
          AND am.amname IN ('btree', 'hash')
          AND NOT (0 = ANY (i.indkey[0:i.indnkeyatts - 1]))
          AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid AND con.condeferrable);
    ELSE
        indexes := '[]';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._describe IS 'Private: a relation''s names, columns, key and indexes for its layout.';

-- What to select a relation's rows from: ONLY for a plain table (inheritance children are not tracked).
CREATE FUNCTION pgturso._row_source(rel regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN relkind = 'r' THEN 'ONLY ' ELSE '' END || rel::text FROM pg_class WHERE oid = rel $$;
COMMENT ON FUNCTION pgturso._row_source IS 'Private: FROM clause text for a tracked relation''s rows.';

-- Install (or, after a schema change, replace) the capture function, and the triggers if missing.
CREATE FUNCTION pgturso._install_capture(rel regclass, table_id integer, plan jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_function text := pgturso._capture_function_name(table_id);
    v_kind "char";
    v_part regclass;
BEGIN
    SELECT relkind INTO v_kind FROM pg_class WHERE oid = rel;
    IF v_kind = 'm' THEN
        EXECUTE plan ->> 'refresh_function_sql';
        EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I(regclass, boolean) FROM PUBLIC', v_function || '_refresh');
        RETURN;
    END IF;
    EXECUTE plan ->> 'capture_function_sql';
    EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I() FROM PUBLIC', v_function);
    -- A partitioned table: statements on the parent fire its triggers, statements on a partition fire the
    -- partition's; every partition at any depth gets the same capture function.
    FOR v_part IN SELECT p.relid FROM (SELECT rel AS relid UNION SELECT relid FROM pg_partition_tree(rel)) p
                  WHERE NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p.relid
                                    AND g.tgname = 'pgturso_capture_insert')
    LOOP
        EXECUTE format('CREATE TRIGGER pgturso_capture_insert AFTER INSERT ON %s '
                       'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()',
                       v_part, v_function);
        EXECUTE format('CREATE TRIGGER pgturso_capture_update AFTER UPDATE ON %s '
                       'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', v_part, v_function);
        EXECUTE format('CREATE TRIGGER pgturso_capture_delete AFTER DELETE ON %s '
                       'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()',
                       v_part, v_function);
        IF v_part = rel THEN
            EXECUTE format('CREATE TRIGGER pgturso_capture_truncate AFTER TRUNCATE ON %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', v_part, v_function);
        ELSE
            -- Truncating one partition deletes only its rows on Turso: send their keys before they go.
            EXECUTE format('CREATE TRIGGER pgturso_capture_truncate BEFORE TRUNCATE ON %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION pgturso._capture_partition_truncate(%s)',
                           v_part, table_id);
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._install_capture IS 'Private: (re)create a tracked relation''s capture.';

-- Truncating a partition of a tracked partitioned table: its rows' keys as delete events.
CREATE FUNCTION pgturso._capture_partition_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = TG_ARGV[0]::integer ORDER BY l.id DESC LIMIT 1;
    EXECUTE pgturso._plan_rows(v_layout_id, v_spec, TG_RELID::regclass::text, 'D');
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgturso._capture_partition_truncate IS
    'Private: trigger sending the keys of a partition''s rows as deletes before TRUNCATE removes them.';

CREATE FUNCTION pgturso._drop_capture_functions(table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := pgturso._capture_function_name(table_id);
BEGIN
    IF to_regprocedure(format('pgturso.%I()', v_name)) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION pgturso.%I()', v_name);
    END IF;
    IF to_regprocedure(format('pgturso.%I(regclass, boolean)', v_name || '_refresh')) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION pgturso.%I(regclass, boolean)', v_name || '_refresh');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._drop_capture_functions IS 'Private: drop a tracked relation''s generated functions.';

-- Remove the capture of a tracked relation (and its partitions).
CREATE FUNCTION pgturso._remove_capture(rel regclass, table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_part regclass;
    v_trigger text;
BEGIN
    FOR v_part IN SELECT g.tgrelid::regclass FROM pg_trigger g
                  WHERE g.tgname = 'pgturso_capture_insert'
                    AND g.tgfoid = format('pgturso.%I', pgturso._capture_function_name(table_id))::regproc
    LOOP
        FOREACH v_trigger IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgturso_capture_' || v_trigger, v_part);
        END LOOP;
    END LOOP;
    PERFORM pgturso._drop_capture_functions(table_id);
END
$$;
COMMENT ON FUNCTION pgturso._remove_capture IS 'Private: drop a tracked relation''s triggers and functions.';

-- Tables dropped in Postgres stay in tracked_table until the worker delivered their last changes.
CREATE FUNCTION pgturso._forget_dropped() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM pgturso.tracked_table t
    WHERE t.dropped_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
                      WHERE l.table_id = t.id)
$$;
COMMENT ON FUNCTION pgturso._forget_dropped IS 'Private: forget dropped tables whose changes were all delivered.';

-- The chunked copy of a table's existing rows, driven by the worker, while capture already runs.
CREATE FUNCTION pgturso._start_copy(table_id integer) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgturso.tracked_table t
    SET copy_state = 'copying', copy_after = NULL, copy_rows_done = 0, copy_started_at = now(),
        copy_finished_at = NULL,
        copy_rows_total = (SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_class c
                           WHERE c.oid IN (SELECT t.relid UNION SELECT relid FROM pg_partition_tree(t.relid)))
    WHERE t.id = table_id
$$;

-- One chunk: the next max_rows rows in key order, locked FOR SHARE while their upserts are queued, so a
-- write to one of them either committed before (and is read here) or waits and lands after. Called by the
-- worker in its own READ COMMITTED transaction; returns the rows copied, or NULL when no copy was pending.
CREATE FUNCTION pgturso._copy_chunk(table_id integer, max_rows integer) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_rel regclass;
    v_after text[];
    v_layout_id integer;
    v_spec jsonb;
    v_rows bigint;
    v_last text[];
    v_sql jsonb;
BEGIN
    SELECT t.relid, t.copy_after INTO v_rel, v_after FROM pgturso.tracked_table t
    WHERE t.id = table_id AND t.copy_state = 'copying' AND t.dropped_at IS NULL
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = _copy_chunk.table_id ORDER BY l.id DESC LIMIT 1;
    v_sql := pgturso._plan_copy_chunk(v_layout_id, v_spec, pgturso._row_source(v_rel), max_rows);
    EXECUTE v_sql ->> 'bound' INTO v_last USING v_after;
    EXECUTE v_sql ->> 'chunk' INTO v_rows USING v_after, v_last;
    -- v_last is where this chunk ended; NULL when it took everything that was left.
    UPDATE pgturso.tracked_table t
    SET copy_after = v_last,
        copy_rows_done = t.copy_rows_done + v_rows,
        copy_rows_total = greatest(t.copy_rows_total, t.copy_rows_done + v_rows),
        copy_state = CASE WHEN v_last IS NULL THEN 'done' ELSE 'copying' END,
        copy_finished_at = CASE WHEN v_last IS NULL THEN now() END
    WHERE t.id = table_id;
    IF v_last IS NULL THEN
        UPDATE pgturso.tracked_table t SET copy_rows_total = t.copy_rows_done WHERE t.id = table_id;
    END IF;
    IF v_rows > 0 THEN
        PERFORM pg_notify('pgturso', '');
    END IF;
    RETURN v_rows;
END
$$;

CREATE FUNCTION pgturso.track_table(
    rel regclass,
    target_table text DEFAULT NULL,
    key_columns text[] DEFAULT NULL,
    indexes boolean DEFAULT true,
    drop_target boolean DEFAULT false,
    target text DEFAULT 'default'
) RETURNS void
LANGUAGE plpgsql
-- The initial copy encodes values exactly as the capture functions do: the settings placeholder below is
-- replaced by pgturso.capture.CAPTURE_SETTINGS when extension/build.py builds the script.
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_kind "char";
    v_parent regclass;
    v_options jsonb;
    v_desc record;
    v_table_id integer;
    v_layout_id integer;
    v_plan jsonb;
    v_dup boolean;
    v_small bigint;
BEGIN
    SELECT c.relkind, c.relispartition INTO v_kind FROM pg_class c WHERE c.oid = rel;
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p', 'm') THEN
        RAISE EXCEPTION 'pgturso: % is not a table (relkind %)', rel, v_kind
            USING HINT = 'track_table takes an ordinary table, a partitioned table or a materialized view; '
                         'views and other relations cannot be tracked.';
    END IF;
    SELECT i.inhparent INTO v_parent FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhrelid = rel AND c.relispartition;
    IF v_parent IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % is a partition of %', rel, v_parent
            USING HINT = format('Track the partitioned table: SELECT pgturso.track_table(%L). '
                                'Its partitions, present and future, all feed one Turso table.',
                                pgturso._partition_root(rel)::text);
    END IF;
    PERFORM pgturso._forget_dropped();
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.relid = rel) THEN
        RAISE EXCEPTION 'pgturso: table % is already tracked', rel
            USING HINT = 'Call pgturso.untrack_table(''' || rel::text || ''') first to track it afresh.';
    END IF;

    -- Installing the capture triggers takes this lock anyway; writers wait only until this short
    -- transaction commits (the rows are copied afterwards, in chunks). A materialized view changes only by
    -- REFRESH, which pgturso follows from here on (see 30_*.sql).
    IF v_kind <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    END IF;

    v_options := jsonb_strip_nulls(jsonb_build_object(
        'target_table', track_table.target_table, 'key_columns', track_table.key_columns,
        'indexes', CASE WHEN NOT track_table.indexes THEN false END,
        'drop_target', CASE WHEN track_table.drop_target THEN true END));
    v_desc := pgturso._describe(rel, v_options);
    IF v_desc.key_columns IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % has no primary key and no unique index over NOT NULL columns', rel
            USING HINT = format('Add one (ALTER TABLE %s ADD PRIMARY KEY (...)), or name columns whose values '
                                'are unique: pgturso.track_table(%L, key_columns => ARRAY[...]).', rel, rel::text);
    END IF;
    IF track_table.key_columns IS NOT NULL THEN
        -- Nothing in Postgres keeps these unique later: say so now if they are not unique already.
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s GROUP BY %s HAVING count(*) > 1)', rel,
                       (SELECT string_agg(quote_ident(k), ', ') FROM unnest(track_table.key_columns) AS k))
            INTO v_dup;
        IF v_dup THEN
            RAISE EXCEPTION 'pgturso: key columns % of % hold duplicate values', track_table.key_columns, rel
                USING HINT = 'Pass key_columns that are unique, or better, add a unique index over them.';
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = track_table.target) THEN
        RAISE EXCEPTION 'pgturso: there is no target %', track_table.target
            USING HINT = 'Create it first: SELECT pgturso.add_target(''name'', ''libsql://...'', ''token'').';
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t
               WHERE t.target = track_table.target
                 AND pgturso._sqlite_name(t.target_table) = pgturso._sqlite_name(v_desc.target_table)) THEN
        RAISE EXCEPTION 'pgturso: another tracked table already replicates to Turso table "%"', v_desc.target_table
            USING HINT = 'Pass a different target_table => ''name'' to pgturso.track_table (or, if that table was '
                         'dropped, let the worker deliver its last changes first).';
    END IF;

    INSERT INTO pgturso.tracked_table (relid, target, target_table, options)
    VALUES (rel, track_table.target, v_desc.target_table, v_options) RETURNING id INTO v_table_id;
    INSERT INTO pgturso.layout (table_id, spec) VALUES (v_table_id, '{}') RETURNING id INTO v_layout_id;
    v_plan := pgturso._plan_layout(v_layout_id, pgturso._row_source(rel), v_desc.source_table, v_desc.target_table,
                                   v_desc.columns, v_desc.key_columns, pgturso._capture_function_name(v_table_id),
                                   v_desc.indexes);
    UPDATE pgturso.layout SET spec = v_plan -> 'spec' WHERE id = v_layout_id;

    -- Create the Turso table and start capture now. The rows already there are copied by the worker in
    -- chunks of short transactions (pgturso._copy_chunk): writers are not held up by a long copy. A
    -- materialized view cannot lock rows and changes only by REFRESH: it is copied right here.
    INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (v_layout_id, 'C', 0);
    -- A small table is copied here, under the lock this transaction holds anyway: it is on Turso as soon as
    -- this commit is, and the worker has no copy to do.
    EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 10001) AS s', pgturso._row_source(rel))
        INTO v_small;
    IF v_kind = 'm' OR v_small <= 10000 THEN
        EXECUTE v_plan ->> 'snapshot_sql';
        UPDATE pgturso.tracked_table t SET copy_rows_done = v_small, copy_rows_total = v_small,
            copy_started_at = now(), copy_finished_at = now()
        WHERE t.id = v_table_id AND v_kind <> 'm';
    ELSE
        PERFORM pgturso._start_copy(v_table_id);
    END IF;
    PERFORM pgturso._install_capture(rel, v_table_id, v_plan);
    PERFORM pg_notify('pgturso', '');
END
$$;
COMMENT ON FUNCTION pgturso.track_table IS
    'Replicate a table, partitioned table or materialized view to Turso: create it there (with its indexes '
    'unless indexes => false), copy its rows, then send every committed change and schema change. '
    'target_table names it on Turso (default: the table name, schema.name outside public). key_columns '
    'names the key when the table has no primary key or unique index over NOT NULL columns. drop_target: '
    'DROP TABLE in Postgres drops the Turso table too (default: it stays). target: the named target '
    '(pgturso.add_target) whose worker delivers it.';

CREATE FUNCTION pgturso._partition_root(rel regclass) RETURNS regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT a FROM pg_partition_ancestors(rel) AS a ORDER BY pg_partition_root(rel) = a DESC LIMIT 1 $$;
COMMENT ON FUNCTION pgturso._partition_root IS 'Private: the topmost partitioned table above a partition.';

CREATE FUNCTION pgturso.resync_table(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_table_id integer;
    v_kind "char";
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    SELECT t.id, c.relkind INTO v_table_id, v_kind FROM pgturso.tracked_table t JOIN pg_class c ON c.oid = t.relid
    WHERE t.relid = rel AND t.dropped_at IS NULL;
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % is not tracked', rel
            USING HINT = format('Track it: SELECT pgturso.track_table(%L).', rel::text);
    END IF;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = v_table_id ORDER BY l.id DESC LIMIT 1;
    -- Recreate the Turso table empty, in order with the changes before and after, then copy it again.
    INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (v_layout_id, 'C', 0);
    IF v_kind = 'm' THEN
        EXECUTE pgturso._plan_rows(v_layout_id, v_spec, pgturso._row_source(rel), 'U');
    ELSE
        PERFORM pgturso._start_copy(v_table_id);
    END IF;
    PERFORM pg_notify('pgturso', '');
END
$$;
COMMENT ON FUNCTION pgturso.resync_table IS
    'Copy a tracked table to Turso afresh: its Turso table is recreated and refilled in chunks while '
    'changes keep flowing; progress in pgturso.status.';

CREATE FUNCTION pgturso.untrack_table(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table_id integer;
BEGIN
    SELECT id INTO v_table_id FROM pgturso.tracked_table WHERE relid = rel AND dropped_at IS NULL;
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % is not tracked', rel
            USING HINT = 'SELECT relid FROM pgturso.tracked_table lists the tracked tables.';
    END IF;
    PERFORM pgturso._remove_capture(rel, v_table_id);
    DELETE FROM pgturso.outbox o USING pgturso.layout l WHERE o.layout_id = l.id AND l.table_id = v_table_id;
    DELETE FROM pgturso.tracked_table WHERE id = v_table_id;
END
$$;
COMMENT ON FUNCTION pgturso.untrack_table IS
    'Stop replicating a table and discard its undelivered changes; the Turso table is left as it is.';

CREATE FUNCTION pgturso.refresh_materialized_view(rel regclass, concurrently boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_table_id integer;
BEGIN
    SELECT t.id INTO v_table_id FROM pgturso.tracked_table t JOIN pg_class c ON c.oid = t.relid
    WHERE t.relid = rel AND t.dropped_at IS NULL AND c.relkind = 'm';
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: % is not a tracked materialized view', rel
            USING HINT = format('Track it first: SELECT pgturso.track_table(%L).', rel::text);
    END IF;
    -- The event trigger leaves this REFRESH to the function, which sends the difference only.
    PERFORM set_config('pgturso.refreshing', rel::oid::text, true);
    EXECUTE format('SELECT pgturso.%I($1, $2)', pgturso._capture_function_name(v_table_id) || '_refresh')
        USING rel, $2;  -- $2: the concurrently argument (a keyword, so not usable by name here)
    PERFORM set_config('pgturso.refreshing', '', true);
END
$$;
COMMENT ON FUNCTION pgturso.refresh_materialized_view IS
    'REFRESH MATERIALIZED VIEW [CONCURRENTLY] a tracked view and send Turso only the rows that changed.';

REVOKE ALL ON FUNCTION pgturso.track_table(regclass, text, text[], boolean, boolean, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.untrack_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.resync_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.refresh_materialized_view(regclass, boolean) FROM PUBLIC;


-- extension/sql/30_schema_changes.sql
-- Schema changes of tracked tables, captured by event triggers in the same
-- transaction as the DDL: a change becomes a new layout, a regenerated capture function and an 'A' event, so
-- Turso applies it exactly between the changes before it and the changes after it (docs/schema-changes.md).

-- Bring a tracked table's layout, capture and partitions up to date with the catalog, after DDL.
CREATE FUNCTION pgturso._follow_schema(table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_rel regclass;
    v_options jsonb;
    v_old_id integer;
    v_old_spec jsonb;
    v_desc record;
    v_change jsonb;
    v_new_id integer;
    v_plan jsonb;
    v_recopy boolean;
    v_part regclass;
BEGIN
    SELECT t.relid, t.options INTO v_rel, v_options FROM pgturso.tracked_table t WHERE t.id = table_id;
    SELECT l.id, l.spec INTO v_old_id, v_old_spec FROM pgturso.layout l
    WHERE l.table_id = _follow_schema.table_id ORDER BY l.id DESC LIMIT 1;
    v_desc := pgturso._describe(v_rel, v_options);
    IF v_desc.key_columns IS NULL THEN
        RAISE EXCEPTION 'pgturso: this change leaves tracked table % without a key to replicate by', v_rel
            USING HINT = 'Keep a primary key or a unique index over NOT NULL columns (add the new one first), '
                         'or stop replicating the table first: SELECT pgturso.untrack_table(''' || v_rel::text
                         || ''').';
    END IF;
    v_change := pgturso._plan_change(v_old_spec, v_desc.source_table, v_desc.target_table, v_desc.columns,
                                     v_desc.key_columns, v_desc.indexes);
    IF (v_change ->> 'changed')::boolean THEN
        IF v_desc.target_table IS DISTINCT FROM v_old_spec ->> 'target_table' AND EXISTS (
               SELECT 1 FROM pgturso.tracked_table t
               WHERE pgturso._sqlite_name(t.target_table) = pgturso._sqlite_name(v_desc.target_table)
                 AND t.target = (SELECT o.target FROM pgturso.tracked_table o WHERE o.id = _follow_schema.table_id)
                 AND t.id <> _follow_schema.table_id) THEN
            RAISE EXCEPTION 'pgturso: renaming % would make it replicate to Turso table "%", which another '
                            'tracked table uses', v_rel, v_desc.target_table
                USING HINT = 'Choose another name, or untrack one of the tables.';
        END IF;
        v_recopy := (v_change ->> 'recopy')::boolean;
        IF NOT v_recopy AND jsonb_array_length(v_change -> 'added') > 0 AND EXISTS (
               SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = v_rel AND a.attname::text IN (SELECT jsonb_array_elements_text(v_change -> 'added'))
                 AND (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '')) THEN
            -- Postgres filled the new columns of existing rows (a default): Turso cannot compute them.
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', pgturso._row_source(v_rel)) INTO v_recopy;
        END IF;
        INSERT INTO pgturso.layout (table_id, spec) VALUES (table_id, v_change -> 'spec') RETURNING id INTO v_new_id;
        v_plan := pgturso._plan_layout(v_new_id, pgturso._row_source(v_rel), v_desc.source_table,
                                       v_desc.target_table, v_desc.columns, v_desc.key_columns,
                                       pgturso._capture_function_name(table_id), v_desc.indexes);
        INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)
        VALUES (v_new_id, 'A', 0, jsonb_build_object('from', v_old_id, 'recopy', v_recopy)::text);
        IF v_recopy THEN
            EXECUTE v_plan ->> 'snapshot_sql';
        END IF;
        UPDATE pgturso.tracked_table t SET target_table = v_desc.target_table WHERE t.id = table_id;
        v_old_id := v_new_id;
        v_old_spec := v_change -> 'spec';
    ELSE
        v_plan := NULL;
    END IF;

    -- Partitions: detached ones take their rows away from the table, new or attached ones bring theirs.
    FOR v_part IN SELECT g.tgrelid::regclass FROM pg_trigger g
                  WHERE g.tgname = 'pgturso_capture_insert' AND g.tgrelid <> v_rel
                    AND g.tgfoid::regproc::text = 'pgturso.' || pgturso._capture_function_name(table_id)
                    AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(v_rel) p WHERE p.relid = g.tgrelid)
    LOOP
        EXECUTE pgturso._plan_rows(v_old_id, v_old_spec, v_part::text, 'D');
        EXECUTE format('DROP TRIGGER pgturso_capture_insert ON %1$s; DROP TRIGGER pgturso_capture_update ON %1$s; '
                       'DROP TRIGGER pgturso_capture_delete ON %1$s; DROP TRIGGER pgturso_capture_truncate ON %1$s',
                       v_part);
    END LOOP;
    FOR v_part IN SELECT p.relid FROM pg_partition_tree(v_rel) p
                  WHERE p.isleaf AND p.relid <> v_rel
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p.relid
                                    AND g.tgname = 'pgturso_capture_insert')
    LOOP
        IF v_plan IS NULL THEN
            v_plan := pgturso._plan_layout(v_old_id, pgturso._row_source(v_rel), v_desc.source_table,
                                           v_desc.target_table, v_desc.columns, v_desc.key_columns,
                                           pgturso._capture_function_name(table_id), v_desc.indexes);
        END IF;
        EXECUTE pgturso._plan_rows(v_old_id, v_old_spec, v_part::text, 'U');
    END LOOP;
    IF v_plan IS NOT NULL THEN
        PERFORM pgturso._install_capture(v_rel, table_id, v_plan);
        PERFORM pg_notify('pgturso', '');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._follow_schema IS
    'Private: after DDL, give a tracked table a new layout, capture function and Turso DDL event if it changed.';

-- Send a tracked relation to Turso afresh: recreate its table there, then every row.
CREATE FUNCTION pgturso._recopy(table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_rel regclass;
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    SELECT t.relid INTO v_rel FROM pgturso.tracked_table t WHERE t.id = table_id;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = _recopy.table_id ORDER BY l.id DESC LIMIT 1;
    INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)
    VALUES (v_layout_id, 'A', 0, jsonb_build_object('from', v_layout_id, 'recopy', true)::text);
    EXECUTE pgturso._plan_rows(v_layout_id, v_spec, pgturso._row_source(v_rel), 'U');
    PERFORM pg_notify('pgturso', '');
END
$$;
COMMENT ON FUNCTION pgturso._recopy IS 'Private: recreate a tracked relation on Turso and send all its rows again.';

CREATE FUNCTION pgturso._on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table_id integer;
BEGIN
    -- Cheap for databases and DDL that concern no tracked table.
    IF to_regclass('pgturso.tracked_table') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE dropped_at IS NULL) THEN
        RETURN;
    END IF;
    FOR v_table_id IN
        SELECT DISTINCT t.id
        FROM (SELECT coalesce(i.indrelid, c.oid) AS rel
              FROM pg_event_trigger_ddl_commands() d
              JOIN pg_class c ON c.oid = d.objid
              LEFT JOIN pg_index i ON i.indexrelid = c.oid
              WHERE d.classid = 'pg_class'::regclass) AS x
        JOIN pgturso.tracked_table t ON t.dropped_at IS NULL AND (
             t.relid = x.rel OR t.relid = pg_partition_root(x.rel)
             OR EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = x.rel AND g.tgname = 'pgturso_capture_insert'
                        AND g.tgfoid::regproc::text = 'pgturso.' || pgturso._capture_function_name(t.id)))
        ORDER BY t.id
    LOOP
        PERFORM pgturso._follow_schema(v_table_id);
    END LOOP;
    -- A plain REFRESH MATERIALIZED VIEW of a tracked view: the old contents are gone, so send it afresh.
    -- (pgturso.refresh_materialized_view sends only the difference and marks its own REFRESH.)
    FOR v_table_id IN
        SELECT t.id FROM pg_event_trigger_ddl_commands() d
        JOIN pgturso.tracked_table t ON t.relid = d.objid AND t.dropped_at IS NULL
        WHERE d.command_tag = 'REFRESH MATERIALIZED VIEW'
          AND coalesce(current_setting('pgturso.refreshing', true), '') <> d.objid::text
    LOOP
        PERFORM pgturso._recopy(v_table_id);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._on_ddl_command_end IS 'Private: event trigger following DDL on tracked tables.';

CREATE FUNCTION pgturso._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row record;
    v_tracked_dropped boolean := false;
BEGIN
    IF to_regclass('pgturso.tracked_table') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE dropped_at IS NULL) THEN
        RETURN;
    END IF;
    -- DROP TABLE (or DROP MATERIALIZED VIEW, DROP SCHEMA ... CASCADE) of a tracked table: the changes made
    -- before it are still delivered, then the table is untracked; its Turso table stays unless drop_target.
    FOR v_row IN
        SELECT t.id, t.options FROM pg_event_trigger_dropped_objects() d
        JOIN pgturso.tracked_table t ON t.relid = d.objid AND t.dropped_at IS NULL
        WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
    LOOP
        INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)
        SELECT max(l.id), 'X', 0,
               jsonb_build_object('drop_target', coalesce((v_row.options ->> 'drop_target')::boolean, false))::text
        FROM pgturso.layout l WHERE l.table_id = v_row.id;
        PERFORM pgturso._drop_capture_functions(v_row.id);
        UPDATE pgturso.tracked_table SET dropped_at = now() WHERE id = v_row.id;
        PERFORM pg_notify('pgturso', '');
        v_tracked_dropped := true;
    END LOOP;
    -- DROP INDEX (or a dropped unique constraint's index): the tables that had it on Turso follow.
    FOR v_row IN
        SELECT DISTINCT t.id FROM pg_event_trigger_dropped_objects() d
        JOIN pgturso.layout l ON l.spec -> 'indexes' @> jsonb_build_array(jsonb_build_object('name',
             CASE WHEN d.schema_name = 'public' THEN d.object_name ELSE d.schema_name || '.' || d.object_name END))
        JOIN pgturso.tracked_table t ON t.id = l.table_id AND t.dropped_at IS NULL
        WHERE d.object_type = 'index'
          AND l.id = (SELECT max(l2.id) FROM pgturso.layout l2 WHERE l2.table_id = t.id)
          AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)
    LOOP
        PERFORM pgturso._follow_schema(v_row.id);
    END LOOP;
    IF NOT v_tracked_dropped AND EXISTS (
           SELECT 1 FROM pg_event_trigger_dropped_objects() tbl
           JOIN pg_event_trigger_dropped_objects() trg
             ON trg.object_type = 'trigger' AND trg.address_names[3] = 'pgturso_capture_insert'
            AND trg.address_names[1] = tbl.address_names[1] AND trg.address_names[2] = tbl.address_names[2]
           WHERE tbl.object_type = 'table') THEN
        -- A partition of a tracked table: its rows would vanish from Turso's copy unseen.
        RAISE EXCEPTION 'pgturso: cannot drop a partition of a tracked partitioned table'
            USING HINT = 'Detach it first (ALTER TABLE parent DETACH PARTITION part): pgturso then deletes its '
                         'rows on Turso; drop it afterwards.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._on_sql_drop IS 'Private: event trigger following DROP of tracked tables.';

CREATE EVENT TRIGGER pgturso_ddl_command_end ON ddl_command_end EXECUTE FUNCTION pgturso._on_ddl_command_end();
CREATE EVENT TRIGGER pgturso_sql_drop ON sql_drop EXECUTE FUNCTION pgturso._on_sql_drop();

REVOKE ALL ON FUNCTION pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_rows(integer, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._follow_schema(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._recopy(integer) FROM PUBLIC;


-- extension/sql/35_targets.sql
-- Named targets (pgturso.target): different tables to different Turso databases, each delivered
-- independently by its own worker (pgturso-worker run --target NAME).

CREATE FUNCTION pgturso.add_target(name text, url text, auth_token text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF url !~ '^(https?|libsql)://|^file:' THEN
        RAISE EXCEPTION 'pgturso: % is not a Turso URL', url
            USING HINT = 'Use http://, https://, libsql:// (Turso Cloud) or file:PATH.';
    END IF;
    INSERT INTO pgturso.target AS t (name, url, auth_token) VALUES (add_target.name, add_target.url, add_target.auth_token)
    ON CONFLICT ON CONSTRAINT target_pkey DO UPDATE SET url = excluded.url, auth_token = excluded.auth_token;
    INSERT INTO pgturso.delivery_state (target) VALUES (add_target.name) ON CONFLICT DO NOTHING;
END
$$;
COMMENT ON FUNCTION pgturso.add_target IS
    'Create or change a named target: track tables to it with track_table(..., target => name) and run '
    'pgturso-worker run --target name. The token is stored where only the extension owner can read it.';

CREATE FUNCTION pgturso.remove_target(name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF remove_target.name = 'default' THEN
        RAISE EXCEPTION 'pgturso: the default target cannot be removed'
            USING HINT = 'Point it elsewhere with pgturso.url instead.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = remove_target.name) THEN
        RAISE EXCEPTION 'pgturso: tables are still tracked to target %', remove_target.name
            USING HINT = 'Untrack them first: SELECT relid FROM pgturso.tracked_table WHERE target = ''' ||
                         remove_target.name || '''.';
    END IF;
    DELETE FROM pgturso.target t WHERE t.name = remove_target.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgturso: there is no target %', remove_target.name
            USING HINT = 'SELECT name FROM pgturso.target lists them.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso.remove_target IS 'Remove a named target that no table is tracked to.';

REVOKE ALL ON FUNCTION pgturso.add_target(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.remove_target(text) FROM PUBLIC;
REVOKE ALL ON pgturso.target FROM PUBLIC;


-- extension/sql/40_status.sql
-- What the worker did and is doing, for operators: pgturso.status, and skipping a change Turso refuses.

-- Each target's delivering worker's state; updated in the transaction that marks events delivered.
CREATE TABLE pgturso.delivery_state (
    target text PRIMARY KEY DEFAULT 'default' REFERENCES pgturso.target (name) ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'never started'
        CHECK (status IN ('never started', 'delivering', 'idle', 'retrying', 'blocked', 'stopped')),
    worker text,
    started_at timestamptz,
    last_delivered_at timestamptz,
    transactions_delivered bigint NOT NULL DEFAULT 0,
    rows_delivered bigint NOT NULL DEFAULT 0,
    retries bigint NOT NULL DEFAULT 0,
    last_error text,
    last_error_at timestamptz,
    last_error_table text,
    last_error_txid xid8,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgturso.delivery_state DEFAULT VALUES;
COMMENT ON TABLE pgturso.delivery_state IS 'Per target: the delivering worker''s state, errors and counters.';

CREATE TABLE pgturso.table_state (
    table_id integer PRIMARY KEY REFERENCES pgturso.tracked_table (id) ON DELETE CASCADE,
    rows_delivered bigint NOT NULL DEFAULT 0,
    last_delivered_at timestamptz
);
COMMENT ON TABLE pgturso.table_state IS 'Rows delivered per tracked table.';

CREATE TABLE pgturso.skipped_transaction (
    txid xid8 PRIMARY KEY,
    skipped_at timestamptz NOT NULL DEFAULT now(),
    skipped_by name NOT NULL DEFAULT current_user,
    reason text NOT NULL,
    events integer NOT NULL,
    rows bigint NOT NULL,
    tables text[] NOT NULL,
    error text
);
COMMENT ON TABLE pgturso.skipped_transaction IS
    'Source transactions an operator chose not to deliver (pgturso.skip_transaction), with why and by whom.';

CREATE VIEW pgturso.status AS
SELECT t.relid AS table_name,
       t.target,
       t.target_table,
       coalesce(p.events, 0) AS pending_events,
       coalesce(p.rows, 0) AS pending_rows,
       p.oldest AS oldest_pending_at,
       now() - p.oldest AS lag,
       s.last_delivered_at,
       coalesce(s.rows_delivered, 0) AS rows_delivered,
       t.copy_state,
       t.copy_rows_done,
       t.copy_rows_total,
       d.status AS worker_status,
       d.worker,
       d.retries AS worker_retries,
       d.last_error,
       d.last_error_at,
       d.last_error_table,
       d.last_error_txid
FROM pgturso.tracked_table t
JOIN pgturso.delivery_state d ON d.target = t.target
LEFT JOIN pgturso.table_state s ON s.table_id = t.id
LEFT JOIN LATERAL (
    SELECT count(*) AS events, sum(o.nrows) AS rows, min(o.captured_at) AS oldest
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    WHERE l.table_id = t.id
) p ON true;
COMMENT ON VIEW pgturso.status IS
    'Per tracked table: pending changes, lag, rows delivered, initial copy progress (rows queued of the '
    'estimated total); and its target''s worker status and last error.';

CREATE FUNCTION pgturso.skip_transaction(txid xid8, reason text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_events integer;
    v_rows bigint;
    v_tables text[];
BEGIN
    IF coalesce(trim(reason), '') = '' THEN
        RAISE EXCEPTION 'pgturso: skipping a transaction needs a reason'
            USING HINT = 'Say why, e.g. pgturso.skip_transaction(''1234'', ''row violates a Turso-only check'').';
    END IF;
    SELECT count(*), coalesce(sum(o.nrows), 0), array_agg(DISTINCT l.spec ->> 'source_table')
    INTO v_events, v_rows, v_tables
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    WHERE o.txid = skip_transaction.txid;
    IF v_events = 0 THEN
        RAISE EXCEPTION 'pgturso: transaction % has nothing pending', txid
            USING HINT = 'SELECT last_error_txid FROM pgturso.status names the transaction the worker is stuck on.';
    END IF;
    INSERT INTO pgturso.skipped_transaction (txid, reason, events, rows, tables, error)
    VALUES (skip_transaction.txid, reason, v_events, v_rows, v_tables,
            (SELECT string_agg(d.last_error, '; ') FROM pgturso.delivery_state d
             WHERE d.last_error_txid = skip_transaction.txid));
    DELETE FROM pgturso.outbox o WHERE o.txid = skip_transaction.txid;
    RAISE WARNING 'pgturso: skipped source transaction % (% rows in %): Turso now differs from Postgres for them',
        txid, v_rows, array_to_string(v_tables, ', ')
        USING HINT = 'Fix the rows by hand on Turso, or untrack and track the table again to recopy it.';
    PERFORM pg_notify('pgturso', '');
    RETURN v_events;
END
$$;
COMMENT ON FUNCTION pgturso.skip_transaction IS
    'Deliberately drop one pending source transaction (one that Turso refuses); recorded in '
    'pgturso.skipped_transaction. Turso then lacks its changes: repair or recopy the tables it touched.';

REVOKE ALL ON FUNCTION pgturso.skip_transaction(xid8, text) FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;


-- extension/sql/45_wait_for_sync.sql
-- Read-your-writes for applications that write to Postgres and read from Turso.

CREATE FUNCTION pgturso.wait_for_sync(timeout interval DEFAULT '30 seconds') RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_snapshot pg_snapshot := pg_current_snapshot();
    v_deadline timestamptz := clock_timestamp() + timeout;
    v_upto bigint;
    v_pause float8 := 0.002;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: wait_for_sync cannot wait for this transaction''s own writes'
            USING HINT = 'They reach Turso only after COMMIT: call pgturso.wait_for_sync() after committing.';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgturso: wait_for_sync needs READ COMMITTED (it must see deliveries as they happen)'
            USING HINT = 'Call it outside an explicit REPEATABLE READ or SERIALIZABLE transaction.';
    END IF;
    SELECT max(id) INTO v_upto FROM pgturso.outbox;
    LOOP
        -- Done when no event that was committed when we were called is still waiting for Turso.
        IF NOT EXISTS (SELECT 1 FROM pgturso.outbox o
                       WHERE o.id <= v_upto AND pg_visible_in_snapshot(o.txid, v_snapshot)) THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(v_pause);
        v_pause := least(v_pause * 2, 0.05);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso.wait_for_sync IS
    'Wait until every change committed before the call is on Turso; true when it is, false on timeout. '
    'Call it after COMMIT, in READ COMMITTED. Any role may call it.';
GRANT EXECUTE ON FUNCTION pgturso.wait_for_sync(interval) TO PUBLIC;


-- extension/sql/50_sync.sql
-- Delivery without a separate process: one pass of the worker's own code, inside Postgres.

CREATE FUNCTION pgturso.sync(url text DEFAULT NULL, dsn text DEFAULT NULL, target text DEFAULT NULL)
RETURNS integer
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.in_database import sync
return sync(plpy, dsn, url, target)
$$;
COMMENT ON FUNCTION pgturso.sync IS
    'Run one delivery pass now (the worker''s code, in this backend); returns the outbox events delivered, '
    '0 when another worker holds the delivery lock. url defaults to pgturso.url; dsn to this database over '
    'the Unix socket. Schedule it with pg_cron, or run pgturso-worker for continuous, low-latency delivery.';
REVOKE ALL ON FUNCTION pgturso.sync(text, text, text) FROM PUBLIC;
