-- PL/Python entry points. They stay one import long: the logic lives in the pgturso Python package
-- (worker/pgturso), which `make install` copies to @PYTHON_DIR@ for the server's Python.

CREATE FUNCTION pgturso._plan_table(
    layout_id integer, relation text, source_table text, target_table text,
    columns jsonb, key_columns text[], function_name text
) RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "@PYTHON_DIR@" not in sys.path:
    sys.path.insert(0, "@PYTHON_DIR@")
from pgturso.extension_api import plan_table
return plan_table(layout_id, relation, source_table, target_table, columns, key_columns, function_name)
$$;
COMMENT ON FUNCTION pgturso._plan_table IS 'Private: layout and capture SQL of a table (pgturso.extension_api).';
