-- Schema changes of tracked tables, captured by event triggers in the same
-- transaction as the DDL: a change becomes a new layout, a regenerated capture function and an 'A' event, so
-- Turso applies it exactly between the changes before it and the changes after it (docs/schema-changes.md).

-- Bring a tracked table's layout, capture and partitions up to date with the catalog, after DDL.
CREATE OR REPLACE FUNCTION pgturso._follow_schema(table_id integer) RETURNS void
LANGUAGE plpgsql
@CAPTURE_SETTINGS@
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
CREATE OR REPLACE FUNCTION pgturso._recopy(table_id integer) RETURNS void
LANGUAGE plpgsql
@CAPTURE_SETTINGS@
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

CREATE OR REPLACE FUNCTION pgturso._on_ddl_command_end() RETURNS event_trigger
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

CREATE OR REPLACE FUNCTION pgturso._on_sql_drop() RETURNS event_trigger
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

DROP EVENT TRIGGER IF EXISTS pgturso_ddl_command_end;
DROP EVENT TRIGGER IF EXISTS pgturso_sql_drop;
CREATE EVENT TRIGGER pgturso_ddl_command_end ON ddl_command_end EXECUTE FUNCTION pgturso._on_ddl_command_end();
CREATE EVENT TRIGGER pgturso_sql_drop ON sql_drop EXECUTE FUNCTION pgturso._on_sql_drop();

REVOKE ALL ON FUNCTION pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_rows(integer, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._follow_schema(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._recopy(integer) FROM PUBLIC;
