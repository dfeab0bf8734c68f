"""Unit tests of outbox.IdRanges: the delivered-id set written to the progress marker and used to delete."""

from __future__ import annotations

import pytest
from pgturso.outbox import IdRanges


def ranges_of(*ids: int) -> IdRanges:
    result = IdRanges()
    for i in ids:
        result.add(i)
    return result


def test_empty() -> None:
    empty = IdRanges()
    assert not empty
    assert len(empty) == 0
    assert empty.lows() == [] and empty.highs() == []
    assert empty.to_json() == "[]"


def test_consecutive_ids_extend_one_range() -> None:
    r = ranges_of(5, 6, 7, 8)
    assert r.ranges == [[5, 8]]
    assert len(r) == 4
    assert r


def test_gaps_start_new_ranges() -> None:
    r = ranges_of(1, 2, 3, 5, 6, 9, 100)
    assert r.ranges == [[1, 3], [5, 6], [9, 9], [100, 100]]
    assert len(r) == 7
    assert r.lows() == [1, 5, 9, 100]
    assert r.highs() == [3, 6, 9, 100]


@pytest.mark.parametrize("late", [3, 2, 1])
def test_out_of_order_or_repeated_id_raises(late: int) -> None:
    r = ranges_of(1, 3)
    with pytest.raises(ValueError, match=f"outbox id {late} arrived out of order"):
        r.add(late)
    assert r.ranges == [[1, 1], [3, 3]]  # unchanged


def test_json_roundtrip() -> None:
    r = ranges_of(1, 2, 3, 5, 2**62, 2**62 + 1)
    text = r.to_json()
    assert text == f"[[1,3],[5,5],[{2**62},{2**62 + 1}]]"
    back = IdRanges.from_json(text)
    assert back.ranges == r.ranges
    assert len(back) == len(r) == 6
    back.add(2**62 + 2)  # a restored set keeps growing like the original
    assert back.ranges[-1] == [2**62, 2**62 + 2]


def test_constructor_from_pairs() -> None:
    r = IdRanges([(1, 4), (10, 10)])
    assert r.ranges == [[1, 4], [10, 10]]
    assert len(r) == 5
    r.add(11)
    assert r.ranges == [[1, 4], [10, 11]]


def test_from_json_accepts_whitespace() -> None:
    assert IdRanges.from_json(" [ [1, 2] , [4,4] ] ").ranges == [[1, 2], [4, 4]]
