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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@CAPTURE_SETTINGS@
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
@CAPTURE_SETTINGS@
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
@SESSION_SETTINGS@
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
