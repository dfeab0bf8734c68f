-- Table changes of 0.3.0 (run after 00_catalog.sql and 01_catalog--0.2.0.sql by a fresh install, and by the
-- upgrade from any release before 0.3.0). Append here: ALTER TABLE, new tables, and DROP FUNCTION IF EXISTS of a
-- function whose argument list or result type changes in 0.3.0 (CREATE OR REPLACE cannot change those).

-- Reference tables of a pattern target (track_table(..., target => 'tenant-%s') without route_by): the layout
-- planners take whether a table is one (its capture queues each event once per tenant).
DROP FUNCTION IF EXISTS pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb, text, text);
DROP FUNCTION IF EXISTS pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb, text, text);
-- A writer of a reference table updates one of these rows (its backend's) before reading the pattern's
-- tenants, and a new tenant's registration updates them all before copying the reference rows: so they wait
-- for each other (and a REPEATABLE READ one that would act on a stale list fails), while writers of reference
-- tables rarely wait for each other (pgturso._pattern_tenants, pgturso._register_tenants; docs/design.md).
CREATE TABLE pgturso.tenant_stripe (stripe integer PRIMARY KEY, generation bigint NOT NULL DEFAULT 0);
INSERT INTO pgturso.tenant_stripe (stripe) SELECT generate_series(0, 63);
REVOKE ALL ON pgturso.tenant_stripe FROM PUBLIC;

-- skip_transaction for targets with capture => 'wal': the worker drops the skipped transaction's row changes as
-- it decodes them from the slot, for the transaction with that (32-bit) xid that committed before this WAL
-- position (NULL for trigger capture, whose skip deletes outbox rows).
ALTER TABLE pgturso.skipped_transaction ADD COLUMN committed_before pg_lsn;

-- Status of a target that keeps failing (pgturso-worker status --max-retrying): when its current run of errors
-- began. last_error_at moves with every retry; failing_since stays until delivery gets past the error.
ALTER TABLE pgturso.delivery_state ADD COLUMN failing_since timestamptz;

-- Outbox payloads compressed with lz4, where the server was built with it (else pglz, the default, stays):
-- pglz cost a writer's packed UPDATE or DELETE of 200,000 rows about a fifth of its capture time, and the
-- initial copy a fifth of each chunk's CPU (20,000 rows, 1,000 per event: 60 against 48 ms).
DO $$
BEGIN
    ALTER TABLE pgturso.outbox ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'pgturso: this server has no lz4; outbox payloads are compressed with pglz';
END
$$;

-- capture => 'wal': the expressions of the table's stored generated columns when the layout was made ({column:
-- expression}), which pgoutput (Postgres 15) does not send and the worker computes. ALTER COLUMN ... DROP
-- EXPRESSION takes the expression from the catalog while rows written before it are still in the slot.
ALTER TABLE pgturso.layout ADD COLUMN generated jsonb;
