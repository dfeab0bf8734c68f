"""Identifier and literal quoting shared by the Postgres and SQLite sides.

Both dialects quote identifiers the same way (double quotes, embedded quotes doubled), so one function
serves the capture triggers, the DDL sent to Turso and the statements the worker builds. Values are never
quoted here: they always travel as bound parameters.
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """Quote an identifier for Postgres or SQLite, whatever characters it holds."""
    if "\x00" in name:
        raise ValueError(f"identifier {name!r} contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote a string constant for generated Postgres DDL (never used for row values, nor for SQLite).

    An escape string (E'...', quotes and backslashes doubled) means the same whatever the session's
    standard_conforming_strings says; a plain '...' would end at a backslash-quote with the setting off.
    """
    if "\x00" in text:
        raise ValueError("string constant contains a NUL byte")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def qualified_name(schema: str, table: str) -> str:
    """Quote a schema-qualified Postgres name."""
    return f"{quote_ident(schema)}.{quote_ident(table)}"
