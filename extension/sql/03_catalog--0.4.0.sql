-- Table changes of 0.4.0 (run after 00_catalog.sql, 01_catalog--0.2.0.sql and 02_catalog--0.3.0.sql by a fresh
-- install, and by the upgrade from any release before 0.4.0). Append here: ALTER TABLE, new tables, and DROP
-- FUNCTION IF EXISTS of a function whose argument list or result type changes in 0.4.0 (CREATE OR REPLACE cannot
-- change those).

-- Tenant values in a pattern URL's host: pgturso._tenant_host_problem(url, tenant) replaces
-- pgturso._tenant_in_url_host(url), which only told whether %s is in the host (the checks refused dots only).
DROP FUNCTION IF EXISTS pgturso._tenant_in_url_host(text);
