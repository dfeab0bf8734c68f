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


def read_batch_result(plan: BatchPlan, result: dict[str, Any]) -> BatchOutcome:
    """Interpret one pipeline result for ``plan``. Raises ValueError on a malformed answer."""
    if result.get("type") == "error":
        return BatchOutcome(None, str(result.get("error", {}).get("message", result)), False)
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
        return BatchOutcome(caller_of.get(index), str(error.get("message", error)), False)
    if plan.commit_step is not None and step_results[plan.commit_step] is None:
        return BatchOutcome(None, "the COMMIT step did not run", False)
    for index in plan.caller_steps:
        if step_results[index] is None:
            return BatchOutcome(caller_of[index], "the statement did not run", False)
    return BatchOutcome(None, None, plan.commit_step is not None)


def rows_of(result: dict[str, Any]) -> list[list[Value]]:
    """Rows of an ``execute`` pipeline result. Raises ValueError with Turso's message on error."""
    if result.get("type") == "error":
        raise ValueError(str(result.get("error", {}).get("message", result)))
    rows = result["response"]["result"]["rows"]
    return [[decode_value(v) for v in row] for row in rows]


def execute_request(sql: str, args: Sequence[Value] = ()) -> dict[str, Any]:
    return {"type": "execute", "stmt": stmt(sql, args)}


CLOSE_REQUEST: dict[str, Any] = {"type": "close"}
