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
