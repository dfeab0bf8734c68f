-- Capture from a logical replication slot (track_table(..., capture => 'wal')): the tables of a wal target
-- have no capture trigger; their row changes are decoded by the target's worker from a slot (pgoutput, with
-- the publications pgturso_tables and pgturso_outbox), in commit order together with the outbox events that
-- DDL, copies, repairs and TRUNCATE still write (docs/design.md, "Capture from the WAL").

-- The slot of a target: slot names are cluster-wide, so the database's oid is part of it.
CREATE OR REPLACE FUNCTION pgturso._slot_name(target text) RETURNS text
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT format('pgturso_%s_%s', d.oid, left(md5(target), 12)) FROM pg_database d
    WHERE d.datname = current_database()
$$;
COMMENT ON FUNCTION pgturso._slot_name IS 'Private: name of the logical replication slot of a wal target.';

-- Before a table joins a wal target: logical decoding must be possible, and the target's slot must exist
-- before anything is written, because Postgres creates a logical slot only in a transaction without writes.
CREATE OR REPLACE FUNCTION pgturso._prepare_wal_capture(target text) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_slot text := pgturso._slot_name(target);
BEGIN
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'pgturso: capture => ''wal'' needs wal_level = logical (it is %)', current_setting('wal_level')
            USING HINT = 'Run ALTER SYSTEM SET wal_level = logical and restart Postgres; or track the table with '
                         'capture => ''trigger'', which needs no server setting.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = v_slot AND s.wal_status <> 'lost') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.target g JOIN pgturso.tracked_table t ON t.target = g.name
               WHERE g.name = _prepare_wal_capture.target AND g.capture = 'wal') THEN
        -- The target's slot was lost (invalidated, or a failover) and its worker has not replaced it yet: it
        -- will, and copy every table of the target afresh, this one included.
        UPDATE pgturso.target g SET slot_rebuild = coalesce(g.slot_rebuild, 'lost or missing')
        WHERE g.name = _prepare_wal_capture.target;
        RETURN;
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: the replication slot of target % must be created before this transaction writes', target
            USING HINT = 'Call pgturso.track_table(..., capture => ''wal'') first in its transaction (or on its own).';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = v_slot) THEN
        PERFORM pg_drop_replication_slot(v_slot);  -- invalidated: useless, and the worker re-copies its tables
    END IF;
    PERFORM pg_create_logical_replication_slot(v_slot, 'pgoutput');
    UPDATE pgturso.target g SET slot_generation = g.slot_generation + 1 WHERE g.name = _prepare_wal_capture.target;
END
$$;
COMMENT ON FUNCTION pgturso._prepare_wal_capture IS
    'Private: check wal_level and create a wal target''s replication slot (before the caller writes).';

-- Drop a target's slot, so that nothing pins WAL once no table is captured through it. A worker process
-- streams from the slot for as long as it runs (worker/pgturso/replication.py): end that connection (the
-- worker reconnects and finds the slot gone); pgturso.sync() peeks it for the length of one read: wait.
CREATE OR REPLACE FUNCTION pgturso._drop_slot(target text) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_slot text := pgturso._slot_name(target);
    v_deadline timestamptz := clock_timestamp() + interval '30 seconds';
BEGIN
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = v_slot) THEN
            RETURN;
        END IF;
        BEGIN
            PERFORM pg_drop_replication_slot(v_slot);
            RETURN;
        EXCEPTION WHEN object_in_use THEN
            BEGIN
                PERFORM pg_stat_clear_snapshot();  -- pg_stat_replication's names: as of now, not of the first try
                PERFORM pg_terminate_backend(r.pid) FROM pg_stat_replication r
                JOIN pg_replication_slots s ON s.active_pid = r.pid
                WHERE s.slot_name = v_slot AND r.application_name = 'pgturso-worker-replication';
            EXCEPTION WHEN insufficient_privilege THEN
                NULL;  -- not allowed to end the worker's connection: wait for the worker to let go
            END;
            IF clock_timestamp() > v_deadline THEN
                RAISE EXCEPTION 'pgturso: replication slot % stays in use', v_slot
                    USING HINT = 'Stop the worker of target ' || target || ' and try again.';
            END IF;
            PERFORM pg_sleep(0.05);
        END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._drop_slot IS 'Private: drop a wal target''s replication slot if it exists.';

-- The expressions of a table's stored generated columns ({column: expression}, NULL if none), kept with each of
-- its layouts (pgturso.layout.generated): capture => 'wal' computes those columns at delivery (pgoutput does not
-- send them), and rows written before ALTER COLUMN ... DROP EXPRESSION still need the expression it dropped.
CREATE OR REPLACE FUNCTION pgturso._generated_expressions(rel regclass) RETURNS jsonb
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT jsonb_object_agg(a.attname, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = rel AND a.attgenerated = 's' AND NOT a.attisdropped
$$;
COMMENT ON FUNCTION pgturso._generated_expressions IS
    'Private: a table''s stored generated columns and their expressions, kept with its layouts.';
REVOKE ALL ON FUNCTION pgturso._generated_expressions(regclass) FROM PUBLIC;

-- Publish a wal-captured table (as its partition root) with a replica identity equal to its key, so that
-- updates and deletes carry the key pgturso replicates by; TRUNCATE still goes through the outbox (a
-- partition truncated alone is not published as the root), by statement triggers that cost writers nothing.
-- Keys are checked immediately (a DEFERRABLE key is refused by track_table), so the rows, applied one by one in
-- decoding order, never hold a key twice on Turso either.
CREATE OR REPLACE FUNCTION pgturso._install_wal_capture(rel regclass, table_id integer, plan jsonb)
RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_part regclass;
    v_kind "char";
    v_index regclass;
    key_columns text[] := ARRAY(SELECT jsonb_array_elements_text(plan -> 'spec' -> 'key_columns'));
    v_function text := pgturso._capture_function_name(table_id);
    v_generated text;
    v_identity_full boolean;
BEGIN
    -- pgoutput (Postgres 15) does not send stored generated columns: the worker computes them from the other
    -- values, with its own rights. So their expressions may use nothing a user defined (docs/security.md).
    SELECT format('%s (uses %s)', a.attname, pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid))
    INTO v_generated
    FROM pg_attrdef ad
    JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum AND a.attgenerated = 's'
    JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
    WHERE ad.adrelid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
      AND d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_cast'::regclass,
                           'pg_type'::regclass, 'pg_collation'::regclass)
      AND d.refobjid >= 16384
    LIMIT 1;
    IF v_generated IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: generated column % of % uses an object a user defined, which the worker would '
                        'run to compute it', v_generated, rel
            USING HINT = 'With capture => ''wal'' generated columns may use built-in functions only; use the '
                         'trigger capture mode for this table (a target with capture => ''trigger'').';
    END IF;
    -- The worker computes them over decoded values, where a column of a type that is not trusted
    -- (pgturso._trusted_type: enum, composite, extension type...) is its text form: an expression over it would
    -- fail (and stop the target) or give a value Postgres never held (an enum compared as text).
    SELECT format('%s (uses column %s of type %s)', a.attname, quote_ident(ra.attname), format_type(ra.atttypid, NULL))
    INTO v_generated
    FROM pg_attrdef ad
    JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum AND a.attgenerated = 's'
    JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid = ad.adrelid AND d.refobjsubid > 0
    JOIN pg_attribute ra ON ra.attrelid = d.refobjid AND ra.attnum = d.refobjsubid
    WHERE ad.adrelid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
      AND NOT pgturso._trusted_type(ra.atttypid)
    LIMIT 1;
    IF v_generated IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: generated column % of % is computed from a column of a user-defined type, which '
                        'the worker only has as text', v_generated, rel
            USING HINT = 'With capture => ''wal'' generated columns may use columns of built-in types only (arrays '
                         'and domains of them too); cast the column to a built-in type in the table, or use the '
                         'trigger capture mode for this table (a target with capture => ''trigger'').';
    END IF;
    -- The generated capture function serves the TRUNCATE trigger only (a 'T' event), as in trigger mode.
    EXECUTE plan ->> 'capture_function_sql';
    EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I() FROM PUBLIC', v_function);
    EXECUTE format('ALTER FUNCTION pgturso.%I() DEPENDS ON EXTENSION pgturso', v_function);  -- docs/security.md
    -- A row filter (track_table's row_filter, Postgres' deparsed form of it) is the table's filter in the
    -- publication: pgoutput sends only the rows it lets through, and an UPDATE moving a row into or out of it
    -- as an insert or a delete. Renames follow it there too (the filter is stored parsed).
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                   WHERE p.pubname = 'pgturso_tables' AND r.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION pgturso_tables ADD TABLE ONLY %s', rel)
                || coalesce(' WHERE (' || (plan -> 'spec' ->> 'row_filter') || ')', '');
    END IF;
    -- A row filter makes the replica identity FULL (the old row is logged whole; docs/design.md says what that
    -- costs). Over a column outside the key it must: Postgres refuses an UPDATE or DELETE of a table whose
    -- publication filter uses a column outside the replica identity, writers would fail. Over the key alone too:
    -- an UPDATE moving a row into the filter reaches pgoutput as an insert, and a TOASTed value it left alone
    -- is "unchanged" in the new tuple; pgoutput takes it from the old tuple, which only FULL logs (attack: the
    -- row moved into the filter never reached Turso).
    v_identity_full := plan -> 'spec' ->> 'row_filter' IS NOT NULL;
    -- A table of a pattern target too: its router needs the old row's tenant for a delete and for a move
    -- (an UPDATE of the route column), and the whole old row for a value an UPDATE left alone.
    v_identity_full := v_identity_full OR EXISTS (SELECT 1 FROM pgturso.tracked_table t
                                                WHERE t.id = table_id AND strpos(t.target, '%s') > 0);
    FOR v_part, v_kind IN SELECT p.relid, c.relkind
                          FROM (SELECT rel AS relid UNION SELECT relid FROM pg_partition_tree(rel)) p
                          JOIN pg_class c ON c.oid = p.relid
    LOOP
        -- The index whose columns are exactly the key: the primary key (replica identity DEFAULT), else a
        -- unique index over NOT NULL columns (USING INDEX); with neither, or a row filter,
        -- FULL (key_columns => ...).
        SELECT i.indexrelid INTO v_index FROM pg_index i
        WHERE i.indrelid = v_part AND i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL
          AND i.indexprs IS NULL AND i.indnkeyatts = cardinality(key_columns)
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM unnest(i.indkey[0:i.indnkeyatts - 1]) k
               JOIN pg_attribute a ON a.attrelid = v_part AND a.attnum = k)
              = (SELECT array_agg(k ORDER BY k) FROM unnest(key_columns) k)
          AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) k
                          JOIN pg_attribute a ON a.attrelid = v_part AND a.attnum = k WHERE NOT a.attnotnull)
        ORDER BY i.indisprimary DESC, i.indexrelid LIMIT 1;
        IF v_identity_full THEN
            v_index := NULL;
        END IF;
        IF v_index IS NOT NULL AND (SELECT indisprimary FROM pg_index WHERE indexrelid = v_index) THEN
            IF (SELECT relreplident FROM pg_class WHERE oid = v_part) NOT IN ('d', 'f') THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY DEFAULT', v_part);
            END IF;
        ELSIF v_index IS NOT NULL THEN
            IF NOT (SELECT indisreplident FROM pg_index WHERE indexrelid = v_index) THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I', v_part,
                               (SELECT relname FROM pg_class WHERE oid = v_index));
            END IF;
        ELSIF (SELECT relreplident FROM pg_class WHERE oid = v_part) <> 'f' THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', v_part);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = v_part AND g.tgname = 'pgturso_capture_truncate') THEN
            IF v_part = rel THEN
                EXECUTE format('CREATE TRIGGER pgturso_capture_truncate AFTER TRUNCATE ON %s '
                               'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', v_part, v_function);
            ELSE
                EXECUTE format('CREATE TRIGGER pgturso_capture_truncate BEFORE TRUNCATE ON %s '
                               'FOR EACH STATEMENT EXECUTE FUNCTION pgturso._capture_partition_truncate(%s)',
                               v_part, table_id);
            END IF;
            -- Gone with the extension, like the capture triggers (docs/security.md).
            EXECUTE format('ALTER TRIGGER pgturso_capture_truncate ON %s DEPENDS ON EXTENSION pgturso', v_part);
        END IF;
    END LOOP;
    -- (After the replica identity: the event trigger refuses this ALTER TABLE on a filtered table without FULL.)
    -- pgoutput evaluates the filter while decoding: a row on which it raises (10 / n with n = 0) would stop
    -- the slot for good (every later read decodes it again). As in trigger mode, where capture evaluates it
    -- in the writer's statement, such a row is refused to its writer instead: a CHECK that evaluates the filter
    -- and is always true otherwise (num_nulls is not folded away). Existing rows are checked now.
    IF plan -> 'spec' ->> 'row_filter' IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = rel AND c.conname = 'pgturso_row_filter') THEN
        BEGIN
            EXECUTE format('ALTER TABLE %s ADD CONSTRAINT pgturso_row_filter CHECK (num_nulls(%s) >= 0)', rel,
                           plan -> 'spec' ->> 'row_filter');
        EXCEPTION WHEN data_exception THEN
            GET STACKED DIAGNOSTICS v_generated = MESSAGE_TEXT;
            RAISE EXCEPTION 'pgturso: the row filter of % fails on a row of the table: %', rel, v_generated
                USING HINT = 'Make the filter total over the rows (e.g. NULLIF(n, 0) instead of n as a divisor), or '
                             'fix the row: with capture => ''wal'' a filter that fails on a row would stop the slot.';
        END;
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._install_wal_capture IS
    'Private: publish a wal-captured table with its key as replica identity, and its TRUNCATE triggers.';

CREATE OR REPLACE FUNCTION pgturso._remove_wal_capture(rel regclass) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_part regclass;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
               WHERE p.pubname = 'pgturso_tables' AND r.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION pgturso_tables DROP TABLE ONLY %s', rel);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = rel AND c.conname = 'pgturso_row_filter') THEN
        PERFORM set_config('pgturso.dropping_row_filter', rel::oid::regclass::text, true);  -- see _on_sql_drop
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT pgturso_row_filter', rel);
        PERFORM set_config('pgturso.dropping_row_filter', '', true);
    END IF;
    FOR v_part IN SELECT rel UNION SELECT relid FROM pg_partition_tree(rel) LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS pgturso_capture_truncate ON %s', v_part);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._remove_wal_capture IS 'Private: stop publishing a wal-captured table.';

-- DROP EXTENSION cannot run extension code afterwards, and slots are not extension members: drop them (and
-- the publications, which are not members either) when the command starts. Event triggers cannot see
-- which extension is being dropped at that point; the statement's text names it.
CREATE OR REPLACE FUNCTION pgturso._on_drop_extension() RETURNS event_trigger
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_target text;
BEGIN
    IF current_query() !~* '\mpgturso\M' THEN
        RETURN;
    END IF;
    FOR v_target IN SELECT name FROM pgturso.target LOOP
        PERFORM pgturso._drop_slot(v_target);
    END LOOP;
    -- The row filters' CHECK constraints on wal tables are not extension members either.
    FOR v_target IN SELECT c.conrelid::regclass::text FROM pg_constraint c
                    JOIN pgturso.tracked_table t ON t.relid = c.conrelid WHERE c.conname = 'pgturso_row_filter' LOOP
        PERFORM set_config('pgturso.dropping_row_filter', v_target::regclass::text, true);  -- see _on_sql_drop
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT pgturso_row_filter', v_target);
    END LOOP;
    PERFORM set_config('pgturso.dropping_row_filter', '', true);
    DROP PUBLICATION IF EXISTS pgturso_tables, pgturso_outbox;
END
$$;
COMMENT ON FUNCTION pgturso._on_drop_extension IS
    'Private: DROP EXTENSION pgturso drops the replication slots and publications of wal capture.';
DROP EVENT TRIGGER IF EXISTS pgturso_drop_extension;
CREATE EVENT TRIGGER pgturso_drop_extension ON ddl_command_start WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION pgturso._on_drop_extension();

-- pg_restore: the publications pgturso_outbox and pgturso_tables are made by CREATE EXTENSION, and a publication
-- cannot belong to an extension, so pg_dump dumps them too and the restore's CREATE PUBLICATION would fail
-- ("already exists": pg_restore reports errors, and --exit-on-error or --single-transaction restores stop).
-- They cannot be made later, by the first wal table's track_table: pgoutput looks them up at every decoded
-- transaction, so they must exist before any slot, and a slot can only be made before its transaction writes.
-- So the restore's CREATE PUBLICATION replaces the extension's own, as long as that one is as CREATE
-- EXTENSION made it (no table published, no slot of this database): the dumped definition is the same, and
-- the outbox, an extension table whose membership pg_dump leaves out, is put back in at the command's end.
-- Runs as the caller (not SECURITY DEFINER): only the publications' owner can have them replaced.
CREATE OR REPLACE FUNCTION pgturso._on_create_publication() RETURNS event_trigger
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_name text := substring(current_query() FROM '(?i)^\s*CREATE\s+PUBLICATION\s+"?(pgturso_outbox|pgturso_tables)"?(?:\s|;|$)');
BEGIN
    IF v_name IS NULL THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'ddl_command_end' THEN
        IF v_name = 'pgturso_outbox' AND NOT EXISTS (
                SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                WHERE p.pubname = 'pgturso_outbox' AND r.prrelid = 'pgturso.outbox'::regclass) THEN
            ALTER PUBLICATION pgturso_outbox ADD TABLE ONLY pgturso.outbox;
        END IF;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots s
               WHERE s.database = current_database() AND s.slot_name LIKE 'pgturso\_%')
       OR EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                  WHERE p.pubname = v_name AND r.prrelid <> 'pgturso.outbox'::regclass) THEN
        RETURN;  -- in use: the CREATE fails as it would
    END IF;
    EXECUTE format('DROP PUBLICATION IF EXISTS %I', v_name);
END
$$;
COMMENT ON FUNCTION pgturso._on_create_publication IS
    'Private: a restored dump''s CREATE PUBLICATION of pgturso''s publications replaces the unused ones '
    'CREATE EXTENSION made, so pg_restore runs without errors.';
DROP EVENT TRIGGER IF EXISTS pgturso_create_publication;
CREATE EVENT TRIGGER pgturso_create_publication ON ddl_command_start WHEN TAG IN ('CREATE PUBLICATION')
    EXECUTE FUNCTION pgturso._on_create_publication();
DROP EVENT TRIGGER IF EXISTS pgturso_create_publication_end;
CREATE EVENT TRIGGER pgturso_create_publication_end ON ddl_command_end WHEN TAG IN ('CREATE PUBLICATION')
    EXECUTE FUNCTION pgturso._on_create_publication();

REVOKE ALL ON FUNCTION pgturso._slot_name(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._prepare_wal_capture(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._drop_slot(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._install_wal_capture(regclass, integer, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._remove_wal_capture(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._on_drop_extension() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._on_create_publication() FROM PUBLIC;
