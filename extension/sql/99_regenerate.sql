-- Last in every install and upgrade script: regenerate the capture functions of tracked tables with this
-- version's code generator, from the layout each table already has. A fresh install tracks nothing yet; an
-- upgrade (ALTER EXTENSION pgturso UPDATE) so carries every fix to capture to the tables tracked before it.

CREATE OR REPLACE FUNCTION pgturso._regenerate_captures() RETURNS integer
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_row record;
    v_plan jsonb;
    v_count integer := 0;
    v_function text;
BEGIN
    FOR v_row IN
        SELECT t.id, t.relid, t.options, c.relkind, l.id AS layout_id, l.spec
        FROM pgturso.tracked_table t
        JOIN pg_class c ON c.oid = t.relid
        JOIN LATERAL (SELECT l.id, l.spec FROM pgturso.layout l WHERE l.table_id = t.id
                      ORDER BY l.id DESC LIMIT 1) l ON true
        WHERE t.dropped_at IS NULL
        ORDER BY t.id
    LOOP
        -- Encoded as this version encodes the columns' types (older versions let user-defined casts in:
        -- docs/security.md); the layout keeps its id, since what Turso stores and decodes is unchanged.
        v_plan := pgturso._plan_regenerate(v_row.layout_id, v_row.spec, pgturso._capture_function_name(v_row.id),
                                           (pgturso._describe(v_row.relid, v_row.options)).columns);
        UPDATE pgturso.layout SET spec = v_plan -> 'spec',
            generated = coalesce(generated, pgturso._generated_expressions(v_row.relid))
        WHERE id = v_row.layout_id;
        -- Inside ALTER EXTENSION UPDATE, Postgres lets the script replace only the extension's own objects,
        -- and the generated functions are not (pg_dump must dump them with their triggers): the function is
        -- lent to the extension while it is replaced, then given back.
        v_function := CASE WHEN v_row.relkind = 'm'
                           THEN format('pgturso.%I(regclass, boolean)', pgturso._capture_function_name(v_row.id) || '_refresh')
                           ELSE format('pgturso.%I()', pgturso._capture_function_name(v_row.id)) END;
        IF to_regprocedure(v_function) IS NOT NULL THEN
            EXECUTE 'ALTER EXTENSION pgturso ADD FUNCTION ' || v_function;
        END IF;
        PERFORM pgturso._install_capture(v_row.relid, v_row.id, v_plan);
        EXECUTE 'ALTER EXTENSION pgturso DROP FUNCTION ' || v_function;
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgturso._regenerate_captures IS
    'Private: regenerate every tracked table''s capture function with this version''s code (upgrades).';
REVOKE ALL ON FUNCTION pgturso._regenerate_captures() FROM PUBLIC;

-- Before 0.2.0, unique indexes were created UNIQUE on Turso too, which made Turso refuse intermediate states of
-- statements Postgres had accepted (layout.Index says why). Give such tables a layout whose indexes are plain
-- and an 'A' event that re-creates them plain on Turso, in order with the changes around it.
CREATE OR REPLACE FUNCTION pgturso._plain_turso_indexes() RETURNS integer
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_row record;
    v_new_id integer;
    v_count integer := 0;
BEGIN
    FOR v_row IN
        SELECT t.id AS table_id, l.id AS layout_id, l.spec
        FROM pgturso.tracked_table t
        JOIN LATERAL (SELECT l.id, l.spec FROM pgturso.layout l WHERE l.table_id = t.id
                      ORDER BY l.id DESC LIMIT 1) l ON true
        WHERE t.dropped_at IS NULL
          AND EXISTS (SELECT 1 FROM jsonb_array_elements(l.spec -> 'indexes') AS i WHERE (i ->> 'unique')::boolean)
        ORDER BY t.id
    LOOP
        INSERT INTO pgturso.layout (table_id, spec)
        VALUES (v_row.table_id, jsonb_set(v_row.spec, '{indexes}', (
                    SELECT jsonb_agg(i || '{"unique": false}' ORDER BY n)
                    FROM jsonb_array_elements(v_row.spec -> 'indexes') WITH ORDINALITY AS x(i, n))))
        RETURNING id INTO v_new_id;
        INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)
        VALUES (v_new_id, 'A', 0, jsonb_build_object('from', v_row.layout_id, 'recopy', false)::text);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgturso._plain_turso_indexes IS
    'Private: give tracked tables whose Turso indexes are UNIQUE (0.1.0) plain ones instead (upgrades).';
REVOKE ALL ON FUNCTION pgturso._plain_turso_indexes() FROM PUBLIC;

SELECT pgturso._plain_turso_indexes();
SELECT pgturso._regenerate_captures();
-- Tables tracked before track_table created their counters' row (pgturso.table_state) get it now: the worker's
-- first batch of a table would insert it, locking the tracked_table row against a RENAME until Turso answers.
INSERT INTO pgturso.table_state (table_id)
SELECT t.id FROM pgturso.tracked_table t WHERE strpos(t.target, '%s') = 0 ON CONFLICT DO NOTHING;
