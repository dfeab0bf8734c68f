"""Unit tests of hrana.py: value encoding, batch plans and the reading of batch results."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pgturso.delivery.hrana import (
    CLOSE_REQUEST,
    BatchOutcome,
    BatchPlan,
    decode_value,
    encode_value,
    execute_request,
    read_batch_result,
    rows_of,
    stmt,
)

# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (None, {"type": "null"}),
        (0, {"type": "integer", "value": "0"}),
        (-(2**63), {"type": "integer", "value": "-9223372036854775808"}),
        (2**63 - 1, {"type": "integer", "value": "9223372036854775807"}),
        (1.5, {"type": "float", "value": 1.5}),
        (-0.0, {"type": "float", "value": -0.0}),
        ("", {"type": "text", "value": ""}),
        ("é😀 'x' \"y\"", {"type": "text", "value": "é😀 'x' \"y\""}),
        (b"", {"type": "blob", "base64": ""}),
        (b"\x00\xff\x10", {"type": "blob", "base64": "AP8Q"}),
    ],
)
def test_encode_decode_roundtrip(value: Any, encoded: dict[str, Any]) -> None:
    assert encode_value(value) == encoded
    # Through JSON, as on the wire.
    decoded = decode_value(json.loads(json.dumps(encode_value(value))))
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(("value", "text"), [(True, "1"), (False, "0")])
def test_bools_travel_as_integers(value: bool, text: str) -> None:
    assert encode_value(value) == {"type": "integer", "value": text}
    decoded = decode_value(encode_value(value))
    assert decoded == int(value) and type(decoded) is int


def test_integers_travel_as_strings_to_keep_64_bits() -> None:
    big = 2**63 - 1
    assert isinstance(encode_value(big)["value"], str)
    assert decode_value(json.loads(json.dumps(encode_value(big)))) == big


def test_float_value_is_a_json_number() -> None:
    assert json.dumps(encode_value(0.1)) == '{"type": "float", "value": 0.1}'
    assert decode_value({"type": "float", "value": 2}) == 2.0
    assert type(decode_value({"type": "float", "value": 2})) is float


@pytest.mark.parametrize("value", [bytearray(b"\x01\x02"), memoryview(b"\x01\x02")])
def test_bytes_like_values_are_blobs(value: Any) -> None:
    assert encode_value(value) == {"type": "blob", "base64": "AQI="}


@pytest.mark.parametrize("value", [[1], {"a": 1}, object(), 1j])
def test_unsupported_values_raise_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot send"):
        encode_value(value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("", b""),
        ("AQ", b"\x01"),
        ("AQI", b"\x01\x02"),
        ("AQID", b"\x01\x02\x03"),
        ("AQ==", b"\x01"),
        ("AQI=", b"\x01\x02"),
        (base64.b64encode(bytes(range(256))).decode().rstrip("="), bytes(range(256))),
    ],
)
def test_decode_blob_with_or_without_padding(data: str, expected: bytes) -> None:
    assert decode_value({"type": "blob", "base64": data}) == expected


def test_decode_unknown_type_raises() -> None:
    with pytest.raises(ValueError, match="unknown Hrana value type 'vector'"):
        decode_value({"type": "vector", "value": "x"})
    with pytest.raises(ValueError):
        decode_value({})


def test_stmt_and_requests() -> None:
    assert stmt("SELECT ?, ?", [1, None]) == {
        "sql": "SELECT ?, ?",
        "args": [{"type": "integer", "value": "1"}, {"type": "null"}],
    }
    assert execute_request("SELECT 1") == {"type": "execute", "stmt": {"sql": "SELECT 1", "args": []}}
    assert CLOSE_REQUEST == {"type": "close"}


# ------------------------------------------------------------------------------------------- batch plans


def ok(step: int) -> dict[str, Any]:
    return {"type": "ok", "step": step}


def full_plan() -> BatchPlan:
    plan = BatchPlan.new(begin=True)
    plan.add("INSERT INTO t VALUES (?)", ["a"])
    plan.add("DELETE FROM t")
    plan.commit()
    return plan


def test_plan_steps_and_conditions() -> None:
    plan = full_plan()
    assert plan.steps == [
        {"stmt": {"sql": "ROLLBACK", "args": []}},
        {"stmt": {"sql": "BEGIN", "args": []}},
        {"stmt": {"sql": "INSERT INTO t VALUES (?)", "args": [{"type": "text", "value": "a"}]}, "condition": ok(1)},
        {"stmt": {"sql": "DELETE FROM t", "args": []}, "condition": ok(2)},
        {"stmt": {"sql": "COMMIT", "args": []}, "condition": ok(3)},
        {"stmt": {"sql": "ROLLBACK", "args": []}, "condition": {"type": "not", "cond": ok(4)}},
    ]
    assert plan.caller_steps == [2, 3]
    assert plan.commit_step == 4
    assert plan.request() == {"type": "batch", "batch": {"steps": plan.steps}}


def test_continuation_plan_has_no_begin() -> None:
    plan = BatchPlan.new(begin=False)
    plan.add("A")
    plan.add("B")
    assert plan.steps == [
        {"stmt": {"sql": "A", "args": []}},
        {"stmt": {"sql": "B", "args": []}, "condition": ok(0)},
    ]
    assert plan.caller_steps == [0, 1]
    assert plan.commit_step is None
    plan.commit()
    assert plan.steps[2:] == [
        {"stmt": {"sql": "COMMIT", "args": []}, "condition": ok(1)},
        {"stmt": {"sql": "ROLLBACK", "args": []}, "condition": {"type": "not", "cond": ok(2)}},
    ]


def test_commit_only_plan() -> None:
    plan = BatchPlan.new(begin=False)
    plan.commit()
    assert plan.steps[0] == {"stmt": {"sql": "COMMIT", "args": []}}
    assert plan.commit_step == 0


def test_plan_is_json_serialisable() -> None:
    plan = full_plan()
    assert json.loads(json.dumps(plan.request())) == plan.request()


# -------------------------------------------------------------------------------------- batch results

OK_RESULT: dict[str, Any] = {"cols": [], "rows": [], "affected_row_count": 0}


def batch_result(results: list[Any], errors: list[Any]) -> dict[str, Any]:
    return {
        "type": "ok",
        "response": {"type": "batch", "result": {"step_results": results, "step_errors": errors}},
    }


def err(message: str) -> dict[str, Any]:
    return {"message": message, "code": "SQLITE_ERROR"}


R = OK_RESULT


def test_all_ok_commits() -> None:
    result = batch_result([R, R, R, R, R, None], [None] * 6)
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, None, True)


def test_leading_rollback_error_is_ignored() -> None:
    result = batch_result([None, R, R, R, R, None], [err("cannot rollback - no transaction is active")] + [None] * 5)
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, None, True)


def test_failing_caller_statement_maps_to_its_index() -> None:
    result = batch_result(
        [R, R, R, None, None, R], [None, None, None, err("UNIQUE constraint failed: t.id"), None, None]
    )
    outcome = BatchOutcome(1, "UNIQUE constraint failed: t.id", False, "SQLITE_ERROR")
    assert read_batch_result(full_plan(), result) == outcome


def test_failing_first_caller_statement() -> None:
    result = batch_result([R, R, None, None, None, R], [None, None, err("no such table: t"), None, None, None])
    assert read_batch_result(full_plan(), result) == BatchOutcome(0, "no such table: t", False, "SQLITE_ERROR")


def test_failing_begin_is_not_a_caller_statement() -> None:
    result = batch_result([R, None, None, None, None, None], [None, err("cannot BEGIN"), None, None, None, err("x")])
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, "cannot BEGIN", False, "SQLITE_ERROR")


def test_failing_commit() -> None:
    result = batch_result([R, R, R, R, None, R], [None, None, None, None, err("database is locked"), None])
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, "database is locked", False, "SQLITE_ERROR")


def test_trailing_rollback_error_is_ignored() -> None:
    result = batch_result([R, R, R, R, R, None], [None] * 5 + [err("no transaction")])
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, None, True)


def test_commit_that_did_not_run_is_a_failure() -> None:
    result = batch_result([R, R, R, R, None, R], [None] * 6)
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, "the COMMIT step did not run", False)


def test_caller_statement_that_did_not_run_is_a_failure() -> None:
    plan = BatchPlan.new(begin=True)
    plan.add("A")
    plan.add("B")  # no commit: the transaction goes on in the next request
    result = batch_result([R, R, R, None], [None] * 4)
    assert read_batch_result(plan, result) == BatchOutcome(1, "the statement did not run", False)


def test_plan_without_commit_is_not_committed() -> None:
    plan = BatchPlan.new(begin=True)
    plan.add("A")
    assert read_batch_result(plan, batch_result([R, R, R], [None] * 3)) == BatchOutcome(None, None, False)


def test_continuation_plan_failure_in_first_step() -> None:
    plan = BatchPlan.new(begin=False)
    plan.add("A")
    plan.add("B")
    plan.commit()
    result = batch_result([None, None, None, R], [err("boom"), None, None, None])
    assert read_batch_result(plan, result) == BatchOutcome(0, "boom", False, "SQLITE_ERROR")


def test_error_without_message_is_still_reported() -> None:
    result = batch_result([R, R, R, None, None, R], [None, None, None, {"code": "X"}, None, None])
    outcome = read_batch_result(full_plan(), result)
    assert outcome.failed_caller_index == 1
    assert outcome.error == "{'code': 'X'}"
    assert not outcome.committed


def test_pipeline_level_error() -> None:
    result = {"type": "error", "error": {"message": "stream expired", "code": "STREAM_EXPIRED"}}
    assert read_batch_result(full_plan(), result) == BatchOutcome(None, "stream expired", False, "STREAM_EXPIRED")


@pytest.mark.parametrize("count", [0, 5, 7])
def test_wrong_step_count_raises(count: int) -> None:
    with pytest.raises(ValueError, match="wrong number of step results"):
        read_batch_result(full_plan(), batch_result([R] * count, [None] * count))


def test_malformed_answer_raises_key_error() -> None:
    with pytest.raises(KeyError):
        read_batch_result(full_plan(), {"type": "ok", "response": {"type": "batch"}})


# ------------------------------------------------------------------------------------------------ rows


def test_rows_of() -> None:
    result = {
        "type": "ok",
        "response": {
            "type": "execute",
            "result": {
                "cols": [{"name": "a"}, {"name": "b"}],
                "rows": [
                    [{"type": "integer", "value": "9223372036854775807"}, {"type": "blob", "base64": "AQ"}],
                    [{"type": "null"}, {"type": "text", "value": "x"}],
                ],
            },
        },
    }
    assert rows_of(result) == [[2**63 - 1, b"\x01"], [None, "x"]]


def test_rows_of_error_raises_with_message() -> None:
    with pytest.raises(ValueError, match=r"^no such table: t$"):
        rows_of({"type": "error", "error": {"message": "no such table: t"}})


def test_libsql_urls_are_https_and_file_urls_are_embedded(tmp_path) -> None:
    from pgturso.common.errors import ConfigError
    from pgturso.delivery.targets import FileTarget, HttpTarget, open_target

    cloud = open_target("libsql://app-eu.turso.io", "tok", max_request_bytes=1 << 20, timeout=5)
    assert isinstance(cloud, HttpTarget) and cloud.base_url == "https://app-eu.turso.io"
    assert cloud.session.headers["Authorization"] == "Bearer tok" and cloud.verify is True
    assert cloud.description == "https://app-eu.turso.io"
    local = open_target(f"file:{tmp_path / 'x.db'}", None, max_request_bytes=1 << 20, timeout=5)
    assert isinstance(local, FileTarget)
    local.close()
    with pytest.raises(ConfigError, match="not a Turso URL"):
        open_target("ftp://nope", None, max_request_bytes=1, timeout=1)


def test_a_float_without_a_value_is_a_clear_error() -> None:
    """tursodb sends ±Infinity as a float whose value is null: say so instead of failing in float()."""
    with pytest.raises(ValueError, match="Infinity"):
        decode_value({"type": "float", "value": None})
