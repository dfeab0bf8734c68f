"""Unit tests of statements.py: the SQL text it generates and how StatementBuilder groups events."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pgturso.capture.layout import TableLayout
from pgturso.delivery.statements import (
    Statement,
    StatementBuilder,
    create_table_sql,
    delete_sql,
    drop_table_sql,
    row_texts,
    truncate_sql,
    upsert_sql,
)
from pgturso.sources.outbox import Event


def col(name: str, base_type: str, not_null: bool = False, typmod: int = -1) -> dict[str, object]:
    return {"name": name, "pg_type": base_type, "base_type": base_type, "typmod": typmod, "not_null": not_null}


USERS = TableLayout.from_catalog(
    "public.users", "users", [col("id", "int8", True), col("name", "text"), col("avatar", "bytea")], ["id"]
)
# Composite key declared in a different order than the columns, with identifiers that need quoting.
ODD = TableLayout.from_catalog(
    'public."odd ""t"""',
    'odd "t"',
    [col("v", "float8"), col('k"2', "bytea", True), col("k 1", "text", True)],
    ["k 1", 'k"2'],
)
PAIRS = TableLayout.from_catalog("public.pairs", "pairs", [col("a", "int4", True), col("b", "int4", True)], ["a", "b"])
LAYOUTS = {1: USERS, 2: ODD, 3: PAIRS}


def ev(event_id: int, op: str, payload: str | None = None, layout_id: int = 1, txid: int = 100) -> Event:
    nrows = len(json.loads(f"[{payload}]")) if payload else 0
    return Event(event_id, txid, layout_id, op, nrows, payload)


def builder(max_payload_bytes: int = 1 << 20) -> StatementBuilder:
    return StatementBuilder(LAYOUTS.__getitem__, max_payload_bytes)


def run(events: list[Event], max_payload_bytes: int = 1 << 20) -> list[Statement]:
    b = builder(max_payload_bytes)
    out = [s for e in events for s in b.add(e)]
    return out + list(b.flush())


# ---------------------------------------------------------------------------------------------- SQL text


def test_create_table_sql() -> None:
    assert create_table_sql(USERS) == (
        'CREATE TABLE "users" ("id" INTEGER NOT NULL, "name" TEXT, "avatar" BLOB, PRIMARY KEY ("id"))'
    )
    assert create_table_sql(ODD) == (
        'CREATE TABLE "odd ""t""" ("v" REAL, "k""2" BLOB NOT NULL, "k 1" TEXT NOT NULL, PRIMARY KEY ("k 1", "k""2"))'
    )


def test_drop_and_truncate_sql() -> None:
    assert drop_table_sql(ODD) == 'DROP TABLE IF EXISTS "odd ""t"""'
    assert truncate_sql(ODD) == 'DELETE FROM "odd ""t"""'


def test_upsert_sql() -> None:
    assert upsert_sql(USERS) == (
        'INSERT INTO "users" ("id", "name", "avatar") '
        "SELECT value->>0, value->>1, unhex(value->>2) FROM json_each(?) WHERE true "
        'ON CONFLICT ("id") DO UPDATE SET "name" = excluded."name", "avatar" = excluded."avatar"'
    )


def test_upsert_sql_composite_key_quotes_everything() -> None:
    assert upsert_sql(ODD) == (
        'INSERT INTO "odd ""t""" ("v", "k""2", "k 1") '
        "SELECT CASE value->>0 WHEN 'Infinity' THEN 9e999 WHEN '-Infinity' THEN -9e999 ELSE value->>0 END, "
        "unhex(value->>1), value->>2 FROM json_each(?) WHERE true "
        'ON CONFLICT ("k 1", "k""2") DO UPDATE SET "v" = excluded."v"'
    )


def test_upsert_sql_all_key_columns_does_nothing_on_conflict() -> None:
    assert upsert_sql(PAIRS) == (
        'INSERT INTO "pairs" ("a", "b") SELECT value->>0, value->>1 FROM json_each(?) WHERE true '
        'ON CONFLICT ("a", "b") DO NOTHING'
    )


def test_delete_sql_single_key() -> None:
    assert delete_sql(USERS) == 'DELETE FROM "users" WHERE "id" IN (SELECT value->>0 FROM json_each(?))'


def test_delete_sql_composite_key_uses_key_order_and_decodes() -> None:
    # Key arrays are in key order ("k 1", then "k""2"), so the bytea key is element 1 and is unhexed.
    assert delete_sql(ODD) == (
        'DELETE FROM "odd ""t""" WHERE ("k 1", "k""2") IN (SELECT value->>0, unhex(value->>1) FROM json_each(?))'
    )


def test_float_decode_only_when_the_argument_holds_an_infinity() -> None:
    # FLOAT's CASE (±Infinity travel as JSON strings) reads each element twice; an argument without 'Infinity'
    # anywhere has no value that needs it. Other decodes (unhex) stay whatever the argument.
    case = "CASE value->>0 WHEN 'Infinity' THEN 9e999 WHEN '-Infinity' THEN -9e999 ELSE value->>0 END"
    finite = '[[1.5,"00","a"],[-0.0,"01","b"],["NaN","02","c"]]'
    assert upsert_sql(ODD, finite) == upsert_sql(ODD).replace(case, "value->>0")
    assert "unhex(value->>1)" in upsert_sql(ODD, finite)
    for infinite in ('[["Infinity","00","a"]]', '[["-Infinity","00","a"]]', '[[1.5,"00","Infinity and beyond"]]'):
        assert upsert_sql(ODD, infinite) == upsert_sql(ODD)
    [statement] = run([ev(1, "U", '[1.5,"00","a"]', layout_id=2)])
    assert statement.sql == upsert_sql(ODD, statement.args[0]) != upsert_sql(ODD)
    [statement] = run([ev(1, "U", '["Infinity","00","a"]', layout_id=2), ev(2, "U", '[1.5,"01","b"]', layout_id=2)])
    assert statement.sql == upsert_sql(ODD)


def test_generated_sql_never_contains_values() -> None:
    for sql in (upsert_sql(USERS), delete_sql(USERS)):
        assert sql.count("?") == 1


# ------------------------------------------------------------------------------------- StatementBuilder


def test_consecutive_upserts_merge_into_one_statement() -> None:
    b = builder()
    assert list(b.add(ev(1, "U", '[1,"a",null]', txid=7))) == []
    assert list(b.add(ev(2, "U", '[2,"b",null],[3,"c","ff"]', txid=5))) == []
    assert list(b.add(ev(3, "U", '[4,"d",null]', txid=7))) == []
    (statement,) = b.flush()
    assert statement == Statement(
        upsert_sql(USERS),
        ('[[1,"a",null],[2,"b",null],[3,"c","ff"],[4,"d",null]]',),
        table="public.users",
        operation="upsert",
        txids=(5, 7),
    )
    assert json.loads(statement.args[0])[2] == [3, "c", "ff"]
    assert list(b.flush()) == []


def test_consecutive_deletes_merge() -> None:
    (statement,) = run([ev(1, "D", "[1]"), ev(2, "D", "[2],[3]", txid=101)])
    assert statement == Statement(
        delete_sql(USERS), ("[[1],[2],[3]]",), table="public.users", operation="delete", txids=(100, 101)
    )


def test_operation_change_splits_and_keeps_order() -> None:
    b = builder()
    assert list(b.add(ev(1, "U", '[1,"a",null]'))) == []
    (upsert,) = b.add(ev(2, "D", "[1]"))  # the pending upsert comes out when the delete arrives
    assert (upsert.sql, upsert.args) == (upsert_sql(USERS), ('[[1,"a",null]]',))
    (delete, upsert2) = [*b.add(ev(3, "U", '[2,"b",null]')), *b.flush()]
    assert (delete.sql, delete.args) == (delete_sql(USERS), ("[[1]]",))
    assert (upsert2.sql, upsert2.args) == (upsert_sql(USERS), ('[[2,"b",null]]',))


def test_layout_change_splits() -> None:
    statements = run(
        [ev(1, "U", "[1,2]", layout_id=3), ev(2, "U", '[1,"x",null]', layout_id=1), ev(3, "U", "[3,4]", 3)]
    )
    assert [(s.sql, s.args, s.table) for s in statements] == [
        (upsert_sql(PAIRS), ("[[1,2]]",), "public.pairs"),
        (upsert_sql(USERS), ('[[1,"x",null]]',), "public.users"),
        (upsert_sql(PAIRS), ("[[3,4]]",), "public.pairs"),
    ]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        # The argument is "[" + payloads joined by "," + "]": two 5-byte payloads make exactly 13 bytes.
        (13, [("[[1,2],[1,2]]",), ("[[1,2],[1,2]]",), ("[[1,2]]",)]),
        (12, [("[[1,2]]",)] * 5),
        (19, [("[[1,2],[1,2],[1,2]]",), ("[[1,2],[1,2]]",)]),
    ],
)
def test_max_payload_bytes_splits_runs(limit: int, expected: list[tuple[str]]) -> None:
    statements = run([ev(i, "U", "[1,2]", layout_id=3) for i in range(1, 6)], max_payload_bytes=limit)
    assert [s.args for s in statements] == expected
    assert all(len(s.args[0]) <= limit for s in statements)


def test_a_row_larger_than_the_limit_still_goes_alone() -> None:
    statements = run([ev(1, "U", "[1,2]", 3), ev(2, "U", "[5,6]", 3), ev(3, "D", "[1,2]", 3)], 4)
    assert [(s.operation, s.args) for s in statements] == [
        ("upsert", ("[[1,2]]",)),
        ("upsert", ("[[5,6]]",)),
        ("delete", ("[[1,2]]",)),
    ]


def test_an_event_of_many_rows_larger_than_the_limit_is_split_into_its_rows() -> None:
    """A slot's run of rows (or one statement's rows) is one event: max_payload_bytes still bounds every
    statement, rows keep their order and their exact text (commas, brackets and spaces inside values too)."""
    rows = ['[1, "a,b]"]', '[2,"[x], {y}"]', '[3,null]', r'[4,"\\\"q\""]', r'[5, "\u00e9\u00e9"]']
    events = [ev(1, "U", ",".join(rows[:3]), 3), ev(2, "U", " , ".join(rows[3:]), 3)]
    statements = run(events, 32)
    assert all(len(s.args[0].encode()) <= 32 for s in statements)
    assert len(statements) > 2
    assert ",".join(s.args[0][1:-1] for s in statements) == ",".join(rows)  # each row's text as it came
    assert list(row_texts(" , ".join(rows))) == rows


def test_an_event_that_fits_is_not_split() -> None:
    assert [s.args for s in run([ev(1, "U", "[1,2],[3,4]", 3)], 13)] == [("[[1,2],[3,4]]",)]


@pytest.mark.parametrize(
    ("payload", "limit"),
    [
        ("[1,2]", 10),  # alone "[[1,2]]" is 7 bytes; merged "[[1,2],[1,2]]" is 13 bytes
        ('["\u00e9\u00e9\u00e9\u00e9"]', 20),  # 8 characters, 12 bytes; merged: 19 characters, 27 bytes
    ],
    ids=["comma-and-brackets", "utf8-bytes"],
)
def test_merged_argument_never_exceeds_limit_when_every_event_fits(payload: str, limit: int) -> None:
    # The limit is in UTF-8 bytes of the whole argument, brackets and commas included.
    assert len(f"[{payload}]".encode()) <= limit  # each event fits on its own
    statements = run([ev(1, "U", payload, 3), ev(2, "U", payload, 3)], limit)
    assert [s.args for s in statements] == [(f"[{payload}]",), (f"[{payload}]",)]


@pytest.mark.parametrize(("limit", "merged"), [(15, True), (14, False)])
def test_limit_counts_utf8_bytes_at_the_boundary(limit: int, merged: bool) -> None:
    payload = '["\u00e9"]'  # 5 characters, 6 bytes; merged '[["é"],["é"]]' is 15 bytes
    statements = run([ev(1, "U", payload, 3), ev(2, "U", payload, 3)], limit)
    assert len(statements) == (1 if merged else 2)
    assert max(len(s.args[0].encode()) for s in statements) == (15 if merged else 8)


def test_create_event_yields_drop_then_create_after_flushing() -> None:
    b = builder()
    assert list(b.add(ev(1, "U", '[1,"a",null]', txid=9))) == []
    statements = list(b.add(ev(2, "C", layout_id=2, txid=10)))
    assert statements == [
        Statement(upsert_sql(USERS), ('[[1,"a",null]]',), "public.users", "upsert", (9,)),
        Statement(drop_table_sql(ODD), (), 'public."odd ""t"""', "create table", (10,)),
        Statement(create_table_sql(ODD), (), 'public."odd ""t"""', "create table", (10,)),
    ]
    assert list(b.flush()) == []


def test_truncate_event_yields_delete_all() -> None:
    statements = run([ev(1, "D", "[1]", txid=3), ev(2, "T", txid=4), ev(3, "D", "[2]", txid=4)])
    assert statements == [
        Statement(delete_sql(USERS), ("[[1]]",), "public.users", "delete", (3,)),
        Statement('DELETE FROM "users"', (), "public.users", "truncate", (4,)),
        Statement(delete_sql(USERS), ("[[2]]",), "public.users", "delete", (4,)),
    ]


def test_runs_do_not_merge_across_create_or_truncate() -> None:
    statements = run([ev(1, "U", "[1,1]", 3), ev(2, "T", layout_id=3), ev(3, "U", "[2,2]", 3)])
    assert [s.args for s in statements] == [("[[1,1]]",), (), ("[[2,2]]",)]


def test_layouts_are_looked_up_lazily_by_id() -> None:
    asked: list[int] = []

    def layout_of(layout_id: int) -> TableLayout:
        asked.append(layout_id)
        return LAYOUTS[layout_id]

    b = StatementBuilder(layout_of)
    for i in range(3):
        list(b.add(ev(i, "U", "[1,2]", 3)))
    assert asked == []  # nothing built yet
    list(b.flush())
    assert asked == [3]


def test_an_event_that_carries_its_rows_apart_is_split_without_parsing_its_payload(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot's run hands its encoded rows over apart (Event.rows): the split uses them, not row_texts."""
    from pgturso.delivery import statements as module

    def parse(payload: str) -> Any:
        raise AssertionError("parsed a payload whose rows were given")

    monkeypatch.setattr(module, "row_texts", parse)
    rows = ("[1,2]", "[3,4]", "[5,6]")
    event = Event(1, 100, 3, "U", 3, ",".join(rows), rows=rows)
    assert [s.args for s in run([event], 13)] == [("[[1,2],[3,4]]",), ("[[5,6]]",)]
