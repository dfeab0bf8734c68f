-- Least privilege (docs/security.md). Postgres lets PUBLIC execute every new function: take that back from
-- all of pgturso's, then grant what is meant for everyone. New functions need nothing here to stay private;
-- a function meant for other roles is granted below (or by an operator, to the roles that need it).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgturso FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgturso FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgturso.wait_for_sync(interval) TO PUBLIC;

-- Recovery onto a target database that lacks what was delivered to it (pgturso.url changed, an older copy
-- restored, a lagging standby promoted) recreates and copies every table of the target afresh. resync_table
-- locks each table against open writers, a right on the application's tables that the worker's role does not
-- have: this runs it as the extension owner, for the tables of the one target named, and nothing else.
CREATE OR REPLACE FUNCTION pgturso._resync_target(target text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    v_rel regclass;
    v_count integer := 0;
BEGIN
    FOR v_rel IN SELECT t.relid FROM pgturso.tracked_table t
                 WHERE t.target = _resync_target.target AND t.dropped_at IS NULL ORDER BY t.id
    LOOP
        PERFORM pgturso.resync_table(v_rel);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgturso._resync_target IS
    'Private: resync every table of a target (the worker, recovering onto a database that lost what it was sent).';
REVOKE ALL ON FUNCTION pgturso._resync_target(text) FROM PUBLIC;

-- The worker's role (docs/security.md): what delivery needs, and no superuser.
CREATE OR REPLACE FUNCTION pgturso.grant_worker(worker regrole) RETURNS void
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
BEGIN
    IF worker IS NULL OR worker::oid = 0 THEN
        RAISE EXCEPTION 'pgturso: grant_worker needs a role'
            USING HINT = 'CREATE ROLE pgturso_worker LOGIN; SELECT pgturso.grant_worker(''pgturso_worker'').';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA pgturso TO %s', worker);
    EXECUTE format('GRANT SELECT, DELETE ON pgturso.outbox TO %s', worker);
    EXECUTE format('GRANT SELECT ON pgturso.layout, pgturso.tracked_table, pgturso.target, pgturso.instance, '
                   'pgturso.skipped_transaction, pgturso.status, pgturso.target_status TO %s', worker);
    -- pgturso.status calls them (pgturso-worker status runs as the worker's role too); they read only pg_trigger,
    -- the commit status of transactions, and a temporary copy of a wal target's slot.
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgturso._capture_disabled(integer), '
                   'pgturso._nothing_committed_since(pg_snapshot, xid8), pgturso._slot_holds_nothing_for(text) '
                   'TO %s', worker);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON pgturso.delivery_state, pgturso.table_state TO %s', worker);
    -- A worker records a skipped transaction its batch carried to Turso anyway (delivered_at); a wal target's
    -- worker counts the row changes of a skipped transaction as it drops them from the slot,
    -- and replaces a lost slot (its name, dropping it, the target's slot generation and rebuild reason). Reading
    -- a slot also needs the REPLICATION attribute, which only a superuser can give (ALTER ROLE ... REPLICATION):
    -- the worker names that command at start when it lacks it.
    EXECUTE format('GRANT UPDATE (events, rows, delivered_at) ON pgturso.skipped_transaction TO %s', worker);
    EXECUTE format('GRANT UPDATE (slot_rebuild, slot_generation) ON pgturso.target TO %s', worker);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgturso._slot_name(text), pgturso._drop_slot(text) TO %s', worker);
    -- The router of a wal pattern target queues its tenants' outbox rows and registers new tenants (through
    -- functions that check it is the pattern's router; the registration copies reference rows as the extension
    -- owner), and records its progress.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON pgturso.router TO %s', worker);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgturso._route_tenant(integer, text, jsonb, xid8), '
                   'pgturso._router_blocked(text), '
                   'pgturso._route_rows(text, integer[], text[], integer[], text[], text[]), '
                   'pgturso._held_for_router(text) TO %s', worker);
    -- A worker checks a batch it read ahead against the deletions of pending events (pgturso.outbox_deletion),
    -- and records its own (a recopy of its target, a lost slot's rebuild).
    EXECUTE format('GRANT SELECT, INSERT ON pgturso.outbox_deletion TO %s', worker);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgturso._note_outbox_deletion(text, bigint) TO %s', worker);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgturso._copy_chunk(integer, integer), pgturso._source_position(), '
                   'pgturso._wal_position(), '
                   'pgturso._position_reached(jsonb), pgturso._resync_target(text) TO %s', worker);
END
$$;
COMMENT ON FUNCTION pgturso.grant_worker IS
    'Grant a role what pgturso-worker needs to deliver (no superuser, no right on application tables); '
    'ALTER EXTENSION pgturso UPDATE runs it again for the roles it set up.';
REVOKE ALL ON FUNCTION pgturso.grant_worker(regrole) FROM PUBLIC;

-- At an upgrade (ALTER EXTENSION pgturso UPDATE), a role grant_worker set up before it gets what this version's
-- grant_worker grants: a worker must not stop after an upgrade for want of a right on something new, or on a
-- function re-created with a new signature (which loses its grants). Such roles are those holding DELETE on the
-- outbox, which only grant_worker gives (the extension's owner aside). A fresh install finds none.
DO $$
DECLARE
    v_role regrole;
BEGIN
    FOR v_role IN
        SELECT DISTINCT acl.grantee::regrole
        FROM pg_class c, aclexplode(c.relacl) AS acl
        WHERE c.oid = 'pgturso.outbox'::regclass AND acl.privilege_type = 'DELETE'
          AND acl.grantee <> 0 AND acl.grantee <> c.relowner
        ORDER BY 1
    LOOP
        PERFORM pgturso.grant_worker(v_role);
    END LOOP;
END
$$;
