"""Build the extension's install and upgrade scripts from extension/sql/*.sql (run by make).

- ``pgturso--VERSION.sql`` (a fresh install): every source file in name order.
- ``pgturso--OLD--VERSION.sql`` (``ALTER EXTENSION pgturso UPDATE`` from OLD): the catalog migrations newer
  than OLD, then every file that is not a catalog file. Those files only hold what can be run again over an
  installed extension (``CREATE OR REPLACE FUNCTION``, ``CREATE OR REPLACE VIEW``, grants, event triggers
  dropped and created): they bring the functions up to date, whatever version they came from.
- ``pgturso--OLD.sql``: an older release's install script, kept verbatim in extension/history/ so that a
  database can still be created at that version (the upgrade tests do) and every release stays upgradable.

Catalog files: ``00_catalog.sql`` holds the tables of the first release (0.1.0); each later release's table
changes go into a migration named ``NN_catalog--VERSION.sql`` (ALTER TABLE, new tables, and DROP of any
function whose signature or result type changed, since CREATE OR REPLACE cannot change those). A fresh
install runs them all in order, so the two paths cannot drift apart; tests/test_upgrade.py compares the
catalogs they produce.

Substitutes ``@PYTHON_DIR@`` (where the PL/Python functions import the package from) and
``@CAPTURE_SETTINGS@`` and ``@SESSION_SETTINGS@`` (the SET clauses that pin value encoding, and the search_path and
standard_conforming_strings every function pins, from pgturso.capture.CAPTURE_SETTINGS: the
one source of truth for them, shared with the generated capture functions), and ``@NOTIFY_ENABLED@`` (whether
this session may wake the worker with a NOTIFY: pgturso.capture.sql.NOTIFY_ENABLED, which captures test too).
``@PGOUTPUT_TABLES_OPTIONS@`` and ``@PGOUTPUT_ROW_CHANGE_RELID(expr)@`` (the pgoutput options of the tables'
publication and the relation oid of a row-change message: pgturso.sources.pgoutput, the format the worker reads).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

from pgturso.capture.sql import CAPTURE_SETTINGS, NOTIFY_ENABLED, SESSION_SETTINGS
from pgturso.sources.pgoutput import TABLES_PUBLICATION, peek_options_sql, row_change_relid_sql

FIRST_RELEASE = "0.1.0"
_MIGRATION = re.compile(r"^\d+_catalog--(\d+\.\d+\.\d+)\.sql$")
_ROW_CHANGE_RELID = re.compile(r"@PGOUTPUT_ROW_CHANGE_RELID\(([^()@]+)\)@")


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def catalog_version(source: str) -> str | None:
    """The release a catalog file belongs to; None for a re-runnable (function) file."""
    name = Path(source).name
    if name == "00_catalog.sql":
        return FIRST_RELEASE
    match = _MIGRATION.match(name)
    return match.group(1) if match else None


def _render(sources: list[str], python_dir: str, header: str) -> str:
    parts = [f"-- Generated from extension/sql/*.sql by make ({header}); do not edit.",
             '\\echo Use "CREATE EXTENSION pgturso CASCADE" to load this file. \\quit']
    for source in sources:
        parts += ["", f"-- {source}", Path(source).read_text()]
    text = "\n".join(parts)
    text = text.replace("@CAPTURE_SETTINGS@", "\n".join(CAPTURE_SETTINGS))
    text = text.replace("@SESSION_SETTINGS@", "\n".join(SESSION_SETTINGS))
    text = text.replace("@NOTIFY_ENABLED@", NOTIFY_ENABLED)
    text = text.replace("@PGOUTPUT_TABLES_OPTIONS@", peek_options_sql(TABLES_PUBLICATION))
    text = _ROW_CHANGE_RELID.sub(lambda m: row_change_relid_sql(m.group(1)), text)
    return text.replace("@PYTHON_DIR@", python_dir)


def build(sources: list[str], python_dir: str) -> str:
    """The install script of the current version."""
    return _render(sorted(sources), python_dir, "install")


def build_upgrade(sources: list[str], python_dir: str, old_version: str) -> str:
    """The script that upgrades an installed ``old_version`` to the current version."""
    kept = []
    for source in sorted(sources):
        version = catalog_version(source)
        if version is None or version_key(version) > version_key(old_version):
            kept.append(source)
    return _render(kept, python_dir, f"upgrade from {old_version}")


def build_history(script: str, python_dir: str) -> str:
    """An older release's install script, with this installation's Python directory."""
    return Path(script).read_text().replace("@PYTHON_DIR@", python_dir)


if __name__ == "__main__":
    # build.py OUTPUT PYTHON_DIR SOURCES...: OUTPUT's name says what to build.
    output, python_dir, *sources = sys.argv[1:]
    name = Path(output).name
    upgrade = re.match(r"^pgturso--(\d+\.\d+\.\d+)--\d+\.\d+\.\d+\.sql$", name)
    history = Path(__file__).parent / "history" / name
    if upgrade:
        text = build_upgrade(sources, python_dir, upgrade.group(1))
    elif history.exists():
        text = build_history(str(history), python_dir)
    else:
        text = build(sources, python_dir)
    Path(output).write_text(text)
