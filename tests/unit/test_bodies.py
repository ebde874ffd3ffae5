"""api/bodies.py without sockets: the record-by-record JSON parser, bounded inflation and
the progress floor."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_sync.api.bodies import (
    _SHARED_MAX,
    Floor,
    Inflater,
    ProgressFloor,
    _ArrayParser,
    json_records,
)
from nbia_sync.config import TransferSettings
from nbia_sync.errors import RetryableError


async def pieces(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        yield data[start:cut]
        start = max(start, cut)
    yield data[start:]


async def parse(data: bytes, cuts: list[int] | None = None) -> list[Any]:
    return [r async for r in json_records(pieces(data, cuts or []), "q")]


records = st.lists(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.floats(allow_nan=False)),
        max_size=4,
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(records, st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_any_chunking_parses_like_json_loads(
    rows: list[dict[str, Any]], cuts: list[int], spaced: bool
) -> None:
    data = json.dumps(rows, indent=1 if spaced else None, ensure_ascii=False).encode()
    assert asyncio.run(parse(data, cuts)) == json.loads(data)


@pytest.mark.asyncio
async def test_the_parser_shares_repeated_strings_but_keeps_no_answer_long_memo() -> None:
    count = 3 * _SHARED_MAX
    rows = [{"Collection": "SIM-CT", "SeriesInstanceUID": f"1.2.{i}"} for i in range(count)]
    parser = _ArrayParser(pieces(json.dumps(rows).encode(), []), "q")
    parsed = [r async for r in parser.items()]
    assert parsed == rows
    first, last = parsed[-2], parsed[-1]  # after the memo was emptied
    assert first["Collection"] is last["Collection"]
    assert [k for k in first][1] is [k for k in last][1]
    # Every UID of the answer was unique: the memo must not have kept them all.
    assert len(parser._memo) <= _SHARED_MAX


@pytest.mark.asyncio
async def test_an_empty_body_is_no_records() -> None:
    assert await parse(b"  \n") == []


@pytest.mark.asyncio
async def test_a_lone_object_is_one_record() -> None:
    assert await parse(b'{"a": 1}') == [{"a": 1}]


@pytest.mark.asyncio
async def test_a_utf8_bom_is_accepted() -> None:
    assert await parse(b'\xef\xbb\xbf[{"a": 1}]') == [{"a": 1}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>error</html>", "not valid JSON"),
        (b'[{"a": 1}', "not valid JSON"),
        (b'[{"a": 1}] trailing', "not valid JSON"),
        (b'[{"a": 1} {"b": 2}]', "not valid JSON"),
        (b"[1, 2]", "not a JSON list of objects"),
        (b'"text"', "not a JSON list of objects"),
        (b'[{"a": "\xff"}]', "not valid JSON"),
    ],
)
@pytest.mark.asyncio
async def test_bad_bodies_are_retryable_errors(body: bytes, message: str) -> None:
    with pytest.raises(RetryableError, match=message):
        await parse(body, [3, 7])


@pytest.mark.asyncio
async def test_records_arrive_before_the_body_ends() -> None:
    async def endless() -> AsyncIterator[bytes]:
        yield b'[{"n": 0}'
        while True:
            yield b', {"n": 1}'

    seen = []
    async for record in json_records(endless(), "q"):
        seen.append(record)
        if len(seen) == 3:
            break
    assert seen == [{"n": 0}, {"n": 1}, {"n": 1}]


@pytest.mark.asyncio
async def test_inflation_is_done_in_bounded_steps() -> None:
    bomb = zlib.compress(b"\0" * (8 << 20), 9)  # ~8 KB that inflates to 8 MiB
    c = zlib.compressobj(wbits=31)
    gz = c.compress(b"\0" * (8 << 20)) + c.flush()
    for encoding, data in (("deflate", bomb), ("gzip", gz)):
        inflater = Inflater(encoding, "q")
        sizes = [len(p) for p in inflater.feed(data, 65536)]
        inflater.finish()
        assert max(sizes) <= 65536 and sum(sizes) == 8 << 20


@pytest.mark.asyncio
async def test_raw_deflate_is_accepted_too() -> None:
    c = zlib.compressobj(wbits=-15)
    data = c.compress(b"hello" * 100) + c.flush()
    assert b"".join(Inflater("deflate", "q").feed(data, 64)) == b"hello" * 100


@pytest.mark.asyncio
async def test_a_truncated_gzip_body_is_retryable() -> None:
    c = zlib.compressobj(wbits=31)
    gz = c.compress(b"x" * 100_000) + c.flush()
    inflater = Inflater("gzip", "q")
    list(inflater.feed(gz[: len(gz) // 2], 4096))
    with pytest.raises(RetryableError, match="ended early"):
        inflater.finish()


@pytest.mark.asyncio
async def test_an_unasked_encoding_is_refused() -> None:
    with pytest.raises(RetryableError, match="Content-Encoding 'br'"):
        Inflater("br", "q")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def floor_with_clock(limit: int, period: float) -> tuple[ProgressFloor, Clock]:
    clock = Clock()
    floor = ProgressFloor(Floor(limit, period), "q")
    floor._clock = clock
    floor._start = 0.0
    return floor, clock


@pytest.mark.asyncio
async def test_a_transfer_below_the_floor_for_the_whole_period_is_cut() -> None:
    floor, clock = floor_with_clock(limit=100, period=10.0)
    for second in range(1, 10):
        clock.now = float(second)
        floor.record(50)  # 50 bytes/s: half the floor
    clock.now = 10.0
    with pytest.raises(RetryableError, match="low_speed_limit = 100 bytes/s"):
        floor.record(50)


@pytest.mark.asyncio
async def test_a_transfer_at_the_floor_goes_on() -> None:
    floor, clock = floor_with_clock(limit=100, period=10.0)
    for second in range(1, 60):
        clock.now = float(second)
        floor.record(100)


@pytest.mark.asyncio
async def test_the_deadline_is_the_end_of_an_unmet_window() -> None:
    floor, clock = floor_with_clock(limit=100, period=10.0)
    assert floor.deadline() == 10.0
    clock.now = 1.0
    floor.record(1000)
    assert floor.deadline() is None  # this window is met already


@pytest.mark.asyncio
async def test_a_zero_limit_disables_the_floor() -> None:
    floor, clock = floor_with_clock(limit=0, period=1.0)
    clock.now = 1e9
    floor.record(0)
    assert floor.deadline() is None


def test_the_floor_stays_below_each_workers_share_of_the_bandwidth_cap() -> None:
    transfer = TransferSettings(workers=4, bandwidth_limit=4000, low_speed_limit=1024)
    assert Floor.from_settings(transfer).limit == 500
    assert Floor.from_settings(TransferSettings(low_speed_limit=1024)).limit == 1024
