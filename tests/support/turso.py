"""A real Turso server (``tursodb --sync-server``) on loopback, and an independent way to read it back.

The reader deliberately does not use pgturso's own Hrana code, so tests do not grade the worker with itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .pgcluster import free_port

DEFAULT_BINARY = Path(__file__).resolve().parents[2] / ".cache/turso/node_modules/.bin/tursodb"


def tursodb_binary() -> str:
    return os.environ.get("TURSODB") or str(DEFAULT_BINARY)


class TursoServer:
    def __init__(self, db_path: Path | None = None, port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgturso-turso-"))
        self.db_path = db_path or self.dir / "replica.db"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TursoServer:
        self.proc = subprocess.Popen(
            [tursodb_binary(), str(self.db_path), "--sync-server", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "server.log", "ab"),
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tursodb exited: {(self.dir / 'server.log').read_text()}") from None
                time.sleep(0.05)
        raise TimeoutError("tursodb did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, sql: str) -> list[list[Any]]:
        """Rows of a read-only query, values decoded to Python (blobs to bytes)."""
        return read_rows(self.url, sql)


def install_apply_counter(url: str, table: str) -> None:
    """On Turso only: count every write of a row of ``table`` (keyed by its ``id``) in a table ``applied``, so
    that a batch applied twice shows up even when the rows end up right."""
    read_rows(url, "CREATE TABLE applied (id INTEGER)")
    for when in ("INSERT", "UPDATE"):
        read_rows(url, f"CREATE TRIGGER count_{when.lower()} AFTER {when} ON {table} "
                       "BEGIN INSERT INTO applied VALUES (NEW.id); END")


def read_rows(url: str, sql: str) -> list[list[Any]]:
    body = json.dumps({"requests": [{"type": "execute", "stmt": {"sql": sql}}]}).encode()
    request = urllib.request.Request(f"{url}/v2/pipeline", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        result = json.loads(response.read())["results"][0]
    if result["type"] != "ok":
        raise RuntimeError(result["error"]["message"])
    return [[_value(v) for v in row] for row in result["response"]["result"]["rows"]]


def _value(v: dict[str, Any]) -> Any:
    kind = v["type"]
    if kind == "null":
        return None
    if kind == "integer":
        return int(v["value"])
    if kind == "float":
        return float(v["value"])
    if kind == "blob":
        data = v["base64"]
        return base64.b64decode(data + "=" * (-len(data) % 4))
    return v["value"]
