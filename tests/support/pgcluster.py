"""A throwaway PostgreSQL 15 cluster. initdb refuses to run as root, so as root it runs as ``postgres``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PgCluster:
    def __init__(self, settings: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="pgturso-pg-"))
        self.datadir = self.base / "data"
        self.logfile = self.base / "server.log"
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "100",
            "fsync": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }

    def _run(self, cmd: list[str]) -> None:
        subprocess.run(_as_postgres(cmd), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PgCluster:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self._run([str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", self.user, "--auth=trust",
                   "--encoding=UTF8", "--locale=C.UTF-8"])
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")
        self.pg_ctl("start", "-w", "-l", str(self.logfile))
        return self

    def pg_ctl(self, *args: str) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), *args])

    def restart(self) -> None:
        self.pg_ctl("restart", "-w", "-m", "fast", "-l", str(self.logfile))

    def set(self, key: str, value: str) -> None:
        """Append a setting to postgresql.conf (reload or restart to apply)."""
        subprocess.run(_as_postgres(["sh", "-c", f"echo \"{key} = {value}\" >> {self.datadir}/postgresql.conf"]),
                       check=True)
        self.pg_ctl("reload")

    def stop(self) -> None:
        try:
            self.pg_ctl("stop", "-m", "immediate", "-w")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              stdout=subprocess.DEVNULL).returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")
