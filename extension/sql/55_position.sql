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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
@SESSION_SETTINGS@
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
