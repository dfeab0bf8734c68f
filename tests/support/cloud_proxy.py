"""A proxy in front of a real tursodb that behaves like Turso Cloud where they differ, and injects faults.

Cloud accepts (and expects) the ``close`` request, hands out a baton for an open stream, and requires a
Bearer token; tursodb does none of these. Data still goes to, and is read back from, the real server.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class CloudProxy:
    def __init__(self, upstream: str, token: str, tls: tuple[Any, Any] | None = None) -> None:
        self.upstream = upstream
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.faults: list[tuple[int, str, str]] = []  # (status, content type, body) answered before forwarding
        self.stalls: list[float] = []  # seconds to hold a request before answering it (a slow or hung Turso)
        self.max_body: int | None = None  # larger requests get 413, as Turso Cloud's size limit does
        self.batons = 0
        self.too_large = 0
        self.rejected_sizes: list[int] = []
        self.rejected_bodies: list[Any] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.max_body is not None and len(raw) > proxy.max_body:
                    proxy.too_large += 1
                    proxy.rejected_sizes.append(len(raw))
                    proxy.rejected_bodies.append(json.loads(raw))
                    return self._send(413, "text/plain", "Payload Too Large")
                body = json.loads(raw)
                proxy.requests.append(body)
                proxy.auth_headers.append(self.headers.get("Authorization"))
                if proxy.stalls:
                    time.sleep(proxy.stalls.pop(0))
                    return self._send(504, "text/plain", "too late")
                if proxy.faults:
                    status, ctype, text = proxy.faults.pop(0)
                    return self._send(status, ctype, text)
                if self.headers.get("Authorization") != f"Bearer {proxy.token}":
                    return self._send(401, "text/plain", "Unauthorized: invalid token")
                requests_ = body["requests"]
                forward = [r for r in requests_ if r["type"] != "close"]
                answer = proxy._forward(forward)
                results = iter(answer["results"])
                answer["results"] = [
                    {"type": "ok", "response": {"type": "close"}} if r["type"] == "close" else next(results)
                    for r in requests_
                ]
                closes = any(r["type"] == "close" for r in requests_)
                if not closes:
                    proxy.batons += 1
                answer["baton"] = None if closes else f"baton-{proxy.batons}"
                self._send(200, "application/json", json.dumps(answer))

            def _send(self, status: int, ctype: str, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # (certificate, key): serve https
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _forward(self, requests_: list[dict[str, Any]]) -> dict[str, Any]:
        data = json.dumps({"requests": requests_}).encode()
        req = urllib.request.Request(f"{self.upstream}/v2/pipeline", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> CloudProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
