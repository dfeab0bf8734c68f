-- track_table / untrack_table: install and remove a table's capture.

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

CREATE FUNCTION pgturso.track_table(rel regclass, target_table text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
-- The initial copy encodes values exactly as the capture functions do (pgturso.capture.CAPTURE_SETTINGS).
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
AS $$
DECLARE
    v_kind "char";
    v_schema name;
    v_name name;
    v_keys text[];
    v_columns jsonb;
    v_table_id integer;
    v_layout_id integer;
    v_plan jsonb;
    v_function text;
BEGIN
    SELECT c.relkind, n.nspname, c.relname INTO v_kind, v_schema, v_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    IF v_kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION 'pgturso: % is not a table (relkind %)', rel, v_kind
            USING HINT = 'track_table takes an ordinary table; views and other relations cannot be tracked.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.relid = rel) THEN
        RAISE EXCEPTION 'pgturso: table % is already tracked', rel
            USING HINT = 'Call pgturso.untrack_table(''' || rel::text || ''') first to track it afresh.';
    END IF;

    -- Writers wait from here until commit, so the copy below and the capture start at the same point.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);

    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary;
    IF v_keys IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % has no primary key', rel
            USING HINT = format('Add one (ALTER TABLE %s ADD PRIMARY KEY (...)), then track the table.', rel);
    END IF;

    SELECT jsonb_agg(jsonb_build_object(
               'name', a.attname,
               'pg_type', format_type(a.atttypid, a.atttypmod),
               'base_type', bt.typname,
               'typmod', CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
               'not_null', a.attnotnull) ORDER BY a.attnum)
    INTO v_columns
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    JOIN pg_type bt ON bt.oid = pgturso._base_type(a.atttypid)
    WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;

    target_table := coalesce(target_table,
                             CASE WHEN v_schema = 'public' THEN v_name ELSE v_schema || '.' || v_name END);
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target_table = track_table.target_table) THEN
        RAISE EXCEPTION 'pgturso: another tracked table already replicates to Turso table "%"', target_table
            USING HINT = 'Pass a different target_table => ''name'' to pgturso.track_table.';
    END IF;

    INSERT INTO pgturso.tracked_table (relid, target_table) VALUES (rel, target_table) RETURNING id INTO v_table_id;
    INSERT INTO pgturso.layout (table_id, spec) VALUES (v_table_id, '{}') RETURNING id INTO v_layout_id;
    v_function := pgturso._capture_function_name(v_table_id);
    v_plan := pgturso._plan_table(v_layout_id, rel::text, format('%I.%I', v_schema, v_name), target_table,
                                  v_columns, v_keys, v_function);
    UPDATE pgturso.layout SET spec = v_plan -> 'spec' WHERE id = v_layout_id;

    -- Create the Turso table, then copy the rows, then capture: all in this transaction's order.
    INSERT INTO pgturso.outbox (layout_id, op, nrows) VALUES (v_layout_id, 'C', 0);
    EXECUTE v_plan ->> 'snapshot_sql';
    EXECUTE v_plan ->> 'capture_function_sql';
    EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I() FROM PUBLIC', v_function);
    EXECUTE format('CREATE TRIGGER pgturso_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()',
                   rel, v_function);
    EXECUTE format('CREATE TRIGGER pgturso_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', rel, v_function);
    EXECUTE format('CREATE TRIGGER pgturso_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()',
                   rel, v_function);
    EXECUTE format('CREATE TRIGGER pgturso_capture_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', rel, v_function);
    PERFORM pg_notify('pgturso', '');
END
$$;
COMMENT ON FUNCTION pgturso.track_table IS
    'Replicate a table to Turso: create it there, copy its rows, then send every committed change. '
    'target_table names it on Turso (default: the table name, schema-qualified outside public).';

CREATE FUNCTION pgturso.untrack_table(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table_id integer;
BEGIN
    SELECT id INTO v_table_id FROM pgturso.tracked_table WHERE relid = rel;
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % is not tracked', rel
            USING HINT = 'SELECT relid FROM pgturso.tracked_table lists the tracked tables.';
    END IF;
    EXECUTE format('DROP TRIGGER pgturso_capture_insert ON %s', rel);
    EXECUTE format('DROP TRIGGER pgturso_capture_update ON %s', rel);
    EXECUTE format('DROP TRIGGER pgturso_capture_delete ON %s', rel);
    EXECUTE format('DROP TRIGGER pgturso_capture_truncate ON %s', rel);
    EXECUTE format('DROP FUNCTION pgturso.%I()', pgturso._capture_function_name(v_table_id));
    DELETE FROM pgturso.outbox o USING pgturso.layout l WHERE o.layout_id = l.id AND l.table_id = v_table_id;
    DELETE FROM pgturso.tracked_table WHERE id = v_table_id;
END
$$;
COMMENT ON FUNCTION pgturso.untrack_table IS
    'Stop replicating a table and discard its undelivered changes; the Turso table is left as it is.';

REVOKE ALL ON FUNCTION pgturso.track_table(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.untrack_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_table(integer, text, text, text, jsonb, text[], text) FROM PUBLIC;
