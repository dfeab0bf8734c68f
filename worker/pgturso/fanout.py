"""``pgturso-worker run --target 'tenant-%s'``: deliver to every tenant database of a pattern target.

Each tenant is a target of its own (a row of pgturso.target that pgturso._register_tenants created, with the
pattern's URL and token unless an add_target of that name overrides them) and is delivered by its own
``Worker`` on its own thread: its own connection, delivery lock, progress marker on its own database, commit
order, retries and backoff, and row in pgturso.delivery_state. So one tenant whose database is slow, down or
refusing a change holds back no other.

Several processes started for the same pattern share its tenants through Postgres alone: each holds a member
lock (one of ``MAX_MEMBERS`` advisory locks of the pattern), counts the members alive, and delivers at most its
fair share of the tenants, each under that tenant's delivery lock (``Worker._acquire_lock``). A process that
dies loses its locks with its connections; the others' next scan takes its tenants over (the progress
marker on each tenant's database fences a batch the dead process still had in flight).

Waking: the pattern worker holds the wake locks of the pattern's tables for as long as it runs, so every
capture on them sends a NOTIFY; one LISTEN connection rings a bell that all tenant workers wait on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from typing import Any

import psycopg

from .capture import WAKE_LOCK_CLASS
from .errors import ConfigError
from .logs import event
from .metrics import Metrics
from .settings import Settings
from .worker import EXIT_FATAL, EXIT_LOCKED, EXIT_OK, EXIT_RETRIES_EXHAUSTED, NOTIFY_CHANNEL, Worker, notified

log = logging.getLogger("pgturso.fanout")

MEMBER_LOCK_CLASS = int.from_bytes(b"pgtm", "big")
MAX_MEMBERS = 64
SCAN_SECONDS = 1.0

TENANTS = "SELECT name, tenant FROM pgturso.target WHERE pattern = %s ORDER BY name"
PATTERN_EXISTS = "SELECT EXISTS (SELECT 1 FROM pgturso.target WHERE name = %s)"
MEMBERS_ALIVE = """
    SELECT count(*) FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %(class)s::oid
      AND l.objid IN (SELECT hashtext(%(pattern)s || ':' || k)::oid FROM generate_series(0, %(max)s - 1) AS k)
"""
TAKE_MEMBER_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
TAKE_WAKE_LOCKS = """
    SELECT t.id FROM pgturso.tracked_table t
    WHERE t.target = %(pattern)s AND NOT (t.id = ANY (%(held)s::int[])) AND pg_try_advisory_lock(%(class)s, t.id)
"""
PENDING_TENANTS = """
    SELECT DISTINCT replace(%(pattern)s, '%%s', o.tenant) FROM pgturso.outbox o
    JOIN pgturso.layout l ON l.id = o.layout_id JOIN pgturso.tracked_table t ON t.id = l.table_id
    WHERE t.target = %(pattern)s AND o.tenant IS NOT NULL
"""
COPYING = "SELECT EXISTS (SELECT 1 FROM pgturso.tracked_table WHERE target = %s AND copy_state = 'copying')"


class Bell:
    """Rung on every NOTIFY; tenant workers wait for the next ring (or their idle timeout)."""

    def __init__(self) -> None:
        self._rung = 0
        self._cond = threading.Condition()

    @property
    def rung(self) -> int:
        return self._rung

    def ring(self) -> None:
        with self._cond:
            self._rung += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._rung != seen, timeout=timeout)


class TenantWorker(Worker):
    """A Worker for one tenant of a pattern: woken by the pattern worker's bell instead of its own LISTEN."""

    def __init__(self, dsn: str, settings: Settings, pattern: str, tenant: str, bell: Bell, metrics: Metrics) -> None:
        super().__init__(dsn, settings, pattern=pattern, tenant=tenant)
        self.bell = bell
        self.metrics = metrics.member(f'target="{settings.target}"')  # served by the pattern worker

    def _wait_for_changes(self) -> None:
        assert self.outbox is not None
        seen = self.bell.rung
        if self.outbox.any_pending():
            return
        deadline = time.monotonic() + self.settings.idle_wait
        while not self.stopping and time.monotonic() < deadline and self.bell.rung == seen:
            self.bell.wait(seen, min(0.5, self.settings.idle_wait))


class PatternWorker:
    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.pattern = settings.target
        self.stopping = False
        self.bell = Bell()
        self.threads: dict[str, tuple[threading.Thread, TenantWorker]] = {}
        self.codes: dict[str, int] = {}
        self.conn: psycopg.Connection[Any] | None = None
        self.wake_locks: list[int] = []
        self.tried_at: dict[str, float] = {}
        self.metrics = Metrics()  # one endpoint, a sample per tenant labelled target="…"

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            event(log, logging.INFO, "stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def stop(self) -> None:
        self.stopping = True
        for _thread, worker in list(self.threads.values()):
            worker.stopping = True
        self.bell.ring()

    def _tenant_settings(self, name: str) -> Settings:
        # The flags' URL and token are the pattern's business (pgturso.target); metrics are served by the pattern
        # worker, one labelled sample per tenant.
        return dataclasses.replace(self.settings, target=name, url=None, auth_token=None, auth_token_file=None,
                                   metrics_port=0)

    def _start(self, name: str, tenant: str, once: bool) -> None:
        worker = TenantWorker(self.dsn, self._tenant_settings(name), self.pattern, tenant, self.bell, self.metrics)

        def deliver() -> None:
            try:
                self.codes[name] = worker.run(once=once, standby=False)
            except Exception as exc:  # a tenant's failure is reported, never the other tenants' problem
                event(log, logging.ERROR, "tenant_failed", target=name, error=repr(exc))
                self.codes[name] = EXIT_FATAL

        thread = threading.Thread(target=deliver, name=f"pgturso-{name}", daemon=True)
        self.threads[name] = (thread, worker)
        thread.start()

    def _connect(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.dsn, autocommit=True, application_name="pgturso-worker-pattern")
            self.wake_locks = []
            if not self.conn.execute(PATTERN_EXISTS, (self.pattern,)).fetchone()[0]:  # type: ignore[index]
                raise ConfigError(f"there is no target named {self.pattern!r}; create it with SELECT "
                                  f"pgturso.add_target('{self.pattern}', 'libsql://…%s…', 'token')")
            for slot in range(MAX_MEMBERS):
                if self.conn.execute(TAKE_MEMBER_LOCK, (MEMBER_LOCK_CLASS, f"{self.pattern}:{slot}")).fetchone()[0]:  # type: ignore[index]
                    break
            self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self.conn

    def _scan(self, once: bool) -> None:
        """Start a worker for each tenant this process should deliver and is not delivering yet."""
        conn = self._connect()
        self.wake_locks += [r[0] for r in conn.execute(
            TAKE_WAKE_LOCKS, {"pattern": self.pattern, "held": self.wake_locks, "class": WAKE_LOCK_CLASS}).fetchall()]
        tenants = conn.execute(TENANTS, (self.pattern,)).fetchall()
        members = max(1, conn.execute(MEMBERS_ALIVE, {"class": MEMBER_LOCK_CLASS, "pattern": self.pattern,  # type: ignore[index]
                                                      "max": MAX_MEMBERS}).fetchone()[0])
        share = math.ceil(len(tenants) / members) if not once else len(tenants)
        for name, _ in list(self.threads.items()):
            thread, _worker = self.threads[name]
            if not thread.is_alive():
                del self.threads[name]
        # Running and not handed over yet; the ones holding their tenant's lock first, so the excess handed over
        # is made of those still starting (and perhaps about to find the tenant taken) before delivering ones.
        owned = sorted((name for name, (_thread, worker) in self.threads.items()
                        if self.codes.get(name) is None and not worker.stopping),
                       key=lambda name: (self.threads[name][1].locked_conn is None, name))
        for name in owned[share:]:  # more than a fair share (another worker joined): hand the rest over
            self.threads[name][1].stopping = True
        owned = owned[:share]
        # Least recently tried first: tenants another worker holds do not keep this one from the free ones.
        for name, tenant in sorted(tenants, key=lambda t: self.tried_at.get(t[0], 0.0)):
            if self.stopping or len(owned) >= share:
                break
            if once and self.codes.get(name) == EXIT_LOCKED:
                continue  # another worker delivers it
            if name not in self.threads:
                self.codes.pop(name, None)
                self.tried_at[name] = time.monotonic()
                self._start(name, tenant, once)
                owned.append(name)

    def run(self, once: bool = False) -> int:
        event(log, logging.INFO, "starting", target=self.pattern, once=once)
        if self.settings.metrics_port:
            port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            event(log, logging.INFO, "metrics", listen=f"{self.settings.metrics_host}:{port}")
        try:
            if once:
                return self._run_once()
            while not self.stopping:
                try:
                    self._scan(once=False)
                    deadline = time.monotonic() + SCAN_SECONDS
                    while not self.stopping and time.monotonic() < deadline:
                        assert self.conn is not None
                        if notified(self.conn, 0.2):
                            self.bell.ring()
                except psycopg.OperationalError as exc:
                    event(log, logging.WARNING, "retry", error=str(exc).strip())
                    self.conn = None
                    time.sleep(self.settings.retry_base_delay)
            return EXIT_OK
        except ConfigError as exc:
            event(log, logging.ERROR, "stopped", error=str(exc))
            return EXIT_FATAL
        finally:
            self.stop()
            for thread, _worker in list(self.threads.values()):
                thread.join(timeout=30)
            if self.conn is not None:
                self.conn.close()
            self.metrics.close()

    def _run_once(self) -> int:
        """Deliver everything committed for every tenant (new tenants that appear meanwhile included); tenants
        another worker delivers are left to it."""
        while not self.stopping:
            self._scan(once=True)
            for thread, _worker in list(self.threads.values()):
                thread.join()
            failed = [code for code in self.codes.values() if code not in (EXIT_OK, EXIT_LOCKED)]
            if failed:
                return EXIT_FATAL if EXIT_FATAL in failed else EXIT_RETRIES_EXHAUSTED
            assert self.conn is not None
            locked = {name for name, code in self.codes.items() if code == EXIT_LOCKED}
            known = {name for name, _ in self.conn.execute(TENANTS, (self.pattern,)).fetchall()}
            pending = {r[0] for r in self.conn.execute(PENDING_TENANTS, {"pattern": self.pattern}).fetchall()}
            copying = self.conn.execute(COPYING, (self.pattern,)).fetchone()[0]  # type: ignore[index]
            todo = ((known - set(self.codes)) | pending) - locked
            if not todo and not (copying and len(locked) < len(known)):
                return EXIT_LOCKED if self.codes and locked == set(self.codes) else EXIT_OK
            self.threads.clear()
            self.codes = {name: EXIT_LOCKED for name in locked}
        return EXIT_OK
