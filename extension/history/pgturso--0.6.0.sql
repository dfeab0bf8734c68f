-- Generated from extension/sql/*.sql by make (install); do not edit.
\echo Use "CREATE EXTENSION pgturso CASCADE" to load this file. \quit

-- extension/sql/000_schema_owner.sql
-- First in every install and upgrade script. Postgres installs into an existing schema named pgturso without
-- looking at who owns it, and every function here runs with the installing superuser's rights: a schema that
-- another role owns or may create objects in would let that role plant functions or operators the extension
-- then calls (docs/security.md). Refuse rather than install into it.
DO $$
DECLARE
    v_schema oid := (SELECT n.oid FROM pg_namespace n WHERE n.nspname = 'pgturso');
    v_owner name;
    v_intruder text;
BEGIN
    SELECT r.rolname INTO v_owner FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
    WHERE n.oid = v_schema AND NOT r.rolsuper;
    IF v_owner IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: schema pgturso is owned by %, who is not a superuser', v_owner
            USING HINT = 'Drop that schema (or check what is in it), then CREATE EXTENSION pgturso again: the '
                         'extension creates it. ALTER SCHEMA pgturso OWNER TO a superuser if you made it yourself.';
    END IF;
    SELECT coalesce(r.rolname, 'PUBLIC') INTO v_intruder
    FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
    WHERE n.oid = v_schema AND a.privilege_type = 'CREATE' AND NOT coalesce(r.rolsuper, false)
    LIMIT 1;
    IF v_intruder IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % may create objects in schema pgturso', v_intruder
            USING HINT = format('REVOKE CREATE ON SCHEMA pgturso FROM %s, and drop what it created there.',
                                v_intruder);
    END IF;
    SELECT x.what INTO v_intruder FROM (
        SELECT format('function %s', p.oid::regprocedure) AS what, p.proowner AS owner
        FROM pg_proc p WHERE p.pronamespace = v_schema
        UNION ALL SELECT format('operator %s', o.oid::regoperator), o.oprowner FROM pg_operator o
        WHERE o.oprnamespace = v_schema
        UNION ALL SELECT format('type %s', t.oid::regtype), t.typowner FROM pg_type t WHERE t.typnamespace = v_schema
        UNION ALL SELECT format('relation %s', c.oid::regclass), c.relowner FROM pg_class c
        WHERE c.relnamespace = v_schema) AS x
    JOIN pg_roles r ON r.oid = x.owner AND NOT r.rolsuper
    LIMIT 1;
    IF v_intruder IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: schema pgturso holds %, which a role that is not a superuser owns', v_intruder
            USING HINT = 'Drop it: only pgturso may define objects in its schema.';
    END IF;
END
$$;


-- extension/sql/00_catalog.sql
-- pgturso's own tables. Only the extension owner (and superusers) can read or write them: application roles
-- reach the outbox solely through the SECURITY DEFINER capture triggers.

-- Identifies this source database on every target, so one Turso database can take several sources.
-- It is data, not a server setting, so it survives a restore or the promotion of a physical standby.
CREATE TABLE pgturso.instance (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source_id uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO pgturso.instance DEFAULT VALUES;
COMMENT ON TABLE pgturso.instance IS 'The identity of this source database on Turso targets.';

-- Turso databases to deliver to, each by its own worker. 'default' takes its URL from the worker's settings
-- (pgturso.url); named ones (pgturso.add_target) from here.
CREATE TABLE pgturso.target (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'),
    url text CHECK (url IS NULL OR url ~ '^(https?|libsql)://|^file:'),
    auth_token text,  -- readable only by the extension owner and superusers, like every pgturso table
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgturso.target (name) VALUES ('default');
COMMENT ON TABLE pgturso.target IS
    'Turso databases to deliver to. ''default'': URL from pgturso.url / the worker''s settings.';

CREATE TABLE pgturso.tracked_table (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid regclass NOT NULL UNIQUE,
    target text NOT NULL DEFAULT 'default' REFERENCES pgturso.target (name),
    target_table text NOT NULL,
    tracked_at timestamptz NOT NULL DEFAULT now(),
    -- track_table's choices, kept for schema changes: target_table (when given), key_columns (when given),
    -- indexes (false: no secondary indexes on Turso), drop_target (DROP TABLE drops the Turso table too).
    options jsonb NOT NULL DEFAULT '{}',
    -- Set by DROP TABLE while changes of the table are still undelivered; the row goes once they are.
    dropped_at timestamptz,
    -- The initial copy (and resync_table): the worker copies the rows in key order, a chunk per transaction,
    -- while capture already runs; copy_after is the key (text form) of the last row copied.
    copy_state text NOT NULL DEFAULT 'done' CHECK (copy_state IN ('copying', 'done')),
    copy_after text[],
    copy_rows_done bigint NOT NULL DEFAULT 0,
    copy_rows_total bigint,
    copy_started_at timestamptz,
    copy_finished_at timestamptz,
    UNIQUE (target, target_table)
);
COMMENT ON TABLE pgturso.tracked_table IS 'Tables replicated to Turso; maintained by track_table/untrack_table.';

-- A table's column layout as captured; every outbox event names the layout it was packed with.
CREATE TABLE pgturso.layout (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_id integer NOT NULL REFERENCES pgturso.tracked_table (id) ON DELETE CASCADE,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON pgturso.layout (table_id);
COMMENT ON TABLE pgturso.layout IS 'Column layouts of tracked tables (pgturso.layout.TableLayout as JSON).';

-- The outbox. Capture triggers append events in the writing transaction; the worker deletes them once the
-- target confirmed the commit that carries them. id comes from a sequence without cache, so a write that
-- waited for another transaction's commit always gets a larger id than every event of that transaction:
-- the worker's ordering rests on this (docs/design.md).
CREATE TABLE pgturso.outbox (
    id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    layout_id integer NOT NULL,
    op "char" NOT NULL CHECK (op IN ('C', 'U', 'D', 'T', 'A', 'X')),
    nrows integer NOT NULL,
    payload text,
    captured_at timestamptz NOT NULL DEFAULT now()
)
-- A queue: every row is deleted soon after it is written. Vacuum it (and its TOAST, where chunked events
-- live) after a fixed number of deletes rather than a fraction of its size, without cost-based pauses,
-- so freed space is reused and the trailing pages are truncated: it stays small without VACUUM FULL.
WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
      autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000,
      autovacuum_vacuum_cost_delay = 0,
      toast.autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 10000,
      toast.autovacuum_vacuum_cost_delay = 0);
CREATE INDEX outbox_txid_idx ON pgturso.outbox (txid, id);
COMMENT ON TABLE pgturso.outbox IS
    'Changes not yet confirmed by Turso. op: C create table, U upsert rows, D delete keys, T truncate, '
    'A schema change (payload {"from": old layout id, "recopy": bool}), X table dropped (payload '
    '{"drop_target": bool}); U/D payload: comma-separated JSON arrays, one per row (U: all columns, D: key).';

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

REVOKE ALL ON ALL TABLES IN SCHEMA pgturso FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgturso FROM PUBLIC;


-- extension/sql/01_catalog--0.2.0.sql
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


-- extension/sql/02_catalog--0.3.0.sql
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


-- extension/sql/03_catalog--0.4.0.sql
-- Table changes of 0.4.0 (run after 00_catalog.sql, 01_catalog--0.2.0.sql and 02_catalog--0.3.0.sql by a fresh
-- install, and by the upgrade from any release before 0.4.0). Append here: ALTER TABLE, new tables, and DROP
-- FUNCTION IF EXISTS of a function whose argument list or result type changes in 0.4.0 (CREATE OR REPLACE cannot
-- change those).

-- Tenant values in a pattern URL's host: pgturso._tenant_host_problem(url, tenant) replaces
-- pgturso._tenant_in_url_host(url), which only told whether %s is in the host (the checks refused dots only).
DROP FUNCTION IF EXISTS pgturso._tenant_in_url_host(text);

-- capture => 'wal' for pattern targets: the router (docs/design.md, "A database per tenant"). One router per wal
-- pattern reads the pattern's slot and writes each decoded transaction, in commit order, as per-tenant outbox
-- rows. An outbox row of a wal pattern written by anything else (DDL, copies, repairs, table-wide events) is
-- held: tenant NULL (no tenant's worker reads it) and route its tenant (NULL: every tenant), until the router
-- meets it in the stream and queues it again in stream order (pgturso._held_for_router).
ALTER TABLE pgturso.outbox ADD COLUMN route text;
-- The router's progress: the marker of the last batch it routed (slot generation, commit LSN, layouts in force:
-- a restart goes on after it, nothing routed twice), and for each tenant it registered the snapshot its
-- reference rows were copied at (a later reference change visible in it is in the copy already).
CREATE TABLE pgturso.router (
    pattern text PRIMARY KEY REFERENCES pgturso.target (name) ON DELETE CASCADE,
    marker text,
    copies jsonb NOT NULL DEFAULT '{}',
    pid integer  -- the router's backend: its outbox rows are not held
);
COMMENT ON TABLE pgturso.router IS
    'The router of a wal pattern target: marker of the last batch routed; tenant: snapshot of its reference copy.';
SELECT pg_catalog.pg_extension_config_dump('pgturso.router', '');


-- extension/sql/04_catalog--0.5.0.sql
-- Table changes of 0.5.0 (run after 00_catalog.sql and the 0N_catalog--*.sql files before this one by a fresh
-- install, and by the upgrade from any release before 0.5.0). Append here: ALTER TABLE, new tables, and DROP
-- FUNCTION IF EXISTS of a function whose argument list or result type changes in 0.5.0 (CREATE OR REPLACE cannot
-- change those).

-- Blocked tenants of a wal pattern (issue 15: one tenant never delays the others). A tenant value the router cannot
-- register (it cannot name a database: characters, host name, case) has committed already (no trigger refused it
-- as in trigger mode): the router parks it instead of stopping. Its events are queued as for any tenant (its
-- tables' creation, its reference rows, then its rows, in stream order) under its value, but it has no row in
-- pgturso.target, so no worker delivers them; this row shows why (pgturso.target_status: 'blocked') until
-- add_target of its name gives it a URL (then it is registered and its events delivered) or
-- pgturso.discard_blocked_tenant drops them (docs/design.md, "A database per tenant").
CREATE TABLE pgturso.blocked_tenant (
    pattern text NOT NULL REFERENCES pgturso.target (name) ON DELETE CASCADE,
    tenant text NOT NULL,
    error text NOT NULL,
    hint text,
    table_name text,
    txid xid8,  -- the source transaction that brought the value first
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, tenant)
);
COMMENT ON TABLE pgturso.blocked_tenant IS
    'Tenant values of a wal pattern target its router could not register: their events wait (parked) in the outbox.';
SELECT pg_catalog.pg_extension_config_dump('pgturso.blocked_tenant', '');
-- _route_tenant now says whether it registered the tenant or parked it (and takes the source transaction).
DROP FUNCTION IF EXISTS pgturso._route_tenant(integer, text, jsonb);

-- in_sync of a wal target whose worker is not reading its slot (after a --once run, or once stopped): the worker
-- records where it found nothing more for the target in the slot, the slot confirmed up to there
-- (caught_up_lsn), and a snapshot taken before it looked (caught_up_snapshot, and caught_up_xid, the recording
-- transaction's own id). pgturso.status says in sync while the slot is still confirmed there and no transaction
-- committed since that snapshot: WAL that no transaction wrote (a checkpoint, the running-xacts record) and the
-- worker's own record do not count, which wal_pending_bytes, an upper bound, cannot tell apart.
ALTER TABLE pgturso.delivery_state ADD COLUMN caught_up_lsn pg_lsn, ADD COLUMN caught_up_snapshot pg_snapshot,
    ADD COLUMN caught_up_xid xid8;

-- skip_transaction of a transaction whose batch was already on its way to Turso: the worker keeps no lock on a batch
-- it sends, so the skip deletes its events (or, for a wal target, is recorded) but cannot unsend it. Once Turso
-- confirmed that batch the worker sets delivered_at: the target has the transaction after all, which the record
-- must not deny. skip_xid: the skipping transaction (a batch whose snapshot does not see it read the skipped
-- events); first_event_id: the first outbox event it deleted (trigger capture: in the batch if at most its cut).
ALTER TABLE pgturso.skipped_transaction ADD COLUMN delivered_at timestamptz, ADD COLUMN skip_xid xid8,
    ADD COLUMN first_event_id bigint;


-- extension/sql/05_catalog--0.6.0.sql
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


-- extension/sql/10_python.sql
-- PL/Python entry points. They stay one import long: the logic lives in the pgturso Python package
-- (worker/pgturso), which `make install` copies to @PYTHON_DIR@ for the server's Python.

CREATE OR REPLACE FUNCTION pgturso._plan_layout(
    layout_id integer, relation text, source_table text, target_table text,
    columns jsonb, key_columns text[], function_name text, indexes jsonb, row_filter text, route_by text,
    reference boolean DEFAULT false
) RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_table
return plan_table(layout_id, relation, source_table, target_table, columns, key_columns, function_name, indexes,
                  row_filter, route_by, reference)
$$;
COMMENT ON FUNCTION pgturso._plan_layout IS
    'Private: layout, capture and copy SQL of a table (pgturso.extension_api.plan_table).';

CREATE OR REPLACE FUNCTION pgturso._plan_change(
    old_spec jsonb, source_table text, target_table text, columns jsonb, key_columns text[], indexes jsonb,
    row_filter text, route_by text, reference boolean DEFAULT false
) RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_change
return plan_change(old_spec, source_table, target_table, columns, key_columns, indexes, row_filter, route_by,
                   reference)
$$;
COMMENT ON FUNCTION pgturso._plan_change IS
    'Private: how a tracked table''s layout changed (pgturso.extension_api.plan_change).';

CREATE OR REPLACE FUNCTION pgturso._plan_rows(layout_id integer, spec jsonb, relation text, op text) RETURNS text
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import rows_sql
return rows_sql(layout_id, spec, relation, op)
$$;
COMMENT ON FUNCTION pgturso._plan_rows IS
    'Private: SQL sending every row of a relation as upserts (U) or its keys as deletes (D).';

CREATE OR REPLACE FUNCTION pgturso._plan_tenant_rows(layout_id integer, spec jsonb, relation text) RETURNS text
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import tenant_rows
return tenant_rows(layout_id, spec, relation)
$$;
COMMENT ON FUNCTION pgturso._plan_tenant_rows IS
    'Private: SQL queueing every row of a reference table for one new tenant ($1).';

CREATE OR REPLACE FUNCTION pgturso._plan_copy_chunk(layout_id integer, spec jsonb, relation text, max_rows integer)
RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import copy_chunk
return copy_chunk(layout_id, spec, relation, max_rows)
$$;
COMMENT ON FUNCTION pgturso._plan_copy_chunk IS
    'Private: SQL copying the next chunk of a table''s rows (pgturso.capture.copy_chunk_sql).';

CREATE OR REPLACE FUNCTION pgturso._plan_regenerate(layout_id integer, spec jsonb, function_name text,
                                                    columns jsonb)
RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import regenerate_capture
return regenerate_capture(layout_id, spec, function_name, columns)
$$;
COMMENT ON FUNCTION pgturso._plan_regenerate IS
    'Private: a tracked table''s capture function SQL from its stored layout, re-encoded as this version '
    'encodes its columns'' types (upgrades regenerate them).';
REVOKE ALL ON FUNCTION pgturso._plan_regenerate(integer, jsonb, text, jsonb) FROM PUBLIC;


-- extension/sql/20_track.sql
-- track_table / untrack_table / refresh_materialized_view: install and remove a table's capture.
-- Schema changes of tracked tables are followed by the event triggers of 30_schema_changes.sql, which use the
-- same helpers (_describe, _install_capture) to compute a new layout.

-- Wake the worker (it LISTENs on 'pgturso' while idle). Not in a session with pgturso.notify = off: Postgres
-- refuses to PREPARE a transaction that sent a NOTIFY, and such a session's changes are found by the worker's
-- idle_wait polling instead (docs/design.md, "What writers wait for").
CREATE OR REPLACE FUNCTION pgturso._wake_worker() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF coalesce(current_setting('pgturso.notify', true), 'on') NOT IN ('off', 'false', 'no', '0') THEN
        PERFORM pg_notify('pgturso', '');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._wake_worker IS
    'Private: NOTIFY the worker, unless this session set pgturso.notify = off (it prepares transactions).';
REVOKE ALL ON FUNCTION pgturso._wake_worker() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgturso._base_type(typ oid) RETURNS oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    WITH RECURSIVE chain(oid, base, depth) AS (
        SELECT t.oid, t.typbasetype, 0 FROM pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typbasetype, c.depth + 1 FROM chain c JOIN pg_type t ON t.oid = c.base
    )
    SELECT coalesce(
               -- An array of a domain (or a domain over one) is read as the array of the type under the
               -- domain: the worker casts decoded text to this type, and a cast to the domain's array would
               -- run the domain's CHECK, code of the domain's owner, with the worker's rights.
               -- (the array of a domain over an array is that array: Postgres arrays have no nesting).
               (SELECT CASE WHEN eb.typcategory = 'A' THEN eb.oid ELSE nullif(eb.typarray, 0) END
                FROM pg_type a JOIN pg_type eb ON eb.oid = pgturso._base_type(a.typelem)
                WHERE a.oid = b.oid AND a.typcategory = 'A' AND a.typelem <> 0 AND eb.oid <> a.typelem),
               b.oid)
    FROM (SELECT oid FROM chain ORDER BY depth DESC LIMIT 1) AS b
$$;
COMMENT ON FUNCTION pgturso._base_type IS
    'Private: the type under a (possibly nested) domain; for an array of a domain, the array of the type under it.';

-- Whether values of a type are encoded by functions built into Postgres only: the type under any domain is
-- built in (an oid below FirstNormalObjectId, 16384, given at initdb), or is an array of such a type. Any
-- other type (enum, composite, range, extension type...) may have an owner who is not a superuser and who
-- may CREATE CAST from it, which json_build_array, to_json and ::text would call: pgturso.types.USER_TYPE.
CREATE OR REPLACE FUNCTION pgturso._trusted_type(typ oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT b.oid < 16384 OR (b.typcategory = 'A' AND b.typelem <> 0 AND pgturso._base_type(b.typelem) < 16384)
    FROM pg_type b WHERE b.oid = pgturso._base_type(typ)
$$;
COMMENT ON FUNCTION pgturso._trusted_type IS
    'Private: a type whose values only built-in functions encode (built in, under domains; arrays of it).';

CREATE OR REPLACE FUNCTION pgturso._capture_function_name(table_id integer) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$ SELECT '_capture_' || table_id $$;
COMMENT ON FUNCTION pgturso._capture_function_name IS 'Private: name of a tracked table''s capture function.';

-- The Turso name of a Postgres relation: the bare name in public, schema.name elsewhere (indexes too).
CREATE OR REPLACE FUNCTION pgturso._turso_name(rel oid) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT CASE WHEN n.nspname = 'public' THEN c.relname::text ELSE n.nspname || '.' || c.relname END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$$;
COMMENT ON FUNCTION pgturso._turso_name IS 'Private: default Turso name of a table or index.';

-- SQLite compares names ignoring the case of ASCII letters: two names equal under this clash on Turso.
CREATE OR REPLACE FUNCTION pgturso._sqlite_name(name text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$ SELECT translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') $$;
COMMENT ON FUNCTION pgturso._sqlite_name IS 'Private: a name as SQLite compares it (ASCII case folded).';

-- SQLite keeps tables and indexes in one namespace and compares names without ASCII case: a Turso name of a
-- table or of one of its indexes that another table or index of the target has (or another of its own names)
-- would make the CREATE fail on Turso and stop the whole target. Checked by track_table and at every schema
-- change (_follow_schema) against the latest layout of every other table of the target.
CREATE OR REPLACE FUNCTION pgturso._check_turso_names(rel regclass, target text, table_id integer,
                                                      target_table text, indexes jsonb) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_clash text;
BEGIN
    WITH mine AS (
        SELECT _check_turso_names.target_table AS name
        UNION ALL
        SELECT i ->> 'name' FROM jsonb_array_elements(coalesce(indexes, '[]')) AS i
    ), others AS (
        SELECT t.target_table AS name FROM pgturso.tracked_table t
        WHERE t.target = _check_turso_names.target AND t.id IS DISTINCT FROM _check_turso_names.table_id
        UNION ALL
        SELECT i ->> 'name'
        FROM (SELECT DISTINCT ON (l.table_id) l.spec
              FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
              WHERE t.target = _check_turso_names.target AND t.id IS DISTINCT FROM _check_turso_names.table_id
              ORDER BY l.table_id, l.id DESC) AS latest,
             jsonb_array_elements(coalesce(latest.spec -> 'indexes', '[]')) AS i
    )
    SELECT m.name INTO v_clash FROM mine m
    WHERE EXISTS (SELECT 1 FROM others o WHERE pgturso._sqlite_name(o.name) = pgturso._sqlite_name(m.name))
       OR (SELECT count(*) FROM mine m2 WHERE pgturso._sqlite_name(m2.name) = pgturso._sqlite_name(m.name)) > 1
    LIMIT 1;
    IF v_clash IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would use the name "%" on Turso, which another table or index there already has',
                        rel, v_clash
            USING DETAIL = 'Turso (SQLite) keeps tables and indexes in one namespace and compares names without '
                           'the case of ASCII letters.',
                  HINT = 'Rename the index (ALTER INDEX ... RENAME TO ...) or the table, pass another '
                         'target_table => ''name'' to pgturso.track_table, or track it with indexes => false.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._check_turso_names IS
    'Private: refuses a table whose Turso table or index names clash (ASCII case folded) with others of its target.';

CREATE OR REPLACE FUNCTION pgturso._is_deferrable(index_id oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$ SELECT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = index_id AND con.condeferrable) $$;
COMMENT ON FUNCTION pgturso._is_deferrable IS 'Private: whether an index backs a DEFERRABLE constraint.';

-- Reading a table's rows in the caller's transaction (a copy, or the keys a partition takes away) is right only
-- in READ COMMITTED, where each statement sees what the lock it waited for protects. A REPEATABLE READ or
-- SERIALIZABLE transaction took its snapshot when it began, maybe before the lock: rows committed in between
-- would be missed on Turso. Paths that can hand the copy to the worker (pgturso._copy_chunk, READ COMMITTED)
-- do so; the others call this to refuse.
CREATE OR REPLACE FUNCTION pgturso._snapshot_is_current() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$ SELECT current_setting('transaction_isolation') = 'read committed' $$;
COMMENT ON FUNCTION pgturso._snapshot_is_current IS
    'Private: whether each statement of this transaction sees what committed before it (READ COMMITTED).';

CREATE OR REPLACE FUNCTION pgturso._require_current_snapshot(operation text, rel regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF NOT pgturso._snapshot_is_current() THEN
        RAISE EXCEPTION 'pgturso: % of table % cannot run in a % transaction',
                        operation, rel, upper(current_setting('transaction_isolation'))
            USING DETAIL = 'pgturso must read the rows the table''s lock protects, and this transaction''s '
                           'snapshot may be older than that lock: rows committed meanwhile would be wrong on Turso.',
                  HINT = 'Run it in a READ COMMITTED transaction (BEGIN ISOLATION LEVEL READ COMMITTED; ...; '
                         'COMMIT), or SET default_transaction_isolation = ''read committed'' for the session.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._require_current_snapshot IS
    'Private: refuse an operation that reads a tracked table''s rows outside READ COMMITTED.';

-- A materialized view read in this transaction must not be refreshed by another until this commits. LOCK TABLE
-- refuses materialized views; ANALYZE takes SHARE UPDATE EXCLUSIVE, which REFRESH (ACCESS EXCLUSIVE) and
-- REFRESH ... CONCURRENTLY (EXCLUSIVE) both wait for, and holds it to the end of the transaction.
CREATE OR REPLACE FUNCTION pgturso._lock_materialized_view(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$ BEGIN EXECUTE format('ANALYZE %s', rel); END $$;
COMMENT ON FUNCTION pgturso._lock_materialized_view IS
    'Private: keep other REFRESHes of a materialized view out until this transaction ends.';

-- The key a table replicates by: key_columns if given, else the primary key, else the unique index over NOT
-- NULL columns with the fewest columns (materialized views: any unique index, NULLs allowed by Postgres).
-- DEFERRABLE constraints never serve: a deferred uniqueness check lets a second writer of a key go on without
-- waiting for the first, so their outbox ids need not follow their commit order (docs/design.md, fact 1).
CREATE OR REPLACE FUNCTION pgturso._key_columns(rel regclass, explicit text[]) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_keys text[];
    v_kind "char";
    v_bad text;
BEGIN
    SELECT relkind INTO v_kind FROM pg_class WHERE oid = rel;
    IF explicit IS NOT NULL THEN
        SELECT k INTO v_bad FROM unnest(explicit) AS k
        WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = k
                          AND a.attnum > 0 AND NOT a.attisdropped);
        IF v_bad IS NOT NULL OR cardinality(explicit) = 0 THEN
            RAISE EXCEPTION 'pgturso: key column "%" is not a column of %', coalesce(v_bad, ''), rel
                USING HINT = 'Pass existing column names: key_columns => ARRAY[''id'', ...].';
        END IF;
        IF v_kind <> 'm' THEN
            SELECT k INTO v_bad FROM unnest(explicit) AS k
            JOIN pg_attribute a ON a.attrelid = rel AND a.attname = k WHERE NOT a.attnotnull;
            IF v_bad IS NOT NULL THEN
                RAISE EXCEPTION 'pgturso: key column "%" of % may be NULL', v_bad, rel
                    USING HINT = format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL, then track the table.',
                                        rel, v_bad);
            END IF;
        END IF;
        RETURN explicit;
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary AND NOT pgturso._is_deferrable(i.indexrelid);
    IF v_keys IS NOT NULL THEN
        RETURN v_keys;
    END IF;
    SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord)
            FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
    INTO v_keys
    FROM pg_index i
    WHERE i.indrelid = rel AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
      AND NOT (0 = ANY (i.indkey[0:i.indnkeyatts - 1])) AND NOT pgturso._is_deferrable(i.indexrelid)
      AND (v_kind = 'm' OR NOT EXISTS (
              SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) AS k(attnum)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE NOT a.attnotnull))
    ORDER BY i.indnkeyatts, i.indexrelid::regclass::text
    LIMIT 1;
    IF v_keys IS NULL THEN
        SELECT con.conname INTO v_bad FROM pg_constraint con
        WHERE con.conrelid = rel AND con.contype IN ('p', 'u') AND con.condeferrable
        ORDER BY con.contype, con.conname LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'pgturso: the only key of table % is the DEFERRABLE constraint "%"', rel, v_bad
                USING DETAIL = 'A deferred uniqueness check lets two transactions write the same key without '
                               'waiting for each other, so pgturso could apply their changes on Turso in the '
                               'wrong order.',
                      HINT = format('Make the key NOT DEFERRABLE (ALTER TABLE %s DROP CONSTRAINT %I, then ADD '
                                    'PRIMARY KEY (...) without DEFERRABLE), or add a NOT DEFERRABLE unique '
                                    'index over NOT NULL columns for pgturso to replicate by.', rel, v_bad);
        END IF;
    END IF;
    RETURN v_keys;
END
$$;
COMMENT ON FUNCTION pgturso._key_columns IS 'Private: the columns a tracked table is keyed by on Turso (NULL: none).';

-- Row filters (track_table's row_filter) live in a publication of their own, pgturso_row_filter_<oid>, that
-- publishes nothing (publish = ''): Postgres 15 checks the filter exactly as for logical replication (columns of
-- the table, built-in immutable functions, operators and types only, no subqueries), keeps it in step with
-- column renames, and refuses to drop a column it uses. Capture evaluates pg_get_expr of it, never the text the
-- caller wrote: only built-in immutable code, whoever runs it.
CREATE OR REPLACE FUNCTION pgturso._create_row_filter(rel regclass, row_filter text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
-- CREATE PUBLICATION warns when wal_level is not logical: irrelevant here, nothing is published.
SET client_min_messages = error
AS $$
DECLARE
    v_publication text := 'pgturso_row_filter_' || rel::oid;
    v_message text;
    v_detail text;
BEGIN
    IF row_filter IS NULL OR btrim(row_filter) = '' THEN
        RAISE EXCEPTION 'pgturso: the row filter of % is empty', rel
            USING HINT = 'Pass a boolean expression over the table''s columns, e.g. row_filter => $f$status <> '
                         '''draft''$f$, or leave row_filter out to replicate every row.';
    END IF;
    BEGIN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE ONLY %s WHERE (%s) '
                       'WITH (publish = '''', publish_via_partition_root = true)', v_publication, rel, row_filter);
    EXCEPTION WHEN syntax_error OR undefined_column OR undefined_function OR datatype_mismatch
                   OR feature_not_supported OR invalid_object_definition OR undefined_object
                   OR grouping_error OR windowing_error OR invalid_text_representation
                   OR ambiguous_column OR ambiguous_function OR undefined_table THEN
        GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
        RAISE EXCEPTION 'pgturso: row filter of % is not allowed: %', rel,
                        replace(v_message, 'publication WHERE expression', 'row filter')
            USING DETAIL = coalesce(nullif(v_detail, ''), 'row_filter: ' || row_filter),
                  HINT = 'A row filter is a boolean expression over the table''s own columns using built-in '
                         'immutable functions and operators only (no subqueries, user-defined functions or types, '
                         'system columns), as in a Postgres 15 publication: e.g. status <> ''draft''.';
    END;
    RETURN v_publication;
END
$$;
COMMENT ON FUNCTION pgturso._create_row_filter IS
    'Private: check a row filter and keep it in its own publication (which publishes nothing); returns its name.';

CREATE OR REPLACE FUNCTION pgturso._row_filter(rel regclass, options jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_filter text;
BEGIN
    IF NOT options ? 'row_filter_publication' THEN
        RETURN NULL;
    END IF;
    SELECT pg_get_expr(pr.prqual, pr.prrelid) INTO v_filter
    FROM pg_publication p JOIN pg_publication_rel pr ON pr.prpubid = p.oid
    WHERE p.pubname = options ->> 'row_filter_publication' AND pr.prrelid = rel AND pr.prqual IS NOT NULL;
    IF v_filter IS NULL AND NOT EXISTS (SELECT 1 FROM pg_publication p
                                        WHERE p.pubname = options ->> 'row_filter_publication') THEN
        -- No such publication at all: pg_restore makes publications after the constraints, whose DDL is
        -- followed before then. The table's filter is its last layout's (a DROP COLUMN ... CASCADE removes
        -- the table from the publication, not the publication: that case stays an error below).
        SELECT l.spec ->> 'row_filter' INTO v_filter FROM pgturso.layout l
        JOIN pgturso.tracked_table t ON t.id = l.table_id
        WHERE t.relid = rel ORDER BY l.id DESC LIMIT 1;
    END IF;
    IF v_filter IS NULL THEN
        RAISE EXCEPTION 'pgturso: the row filter of tracked table % is gone (publication %)', rel,
                        options ->> 'row_filter_publication'
            USING HINT = 'A column the filter uses cannot be dropped, nor the publication changed, while the table '
                         'is tracked with it: untrack the table first (pgturso.untrack_table), then track it again.';
    END IF;
    RETURN v_filter;
END
$$;
COMMENT ON FUNCTION pgturso._row_filter IS 'Private: a tracked table''s row filter as Postgres deparses it (NULL: none).';

CREATE OR REPLACE FUNCTION pgturso._drop_row_filter(options jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF options ? 'row_filter_publication' THEN
        EXECUTE format('DROP PUBLICATION IF EXISTS %I', options ->> 'row_filter_publication');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._drop_row_filter IS 'Private: drop the publication holding a tracked table''s row filter.';

-- Everything _plan_layout needs to know about a relation, read from the catalog.
-- options -> 'column_attnums': track_table's column list, by attnum (a rename keeps a column in or out of it,
-- a column added later is out). options ->> 'row_filter_publication': the publication holding the row filter.
CREATE OR REPLACE FUNCTION pgturso._describe(
    rel regclass, options jsonb,
    OUT source_table text, OUT target_table text, OUT columns jsonb, OUT key_columns text[], OUT indexes jsonb,
    OUT row_filter text, OUT route_by text
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_excluded text;
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname) INTO source_table
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    target_table := coalesce(options ->> 'target_table', pgturso._turso_name(rel::oid));
    key_columns := pgturso._key_columns(rel, (SELECT array_agg(x) FROM jsonb_array_elements_text(
                                                 options -> 'key_columns') AS x));
    SELECT jsonb_agg(jsonb_build_object(
               'name', a.attname,
               'attnum', a.attnum,
               'pg_type', format_type(a.atttypid, a.atttypmod),
               'base_type', bt.typname,
               'kind', CASE WHEN bt.typcategory = 'A' THEN 'A' ELSE bt.typtype::text END,
               'typmod', CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
               'not_null', a.attnotnull,
               'deterministic', coalesce((SELECT co.collisdeterministic FROM pg_collation co
                                          WHERE co.oid = a.attcollation), true),
               'trusted', pgturso._trusted_type(a.atttypid),
               'base_pg_type', format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END))
           ORDER BY a.attnum)
    INTO columns
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    JOIN pg_type bt ON bt.oid = pgturso._base_type(a.atttypid)
    WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
      AND (NOT options ? 'column_attnums' OR options -> 'column_attnums' @> to_jsonb(a.attnum::integer));
    IF options ? 'column_attnums' THEN
        SELECT k INTO v_excluded FROM unnest(key_columns) AS k
        WHERE NOT columns @> jsonb_build_array(jsonb_build_object('name', k));
        IF v_excluded IS NOT NULL THEN
            RAISE EXCEPTION 'pgturso: key column "%" of % is not among the columns replicated to Turso', v_excluded, rel
                USING HINT = 'Turso needs the key to apply updates and deletes: include every key column in '
                             'columns => ARRAY[...] (or keep the key on replicated columns).';
        END IF;
    END IF;
    row_filter := pgturso._row_filter(rel, options);
    IF options ? 'route_attnum' THEN  -- by attnum: a rename of the column is followed
        SELECT a.attname INTO route_by FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attnum = (options ->> 'route_attnum')::integer AND NOT a.attisdropped;
        IF route_by IS NULL OR NOT columns @> jsonb_build_array(jsonb_build_object('name', route_by, 'not_null', true))
        THEN
            RAISE EXCEPTION 'pgturso: the route_by column of % must be a replicated NOT NULL column', rel
                USING HINT = 'Its value names the tenant database each row goes to: keep it NOT NULL and in the '
                             'column list (or untrack the table first).';
        END IF;
    END IF;
    -- Plain-column btree/hash indexes without predicate or deferral; partial, expression and other indexes
    -- (GIN, GiST, ...) have no SQLite equivalent and stay on Postgres.
    IF coalesce((options ->> 'indexes')::boolean, true) THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'name', pgturso._turso_name(i.indexrelid),
                   'unique', i.indisunique,
                   'columns', (SELECT jsonb_agg(a.attname ORDER BY k.ord)
                               FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
                               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum))
                   ORDER BY i.indexrelid::regclass::text), '[]')
        INTO indexes
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_am am ON am.oid = ic.relam
        WHERE i.indrelid = rel AND NOT i.indisprimary AND i.indisvalid AND i.indpred IS NULL
          AND am.amname IN ('btree', 'hash')
          AND NOT (0 = ANY (i.indkey[0:i.indnkeyatts - 1]))
          AND NOT pgturso._is_deferrable(i.indexrelid);
    ELSE
        indexes := '[]';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._describe IS
    'Private: a relation''s names, replicated columns, key, indexes and row filter for its layout.';

-- Keys Turso could not tell apart the way Postgres does: an array key's bounds are not in its JSON form
-- ('{1,2}' and '[0:1]={1,2}' are two keys in Postgres, one on Turso).
CREATE OR REPLACE FUNCTION pgturso._check_key(rel regclass, columns jsonb, key_columns text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_bad text;
BEGIN
    SELECT c ->> 'name' INTO v_bad FROM jsonb_array_elements(columns) AS c
    WHERE c ->> 'kind' = 'A' AND c ->> 'name' = ANY (key_columns) LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: key column "%" of % is an array, which cannot key a Turso table', v_bad, rel
            USING HINT = format('Arrays with other lower bounds are different keys in Postgres but the same on '
                                'Turso. Key the table by other columns: a primary key, or '
                                'pgturso.track_table(%L, key_columns => ARRAY[...]).', rel::text);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._check_key IS 'Private: refuse keys that Turso cannot keep apart as Postgres does.';
REVOKE ALL ON FUNCTION pgturso._check_key(regclass, jsonb, text[]) FROM PUBLIC;

-- An unlogged table is emptied by crash recovery and is empty on a promoted standby, without any trigger
-- firing: Turso would keep rows Postgres lost. Refused for tracked tables (and their partitions).
CREATE OR REPLACE FUNCTION pgturso._refuse_unlogged(rels oid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_rel regclass;
BEGIN
    SELECT c.oid INTO v_rel FROM unnest(rels) AS x(rel)
    JOIN pg_class c ON c.oid IN (SELECT x.rel UNION SELECT relid FROM pg_partition_tree(x.rel))
    WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p', 'm') LIMIT 1;
    IF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % is unlogged, so a crash or a failover empties it without Postgres telling '
                        'pgturso', v_rel
            USING HINT = format('Make it logged (ALTER TABLE %s SET LOGGED) to replicate it, or untrack it first.',
                                v_rel);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._refuse_unlogged IS 'Private: refuse unlogged tables (crash recovery empties them).';
REVOKE ALL ON FUNCTION pgturso._refuse_unlogged(oid[]) FROM PUBLIC;

-- What to select a relation's rows from: ONLY for a plain table (inheritance children are not tracked).
-- Only tables and materialized views are read: a view (a table can become one, CREATE RULE "_RETURN") or a
-- foreign table would run code its owner chose with the reader's rights (docs/security.md).
CREATE OR REPLACE FUNCTION pgturso._row_source(rel regclass) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_kind "char" := (SELECT c.relkind FROM pg_class c WHERE c.oid = rel);
BEGIN
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p', 'm') THEN
        RAISE EXCEPTION 'pgturso: % is not a table or materialized view (relkind %)', rel, v_kind
            USING HINT = 'pgturso reads only tables and materialized views; untrack it: '
                         'SELECT pgturso.untrack_table(' || quote_literal(rel::text) || ').';
    END IF;
    RETURN CASE WHEN v_kind = 'r' THEN 'ONLY ' ELSE '' END || rel::text;
END
$$;
COMMENT ON FUNCTION pgturso._row_source IS 'Private: FROM clause text for a tracked relation''s rows.';

-- Whether a tracked table's capture is off: a capture trigger of it (or of a partition) disabled, or set to
-- fire only under session_replication_role = replica. Its writes are then not replicated (pgturso.status).
CREATE OR REPLACE FUNCTION pgturso._capture_disabled(table_id integer) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger g
                   WHERE g.tgname LIKE 'pgturso\_capture\_%' AND g.tgenabled IN ('D', 'R')
                     AND g.tgfoid = to_regprocedure(format('pgturso.%I()', pgturso._capture_function_name(table_id))))
$$;
COMMENT ON FUNCTION pgturso._capture_disabled IS
    'Private: whether a tracked table''s capture triggers are disabled (ALTER TABLE ... DISABLE TRIGGER).';
-- Private like every pgturso function (90_privileges.sql revokes them from PUBLIC); pgturso.status calls it, so
-- grant_worker grants it to the worker's role with the view.

-- How a tracked table is captured: by its target's capture mode ('trigger' or 'wal').
CREATE OR REPLACE FUNCTION pgturso._capture_of(table_id integer) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT g.capture FROM pgturso.tracked_table t JOIN pgturso.target g ON g.name = t.target WHERE t.id = table_id
$$;
COMMENT ON FUNCTION pgturso._capture_of IS 'Private: the capture mode of a tracked table (its target''s).';

-- Install (or, after a schema change, replace) the capture function, and the triggers if missing.
CREATE OR REPLACE FUNCTION pgturso._install_capture(rel regclass, table_id integer, plan jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_function text := pgturso._capture_function_name(table_id);
    v_kind "char";
    v_part regclass;
    v_trigger name;
BEGIN
    SELECT relkind INTO v_kind FROM pg_class WHERE oid = rel;
    IF v_kind <> 'm' AND pgturso._capture_of(table_id) = 'wal' THEN  -- no trigger: the slot has the rows
        PERFORM pgturso._install_wal_capture(rel, table_id, plan);
        RETURN;
    END IF;
    IF v_kind = 'm' THEN
        EXECUTE plan ->> 'refresh_function_sql';
        EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I(regclass, boolean) FROM PUBLIC', v_function || '_refresh');
        EXECUTE format('ALTER FUNCTION pgturso.%I(regclass, boolean) DEPENDS ON EXTENSION pgturso',
                       v_function || '_refresh');
        RETURN;
    END IF;
    EXECUTE plan ->> 'capture_function_sql';
    EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I() FROM PUBLIC', v_function);
    -- The generated function and triggers are not members of the extension (pg_dump dumps them with the
    -- tables), but they go with it: DROP EXTENSION pgturso removes them, so the tables work as before.
    EXECUTE format('ALTER FUNCTION pgturso.%I() DEPENDS ON EXTENSION pgturso', v_function);
    -- A partitioned table: statements on the parent fire its triggers, statements on a partition fire the
    -- partition's; every partition at any depth gets the same capture function.
    FOR v_part IN SELECT p.relid FROM (SELECT rel AS relid UNION SELECT relid FROM pg_partition_tree(rel)) p
                  WHERE NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p.relid
                                    AND g.tgname = 'pgturso_capture_insert')
    LOOP
        EXECUTE format('CREATE TRIGGER pgturso_capture_insert AFTER INSERT ON %s '
                       'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()',
                       v_part, v_function);
        EXECUTE format('CREATE TRIGGER pgturso_capture_update AFTER UPDATE ON %s '
                       'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', v_part, v_function);
        EXECUTE format('CREATE TRIGGER pgturso_capture_delete AFTER DELETE ON %s '
                       'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()',
                       v_part, v_function);
        IF v_part = rel THEN
            EXECUTE format('CREATE TRIGGER pgturso_capture_truncate AFTER TRUNCATE ON %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', v_part, v_function);
        ELSE
            -- Truncating one partition deletes only its rows on Turso: send their keys before they go.
            EXECUTE format('CREATE TRIGGER pgturso_capture_truncate BEFORE TRUNCATE ON %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION pgturso._capture_partition_truncate(%s)',
                           v_part, table_id);
        END IF;
    END LOOP;
    FOR v_part, v_trigger IN
        SELECT g.tgrelid::regclass, g.tgname FROM pg_trigger g
        WHERE g.tgname IN ('pgturso_capture_insert', 'pgturso_capture_update', 'pgturso_capture_delete',
                           'pgturso_capture_truncate')
          AND g.tgrelid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_trigger'::regclass AND d.objid = g.oid AND d.deptype = 'x')
    LOOP
        EXECUTE format('ALTER TRIGGER %I ON %s DEPENDS ON EXTENSION pgturso', v_trigger, v_part);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._install_capture IS 'Private: (re)create a tracked relation''s capture.';

-- Truncating a partition of a tracked partitioned table: its rows' keys as delete events.
CREATE OR REPLACE FUNCTION pgturso._capture_partition_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_root regclass;
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    -- SECURITY DEFINER (it writes the outbox): it trusts neither its argument nor the table firing it. Only
    -- the trigger _install_capture creates qualifies: BEFORE TRUNCATE, FOR EACH STATEMENT, on a partition
    -- (at any depth) of the tracked table whose id is its one argument.
    IF TG_NARGS = 1 AND TG_NAME = 'pgturso_capture_truncate' AND TG_WHEN = 'BEFORE' AND TG_LEVEL = 'STATEMENT'
       AND TG_OP = 'TRUNCATE' AND TG_ARGV[0] ~ '^[0-9]{1,9}$' THEN
        SELECT t.relid INTO v_root FROM pgturso.tracked_table t
        WHERE t.id = TG_ARGV[0]::integer AND t.dropped_at IS NULL;
    END IF;
    IF v_root IS NULL OR TG_RELID = v_root::oid
       OR NOT EXISTS (SELECT 1 FROM pg_partition_tree(v_root) p WHERE p.relid::oid = TG_RELID) THEN
        RAISE EXCEPTION 'pgturso: _capture_partition_truncate fired on %, which is not a partition of the '
                        'tracked table it names', TG_RELID::regclass
            USING HINT = 'It is pgturso''s own trigger function: only pgturso.track_table attaches it. '
                         'Drop this trigger.';
    END IF;
    -- TRUNCATE holds its lock already; the keys must be read in a snapshot taken after it.
    PERFORM pgturso._require_current_snapshot('TRUNCATE of a partition', TG_RELID::regclass);
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = TG_ARGV[0]::integer ORDER BY l.id DESC LIMIT 1;
    EXECUTE pgturso._plan_rows(v_layout_id, v_spec, TG_RELID::regclass::text, 'D'::text);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgturso._capture_partition_truncate IS
    'Private: trigger sending the keys of a partition''s rows as deletes before TRUNCATE removes them.';

CREATE OR REPLACE FUNCTION pgturso._drop_capture_functions(table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_name text := pgturso._capture_function_name(table_id);
BEGIN
    IF to_regprocedure(format('pgturso.%I()', v_name)) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION pgturso.%I()', v_name);
    END IF;
    IF to_regprocedure(format('pgturso.%I(regclass, boolean)', v_name || '_refresh')) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION pgturso.%I(regclass, boolean)', v_name || '_refresh');
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._drop_capture_functions IS 'Private: drop a tracked relation''s generated functions.';

-- Remove the capture of a tracked relation (and its partitions).
CREATE OR REPLACE FUNCTION pgturso._remove_capture(rel regclass, table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_part regclass;
    v_trigger text;
BEGIN
    PERFORM pgturso._remove_wal_capture(rel);
    IF to_regproc(format('pgturso.%I', pgturso._capture_function_name(table_id))) IS NULL THEN
        PERFORM pgturso._drop_capture_functions(table_id);
        RETURN;
    END IF;
    FOR v_part IN SELECT g.tgrelid::regclass FROM pg_trigger g
                  WHERE g.tgname = 'pgturso_capture_insert'
                    AND g.tgfoid = format('pgturso.%I', pgturso._capture_function_name(table_id))::regproc
    LOOP
        FOREACH v_trigger IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgturso_capture_' || v_trigger, v_part);
        END LOOP;
    END LOOP;
    PERFORM pgturso._drop_capture_functions(table_id);
END
$$;
COMMENT ON FUNCTION pgturso._remove_capture IS 'Private: drop a tracked relation''s triggers and functions.';

-- Tables dropped in Postgres stay in tracked_table until the worker delivered their last changes.
CREATE OR REPLACE FUNCTION pgturso._forget_dropped() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    DELETE FROM pgturso.tracked_table t
    WHERE t.dropped_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM pgturso.outbox o JOIN pgturso.layout l ON l.id = o.layout_id
                      WHERE l.table_id = t.id)
$$;
COMMENT ON FUNCTION pgturso._forget_dropped IS 'Private: forget dropped tables whose changes were all delivered.';

-- The chunked copy of a table's existing rows, driven by the worker, while capture already runs.
CREATE OR REPLACE FUNCTION pgturso._start_copy(table_id integer) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    UPDATE pgturso.tracked_table t
    SET copy_state = 'copying', copy_after = NULL, copy_rows_done = 0, copy_started_at = now(),
        copy_finished_at = NULL,
        copy_rows_total = (SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_class c
                           WHERE c.oid IN (SELECT t.relid UNION SELECT relid FROM pg_partition_tree(t.relid)))
    WHERE t.id = table_id
$$;

-- One chunk: the next max_rows rows in key order, locked FOR SHARE while their upserts are queued, so a
-- write to one of them either committed before (and is read here) or waits and lands after. Called by the
-- worker in its own READ COMMITTED transaction; returns the rows copied, or NULL when no copy was pending.
-- SECURITY DEFINER: the worker needs no right on application tables, and every row is copied whatever
-- row-level security says. It copies only tables being copied, and runs no code a user could define
-- (docs/security.md: key bounds are read back as built-in types, values encoded by output functions).
CREATE OR REPLACE FUNCTION pgturso._copy_chunk(table_id integer, max_rows integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_rel regclass;
    v_after text[];
    v_layout_id integer;
    v_spec jsonb;
    v_rows bigint;
    v_last text[];
    v_sql jsonb;
BEGIN
    IF max_rows IS NULL OR max_rows NOT BETWEEN 1 AND 10000000 THEN
        RAISE EXCEPTION 'pgturso: a copy chunk of % rows', max_rows
            USING HINT = 'Set copy_chunk_rows between 1 and 10,000,000.';
    END IF;
    SELECT t.relid, t.copy_after INTO v_rel, v_after FROM pgturso.tracked_table t
    WHERE t.id = table_id AND t.copy_state = 'copying' AND t.dropped_at IS NULL
    FOR UPDATE OF t;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = v_rel) NOT IN ('r', 'p') THEN
        -- Its owner turned it into something else (a view: CREATE RULE "_RETURN"): never read it.
        UPDATE pgturso.tracked_table t SET copy_state = 'done', copy_finished_at = now() WHERE t.id = table_id;
        RAISE WARNING 'pgturso: % is no longer a table; its copy is abandoned', v_rel
            USING HINT = format('SELECT pgturso.untrack_table(%L)', v_rel::text);
        RETURN 0;
    END IF;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = _copy_chunk.table_id ORDER BY l.id DESC LIMIT 1;
    v_sql := pgturso._plan_copy_chunk(v_layout_id, v_spec, pgturso._row_source(v_rel), max_rows);
    EXECUTE v_sql ->> 'bound' INTO v_last USING v_after;
    EXECUTE v_sql ->> 'chunk' INTO v_rows USING v_after, v_last;
    -- v_last is where this chunk ended; NULL when it took everything that was left.
    UPDATE pgturso.tracked_table t
    SET copy_after = v_last,
        copy_rows_done = t.copy_rows_done + v_rows,
        copy_rows_total = greatest(t.copy_rows_total, t.copy_rows_done + v_rows),
        copy_state = CASE WHEN v_last IS NULL THEN 'done' ELSE 'copying' END,
        copy_finished_at = CASE WHEN v_last IS NULL THEN now() END
    WHERE t.id = table_id;
    IF v_last IS NULL THEN
        UPDATE pgturso.tracked_table t SET copy_rows_total = t.copy_rows_done WHERE t.id = table_id;
    END IF;
    IF v_rows > 0 THEN
        PERFORM pgturso._wake_worker();
    END IF;
    RETURN v_rows;
END
$$;

CREATE OR REPLACE FUNCTION pgturso.track_table(
    rel regclass,
    target_table text DEFAULT NULL,
    key_columns text[] DEFAULT NULL,
    indexes boolean DEFAULT true,
    drop_target boolean DEFAULT false,
    target text DEFAULT 'default',
    columns text[] DEFAULT NULL,
    row_filter text DEFAULT NULL,
    capture text DEFAULT NULL,
    route_by text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
-- The initial copy encodes values exactly as the capture functions do: the settings placeholder below is
-- replaced by pgturso.capture.CAPTURE_SETTINGS when extension/build.py builds the script.
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_kind "char";
    v_parent regclass;
    v_options jsonb;
    v_desc record;
    v_table_id integer;
    v_layout_id integer;
    v_plan jsonb;
    v_dup boolean;
    v_small bigint;
    v_attnums integer[];
    v_unknown text;
    v_capture text;
    v_route_attnum integer;
BEGIN
    -- Turso stores text as UTF-8, and the worker asks Postgres for UTF-8 (worker/pgturso/common/postgres.py),
    -- which Postgres converts to from any database encoding but SQL_ASCII (bytes of no declared encoding).
    IF current_setting('server_encoding') <> 'UTF8' AND NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_conversion c
            WHERE c.condefault AND c.conforencoding = pg_catalog.pg_char_to_encoding(current_setting('server_encoding'))
              AND c.contoencoding = pg_catalog.pg_char_to_encoding('UTF8')) THEN
        RAISE EXCEPTION 'pgturso: cannot track %: database % has encoding %, which Postgres cannot convert to UTF-8 (Turso stores text as UTF-8)',
            rel, current_database(), current_setting('server_encoding')
            USING HINT = 'Replicate from a database with a real encoding (UTF8, LATIN1, WIN1252, ...): create one '
                         'with CREATE DATABASE ... ENCODING ''UTF8'' TEMPLATE template0 and move the table there.';
    END IF;
    -- The capture mode is the target's: one slot feeds one target's worker, in commit order.
    v_capture := coalesce(track_table.capture,
                          (SELECT g.capture FROM pgturso.target g WHERE g.name = track_table.target), 'trigger');
    IF v_capture NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'pgturso: unknown capture mode %', v_capture
            USING HINT = 'Use capture => ''trigger'' (the default) or capture => ''wal''.';
    END IF;
    IF v_capture = 'wal' AND EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = track_table.target) THEN
        PERFORM pgturso._prepare_wal_capture(track_table.target);  -- first: it must not follow a write
    END IF;
    SELECT c.relkind, c.relispartition INTO v_kind FROM pg_class c WHERE c.oid = rel;
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p', 'm') THEN
        RAISE EXCEPTION 'pgturso: % is not a table (relkind %)', rel, v_kind
            USING HINT = 'track_table takes an ordinary table, a partitioned table or a materialized view; '
                         'views and other relations cannot be tracked.';
    END IF;
    SELECT i.inhparent INTO v_parent FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhrelid = rel AND c.relispartition;
    IF v_parent IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % is a partition of %', rel, v_parent
            USING HINT = format('Track the partitioned table: SELECT pgturso.track_table(%L). '
                                'Its partitions, present and future, all feed one Turso table.',
                                pgturso._partition_root(rel)::text);
    END IF;
    IF (SELECT relpersistence FROM pg_class WHERE oid = rel) = 't' THEN
        RAISE EXCEPTION 'pgturso: % is a temporary table', rel
            USING HINT = 'Only its own session sees a temporary table, and it goes with the session: track a '
                         'permanent table.';
    END IF;
    PERFORM pgturso._refuse_unlogged(ARRAY[rel::oid]);
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE rel IN (i.inhparent, i.inhrelid) AND NOT c.relispartition) THEN
        RAISE EXCEPTION 'pgturso: % is part of an inheritance tree (INHERITS), which pgturso does not replicate', rel
            USING HINT = 'Statements on an inheritance parent include its children''s rows: use a partitioned '
                         'table instead, or detach the tables (ALTER TABLE child NO INHERIT parent) first.';
    END IF;
    PERFORM pgturso._forget_dropped();
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.relid = rel) THEN
        RAISE EXCEPTION 'pgturso: table % is already tracked', rel
            USING HINT = 'Call pgturso.untrack_table(''' || rel::text || ''') first to track it afresh.';
    END IF;

    -- Installing the capture triggers takes this lock anyway; writers wait only until this short
    -- transaction commits (the rows are copied afterwards, in chunks). A materialized view changes only by
    -- REFRESH, which pgturso follows from here on (see 30_*.sql).
    -- A materialized view is copied right here: no REFRESH may commit until this does.
    IF v_kind <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    ELSE
        PERFORM pgturso._require_current_snapshot('track_table', rel);
        PERFORM pgturso._lock_materialized_view(rel);
    END IF;

    IF track_table.columns IS NOT NULL THEN
        SELECT c INTO v_unknown FROM unnest(track_table.columns) AS c
        WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = c
                          AND a.attnum > 0 AND NOT a.attisdropped);
        IF v_unknown IS NOT NULL OR cardinality(track_table.columns) = 0 THEN
            RAISE EXCEPTION 'pgturso: "%" is not a column of %', coalesce(v_unknown, ''), rel
                USING HINT = 'columns => ARRAY[...] names the columns of the table that go to Turso (the key '
                             'included); leave it out to replicate every column.';
        END IF;
        SELECT array_agg(DISTINCT a.attnum ORDER BY a.attnum) INTO v_attnums FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attname = ANY (track_table.columns) AND a.attnum > 0 AND NOT a.attisdropped;
    END IF;
    v_options := jsonb_strip_nulls(jsonb_build_object(
        'target_table', track_table.target_table, 'key_columns', track_table.key_columns,
        'indexes', CASE WHEN NOT track_table.indexes THEN false END,
        'drop_target', CASE WHEN track_table.drop_target THEN true END,
        'column_attnums', to_jsonb(v_attnums)));
    IF strpos(track_table.target, '%s') > 0 OR track_table.route_by IS NOT NULL THEN
        IF strpos(track_table.target, '%s') = 0 THEN
            RAISE EXCEPTION 'pgturso: route_by needs a pattern target, not %', track_table.target
                USING HINT = 'Create one whose name holds %s: SELECT pgturso.add_target(''tenant-%s'', '
                             '''libsql://tenant-%s-myorg.turso.io'', ''token''), then track_table(..., '
                             'target => ''tenant-%s'', route_by => ''tenant_id'').';
        END IF;
        IF track_table.route_by IS NULL THEN
            -- A reference table: all of its rows go to every tenant database of the pattern, present and future.
            IF v_kind = 'm' THEN
                RAISE EXCEPTION 'pgturso: materialized view % cannot be a reference table of pattern target %',
                                rel, track_table.target
                    USING HINT = 'Track a table instead (e.g. one that the view''s query fills), or track the view '
                                 'to a named target of its own.';
            END IF;
            v_options := v_options || jsonb_build_object('reference', true);
        ELSE
            SELECT a.attnum INTO v_route_attnum FROM pg_attribute a
            WHERE a.attrelid = rel AND a.attname = track_table.route_by AND a.attnum > 0 AND NOT a.attisdropped;
            IF v_route_attnum IS NULL OR v_kind = 'm' THEN
                RAISE EXCEPTION 'pgturso: route_by "%" is not a column of table %', track_table.route_by, rel
                    USING HINT = 'route_by names a NOT NULL column of an ordinary or partitioned table whose value '
                                 'is the tenant (e.g. tenant_id).';
            END IF;
            v_options := v_options || jsonb_build_object('route_attnum', v_route_attnum);
        END IF;
    END IF;
    IF track_table.row_filter IS NOT NULL THEN
        v_options := v_options || jsonb_build_object(
            'row_filter_publication', pgturso._create_row_filter(rel, track_table.row_filter));
    END IF;
    v_desc := pgturso._describe(rel, v_options);
    IF v_desc.key_columns IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % has no primary key and no unique index over NOT NULL columns', rel
            USING HINT = format('Add one (ALTER TABLE %s ADD PRIMARY KEY (...)), or name columns whose values '
                                'are unique: pgturso.track_table(%L, key_columns => ARRAY[...]).', rel, rel::text);
    END IF;
    PERFORM pgturso._check_key(rel, v_desc.columns, v_desc.key_columns);
    IF track_table.key_columns IS NOT NULL THEN
        -- Nothing in Postgres keeps these unique later: say so now if they are not unique already.
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s GROUP BY %s HAVING count(*) > 1)', rel,
                       (SELECT string_agg(quote_ident(k), ', ') FROM unnest(track_table.key_columns) AS k))
            INTO v_dup;
        IF v_dup THEN
            RAISE EXCEPTION 'pgturso: key columns % of % hold duplicate values', track_table.key_columns, rel
                USING HINT = 'Pass key_columns that are unique, or better, add a unique index over them.';
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = track_table.target) THEN
        RAISE EXCEPTION 'pgturso: there is no target %', track_table.target
            USING HINT = 'Create it first: SELECT pgturso.add_target(''name'', ''libsql://...'', ''token'').';
    END IF;
    -- A tenant's database gets its pattern's tables only: another stream of events would share its marker.
    -- Update the target's row first: a registration of a tenant of this name (pgturso._register_tenants)
    -- updates it too, so one of the two waits for the other and then sees it (or, under REPEATABLE READ, the
    -- later one gets a serialization failure): never both checking before either committed.
    UPDATE pgturso.target g SET generation = g.generation + 1 WHERE g.name = track_table.target;
    IF EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = track_table.target AND g.pattern IS NOT NULL) THEN
        RAISE EXCEPTION 'pgturso: % is a tenant database of pattern target %', track_table.target,
                        (SELECT g.pattern FROM pgturso.target g WHERE g.name = track_table.target)
            USING HINT = 'Track the table to the pattern (with route_by, or without it: a reference table sent to '
                         'every tenant), or to a target of its own (pgturso.add_target).';
    END IF;
    IF v_capture <> (SELECT g.capture FROM pgturso.target g WHERE g.name = track_table.target) THEN
        IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = track_table.target) THEN
            RAISE EXCEPTION 'pgturso: target % captures its tables by %, not %', track_table.target,
                (SELECT g.capture FROM pgturso.target g WHERE g.name = track_table.target), v_capture
                USING HINT = 'All tables of a target share one capture mode: track this one to another target '
                             '(pgturso.add_target), or untrack the target''s tables first.';
        END IF;
        UPDATE pgturso.target g SET capture = v_capture WHERE g.name = track_table.target;
        IF v_capture = 'trigger' THEN
            PERFORM pgturso._drop_slot(track_table.target);
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t
               WHERE t.target = track_table.target
                 AND pgturso._sqlite_name(t.target_table) = pgturso._sqlite_name(v_desc.target_table)) THEN
        RAISE EXCEPTION 'pgturso: another tracked table already replicates to Turso table "%"', v_desc.target_table
            USING HINT = 'Pass a different target_table => ''name'' to pgturso.track_table (or, if that table was '
                         'dropped, let the worker deliver its last changes first).';
    END IF;
    PERFORM pgturso._check_turso_names(rel, track_table.target, NULL, v_desc.target_table, v_desc.indexes);

    INSERT INTO pgturso.tracked_table (relid, target, target_table, options)
    VALUES (rel, track_table.target, v_desc.target_table, v_options) RETURNING id INTO v_table_id;
    -- The counters' row exists before the worker's first batch of the table: that batch only updates it. An
    -- insert would check its foreign key, locking this tracked_table row FOR KEY SHARE until Turso confirms
    -- the batch, and a RENAME of the table (a new Turso name: a key of this row) would wait for Turso while it
    -- holds the table's lock (test_renaming_a_table_whose_first_batch_turso_holds_never_waits_for_turso).
    -- Tenants of a pattern keep no per-table counters.
    IF strpos(track_table.target, '%s') = 0 THEN
        INSERT INTO pgturso.table_state (table_id) VALUES (v_table_id);
    END IF;
    INSERT INTO pgturso.layout (table_id, spec) VALUES (v_table_id, '{}') RETURNING id INTO v_layout_id;
    v_plan := pgturso._plan_layout(v_layout_id, pgturso._row_source(rel), v_desc.source_table, v_desc.target_table,
                                   v_desc.columns, v_desc.key_columns, pgturso._capture_function_name(v_table_id),
                                   v_desc.indexes, v_desc.row_filter, v_desc.route_by, v_options ? 'reference');
    UPDATE pgturso.layout SET spec = v_plan -> 'spec', generated = pgturso._generated_expressions(rel)
    WHERE id = v_layout_id;

    -- Create the Turso table and start capture now. The rows already there are copied by the worker in
    -- chunks of short transactions (pgturso._copy_chunk): writers are not held up by a long copy. A
    -- materialized view cannot lock rows and changes only by REFRESH: it is copied right here.
    PERFORM pgturso._fan_out(v_layout_id, 'C', NULL);  -- one per tenant database for a pattern target
    -- A small table is copied here, under the lock this transaction holds anyway: it is on Turso as soon as
    -- this commit is, and the worker has no copy to do. Outside READ COMMITTED this transaction's snapshot
    -- may predate the lock (a writer that committed while we waited would be missing): the worker copies.
    v_small := NULL;
    IF pgturso._snapshot_is_current() THEN
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 10001) AS s', pgturso._row_source(rel))
            INTO v_small;
    END IF;
    IF v_kind = 'm' OR v_small <= 10000 THEN
        EXECUTE v_plan ->> 'snapshot_sql';
        UPDATE pgturso.tracked_table t SET copy_rows_done = v_small, copy_rows_total = v_small,
            copy_started_at = now(), copy_finished_at = now()
        WHERE t.id = v_table_id AND v_kind <> 'm';
    ELSE
        PERFORM pgturso._start_copy(v_table_id);
    END IF;
    PERFORM pgturso._install_capture(rel, v_table_id, v_plan);
    PERFORM pgturso._wake_worker();
END
$$;
COMMENT ON FUNCTION pgturso.track_table IS
    'Replicate a table, partitioned table or materialized view to Turso: create it there (with its indexes '
    'unless indexes => false), copy its rows, then send every committed change and schema change. '
    'target_table names it on Turso (default: the table name, schema.name outside public). key_columns '
    'names the key when the table has no primary key or unique index over NOT NULL columns. drop_target: '
    'DROP TABLE in Postgres drops the Turso table too (default: it stays). target: the named target '
    '(pgturso.add_target) whose worker delivers it. columns: only these columns (the key included) go to '
    'Turso; the others, and columns added later, never leave Postgres. row_filter: only rows for which this '
    'boolean expression (the table''s columns, built-in immutable functions) is true are on Turso; an UPDATE '
    'moving a row in or out of it arrives as an insert or a delete there. capture: ''trigger'' (statement triggers; no server '
    'setting) or ''wal'' (decoded from a logical replication slot; needs wal_level = logical; writers pay '
    'almost nothing); a target''s tables share one mode, set by its first table (default: the target''s). route_by (with a pattern '
    'target such as ''tenant-%s''): each row goes to the database of the tenant its value names; a table tracked to a '
    'pattern target without route_by is a reference table, sent whole to every tenant database.';

CREATE OR REPLACE FUNCTION pgturso._partition_root(rel regclass) RETURNS regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$ SELECT a FROM pg_partition_ancestors(rel) AS a ORDER BY pg_partition_root(rel) = a DESC LIMIT 1 $$;
COMMENT ON FUNCTION pgturso._partition_root IS 'Private: the topmost partitioned table above a partition.';

CREATE OR REPLACE FUNCTION pgturso.resync_table(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_table_id integer;
    v_kind "char";
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    SELECT t.id, c.relkind INTO v_table_id, v_kind FROM pgturso.tracked_table t JOIN pg_class c ON c.oid = t.relid
    WHERE t.relid = rel AND t.dropped_at IS NULL;
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % is not tracked', rel
            USING HINT = format('Track it: SELECT pgturso.track_table(%L).', rel::text);
    END IF;
    PERFORM pgturso._row_source(rel);  -- still a table (or materialized view), or an error
    -- Recreate the Turso table empty, in order with the changes before and after, then copy it again. The
    -- lock (what track_table takes) waits for every open writer of the table: their events, drawn before
    -- the recreate's, are then committed and visible to the copy, instead of landing before the recreate
    -- and missing from the copy. Writers wait only for this short transaction.
    IF v_kind = 'm' THEN
        PERFORM pgturso._require_current_snapshot('resync_table', rel);
        PERFORM pgturso._lock_materialized_view(rel);
    ELSE
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    END IF;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = v_table_id ORDER BY l.id DESC LIMIT 1;
    -- Recreate the Turso table empty, in order with the changes before and after, then copy it again.
    PERFORM pgturso._fan_out(v_layout_id, 'C', NULL);
    IF v_kind = 'm' THEN
        EXECUTE pgturso._plan_rows(v_layout_id, v_spec, pgturso._row_source(rel), 'U'::text);
    ELSE
        PERFORM pgturso._start_copy(v_table_id);
    END IF;
    PERFORM pgturso._wake_worker();
END
$$;
COMMENT ON FUNCTION pgturso.resync_table IS
    'Copy a tracked table to Turso afresh: its Turso table is recreated and refilled in chunks while '
    'changes keep flowing; progress in pgturso.status.';

-- Every deletion of pending outbox events besides delivery's records itself here, in its own transaction
-- (pgturso.outbox_deletion: a worker's batch read ahead is sent as read only if no such row committed since).
CREATE OR REPLACE FUNCTION pgturso._note_outbox_deletion(operation text, events bigint) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    INSERT INTO pgturso.outbox_deletion (operation, events)
    SELECT _note_outbox_deletion.operation, _note_outbox_deletion.events WHERE _note_outbox_deletion.events > 0
$$;
COMMENT ON FUNCTION pgturso._note_outbox_deletion IS
    'Private: record that this transaction deleted pending outbox events (a batch read ahead is checked against it).';

CREATE OR REPLACE FUNCTION pgturso.untrack_table(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_table_id integer;
    v_target text;
    v_deleted bigint;
    v_deleted_late bigint;
BEGIN
    SELECT id INTO v_table_id FROM pgturso.tracked_table WHERE relid = rel AND dropped_at IS NULL;
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: table % is not tracked', rel
            USING HINT = 'SELECT relid FROM pgturso.tracked_table lists the tracked tables.';
    END IF;
    -- Dropping the triggers waits for the table's open writers; their events must then be deleted too, which a
    -- snapshot taken before that wait cannot see (they would stay, naming a layout that is gone).
    PERFORM pgturso._require_current_snapshot('untrack_table', rel);
    -- A worker's short transactions (reading a batch, recording one Turso confirmed: pipeline.py) may lock this
    -- table's events, its counters (table_state) and its tracked_table row (the counters' key), never across a
    -- Turso request. Wait for them first, while nothing is locked on the table itself: dropping the triggers
    -- takes its ACCESS EXCLUSIVE lock, and every reader and writer of the table would wait behind this call.
    DELETE FROM pgturso.outbox o USING pgturso.layout l WHERE o.layout_id = l.id AND l.table_id = v_table_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    PERFORM FROM pgturso.table_state s WHERE s.table_id = v_table_id FOR UPDATE;
    PERFORM FROM pgturso.tracked_table t WHERE t.id = v_table_id FOR UPDATE;
    PERFORM pgturso._remove_capture(rel, v_table_id);
    PERFORM pgturso._drop_row_filter(t.options) FROM pgturso.tracked_table t WHERE t.id = v_table_id;
    -- And the events of writers that committed while the triggers were dropped.
    DELETE FROM pgturso.outbox o USING pgturso.layout l WHERE o.layout_id = l.id AND l.table_id = v_table_id;
    GET DIAGNOSTICS v_deleted_late = ROW_COUNT;
    PERFORM pgturso._note_outbox_deletion('untrack_table', v_deleted + v_deleted_late);
    SELECT target INTO v_target FROM pgturso.tracked_table WHERE id = v_table_id;
    DELETE FROM pgturso.tracked_table WHERE id = v_table_id;
    -- The last table of a wal target: its slot would only pin WAL from now on.
    IF NOT EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = v_target) THEN
        PERFORM pgturso._drop_slot(v_target);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso.untrack_table IS
    'Stop replicating a table and discard its undelivered changes; the Turso table is left as it is.';

CREATE OR REPLACE FUNCTION pgturso.refresh_materialized_view(rel regclass, concurrently boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_table_id integer;
BEGIN
    SELECT t.id INTO v_table_id FROM pgturso.tracked_table t JOIN pg_class c ON c.oid = t.relid
    WHERE t.relid = rel AND t.dropped_at IS NULL AND c.relkind = 'm';
    IF v_table_id IS NULL THEN
        RAISE EXCEPTION 'pgturso: % is not a tracked materialized view', rel
            USING HINT = format('Track it first: SELECT pgturso.track_table(%L).', rel::text);
    END IF;
    -- The difference is taken against the contents before this REFRESH: no other REFRESH may commit between
    -- reading them and refreshing, and they must be read in a snapshot taken after that lock.
    PERFORM pgturso._require_current_snapshot('refresh_materialized_view', rel);
    PERFORM pgturso._lock_materialized_view(rel);
    -- The event trigger leaves this REFRESH to the function, which sends the difference only.
    PERFORM set_config('pgturso.refreshing', rel::oid::text, true);
    EXECUTE format('SELECT pgturso.%I($1, $2)', pgturso._capture_function_name(v_table_id) || '_refresh')
        USING rel, $2;  -- $2: the concurrently argument (a keyword, so not usable by name here)
    PERFORM set_config('pgturso.refreshing', '', true);
END
$$;
COMMENT ON FUNCTION pgturso.refresh_materialized_view IS
    'REFRESH MATERIALIZED VIEW [CONCURRENTLY] a tracked view and send Turso only the rows that changed.';

REVOKE ALL ON FUNCTION pgturso._is_deferrable(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.track_table(regclass, text, text[], boolean, boolean, text, text[], text, text, text)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._create_row_filter(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._row_filter(regclass, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._drop_row_filter(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._capture_of(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._snapshot_is_current() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._lock_materialized_view(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._require_current_snapshot(text, regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.untrack_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.resync_table(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.refresh_materialized_view(regclass, boolean) FROM PUBLIC;


-- extension/sql/22_wal_capture.sql
-- Capture from a logical replication slot (track_table(..., capture => 'wal')): the tables of a wal target
-- have no capture trigger; their row changes are decoded by the target's worker from a slot (pgoutput, with
-- the publications pgturso_tables and pgturso_outbox), in commit order together with the outbox events that
-- DDL, copies, repairs and TRUNCATE still write (docs/design.md, "Capture from the WAL").

-- The slot of a target: slot names are cluster-wide, so the database's oid is part of it.
CREATE OR REPLACE FUNCTION pgturso._slot_name(target text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT format('pgturso_%s_%s', d.oid, left(md5(target), 12)) FROM pg_database d
    WHERE d.datname = current_database()
$$;
COMMENT ON FUNCTION pgturso._slot_name IS 'Private: name of the logical replication slot of a wal target.';

-- Before a table joins a wal target: logical decoding must be possible, and the target's slot must exist
-- before anything is written, because Postgres creates a logical slot only in a transaction without writes.
CREATE OR REPLACE FUNCTION pgturso._prepare_wal_capture(target text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_slot text := pgturso._slot_name(target);
BEGIN
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'pgturso: capture => ''wal'' needs wal_level = logical (it is %)', current_setting('wal_level')
            USING HINT = 'Run ALTER SYSTEM SET wal_level = logical and restart Postgres; or track the table with '
                         'capture => ''trigger'', which needs no server setting.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = v_slot AND s.wal_status <> 'lost') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.target g JOIN pgturso.tracked_table t ON t.target = g.name
               WHERE g.name = _prepare_wal_capture.target AND g.capture = 'wal') THEN
        -- The target's slot was lost (invalidated, or a failover) and its worker has not replaced it yet: it
        -- will, and copy every table of the target afresh, this one included.
        UPDATE pgturso.target g SET slot_rebuild = coalesce(g.slot_rebuild, 'lost or missing')
        WHERE g.name = _prepare_wal_capture.target;
        RETURN;
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: the replication slot of target % must be created before this transaction writes', target
            USING HINT = 'Call pgturso.track_table(..., capture => ''wal'') first in its transaction (or on its own).';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = v_slot) THEN
        PERFORM pg_drop_replication_slot(v_slot);  -- invalidated: useless, and the worker re-copies its tables
    END IF;
    PERFORM pg_create_logical_replication_slot(v_slot, 'pgoutput');
    UPDATE pgturso.target g SET slot_generation = g.slot_generation + 1 WHERE g.name = _prepare_wal_capture.target;
END
$$;
COMMENT ON FUNCTION pgturso._prepare_wal_capture IS
    'Private: check wal_level and create a wal target''s replication slot (before the caller writes).';

-- Drop a target's slot, so that nothing pins WAL once no table is captured through it. A worker process
-- streams from the slot for as long as it runs (worker/pgturso/replication.py): end that connection (the
-- worker reconnects and finds the slot gone); pgturso.sync() peeks it for the length of one read: wait.
CREATE OR REPLACE FUNCTION pgturso._drop_slot(target text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_slot text := pgturso._slot_name(target);
    v_deadline timestamptz := clock_timestamp() + interval '30 seconds';
BEGIN
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = v_slot) THEN
            RETURN;
        END IF;
        BEGIN
            PERFORM pg_drop_replication_slot(v_slot);
            RETURN;
        EXCEPTION WHEN object_in_use THEN
            BEGIN
                PERFORM pg_stat_clear_snapshot();  -- pg_stat_replication's names: as of now, not of the first try
                PERFORM pg_terminate_backend(r.pid) FROM pg_stat_replication r
                JOIN pg_replication_slots s ON s.active_pid = r.pid
                WHERE s.slot_name = v_slot AND r.application_name = 'pgturso-worker-replication';
            EXCEPTION WHEN insufficient_privilege THEN
                NULL;  -- not allowed to end the worker's connection: wait for the worker to let go
            END;
            IF clock_timestamp() > v_deadline THEN
                RAISE EXCEPTION 'pgturso: replication slot % stays in use', v_slot
                    USING HINT = 'Stop the worker of target ' || target || ' and try again.';
            END IF;
            PERFORM pg_sleep(0.05);
        END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._drop_slot IS 'Private: drop a wal target''s replication slot if it exists.';

-- The expressions of a table's stored generated columns ({column: expression}, NULL if none), kept with each of
-- its layouts (pgturso.layout.generated): capture => 'wal' computes those columns at delivery (pgoutput does not
-- send them), and rows written before ALTER COLUMN ... DROP EXPRESSION still need the expression it dropped.
CREATE OR REPLACE FUNCTION pgturso._generated_expressions(rel regclass) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT jsonb_object_agg(a.attname, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = rel AND a.attgenerated = 's' AND NOT a.attisdropped
$$;
COMMENT ON FUNCTION pgturso._generated_expressions IS
    'Private: a table''s stored generated columns and their expressions, kept with its layouts.';
REVOKE ALL ON FUNCTION pgturso._generated_expressions(regclass) FROM PUBLIC;

-- Publish a wal-captured table (as its partition root) with a replica identity equal to its key, so that
-- updates and deletes carry the key pgturso replicates by; TRUNCATE still goes through the outbox (a
-- partition truncated alone is not published as the root), by statement triggers that cost writers nothing.
-- Keys are checked immediately (a DEFERRABLE key is refused by track_table), so the rows, applied one by one in
-- decoding order, never hold a key twice on Turso either.
CREATE OR REPLACE FUNCTION pgturso._install_wal_capture(rel regclass, table_id integer, plan jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_part regclass;
    v_kind "char";
    v_index regclass;
    key_columns text[] := ARRAY(SELECT jsonb_array_elements_text(plan -> 'spec' -> 'key_columns'));
    v_function text := pgturso._capture_function_name(table_id);
    v_generated text;
    v_identity_full boolean;
BEGIN
    -- pgoutput (Postgres 15) does not send stored generated columns: the worker computes them from the other
    -- values, with its own rights. So their expressions may use nothing a user defined (docs/security.md).
    SELECT format('%s (uses %s)', a.attname, pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid))
    INTO v_generated
    FROM pg_attrdef ad
    JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum AND a.attgenerated = 's'
    JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
    WHERE ad.adrelid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
      AND d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_cast'::regclass,
                           'pg_type'::regclass, 'pg_collation'::regclass)
      AND d.refobjid >= 16384
    LIMIT 1;
    IF v_generated IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: generated column % of % uses an object a user defined, which the worker would '
                        'run to compute it', v_generated, rel
            USING HINT = 'With capture => ''wal'' generated columns may use built-in functions only; use the '
                         'trigger capture mode for this table (a target with capture => ''trigger'').';
    END IF;
    -- The worker computes them over decoded values, where a column of a type that is not trusted
    -- (pgturso._trusted_type: enum, composite, extension type...) is its text form: an expression over it would
    -- fail (and stop the target) or give a value Postgres never held (an enum compared as text).
    SELECT format('%s (uses column %s of type %s)', a.attname, quote_ident(ra.attname), format_type(ra.atttypid, NULL))
    INTO v_generated
    FROM pg_attrdef ad
    JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum AND a.attgenerated = 's'
    JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid = ad.adrelid AND d.refobjsubid > 0
    JOIN pg_attribute ra ON ra.attrelid = d.refobjid AND ra.attnum = d.refobjsubid
    WHERE ad.adrelid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
      AND NOT pgturso._trusted_type(ra.atttypid)
    LIMIT 1;
    IF v_generated IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: generated column % of % is computed from a column of a user-defined type, which '
                        'the worker only has as text', v_generated, rel
            USING HINT = 'With capture => ''wal'' generated columns may use columns of built-in types only (arrays '
                         'and domains of them too); cast the column to a built-in type in the table, or use the '
                         'trigger capture mode for this table (a target with capture => ''trigger'').';
    END IF;
    -- The generated capture function serves the TRUNCATE trigger only (a 'T' event), as in trigger mode.
    EXECUTE plan ->> 'capture_function_sql';
    EXECUTE format('REVOKE ALL ON FUNCTION pgturso.%I() FROM PUBLIC', v_function);
    EXECUTE format('ALTER FUNCTION pgturso.%I() DEPENDS ON EXTENSION pgturso', v_function);  -- docs/security.md
    -- A row filter (track_table's row_filter, Postgres' deparsed form of it) is the table's filter in the
    -- publication: pgoutput sends only the rows it lets through, and an UPDATE moving a row into or out of it
    -- as an insert or a delete. Renames follow it there too (the filter is stored parsed).
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                   WHERE p.pubname = 'pgturso_tables' AND r.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION pgturso_tables ADD TABLE ONLY %s', rel)
                || coalesce(' WHERE (' || (plan -> 'spec' ->> 'row_filter') || ')', '');
    END IF;
    -- A row filter makes the replica identity FULL (the old row is logged whole; docs/design.md says what that
    -- costs). Over a column outside the key it must: Postgres refuses an UPDATE or DELETE of a table whose
    -- publication filter uses a column outside the replica identity, writers would fail. Over the key alone too:
    -- an UPDATE moving a row into the filter reaches pgoutput as an insert, and a TOASTed value it left alone
    -- is "unchanged" in the new tuple; pgoutput takes it from the old tuple, which only FULL logs (attack: the
    -- row moved into the filter never reached Turso).
    v_identity_full := plan -> 'spec' ->> 'row_filter' IS NOT NULL;
    -- A table of a pattern target too: its router needs the old row's tenant for a delete and for a move
    -- (an UPDATE of the route column), and the whole old row for a value an UPDATE left alone.
    v_identity_full := v_identity_full OR EXISTS (SELECT 1 FROM pgturso.tracked_table t
                                                WHERE t.id = table_id AND strpos(t.target, '%s') > 0);
    FOR v_part, v_kind IN SELECT p.relid, c.relkind
                          FROM (SELECT rel AS relid UNION SELECT relid FROM pg_partition_tree(rel)) p
                          JOIN pg_class c ON c.oid = p.relid
    LOOP
        -- The index whose columns are exactly the key: the primary key (replica identity DEFAULT), else a
        -- unique index over NOT NULL columns (USING INDEX); with neither, or a row filter,
        -- FULL (key_columns => ...).
        SELECT i.indexrelid INTO v_index FROM pg_index i
        WHERE i.indrelid = v_part AND i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL
          AND i.indexprs IS NULL AND i.indnkeyatts = cardinality(key_columns)
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM unnest(i.indkey[0:i.indnkeyatts - 1]) k
               JOIN pg_attribute a ON a.attrelid = v_part AND a.attnum = k)
              = (SELECT array_agg(k ORDER BY k) FROM unnest(key_columns) k)
          AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) k
                          JOIN pg_attribute a ON a.attrelid = v_part AND a.attnum = k WHERE NOT a.attnotnull)
        ORDER BY i.indisprimary DESC, i.indexrelid LIMIT 1;
        IF v_identity_full THEN
            v_index := NULL;
        END IF;
        IF v_index IS NOT NULL AND (SELECT indisprimary FROM pg_index WHERE indexrelid = v_index) THEN
            IF (SELECT relreplident FROM pg_class WHERE oid = v_part) NOT IN ('d', 'f') THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY DEFAULT', v_part);
            END IF;
        ELSIF v_index IS NOT NULL THEN
            IF NOT (SELECT indisreplident FROM pg_index WHERE indexrelid = v_index) THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I', v_part,
                               (SELECT relname FROM pg_class WHERE oid = v_index));
            END IF;
        ELSIF (SELECT relreplident FROM pg_class WHERE oid = v_part) <> 'f' THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', v_part);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = v_part AND g.tgname = 'pgturso_capture_truncate') THEN
            IF v_part = rel THEN
                EXECUTE format('CREATE TRIGGER pgturso_capture_truncate AFTER TRUNCATE ON %s '
                               'FOR EACH STATEMENT EXECUTE FUNCTION pgturso.%I()', v_part, v_function);
            ELSE
                EXECUTE format('CREATE TRIGGER pgturso_capture_truncate BEFORE TRUNCATE ON %s '
                               'FOR EACH STATEMENT EXECUTE FUNCTION pgturso._capture_partition_truncate(%s)',
                               v_part, table_id);
            END IF;
            -- Gone with the extension, like the capture triggers (docs/security.md).
            EXECUTE format('ALTER TRIGGER pgturso_capture_truncate ON %s DEPENDS ON EXTENSION pgturso', v_part);
        END IF;
    END LOOP;
    -- (After the replica identity: the event trigger refuses this ALTER TABLE on a filtered table without FULL.)
    -- pgoutput evaluates the filter while decoding: a row on which it raises (10 / n with n = 0) would stop
    -- the slot for good (every later read decodes it again). As in trigger mode, where capture evaluates it
    -- in the writer's statement, such a row is refused to its writer instead: a CHECK that evaluates the filter
    -- and is always true otherwise (num_nulls is not folded away). Existing rows are checked now.
    IF plan -> 'spec' ->> 'row_filter' IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = rel AND c.conname = 'pgturso_row_filter') THEN
        BEGIN
            EXECUTE format('ALTER TABLE %s ADD CONSTRAINT pgturso_row_filter CHECK (num_nulls(%s) >= 0)', rel,
                           plan -> 'spec' ->> 'row_filter');
        EXCEPTION WHEN data_exception THEN
            GET STACKED DIAGNOSTICS v_generated = MESSAGE_TEXT;
            RAISE EXCEPTION 'pgturso: the row filter of % fails on a row of the table: %', rel, v_generated
                USING HINT = 'Make the filter total over the rows (e.g. NULLIF(n, 0) instead of n as a divisor), or '
                             'fix the row: with capture => ''wal'' a filter that fails on a row would stop the slot.';
        END;
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._install_wal_capture IS
    'Private: publish a wal-captured table with its key as replica identity, and its TRUNCATE triggers.';

CREATE OR REPLACE FUNCTION pgturso._remove_wal_capture(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_part regclass;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
               WHERE p.pubname = 'pgturso_tables' AND r.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION pgturso_tables DROP TABLE ONLY %s', rel);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = rel AND c.conname = 'pgturso_row_filter') THEN
        PERFORM set_config('pgturso.dropping_row_filter', rel::oid::regclass::text, true);  -- see _on_sql_drop
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT pgturso_row_filter', rel);
        PERFORM set_config('pgturso.dropping_row_filter', '', true);
    END IF;
    FOR v_part IN SELECT rel UNION SELECT relid FROM pg_partition_tree(rel) LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS pgturso_capture_truncate ON %s', v_part);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._remove_wal_capture IS 'Private: stop publishing a wal-captured table.';

-- DROP EXTENSION cannot run extension code afterwards, and slots are not extension members: drop them (and
-- the publications, which are not members either) when the command starts. Event triggers cannot see
-- which extension is being dropped at that point; the statement's text names it.
CREATE OR REPLACE FUNCTION pgturso._on_drop_extension() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_target text;
BEGIN
    IF current_query() !~* '\mpgturso\M' THEN
        RETURN;
    END IF;
    FOR v_target IN SELECT name FROM pgturso.target LOOP
        PERFORM pgturso._drop_slot(v_target);
    END LOOP;
    -- The row filters' CHECK constraints on wal tables are not extension members either.
    FOR v_target IN SELECT c.conrelid::regclass::text FROM pg_constraint c
                    JOIN pgturso.tracked_table t ON t.relid = c.conrelid WHERE c.conname = 'pgturso_row_filter' LOOP
        PERFORM set_config('pgturso.dropping_row_filter', v_target::regclass::text, true);  -- see _on_sql_drop
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT pgturso_row_filter', v_target);
    END LOOP;
    PERFORM set_config('pgturso.dropping_row_filter', '', true);
    DROP PUBLICATION IF EXISTS pgturso_tables, pgturso_outbox;
END
$$;
COMMENT ON FUNCTION pgturso._on_drop_extension IS
    'Private: DROP EXTENSION pgturso drops the replication slots and publications of wal capture.';
DROP EVENT TRIGGER IF EXISTS pgturso_drop_extension;
CREATE EVENT TRIGGER pgturso_drop_extension ON ddl_command_start WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION pgturso._on_drop_extension();

-- pg_restore: the publications pgturso_outbox and pgturso_tables are made by CREATE EXTENSION, and a publication
-- cannot belong to an extension, so pg_dump dumps them too and the restore's CREATE PUBLICATION would fail
-- ("already exists": pg_restore reports errors, and --exit-on-error or --single-transaction restores stop).
-- They cannot be made later, by the first wal table's track_table: pgoutput looks them up at every decoded
-- transaction, so they must exist before any slot, and a slot can only be made before its transaction writes.
-- So the restore's CREATE PUBLICATION replaces the extension's own, as long as that one is as CREATE
-- EXTENSION made it (no table published, no slot of this database): the dumped definition is the same, and
-- the outbox, an extension table whose membership pg_dump leaves out, is put back in at the command's end.
-- Runs as the caller (not SECURITY DEFINER): only the publications' owner can have them replaced.
CREATE OR REPLACE FUNCTION pgturso._on_create_publication() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_name text := substring(current_query() FROM '(?i)^\s*CREATE\s+PUBLICATION\s+"?(pgturso_outbox|pgturso_tables)"?(?:\s|;|$)');
BEGIN
    IF v_name IS NULL THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'ddl_command_end' THEN
        IF v_name = 'pgturso_outbox' AND NOT EXISTS (
                SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                WHERE p.pubname = 'pgturso_outbox' AND r.prrelid = 'pgturso.outbox'::regclass) THEN
            ALTER PUBLICATION pgturso_outbox ADD TABLE ONLY pgturso.outbox;
        END IF;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots s
               WHERE s.database = current_database() AND s.slot_name LIKE 'pgturso\_%')
       OR EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                  WHERE p.pubname = v_name AND r.prrelid <> 'pgturso.outbox'::regclass) THEN
        RETURN;  -- in use: the CREATE fails as it would
    END IF;
    EXECUTE format('DROP PUBLICATION IF EXISTS %I', v_name);
END
$$;
COMMENT ON FUNCTION pgturso._on_create_publication IS
    'Private: a restored dump''s CREATE PUBLICATION of pgturso''s publications replaces the unused ones '
    'CREATE EXTENSION made, so pg_restore runs without errors.';
DROP EVENT TRIGGER IF EXISTS pgturso_create_publication;
CREATE EVENT TRIGGER pgturso_create_publication ON ddl_command_start WHEN TAG IN ('CREATE PUBLICATION')
    EXECUTE FUNCTION pgturso._on_create_publication();
DROP EVENT TRIGGER IF EXISTS pgturso_create_publication_end;
CREATE EVENT TRIGGER pgturso_create_publication_end ON ddl_command_end WHEN TAG IN ('CREATE PUBLICATION')
    EXECUTE FUNCTION pgturso._on_create_publication();

REVOKE ALL ON FUNCTION pgturso._slot_name(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._prepare_wal_capture(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._drop_slot(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._install_wal_capture(regclass, integer, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._remove_wal_capture(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._on_drop_extension() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._on_create_publication() FROM PUBLIC;


-- extension/sql/30_schema_changes.sql
-- Schema changes of tracked tables, captured by event triggers in the same
-- transaction as the DDL: a change becomes a new layout, a regenerated capture function and an 'A' event, so
-- Turso applies it exactly between the changes before it and the changes after it (docs/schema-changes.md).

-- Bring a tracked table's layout, capture and partitions up to date with the catalog, after DDL.
CREATE OR REPLACE FUNCTION pgturso._follow_schema(table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_rel regclass;
    v_options jsonb;
    v_old_id integer;
    v_old_spec jsonb;
    v_desc record;
    v_change jsonb;
    v_new_id integer;
    v_plan jsonb;
    v_recopy boolean;
    v_part regclass;
    v_copy_all boolean := false;
BEGIN
    SELECT t.relid, t.options INTO v_rel, v_options FROM pgturso.tracked_table t WHERE t.id = table_id;
    SELECT l.id, l.spec INTO v_old_id, v_old_spec FROM pgturso.layout l
    WHERE l.table_id = _follow_schema.table_id ORDER BY l.id DESC LIMIT 1;
    v_desc := pgturso._describe(v_rel, v_options);
    IF v_desc.key_columns IS NULL THEN
        RAISE EXCEPTION 'pgturso: this change leaves tracked table % without a key to replicate by', v_rel
            USING HINT = 'Keep a primary key or a unique index over NOT NULL columns (add the new one first), '
                         'or stop replicating the table first: SELECT pgturso.untrack_table(''' || v_rel::text
                         || ''').';
    END IF;
    PERFORM pgturso._check_key(v_rel, v_desc.columns, v_desc.key_columns);
    v_change := pgturso._plan_change(v_old_spec, v_desc.source_table, v_desc.target_table, v_desc.columns,
                                     v_desc.key_columns, v_desc.indexes, v_desc.row_filter, v_desc.route_by,
                                     v_options ? 'reference');
    IF (v_change ->> 'changed')::boolean THEN
        IF v_desc.target_table IS DISTINCT FROM v_old_spec ->> 'target_table' AND EXISTS (
               SELECT 1 FROM pgturso.tracked_table t
               WHERE pgturso._sqlite_name(t.target_table) = pgturso._sqlite_name(v_desc.target_table)
                 AND t.target = (SELECT o.target FROM pgturso.tracked_table o WHERE o.id = _follow_schema.table_id)
                 AND t.id <> _follow_schema.table_id) THEN
            RAISE EXCEPTION 'pgturso: renaming % would make it replicate to Turso table "%", which another '
                            'tracked table uses', v_rel, v_desc.target_table
                USING HINT = 'Choose another name, or untrack one of the tables.';
        END IF;
        PERFORM pgturso._check_turso_names(v_rel, (SELECT o.target FROM pgturso.tracked_table o
                                                   WHERE o.id = _follow_schema.table_id),
                                           _follow_schema.table_id, v_desc.target_table, v_desc.indexes);
        v_recopy := (v_change ->> 'recopy')::boolean OR pgturso._take_rewritten(table_id);
        IF NOT v_recopy AND jsonb_array_length(v_change -> 'added') > 0 AND EXISTS (
               SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = v_rel AND a.attname::text IN (SELECT jsonb_array_elements_text(v_change -> 'added'))
                 AND (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '')) THEN
            -- Postgres filled the new columns of existing rows (a default): Turso cannot compute them. (Outside
            -- READ COMMITTED an empty-looking table may hold rows committed since this snapshot: recopy.)
            v_recopy := true;
            IF pgturso._snapshot_is_current() THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', pgturso._row_source(v_rel)) INTO v_recopy;
            END IF;
        END IF;
        INSERT INTO pgturso.layout (table_id, spec, generated)
        VALUES (table_id, v_change -> 'spec', pgturso._generated_expressions(v_rel)) RETURNING id INTO v_new_id;
        v_plan := pgturso._plan_layout(v_new_id, pgturso._row_source(v_rel), v_desc.source_table,
                                       v_desc.target_table, v_desc.columns, v_desc.key_columns,
                                       pgturso._capture_function_name(table_id), v_desc.indexes,
                                       v_desc.row_filter, v_desc.route_by, v_options ? 'reference');
        PERFORM pgturso._fan_out(v_new_id, 'A', jsonb_build_object('from', v_old_id, 'recopy', v_recopy)::text);
        -- The DDL holds the table's lock; in READ COMMITTED this statement's snapshot is newer than that lock
        -- and the rows are copied here. Otherwise the worker copies them in chunks after this commits.
        IF v_recopy AND pgturso._snapshot_is_current() THEN
            EXECUTE v_plan ->> 'snapshot_sql';
        ELSIF v_recopy THEN
            v_copy_all := true;
        END IF;
        -- (Also what a wal pattern's router, copying a reference table to a new tenant at an older snapshot,
        -- fails to serialize on: pgturso._register_tenants. Keep it for every new layout.)
        UPDATE pgturso.tracked_table t SET target_table = v_desc.target_table WHERE t.id = table_id;
        -- A chunked initial copy in progress resumes after a key of the old layout: after a recopy every row
        -- is queued already; after a key change the copy starts over in the new key's order.
        UPDATE pgturso.tracked_table t
        SET copy_state = CASE WHEN v_recopy THEN 'done' ELSE t.copy_state END,
            copy_finished_at = CASE WHEN v_recopy THEN now() END, copy_after = NULL
        WHERE t.id = table_id AND t.copy_state = 'copying'
          AND (v_recopy OR v_desc.key_columns IS DISTINCT FROM
                           ARRAY(SELECT jsonb_array_elements_text(v_old_spec -> 'key_columns')));
        v_old_id := v_new_id;
        v_old_spec := v_change -> 'spec';
    ELSE
        v_plan := NULL;
        IF pgturso._take_rewritten(table_id) THEN
            -- Same layout, but the rewrite may have changed values (ALTER COLUMN TYPE text USING upper(v)).
            PERFORM pgturso._recopy(table_id);
        END IF;
    END IF;

    -- Partitions: detached ones take their rows away from the table, new or attached ones bring theirs.
    -- (A partition captured from the WAL has only its TRUNCATE trigger, which names the table.)
    FOR v_part IN SELECT DISTINCT g.tgrelid::regclass FROM pg_trigger g
                  WHERE g.tgrelid <> v_rel
                    AND (g.tgname = 'pgturso_capture_insert'
                         AND g.tgfoid::regproc::text = 'pgturso.' || pgturso._capture_function_name(table_id)
                         OR g.tgname = 'pgturso_capture_truncate'
                         AND g.tgfoid = 'pgturso._capture_partition_truncate'::regproc
                         AND g.tgargs = convert_to(table_id::text, 'UTF8') || '\x00'::bytea)
                    AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(v_rel) p WHERE p.relid = g.tgrelid)
    LOOP
        -- The keys of the rows it takes away: DETACH (CONCURRENTLY too, in its second transaction) holds
        -- ACCESS EXCLUSIVE on the partition, so they must be read in a snapshot taken after that lock.
        PERFORM pgturso._require_current_snapshot('DETACH PARTITION ' || v_part::text, v_rel);
        EXECUTE pgturso._plan_rows(v_old_id, v_old_spec, v_part::text, 'D'::text);
        EXECUTE format('DROP TRIGGER IF EXISTS pgturso_capture_insert ON %1$s; '
                       'DROP TRIGGER IF EXISTS pgturso_capture_update ON %1$s; '
                       'DROP TRIGGER IF EXISTS pgturso_capture_delete ON %1$s; '
                       'DROP TRIGGER IF EXISTS pgturso_capture_truncate ON %1$s', v_part);
    END LOOP;
    FOR v_part IN SELECT p.relid FROM pg_partition_tree(v_rel) p
                  WHERE p.isleaf AND p.relid <> v_rel
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p.relid
                                    AND g.tgname IN ('pgturso_capture_insert', 'pgturso_capture_truncate'))
    LOOP
        IF v_plan IS NULL THEN
            v_plan := pgturso._plan_layout(v_old_id, pgturso._row_source(v_rel), v_desc.source_table,
                                           v_desc.target_table, v_desc.columns, v_desc.key_columns,
                                           pgturso._capture_function_name(table_id), v_desc.indexes,
                                           v_desc.row_filter, v_desc.route_by, v_options ? 'reference');
        END IF;
        -- Its rows, read here in READ COMMITTED (ATTACH holds the partition's lock), or when this transaction
        -- created it (no one else wrote it: its ctid attribute row, which nothing alters, is ours); otherwise
        -- the worker copies the whole table in chunks.
        IF pgturso._snapshot_is_current()
           OR (SELECT a.xmin FROM pg_attribute a WHERE a.attrelid = v_part AND a.attnum = -1)
              = pg_current_xact_id()::xid THEN
            EXECUTE pgturso._plan_rows(v_old_id, v_old_spec, v_part::text, 'U'::text);
        ELSE
            v_copy_all := true;
        END IF;
    END LOOP;
    IF v_copy_all THEN
        IF (SELECT c.relkind FROM pg_class c WHERE c.oid = v_rel) = 'm' THEN
            PERFORM pgturso._require_current_snapshot('copying', v_rel);
        END IF;
        PERFORM pgturso._start_copy(table_id);
    END IF;
    IF v_plan IS NOT NULL THEN
        PERFORM pgturso._install_capture(v_rel, table_id, v_plan);
        PERFORM pgturso._wake_worker();
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._follow_schema IS
    'Private: after DDL, give a tracked table a new layout, capture function and Turso DDL event if it changed.';

-- Send a tracked relation to Turso afresh: recreate its table there, then every row.
CREATE OR REPLACE FUNCTION pgturso._recopy(table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_rel regclass;
    v_kind "char";
    v_layout_id integer;
    v_spec jsonb;
BEGIN
    SELECT t.relid INTO v_rel FROM pgturso.tracked_table t WHERE t.id = table_id;
    SELECT l.id, l.spec INTO v_layout_id, v_spec FROM pgturso.layout l
    WHERE l.table_id = _recopy.table_id ORDER BY l.id DESC LIMIT 1;
    SELECT c.relkind INTO v_kind FROM pg_class c WHERE c.oid = v_rel;
    -- The recreate must come after the events of every writer still open (as in resync_table): a rewrite holds
    -- the table's lock already, but ALTER TYPE on an enum it uses takes none.
    IF v_kind <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', v_rel);
    END IF;
    PERFORM pgturso._fan_out(v_layout_id, 'A', jsonb_build_object('from', v_layout_id, 'recopy', true)::text);
    -- A materialized view comes here after its REFRESH by this transaction, whose rows any snapshot of it
    -- sees; a table is read here only in READ COMMITTED, where this statement's snapshot is newer than the
    -- lock, and otherwise copied by the worker in chunks (docs/design.md).
    IF v_kind = 'm' OR pgturso._snapshot_is_current() THEN
        EXECUTE pgturso._plan_rows(v_layout_id, v_spec, pgturso._row_source(v_rel), 'U'::text);
        -- Every row is queued now: a chunked initial copy still running has nothing left to do.
        UPDATE pgturso.tracked_table t SET copy_state = 'done', copy_after = NULL, copy_finished_at = now()
        WHERE t.id = table_id AND t.copy_state = 'copying';
    ELSE
        PERFORM pgturso._start_copy(table_id);
    END IF;
    PERFORM pgturso._wake_worker();
END
$$;
COMMENT ON FUNCTION pgturso._recopy IS 'Private: recreate a tracked relation on Turso and send all its rows again.';

-- The last line of defence of a write: a capture function whose layout no longer matches its table (DDL that
-- pgturso's event triggers did not see: ALTER EVENT TRIGGER ... DISABLE, session_replication_role = replica)
-- fails to pack the rows. The write must not fail, and the change must not be lost: follow the schema as the
-- event trigger would have, and send the table afresh (the statement's own changes are in the table by now).
-- If that fails too, its error fails the write: nothing is ever dropped silently.
CREATE OR REPLACE FUNCTION pgturso._capture_failed(table_id integer, rel oid, error_code text, error text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    RAISE WARNING 'pgturso: capturing a write to % failed (%: %), so pgturso follows its schema and recopies it '
                  'to Turso', rel::regclass, error_code, error
        USING HINT = 'DDL ran on the table while pgturso''s event triggers did not fire (ALTER EVENT TRIGGER ... '
                     'DISABLE, or session_replication_role = replica): keep them enabled.';
    PERFORM pgturso._follow_schema(table_id);
    PERFORM pgturso._recopy(table_id);
END
$$;
COMMENT ON FUNCTION pgturso._capture_failed IS
    'Private: a capture function could not pack a write (stale layout): follow the schema and recopy the table.';

-- Table rewrites: ALTER COLUMN TYPE rewrites the table, and with USING (or any cast) the values may change
-- although the column's form on Turso does not (int -> bigint USING cents * 100, text -> text USING upper(v)).
-- The table_rewrite event names the table before ddl_command_end sees the command: it is remembered for the
-- transaction, and following the command then recopies the table.
CREATE OR REPLACE FUNCTION pgturso._on_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_rel oid := pg_event_trigger_table_rewrite_oid();
    v_table_id integer;
BEGIN
    -- Reason 4: a column's values are rewritten. (1, persistence; 2, a default; 8, access method: same values.
    -- A new column with a default is recopied by _follow_schema anyway.)
    IF to_regclass('pgturso.tracked_table') IS NULL OR pg_event_trigger_table_rewrite_reason() & 4 = 0 THEN
        RETURN;
    END IF;
    SELECT t.id INTO v_table_id FROM pgturso.tracked_table t
    WHERE t.dropped_at IS NULL AND (t.relid = v_rel OR t.relid = pg_partition_root(v_rel));
    IF v_table_id IS NOT NULL THEN
        PERFORM set_config('pgturso.rewritten',
                           coalesce(current_setting('pgturso.rewritten', true), '') || ',' || v_table_id, true);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._on_table_rewrite IS
    'Private: event trigger remembering tracked tables whose column values a rewrite may have changed.';

-- Whether a table rewrite of this transaction changed a column of the table; forgets it (it is recopied once).
CREATE OR REPLACE FUNCTION pgturso._take_rewritten(table_id integer) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_ids text[] := string_to_array(coalesce(current_setting('pgturso.rewritten', true), ''), ',');
BEGIN
    IF NOT table_id::text = ANY (v_ids) THEN
        RETURN false;
    END IF;
    PERFORM set_config('pgturso.rewritten', array_to_string(array_remove(v_ids, table_id::text), ','), true);
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgturso._take_rewritten IS
    'Private: whether a rewrite in this transaction may have changed a tracked table''s values (and forget it).';

-- Tracked tables whose catalog no longer matches their layout: columns (number, name, type), the Turso name
-- (ALTER SCHEMA ... RENAME), and with check_keys the key. Run after every DDL, so a column dropped or renamed
-- through another object (DROP TYPE/DOMAIN/FUNCTION ... CASCADE, ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE
-- of a typed table) is followed like one changed by ALTER TABLE: the capture function never names a column
-- that is gone.
CREATE OR REPLACE FUNCTION pgturso._stale_tables(check_keys boolean) RETURNS SETOF integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT t.id
    FROM pgturso.tracked_table t
    JOIN pg_class c ON c.oid = t.relid
    CROSS JOIN LATERAL (SELECT l.spec FROM pgturso.layout l WHERE l.table_id = t.id ORDER BY l.id DESC LIMIT 1) l
    WHERE t.dropped_at IS NULL
      AND (coalesce(t.options ->> 'target_table', pgturso._turso_name(t.relid::oid)) IS DISTINCT FROM l.spec ->> 'target_table'
           OR (SELECT jsonb_agg(jsonb_build_array(a.attnum, a.attname, format_type(a.atttypid, a.atttypmod))
                                ORDER BY a.attnum)
               FROM pg_attribute a WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                 AND (NOT t.options ? 'column_attnums' OR t.options -> 'column_attnums' @> to_jsonb(a.attnum::integer)))
              IS DISTINCT FROM
              (SELECT jsonb_agg(jsonb_build_array((x.col ->> 'attnum')::integer, x.col ->> 'name', x.col ->> 'pg_type')
                                ORDER BY x.n)
               FROM jsonb_array_elements(l.spec -> 'columns') WITH ORDINALITY AS x(col, n))
           OR (check_keys AND pgturso._key_columns(t.relid, (SELECT array_agg(k) FROM jsonb_array_elements_text(
                                                                   t.options -> 'key_columns') AS k))
                              IS DISTINCT FROM ARRAY(SELECT jsonb_array_elements_text(l.spec -> 'key_columns'))))
    ORDER BY t.id
$$;
COMMENT ON FUNCTION pgturso._stale_tables IS
    'Private: tracked tables whose columns, Turso name (or key) no longer match their layout.';

-- Tracked tables with a column whose values are, or contain, values of type typ: the type itself, arrays
-- and domains over it, composites with an attribute of it, at any depth.
CREATE OR REPLACE FUNCTION pgturso._tables_using_type(typ oid) RETURNS SETOF integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    WITH RECURSIVE using_type(oid) AS (
        SELECT typ
        UNION
        SELECT t.oid FROM pg_type t JOIN using_type u
          ON (t.typcategory = 'A' AND t.typelem = u.oid) OR t.typbasetype = u.oid
             OR (t.typtype = 'c' AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.typrelid
                                             AND a.atttypid = u.oid AND NOT a.attisdropped))
    )
    SELECT DISTINCT t.id FROM pgturso.tracked_table t
    JOIN pg_attribute a ON a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE t.dropped_at IS NULL AND a.atttypid IN (SELECT oid FROM using_type)
    ORDER BY t.id
$$;
COMMENT ON FUNCTION pgturso._tables_using_type IS
    'Private: tracked tables holding values of a type (directly, in arrays, domains or composites).';

-- What pgturso refuses after any DDL, whatever object the DDL was on (docs/schema-changes.md).
CREATE OR REPLACE FUNCTION pgturso._refuse_shapes(rels oid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_rel regclass;
    v_other regclass;
BEGIN
    PERFORM pgturso._refuse_unlogged(ARRAY(
        SELECT t.relid FROM pgturso.tracked_table t
        WHERE t.dropped_at IS NULL
          AND EXISTS (SELECT 1 FROM unnest(rels) AS x(rel) WHERE t.relid IN (x.rel, pg_partition_root(x.rel)))));
    -- A tracked table attached as a partition: its rows would belong to two Turso tables.
    SELECT t.relid, pgturso._partition_root(t.relid) INTO v_rel, v_other
    FROM pgturso.tracked_table t JOIN pg_class c ON c.oid = t.relid
    WHERE t.dropped_at IS NULL AND c.relispartition LIMIT 1;
    IF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % is tracked on its own and cannot become a partition of %', v_rel, v_other
            USING HINT = format('Stop tracking it first: SELECT pgturso.untrack_table(%L); a partition of a '
                                'tracked table replicates through its parent.', v_rel::text);
    END IF;
    -- Inheritance (not partitioning): statements on the parent capture the children's rows too, which a
    -- copy of the parent's own rows does not have, so Turso would match neither. Refused both ways.
    SELECT i.inhparent, i.inhrelid INTO v_rel, v_other
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE NOT c.relispartition AND (i.inhparent = ANY (rels) OR i.inhrelid = ANY (rels))
      AND EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.dropped_at IS NULL
                  AND t.relid IN (i.inhparent, i.inhrelid))
    LIMIT 1;
    IF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would inherit from %, and one of them is tracked', v_other, v_rel
            USING HINT = 'pgturso does not replicate table inheritance (statements on a parent include its '
                         'children''s rows): use a partitioned table, or untrack the table first.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._refuse_shapes IS
    'Private: refuse DDL that makes a tracked table unlogged, a partition or part of an inheritance tree.';

-- ALTER TABLE ... DISABLE TRIGGER [ALL] (pg_restore --disable-triggers does it) on a tracked table: its
-- writes are not captured until it is enabled again. Postgres allows it, so pgturso warns, and
-- pgturso.status shows it while it lasts.
CREATE OR REPLACE FUNCTION pgturso._warn_disabled_capture(rels oid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_rel regclass;
BEGIN
    FOR v_rel IN SELECT t.relid FROM pgturso.tracked_table t
                 WHERE t.dropped_at IS NULL AND pgturso._capture_disabled(t.id)
                   AND EXISTS (SELECT 1 FROM unnest(rels) AS x(rel)
                               WHERE x.rel = t.relid OR pg_partition_root(x.rel) = t.relid)
    LOOP
        RAISE WARNING 'pgturso: capture of tracked table % is disabled: its changes are not replicated', v_rel
            USING HINT = format('ALTER TABLE %s ENABLE TRIGGER ALL, then copy what was missed: '
                                'SELECT pgturso.resync_table(%L) (or pgturso-worker verify --repair).',
                                v_rel, v_rel::text);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._warn_disabled_capture IS
    'Private: warn about tracked tables (touched by this DDL) whose capture triggers are disabled.';

-- capture => 'wal' decodes each UPDATE's and DELETE's old key from the replica identity, and Postgres fails
-- UPDATE and DELETE on a published table that has none: after DDL, every wal-captured table touched (each
-- leaf) must still identify its rows by columns that include the key (FULL, the primary key, or USING INDEX).
CREATE OR REPLACE FUNCTION pgturso._refuse_lost_replica_identity(rels oid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_rel regclass;
    v_filtered boolean;
    v_pattern text;
BEGIN
    SELECT c.oid, l.spec ->> 'row_filter' IS NOT NULL, CASE WHEN strpos(t.target, '%s') > 0 THEN t.target END
    INTO v_rel, v_filtered, v_pattern
    FROM pgturso.tracked_table t
    CROSS JOIN LATERAL (SELECT l.spec FROM pgturso.layout l WHERE l.table_id = t.id ORDER BY l.id DESC LIMIT 1) l
    JOIN pg_class c ON c.oid IN (SELECT t.relid UNION SELECT p.relid FROM pg_partition_tree(t.relid) p)
    WHERE t.dropped_at IS NULL AND pgturso._capture_of(t.id) = 'wal'
      AND EXISTS (SELECT 1 FROM unnest(rels) AS x(rel) WHERE t.relid IN (x.rel, pg_partition_root(x.rel)))
      AND c.relkind = 'r' AND c.relreplident <> 'f'
      -- A row-filtered table needs FULL (_install_wal_capture says why): checked on the partitions this DDL
      -- altered, as _install_wal_capture sets FULL one partition at a time.
      -- A table of a wal pattern needs FULL too: its router finds a deleted or moved row's old tenant, and a
      -- value an UPDATE left alone, in the old row (_install_wal_capture). With the key alone a move left the
      -- row in its old tenant's database.
      AND (((l.spec ->> 'row_filter' IS NOT NULL OR strpos(t.target, '%s') > 0) AND c.oid = ANY (rels))
           OR NOT ARRAY(SELECT jsonb_array_elements_text(l.spec -> 'key_columns')) <@ coalesce((
              SELECT array_agg(a.attname::text) FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = c.oid
                AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))),
              '{}'))
    ORDER BY l.spec ->> 'row_filter' IS NULL AND strpos(t.target, '%s') = 0
    LIMIT 1;
    IF v_rel IS NOT NULL AND v_pattern IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would lose the replica identity FULL that the router of wal pattern target % '
                        'needs', v_rel, v_pattern
            USING HINT = format('Keep ALTER TABLE %s REPLICA IDENTITY FULL: the router reads a deleted or moved '
                                'row''s tenant, and values an UPDATE left alone, from the old row.', v_rel);
    ELSIF v_rel IS NOT NULL AND v_filtered THEN
        RAISE EXCEPTION 'pgturso: % would lose the replica identity FULL that capture => ''wal'' of its row filter '
                        'needs', v_rel
            USING HINT = format('Keep ALTER TABLE %s REPLICA IDENTITY FULL (or untrack the table and track it '
                                'again without row_filter).', v_rel);
    ELSIF v_rel IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % would lose the replica identity that capture => ''wal'' reads its key from', v_rel
            USING HINT = format('Keep ALTER TABLE %s REPLICA IDENTITY DEFAULT (the primary key), FULL, or USING '
                                'INDEX of a unique index over the key''s columns.', v_rel);
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._refuse_lost_replica_identity IS
    'Private: refuse DDL that leaves a wal-captured table without a replica identity covering its key.';

CREATE OR REPLACE FUNCTION pgturso._on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_table_id integer;
    v_rels oid[];
BEGIN
    -- Cheap for databases and DDL that concern no tracked table.
    IF to_regclass('pgturso.tracked_table') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE dropped_at IS NULL) THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT coalesce(i.indrelid, c.oid)) INTO v_rels
    FROM pg_event_trigger_ddl_commands() d
    JOIN pg_class c ON c.oid = d.objid
    LEFT JOIN pg_index i ON i.indexrelid = c.oid
    WHERE d.classid = 'pg_class'::regclass;
    PERFORM pgturso._refuse_shapes(coalesce(v_rels, '{}'));
    -- The tables this DDL was on, and any whose columns or name changed through another object (a type, a
    -- domain, a function, a schema: see _stale_tables).
    FOR v_table_id IN
        SELECT t.id FROM pgturso.tracked_table t
        WHERE t.dropped_at IS NULL AND EXISTS (
            SELECT 1 FROM unnest(v_rels) AS x(rel)
            WHERE t.relid = x.rel OR t.relid = pg_partition_root(x.rel)
               OR EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = x.rel AND g.tgname = 'pgturso_capture_insert'
                          AND g.tgfoid::regproc::text = 'pgturso.' || pgturso._capture_function_name(t.id)))
        UNION
        -- (not for DDL on temporary objects only, which applications may run often and cannot touch a
        -- tracked table's columns)
        SELECT pgturso._stale_tables(false)
        WHERE EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                      WHERE d.schema_name IS NULL OR d.schema_name NOT LIKE 'pg\_temp%')
        ORDER BY 1
    LOOP
        PERFORM pgturso._follow_schema(v_table_id);
    END LOOP;
    -- ALTER TYPE on an enum or composite whose values a tracked table holds: RENAME VALUE, or an attribute
    -- added, dropped, renamed or retyped, changes how existing values read on Turso; send those tables afresh.
    -- (Postgres does not say which ALTER TYPE it was: the type's labels or attributes changed in this
    -- transaction is the sign, so ADD VALUE recopies too; OWNER TO, RENAME TO, SET SCHEMA do not.)
    FOR v_table_id IN
        SELECT DISTINCT u.id
        FROM pg_event_trigger_ddl_commands() d
        JOIN pg_type ty ON ty.oid = d.objid
        CROSS JOIN LATERAL pgturso._tables_using_type(ty.oid) AS u(id)
        WHERE d.classid = 'pg_type'::regclass AND d.command_tag = 'ALTER TYPE'
          AND (EXISTS (SELECT 1 FROM pg_enum e WHERE e.enumtypid = ty.oid
                       AND e.xmin = pg_current_xact_id()::xid)
               OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = ty.typrelid AND ty.typrelid <> 0
                          AND a.xmin = pg_current_xact_id()::xid))
        ORDER BY 1
    LOOP
        PERFORM pgturso._recopy(v_table_id);
    END LOOP;
    -- A plain REFRESH MATERIALIZED VIEW of a tracked view: the old contents are gone, so send it afresh.
    -- (pgturso.refresh_materialized_view sends only the difference and marks its own REFRESH.)
    FOR v_table_id IN
        SELECT t.id FROM pg_event_trigger_ddl_commands() d
        JOIN pgturso.tracked_table t ON t.relid = d.objid AND t.dropped_at IS NULL
        WHERE d.command_tag = 'REFRESH MATERIALIZED VIEW'
          AND coalesce(current_setting('pgturso.refreshing', true), '') <> d.objid::text
    LOOP
        PERFORM pgturso._recopy(v_table_id);
    END LOOP;
    -- ALTER TABLE ... DISABLE TRIGGER [ALL] on a tracked table: say so now (pgturso.status shows it too).
    PERFORM pgturso._warn_disabled_capture(v_rels);
    PERFORM pgturso._refuse_lost_replica_identity(coalesce(v_rels, '{}'));
    PERFORM set_config('pgturso.rewritten', '', true);
END
$$;
COMMENT ON FUNCTION pgturso._on_ddl_command_end IS 'Private: event trigger following DDL on tracked tables.';

CREATE OR REPLACE FUNCTION pgturso._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_row record;
    v_tracked_dropped boolean := false;
    v_filtered regclass;
BEGIN
    IF to_regclass('pgturso.tracked_table') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE dropped_at IS NULL) THEN
        RETURN;
    END IF;
    -- The CHECK pgturso_row_filter of a wal table refuses the rows its filter raises on, which would stop the
    -- slot for good (_install_wal_capture): only pgturso drops it (_remove_wal_capture marks its own drop).
    SELECT t.relid::regclass INTO v_filtered FROM pg_event_trigger_dropped_objects() d
    JOIN pgturso.tracked_table t ON t.dropped_at IS NULL
     AND t.relid = to_regclass(quote_ident(d.address_names[1]) || '.' || quote_ident(d.address_names[2]))
    WHERE d.object_type = 'table constraint' AND d.original AND d.address_names[3] = 'pgturso_row_filter'
      AND coalesce(current_setting('pgturso.dropping_row_filter', true), '') <> t.relid::text
    LIMIT 1;
    IF v_filtered IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: the constraint pgturso_row_filter of % keeps rows its row filter fails on out of '
                        'the replication slot', v_filtered
            USING HINT = format('Keep it, or untrack the table first: SELECT pgturso.untrack_table(%L).',
                                v_filtered::text);
    END IF;
    -- DROP TABLE (or DROP MATERIALIZED VIEW, DROP SCHEMA ... CASCADE) of a tracked table: the changes made
    -- before it are still delivered, then the table is untracked; its Turso table stays unless drop_target.
    FOR v_row IN
        SELECT t.id, t.options FROM pg_event_trigger_dropped_objects() d
        JOIN pgturso.tracked_table t ON t.relid = d.objid AND t.dropped_at IS NULL
        WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
    LOOP
        PERFORM pgturso._fan_out(max(l.id), 'X',
               jsonb_build_object('drop_target', coalesce((v_row.options ->> 'drop_target')::boolean, false))::text)
        FROM pgturso.layout l WHERE l.table_id = v_row.id;
        PERFORM pgturso._drop_capture_functions(v_row.id);
        PERFORM pgturso._drop_row_filter(v_row.options);
        UPDATE pgturso.tracked_table SET dropped_at = now() WHERE id = v_row.id;
        PERFORM pgturso._wake_worker();
        v_tracked_dropped := true;
    END LOOP;
    -- DROP INDEX (or a dropped unique constraint's index): the tables that had it on Turso follow.
    FOR v_row IN
        SELECT DISTINCT t.id FROM pg_event_trigger_dropped_objects() d
        JOIN pgturso.layout l ON l.spec -> 'indexes' @> jsonb_build_array(jsonb_build_object('name',
             CASE WHEN d.schema_name = 'public' THEN d.object_name ELSE d.schema_name || '.' || d.object_name END))
        JOIN pgturso.tracked_table t ON t.id = l.table_id AND t.dropped_at IS NULL
        WHERE d.object_type = 'index'
          AND l.id = (SELECT max(l2.id) FROM pgturso.layout l2 WHERE l2.table_id = t.id)
          AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)
    LOOP
        PERFORM pgturso._follow_schema(v_row.id);
    END LOOP;
    -- Columns dropped through another object (DROP TYPE/DOMAIN/FUNCTION ... CASCADE), and the unique index
    -- that a table is keyed by (DROP INDEX): follow the tables, or refuse when no key is left.
    FOR v_row IN SELECT pgturso._stale_tables(true) AS id
                 WHERE EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d WHERE NOT d.is_temporary) LOOP
        PERFORM pgturso._follow_schema(v_row.id);
    END LOOP;
    IF NOT v_tracked_dropped AND EXISTS (
           SELECT 1 FROM pg_event_trigger_dropped_objects() tbl
           JOIN pg_event_trigger_dropped_objects() trg
             ON trg.object_type = 'trigger'
            AND trg.address_names[3] IN ('pgturso_capture_insert', 'pgturso_capture_truncate')
            AND trg.address_names[1] = tbl.address_names[1] AND trg.address_names[2] = tbl.address_names[2]
           WHERE tbl.object_type = 'table') THEN
        -- A partition of a tracked table: its rows would vanish from Turso's copy unseen.
        RAISE EXCEPTION 'pgturso: cannot drop a partition of a tracked partitioned table'
            USING HINT = 'Detach it first (ALTER TABLE parent DETACH PARTITION part): pgturso then deletes its '
                         'rows on Turso; drop it afterwards.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._on_sql_drop IS 'Private: event trigger following DROP of tracked tables.';

DROP EVENT TRIGGER IF EXISTS pgturso_ddl_command_end;
DROP EVENT TRIGGER IF EXISTS pgturso_sql_drop;
CREATE EVENT TRIGGER pgturso_ddl_command_end ON ddl_command_end EXECUTE FUNCTION pgturso._on_ddl_command_end();
CREATE EVENT TRIGGER pgturso_sql_drop ON sql_drop EXECUTE FUNCTION pgturso._on_sql_drop();
DROP EVENT TRIGGER IF EXISTS pgturso_table_rewrite;
CREATE EVENT TRIGGER pgturso_table_rewrite ON table_rewrite EXECUTE FUNCTION pgturso._on_table_rewrite();

REVOKE ALL ON FUNCTION pgturso._plan_layout(integer, text, text, text, jsonb, text[], text, jsonb, text, text, boolean)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_change(jsonb, text, text, jsonb, text[], jsonb, text, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_tenant_rows(integer, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._plan_rows(integer, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._follow_schema(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._recopy(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._take_rewritten(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._stale_tables(boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._tables_using_type(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._refuse_shapes(oid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._warn_disabled_capture(oid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._capture_failed(integer, oid, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._refuse_lost_replica_identity(oid[]) FROM PUBLIC;


-- extension/sql/35_targets.sql
-- Named targets (pgturso.target): different tables to different Turso databases, each delivered
-- independently by its own worker (pgturso-worker run --target NAME).

-- Why a tenant value cannot take the place of %s in a pattern URL whose %s is in its host (libsql://tenant-%s-
-- myorg.turso.io), or NULL (it can, or %s is in the path: file:…/%s.db, where only '.' and '..' are refused). The
-- label holding %s, filled in, must be a DNS label, as a Turso database's host is (docs.turso.tech, Create
-- Database: names of lowercase letters, digits and dashes): a dot would make another host (a subdomain), and
-- only letters, digits and -, not first or last, at most 63 characters. Case is left alone: host names ignore it
-- (two tenants differing only in case are refused by _register_tenants).
CREATE OR REPLACE FUNCTION pgturso._tenant_host_problem(url text, tenant text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT CASE
        WHEN strpos(a.port, '%s') > 0 AND replace(a.port, '%s', tenant) !~ '^[0-9]{1,5}$' THEN
            'a port takes digits only'
        WHEN f.label IS NULL THEN NULL
        WHEN strpos(tenant, '.') > 0 THEN 'a dot separates the names of a host: it would make another host'
        WHEN f.filled !~ '^[A-Za-z0-9-]+$' THEN 'a host name takes letters, digits and - only'
        WHEN f.filled ~ '^-|-$' THEN 'a host name cannot begin or end with -'
        WHEN length(f.filled) > 63 THEN
            format('a host name has at most 63 characters, and this one would have %s', length(f.filled))
    END
    -- The URL's authority without its user info, split into host and port (the text after the last ':' that
    -- is not inside an IPv6 address's brackets): %s may stand for either.
    FROM (SELECT regexp_replace(u.authority, ':[^:\]]*$', '') AS host,
                 substring(u.authority FROM ':([^:\]]*)$') AS port
          FROM (SELECT regexp_replace(substring(url FROM '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)'), '^[^@]*@', '')
                       AS authority) AS u) AS a,
         LATERAL (SELECT h.label, replace(h.label, '%s', tenant) AS filled
                  FROM (SELECT (SELECT l FROM regexp_split_to_table(a.host, '[.]') AS l
                                WHERE strpos(l, '%s') > 0 LIMIT 1) AS label) AS h) AS f
$$;
COMMENT ON FUNCTION pgturso._tenant_host_problem IS
    'Private: why a tenant value cannot replace the %s in the host of a pattern target''s URL, or NULL.';

CREATE OR REPLACE FUNCTION pgturso.add_target(name text, url text, auth_token text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_hostless text;
    v_problem text;
BEGIN
    -- No message may carry the token (nor the URL, which can hold credentials): errors reach the server log.
    -- Checked here rather than left to the table's constraints, whose errors show the whole row.
    IF add_target.name IS NULL OR (add_target.name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'
                                   AND add_target.name !~ '^[A-Za-z0-9_.-]*%s[A-Za-z0-9_.-]*$') THEN
        RAISE EXCEPTION 'pgturso: % is not a valid target name', quote_literal(add_target.name)
            USING HINT = 'Use 1 to 63 letters, digits, _ . - (not starting with . or -).';
    END IF;
    IF url IS NULL OR url !~ '^(https?|libsql)://|^file:' THEN
        RAISE EXCEPTION 'pgturso: the URL of target % is not a Turso URL', add_target.name
            USING HINT = 'Use http://, https://, libsql:// (Turso Cloud) or file:PATH.';
    END IF;
    IF strpos(add_target.name, '%s') > 0 AND (add_target.name !~ '^[A-Za-z0-9_.-]*%s[A-Za-z0-9_.-]*$'
                                              OR strpos(add_target.url, '%s') = 0
                                              OR add_target.url ~ '%s.*%s') THEN
        RAISE EXCEPTION 'pgturso: pattern target % needs one %%s in its name and in its URL', add_target.name
            USING HINT = 'E.g. SELECT pgturso.add_target(''tenant-%s'', ''libsql://tenant-%s-myorg.turso.io'', '
                         '''token''): each tenant value replaces %s (letters, digits, _ . - only).';
    END IF;
    -- A tenant that takes its URL from the pattern must keep a host (pgturso._register_tenants).
    IF strpos(add_target.name, '%s') > 0 THEN
        SELECT string_agg(format('"%s"', g.tenant), ', ' ORDER BY g.tenant COLLATE "C"),
               min(pgturso._tenant_host_problem(add_target.url, g.tenant))
        INTO v_hostless, v_problem FROM pgturso.target g
        WHERE g.pattern = add_target.name AND g.url IS NULL
          AND pgturso._tenant_host_problem(add_target.url, g.tenant) IS NOT NULL;
        IF v_hostless IS NOT NULL THEN
            RAISE EXCEPTION 'pgturso: the new URL of pattern target % puts %%s in the host, where tenant % would make '
                            'no host of a Turso database (%)', add_target.name, v_hostless, v_problem
                USING HINT = 'Give each such tenant a URL of its own first (SELECT pgturso.add_target(''' ||
                             replace(add_target.name, '%s', 'TENANT') || ''', ''libsql://…'', ''token'')), or '
                             'keep %s in the URL''s path.';
        END IF;
    END IF;
    BEGIN
        INSERT INTO pgturso.target AS t (name, url, auth_token)
        VALUES (add_target.name, add_target.url, add_target.auth_token)
        ON CONFLICT ON CONSTRAINT target_pkey DO UPDATE SET url = excluded.url, auth_token = excluded.auth_token;
    EXCEPTION WHEN OTHERS THEN
        -- Re-raised without the DETAIL ("Failing row contains (..., token, ...)").
        RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = 'pgturso: add_target ' || add_target.name || ': ' || SQLERRM,
            HINT = 'SELECT name, url FROM pgturso.target lists the targets.';
    END;
    INSERT INTO pgturso.delivery_state (target) VALUES (add_target.name) ON CONFLICT DO NOTHING;
    -- A blocked tenant of a wal pattern given a URL of its own: registered now, its parked changes delivered.
    PERFORM pgturso._unblock_tenant(add_target.name);
END
$$;
COMMENT ON FUNCTION pgturso.add_target IS
    'Create or change a named target: track tables to it with track_table(..., target => name) and run '
    'pgturso-worker run --target name. The token is stored where only the extension owner can read it.';

CREATE OR REPLACE FUNCTION pgturso.remove_target(name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF remove_target.name = 'default' THEN
        RAISE EXCEPTION 'pgturso: the default target cannot be removed'
            USING HINT = 'Point it elsewhere with pgturso.url instead.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = remove_target.name) THEN
        RAISE EXCEPTION 'pgturso: tables are still tracked to target %', remove_target.name
            USING HINT = 'Untrack them first: SELECT relid FROM pgturso.tracked_table WHERE target = ''' ||
                         remove_target.name || '''.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.target t WHERE t.name = remove_target.name AND t.pattern IS NOT NULL) THEN
        RAISE EXCEPTION 'pgturso: % is a tenant database of pattern target %', remove_target.name,
                        (SELECT t.pattern FROM pgturso.target t WHERE t.name = remove_target.name)
            USING HINT = 'Tenants go with their pattern (remove that once its tables are untracked); to move a tenant '
                         'elsewhere, add_target its name with the new URL.';
    END IF;
    PERFORM pgturso._drop_slot(remove_target.name);
    DELETE FROM pgturso.target t WHERE t.name = remove_target.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgturso: there is no target %', remove_target.name
            USING HINT = 'SELECT name FROM pgturso.target lists them.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso.remove_target IS 'Remove a named target that no table is tracked to.';

-- capture => 'wal' for a pattern target: a router per pattern (worker/pgturso/sources/router.py) reads the
-- pattern's slot and writes each decoded transaction, in commit order, as per-tenant outbox rows. Whatever else
-- writes outbox rows of such a pattern (DDL, copies, repairs, TRUNCATE, table-wide events) would overtake changes
-- committed before it that the router has not routed yet: those rows are held (tenant NULL, which no tenant's
-- worker reads; route their tenant, NULL for every tenant: pgturso._fan_out, pgturso._pattern_tenants and
-- capture.sql.HELD_FOR_ROUTER ask) and the router, meeting them in the stream (the outbox is published), queues
-- them again at their place (docs/design.md, "A database per tenant").
CREATE OR REPLACE FUNCTION pgturso._is_router(pattern text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
-- The pid recorded by the router's CLAIM outlives its backend (a router killed and not yet replaced) and Linux
-- reuses pids: a session is the router only while it also holds the pattern's router lock (router.py,
-- ROUTER_LOCK_CLASS = 'pgrt' and hashtext(pattern); an int4 is shown in pg_locks as the oid of its bits).
-- Otherwise a session given a dead router's pid wrote its DDL, copies and TRUNCATEs for the tenants at once,
-- ahead of changes committed before them that the router had not routed yet.
AS $$
    SELECT EXISTS (
        SELECT 1 FROM pgturso.router r
        WHERE r.pattern = _is_router.pattern AND r.pid = pg_backend_pid()
          AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                      WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
                        AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                          WHERE d.datname = current_database())
                        AND l.classid = 1885827700::oid AND l.objid = hashtext(_is_router.pattern)::oid
                        AND l.objsubid = 2))
$$;
COMMENT ON FUNCTION pgturso._is_router IS 'Private: whether this session is the router of a wal pattern target.';

CREATE OR REPLACE FUNCTION pgturso._held_for_router(pattern text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT coalesce((SELECT g.capture = 'wal' FROM pgturso.target g
                     WHERE g.name = _held_for_router.pattern AND strpos(g.name, '%s') > 0), false)
           AND NOT pgturso._is_router(pattern)
$$;
COMMENT ON FUNCTION pgturso._held_for_router IS
    'Private: whether an outbox row of this pattern written by this session waits for the router (a wal pattern).';

-- The layout a new tenant's table is created with: the latest, except a routed table of a wal pattern, whose
-- rows come from the stream: the router's layout in force at its place there (passed by pgturso._route_tenant;
-- NULL for a table whose creation the router has not met yet). A reference table is created and copied as of
-- the router's snapshot, and its events that snapshot sees are not routed to the new tenant (router.py).
CREATE OR REPLACE FUNCTION pgturso._tenant_layout(table_id integer) RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT CASE WHEN coalesce(current_setting('pgturso.routing_layouts', true), '') <> ''
                     AND NOT (SELECT t.options ? 'reference' FROM pgturso.tracked_table t WHERE t.id = table_id)
                THEN (current_setting('pgturso.routing_layouts')::jsonb ->> table_id::text)::integer
                ELSE (SELECT max(l.id) FROM pgturso.layout l WHERE l.table_id = _tenant_layout.table_id) END
$$;
COMMENT ON FUNCTION pgturso._tenant_layout IS 'Private: the layout a new tenant''s table is created with.';

-- The router's rows, for the tenants of its own pattern only: the worker's role has no INSERT on the outbox
-- (it delivers and deletes events, and writes none of its own).
CREATE OR REPLACE FUNCTION pgturso._route_rows(pattern text, layouts integer[], ops text[], nrows integer[],
                                              payloads text[], tenants text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF NOT pgturso._is_router(pattern) THEN
        RAISE EXCEPTION 'pgturso: only the router of wal pattern % queues its tenants'' rows', pattern
            USING HINT = 'The pattern''s worker runs the router (pgturso-worker run --target ''pattern-%s'').';
    END IF;
    -- (A row of a table untracked meanwhile is left out: its events went with it, as in trigger mode.)
    INSERT INTO pgturso.outbox (layout_id, op, nrows, payload, tenant)
    SELECT e.layout_id, e.op::"char", e.nrows, e.payload, e.tenant
    FROM unnest(layouts, ops, nrows, payloads, tenants) WITH ORDINALITY AS e(layout_id, op, nrows, payload, tenant, n)
    JOIN pgturso.layout l ON l.id = e.layout_id
    JOIN pgturso.tracked_table t ON t.id = l.table_id AND t.target = _route_rows.pattern
    WHERE e.tenant IS NOT NULL
    ORDER BY e.n;
END
$$;
COMMENT ON FUNCTION pgturso._route_rows IS 'Private: the router of a wal pattern queues its tenants'' rows.';

-- The router registers a new tenant value where it meets it in the stream: its tables created with the layouts
-- in force there, its reference rows copied at the router's snapshot (recorded with the router's marker). A value
-- that cannot be registered (pgturso._check_tenant refuses it: in trigger mode its writer would have failed, here it
-- committed) is parked instead of stopping the router, and so every other tenant: its tables' creation and
-- reference rows are queued under its value exactly as a registration queues them, and the router goes on queueing
-- its events as any tenant's; without a row in pgturso.target no worker delivers them. pgturso.blocked_tenant
-- shows why, until add_target of its name registers it (pgturso._unblock_tenant) or discard_blocked_tenant drops
-- them. Returns NULL (registered) or the error (parked).
CREATE OR REPLACE FUNCTION pgturso._route_tenant(layout_id integer, tenant text, layouts jsonb, txid xid8)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_pattern text := (SELECT t.target FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
                       WHERE l.id = _route_tenant.layout_id);
    v_error text;
    v_hint text;
BEGIN
    IF NOT pgturso._is_router(v_pattern) THEN
        RAISE EXCEPTION 'pgturso: only the router of a wal pattern registers its tenants'
            USING HINT = 'The pattern''s worker runs the router (pgturso-worker run --target ''pattern-%s'').';
    END IF;
    PERFORM set_config('pgturso.routing_layouts', layouts::text, true);
    BEGIN
        PERFORM pgturso._register_tenants(layout_id, ARRAY[tenant]);
    EXCEPTION WHEN raise_exception THEN
        GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT;
        INSERT INTO pgturso.blocked_tenant (pattern, tenant, error, hint, table_name, txid)
        VALUES (v_pattern, tenant, v_error, v_hint,
                (SELECT t.relid::regclass::text FROM pgturso.layout l JOIN pgturso.tracked_table t
                 ON t.id = l.table_id WHERE l.id = _route_tenant.layout_id), txid);
        PERFORM pgturso._queue_tenant_tables(v_pattern, tenant, true);
        -- Serialized with an add_target of its name or of the pattern (pgturso._unblock_tenant): one that
        -- committed after this snapshot fails this to serialize (routed again, seeing it); one under way waits.
        UPDATE pgturso.target g SET generation = g.generation + 1 WHERE g.name = v_pattern;
    END;
    PERFORM set_config('pgturso.routing_layouts', '', true);
    RETURN v_error;
END
$$;
COMMENT ON FUNCTION pgturso._route_tenant IS
    'Private: the router of a wal pattern registers a tenant it met, or parks it (NULL: registered; else why not).';

-- The router's blocked tenants, read in each routing transaction and locked FOR SHARE there: add_target of one's
-- name (pgturso._unblock_tenant) or discarding it waits for that transaction, and the next one sees the change
-- (under REPEATABLE READ, one committed after its snapshot fails it to serialize: routed again).
CREATE OR REPLACE FUNCTION pgturso._router_blocked(pattern text) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF NOT pgturso._is_router(pattern) THEN
        RAISE EXCEPTION 'pgturso: only the router of wal pattern % reads its blocked tenants', pattern
            USING HINT = 'The pattern''s worker runs the router (pgturso-worker run --target ''pattern-%s'').';
    END IF;
    RETURN QUERY SELECT b.tenant FROM pgturso.blocked_tenant b WHERE b.pattern = _router_blocked.pattern
                 ORDER BY b.tenant FOR SHARE;
END
$$;
COMMENT ON FUNCTION pgturso._router_blocked IS 'Private: the blocked tenants of a wal pattern, for its router.';

-- add_target of a blocked tenant's name (its own URL): register it now, if the value can name that database.
-- Its parked events (its tables' creation and reference rows as of where the router met it, then its rows in
-- stream order) become its worker's. The router reads pgturso.blocked_tenant FOR SHARE in each routing
-- transaction: this waits for one under way, and the next one sees the tenant registered. add_target of the
-- pattern itself (a new URL: e.g. %s moved from the host to the path, a fix its HINT names) registers each of its
-- blocked tenants the new URL lets name a database; the others stay blocked (their error is the new one).
CREATE OR REPLACE FUNCTION pgturso._unblock_tenant(name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_blocked record;
    v_error text;
    v_hint text;
BEGIN
    -- A router parking a value of this name under a snapshot that does not see this add_target would leave it
    -- blocked with its URL given (test_wal_discarding_a_blocked_tenant_while_its_rows_keep_coming_leaves_no_orphan):
    -- the parking updates its pattern's row (pgturso._route_tenant), and so does this, first. A parking under
    -- way: this waits for it, then sees its blocked row below; one after: it fails to serialize (REPEATABLE
    -- READ), and the router routes the batch again with a snapshot that sees this URL.
    UPDATE pgturso.target g SET generation = g.generation + 1
    WHERE strpos(g.name, '%s') > 0 AND g.capture = 'wal' AND g.name <> _unblock_tenant.name
      AND length(_unblock_tenant.name) > length(g.name) - 2
      AND starts_with(_unblock_tenant.name, split_part(g.name, '%s', 1))
      AND right(_unblock_tenant.name, length(split_part(g.name, '%s', 2))) = split_part(g.name, '%s', 2);
    FOR v_blocked IN SELECT b.pattern, b.tenant, b.table_name FROM pgturso.blocked_tenant b
                     WHERE replace(b.pattern, '%s', b.tenant) = _unblock_tenant.name
                        OR b.pattern = _unblock_tenant.name
                     ORDER BY b.tenant FOR UPDATE
    LOOP
        IF v_blocked.pattern = _unblock_tenant.name THEN
            BEGIN
                PERFORM pgturso._check_tenant(v_blocked.pattern, v_blocked.tenant, v_blocked.table_name);
            EXCEPTION WHEN raise_exception THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT;
                UPDATE pgturso.blocked_tenant b SET error = v_error, hint = v_hint
                WHERE b.pattern = v_blocked.pattern AND b.tenant = v_blocked.tenant;
                CONTINUE;
            END;
        END IF;
        PERFORM pgturso._check_tenant(v_blocked.pattern, v_blocked.tenant, v_blocked.table_name);
        PERFORM pgturso._claim_tenant(v_blocked.pattern, v_blocked.tenant);
        DELETE FROM pgturso.blocked_tenant b WHERE b.pattern = v_blocked.pattern AND b.tenant = v_blocked.tenant;
        RAISE NOTICE 'pgturso: tenant "%" of pattern % is registered: its parked changes are delivered now',
            v_blocked.tenant, v_blocked.pattern;
        PERFORM pgturso._wake_worker();
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._unblock_tenant IS
    'Private: register a blocked tenant of a wal pattern that add_target just gave a URL of its own.';

-- Give up on a blocked tenant: its parked events are deleted (recorded in pgturso.skipped_transaction under the
-- transaction that brought the value first). Run it after correcting its rows in Postgres (or before: a later
-- row of the value is parked again, a delete of it goes nowhere). Needs READ COMMITTED: the deletion of the
-- parked events must see those the router queued until the block was lifted.
CREATE OR REPLACE FUNCTION pgturso._discard_tenant(pattern text, tenant text, reason text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_blocked record;
    v_events integer;
    v_rows bigint;
    v_tables text[];
    v_name text := replace(_discard_tenant.pattern, '%s', _discard_tenant.tenant);
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgturso: a blocked tenant is discarded under READ COMMITTED only'
            USING HINT = 'Call it outside an explicit REPEATABLE READ or SERIALIZABLE transaction.';
    END IF;
    -- First, waiting for a routing transaction under way (it holds the row FOR SHARE): the router's next one
    -- sees the tenant gone and parks nothing more for it until it meets the value again.
    DELETE FROM pgturso.blocked_tenant b WHERE b.pattern = _discard_tenant.pattern AND b.tenant = _discard_tenant.tenant
    RETURNING b.* INTO v_blocked;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgturso: tenant "%" of pattern % is not blocked', tenant, pattern
            USING HINT = 'SELECT pattern, tenant, error FROM pgturso.blocked_tenant lists the blocked tenants.';
    END IF;
    WITH gone AS (
        DELETE FROM pgturso.outbox o USING pgturso.layout l, pgturso.tracked_table t
        WHERE o.tenant = _discard_tenant.tenant AND l.id = o.layout_id AND t.id = l.table_id
          AND t.target = _discard_tenant.pattern
        RETURNING o.nrows, l.spec ->> 'source_table' AS source_table)
    SELECT count(*), coalesce(sum(nrows), 0), coalesce(array_agg(DISTINCT source_table), '{}')
    INTO v_events, v_rows, v_tables FROM gone;
    PERFORM pgturso._note_outbox_deletion('discard_blocked_tenant', v_events);
    IF v_blocked.txid IS NOT NULL THEN
        INSERT INTO pgturso.skipped_transaction AS s (txid, target, reason, events, rows, tables, error)
        VALUES (v_blocked.txid, v_name, reason, v_events, v_rows, v_tables, v_blocked.error)
        ON CONFLICT (txid, target) DO UPDATE SET events = s.events + excluded.events, rows = s.rows + excluded.rows;
    END IF;
    RAISE WARNING 'pgturso: discarded blocked tenant "%" of pattern % (% events, % rows of %)', tenant, pattern,
        v_events, v_rows, array_to_string(v_tables, ', ')
        USING HINT = 'Its rows reach no database: correct them in Postgres (a later row of the value is parked again).';
    RETURN v_events;
END
$$;
COMMENT ON FUNCTION pgturso._discard_tenant IS 'Private: drop a blocked tenant of a wal pattern and its parked events.';

CREATE OR REPLACE FUNCTION pgturso.discard_blocked_tenant(pattern text, tenant text, reason text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF coalesce(trim(reason), '') = '' THEN
        RAISE EXCEPTION 'pgturso: discarding a blocked tenant needs a reason'
            USING HINT = 'Say why, e.g. pgturso.discard_blocked_tenant(''tenant-%s'', ''no way!'', ''typo, corrected'').';
    END IF;
    RETURN pgturso._discard_tenant(pattern, tenant, reason);
END
$$;
COMMENT ON FUNCTION pgturso.discard_blocked_tenant IS
    'Give up on a blocked tenant of a wal pattern target (pgturso.target_status: blocked, a value that cannot name '
    'a database): its parked changes are deleted, never delivered (recorded in pgturso.skipped_transaction). '
    'Correct its rows in Postgres; a later row of the value is parked again. Returns the events deleted.';


-- Per-tenant databases (a pattern target such as 'tenant-%s' and tables tracked to it with route_by).
--
-- Every change that must reach all of a pattern's tenant databases (create, schema change, TRUNCATE, drop) is
-- written once per tenant known then; a new tenant gets its tables created (pgturso._register_tenants) before
-- its first rows. A registration updates the pattern's row in pgturso.target (generation), then every row of
-- pgturso.tenant_stripe; a table-wide change locks the pattern's row FOR SHARE, then updates its backend's stripe.
-- So a tenant registered concurrently either waits for the change and is created with its result, or the change
-- waits for the registration and reaches the new tenant too; under REPEATABLE READ the loser of that race gets a
-- serialization failure (retry the transaction) instead of reading a stale list of tenants or layouts (the
-- change's FOR SHARE fails on the registration's update, the registration's update of the stripes on the
-- change's). Two table-wide changes, of different tables of the pattern, have nothing to order: they share the
-- row lock and (unless their backend ids collide modulo 64) no stripe, so neither waits for the other's
-- transaction, nor deadlocks with it when that transaction then uses the other table.
CREATE OR REPLACE FUNCTION pgturso._fan_out(layout_id integer, op "char", payload text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_pattern text;
BEGIN
    SELECT t.target INTO v_pattern FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
    WHERE l.id = _fan_out.layout_id AND strpos(t.target, '%s') > 0;
    IF v_pattern IS NULL THEN
        INSERT INTO pgturso.outbox (layout_id, op, nrows, payload) VALUES (layout_id, op, 0, payload);
        RETURN;
    END IF;
    IF pgturso._held_for_router(v_pattern) THEN
        -- A wal pattern: once, held for every tenant; the router queues it per tenant in stream order.
        INSERT INTO pgturso.outbox (layout_id, op, nrows, payload) VALUES (layout_id, op, 0, payload);
        RETURN;
    END IF;
    PERFORM FROM pgturso.target WHERE name = v_pattern FOR SHARE;
    UPDATE pgturso.tenant_stripe SET generation = generation + 1 WHERE stripe = pg_backend_pid() % 64;
    INSERT INTO pgturso.outbox (layout_id, op, nrows, payload, tenant)
    SELECT _fan_out.layout_id, _fan_out.op, 0, _fan_out.payload, g.tenant
    FROM pgturso.target g WHERE g.pattern = v_pattern ORDER BY g.tenant;
END
$$;
COMMENT ON FUNCTION pgturso._fan_out IS
    'Private: queue a table-wide event (C, A, T, X): once, or once per tenant database of a pattern target.';

-- Why a tenant value cannot be registered for a pattern: raised (the writer's transaction fails in trigger mode;
-- the router parks the tenant in wal mode: pgturso._route_tenant).
CREATE OR REPLACE FUNCTION pgturso._check_tenant(pattern text, tenant text, table_name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_pattern text := _check_tenant.pattern;
    v_tenant text := _check_tenant.tenant;
    v_name text := replace(_check_tenant.pattern, '%s', _check_tenant.tenant);
    v_registered boolean;
    v_own_url boolean;
    v_other text;
    v_other_pattern text;
    v_problem text;
BEGIN
    -- '.' and '..' would be the directory itself or its parent where %s is a path segment of the URL.
    IF v_tenant !~ '^[A-Za-z0-9_.-]+$' OR v_tenant ~ '^\.\.?$'
       OR v_name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'pgturso: tenant value "%" cannot name a database of pattern % (table %)', v_tenant,
                        v_pattern, table_name
            USING HINT = 'route_by values become part of a database name and URL: letters, digits, _ . - only '
                         '(not . or ..), and the target name at most 63 characters.';
    END IF;
    v_registered := EXISTS (SELECT 1 FROM pgturso.target g WHERE g.pattern = v_pattern AND g.tenant = v_tenant);
    v_own_url := EXISTS (SELECT 1 FROM pgturso.target g WHERE g.name = v_name AND g.url IS NOT NULL);
    -- Where %s is in the URL's host the tenant value makes a host name: tenant 'a.b' of
    -- libsql://tenant-%s-myorg.turso.io would be the host tenant-a.b-myorg.turso.io, a subdomain no Turso
    -- database has; 'a_b', '-x' or a too long value no host at all (pgturso._tenant_host_problem). Unless the
    -- tenant has a URL of its own (an add_target of its name), or is registered already.
    IF NOT v_registered THEN
        v_problem := pgturso._tenant_host_problem(
            coalesce((SELECT g.url FROM pgturso.target g WHERE g.name = v_name),
                     (SELECT g.url FROM pgturso.target g WHERE g.name = v_pattern)), v_tenant);
    END IF;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: tenant value "%" of table % makes no host of a Turso database: pattern target % '
                        'has %%s in the host of its URL, and %', v_tenant, table_name, v_pattern, v_problem
            USING HINT = 'Keep route_by values to host names (letters, digits and -, not first or last, at most '
                         '63 characters with the rest of the name: e.g. a CHECK (col ~ '
                         '''^[a-z0-9]([a-z0-9-]*[a-z0-9])?$'') constraint), give this tenant a URL of its own '
                         '(SELECT pgturso.add_target(''' || v_name || ''', ''libsql://…'', ''token'')), or '
                         'use a pattern URL with %s in its path (file:).';
    END IF;
    -- Host names and Turso Cloud database names ignore case: two such tenants would share one database (unless
    -- this one has a URL of its own).
    SELECT g.tenant INTO v_other FROM pgturso.target g
    WHERE g.pattern = v_pattern AND lower(g.tenant) = lower(v_tenant) AND g.tenant <> v_tenant LIMIT 1;
    IF v_other IS NOT NULL AND NOT v_registered AND NOT v_own_url THEN
        RAISE EXCEPTION 'pgturso: tenant value "%" differs only in case from tenant "%" of pattern % (table %)',
                        v_tenant, v_other, v_pattern, table_name
            USING HINT = 'Their URLs would name one database (host and Turso database names ignore case): keep '
                         'route_by values of one case, e.g. a CHECK (tenant_id = lower(tenant_id)), or give this '
                         'tenant a URL of its own (SELECT pgturso.add_target(''' || v_name ||
                         ''', ''libsql://…'', ''token'')).';
    END IF;
    SELECT g.tenant, g.pattern INTO v_other, v_other_pattern FROM pgturso.target g
    WHERE g.name = v_name AND g.pattern <> v_pattern;
    IF v_other_pattern IS NOT NULL THEN  -- e.g. tenant 'x-eu' of 'tenant-%s' and 'x' of 'tenant-%s-eu'
        RAISE EXCEPTION 'pgturso: tenant "%" of pattern % cannot be named "%": "%" is already the database of '
                        'tenant "%" of pattern %', v_tenant, v_pattern, v_name, v_name, v_other, v_other_pattern
            USING HINT = 'Give the patterns names that no tenant value can make equal (e.g. eu-%s and us-%s), '
                         'or keep such route_by values out with a CHECK constraint.';
    END IF;
END
$$;
COMMENT ON FUNCTION pgturso._check_tenant IS 'Private: raise why a tenant value cannot be registered for a pattern.';

-- The tenant's row in pgturso.target (and its delivery state): true if it is new. An explicit add_target of this
-- name (an override of the pattern's URL or token) becomes the tenant's; unless tables are tracked to it: their
-- events and the tenant's would share one progress marker. Checked once the row is ours: a track_table to this
-- name updates the row before its own check, so one of the two waits for the other's commit and then sees its
-- table (or its tenant); under REPEATABLE READ the later one fails to serialize instead.
CREATE OR REPLACE FUNCTION pgturso._claim_tenant(pattern text, tenant text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_name text := replace(_claim_tenant.pattern, '%s', _claim_tenant.tenant);
BEGIN
    INSERT INTO pgturso.target AS g (name, pattern, tenant) VALUES (v_name, _claim_tenant.pattern, _claim_tenant.tenant)
    ON CONFLICT ON CONSTRAINT target_pkey DO UPDATE SET pattern = excluded.pattern, tenant = excluded.tenant
    WHERE g.pattern IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pgturso.tracked_table t WHERE t.target = v_name) THEN
        RAISE EXCEPTION 'pgturso: target "%" has tables of its own and cannot be tenant "%"''s database of '
                        'pattern %', v_name, tenant, pattern
            USING HINT = 'An add_target of a tenant''s name only overrides the pattern''s URL and token: untrack '
                         'its tables (or move them to another target) before this tenant''s first row.';
    END IF;
    INSERT INTO pgturso.delivery_state (target) VALUES (v_name) ON CONFLICT DO NOTHING;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgturso._claim_tenant IS 'Private: make a tenant value a target of its pattern (true if new).';

-- A new tenant's first events: its tables created (pgturso._tenant_layout), then every row of the pattern's
-- reference tables, read after the stripes' locks (pgturso._register_tenants): a change to them committed before
-- is in these rows, and one committed after is queued for this tenant too (pgturso._pattern_tenants); a
-- REPEATABLE READ snapshot older than such a change failed there. The router (routing) copies as of its snapshot.
CREATE OR REPLACE FUNCTION pgturso._queue_tenant_tables(pattern text, tenant text, routing boolean) RETURNS void
LANGUAGE plpgsql
-- It copies reference tables' rows: encoded as capture encodes them, whatever its caller pinned (a routed
-- table's capture pins only the settings its own columns' types need).
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_ref record;
BEGIN
    INSERT INTO pgturso.outbox (layout_id, op, nrows, tenant)
    SELECT pgturso._tenant_layout(t.id), 'C', 0, _queue_tenant_tables.tenant
    FROM pgturso.tracked_table t WHERE t.target = _queue_tenant_tables.pattern AND t.dropped_at IS NULL
      AND pgturso._tenant_layout(t.id) IS NOT NULL ORDER BY t.id;
    FOR v_ref IN
        SELECT t.id AS table_id, t.relid, l.id, l.spec FROM pgturso.tracked_table t
        JOIN pgturso.layout l ON l.id = pgturso._tenant_layout(t.id)
        WHERE t.target = _queue_tenant_tables.pattern AND t.dropped_at IS NULL AND t.options ? 'reference'
        ORDER BY t.id
    LOOP
        EXECUTE pgturso._plan_tenant_rows(v_ref.id, v_ref.spec, pgturso._row_source(v_ref.relid)) USING tenant;
        -- The router copies as of its REPEATABLE READ snapshot, but the copy's query resolves column names in the
        -- catalog as it is once the table's lock is granted: a DDL that committed after the snapshot (while the
        -- copy waited for its lock) would have the rows read under the wrong layout (two columns swapped by
        -- renames arrive swapped). Such a DDL made a layout and updated the table's row here
        -- (pgturso._follow_schema): locking that row now fails to serialize, and the router routes the batch
        -- again with a newer snapshot (router.py). A DDL after this waits for the router's commit (the copy holds
        -- the table's lock).
        IF routing THEN
            PERFORM FROM pgturso.tracked_table t WHERE t.id = v_ref.table_id FOR SHARE;
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._queue_tenant_tables IS
    'Private: queue a new tenant''s first events: its tables'' creation and its reference tables'' rows.';

CREATE OR REPLACE FUNCTION pgturso._register_tenants(layout_id integer, tenants text[]) RETURNS void
LANGUAGE plpgsql
-- It copies reference tables' rows: encoded as capture encodes them, whatever its caller pinned (a routed
-- table's capture pins only the settings its own columns' types need).
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'iso_8601'
SET extra_float_digits = 1
AS $$
DECLARE
    v_pattern text;
    v_tenant text;
    v_routing boolean;
BEGIN
    SELECT t.target INTO v_pattern FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
    WHERE l.id = _register_tenants.layout_id;
    -- A wal pattern's tenants are registered by its router only, at their place in the stream (the layouts in
    -- force there: pgturso._route_tenant); a copy's rows of a new tenant are held until the router meets them.
    v_routing := pgturso._is_router(v_pattern);
    IF NOT v_routing AND (SELECT g.capture FROM pgturso.target g WHERE g.name = v_pattern) = 'wal' THEN
        RETURN;
    END IF;
    -- Nothing new (every copy chunk of a routed table asks, for each of its tenants): one index probe per
    -- tenant. Written as a count, not as NOT EXISTS (… NOT EXISTS …): with pgturso.target's statistics
    -- taken while it held a few rows, the planner made that an anti join rescanning every tenant of the pattern
    -- for each value (1,000 x 1,000 comparisons, 50-100 ms per chunk). A NULL value is never registered: it
    -- goes on to the loop below, as before.
    IF array_position(tenants, NULL) IS NULL
       AND (SELECT count(*) FROM pgturso.target g WHERE g.pattern = v_pattern AND g.tenant = ANY (tenants))
           = (SELECT count(DISTINCT x) FROM unnest(tenants) AS x) THEN
        RETURN;
    END IF;
    UPDATE pgturso.target SET generation = generation + 1 WHERE name = v_pattern;
    -- Wait for every open writer of a reference table (each holds its stripe: pgturso._pattern_tenants) and every
    -- open table-wide change (pgturso._fan_out), or fail if one committed after this REPEATABLE READ snapshot,
    -- before reading the tables' layouts and copying the reference rows.
    -- (The router is the only writer of its pattern's tenant list and routes reference changes itself: no stripe.)
    IF NOT v_routing THEN
        UPDATE pgturso.tenant_stripe SET generation = generation + 1;
    END IF;
    FOR v_tenant IN SELECT DISTINCT x FROM unnest(tenants) AS x ORDER BY 1 LOOP
        PERFORM pgturso._check_tenant(v_pattern, v_tenant,
                                      (SELECT t.relid::regclass::text FROM pgturso.layout l
                                       JOIN pgturso.tracked_table t ON t.id = l.table_id
                                       WHERE l.id = _register_tenants.layout_id));
        IF pgturso._claim_tenant(v_pattern, v_tenant) THEN
            PERFORM pgturso._queue_tenant_tables(v_pattern, v_tenant, v_routing);
            PERFORM pgturso._wake_worker();
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgturso._register_tenants IS
    'Private: make new tenant values of a routed table targets of their pattern, their tables created first '
    'and their reference tables'' rows queued.';

-- A reference table's change goes to every tenant of its pattern (the capture function, the copies): update
-- this backend's row of pgturso.tenant_stripe, which a registration updates too (all of them), then read the
-- tenants. A registration then either waits for this transaction and copies the reference rows with its change,
-- or this waits for the registration and reads the new tenant with the list; under REPEATABLE READ the loser
-- gets a serialization failure instead of a stale list. Writers of reference tables share no row unless their
-- backend ids collide modulo 64, so they seldom wait for (or, under REPEATABLE READ, fail on) each other.
CREATE OR REPLACE FUNCTION pgturso._pattern_tenants(layout_id integer) RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
BEGIN
    IF pgturso._held_for_router((SELECT t.target FROM pgturso.layout l JOIN pgturso.tracked_table t
                                 ON t.id = l.table_id WHERE l.id = _pattern_tenants.layout_id)) THEN
        RETURN NEXT NULL;  -- a wal pattern: one event, held for every tenant (route NULL)
        RETURN;
    END IF;
    UPDATE pgturso.tenant_stripe SET generation = generation + 1 WHERE stripe = pg_backend_pid() % 64;
    RETURN QUERY
        SELECT g.tenant FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
        JOIN pgturso.target g ON g.pattern = t.target
        WHERE l.id = _pattern_tenants.layout_id ORDER BY g.tenant;
END
$$;
COMMENT ON FUNCTION pgturso._pattern_tenants IS
    'Private: the tenants of a reference table''s pattern, locked against a concurrent registration.';

REVOKE ALL ON FUNCTION pgturso._fan_out(integer, "char", text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._register_tenants(integer, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._pattern_tenants(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._tenant_host_problem(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._is_router(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._held_for_router(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._tenant_layout(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._route_tenant(integer, text, jsonb, xid8) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._unblock_tenant(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._router_blocked(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._discard_tenant(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.discard_blocked_tenant(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._check_tenant(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._claim_tenant(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._queue_tenant_tables(text, text, boolean) FROM PUBLIC;
REVOKE ALL ON pgturso.blocked_tenant FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._route_rows(text, integer[], text[], integer[], text[], text[]) FROM PUBLIC;
REVOKE ALL ON pgturso.router FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.add_target(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso.remove_target(text) FROM PUBLIC;
REVOKE ALL ON pgturso.target FROM PUBLIC;


-- extension/sql/40_status.sql
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
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
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
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
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
        -- Insert, Update and Delete messages name their relation's oid (bytes 1-4; a partition's change is
        -- published as its root's, the table tracked).
        SELECT NOT EXISTS (
            SELECT 1 FROM pg_logical_slot_peek_binary_changes(v_copy, v_upto, NULL, 'proto_version', '1',
                                                                'publication_names', 'pgturso_tables') c
            WHERE get_byte(c.data, 0) IN (73, 85, 68)
              AND ((get_byte(c.data, 1)::int8 << 24) | (get_byte(c.data, 2) << 16) | (get_byte(c.data, 3) << 8)
                   | get_byte(c.data, 4)) IN (SELECT t.relid::oid::int8 FROM pgturso.tracked_table t
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
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
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


-- extension/sql/45_wait_for_sync.sql
-- Read-your-writes for applications that write to Postgres and read from Turso.

CREATE OR REPLACE FUNCTION pgturso.wait_for_sync(timeout interval DEFAULT '30 seconds') RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
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


-- extension/sql/50_sync.sql
-- Delivery without a separate process: one pass of the worker's own code, inside Postgres.

CREATE OR REPLACE FUNCTION pgturso.sync(url text DEFAULT NULL, dsn text DEFAULT NULL, target text DEFAULT NULL)
RETURNS integer
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.in_database import sync
return sync(plpy, dsn, url, target)
$$;
COMMENT ON FUNCTION pgturso.sync IS
    'Run one delivery pass now (the worker''s code, in this backend); returns the outbox events delivered, '
    '0 when another worker holds the delivery lock. url defaults to pgturso.url; dsn to this database over '
    'the Unix socket. Schedule it with pg_cron, or run pgturso-worker for continuous, low-latency delivery.';
REVOKE ALL ON FUNCTION pgturso.sync(text, text, text) FROM PUBLIC;


-- extension/sql/55_position.sql
-- Where the source server is in its WAL history, so that the worker can tell whether the progress marker on
-- Turso describes this server's past (docs/design.md, "Failover and a source that went back in time").
-- A batch's marker records the server's position when the batch was sent: its system identifier, timeline
-- and WAL insert position, taken after every event of the batch and every earlier deletion committed. A
-- server whose history contains that position has every one of those commits and hands out only event ids
-- and transaction ids beyond them; one that does not (a standby promoted before it replayed that far, a
-- restore from an older backup, another cluster) may lack delivered changes and re-use ids the marker names.

-- Where the server's WAL is now: system identifier, timeline and insert position (not made durable: see
-- _source_position).
CREATE OR REPLACE FUNCTION pgturso._wal_position() RETURNS jsonb
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
    SELECT jsonb_build_object(
        'system', (SELECT system_identifier::text FROM pg_control_system()),
        'timeline', ('x' || substr(pg_walfile_name(p.lsn), 1, 8))::bit(32)::bigint,
        'lsn', p.lsn::text)
    FROM (SELECT pg_current_wal_insert_lsn() AS lsn) AS p
$$;
COMMENT ON FUNCTION pgturso._wal_position IS
    'Private: this server''s system identifier, timeline and WAL insert position now.';

-- The position recorded in a batch's marker, durable by the time the statement calling this commits. The
-- insert position counts WAL that open transactions inserted and nobody wrote out: a crash (pg_ctl stop -m
-- immediate) loses it, and the restarted server would end before the recorded position on the same timeline,
-- taken for another history (a full recopy). So when the WAL is not flushed that far yet, the calling
-- transaction writes a transactional logical message (no table touched; pgoutput ignores it without its
-- "messages" option) and commits synchronously: its commit flushes the WAL past the position, and with it
-- every commit before it, including those of writers with synchronous_commit = off whose events the batch
-- carries. The worker calls this outside any transaction (autocommit), so the flush is done before it sends.
CREATE OR REPLACE FUNCTION pgturso._source_position() RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_position jsonb := pgturso._wal_position();
BEGIN
    IF pg_current_wal_flush_lsn() < (v_position ->> 'lsn')::pg_lsn THEN
        IF current_setting('synchronous_commit') = 'off' THEN
            PERFORM set_config('synchronous_commit', 'local', true);  -- this transaction's commit only
        END IF;
        PERFORM pg_logical_emit_message(true, 'pgturso', 'position');
    END IF;
    RETURN v_position;
END
$$;
COMMENT ON FUNCTION pgturso._source_position IS
    'Private: this server''s system identifier, timeline and WAL insert position, for the progress marker; '
    'the WAL is flushed that far when the calling transaction commits.';

-- Whether this server's history contains `recorded` (as _source_position gave it, here or on a server this
-- one descends from): same system, and either the same timeline not past its current end, or an ancestor
-- timeline left after that point (the timeline history file says where). SECURITY DEFINER: the history file
-- is read with pg_read_file, which needs a superuser; the only input is a number.
CREATE OR REPLACE FUNCTION pgturso._position_reached(recorded jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_here jsonb := pgturso._wal_position();
    v_timeline bigint := (recorded ->> 'timeline')::bigint;
    v_lsn pg_lsn := (recorded ->> 'lsn')::pg_lsn;
    v_history text;
    v_left pg_lsn;
BEGIN
    IF recorded ->> 'system' IS DISTINCT FROM v_here ->> 'system' THEN
        RETURN false;
    END IF;
    IF v_timeline = (v_here ->> 'timeline')::bigint THEN
        RETURN v_lsn <= (v_here ->> 'lsn')::pg_lsn;
    END IF;
    IF v_timeline > (v_here ->> 'timeline')::bigint THEN
        RETURN false;
    END IF;
    v_history := pg_read_file(format('pg_wal/%s.history', lpad(upper(to_hex((v_here ->> 'timeline')::bigint)), 8, '0')),
                              0, 16777216, true);  -- missing: NULL (untrusted)
    -- Lines "parent_timeline<TAB>switch_point<TAB>reason": the parent was followed up to the switch point.
    SELECT f[2]::pg_lsn INTO v_left
    FROM regexp_split_to_table(coalesce(v_history, ''), '\n') AS line,
         LATERAL regexp_split_to_array(line, '\s+') AS f
    WHERE line ~ '^\s*[0-9]+\s' AND f[1]::bigint = v_timeline;
    RETURN v_left IS NOT NULL AND v_lsn <= v_left;
END
$$;
COMMENT ON FUNCTION pgturso._position_reached IS
    'Private: whether this server''s WAL history contains a position recorded by _source_position.';

REVOKE ALL ON FUNCTION pgturso._wal_position() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._source_position() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgturso._position_reached(jsonb) FROM PUBLIC;


-- extension/sql/90_privileges.sql
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
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
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
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
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


-- extension/sql/99_regenerate.sql
-- Last in every install and upgrade script: regenerate the capture functions of tracked tables with this
-- version's code generator, from the layout each table already has. A fresh install tracks nothing yet; an
-- upgrade (ALTER EXTENSION pgturso UPDATE) so carries every fix to capture to the tables tracked before it.

CREATE OR REPLACE FUNCTION pgturso._regenerate_captures() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_row record;
    v_plan jsonb;
    v_count integer := 0;
    v_function text;
BEGIN
    FOR v_row IN
        SELECT t.id, t.relid, t.options, c.relkind, l.id AS layout_id, l.spec
        FROM pgturso.tracked_table t
        JOIN pg_class c ON c.oid = t.relid
        JOIN LATERAL (SELECT l.id, l.spec FROM pgturso.layout l WHERE l.table_id = t.id
                      ORDER BY l.id DESC LIMIT 1) l ON true
        WHERE t.dropped_at IS NULL
        ORDER BY t.id
    LOOP
        -- Encoded as this version encodes the columns' types (older versions let user-defined casts in:
        -- docs/security.md); the layout keeps its id, since what Turso stores and decodes is unchanged.
        v_plan := pgturso._plan_regenerate(v_row.layout_id, v_row.spec, pgturso._capture_function_name(v_row.id),
                                           (pgturso._describe(v_row.relid, v_row.options)).columns);
        UPDATE pgturso.layout SET spec = v_plan -> 'spec',
            generated = coalesce(generated, pgturso._generated_expressions(v_row.relid))
        WHERE id = v_row.layout_id;
        -- Inside ALTER EXTENSION UPDATE, Postgres lets the script replace only the extension's own objects,
        -- and the generated functions are not (pg_dump must dump them with their triggers): the function is
        -- lent to the extension while it is replaced, then given back.
        v_function := CASE WHEN v_row.relkind = 'm'
                           THEN format('pgturso.%I(regclass, boolean)', pgturso._capture_function_name(v_row.id) || '_refresh')
                           ELSE format('pgturso.%I()', pgturso._capture_function_name(v_row.id)) END;
        IF to_regprocedure(v_function) IS NOT NULL THEN
            EXECUTE 'ALTER EXTENSION pgturso ADD FUNCTION ' || v_function;
        END IF;
        PERFORM pgturso._install_capture(v_row.relid, v_row.id, v_plan);
        EXECUTE 'ALTER EXTENSION pgturso DROP FUNCTION ' || v_function;
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgturso._regenerate_captures IS
    'Private: regenerate every tracked table''s capture function with this version''s code (upgrades).';
REVOKE ALL ON FUNCTION pgturso._regenerate_captures() FROM PUBLIC;

-- Before 0.2.0, unique indexes were created UNIQUE on Turso too, which made Turso refuse intermediate states of
-- statements Postgres had accepted (layout.Index says why). Give such tables a layout whose indexes are plain
-- and an 'A' event that re-creates them plain on Turso, in order with the changes around it.
CREATE OR REPLACE FUNCTION pgturso._plain_turso_indexes() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET standard_conforming_strings = on
AS $$
DECLARE
    v_row record;
    v_new_id integer;
    v_count integer := 0;
BEGIN
    FOR v_row IN
        SELECT t.id AS table_id, l.id AS layout_id, l.spec
        FROM pgturso.tracked_table t
        JOIN LATERAL (SELECT l.id, l.spec FROM pgturso.layout l WHERE l.table_id = t.id
                      ORDER BY l.id DESC LIMIT 1) l ON true
        WHERE t.dropped_at IS NULL
          AND EXISTS (SELECT 1 FROM jsonb_array_elements(l.spec -> 'indexes') AS i WHERE (i ->> 'unique')::boolean)
        ORDER BY t.id
    LOOP
        INSERT INTO pgturso.layout (table_id, spec)
        VALUES (v_row.table_id, jsonb_set(v_row.spec, '{indexes}', (
                    SELECT jsonb_agg(i || '{"unique": false}' ORDER BY n)
                    FROM jsonb_array_elements(v_row.spec -> 'indexes') WITH ORDINALITY AS x(i, n))))
        RETURNING id INTO v_new_id;
        INSERT INTO pgturso.outbox (layout_id, op, nrows, payload)
        VALUES (v_new_id, 'A', 0, jsonb_build_object('from', v_row.layout_id, 'recopy', false)::text);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgturso._plain_turso_indexes IS
    'Private: give tracked tables whose Turso indexes are UNIQUE (0.1.0) plain ones instead (upgrades).';
REVOKE ALL ON FUNCTION pgturso._plain_turso_indexes() FROM PUBLIC;

SELECT pgturso._plain_turso_indexes();
SELECT pgturso._regenerate_captures();
-- Tables tracked before track_table created their counters' row (pgturso.table_state) get it now: the worker's
-- first batch of a table would insert it, locking the tracked_table row against a RENAME until Turso answers.
INSERT INTO pgturso.table_state (table_id)
SELECT t.id FROM pgturso.tracked_table t WHERE strpos(t.target, '%s') = 0 ON CONFLICT DO NOTHING;
