"""How the worker connects to Postgres: every connection of it exchanges text as UTF-8.

Turso stores text as UTF-8, and psycopg decodes json/jsonb (the outbox's payloads, layouts) as UTF-8 whatever
the connection's encoding; a walsender writes decoded values in the connection's client_encoding. Left to
default, a LATIN1 or WIN1252 database's bytes would be read as UTF-8 (a UnicodeDecodeError, or the wrong
characters). Asking for UTF8 makes Postgres convert, as it does for any client; a database encoding with no
conversion to UTF-8 (SQL_ASCII) is refused at track_table (pgturso._check_encoding)."""

from __future__ import annotations

from typing import Any

import psycopg

CLIENT_ENCODING = "UTF8"


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """``psycopg.connect`` with ``client_encoding`` UTF8 (a startup parameter: it wins over the DSN's
    ``options`` and over ALTER DATABASE / ROLE settings)."""
    return psycopg.connect(dsn, client_encoding=CLIENT_ENCODING, **kwargs)
