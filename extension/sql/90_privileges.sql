-- Least privilege (docs/security.md). Postgres lets PUBLIC execute every new function: take that back from
-- all of pgturso's, then grant what is meant for everyone. New functions need nothing here to stay private;
-- a function meant for other roles is granted below (or by an operator, to the roles that need it).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgturso FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgturso FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgturso.wait_for_sync(interval) TO PUBLIC;

-- The worker's role (docs/security.md): what delivery needs, and no superuser.
CREATE OR REPLACE FUNCTION pgturso.grant_worker(worker regrole) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF worker IS NULL OR worker::oid = 0 THEN
        RAISE EXCEPTION 'pgturso: grant_worker needs a role'
            USING HINT = 'CREATE ROLE pgturso_worker LOGIN; SELECT pgturso.grant_worker(''pgturso_worker'').';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA pgturso TO %s', worker);
    EXECUTE format('GRANT SELECT, DELETE ON pgturso.outbox TO %s', worker);
    EXECUTE format('GRANT SELECT ON pgturso.layout, pgturso.tracked_table, pgturso.target, pgturso.instance, '
                   'pgturso.skipped_transaction, pgturso.status TO %s', worker);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON pgturso.delivery_state, pgturso.table_state TO %s', worker);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgturso._copy_chunk(integer, integer), pgturso._source_position(), '
                   'pgturso._position_reached(jsonb) TO %s', worker);
END
$$;
COMMENT ON FUNCTION pgturso.grant_worker IS
    'Grant a role what pgturso-worker needs to deliver (no superuser, no right on application tables); '
    'run it again after an upgrade.';
REVOKE ALL ON FUNCTION pgturso.grant_worker(regrole) FROM PUBLIC;
