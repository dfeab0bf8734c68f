"""The exceptions pgturso raises. Each message names what failed and how to fix it."""

from __future__ import annotations


class PgTursoError(Exception):
    """Base class of pgturso's errors."""


class ConfigError(PgTursoError):
    """A setting is missing or has a bad value; raised at start-up."""


class TursoUnavailable(PgTursoError):
    """Turso could not be reached, or answered something that can succeed later (see hrana.ANSWERS): the worker
    recovers from the progress marker and sends the whole batch again. ``retry_after``: seconds the server asked
    the worker to wait (HTTP Retry-After), if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamLost(TursoUnavailable):
    """The stream a transaction was using is gone (server restarted, request reached another instance, stream
    expired, or the server ended it mid-transaction): nothing of the open transaction was committed."""


class TursoBusy(TursoUnavailable):
    """A step failed with a code that means "later" (the write lock was taken away, the server is busy or
    blocked for now): nothing of the batch was committed. ``code`` is Turso's error code."""

    def __init__(self, message: str, code: str, held_seconds: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.held_seconds = held_seconds  # how long this transaction had been open on Turso when it failed


class RequestTooLarge(TursoUnavailable):
    """Turso answered 413: the worker retries with smaller requests and statements."""


class MarkerMoved(TursoUnavailable):
    """The progress marker on Turso is not the one this worker last saw: another worker delivered to the
    target since (or an abandoned batch of this one committed late). Nothing of this batch was applied; the
    worker recovers from the marker and carries on."""


class BatchChanged(TursoUnavailable):
    """A batch read in parts lost events between its choice and its last part (untrack_table or skip_transaction
    deleted them; the worker holds no lock on them while Turso has a part): what was sent would cut
    a source transaction in two, so its Turso transaction is rolled back, nothing of it applied, and the worker
    chooses the batch again from what is pending now."""


class TursoRequestRejected(PgTursoError):
    """Turso refused the request itself (4xx other than 429): retrying the same request cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TursoAuthError(TursoRequestRejected):
    """Turso answered 401 (the token is missing, wrong or expired) or 403 (access to the database is blocked)."""


class StatementFailed(PgTursoError):
    """Turso rejected a statement of a batch; nothing of the batch was committed."""

    def __init__(self, message: str, table: str = "", operation: str = "", txids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.table = table
        self.operation = operation
        self.txids = txids

    def __str__(self) -> str:
        where = f"table {self.table}, {self.operation}" if self.table else "pgturso bookkeeping"
        txns = f", source transaction(s) {', '.join(map(str, self.txids[:5]))}" if self.txids else ""
        return (
            f"Turso rejected a change ({where}{txns}): {self.args[0]}. Nothing after it was applied; "
            "fix the cause on Turso (or the table) and the worker resumes from this change."
        )


class CopyDeferred(PgTursoError):
    """A copy chunk stepped back from a lock an application transaction holds (it is tried again later): a
    chunk that waited would close a deadlock with that transaction as soon as it writes a row the chunk locked
    or runs DDL on the table, and Postgres could end the application's transaction instead of the chunk."""


class RetriesExhausted(PgTursoError):
    """An outage (Turso or Postgres unreachable) outlasted the retry limit (--retry-limit, or --once's 3)."""
