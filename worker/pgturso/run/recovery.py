"""Recovery from the progress marker (Worker.recover): before a worker delivers again, whatever the target's
marker says Turso committed already is forgotten in Postgres, so that nothing is applied twice; a target that
is behind (another database, an older copy) or a marker from outside this server's history (a promoted
standby, a restore) has its tables copied afresh instead of silently missing changes.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..common.logs import event
from ..common.settings import Settings
from ..delivery.pipeline import InFlight, send_batch
from ..delivery.progress import MARKER_TABLE_EXISTS_SQL, READ_MARKER_SQL
from ..delivery.statements import Statement, create_table_statements
from ..delivery.targets import Target, redact_url
from ..sources.outbox import Outbox, Removed
from ..sources.slot import WalOutbox

log = logging.getLogger("pgturso.worker")


class RecoveringWorker(Protocol):
    """What MarkerRecovery reads and changes of its worker (a Worker, or a pattern's TenantWorker)."""

    settings: Settings
    outbox: Outbox | None
    in_flight: InFlight | None
    source_id: str
    endpoint: tuple[str, str | None]
    last_marker: str
    marker_table_missing: bool
    recovered: bool

    def _open_target(self) -> Target: ...
    def _count_delivered(self, removed: Removed) -> None: ...
    def _marker_statements(self, batch_marker: str) -> list[Statement]: ...


class MarkerRecovery:
    """One recovery of ``worker``'s target: reads its marker, sets the worker's fence (``last_marker``)."""

    def __init__(self, worker: RecoveringWorker) -> None:
        self.worker = worker

    def recover(self) -> None:
        """Forget outbox events that the target's marker says were committed there already."""
        worker = self.worker
        outbox = worker.outbox
        assert outbox is not None
        assert worker.in_flight is None, "recovery while a batch is in flight would race its sender"
        target = worker._open_target()
        # Read-only: a database without the table (a new one) gets it with its first batch (marker_statements).
        worker.marker_table_missing = not target.query(MARKER_TABLE_EXISTS_SQL)[0][0]
        rows = [] if worker.marker_table_missing else target.query(READ_MARKER_SQL, [worker.source_id])
        worker.last_marker = str(rows[0][0]) if rows else ""
        removed = 0
        if rows and not isinstance(outbox, WalOutbox) and not outbox.trusts(worker.last_marker):
            self._start_over(target)
        elif rows or isinstance(outbox, WalOutbox):  # a wal target also checks its slot here
            # First the batch Postgres recorded delivered (its marker), whose events may still be pending: a
            # worker ends between recording a batch read ahead and deleting its events (Worker._settle), and the
            # batch after it, committed on Turso meanwhile, need not cover them (its cut can lie below theirs:
            # transactions that wrote earlier and committed later). Then the target's (that one or the next).
            for marker in self._markers_to_forget():
                forgotten = outbox.forget(marker)
                if forgotten.events or forgotten.transactions:  # (a slot's row changes are no outbox events)
                    # Delivered by a worker that did not live (or keep the target) to count it: counted here.
                    worker._count_delivered(forgotten)
                    event(log, logging.INFO, "recovered", already_applied_events=forgotten.events,
                          rows=forgotten.rows, transactions=forgotten.transactions)
            removed = forgotten.events  # by the target's marker: it is ahead of Postgres's (see below)
        if not isinstance(outbox, WalOutbox) and not removed:
            self._catch_up_a_target_that_is_behind(target)
        worker.recovered = True

    def _markers_to_forget(self) -> list[str]:
        """The markers recovery forgets events by, the target's last: Postgres's own before it when it differs
        (an outbox target's: a batch recorded delivered is on the target, though its events may be pending)."""
        worker = self.worker
        assert worker.outbox is not None
        if isinstance(worker.outbox, WalOutbox):
            return [worker.last_marker]
        known = worker.outbox.delivered_marker()
        return [worker.last_marker] if known is None or known == worker.last_marker else [known, worker.last_marker]

    def _catch_up_a_target_that_is_behind(self, target: Target) -> None:
        """Recopy the target if it is not the database delivered to (pgturso.url changed) or an older copy.

        Postgres records the marker of every batch it removed as delivered. The target's marker is that one,
        or the batch after it (committed on the target, its events still pending: ``forget`` removed them).
        Anything else (no marker, or an older one) means the target lacks changes that left the outbox:
        resending what is pending would skip them silently, so every table is created on the target now (so
        that changes committing meanwhile apply) and queued to be recreated and copied afresh, in order.
        """
        worker = self.worker
        assert worker.outbox is not None
        known = worker.outbox.delivered_marker()
        if known is None or known == worker.last_marker:
            return
        event(log, logging.WARNING, "target_behind", target=worker.settings.target,
              url=redact_url(worker.endpoint[0]),
              reason=("it has no progress marker of this source" if not worker.last_marker
                      else "its progress marker is older than the last batch delivered"),
              action="a different database or an older copy: copying its tables afresh")
        for layout in worker.outbox.latest_layouts():
            for sql in create_table_statements(layout):
                target.execute(sql)
        worker.outbox.recopy_target(worker.last_marker)

    def _start_over(self, target: Target) -> None:
        """The marker names a position outside this server's history: a standby promoted before it replayed
        everything already delivered, a restored backup. Events and transaction ids it names may have been
        handed out again here, so nothing is forgotten by it; Turso may hold changes this server lost, so every
        table of the target is recreated and copied afresh (recopy_target). Then a marker naming no event and
        this server's position replaces it (here and on the target), so that a restart does not do it again."""
        worker = self.worker
        assert worker.outbox is not None
        event(log, logging.WARNING, "source_history_changed", target=worker.settings.target,
              reason="the progress marker on the target names a WAL position this server's history does not "
                     "contain (a standby promoted before it replayed what was delivered, or a restore)",
              action="nothing is forgotten by that marker; copying the target's tables afresh")
        fresh = worker.outbox.marker_of_nothing()
        worker.outbox.recopy_target(fresh)
        send_batch(target, (), worker._marker_statements(fresh))
        worker.last_marker = fresh
