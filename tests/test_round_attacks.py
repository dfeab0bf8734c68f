"""Attacks on the pattern worker's rounds (PatternWorker._run_round: several tenants' batches read in one statement,
each sent to its own `file:` database, the batches Turso committed deleted and counted in one statement). Each
tenant must get its own transactions in commit order, each write applied once (a Turso-side trigger counts them),
whatever happens to a round-mate: its database refuses a change, its backlog does not fit a batch, or the worker
dies before, during or after any of the round's sends; and its delivered counters must equal what it delivered.
Also the delivered counters (added by the statement that removes a batch's events) of a plain target whose
batch Turso refused and the worker isolated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import pending
from test_tenant_batch_attacks import (  # noqa: F401 (hooked_sends: a fixture)
    ROUND,
    Crash,
    a_recovered_round,
    assert_every_write_arrived_once,
    hooked_sends,
    items_pending,
)
from test_tenants import drain_pattern

COUNTED = ("SELECT target, transactions_delivered, rows_delivered FROM pgturso.delivery_state "
           "WHERE target = ANY (%s) ORDER BY target")
NAMES = [f"tenant-{t}" for t in ROUND]


def delivered_counts(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    return {target: (tx, rows) for target, tx, rows in conn.execute(COUNTED, (NAMES,)).fetchall()}


def counted_since(conn: psycopg.Connection[Any], before: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Per tenant: the transactions and rows counted delivered since ``before``."""
    return {t: (tx - before[t][0], rows - before[t][1]) for t, (tx, rows) in delivered_counts(conn).items()}


def forbid_own_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round's tenant must use the batch the round's statement read (else this is no test of the round)."""
    from pgturso.sources.outbox import Outbox

    def read_alone(self: Any) -> Any:
        raise AssertionError("a round's tenant read its own batch")

    monkeypatch.setattr(Outbox, "read_whole_batch", read_alone)


def test_a_round_mate_whose_database_refuses_a_change_keeps_its_events_and_delays_no_one(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """globex's database refuses its batch (a UNIQUE index there that Postgres has not: a constraint failure, not
    an outage). The round delivers acme's and initech's batches and deletes exactly those; globex keeps every
    event (nothing of its deleted that its Turso did not commit), is shown with an error naming the table, and
    delivers one transaction at a time; once the index is gone, everything arrives, each write once, and the
    counters equal what was delivered (the refused batch counted once, when it finally arrived)."""
    import turso as pyturso

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        acme, globex, initech = tenants
        db = pyturso.connect(str(tmp_path / "tenant-globex.db"))
        db.execute("CREATE UNIQUE INDEX one_of_each_item ON orders (item)")
        db.commit()
        db.close()
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        conn.execute("INSERT INTO orders VALUES (4, 'globex', 'g1'), (5, 'initech', 'i2')")  # g1 twice: refused
        conn.execute("INSERT INTO orders VALUES (6, 'globex', 'g3')")
        forbid_own_reads(monkeypatch)
        outcomes = pattern._run_round(tenants)
        monkeypatch.undo()
        assert outcomes["tenant-acme"] is None and outcomes["tenant-initech"] is None, outcomes
        assert isinstance(outcomes["tenant-globex"], float), outcomes
        assert items_pending(conn, "acme", "a1") == [] and items_pending(conn, "initech", "i1", "i2") == []
        assert items_pending(conn, "globex", "g1", "g3") == ["g1", "g3"]
        assert globex.isolating_until is not None and (acme.attempts, initech.attempts) == (0, 0)
        assert counted_since(conn, before) == {"tenant-acme": (1, 1), "tenant-globex": (0, 0),
                                               "tenant-initech": (2, 2)}
        # Still refused: one transaction at a time, the first (2, g1) arrives, the second (4, g1) does not.
        for _ in range(4):
            globex.step(pattern._pool_connection, False)
        assert items_pending(conn, "globex", "g1", "g3") == ["g1", "g3"]
        assert conn.execute("SELECT count(*) FROM pgturso.outbox WHERE tenant = 'globex'").fetchone()[0] == 2
        status, error = conn.execute("SELECT status, last_error FROM pgturso.delivery_state "
                                     "WHERE target = 'tenant-globex'").fetchone()
        assert status == "blocked" and "public.orders" in error and "fix the cause" in error, (status, error)
        globex.close_target()
        db = pyturso.connect(str(tmp_path / "tenant-globex.db"))
        db.execute("DROP INDEX one_of_each_item")
        db.commit()
        db.close()
        for _ in range(4):
            if globex.step(pattern._pool_connection, False) is None and pending(conn) == 0:
                break
        assert pending(conn) == 0
        assert counted_since(conn, before) == {"tenant-acme": (1, 1), "tenant-globex": (3, 3),
                                               "tenant-initech": (2, 2)}
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_round_mate_whose_backlog_does_not_fit_a_batch_is_delivered_the_general_way_within_the_round(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """globex's backlog is more than its batch limit: the round's read says so, globex streams a batch in its own
    transaction on the round's connection between acme's and initech's sends, and the round then deletes acme's
    and initech's batches. Each tenant's writes arrive once, in order, and are counted once."""
    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        globex = tenants[1]
        globex._set_batch_limits(globex.batch_rows, 2)
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        for n in range(2, 6):
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (%s, 'globex', %s)", (10 + n, f"g{n}"))
                conn.execute("UPDATE orders SET item = item || '+' WHERE id = 2")
        conn.execute("INSERT INTO orders VALUES (4, 'initech', 'i2')")
        forbid_own_reads(monkeypatch)
        outcomes = pattern._run_round(tenants)
        monkeypatch.undo()
        assert outcomes["tenant-acme"] is None and outcomes["tenant-initech"] is None, outcomes
        assert outcomes["tenant-globex"] == 0.0, outcomes  # more pending
        assert items_pending(conn, "acme", "a1") == [] and items_pending(conn, "initech", "i1", "i2") == []
        left = conn.execute("SELECT count(*) FROM pgturso.outbox WHERE tenant = 'globex'").fetchone()[0]
        assert 0 < left < 9, left
        counted = counted_since(conn, before)
        assert counted["tenant-acme"] == (1, 1) and counted["tenant-initech"] == (2, 2), counted
        while globex.step(pattern._pool_connection, False) is not None:
            pass
        assert pending(conn) == 0
        assert counted_since(conn, before) == {"tenant-acme": (1, 1), "tenant-globex": (5, 9),
                                               "tenant-initech": (2, 2)}
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


@pytest.mark.parametrize("dies", ["before the first send", "after the first send", "before the second send",
                                  "after the last send"])
def test_a_worker_dying_at_any_point_of_a_round_applies_each_batch_once_and_counts_it_once(
        conn, dsn, tmp_path: Path, hooked_sends, dies: str):  # noqa: F811
    """The worker dies (nothing of its own handling runs) at each point of a round of three tenants: before any
    send, after tenant 1's commit on Turso (its batch not deleted), as tenant 2's batch is about to go, after
    every tenant's commit and before the round's deletion. Nothing is deleted that its tenant's Turso did not
    commit; a fresh worker recovers each tenant from its own marker: each write applied once, and each tenant's
    delivered counters equal to its transactions and rows (counted once, by whoever removed the events)."""
    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        conn.execute("INSERT INTO orders VALUES (4, 'globex', 'g2'), (5, 'initech', 'i2'), (6, 'initech', 'i3')")
        sends = {"before": 0, "after": 0}
        at = {"before the first send": ("before", 1), "after the first send": ("after", 1),
              "before the second send": ("before", 2), "after the last send": ("after", 3)}[dies]

        def hook(when: str) -> Any:
            def run() -> None:
                sends[when] += 1
                if (when, sends[when]) == at:
                    raise Crash
                hooked_sends[when].append(run)
            return run

        hooked_sends["before"].append(hook("before"))
        hooked_sends["after"].append(hook("after"))
        with pytest.raises(Crash):
            pattern._run_round(tenants)
        assert sends["after"] == {"before the first send": 0, "after the first send": 1,
                                  "before the second send": 1, "after the last send": 3}[dies]
        # Nothing deleted, nothing counted: the round's deletion never ran.
        assert items_pending(conn, "acme", "a1") == ["a1"] and items_pending(conn, "globex", "g1", "g2") == [
            "g1", "g2"] and items_pending(conn, "initech", "i1", "i2", "i3") == ["i1", "i2", "i3"]
        assert counted_since(conn, before) == {name: (0, 0) for name in NAMES}
    drain_pattern(dsn)  # a fresh worker: each tenant recovered from its own marker
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)
    assert counted_since(conn, before) == {"tenant-acme": (1, 1), "tenant-globex": (2, 2), "tenant-initech": (2, 3)}


def test_a_rounds_late_deletion_after_another_worker_recovered_its_tenants_removes_and_counts_nothing(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A round's tenants all committed on Turso; before the round's one deletion runs, another worker (this one
    lost them: a lock lost, a hand-over) recovers each tenant from its marker, forgetting and counting those
    batches, and delivers newer transactions past them. The round's late deletion must remove nothing, count
    nothing, and leave every tenant's delivered_marker the other worker's; stepped again, this worker's stale
    tenants are fenced by the newer markers, recover, and deliver what came since: each write applied once, and
    each tenant's delivered counters equal to its transactions and rows."""
    import gc

    from pgturso.run import fanout

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        markers: dict[str, Any] = {}
        record = fanout.record_tenant_batches

        def another_worker_first(*args: Any) -> Any:
            for tenant in tenants:  # a file: database is one process's at a time
                tenant.close_target()
            gc.collect()
            conn.execute("INSERT INTO orders VALUES (4, 'acme', 'a2'), (5, 'globex', 'g2'), (6, 'initech', 'i2')")
            drain_pattern(dsn)
            markers.update(conn.execute("SELECT target, delivered_marker FROM pgturso.delivery_state "
                                        "WHERE target = ANY (%s)", (NAMES,)).fetchall())
            return record(*args)

        monkeypatch.setattr(fanout, "record_tenant_batches", another_worker_first)
        outcomes = pattern._run_round(tenants)
        monkeypatch.undo()
        assert markers and pending(conn) == 0, outcomes
        assert set(outcomes.values()) == {None}, outcomes
        # The late deletion: nothing removed, nothing counted again, the other worker's markers kept.
        assert counted_since(conn, before) == {name: (2, 2) for name in NAMES}
        assert dict(conn.execute("SELECT target, delivered_marker FROM pgturso.delivery_state "
                                 "WHERE target = ANY (%s)", (NAMES,)).fetchall()) == markers
        conn.execute("INSERT INTO orders VALUES (7, 'acme', 'a3'), (8, 'globex', 'g3'), (9, 'initech', 'i3')")
        for tenant in tenants:
            for _ in range(3):
                if tenant.step(pattern._pool_connection, False) is None and not items_pending(
                        conn, tenant.tenant, "a3", "g3", "i3"):
                    break
            tenant.close_target()
        assert pending(conn) == 0
        assert counted_since(conn, before) == {name: (3, 3) for name in NAMES}
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_one_thread_pattern_worker_sigkilled_mid_rounds_under_load_applies_every_tenants_rows_once(
        conn, dsn, tmp_path: Path):
    """One pool thread (two steps handed out at a time) for twelve tenants that writers keep busy, some of a
    writer's transactions spanning several tenants and a reference table: more tenants are ready than steps, so
    the worker steps them in rounds of up to four. The worker is SIGKILLed at random points several times (in a
    round's read, between its tenants' sends, before or in its deletion) and restarted: every tenant's database
    holds exactly its rows and each reference row, each written once (a Turso-side trigger counts them)."""
    import random
    import time

    from support.tenant_load import LedgerWriters
    from test_tenant_attacks import (
        assert_each_tenant_applied_its_rows_once,
        ledgers_and_notices_counted,
        start_pattern_worker,
        wait_until_drained,
    )

    tenants = [f"t{n:02d}" for n in range(12)]
    ledgers_and_notices_counted(conn, dsn, tmp_path, tenants)
    writers = LedgerWriters(dsn, tenants, most_tenants=4, most_rows=5, notice_chance=0.2, most_notices=3,
                            new_tenant_chance=0.0, pause=0.005)
    worker = start_pattern_worker(dsn, tenant_threads=1, retry_max_delay=0.5)
    rng = random.Random(11)
    try:
        writers.start()
        for _ in range(4):
            time.sleep(rng.uniform(1.5, 3.0))  # past the first visits (alone) of the twelve, into rounds
            worker.kill()
            worker = start_pattern_worker(dsn, tenant_threads=1, retry_max_delay=0.5)
        writers.stop()
        assert not writers.errors, writers.errors
        wait_until_drained(conn)
    finally:
        writers.stop()
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
    assert_each_tenant_applied_its_rows_once(conn, tmp_path, tenants)


@pytest.mark.parametrize("capture", ["trigger", "wal"], indirect=True)
def test_a_batch_turso_refused_then_isolated_and_delivered_is_counted_once(conn, dsn, turso, capture):
    """Turso refuses a batch (a UNIQUE index there that Postgres has not); the worker isolates it, delivering one
    transaction at a time up to the refused one, and is blocked there; once the index is gone the rest arrives.
    Every write is applied once (a Turso-side counter), and the target's and the table's delivered totals equal
    the transactions and rows committed: none counted for the refused tries, none twice across the isolation."""
    from conftest import run_worker
    from support.turso import install_apply_counter

    conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO items VALUES (100, 'first')")
    conn.execute("SELECT pgturso.track_table('items')")
    assert run_worker(dsn, turso.url).returncode == 0
    install_apply_counter(turso.url, "items")
    turso.query("CREATE UNIQUE INDEX one_of_each_v ON items (v)")
    totals = ("SELECT d.transactions_delivered, d.rows_delivered, s.rows_delivered FROM pgturso.delivery_state d, "
              "pgturso.table_state s WHERE d.target = 'default' AND s.table_id = (SELECT id FROM "
              "pgturso.tracked_table)")
    before = conn.execute(totals).fetchone()
    conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
    conn.execute("INSERT INTO items VALUES (3, 'a')")  # refused on Turso
    conn.execute("INSERT INTO items VALUES (4, 'c'), (5, 'd'), (6, 'e')")
    refused = run_worker(dsn, turso.url)
    assert refused.returncode != 0, refused.stderr
    assert turso.query("SELECT id FROM items ORDER BY id") == [[1], [2], [100]]
    status, error = conn.execute("SELECT status, last_error FROM pgturso.delivery_state "
                                 "WHERE target = 'default'").fetchone()
    assert status in ("blocked", "stopped") and "public.items" in error, (status, error)
    assert [a - b for a, b in zip(conn.execute(totals).fetchone(), before, strict=True)] == [1, 2, 2]
    turso.query("DROP INDEX one_of_each_v")
    assert run_worker(dsn, turso.url).returncode == 0
    assert turso.query("SELECT id, v FROM items ORDER BY id") == [
        [1, "a"], [2, "b"], [3, "a"], [4, "c"], [5, "d"], [6, "e"], [100, "first"]]
    assert turso.query("SELECT id FROM applied ORDER BY id") == [[1], [2], [3], [4], [5], [6]]
    assert [a - b for a, b in zip(conn.execute(totals).fetchone(), before, strict=True)] == [3, 6, 6]
    assert pending(conn) == 0


def run_round_skipping_acmes_transaction_after_its_send(conn, pattern, tenants, txid: str, sends,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one round whose first send (acme's) is followed, before the round's deletion, by skip_transaction of
    acme's transaction ``txid``: the skip finds its events (1) and every tenant's step succeeds."""
    skipped: list[int] = []

    def skip_acme_after_its_commit() -> None:
        skipped.append(conn.execute("SELECT pgturso.skip_transaction(%s::xid8, 'test', 'tenant-acme')",
                                    (txid,)).fetchone()[0])

    sends["after"].append(skip_acme_after_its_commit)  # the first send of the round: acme's
    forbid_own_reads(monkeypatch)
    outcomes = pattern._run_round(tenants)
    monkeypatch.undo()
    assert skipped == [1] and set(outcomes.values()) == {None}, (skipped, outcomes)


def test_a_round_mate_with_one_of_two_transactions_skipped_while_turso_had_its_batch_counts_both_delivered(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hooked_sends):  # noqa: F811
    """acme's round batch carries two transactions; its database commits it, and before the round's deletion
    skip_transaction removes one of them. Turso has both: acme counts two transactions and two rows delivered
    (the batch's own counts, as a target stepped alone counts it: KNOWN_OR_REMOVED_COUNTS), not only what the
    deletion found (one of each, before), and the skip says delivered (delivered_at)."""
    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1')")
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (5, 'acme', 'a5')")
            txid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        conn.execute("INSERT INTO orders VALUES (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        run_round_skipping_acmes_transaction_after_its_send(conn, pattern, tenants, txid, hooked_sends, monkeypatch)
        assert pending(conn) == 0
        assert counted_since(conn, before) == {"tenant-acme": (2, 2), "tenant-globex": (1, 1),
                                               "tenant-initech": (1, 1)}
        assert conn.execute("SELECT delivered_at IS NOT NULL FROM pgturso.skipped_transaction "
                            "WHERE txid = %s::xid8 AND target = 'tenant-acme'", (txid,)).fetchone()[0]
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_round_mate_whose_events_were_skipped_while_turso_had_its_batch_is_not_recopied_at_restart(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hooked_sends):  # noqa: F811
    """acme's batch is committed on its database; before the round's deletion, skip_transaction removes its one
    transaction's events (the worker holds no lock on them meanwhile). The batch was delivered all the same and
    acme's database has its marker: the round records it as acme's delivered marker (Postgres knew the batch
    before it as the last one, as RECORD_BATCH's ``follows`` rule says), so a restarted worker recovers acme by
    its marker and copies nothing again (no target_behind); every write arrives once, counted once."""
    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        before = delivered_counts(conn)
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1')")
            txid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        conn.execute("INSERT INTO orders VALUES (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        run_round_skipping_acmes_transaction_after_its_send(conn, pattern, tenants, txid, hooked_sends, monkeypatch)
        assert pending(conn) == 0
        assert counted_since(conn, before) == {"tenant-acme": (0, 0), "tenant-globex": (1, 1),
                                               "tenant-initech": (1, 1)}
        # The skip cannot unsend what acme's database committed: its record says so (Worker._delivered, as a
        # tenant stepped alone: tests/test_tenant_skips.py).
        assert conn.execute("SELECT delivered_at IS NOT NULL FROM pgturso.skipped_transaction "
                            "WHERE txid = %s::xid8 AND target = 'tenant-acme'", (txid,)).fetchone()[0]
    conn.execute("INSERT INTO orders VALUES (4, 'acme', 'a2')")
    restarted = drain_pattern(dsn)  # a fresh worker: each tenant recovered from its own marker
    assert "target_behind" not in restarted.stderr, restarted.stderr
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)
    assert counted_since(conn, before) == {"tenant-acme": (1, 1), "tenant-globex": (1, 1), "tenant-initech": (1, 1)}


def test_a_rounds_fsyncs_run_beside_its_next_sends_and_its_deletion_waits_for_every_one(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A round starts each tenant's fsync as soon as its commit returns, beside the round's next sends (so the
    round does not wait for every fsync after its last send), and still deletes no event before every fsync of
    the round has ended. acme's fsync is held until initech (the round's last tenant) committed: it must have
    started before that commit (else the round waited for nothing and this fails), and the round's deletion
    must come after it ended (else a batch whose commit was not durable would be forgotten in Postgres)."""
    import threading

    from pgturso.delivery import targets
    from pgturso.run import fanout

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        order: list[str] = []
        lock = threading.Lock()
        last_committed = threading.Event()

        def note(what: str) -> None:
            with lock:
                order.append(what)

        def tenant_of(path: str) -> str:
            return Path(path).name.removeprefix("tenant-").removesuffix(".db")

        commit, sync, record = targets.FileTransaction.commit, targets.PendingSync.sync, fanout.record_tenant_batches

        def noted_commit(self: Any) -> Any:
            result = commit(self)
            note(f"commit {tenant_of(self.target.path)}")
            if tenant_of(self.target.path) == "initech":
                last_committed.set()
            return result

        def held_sync(self: Any, **how: Any) -> Any:
            tenant = tenant_of(self.target.path)
            note(f"fsync {tenant} started")
            if tenant == "acme":
                assert last_committed.wait(60), "initech never committed"
            result = sync(self, **how)
            note(f"fsync {tenant} ended")
            return result

        def noted_deletion(*args: Any) -> Any:
            note("deletion")
            return record(*args)

        monkeypatch.setattr(targets.FileTransaction, "commit", noted_commit)
        monkeypatch.setattr(targets.PendingSync, "sync", held_sync)
        monkeypatch.setattr(fanout, "record_tenant_batches", noted_deletion)
        outcomes = pattern._run_round(tenants)
        monkeypatch.undo()
        assert outcomes == {"tenant-acme": None, "tenant-globex": None, "tenant-initech": None}, outcomes
        assert order.index("fsync acme started") < order.index("commit initech"), order
        assert order.index("deletion") > max(order.index(f"fsync {t} ended") for t in ROUND), order
        assert order.count("deletion") == 1, order
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def tenant_of_path(path: str) -> str:
    return Path(path).name.removeprefix("tenant-").removesuffix(".db")


def test_a_round_mate_whose_fsync_fails_and_another_whose_send_fails_both_keep_their_events(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hooked_sends):  # noqa: F811
    """In one round acme's fsync (started beside the round's next sends) fails and globex's send fails (Turso
    unavailable); initech's batch is durable. The round deletes initech's events only: acme's (committed on its
    Turso, not known durable) and globex's (never committed) stay, each counted nothing; their next visits
    deliver them, every write applied once and counted once."""
    from pgturso.common.errors import TursoUnavailable
    from pgturso.delivery import targets

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        conn.execute("INSERT INTO orders VALUES (4, 'acme', 'a2'), (5, 'globex', 'g2')")
        sync = targets.PendingSync.sync
        failed_syncs: list[str] = []

        def failing_sync(self: Any, **how: Any) -> Any:
            if tenant_of_path(self.target.path) == "acme" and not failed_syncs:
                failed_syncs.append("acme")
                sync(self, **how)  # its descriptor closed, as a real failure's
                raise TursoUnavailable("file:acme: the fsync that makes its last commits durable failed (EIO)")
            return sync(self, **how)

        sends = {"before": 0}

        def hook() -> None:
            sends["before"] += 1
            if sends["before"] == 2:  # globex's send
                raise TursoUnavailable("globex's Turso is down")
            hooked_sends["before"].append(hook)

        hooked_sends["before"].append(hook)
        monkeypatch.setattr(targets.PendingSync, "sync", failing_sync)
        forbid_own_reads(monkeypatch)
        outcomes = pattern._run_round(tenants)
        assert failed_syncs == ["acme"]
        assert outcomes["tenant-initech"] is None, outcomes
        assert isinstance(outcomes["tenant-acme"], float) and isinstance(outcomes["tenant-globex"], float), outcomes
        assert items_pending(conn, "acme", "a1", "a2") == ["a1", "a2"]
        assert items_pending(conn, "globex", "g1", "g2") == ["g1", "g2"]
        assert items_pending(conn, "initech", "i1") == []
        assert counted_since(conn, before) == {"tenant-acme": (0, 0), "tenant-globex": (0, 0),
                                               "tenant-initech": (1, 1)}
        monkeypatch.undo()
        outcomes = pattern._run_round(tenants)  # acme and globex recover from their markers, on their own
        assert set(outcomes.values()) == {None}, outcomes
        assert pending(conn) == 0
        assert counted_since(conn, before) == {"tenant-acme": (2, 2), "tenant-globex": (2, 2),
                                               "tenant-initech": (1, 1)}
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_round_closing_each_tenant_while_its_fsync_runs_deletes_only_what_the_fsync_made_durable(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Over MAX_OPEN_TARGETS, a round closes each tenant's database as soon as its step returned, while the fsync
    started for its commit still runs (held here until the round's last tenant committed and was closed). The
    fsync uses its own descriptor: it succeeds, the round deletes after every fsync ended, and the next round's
    visits (the files reopened) deliver more, each write once."""
    import threading

    from pgturso.delivery import targets
    from pgturso.run import fanout

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        before = delivered_counts(conn)
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        order: list[str] = []
        lock = threading.Lock()
        all_closed = threading.Event()
        close, sync, record = targets.FileTarget.close, targets.PendingSync.sync, fanout.record_tenant_batches

        def note(what: str) -> None:
            with lock:
                order.append(what)

        def noted_close(self: Any) -> None:
            close(self)
            note(f"close {tenant_of_path(self.path)}")
            if tenant_of_path(self.path) == "initech":
                all_closed.set()

        def held_sync(self: Any, **how: Any) -> Any:
            assert all_closed.wait(60), "the round never closed initech"
            result = sync(self, **how)
            note(f"fsync {tenant_of_path(self.target.path)} ended")
            return result

        def noted_deletion(*args: Any) -> Any:
            note("deletion")
            return record(*args)

        monkeypatch.setattr(fanout, "MAX_OPEN_TARGETS", -1)
        monkeypatch.setattr(targets.FileTarget, "close", noted_close)
        monkeypatch.setattr(targets.PendingSync, "sync", held_sync)
        monkeypatch.setattr(fanout, "record_tenant_batches", noted_deletion)
        outcomes = pattern._run_round(tenants)
        assert outcomes == {"tenant-acme": None, "tenant-globex": None, "tenant-initech": None}, outcomes
        assert all(t.target is None for t in tenants)
        assert order.index("deletion") > max(order.index(f"fsync {t} ended") for t in ROUND), order
        assert max(order.index(f"close {t}") for t in ROUND) < min(order.index(f"fsync {t} ended") for t in ROUND)
        assert pattern.open_targets.count == 0
        monkeypatch.undo()
        conn.execute("INSERT INTO orders VALUES (4, 'acme', 'a2'), (5, 'globex', 'g2'), (6, 'initech', 'i2')")
        outcomes = pattern._run_round(tenants)
        assert outcomes == {"tenant-acme": None, "tenant-globex": None, "tenant-initech": None}, outcomes
        assert counted_since(conn, before) == {name: (2, 2) for name in NAMES}
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)


def test_a_stop_while_a_rounds_fsync_runs_waits_for_it_and_deletes_only_after_it(
        conn, dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The worker is stopped (PatternWorker._shut_down, as SIGTERM does) while a round runs on the pool and acme's
    fsync, started beside the round's next sends, has not ended (held until the stop began). The stop waits for
    the round, the round for every fsync: no fsync is left running, the deletion comes after every fsync ended,
    and each write arrived once."""
    import threading

    from pgturso.delivery import targets
    from pgturso.run import fanout

    with a_recovered_round(conn, dsn, tmp_path) as (pattern, tenants):
        conn.execute("INSERT INTO orders VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1'), (3, 'initech', 'i1')")
        order: list[str] = []
        lock = threading.Lock()
        stop_began = threading.Event()
        sync, record, shutdown = targets.PendingSync.sync, fanout.record_tenant_batches, pattern.pool.shutdown
        syncs_running = [0]

        def note(what: str) -> None:
            with lock:
                order.append(what)

        def held_sync(self: Any, **how: Any) -> Any:
            with lock:
                syncs_running[0] += 1
            try:
                if tenant_of_path(self.target.path) == "acme":
                    assert stop_began.wait(60), "the stop never began"
                result = sync(self, **how)
                note(f"fsync {tenant_of_path(self.target.path)} ended")
                return result
            finally:
                with lock:
                    syncs_running[0] -= 1

        def noted_deletion(*args: Any) -> Any:
            note("deletion")
            return record(*args)

        def noted_shutdown(*args: Any, **kwargs: Any) -> None:
            note("stop began")
            stop_began.set()
            shutdown(*args, **kwargs)

        monkeypatch.setattr(targets.PendingSync, "sync", held_sync)
        monkeypatch.setattr(fanout, "record_tenant_batches", noted_deletion)
        monkeypatch.setattr(pattern.pool, "shutdown", noted_shutdown)
        round_ = pattern.pool.submit(pattern._run_round, tenants)
        pattern._shut_down()
        assert round_.done() and syncs_running[0] == 0
        assert round_.result() == {"tenant-acme": None, "tenant-globex": None, "tenant-initech": None}
        assert order.index("stop began") < order.index("fsync acme ended") < order.index("deletion"), order
        assert order.index("deletion") > max(order.index(f"fsync {t} ended") for t in ROUND), order
        monkeypatch.undo()
    assert_every_write_arrived_once(conn, tmp_path, *ROUND)
