"""Attacks on pgturso 0.2.0 by roles that are not superusers (helper review of issue 16's fixes).

Each test performs an attack against the real cluster and asserts that it fails; a test that fails means
the attack still works.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from conftest import run_worker
from support.turso import TursoServer
from test_security import ESCALATE, calls, is_superuser, login_role


def test_database_owner_cannot_run_code_as_the_operator_refreshing_a_tracked_materialized_view(conn, dsn):
    """The refresh function of a tracked materialized view embeds the view's column names in string constants
    (capture.refresh_function_sql: quote_literal doubles quotes, not backslashes) and does not pin
    standard_conforming_strings. A database owner sets it off for the database (ALTER DATABASE ... SET: a
    USERSET setting) and names a column of their view  \\'||public.x());--  : in the operator's session the
    string ends at the backslash-quote, and the rest of the name becomes PL/pgSQL code that calls the owner's
    function with the operator's rights when the operator calls pgturso.refresh_materialized_view.
    The refresh then fails (pgturso's own _follow_schema does not compile with the setting off either, and
    rolls the transaction back), so the proof is something a transaction cannot take back: a file the
    server writes with COPY ... TO, which only a superuser may do (COPY TO PROGRAM would run any command)."""
    db = conn.info.dbname
    proof = f"pgturso-attack-proof-{uuid.uuid4().hex}"  # in the data directory
    with login_role(conn, dsn, "dbowner") as owner_dsn:
        conn.execute(f'ALTER DATABASE "{db}" OWNER TO dbowner')
        conn.execute("GRANT CREATE ON SCHEMA public TO dbowner")
        try:
            with psycopg.connect(owner_dsn, autocommit=True) as owner:
                owner.execute(f"""
                    CREATE FUNCTION public.x() RETURNS text LANGUAGE plpgsql AS $$
                    BEGIN
                        IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                            EXECUTE format('COPY (SELECT current_user) TO %L',
                                           current_setting('data_directory') || '/{proof}');
                        END IF;
                        -- completes the statement the column name cut short
                        RETURN 'a")::text AS r, ''[1]'' AS k FROM (SELECT 1 AS id, 2 AS "''a") AS src';
                    END $$;
                    CREATE TABLE base (id int PRIMARY KEY, v text);
                    INSERT INTO base VALUES (1, 'a');
                    CREATE MATERIALIZED VIEW mv AS SELECT id, v AS "\\'||public.x());--" FROM base;
                    CREATE UNIQUE INDEX ON mv (id)""")
            conn.execute("SELECT pgturso.track_table('mv')")
            with psycopg.connect(owner_dsn, autocommit=True) as owner:
                owner.execute(f'ALTER DATABASE "{db}" SET standard_conforming_strings = off')
            # The operator (a superuser), in a new session of that database, refreshes the view as documented.
            with psycopg.connect(dsn, autocommit=True) as operator:
                try:
                    operator.execute("SELECT pgturso.refresh_materialized_view('mv')")
                except psycopg.Error:
                    pass  # judged by what ran, not by whether the refresh failed
            written = conn.execute("SELECT (pg_stat_file(%s, true)).size IS NOT NULL", (proof,)).fetchone()[0]
            assert not written, "the database owner's function ran as a superuser (it wrote a server file)"
        finally:
            conn.execute(f'ALTER DATABASE "{db}" RESET standard_conforming_strings')
            conn.execute(f'ALTER DATABASE "{db}" OWNER TO {conn.info.user}')


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_worker_runs_no_domain_check_of_an_array_of_a_domain(conn, dsn, turso: TursoServer):
    """pgturso._trusted_type calls an array trusted when its element's *base* type is built in, so an array of
    the owner's domain (checked[]: element checked, a domain over integer) is "trusted", and its base_pg_type
    is the array type itself (public.checked[], _base_type only strips domains from the column's own type).
    The wal worker reads decoded values back as ``(text)::public.checked[]`` (slot.encode_rows_sql,
    capture.key_from_text_sql): the domain's CHECK runs for every element, with the worker's rights."""
    with login_role(conn, dsn, "arrowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO arrowner")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(ESCALATE.format(attacker="arrowner"))
            owner.execute("""
                CREATE FUNCTION key_ok(integer) RETURNS boolean LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM public.escalate('domain check of an array element'); RETURN true; END $$;
                CREATE DOMAIN checked AS integer CHECK (key_ok(VALUE));
                CREATE TABLE w (id int PRIMARY KEY, v text)""")
        conn.execute("SELECT pgturso.track_table('w')")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            # An array of the domain, a domain over such an array, and the built-in array they hold.
            owner.execute("""
                CREATE DOMAIN checked_list AS checked[];
                ALTER TABLE w ADD COLUMN c checked[], ADD COLUMN l checked_list, ADD COLUMN plain integer[]""")
            owner.execute("INSERT INTO w VALUES (1, 'a', '{5}', '{6,7}', '{5}')")
            owner.execute("TRUNCATE calls")  # the owner's own INSERT ran the check (as the owner)
        result = run_worker(dsn, turso.url)
        assert not is_superuser(conn, "arrowner")
        assert calls(conn) == []
        # The legitimate use still works: the values arrive as those of the built-in array type.
        assert result.returncode == 0, result.stderr[-2000:]
        rows = turso.query("SELECT id, c, l, plain FROM w")
        assert rows == [[1, rows[0][3], rows[0][3].replace("5", "6,7"), rows[0][3]]], rows


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_table_owner_cannot_stop_the_target_with_a_generated_column_over_a_user_type(
        conn, dsn, turso: TursoServer):
    """The worker computes stored generated columns (pgoutput does not send them) from the decoded values,
    where a column of a user-defined type is its *text* form: an expression valid over the real type
    (cardinality of an enum array) fails over text, and the worker cannot deliver anything on the target.
    _install_wal_capture only refuses expressions that *depend* on a user object; this one uses built-ins."""
    conn.execute("CREATE TABLE bystander (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('bystander')")
    with login_role(conn, dsn, "genowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO genowner")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
        conn.execute("SELECT pgturso.track_table('w')")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            # Refused at the DDL (the whole statement rolls back), with the fix in the HINT.
            with pytest.raises(psycopg.errors.RaiseException, match="user-defined type") as refused:
                owner.execute("""
                    CREATE TYPE mood AS ENUM ('ok', 'bad');
                    ALTER TABLE w ADD COLUMN m mood[] DEFAULT '{ok}';
                    ALTER TABLE w ADD COLUMN n int GENERATED ALWAYS AS (cardinality(m)) STORED""")
            assert "trigger" in (refused.value.diag.message_hint or "")
            owner.execute("INSERT INTO w (id, v) VALUES (1, 'a')")
        conn.execute("INSERT INTO bystander VALUES (1, 'innocent')")
        result = run_worker(dsn, turso.url)
        assert result.returncode == 0, result.stderr[-2000:]
        assert turso.query("SELECT id, v FROM bystander") == [[1, "innocent"]]
        assert turso.query("SELECT id, v FROM w") == [[1, "a"]]


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wal_generated_column_over_an_enum_never_arrives_other_than_postgres_computed_it(
        conn, dsn, turso: TursoServer):
    """The same root cause as the test above, silently: the worker recomputes a generated column over an enum
    from the enum's text form, so "m > m2" compares text ('z' > 'a') where Postgres compared the enum's order
    ('z' was declared first: less). Turso would get a value Postgres never held, and no error would say so:
    track_table refuses the table instead (the worker cannot compute it right), naming the fix; a generated
    column over built-in types is tracked and arrives as Postgres computed it."""
    conn.execute("""
        CREATE TYPE letter AS ENUM ('z', 'a');
        CREATE TABLE w (id int PRIMARY KEY, m letter, m2 letter, later boolean GENERATED ALWAYS AS (m > m2) STORED)""")
    with pytest.raises(psycopg.errors.RaiseException, match="user-defined type") as refused:
        conn.execute("SELECT pgturso.track_table('w')")
    assert "trigger" in (refused.value.diag.message_hint or "")
    conn.execute("""
        CREATE TABLE ok (id int PRIMARY KEY, m text, m2 text, later boolean GENERATED ALWAYS AS (m > m2) STORED)""")
    conn.execute("SELECT pgturso.track_table('ok')")
    conn.execute("INSERT INTO ok (id, m, m2) VALUES (1, 'z', 'a')")
    result = run_worker(dsn, turso.url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert turso.query("SELECT id, later FROM ok") == [[1, 1]]


def test_table_owner_cannot_stop_the_target_with_an_index_named_like_another_table_on_turso(
        conn, dsn, turso: TursoServer):
    """SQLite keeps tables and indexes in one namespace and compares names without ASCII case. Postgres lets
    the owner of one tracked table name an index "Bystander" (not the relation "bystander"), and pgturso
    checks clashes of table names only (track_table, _follow_schema): the index reaches Turso as a
    CREATE INDEX that clashes with the other table's name, and the target stops."""
    conn.execute("CREATE TABLE bystander (id int PRIMARY KEY, v text)")
    conn.execute('CREATE INDEX "bystander by v" ON bystander (v)')
    conn.execute("SELECT pgturso.track_table('bystander')")
    with login_role(conn, dsn, "idxowner") as owner_dsn:
        conn.execute("GRANT CREATE ON SCHEMA public TO idxowner")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
        conn.execute("SELECT pgturso.track_table('w')")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            # Refused at the DDL (the index is not created), with the fix in the HINT; so is an index whose
            # name clashes with another table's index, or with its own table's name.
            for index in ('"Bystander"', '"BYSTANDER BY V"', '"W"'):
                with pytest.raises(psycopg.errors.RaiseException, match="on Turso") as refused:
                    owner.execute(f"CREATE INDEX {index} ON w (v)")
                assert "RENAME" in (refused.value.diag.message_hint or "")
            owner.execute('CREATE INDEX "w by v" ON w (v)')  # a name of its own is followed as before
            owner.execute("INSERT INTO w VALUES (1, 'a')")
        conn.execute("INSERT INTO bystander VALUES (1, 'innocent')")
        result = run_worker(dsn, turso.url)
        assert result.returncode == 0, result.stderr[-2000:]
        assert turso.query("SELECT id, v FROM bystander") == [[1, "innocent"]]
        assert turso.query("SELECT id, v FROM w") == [[1, "a"]]
        assert turso.query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'w' "
                           "AND name NOT LIKE 'sqlite%'") == [["w by v"]]
    # track_table checks the same: a table that would take an index's name on Turso is refused.
    conn.execute('CREATE TABLE "W BY V" (id int PRIMARY KEY)')
    with pytest.raises(psycopg.errors.RaiseException, match="on Turso"):
        conn.execute("""SELECT pgturso.track_table('"W BY V"')""")
