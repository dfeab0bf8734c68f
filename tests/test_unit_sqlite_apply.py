"""The generated SQLite statements, run on real embedded engines: pyturso (the real target) and stdlib sqlite3.

Events are built the way the capture trigger builds them (each row a JSON array, rows of an event joined by
','), turned into statements by StatementBuilder and executed; the tests then read the resulting rows.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from pgturso.capture.layout import TableLayout
from pgturso.common.quoting import quote_ident
from pgturso.delivery.progress import CREATE_MARKER_SQL, READ_MARKER_SQL, marker_statements
from pgturso.delivery.statements import Statement, StatementBuilder
from pgturso.sources.outbox import Event


def _sqlite3_has_unhex() -> bool:
    try:
        sqlite3.connect(":memory:").execute("SELECT unhex('00')")
    except sqlite3.OperationalError:
        return False
    return True


SQLITE3_HAS_UNHEX = _sqlite3_has_unhex()


class Engine:
    def __init__(self, name: str) -> None:
        self.name = name
        if name == "turso":
            turso = pytest.importorskip("turso")
            self.conn: Any = turso.connect(":memory:", isolation_level=None)
            self.error: type[Exception] = turso.Error
        else:
            self.conn = sqlite3.connect(":memory:", isolation_level=None)
            self.error = sqlite3.Error
        self.has_unhex = name == "turso" or SQLITE3_HAS_UNHEX

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.conn.execute(sql, tuple(args)).fetchall()]

    def apply(
        self, layouts: dict[int, TableLayout], events: list[Event], max_payload_bytes: int = 1 << 20
    ) -> list[Statement]:
        builder = StatementBuilder(layouts.__getitem__, max_payload_bytes)
        done = []
        for statement in [s for e in events for s in builder.add(e)] + list(builder.flush()):
            self.execute(statement.sql, statement.args)
            done.append(statement)
        return done

    def rows(self, layout: TableLayout, order_by: str | None = None) -> list[tuple[Any, ...]]:
        names = ", ".join(quote_ident(c.name) for c in layout.columns)
        order = order_by or ", ".join(quote_ident(k) for k in layout.key_columns)
        return self.execute(f"SELECT {names} FROM {quote_ident(layout.target_table)} ORDER BY {order}")


@pytest.fixture(params=["turso", "sqlite3"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = Engine(request.param)
    yield eng
    eng.conn.close()


def col(name: str, base_type: str, not_null: bool = False, typmod: int = -1) -> dict[str, Any]:
    return {"name": name, "pg_type": base_type, "base_type": base_type, "typmod": typmod, "not_null": not_null}


def numeric_typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | scale) + 4


# A table whose names need quoting, with one column of each kind of decoding except bytea.
MIXED = TableLayout.from_catalog(
    'public."we""ird table"',
    'we"ird table',
    [
        col("id", "int8", True),
        col('na"me', "text"),
        col("score", "float8"),
        col("ok", "bool"),
        col("price", "numeric", typmod=numeric_typmod(10, 2)),
        col("big", "numeric", typmod=numeric_typmod(30, 0)),
        col("doc", "jsonb"),
        col("at", "timestamptz"),
        col("select", "text"),
    ],
    ["id"],
)
# Composite key including a bytea column, plus a nullable bytea.
BLOBS = TableLayout.from_catalog(
    "public.blobs",
    "blobs",
    [col("v", "bytea"), col('k"2', "bytea", True), col("k 1", "text", True)],
    ["k 1", 'k"2'],
)
PAIRS = TableLayout.from_catalog("public.pairs", "pairs", [col("a", "int4", True), col("b", "text", True)], ["a", "b"])
LAYOUTS = {1: MIXED, 2: BLOBS, 3: PAIRS}


def pg_json(value: Any) -> Any:
    """A Python value as the capture trigger encodes it (bytea as hex text)."""
    return value.hex() if isinstance(value, bytes) else value


def payload(*rows: Sequence[Any]) -> str:
    # json_build_array writes '[1, "a"]' with raw UTF-8; string_agg joins the rows of an event with ','.
    return ",".join(json.dumps([pg_json(v) for v in row], ensure_ascii=False) for row in rows)


class Events:
    def __init__(self) -> None:
        self.next_id = 1

    def __call__(self, op: str, *rows: Sequence[Any], layout_id: int = 1, txid: int = 1) -> Event:
        event = Event(self.next_id, txid, layout_id, op, len(rows), payload(*rows) if rows else None)
        self.next_id += 1
        return event


def mixed_row(i: int, name: str | None = "n", **over: Any) -> list[Any]:
    row = {
        "id": i,
        "name": name,
        "score": i + 0.25,
        "ok": i % 2 == 0,
        "price": 12.30,
        "big": "123456789012345678901234567890",
        "doc": '{"a": [1, 2]}',
        "at": "2024-01-02 03:04:05.123456+00",
        "select": "keyword column",
    }
    row.update(over)
    return list(row.values())


def test_create_upsert_delete(engine: Engine) -> None:
    e = Events()
    statements = engine.apply(
        LAYOUTS,
        [
            e("C"),
            e("U", mixed_row(1), mixed_row(2)),
            e("U", mixed_row(3, "three")),
            e("D", [1]),
        ],
    )
    assert [s.operation for s in statements] == ["create table", "create table", "upsert", "delete"]
    assert engine.rows(MIXED) == [
        (
            2,
            "n",
            2.25,
            1,
            12.3,
            "123456789012345678901234567890",
            '{"a": [1, 2]}',
            "2024-01-02 03:04:05.123456+00",
            "keyword column",
        ),
        (
            3,
            "three",
            3.25,
            0,
            12.3,
            "123456789012345678901234567890",
            '{"a": [1, 2]}',
            "2024-01-02 03:04:05.123456+00",
            "keyword column",
        ),
    ]
    types = engine.execute(
        'SELECT typeof("id"), typeof("score"), typeof("ok"), typeof("price"), typeof("big"), typeof("doc") '
        'FROM "we""ird table" WHERE "id" = 2'
    )
    assert types == [("integer", "real", "integer", "real", "text", "text")]


def test_floats_with_and_without_infinities_in_the_batch(engine: Engine) -> None:
    # A statement whose argument holds no 'Infinity' leaves FLOAT's decode out (types.DECODE_ONLY_FOR): both
    # forms must store the same values, and a batch with an infinity still stores it as SQLite's Inf.
    e = Events()
    finite = [mixed_row(1, score=1.5), mixed_row(2, score=-0.0), mixed_row(3, score="NaN"), mixed_row(4, score=None)]
    engine.apply(LAYOUTS, [e("C"), e("U", *finite)])
    stored = engine.execute('SELECT "id", "score", typeof("score") FROM "we""ird table" ORDER BY "id"')
    assert stored == [(1, 1.5, "real"), (2, 0.0, "real"), (3, "NaN", "text"), (4, None, "null")]
    engine.apply(LAYOUTS, [e("U", mixed_row(5, score="Infinity"), mixed_row(6, score="-Infinity"),
                              mixed_row(7, score=2.5))])
    assert engine.execute('SELECT "id", "score" FROM "we""ird table" WHERE "id" >= 5 ORDER BY "id"') == [
        (5, float("inf")), (6, float("-inf")), (7, 2.5)]


def test_declared_types_and_constraints(engine: Engine) -> None:
    engine.apply(LAYOUTS, [Events()("C")])
    # PRAGMA, not pragma_table_info(): pyturso 0.8 fails on a quote inside the table-valued function's argument.
    info = [row[1:4] + row[5:] for row in engine.execute('PRAGMA table_info("we""ird table")')]
    assert info == [
        ("id", "INTEGER", 1, 1),
        ('na"me', "TEXT", 0, 0),
        ("score", "REAL", 0, 0),
        ("ok", "INTEGER", 0, 0),
        ("price", "NUMERIC", 0, 0),
        ("big", "TEXT", 0, 0),
        ("doc", "TEXT", 0, 0),
        ("at", "TEXT", 0, 0),
        ("select", "TEXT", 0, 0),
    ]


def test_key_written_twice_in_one_merged_statement_ends_with_last_value(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C")])
    statements = engine.apply(
        LAYOUTS,
        [
            e("U", mixed_row(1, "first"), mixed_row(2, "other"), txid=1),
            e("U", mixed_row(1, "second"), txid=2),
            e("U", mixed_row(1, "third"), mixed_row(1, "last", score=-1.5), txid=3),
        ],
    )
    assert len(statements) == 1 and statements[0].txids == (1, 2, 3)
    assert [(r[0], r[1], r[2]) for r in engine.rows(MIXED)] == [(1, "last", -1.5), (2, "other", 2.25)]


def test_primary_key_change_deletes_old_key_then_upserts_new(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C"), e("U", mixed_row(1, "a"), mixed_row(2, "b"))])
    # UPDATE t SET id = 10 WHERE id = 1: the trigger sends the moved key, then the new row.
    engine.apply(LAYOUTS, [e("D", [1], txid=2), e("U", mixed_row(10, "a"), txid=2)])
    assert [(r[0], r[1]) for r in engine.rows(MIXED)] == [(2, "b"), (10, "a")]
    # UPDATE t SET id = 12 - id (swaps 2 and 10): no key moved away, both rows overwritten.
    engine.apply(LAYOUTS, [e("U", mixed_row(10, "b"), mixed_row(2, "a"), txid=3)])
    assert [(r[0], r[1]) for r in engine.rows(MIXED)] == [(2, "a"), (10, "b")]


def test_delete_then_reinsert_in_one_batch(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C"), e("U", mixed_row(1, "old"))])
    engine.apply(LAYOUTS, [e("D", [1]), e("U", mixed_row(1, "new")), e("D", [2], [3])])
    assert [(r[0], r[1]) for r in engine.rows(MIXED)] == [(1, "new")]


def test_nulls_and_not_null(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C"), e("U", [5, None, None, None, None, None, None, None, None])])
    assert engine.rows(MIXED) == [(5, None, None, None, None, None, None, None, None)]
    engine.apply(LAYOUTS, [e("C", layout_id=3)])
    with pytest.raises(engine.error):
        engine.apply(LAYOUTS, [e("U", [1, None], layout_id=3)])
    assert engine.rows(PAIRS) == []


def test_unicode_quotes_and_injection_attempts_are_plain_values(engine: Engine) -> None:
    e = Events()
    tricky = [
        'O\'Brien "quoted"',
        "é😀 漢字 \u200b",
        '\'); DROP TABLE "we""ird table"; --',
        "back\\slash\nnew line\ttab",
        "[1, 2]",
        "0012",
        "",
    ]
    rows = [mixed_row(i, name) for i, name in enumerate(tricky)]
    engine.apply(LAYOUTS, [e("C"), e("U", *rows)])
    assert [r[1] for r in engine.rows(MIXED)] == tricky
    assert engine.execute('SELECT typeof("na""me") FROM "we""ird table" WHERE "id" = 5') == [("text",)]


def test_int64_extremes_as_keys(engine: Engine) -> None:
    e = Events()
    keys = [-(2**63), -1, 0, 2**53 + 1, 2**63 - 1]
    engine.apply(LAYOUTS, [e("C"), e("U", *[mixed_row(k) for k in keys])])
    assert [r[0] for r in engine.rows(MIXED)] == keys
    engine.apply(LAYOUTS, [e("D", [2**63 - 1], [-(2**63)])])
    assert [r[0] for r in engine.rows(MIXED)] == [-1, 0, 2**53 + 1]


def test_truncate_and_recreate(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C"), e("U", mixed_row(1), mixed_row(2)), e("T"), e("U", mixed_row(3))])
    assert [r[0] for r in engine.rows(MIXED)] == [3]
    engine.apply(LAYOUTS, [e("C")])  # track_table again: the table is dropped and created empty
    assert engine.rows(MIXED) == []
    engine.apply(LAYOUTS, [e("U", mixed_row(4))])
    assert [r[0] for r in engine.rows(MIXED)] == [4]


def test_all_key_table_ignores_duplicates(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C", layout_id=3), e("U", [1, "x"], [1, "y"], [1, "x"], layout_id=3)])
    engine.apply(LAYOUTS, [e("U", [1, "x"], [2, "x"], layout_id=3)])
    assert engine.rows(PAIRS) == [(1, "x"), (1, "y"), (2, "x")]
    engine.apply(LAYOUTS, [e("D", [1, "x"], [2, "y"], layout_id=3)])
    assert engine.rows(PAIRS) == [(1, "y"), (2, "x")]


def test_many_rows_across_several_statements(engine: Engine) -> None:
    e = Events()
    engine.apply(LAYOUTS, [e("C", layout_id=3)])
    events = [e("U", *[[i, f"v{i}"] for i in range(start, start + 100)], layout_id=3) for start in range(0, 2000, 100)]
    statements = engine.apply(LAYOUTS, events, max_payload_bytes=4000)
    assert len(statements) > 1
    assert all(s.sql == statements[0].sql for s in statements)
    assert engine.execute('SELECT count(*), min("a"), max("a"), sum("a") FROM "pairs"') == [(2000, 0, 1999, 1999000)]
    deletes = [e("D", *[[i, f"v{i}"] for i in range(start, start + 100)], layout_id=3) for start in range(0, 2000, 200)]
    engine.apply(LAYOUTS, deletes, max_payload_bytes=4000)
    assert engine.execute('SELECT count(*) FROM "pairs" WHERE "a" % 200 < 100') == [(0,)]
    assert engine.execute('SELECT count(*) FROM "pairs"') == [(1000,)]


@pytest.fixture
def blob_engine() -> Iterator[Engine]:
    """pyturso, the real target engine (stdlib sqlite3 here may predate unhex(), SQLite 3.41)."""
    engine = Engine("turso")
    yield engine
    engine.conn.close()


def test_blobs_and_bytea_keys(blob_engine: Engine) -> None:
    engine = blob_engine
    e = Events()
    every_byte = bytes(range(256))
    engine.apply(
        LAYOUTS,
        [
            e("C", layout_id=2),
            e("U", [every_byte, b"\x00", "a"], [b"", b"\xff\xfe", "a"], [None, b"", "b"], layout_id=2),
        ],
    )
    assert engine.rows(BLOBS, order_by='"k 1", "k""2"') == [
        (every_byte, b"\x00", "a"),
        (b"", b"\xff\xfe", "a"),
        (None, b"", "b"),
    ]
    assert engine.execute('SELECT typeof("v"), typeof("k""2") FROM "blobs" ORDER BY "k 1", "k""2"') == [
        ("blob", "blob"),
        ("blob", "blob"),  # an empty bytea stays an empty blob, not NULL
        ("null", "blob"),
    ]
    # Upsert on the composite bytea key, then delete by it (key arrays are in key order: "k 1", "k""2").
    engine.apply(LAYOUTS, [e("U", [b"new", b"\x00", "a"], layout_id=2), e("D", ["a", b"\xff\xfe"], layout_id=2)])
    assert engine.rows(BLOBS, order_by='"k 1", "k""2"') == [(b"new", b"\x00", "a"), (None, b"", "b")]
    engine.apply(LAYOUTS, [e("D", ["b", b""], ["a", b"\x00\x00"], layout_id=2)])
    assert engine.rows(BLOBS) == [(b"new", b"\x00", "a")]


def test_progress_marker_statements(engine: Engine) -> None:
    engine.execute(CREATE_MARKER_SQL)
    engine.execute(CREATE_MARKER_SQL)  # IF NOT EXISTS
    previous = ""
    for marker in ('{"upto":7,"snapshot":"10:12:10","held":[],"layouts":null}',
                   '{"upto":10,"snapshot":"12:12:","held":["11"],"layouts":[1,2]}'):
        for statement in marker_statements("source-1", marker, previous):
            engine.execute(statement.sql, statement.args)
        assert engine.execute(READ_MARKER_SQL, ("source-1",)) == [(marker,)]
        previous = marker
    check = "SELECT count(*), applied_at LIKE '____-__-__T__:__:__.___Z' FROM \"_pgturso_progress\""
    assert engine.execute(check) == [(1, 1)]


@pytest.mark.parametrize("seen", ["", '{"upto":3}'], ids=["saw no marker", "saw an older marker"])
def test_progress_marker_is_a_fence(engine: Engine, seen: str) -> None:
    """A worker that did not see the marker now on the target cannot write its own: the check fails."""
    engine.execute(CREATE_MARKER_SQL)
    write, check = marker_statements("source-1", '{"upto":5}', "")
    engine.execute(write.sql, write.args)
    engine.execute(check.sql, check.args)
    write, check = marker_statements("source-1", '{"upto":9}', seen)
    engine.execute(write.sql, write.args)
    with pytest.raises(Exception, match="malformed JSON"):
        engine.execute(check.sql, check.args)
    assert engine.execute(READ_MARKER_SQL, ("source-1",)) == [('{"upto":5}',)]
