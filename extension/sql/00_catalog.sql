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
