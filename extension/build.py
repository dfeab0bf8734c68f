"""Build pgturso--VERSION.sql from extension/sql/*.sql (run by make).

Substitutes ``@PYTHON_DIR@`` (where the PL/Python functions import the package from) and
``@CAPTURE_SETTINGS@`` (the SET clauses that pin value encoding, from pgturso.capture.CAPTURE_SETTINGS: the
one source of truth for them, shared with the generated capture functions).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

from pgturso.capture import CAPTURE_SETTINGS


def build(sources: list[str], python_dir: str) -> str:
    parts = ["-- Generated from extension/sql/*.sql by make; do not edit.",
             '\\echo Use "CREATE EXTENSION pgturso CASCADE" to load this file. \\quit']
    for source in sources:
        parts += ["", f"-- {source}", Path(source).read_text()]
    text = "\n".join(parts)
    text = text.replace("@CAPTURE_SETTINGS@", "\n".join(CAPTURE_SETTINGS))
    return text.replace("@PYTHON_DIR@", python_dir)


if __name__ == "__main__":
    output, python_dir, *sources = sys.argv[1:]
    Path(output).write_text(build(sorted(sources), python_dir))
