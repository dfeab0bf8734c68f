"""The exceptions pgturso raises. Each message names what failed and how to fix it."""

from __future__ import annotations


class PgTursoError(Exception):
    """Base class of pgturso's errors."""


class ConfigError(PgTursoError):
    """A setting is missing or has a bad value; raised at start-up."""


class TursoUnavailable(PgTursoError):
    """Turso could not be reached or answered 429/5xx or garbage: worth retrying later."""


class RequestTooLarge(TursoUnavailable):
    """Turso answered 413: the worker retries with smaller requests and statements."""


class MarkerMoved(TursoUnavailable):
    """The progress marker on Turso is not the one this worker last saw: another worker delivered to the
    target since (or an abandoned batch of this one committed late). Nothing of this batch was applied; the
    worker recovers from the marker and carries on."""


class TursoRequestRejected(PgTursoError):
    """Turso refused the request itself (4xx other than 429): retrying the same request cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TursoAuthError(TursoRequestRejected):
    """Turso answered 401/403: the token is missing, wrong or expired."""


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
