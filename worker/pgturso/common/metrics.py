"""Prometheus metrics of the worker (``--metrics-port``), in the text exposition format."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HELP = {
    "pgturso_backlog_events": ("gauge", "Outbox events not yet confirmed by Turso"),
    "pgturso_backlog_rows": ("gauge", "Rows in outbox events not yet confirmed by Turso"),
    "pgturso_lag_seconds": ("gauge", "Age of the oldest undelivered change"),
    "pgturso_rows_delivered_total": ("counter", "Rows delivered to Turso"),
    "pgturso_transactions_delivered_total": ("counter", "Source transactions delivered to Turso"),
    "pgturso_batches_total": ("counter", "Turso transactions committed"),
    "pgturso_retries_total": ("counter", "Retries after network errors, 429, 5xx or unreadable answers"),
    "pgturso_errors_total": ("counter", "Changes Turso refused, errors the server reported on a wal target's "
                                        "slot, and fatal errors"),
    "pgturso_up": ("gauge", "1 while this worker holds the delivery lock"),
    "pgturso_transaction_hold_seconds": ("gauge", "How long the last delivery kept its Turso transaction open"),
    "pgturso_batch_rows_limit": ("gauge", "Rows per delivery now (batch_rows, smaller while deliveries are slow)"),
    "pgturso_wal_retained_bytes": ("gauge", "WAL kept by a wal target's replication slot (0 in trigger capture)"),
    "pgturso_wal_pending_bytes": ("gauge", "WAL written since the position a wal target's worker (a wal pattern's "
                                           "router) confirmed: an upper bound of the changes still in its slot"),
    "pgturso_held_events": ("gauge", "A wal pattern's outbox events held for its router (not yet per tenant)"),
    "pgturso_replication_streaming": ("gauge", "1 while a wal target's worker holds its replication connection"),
}


def label_set(labels: dict[str, str]) -> str:
    """``{"target": "tenant-acme"}`` as the exposition format's ``target="tenant-acme"`` (values escaped)."""
    def escaped(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{name}="{escaped(value)}"' for name, value in labels.items())


class Metrics:
    def __init__(self, labels: str = "") -> None:
        self._values: dict[str, float] = {name: 0.0 for name in _HELP}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        # e.g. 'target="tenant-acme",pattern="tenant-%s"': one tenant's worker among a pattern's
        self.labels = labels
        self._members: list[Metrics] = []
        self._parent: Metrics | None = None

    @property
    def serving(self) -> bool:
        """Whether an endpoint shows these values (this one's, or for a member its pattern's): gauges that
        cost a query are only refreshed then."""
        return self._server is not None or (self._parent is not None and self._parent.serving)

    def member(self, labels: dict[str, str]) -> Metrics:
        """Metrics of one part (a tenant of a pattern target), served by this one's endpoint with labels. The
        same labels give the same part: a tenant's worker started again (handed over and back, restarted)
        carries on its counters, and the endpoint never shows one series twice."""
        labels = label_set(labels)
        with self._lock:
            for part in self._members:
                if part.labels == labels:
                    return part
            part = Metrics(labels)
            part._parent = self
            self._members.append(part)
        return part

    def _samples(self, name: str) -> list[str]:
        with self._lock:
            value = self._values[name]
        return [f"{name}{{{self.labels}}} {value:g}" if self.labels else f"{name} {value:g}"]

    def add(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[name] += amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = value

    def render(self) -> str:
        with self._lock:
            members = list(self._members)
        lines = []
        for name, (kind, text) in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for part in members or [self]:
                lines += part._samples(name)
        return "\n".join(lines) + "\n"

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics in a background thread; returns the port (useful with port 0 in tests)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="pgturso-metrics", daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
