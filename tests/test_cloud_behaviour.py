"""Turso Cloud as it really behaves (sqld: tursodatabase/libsql libsql-server), through the sqld-like proxy in
front of a real tursodb: lost and expired streams, the 5-second write lock, per-stream base_url, a null baton in
the middle of a transaction, 408, Retry-After, 403. Every transient behaviour must end with every row on Turso,
written exactly once (the Turso-side write counter), and never with exit 2 or a blocked table."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from typing import Any

import psycopg
import pytest
from conftest import drain, pending, run_worker
from support.cloud_proxy import INVALID_BATON, CloudProxy
from support.turso import TursoServer, install_apply_counter, read_rows

TOKEN = "cl0ud-token-value"
ROWS = 600
# Small requests: one delivery spans several requests of one stream, as a large one does on Cloud.
SMALL = ("--max-request-bytes", "40000", "--max-statement-bytes", "20000")


@pytest.fixture
def tracked(conn, dsn, turso: TursoServer):
    """Table t on both sides, the write counter on Turso, and ROWS rows in 30 source transactions pending."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    install_apply_counter(turso.url, "t")
    for first in range(1, ROWS + 1, ROWS // 30):
        conn.execute("INSERT INTO t SELECT g, repeat(md5(g::text), 6) FROM generate_series(%s::int, %s::int) g",
                     (first, first + ROWS // 30 - 1))
    return conn


def assert_complete_and_once(conn: psycopg.Connection[Any], turso: TursoServer) -> None:
    expected = [list(r) for r in conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()]
    assert turso.query("SELECT id, v FROM t ORDER BY id") == expected, "every row arrived, as it is in Postgres"
    writes, distinct = turso.query("SELECT count(*), count(DISTINCT id) FROM applied")[0]
    assert distinct == len(expected), "every row was written"
    assert writes == len(expected), f"{writes - len(expected)} row writes were applied twice"
    assert pending(conn) == 0


def deliver(dsn: str, cloud: CloudProxy, *args: str, env: dict[str, str] | None = None):
    result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "10", *SMALL, *args, env=env)
    assert "event=blocked" not in result.stderr and "event=isolating" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    return result


def spans_requests(cloud: CloudProxy) -> bool:
    return any(body.get("baton") for body in cloud.requests)


def test_a_restarted_server_invalidates_the_baton_and_the_batch_is_sent_again(tracked, dsn, turso):
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.restart_after = 1  # sqld restarts between two requests of a transaction
        result = deliver(dsn, cloud)
    assert cloud.restarts == 1 and 400 in cloud.answers and spans_requests(cloud)
    assert INVALID_BATON in result.stderr and "event=retry" in result.stderr
    assert_complete_and_once(tracked, turso)


@pytest.mark.parametrize("expired_status", [404, 500])  # Turso's newer protocol; sqld's STREAM_EXPIRED
def test_an_expired_stream_is_sent_again(tracked, dsn, turso, expired_status):
    with CloudProxy(turso.url, TOKEN, stream_expiry=0.5, expired_status=expired_status) as cloud:
        cloud.answer_delays = [1.5]  # an answer slow to arrive: the stream idles past its expiry meanwhile
        result = deliver(dsn, cloud)
    assert expired_status in cloud.answers
    assert "expired" in result.stderr and "event=retry" in result.stderr
    assert_complete_and_once(tracked, turso)


def test_408_is_retried(tracked, dsn, turso):
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.faults = [(408, "text/plain", "Request Timeout")] * 2
        result = deliver(dsn, cloud)
    assert result.stderr.count("event=retry") == 2 and "HTTP 408" in result.stderr
    assert_complete_and_once(tracked, turso)


def test_retry_after_is_honoured_on_429_and_503(tracked, dsn, turso):
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.faults = [(429, "application/json", '{"error": "slow down"}', {"Retry-After": "1"}),
                        (503, "text/plain", "maintenance", {"Retry-After": "2"})]
        result = deliver(dsn, cloud)
    delays = [float(d) for d in re.findall(r"event=retry .*?delay_s=([\d.]+)", result.stderr)]
    assert len(delays) == 2 and delays[0] >= 1.0 and delays[1] >= 2.0, delays  # the base delay is 0.05 s
    assert_complete_and_once(tracked, turso)


def test_403_says_access_is_blocked_and_stops(tracked, dsn, turso):
    before = pending(tracked)
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.faults = [(403, "text/plain", "Forbidden")]
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN)
    assert result.returncode == 2 and "blocked access (HTTP 403)" in result.stderr
    assert "event=retry" not in result.stderr and TOKEN not in result.stderr
    assert pending(tracked) == before


def test_a_null_baton_in_the_middle_of_a_transaction_is_refused(tracked, dsn, turso):
    with CloudProxy(turso.url, TOKEN) as cloud:
        cloud.null_batons = 1  # the server ends the stream while the transaction has more requests to come
        result = deliver(dsn, cloud)
    assert "without a baton in the middle of a transaction" in result.stderr
    assert_complete_and_once(tracked, turso)


def test_base_url_holds_for_its_stream_only(tracked, dsn, turso):
    """A stream sent to another node by base_url: when that node dies, new streams start at the configured URL."""
    with CloudProxy(turso.url, TOKEN) as cloud:
        node = cloud.frontend(die_after=2)
        cloud.base_url = node
        result = deliver(dsn, cloud)
    assert node.served == 2, "continuations followed the stream's base_url"
    assert "cannot reach Turso" in result.stderr and "event=retry" in result.stderr
    assert_complete_and_once(tracked, turso)


class OtherWriter:
    """Another client writing to the same Turso database through the proxy, as an application does."""

    def __init__(self, cloud: CloudProxy, turso: TursoServer) -> None:
        read_rows(turso.url, "CREATE TABLE IF NOT EXISTS other (n INTEGER)")
        self.url = cloud.url
        self.stop = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            body = {"baton": None, "requests": [
                {"type": "execute", "stmt": {"sql": "INSERT INTO other VALUES (1)"}}, {"type": "close"}]}
            request = urllib.request.Request(f"{self.url}/v2/pipeline", data=json.dumps(body).encode(), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
            self.writes += 1

    def __enter__(self) -> OtherWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_a_batch_that_holds_the_write_lock_too_long_is_rolled_back_then_sent_smaller(tracked, dsn, turso):
    """sqld's 5-second rule (here 0.5 s): the lock is taken from a slow multi-request batch while another client
    writes; the worker sends smaller batches until they fit, closing the failed stream each time."""
    with CloudProxy(turso.url, TOKEN, lock_timeout=0.5) as cloud, OtherWriter(cloud, turso) as other:
        cloud.request_delay = 0.3  # a slow link: every request of the transaction adds to the time it holds
        result = deliver(dsn, cloud, "--retry-limit", "30")
    assert cloud.timeouts > 0 and "TRANSACTION_TIMEOUT" in result.stderr
    assert "event=batch_shrunk" in result.stderr and other.writes > 0
    rollback_and_close = [{"type": "execute", "stmt": {"sql": "ROLLBACK", "args": []}}, {"type": "close"}]
    assert any(body.get("baton") and body["requests"] == rollback_and_close for body in cloud.requests), \
        "the stream of a failed non-final request is rolled back and closed"
    assert_complete_and_once(tracked, turso)


def test_a_source_transaction_too_slow_for_the_lock_window_says_what_to_change(conn, dsn, turso):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    install_apply_counter(turso.url, "t")
    with conn.transaction():  # one source transaction of many statements: too large for one request
        for first in range(1, ROWS + 1, ROWS // 30):
            conn.execute("INSERT INTO t SELECT g, repeat(md5(g::text), 6) FROM generate_series(%s::int, %s::int) g",
                         (first, first + ROWS // 30 - 1))
    with CloudProxy(turso.url, TOKEN, lock_timeout=0.5) as cloud, OtherWriter(cloud, turso):
        cloud.request_delay = 0.3
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "4", *SMALL)
        status = conn.execute("SELECT worker_status, last_error FROM pgturso.status").fetchone()
    assert result.returncode == 1, result.stderr  # retries exhausted: not fatal, not blocked
    assert "write-lock window" in result.stderr and "pgturso.max_request_bytes" in result.stderr
    assert "event=blocked" not in result.stderr
    assert "pgturso.max_request_bytes" in status[1]
    assert turso.query("SELECT count(*) FROM t") == [[0]] and pending(conn) > 0
    with CloudProxy(turso.url, TOKEN, lock_timeout=0.5) as cloud:  # the other writer stopped: it goes through
        deliver(dsn, cloud)
    assert_complete_and_once(conn, turso)


def test_libsql_url_with_tls0_token_and_encryption_key(tracked, dsn, turso):
    with CloudProxy(turso.url, TOKEN) as cloud:
        port = cloud.url.rsplit(":", 1)[1]
        url = f"libsql://127.0.0.1:{port}?tls=0&authToken={TOKEN}"
        result = run_worker(dsn, url, env={"PGTURSO_ENCRYPTION_KEY": "3ncrypt10n-key"})
    assert result.returncode == 0, result.stderr
    assert set(cloud.auth_headers) == {f"Bearer {TOKEN}"}
    assert set(cloud.encryption_keys) == {"3ncrypt10n-key"}
    assert TOKEN not in result.stderr and "3ncrypt10n-key" not in result.stderr
    assert_complete_and_once(tracked, turso)


def test_a_token_in_pgturso_url_is_refused_because_every_role_can_show_it(tracked, dsn):
    dbname = tracked.info.dbname
    tracked.execute(f"ALTER DATABASE {dbname} SET pgturso.url = 'libsql://127.0.0.1:1?tls=0&authToken=sh0wable'")
    result = run_worker(dsn, "")
    assert result.returncode == 2 and "pgturso.auth_token_file" in result.stderr
    assert "sh0wable" not in result.stderr


class StepErrorProxy(CloudProxy):
    """The sqld-like proxy, answering the next ``count`` requests with a request error carrying ``code`` (as sqld
    does for a whole request: ``{"type": "error", "error": {"message", "code"}}``; batches get it per step), without
    running them upstream, as a replica whose write forwarding to the primary failed answers."""

    def __init__(self, *args: Any, code: str, message: str, count: int, touching: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.code, self.message, self.count, self.touching = code, message, count, touching
        self.injected = 0

    def _forward(self, requests_: list[dict[str, Any]]) -> dict[str, Any]:
        if not (self.count > 0 and requests_):
            return super()._forward(requests_)
        if self.touching is None:
            self.count -= 1
            self.injected += 1
            return {"results": [self._failed(r) for r in requests_]}
        # Only the first step that writes the table fails (the server ran the steps before it, and the batch's
        # conditions skip those after it): run the batch with that step replaced by one that fails, then give
        # the failure sqld's code.
        for request in requests_:
            steps = request.get("batch", {}).get("steps", []) if request["type"] == "batch" else []
            for index, step in enumerate(steps):
                if self.touching in step["stmt"]["sql"]:
                    step["stmt"] = {"sql": "SELECT * FROM pgturso_attack_no_such_table", "args": []}
                    answer = super()._forward(requests_)
                    result = answer["results"][requests_.index(request)]["response"]["result"]
                    result["step_errors"][index] = {"message": self.message, "code": self.code}
                    self.count -= 1
                    self.injected += 1
                    return answer
        return super()._forward(requests_)

    def _failed(self, request: dict[str, Any]) -> dict[str, Any]:
        error = {"message": self.message, "code": self.code}
        if request["type"] == "batch":
            steps = len(request["batch"]["steps"])
            return {"type": "ok", "response": {"type": "batch", "result": {
                "step_results": [None] * steps, "step_errors": [error] * steps}}}
        return {"type": "error", "error": error}


# Step error codes that libsql-server (sqld) gives for conditions that pass by themselves: the primary a replica
# forwards writes to did not answer in time (StmtError::RpcQueryExecutionTimeout), a transient disk I/O error of
# the server's SQLite (sqlite_error_code maps the primary result code), the database being full (storage quota
# reached; lifted by the operator without touching Postgres, like BLOCKED).
TRANSIENT_SQLD_CODES = [
    ("RPC_QUERY_EXECUTION_TIMEOUT", "query execution timed out on the primary"),
    ("SQLITE_IOERR", "disk I/O error"),
]


@pytest.mark.parametrize(("code", "message"), TRANSIENT_SQLD_CODES)
def test_a_transient_sqld_step_error_never_blocks_a_table(tracked, dsn, turso, code, message):
    """A few requests answered with a transient sqld error code must be retried (from the marker), not taken as
    a change Turso refuses for good: no isolation, no blocked table, every row delivered once."""
    with StepErrorProxy(turso.url, TOKEN, code=code, message=message, count=3) as cloud:
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "10", *SMALL)
    assert "event=blocked" not in result.stderr and "event=isolating" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert cloud.injected == 3
    status = tracked.execute("SELECT worker_status FROM pgturso.status").fetchall()
    assert all(s[0] != "blocked" for s in status), status
    assert pending(tracked) == 0
    assert_complete_and_once(tracked, turso)


@pytest.mark.parametrize(("code", "message"), TRANSIENT_SQLD_CODES)
def test_a_transient_sqld_error_on_a_change_does_not_blame_the_table(tracked, dsn, turso, code, message):
    """The same answers to the requests that carry rows of t: the worker must not say that Turso refuses a
    change of public.t (status blocked, naming a source transaction an operator would then skip)."""
    with StepErrorProxy(turso.url, TOKEN, code=code, message=message, count=3, touching='"t"') as cloud:
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "10", *SMALL)
    assert "event=blocked" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert cloud.injected == 3
    assert_complete_and_once(tracked, turso)


def test_a_failed_progress_marker_write_is_retried_not_blamed_on_a_table(tracked, dsn, turso):
    """Any error answering pgturso's own bookkeeping (the marker write), even one with a code that refuses a
    change of a table, names no source transaction: the batch is sent again, nothing is isolated or blocked."""
    with StepErrorProxy(turso.url, TOKEN, code="SQLITE_ERROR", message="some error", count=2,
                        touching='INSERT INTO "_pgturso_progress"') as cloud:
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "10", *SMALL)
    assert "event=blocked" not in result.stderr and "event=isolating" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert cloud.injected == 2 and "progress marker" in result.stderr
    assert_complete_and_once(tracked, turso)
