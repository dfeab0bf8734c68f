-- Delivery without a separate process: one pass of the worker's own code, inside Postgres.

CREATE OR REPLACE FUNCTION pgturso.sync(url text DEFAULT NULL, dsn text DEFAULT NULL, target text DEFAULT NULL)
RETURNS integer
LANGUAGE plpython3u
@SESSION_SETTINGS@
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
