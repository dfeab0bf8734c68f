-- What the worker did and is doing, for operators: pgturso.status, and skipping a change Turso refuses.

-- Each target's delivering worker's state; updated in the transaction that marks events delivered.
CREATE TABLE pgturso.delivery_state (
    target text PRIMARY KEY DEFAULT 'default' REFERENCES pgturso.target (name) ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'never started'
        CHECK (status IN ('never started', 'delivering', 'idle', 'retrying', 'blocked', 'stopped')),
    worker text,
    started_at timestamptz,
    last_delivered_at timestamptz,
    transactions_delivered bigint NOT NULL DEFAULT 0,
    rows_delivered bigint NOT NULL DEFAULT 0,
    retries bigint NOT NULL DEFAULT 0,
    last_error text,
    last_error_at timestamptz,
    last_error_table text,
    last_error_txid xid8,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgturso.delivery_state DEFAULT VALUES;
COMMENT ON TABLE pgturso.delivery_state IS 'Per target: the delivering worker''s state, errors and counters.';

CREATE TABLE pgturso.table_state (
    table_id integer PRIMARY KEY REFERENCES pgturso.tracked_table (id) ON DELETE CASCADE,
    rows_delivered bigint NOT NULL DEFAULT 0,
    last_delivered_at timestamptz
);
COMMENT ON TABLE pgturso.table_state IS 'Rows delivered per tracked table.';

CREATE TABLE pgturso.skipped_transaction (
    txid xid8 PRIMARY KEY,
    skipped_at timestamptz NOT NULL DEFAULT now(),
    skipped_by name NOT NULL DEFAULT current_user,
    reason text NOT NULL,
    events integer NOT NULL,
    rows bigint NOT NULL,
    tables text[] NOT NULL,
    error text
);
COMMENT ON TABLE pgturso.skipped_transaction IS
    'Source transactions an operator chose not to deliver (pgturso.skip_transaction), with why and by whom.';

CREATE VIEW pgturso.status AS
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
       d.last_error_txid
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
    'estimated total); and its target''s worker status and last error.';

CREATE FUNCTION pgturso.skip_transaction(txid xid8, reason text) RETURNS integer
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
