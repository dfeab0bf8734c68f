"""A proxy in front of a real tursodb that behaves like Turso Cloud (sqld) where they differ, and injects faults.

Data still goes to, and is read back from, the real tursodb; the proxy adds what sqld does around it (from
tursodatabase/libsql ``libsql-server/src/hrana/http``):

- a Bearer token, and the ``close`` request;
- streams: each stream is named by a baton that the proxy signs with a per-process random key and a sequence
  number. A baton from before a ``restart()``, of a stream that is gone, or used twice gets HTTP 400
  ("Received an invalid baton"); a stream idle longer than ``stream_expiry`` expires (its open transaction is
  rolled back) and its baton then gets ``expired_status`` (404 as in the new protocol; 500 STREAM_EXPIRED as sqld);
- the write lock: one stream at a time may hold a transaction. Another stream's request waits for it; once the
  holder has held it ``lock_timeout`` seconds, the waiter takes it: the holder's transaction is rolled back and
  its next request fails with TRANSACTION_TIMEOUT (sqld's 5-second rule);
- ``base_url``: answers can name another front end (``frontend()``) for the rest of the stream; a front end can
  die after serving a number of requests;
- faults: canned answers (with headers such as Retry-After), stalls, a null baton in the middle of a
  transaction, slow answers (the stream idles meanwhile), a size limit (413).

tursodb serves every client on one connection, so the proxy sends one request upstream at a time and keeps
other streams out while a stream holds a transaction, which is what makes the emulation of streams faithful.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

INVALID_BATON = "Received an invalid baton"


@dataclass
class Stream:
    seq: int
    last_used: float
    in_transaction: bool = False
    timed_out: bool = False  # its transaction was rolled back for holding the lock too long
    expired: bool = False


def _ends_or_starts_transaction(sql: str, state: bool) -> bool:
    word = sql.strip().split(None, 1)[0].upper() if sql.strip() else ""
    if word == "BEGIN":
        return True
    if word in ("COMMIT", "END", "ROLLBACK"):
        return False
    return state


def in_transaction_after(requests_: list[dict[str, Any]], results: list[dict[str, Any]], state: bool) -> bool:
    """Whether the upstream connection is inside a transaction after these requests ran (steps that ran only)."""
    for request, result in zip(requests_, results, strict=False):
        if result.get("type") != "ok":
            continue
        if request["type"] == "execute":
            state = _ends_or_starts_transaction(request["stmt"]["sql"], state)
        elif request["type"] == "batch":
            outcome = result["response"]["result"]
            for step, ran, error in zip(request["batch"]["steps"], outcome["step_results"],
                                        outcome["step_errors"], strict=True):
                if ran is not None and error is None:
                    state = _ends_or_starts_transaction(step["stmt"]["sql"], state)
    return state


class CloudProxy:
    def __init__(self, upstream: str, token: str | None, tls: tuple[Any, Any] | None = None, *,
                 lock_timeout: float = 5.0, stream_expiry: float = 10.0, expired_status: int = 404) -> None:
        self.upstream = upstream
        self.token = token  # None: no token required
        self.lock_timeout = lock_timeout
        self.stream_expiry = stream_expiry
        self.expired_status = expired_status
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.encryption_keys: list[str | None] = []
        # Answered before forwarding: (status, content type, body) or (status, content type, body, headers).
        self.faults: list[tuple[Any, ...]] = []
        self.stalls: list[float] = []  # seconds to hold a request before answering it 504 (a slow or hung Turso)
        self.answer_delays: list[float] = []  # seconds to delay answers that leave a stream open (it idles)
        self.slow_answers: list[float] = []  # seconds to delay the next answers, after Turso ran their requests
        self.holding = 0  # requests held by a stall or a delayed answer right now (the client waits for them)
        self._holding_lock = threading.Lock()
        self.request_delay = 0.0  # seconds each request takes on the way in (a slow link)
        self.max_body: int | None = None  # larger requests get 413, as Turso Cloud's size limit does
        self.null_batons = 0  # answers in the middle of a transaction to give without a baton (stream ended)
        self.restart_after: int | None = None  # restart after answering this many more mid-transaction requests
        self.base_url: CloudProxy.Frontend | None = None  # handed out for the rest of each stream while alive
        self.batons = 0
        self.too_large = 0
        self.rejected_sizes: list[int] = []
        self.rejected_bodies: list[Any] = []
        self.answers: list[int] = []  # HTTP status of every answer, in order
        self.timeouts = 0  # transactions rolled back for holding the lock too long
        self.restarts = 0
        self._key = os.urandom(32)
        self._streams: dict[int, Stream] = {}
        self._state = threading.Condition()
        self._upstream = threading.Lock()
        self._owner: int | None = None  # stream holding the write lock
        self._owner_since = 0.0
        self.main = self.Frontend(self, tls)

    # -- front ends --------------------------------------------------------------------------------------------

    class Frontend:
        """An HTTP server answering for the proxy (the main one, or another node a base_url points to)."""

        def __init__(self, proxy: CloudProxy, tls: tuple[Any, Any] | None = None, die_after: int | None = None
                     ) -> None:
            self.proxy = proxy
            self.die_after = die_after
            self.served = 0
            self.alive = True
            self._lock = threading.Lock()
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), proxy._handler(self))
            self.scheme = "http"
            if tls is not None:  # (certificate, key): serve https
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(str(tls[0]), str(tls[1]))
                self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
                self.scheme = "https"
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()

        @property
        def url(self) -> str:
            return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

        def serves(self) -> bool:
            """Whether a request that arrived is answered: a node that answered its die_after requests is dead
            from that moment, though its listening socket takes a moment to close (kill runs on a thread), so a
            request reaching it meanwhile gets no answer, as if the node had refused the connection."""
            with self._lock:
                return self.alive

        def served_one(self) -> None:
            """Count an answer, before it is sent: the node is dead (``alive`` False, so no answer names it as
            a base_url any more) by the time the client reads its last answer and sends the next request."""
            with self._lock:
                self.served += 1
                if self.die_after is None or self.served < self.die_after:
                    return
                self.alive = False
            threading.Thread(target=self.kill, daemon=True).start()

        def kill(self) -> None:
            self.alive = False
            self.server.shutdown()
            self.server.server_close()

    def frontend(self, die_after: int | None = None) -> CloudProxy.Frontend:
        return self.Frontend(self, die_after=die_after)

    @property
    def url(self) -> str:
        return self.main.url

    def __enter__(self) -> CloudProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.main.kill()

    # -- sqld's streams and write lock -------------------------------------------------------------------------

    def restart(self) -> None:
        """Like a sqld restart: a new baton key, every stream gone, open transactions rolled back."""
        with self._state:
            self._key = os.urandom(32)
            self._streams.clear()
            self._release(rollback=self._owner is not None)
            self.restarts += 1

    def _baton(self, stream_id: int, seq: int) -> str:
        payload = struct.pack(">QQ", stream_id, seq)
        return base64.b64encode(payload + hmac.new(self._key, payload, hashlib.sha256).digest()).decode()

    def _stream_of(self, baton: str) -> tuple[int, Stream] | tuple[int, str]:
        """The stream a baton names, or (status, message) of the answer sqld gives."""
        try:
            data = base64.b64decode(baton, validate=True)
        except ValueError:
            return 400, INVALID_BATON
        payload, mac = data[:16], data[16:]
        if len(data) != 48 or not hmac.compare_digest(mac, hmac.new(self._key, payload, hashlib.sha256).digest()):
            return 400, INVALID_BATON
        stream_id, seq = struct.unpack(">QQ", payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            return 400, INVALID_BATON
        if stream.expired:
            return self.expired_status, "The stream has expired due to inactivity"
        if stream.seq != seq:
            return 400, "Received a baton that has already been used"
        return stream_id, stream

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for stream_id, stream in self._streams.items():
            if not stream.expired and now - stream.last_used > self.stream_expiry:
                stream.expired = True
                if self._owner == stream_id:
                    self._release(rollback=True)

    def _release(self, rollback: bool) -> None:
        if rollback:
            self._upstream_rollback()
        if self._owner is not None and self._owner in self._streams:
            self._streams[self._owner].in_transaction = False
        self._owner = None
        self._state.notify_all()

    def _take_lock(self, stream_id: int) -> None:
        """Wait for the write lock; take it from a holder that has had it lock_timeout seconds (sqld's rule)."""
        while True:
            self._expire_idle()
            if self._owner in (None, stream_id):
                break
            if time.monotonic() - self._owner_since >= self.lock_timeout:
                holder = self._streams.get(self._owner)  # type: ignore[arg-type]
                if holder is not None:
                    holder.timed_out = True
                self.timeouts += 1
                self._release(rollback=True)
                break
            self._state.wait(0.05)
        if self._owner != stream_id:
            self._owner, self._owner_since = stream_id, time.monotonic()

    def _upstream_rollback(self) -> None:
        try:
            self._forward([{"type": "execute", "stmt": {"sql": "ROLLBACK"}}])
        except (OSError, ValueError):
            pass

    def _forward(self, requests_: list[dict[str, Any]]) -> dict[str, Any]:
        data = json.dumps({"requests": requests_}).encode()
        req = urllib.request.Request(f"{self.upstream}/v2/pipeline", data=data,
                                     headers={"Content-Type": "application/json"})
        with self._upstream, urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read())

    def hold(self, seconds: float) -> None:
        """Keep the client waiting ``seconds`` (counted in ``holding`` meanwhile)."""
        with self._holding_lock:
            self.holding += 1
        try:
            time.sleep(seconds)
        finally:
            with self._holding_lock:
                self.holding -= 1

    # -- one request -------------------------------------------------------------------------------------------

    def _answer(self, frontend: CloudProxy.Frontend, body: dict[str, Any], headers: Any
                ) -> tuple[int, str, str, dict[str, str], float]:
        """(status, content type, body, headers, seconds to wait before answering)."""
        self.requests.append(body)
        self.auth_headers.append(headers.get("Authorization"))
        self.encryption_keys.append(headers.get("x-turso-encryption-key"))
        if self.stalls:
            self.hold(self.stalls.pop(0))
            return 504, "text/plain", "too late", {}, 0.0
        if self.faults:
            status, ctype, text, *extra = self.faults.pop(0)
            return status, ctype, text, (extra[0] if extra else {}), 0.0
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, "text/plain", "Unauthorized: invalid token", {}, 0.0
        if self.request_delay:
            time.sleep(self.request_delay)
        requests_ = body["requests"]
        closes = any(r["type"] == "close" for r in requests_)
        with self._state:
            self._expire_idle()
            if body.get("baton") is None:
                stream_id = int.from_bytes(os.urandom(8), "big")
                stream = Stream(seq=int.from_bytes(os.urandom(8), "big"), last_used=time.monotonic())
                self._streams[stream_id] = stream
            else:
                found = self._stream_of(body["baton"])
                if isinstance(found[1], str):
                    status, message = found
                    if status == 500:
                        return 500, "application/json", json.dumps({"message": message, "code": "STREAM_EXPIRED"}), \
                            {}, 0.0
                    return status, "text/plain", message, {}, 0.0
                stream_id, stream = found  # type: ignore[assignment]
            self._take_lock(stream_id)
            forward = [r for r in requests_ if r["type"] != "close"]
            if stream.timed_out:
                stream.timed_out = False
                answer = {"results": [_timed_out(r) for r in forward]}
            else:
                try:
                    answer = self._forward(forward)
                except (OSError, ValueError) as exc:  # upstream down: the stream and its transaction are gone
                    self._streams.pop(stream_id, None)
                    self._release(rollback=False)
                    return 502, "text/plain", f"upstream failed: {exc}", {}, 0.0
            stream.in_transaction = in_transaction_after(forward, answer["results"], stream.in_transaction)
            ends = closes
            if not closes and stream.in_transaction and self.null_batons:
                self.null_batons -= 1  # the server ends the stream in the middle of the transaction
                ends = True
            if ends:
                self._streams.pop(stream_id, None)
                if self._owner == stream_id:
                    self._release(rollback=stream.in_transaction)
            elif not stream.in_transaction and self._owner == stream_id:
                self._release(rollback=False)
            results = iter(answer["results"])
            answer["results"] = [
                {"type": "ok", "response": {"type": "close"}} if r["type"] == "close" else next(results)
                for r in requests_
            ]
            delay = 0.0
            if ends:
                answer["baton"] = None
                answer["base_url"] = None
            else:
                stream.seq += 1
                self.batons += 1
                answer["baton"] = self._baton(stream_id, stream.seq)
                answer["base_url"] = self.base_url.url if self.base_url is not None and self.base_url.alive else None
                if stream.in_transaction and self.answer_delays:
                    delay = self.answer_delays.pop(0)
                if stream.in_transaction and self.restart_after is not None:
                    self.restart_after -= 1
                    if self.restart_after <= 0:
                        self.restart_after = None
                        self.restart()
            stream.last_used = time.monotonic()
            if self.slow_answers:  # Turso did it (committed, maybe); the client hears of it this much later
                delay = max(delay, self.slow_answers.pop(0))
        return 200, "application/json", json.dumps(answer), {}, delay

    def _handler(self, frontend: CloudProxy.Frontend) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if not frontend.serves():
                    self.close_connection = True  # dead: the request runs nowhere and gets no answer
                    return
                if proxy.max_body is not None and len(raw) > proxy.max_body:
                    proxy.too_large += 1
                    proxy.rejected_sizes.append(len(raw))
                    proxy.rejected_bodies.append(json.loads(raw))
                    return self._send(413, "text/plain", "Payload Too Large", {})
                status, ctype, text, headers, delay = proxy._answer(frontend, json.loads(raw), self.headers)
                if delay:
                    proxy.hold(delay)  # the answer is slow to arrive; the stream idles on the server meanwhile
                frontend.served_one()
                self._send(status, ctype, text, headers)

            def _send(self, status: int, ctype: str, text: str, headers: dict[str, str]) -> None:
                proxy.answers.append(status)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _timed_out(request: dict[str, Any]) -> dict[str, Any]:
    """sqld's answer to a request on a stream whose transaction it rolled back for holding the lock too long."""
    error = {"message": "Transaction timed-out", "code": "TRANSACTION_TIMEOUT"}
    if request["type"] == "batch":
        steps = len(request["batch"]["steps"])
        return {"type": "ok", "response": {"type": "batch", "result": {
            "step_results": [None] * steps, "step_errors": [error] * steps}}}
    return {"type": "error", "error": error}

