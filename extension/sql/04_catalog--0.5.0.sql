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
