-- track_table / untrack_table / refresh_materialized_view: install and remove a table's capture.
-- Schema changes of tracked tables are followed by the event triggers of 30_schema_changes.sql, which use the
-- same helpers (_describe, _install_capture) to compute a new layout.

-- Wake the worker (it LISTENs on 'pgturso' while idle). Not in a session with pgturso.notify = off: Postgres
-- refuses to PREPARE a transaction that sent a NOTIFY, and such a session's changes are found by the worker's
-- idle_wait polling instead (docs/design.md, "What writers wait for").
CREATE OR REPLACE FUNCTION pgturso._wake_worker() RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
BEGIN
    IF @NOTIFY_ENABLED@ THEN
        PERFORM pg_notify('pgturso', '');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._wake_worker IS
    'Private: NOTIFY the worker, unless this session set pgturso.notify = off (it prepares transactions).';
REVOKE ALL ON FUNCTION pgturso._wake_worker() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgturso._base_type(typ oid) RETURNS oid
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    WITH RECURSIVE chain(oid, base, depth) AS (
        SELECT t.oid, t.typbasetype, 0 FROM pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typbasetype, c.depth + 1 FROM chain c JOIN pg_type t ON t.oid = c.base
    )
    SELECT coalesce(
               -- An array of a domain (or a domain over one) is read as the array of the type under the
               -- domain: the worker casts decoded text to this type, and a cast to the domain's array would
               -- run the domain's CHECK, code of the domain's owner, with the worker's rights.
               -- (the array of a domain over an array is that array: Postgres arrays have no nesting).
               (SELECT CASE WHEN eb.typcategory = 'A' THEN eb.oid ELSE nullif(eb.typarray, 0) END
                FROM pg_type a JOIN pg_type eb ON eb.oid = pgturso._base_type(a.typelem)
                WHERE a.oid = b.oid AND a.typcategory = 'A' AND a.typelem <> 0 AND eb.oid <> a.typelem),
               b.oid)
    FROM (SELECT oid FROM chain ORDER BY depth DESC LIMIT 1) AS b
$$;
COMMENT ON FUNCTION pgturso._base_type IS
    'Private: the type under a (possibly nested) domain; for an array of a domain, the array of the type under it.';

-- Whether values of a type are encoded by functions built into Postgres only: the type under any domain is
-- built in (an oid below FirstNormalObjectId, 16384, given at initdb), or is an array of such a type. Any
-- other type (enum, composite, range, extension type...) may have an owner who is not a superuser and who
-- may CREATE CAST from it, which json_build_array, to_json and ::text would call: pgturso.types.USER_TYPE.
CREATE OR REPLACE FUNCTION pgturso._trusted_type(typ oid) RETURNS boolean
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT b.oid < 16384 OR (b.typcategory = 'A' AND b.typelem <> 0 AND pgturso._base_type(b.typelem) < 16384)
    FROM pg_type b WHERE b.oid = pgturso._base_type(typ)
$$;
COMMENT ON FUNCTION pgturso._trusted_type IS
    'Private: a type whose values only built-in functions encode (built in, under domains; arrays of it).';

CREATE OR REPLACE FUNCTION pgturso._capture_function_name(table_id integer) RETURNS text
LANGUAGE sql IMMUTABLE
@SESSION_SETTINGS@
AS $$ SELECT '_capture_' || table_id $$;
COMMENT ON FUNCTION pgturso._capture_function_name IS 'Private: name of a tracked table''s capture function.';

-- The Turso name of a Postgres relation: the bare name in public, schema.name elsewhere (indexes too).
CREATE OR REPLACE FUNCTION pgturso._turso_name(rel oid) RETURNS text
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT CASE WHEN n.nspname = 'public' THEN c.relname::text ELSE n.nspname || '.' || c.relname END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$$;
COMMENT ON FUNCTION pgturso._turso_name IS 'Private: default Turso name of a table or index.';

-- SQLite compares names ignoring the case of ASCII letters: two names equal under this clash on Turso.
CREATE OR REPLACE FUNCTION pgturso._sqlite_name(name text) RETURNS text
LANGUAGE sql IMMUTABLE
@SESSION_SETTINGS@
AS $$ SELECT translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') $$;
COMMENT ON FUNCTION pgturso._sqlite_name IS 'Private: a name as SQLite compares it (ASCII case folded).';

-- SQLite keeps tables and indexes in one namespace and compares names without ASCII case: a Turso name of a
-- table or of one of its indexes that another table or index of the target has (or another of its own names)
-- would make the CREATE fail on Turso and stop the whole target. Checked by track_table and at every schema
-- change (_follow_schema) against the latest layout of every other table of the target.
CREATE OR REPLACE FUNCTION pgturso._check_turso_names(rel regclass, target text, table_id integer,
                                                      target_table text, indexes jsonb) RETURNS void
LANGUAGE plpgsql STABLE
@SESSION_SETTINGS@
AS $$
DECLARE
    v_clash text;
BEGIN
    WITH mine AS (
        SELECT _check_turso_names.target_table AS name
        UNION ALL
        SELECT i ->> 'name' FROM jsonb_array_elements(coalesce(indexes, '[]')) AS i
    ), others AS (
        SELECT t.target_table AS name FROM pgturso.tracked_table t
        WHERE t.target = _check_turso_names.target AND t.id IS DISTINCT FROM _check_turso_names.table_id
        UNION ALL
        SELECT i ->> 'name'
        FROM (SELECT DISTINCT ON (l.table_id) l.spec
              FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
              WHERE t.target = _check_turso_names.target AND t.id IS DISTINCT FROM _check_turso_names.table_id
              ORDER BY l.table_id, l.id DESC) AS latest,
             jsonb_array_elements(coalesce(latest.spec -> 'indexes', '[]')) AS i
    )
    SELECT m.name INTO v_clash FROM mine m
    WHERE EXISTS (SELECT 1 FROM others o WHERE pgturso._sqlite_name(o.name) = pgturso._sqlite_name(m.name))
       OR (SELECT count(*) FROM mine m2 WHERE pgturso._sqlite_name(m2.name) = pgturso._sqlite_name(m.name)) > 1
    LIMIT 1;
    IF v_clash IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would use the name "%" on Turso, which another table or index there already has',
                        rel, v_clash
            USING DETAIL = 'Turso (SQLite) keeps tables and indexes in one namespace and compares names without '
                           'the case of ASCII letters.',
                  HINT = 'Rename the index (ALTER INDEX ... RENAME TO ...) or the table, pass another '
                         'target_table => ''name'' to pgturso.track_table, or track it with indexes => false.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._check_turso_names IS
    'Private: refuses a table whose Turso table or index names clash (ASCII case folded) with others of its target.';

CREATE OR REPLACE FUNCTION pgturso._is_deferrable(index_id oid) RETURNS boolean
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$ SELECT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = index_id AND con.condeferrable) $$;
COMMENT ON FUNCTION pgturso._is_deferrable IS 'Private: whether an index backs a DEFERRABLE constraint.';

-- Reading a table's rows in the caller's transaction (a copy, or the keys a partition takes away) is right only
-- in READ COMMITTED, where each statement sees what the lock it waited for protects. A REPEATABLE READ or
-- SERIALIZABLE transaction took its snapshot when it began, maybe before the lock: rows committed in between
-- would be missed on Turso. Paths that can hand the copy to the worker (pgturso._copy_chunk, READ COMMITTED)
-- do so; the others call this to refuse.
CREATE OR REPLACE FUNCTION pgturso._snapshot_is_current() RETURNS boolean
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$ SELECT current_setting('transaction_isolation') = 'read committed' $$;
COMMENT ON FUNCTION pgturso._snapshot_is_current IS
    'Private: whether each statement of this transaction sees what committed before it (READ COMMITTED).';

CREATE OR REPLACE FUNCTION pgturso._require_current_snapshot(operation text, rel regclass) RETURNS void
LANGUAGE plpgsql STABLE
@SESSION_SETTINGS@
AS $$
BEGIN
    IF NOT pgturso._snapshot_is_current() THEN
        RAISE EXCEPTION 'pgturso: % of table % cannot run in a % transaction',
                        operation, rel, upper(current_setting('transaction_isolation'))
            USING DETAIL = 'pgturso must read the rows the table''s lock protects, and this transaction''s '
                           'snapshot may be older than that lock: rows committed meanwhile would be wrong on Turso.',
                  HINT = 'Run it in a READ COMMITTED transaction (BEGIN ISOLATION LEVEL READ COMMITTED; ...; '
                         'COMMIT), or SET default_transaction_isolation = ''read committed'' for the session.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._require_current_snapshot IS
    'Private: refuse an operation that reads a tracked table''s rows outside READ COMMITTED.';

-- A materialized view read in this transaction must not be refreshed by another until this commits. LOCK TABLE
-- refuses materialized views; ANALYZE takes SHARE UPDATE EXCLUSIVE, which REFRESH (ACCESS EXCLUSIVE) and
-- REFRESH ... CONCURRENTLY (EXCLUSIVE) both wait for, and holds it to the end of the transaction.
CREATE OR REPLACE FUNCTION pgturso._lock_materialized_view(rel regclass) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$ BEGIN EXECUTE format('ANALYZE %s', rel); END $$;
COMMENT ON FUNCTION pgturso._lock_materialized_view IS
    'Private: keep other REFRESHes of a materialized view out until this transaction ends.';

-- The key a table replicates by: key_columns if given, else the primary key, else the unique index over NOT
-- NULL columns with the fewest columns (materialized views: any unique index, NULLs allowed by Postgres).
-- DEFERRABLE constraints never serve: a deferred uniqueness check lets a second writer of a key go on without
-- waiting for the first, so their outbox ids need not follow their commit order (docs/design.md, fact 1).
CREATE OR REPLACE FUNCTION pgturso._key_columns(rel regclass, explicit text[]) RETURNS text[]
LANGUAGE plpgsql STABLE
@SESSION_SETTINGS@
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
    WHERE i.indrelid = rel AND i.indisprimary AND NOT pgturso._is_deferrable(i.indexrelid);
    IF v_keys IS NOT NULL THEN
        RETURN v_keys;
    END IF;
    SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord)
            FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
    INTO v_keys
    FROM pg_index i
    WHERE i.indrelid = rel AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
      AND NOT (0 = ANY (i.indkey[0:i.indnkeyatts - 1])) AND NOT pgturso._is_deferrable(i.indexrelid)
      AND (v_kind = 'm' OR NOT EXISTS (
              SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) AS k(attnum)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE NOT a.attnotnull))
    ORDER BY i.indnkeyatts, i.indexrelid::regclass::text
    LIMIT 1;
    IF v_keys IS NULL THEN
        SELECT con.conname INTO v_bad FROM pg_constraint con
        WHERE con.conrelid = rel AND con.contype IN ('p', 'u') AND con.condeferrable
        ORDER BY con.contype, con.conname LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'pgturso: the only key of table % is the DEFERRABLE constraint "%"', rel, v_bad
                USING DETAIL = 'A deferred uniqueness check lets two transactions write the same key without '
                               'waiting for each other, so pgturso could apply their changes on Turso in the '
                               'wrong order.',
                      HINT = format('Make the key NOT DEFERRABLE (ALTER TABLE %s DROP CONSTRAINT %I, then ADD '
                                    'PRIMARY KEY (...) without DEFERRABLE), or add a NOT DEFERRABLE unique '
                                    'index over NOT NULL columns for pgturso to replicate by.', rel, v_bad);
        END IF;
    END IF;
    RETURN v_keys;
END
$$;
COMMENT ON FUNCTION pgturso._key_columns IS 'Private: the columns a tracked table is keyed by on Turso (NULL: none).';

-- Row filters (track_table's row_filter) live in a publication of their own, pgturso_row_filter_<oid>, that
-- publishes nothing (publish = ''): Postgres 15 checks the filter exactly as for logical replication (columns of
-- the table, built-in immutable functions, operators and types only, no subqueries), keeps it in step with
-- column renames, and refuses to drop a column it uses. Capture evaluates pg_get_expr of it, never the text the
-- caller wrote: only built-in immutable code, whoever runs it.
CREATE OR REPLACE FUNCTION pgturso._create_row_filter(rel regclass, row_filter text) RETURNS text
LANGUAGE plpgsql
@SESSION_SETTINGS@
-- CREATE PUBLICATION warns when wal_level is not logical: irrelevant here, nothing is published.
SET client_min_messages = error
AS $$
DECLARE
    v_publication text := 'pgturso_row_filter_' || rel::oid;
    v_message text;
    v_detail text;
BEGIN
    IF row_filter IS NULL OR btrim(row_filter) = '' THEN
        RAISE EXCEPTION 'pgturso: the row filter of % is empty', rel
            USING HINT = 'Pass a boolean expression over the table''s columns, e.g. row_filter => $f$status <> '
                         '''draft''$f$, or leave row_filter out to replicate every row.';
    END IF;
    BEGIN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE ONLY %s WHERE (%s) '
                       'WITH (publish = '''', publish_via_partition_root = true)', v_publication, rel, row_filter);
    EXCEPTION WHEN syntax_error OR undefined_column OR undefined_function OR datatype_mismatch
                   OR feature_not_supported OR invalid_object_definition OR undefined_object
                   OR grouping_error OR windowing_error OR invalid_text_representation
                   OR ambiguous_column OR ambiguous_function OR undefined_table THEN
        GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
        RAISE EXCEPTION 'pgturso: row filter of % is not allowed: %', rel,
                        replace(v_message, 'publication WHERE expression', 'row filter')
            USING DETAIL = coalesce(nullif(v_detail, ''), 'row_filter: ' || row_filter),
                  HINT = 'A row filter is a boolean expression over the table''s own columns using built-in '
                         'immutable functions and operators only (no subqueries, user-defined functions or types, '
                         'system columns), as in a Postgres 15 publication: e.g. status <> ''draft''.';
    END;
    RETURN v_publication;
END
$$;
COMMENT ON FUNCTION pgturso._create_row_filter IS
    'Private: check a row filter and keep it in its own publication (which publishes nothing); returns its name.';

CREATE OR REPLACE FUNCTION pgturso._row_filter(rel regclass, options jsonb) RETURNS text
LANGUAGE plpgsql STABLE
@SESSION_SETTINGS@
AS $$
DECLARE
    v_filter text;
BEGIN
    IF NOT options ? 'row_filter_publication' THEN
        RETURN NULL;
    END IF;
    SELECT pg_get_expr(pr.prqual, pr.prrelid) INTO v_filter
    FROM pg_publication p JOIN pg_publication_rel pr ON pr.prpubid = p.oid
    WHERE p.pubname = options ->> 'row_filter_publication' AND pr.prrelid = rel AND pr.prqual IS NOT NULL;
    IF v_filter IS NULL AND NOT EXISTS (SELECT 1 FROM pg_publication p
                                        WHERE p.pubname = options ->> 'row_filter_publication') THEN
        -- No such publication at all: pg_restore makes publications after the constraints, whose DDL is
        -- followed before then. The table's filter is its last layout's (a DROP COLUMN ... CASCADE removes
        -- the table from the publication, not the publication: that case stays an error below).
        SELECT l.spec ->> 'row_filter' INTO v_filter FROM pgturso.layout l
        JOIN pgturso.tracked_table t ON t.id = l.table_id
        WHERE t.relid = rel ORDER BY l.id DESC LIMIT 1;
    END IF;
    IF v_filter IS NULL THEN
        RAISE EXCEPTION 'pgturso: the row filter of tracked table % is gone (publication %)', rel,
                        options ->> 'row_filter_publication'
            USING HINT = 'A column the filter uses cannot be dropped, nor the publication changed, while the table '
                         'is tracked with it: untrack the table first (pgturso.untrack_table), then track it again.';
    END IF;
    RETURN v_filter;
END
$$;
COMMENT ON FUNCTION pgturso._row_filter IS 'Private: a tracked table''s row filter as Postgres deparses it (NULL: none).';

CREATE OR REPLACE FUNCTION pgturso._drop_row_filter(options jsonb) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
BEGIN
    IF options ? 'row_filter_publication' THEN
        EXECUTE format('DROP PUBLICATION IF EXISTS %I', options ->> 'row_filter_publication');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._drop_row_filter IS 'Private: drop the publication holding a tracked table''s row filter.';

-- Everything _plan_layout needs to know about a relation, read from the catalog.
-- options -> 'column_attnums': track_table's column list, by attnum (a rename keeps a column in or out of it,
-- a column added later is out). options ->> 'row_filter_publication': the publication holding the row filter.
CREATE OR REPLACE FUNCTION pgturso._describe(
    rel regclass, options jsonb,
    OUT source_table text, OUT target_table text, OUT columns jsonb, OUT key_columns text[], OUT indexes jsonb,
    OUT row_filter text, OUT route_by text
)
LANGUAGE plpgsql STABLE
@SESSION_SETTINGS@
AS $$
DECLARE
    v_excluded text;
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname) INTO source_table
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    target_table := coalesce(options ->> 'target_table', pgturso._turso_name(rel::oid));
    key_columns := pgturso._key_columns(rel, (SELECT array_agg(x) FROM jsonb_array_elements_text(
                                                 options -> 'key_columns') AS x));
    SELECT jsonb_agg(jsonb_build_object(
               'name', a.attname,
               'attnum', a.attnum,
               'pg_type', format_type(a.atttypid, a.atttypmod),
               'base_type', bt.typname,
               'kind', CASE WHEN bt.typcategory = 'A' THEN 'A' ELSE bt.typtype::text END,
               'typmod', CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
               'not_null', a.attnotnull,
               'deterministic', coalesce((SELECT co.collisdeterministic FROM pg_collation co
                                          WHERE co.oid = a.attcollation), true),
               'trusted', pgturso._trusted_type(a.atttypid),
               'base_pg_type', format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END))
           ORDER BY a.attnum)
    INTO columns
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    JOIN pg_type bt ON bt.oid = pgturso._base_type(a.atttypid)
    WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
      AND (NOT options ? 'column_attnums' OR options -> 'column_attnums' @> to_jsonb(a.attnum::integer));
    IF options ? 'column_attnums' THEN
        SELECT k INTO v_excluded FROM unnest(key_columns) AS k
        WHERE NOT columns @> jsonb_build_array(jsonb_build_object('name', k));
        IF v_excluded IS NOT NULL THEN
            RAISE EXCEPTION 'pgturso: key column "%" of % is not among the columns replicated to Turso', v_excluded, rel
                USING HINT = 'Turso needs the key to apply updates and deletes: include every key column in '
                             'columns => ARRAY[...] (or keep the key on replicated columns).';
        END IF;
    END IF;
    row_filter := pgturso._row_filter(rel, options);
    IF options ? 'route_attnum' THEN  -- by attnum: a rename of the column is followed
        SELECT a.attname INTO route_by FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attnum = (options ->> 'route_attnum')::integer AND NOT a.attisdropped;
        IF route_by IS NULL OR NOT columns @> jsonb_build_array(jsonb_build_object('name', route_by, 'not_null', true))
        THEN
            RAISE EXCEPTION 'pgturso: the route_by column of % must be a replicated NOT NULL column', rel
                USING HINT = 'Its value names the tenant database each row goes to: keep it NOT NULL and in the '
                             'column list (or untrack the table first).';
        END IF;
    END IF;
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
          AND NOT pgturso._is_deferrable(i.indexrelid);
    ELSE
        indexes := '[]';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._describe IS
    'Private: a relation''s names, replicated columns, key, indexes and row filter for its layout.';

-- Keys Turso could not tell apart the way Postgres does: an array key's bounds are not in its JSON form
-- ('{1,2}' and '[0:1]={1,2}' are two keys in Postgres, one on Turso).
CREATE OR REPLACE FUNCTION pgturso._check_key(rel regclass, columns jsonb, key_columns text[]) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_bad text;
BEGIN
    SELECT c ->> 'name' INTO v_bad FROM jsonb_array_elements(columns) AS c
    WHERE c ->> 'kind' = 'A' AND c ->> 'name' = ANY (key_columns) LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: key column "%" of % is an array, which cannot key a Turso table', v_bad, rel
            USING HINT = format('Arrays with other lower bounds are different keys in Postgres but the same on '
                                'Turso. Key the table by other columns: a primary key, or '
                                'pgturso.track_table(%L, key_columns => ARRAY[...]).', rel::text);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._check_key IS 'Private: refuse keys that Turso cannot keep apart as Postgres does.';
REVOKE ALL ON FUNCTION pgturso._check_key(regclass, jsonb, text[]) FROM PUBLIC;

-- An unlogged table is emptied by crash recovery and is empty on a promoted standby, without any trigger
-- firing: Turso would keep rows Postgres lost. Refused for tracked tables (and their partitions).
CREATE OR REPLACE FUNCTION pgturso._refuse_unlogged(rels oid[]) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_rel regclass;
BEGIN
    SELECT c.oid INTO v_rel FROM unnest(rels) AS x(rel)
    JOIN pg_class c ON c.oid IN (SELECT x.rel UNION SELECT relid FROM pg_partition_tree(x.rel))
    WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p', 'm') LIMIT 1;
    IF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % is unlogged, so a crash or a failover empties it without Postgres telling '
                        'pgturso', v_rel
            USING HINT = format('Make it logged (ALTER TABLE %s SET LOGGED) to replicate it, or untrack it first.',
                                v_rel);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._refuse_unlogged IS 'Private: refuse unlogged tables (crash recovery empties them).';
REVOKE ALL ON FUNCTION pgturso._refuse_unlogged(oid[]) FROM PUBLIC;

-- What to select a relation's rows from: ONLY for a plain table (inheritance children are not tracked).
-- Only tables and materialized views are read: a view (a table can become one, CREATE RULE "_RETURN") or a
-- foreign table would run code its owner chose with the reader's rights (docs/security.md).
CREATE OR REPLACE FUNCTION pgturso._row_source(rel regclass) RETURNS text
LANGUAGE plpgsql STABLE
@SESSION_SETTINGS@
AS $$
DECLARE
    v_kind "char" := (SELECT c.relkind FROM pg_class c WHERE c.oid = rel);
BEGIN
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p', 'm') THEN
        RAISE EXCEPTION 'pgturso: % is not a table or materialized view (relkind %)', rel, v_kind
            USING HINT = 'pgturso reads only tables and materialized views; untrack it: '
                         'SELECT pgturso.untrack_table(' || quote_literal(rel::text) || ').';
    END IF;
    RETURN CASE WHEN v_kind = 'r' THEN 'ONLY ' ELSE '' END || rel::text;
END
$$;
COMMENT ON FUNCTION pgturso._row_source IS 'Private: FROM clause text for a tracked relation''s rows.';

-- Whether a tracked table's capture is off: a capture trigger of it (or of a partition) disabled, or set to
-- fire only under session_replication_role = replica. Its writes are then not replicated (pgturso.status).
CREATE OR REPLACE FUNCTION pgturso._capture_disabled(table_id integer) RETURNS boolean
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger g
                   WHERE g.tgname LIKE 'pgturso\_capture\_%' AND g.tgenabled IN ('D', 'R')
                     AND g.tgfoid = to_regprocedure(format('pgturso.%I()', pgturso._capture_function_name(table_id))))
$$;
COMMENT ON FUNCTION pgturso._capture_disabled IS
    'Private: whether a tracked table''s capture triggers are disabled (ALTER TABLE ... DISABLE TRIGGER).';
-- Private like every pgturso function (90_privileges.sql revokes them from PUBLIC); pgturso.status calls it, so
-- grant_worker grants it to the worker's role with the view.

-- How a tracked table is captured: by its target's capture mode ('trigger' or 'wal').
CREATE OR REPLACE FUNCTION pgturso._capture_of(table_id integer) RETURNS text
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT g.capture FROM pgturso.tracked_table t JOIN pgturso.target g ON g.name = t.target WHERE t.id = table_id
$$;
COMMENT ON FUNCTION pgturso._capture_of IS 'Private: the capture mode of a tracked table (its target''s).';

-- Install (or, after a schema change, replace) the capture function, and the triggers if missing.
CREATE OR REPLACE FUNCTION pgturso._install_capture(rel regclass, table_id integer, plan jsonb) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_function text := pgturso._capture_function_name(table_id);
    v_kind "char";
    v_part regclass;
    v_trigger name;
BEGIN
    SELECT relkind INTO v_kind FROM pg_class WHERE oid = rel;
    IF v_kind <> 'm' AND pgturso._capture_of(table_id) = 'wal' THEN  -- no trigger: the slot has the rows
        PERFORM pgturso._install_wal_capture(rel, table_id, plan);
        RETURN;
    END IF;
    IF v_kind = 'm' THEN
        EXECUTE plan ->> 'refresh_function_sql';
        EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I(regclass, boolean) FROM PUBLIC', v_function || '_refresh');
        EXECUTE format('ALTER FUNCTION pgturso.%I(regclass, boolean) DEPENDS ON EXTENSION pgturso',
                       v_function || '_refresh');
        RETURN;
    END IF;
    EXECUTE plan ->> 'capture_function_sql';
    EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I() FROM PUBLIC', v_function);
    -- The generated function and triggers are not members of the extension (pg_dump dumps them with the
    -- tables), but they go with it: DROP EXTENSION pgturso removes them, so the tables work as before.
    EXECUTE format('ALTER FUNCTION pgturso.%I() DEPENDS ON EXTENSION pgturso', v_function);
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
    FOR v_part, v_trigger IN
        SELECT g.tgrelid::regclass, g.tgname FROM pg_trigger g
        WHERE g.tgname IN ('pgturso_capture_insert', 'pgturso_capture_update', 'pgturso_capture_delete',
                           'pgturso_capture_truncate')
          AND g.tgrelid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_trigger'::regclass AND d.objid = g.oid AND d.deptype = 'x')
    LOOP
        EXECUTE format('ALTER TRIGGER %I ON %s DEPENDS ON EXTENSION pgturso', v_trigger, v_part);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._install_capture IS 'Private: (re)create a tracked relation''s capture.';

-- Truncating a partition of a tracked partitioned table: its rows' keys as delete events.
CREATE OR REPLACE FUNCTION pgturso._capture_partition_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    v_root regclass;
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    -- SECURITY DEFINER (it writes the outbox): it trusts neither its argument nor the table firing it. Only
    -- the trigger _install_capture creates qualifies: BEFORE TRUNCATE, FOR EACH STATEMENT, on a partition
    -- (at any depth) of the tracked table whose id is its one argument.
    IF TG_NARGS = 1 AND TG_NAME = 'pgturso_capture_truncate' AND TG_WHEN = 'BEFORE' AND TG_LEVEL = 'STATEMENT'
       AND TG_OP = 'TRUNCATE' AND TG_ARGV[0] ~ '^[0-9]{1,9}$' THEN
        SELECT t.relid INTO v_root FROM pgturso.tracked_table t
        WHERE t.id = TG_ARGV[0]::integer AND t.dropped_at IS NULL;
    END IF;
    IF v_root IS NULL OR TG_RELID = v_root::oid
       OR NOT EXISTS (SELECT 1 FROM pg_partition_tree(v_root) p WHERE p.relid::oid = TG_RELID) THEN
        RAISE EXCEPTION 'pgturso: _capture_partition_truncate fired on %, which is not a partition of the '
                        'tracked table it names', TG_RELID::regclass
            USING HINT = 'It is pgturso''s own trigger function: only pgturso.track_table attaches it. '
                         'Drop this trigger.';
    END IF;
    -- TRUNCATE holds its lock already; the keys must be read in a snapshot taken after it.
    PERFORM pgturso._require_current_snapshot('TRUNCATE of a partition', TG_RELID::regclass);
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = TG_ARGV[0]::integer ORDER BY l.id DESC LIMIT 1;
    EXECUTE pgturso._plan_rows(v_layout_id, v_spec, TG_RELID::regclass::text, 'D'::text);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgturso._capture_partition_truncate IS
    'Private: trigger sending the keys of a partition''s rows as deletes before TRUNCATE removes them.';

CREATE OR REPLACE FUNCTION pgturso._drop_capture_functions(table_id integer) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
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
CREATE OR REPLACE FUNCTION pgturso._remove_capture(rel regclass, table_id integer) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_part regclass;
    v_trigger text;
BEGIN
    PERFORM pgturso._remove_wal_capture(rel);
    IF to_regproc(format('pgturso.%I', pgturso._capture_function_name(table_id))) IS NULL THEN
        PERFORM pgturso._drop_capture_functions(table_id);
        RETURN;
    END IF;
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
CREATE OR REPLACE FUNCTION pgturso._forget_dropped() RETURNS void
LANGUAGE sql
@SESSION_SETTINGS@
AS $$
    DELETE FROM pgturso.tracked_table t
    WHERE t.dropped_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
                      WHERE l.table_id = t.id)
$$;
COMMENT ON FUNCTION pgturso._forget_dropped IS 'Private: forget dropped tables whose changes were all delivered.';

-- The chunked copy of a table's existing rows, driven by the worker, while capture already runs.
CREATE OR REPLACE FUNCTION pgturso._start_copy(table_id integer) RETURNS void
LANGUAGE sql
@SESSION_SETTINGS@
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
-- SECURITY DEFINER: the worker needs no right on application tables, and every row is copied whatever
-- row-level security says. It copies only tables being copied, and runs no code a user could define
-- (docs/security.md: key bounds are read back as built-in types, values encoded by output functions).
CREATE OR REPLACE FUNCTION pgturso._copy_chunk(table_id integer, max_rows integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
@CAPTURE_SETTINGS@
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
    IF max_rows IS NULL OR max_rows NOT BETWEEN 1 AND 10000000 THEN
        RAISE EXCEPTION 'pgturso: a copy chunk of % rows', max_rows
            USING HINT = 'Set copy_chunk_rows between 1 and 10,000,000.';
    END IF;
    SELECT t.relid, t.copy_after INTO v_rel, v_after FROM pgturso.tracked_table t
    WHERE t.id = table_id AND t.copy_state = 'copying' AND t.dropped_at IS NULL
    FOR UPDATE OF t;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = v_rel) NOT IN ('r', 'p') THEN
        -- Its owner turned it into something else (a view: CREATE RULE "_RETURN"): never read it.
        UPDATE pgturso.tracked_table t SET copy_state = 'done', copy_finished_at = now() WHERE t.id = table_id;
        RAISE WARNING 'pgturso: % is no longer a table; its copy is abandoned', v_rel
            USING HINT = format('SELECT pgturso.untrack_table(%L)', v_rel::text);
        RETURN 0;
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
        PERFORM pgturso._wake_worker();
    END IF;
    RETURN v_rows;
END
$$;

CREATE OR REPLACE FUNCTION pgturso.track_table(
    rel regclass,
    target_table text DEFAULT NULL,
    key_columns text[] DEFAULT NULL,
    indexes boolean DEFAULT true,
    drop_target boolean DEFAULT false,
    target text DEFAULT 'default',
    columns text[] DEFAULT NULL,
    row_filter text DEFAULT NULL,
    capture text DEFAULT NULL,
    route_by text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
-- The initial copy encodes values exactly as the capture functions do: the settings placeholder below is
-- replaced by pgturso.capture.CAPTURE_SETTINGS when extension/build.py builds the script.
@CAPTURE_SETTINGS@
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
    v_attnums integer[];
    v_unknown text;
    v_capture text;
    v_route_attnum integer;
BEGIN
    -- Turso stores text as UTF-8, and the worker asks Postgres for UTF-8 (worker/pgturso/common/postgres.py),
    -- which Postgres converts to from any database encoding but SQL_ASCII (bytes of no declared encoding).
    IF current_setting('server_encoding') <> 'UTF8' AND NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_conversion c
            WHERE c.condefault AND c.conforencoding = pg_catalog.pg_char_to_encoding(current_setting('server_encoding'))
              AND c.contoencoding = pg_catalog.pg_char_to_encoding('UTF8')) THEN
        RAISE EXCEPTION 'pgturso: cannot track %: database % has encoding %, which Postgres cannot convert to UTF-8 (Turso stores text as UTF-8)',
            rel, current_database(), current_setting('server_encoding')
            USING HINT = 'Replicate from a database with a real encoding (UTF8, LATIN1, WIN1252, ...): create one '
                         'with CREATE DATABASE ... ENCODING ''UTF8'' TEMPLATE template0 and move the table there.';
    END IF;
    -- The capture mode is the target's: one slot feeds one target's worker, in commit order.
    v_capture := coalesce(track_table.capture,
                          (SELECT g.capture FROM pgturso.target g WHERE g.name = track_table.target), 'trigger');
    IF v_capture NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'pgturso: unknown capture mode %', v_capture
            USING HINT = 'Use capture => ''trigger'' (the default) or capture => ''wal''.';
    END IF;
    IF v_capture = 'wal' AND EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = track_table.target) THEN
        PERFORM pgturso._prepare_wal_capture(track_table.target);  -- first: it must not follow a write
    END IF;
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
    IF (SELECT relpersistence FROM pg_class WHERE oid = rel) = 't' THEN
        RAISE EXCEPTION 'pgturso: % is a temporary table', rel
            USING HINT = 'Only its own session sees a temporary table, and it goes with the session: track a '
                         'permanent table.';
    END IF;
    PERFORM pgturso._refuse_unlogged(ARRAY[rel::oid]);
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE rel IN (i.inhparent, i.inhrelid) AND NOT c.relispartition) THEN
        RAISE EXCEPTION 'pgturso: % is part of an inheritance tree (INHERITS), which pgturso does not replicate', rel
            USING HINT = 'Statements on an inheritance parent include its children''s rows: use a partitioned '
                         'table instead, or detach the tables (ALTER TABLE child NO INHERIT parent) first.';
    END IF;
    PERFORM pgturso._forget_dropped();
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.relid = rel) THEN
        RAISE EXCEPTION 'pgturso: table % is already tracked', rel
            USING HINT = 'Call pgturso.untrack_table(''' || rel::text || ''') first to track it afresh.';
    END IF;

    -- Installing the capture triggers takes this lock anyway; writers wait only until this short
    -- transaction commits (the rows are copied afterwards, in chunks). A materialized view changes only by
    -- REFRESH, which pgturso follows from here on (see 30_*.sql).
    -- A materialized view is copied right here: no REFRESH may commit until this does.
    IF v_kind <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    ELSE
        PERFORM pgturso._require_current_snapshot('track_table', rel);
        PERFORM pgturso._lock_materialized_view(rel);
    END IF;

    IF track_table.columns IS NOT NULL THEN
        SELECT c INTO v_unknown FROM unnest(track_table.columns) AS c
        WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = c
                          AND a.attnum > 0 AND NOT a.attisdropped);
        IF v_unknown IS NOT NULL OR cardinality(track_table.columns) = 0 THEN
            RAISE EXCEPTION 'pgturso: "%" is not a column of %', coalesce(v_unknown, ''), rel
                USING HINT = 'columns => ARRAY[...] names the columns of the table that go to Turso (the key '
                             'included); leave it out to replicate every column.';
        END IF;
        SELECT array_agg(DISTINCT a.attnum ORDER BY a.attnum) INTO v_attnums FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attname = ANY (track_table.columns) AND a.attnum > 0 AND NOT a.attisdropped;
    END IF;
    v_options := jsonb_strip_nulls(jsonb_build_object(
        'target_table', track_table.target_table, 'key_columns', track_table.key_columns,
        'indexes', CASE WHEN NOT track_table.indexes THEN false END,
        'drop_target', CASE WHEN track_table.drop_target THEN true END,
        'column_attnums', to_jsonb(v_attnums)));
    IF strpos(track_table.target, '%s') > 0 OR track_table.route_by IS NOT NULL THEN
        IF strpos(track_table.target, '%s') = 0 THEN
            RAISE EXCEPTION 'pgturso: route_by needs a pattern target, not %', track_table.target
                USING HINT = 'Create one whose name holds %s: SELECT pgturso.add_target(''tenant-%s'', '
                             '''libsql://tenant-%s-myorg.turso.io'', ''token''), then track_table(..., '
                             'target => ''tenant-%s'', route_by => ''tenant_id'').';
        END IF;
        IF track_table.route_by IS NULL THEN
            -- A reference table: all of its rows go to every tenant database of the pattern, present and future.
            IF v_kind = 'm' THEN
                RAISE EXCEPTION 'pgturso: materialized view % cannot be a reference table of pattern target %',
                                rel, track_table.target
                    USING HINT = 'Track a table instead (e.g. one that the view''s query fills), or track the view '
                                 'to a named target of its own.';
            END IF;
            v_options := v_options || jsonb_build_object('reference', true);
        ELSE
            SELECT a.attnum INTO v_route_attnum FROM pg_attribute a
            WHERE a.attrelid = rel AND a.attname = track_table.route_by AND a.attnum > 0 AND NOT a.attisdropped;
            IF v_route_attnum IS NULL OR v_kind = 'm' THEN
                RAISE EXCEPTION 'pgturso: route_by "%" is not a column of table %', track_table.route_by, rel
                    USING HINT = 'route_by names a NOT NULL column of an ordinary or partitioned table whose value '
                                 'is the tenant (e.g. tenant_id).';
            END IF;
            v_options := v_options || jsonb_build_object('route_attnum', v_route_attnum);
        END IF;
    END IF;
    IF track_table.row_filter IS NOT NULL THEN
        v_options := v_options || jsonb_build_object(
            'row_filter_publication', pgturso._create_row_filter(rel, track_table.row_filter));
    END IF;
    v_desc := pgturso._describe(rel, v_options);
    IF v_desc.key_columns IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % has no primary key and no unique index over NOT NULL columns', rel
            USING HINT = format('Add one (ALTER TABLE %s ADD PRIMARY KEY (...)), or name columns whose values '
                                'are unique: pgturso.track_table(%L, key_columns => ARRAY[...]).', rel, rel::text);
    END IF;
    PERFORM pgturso._check_key(rel, v_desc.columns, v_desc.key_columns);
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
    -- A tenant's database gets its pattern's tables only: another stream of events would share its marker.
    -- Update the target's row first: a registration of a tenant of this name (pgturso._register_tenants)
    -- updates it too, so one of the two waits for the other and then sees it (or, under REPEATABLE READ, the
    -- later one gets a serialization failure): never both checking before either committed.
    UPDATE pgturso.target g SET generation = g.generation + 1 WHERE g.name = track_table.target;
    IF EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = track_table.target AND g.pattern IS NOT NULL) THEN
        RAISE EXCEPTION 'pgturso: % is a tenant database of pattern target %', track_table.target,
                        (SELECT g.pattern FROM pgturso.target g WHERE g.name = track_table.target)
            USING HINT = 'Track the table to the pattern (with route_by, or without it: a reference table sent to '
                         'every tenant), or to a target of its own (pgturso.add_target).';
    END IF;
    IF v_capture <> (SELECT g.capture FROM pgturso.target g WHERE g.name = track_table.target) THEN
        IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = track_table.target) THEN
            RAISE EXCEPTION 'pgturso: target % captures its tables by %, not %', track_table.target,
                (SELECT g.capture FROM pgturso.target g WHERE g.name = track_table.target), v_capture
                USING HINT = 'All tables of a target share one capture mode: track this one to another target '
                             '(pgturso.add_target), or untrack the target''s tables first.';
        END IF;
        UPDATE pgturso.target g SET capture = v_capture WHERE g.name = track_table.target;
        IF v_capture = 'trigger' THEN
            PERFORM pgturso._drop_slot(track_table.target);
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t
               WHERE t.target = track_table.target
                 AND pgturso._sqlite_name(t.target_table) = pgturso._sqlite_name(v_desc.target_table)) THEN
        RAISE EXCEPTION 'pgturso: another tracked table already replicates to Turso table "%"', v_desc.target_table
            USING HINT = 'Pass a different target_table => ''name'' to pgturso.track_table (or, if that table was '
                         'dropped, let the worker deliver its last changes first).';
    END IF;
    PERFORM pgturso._check_turso_names(rel, track_table.target, NULL, v_desc.target_table, v_desc.indexes);

    INSERT INTO pgturso.tracked_table (relid, target, target_table, options)
    VALUES (rel, track_table.target, v_desc.target_table, v_options) RETURNING id INTO v_table_id;
    -- The counters' row exists before the worker's first batch of the table: that batch only updates it. An
    -- insert would check its foreign key, locking this tracked_table row FOR KEY SHARE until Turso confirms
    -- the batch, and a RENAME of the table (a new Turso name: a key of this row) would wait for Turso while it
    -- holds the table's lock (test_renaming_a_table_whose_first_batch_turso_holds_never_waits_for_turso).
    -- Tenants of a pattern keep no per-table counters.
    IF strpos(track_table.target, '%s') = 0 THEN
        INSERT INTO pgturso.table_state (table_id) VALUES (v_table_id);
    END IF;
    INSERT INTO pgturso.layout (table_id, spec) VALUES (v_table_id, '{}') RETURNING id INTO v_layout_id;
    v_plan := pgturso._plan_layout(v_layout_id, pgturso._row_source(rel), v_desc.source_table, v_desc.target_table,
                                   v_desc.columns, v_desc.key_columns, pgturso._capture_function_name(v_table_id),
                                   v_desc.indexes, v_desc.row_filter, v_desc.route_by, v_options ? 'reference');
    UPDATE pgturso.layout SET spec = v_plan -> 'spec', generated = pgturso._generated_expressions(rel)
    WHERE id = v_layout_id;

    -- Create the Turso table and start capture now. The rows already there are copied by the worker in
    -- chunks of short transactions (pgturso._copy_chunk): writers are not held up by a long copy. A
    -- materialized view cannot lock rows and changes only by REFRESH: it is copied right here.
    PERFORM pgturso._fan_out(v_layout_id, 'C', NULL);  -- one per tenant database for a pattern target
    -- A small table is copied here, under the lock this transaction holds anyway: it is on Turso as soon as
    -- this commit is, and the worker has no copy to do. Outside READ COMMITTED this transaction's snapshot
    -- may predate the lock (a writer that committed while we waited would be missing): the worker copies.
    v_small := NULL;
    IF pgturso._snapshot_is_current() THEN
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 10001) AS s', pgturso._row_source(rel))
            INTO v_small;
    END IF;
    IF v_kind = 'm' OR v_small <= 10000 THEN
        EXECUTE v_plan ->> 'snapshot_sql';
        UPDATE pgturso.tracked_table t SET copy_rows_done = v_small, copy_rows_total = v_small,
            copy_started_at = now(), copy_finished_at = now()
        WHERE t.id = v_table_id AND v_kind <> 'm';
    ELSE
        PERFORM pgturso._start_copy(v_table_id);
    END IF;
    PERFORM pgturso._install_capture(rel, v_table_id, v_plan);
    PERFORM pgturso._wake_worker();
END
$$;
COMMENT ON FUNCTION pgturso.track_table IS
    'Replicate a table, partitioned table or materialized view to Turso: create it there (with its indexes '
    'unless indexes => false), copy its rows, then send every committed change and schema change. '
    'target_table names it on Turso (default: the table name, schema.name outside public). key_columns '
    'names the key when the table has no primary key or unique index over NOT NULL columns. drop_target: '
    'DROP TABLE in Postgres drops the Turso table too (default: it stays). target: the named target '
    '(pgturso.add_target) whose worker delivers it. columns: only these columns (the key included) go to '
    'Turso; the others, and columns added later, never leave Postgres. row_filter: only rows for which this '
    'boolean expression (the table''s columns, built-in immutable functions) is true are on Turso; an UPDATE '
    'moving a row in or out of it arrives as an insert or a delete there. capture: ''trigger'' (statement triggers; no server '
    'setting) or ''wal'' (decoded from a logical replication slot; needs wal_level = logical; writers pay '
    'almost nothing); a target''s tables share one mode, set by its first table (default: the target''s). route_by (with a pattern '
    'target such as ''tenant-%s''): each row goes to the database of the tenant its value names; a table tracked to a '
    'pattern target without route_by is a reference table, sent whole to every tenant database.';

CREATE OR REPLACE FUNCTION pgturso._partition_root(rel regclass) RETURNS regclass
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$ SELECT a FROM pg_partition_ancestors(rel) AS a ORDER BY pg_partition_root(rel) = a DESC LIMIT 1 $$;
COMMENT ON FUNCTION pgturso._partition_root IS 'Private: the topmost partitioned table above a partition.';

CREATE OR REPLACE FUNCTION pgturso.resync_table(rel regclass) RETURNS void
LANGUAGE plpgsql
@CAPTURE_SETTINGS@
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
    PERFORM pgturso._row_source(rel);  -- still a table (or materialized view), or an error
    -- Recreate the Turso table empty, in order with the changes before and after, then copy it again. The
    -- lock (what track_table takes) waits for every open writer of the table: their events, drawn before
    -- the recreate's, are then committed and visible to the copy, instead of landing before the recreate
    -- and missing from the copy. Writers wait only for this short transaction.
    IF v_kind = 'm' THEN
        PERFORM pgturso._require_current_snapshot('resync_table', rel);
        PERFORM pgturso._lock_materialized_view(rel);
    ELSE
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    END IF;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = v_table_id ORDER BY l.id DESC LIMIT 1;
    -- Recreate the Turso table empty, in order with the changes before and after, then copy it again.
    PERFORM pgturso._fan_out(v_layout_id, 'C', NULL);
    IF v_kind = 'm' THEN
        EXECUTE pgturso._plan_rows(v_layout_id, v_spec, pgturso._row_source(rel), 'U'::text);
    ELSE
        PERFORM pgturso._start_copy(v_table_id);
    END IF;
    PERFORM pgturso._wake_worker();
END
$$;
COMMENT ON FUNCTION pgturso.resync_table IS
    'Copy a tracked table to Turso afresh: its Turso table is recreated and refilled in chunks while '
    'changes keep flowing; progress in pgturso.status.';

-- Every deletion of pending outbox events besides delivery's records itself here, in its own transaction
-- (pgturso.outbox_deletion: a worker's batch read ahead is sent as read only if no such row committed since).
CREATE OR REPLACE FUNCTION pgturso._note_outbox_deletion(operation text, events bigint) RETURNS void
LANGUAGE sql
@SESSION_SETTINGS@
AS $$
    INSERT INTO pgturso.outbox_deletion (operation, events)
    SELECT _note_outbox_deletion.operation, _note_outbox_deletion.events WHERE _note_outbox_deletion.events > 0
$$;
COMMENT ON FUNCTION pgturso._note_outbox_deletion IS
    'Private: record that this transaction deleted pending outbox events (a batch read ahead is checked against it).';

CREATE OR REPLACE FUNCTION pgturso.untrack_table(rel regclass) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_table_id integer;
    v_target text;
    v_deleted bigint;
    v_deleted_late bigint;
BEGIN
    SELECT id INTO v_table_id FROM pgturso.tracked_table WHERE relid = rel AND dropped_at IS NULL;
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % is not tracked', rel
            USING HINT = 'SELECT relid FROM pgturso.tracked_table lists the tracked tables.';
    END IF;
    -- Dropping the triggers waits for the table's open writers; their events must then be deleted too, which a
    -- snapshot taken before that wait cannot see (they would stay, naming a layout that is gone).
    PERFORM pgturso._require_current_snapshot('untrack_table', rel);
    -- A worker's short transactions (reading a batch, recording one Turso confirmed: pipeline.py) may lock this
    -- table's events, its counters (table_state) and its tracked_table row (the counters' key), never across a
    -- Turso request. Wait for them first, while nothing is locked on the table itself: dropping the triggers
    -- takes its ACCESS EXCLUSIVE lock, and every reader and writer of the table would wait behind this call.
    DELETE FROM pgturso.outbox o USING pgturso.layout l WHERE o.layout_id = l.id AND l.table_id = v_table_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    PERFORM FROM pgturso.table_state s WHERE s.table_id = v_table_id FOR UPDATE;
    PERFORM FROM pgturso.tracked_table t WHERE t.id = v_table_id FOR UPDATE;
    PERFORM pgturso._remove_capture(rel, v_table_id);
    PERFORM pgturso._drop_row_filter(t.options) FROM pgturso.tracked_table t WHERE t.id = v_table_id;
    -- And the events of writers that committed while the triggers were dropped.
    DELETE FROM pgturso.outbox o USING pgturso.layout l WHERE o.layout_id = l.id AND l.table_id = v_table_id;
    GET DIAGNOSTICS v_deleted_late = ROW_COUNT;
    PERFORM pgturso._note_outbox_deletion('untrack_table', v_deleted + v_deleted_late);
    SELECT target INTO v_target FROM pgturso.tracked_table WHERE id = v_table_id;
    DELETE FROM pgturso.tracked_table WHERE id = v_table_id;
    -- The last table of a wal target: its slot would only pin WAL from now on.
    IF NOT EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = v_target) THEN
        PERFORM pgturso._drop_slot(v_target);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso.untrack_table IS
    'Stop replicating a table and discard its undelivered changes; the Turso table is left as it is.';

CREATE OR REPLACE FUNCTION pgturso.refresh_materialized_view(rel regclass, concurrently boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql
@CAPTURE_SETTINGS@
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
    -- The difference is taken against the contents before this REFRESH: no other REFRESH may commit between
    -- reading them and refreshing, and they must be read in a snapshot taken after that lock.
    PERFORM pgturso._require_current_snapshot('refresh_materialized_view', rel);
    PERFORM pgturso._lock_materialized_view(rel);
    -- The event trigger leaves this REFRESH to the function, which sends the difference only.
    PERFORM set_config('pgturso.refreshing', rel::oid::text, true);
    EXECUTE format('SELECT pgturso.%I($1, $2)', pgturso._capture_function_name(v_table_id) || '_refresh')
        USING rel, $2;  -- $2: the concurrently argument (a keyword, so not usable by name here)
    PERFORM set_config('pgturso.refreshing', '', true);
END
$$;
COMMENT ON FUNCTION pgturso.refresh_materialized_view IS
    'REFRESH MATERIALIZED VIEW [CONCURRENTLY] a tracked view and send Turso only the rows that changed.';

REVOKE ALL ON FUNCTION pgturso._is_deferrable(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.track_table(regclass, text, text[], boolean, boolean, text, text[], text, text, text)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._create_row_filter(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._row_filter(regclass, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._drop_row_filter(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._capture_of(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._snapshot_is_current() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._lock_materialized_view(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._require_current_snapshot(text, regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.untrack_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.resync_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.refresh_materialized_view(regclass, boolean) FROM PUBLIC;
