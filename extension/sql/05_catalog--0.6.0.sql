-- Table changes of 0.6.0 (run after 00_catalog.sql and the 0N_catalog--*.sql files before this one by a fresh
-- install, and by the upgrade from any release before 0.6.0). Append here: ALTER TABLE, new tables, and DROP
-- FUNCTION IF EXISTS of a function whose argument list or result type changes in 0.6.0 (CREATE OR REPLACE cannot
-- change those).

-- Deletions of pending outbox events by anything but the worker that delivers them (skip_transaction,
-- untrack_table, discard_blocked_tenant): one row per deleting call, inserted in the transaction that deletes,
-- so it is visible exactly when the deletion is. Its row count is the deletion generation: a worker that read a
-- batch ahead (in one snapshot with the count) sends it as read only if the count is unchanged when it is about
-- to send it, and else counts the batch's events again (docs/design.md, "Counted once"). Inserts, not an update
-- of one counter row: deleters running at once never conflict, whatever their isolation level. Its rows are never
-- deleted (the count only grows: an equal count means no deletion). Not dumped: the count matters only between a
-- worker's read of a batch and its send.
CREATE TABLE pgturso.outbox_deletion (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    operation text NOT NULL,
    events bigint NOT NULL
);
COMMENT ON TABLE pgturso.outbox_deletion IS
    'One row per call that deleted pending outbox events besides delivery (skip_transaction, untrack_table, '
    'discard_blocked_tenant): what a worker checks a batch it read ahead against before sending it.';
