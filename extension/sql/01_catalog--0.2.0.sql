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

-- Capture from a logical replication slot (track_table(..., capture => 'wal')): chosen per target, since one
-- slot feeds one target's worker in commit order. slot_generation counts the slots pgturso created for it, so a
-- progress marker written from an earlier slot (lost to failover or invalidation) is recognised as such.
ALTER TABLE pgturso.target
    ADD COLUMN capture text NOT NULL DEFAULT 'trigger' CHECK (capture IN ('trigger', 'wal')),
    ADD COLUMN slot_generation integer NOT NULL DEFAULT 0,
    -- Set while the worker replaces a lost slot (invalidated, or gone with a failover): why. The new slot
    -- is created, then the target's tables re-copied; a worker that dies in between starts over.
    ADD COLUMN slot_rebuild text;
-- The publications every pgturso slot decodes with. They must exist before any slot is created (pgoutput
-- looks them up as of each decoded transaction), so they are created here, once: the outbox (inserts only:
-- DDL, copy chunks, repairs, TRUNCATE reach wal targets through it) and the wal-captured tables, published
-- as their partition root. Empty until a table is tracked with capture => 'wal': no cost before.
SET LOCAL client_min_messages = error;  -- "wal_level is insufficient" is expected where no wal target exists
CREATE PUBLICATION pgturso_outbox FOR TABLE pgturso.outbox WITH (publish = 'insert');
CREATE PUBLICATION pgturso_tables WITH (publish = 'insert, update, delete', publish_via_partition_root = true);
RESET client_min_messages;

-- pg_dump / pg_restore: dump what the extension's tables hold (an extension's tables are otherwise not
-- dumped: a restore would lose what is tracked and every undelivered change). The rows that CREATE EXTENSION
-- inserts itself are left out, or the restore would insert them twice. pgturso.instance is not dumped: a
-- restored database is a new source on Turso (docs/design.md, "Backups").
SELECT pg_catalog.pg_extension_config_dump('pgturso.target', 'WHERE name <> ''default''');
SELECT pg_catalog.pg_extension_config_dump('pgturso.tracked_table', '');
SELECT pg_catalog.pg_extension_config_dump('pgturso.layout', '');
SELECT pg_catalog.pg_extension_config_dump('pgturso.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('pgturso.delivery_state', 'WHERE target <> ''default''');
SELECT pg_catalog.pg_extension_config_dump('pgturso.table_state', '');
SELECT pg_catalog.pg_extension_config_dump('pgturso.skipped_transaction', '');
-- Their identity sequences too: outbox ids order delivery, and a restored outbox must carry on above them.
SELECT pg_catalog.pg_extension_config_dump('pgturso.tracked_table_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pgturso.layout_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pgturso.outbox_id_seq', '');
-- The progress marker of the last batch Postgres knows its target committed (written with the batch's removal
-- from the outbox): recovery compares it with the target's marker to recognize a target database that is not
-- the one delivered to (pgturso.url changed) or an older copy of it, and copies it afresh (worker.py).
ALTER TABLE pgturso.delivery_state ADD COLUMN delivered_marker text;

-- (and the versions of them developed in 0.2.0 before route_by: drop whatever argument list they had)
DROP FUNCTION IF EXISTS pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb, text);
DROP FUNCTION IF EXISTS pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb, text);
DROP FUNCTION IF EXISTS pgturso.track_table(regclass, text, text[], boolean, boolean, text, text[], text);
DROP FUNCTION IF EXISTS pgturso.track_table(regclass, text, text[], boolean, boolean, text, text[], text, text);

-- A database per tenant. A pattern target's name holds one %s (add_target('tenant-%s', 'libsql://tenant-%s-…'));
-- each tenant value met in a routed table's route_by column becomes a target of its own, named by the pattern
-- (pattern: the pattern it belongs to, tenant: the value), with the pattern's URL and token unless an explicit
-- add_target of that name overrides them. generation: bumped by every change that must reach all of a pattern's
-- tenants (DDL, TRUNCATE) and by every new tenant: the row lock orders the two (docs/design.md).
ALTER TABLE pgturso.target DROP CONSTRAINT target_name_check;
ALTER TABLE pgturso.target ADD CONSTRAINT target_name_check
    CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' OR name ~ '^[A-Za-z0-9_.-]*%s[A-Za-z0-9_.-]*$');
ALTER TABLE pgturso.target
    ADD COLUMN pattern text REFERENCES pgturso.target (name) ON DELETE CASCADE,
    ADD COLUMN tenant text,
    ADD COLUMN generation bigint NOT NULL DEFAULT 0;
CREATE INDEX target_pattern_idx ON pgturso.target (pattern, tenant) WHERE pattern IS NOT NULL;
-- Events of a routed table carry their tenant; the tenant's worker reads only its own.
ALTER TABLE pgturso.outbox ADD COLUMN tenant text;
CREATE INDEX outbox_tenant_idx ON pgturso.outbox (tenant, id) WHERE tenant IS NOT NULL;
