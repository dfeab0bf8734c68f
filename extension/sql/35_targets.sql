-- Named targets (pgturso.target): different tables to different Turso databases, each delivered
-- independently by its own worker (pgturso-worker run --target NAME).

CREATE OR REPLACE FUNCTION pgturso.add_target(name text, url text, auth_token text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- No message may carry the token (nor the URL, which can hold credentials): errors reach the server log.
    -- Checked here rather than left to the table's constraints, whose errors show the whole row.
    IF add_target.name IS NULL OR add_target.name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'pgturso: % is not a valid target name', quote_literal(add_target.name)
            USING HINT = 'Use 1 to 63 letters, digits, _ . - (not starting with . or -).';
    END IF;
    IF url IS NULL OR url !~ '^(https?|libsql)://|^file:' THEN
        RAISE EXCEPTION 'pgturso: the URL of target % is not a Turso URL', add_target.name
            USING HINT = 'Use http://, https://, libsql:// (Turso Cloud) or file:PATH.';
    END IF;
    BEGIN
        INSERT INTO pgturso.target AS t (name, url, auth_token)
        VALUES (add_target.name, add_target.url, add_target.auth_token)
        ON CONFLICT ON CONSTRAINT target_pkey DO UPDATE SET url = excluded.url, auth_token = excluded.auth_token;
    EXCEPTION WHEN OTHERS THEN
        -- Re-raised without the DETAIL ("Failing row contains (..., token, ...)").
        RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = 'pgturso: add_target ' || add_target.name || ': ' || SQLERRM,
            HINT = 'SELECT name, url FROM pgturso.target lists the targets.';
    END;
    INSERT INTO pgturso.delivery_state (target) VALUES (add_target.name) ON CONFLICT DO NOTHING;
END
$$;
COMMENT ON FUNCTION pgturso.add_target IS
    'Create or change a named target: track tables to it with track_table(..., target => name) and run '
    'pgturso-worker run --target name. The token is stored where only the extension owner can read it.';

CREATE OR REPLACE FUNCTION pgturso.remove_target(name text) RETURNS void
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
    PERFORM pgturso._drop_slot(remove_target.name);
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
