"""What a failed delivery step means (Worker.handle_failure): a retry after a capped backoff (Turso or Postgres
unreachable, Turso busy), one source transaction at a time up to the batch Turso refused and then 'blocked' on
the one it refuses (StatementFailed), or a stop (retries exhausted, a configuration error, a missing right);
each counted, logged and shown in pgturso.status. And the errors that say what to change instead of retrying
silently: a source transaction that cannot fit Turso's write-lock window, a role without pgturso's rights.

The failure state it changes is the worker's (``attempts``, ``isolating_until``, ``recovered``: the delivery
loop and the pattern scheduler read them), except the count of lock timeouts in a row, which is its own.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import psycopg

from ..common.errors import ConfigError, RequestTooLarge, StatementFailed, TursoBusy, TursoUnavailable
from ..common.logs import event
from ..common.metrics import Metrics
from ..common.quoting import quote_literal
from ..common.retry import backoff_delay, retry_delay
from ..common.settings import Settings
from ..delivery.targets import Target
from ..sources.outbox import Batch, Outbox
from ..sources.replication import StreamError
from .exits import EXIT_FATAL, EXIT_RETRIES_EXHAUSTED

log = logging.getLogger("pgturso.worker")

# A source transaction that Turso rolls back this many times in a row for holding its write lock too long
# (TRANSACTION_TIMEOUT) cannot be delivered as things stand: the worker says so and what to change.
LOCK_TIMEOUTS_BEFORE_EXPLAINING = 3


class TransactionTooSlow(TursoUnavailable):
    """One source transaction cannot be applied within Turso's write-lock window while other clients write."""


class FailingWorker(Protocol):
    """What FailureHandler reads and changes of its worker (a Worker, or a pattern's TenantWorker)."""

    settings: Settings
    metrics: Metrics
    conn: psycopg.Connection[Any] | None
    outbox: Outbox | None
    target: Target | None
    attempts: int
    isolating_until: int | None
    recovered: bool
    batch_rows: int
    batch_events: int
    _sending: Batch | None

    def _abandon_in_flight(self, failure: BaseException | None) -> None: ...
    def _record(self, status: str, error: str | None = None, **fields: Any) -> None: ...
    def _update_backlog(self, force: bool, up: bool = True) -> None: ...
    def _disconnect(self) -> None: ...
    def _connection_usable(self) -> bool: ...
    def _set_batch_limits(self, rows: int, events: int) -> None: ...


class FailureHandler:
    """One worker's (or pattern tenant's) answer to its failed delivery steps."""

    def __init__(self, worker: FailingWorker) -> None:
        self.worker = worker
        self.lock_timeouts = 0  # TRANSACTION_TIMEOUTs in a row of single-transaction batches

    def handle(self, exc: Exception, retry_limit: int, once: bool) -> tuple[int | None, float]:
        """What a failed delivery step means: (an exit code to stop with, or None to go on; seconds to wait
        first). Counts the attempt, logs it and shows it in pgturso.status."""
        worker = self.worker
        settings = worker.settings
        if isinstance(exc, (TursoUnavailable, psycopg.OperationalError)):
            worker._abandon_in_flight(exc)
            exc = self.explain_transient(exc)
            worker.attempts += 1
            if retry_limit and worker.attempts > retry_limit:
                event(log, logging.ERROR, "giving_up", target=settings.target, attempts=worker.attempts - 1,
                      error=str(exc).strip())
                worker._record("stopped", error=f"gave up after {worker.attempts - 1} retries: {exc}")
                return EXIT_RETRIES_EXHAUSTED, 0.0
            delay = retry_delay(worker.attempts, settings.retry_base_delay, settings.retry_max_delay,
                                getattr(exc, "retry_after", None))
            worker.metrics.add("pgturso_retries_total")
            worker.metrics.set("pgturso_up", 0)
            event(log, logging.WARNING, "retry", target=settings.target, attempt=worker.attempts,
                  delay_s=round(delay, 2), error=str(exc).strip())
            if isinstance(exc, RequestTooLarge) and worker.outbox is not None and worker.target is not None:
                limit = getattr(worker.target, "max_request_bytes", worker.outbox.max_group_bytes)
                worker.outbox.max_group_bytes = min(worker.outbox.max_group_bytes, max(limit // 2, 32 << 10))
            if isinstance(exc, StreamError):
                # The server reported it on the slot's stream: Postgres is up, so say it where a delivery error
                # is said (pgturso.status, pgturso_errors_total) before reconnecting and recovering (which
                # opens a new stream at Turso's position) as after any other failure of the connection.
                worker.metrics.add("pgturso_errors_total")
                worker.metrics.set("pgturso_replication_streaming", 0)
                if worker._connection_usable():
                    worker._record("retrying", error=str(exc), retry=True)
            if isinstance(exc, psycopg.OperationalError):
                worker._disconnect()
            else:
                worker._record("retrying", error=str(exc), retry=True)
                try:
                    worker._update_backlog(force=False, up=False)
                except psycopg.Error as backlog_exc:  # the retry's own error is the one that matters
                    event(log, logging.WARNING, "backlog_not_read", error=str(backlog_exc).strip())
            worker.recovered = False
            return None, delay
        if isinstance(exc, StatementFailed):
            worker._abandon_in_flight(exc)
            if worker.isolating_until is None:
                # Deliver one source transaction at a time up to the failure, to find the one Turso
                # refuses and apply everything before it.
                worker.isolating_until = self.failed_batch_end()
                if worker.isolating_until is not None:
                    event(log, logging.WARNING, "isolating", target=settings.target, error=str(exc))
                    return None, 0.0
            txid = exc.txids[0] if len(exc.txids) == 1 else None
            worker.metrics.add("pgturso_errors_total")
            event(log, logging.ERROR, "blocked", target=settings.target, table=exc.table or "-",
                  txid=txid or "-", error=str(exc))
            worker._record("blocked", error=str(exc), table=exc.table or None, txid=txid)
            if once:
                return EXIT_FATAL, 0.0
            worker.attempts += 1
            return None, backoff_delay(worker.attempts, settings.retry_base_delay, settings.retry_max_delay)
        worker._abandon_in_flight(exc)  # a request Turso rejects, a configuration error, a missing right: no retry
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            exc = self.explain_missing_right(exc)
        worker.metrics.add("pgturso_errors_total")
        event(log, logging.ERROR, "stopped", target=settings.target, error=str(exc))
        worker._record("stopped", error=str(exc))
        return EXIT_FATAL, 0.0

    def explain_transient(self, exc: Exception) -> Exception:
        """After Turso rolled a batch back for holding its write lock too long: send smaller batches; a single
        source transaction that keeps failing so gets an error that says what to change (not a silent loop)."""
        worker = self.worker
        if not (isinstance(exc, TursoBusy) and exc.code == "TRANSACTION_TIMEOUT") or worker._sending is None:
            return exc
        batch = worker._sending
        if batch.transactions > 1:
            rows = max(min(worker.batch_rows, batch.rows) // 2, 1)
            worker._set_batch_limits(rows, max(min(worker.batch_events, batch.event_count) // 2, 1))
            event(log, logging.WARNING, "batch_shrunk", reason="TRANSACTION_TIMEOUT", batch_rows=rows)
            return exc
        self.lock_timeouts += 1
        if self.lock_timeouts < LOCK_TIMEOUTS_BEFORE_EXPLAINING:
            return exc
        held = f"{exc.held_seconds:.1f} s" if exc.held_seconds is not None else "too long"
        request_bytes = getattr(worker.target, "max_request_bytes", worker.settings.max_request_bytes)
        return TransactionTooSlow(
            f"a source transaction of {batch.rows} rows cannot be applied on Turso within its write-lock window: "
            f"Turso rolled it back {self.lock_timeouts} times in a row (TRANSACTION_TIMEOUT) after it held the "
            f"transaction open {held} while another client wrote to the database. Let it travel in fewer, larger "
            f"requests (raise pgturso.max_request_bytes, now {request_bytes}) or keep other writers off that "
            "database until it is delivered; the worker keeps retrying")

    def explain_missing_right(self, exc: psycopg.errors.InsufficientPrivilege) -> ConfigError:
        """A role without pgturso's rights is a setup mistake that retrying cannot mend: say which role and the fix."""
        conn = self.worker.conn
        role = conn.info.user if conn is not None and not conn.closed else "the worker's role"
        first_line = str(exc).strip().splitlines()[0]
        return ConfigError(f"{first_line} (the worker runs as {role}, which lacks the rights delivery needs); "
                           f"a superuser gives them with: SELECT pgturso.grant_worker({quote_literal(role)})")

    def failed_batch_end(self) -> int | None:
        """The last outbox id of the batch that just failed (it is still pending: nothing was removed)."""
        conn, outbox = self.worker.conn, self.worker.outbox
        assert conn is not None and outbox is not None
        with conn.transaction():  # a slot's batch learns where it ends by reading it, in the transaction
            batch = outbox.choose_batch()
            return batch.upto if batch is not None else None
