"""Turso Cloud's protocol behaviour and Turso's failure answers, through a proxy in front of a real tursodb."""

from __future__ import annotations

import pytest
from conftest import drain, pending, run_worker
from support.cloud_proxy import CloudProxy
from support.turso import TursoServer

TOKEN = "s3cr3t-token-value"


@pytest.fixture
def tracked(conn, dsn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g")
    return conn


def test_cloud_gets_a_bearer_token_and_closed_streams(tracked, dsn, turso: TursoServer):
    with CloudProxy(turso.url, TOKEN) as cloud:
        result = drain(dsn, cloud.url, "--auth-token", TOKEN)
    assert turso.query("SELECT count(*) FROM t") == [[50]]
    assert set(cloud.auth_headers) == {f"Bearer {TOKEN}"}
    assert all(body["requests"][-1] == {"type": "close"} for body in cloud.requests)
    assert TOKEN not in result.stderr


def test_a_transaction_spanning_requests_follows_the_baton(tracked, dsn, turso: TursoServer):
    tracked.execute("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(100, 3000) g")
    with CloudProxy(turso.url, TOKEN) as cloud:
        drain(dsn, cloud.url, "--auth-token", TOKEN, "--max-request-bytes", "300000",
              "--max-statement-bytes", "100000")
    batons = [body.get("baton") for body in cloud.requests]
    assert any(b is not None for b in batons), "continuation requests must carry the stream's baton"
    assert turso.query("SELECT count(*) FROM t") == [[50 + 2901]]


def test_a_wrong_token_stops_at_once_without_retrying(tracked, dsn, turso: TursoServer):
    with CloudProxy(turso.url, TOKEN) as cloud:
        result = run_worker(dsn, cloud.url, "--auth-token", "wrong-token")
    assert result.returncode == 2
    assert "refused the token" in result.stderr and "PGTURSO_AUTH_TOKEN" in result.stderr
    assert "wrong-token" not in result.stderr
    assert len(cloud.requests) == 1 and "event=retry" not in result.stderr
    assert pending(tracked) > 0


@pytest.mark.parametrize(
    ("status", "ctype", "body"),
    [
        (503, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
        (429, "application/json", '{"error": "rate limited"}'),
        (200, "text/html", "<html>maintenance</html>"),
        (500, "text/plain", "Internal Server Error"),
    ],
)
def test_transient_answers_are_retried_then_delivered(tracked, dsn, turso: TursoServer, status, ctype, body):
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.faults = [(status, ctype, body)] * 2
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "5")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("event=retry") == 2
    assert turso.query("SELECT count(*) FROM t") == [[50]]
    assert pending(tracked) == 0


def test_persistent_failure_gives_up_and_keeps_everything(tracked, dsn, turso: TursoServer):
    before = pending(tracked)
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.faults = [(502, "text/html", "<html>down</html>")] * 10
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "3")
    assert result.returncode == 1 and "event=giving_up" in result.stderr
    assert pending(tracked) == before
    assert turso.query("SELECT count(*) FROM sqlite_schema WHERE name = 't'") == [[0]]


def test_a_refused_connection_is_retried(tracked, dsn, turso: TursoServer):
    turso.stop()
    result = run_worker(dsn, turso.url, "--retry-limit", "1")
    assert result.returncode == 1 and "cannot reach Turso" in result.stderr


def test_a_request_that_times_out_is_retried(tracked, dsn, turso: TursoServer):
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.stalls = [3.0]
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--request-timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert "event=retry" in result.stderr and "Timeout" in result.stderr
    assert turso.query("SELECT count(*) FROM t") == [[50]]


def test_a_request_too_large_for_turso_is_split(tracked, dsn, turso: TursoServer):
    tracked.execute("INSERT INTO t SELECT g, repeat('y', 300) FROM generate_series(100, 5000) g")
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.max_body = 400_000
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "10")
    assert result.returncode == 0, result.stderr
    assert cloud.too_large > 0 and "HTTP 413" in result.stderr
    assert turso.query("SELECT count(*) FROM t") == [[50 + 4901]]


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_a_run_of_wide_rows_respects_the_statement_and_request_limits(conn, dsn, turso: TursoServer):
    """One transaction of 300 rows of 6 kB each, with --max-statement-bytes 16384 and --max-request-bytes 65536
    behind a Turso answering 413 to anything larger: in wal mode too (where a slot's run of rows is one event),
    no statement's argument and no request is over its limit, and the rows arrive in one Turso transaction."""
    conn.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('w')")
    drain(dsn, turso.url)
    conn.execute("INSERT INTO w SELECT g, repeat(chr(97 + g % 26), 6000) FROM generate_series(1, 300) g")
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.max_body = 65536 + 1024  # the limit, and the JSON envelope of a request (not counted by the worker)
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "3",
                            "--max-request-bytes", "65536", "--max-statement-bytes", "16384")
    assert result.returncode == 0, result.stderr
    assert cloud.too_large == 0, f"requests of {cloud.rejected_sizes} bytes"
    steps = [(body.get("baton"), step["stmt"]) for body in cloud.requests for request in body["requests"]
             if request["type"] == "batch" for step in request["batch"]["steps"]]
    inserts = [i for i, (_, stmt) in enumerate(steps) if stmt["sql"].startswith('INSERT INTO "w"')]
    arguments = [len(steps[i][1]["args"][0]["value"]) for i in inserts]
    assert len(inserts) > 1 and max(arguments) <= 16384, arguments
    # One transaction: a BEGIN before the first insert, no COMMIT until after the last.
    words = [stmt["sql"].split(None, 1)[0].upper() for _, stmt in steps]
    assert "BEGIN" in words[:inserts[0]] and "COMMIT" not in words[inserts[0]:inserts[-1]]
    assert len({baton for baton, _ in steps[inserts[0]:inserts[-1] + 1] if baton is not None}) > 1, "spans requests"
    assert turso.query("SELECT count(*), sum(length(v)) FROM w") == [[300, 300 * 6000]]
    assert turso.query("SELECT count(*) FROM w WHERE v <> printf('%.*c', 6000, char(97 + id % 26))") == [[0]]
    assert pending(conn) == 0
