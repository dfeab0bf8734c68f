"""Hrana over HTTP (``POST /v2/pipeline``): request bodies and the reading of their answers.

Only this module knows the wire format. A delivery is one ``batch`` request whose steps run in a
transaction, each step conditional on the previous one, so the first failure skips the rest:

    [ROLLBACK]  BEGIN  stmt…  COMMIT  ROLLBACK-if-COMMIT-did-not-run

The leading ROLLBACK (its error ignored) starts from a clean state on servers where all clients share one
connection and an earlier, broken request may have left a transaction open. A transaction that is too large
for one request continues in the next one (on the same stream, through the baton).
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Value = None | int | float | str | bytes


def encode_value(value: Value) -> dict[str, Any]:
    """A Python value as a Hrana value (integers travel as strings to keep 64 bits)."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "integer", "value": str(int(value))}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "blob", "base64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot send a {type(value).__name__} to Turso")


def decode_value(value: dict[str, Any]) -> Value:
    """A Hrana value as a Python value. Blobs may come without base64 padding (tursodb)."""
    kind = value.get("type")
    if kind == "null":
        return None
    if kind == "integer":
        return int(value["value"])
    if kind == "float":
        if value.get("value") is None:  # JSON has no ±Infinity or NaN: tursodb sends them as null
            raise ValueError("Turso sent a float without a value (±Infinity or NaN); read the column as text "
                             "(CAST(column AS TEXT)) to see it")
        return float(value["value"])
    if kind == "text":
        return str(value["value"])
    if kind == "blob":
        data = value["base64"]
        return base64.b64decode(data + "=" * (-len(data) % 4))
    raise ValueError(f"unknown Hrana value type {kind!r}")


def stmt(sql: str, args: Sequence[Value] = ()) -> dict[str, Any]:
    return {"sql": sql, "args": [encode_value(a) for a in args]}


@dataclass
class BatchPlan:
    """A batch request under construction; remembers which steps carry the caller's statements."""

    steps: list[dict[str, Any]]
    caller_steps: list[int]  # step index of each statement passed to add()
    commit_step: int | None = None

    @classmethod
    def new(cls, begin: bool) -> BatchPlan:
        plan = cls([], [])
        if begin:
            plan.steps.append({"stmt": stmt("ROLLBACK")})  # may fail: nothing was open
            plan.steps.append({"stmt": stmt("BEGIN")})
        return plan

    def _chained(self, statement: dict[str, Any]) -> int:
        step: dict[str, Any] = {"stmt": statement}
        if self.steps and (self.commit_step is None):
            prev = len(self.steps) - 1
            step["condition"] = {"type": "ok", "step": prev}
        self.steps.append(step)
        return len(self.steps) - 1

    def add(self, sql: str, args: Sequence[Value] = ()) -> None:
        self.caller_steps.append(self._chained(stmt(sql, args)))

    def commit(self) -> None:
        self.commit_step = self._chained(stmt("COMMIT"))
        self.steps.append(
            {"stmt": stmt("ROLLBACK"), "condition": {"type": "not", "cond": {"type": "ok", "step": self.commit_step}}}
        )

    def request(self) -> dict[str, Any]:
        return {"type": "batch", "batch": {"steps": self.steps}}


@dataclass
class BatchOutcome:
    failed_caller_index: int | None  # index into the statements passed to add(), or None
    error: str | None
    committed: bool
    code: str | None = None  # Turso's error code of the failed step, when it gave one


def _error_code(error: Any) -> str | None:
    code = error.get("code") if isinstance(error, dict) else None
    return str(code) if code else None


def read_batch_result(plan: BatchPlan, result: dict[str, Any]) -> BatchOutcome:
    """Interpret one pipeline result for ``plan``. Raises ValueError on a malformed answer."""
    if result.get("type") == "error":
        error = result.get("error", {})
        return BatchOutcome(None, str(error.get("message", result)), False, _error_code(error))
    batch = result["response"]["result"]
    step_errors: list[Any] = batch["step_errors"]
    step_results: list[Any] = batch["step_results"]
    if len(step_errors) != len(plan.steps):
        raise ValueError("Turso answered a batch with the wrong number of step results")
    caller_of = {step: i for i, step in enumerate(plan.caller_steps)}
    first_real = 1 if plan.steps and plan.steps[0]["stmt"]["sql"] == "ROLLBACK" else 0
    for index, error in enumerate(step_errors):
        if error is None or index < first_real or (index == len(plan.steps) - 1 and plan.commit_step is not None):
            continue
        return BatchOutcome(caller_of.get(index), str(error.get("message", error)), False, _error_code(error))
    if plan.commit_step is not None and step_results[plan.commit_step] is None:
        return BatchOutcome(None, "the COMMIT step did not run", False)
    for index in plan.caller_steps:
        if step_results[index] is None:
            return BatchOutcome(caller_of[index], "the statement did not run", False)
    return BatchOutcome(None, None, plan.commit_step is not None)


class StepError(ValueError):
    """A request of a pipeline failed; ``code`` is Turso's error code, when it gave one."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


def rows_of(result: dict[str, Any]) -> list[list[Value]]:
    """Rows of an ``execute`` pipeline result. Raises StepError with Turso's message and code on error."""
    if result.get("type") == "error":
        error = result.get("error", {})
        raise StepError(str(error.get("message", result)), _error_code(error))
    rows = result["response"]["result"]["rows"]
    return [[decode_value(v) for v in row] for row in rows]


def execute_request(sql: str, args: Sequence[Value] = ()) -> dict[str, Any]:
    return {"type": "execute", "stmt": stmt(sql, args)}


CLOSE_REQUEST: dict[str, Any] = {"type": "close"}


# -- What each answer of Turso means for the batch ------------------------------------------------------------


class Meaning(enum.Enum):
    TRANSIENT = "transient"  # nothing of the batch committed: recover from the marker, send the whole batch again
    REFUSED = "refused"  # Turso refuses this statement for good: isolate the source transaction, show it blocked
    TOO_LARGE = "too large"  # nothing ran: send the same changes again in smaller requests
    CONFIGURATION = "configuration"  # stop (exit 2): the fix is a setting (token, access, URL)
    REJECTED = "rejected"  # stop (exit 2): this server does not take the request; retrying cannot help


@dataclass(frozen=True)
class Rule:
    key: str  # how the classifiers below look the rule up
    answer: str  # what Turso answered, as the docs show it
    meaning: Meaning
    why: str

    @property
    def transient(self) -> bool:
        return self.meaning is Meaning.TRANSIENT


# The one table of these decisions; docs/design.md shows it (answers_markdown(), a test keeps them equal).
ANSWERS: tuple[Rule, ...] = (
    Rule("network", "no answer: connection refused or reset, TLS failure, timeout", Meaning.TRANSIENT,
         "Turso or the network is down; a request that timed out may have committed, which the marker tells"),
    Rule("not-hrana", "HTTP 200 that is not a Hrana answer (a proxy's HTML page)", Meaning.TRANSIENT,
         "something between the worker and Turso answered instead of Turso"),
    Rule("http-400-stream", "HTTP 400 to a continuation request (\"Received an invalid baton\")",
         Meaning.TRANSIENT, "the stream is gone: sqld signs batons with a per-process key, so a restart or another "
         "instance invalidates them; its open transaction was rolled back"),
    Rule("http-404-stream", "HTTP 404 to a continuation request (stream not found)", Meaning.TRANSIENT,
         "the stream expired (sqld: after 10 s idle) and its open transaction was rolled back"),
    Rule("null-baton", "no baton in the middle of a transaction", Meaning.TRANSIENT,
         "the server ended the stream: the rest would run outside the transaction, so none of it is sent"),
    Rule("http-400", "HTTP 400/404 to the first request of a stream", Meaning.REJECTED,
         "the server does not understand the request or the database does not exist: check pgturso.url"),
    Rule("http-401", "HTTP 401", Meaning.CONFIGURATION, "the token is missing, wrong or expired"),
    Rule("http-403", "HTTP 403", Meaning.CONFIGURATION,
         "access is blocked: the token has no rights on this database, or the database or organisation is blocked"),
    Rule("http-408", "HTTP 408", Meaning.TRANSIENT, "the server gave up waiting for the request"),
    Rule("http-413", "HTTP 413", Meaning.TOO_LARGE, "the request is over the server's size limit; nothing ran"),
    Rule("http-429", "HTTP 429 (Retry-After honoured)", Meaning.TRANSIENT, "rate limited, or too many transactions"),
    Rule("http-5xx", "HTTP 5xx (503 with Retry-After honoured; sqld's STREAM_EXPIRED is a 500)",
         Meaning.TRANSIENT, "the server or a proxy in front of it failed, or is restarting"),
    Rule("http-4xx", "any other HTTP 4xx", Meaning.REJECTED, "the server refuses the request itself"),
    Rule("TRANSACTION_TIMEOUT", "step error TRANSACTION_TIMEOUT", Meaning.TRANSIENT,
         "sqld rolled the transaction back: it held the write lock over 5 s while another client wanted to write"),
    Rule("TRANSACTION_BUSY", "step error TRANSACTION_BUSY", Meaning.TRANSIENT,
         "the server cannot take another transaction now"),
    Rule("BLOCKED", "step error BLOCKED", Meaning.TRANSIENT,
         "writes are blocked for now (e.g. the organisation is over its quota); they resume when it is lifted"),
    Rule("PROXY_ERROR", "step error PROXY_ERROR", Meaning.TRANSIENT,
         "a replica could not reach the primary it forwards writes to"),
    Rule("STREAM_EXPIRED", "step error STREAM_EXPIRED", Meaning.TRANSIENT, "the stream expired"),
    Rule("SQLITE_BUSY", "step error SQLITE_BUSY*, SQLITE_LOCKED*, SQLITE_INTERRUPT (or, without a code, the "
         "message \"database is locked\")", Meaning.TRANSIENT, "another connection holds the lock for now"),
    Rule("RPC_QUERY_EXECUTION_TIMEOUT", "step error RPC_QUERY_EXECUTION_TIMEOUT", Meaning.TRANSIENT,
         "the primary a replica forwards writes to did not answer in time"),
    Rule("SQLITE_IOERR", "step error SQLITE_IOERR*, SQLITE_FULL", Meaning.TRANSIENT,
         "the server's disk failed for now, or is full (e.g. a storage quota): it passes, or the operator lifts it"),
    Rule("step", "any other step error (constraint, missing table, type, SQL)", Meaning.REFUSED,
         "this change cannot be applied as Turso stands: the worker finds the source transaction and blocks on it"),
)
_RULES = {rule.key: rule for rule in ANSWERS}
_BUSY_CODES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_INTERRUPT")
_DISK_CODES = ("SQLITE_IOERR", "SQLITE_FULL")
_BUSY_MESSAGES = {"database is locked": "SQLITE_BUSY", "transaction timed-out": "TRANSACTION_TIMEOUT",
                  "stream has expired": "STREAM_EXPIRED"}


def rule(key: str) -> Rule:
    return _RULES[key]


def classify_status(status: int, continuation: bool) -> Rule:
    """What a non-200 HTTP answer means; ``continuation``: the request carried a baton (an existing stream)."""
    if status in (400, 404):
        return _RULES[f"http-{status}-stream"] if continuation else _RULES["http-400"]
    if status in (401, 403, 408, 413, 429):
        return _RULES[f"http-{status}"]
    if status >= 500:
        return _RULES["http-5xx"]
    return _RULES["http-4xx"]


def classify_step_error(code: str | None, message: str) -> Rule:
    """What a failed step means, by Turso's error code (or, from servers that send none, its message)."""
    if code is None:
        lowered = message.lower()
        code = next((c for text, c in _BUSY_MESSAGES.items() if text in lowered), None)
    if code is None:
        return _RULES["step"]
    if code.isupper() and code in _RULES:
        return _RULES[code]
    if code.startswith(_BUSY_CODES):
        return _RULES["SQLITE_BUSY"]
    if code.startswith(_DISK_CODES):
        return _RULES["SQLITE_IOERR"]
    return _RULES["step"]


def answers_markdown() -> str:
    """The table as docs/design.md shows it."""
    lines = ["| Turso answered | meaning for the batch | why |", "| --- | --- | --- |"]
    lines += [f"| {r.answer} | {r.meaning.value} | {r.why} |" for r in ANSWERS]
    return "\n".join(lines) + "\n"
