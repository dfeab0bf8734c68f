"""How an idle worker waits for changes (Worker.run, when nothing is pending): a trigger target's worker sleeps
on a LISTEN connection holding its tables' wake locks, so that the capture triggers NOTIFY it (and looks again
shortly, backing off, while a writer holds a lock); a wal target's worker is woken by its replication stream,
or looks at the WAL's end when it peeks. A pattern worker's scheduler waits on NOTIFY too (``notified``).
"""

from __future__ import annotations

import logging
import select
import time
from typing import Any, Protocol

import psycopg

from ..common.logs import event
from ..common.postgres import connect
from ..common.settings import Settings
from ..sources.outbox import Outbox
from ..sources.slot import WalOutbox

log = logging.getLogger("pgturso.worker")

NOTIFY_CHANNEL = "pgturso"
# A wal target's worker has no trigger to wake it: it looks at the WAL's end this often while idle.
WAL_POLL_SECONDS = 0.02
# While a table's wake lock stays busy (a writer that found the worker awake is still open), the worker cannot
# sleep and looks at the outbox instead, every BUSY_LOOK_FIRST seconds. After BUSY_LOOKS_BEFORE_BACKOFF looks in
# a row found nothing (a long idle-in-transaction writer, not a busy moment), twice as long each time, up to
# BUSY_LOOK_MAX; anything delivered, or another set of busy locks, starts over.
BUSY_LOOK_FIRST = 0.01
BUSY_LOOKS_BEFORE_BACKOFF = 10
BUSY_LOOK_MAX = 0.1


def notified(conn: psycopg.Connection[Any], timeout: float) -> bool:
    """Whether a NOTIFY arrived on the idle LISTEN connection within ``timeout`` seconds. Written against
    libpq directly: Debian 12's python3-psycopg (3.1), which the background worker runs with, has no
    ``notifies(timeout=…)``."""
    ready, _, _ = select.select([conn.fileno()], [], [], timeout)
    if not ready:
        return False
    conn.pgconn.consume_input()  # raises OperationalError if the connection is gone
    arrived = False
    while conn.pgconn.notifies() is not None:
        arrived = True
    return arrived


def busy_look_wait(empty_looks: int) -> float:
    """How long to wait before the next look at the outbox while a wake lock is busy, after ``empty_looks`` looks
    in a row that found nothing."""
    backoff = max(empty_looks - BUSY_LOOKS_BEFORE_BACKOFF + 1, 0)
    return min(BUSY_LOOK_FIRST * 2 ** min(backoff, 16), BUSY_LOOK_MAX)


class WaitingWorker(Protocol):
    """What ChangeWaiter reads and changes of its worker."""

    dsn: str
    settings: Settings
    conn: psycopg.Connection[Any] | None
    listen_conn: psycopg.Connection[Any] | None
    outbox: Outbox | None
    capture: str
    stopping: bool
    reload_requested: bool

    def _capture_mode(self, conn: psycopg.Connection[Any]) -> str: ...
    def _disconnect(self) -> None: ...


class ChangeWaiter:
    """One worker's waits for changes; the worker's LISTEN connection (``listen_conn``) is the worker's, closed
    with its others."""

    def __init__(self, worker: WaitingWorker) -> None:
        self.worker = worker
        self.busy_looks = 0  # looks in a row that found a wake lock busy and nothing to deliver
        self.busy_held: list[int] | None = None  # the wake locks taken then (the others were busy)

    def wait(self) -> None:
        worker = self.worker
        if worker.listen_conn is None or worker.listen_conn.closed:
            worker.listen_conn = connect(worker.dsn, autocommit=True, application_name="pgturso-worker-listen")
            worker.listen_conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            return  # changes may have arrived before LISTEN: look once more before sleeping
        outbox, listen_conn = worker.outbox, worker.listen_conn
        assert outbox is not None and worker.conn is not None
        if worker._capture_mode(worker.conn) != worker.capture:  # the target's first table chose the other mode
            event(log, logging.INFO, "capture_mode", capture=worker._capture_mode(worker.conn))
            worker._disconnect()
            return
        if isinstance(outbox, WalOutbox):
            self._wait_for_wal(outbox, listen_conn)
            return
        # Sleep holding the wake locks, so that capture notifies us (see capture.WAKE_LOCK_CLASS). A writer
        # that saw us awake holds its lock until it commits: until then, look again shortly instead.
        held, all_taken = outbox.take_wake_locks()
        try:
            if not all_taken:
                # Back off while the same locks stay busy and the looks find nothing (a long idle-in-transaction
                # writer, a prepared transaction): its commit, or one by another session that found the worker
                # awake, waits at most BUSY_LOOK_MAX. A write to a table whose lock this holds sends a NOTIFY.
                if held != self.busy_held:
                    self.busy_looks, self.busy_held = 0, held
                notified(listen_conn, busy_look_wait(self.busy_looks))
                self.busy_looks += 1
                return
            self.busy_held = None
            if outbox.any_pending():  # committed before we held the locks, without a NOTIFY
                return
            deadline = time.monotonic() + worker.settings.idle_wait
            while not (worker.stopping or worker.reload_requested) and time.monotonic() < deadline:
                if notified(listen_conn, min(1.0, worker.settings.idle_wait)):
                    return
        finally:
            outbox.release_wake_locks(held)

    def _wait_for_wal(self, source: WalOutbox, listen_conn: psycopg.Connection[Any]) -> None:
        """Sleep until the slot has a change for us (or a NOTIFY, or idle_wait): the stream wakes us itself; a
        peeking worker looks at the WAL's end every WAL_POLL_SECONDS."""
        worker = self.worker
        deadline = time.monotonic() + worker.settings.idle_wait
        while source.dsn is not None and not source.slot_missing and not (worker.stopping or worker.reload_requested):
            # The replication stream: woken by the next decoded transaction itself, or a NOTIFY.
            left = deadline - time.monotonic()
            if left <= 0 or source.wait_for_data(min(left, 1.0), listen_conn.fileno()):
                return
            if notified(listen_conn, 0):
                return
        while not (worker.stopping or worker.reload_requested) and time.monotonic() < deadline:
            if source.wal_position() > source.seen_upto:
                return
            if notified(listen_conn, WAL_POLL_SECONDS):
                return
