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
    v_copy_all boolean := false;
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
    PERFORM pgturso._check_key(v_rel, v_desc.columns, v_desc.key_columns);
    v_change := pgturso._plan_change(v_old_spec, v_desc.source_table, v_desc.target_table, v_desc.columns,
                                     v_desc.key_columns, v_desc.indexes, v_desc.row_filter, v_desc.route_by,
                                     v_options ? 'reference');
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
        PERFORM pgturso._check_turso_names(v_rel, (SELECT o.target FROM pgturso.tracked_table o
                                                   WHERE o.id = _follow_schema.table_id),
                                           _follow_schema.table_id, v_desc.target_table, v_desc.indexes);
        v_recopy := (v_change ->> 'recopy')::boolean OR pgturso._take_rewritten(table_id);
        IF NOT v_recopy AND jsonb_array_length(v_change -> 'added') > 0 AND EXISTS (
               SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = v_rel AND a.attname::text IN (SELECT jsonb_array_elements_text(v_change -> 'added'))
                 AND (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '')) THEN
            -- Postgres filled the new columns of existing rows (a default): Turso cannot compute them. (Outside
            -- READ COMMITTED an empty-looking table may hold rows committed since this snapshot: recopy.)
            v_recopy := true;
            IF pgturso._snapshot_is_current() THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', pgturso._row_source(v_rel)) INTO v_recopy;
            END IF;
        END IF;
        INSERT INTO pgturso.layout (table_id, spec, generated)
        VALUES (table_id, v_change -> 'spec', pgturso._generated_expressions(v_rel)) RETURNING id INTO v_new_id;
        v_plan := pgturso._plan_layout(v_new_id, pgturso._row_source(v_rel), v_desc.source_table,
                                       v_desc.target_table, v_desc.columns, v_desc.key_columns,
                                       pgturso._capture_function_name(table_id), v_desc.indexes,
                                       v_desc.row_filter, v_desc.route_by, v_options ? 'reference');
        PERFORM pgturso._fan_out(v_new_id, 'A', jsonb_build_object('from', v_old_id, 'recopy', v_recopy)::text);
        -- The DDL holds the table's lock; in READ COMMITTED this statement's snapshot is newer than that lock
        -- and the rows are copied here. Otherwise the worker copies them in chunks after this commits.
        IF v_recopy AND pgturso._snapshot_is_current() THEN
            EXECUTE v_plan ->> 'snapshot_sql';
        ELSIF v_recopy THEN
            v_copy_all := true;
        END IF;
        -- (Also what a wal pattern's router, copying a reference table to a new tenant at an older snapshot,
        -- fails to serialize on: pgturso._register_tenants. Keep it for every new layout.)
        UPDATE pgturso.tracked_table t SET target_table = v_desc.target_table WHERE t.id = table_id;
        -- A chunked initial copy in progress resumes after a key of the old layout: after a recopy every row
        -- is queued already; after a key change the copy starts over in the new key's order.
        UPDATE pgturso.tracked_table t
        SET copy_state = CASE WHEN v_recopy THEN 'done' ELSE t.copy_state END,
            copy_finished_at = CASE WHEN v_recopy THEN now() END, copy_after = NULL
        WHERE t.id = table_id AND t.copy_state = 'copying'
          AND (v_recopy OR v_desc.key_columns IS DISTINCT FROM
                           ARRAY(SELECT jsonb_array_elements_text(v_old_spec -> 'key_columns')));
        v_old_id := v_new_id;
        v_old_spec := v_change -> 'spec';
    ELSE
        v_plan := NULL;
        IF pgturso._take_rewritten(table_id) THEN
            -- Same layout, but the rewrite may have changed values (ALTER COLUMN TYPE text USING upper(v)).
            PERFORM pgturso._recopy(table_id);
        END IF;
    END IF;

    -- Partitions: detached ones take their rows away from the table, new or attached ones bring theirs.
    -- (A partition captured from the WAL has only its TRUNCATE trigger, which names the table.)
    FOR v_part IN SELECT DISTINCT g.tgrelid::regclass FROM pg_trigger g
                  WHERE g.tgrelid <> v_rel
                    AND (g.tgname = 'pgturso_capture_insert'
                         AND g.tgfoid::regproc::text = 'pgturso.' || pgturso._capture_function_name(table_id)
                         OR g.tgname = 'pgturso_capture_truncate'
                         AND g.tgfoid = 'pgturso._capture_partition_truncate'::regproc
                         AND g.tgargs = convert_to(table_id::text, 'UTF8') || '\x00'::bytea)
                    AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(v_rel) p WHERE p.relid = g.tgrelid)
    LOOP
        -- The keys of the rows it takes away: DETACH (CONCURRENTLY too, in its second transaction) holds
        -- ACCESS EXCLUSIVE on the partition, so they must be read in a snapshot taken after that lock.
        PERFORM pgturso._require_current_snapshot('DETACH PARTITION ' || v_part::text, v_rel);
        EXECUTE pgturso._plan_rows(v_old_id, v_old_spec, v_part::text, 'D'::text);
        EXECUTE format('DROP TRIGGER IF EXISTS pgturso_capture_insert ON %1$s; '
                       'DROP TRIGGER IF EXISTS pgturso_capture_update ON %1$s; '
                       'DROP TRIGGER IF EXISTS pgturso_capture_delete ON %1$s; '
                       'DROP TRIGGER IF EXISTS pgturso_capture_truncate ON %1$s', v_part);
    END LOOP;
    FOR v_part IN SELECT p.relid FROM pg_partition_tree(v_rel) p
                  WHERE p.isleaf AND p.relid <> v_rel
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p.relid
                                    AND g.tgname IN ('pgturso_capture_insert', 'pgturso_capture_truncate'))
    LOOP
        IF v_plan IS NULL THEN
            v_plan := pgturso._plan_layout(v_old_id, pgturso._row_source(v_rel), v_desc.source_table,
                                           v_desc.target_table, v_desc.columns, v_desc.key_columns,
                                           pgturso._capture_function_name(table_id), v_desc.indexes,
                                           v_desc.row_filter, v_desc.route_by, v_options ? 'reference');
        END IF;
        -- Its rows, read here in READ COMMITTED (ATTACH holds the partition's lock), or when this transaction
        -- created it (no one else wrote it: its ctid attribute row, which nothing alters, is ours); otherwise
        -- the worker copies the whole table in chunks.
        IF pgturso._snapshot_is_current()
           OR (SELECT a.xmin FROM pg_attribute a WHERE a.attrelid = v_part AND a.attnum = -1)
              = pg_current_xact_id()::xid THEN
            EXECUTE pgturso._plan_rows(v_old_id, v_old_spec, v_part::text, 'U'::text);
        ELSE
            v_copy_all := true;
        END IF;
    END LOOP;
    IF v_copy_all THEN
        IF (SELECT c.relkind FROM pg_class c WHERE c.oid = v_rel) = 'm' THEN
            PERFORM pgturso._require_current_snapshot('copying', v_rel);
        END IF;
        PERFORM pgturso._start_copy(table_id);
    END IF;
    IF v_plan IS NOT NULL THEN
        PERFORM pgturso._install_capture(v_rel, table_id, v_plan);
        PERFORM pgturso._wake_worker();
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
    v_kind "char";
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    SELECT t.relid INTO v_rel FROM pgturso.tracked_table t WHERE t.id = table_id;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = _recopy.table_id ORDER BY l.id DESC LIMIT 1;
    SELECT c.relkind INTO v_kind FROM pg_class c WHERE c.oid = v_rel;
    -- The recreate must come after the events of every writer still open (as in resync_table): a rewrite holds
    -- the table's lock already, but ALTER TYPE on an enum it uses takes none.
    IF v_kind <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', v_rel);
    END IF;
    PERFORM pgturso._fan_out(v_layout_id, 'A', jsonb_build_object('from', v_layout_id, 'recopy', true)::text);
    -- A materialized view comes here after its REFRESH by this transaction, whose rows any snapshot of it
    -- sees; a table is read here only in READ COMMITTED, where this statement's snapshot is newer than the
    -- lock, and otherwise copied by the worker in chunks (docs/design.md).
    IF v_kind = 'm' OR pgturso._snapshot_is_current() THEN
        EXECUTE pgturso._plan_rows(v_layout_id, v_spec, pgturso._row_source(v_rel), 'U'::text);
        -- Every row is queued now: a chunked initial copy still running has nothing left to do.
        UPDATE pgturso.tracked_table t SET copy_state = 'done', copy_after = NULL, copy_finished_at = now()
        WHERE t.id = table_id AND t.copy_state = 'copying';
    ELSE
        PERFORM pgturso._start_copy(table_id);
    END IF;
    PERFORM pgturso._wake_worker();
END
$$;
COMMENT ON FUNCTION pgturso._recopy IS 'Private: recreate a tracked relation on Turso and send all its rows again.';

-- The last line of defence of a write: a capture function whose layout no longer matches its table (DDL that
-- pgturso's event triggers did not see: ALTER EVENT TRIGGER ... DISABLE, session_replication_role = replica)
-- fails to pack the rows. The write must not fail, and the change must not be lost: follow the schema as the
-- event trigger would have, and send the table afresh (the statement's own changes are in the table by now).
-- If that fails too, its error fails the write: nothing is ever dropped silently.
CREATE OR REPLACE FUNCTION pgturso._capture_failed(table_id integer, rel oid, error_code text, error text)
RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
BEGIN
    RAISE WARNING 'pgturso: capturing a write to % failed (%: %), so pgturso follows its schema and recopies it '
                  'to Turso', rel::regclass, error_code, error
        USING HINT = 'DDL ran on the table while pgturso''s event triggers did not fire (ALTER EVENT TRIGGER ... '
                     'DISABLE, or session_replication_role = replica): keep them enabled.';
    PERFORM pgturso._follow_schema(table_id);
    PERFORM pgturso._recopy(table_id);
END
$$;
COMMENT ON FUNCTION pgturso._capture_failed IS
    'Private: a capture function could not pack a write (stale layout): follow the schema and recopy the table.';

-- Table rewrites: ALTER COLUMN TYPE rewrites the table, and with USING (or any cast) the values may change
-- although the column's form on Turso does not (int -> bigint USING cents * 100, text -> text USING upper(v)).
-- The table_rewrite event names the table before ddl_command_end sees the command: it is remembered for the
-- transaction, and following the command then recopies the table.
CREATE OR REPLACE FUNCTION pgturso._on_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    v_rel oid := pg_event_trigger_table_rewrite_oid();
    v_table_id integer;
BEGIN
    -- Reason 4: a column's values are rewritten. (1, persistence; 2, a default; 8, access method: same values.
    -- A new column with a default is recopied by _follow_schema anyway.)
    IF to_regclass('pgturso.tracked_table') IS NULL OR pg_event_trigger_table_rewrite_reason() & 4 = 0 THEN
        RETURN;
    END IF;
    SELECT t.id INTO v_table_id FROM pgturso.tracked_table t
    WHERE t.dropped_at IS NULL AND (t.relid = v_rel OR t.relid = pg_partition_root(v_rel));
    IF v_table_id IS NOT NULL THEN
        PERFORM set_config('pgturso.rewritten',
                           coalesce(current_setting('pgturso.rewritten', true), '') || ',' || v_table_id, true);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._on_table_rewrite IS
    'Private: event trigger remembering tracked tables whose column values a rewrite may have changed.';

-- Whether a table rewrite of this transaction changed a column of the table; forgets it (it is recopied once).
CREATE OR REPLACE FUNCTION pgturso._take_rewritten(table_id integer) RETURNS boolean
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_ids text[] := string_to_array(coalesce(current_setting('pgturso.rewritten', true), ''), ',');
BEGIN
    IF NOT table_id::text = ANY (v_ids) THEN
        RETURN false;
    END IF;
    PERFORM set_config('pgturso.rewritten', array_to_string(array_remove(v_ids, table_id::text), ','), true);
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgturso._take_rewritten IS
    'Private: whether a rewrite in this transaction may have changed a tracked table''s values (and forget it).';

-- Tracked tables whose catalog no longer matches their layout: columns (number, name, type), the Turso name
-- (ALTER SCHEMA ... RENAME), and with check_keys the key. Run after every DDL, so a column dropped or renamed
-- through another object (DROP TYPE/DOMAIN/FUNCTION ... CASCADE, ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE
-- of a typed table) is followed like one changed by ALTER TABLE: the capture function never names a column
-- that is gone.
CREATE OR REPLACE FUNCTION pgturso._stale_tables(check_keys boolean) RETURNS SETOF integer
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT t.id
    FROM pgturso.tracked_table t
    JOIN pg_class c ON c.oid = t.relid
    CROSS JOIN LATERAL (SELECT l.spec FROM pgturso.layout l WHERE l.table_id = t.id ORDER BY l.id DESC LIMIT 1) l
    WHERE t.dropped_at IS NULL
      AND (coalesce(t.options ->> 'target_table', pgturso._turso_name(t.relid::oid)) IS DISTINCT FROM l.spec ->> 'target_table'
           OR (SELECT jsonb_agg(jsonb_build_array(a.attnum, a.attname, format_type(a.atttypid, a.atttypmod))
                                ORDER BY a.attnum)
               FROM pg_attribute a WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                 AND (NOT t.options ? 'column_attnums' OR t.options -> 'column_attnums' @> to_jsonb(a.attnum::integer)))
              IS DISTINCT FROM
              (SELECT jsonb_agg(jsonb_build_array((x.col ->> 'attnum')::integer, x.col ->> 'name', x.col ->> 'pg_type')
                                ORDER BY x.n)
               FROM jsonb_array_elements(l.spec -> 'columns') WITH ORDINALITY AS x(col, n))
           OR (check_keys AND pgturso._key_columns(t.relid, (SELECT array_agg(k) FROM jsonb_array_elements_text(
                                                                   t.options -> 'key_columns') AS k))
                              IS DISTINCT FROM ARRAY(SELECT jsonb_array_elements_text(l.spec -> 'key_columns'))))
    ORDER BY t.id
$$;
COMMENT ON FUNCTION pgturso._stale_tables IS
    'Private: tracked tables whose columns, Turso name (or key) no longer match their layout.';

-- Tracked tables with a column whose values are, or contain, values of type typ: the type itself, arrays
-- and domains over it, composites with an attribute of it, at any depth.
CREATE OR REPLACE FUNCTION pgturso._tables_using_type(typ oid) RETURNS SETOF integer
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    WITH RECURSIVE using_type(oid) AS (
        SELECT typ
        UNION
        SELECT t.oid FROM pg_type t JOIN using_type u
          ON (t.typcategory = 'A' AND t.typelem = u.oid) OR t.typbasetype = u.oid
             OR (t.typtype = 'c' AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.typrelid
                                             AND a.atttypid = u.oid AND NOT a.attisdropped))
    )
    SELECT DISTINCT t.id FROM pgturso.tracked_table t
    JOIN pg_attribute a ON a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE t.dropped_at IS NULL AND a.atttypid IN (SELECT oid FROM using_type)
    ORDER BY t.id
$$;
COMMENT ON FUNCTION pgturso._tables_using_type IS
    'Private: tracked tables holding values of a type (directly, in arrays, domains or composites).';

-- What pgturso refuses after any DDL, whatever object the DDL was on (docs/schema-changes.md).
CREATE OR REPLACE FUNCTION pgturso._refuse_shapes(rels oid[]) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_rel regclass;
    v_other regclass;
BEGIN
    PERFORM pgturso._refuse_unlogged(ARRAY(
        SELECT t.relid FROM pgturso.tracked_table t
        WHERE t.dropped_at IS NULL
          AND EXISTS (SELECT 1 FROM unnest(rels) AS x(rel) WHERE t.relid IN (x.rel, pg_partition_root(x.rel)))));
    -- A tracked table attached as a partition: its rows would belong to two Turso tables.
    SELECT t.relid, pgturso._partition_root(t.relid) INTO v_rel, v_other
    FROM pgturso.tracked_table t JOIN pg_class c ON c.oid = t.relid
    WHERE t.dropped_at IS NULL AND c.relispartition LIMIT 1;
    IF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % is tracked on its own and cannot become a partition of %', v_rel, v_other
            USING HINT = format('Stop tracking it first: SELECT pgturso.untrack_table(%L); a partition of a '
                                'tracked table replicates through its parent.', v_rel::text);
    END IF;
    -- Inheritance (not partitioning): statements on the parent capture the children's rows too, which a
    -- copy of the parent's own rows does not have, so Turso would match neither. Refused both ways.
    SELECT i.inhparent, i.inhrelid INTO v_rel, v_other
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE NOT c.relispartition AND (i.inhparent = ANY (rels) OR i.inhrelid = ANY (rels))
      AND EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.dropped_at IS NULL
                  AND t.relid IN (i.inhparent, i.inhrelid))
    LIMIT 1;
    IF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would inherit from %, and one of them is tracked', v_other, v_rel
            USING HINT = 'pgturso does not replicate table inheritance (statements on a parent include its '
                         'children''s rows): use a partitioned table, or untrack the table first.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._refuse_shapes IS
    'Private: refuse DDL that makes a tracked table unlogged, a partition or part of an inheritance tree.';

-- ALTER TABLE ... DISABLE TRIGGER [ALL] (pg_restore --disable-triggers does it) on a tracked table: its
-- writes are not captured until it is enabled again. Postgres allows it, so pgturso warns, and
-- pgturso.status shows it while it lasts.
CREATE OR REPLACE FUNCTION pgturso._warn_disabled_capture(rels oid[]) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_rel regclass;
BEGIN
    FOR v_rel IN SELECT t.relid FROM pgturso.tracked_table t
                 WHERE t.dropped_at IS NULL AND pgturso._capture_disabled(t.id)
                   AND EXISTS (SELECT 1 FROM unnest(rels) AS x(rel)
                               WHERE x.rel = t.relid OR pg_partition_root(x.rel) = t.relid)
    LOOP
        RAISE WARNING 'pgturso: capture of tracked table % is disabled: its changes are not replicated', v_rel
            USING HINT = format('ALTER TABLE %s ENABLE TRIGGER ALL, then copy what was missed: '
                                'SELECT pgturso.resync_table(%L) (or pgturso-worker verify --repair).',
                                v_rel, v_rel::text);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._warn_disabled_capture IS
    'Private: warn about tracked tables (touched by this DDL) whose capture triggers are disabled.';

-- capture => 'wal' decodes each UPDATE's and DELETE's old key from the replica identity, and Postgres fails
-- UPDATE and DELETE on a published table that has none: after DDL, every wal-captured table touched (each
-- leaf) must still identify its rows by columns that include the key (FULL, the primary key, or USING INDEX).
CREATE OR REPLACE FUNCTION pgturso._refuse_lost_replica_identity(rels oid[]) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_rel regclass;
    v_filtered boolean;
    v_pattern text;
BEGIN
    SELECT c.oid, l.spec ->> 'row_filter' IS NOT NULL, CASE WHEN strpos(t.target, '%s') > 0 THEN t.target END
    INTO v_rel, v_filtered, v_pattern
    FROM pgturso.tracked_table t
    CROSS JOIN LATERAL (SELECT l.spec FROM pgturso.layout l WHERE l.table_id = t.id ORDER BY l.id DESC LIMIT 1) l
    JOIN pg_class c ON c.oid IN (SELECT t.relid UNION SELECT p.relid FROM pg_partition_tree(t.relid) p)
    WHERE t.dropped_at IS NULL AND pgturso._capture_of(t.id) = 'wal'
      AND EXISTS (SELECT 1 FROM unnest(rels) AS x(rel) WHERE t.relid IN (x.rel, pg_partition_root(x.rel)))
      AND c.relkind = 'r' AND c.relreplident <> 'f'
      -- A row-filtered table needs FULL (_install_wal_capture says why): checked on the partitions this DDL
      -- altered, as _install_wal_capture sets FULL one partition at a time.
      -- A table of a wal pattern needs FULL too: its router finds a deleted or moved row's old tenant, and a
      -- value an UPDATE left alone, in the old row (_install_wal_capture). With the key alone a move left the
      -- row in its old tenant's database.
      AND (((l.spec ->> 'row_filter' IS NOT NULL OR strpos(t.target, '%s') > 0) AND c.oid = ANY (rels))
           OR NOT ARRAY(SELECT jsonb_array_elements_text(l.spec -> 'key_columns')) <@ coalesce((
              SELECT array_agg(a.attname::text) FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = c.oid
                AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))),
              '{}'))
    ORDER BY l.spec ->> 'row_filter' IS NULL AND strpos(t.target, '%s') = 0
    LIMIT 1;
    IF v_rel IS NOT NULL AND v_pattern IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would lose the replica identity FULL that the router of wal pattern target % '
                        'needs', v_rel, v_pattern
            USING HINT = format('Keep ALTER TABLE %s REPLICA IDENTITY FULL: the router reads a deleted or moved '
                                'row''s tenant, and values an UPDATE left alone, from the old row.', v_rel);
    ELSIF v_rel IS NOT NULL AND v_filtered THEN
        RAISE EXCEPTION 'pgturso: % would lose the replica identity FULL that capture => ''wal'' of its row filter '
                        'needs', v_rel
            USING HINT = format('Keep ALTER TABLE %s REPLICA IDENTITY FULL (or untrack the table and track it '
                                'again without row_filter).', v_rel);
    ELSIF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would lose the replica identity that capture => ''wal'' reads its key from', v_rel
            USING HINT = format('Keep ALTER TABLE %s REPLICA IDENTITY DEFAULT (the primary key), FULL, or USING '
                                'INDEX of a unique index over the key''s columns.', v_rel);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._refuse_lost_replica_identity IS
    'Private: refuse DDL that leaves a wal-captured table without a replica identity covering its key.';

CREATE OR REPLACE FUNCTION pgturso._on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    v_table_id integer;
    v_rels oid[];
BEGIN
    -- Cheap for databases and DDL that concern no tracked table.
    IF to_regclass('pgturso.tracked_table') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE dropped_at IS NULL) THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT coalesce(i.indrelid, c.oid)) INTO v_rels
    FROM pg_event_trigger_ddl_commands() d
    JOIN pg_class c ON c.oid = d.objid
    LEFT JOIN pg_index i ON i.indexrelid = c.oid
    WHERE d.classid = 'pg_class'::regclass;
    PERFORM pgturso._refuse_shapes(coalesce(v_rels, '{}'));
    -- The tables this DDL was on, and any whose columns or name changed through another object (a type, a
    -- domain, a function, a schema: see _stale_tables).
    FOR v_table_id IN
        SELECT t.id FROM pgturso.tracked_table t
        WHERE t.dropped_at IS NULL AND EXISTS (
            SELECT 1 FROM unnest(v_rels) AS x(rel)
            WHERE t.relid = x.rel OR t.relid = pg_partition_root(x.rel)
               OR EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = x.rel AND g.tgname = 'pgturso_capture_insert'
                          AND g.tgfoid::regproc::text = 'pgturso.' || pgturso._capture_function_name(t.id)))
        UNION
        -- (not for DDL on temporary objects only, which applications may run often and cannot touch a
        -- tracked table's columns)
        SELECT pgturso._stale_tables(false)
        WHERE EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                      WHERE d.schema_name IS NULL OR d.schema_name NOT LIKE 'pg\_temp%')
        ORDER BY 1
    LOOP
        PERFORM pgturso._follow_schema(v_table_id);
    END LOOP;
    -- ALTER TYPE on an enum or composite whose values a tracked table holds: RENAME VALUE, or an attribute
    -- added, dropped, renamed or retyped, changes how existing values read on Turso; send those tables afresh.
    -- (Postgres does not say which ALTER TYPE it was: the type's labels or attributes changed in this
    -- transaction is the sign, so ADD VALUE recopies too; OWNER TO, RENAME TO, SET SCHEMA do not.)
    FOR v_table_id IN
        SELECT DISTINCT u.id
        FROM pg_event_trigger_ddl_commands() d
        JOIN pg_type ty ON ty.oid = d.objid
        CROSS JOIN LATERAL pgturso._tables_using_type(ty.oid) AS u(id)
        WHERE d.classid = 'pg_type'::regclass AND d.command_tag = 'ALTER TYPE'
          AND (EXISTS (SELECT 1 FROM pg_enum e WHERE e.enumtypid = ty.oid
                       AND e.xmin = pg_current_xact_id()::xid)
               OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = ty.typrelid AND ty.typrelid <> 0
                          AND a.xmin = pg_current_xact_id()::xid))
        ORDER BY 1
    LOOP
        PERFORM pgturso._recopy(v_table_id);
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
    -- ALTER TABLE ... DISABLE TRIGGER [ALL] on a tracked table: say so now (pgturso.status shows it too).
    PERFORM pgturso._warn_disabled_capture(v_rels);
    PERFORM pgturso._refuse_lost_replica_identity(coalesce(v_rels, '{}'));
    PERFORM set_config('pgturso.rewritten', '', true);
END
$$;
COMMENT ON FUNCTION pgturso._on_ddl_command_end IS 'Private: event trigger following DDL on tracked tables.';

CREATE OR REPLACE FUNCTION pgturso._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    v_row record;
    v_tracked_dropped boolean := false;
    v_filtered regclass;
BEGIN
    IF to_regclass('pgturso.tracked_table') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE dropped_at IS NULL) THEN
        RETURN;
    END IF;
    -- The CHECK pgturso_row_filter of a wal table refuses the rows its filter raises on, which would stop the
    -- slot for good (_install_wal_capture): only pgturso drops it (_remove_wal_capture marks its own drop).
    SELECT t.relid::regclass INTO v_filtered FROM pg_event_trigger_dropped_objects() d
    JOIN pgturso.tracked_table t ON t.dropped_at IS NULL
     AND t.relid = to_regclass(quote_ident(d.address_names[1]) || '.' || quote_ident(d.address_names[2]))
    WHERE d.object_type = 'table constraint' AND d.original AND d.address_names[3] = 'pgturso_row_filter'
      AND coalesce(current_setting('pgturso.dropping_row_filter', true), '') <> t.relid::text
    LIMIT 1;
    IF v_filtered IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: the constraint pgturso_row_filter of % keeps rows its row filter fails on out of '
                        'the replication slot', v_filtered
            USING HINT = format('Keep it, or untrack the table first: SELECT pgturso.untrack_table(%L).',
                                v_filtered::text);
    END IF;
    -- DROP TABLE (or DROP MATERIALIZED VIEW, DROP SCHEMA ... CASCADE) of a tracked table: the changes made
    -- before it are still delivered, then the table is untracked; its Turso table stays unless drop_target.
    FOR v_row IN
        SELECT t.id, t.options FROM pg_event_trigger_dropped_objects() d
        JOIN pgturso.tracked_table t ON t.relid = d.objid AND t.dropped_at IS NULL
        WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
    LOOP
        PERFORM pgturso._fan_out(max(l.id), 'X',
               jsonb_build_object('drop_target', coalesce((v_row.options ->> 'drop_target')::boolean, false))::text)
        FROM pgturso.layout l WHERE l.table_id = v_row.id;
        PERFORM pgturso._drop_capture_functions(v_row.id);
        PERFORM pgturso._drop_row_filter(v_row.options);
        UPDATE pgturso.tracked_table SET dropped_at = now() WHERE id = v_row.id;
        PERFORM pgturso._wake_worker();
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
    -- Columns dropped through another object (DROP TYPE/DOMAIN/FUNCTION ... CASCADE), and the unique index
    -- that a table is keyed by (DROP INDEX): follow the tables, or refuse when no key is left.
    FOR v_row IN SELECT pgturso._stale_tables(true) AS id
                 WHERE EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d WHERE NOT d.is_temporary) LOOP
        PERFORM pgturso._follow_schema(v_row.id);
    END LOOP;
    IF NOT v_tracked_dropped AND EXISTS (
           SELECT 1 FROM pg_event_trigger_dropped_objects() tbl
           JOIN pg_event_trigger_dropped_objects() trg
             ON trg.object_type = 'trigger'
            AND trg.address_names[3] IN ('pgturso_capture_insert', 'pgturso_capture_truncate')
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
DROP EVENT TRIGGER IF EXISTS pgturso_table_rewrite;
CREATE EVENT TRIGGER pgturso_table_rewrite ON table_rewrite EXECUTE FUNCTION pgturso._on_table_rewrite();

REVOKE ALL ON FUNCTION pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb, text, text, boolean)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb, text, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_tenant_rows(integer, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_rows(integer, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._follow_schema(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._recopy(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._take_rewritten(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._stale_tables(boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._tables_using_type(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._refuse_shapes(oid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._warn_disabled_capture(oid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._capture_failed(integer, oid, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._refuse_lost_replica_identity(oid[]) FROM PUBLIC;
