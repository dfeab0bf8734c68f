"""Worker settings: defaults, then postgresql.conf (``pgturso.*``), then ``PGTURSO_*`` environment, then flags.

One table (``SETTINGS``) defines every setting; the CLI flags, ``--help`` and docs/configuration.md follow it.
The auth token is deliberately not a ``pgturso.*`` setting: every role can SHOW those. Name a file that
holds it (``pgturso.auth_token_file``) or pass it through the environment or a flag.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    in_postgresql_conf: bool = True

    @property
    def guc(self) -> str:
        return f"pgturso.{self.name}"

    @property
    def env(self) -> str:
        return f"PGTURSO_{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text.lower()

    return parse


DEFAULT_URL = "file:pgturso.db"

SETTINGS: tuple[Setting, ...] = (
    Setting("url", None, str, "Turso URL: http(s)://, libsql:// or file:PATH (embedded; the default target's "
            f"default is {DEFAULT_URL})"),
    Setting("target", "default", str, "the named target to deliver to (pgturso.add_target); its URL and token "
            "come from pgturso.target unless given here. A pattern target (its name holds the tenant "
            "placeholder) delivers every tenant database of the pattern (see tenant_threads)"),
    Setting("auth_token", None, str, "Turso auth token (Bearer); never put it in postgresql.conf",
            in_postgresql_conf=False),
    Setting("auth_token_file", None, str, "file holding the Turso auth token"),
    Setting("encryption_key", None, str, "key of an encrypted Turso Cloud database (sent as the "
            "x-turso-encryption-key header); a secret like the token: never put it in postgresql.conf",
            in_postgresql_conf=False),
    Setting("encryption_key_file", None, str, "file holding the encryption key"),
    Setting("tls_ca_file", None, str, "CA bundle to verify https/libsql servers with (default: system CAs)"),
    Setting("batch_rows", 50_000, _positive_int, "rows per delivery (one Turso transaction), whole source "
            "transactions only: a larger one is delivered alone"),
    Setting("batch_events", 50_000, _positive_int, "outbox events per delivery"),
    Setting("copy_chunk_rows", 20_000, _positive_int, "rows per transaction of an initial copy (rows are "
            "locked FOR SHARE for that long)"),
    Setting("max_request_bytes", 8 << 20, _positive_int, "largest HTTP request; larger deliveries span requests"),
    Setting("max_statement_bytes", 1 << 20, _positive_int, "largest JSON argument of one statement"),
    Setting("request_timeout", 60.0, _positive_float, "seconds to wait for one Turso request"),
    Setting("max_transaction_seconds", 2.0, _positive_float, "longest a delivery may hold its Turso transaction "
            "open (Turso Cloud rolls back a transaction that holds the write lock 5 s while another client writes): "
            "slower batches make the next ones smaller"),
    Setting("idle_wait", 5.0, _positive_float, "seconds between checks when no NOTIFY arrives"),
    Setting("retry_base_delay", 0.5, _positive_float, "first retry delay in seconds (doubles, with jitter)"),
    Setting("retry_max_delay", 30.0, _positive_float, "cap of the retry delay in seconds"),
    Setting("retry_limit", 0, _non_negative_int, "retries before giving up; 0: forever (run), 3 (--once)"),
    Setting("tenant_threads", 8, _positive_int, "a pattern target's worker: tenant databases delivered at once, "
            "each by a thread with its own Postgres connection (one more connection watches the tenants); any "
            "number of tenants shares them. A visit mostly waits (fsyncs, Postgres), so more threads than cores "
            "pay off"),
    Setting("log_level", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Setting("log_format", "text", _choice("text", "json"), "log lines as key=value text or JSON"),
    Setting("metrics_port", 0, _non_negative_int, "serve Prometheus metrics on 127.0.0.1:PORT; 0: off"),
    Setting("metrics_host", "127.0.0.1", str, "address the metrics endpoint listens on"),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    url: str | None
    target: str
    auth_token: str | None
    auth_token_file: str | None
    encryption_key: str | None
    encryption_key_file: str | None
    tls_ca_file: str | None
    batch_rows: int
    batch_events: int
    copy_chunk_rows: int
    max_request_bytes: int
    max_statement_bytes: int
    request_timeout: float
    max_transaction_seconds: float
    idle_wait: float
    retry_base_delay: float
    retry_max_delay: float
    retry_limit: int
    tenant_threads: int
    log_level: str
    log_format: str
    metrics_port: int
    metrics_host: str
    # Where each value came from: "default", "postgresql.conf", "environment" or "flag".
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def token(self) -> str | None:
        """The auth token, read from auth_token_file when no token was given directly."""
        return _secret(self.auth_token, self.auth_token_file, "auth_token_file")

    def encryption(self) -> str | None:
        """The encryption key, read from encryption_key_file when no key was given directly."""
        return _secret(self.encryption_key, self.encryption_key_file, "encryption_key_file")


def _secret(value: str | None, path: str | None, setting: str) -> str | None:
    """A secret given directly, or read from the file named by ``setting``."""
    if value:
        return value
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read pgturso.{setting} {path!r}: {exc.strerror}") from None
    return None


def resolve(
    from_postgresql_conf: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the sources, later ones winning; raises ConfigError naming the source of a bad value."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        value, source = setting.default, "default"
        raw = from_postgresql_conf.get(setting.guc)
        if setting.in_postgresql_conf and raw not in (None, ""):
            value, source = raw, f"postgresql.conf {setting.guc}"
        if environ.get(setting.env):
            value, source = environ[setting.env], f"environment {setting.env}"
        if flags.get(setting.name) is not None:
            value, source = flags[setting.name], f"flag {setting.flag}"
        if isinstance(value, str) and source != "default":
            try:
                value = setting.parse(value)
            except ValueError as exc:
                raise ConfigError(f"bad value {value!r} for {setting.name} (from {source}): {exc}") from None
        values[setting.name] = value
        sources[setting.name] = source.split(" ")[0]
    names = {f.name for f in fields(Settings)} - {"sources"}
    return Settings(**{k: v for k, v in values.items() if k in names}, sources=sources)


@dataclass(frozen=True)
class ServerSetting:
    """A setting of the background workers, defined by pgturso.so (extension/supervisor/pgturso.c) and read by
    Postgres, not by the Python worker; tests/test_background_worker.py checks that the two agree."""

    name: str
    default: str
    reload: bool  # False: a restart applies it
    help: str


SERVER_SETTINGS: tuple[ServerSetting, ...] = (
    ServerSetting("database", "", False, "comma-separated: `db` (its default target) or `db/target` (a named "
                  "target); one background worker each; empty: none"),
    ServerSetting("enabled", "on", True, "off stops the background workers' Python processes until it is on again"),
    ServerSetting("python", "/usr/bin/python3", True, "the interpreter (and so the psycopg, requests, pyturso) "
                  "the background workers run; the pgturso package comes from the extension's directory"),
    ServerSetting("role", "", True, "role the background workers connect as; empty: the server's operating "
                  "system user"),
    ServerSetting("restart_delay", "5", True, "seconds before a background worker starts its Python process "
                  "again after it ended"),
)


# Placeholder settings (no module defines pgturso.*) are not listed in pg_settings: ask for each by name.
POSTGRESQL_CONF_QUERY = "SELECT name, current_setting(name, true) FROM unnest(%(names)s::text[]) AS name"
POSTGRESQL_CONF_NAMES = [s.guc for s in SETTINGS if s.in_postgresql_conf]


def markdown_table() -> str:
    """The settings as the table in docs/configuration.md (a test keeps the two identical)."""
    lines = [
        "| setting | postgresql.conf | environment | flag | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        guc = f"`{s.guc}`" if s.in_postgresql_conf else "— (never: every role can SHOW it)"
        default = "—" if s.default is None else f"`{s.default}`"
        lines.append(f"| {s.name} | {guc} | `{s.env}` | `{s.flag}` | {default} | {s.help} |")
    return "\n".join(lines) + "\n"


def server_markdown_table() -> str:
    """The background workers' settings as the second table in docs/configuration.md."""
    lines = ["| postgresql.conf | default | applied by | meaning |", "| --- | --- | --- | --- |"]
    for s in SERVER_SETTINGS:
        default = f"`{s.default}`" if s.default else "—"
        lines.append(f"| `pgturso.{s.name}` | {default} | {'reload' if s.reload else 'restart'} | {s.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table())
    print(server_markdown_table(), end="")
