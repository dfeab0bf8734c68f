-- What the worker did and is doing, for operators: pgturso.status, and skipping a change Turso refuses.

-- Per target: its worker's recorded state, checked against the delivery lock. A worker that was killed
-- cannot record that it died; the session advisory lock it held (worker.DELIVERY_LOCK_CLASS, the target's
-- name hashed) goes with its connection, so a state that claims a running worker without the lock held is
-- 'not running'. 'blocked' stays: the change Turso refused blocks the target whether or not a worker runs.
-- last_error is the current error (cleared once delivery gets past it); previous_error is the last cleared
-- one, with when it happened and when it cleared.
CREATE OR REPLACE VIEW pgturso.target_status AS
SELECT d.target,
       CASE WHEN d.status IN ('delivering', 'idle', 'retrying') AND NOT lock.held
            THEN 'not running' ELSE d.status END AS worker_status,
       d.status AS recorded_status,
       lock.held AS worker_alive,
       d.worker,
       d.started_at,
       d.last_delivered_at,
       d.transactions_delivered,
       d.rows_delivered,
       d.retries,
       d.last_error,
       d.last_error_at,
       d.last_error_table,
       d.last_error_txid,
       d.previous_error,
       d.previous_error_at,
       d.error_cleared_at,
       d.updated_at,
       d.failing_since,
       g.pattern,
       g.tenant
FROM pgturso.delivery_state d
JOIN pgturso.target g ON g.name = d.target
CROSS JOIN LATERAL (
    SELECT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
          AND l.classid = 1885828210::oid  -- 'pgtr': worker.DELIVERY_LOCK_CLASS
          AND l.objid = ((pg_catalog.hashtext(d.target)::bigint + 4294967296) % 4294967296)::oid
    ) AS held
) lock
-- A blocked tenant of a wal pattern (a value its router could not register: pgturso.blocked_tenant) has no target
-- row yet: shown 'blocked' under the name it would have, with why and the fix (HINT), until add_target of that
-- name or discard_blocked_tenant.
UNION ALL
SELECT replace(b.pattern, '%s', b.tenant), 'blocked', 'blocked', false, NULL, NULL, NULL, 0, 0, 0,
       format('tenant value "%s" of table %s is blocked: %s HINT: %s Or give up on it (after correcting its rows in '
              'Postgres): SELECT pgturso.discard_blocked_tenant(%L, %L, ''reason'').',
              b.tenant, b.table_name, b.error, b.hint, b.pattern, b.tenant),
       b.since, b.table_name, b.txid, NULL, NULL, NULL, b.since, b.since, b.pattern, b.tenant
FROM pgturso.blocked_tenant b;
COMMENT ON VIEW pgturso.target_status IS
    'Per target: the worker''s status (''not running'' when its recorded state claims a running worker but '
    'nobody holds the delivery lock: killed, or reconnecting), counters, the current error (last_error, NULL '
    'once delivery got past it) and the last cleared one (previous_error, its time and when it cleared). '
    'failing_since: when the current run of errors began (a target retrying since then has delivered nothing). '
    'A tenant database of a pattern target is a target of its own: pattern and tenant name it.';

-- Whether no transaction committed since the snapshot ``since`` was taken, ``own`` (the transaction that recorded
-- it) aside: none of those in progress then, none started after it. False when too many (over 1,000) completed
-- since to look at each: a busy server is not known to be in sync. pgturso.status calls it for a wal target whose
-- worker recorded where it caught up (delivery_state.caught_up_*).
CREATE OR REPLACE FUNCTION pgturso._nothing_committed_since(since pg_snapshot, own xid8) RETURNS boolean
LANGUAGE sql STABLE
@SESSION_SETTINGS@
AS $$
    SELECT since IS NOT NULL AND n.now_xmax - n.since_xmax <= 1000
       AND NOT EXISTS (
           SELECT 1 FROM (SELECT x FROM pg_snapshot_xip(since) AS x
                          UNION ALL
                          SELECT g::text::xid8 FROM generate_series(n.since_xmax, n.now_xmax - 1) AS g) AS c
           WHERE c.x IS DISTINCT FROM own AND pg_xact_status(c.x) = 'committed')
    FROM (SELECT pg_snapshot_xmax(since)::text::int8 AS since_xmax,
                 pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS now_xmax) AS n
$$;
COMMENT ON FUNCTION pgturso._nothing_committed_since IS
    'Private: whether no transaction (but own) committed since the snapshot was taken (pgturso.status, in_sync).';
REVOKE ALL ON FUNCTION pgturso._nothing_committed_since(pg_snapshot, xid8) FROM PUBLIC;

-- Whether a wal target's slot holds no row change of the target's tables committed so far: pgturso.status asks
-- it for a stopped target (no worker holds its delivery lock) when WAL was written since the slot's confirmed
-- position and the worker's caught-up record cannot vouch for it (a transaction committed since its stop: another
-- target's worker recording its own delivery, a write to another table). The slot's confirmed position is what
-- Turso has; a change of one of the target's tables committed after it is decoded from the slot (pgoutput, the
-- tables' publication, transactions in commit order, those without anything published left out). The target's
-- outbox events (DDL, copies, repairs, TRUNCATE) are not looked for here: they stay in pgturso.outbox until its
-- worker delivered them, where status counts them. It decodes a temporary copy of the slot (the caller's own,
-- dropped before returning), never the slot itself, which a worker starting meanwhile must find free. False
-- ("not known to be in sync") whenever it cannot look cheaply and surely: on a standby, in a transaction that
-- wrote (no slot can be made there), when the slot is missing, lost or keeps more than 16 MB of WAL to decode
-- (a peek decodes from its restart_lsn); and, with a WARNING naming why, when the copy or the peek fails (no
-- replication slot free, say). SECURITY DEFINER (decoding needs the REPLICATION attribute): it runs no code of
-- the caller's, only pgoutput and the output functions of the published columns' types (C functions, which
-- only a superuser can define). docs/design.md ("in_sync" of a wal target) has the costs.
CREATE OR REPLACE FUNCTION pgturso._slot_holds_nothing_for(target text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
@SESSION_SETTINGS@
AS $$
DECLARE
    v_slot text := pgturso._slot_name(target);
    v_copy text := format('pgturso_status_%s', pg_backend_pid());
    v_upto pg_lsn;
    -- The WAL writer flushes an asynchronous commit within three wal_writer_delay (docs: "Asynchronous Commit").
    v_deadline timestamptz := clock_timestamp() + 3 * current_setting('wal_writer_delay')::interval
                              + interval '50 milliseconds';
    v_nothing boolean;
BEGIN
    IF pg_is_in_recovery() OR pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Every transaction committed by now wrote its commit record below this position. Decoding reads flushed WAL
    -- only: a synchronous commit is flushed before it is visible, an asynchronous one may be visible first, and is
    -- flushed by the WAL writer soon after. Wait until the WAL is flushed up to here, or for as long as the WAL
    -- writer may take with an asynchronous commit: the WAL left unflushed then is none (a page pruned by a read,
    -- which nothing flushes until the next commit does).
    v_upto := pg_current_wal_insert_lsn();
    IF NOT EXISTS (SELECT 1 FROM pg_replication_slots r
                   WHERE r.slot_name = v_slot AND r.wal_status IN ('reserved', 'extended')
                     AND pg_wal_lsn_diff(v_upto, r.restart_lsn) <= 16 * 1024 * 1024) THEN
        RETURN false;
    END IF;
    WHILE pg_current_wal_flush_lsn() < v_upto AND clock_timestamp() < v_deadline LOOP
        PERFORM pg_sleep(0.01);
    END LOOP;
    BEGIN
        IF EXISTS (SELECT 1 FROM pg_replication_slots r WHERE r.slot_name = v_copy) THEN
            PERFORM pg_drop_replication_slot(v_copy);  -- left by a call of this session that failed
        END IF;
        PERFORM pg_copy_logical_replication_slot(v_slot, v_copy, true);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgturso: status could not copy the replication slot of target % to look into it: %',
            target, SQLERRM
            USING HINT = 'in_sync says false for it meanwhile; a copy needs a free slot (max_replication_slots).';
        RETURN false;
    END;
    BEGIN
        -- Insert, Update and Delete messages name their relation's oid (a partition's change is published as its
        -- root's, the table tracked). The options and the format come from pgturso.sources.pgoutput (build.py),
        -- as the worker's reader's do.
        SELECT NOT EXISTS (
            SELECT 1 FROM pg_logical_slot_peek_binary_changes(v_copy, v_upto, NULL, @PGOUTPUT_TABLES_OPTIONS@) c
            WHERE @PGOUTPUT_ROW_CHANGE_RELID(c.data)@ IN (SELECT t.relid::oid::int8 FROM pgturso.tracked_table t
                                                           WHERE t.target = _slot_holds_nothing_for.target))
        INTO v_nothing;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgturso: status could not look into the replication slot of target %: %', target, SQLERRM
            USING HINT = 'in_sync says false for it meanwhile; pgturso.status.last_error may say more.';
        v_nothing := false;
    END;
    BEGIN
        PERFORM pg_drop_replication_slot(v_copy);
    EXCEPTION WHEN OTHERS THEN
        -- Temporary: it goes with this session at the latest.
        RAISE WARNING 'pgturso: status could not drop its temporary copy % of a replication slot: %', v_copy, SQLERRM
            USING HINT = 'It is dropped when this session ends.';
    END;
    RETURN v_nothing;
END
$$;
COMMENT ON FUNCTION pgturso._slot_holds_nothing_for IS
    'Private: whether a wal target''s slot holds no change of its tables committed so far (pgturso.status, '
    'in_sync of a stopped target), decoded from a temporary copy of the slot; false when that cannot be told cheaply.';
REVOKE ALL ON FUNCTION pgturso._slot_holds_nothing_for(text) FROM PUBLIC;

-- A table of a pattern target ('tenant-%s') has a row per tenant database: target is the tenant's own target,
-- pending and lag count that tenant's events; a pattern without tenants yet shows the pattern itself.
CREATE OR REPLACE VIEW pgturso.status AS
-- Each wal target's slot, once per target (a target may have many tables): how much WAL it keeps from being
-- removed while the worker is behind or down, and whether max_slot_wal_keep_size invalidated it ('lost'; the
-- worker then re-copies the target's tables).
WITH wal_slot AS MATERIALIZED (
    SELECT s.*,
           -- Nothing of its tables committed after the slot's position, asked of the slot itself: only for a
           -- stopped target (of no pattern) that the cheaper answers above leave in doubt.
           CASE WHEN s.pending_bytes > 0 AND NOT coalesce(s.caught_up, false) AND NOT coalesce(s.worker_alive, true)
                     AND strpos(s.target, '%s') = 0
                THEN pgturso._slot_holds_nothing_for(s.target) END AS nothing_since
    FROM (
        SELECT g.name AS target,
               coalesce(r.wal_status, 'missing') AS wal_status,
               CASE WHEN NOT pg_is_in_recovery()
                    THEN pg_wal_lsn_diff(pg_current_wal_lsn(), r.restart_lsn)::bigint END AS retained_bytes,
               -- WAL written since the last position its worker (a pattern's router) confirmed: an upper bound of
               -- the changes still in the slot, in bytes (it counts other tables' and databases' WAL too). 0: none.
               CASE WHEN NOT pg_is_in_recovery() AND r.slot_name IS NOT NULL AND r.wal_status <> 'lost'
                    THEN greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), r.confirmed_flush_lsn), 0)::bigint
               END AS pending_bytes,
               -- Its worker found nothing more for it in the slot, the slot is still confirmed there, and no
               -- transaction committed since (WAL of no transaction, its own record aside, is not a change).
               r.confirmed_flush_lsn >= c.caught_up_lsn
                   AND pgturso._nothing_committed_since(c.caught_up_snapshot, c.caught_up_xid) AS caught_up,
               d.worker_alive
        FROM pgturso.target g
        LEFT JOIN pg_replication_slots r ON r.slot_name = pgturso._slot_name(g.name)
        LEFT JOIN pgturso.delivery_state c ON c.target = g.name
        LEFT JOIN pgturso.target_status d ON d.target = g.name
        WHERE g.capture = 'wal'
    ) s
)
SELECT t.relid AS table_name,
       dest.name AS target,
       t.target_table,
       coalesce(p.events, 0) + coalesce(hr.events, 0) + coalesce(ha.events, 0) AS pending_events,
       coalesce(p.rows, 0) + coalesce(hr.rows, 0) + coalesce(ha.rows, 0) AS pending_rows,
       least(p.oldest, hr.oldest, ha.oldest) AS oldest_pending_at,
       now() - least(p.oldest, hr.oldest, ha.oldest) AS lag,
       s.last_delivered_at,
       coalesce(s.rows_delivered, 0) AS rows_delivered,
       t.copy_state,
       t.copy_rows_done,
       t.copy_rows_total,
       d.worker_status,
       d.worker,
       d.retries AS worker_retries,
       d.last_error,
       d.last_error_at,
       d.last_error_table,
       d.last_error_txid,
       pgturso._capture_disabled(t.id) AS capture_disabled,
       d.worker_alive,
       d.previous_error,
       d.previous_error_at,
       d.error_cleared_at,
       g.capture,
       w.wal_status AS slot_status,
       w.retained_bytes AS wal_retained_bytes,
       dest.pattern,
       dest.tenant,
       d.failing_since,
       w.pending_bytes AS wal_pending_bytes,
       coalesce(p.events, 0) + coalesce(hr.events, 0) + coalesce(ha.events, 0) = 0
           AND (g.capture <> 'wal'
                OR coalesce(w.pending_bytes = 0 OR w.caught_up OR w.nothing_since, false)) AS in_sync
FROM pgturso.tracked_table t
JOIN pgturso.target g ON g.name = t.target
CROSS JOIN LATERAL (
    SELECT x.name, x.pattern, x.tenant FROM pgturso.target x WHERE x.pattern = t.target
    UNION ALL
    SELECT replace(b.pattern, '%s', b.tenant), b.pattern, b.tenant FROM pgturso.blocked_tenant b
    WHERE b.pattern = t.target
    UNION ALL
    SELECT t.target, NULL, NULL
    WHERE NOT EXISTS (SELECT 1 FROM pgturso.target x WHERE x.pattern = t.target)
      AND NOT EXISTS (SELECT 1 FROM pgturso.blocked_tenant b WHERE b.pattern = t.target)
) dest
JOIN pgturso.target_status d ON d.target = dest.name
LEFT JOIN pgturso.table_state s ON s.table_id = t.id
LEFT JOIN wal_slot w ON w.target = t.target AND g.capture = 'wal'
-- One pass over the outbox for every table and tenant (not one per tenant: a pattern may have thousands); a
-- tenant value is never '' (pgturso._register_tenants), so coalesce tells plain targets' events apart.
LEFT JOIN (
    SELECT l.table_id, o.tenant, count(*) AS events, sum(o.nrows) AS rows, min(o.captured_at) AS oldest
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    GROUP BY l.table_id, o.tenant
) p ON p.table_id = t.id AND coalesce(p.tenant, '') = coalesce(dest.tenant, '')
-- A wal pattern's rows held for its router (tenant NULL: DDL, copies, repairs, TRUNCATE, table-wide events) are
-- pending for their tenant (route), or for every tenant (route NULL). (With no tenant yet, the pattern's own
-- row counts them above.)
LEFT JOIN (
    SELECT l.table_id, o.route, count(*) AS events, sum(o.nrows) AS rows, min(o.captured_at) AS oldest
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    WHERE o.tenant IS NULL AND o.route IS NOT NULL
    GROUP BY l.table_id, o.route
) hr ON hr.table_id = t.id AND hr.route = dest.tenant AND g.capture = 'wal'
LEFT JOIN (
    SELECT l.table_id, count(*) AS events, sum(o.nrows) AS rows, min(o.captured_at) AS oldest
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    WHERE o.tenant IS NULL AND o.route IS NULL
    GROUP BY l.table_id
) ha ON ha.table_id = t.id AND dest.tenant IS NOT NULL AND g.capture = 'wal';
COMMENT ON VIEW pgturso.status IS
    'Per tracked table: pending changes, lag, rows delivered, initial copy progress (rows queued of the '
    'estimated total); and its target''s worker status (see pgturso.target_status), current error and the '
    'last cleared one. capture_disabled: a capture trigger of the table is disabled (ALTER TABLE ... DISABLE '
    'TRIGGER): its writes are not replicated; enable it and run pgturso.resync_table. Wal targets: slot_status '
    '(reserved/extended/unreserved/lost/missing) and wal_retained_bytes, the WAL its slot keeps. A table of a '
    'pattern target has a row per tenant database (target: the tenant''s; pattern, tenant; pending and lag of '
    'that tenant''s changes; rows_delivered counts no tenant''s rows: see target_status). failing_since: when '
    'the target''s current run of errors began. pending_events/pending_rows count exactly what is in the '
    'outbox for it (for a wal pattern also the rows held for its router); a wal target''s changes still in its '
    'slot are not counted there but shown by wal_pending_bytes (WAL written since the position its worker last '
    'confirmed: an upper bound, 0 when nothing is left). in_sync: nothing pending at all (both zero; for a wal '
    'target, or: its worker found nothing more in the slot when it stopped, and no transaction committed since; '
    'or, its worker stopped, a copy of its slot holds no change of its tables committed since its position).';

CREATE OR REPLACE FUNCTION pgturso.skip_transaction(txid xid8, reason text, target text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
@SESSION_SETTINGS@
AS $$
DECLARE
    v_target text := skip_transaction.target;
    v_targets text[];
    v_refusing text[];
    v_events integer;
    v_rows bigint;
    v_first bigint;
    v_tables text[];
    v_xid32 numeric := skip_transaction.txid::text::numeric % 4294967296;
    v_wal boolean;
    v_blocked record;
    v_deleted bigint;
BEGIN
    IF coalesce(trim(reason), '') = '' THEN
        RAISE EXCEPTION 'pgturso: skipping a transaction needs a reason'
            USING HINT = 'Say why, e.g. pgturso.skip_transaction(''1234'', ''row violates a Turso-only check'').';
    END IF;
    -- A transaction may touch tables of several targets: it is skipped only for the one that refuses it. A
    -- wal target's row changes are in its slot, not the outbox: it counts when its worker is stuck on the
    -- transaction (the slot's xid is 32 bits: compared modulo 2^32), or when the caller names it. An event of
    -- a pattern's table goes to its tenant's target (a reference table's change has one per tenant).
    SELECT array_agg(DISTINCT c.target ORDER BY c.target) INTO v_targets FROM (
        SELECT coalesce(replace(t.target, '%s', o.tenant), t.target) AS target
        FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id JOIN pgturso.tracked_table t ON t.id = l.table_id WHERE o.txid = skip_transaction.txid
        UNION
        SELECT d.target FROM pgturso.delivery_state d JOIN pgturso.target g ON g.name = d.target
        WHERE g.capture = 'wal' AND d.last_error_txid::text::numeric % 4294967296 = v_xid32
        UNION
        SELECT g.name FROM pgturso.target g WHERE g.capture = 'wal' AND g.name = skip_transaction.target
        UNION
        SELECT replace(b.pattern, '%s', b.tenant) FROM pgturso.blocked_tenant b WHERE b.txid = skip_transaction.txid) c;
    IF v_targets IS NULL THEN
        RAISE EXCEPTION 'pgturso: transaction % has nothing pending', txid
            USING HINT = 'SELECT last_error_txid FROM pgturso.status names the transaction the worker is stuck on.';
    END IF;
    IF v_target IS NULL THEN
        SELECT array_agg(d.target) INTO v_refusing FROM pgturso.delivery_state d
        WHERE d.last_error_txid::text::numeric % 4294967296 = v_xid32 AND d.target = ANY (v_targets);
        IF cardinality(v_targets) = 1 THEN
            v_target := v_targets[1];
        ELSIF cardinality(v_refusing) = 1 THEN
            v_target := v_refusing[1];
        ELSE
            RAISE EXCEPTION 'pgturso: transaction % touches tables of targets %', txid, array_to_string(v_targets, ', ')
                USING HINT = format('Name the target that refuses it: pgturso.skip_transaction(%L, %L, target => %L).',
                                    txid, reason, v_targets[1]);
        END IF;
    ELSIF NOT v_target = ANY (v_targets) THEN
        RAISE EXCEPTION 'pgturso: transaction % has nothing pending for target %', txid, v_target
            USING HINT = format('It has changes pending for: %s.', array_to_string(v_targets, ', '));
    END IF;
    v_wal := coalesce((SELECT g.capture = 'wal' FROM pgturso.target g WHERE g.name = v_target), false);  -- a tenant's: trigger
    -- Only its row changes are dropped: its schema changes ('A'), copies ('C') and drops ('X') are not what
    -- Turso refused, and without them every later change of the table would be refused too (DDL is never skipped).
    SELECT count(*), coalesce(sum(o.nrows), 0), array_agg(DISTINCT l.spec ->> 'source_table'), min(o.id)
    INTO v_events, v_rows, v_tables, v_first
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id JOIN pgturso.tracked_table t ON t.id = l.table_id
    WHERE o.txid = skip_transaction.txid AND coalesce(replace(t.target, '%s', o.tenant), t.target) = v_target
      AND o.op IN ('U', 'D', 'T');
    IF v_events = 0 AND NOT v_wal AND NOT EXISTS (
           SELECT 1 FROM pgturso.blocked_tenant b
           WHERE replace(b.pattern, '%s', b.tenant) = v_target AND b.txid = skip_transaction.txid) THEN
        RAISE EXCEPTION 'pgturso: transaction % carries only schema changes for target %, which are never skipped', txid, v_target
            USING HINT = 'Fix the table on Turso (or untrack and track it again) so the schema change applies.';
    END IF;
    IF v_wal THEN
        -- The worker drops the transaction's row changes as it decodes them (and counts them here): those of
        -- a transaction with this xid that committed before now, so a later transaction reusing the 32-bit
        -- xid after a wraparound is never skipped.
        SELECT array_agg(DISTINCT x ORDER BY x) INTO v_tables FROM unnest(v_tables || (
            SELECT d.last_error_table FROM pgturso.delivery_state d
            WHERE d.target = v_target AND d.last_error_txid::text::numeric % 4294967296 = v_xid32)) x
        WHERE x IS NOT NULL;
    END IF;
    -- skip_xid and first_event_id let the worker tell a batch it had sent before this commits, which carries the
    -- transaction to Turso all the same: it then sets delivered_at (Worker._delivered, WalOutbox.remove_delivered).
    INSERT INTO pgturso.skipped_transaction (txid, target, reason, events, rows, tables, error, committed_before,
                                             skip_xid, first_event_id)
    VALUES (skip_transaction.txid, v_target, reason, v_events, v_rows, coalesce(v_tables, '{}'),
            (SELECT d.last_error FROM pgturso.delivery_state d
             WHERE d.target = v_target AND d.last_error_txid::text::numeric % 4294967296 = v_xid32),
            CASE WHEN v_wal THEN pg_current_wal_insert_lsn() END, pg_current_xact_id(), v_first);
    DELETE FROM pgturso.outbox o USING pgturso.layout l, pgturso.tracked_table t
    WHERE o.txid = skip_transaction.txid AND l.id = o.layout_id AND t.id = l.table_id
      AND coalesce(replace(t.target, '%s', o.tenant), t.target) = v_target AND o.op IN ('U', 'D', 'T');
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    PERFORM pgturso._note_outbox_deletion('skip_transaction', v_deleted);
    -- A tenant of a wal pattern blocked by this transaction (the one that brought its value first: its
    -- pgturso.target_status row names it): the router queued its rows under the routing transactions' ids, so
    -- they cannot be told apart by source transaction; skipping the transaction discards the tenant's parked
    -- rows (pgturso.discard_blocked_tenant), and a later row of the value is parked again.
    FOR v_blocked IN
        SELECT b.pattern, b.tenant FROM pgturso.blocked_tenant b
        WHERE (b.pattern = v_target OR replace(b.pattern, '%s', b.tenant) = v_target) AND b.txid = skip_transaction.txid
    LOOP
        v_events := v_events + pgturso._discard_tenant(v_blocked.pattern, v_blocked.tenant, reason);
    END LOOP;
    RAISE WARNING 'pgturso: skipped source transaction % for target % (% rows in %): Turso will lack them, unless the batch carrying them was already on its way',
        txid, v_target, v_rows, array_to_string(v_tables, ', ')
        USING HINT = 'Once delivery got past it, SELECT delivered_at FROM pgturso.skipped_transaction WHERE txid = '''
                     || txid || ''' says which (set: Turso has it after all). If not, fix the rows by hand on Turso, '
                     'or resync the table (pgturso.resync_table) to recopy it.';
    PERFORM pgturso._wake_worker();
    RETURN v_events;
END
$$;
COMMENT ON FUNCTION pgturso.skip_transaction IS
    'Deliberately drop one pending source transaction (one that Turso refuses) for one target: the target '
    'whose worker is stuck on it, or the one named (needed when it touches several and none or both are stuck '
    'on it). Only its row changes are dropped: its schema changes are still delivered, as are its changes for '
    'other targets. Recorded in pgturso.skipped_transaction; that '
    'target then lacks its changes: repair or recopy the tables it touched. For a target with capture => ''wal'' '
    'its worker drops the row changes as it decodes them from the slot (and adds them to the recorded counts). '
    'A transaction whose batch was already on its way to Turso arrives all the same: its worker then sets the '
    'record''s delivered_at. '
    'A blocked tenant of a wal pattern (target_status names the transaction that brought its value): its parked '
    'changes are discarded, as pgturso.discard_blocked_tenant does.';

REVOKE ALL ON FUNCTION pgturso.skip_transaction(xid8, text, text) FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;
