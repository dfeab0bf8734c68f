"""Where changes go: a Turso server over HTTP (Hrana) or a local Turso database file (pyturso).

Both offer the same two operations: ``query`` (one read, autocommit) and ``begin`` (a transaction that takes
statements and commits them atomically, raising if anything failed). A transaction may be larger than one
HTTP request; it is then sent in several requests on the same stream.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests

from . import hrana
from .errors import (
    ConfigError,
    RequestTooLarge,
    StatementFailed,
    TursoAuthError,
    TursoRequestRejected,
    TursoUnavailable,
)
from .logs import event
from .statements import Statement

log = logging.getLogger("pgturso.target")


class Transaction(Protocol):
    def execute(self, statement: Statement) -> None: ...

    def commit(self) -> None: ...


class Target(Protocol):
    description: str

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


def open_target(url: str, auth_token: str | None, *, max_request_bytes: int, timeout: float,
                tls_ca_file: str | None = None) -> Target:
    """A target for ``url``: http(s)://, libsql:// (same as https://) or file:PATH.

    TLS certificates are always verified, against the system CAs or ``tls_ca_file``.
    """
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return FileTarget(url[len("file:") :])
    if scheme in ("http", "https", "libsql"):
        if scheme == "libsql":
            url = "https://" + url[len("libsql://") :]
        return HttpTarget(url, auth_token, max_request_bytes=max_request_bytes, timeout=timeout,
                          tls_ca_file=tls_ca_file)
    raise ConfigError(
        f"pgturso.url {redact_url(url)!r} is not a Turso URL; use http://, https://, libsql:// or file:PATH"
    )


class HttpTarget:
    """A Turso server speaking Hrana over HTTP (Turso Cloud, sqld, or ``tursodb --sync-server``)."""

    def __init__(self, url: str, auth_token: str | None, *, max_request_bytes: int, timeout: float,
                 tls_ca_file: str | None = None) -> None:
        self.base_url = url.rstrip("/")
        self.description = redact_url(self.base_url)
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        # Passed on every request: a session-level setting would lose to REQUESTS_CA_BUNDLE in the environment.
        self.verify: str | bool = tls_ca_file or True
        if auth_token:
            self.session.headers["Authorization"] = f"Bearer {auth_token}"
        # Turso Cloud wants streams closed; tursodb rejects the close request. Learnt on first use.
        self.sends_close = True

    def pipeline(self, requests_: list[dict[str, Any]], baton: str | None = None, *, last: bool = True
                 ) -> dict[str, Any]:
        """POST one pipeline; returns the decoded answer. Raises the errors of errors.py."""
        body: dict[str, Any] = {"baton": baton, "requests": list(requests_)}
        if last and self.sends_close:
            body["requests"].append(hrana.CLOSE_REQUEST)
        try:
            response = self.session.post(f"{self.base_url}/v2/pipeline", data=json.dumps(body), timeout=self.timeout,
                                         verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise TursoUnavailable(
                f"TLS with Turso at {self.description} failed: {exc}. If the server uses a private CA, "
                "name its certificate with --tls-ca-file or PGTURSO_TLS_CA_FILE."
            ) from exc
        except requests.RequestException as exc:
            raise TursoUnavailable(f"cannot reach Turso at {self.description}: {type(exc).__name__}: {exc}") from exc
        text = response.text
        if response.status_code != 200 and last and self.sends_close and "close" in text and "variant" in text:
            # The server could not parse the request, so nothing in it ran: resend without close.
            event(log, logging.INFO, "close_unsupported", target=self.description)
            self.sends_close = False
            return self.pipeline(requests_, baton, last=last)
        if response.status_code in (401, 403):
            raise TursoAuthError(
                response.status_code,
                f"Turso at {self.description} refused the token (HTTP {response.status_code}): {text[:200]}. "
                "Set a valid token with --auth-token, PGTURSO_AUTH_TOKEN or pgturso.auth_token_file.",
            )
        if response.status_code == 413:
            # Nothing of a refused request ran: send the same changes again in smaller pieces.
            self.max_request_bytes = max(self.max_request_bytes // 2, 64 << 10)
            raise RequestTooLarge(
                f"Turso at {self.description} refused a request as too large (HTTP 413); "
                f"retrying with requests of at most {self.max_request_bytes} bytes"
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise TursoUnavailable(f"Turso at {self.description} answered HTTP {response.status_code}: {text[:200]}")
        if response.status_code != 200:
            raise TursoRequestRejected(
                response.status_code,
                f"Turso at {self.description} rejected the request (HTTP {response.status_code}): {text[:200]}",
            )
        try:
            answer = response.json()
            results = answer["results"]
            if len(results) < len(requests_):
                raise ValueError("too few results")
        except (ValueError, KeyError, TypeError) as exc:
            raise TursoUnavailable(
                f"Turso at {self.description} answered with something that is not a Hrana response: {text[:200]!r}"
            ) from exc
        if answer.get("base_url"):
            self.base_url = str(answer["base_url"]).rstrip("/")
        return answer

    def query(self, sql: str, args: Sequence[hrana.Value] = ()) -> list[list[hrana.Value]]:
        answer = self.pipeline([hrana.execute_request(sql, args)])
        try:
            return hrana.rows_of(answer["results"][0])
        except ValueError as exc:
            raise StatementFailed(str(exc)) from exc

    def execute(self, sql: str) -> None:
        self.query(sql)

    def begin(self) -> HttpTransaction:
        return HttpTransaction(self)

    def close(self) -> None:
        self.session.close()


class HttpTransaction:
    """Statements buffered into batch requests; flushed when a request would grow past the size limit."""

    def __init__(self, target: HttpTarget) -> None:
        self.target = target
        self.plan = hrana.BatchPlan.new(begin=True)
        self.statements: list[Statement] = []
        self.size = 0
        self.baton: str | None = None
        self.sent_any = False

    def execute(self, statement: Statement) -> None:
        size = statement.size + 64
        if self.statements and self.size + size > self.target.max_request_bytes:
            self._send(commit=False)
        self.plan.add(statement.sql, statement.args)
        self.statements.append(statement)
        self.size += size

    def commit(self) -> None:
        self.plan.commit()
        self._send(commit=True)

    def _send(self, commit: bool) -> None:
        answer = self.target.pipeline([self.plan.request()], self.baton, last=commit)
        try:
            outcome = hrana.read_batch_result(self.plan, answer["results"][0])
        except (ValueError, KeyError, TypeError) as exc:
            raise TursoUnavailable(f"Turso at {self.target.description} sent a malformed batch result: {exc}") from exc
        if outcome.error is not None:
            failed = self.statements[outcome.failed_caller_index] if outcome.failed_caller_index is not None else None
            if failed is None:
                raise StatementFailed(outcome.error)
            raise StatementFailed(outcome.error, failed.table, failed.operation, failed.txids)
        self.baton = answer.get("baton")
        self.sent_any = True
        self.plan = hrana.BatchPlan.new(begin=False)
        self.statements = []
        self.size = 0


class FileTarget:
    """A local Turso database file, written in-process through pyturso: the embedded default."""

    def __init__(self, path: str) -> None:
        try:
            import turso  # imported here: only file: targets need pyturso
        except ImportError:
            raise ConfigError(
                f"file:{path} needs pyturso, which this Python ({sys.executable}) lacks: pip install pyturso"
            ) from None

        if not path:
            raise ConfigError("a file: target needs a path, e.g. file:/var/lib/pgturso/replica.db")
        self.description = f"file:{path}"
        self._error = turso.Error
        self.conn = turso.connect(path, isolation_level=None)

    def query(self, sql: str, args: Sequence[hrana.Value] = ()) -> list[list[hrana.Value]]:
        try:
            return [list(row) for row in self.conn.execute(sql, tuple(args)).fetchall()]
        except self._error as exc:
            raise StatementFailed(str(exc)) from exc

    def execute(self, sql: str) -> None:
        self.query(sql)

    def begin(self) -> FileTransaction:
        return FileTransaction(self)

    def close(self) -> None:
        self.conn.close()


class FileTransaction:
    def __init__(self, target: FileTarget) -> None:
        self.target = target
        if self.target.conn.in_transaction:
            self.target.conn.execute("ROLLBACK")
        self.target.conn.execute("BEGIN")

    def execute(self, statement: Statement) -> None:
        try:
            self.target.conn.execute(statement.sql, statement.args)
        except self.target._error as exc:
            self.target.conn.execute("ROLLBACK")
            raise StatementFailed(str(exc), statement.table, statement.operation, statement.txids) from exc

    def commit(self) -> None:
        try:
            self.target.conn.execute("COMMIT")
        except self.target._error as exc:
            self.target.conn.execute("ROLLBACK")
            raise StatementFailed(f"COMMIT failed: {exc}") from exc
