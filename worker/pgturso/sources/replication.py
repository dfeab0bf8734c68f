"""A wal target's slot read over the streaming replication protocol (a ``replication=database`` connection).

``START_REPLICATION SLOT … LOGICAL`` makes a walsender decode the WAL once and continuously, in its own
process, while the worker encodes and sends what came before: decoding overlaps delivery, and nothing is
decoded twice (``pg_logical_slot_peek_binary_changes`` then ``pg_replication_slot_advance`` did). The
connection speaks COPY BOTH, through psycopg's libpq wrapper (``conn.pgconn``): psycopg 3 has no replication
API, and these few calls are all it takes.

The slot moves only when the worker says so: a standby status update reports as flushed the end of the last
batch Turso confirmed (``confirm``), never more, so the slot's ``confirmed_flush_lsn`` moves exactly as
``pg_replication_slot_advance`` moved it. A stream is read forward only: after anything went wrong with a
batch read from it, the worker opens a new one at the last confirmed position (``docs/design.md``).
"""

from __future__ import annotations

import select
import struct
import time
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from ..capture.sql import capture_settings_options
from ..common.postgres import connect
from ..common.quoting import quote_ident
from .pgoutput import replication_options_sql

# Microseconds between the Unix epoch and Postgres' (2000-01-01), for the status updates' clock.
_PG_EPOCH_US = 946_684_800 * 1_000_000
# The walsender ends a connection that said nothing for wal_sender_timeout (60 s by default): say where we
# are at least this often, even while a long batch keeps the worker busy.
STATUS_EVERY_SECONDS = 10.0
# A walsender that served the previous stream may still hold the slot for a moment after it closed.
SLOT_BUSY_SECONDS = 10.0
_BEGIN_COMMIT = frozenset(b"BC")


class StreamError(psycopg.OperationalError):
    """The server refused the slot's stream, or ended it with an error (a value it cannot decode, a publication
    gone, the slot in use or invalidated). Postgres is up: the worker shows the error in pgturso.status and the
    metrics, with the fix, and retries from the last position Turso confirmed (recovery looks at the slot)."""

    def __init__(self, slot: str, sqlstate: str | None, server_message: str) -> None:
        self.slot = slot
        self.sqlstate = sqlstate
        self.server_message = server_message
        super().__init__(f"replication slot {slot}: {server_message}; {_fix(slot, sqlstate, server_message)}")


def _fix(slot: str, sqlstate: str | None, message: str) -> str:
    """What to do about an error the walsender reported on ``slot``."""
    if sqlstate == "55006":  # object_in_use
        return (f"another process reads the slot: stop it (SELECT pg_terminate_backend(active_pid) FROM "
                f"pg_replication_slots WHERE slot_name = '{slot}'); the worker retries")
    if sqlstate == "55000" or "can no longer get changes" in message:  # invalidated
        return ("the slot was invalidated (max_slot_wal_keep_size): the worker recreates it and copies the "
                "target's tables again; raise max_slot_wal_keep_size or keep the worker running")
    if sqlstate == "42704" and "publication" in message:
        return ("a publication of pgturso was dropped and the slot cannot be decoded without it: untrack the "
                "target's tables (SELECT pgturso.untrack_table(...)), recreate the publication as CREATE EXTENSION "
                "pgturso made it, and track them again")
    if sqlstate == "42704":  # the slot itself
        return "the slot is gone: the worker recreates it and copies the target's tables again"
    return ("the server cannot decode the slot past this point: fix the cause it names (the worker retries from "
            "the last position Turso confirmed), or track the target's tables with capture => 'trigger'")


def _now_us() -> int:
    return int(time.time() * 1_000_000) - _PG_EPOCH_US


class ReplicationStream:
    """pgoutput messages of one slot, from ``start`` (0: the slot's confirmed position) on."""

    def __init__(self, dsn: str, slot: str, publications: str, start: int) -> None:
        self.slot = slot
        self.flushed = start  # reported to the server as written and flushed (what Turso has)
        self.idle_end = 0  # the WAL position of the last keepalive: decoded up to here, nothing more for us
        self._status_at = 0.0
        self.conn = _connect(dsn)
        self.pgconn = self.conn.pgconn
        options = replication_options_sql(publications)
        start_text = f"{start >> 32:X}/{start & 0xFFFFFFFF:X}"
        deadline = time.monotonic() + SLOT_BUSY_SECONDS
        while True:
            self.pgconn.send_query(
                f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {start_text} ({options})".encode())
            result = self.pgconn.get_result()
            if result is not None and result.status == pq.ExecStatus.COPY_BOTH:
                break
            while self.pgconn.get_result() is not None:  # an error result is followed by the end of results
                pass
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
            message = (result.error_message if result is not None else self.pgconn.error_message).decode().strip()
            if sqlstate == b"55006" and time.monotonic() < deadline:  # object_in_use: the last stream's walsender
                time.sleep(0.05)
                continue
            self.conn.close()
            if sqlstate is None:  # no answer: the connection is gone (Postgres down)
                raise psycopg.OperationalError(f"replication slot {slot}: {message}")
            # Whatever the reason (the slot was dropped, invalidated, is still held): the worker reconnects and
            # recovers, which looks at the slot again.
            raise StreamError(slot, sqlstate.decode(), message)

    def fileno(self) -> int:
        return self.pgconn.socket

    def read(self, timeout: float | None) -> bytes | None:
        """The next pgoutput message (a Begin or Commit as a memoryview); None if none arrived within
        ``timeout`` seconds (0: only what is here already; None: wait as long as it takes), or when a keepalive
        moved ``idle_end``."""
        size, data = self.pgconn.get_copy_data(1)
        if size > 0 and data[0] == 119:  # the common case first: a message had arrived already
            # Begin and Commit (two of a single-row transaction's three messages) are only read from: no copy.
            return data[25:] if data[25] in _BEGIN_COMMIT else bytes(data[25:])  # type: ignore[no-any-return]
        return self.read_after(size, data, timeout)

    def read_after(self, size: int, data: Any, timeout: float | None) -> bytes | None:
        """``read``, given what ``pgconn.get_copy_data(1)`` just returned when that was not a message that
        had arrived already (a caller inlines read's common case: a call per message counts)."""
        pgconn = self.pgconn
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if size > 0:
                kind = data[0]
                if kind == 119:  # 'w' XLogData: start, end, clock (8 bytes each), then the message
                    return bytes(data[25:])
                if kind == 107:  # 'k' keepalive: end, clock, reply requested
                    self.idle_end = max(self.idle_end, struct.unpack_from("!Q", data, 1)[0])
                    if data[17]:
                        self.send_status()
                    if timeout is not None:
                        return None  # the caller may be waiting for this position
            elif size == -1:
                sqlstate, reason = _why_the_stream_ended(pgconn)
                if sqlstate is None:
                    raise psycopg.OperationalError(f"replication slot {self.slot}: {reason}")
                raise StreamError(self.slot, sqlstate, reason)
            elif size < -1:
                raise psycopg.OperationalError(
                    f"replication slot {self.slot}: {pgconn.error_message.decode().strip()}")
            else:  # nothing received yet: wait for it
                if time.monotonic() - self._status_at > STATUS_EVERY_SECONDS:
                    self.send_status()
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                ready, _, _ = select.select([pgconn.socket], [], [], min(wait, STATUS_EVERY_SECONDS)
                                            if wait is not None else STATUS_EVERY_SECONDS)
                if ready:
                    pgconn.consume_input()
            size, data = pgconn.get_copy_data(1)

    def confirm(self, position: int) -> None:
        """Report everything up to ``position`` as flushed: the slot may release it (Turso has it)."""
        if position > self.flushed:
            self.flushed = position
            self.send_status()

    def send_status(self) -> None:
        # 'r': written, flushed, applied, clock, reply requested. Written is flushed too: a walsender sends a
        # keepalive (which tells the idle position) only while the client's written position is behind.
        self.pgconn.put_copy_data(struct.pack("!cQQQQB", b"r", self.flushed, self.flushed, self.flushed,
                                              _now_us(), 0))
        self.pgconn.flush()
        self._status_at = time.monotonic()

    def close(self) -> None:
        """End the stream, telling the server the last confirmed position first; never raises."""
        try:
            if not self.conn.closed:
                self.send_status()
                self.pgconn.put_copy_end()
                self.pgconn.flush()
        except (psycopg.Error, OSError):
            pass
        self.conn.close()


def _connect(dsn: str) -> psycopg.Connection[Any]:
    # The walsender writes each decoded value as its type's text form: under capture's settings, whatever the
    # server, database or role sets (DateStyle, extra_float_digits, ...), as the worker then reads them back.
    own = conninfo_to_dict(dsn).get("options")  # the DSN's options stay, ours come last and win
    options = f"{own} {capture_settings_options()}" if own else capture_settings_options()
    return connect(dsn, autocommit=True, replication="database",
                   application_name="pgturso-worker-replication", options=options)


def _why_the_stream_ended(pgconn: Any) -> tuple[str | None, str]:
    """The SQLSTATE (None if the server said nothing) and what the server said when it ended the stream: a
    walsender that stops decoding sends its error (the publication gone, a value it cannot decode, the slot
    invalidated) as the result that follows the copy."""
    reasons = []
    sqlstate = None
    while (result := pgconn.get_result()) is not None:
        message = (result.error_message or b"").decode(errors="replace").strip()
        if message:
            reasons.append(message)
            code = result.error_field(pq.DiagnosticField.SQLSTATE)
            sqlstate = sqlstate or (code.decode() if code else None)
    return (sqlstate, "; ".join(reasons)) if reasons else (None, "the server ended the stream")
