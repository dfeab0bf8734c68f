-- Catalog changes of 0.2.0 (run by a fresh install after 00_catalog.sql, and by the upgrade from 0.1.0).
-- Only what cannot be run twice belongs here: tables, columns, and DROP of functions whose signature or
-- result type changed (CREATE OR REPLACE in the later files cannot change those).

-- Column lists and row filters (track_table's columns and row_filter): the layout helpers take and return the
-- row filter, and track_table takes the two new arguments.
DROP FUNCTION IF EXISTS pgturso._describe(regclass, jsonb);
DROP FUNCTION IF EXISTS pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb);
DROP FUNCTION IF EXISTS pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb);
DROP FUNCTION IF EXISTS pgturso.track_table(regclass, text, text[], boolean, boolean, text);

-- skip_transaction skips a transaction for one target (a transaction may touch tables of several).
ALTER TABLE pgturso.skipped_transaction ADD COLUMN target text NOT NULL DEFAULT 'default';
ALTER TABLE pgturso.skipped_transaction DROP CONSTRAINT skipped_transaction_pkey;
ALTER TABLE pgturso.skipped_transaction ADD PRIMARY KEY (txid, target);
DROP FUNCTION IF EXISTS pgturso.skip_transaction(xid8, text);
-- A target's error is current (last_error) until delivery gets past it; then it becomes history.
ALTER TABLE pgturso.delivery_state
    ADD COLUMN previous_error text,
    ADD COLUMN previous_error_at timestamptz,
    ADD COLUMN error_cleared_at timestamptz;
