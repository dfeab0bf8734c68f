"""The delivery loop: recover, copy a chunk of a pending initial copy, read a batch, send it in one Turso
transaction, mark it delivered, and sleep until a capture trigger wakes it.

Only one worker delivers per target: it holds a session advisory lock; a second one waits as a hot standby
and takes over when the first one's connection goes away.

``Worker`` delegates three pieces, each a class of its own module that works on the worker's state:
recovery from the progress marker (recovery.py, MarkerRecovery), what a failed step means (failures.py,
FailureHandler: retries, backoff, isolating a refused transaction, blocked, stopping) and the idle wait for
changes (waiting.py, ChangeWaiter). A pattern's tenants (fanout.py, TenantWorker) share them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

import psycopg

from ..capture.sql import SESSION_SETTINGS
from ..common.errors import (
    ConfigError,
    CopyDeferred,
    PgTursoError,
    StatementFailed,
    TursoRequestRejected,
    TursoUnavailable,
)
from ..common.logs import Progress, event
from ..common.logs import setup as setup_logs
from ..common.metrics import Metrics
from ..common.postgres import connect
from ..common.settings import DEFAULT_URL, Settings
from ..delivery.pipeline import InFlight, PreparedBatch, Sender, prepare, send_batch
from ..delivery.progress import marker_statements
from ..delivery.statements import Statement, StatementBuilder
from ..delivery.targets import Target, open_target, redact_url
from ..sources.outbox import Batch, Outbox, Removed
from ..sources.slot import WalBatch, WalOutbox, slot_bytes
from .exits import EXIT_FATAL as EXIT_FATAL  # (handed on: fanout.py, cli.py import the codes from here)
from .exits import EXIT_LOCKED, EXIT_OK
from .exits import EXIT_RETRIES_EXHAUSTED as EXIT_RETRIES_EXHAUSTED
from .failures import FailureHandler
from .recovery import MarkerRecovery
from .waiting import NOTIFY_CHANNEL as NOTIFY_CHANNEL  # (handed on: fanout.py imports them from here)
from .waiting import ChangeWaiter
from .waiting import notified as notified

log = logging.getLogger("pgturso.worker")

# pg_advisory_lock(int4, int4) key: "pgtr" and the target's name hashed by Postgres: one lock per target.
DELIVERY_LOCK_CLASS = int.from_bytes(b"pgtr", "big")
TARGET_ROW = "SELECT url, auth_token, pattern, tenant FROM pgturso.target WHERE name = %s"
# A tenant's URL and token: its own (an add_target of the tenant's name overrides the pattern's), else the
# pattern's with %s replaced by the tenant value. For one tenant (target_endpoint, WHERE t.name) or for every
# tenant of a pattern at once (the pattern worker's scan, WHERE t.pattern), so that a pattern worker's first
# visit of each of a thousand tenants does not ask for it.
TENANT_ENDPOINTS = """
    SELECT t.name, t.tenant, coalesce(nullif(t.url, ''), replace(p.url, '%%s', t.tenant)),
           coalesce(nullif(t.auth_token, ''), p.auth_token)
    FROM pgturso.target t JOIN pgturso.target p ON p.name = t.pattern
"""
CAPTURE_OF_TARGET = "SELECT capture FROM pgturso.target WHERE name = %s"

# The worker vacuums the outbox itself, at most this often and after this many rows delivered.
VACUUM_EVERY_SECONDS, VACUUM_AFTER_ROWS = 5.0, 10_000
# With no initial copy pending, the worker looks for a new one at most this often (track_table starts one).
COPY_CHECK_SECONDS = 0.5

def deliverer_identity() -> str:
    """Who delivers, as pgturso.status shows it: a background worker of the server, or a separate process."""
    host, pid = socket.gethostname(), os.getpid()
    background = os.environ.get("PGTURSO_BACKGROUND_WORKER")
    if background:
        return f"background worker {background} on {host} (Python pid {pid})"
    return f"pgturso-worker on {host} (pid {pid})"


def target_endpoint(conn: psycopg.Connection[Any], settings: Settings) -> tuple[str, str | None]:
    """URL and token of the configured target: flags and environment first, then pgturso.url (the default
    target only), then the target's row in pgturso.target (which only the extension owner can read)."""
    name = settings.target
    with conn.transaction():
        row = conn.execute(TARGET_ROW, (name,)).fetchone()
    if row is None:
        raise ConfigError(f"there is no target named {name!r}; create it with "
                          f"SELECT pgturso.add_target('{name}', 'libsql://…', 'token')")
    row_url, row_token, pattern, _ = row
    if pattern is not None:  # a tenant of a pattern target: its own URL/token (an override), or the pattern's
        with conn.transaction():
            _, _, url, token = conn.execute(TENANT_ENDPOINTS + " WHERE t.name = %s", (name,)).fetchone()  # type: ignore[misc]
        return str(url), token
    source = settings.sources.get("url", "default")
    url = settings.url if source in ("flag", "environment") else None
    if url is None and name == "default" and source == "postgresql.conf":
        url = settings.url
        if "authtoken=" in url.lower():  # every role can SHOW pgturso.url: a token there is not a secret
            raise ConfigError("pgturso.url carries a token (authToken=), which every role can read with SHOW; "
                              "remove it and put the token in pgturso.auth_token_file (or PGTURSO_AUTH_TOKEN)")
    url = url or row_url or (DEFAULT_URL if name == "default" else None)
    if url is None:
        raise ConfigError(f"target {name!r} has no URL: pass --url or set it with pgturso.add_target")
    return url, settings.token() or row_token


def delivery_connection(dsn: str, application_name: str = "pgturso-worker") -> psycopg.Connection[Any]:
    """A connection set up to read batches: a worker's own, or one of a pattern worker's pool (fanout.py)."""
    # No server-side prepared statements: the batch queries need plans for their actual bounds (a
    # generic plan scans the whole outbox); no JIT: these are small, frequent queries.
    conn = connect(dsn, autocommit=True, application_name=application_name, prepare_threshold=None)
    conn.execute("SET jit = off")
    conn.execute("SET work_mem = '64MB'")  # a batch's events are grouped in one sort; keep it in memory
    # Every name the worker uses is qualified or built in: no function or operator from a schema that other
    # roles may create in (public, "$user") can stand in for a built-in one; and string constants mean what
    # they say whatever the database's standard_conforming_strings default is (docs/security.md).
    for setting in SESSION_SETTINGS:
        conn.execute(setting)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    return conn


class Worker:
    def __init__(self, dsn: str, settings: Settings, pattern: str | None = None, tenant: str | None = None) -> None:
        self.dsn = dsn
        self.settings = settings
        # A tenant of a pattern target (fanout.py): settings.target is the tenant's own target name.
        self.pattern = pattern
        self.tenant = tenant
        self.stopping = False
        self.conn: psycopg.Connection[Any] | None = None
        self.listen_conn: psycopg.Connection[Any] | None = None
        self.outbox: Outbox | None = None
        self.target: Target | None = None
        self.endpoint: tuple[str, str | None] = ("", None)
        self.source_id = ""
        self.recovered = False
        # While set, deliver one source transaction per batch, up to this outbox id (after a refused batch).
        self.isolating_until: int | None = None
        # Read the next batch while the previous one is in flight (off inside Postgres: no threads there).
        self.read_ahead = True
        # A file: target's commits made durable by an fsync its caller may defer and group (FileTarget); a
        # pattern's tenants set it.
        self.group_commits = False
        self.sender = Sender()
        self.in_flight: InFlight | None = None
        # A batch Turso confirmed and Postgres recorded as delivered (its marker), its events still to be removed
        # while the next batch travels (_settle), with the statements it took.
        self.unremoved: tuple[InFlight, int, float] | None = None
        self.locked_conn: psycopg.Connection[Any] | None = None
        self.last_marker = ""  # the progress marker last read from or written to the target (its fence)
        self.marker_table_missing = False  # the target had no marker table at recovery: the next batch creates it
        self._copy_checked = 0.0
        self._copying = False  # an initial copy is in progress: more batches are coming
        self._copy_deferred = False  # the last chunk stepped back from an application's lock (logged once)
        # Off for pgturso.sync() inside a transaction that holds a table being copied: a chunk would wait for
        # the caller's locks while the caller waits for the pass (in_database.py).
        self.copy_enabled = True
        self.identity = deliverer_identity()
        # pg_reload_conf() reaches a background worker's Python process as SIGHUP: read the settings again.
        self.reload_settings: Callable[[], Settings] | None = None
        self.reload_requested = False
        self.metrics = Metrics()
        self.events_delivered = 0
        self._copy_bars: dict[str, Progress] = {}
        self._rows_since_vacuum = 0
        self._vacuumed_at = time.monotonic()
        self._backlog_checked = 0.0
        # Batch limits, sized by time as well (_fit_lock_window): start at the settings, shrink when slow.
        self.batch_rows = settings.batch_rows
        self.batch_events = settings.batch_events
        self._sending: Batch | None = None  # the batch last handed to Turso
        self.failures = FailureHandler(self)  # handle_failure: retries, backoff, isolating, blocked, stopping
        self.capture = "trigger"
        self._last_status = ""
        self.attempts = 0  # failed delivery attempts in a row (the retry/backoff count)
        self.waiter = ChangeWaiter(self)  # idle: sleeps until a change (LISTEN and wake locks, or the slot)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            event(log, logging.INFO, "stopping", signal=signal.Signals(signum).name)
            self.stopping = True

        def reload(_signum: int, _frame: Any) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self.reload_settings is not None:
            signal.signal(signal.SIGHUP, reload)

    def _reload(self) -> None:
        """Apply settings changed by a reload: the log level and format at once; any other change by
        stopping, so that the background worker starts this process again with them."""
        self.reload_requested = False
        if self.reload_settings is None:
            return
        try:
            settings = self.reload_settings()
        except (ConfigError, psycopg.Error) as exc:
            event(log, logging.ERROR, "reload_failed", error=str(exc).strip(), keeping="the current settings")
            return
        changed = sorted(name for name in settings.sources
                         if getattr(settings, name) != getattr(self.settings, name))
        event(log, logging.INFO, "reloaded", changed=",".join(changed) or "-")
        setup_logs(settings.log_level, settings.log_format)
        self.settings = settings
        if set(changed) - {"log_level", "log_format"}:
            event(log, logging.INFO, "stopping", reason="settings changed; the background worker restarts me")
            self.stopping = True

    def _connect(self) -> None:
        if self.conn is not None and not self.conn.closed:
            return
        # A batch still in flight belonged to the lost connection's transaction: let it end before anything
        # else talks to Turso; the marker says whether it committed.
        self._abandon_in_flight(None)
        conn = delivery_connection(self.dsn)
        self.conn = conn
        capture = self._capture_mode(conn)
        source = WalOutbox if capture == "wal" else Outbox
        # A tenant of a pattern target reads its tenant's events of the pattern's tables (trigger capture only).
        tenancy = {} if self.tenant is None else {"pattern": self.pattern, "tenant": self.tenant}
        # A wal target's worker process reads its slot over a replication connection (replication.py); inside
        # a backend (pgturso.sync()) it peeks, as recovery does.
        stream = {"dsn": self.dsn} if capture == "wal" and self.read_ahead else {}
        self.outbox = source(conn, batch_rows=self.batch_rows, batch_events=self.batch_events,
                             target=self.settings.target, max_group_bytes=self.settings.max_statement_bytes,
                             **tenancy, **stream)
        self.capture = capture
        source_id = self.outbox.source_id()
        # The marker's key on the target: one Turso database may take several sources, or several targets.
        self.source_id = source_id if self.settings.target == "default" else f"{source_id}/{self.settings.target}"
        if self.target is None:
            self.endpoint = target_endpoint(conn, self.settings)
        self.recovered = False

    def _capture_mode(self, conn: psycopg.Connection[Any]) -> str:
        with conn.transaction():
            row = conn.execute(CAPTURE_OF_TARGET, (self.settings.target,)).fetchone()
        return str(row[0]) if row else "trigger"

    def _acquire_lock(self, once: bool) -> bool:
        assert self.conn is not None
        if self.locked_conn is self.conn:  # a session lock: held for as long as this connection lives
            return True
        waiting_logged = False
        while not self.stopping:
            row = self.conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                                    (DELIVERY_LOCK_CLASS, self.settings.target)).fetchone()
            if row and row[0]:
                self.locked_conn = self.conn
                if waiting_logged:
                    event(log, logging.INFO, "lock_acquired", role="active")
                return True
            if once:
                return False
            if not waiting_logged:
                event(log, logging.INFO, "standby", reason="another worker holds the delivery lock")
                waiting_logged = True
            time.sleep(1.0)
        return False

    def _open_target(self) -> Target:
        if self.target is None:
            url, token = self.endpoint
            self.target = open_target(
                url,
                token,
                max_request_bytes=self.settings.max_request_bytes,
                timeout=self.settings.request_timeout,
                tls_ca_file=self.settings.tls_ca_file,
                encryption_key=self.settings.encryption(),
                threads=self.read_ahead,  # no threads inside a Postgres backend
                group_commits=self.group_commits,
            )
        return self.target

    def _disconnect(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        for conn in (self.conn, self.listen_conn):
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        self.conn = self.listen_conn = None

    def _connection_usable(self) -> bool:
        """Whether the delivery connection is still usable after a failure elsewhere (the replication stream):
        rolled back to idle if it was in a transaction."""
        conn = self.conn
        if conn is None or conn.closed or self.outbox is None:
            return False
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        self._abandon_in_flight(None)
        self.sender.close()
        self._disconnect()
        if self.target is not None:
            self.target.close()
            self.target = None

    # -- delivery --------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Forget outbox events that the target's marker says were committed there already (recovery.py)."""
        MarkerRecovery(self).recover()

    def copy_step(self, look: bool = False) -> bool:
        """Queue one chunk of a pending initial copy; False when no copy is pending (or, unless ``look``, none
        was found a moment ago)."""
        assert self.outbox is not None
        if not self.copy_enabled:
            return False
        now = time.monotonic()
        if not look and now - self._copy_checked < COPY_CHECK_SECONDS:
            return False
        try:
            chunk = self.outbox.copy_chunk(self.settings.copy_chunk_rows)
        except CopyDeferred as exc:
            # Still copying: go on delivering and try the chunk again (each try waits at most COPY_LOCK_TIMEOUT).
            if not self._copy_deferred:
                event(log, logging.INFO, "copy_deferred", target=self.settings.target, reason=str(exc))
            self._copy_deferred = True
            self._copying, self._copy_checked = True, now
            return True
        self._copy_deferred = False
        self._copying = chunk is not None
        if chunk is None:
            self._copy_checked = now  # none pending: look again shortly, not on every batch
            return False
        table, copied, done, total = chunk
        if sys.stderr.isatty() and total:  # a terminal gets a progress bar, logs a line per chunk
            bar = self._copy_bars.setdefault(table, Progress(f"copy {table}", total))
            bar.update(done)
            if done >= total:
                bar.finish()
        else:
            event(log, logging.INFO, "copy", table=table, rows=copied, done=done, total=total if total else "?")
        return True

    def deliver_batch(self) -> int:
        """Deliver the next batch; returns the number of outbox events settled or sent (0: nothing pending and
        nothing in flight). Reads batch N+1 while batch N is in flight (see pipeline.py); no Postgres transaction
        stays open while Turso has a request."""
        if (self.isolating_until is not None or not self.read_ahead
                or (isinstance(self.outbox, WalOutbox) and self.outbox.dsn is None)):  # peeks: one at a time
            return self._deliver_streaming()
        assert self.conn is not None and self.outbox is not None
        target = self._open_target()
        in_flight = self.in_flight
        # Caught up (the batch in flight took all there was): a batch read now would miss what commits while
        # that one travels and leave it for one more round trip. Let it land first, then read.
        read_ahead = in_flight is not None and (in_flight.batch.more_pending or self._copying)
        try:
            if in_flight is not None and not read_ahead:
                self._settle(in_flight)
            timing = {"read": time.monotonic()}
            prepared = self._read_next(in_flight.batch if read_ahead else None)  # type: ignore[union-attr]
            timing["read_done"] = time.monotonic()
            if read_ahead:
                self._settle(in_flight, remove_later=prepared is not None and prepared.statements is not None)  # type: ignore[arg-type]
                timing["settled"] = time.monotonic()  # the batch before answered and recorded
        except BaseException as exc:
            self._abandon_in_flight(exc)
            raise
        settled = 0 if in_flight is None else in_flight.batch.event_count
        if prepared is None:
            return settled
        if prepared.statements is None:  # too large to hold in memory: streamed on its own
            return settled + self._deliver_streaming(prepared)
        try:
            # Now that the batch before is recorded delivered: a server that has this position has its marker.
            # A batch read ahead is sent only if nothing skipped (skip_transaction) or untracked (untrack_table)
            # since it was read took some of it: the statements in memory would send it all the same.
            whole = True
            if isinstance(self.outbox, WalOutbox):  # a slot's batch is placed by its LSN
                whole = not (read_ahead and self.outbox.changed_since_read(prepared.batch))  # type: ignore[arg-type]
            elif read_ahead:
                prepared.batch.position = self.outbox.position_if_whole(prepared.batch, in_flight.batch)  # type: ignore[union-attr]
                whole = prepared.batch.position is not None
            else:
                prepared.batch.position = self.outbox.position()
            if not whole:  # chosen (a slot's: decoded) again next time
                event(log, logging.INFO, "batch_changed", target=self.settings.target,
                      reason="the batch read ahead lost events to skip_transaction or untrack_table: reading it again")
                self._remove_settled()
                return settled
            timing["positioned"] = time.monotonic()
            prepared.batch.follows = self.last_marker or None
            marker = self._marker_statements(prepared.batch.marker())
            self._sending = prepared.batch
            self.in_flight = self.sender.submit(target, prepared, marker, timing)
            self._remove_settled()  # the batch before's events, while this one travels
        except BaseException as exc:
            self._abandon_in_flight(exc)
            raise
        return settled + prepared.batch.event_count

    def _read_next(self, in_flight: Batch | None) -> PreparedBatch | None:
        """Choose the next batch and read it into memory (unless it is too large to), in a transaction that ends
        before anything waits for Turso. While ``in_flight`` travels, the reads skip its events (read_past) and
        the transaction is rolled back: they stay pending until Turso confirmed it."""
        assert self.conn is not None and self.outbox is not None
        with self.conn.transaction(force_rollback=in_flight is not None):
            if in_flight is not None:
                self.outbox.read_past(in_flight)
            batch = self.outbox.choose_batch()
            # A batch from the replication stream reads no cursor of this transaction: too large to hold, it is
            # sent on from where this stopped rather than read again (see pipeline.prepare).
            resumable = isinstance(batch, WalBatch) and batch.streamed
            return None if batch is None else prepare(batch, self._statements(batch), self.settings.max_request_bytes,
                                                      resumable)

    def _settle(self, in_flight: InFlight, remove_later: bool = False) -> None:
        """Wait for Turso to commit the batch in flight, then remove its events (one short transaction of their
        own: at most this batch is ever committed on Turso and not recorded in Postgres, which the marker covers).
        ``remove_later`` (a batch read ahead is sent next): only record its marker now (one short statement,
        Outbox.record_marker) and remove its events once the next batch is on its way (_remove_settled), so that
        deleting and counting them (~0.2 s for 50,000 events) overlaps that request instead of delaying it."""
        assert self.outbox is not None
        self._remove_settled()
        statements = in_flight.wait()
        if remove_later and not isinstance(self.outbox, WalOutbox):  # a slot's batch: confirmed at once
            self.outbox.record_marker(in_flight.batch)
            self.in_flight = None
            self._marker_delivered(in_flight.batch)  # the next batch's fence
            self.unremoved = (in_flight, statements, self._hold_seconds())
            return
        removed = self.outbox.mark_delivered(in_flight.batch)
        self.in_flight = None
        self._delivered(in_flight.batch, statements, in_flight.started, removed, timing=in_flight.timing)

    def _remove_settled(self) -> None:
        """Remove the events of the batch _settle recorded (nothing else reads the outbox before this)."""
        if self.unremoved is None:
            return
        assert self.outbox is not None
        (in_flight, statements, held), self.unremoved = self.unremoved, None
        removed = self.outbox.remove_recorded(in_flight.batch)
        self._delivered(in_flight.batch, statements, in_flight.started, removed, held, in_flight.timing)

    def _deliver_streaming(self, read_ahead: PreparedBatch | None = None) -> int:
        """Deliver one batch, streamed from Postgres to Turso as it is read; nothing else in flight. The batch is
        chosen in a short transaction and its events read in parts, each part by its own statements, between
        the requests that send them (Batch.events): no transaction is open while Turso has a request. (A slot
        peeked through a cursor, inside a backend for pgturso.sync(), is read in its transaction: the caller's
        own transaction is open there anyway.)"""
        assert self.conn is not None and self.outbox is not None
        self._finish_in_flight()
        target = self._open_target()
        started = time.monotonic()
        single = self.isolating_until is not None
        resume = read_ahead.resume if read_ahead is not None else None
        if (resume is not None and isinstance(self.outbox, WalOutbox)
                and not single and not self.outbox.changed_since_read(read_ahead.batch)):  # type: ignore[union-attr, arg-type]
            # A slot's batch read ahead, too large to hold: sent on from where reading stopped, the stream open.
            # (Else it is decoded again below: a skip_transaction or untrack_table since applied, or one transaction
            # at a time.)
            batch = read_ahead.batch  # type: ignore[union-attr]
            self._sending = batch
            statements = send_batch(target, resume, self._marker(batch))
        elif isinstance(self.outbox, WalOutbox) and self.outbox.dsn is None:
            with self.conn.transaction():
                batch = self.outbox.choose_batch(single_transaction=single)
                if batch is None:
                    return 0
                self._sending = batch
                statements = send_batch(target, self._statements(batch), self._marker(batch))
        else:
            with self.conn.transaction():
                batch = self.outbox.choose_batch(single_transaction=single)
                if batch is not None and not isinstance(self.outbox, WalOutbox):
                    batch.read_in_parts(self.settings.max_request_bytes)  # counts its events in this snapshot
            if batch is None:
                return 0
            if not isinstance(self.outbox, WalOutbox):  # earlier deletions are committed: see deliver_batch
                batch.position = self.outbox.position()
            self._sending = batch
            statements = send_batch(target, self._statements(batch), self._marker(batch))
        removed = self.outbox.mark_delivered(batch)
        self._delivered(batch, statements, started, removed)
        return batch.event_count

    def _marker(self, batch: Batch) -> Generator[Statement, None, None]:
        """The batch's marker statements, built once its statements were sent (a slot's batch knows where it
        ends only then)."""
        batch.follows = self.last_marker or None
        yield from self._marker_statements(batch.marker())

    def _marker_statements(self, batch_marker: str) -> list[Statement]:
        return marker_statements(self.source_id, batch_marker, self.last_marker, create=self.marker_table_missing)

    def _statements(self, batch: Batch) -> Generator[Statement, None, None]:
        assert self.outbox is not None
        builder = StatementBuilder(self.outbox.layout, self.outbox.max_group_bytes)
        for item in batch.events():
            yield from builder.add(item)
        yield from builder.flush()

    def _finish_in_flight(self) -> None:
        """Wait for the batch in flight and record it as delivered (when the worker stops, or streams next)."""
        in_flight = self.in_flight
        if in_flight is None:
            try:
                self._remove_settled()
            except BaseException as exc:
                self._abandon_in_flight(exc)
                raise
            return
        assert self.outbox is not None
        try:
            self._settle(in_flight)
        except BaseException as exc:
            self._abandon_in_flight(exc)
            raise

    def _abandon_in_flight(self, failure: BaseException | None) -> None:
        """After a failure elsewhere: let the send end before anything else talks to Turso; whether it committed
        is read from the progress marker when the worker recovers."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.settle(failure)
            self.recovered = False
        if self.unremoved is not None:  # its marker is recorded: recovery forgets its events by it
            self.unremoved = None
            self.recovered = False

    def _count_delivered(self, removed: Removed) -> None:
        self.metrics.add("pgturso_rows_delivered_total", removed.rows)
        self.metrics.add("pgturso_transactions_delivered_total", removed.transactions)

    def _marker_delivered(self, batch: Batch) -> None:
        """``batch`` is committed on the target: its marker is the next batch's fence."""
        self.last_marker = batch.marker()
        self.marker_table_missing = False  # created with it

    def _hold_seconds(self) -> float:
        """How long the target's last transaction held its write lock."""
        return self.target.last_hold_seconds if self.target is not None else 0.0

    def _delivered(self, batch: Batch, statements: int, started: float, removed: Removed,
                   held: float | None = None, timing: dict[str, float] | None = None) -> None:
        """Account for a batch that Turso committed and Postgres forgot. Its rows count where its events were
        removed: ``removed`` is nothing when another worker forgot the batch by the marker first (it counted
        them), e.g. after this one lost the target while the batch travelled. ``held``: the batch's hold time,
        taken when _settle recorded it (and made its marker the fence) before the next batch was sent.
        ``timing``: when its steps happened (InFlight.timing), logged at debug level just before "delivered"
        (what the latency benchmark takes each step's share from)."""
        if held is None:
            self._marker_delivered(batch)
            held = self._hold_seconds()
        self.events_delivered += batch.event_count
        self._fit_lock_window(held)
        self.metrics.set("pgturso_transaction_hold_seconds", held)
        self.metrics.set("pgturso_batch_rows_limit", self.batch_rows)
        self._vacuum_if_due(batch.rows)
        self.metrics.add("pgturso_batches_total")
        self._count_delivered(removed)
        if removed.events < batch.event_count and not isinstance(self.outbox, WalOutbox):  # (a slot's: its own)
            # Events of the batch were deleted while Turso had it (skip_transaction, untrack_table): a skip of a
            # transaction it carried must not say that Turso lacks it.
            assert self.outbox is not None
            skips = self.outbox.note_skips_delivered(batch)
            if skips:
                event(log, logging.WARNING, "skipped_but_delivered", target=self.settings.target, transactions=skips,
                      reason="skip_transaction ran while the batch carrying them was on its way to Turso")
        if self.isolating_until is not None and batch.upto >= self.isolating_until:
            event(log, logging.INFO, "isolation_done", reason="delivered past the batch that failed")
            self.isolating_until = None
        if timing and log.isEnabledFor(logging.DEBUG):
            event(log, logging.DEBUG, "batch_timing", target=self.settings.target,
                  **{step: round(at, 6) for step, at in timing.items()}, removed=round(time.monotonic(), 6))
        event(
            log,
            logging.INFO,
            "delivered",
            target=self.settings.target,
            transactions=batch.transactions,
            events=batch.event_count,
            rows=batch.rows,
            statements=statements,
            ms=round((time.monotonic() - started) * 1000, 1),
            held_ms=round(held * 1000, 1),
        )

    def _set_batch_limits(self, rows: int, events: int) -> None:
        self.batch_rows, self.batch_events = rows, events
        if self.outbox is not None:
            self.outbox.batch_rows, self.outbox.batch_events = rows, events

    def _fit_lock_window(self, held: float) -> None:
        """Size batches by time as well as rows: Turso Cloud (sqld) rolls back a transaction that holds the
        write lock 5 s while another client wants to write, so a delivery that held its transaction longer than
        max_transaction_seconds makes the next batches half as large; fast ones let them grow back."""
        self.failures.lock_timeouts = 0
        budget = self.settings.max_transaction_seconds
        if held > budget and self.batch_rows > 1:
            self._set_batch_limits(max(self.batch_rows // 2, 1), max(self.batch_events // 2, 1))
            event(log, logging.INFO, "batch_shrunk", held_s=round(held, 2), max_transaction_seconds=budget,
                  batch_rows=self.batch_rows)
        elif held < budget / 4 and self.batch_rows < self.settings.batch_rows:
            self._set_batch_limits(min(self.batch_rows * 2, self.settings.batch_rows),
                                   min(self.batch_events * 2, self.settings.batch_events))

    def _vacuum_if_due(self, rows: int) -> None:
        """Count a delivered batch's rows towards the next VACUUM (_vacuum_when_due runs it)."""
        self._rows_since_vacuum += rows

    def _vacuum_when_due(self) -> None:
        """Vacuum the outbox every VACUUM_EVERY_SECONDS while deliveries are flowing. Called between two batches,
        with no Postgres transaction open and the next batch just handed to the sender: the VACUUM runs while
        that batch travels, instead of holding it back (0.2-0.4 s on a 1M-event outbox, run from _delivered)."""
        assert self.outbox is not None
        now = time.monotonic()
        if self._rows_since_vacuum >= VACUUM_AFTER_ROWS and now - self._vacuumed_at >= VACUUM_EVERY_SECONDS:
            started = time.monotonic()
            self.outbox.vacuum()
            event(log, logging.DEBUG, "vacuumed", ms=round((time.monotonic() - started) * 1000, 1))
            self._rows_since_vacuum, self._vacuumed_at = 0, now

    def _record(self, status: str, error: str | None = None, **fields: Any) -> None:
        """Show the worker's state in pgturso.status; Postgres being unreachable must not hide the real error."""
        if self.outbox is None or self.conn is None or self.conn.closed:
            return
        if status == self._last_status == "idle" and error is None and not fields.keys() - {"clear_error"}:
            # Unchanged (an error is cleared by the first 'idle' after it; any error recorded since changed the
            # status): a wal target's worker wakes on every write to the WAL, its own too, and one that cannot
            # sleep while a writer holds a wake lock looks again every 10 ms.
            return
        self._last_status = status
        try:
            if error is None:
                self.outbox.record_state(status, **fields)
            else:
                self.outbox.record_error(status, error, **fields)
        except psycopg.Error as exc:
            event(log, logging.WARNING, "state_not_recorded", status=status, error=str(exc).strip())

    def _record_caught_up(self) -> None:
        """A wal target's worker stopping: record where it found nothing more in the slot, so that pgturso.status
        can say in sync without a worker reading the slot (WalOutbox.record_caught_up)."""
        if not isinstance(self.outbox, WalOutbox) or not self._connection_usable():
            return
        try:
            self.outbox.record_caught_up()
        except (PgTursoError, psycopg.Error) as exc:  # status then says what it said before: not in sync
            event(log, logging.WARNING, "caught_up_not_recorded", error=str(exc).strip())

    def run(self, once: bool = False, standby: bool = True) -> int:
        """Deliver until stopped (or, with ``once``, until nothing committed is left). Returns an exit code.

        ``standby``: wait for the delivery lock while another worker holds it (else return EXIT_LOCKED)."""
        self.attempts = 0
        retry_limit = self.settings.retry_limit or (3 if once else 0)
        event(log, logging.INFO, "starting", target=self.settings.target, once=once)
        if self.settings.metrics_port:
            port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            event(log, logging.INFO, "metrics", listen=f"{self.settings.metrics_host}:{port}")
        try:
            while not self.stopping:
                if self.reload_requested:
                    self._reload()
                    continue
                try:
                    self._connect()
                    if not self._acquire_lock(once or not standby):
                        if self.stopping:
                            break
                        if standby:
                            event(log, logging.ERROR, "locked", reason="another worker is delivering; not running")
                        return EXIT_LOCKED
                    if not self.recovered:
                        if self.target is None:
                            event(log, logging.INFO, "target", target=self.settings.target,
                                  url=redact_url(self.endpoint[0]))
                        self.recover()
                        # After a failure (attempts) the target stays 'retrying' until a step gets past the
                        # error ('resumed' below): reconnected is not yet delivering, and pgturso.status must
                        # not show 'delivering' beside a current error between two failed attempts.
                        self._record("retrying" if self.attempts else "delivering", worker=self.identity,
                                     starting=self.attempts == 0)
                    copied = self.copy_step()
                    delivered = self.deliver_batch()
                    self._vacuum_when_due()
                    if self.attempts:
                        event(log, logging.INFO, "resumed", after_attempts=self.attempts)
                        self._record("delivering", clear_error=True)  # delivery got past the error
                    self.attempts = 0
                    self._update_backlog(force=not delivered)
                    if delivered or copied or self.copy_step(look=True):
                        self.waiter.busy_looks = 0
                        continue
                    # Nothing pending: whatever error there was is over.
                    if once:
                        self._record("stopped", clear_error=True)
                        self._record_caught_up()
                        return EXIT_OK
                    self._record("idle", clear_error=True)
                    self.waiter.wait()
                except (TursoUnavailable, psycopg.OperationalError, StatementFailed, TursoRequestRejected,
                        ConfigError, psycopg.errors.InsufficientPrivilege) as exc:
                    code, delay = self.handle_failure(exc, retry_limit, once)
                    if code is not None:
                        return code
                    self._sleep(delay)
            try:
                self._finish_in_flight()
            except (PgTursoError, psycopg.Error) as exc:
                event(log, logging.WARNING, "stopped_in_flight", error=str(exc).strip())
            self._record("stopped")
            self._record_caught_up()
            return EXIT_OK
        finally:
            self.close()
            self.metrics.close()

    def handle_failure(self, exc: Exception, retry_limit: int, once: bool) -> tuple[int | None, float]:
        """What a failed delivery step means: (an exit code to stop with, or None to go on; seconds to wait
        first). Counts the attempt, logs it and shows it in pgturso.status (failures.py)."""
        return self.failures.handle(exc, retry_limit, once)

    def _update_backlog(self, force: bool, up: bool = True) -> None:
        """Refresh the backlog gauges (a count over the outbox: at most every few seconds while busy); ``up``:
        delivering (else retrying: the lag of a target that is down is what its alert watches)."""
        self.metrics.set("pgturso_up", int(up))
        self.metrics.set("pgturso_batch_rows_limit", self.batch_rows)  # before a first delivery too (not 0)
        if isinstance(self.outbox, WalOutbox):
            self.metrics.set("pgturso_replication_streaming", int(self.outbox.stream is not None))
        if not self.metrics.serving or self.outbox is None:
            return
        now = time.monotonic()
        if not force and now - self._backlog_checked < 5:
            return
        self._backlog_checked = now
        events, rows, lag = self.outbox.backlog()
        if isinstance(self.outbox, WalOutbox):
            retained, in_slot = slot_bytes(self.outbox.conn, self.outbox.slot)
            self.metrics.set("pgturso_wal_retained_bytes", retained)
            self.metrics.set("pgturso_wal_pending_bytes", in_slot)
        self.metrics.set("pgturso_backlog_events", events)
        self.metrics.set("pgturso_backlog_rows", rows)
        self.metrics.set("pgturso_lag_seconds", lag)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
