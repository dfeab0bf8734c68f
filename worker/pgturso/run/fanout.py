"""``pgturso-worker run --target 'tenant-%s'``: deliver to every tenant database of a pattern target.

Each tenant is a target of its own (a row of pgturso.target that pgturso._register_tenants created, with the
pattern's URL and token unless an add_target of that name overrides them): its own progress marker on its own
database, commit order, retries and backoff, and row in pgturso.delivery_state. One process delivers any number
of them with bounded resources:

- A scheduler (the main thread) finds the tenants with pending events (one index walk over the outbox's
  tenants, not a query per tenant) and hands each a *step* (deliver one batch) on a pool of ``tenant_threads``
  threads. Each pool thread has one Postgres connection; the scheduler has one more (tenant list, locks, LISTEN).
  So connections and threads do not grow with the tenants: 1,000 tenants take ``tenant_threads + 1``
  connections.
- While more tenants are ready than steps may be handed out, a step is a *round* of up to ROUND_TENANTS tenants
  (file: databases, recovered, not failing): their batches read in one statement and deleted in one, each sent
  to its own database in between; a tenant whose send failed is left out of the deletion.
- A tenant is stepped by one thread at a time, least recently served first, so one busy tenant does not starve
  the others. A tenant whose step failed waits out its own backoff (``handle_failure``, as a single-target
  worker does) without holding a thread; and at most half of the threads serve tenants that are failing, so
  slow or down databases (each step bounded by request_timeout) never take every thread from the others.
- Per-tenant state is a TenantWorker (a few kB). Its Turso connection (a file handle or an HTTP session) is
  closed once the tenant has been idle for TARGET_IDLE_SECONDS, and at most MAX_OPEN_TARGETS stay open: an idle
  tenant costs no connection, thread or file handle, and no CPU (only tenants with pending events are looked at).
- The initial copy of a pattern's table is one job for all tenants (its chunks make events for each tenant),
  and so is vacuuming the outbox.

Several processes started for the same pattern share its tenants through Postgres alone: each holds a member
lock (one of ``MAX_MEMBERS`` advisory locks of the pattern), counts the members alive, and delivers at most its
fair share of the tenants, each under that tenant's delivery lock, all held by the scheduler's connection. A
process that dies loses its locks with that connection; the others' next scan takes its tenants over (the
progress marker on each tenant's database fences a batch the dead process still had in flight). A scheduler
that loses its connection forgets every tenant and takes them again (recovering each from its marker).

Waking: like a single-target worker, the scheduler holds the wake locks of the pattern's tables only while it
has nothing to do, so writers send a NOTIFY only to wake an idle worker (capture.WAKE_LOCK_CLASS); while it is
busy it looks for pending tenants every PENDING_EVERY_SECONDS instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg

from ..common.errors import (
    ConfigError,
    CopyDeferred,
    PgTursoError,
    StatementFailed,
    TursoRequestRejected,
    TursoUnavailable,
)
from ..common.logs import event
from ..common.metrics import Metrics
from ..common.retry import backoff_delay
from ..common.settings import Settings
from ..delivery.pipeline import send_batch
from ..delivery.targets import FileTarget, PendingSync, Target, fsync_directory, redact_url
from ..sources.outbox import Batch, Outbox, error_cleared_when, read_whole_batches, record_tenant_batches
from ..sources.router import NotYetVisible, Router
from .worker import (
    DELIVERY_LOCK_CLASS,
    EXIT_FATAL,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_RETRIES_EXHAUSTED,
    NOTIFY_CHANNEL,
    TENANT_ENDPOINTS,
    VACUUM_AFTER_ROWS,
    VACUUM_EVERY_SECONDS,
    Worker,
    delivery_connection,
    notified,
    target_endpoint,
)

log = logging.getLogger("pgturso.fanout")

MEMBER_LOCK_CLASS = int.from_bytes(b"pgtm", "big")
MAX_MEMBERS = 64
SCAN_SECONDS = 1.0  # how often the tenant list and the members alive are read (new tenants, hand-overs)
PENDING_EVERY_SECONDS = 0.05  # while busy: how often the outbox is asked which tenants have events
COPY_CHECK_SECONDS = 0.5
TARGET_IDLE_SECONDS = 10.0  # a tenant idle this long has its Turso connection (file handle, HTTP session) closed
# Turso connections kept open at most (least recently used closed first): a file: database open in pyturso
# takes about 2 MB, which the allocator keeps once touched; reopening one costs about 10 ms.
MAX_OPEN_TARGETS = 32
# While an initial copy of the pattern's tables runs, a tenant is stepped at most this often, counted from the
# copy's start: every chunk brings every tenant a few rows, and a visit costs a fixed amount (Postgres round
# trips; opening, committing and closing its database, an fsync) that
# gathering does not pay again. A copy shorter than this reaches each tenant in one visit after its last chunk,
# and the chunks get the cores meanwhile (bench 11a: at most once a second, 1,000 tenants took ~2,300-2,900
# visits and the copy ran 2-4 times slower than alone). The price: a tenant's live changes wait up to this long
# while a copy of a table of its pattern runs, so it is kept short: 10 s (30 s made a long copy delay every
# tenant's live changes by up to half a minute for as long as it ran; a quiet machine copies bench 11a's 1M rows
# into 1,000 databases in less than 10 s).
COPY_STEP_SECONDS = 10.0
# Steps handed to the pool at most, per thread: a thread that ends a step starts the next one queued at once,
# instead of idling until the scheduler wakes, looks at the outbox and dispatches (a quarter of the pool's
# time at 500 visits/s when only one step per thread was handed out). A queued step holds no connection.
STEPS_QUEUED_PER_THREAD = 2
# While more tenants are ready than steps may be handed out, a step serves a round of up to this many tenants
# (PatternWorker._run_round): their batches read in one statement and deleted in one, two round trips for the
# round instead of two per tenant, each tenant sent to its own database in turn.
ROUND_TENANTS = 4
# A stopping router's last looks at the slot for where it caught up (PatternWorker._close_router).
FINAL_LOOKS = 3

TENANTS = TENANT_ENDPOINTS + " WHERE t.pattern = %s ORDER BY t.name"  # name, tenant value, URL, token
PATTERN_EXISTS = "SELECT EXISTS (SELECT 1 FROM pgturso.target WHERE name = %s)"
PATTERN_LAYOUTS = """
    SELECT coalesce(array_agg(l.id), '{}') FROM pgturso.layout l JOIN pgturso.tracked_table t ON t.id = l.table_id
    WHERE t.target = %s
"""
# Advisory locks are per database (pg_locks shows every database's): a pattern of the same name in another
# database of the cluster has members of its own, which share none of this one's tenants.
MEMBERS_ALIVE = """
    SELECT count(*) FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %(class)s::oid AND l.objsubid = 2
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
      AND l.objid IN (SELECT hashtext(%(pattern)s || ':' || k)::oid FROM generate_series(0, %(max)s - 1) AS k)
"""
TAKE_MEMBER_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
TAKE_DELIVERY_LOCKS = "SELECT n, pg_try_advisory_lock(%s, hashtext(n)) FROM unnest(%s::text[]) AS n"
RELEASE_DELIVERY_LOCKS = "SELECT pg_advisory_unlock(%s, hashtext(n)) FROM unnest(%s::text[]) AS n"
# The distinct tenants with events of the pattern's tables: a walk of outbox_tenant_idx, one probe per tenant
# that has events (the ones without cost nothing), instead of a scan of every pending event.
PENDING_TENANTS = """
    WITH RECURSIVE pending(tenant) AS (
        (SELECT o.tenant FROM pgturso.outbox o WHERE o.tenant IS NOT NULL AND o.layout_id = ANY (%(layouts)s)
         ORDER BY o.tenant LIMIT 1)
        UNION ALL
        SELECT (SELECT o.tenant FROM pgturso.outbox o WHERE o.tenant > p.tenant AND o.layout_id = ANY (%(layouts)s)
                ORDER BY o.tenant LIMIT 1)
        FROM pending p WHERE p.tenant IS NOT NULL
    )
    SELECT tenant FROM pending WHERE tenant IS NOT NULL
"""
CAPTURE_OF = "SELECT capture FROM pgturso.target WHERE name = %s"
COPYING = "SELECT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE target = %s AND copy_state = 'copying')"
# The table a copy chunk takes first (outbox.NEXT_COPY_CHUNK's order): the one a refused chunk was of.
COPYING_TABLE = ("SELECT relid::regclass::text FROM pgturso.tracked_table WHERE target = %s AND copy_state = 'copying' "
                 "AND dropped_at IS NULL ORDER BY id LIMIT 1")
# Tenants that delivered and have nothing pending: idle, and whatever error they had is over, as a single
# target's empty pass records it (outbox.RECORD_STATE with clear). Without the clearing, a tenant that
# recovered under a new worker (no retry of its own to get past) kept its old error and streak for good.
RECORD_IDLE = f"""
    UPDATE pgturso.delivery_state SET status = 'idle', updated_at = now(),{error_cleared_when("true")}
    WHERE target = ANY (%(names)s) AND status = 'delivering'
"""
RECORD_STOPPED = """
    UPDATE pgturso.delivery_state SET status = 'stopped', updated_at = now()
    WHERE target = ANY (%(names)s) AND status <> 'stopped'
"""


# What a tenant's step survives (retried or reported by handle_failure); anything else fails the tenant's step
# (PatternWorker._collect reports it and tries the tenant again later).
STEP_FAILURES = (TursoUnavailable, psycopg.OperationalError, StatementFailed, TursoRequestRejected, ConfigError,
                 psycopg.errors.InsufficientPrivilege)


def without_traceback(exc: Exception) -> Exception:
    """A round's failed tenant's exception, kept as its outcome without its traceback: the frames hold the tenant's
    database object, and pyturso lets go of a file's lock only when that object is freed, not at close(); kept
    in the round's outcomes, which the frames hold too, it stayed locked until the garbage collector ran
    (another worker taking the tenant over could not open it). _collect reports it by its repr."""
    return exc.with_traceback(None)


@dataclasses.dataclass
class Delivered:
    """A batch a round's tenant delivered to Turso, whose events the round deletes (PatternWorker._run_round)."""

    tenant: TenantWorker
    batch: Batch
    statements: int
    started: float
    # The fsync that makes its commit durable (a file: database's), run for the whole round before the deletion.
    durable: PendingSync | None = None
    # That fsync started on PatternWorker.syncer as soon as the commit returned (_run_round), while the round
    # sends to its next tenants; its result (None, or the failure) is awaited before the round's deletion.
    syncing: Future[Exception | None] | None = None


def _sync(item: Delivered) -> Exception | None:
    """Run a round's tenant's fsync of its WAL (on PatternWorker.syncer; the round fsyncs the directory of the
    files it created once, after); its failure is returned, without its traceback (which would hold the
    tenant's objects: without_traceback)."""
    assert item.durable is not None
    try:
        item.durable.sync(directory=False)
    except TursoUnavailable as exc:
        return without_traceback(exc)
    return None


class OpenTargets:
    """How many tenants' Turso connections are open (pool threads open and close them)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def opened(self) -> None:
        with self._lock:
            self.count += 1

    def closed(self) -> None:
        with self._lock:
            self.count -= 1


class TenantWorker(Worker):
    """One tenant of a pattern: a Worker's delivery state and failure handling, stepped by the pattern's scheduler
    on whichever pool connection is free, one batch per step."""

    def __init__(self, dsn: str, settings: Settings, pattern: str, tenant: str, metrics: Metrics,
                 shared_layouts: Outbox | None, count_rows: Callable[[int], None], open_targets: OpenTargets) -> None:
        super().__init__(dsn, settings, pattern=pattern, tenant=tenant)
        self._open_targets = open_targets
        self.read_ahead = False  # one batch at a time on a pool thread: no sender thread per tenant
        self.copy_enabled = False  # the pattern's initial copy is one job of the scheduler for every tenant
        # A tenant's file: database is closed after nearly every visit when many are busy: its commits are made
        # durable by an fsync of its WAL, a round's side by side (FileTarget, PatternWorker._sync_round), and
        # closing it costs no checkpoint (no fsync under the GIL).
        self.group_commits = True
        self.metrics = metrics
        self._shared_layouts = shared_layouts
        self._count_rows = count_rows
        # Scheduling state (read and written by the scheduler's thread only).
        self.running = False
        self.due = True  # look at it: a first visit recovers it and records this worker as its deliverer
        self.not_before = 0.0  # its backoff: not stepped again before this time
        self.served_at = 0.0  # when its last step started (least recently served first)
        self.used_at = 0.0  # when its Turso connection was last used
        self.code: int | None = None  # why it stopped (--once: fatal, retries exhausted)
        self.shown_idle = False  # pgturso.status shows it idle (the scheduler records that for many at once)

    def attach(self, conn: psycopg.Connection[Any]) -> None:
        """Deliver over ``conn`` (a pool connection) for this step."""
        self.conn = conn
        if self.outbox is None:
            outbox = Outbox(conn, batch_rows=self.batch_rows, batch_events=self.batch_events,
                            target=self.settings.target, max_group_bytes=self.settings.max_statement_bytes,
                            pattern=self.pattern, tenant=self.tenant)
            if self._shared_layouts is not None:  # layouts never change once committed: one cache for all tenants
                outbox._layouts = self._shared_layouts._layouts
                outbox._table_of_layout = self._shared_layouts._table_of_layout
            if not self.source_id:  # given by the pattern worker, which reads it once for all its tenants
                self.source_id = f"{outbox.source_id()}/{self.settings.target}"
            if not self.endpoint[0]:
                self.endpoint = target_endpoint(conn, self.settings)
            self.outbox = outbox
        else:
            self.outbox.conn = conn

    def step(self, connect: Callable[[], psycopg.Connection[Any]], once: bool,
             read: tuple[bool, Batch | None] | None = None, deferred: list[Delivered] | None = None) -> float | None:
        """Deliver one batch. Returns when to look again: 0 (at once: more may be pending), a delay (a retry
        after a failure), or None (nothing pending). Sets ``code`` when the tenant stops (--once).

        In a round (PatternWorker._run_round), ``read`` is this tenant's batch as the round's one statement read
        it, and a batch Turso committed is added to ``deferred`` instead of being deleted here: the round deletes
        all of them in one statement (and then calls ``delivered``)."""
        try:
            self.attach(connect())
            if not self.recovered:
                read = None  # read before its recovery, which may forget events Turso has already
                if self.target is None:
                    event(log, logging.INFO, "target", target=self.settings.target, url=redact_url(self.endpoint[0]))
                self.recover()
                self._record("delivering", worker=self.identity, starting=self.attempts == 0)
            delivered = self.deliver_batch(read, deferred)
            if self.attempts:
                event(log, logging.INFO, "resumed", target=self.settings.target, after_attempts=self.attempts)
                self._record("delivering", clear_error=True)  # delivery got past the error
            self.attempts = 0
            self._update_backlog(force=not delivered)
            if delivered:
                self.shown_idle = False
                # Cut short by the batch limits, or delivering one transaction at a time: more is pending. Else
                # the scheduler's next look at the outbox says (no empty step to find out).
                more = self.isolating_until is not None or (self._sending is not None and self._sending.more_pending)
                return 0.0 if more else None
            self._record("idle", clear_error=True)
            self.shown_idle = True
            return None
        except STEP_FAILURES as exc:
            return self.failed(exc, once)
        finally:
            self.used_at = time.monotonic()
            self.conn = None  # the pool's connection, not this tenant's
            if self.outbox is not None:
                self.outbox.conn = None  # type: ignore[assignment]

    def failed(self, exc: Exception, once: bool) -> float | None:
        """A failed step (or a round's failed deletion of its batch): its retry delay, or None with ``code``
        set when the tenant stops (--once)."""
        retry_limit = self.settings.retry_limit or (3 if once else 0)
        code, delay = self.handle_failure(exc, retry_limit, once)
        if code is not None:
            self.code = code
            return None
        return delay

    def deliver_batch(self, read: tuple[bool, Batch | None] | None = None,
                      deferred: list[Delivered] | None = None) -> int:
        """Deliver the tenant's pending events: read whole in one statement when they fit one batch (the common
        case: a tenant visited every moment has a few), sent, then deleted in one statement, so that a visit
        costs two Postgres round trips and holds no Postgres transaction while Turso commits. A larger backlog,
        or one transaction at a time after a refused batch, goes the general way (Worker._deliver_streaming).
        The guarantees are the streaming path's: the batch's marker is committed with it on Turso, and its events
        are deleted only after that commit (a failure in between is what recovery from the marker covers).
        ``read``: the batch already read (by a round's statement); ``deferred``: the round deletes it."""
        if self.isolating_until is not None:
            return self._deliver_streaming()
        assert self.outbox is not None
        fits, batch = read if read is not None else self.outbox.read_whole_batch()
        if not fits:
            return self._deliver_streaming()
        if batch is None:
            return 0
        target = self._open_target()
        started = time.monotonic()
        self._sending = batch
        # In a round, a file: database's commit is made durable with the round's others (_sync_round); alone,
        # by its commit.
        deferring = deferred is not None and isinstance(target, FileTarget)
        if deferring:
            target.deferring = True
        try:
            statements = send_batch(target, self._statements(batch), self._marker(batch))
        finally:
            if deferring:
                target.deferring = False
        if deferred is not None:
            durable = target.pending_sync() if deferring else None  # type: ignore[attr-defined]
            deferred.append(Delivered(self, batch, statements, started, durable))
            return batch.event_count
        # One statement on the autocommit connection: its own transaction, as mark_delivered's would be.
        removed = self.outbox.remove_delivered(batch)
        self._delivered(batch, statements, started, removed)
        return batch.event_count

    def _disconnect(self) -> None:
        if self.conn is not None:  # a pool connection that failed: the pool opens a new one for its next step
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def _vacuum_if_due(self, rows: int) -> None:
        self._count_rows(rows)  # the scheduler vacuums the outbox for all tenants

    def _open_target(self) -> Target:
        if self.target is None:
            self._open_targets.opened()
        return super()._open_target()

    def close_target(self) -> None:
        if self.target is not None:
            self._open_targets.closed()
            try:
                self.target.close()
            except Exception as exc:  # closing an unused connection: nothing of the tenant's data is at stake
                event(log, logging.DEBUG, "close_failed", target=self.settings.target, error=repr(exc))
            self.target = None


class PatternWorker:
    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.pattern = settings.target
        self.stopping = False
        self.once = False
        self.threads = settings.tenant_threads
        self.conn: psycopg.Connection[Any] | None = None  # the scheduler's: tenant list, locks, LISTEN
        self.tenants: dict[str, TenantWorker] = {}  # the tenants whose delivery lock this process holds
        self.orphans: dict[str, TenantWorker] = {}  # stepped when the scheduler lost its connection (and locks)
        self.locked_elsewhere: set[str] = set()
        self.tried_at: dict[str, float] = {}
        self.layouts: list[int] = []
        self.layout_cache: Outbox | None = None
        self.source_id = ""  # pgturso.instance's: the first part of every tenant's marker key
        self.metrics = Metrics()  # one endpoint, a sample per tenant labelled target="…",pattern="…"
        self.tenant_metrics: dict[str, Metrics] = {}
        self.open_targets = OpenTargets()
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="pgturso-tenant")
        # Runs rounds' fsyncs side by side (_sync_round); its threads start when a round first needs them.
        self.syncer = ThreadPoolExecutor(max_workers=self.threads * ROUND_TENANTS // 2,
                                         thread_name_prefix="pgturso-fsync")
        self._local = threading.local()
        self._pool_conns: list[psycopg.Connection[Any]] = []
        self._pool_lock = threading.Lock()
        self.woken = threading.Event()  # a step or job ended
        self.running: dict[str, Future[float | None]] = {}  # steps (and closes) of tenants, by name
        self.job: Future[bool] | None = None  # the copy chunk or vacuum running, if any
        self.copying = False
        self._copy_started_at = 0.0  # when the scheduler saw the copy running (COPY_STEP_SECONDS counts from it)
        self._copy_checked = 0.0
        self._copy_refused: str | None = None  # why Postgres refused a copy chunk (PatternWorker._refuse_copy)
        self._scanned_at = 0.0
        self._pending_at = 0.0
        self._closed_at = 0.0
        self._rows_lock = threading.Lock()
        self._rows_since_vacuum = 0
        self._vacuumed_at = time.monotonic()
        self._codes: dict[str, int] = {}  # --once: tenants that stopped, and why
        # capture => 'wal': the router writing the slot's changes as per-tenant outbox rows (sources/router.py),
        # in a thread of its own; ``routed`` is set when it wrote some (the scheduler looks for pending tenants).
        self.router: Router | None = None
        self.router_thread: threading.Thread | None = None
        self.routed = threading.Event()
        self._router_code: int | None = None  # why the router stopped the worker (_router_failed, _router_alive)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            event(log, logging.INFO, "stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def stop(self) -> None:
        self.stopping = True
        self.woken.set()

    def _tenant_settings(self, name: str) -> Settings:
        # The flags' URL and token are the pattern's business (pgturso.target); metrics are served by the pattern
        # worker, one labelled sample per tenant.
        return dataclasses.replace(self.settings, target=name, url=None, auth_token=None, auth_token_file=None,
                                   metrics_port=0)

    def _connect(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = None
            conn = delivery_connection(self.dsn, "pgturso-worker-pattern")
            if not conn.execute(PATTERN_EXISTS, (self.pattern,)).fetchone()[0]:  # type: ignore[index]
                conn.close()
                raise ConfigError(f"there is no target named {self.pattern!r}; create it with SELECT "
                                  f"pgturso.add_target('{self.pattern}', 'libsql://…%s…', 'token')")
            for slot in range(MAX_MEMBERS):
                if conn.execute(TAKE_MEMBER_LOCK, (MEMBER_LOCK_CLASS, f"{self.pattern}:{slot}")).fetchone()[0]:  # type: ignore[index]
                    break
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.conn = conn
            if self.router_thread is None and conn.execute(CAPTURE_OF, (self.pattern,)).fetchone()[0] == "wal":  # type: ignore[index]
                self.router = Router(self.dsn, self.pattern, self.settings.batch_rows)
                self.router_thread = threading.Thread(target=self._route, name="pgturso-router", daemon=True)
                self.router_thread.start()
            self.layout_cache = Outbox(conn, batch_rows=1, batch_events=1, target=self.pattern)
            self.source_id = self.layout_cache.source_id()
            self._scanned_at = 0.0
        return self.conn

    def _lose_connection(self) -> None:
        """The scheduler's connection is gone, and every delivery lock with it: another worker may take any of
        these tenants now. Forget them (a step still running finishes, fenced by the marker); take them again,
        recovering each from its marker, once connected."""
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None
        for name, tenant in self.tenants.items():
            if tenant.running:
                self.orphans[name] = tenant
            else:
                tenant.close_target()
        self.tenants = {}

    def _pool_connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            if conn is not None:
                conn.close()
            conn = delivery_connection(self.dsn, "pgturso-worker-tenant")
            self._local.conn = conn
            with self._pool_lock:
                self._pool_conns = [c for c in self._pool_conns if not c.closed] + [conn]
        return conn

    # -- tenants: who delivers which ---------------------------------------------------------------------------

    def _scan(self, once: bool) -> None:
        """Read the pattern's tenants and the members alive; take the delivery locks of up to a fair share of
        the tenants (all of them with --once), hand the excess over when another worker joined."""
        conn = self._connect()
        self._scanned_at = time.monotonic()
        self.layouts = list(conn.execute(PATTERN_LAYOUTS, (self.pattern,)).fetchone()[0])  # type: ignore[index]
        rows = conn.execute(TENANTS, (self.pattern,)).fetchall()
        known = {name: tenant for name, tenant, _, _ in rows}
        endpoints = {name: (url, token) for name, _, url, token in rows}
        members = max(1, conn.execute(MEMBERS_ALIVE, {"class": MEMBER_LOCK_CLASS, "pattern": self.pattern,  # type: ignore[index]
                                                      "max": MAX_MEMBERS}).fetchone()[0])
        share = len(known) if once else math.ceil(len(known) / members)
        gone = [name for name in self.tenants if name not in known and not self.tenants[name].running]
        excess = len(self.tenants) - len(gone) - share
        if excess > 0:  # another worker joined: hand over the idle tenants first, then those not running
            idle_first = sorted((t for n, t in self.tenants.items() if n not in gone and not t.running),
                                key=lambda t: (t.due, t.served_at))
            gone += [t.settings.target for t in idle_first[:excess]]
        if gone:
            for name in gone:
                tenant = self.tenants.pop(name)
                tenant.close_target()
                tenant.metrics.set("pgturso_up", 0)  # its series stays on this endpoint: no longer delivered here
            conn.execute(RELEASE_DELIVERY_LOCKS, (DELIVERY_LOCK_CLASS, gone))
            event(log, logging.INFO, "handed_over", target=self.pattern, tenants=len(gone))
        for name, tenant in list(self.tenants.items()):
            if not tenant.running and name in endpoints and tenant.endpoint != endpoints[name]:
                # Moved (add_target of the tenant's name, or the pattern's URL changed): a fresh worker for it,
                # whose first visit recovers from the new database's marker (none: it is caught up, as at start).
                tenant.close_target()
                self.tenants[name] = self._tenant(name, known[name], endpoints[name])
                event(log, logging.INFO, "tenant_moved", target=name, url=redact_url(endpoints[name][0]))
        want = share - len(self.tenants)
        # Least recently tried first: tenants another worker holds do not keep this one from the free ones.
        candidates = sorted((n for n in known if n not in self.tenants and n not in self.orphans),
                            key=lambda n: self.tried_at.get(n, 0.0))
        now = time.monotonic()
        while want > 0 and candidates and not self.stopping:
            chunk, candidates = candidates[:want], candidates[want:]
            for name, taken in conn.execute(TAKE_DELIVERY_LOCKS, (DELIVERY_LOCK_CLASS, chunk)).fetchall():
                self.tried_at[name] = now
                if taken:
                    self.tenants[name] = self._tenant(name, known[name], endpoints[name])
                    self.locked_elsewhere.discard(name)
                    want -= 1
                else:
                    self.locked_elsewhere.add(name)

    def _tenant(self, name: str, tenant: str, endpoint: tuple[str, str | None]) -> TenantWorker:
        if name not in self.tenant_metrics:
            self.tenant_metrics[name] = self.metrics.member({"target": name, "pattern": self.pattern})
        worker = TenantWorker(self.dsn, self._tenant_settings(name), self.pattern, tenant, self.tenant_metrics[name],
                              self.layout_cache, self._count_rows, self.open_targets)
        # What its first visit would otherwise ask Postgres for (two transactions), the same for every tenant.
        worker.endpoint = endpoint
        worker.source_id = f"{self.source_id}/{name}"
        return worker

    def _count_rows(self, rows: int) -> None:
        with self._rows_lock:
            self._rows_since_vacuum += rows

    # -- scheduling ----------------------------------------------------------------------------------------------

    def _refresh_pending(self, force: bool = False) -> None:
        """Mark the tenants with pending events as due (at most every PENDING_EVERY_SECONDS unless ``force``).

        Not while enough tenants are due already to keep the pool busy: the walk over the outbox's tenants
        costs a probe per tenant with events (tens of ms with a thousand), and a scheduler asking every 50 ms
        spent most of its time there instead of handing out steps. A tenant that got events after its visit
        is found by the walk once the due ones have been served (least recently served first anyway).
        Only tenants that would be stepped now count: one waiting out its backoff, or failing (at most half of
        the threads serve those), keeps no thread busy, and counting them starved the healthy tenants while
        a few databases were down (tests/test_tenant_batch_attacks.py)."""
        now = time.monotonic()
        if not force and now - self._pending_at < PENDING_EVERY_SECONDS:
            return
        if not force and sum(1 for t in self.tenants.values()
                             if t.due and not t.running and not t.attempts and t.code is None
                             and t.not_before <= now) >= self._queued_max():
            return
        self._pending_at = now
        assert self.conn is not None
        for (value,) in self.conn.execute(PENDING_TENANTS, {"layouts": self.layouts}).fetchall():
            tenant = self.tenants.get(self.pattern.replace("%s", value))
            if tenant is not None:
                tenant.due = True

    def _collect(self) -> None:
        """Take the results of the steps and jobs that ended."""
        now = time.monotonic()
        for name, future in list(self.running.items()):
            if not future.done():
                continue
            del self.running[name]
            tenant = self.tenants.get(name)
            orphan = self.orphans.pop(name, None)
            if tenant is None or (orphan is not None and orphan is not tenant):
                if orphan is not None:
                    orphan.running = False
                    orphan.close_target()
                continue
            tenant.running = False
            try:
                again = future.result()
                if isinstance(again, dict):  # a round's: each tenant's own outcome
                    again = again[name]
                    if isinstance(again, Exception):
                        raise again
            except Exception as exc:  # a tenant's failure is reported, never the other tenants' problem
                event(log, logging.ERROR, "tenant_failed", target=name, error=repr(exc))
                tenant.close_target()
                tenant.recovered = False
                tenant.attempts += 1
                tenant.code = EXIT_FATAL
                again = self.settings.retry_max_delay
            if tenant.code is not None:
                self._codes[name] = tenant.code
                if self.once:
                    tenant.due = False
                    continue
                # Running on: a tenant that stopped is tried again later (its error stays in pgturso.status).
                tenant.code = None
                again = self.settings.retry_max_delay
            if again is not None:
                tenant.due = True
                tenant.not_before = now + again
        if self.job is not None and self.job.done():
            job, self.job = self.job, None
            try:
                copying = job.result()
                if copying and not self.copying:
                    self._copy_started_at = now
                self.copying = copying
                if self._copy_refused is not None and (copying or not self._copy_pending()):
                    self._copy_refused = None  # the copy got past the refused rows (or was dropped)
                    self._job_outbox().record_state("delivering", clear_error=True)
            except psycopg.errors.RaiseException as exc:  # pgturso's own check refused the chunk's rows
                self._refuse_copy(exc, now)
            except (psycopg.Error, PgTursoError) as exc:  # e.g. a lost connection, a race: tried again soon
                event(log, logging.WARNING, "retry", target=self.pattern, job="copy", error=str(exc).strip())
                self._copy_checked = now + self.settings.retry_base_delay

    def _job_outbox(self) -> Outbox:
        """The pattern's own row of pgturso.delivery_state, on the scheduler's connection."""
        assert self.conn is not None
        return Outbox(self.conn, batch_rows=1, batch_events=1, target=self.pattern)

    def _refuse_copy(self, exc: psycopg.Error, now: float) -> None:
        """A copy chunk that pgturso's own checks refused (a RAISE) for what the rows hold (e.g. a tenant value
        that makes no host name: pgturso._register_tenants): retrying alone cannot mend it, and until it is
        mended no tenant of the pattern gets the copy. Shown on the pattern's row of pgturso.status with the
        table and the fix (the error's hint); --once stops with EXIT_FATAL instead of trying forever; a running
        worker tries again every retry_max_delay (the copy resumes once the rows, or the tenants' URLs, are
        fixed)."""
        error = (exc.diag.message_primary or str(exc)).strip()
        if exc.diag.message_hint:
            error += f" (hint: {exc.diag.message_hint})"
        event(log, logging.ERROR, "copy_refused", target=self.pattern, error=error)
        self._copy_refused = error
        self.copying = False
        self._copy_checked = now + self.settings.retry_max_delay
        if self.once:
            self._codes[self.pattern] = EXIT_FATAL
        assert self.conn is not None
        row = self.conn.execute(COPYING_TABLE, (self.pattern,)).fetchone()
        try:
            self._job_outbox().record_error("blocked", error, table=row[0] if row else None)
        except psycopg.Error as record_exc:  # the log has it; the next refusal records it
            event(log, logging.WARNING, "state_not_recorded", target=self.pattern, error=str(record_exc).strip())

    def _queued_max(self) -> int:
        return self.threads * STEPS_QUEUED_PER_THREAD

    def _tasks(self) -> int:
        """The steps, rounds and closes handed to the pool and not collected yet (a round runs many tenants)."""
        return len({id(future) for future in self.running.values()})

    def _capacity(self) -> int:
        """How many more steps (or jobs) may be handed to the pool now."""
        return self._queued_max() - self._tasks() - (self.job is not None)

    def _dispatch(self) -> None:
        now = time.monotonic()
        free = self._capacity()
        if free <= 0:
            return
        if self.job is None and self._job_due(now):
            self.job = self.pool.submit(self._run_job)
            free -= 1
        # During an initial copy every chunk brings each tenant a few rows: let them gather into larger batches
        # (COPY_STEP_SECONDS).
        gathered = now - COPY_STEP_SECONDS if self.copying else now
        if self.copying and self._copy_started_at > gathered:
            return  # the copy started less than COPY_STEP_SECONDS ago: no tenant visit yet
        ready = [t for t in self.tenants.values()
                 if t.due and not t.running and t.code is None and t.not_before <= now and t.served_at <= gathered]
        if not ready:
            return
        ready.sort(key=lambda t: t.served_at)
        # Tenants that are failing (slow or down databases) may take at most half of the threads.
        failing_allowed = max(1, self.threads // 2) - sum(1 for n in self.running
                                                          if n in self.tenants and self.tenants[n].attempts)
        # More ready than steps to hand out: rounds of several tenants each, first visits included (a failing
        # tenant and one whose database is not a local file go alone: a round sends to its tenants in turn, and
        # a network database that hangs must not hold back the others' deliveries).
        per_round = min(ROUND_TENANTS, max(1, len(ready) // max(free, 1)))
        round_: list[TenantWorker] = []
        for tenant in ready:
            if free <= 0:
                break
            if tenant.attempts:
                if failing_allowed <= 0:
                    continue
                failing_allowed -= 1
            tenant.due = False
            tenant.running = True
            tenant.served_at = now
            if per_round > 1 and self._may_share_a_round(tenant):
                round_.append(tenant)
                if len(round_) < per_round:
                    continue
                future = self.pool.submit(self._run_round, round_)
                for member in round_:
                    self.running[member.settings.target] = future
                round_ = []
            else:
                self.running[tenant.settings.target] = self.pool.submit(self._run_step, tenant)
            free -= 1
        if round_:
            future = self.pool.submit(self._run_round, round_)
            for member in round_:
                self.running[member.settings.target] = future

    @staticmethod
    def _may_share_a_round(tenant: TenantWorker) -> bool:
        # A first visit too: it recovers (reading its marker only through a synced target, FileTarget.query) and
        # its batch is then made durable with the round's, before the round's deletion, as any other's.
        return not tenant.attempts and tenant.isolating_until is None and tenant.endpoint[0].startswith("file:")

    def _run_step(self, tenant: TenantWorker) -> float | None:
        try:
            again = tenant.step(self._pool_connection, self.once)
            if self.open_targets.count > MAX_OPEN_TARGETS:
                # Busy with more tenants than connections may stay open: a tenant done for now closes its own
                # (the scheduler's closes of idle ones wait for a free thread, which a busy pool never has).
                tenant.close_target()
            return again
        finally:
            self.woken.set()

    def _run_round(self, tenants: list[TenantWorker]) -> dict[str, float | Exception | None]:
        """Step several tenants on one pool connection: read every one's batch in one statement, send each to its
        database in turn, and delete the batches Turso committed in one statement. Each tenant's outcome is its
        own (as its step's would be): one whose read did not fit a batch is stepped the general way, one whose
        send failed keeps its events (left out of the deletion) and waits out its own backoff; a failed deletion
        is every sent tenant's failure, each recovering from the marker on its database at its next visit."""
        outcomes: dict[str, float | Exception | None] = {}
        try:
            reads: list[tuple[bool, Batch | None] | None] = [None] * len(tenants)
            try:
                conn = self._pool_connection()
                for tenant in tenants:
                    tenant.attach(conn)
                reads = list(read_whole_batches(conn, [t.outbox for t in tenants]))  # type: ignore[misc]
            except psycopg.Error as exc:  # each tenant's own step reads again, and handles what it finds
                event(log, logging.DEBUG, "round_read_failed", target=self.pattern, error=str(exc).strip())
            deferred: list[Delivered] = []
            for tenant, read in zip(tenants, reads, strict=True):
                try:
                    outcomes[tenant.settings.target] = tenant.step(self._pool_connection, self.once, read, deferred)
                except Exception as exc:  # reported by _collect, as a step's own exception
                    outcomes[tenant.settings.target] = without_traceback(exc)
                # Its commit's fsync starts now, beside the round's next sends (it was a quarter of a round's
                # time waited for after the last send: bench 11b's profile, BENCHMARKS.md session 10); the
                # deletion still waits for every one (_sync_round).
                self._start_syncs(deferred)
                if self.open_targets.count > MAX_OPEN_TARGETS:
                    tenant.close_target()  # as _run_step does: at once, or rounds would hold 8 files each
            if deferred:
                deferred = self._sync_round(deferred, outcomes)
            if deferred:
                self._record_round(deferred, outcomes)
            return outcomes
        finally:
            self.woken.set()

    def _start_syncs(self, deferred: list[Delivered]) -> list[Delivered]:
        """Start, side by side on the syncer pool, the fsync of every batch of ``deferred`` that needs one and has
        none running yet; returns the batches that need one (each now with its ``syncing``)."""
        pending = [item for item in deferred if item.durable is not None]
        for item in pending:
            if item.syncing is None:
                item.syncing = self.syncer.submit(_sync, item)
        return pending

    def _sync_round(self, deferred: list[Delivered], outcomes: dict[str, float | Exception | None]) -> list[Delivered]:
        """Make the round's commits durable: fsync every tenant's WAL side by side (concurrent fsyncs share the
        filesystem's journal commits: a visit's four fsyncs in series cost more than a round's in parallel),
        each started when its commit returned (_run_round) and awaited here.
        Returns the batches now durable, whose events may be deleted; a tenant whose fsync failed keeps its
        events (its failure, as a failed send: it recovers from its marker, fsynced first, at its next visit)."""
        pending = self._start_syncs(deferred)
        if not pending:
            return deferred
        failures = {id(item): item.syncing.result() for item in pending}  # type: ignore[union-attr]
        # First visits that created their files: each directory fsynced once for all of them, after their WALs.
        created: dict[str, list[Delivered]] = {}
        for item in pending:
            if failures[id(item)] is None and item.durable.directory is not None:  # type: ignore[union-attr]
                created.setdefault(item.durable.directory, []).append(item)  # type: ignore[union-attr]
        for directory, items in created.items():
            try:
                fsync_directory(directory)
            except OSError as exc:
                failure = TursoUnavailable(f"{directory}: the fsync of the directory of new tenant databases "
                                           f"failed ({exc}); their batches' events stay in the outbox")
                for item in items:
                    failures[id(item)] = failure
                continue
            for item in items:
                item.durable.directory_synced()  # type: ignore[union-attr]
        durable: list[Delivered] = []
        for item in deferred:
            failure = failures.get(id(item))
            if failure is None:
                durable.append(item)
                continue
            tenant = item.tenant
            tenant.attach(self._pool_connection())
            try:
                outcomes[tenant.settings.target] = tenant.failed(failure, self.once)
            finally:
                tenant.conn = None
                if tenant.outbox is not None:
                    tenant.outbox.conn = None  # type: ignore[assignment]
        return durable

    def _record_round(self, deferred: list[Delivered], outcomes: dict[str, float | Exception | None]) -> None:
        """Delete the round's delivered batches in one statement; then each is delivered (logged, counted)."""
        conn = self._pool_connection()
        try:
            removed = record_tenant_batches(conn, [(d.tenant.outbox, d.batch) for d in deferred])  # type: ignore[misc]
        except psycopg.Error as exc:
            for item in deferred:
                name = item.tenant.settings.target
                if not isinstance(exc, STEP_FAILURES):
                    item.tenant.recovered = False
                    outcomes[name] = without_traceback(exc)
                    continue
                item.tenant.attach(conn)
                try:
                    outcomes[name] = item.tenant.failed(exc, self.once)
                finally:
                    item.tenant.conn = None
                    if item.tenant.outbox is not None:
                        item.tenant.outbox.conn = None  # type: ignore[assignment]
            return
        for item in deferred:
            # Over the round's connection: a batch whose deletion found events gone (skip_transaction while Turso
            # had it) marks those skips delivered (Worker._delivered), and the tenant holds no connection now.
            item.tenant.attach(conn)
            try:
                item.tenant._delivered(item.batch, item.statements, item.started,
                                       removed[item.tenant.settings.target])
            finally:
                item.tenant.conn = None
                if item.tenant.outbox is not None:
                    item.tenant.outbox.conn = None  # type: ignore[assignment]

    def _job_due(self, now: float) -> bool:
        if now < self._copy_checked:
            return False
        with self._rows_lock:
            vacuum = self._rows_since_vacuum >= VACUUM_AFTER_ROWS and now - self._vacuumed_at >= VACUUM_EVERY_SECONDS
        return vacuum or self.copying or now - self._copy_checked >= COPY_CHECK_SECONDS

    def _run_job(self) -> bool:
        """The pattern's own work on a pool connection: vacuum the outbox when due, else queue one chunk of an
        initial copy (its events go to every tenant). Returns whether a copy is in progress."""
        try:
            conn = self._pool_connection()
            outbox = Outbox(conn, batch_rows=1, batch_events=1, target=self.pattern)
            now = time.monotonic()
            with self._rows_lock:
                vacuum = (self._rows_since_vacuum >= VACUUM_AFTER_ROWS
                          and now - self._vacuumed_at >= VACUUM_EVERY_SECONDS)
                if vacuum:
                    self._rows_since_vacuum, self._vacuumed_at = 0, now
            if vacuum:
                outbox.vacuum()
                return self.copying
            self._copy_checked = now
            try:
                chunk = outbox.copy_chunk(self.settings.copy_chunk_rows)
            except CopyDeferred as exc:  # stepped back from an application's lock: tried again next time
                event(log, logging.INFO, "copy_deferred", target=self.pattern, reason=str(exc))
                return True
            if chunk is None:
                return False
            table, copied, done, total = chunk
            event(log, logging.INFO, "copy", target=self.pattern, table=table, rows=copied, done=done,
                  total=total if total else "?")
            return True
        finally:
            self.woken.set()

    def _close_idle_targets(self) -> None:
        """Close the Turso connections of tenants idle for a while, and the least recently used beyond
        MAX_OPEN_TARGETS: an idle tenant holds no file handle or socket."""
        now = self._closed_at = time.monotonic()
        open_targets = sorted((t for t in self.tenants.values() if t.target is not None and not t.running),
                              key=lambda t: t.used_at)
        excess = len(open_targets) - MAX_OPEN_TARGETS
        free = self.threads - self._tasks() - (self.job is not None)
        for number, tenant in enumerate(open_targets):
            if free <= 0:
                break
            if number < excess or now - tenant.used_at > TARGET_IDLE_SECONDS:
                # On a pool thread, as a step of the tenant: closing a file database checkpoints it (a write).
                tenant.running = True
                self.running[tenant.settings.target] = self.pool.submit(self._run_close, tenant)
                free -= 1

    def _run_close(self, tenant: TenantWorker) -> None:
        try:
            tenant.close_target()
        finally:
            self.woken.set()

    def _show_idle(self) -> None:
        """Show the tenants that delivered and have nothing pending as idle in pgturso.status, in one statement."""
        idle = [t for t in self.tenants.values() if not (t.shown_idle or t.due or t.running or t.code is not None)]
        if idle and self.conn is not None:
            self.conn.execute(RECORD_IDLE, {"names": [t.settings.target for t in idle]})
            for tenant in idle:
                tenant.shown_idle = True
                tenant._last_status = "idle"

    def _has_work(self, now: float) -> bool:
        return self.copying or any(t.due and t.code is None and t.not_before <= now for t in self.tenants.values())

    def _sleep_until_changes(self) -> None:
        """Nothing to do: sleep holding the pattern tables' wake locks (writers then NOTIFY) until a NOTIFY, the
        next backoff to expire, the next scan or idle_wait."""
        assert self.conn is not None and self.layout_cache is not None
        now = time.monotonic()
        waits = [t.not_before for t in self.tenants.values() if t.due and t.code is None]
        deadline = min([now + self.settings.idle_wait, self._scanned_at + SCAN_SECONDS, *waits])
        outbox = self.layout_cache
        self._show_idle()
        held, all_taken = outbox.take_wake_locks()
        try:
            if not all_taken:
                # A writer that found us busy holds its table's lock until it commits, or another worker of the
                # pattern sleeps holding them (its NOTIFY reaches us too): look again shortly.
                notified(self.conn, min(max(deadline - now, 0.0), PENDING_EVERY_SECONDS * 2))
                return
            self._refresh_pending(force=True)  # committed before we held the locks, without a NOTIFY
            if self._has_work(time.monotonic()):
                return
            while not self.stopping and time.monotonic() < deadline:
                if notified(self.conn, min(PENDING_EVERY_SECONDS if self.router else 1.0,
                                           max(deadline - time.monotonic(), 0.0))) or self.routed.is_set():
                    self._scanned_at = 0.0 if self.routed.is_set() else self._scanned_at
                    self.routed.clear()
                    self._refresh_pending(force=True)
                    return
        finally:
            outbox.release_wake_locks(held)

    def _wait_for_steps(self) -> None:
        """Busy: wait for a step to end (or the next look for pending tenants); consume NOTIFYs meanwhile."""
        self.woken.wait(PENDING_EVERY_SECONDS)
        self.woken.clear()
        if self.routed.is_set():
            self.routed.clear()
            self._scanned_at = 0.0  # new tenants, maybe
            self._refresh_pending(force=True)
        assert self.conn is not None
        notified(self.conn, 0)

    def run(self, once: bool = False) -> int:
        self.once = once
        event(log, logging.INFO, "starting", target=self.pattern, once=once, threads=self.threads)
        if self.settings.metrics_port:
            port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            event(log, logging.INFO, "metrics", listen=f"{self.settings.metrics_host}:{port}")
        try:
            while not self.stopping:
                try:
                    self._connect()
                    if not self._router_alive():
                        break
                    now = time.monotonic()
                    if now - self._scanned_at >= SCAN_SECONDS:
                        self._scan(once)
                        self._show_idle()
                    self._collect()
                    if self._capacity() > 0:
                        self._refresh_pending()
                        self._dispatch()
                    if now - self._closed_at >= 0.2:
                        self._close_idle_targets()
                    if self.running or self.job is not None or self._has_work(time.monotonic()):
                        self._wait_for_steps()
                    elif once:
                        if self._finished_once():
                            break
                        self._wait_for_steps()  # a tenant waits out its backoff
                    else:
                        self._sleep_until_changes()
                except psycopg.OperationalError as exc:
                    event(log, logging.WARNING, "retry", target=self.pattern, error=str(exc).strip())
                    self._lose_connection()
                    time.sleep(self.settings.retry_base_delay)
            return self._exit_code(once)
        except ConfigError as exc:
            event(log, logging.ERROR, "stopped", error=str(exc))
            return EXIT_FATAL
        finally:
            self._shut_down()

    def _route(self) -> None:
        """The router's thread: route the slot's batches as they come. A failure rolls back the batch being
        routed (its routing transaction): the router starts over from its marker (the last batch it routed),
        after a capped backoff with jitter (retry_base_delay doubling up to retry_max_delay), shown on the
        pattern's row of pgturso.target_status meanwhile (_router_failed). Whatever the exception: an
        unexpected one (a value it cannot decode, a bug) is logged with its traceback and shown 'blocked' with
        the fix, and stops a --once run (EXIT_FATAL); none ends this thread, whose end the scheduler would
        notice anyway (_router_alive)."""
        router = self.router
        assert router is not None
        gauges = self.metrics.member({"target": self.pattern, "pattern": self.pattern})  # the router's own
        gauged = 0.0
        failures = 0  # consecutive failed attempts
        while not self.stopping:
            try:
                if router.source is None and not router.start():
                    time.sleep(SCAN_SECONDS)  # another worker of the pattern routes it
                    continue
                if router.route_once():
                    self.routed.set()
                    self.woken.set()
                elif not self.stopping:
                    router.wait(0.2)
                if failures:
                    failures = 0
                    gauges.set("pgturso_up", 1)
                if self.metrics.serving and time.monotonic() - gauged >= 5:
                    gauged = time.monotonic()
                    held, retained, in_slot = router.backlog()
                    gauges.set("pgturso_held_events", held)
                    gauges.set("pgturso_wal_retained_bytes", retained)
                    gauges.set("pgturso_wal_pending_bytes", in_slot)
            except Exception as exc:  # every failure is shown, and retried or stops the run
                failures += 1
                if not self._router_failed(router, exc, failures, gauges):
                    return

    def _router_failed(self, router: Router, exc: Exception, failures: int, gauges: Metrics) -> bool:
        """Handle the router's ``failures``-th failure in a row: close it (its next start recovers from its
        marker), log and record the error, wait out the backoff. False when the worker stops instead (an
        unexpected error under --once, or retry_limit failures in a row)."""
        expected = isinstance(exc, (psycopg.Error, PgTursoError, NotYetVisible))
        try:
            router.close()
        except Exception as close_exc:  # the failure being handled is the one that matters
            event(log, logging.DEBUG, "close_failed", target=self.pattern, error=repr(close_exc))
        delay = backoff_delay(failures, self.settings.retry_base_delay, self.settings.retry_max_delay)
        gauges.add("pgturso_retries_total" if expected else "pgturso_errors_total")  # (as a tenant's failures)
        gauges.set("pgturso_up", 0)
        if expected:
            error, status = str(exc).strip() or type(exc).__name__, "retrying"
            event(log, logging.WARNING, "retry", target=self.pattern, job="route", attempt=failures,
                  delay_s=round(delay, 2), error=error)
        else:
            error, status = (f"stopped on an unexpected {type(exc).__name__}: {exc} HINT: no batch was half routed "
                             f"(it starts over from the last one it routed); the worker's log has the traceback "
                             f"(event router_failed): a pgturso bug to report, or a catalog row of "
                             f"pgturso.router edited by hand. Every tenant of {self.pattern} waits for "
                             f"it; it is tried again every retry_max_delay at most"), "blocked"
            event(log, logging.ERROR, "router_failed", target=self.pattern, attempt=failures,
                  delay_s=round(delay, 2), error=f"{type(exc).__name__}: {exc}")
            log.error("router of %s failed", self.pattern, exc_info=exc)
        self._record_router_failure(router, error, getattr(exc, "xid", None), status)
        limit = self.settings.retry_limit
        if (not expected and self.once) or (limit and failures > limit):
            # --once stops at an unexpected error (EXIT_FATAL); retry_limit failures in a row, whatever they
            # are, exhaust the retries (EXIT_RETRIES_EXHAUSTED, as docs/design.md says)
            code = EXIT_FATAL if not expected and self.once else EXIT_RETRIES_EXHAUSTED
            event(log, logging.ERROR, "giving_up", target=self.pattern, job="route", attempts=failures,
                  error=error)
            self._router_code = code
            self.stop()
            return False
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:  # a stop is not held up by the backoff
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        return True

    def _router_alive(self) -> bool:
        """The scheduler's look at the router's thread: one that ended while the worker runs (it never should:
        _route handles every exception) stops the worker with EXIT_FATAL instead of leaving its tenants waiting
        for changes that no longer come, unsaid."""
        if self.router_thread is None or self.router_thread.is_alive() or self.stopping:
            return True
        event(log, logging.ERROR, "router_died", target=self.pattern,
              error="the router's thread ended while the worker runs: no change is routed to its tenants")
        if self.router is not None:
            self._record_router_failure(self.router, "its thread ended while the worker ran (a pgturso bug: the "
                                        "worker's log has it) HINT: restart the worker", None, "blocked")
        self._router_code = EXIT_FATAL
        return False

    def _record_router_failure(self, router: Router, error: str, txid: int | None, status: str) -> None:
        """Show the router's failure on the pattern's row of pgturso.target_status (Router.record_failure). Not
        recording it is only logged: the log already has the failure, and Postgres may be what failed."""
        try:
            router.record_failure(error, txid, status=status)
        except Exception as record:
            event(log, logging.WARNING, "state_not_recorded", target=self.pattern, error=str(record).strip())

    def _finished_once(self) -> bool:
        """--once: nothing left for the tenants this worker holds? Look once more (new tenants included)."""
        if self.router is not None and (not self.router.caught_up or self.routed.is_set()):
            self.routed.clear()
            return False  # the router has not routed all there is yet (or the scheduler has not looked at it)
        if self.copying or (time.monotonic() < self._copy_checked and self._copy_refused is None):
            return False
        if any(t.due and t.code is None for t in self.tenants.values()):
            return False  # one waits out its backoff
        self._scan(once=True)
        self._refresh_pending(force=True)
        if self._has_work(time.monotonic()) or any(not t.recovered and t.code is None for t in self.tenants.values()):
            return False
        assert self.conn is not None
        return self._copy_refused is not None or not self._copy_pending()  # refused: shown, and the exit code

    def _copy_pending(self) -> bool:
        assert self.conn is not None
        return bool(self.conn.execute(COPYING, (self.pattern,)).fetchone()[0])  # type: ignore[index]

    def _exit_code(self, once: bool) -> int:
        if self._router_code is not None:
            return self._router_code
        codes = set(self._codes.values()) if once else set()
        if EXIT_FATAL in codes:
            return EXIT_FATAL
        if EXIT_RETRIES_EXHAUSTED in codes:
            return EXIT_RETRIES_EXHAUSTED
        if once and not self.tenants and self.locked_elsewhere:
            return EXIT_LOCKED
        return EXIT_OK

    def _shut_down(self) -> None:
        self.stopping = True
        if self.router_thread is not None:
            self.router_thread.join(timeout=10)  # it ends within a read of the stream (or a routing transaction)
        self.pool.shutdown(wait=True)  # each step ends within request_timeout
        self.syncer.shutdown(wait=True)
        self._collect()
        names = [name for name, t in self.tenants.items() if t.code is None or not self.once]
        if names and self.conn is not None and not self.conn.closed:
            try:
                self.conn.execute(RECORD_STOPPED, {"names": names})
            except psycopg.Error as exc:
                event(log, logging.WARNING, "state_not_recorded", status="stopped", error=str(exc).strip())
        for tenant in [*self.tenants.values(), *self.orphans.values()]:
            tenant.close_target()
        if self.router is not None and self.router_thread is not None and not self.router_thread.is_alive():
            self._close_router(self.router)
        # (every pattern's, router or not: a trigger pattern has none, and a router still running is left to exit)
        with self._pool_lock:
            for conn in self._pool_conns:
                conn.close()
        if self.conn is not None:
            self.conn.close()
        self.metrics.close()

    def _close_router(self, router: Router) -> None:
        """The router's thread ended, and so did every write of this worker: if the router finds nothing more in
        the slot, record where (WalOutbox.record_caught_up: pgturso.status says in sync until a transaction
        commits after it), then close it.

        The thread may have ended a moment after routing a batch, before its next look found the slot empty:
        its routed rows (outbox inserts) come back through the slot as one more batch, routed to nobody. So
        it looks again, up to FINAL_LOOKS times while what it finds routes no row: without that look a running
        worker stopped that way recorded nothing, and status said not in sync although every change had
        arrived (the false 'not in sync' of 0f2ec97). Rows it does route now (committed since) stay queued for
        the next worker: nothing is recorded then, and status rightly says not in sync."""
        try:
            if router.source is not None:
                for _ in range(FINAL_LOOKS):
                    if router.caught_up or router.route_once():
                        break
                if router.caught_up:
                    router.source.record_caught_up()
        except Exception as exc:  # status then says what it said before: not in sync
            event(log, logging.WARNING, "caught_up_not_recorded", target=self.pattern, error=str(exc).strip())
        finally:
            router.close()
