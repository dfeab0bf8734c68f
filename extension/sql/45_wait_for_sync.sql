-- Read-your-writes for applications that write to Postgres and read from Turso.

CREATE OR REPLACE FUNCTION pgturso.wait_for_sync(timeout interval DEFAULT '30 seconds') RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    -- Before the snapshot: a copy that finished after this (copy_finished_at, its transaction's start) was
    -- still copying in the snapshot, or began after it.
    v_called timestamptz := clock_timestamp();
    -- The copies seen finished after v_called (table id and copy_finished_at), when the snapshot was last taken.
    -- A set, not the latest time: two copies' last chunks may run at once, the one that began first committing
    -- last, with the earlier copy_finished_at.
    v_finished_seen text[] := '{}';
    v_finished text[];
    v_snapshot pg_snapshot := pg_current_snapshot();
    v_deadline timestamptz := clock_timestamp() + timeout;
    v_upto bigint;
    v_copying integer[];
    v_pause float8 := 0.002;
    -- Wal targets: everything committed so far is below this position of the WAL; their slots pass it once
    -- Turso confirmed all of it (the worker advances a slot only then).
    v_lsn pg_lsn := CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END;
    -- A wal pattern's router writes the tenants' events only once it read the caller's commits from the slot:
    -- those events are looked for after that (a new snapshot and outbox id), not among the ones there now.
    v_routed boolean := NOT EXISTS (SELECT 1 FROM pgturso.target g
                                    WHERE g.capture = 'wal' AND strpos(g.name, '%s') > 0
                                      AND EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = g.name));
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: wait_for_sync cannot wait for this transaction''s own writes'
            USING HINT = 'They reach Turso only after COMMIT: call pgturso.wait_for_sync() after committing.';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgturso: wait_for_sync needs READ COMMITTED (it must see deliveries as they happen)'
            USING HINT = 'Call it outside an explicit REPEATABLE READ or SERIALIZABLE transaction.';
    END IF;
    -- A standby cannot tell what a wal target delivered: the target's slot (what Turso confirmed) lives on the
    -- primary, and a standby of Postgres 15 sees only its own slots. Refuse rather than say true unchecked.
    IF pg_is_in_recovery() AND EXISTS (
           SELECT 1 FROM pgturso.target g
           WHERE g.capture = 'wal' AND EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = g.name)) THEN
        RAISE EXCEPTION 'pgturso: wait_for_sync cannot run on a standby while a target captures from the WAL'
            USING HINT = 'Call pgturso.wait_for_sync() on the primary: the replication slot that tells what Turso '
                         'confirmed is there, and a standby cannot see it.';
    END IF;
    -- Rows of a chunked copy (track_table of a large table, resync_table) pending at the call were committed
    -- before it too, but reach the outbox only chunk by chunk, later: wait for those copies to finish, then
    -- for everything committed up to then (which holds their last chunks).
    v_copying := ARRAY(SELECT t.id FROM pgturso.tracked_table t
                       WHERE t.copy_state = 'copying' AND t.dropped_at IS NULL);
    SELECT max(id) INTO v_upto FROM pgturso.outbox;
    LOOP
        -- A copy that began after the call holds rows committed before it too: resync_table, or the recopy of
        -- a target a worker found behind at its recovery (an older copy of its database, a lost slot), which
        -- drops that target's committed events for the copy to bring their rows again. One that finished since
        -- the last look (maybe between two looks) queued its last chunks after v_upto: look again from now.
        SELECT coalesce(array_agg(t.id || '@' || t.copy_finished_at ORDER BY t.id), '{}') INTO v_finished
        FROM pgturso.tracked_table t WHERE t.copy_finished_at > v_called;
        IF v_finished <> v_finished_seen THEN
            v_finished_seen := v_finished;
            v_snapshot := pg_current_snapshot();
            SELECT max(id) INTO v_upto FROM pgturso.outbox;
            v_lsn := CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END;
        END IF;
        IF cardinality(v_copying) > 0 AND NOT EXISTS (
               SELECT 1 FROM pgturso.tracked_table t
               WHERE t.id = ANY (v_copying) AND t.copy_state = 'copying' AND t.dropped_at IS NULL) THEN
            v_copying := '{}';
            v_snapshot := pg_current_snapshot();
            SELECT max(id) INTO v_upto FROM pgturso.outbox;
            v_lsn := CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END;
        END IF;
        -- Done when no copy pending at the call is still running and no event that was committed when we
        -- were called (or when those copies finished) is still waiting for Turso.
        IF NOT v_routed AND NOT EXISTS (
               SELECT 1 FROM pgturso.target g
               WHERE g.capture = 'wal' AND strpos(g.name, '%s') > 0
                 AND EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = g.name)
                 AND NOT EXISTS (SELECT 1 FROM pg_replication_slots r
                                 WHERE r.slot_name = pgturso._slot_name(g.name) AND r.confirmed_flush_lsn >= v_lsn)) THEN
            v_routed := true;  -- every router confirmed past the caller's commits: their events are queued now
            v_snapshot := pg_current_snapshot();
            SELECT max(id) INTO v_upto FROM pgturso.outbox;
        END IF;
        -- One expression, one snapshot: events a recopy dropped are missing from the outbox only where that
        -- recopy's copy is seen running (or finished after the last look) too.
        IF cardinality(v_copying) = 0 AND v_routed
           AND NOT EXISTS (SELECT 1 FROM pgturso.outbox o
                           WHERE o.id <= v_upto AND pg_visible_in_snapshot(o.txid, v_snapshot))
           AND NOT EXISTS (SELECT 1 FROM pgturso.tracked_table t
                           WHERE t.dropped_at IS NULL
                             AND (t.copy_state = 'copying'
                                  OR (t.copy_finished_at > v_called
                                      AND t.id || '@' || t.copy_finished_at <> ALL (v_finished_seen))))
           -- A wal target with tracked tables is synced only when its slot is usable and passed v_lsn: a
           -- missing or lost slot (failover, dropped, invalidated), or one being replaced, has not delivered.
           AND NOT EXISTS (SELECT 1 FROM pgturso.target g
                           WHERE g.capture = 'wal'
                             AND EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = g.name)
                             AND (g.slot_rebuild IS NOT NULL
                                  OR NOT EXISTS (SELECT 1 FROM pg_replication_slots r
                                                 WHERE r.slot_name = pgturso._slot_name(g.name)
                                                   AND r.wal_status IS DISTINCT FROM 'lost'
                                                   AND r.confirmed_flush_lsn >= v_lsn))) THEN
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
    'Wait until every change committed before the call is on Turso, including every row of the initial '
    'copies and resyncs (track_table, resync_table, a worker''s recopy of a target found behind) running at '
    'the call or begun during the wait (it waits for every copy in progress); true when it is, false on '
    'timeout (nothing is promised then), and false while a wal target''s slot is missing, lost or being '
    'replaced. Call it after COMMIT, in READ COMMITTED, on the primary when a target captures from the WAL '
    '(a standby refuses: it cannot see the slot). Any role may call it.';
GRANT EXECUTE ON FUNCTION pgturso.wait_for_sync(interval) TO PUBLIC;
