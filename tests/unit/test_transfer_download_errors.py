"""Which error a download reports when both of its sides fail at once."""

from __future__ import annotations

import asyncio

import pytest

from nbia_sync.errors import IntegrityError, RetryableError
from nbia_sync.transfer.download import _first_error

pytestmark = pytest.mark.asyncio  # anyio needs the running loop to name its cancellation


async def test_a_single_error_is_reported_as_itself() -> None:
    err = IntegrityError("bad CRC")
    assert _first_error(BaseExceptionGroup("g", [err])) is err


async def test_the_other_sides_cancellation_is_not_the_error() -> None:
    err = RetryableError("reset")
    group = BaseExceptionGroup("g", [asyncio.CancelledError(), err])
    assert _first_error(group) is err


async def test_two_real_errors_give_the_first() -> None:
    first, second = IntegrityError("a"), RetryableError("b")
    assert _first_error(BaseExceptionGroup("g", [first, second])) is first
