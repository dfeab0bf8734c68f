"""What each answer of Turso means for a batch (hrana.ANSWERS), the URL rules of libsql clients, Retry-After."""

from __future__ import annotations

import email.utils
import random
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import REPO
from pgturso.common.errors import ConfigError
from pgturso.common.retry import RETRY_AFTER_CAP, parse_retry_after, retry_delay
from pgturso.delivery import hrana
from pgturso.delivery.hrana import Meaning, classify_status, classify_step_error
from pgturso.delivery.targets import http_endpoint, open_target


@pytest.mark.parametrize(
    ("status", "continuation", "meaning"),
    [
        (400, True, Meaning.TRANSIENT),  # sqld after a restart: "Received an invalid baton"
        (404, True, Meaning.TRANSIENT),  # the stream expired
        (400, False, Meaning.REJECTED),  # a fresh stream: the request itself is wrong
        (404, False, Meaning.REJECTED),  # a fresh stream: no such database
        (401, False, Meaning.CONFIGURATION),
        (401, True, Meaning.CONFIGURATION),
        (403, False, Meaning.CONFIGURATION),
        (408, False, Meaning.TRANSIENT),
        (408, True, Meaning.TRANSIENT),
        (413, False, Meaning.TOO_LARGE),
        (429, False, Meaning.TRANSIENT),
        (500, True, Meaning.TRANSIENT),
        (502, False, Meaning.TRANSIENT),
        (503, False, Meaning.TRANSIENT),
        (504, False, Meaning.TRANSIENT),
        (405, False, Meaning.REJECTED),
        (409, True, Meaning.REJECTED),
    ],
)
def test_http_answers(status: int, continuation: bool, meaning: Meaning) -> None:
    assert classify_status(status, continuation).meaning is meaning


@pytest.mark.parametrize(
    ("code", "message", "meaning"),
    [
        ("TRANSACTION_TIMEOUT", "Transaction timed-out", Meaning.TRANSIENT),
        ("TRANSACTION_BUSY", "Server can't handle additional transactions", Meaning.TRANSIENT),
        ("BLOCKED", "Operation was blocked", Meaning.TRANSIENT),
        ("PROXY_ERROR", "primary unreachable", Meaning.TRANSIENT),
        ("STREAM_EXPIRED", "The stream has expired due to inactivity", Meaning.TRANSIENT),
        ("SQLITE_BUSY", "database is locked", Meaning.TRANSIENT),
        ("SQLITE_BUSY_SNAPSHOT", "database is locked", Meaning.TRANSIENT),
        ("SQLITE_LOCKED", "database table is locked", Meaning.TRANSIENT),
        ("SQLITE_INTERRUPT", "interrupted", Meaning.TRANSIENT),
        ("RPC_QUERY_EXECUTION_TIMEOUT", "query execution timed out on the primary", Meaning.TRANSIENT),
        ("SQLITE_IOERR", "disk I/O error", Meaning.TRANSIENT),
        ("SQLITE_IOERR_WRITE", "disk I/O error", Meaning.TRANSIENT),
        ("SQLITE_FULL", "database or disk is full", Meaning.TRANSIENT),
        (None, "database is locked", Meaning.TRANSIENT),  # servers without codes: the message says it
        (None, "Transaction timed-out", Meaning.TRANSIENT),
        ("SQLITE_CONSTRAINT", "UNIQUE constraint failed: t.id", Meaning.REFUSED),
        ("SQLITE_CONSTRAINT_TRIGGER", "no bad rows here", Meaning.REFUSED),
        ("SQLITE_ERROR", "no such table: t", Meaning.REFUSED),
        ("PREPARE_ERROR", "Parse error: no such table: t", Meaning.REFUSED),  # tursodb
        ("SQL_PARSE_ERROR", "near x: syntax error", Meaning.REFUSED),
        (None, "no such column: v", Meaning.REFUSED),
        ("network", "lowercase codes are not rule keys", Meaning.REFUSED),
    ],
)
def test_step_errors(code: str | None, message: str, meaning: Meaning) -> None:
    assert classify_step_error(code, message).meaning is meaning


def test_the_table_is_in_the_design_doc() -> None:
    doc = (REPO / "docs/design.md").read_text()
    assert hrana.answers_markdown() in doc, "copy hrana.answers_markdown() into docs/design.md (Retries)"


def test_every_rule_is_reachable_by_its_key() -> None:
    assert len({r.key for r in hrana.ANSWERS}) == len(hrana.ANSWERS)
    for rule in hrana.ANSWERS:
        assert hrana.rule(rule.key) is rule


@pytest.mark.parametrize(
    ("url", "endpoint", "token"),
    [
        ("libsql://db-org.turso.io", "https://db-org.turso.io", None),
        ("libsql://db-org.turso.io?tls=1", "https://db-org.turso.io", None),
        ("libsql://127.0.0.1:8080?tls=0", "http://127.0.0.1:8080", None),
        ("libsql://db.turso.io?authToken=abc", "https://db.turso.io", "abc"),
        ("libsql://h:9?tls=0&authToken=t%2Bk", "http://h:9", "t+k"),
        ("https://db.turso.io/", "https://db.turso.io/", None),
        ("http://127.0.0.1:8080?authToken=x", "http://127.0.0.1:8080", "x"),
        ("LIBSQL://Db.turso.io", "https://Db.turso.io", None),
    ],
)
def test_libsql_url_queries_as_libsql_clients_read_them(url: str, endpoint: str, token: str | None) -> None:
    assert http_endpoint(url) == (endpoint, token)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("libsql://db.turso.io?tls=0", "must name a port"),
        ("libsql://db.turso.io?tls=yes", "tls must be 0 or 1"),
        ("libsql://db.turso.io?mode=ro", "unsupported query parameter 'mode'"),
        ("https://db.turso.io?tls=0", "contradicts"),
        ("http://db.turso.io:8080?tls=1", "contradicts"),
    ],
)
def test_url_queries_libsql_clients_refuse_are_refused(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        http_endpoint(url)


def test_a_token_in_the_url_is_used_and_never_shown() -> None:
    target = open_target("libsql://h:1?tls=0&authToken=url-secret", "flag-token", max_request_bytes=1 << 20,
                         timeout=1, encryption_key="key-secret")
    assert target.session.headers["Authorization"] == "Bearer url-secret"  # the URL wins, as in libsql clients
    assert target.session.headers["x-turso-encryption-key"] == "key-secret"
    assert "secret" not in target.description
    with pytest.raises(ConfigError) as refused:
        open_target("libsql://h?tls=0&authToken=url-secret", None, max_request_bytes=1, timeout=1)
    assert "url-secret" not in str(refused.value)


def test_no_encryption_header_without_a_key() -> None:
    target = open_target("https://h", None, max_request_bytes=1 << 20, timeout=1)
    assert "x-turso-encryption-key" not in target.session.headers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), (" 0 ", 0.0), ("1.5", 1.5), ("-4", 0.0), ("100000", RETRY_AFTER_CAP), ("soon", None), ("", None),
     (None, None), ("nan", None)],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 20, usegmt=True), now=now) == 20.0
    assert parse_retry_after(email.utils.formatdate(now - 20, usegmt=True), now=now) == 0.0


def test_the_delay_is_never_shorter_than_the_server_asked() -> None:
    rng = random.Random(1)
    assert retry_delay(1, 0.1, 1.0, retry_after=7.0, rng=rng) == 7.0
    assert retry_delay(1, 0.1, 1.0, retry_after=None, rng=rng) <= 0.1
    assert retry_delay(30, 0.1, 1.0, retry_after=0.0, rng=rng) <= 1.0


# -- batches sized by the time they hold Turso's write lock ---------------------------------------------------


def _worker(batch_rows: int = 1000) -> Any:
    from pgturso.common.settings import resolve
    from pgturso.run.worker import Worker

    return Worker("", resolve({}, environ={}, flags={"batch_rows": str(batch_rows), "batch_events": "1000"}))


def test_slow_deliveries_shrink_batches_and_fast_ones_grow_them_back() -> None:
    worker = _worker()
    worker._fit_lock_window(2.5)  # over max_transaction_seconds (2 s)
    assert (worker.batch_rows, worker.batch_events) == (500, 500)
    for _ in range(20):
        worker._fit_lock_window(10.0)
    assert worker.batch_rows == 1, "never below one source transaction"
    worker._fit_lock_window(1.0)  # not slow, not fast: stays
    assert worker.batch_rows == 1
    for _ in range(20):
        worker._fit_lock_window(0.1)
    assert (worker.batch_rows, worker.batch_events) == (1000, 1000), "back to the settings, not beyond"


def test_a_lock_timeout_halves_a_batch_of_many_transactions_at_once() -> None:
    from pgturso.common.errors import TursoBusy

    worker = _worker()
    worker._sending = SimpleNamespace(transactions=40, rows=300, event_count=40)
    busy = TursoBusy("rolled back", "TRANSACTION_TIMEOUT", 6.0)
    assert worker.failures.explain_transient(busy) is busy
    assert (worker.batch_rows, worker.batch_events) == (150, 20)
    other = TursoBusy("busy", "SQLITE_BUSY")
    assert worker.failures.explain_transient(other) is other and worker.batch_rows == 150, "only lock timeouts resize"


def test_a_single_transaction_that_never_fits_the_window_gets_an_error_naming_the_setting() -> None:
    from pgturso.common.errors import TursoBusy, TursoUnavailable

    worker = _worker()
    worker._sending = SimpleNamespace(transactions=1, rows=90_000, event_count=3)
    busy = TursoBusy("rolled back", "TRANSACTION_TIMEOUT", 6.2)
    assert worker.failures.explain_transient(busy) is busy
    assert worker.failures.explain_transient(busy) is busy
    explained = worker.failures.explain_transient(busy)
    assert isinstance(explained, TursoUnavailable), "still retried: another writer may stop"
    assert "pgturso.max_request_bytes" in str(explained) and "6.2 s" in str(explained)
    assert "90000 rows" in str(explained) and "3 times" in str(explained)
    worker._fit_lock_window(0.1)  # a delivery went through: the count starts again
    assert worker.failures.explain_transient(busy) is busy


def test_a_file_target_locked_by_another_connection_is_transient_and_a_bad_statement_is_refused(tmp_path) -> None:
    import turso
    from pgturso.common.errors import StatementFailed, TursoBusy
    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    path = str(tmp_path / "replica.db")
    target = FileTarget(path)
    target.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    other = turso.connect(path, isolation_level=None)
    other.execute("BEGIN")
    other.execute("INSERT INTO t VALUES (1)")  # holds the write lock
    transaction = target.begin()
    with pytest.raises(TursoBusy, match="database is locked"):
        transaction.execute(Statement("INSERT INTO t VALUES (2)", table="public.t", operation="insert"))
    other.execute("COMMIT")
    transaction = target.begin()
    with pytest.raises(StatementFailed) as refused:
        transaction.execute(Statement("INSERT INTO nope VALUES (2)", table="public.t", operation="insert"))
    assert refused.value.table == "public.t"
    assert target.query("SELECT id FROM t") == [[1]]
    other.close()
    target.close()


def test_closing_a_file_target_checkpoints_it_even_while_another_connection_reads(tmp_path) -> None:
    """FileTarget.close checkpoints through execute() first (pyturso's close() checkpoints holding the GIL,
    which serialized a pattern worker's threads): a reader that holds the file open must not make close fail,
    and a close with nobody reading leaves every row in the database file, the WAL empty."""
    import turso
    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    path = tmp_path / "replica.db"
    target = FileTarget(str(path))
    target.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    transaction = target.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (1), (2)", table="public.t", operation="insert"))
    transaction.commit()
    reader = turso.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
    target.close()
    reader.execute("COMMIT")
    reader.close()
    again = FileTarget(str(path))
    transaction = again.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (3)", table="public.t", operation="insert"))
    transaction.commit()
    again.close()
    wal = tmp_path / "replica.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    fresh = turso.connect(str(path), isolation_level=None)
    assert fresh.execute("SELECT id FROM t ORDER BY id").fetchall() == [(1,), (2,), (3,)]
    fresh.close()


def test_a_group_commit_file_target_commit_returns_fsynced_and_checkpoints_only_a_large_wal(
        tmp_path, monkeypatch) -> None:
    """group_commits (a pattern's tenants): a commit runs without its own fsync (synchronous = NORMAL) and returns
    once its WAL was fsynced; the WAL is checkpointed into the database file (and emptied) only once it passes
    CHECKPOINT_WAL_BYTES; closing drops the connection, and the file opens again with every row."""
    import os

    import turso
    from pgturso.delivery import targets
    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    fsynced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), fsync(fd))[1])
    path = tmp_path / "tenant.db"
    wal = tmp_path / "tenant.db-wal"
    target = FileTarget(str(path), group_commits=True)
    assert target.query("PRAGMA synchronous") == [[1]]
    target.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    assert not target.unsynced and len(fsynced) == 2  # the WAL, and the new file's directory
    transaction = target.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (1), (2)", table="public.t", operation="insert"))
    transaction.commit()
    assert not target.unsynced and len(fsynced) == 3
    assert 0 < wal.stat().st_size < targets.CHECKPOINT_WAL_BYTES  # not checkpointed: the fsync made it durable
    monkeypatch.setattr(targets, "CHECKPOINT_WAL_BYTES", wal.stat().st_size)
    transaction = target.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (3)", table="public.t", operation="insert"))
    transaction.commit()
    assert not target.unsynced
    assert wal.stat().st_size == 0  # past the limit: checkpointed into the database file, the WAL emptied
    target.close()
    target.close()  # a second close does nothing
    again = turso.connect(str(path), isolation_level=None)
    assert again.execute("SELECT id FROM t ORDER BY id").fetchall() == [(1,), (2,), (3,)]
    again.close()


def test_a_deferred_group_commit_is_durable_only_once_its_pending_sync_ran(tmp_path, monkeypatch) -> None:
    """A caller ``deferring`` gets each commit back unsynced and a PendingSync that fsyncs it later, also after the
    target was closed (it holds its own descriptor of the WAL). A failed fsync raises a transient error (the caller
    keeps the batch's events) and leaves the target unsynced; nothing is read through an unsynced target
    (recovery's marker) before an fsync succeeded; a file opened with a non-empty WAL (left by a process that died
    before its fsync) starts unsynced. A reader holding the file, which stops a checkpoint, does not stop this."""
    import errno
    import os

    import turso
    from pgturso.common.errors import TursoUnavailable
    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    path = tmp_path / "tenant.db"
    target = FileTarget(str(path), group_commits=True)
    target.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    reader = turso.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchall() == [(0,)]
    target.deferring = True
    transaction = target.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (1)", table="public.t", operation="insert"))
    transaction.commit()
    target.deferring = False
    assert target.unsynced
    durable = target.pending_sync()
    assert durable is not None
    fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TursoUnavailable, match="fsync"):
        durable.sync()
    assert target.unsynced
    with pytest.raises(TursoUnavailable, match="fsync"):
        target.query("SELECT id FROM t")  # recovery's marker is not read until an fsync succeeded
    fsynced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), fsync(fd))[1])
    target.deferring = True
    transaction = target.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (2)", table="public.t", operation="insert"))
    transaction.commit()
    target.deferring = False
    durable = target.pending_sync()
    assert durable is not None and not fsynced
    target.close()  # before the fsync: the PendingSync has its own descriptor
    durable.sync()
    assert fsynced
    reader.execute("COMMIT")
    reader.close()
    del reader

    # Written (autocommit), then dropped without close() or fsync.
    left = turso.connect(str(path), isolation_level=None)
    left.execute("INSERT INTO t VALUES (3)")
    del left
    assert (tmp_path / "tenant.db-wal").stat().st_size > 0
    reopened = FileTarget(str(path), group_commits=True)
    assert reopened.unsynced
    fsynced.clear()
    assert reopened.query("SELECT id FROM t ORDER BY id") == [[1], [2], [3]]
    assert fsynced and not reopened.unsynced
    reopened.close()


_READ_ANOTHER_PROCESS = """
import sys, turso
try:
    db = turso.connect(sys.argv[1], isolation_level=None)
except Exception as exc:
    print("refused:", exc)
else:
    print("read:", db.execute("SELECT count(*) FROM t").fetchall()[0][0])
"""


def test_another_process_never_reads_a_tenant_file_while_a_group_commit_target_holds_it(tmp_path) -> None:
    """A reader in another process (a second worker, verify, a test) while a group-commit target holds the file
    with commits not fsynced yet is refused (pyturso's lock on the database file), before and after the target's
    PendingSync fsynced and closed its own descriptor of the WAL: POSIX locks go with the first close of any
    descriptor of the locked file in the process, and pyturso locks the WAL file too, so pgturso opens the WAL
    only, never the database file itself (closing such a descriptor let another process write the same file).
    Once the target is closed (its connection dropped, no checkpoint) the other process reads every commit."""
    import subprocess
    import sys

    from pgturso.delivery.statements import Statement
    from pgturso.delivery.targets import FileTarget

    path = tmp_path / "tenant.db"

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", _READ_ANOTHER_PROCESS, str(path)], capture_output=True,
                              text=True, timeout=120, check=True).stdout.strip()

    target = FileTarget(str(path), group_commits=True)
    target.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    target.deferring = True
    transaction = target.begin()
    transaction.execute(Statement("INSERT INTO t VALUES (1)", table="public.t", operation="insert"))
    transaction.commit()
    target.deferring = False
    durable = target.pending_sync()
    assert durable is not None and target.unsynced
    assert other_process().startswith("refused:")  # unsynced frames: not readable elsewhere
    durable.sync()  # fsyncs and closes its duplicate of the WAL descriptor
    assert not target.unsynced
    assert other_process().startswith("refused:")  # the database file's lock held all the same
    target.close()
    assert other_process() == "read: 1"
