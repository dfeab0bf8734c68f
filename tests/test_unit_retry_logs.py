"""Unit tests of retry.backoff_delay and of the log line formats (logs.py)."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator

import pytest
from pgturso.common import logs
from pgturso.common.retry import backoff_delay

# ------------------------------------------------------------------------------------------------ retry


class FixedRng(random.Random):
    """Records the bounds asked for and answers the upper one."""

    def __init__(self) -> None:
        super().__init__(0)
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b


@pytest.mark.parametrize(
    ("attempt", "bounds"),
    [
        (0, (0.25, 0.5)),
        (1, (0.25, 0.5)),
        (2, (0.25, 1.0)),
        (3, (0.25, 2.0)),
        (6, (0.25, 16.0)),
        (7, (0.25, 30.0)),
        (50, (0.25, 30.0)),
        (1000, (0.25, 30.0)),
    ],
)
def test_backoff_bounds(attempt: int, bounds: tuple[float, float]) -> None:
    rng = FixedRng()
    assert backoff_delay(attempt, 0.5, 30.0, rng) == bounds[1]
    assert rng.calls == [bounds]


def test_backoff_grows_and_is_capped() -> None:
    ceilings = [backoff_delay(a, 0.1, 5.0, FixedRng()) for a in range(1, 12)]
    assert ceilings == sorted(ceilings)
    assert ceilings[0] == pytest.approx(0.1)
    assert ceilings[-1] == 5.0


def test_backoff_base_above_cap_stays_at_cap() -> None:
    rng = FixedRng()
    assert backoff_delay(3, 10.0, 1.0, rng) == 1.0
    assert rng.calls == [(1.0, 1.0)]


def test_backoff_uses_the_given_rng_and_stays_in_range() -> None:
    a = [backoff_delay(5, 0.5, 30.0, random.Random(42)) for _ in range(3)]
    b = [backoff_delay(5, 0.5, 30.0, random.Random(42)) for _ in range(3)]
    assert a == b  # deterministic for a seeded rng
    rng = random.Random(7)
    delays = [backoff_delay(attempt, 0.5, 30.0, rng) for attempt in range(1, 200)]
    assert all(0.25 <= d <= 30.0 for d in delays)
    assert len(set(delays)) > 150  # jittered, not constant


def test_backoff_after_very_many_attempts_stays_at_cap() -> None:
    assert backoff_delay(1025, 0.5, 30.0, FixedRng()) == 30.0


# ------------------------------------------------------------------------------------------------- logs

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def restore_pgturso_logger() -> Iterator[None]:
    root = logging.getLogger("pgturso")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def emit(capsys: pytest.CaptureFixture[str], fmt: str, level: str = "info", **fields: object) -> list[str]:
    logs.setup(level, fmt)  # binds the handler to the captured stderr
    logs.event(logging.getLogger("pgturso.unit"), logging.WARNING, "retry", **fields)
    return capsys.readouterr().err.splitlines()


@pytest.mark.usefixtures("restore_pgturso_logger")
def test_text_format_quotes_what_needs_quoting(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = emit(
        capsys,
        "text",
        attempt=3,
        delay_s=1.25,
        error="connection refused by host",
        empty="",
        quote='say "hi"',
        equals="a=b",
        newline="one\ntwo",
        plain="no-spaces",
    )
    match = re.fullmatch(f"ts=({TS}) (.*)", line)
    assert match, line
    assert match.group(2) == (
        "level=warning logger=pgturso.unit event=retry attempt=3 delay_s=1.25 "
        'error="connection refused by host" empty="" quote="say \\"hi\\"" equals="a=b" '
        'newline="one\\ntwo" plain=no-spaces'
    )


@pytest.mark.usefixtures("restore_pgturso_logger")
def test_json_format_is_valid_json_with_event(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = emit(capsys, "json", attempt=3, error='bad "thing"\nhere', path=b"x", obj=object)
    record = json.loads(line)
    assert re.fullmatch(TS, record.pop("ts"))
    assert record == {
        "level": "warning",
        "logger": "pgturso.unit",
        "event": "retry",
        "attempt": 3,
        "error": 'bad "thing"\nhere',
        "path": "b'x'",
        "obj": "<class 'object'>",
    }


@pytest.mark.usefixtures("restore_pgturso_logger")
def test_level_filters_events(capsys: pytest.CaptureFixture[str]) -> None:
    assert emit(capsys, "text", level="error", attempt=1) == []
    assert len(emit(capsys, "text", level="warning", attempt=1)) == 1


@pytest.mark.usefixtures("restore_pgturso_logger")
def test_plain_log_calls_and_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("debug", "json")
    log = logging.getLogger("pgturso.unit")
    log.info("hello %s", "world")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        log.exception("failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert (first["level"], first["msg"]) == ("info", "hello world")
    assert (second["level"], second["msg"]) == ("error", "failed")
    assert "RuntimeError: kaput" in second["exception"]


@pytest.mark.usefixtures("restore_pgturso_logger")
def test_setup_replaces_handlers_and_stops_propagation() -> None:
    logs.setup("info", "text")
    logs.setup("warning", "json")
    root = logging.getLogger("pgturso")
    assert len(root.handlers) == 1
    assert root.level == logging.WARNING
    assert root.propagate is False


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_redraws_one_line_on_a_terminal() -> None:
    stream = _Stream(tty=True)
    bar = logs.Progress("copy public.t", 200, stream)
    for done in (50, 100, 200):
        bar.update(done)
    bar.finish()
    assert stream.getvalue() == (
        "\rcopy public.t: 50/200 rows (25%)\rcopy public.t: 100/200 rows (50%)\rcopy public.t: 200/200 rows (100%)\n"
    )


def test_progress_writes_a_line_per_tenth_into_logs() -> None:
    stream = _Stream(tty=False)
    bar = logs.Progress("verify public.t", 1000, stream)
    for done in range(0, 1001, 50):
        bar.update(done)
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1] == "verify public.t: 1000/1000 rows" and "\r" not in stream.getvalue()
