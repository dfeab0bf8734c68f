"""Where changes go: a Turso server over HTTP (Hrana) or a local Turso database file (pyturso).

Both offer the same two operations: ``query`` (one read, autocommit) and ``begin`` (a transaction that takes
statements and commits them atomically, raising if anything failed). A transaction may be larger than one
HTTP request; it is then sent in several requests on the same stream.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import requests

from ..common.errors import (
    ConfigError,
    PgTursoError,
    RequestTooLarge,
    StatementFailed,
    StreamLost,
    TursoAuthError,
    TursoBusy,
    TursoRequestRejected,
    TursoUnavailable,
)
from ..common.logs import event
from ..common.retry import parse_retry_after
from . import hrana
from .statements import Statement

log = logging.getLogger("pgturso.target")


class Transaction(Protocol):
    def execute(self, statement: Statement) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Target(Protocol):
    description: str
    last_hold_seconds: float  # how long the last committed transaction was open on the target

    def query(self, sql: str, args: Sequence[hrana.Value] = ()) -> list[list[hrana.Value]]: ...

    def execute(self, sql: str) -> None: ...

    def begin(self) -> Transaction: ...

    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """The URL without credentials or query string, fit for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# Query parameters of a Turso URL, as libsql clients read them (@libsql/core's expandConfig): any other is an error.
URL_QUERY_PARAMETERS = ("tls", "authToken")


def http_endpoint(url: str) -> tuple[str, str | None]:
    """The http(s) URL to POST pipelines to and the token given in the URL (``authToken=``), if any.

    ``libsql://host`` is ``https://host``; ``libsql://host:port?tls=0`` is ``http://host:port`` (an explicit port
    is required, as libsql clients require it). Any other query parameter is refused, not silently dropped.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls: str | None = None
    token: str | None = None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in URL_QUERY_PARAMETERS:
            raise ConfigError(f"pgturso.url {redact_url(url)!r} has an unsupported query parameter {key!r}: "
                              "Turso URLs take only tls=0|1 and authToken= (as libsql clients do)")
        if key == "tls":
            if value not in ("0", "1"):
                raise ConfigError(f"pgturso.url {redact_url(url)!r}: tls must be 0 or 1, not {value!r}")
            tls = value
        else:
            token = value or None
    if scheme == "libsql":
        if tls == "0":
            try:
                port = parts.port
            except ValueError:
                port = None
            if port is None:
                raise ConfigError(f"pgturso.url {redact_url(url)!r}: a libsql:// URL with ?tls=0 must name a port "
                                  "(libsql://host:8080?tls=0), as libsql clients require")
        scheme = "http" if tls == "0" else "https"
    elif tls is not None and (tls == "1") != (scheme == "https"):
        raise ConfigError(f"pgturso.url {redact_url(url)!r}: tls={tls} contradicts {scheme}://; drop it, or use "
                          "libsql:// with tls=0|1")
    return urlunsplit((scheme, parts.netloc, parts.path, "", "")), token


def open_target(url: str, auth_token: str | None, *, max_request_bytes: int, timeout: float,
                tls_ca_file: str | None = None, encryption_key: str | None = None, threads: bool = True,
                group_commits: bool = False) -> Target:
    """A target for ``url``: http(s)://, libsql:// (https://, or http:// with ?tls=0) or file:PATH.

    TLS certificates are always verified, against the system CAs or ``tls_ca_file``. A token in the URL
    (``?authToken=``) wins over ``auth_token``, as in libsql clients. ``encryption_key`` opens an encrypted Turso
    Cloud database (sent as the ``x-turso-encryption-key`` header). ``threads=False`` (inside a Postgres
    backend) sends every request from the caller's thread. ``group_commits``: a file: database's commits are
    made durable by an fsync of its WAL that the caller may defer and group with other databases' (FileTarget),
    for a pattern worker that visits many databases.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return FileTarget(url[len("file:") :], group_commits=group_commits)
    if scheme in ("http", "https", "libsql"):
        endpoint, url_token = http_endpoint(url)
        return HttpTarget(endpoint, url_token or auth_token, max_request_bytes=max_request_bytes, timeout=timeout,
                          tls_ca_file=tls_ca_file, encryption_key=encryption_key, threads=threads)
    raise ConfigError(
        f"pgturso.url {redact_url(url)!r} is not a Turso URL; use http://, https://, libsql:// or file:PATH"
    )


class HttpTarget:
    """A Turso server speaking Hrana over HTTP (Turso Cloud, sqld, or ``tursodb --sync-server``).

    What each answer means is decided by ``hrana.ANSWERS`` (one table, documented in docs/design.md); this class
    turns those decisions into the exceptions of errors.py.
    """

    def __init__(self, url: str, auth_token: str | None, *, max_request_bytes: int, timeout: float,
                 tls_ca_file: str | None = None, encryption_key: str | None = None, threads: bool = True) -> None:
        self.base_url = url.rstrip("/")  # the configured URL: every new stream starts here
        self.description = redact_url(self.base_url)
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        # Passed on every request: a session-level setting would lose to REQUESTS_CA_BUNDLE in the environment.
        self.verify: str | bool = tls_ca_file or True
        # Secrets travel in headers only, never in a message or a log line.
        if auth_token:
            self.session.headers["Authorization"] = f"Bearer {auth_token}"
        if encryption_key:
            self.session.headers["x-turso-encryption-key"] = encryption_key
        # Turso Cloud wants streams closed; tursodb rejects the close request. Learnt on first use.
        self.sends_close = True
        self.last_hold_seconds = 0.0  # how long the last committed transaction was open on Turso
        self.threads = threads
        self._requests: ThreadPoolExecutor | None = None  # sends a transaction's non-final requests

    def background(self) -> ThreadPoolExecutor:
        """The thread that sends a non-final request while the caller reads the next one out of Postgres."""
        if self._requests is None:
            self._requests = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgturso-request")
        return self._requests

    def pipeline(self, requests_: list[dict[str, Any]], baton: str | None = None, *, last: bool = True,
                 url: str | None = None) -> dict[str, Any]:
        """POST one pipeline on the stream of ``baton`` (None: a new stream) to ``url`` (the stream's base_url;
        None: the configured URL); returns the decoded answer. Raises the errors of errors.py."""
        body: dict[str, Any] = {"baton": baton, "requests": list(requests_)}
        if last and self.sends_close:
            body["requests"].append(hrana.CLOSE_REQUEST)
        where = url or self.base_url
        try:
            response = self.session.post(f"{where}/v2/pipeline", data=json.dumps(body), timeout=self.timeout,
                                         verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise TursoUnavailable(
                f"TLS with Turso at {redact_url(where)} failed: {exc}. If the server uses a private CA, "
                "name its certificate with --tls-ca-file or PGTURSO_TLS_CA_FILE."
            ) from exc
        except requests.RequestException as exc:
            raise TursoUnavailable(f"cannot reach Turso at {redact_url(where)}: {type(exc).__name__}: {exc}") from exc
        text = response.text
        if response.status_code != 200 and last and self.sends_close and "close" in text and "variant" in text:
            # The server could not parse the request, so nothing in it ran: resend without close.
            event(log, logging.INFO, "close_unsupported", target=self.description)
            self.sends_close = False
            return self.pipeline(requests_, baton, last=last, url=url)
        if response.status_code != 200:
            self._raise_for(response.status_code, text, baton is not None, response.headers.get("Retry-After"))
        try:
            answer = response.json()
            results = answer["results"]
            if len(results) < len(requests_):
                raise ValueError("too few results")
        except (ValueError, KeyError, TypeError) as exc:
            raise TursoUnavailable(
                f"Turso at {self.description} answered with something that is not a Hrana response: {text[:200]!r}"
            ) from exc
        return answer

    def _raise_for(self, status: int, text: str, continuation: bool, retry_after: str | None) -> None:
        """Raise what a non-200 answer means (hrana.classify_status)."""
        rule = hrana.classify_status(status, continuation)
        said = f"Turso at {self.description} answered HTTP {status}: {text[:200]}"
        if rule.meaning is hrana.Meaning.TRANSIENT:
            if rule.key.endswith("-stream"):
                raise StreamLost(f"{said} ({rule.why}); sending the whole batch again on a new stream")
            raise TursoUnavailable(f"{said} ({rule.why})", retry_after=parse_retry_after(retry_after))
        if rule.meaning is hrana.Meaning.TOO_LARGE:
            # Nothing of a refused request ran: send the same changes again in smaller pieces.
            self.max_request_bytes = max(self.max_request_bytes // 2, 64 << 10)
            raise RequestTooLarge(
                f"Turso at {self.description} refused a request as too large (HTTP 413); "
                f"retrying with requests of at most {self.max_request_bytes} bytes"
            )
        if status == 401:
            raise TursoAuthError(status, f"Turso at {self.description} refused the token (HTTP 401): {text[:200]}. "
                                 "Set a valid token with --auth-token, PGTURSO_AUTH_TOKEN or pgturso.auth_token_file.")
        if status == 403:
            raise TursoAuthError(status, f"Turso at {self.description} blocked access (HTTP 403): {text[:200]}. "
                                 "The token is valid but may not use this database (a token of another database or "
                                 "organisation, or a read-only token), or the database or organisation is blocked "
                                 "(e.g. over its quota): check them in Turso, or set a token with write access "
                                 "with --auth-token, PGTURSO_AUTH_TOKEN or pgturso.auth_token_file.")
        raise TursoRequestRejected(status, f"Turso at {self.description} rejected the request (HTTP {status}): "
                                   f"{text[:200]} ({rule.why})")

    def query(self, sql: str, args: Sequence[hrana.Value] = ()) -> list[list[hrana.Value]]:
        answer = self.pipeline([hrana.execute_request(sql, args)])
        try:
            return hrana.rows_of(answer["results"][0])
        except hrana.StepError as exc:
            rule = hrana.classify_step_error(exc.code, str(exc))
            if rule.transient:
                raise TursoBusy(f"Turso at {self.description} answered {exc.code or 'an error'}: {exc} "
                                f"({rule.why})", exc.code or "") from exc
            raise StatementFailed(str(exc)) from exc

    def execute(self, sql: str) -> None:
        self.query(sql)

    def begin(self) -> HttpTransaction:
        return HttpTransaction(self)

    def close(self) -> None:
        if self._requests is not None:
            self._requests.shutdown(wait=True)
            self._requests = None
        self.session.close()


class HttpTransaction:
    """Statements buffered into batch requests; flushed when a request would grow past the size limit.

    The requests of one transaction share a stream: each continuation carries the baton of the previous answer
    and goes to that stream's ``base_url`` (if the server named one), which is forgotten with the stream.
    A non-final request travels on a background thread while the caller reads the next statements out of
    Postgres, so that a transaction spanning requests holds Turso's write lock for as short a time as it can
    (Turso Cloud takes it away after 5 s when another client waits); one request at most is in flight.
    """

    def __init__(self, target: HttpTarget) -> None:
        self.target = target
        self.plan = hrana.BatchPlan.new(begin=True)
        self.statements: list[Statement] = []
        self.size = 0
        self.baton: str | None = None
        self.stream_url: str | None = None  # the stream's base_url, for its later requests only
        self.opened_at: float | None = None  # when the first request left: the transaction is open from then on
        self.in_flight: Future[None] | None = None  # the non-final request travelling, if any

    def execute(self, statement: Statement) -> None:
        size = statement.size + 64
        if self.statements and self.size + size > self.target.max_request_bytes:
            self._flush()
        self.plan.add(statement.sql, statement.args)
        self.statements.append(statement)
        self.size += size

    def _flush(self) -> None:
        """Send what is buffered as a non-final request once the previous one was answered (its baton names the
        stream), and return to reading while it travels."""
        self._wait()
        plan, statements = self.plan, self.statements
        self.plan, self.statements, self.size = hrana.BatchPlan.new(begin=False), [], 0
        if not self.target.threads:
            self._send(plan, statements, False)
            return
        self.in_flight = self.target.background().submit(self._send, plan, statements, False)

    def _wait(self) -> None:
        """Wait for the request in flight; raises what sending it raised."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.result()

    def commit(self) -> None:
        self._wait()
        self.plan.commit()
        self._send(self.plan, self.statements, commit=True)

    def abort(self) -> None:
        """Roll back and close the stream of a transaction that will not be committed (best effort: a stream
        left open expires on its own, holding Turso's write lock until then)."""
        try:
            self._wait()
        except Exception as exc:  # the caller is handling its own failure; this one would go unseen
            event(log, logging.INFO, "request_abandoned", target=self.target.description, error=str(exc))
        self._close_stream()

    def _close_stream(self) -> None:
        baton, url = self.baton, self.stream_url
        self.baton = self.stream_url = None
        if baton is None:
            return
        try:
            self.target.pipeline([hrana.execute_request("ROLLBACK")], baton, url=url)
        except PgTursoError as exc:
            event(log, logging.DEBUG, "stream_not_closed", target=self.target.description, error=str(exc))

    @property
    def held_seconds(self) -> float:
        return 0.0 if self.opened_at is None else time.monotonic() - self.opened_at

    def _send(self, plan: hrana.BatchPlan, statements: list[Statement], commit: bool) -> None:
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        try:
            answer = self.target.pipeline([plan.request()], self.baton, last=commit, url=self.stream_url)
        except PgTursoError:
            self.baton = self.stream_url = None  # the answer (and the stream's next baton) never came
            raise
        try:
            outcome = hrana.read_batch_result(plan, answer["results"][0])
        except (ValueError, KeyError, TypeError) as exc:
            raise TursoUnavailable(f"Turso at {self.target.description} sent a malformed batch result: {exc}") from exc
        baton = answer.get("baton")
        if commit or baton is None:
            self.baton = self.stream_url = None  # the stream ended with this request
        else:
            self.baton = str(baton)
            if answer.get("base_url"):
                self.stream_url = str(answer["base_url"]).rstrip("/")
        if outcome.error is not None:
            self._close_stream()  # a failed non-final request leaves the transaction open: roll it back, close it
            self._raise_failure(outcome, statements)
        if not commit and baton is None and self.target.sends_close:
            # A server with streams (Cloud, sqld) ended this one: the rest would run outside the transaction.
            rule = hrana.rule("null-baton")
            raise StreamLost(f"Turso at {self.target.description} answered without a baton in the middle of a "
                             f"transaction ({rule.why}); sending the whole batch again on a new stream")
        if commit:
            self.target.last_hold_seconds = self.held_seconds

    def _raise_failure(self, outcome: hrana.BatchOutcome, statements: list[Statement]) -> None:
        assert outcome.error is not None
        rule = hrana.classify_step_error(outcome.code, outcome.error)
        if rule.transient:
            held = self.held_seconds
            raise TursoBusy(f"Turso at {self.target.description} answered {outcome.code or 'an error'} after the "
                            f"transaction had been open {held:.1f} s: {outcome.error} ({rule.why}); nothing of the "
                            "batch was committed, sending it again", outcome.code or rule.key, held)
        failed = statements[outcome.failed_caller_index] if outcome.failed_caller_index is not None else None
        if failed is None or not failed.table:
            # pgturso's own bookkeeping (the progress marker write) failed: that is no change of a table Turso
            # refuses, so there is no source transaction to isolate, block on or skip. It is sent again (the
            # marker tells what committed), visibly, up to --retry-limit.
            raise TursoUnavailable(f"Turso at {self.target.description} failed pgturso's bookkeeping (progress "
                                   f"marker): {outcome.code or 'error'}: {outcome.error}; nothing of the batch "
                                   "was committed, sending it again")
        raise StatementFailed(outcome.error, failed.table, failed.operation, failed.txids)


# A group-commit target's WAL is checkpointed into its database file once it holds this much, not after every
# commit: a TRUNCATE checkpoint costs three fsyncs and the commit after it a fourth (the new WAL's header), and
# opening a file reads its whole WAL (about 2.7 ms per MB here; 0.5 ms at 8 kB, 0.65 ms at 256 kB).
CHECKPOINT_WAL_BYTES = 256 << 10


class FileTarget:
    """A local Turso database file, written in-process through pyturso: the embedded default.

    ``group_commits`` (a pattern worker's tenants): commits run with ``synchronous = NORMAL``, which writes their
    WAL frames without an fsync (pyturso 0.8.3: the only fsync a NORMAL commit makes is of a new WAL's header).
    Such a commit is made durable by an fsync of the WAL file: at once (``commit()`` returns durable), or, while
    the caller ``deferring``, by the ``PendingSync`` that ``pending_sync()`` hands it, which a pattern worker's
    round runs for all its tenants at once, before their events are deleted in Postgres (docs/design.md "A
    tenant's commit, made durable by a group fsync"). Nothing is read through the target (recovery's marker)
    while a commit may not be durable (``unsynced``: also when the file is opened with a non-empty WAL, which
    a process that died before its fsync may have left). The WAL is checkpointed (``TRUNCATE``) only once it
    passes CHECKPOINT_WAL_BYTES, and closing drops the connection without pyturso's ``close()``, whose
    checkpoint fsyncs the file three times holding Python's GIL (it serialized a worker's tenant threads).
    """

    def __init__(self, path: str, *, group_commits: bool = False) -> None:
        try:
            import turso  # imported here: only file: targets need pyturso
        except ImportError:
            raise ConfigError(
                f"file:{path} needs pyturso, which this Python ({sys.executable}) lacks: pip install pyturso"
            ) from None

        if not path:
            raise ConfigError("a file: target needs a path, e.g. file:/var/lib/pgturso/replica.db")
        self.description = f"file:{path}"
        self.path = path
        self._error = turso.Error
        self.group_commits = group_commits
        self.deferring = False  # the caller makes the next commits durable itself (pending_sync)
        self.commits = 0  # writes committed through this target (transactions and autocommit statements)
        self._wal = -1  # the WAL's descriptor, held from before this target's first write (group_commits)
        # Its directory entry is new: fsynced with the first sync (ext4 does it with the file's fsync anyway).
        self._new_file = group_commits and not os.path.exists(path)
        try:
            self.conn = turso.connect(path, isolation_level=None)
            if group_commits:
                self.conn.execute("PRAGMA synchronous = NORMAL").fetchall()
        except turso.Error as exc:
            if "lock" in str(exc).lower():  # another process has it open: it may let go (a worker, after idling)
                raise TursoUnavailable(
                    f"{self.description} is held open by another process ({exc}): a file: database is open in "
                    "one process at a time, e.g. the pgturso-worker delivering to it (a pattern worker closes an "
                    "idle tenant's file after a few seconds); try again, or serve it with tursodb --sync-server"
                ) from exc
            raise ConfigError(f"{self.description} cannot be opened: {exc}") from exc
        if group_commits:
            try:
                # Opened before this target writes: an error writing back those writes is reported to it (and
                # to its duplicates in PendingSync), whichever descriptor pyturso wrote them through. The WAL
                # only: closing any descriptor of a file drops this process's POSIX locks on it, and pyturso's
                # lock on the database file is what keeps other processes out (its WAL lock goes with our
                # close; test_another_process_never_reads_a_tenant_file_while_a_group_commit_target_holds_it).
                self._wal = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.conn = None  # type: ignore[assignment]
                raise TursoUnavailable(f"{self.description}: its WAL cannot be opened for fsync: {exc}") from exc
        # Written but maybe not on disk yet: a WAL left by a process that stopped before its fsync (its frames
        # may sit in the page cache only). Nothing read from the file (recovery's marker) is trusted until the
        # WAL was fsynced (``sync``).
        self.unsynced = group_commits and _wal_size(path) > 0
        self.last_hold_seconds = 0.0

    def query(self, sql: str, args: Sequence[hrana.Value] = ()) -> list[list[hrana.Value]]:
        if self.unsynced:
            self.sync()
        try:
            return [list(row) for row in self.conn.execute(sql, tuple(args)).fetchall()]
        except self._error as exc:
            raise self.failure(exc) from exc

    def sync(self) -> None:
        """Make every commit written to the file so far durable: fsync its WAL (whose frames hold them, a
        checkpoint having fsynced what it moved into the database file). Raises TursoUnavailable if the fsync
        failed (the batch's events stay in the outbox)."""
        PendingSync(self).sync()

    def pending_sync(self) -> PendingSync | None:
        """What makes this target's commits so far durable, to run later (after the target may be closed), or
        None if they are durable already."""
        return PendingSync(self) if self.unsynced else None

    def _committed(self) -> None:
        """A write committed (synchronous = NORMAL: not fsynced): checkpoint a WAL that passed
        CHECKPOINT_WAL_BYTES, and make the commit durable now unless the caller is ``deferring``."""
        self.commits += 1
        self.unsynced = True
        if _wal_size(self.path) > CHECKPOINT_WAL_BYTES:
            self._checkpoint()
        if self.unsynced and not self.deferring:
            self.sync()

    def _checkpoint(self) -> None:
        """Move the WAL into the database file and empty it (it fsyncs the WAL, then the file, then the
        truncation, so it also makes every commit durable). One that cannot complete (another connection of
        this process reading the file) or fails is tried again after a later commit; durability does not wait
        for it: the fsync of the WAL gives that."""
        try:
            busy, *_ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
        except self._error as exc:
            event(log, logging.WARNING, "checkpoint_failed", target=self.description, error=str(exc))
            return
        if busy:
            event(log, logging.DEBUG, "checkpoint_busy", target=self.description)
        else:
            self.unsynced = False

    def failure(self, exc: Exception, statement: Statement | None = None, what: str = "") -> PgTursoError:
        """What a pyturso error means, by the same table as Turso's answers: another process holding the file's
        lock is transient; anything else refuses the statement."""
        rule = hrana.classify_step_error(None, str(exc))
        if rule.transient:
            return TursoBusy(f"{self.description}: {exc} ({rule.why}); nothing was committed, sending it again",
                             rule.key)
        if statement is None:
            return StatementFailed(f"{what}{exc}")
        return StatementFailed(str(exc), statement.table, statement.operation, statement.txids)

    def execute(self, sql: str) -> None:
        self.query(sql)
        if self.group_commits:  # an autocommit write (a recopy's CREATE TABLE)
            self._committed()

    def begin(self) -> FileTransaction:
        return FileTransaction(self)

    def close(self) -> None:
        if self.conn is None:
            return
        if self.group_commits:
            # Dropping the connection closes the file (and lets go of its lock) without close()'s checkpoint and
            # fsyncs under the GIL. Commits not fsynced yet stay in the WAL: a PendingSync handed out fsyncs
            # them, and whoever opens the file next finds a non-empty WAL and fsyncs it before trusting it.
            self.conn = None  # type: ignore[assignment]
            os.close(self._wal)
            self._wal = -1
            return
        # Closing the last connection of a database checkpoints its WAL (writes and fsyncs), and pyturso's
        # close() does that holding Python's GIL: a pattern worker closing tenants' databases on four threads
        # went no faster than on one. A checkpoint through execute() does the same work with the GIL released,
        # leaving close() nothing to copy (measured: 4 threads opening, writing and closing databases, 69 -> 150
        # visits/s). PASSIVE: it never waits for a reader of the file; close() checkpoints whatever is left.
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except self._error as exc:  # close() below checkpoints anyway; nothing of the data is at stake
            event(log, logging.DEBUG, "checkpoint_failed", target=self.description, error=str(exc))
        self.conn.close()


class PendingSync:
    """The fsync that makes a group-commit FileTarget's commits so far durable, run now or later (a pattern
    worker's round runs its tenants' side by side, so that one journal commit of the filesystem serves several).
    It holds its own duplicate of the WAL's descriptor (sharing the target's open file, so it sees write-back
    errors since the target opened it), so the target may be closed before it runs. ``sync`` runs once."""

    def __init__(self, target: FileTarget) -> None:
        self.target = target
        self.description = target.description
        self.commits = target.commits
        # The directory whose entry for the file this process created is not fsynced yet (None: nothing to do).
        self.directory = os.path.dirname(os.path.abspath(target.path)) if target._new_file else None
        self._wal = os.dup(target._wal)

    def sync(self, *, directory: bool = True) -> None:
        """fsync the WAL and, for a file this process created, its directory: unless ``directory`` is False,
        when the caller fsyncs the directory of several such files once (``fsync_directory``, then
        ``directory_synced``) before it counts their commits durable. Raises TursoUnavailable if it failed: the
        commits it covers are then not known durable, and their events stay in the outbox."""
        try:
            os.fsync(self._wal)
            if directory and self.directory is not None:
                fsync_directory(self.directory)
        except OSError as exc:
            raise TursoUnavailable(f"{self.description}: the fsync that makes its last commits durable failed "
                                   f"({exc}); their events stay in the outbox until one succeeds") from exc
        finally:
            os.close(self._wal)
            self._wal = -1
        if directory:
            self.directory_synced()
        if self.target.commits == self.commits:  # nothing committed since: all of the target's writes are durable
            self.target.unsynced = False

    def directory_synced(self) -> None:
        """The file's directory entry is on disk (fsynced here or by the caller)."""
        self.directory = None
        self.target._new_file = False


def fsync_directory(path: str) -> None:
    """fsync a directory (its entries: files created in it); raises OSError."""
    directory = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _wal_size(path: str) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except OSError:
        return 0


class FileTransaction:
    def __init__(self, target: FileTarget) -> None:
        self.target = target
        if self.target.conn.in_transaction:
            self.target.conn.execute("ROLLBACK")
        self.target.conn.execute("BEGIN")
        self.opened_at = time.monotonic()

    def execute(self, statement: Statement) -> None:
        try:
            # Stepped to its end: pyturso runs a SELECT only when its rows are fetched, and the progress
            # marker's check is a SELECT that fails the transaction (progress.CHECK_MARKER_SQL). Unfetched, a
            # stale worker's batch committed over another worker's marker: the fence did nothing on file:.
            self.target.conn.execute(statement.sql, statement.args).fetchall()
        except self.target._error as exc:
            self.abort()
            raise self.target.failure(exc, statement) from exc

    def commit(self) -> None:
        try:
            self.target.conn.execute("COMMIT")
        except self.target._error as exc:
            self.abort()
            raise self.target.failure(exc, what="COMMIT failed: ") from exc
        if self.target.group_commits:
            # Committed without an fsync (synchronous = NORMAL): durable once the WAL was fsynced, now or, when
            # the caller is deferring, by its PendingSync before it lets Postgres forget the batch's events. A
            # failed fsync raises: the caller keeps the events, and the marker read at the tenant's recovery is
            # trusted only after an fsync succeeded (FileTarget.query).
            self.target._committed()
        self.target.last_hold_seconds = time.monotonic() - self.opened_at

    def abort(self) -> None:
        if self.target.conn.in_transaction:
            self.target.conn.execute("ROLLBACK")
