"""Sending batch N to Turso on a background thread while Postgres prepares batch N+1.

Reading a batch out of Postgres and waiting for Turso to commit one take about as long as each other, so
doing them one after the other wastes half of the time. The worker overlaps them, keeping every guarantee,
and never keeps a Postgres transaction open while Turso has a request (a snapshot held that long would make
CREATE INDEX CONCURRENTLY of any table wait for Turso, and vacuum keep dead rows):

- One batch at most is in flight. Batch N+1 is read in a Postgres transaction that reads past batch N's events,
  still pending (Outbox.read_past): above N's cut when every pending event at or below it is N's (one statement
  by transaction id), else (a transaction below the cut committed since N was chosen, or N held one straddling
  its cut) after deleting N's events by N's name in that transaction; either way the batch a deletion of N would
  leave. The transaction is rolled back once N+1's statements are in memory: N's events stay pending. Once Turso
  confirmed batch N, one short statement records N as delivered (its marker); if Turso refused it, nothing was
  recorded.
- Batch N+1 is sent only after that record (and a count showing that none of N+1's events were deleted since
  it was read: skip_transaction, untrack_table): batches reach Turso in the order they were chosen, and at most
  one batch is ever committed on Turso but not recorded in Postgres, which is exactly what the progress marker
  covers after a crash. N's events are deleted (and counted) while N+1 travels; a crash before that deletion
  leaves them to recovery, which forgets them by the marker Postgres recorded (N+1's name need not cover them:
  its cut can lie below them), then by the one on Turso.
- Only a batch that fits in one request is read ahead into memory; a larger one (a huge source transaction)
  is streamed after the batch in flight is settled, read in parts by its name between the requests that carry
  them, so memory stays bounded and no transaction spans a request. A slot's batch read from the replication
  stream is sent on from where reading ahead stopped (what was read, then the rest of the stream): read again,
  it would cost closing the stream and a new walsender decoding from the confirmed position, each batch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

from ..common.errors import MarkerMoved, StatementFailed
from ..common.logs import event
from ..sources.outbox import Batch
from .progress import CHECK_MARKER_OPERATION
from .statements import Statement
from .targets import Target

log = logging.getLogger("pgturso.pipeline")


def send_batch(target: Target, statements: Iterable[Statement], marker: Iterable[Statement]) -> int:
    """Apply ``statements`` and the progress marker (``progress.marker_statements``) in one Turso transaction;
    returns the statements sent."""
    transaction = target.begin()
    sent = 0
    try:
        try:
            for statement in statements:
                transaction.execute(statement)
                sent += 1
            for statement in marker:
                transaction.execute(statement)
            transaction.commit()
        except BaseException:
            # Don't leave a half-sent transaction holding Turso's write lock until its stream expires.
            transaction.abort()
            # A generator of statements reads a server-side cursor of the caller's transaction: close it now,
            # not whenever the collector gets to it (by then a retry may have opened a cursor of the same name).
            close = getattr(statements, "close", None)
            if close is not None:
                close()
            raise
    except StatementFailed as exc:
        if exc.operation == CHECK_MARKER_OPERATION:
            raise MarkerMoved(
                f"the progress marker on {target.description} is not the one this worker last saw: another worker "
                "delivered to this target meanwhile; nothing of this batch was applied, recovering from the marker"
            ) from exc
        raise
    return sent


@dataclass
class PreparedBatch:
    """A batch read ahead: its statements in memory, or ``statements is None`` when it was too large to."""

    batch: Batch
    statements: list[Statement] | None
    # A batch too large to hold that can be sent on from where reading stopped (a replication stream's: read
    # again, it would cost a new walsender decoding from the slot's confirmed position): the statements read
    # so far, then the rest of them.
    resume: Iterable[Statement] | None = None


def prepare(batch: Batch, build: Generator[Statement, None, None], max_bytes: int,
            resumable: bool = False) -> PreparedBatch:
    """Read the batch's statements into memory unless they add up to more than ``max_bytes``; then, if
    ``resumable`` (its reading needs no transaction of the caller's), keep what was read and the rest to come."""
    statements: list[Statement] = []
    size = 0
    keep_open = False
    try:
        for statement in build:
            statements.append(statement)
            size += statement.size
            if size > max_bytes:
                keep_open = resumable
                return PreparedBatch(batch, None, chain(statements, build) if resumable else None)
    finally:
        if not keep_open:
            build.close()  # closes the batch's server-side cursor while its (short) transaction is still open
    return PreparedBatch(batch, statements)


@dataclass
class InFlight:
    """A batch being sent by the sender thread."""

    batch: Batch
    started: float
    future: Future[int] = field(repr=False)
    # When each step of the batch happened (time.monotonic(): CLOCK_MONOTONIC, comparable between processes of
    # one host), for the debug event "batch_timing": read (the read of the batch began), read_done, settled (read
    # ahead only: the batch before answered and recorded), positioned (its marker's source position taken), sent
    # (handed to the sender), answered (Turso answered the commit).
    timing: dict[str, float] = field(default_factory=dict, repr=False)

    def wait(self) -> int:
        """The number of statements sent, once Turso committed; raises what the send raised."""
        return self.future.result()

    def settle(self, failure: BaseException | None = None) -> None:
        """Wait for the send to end, whatever its outcome, when the worker abandons the batch because of
        ``failure``: what it did on Turso is read from the progress marker when the worker recovers."""
        try:
            self.future.result()
        except Exception as exc:
            if exc is not failure:  # the caller reports its own failure; this one would go unseen
                event(log, logging.WARNING, "abandoned_batch", error=str(exc).strip())


class Sender:
    """The one background thread that talks to Turso while a batch is in flight."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, target: Target, prepared: PreparedBatch, marker: list[Statement],
               timing: dict[str, float] | None = None) -> InFlight:
        """Send the batch on the sender thread; ``timing``: when its earlier steps happened (InFlight.timing)."""
        assert prepared.statements is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgturso-send")
        sent = time.monotonic()
        steps = {**(timing or {}), "sent": sent}
        statements = prepared.statements

        def send() -> int:
            count = send_batch(target, statements, marker)
            steps["answered"] = time.monotonic()  # before the future completes: wait() returns after it
            return count

        return InFlight(prepared.batch, sent, self._executor.submit(send), steps)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
