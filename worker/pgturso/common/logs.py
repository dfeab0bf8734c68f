"""One log line per event that matters, as key=value text or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

# Off in a background worker's process: the server log's own prefix carries the time.
TIMESTAMPS = True


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if TIMESTAMPS:
            second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            fields["ts"] = f"{second}.{int(record.msecs):03d}Z"
        fields.update(level=record.levelname.lower(), logger=record.name)
        fields.update(getattr(record, "fields", {}) or {"msg": record.getMessage()})
        if record.exc_info and record.levelno >= logging.ERROR:
            fields["exception"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json"))
    root = logging.getLogger("pgturso")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log ``event=name`` with fields; callers never pass secrets."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": {"event": name, **fields}})


class Progress:
    """A progress line redrawn in place on a terminal; a line per tenth otherwise (logs)."""

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr) -> None:
        self.label, self.total, self.stream = label, max(total, 1), stream
        self.tty = stream.isatty()
        self.last_tenth = -1

    def update(self, done: int) -> None:
        if self.tty:
            self.stream.write(f"\r{self.label}: {done}/{self.total} rows ({100 * done // self.total}%)")
            self.stream.flush()
        elif (tenth := 10 * done // self.total) > self.last_tenth:
            self.last_tenth = tenth
            self.stream.write(f"{self.label}: {done}/{self.total} rows\n")

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
