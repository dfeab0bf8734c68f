-- What the worker did and is doing, for operators: pgturso.status, and skipping a change Turso refuses.

CREATE OR REPLACE VIEW pgturso.status AS
SELECT t.relid AS table_name,
       t.target,
       t.target_table,
       coalesce(p.events, 0) AS pending_events,
       coalesce(p.rows, 0) AS pending_rows,
       p.oldest AS oldest_pending_at,
       now() - p.oldest AS lag,
       s.last_delivered_at,
       coalesce(s.rows_delivered, 0) AS rows_delivered,
       t.copy_state,
       t.copy_rows_done,
       t.copy_rows_total,
       d.status AS worker_status,
       d.worker,
       d.retries AS worker_retries,
       d.last_error,
       d.last_error_at,
       d.last_error_table,
       d.last_error_txid,
       pgturso._capture_disabled(t.id) AS capture_disabled
FROM pgturso.tracked_table t
JOIN pgturso.delivery_state d ON d.target = t.target
LEFT JOIN pgturso.table_state s ON s.table_id = t.id
LEFT JOIN LATERAL (
    SELECT count(*) AS events, sum(o.nrows) AS rows, min(o.captured_at) AS oldest
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    WHERE l.table_id = t.id
) p ON true;
COMMENT ON VIEW pgturso.status IS
    'Per tracked table: pending changes, lag, rows delivered, initial copy progress (rows queued of the '
    'estimated total); and its target''s worker status and last error. capture_disabled: a capture trigger '
    'of the table is disabled (ALTER TABLE ... DISABLE TRIGGER): its writes are not replicated; enable it and '
    'run pgturso.resync_table.';

CREATE OR REPLACE FUNCTION pgturso.skip_transaction(txid xid8, reason text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_events integer;
    v_rows bigint;
    v_tables text[];
BEGIN
    IF coalesce(trim(reason), '') = '' THEN
        RAISE EXCEPTION 'pgturso: skipping a transaction needs a reason'
            USING HINT = 'Say why, e.g. pgturso.skip_transaction(''1234'', ''row violates a Turso-only check'').';
    END IF;
    SELECT count(*), coalesce(sum(o.nrows), 0), array_agg(DISTINCT l.spec ->> 'source_table')
    INTO v_events, v_rows, v_tables
    FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
    WHERE o.txid = skip_transaction.txid;
    IF v_events = 0 THEN
        RAISE EXCEPTION 'pgturso: transaction % has nothing pending', txid
            USING HINT = 'SELECT last_error_txid FROM pgturso.status names the transaction the worker is stuck on.';
    END IF;
    INSERT INTO pgturso.skipped_transaction (txid, reason, events, rows, tables, error)
    VALUES (skip_transaction.txid, reason, v_events, v_rows, v_tables,
            (SELECT string_agg(d.last_error, '; ') FROM pgturso.delivery_state d
             WHERE d.last_error_txid = skip_transaction.txid));
    DELETE FROM pgturso.outbox o WHERE o.txid = skip_transaction.txid;
    RAISE WARNING 'pgturso: skipped source transaction % (% rows in %): Turso now differs from Postgres for them',
        txid, v_rows, array_to_string(v_tables, ', ')
        USING HINT = 'Fix the rows by hand on Turso, or untrack and track the table again to recopy it.';
    PERFORM pg_notify('pgturso', '');
    RETURN v_events;
END
$$;
COMMENT ON FUNCTION pgturso.skip_transaction IS
    'Deliberately drop one pending source transaction (one that Turso refuses); recorded in '
    'pgturso.skipped_transaction. Turso then lacks its changes: repair or recopy the tables it touched.';

REVOKE ALL ON FUNCTION pgturso.skip_transaction(xid8, text) FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;
