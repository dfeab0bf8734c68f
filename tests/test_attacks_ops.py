"""Adversarial review of operations and Turso Cloud answer handling (issues 12 and 18, after their fixes).

Each test reproduces a case where a server answering what sqld allows makes the worker mark a table blocked or
exit, or where an operational tool says what is not true. They fail today on purpose."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from conftest import drain, pending, run_worker
from support.cloud_proxy import CloudProxy
from support.turso import read_rows
from test_cloud_behaviour import SMALL, TOKEN, assert_complete_and_once, tracked  # noqa: F401  (fixture)


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
def test_a_transient_sqld_step_error_never_blocks_a_table(tracked, dsn, turso, code, message):  # noqa: F811
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
def test_a_transient_sqld_error_on_a_change_does_not_blame_the_table(tracked, dsn, turso, code, message):  # noqa: F811
    """The same answers to the requests that carry rows of t: the worker must not say that Turso refuses a
    change of public.t (status blocked, naming a source transaction an operator would then skip)."""
    with StepErrorProxy(turso.url, TOKEN, code=code, message=message, count=3, touching='"t"') as cloud:
        result = run_worker(dsn, cloud.url, "--auth-token", TOKEN, "--retry-limit", "10", *SMALL)
    assert "event=blocked" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert cloud.injected == 3
    assert_complete_and_once(tracked, turso)


def test_skip_transaction_never_drops_the_schema_change_it_carries(conn, dsn, turso):
    """The refused transaction also added a column. Skipping it must drop its row changes only: the schema
    change is not what Turso refused, and without it every later write to the table is refused too (and
    verify --repair, whose upserts name the new column, cannot repair it)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    drain(dsn, turso.url)
    read_rows(turso.url, "CREATE TRIGGER no_bad BEFORE INSERT ON t WHEN NEW.v LIKE 'bad%' "
                         "BEGIN SELECT RAISE(ABORT, 'no bad rows here'); END")
    with conn.transaction():
        conn.execute("ALTER TABLE t ADD COLUMN c int")
        conn.execute("INSERT INTO t VALUES (1, 'bad row', 10)")
    bad_txid = conn.execute("SELECT max(txid)::text FROM pgturso.outbox").fetchone()[0]
    conn.execute("INSERT INTO t VALUES (2, 'good', 20)")
    result = run_worker(dsn, turso.url)
    assert result.returncode == 2 and "no bad rows here" in result.stderr, result.stderr
    assert conn.execute("SELECT last_error_txid::text FROM pgturso.status").fetchone()[0] == bad_txid

    conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'a row Turso refuses')", (bad_txid,))
    result = run_worker(dsn, turso.url)
    # The later, good transaction is delivered, with the column the skipped transaction added.
    assert result.returncode == 0, result.stderr
    assert turso.query("SELECT id, v, c FROM t ORDER BY id") == [[2, "good", 20]]


@pytest.mark.parametrize("capture", ["wal"], indirect=True)
def test_wait_for_sync_is_not_true_while_a_wal_targets_slot_is_missing(conn, dsn, turso, capture):
    """A wal target's slot is gone (a failover to a standby: Postgres 15 does not carry logical slots over; or
    an operator dropped it). A row committed since is on Turso only after the worker replaced the slot and
    copied the table again; until then wait_for_sync must not say it is there."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("SELECT pgturso.track_table('t')")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    drain(dsn, turso.url)
    conn.execute("SELECT pg_drop_replication_slot(pgturso._slot_name('default'))")
    conn.execute("INSERT INTO t VALUES (2, 'committed before the call')")
    synced = conn.execute("SELECT pgturso.wait_for_sync('1 second')").fetchone()[0]
    on_turso = turso.query("SELECT id FROM t ORDER BY id")
    assert on_turso == [[1]]  # no worker ran: row 2 is not on Turso
    assert synced is False, "wait_for_sync said every committed row is on Turso; row 2 is not"


def test_wait_for_sync_on_a_hot_standby_does_not_ignore_a_wal_targets_slot(turso):
    """Read-your-writes from a replica: an application writes on the primary, then calls wait_for_sync on a hot
    standby before reading Turso. For a wal target the check of the slot is skipped there (v_lsn is NULL in
    recovery, and ``confirmed_flush_lsn < NULL`` is never true), so it answers true while the row, committed
    and replayed before the call, is not on Turso."""
    from test_guarantees import _ledger, _primary_and_standby, _wait_replayed

    with _primary_and_standby("logical") as (primary, start_standby):
        dsn = primary.dsn()
        _ledger(dsn, "wal")
        drain(dsn, turso.url)
        standby = start_standby()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO ledger VALUES (101, 'committed before the call')")
        _wait_replayed(primary, standby)
        with psycopg.connect(standby.dsn(), autocommit=True) as replica:
            assert replica.execute("SELECT count(*) FROM ledger WHERE id = 101").fetchone()[0] == 1
            synced = replica.execute("SELECT pgturso.wait_for_sync('1 second')").fetchone()[0]
        assert turso.query("SELECT count(*) FROM ledger WHERE id = 101") == [[0]]  # no worker ran since
        assert synced is False, "wait_for_sync on the standby said row 101 is on Turso; it is not"
